"""Domain values of the placement problem and its answer.

Everything the solver reads or returns is a frozen dataclass so a problem can be shared between
threads, hashed, and never mutated behind the solver's back. The JSON mapping lives in
`interchange.py`; these types know nothing about JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Domain = Literal["node", "rack", "row", "zone", "none"]
NodeState = Literal["ready", "cordoned", "down"]
Isolation = Literal["shared", "dedicated_node", "dedicated_rack"]
Mode = Literal["batch", "online", "rebalance"]
Status = Literal["optimal", "feasible", "infeasible"]
# The internal ids of a row and a zone a document leaves out (`interchange.problem_from_dict`
# implies them): no names of the document's, never shown as such in a reason.
IMPLIED_ROW = "_row"
IMPLIED_ZONE = "_zone"

@dataclass(frozen=True, slots=True)
class Zone:
    id: str


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    zone: str
    power_budget_w: float | None = None


@dataclass(frozen=True, slots=True)
class Rack:
    id: str
    row: str
    power_budget_w: float | None = None


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    rack: str
    accelerators: int
    state: NodeState = "ready"
    accelerator_model: str | None = None
    hbm_gib: float | None = None  # None: not limited
    cpu_milli: int | None = None
    memory_mib: int | None = None
    idle_power_w: float = 0.0
    labels: tuple[tuple[str, str], ...] = ()
    # Why a node that is not ready is so, in words (an interchange extension, `interchange.py`):
    # the reasons say it instead of `state` ("suspect", where the format can only say cordoned).
    condition: str | None = None
    # Indices of its accelerators that failed (an interchange extension, `interchange.py`): no
    # shard may use them; a shard placed on one is lost, as on a down node.
    unhealthy_accelerators: tuple[int, ...] = ()
    # The most shards the node may hold at once, whatever they need (an interchange extension,
    # `interchange.py`; None: no bound), as Kubernetes' max-pods: an agent's assignment set
    # and heartbeat list are bounded (the controller's `SHARDS_PER_NODE_MAX`).
    max_shards: int | None = None


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    isolation: Isolation = "shared"
    excludes: tuple[str, ...] = ()
    zones: tuple[str, ...] | None = None  # None: anywhere
    reserved_accelerators: float = 0.0
    max_accelerators: float | None = None
    max_power_w: float | None = None


@dataclass(frozen=True, slots=True)
class ShardSpec:
    accelerators: int
    accelerator_milli: int = 1000
    hbm_gib: float = 0.0
    cpu_milli: int = 0
    memory_mib: int = 0
    power_w: float = 0.0
    accelerator_models: tuple[str, ...] | None = None

    @property
    def fractional(self) -> bool:
        """A fraction of one accelerator, shareable with the same tenant."""
        return self.accelerators == 1 and self.accelerator_milli < 1000

    @property
    def milli(self) -> int:
        """Accelerator demand in milli-units (what tenant caps and the objective count)."""
        return self.accelerator_milli if self.fractional else 1000 * self.accelerators

    @property
    def shard_power_w(self) -> float:
        """Power one shard draws under load."""
        return self.power_w * self.milli / 1000.0


@dataclass(frozen=True, slots=True)
class Spread:
    domain: Domain
    max_per_domain: int


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str
    tenant: str
    replicas: int
    shards_per_replica: int
    shard: ShardSpec
    min_replicas: int = 1
    locality: Domain = "rack"
    spread: Spread | None = None
    priority: int = 0
    preemptible: bool = False
    # Deployments naming one group count together toward each one's `spread` where they can
    # (an extension of the interchange format: interchange.py, `spread_group`).
    spread_group: str | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    deployment: str
    replica: int
    shard: int
    node: str
    accelerator_indices: tuple[int, ...]
    accelerator_milli: int | None = None


@dataclass(frozen=True, slots=True)
class Options:
    mode: Mode = "batch"
    time_limit_ms: int | None = None
    max_moves: int | None = None
    allow_preemption: bool = False
    batch_size: int | None = None


@dataclass(frozen=True, slots=True)
class Nomination:
    """Nodes kept for one deployment that waits at the head of the line (an interchange
    extension, `interchange.py`): no new shard of another deployment of `priority` or lower is
    placed on them, so capacity freed there accumulates until the deployment fits (Kubernetes'
    nominated node, Slurm's reservation for the top job)."""

    deployment: str
    priority: int
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    nodes: tuple[Node, ...]
    deployments: tuple[Deployment, ...]
    zones: tuple[Zone, ...] = ()
    rows: tuple[Row, ...] = ()
    racks: tuple[Rack, ...] = ()
    tenants: tuple[Tenant, ...] = ()
    placements: tuple[Placement, ...] = ()
    options: Options = field(default_factory=Options)
    nominations: tuple[Nomination, ...] = ()


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    message: str
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class Unplaced:
    deployment: str
    replicas: int
    reasons: tuple[Reason, ...]


@dataclass(frozen=True, slots=True)
class Preemption:
    deployment: str
    replica: int


@dataclass(frozen=True, slots=True)
class Move:
    deployment: str
    replica: int
    shard: int
    from_node: str
    to_node: str


@dataclass(frozen=True, slots=True)
class Plan:
    status: Status
    placements: tuple[Placement, ...]
    unplaced: tuple[Unplaced, ...] = ()
    preempted: tuple[Preemption, ...] = ()
    moved: tuple[Move, ...] = ()
    stats: dict[str, Any] = field(default_factory=dict)
