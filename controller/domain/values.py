"""Domain values the use cases take and return.

Plain frozen dataclasses with the interchange format's lowercase words (`dedicated_rack`,
`rack`, `running`), independent of protobuf and of the ORM: the servicers convert protobuf into
these, the repositories convert rows into these. A deployment's shard and spread are the
solver's own `scheduler.model.ShardSpec` and `Spread` (one definition of a shard's milli-units
and power; `accelerator_models` None means any model).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from scheduler.model import Rack, Row, ShardSpec, Spread, Zone

ISOLATIONS: tuple[str, ...] = ("shared", "dedicated_node", "dedicated_rack")
DOMAINS: tuple[str, ...] = ("node", "rack", "row", "zone", "none")


# --- tenants ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TenantSpec:
    id: str
    isolation: str = "shared"
    excludes: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()
    reserved_accelerators: float | None = None
    max_accelerators: float | None = None
    max_power_w: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    accelerators: float = 0.0
    power_w: float = 0.0


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """Metered usage of one deployment's shards on one accelerator model in one zone, over a window."""

    tenant: str
    deployment: str
    accelerator_model: str
    zone: str
    accelerator_seconds: float
    energy_kwh: float


@dataclass(frozen=True, slots=True)
class UsageReport:
    since: datetime | None
    until: datetime
    records: tuple[UsageRecord, ...]


@dataclass(frozen=True, slots=True)
class TenantView:
    spec: TenantSpec
    usage: Usage = Usage()


# --- topology --------------------------------------------------------------------------------
# The topology vocabulary is the placement spec's own: one definition, in the solver's model.
ZoneSpec = Zone
RowSpec = Row
RackSpec = Rack


