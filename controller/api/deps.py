"""What servicers need from the running controller, handed to them at construction."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from datetime import datetime

from controller.agents import AgentHub
from controller.api.auditing import AuditInterceptor
from controller.ratelimit import SubmitLimits
from controller.store.db import Database
from controller.tokenstreams import TokenStreams
from controller.usecases.capacity import CapacityCache
from controller.usecases.ports import Signals
from controller.usecases.deletes import DeleteBatcher
from controller.usecases.submits import SubmitBatcher
from controller.usecases.watch import DeploymentEventBus


@dataclass(frozen=True)
class ServiceDeps:
    db: Database
    signals: Signals
    bus: DeploymentEventBus
    hub: AgentHub
    solve_time_limit_ms: int
    throttle: SubmitLimits | None = None
    allow_preemption: bool = True  # --preemption: dry runs solve as the passes do
    # Raises `NotLeader` (UNAVAILABLE with the leader's address) on a follower: agents go to the leader.
    require_leader: Callable[[], None] = lambda: None
    leads: Callable[[], bool] = lambda: True  # whether this controller leads now (holds the agents' streams)
    advertised: Callable[[], str] = lambda: ""  # where this controller serves the API (--advertise-address)
    leader_address: Callable[[], str] = lambda: ""  # where the leader serves it, as last read ("": none now)
    capacity: CapacityCache | None = None  # the submit path's aggregates (None: read per submit)
    submits: SubmitBatcher | None = None  # group commit of submits (None: one transaction each)
    deletes: DeleteBatcher | None = None  # group commit of deletions (None: one transaction each)
    # Audits each request of an itemized call (SubmitDeployments) as its own call (None: not audited).
    audit: AuditInterceptor | None = None
    # The watches open here by their token: a revocation ends them (`AppSignals.tokens_revoked`).
    streams: TokenStreams = field(default_factory=TokenStreams)

    def connected(self) -> Set[str] | None:
        """The nodes whose agent holds a stream to this controller (the hub's live view: no copy);
        None on a follower, whose hub holds none: the node views say what the leader stored
        (`usecases.nodes`)."""
        return self.hub.connected() if self.leads() else None

    def last_heard(self) -> Mapping[str, datetime]:
        """When each node was last heard from on a stream to this controller, asked node by node
        (a node's view needs its own; the whole map is built only when iterated)."""
        return _LastHeard(self.hub)


@dataclass(frozen=True, eq=False)
class _LastHeard(Mapping[str, datetime]):
    """`AgentHub.last_heard` looked up one node at a time (`heard_from`): a node's view (GetNode, a
    cordon, a page of ListNodes) no longer builds a map of every connected node."""

    hub: AgentHub

    def __getitem__(self, node_id: str) -> datetime:
        at = self.hub.heard_from(node_id)
        if at is None:
            raise KeyError(node_id)
        return at

    def __iter__(self) -> Iterator[str]:
        return iter(self.hub.last_heard())

    def __len__(self) -> int:
        return len(self.hub.last_heard())
