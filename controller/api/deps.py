"""What servicers need from the running controller, handed to them at construction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from controller.agents import AgentHub
from controller.ratelimit import SubmitLimits
from controller.store.db import Database
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
    heartbeat_interval_ms: int
    throttle: SubmitLimits | None = None
    # Raises `NotLeader` (UNAVAILABLE with the leader's address) on a follower: agents go to the leader.
    require_leader: Callable[[], None] = lambda: None
    capacity: CapacityCache | None = None  # the submit path's aggregates (None: read per submit)
    submits: SubmitBatcher | None = None  # group commit of submits (None: one transaction each)
    deletes: DeleteBatcher | None = None  # group commit of deletions (None: one transaction each)

    def connected(self) -> frozenset[str]:
        return self.hub.connected()

    def last_heard(self) -> dict[str, datetime]:
        return self.hub.last_heard()