@dataclass(frozen=True, slots=True)
class TopologySpec:
    zones: tuple[ZoneSpec, ...] = ()
    rows: tuple[RowSpec, ...] = ()
    racks: tuple[RackSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class RowView:
    spec: RowSpec
    power_used_w: float = 0.0


@dataclass(frozen=True, slots=True)
class RackView:
    spec: RackSpec
    power_used_w: float = 0.0
    nodes: int = 0


@dataclass(frozen=True, slots=True)
class TopologyView:
    zones: tuple[ZoneSpec, ...]
    rows: tuple[RowView, ...]
    racks: tuple[RackView, ...]


# --- nodes -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What an agent says its node is (Register)."""

    node_id: str
    rack: str
    accelerators: int
    hostname: str = ""
    accelerator_model: str = ""
    hbm_gib: float | None = None
    cpu_milli: int | None = None
    memory_mib: int | None = None
    idle_power_w: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    agent_version: str = ""


@dataclass(frozen=True, slots=True)
class NodeView:
    info: NodeInfo
    row: str
    zone: str
    state: str
    connected: bool = False
    last_heartbeat: datetime | None = None
    power_draw_w: float = 0.0
    accelerators_used: float = 0.0
    shards: int = 0
    tenants: tuple[str, ...] = ()
    cordoned: bool = False  # by an operator (`state` says so of an up node only)
    draining: bool = False
    evicted: bool = False   # down, its work placed again elsewhere
    failed_accelerators: tuple[AcceleratorFault, ...] = ()  # its agent says so (usecases/faults.py)
    # The deployment (key) it is kept for at the head of the line, and since when ("": none).
    nominated_for: str = ""
    nominated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ClusterSummary:
    nodes_ready: int
    nodes_cordoned: int
    nodes_down: int
    accelerators_total: float
    accelerators_used: float
    power_budget_w: float
    power_used_w: float
    deployments_by_phase: dict[str, int]
    tenants: tuple[TenantView, ...]
    nodes_suspect: int = 0


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """The committed state as a placement problem document (interchange format v1)."""

    generation: int
    problem: dict[str, Any]


# --- deployments -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    name: str
    tenant: str
    replicas: int
    shards_per_replica: int
    shard: ShardSpec
    min_replicas: int = 1
    locality: str = "rack"
    spread: Spread | None = None
    priority: int = 0
    preemptible: bool = False

    @property
    def key(self) -> str:
        return deployment_key(self.tenant, self.name)

    def rolls_from(self, old: DeploymentSpec) -> bool:
        """Whether changing `old` into this spec changes what a replica is (`TEMPLATE_FIELDS`):
        a new revision, rolled out replica by replica; else it applies at once (docs/rollout.md)."""
        return any(getattr(old, f) != getattr(self, f) for f in TEMPLATE_FIELDS)

    def with_template_of(self, other: DeploymentSpec) -> DeploymentSpec:
        """This spec with `other`'s template (`TEMPLATE_FIELDS`): a rollback to `other`'s revision,
        its replica count, priority and preemptibility as they are now."""
        return replace(self, **{f: getattr(other, f) for f in TEMPLATE_FIELDS})


# The fields that make a replica what it is: a change to one rolls the deployment.
TEMPLATE_FIELDS = ("shards_per_replica", "shard", "locality", "spread")


def deployment_key(tenant: str, name: str) -> str:
    """A deployment's identity as one string, `TENANT/NAME`: names are per tenant (two tenants may
    both have `chat`), and the interchange format writes such ids this way. The solver's problem
    document, plans, events and the controller's sets of changed deployments all use it. Neither
    tenant ids nor deployment names may contain '/'."""
    return f"{tenant}/{name}"


def split_deployment_key(key: str) -> tuple[str, str]:
    """(tenant, name) of a `deployment_key`."""
    tenant, _, name = key.rpartition("/")
    return tenant, name


@dataclass(frozen=True, slots=True)
class ReasonView:
    code: str
    message: str
    scope: str = ""


@dataclass(frozen=True, slots=True)
class ShardPlacementView:
    replica: int
    shard: int
    node: str
    rack: str
    accelerator_indices: tuple[int, ...]
    accelerator_milli: int = 0  # 0: whole accelerators
    phase: str = "assigned"
    message: str = ""
    revision: int = 1
    outgoing: bool = False  # being replaced: an older revision, or on a draining node


@dataclass(frozen=True, slots=True)
class NominationView:
    """The nodes kept for a deployment at the head of the waiting line, as the leader stored them
    (controller/store/nominations.py): when, its place in the line, the replicas it lacked then."""

    nodes: tuple[str, ...]
    nominated_at: datetime
    waiting_since: datetime
    missing_replicas: int


@dataclass(frozen=True, slots=True)
class DeploymentView:
    spec: DeploymentSpec
    phase: str
    generation: int = 0
    placed_replicas: int = 0
    running_replicas: int = 0
    placements: tuple[ShardPlacementView, ...] = ()
    reasons: tuple[ReasonView, ...] = ()
    created_at: datetime | None = None
    updated_at: datetime | None = None
    resource_version: int = 1
    revision: int = 1
    updated_replicas: int = 0   # current revision, every shard running
    outgoing_replicas: int = 0  # being replaced, stopped once their replacements run
    nomination: NominationView | None = None  # read by GetDeployment alone


@dataclass(frozen=True, slots=True)
class DeploymentUpdate:
    """What an update did: the stored deployment, the fields it changed, whether it rolls."""

    deployment: DeploymentView
    changes: tuple[str, ...] = ()
    rolling: bool = False


@dataclass(frozen=True, slots=True)
class RevisionView:
    """One of a deployment's kept revisions (`maiactl rollout history`): the spec it was made with
    (the current one's as it stands now), when (None: unknown, made before revisions were kept),
    the changes of the update that made it (none: the first)."""

    revision: int
    spec: DeploymentSpec
    created_at: datetime | None
    changes: tuple[str, ...]
    current: bool


@dataclass(frozen=True, slots=True)
class Rollback:
    """What a rollback did: the update it made (`DeploymentUpdate`), and the revision whose template it took."""

    update: DeploymentUpdate
    to_revision: int


@dataclass(frozen=True, slots=True)
class DeploymentEvent:
    type: Literal["added", "modified", "deleted"]
    deployment: DeploymentView


# --- agents ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Registration:
    node_id: str
    session_id: str
    heartbeat_interval_ms: int
    node_credential: str = ""  # a newly issued node credential (shown once), or ""


@dataclass(frozen=True, slots=True)
class Assignment:
    deployment: str
    tenant: str
    replica: int
    shard: int
    shards_per_replica: int
    accelerator_indices: tuple[int, ...]
    accelerator_milli: int  # 0: whole accelerators
    spec: ShardSpec
    generation: int
    deployment_uid: int = 0  # its deployment's row id: never another's (a deployment deleted and submitted again)


@dataclass(frozen=True, slots=True)
class AssignmentSet:
    node_id: str
    generation: int
    assignments: tuple[Assignment, ...]


@dataclass(frozen=True, slots=True)
class ShardReport:
    """One ShardStatus from an agent."""

    deployment: str
    replica: int
    shard: int
    generation: int
    phase: str
    message: str = ""
    power_draw_w: float = 0.0
    tenant: str = ""  # empty: the agent did not say (the controller looks it up in what it gave the node)
    deployment_uid: int = 0  # the assignment's it answers; 0: the agent did not say (not checked)

    def answers(self, deployment_uid: int) -> bool:
        """Whether it answers an assignment of the deployment with this uid (one that says none: yes)."""
        return not self.deployment_uid or self.deployment_uid == deployment_uid


@dataclass(frozen=True, slots=True)
class HeartbeatReport:
    seq: int
    power_draw_w: float
    shards: tuple[ShardReport, ...] = ()
    shard_state_version: int = 0  # 0: unversioned (every heartbeat carries the full state)
    shards_omitted: bool = False  # the state is that of `shard_state_version`, sent in full before
    failed_accelerators: tuple[AcceleratorFault, ...] = ()  # all of the node's, in every heartbeat


@dataclass(frozen=True, slots=True)
class AcceleratorFault:
    """One accelerator of a node that its agent says failed, and why (its words)."""

    index: int
    reason: str = ""


# --- tokens ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TokenRequest:
    """What an admin asks for: role, the tenant a tenant token is bound to, a lifetime."""

    role: str
    name: str = ""
    tenant: str = ""
    ttl_s: float | None = None  # None: never expires
    node: str = ""  # role node-bootstrap: the one node id it may register ("": any)


@dataclass(frozen=True, slots=True)
class TokenView:
    """A token as listed: never its secret."""

    id: str
    name: str
    role: str
    tenant: str = ""
    node: str = ""
    created_by: str = ""
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token just created: `secret` is the whole bearer text, shown this once."""

    view: TokenView
    secret: str

@dataclass(frozen=True, slots=True)
class EventView:
    """One row of the events history, as `maiactl get events` shows it."""

    id: int
    at: datetime
    actor: str
    kind: str
    object_kind: str
    object_id: str
    message: str
