"""The controller's tables, as typed SQLAlchemy 2.0 mappings.

State that the placement depends on lives in four groups:
- topology: zones > rows > racks (power budgets) > nodes (capacity, agent liveness);
- contracts: tenants (isolation, excludes, zones, reservation and caps);
- intent: deployments (what a tenant asked for, its phase and the reasons it is pending);
- outcome: placements (one row per placed shard, with concrete accelerator indices).
`ClusterState` holds one generation counter that every placement-relevant change bumps, so a
plan knows whether the snapshot it was solved from is stale (the plan applier then re-checks
what it lands; see store/plans/). `Event` is the append-only history of state changes.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, overload

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from controller.store.enumtype import InlineEnum

# Predictable constraint names so Alembic migrations are stable across SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID_LENGTH = 128


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@overload
def as_utc(at: datetime) -> datetime: ...
@overload
def as_utc(at: None) -> None: ...
def as_utc(at: datetime | None) -> datetime | None:
    """A stored time, made aware: every stored time is UTC, and SQLite hands them back naive."""
    if at is not None and at.tzinfo is None:
        return at.replace(tzinfo=timezone.utc)
    return at


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Isolation(str, enum.Enum):
    SHARED = "shared"
    DEDICATED_NODE = "dedicated_node"
    DEDICATED_RACK = "dedicated_rack"


class Domain(str, enum.Enum):
    NODE = "node"
    RACK = "rack"
    ROW = "row"
    ZONE = "zone"
    NONE = "none"


class NodeHealth(str, enum.Enum):
    """Liveness (controller/domain/liveness.py): UP heartbeats; SUSPECT lost contact (or flaps)
    and DOWN stayed silent past a grace, both keep their shards and take no new ones, until a
    DOWN node's work is evicted (`Node.evicted_at`)."""

    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"


class DeploymentPhase(str, enum.Enum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    DEGRADED = "degraded"
    DELETING = "deleting"
    QUARANTINED = "quarantined"  # set aside: the solver failed on it repeatedly (see its reasons)
    FAILED = "failed"  # its replicas kept failing: not placed again until updated (domain/restarts.py)


class ShardPhase(str, enum.Enum):
    ASSIGNED = "assigned"
    LOADING = "loading"
    RUNNING = "running"
    FAILED = "failed"
    STOPPED = "stopped"
    # Its node is down (the controller's own: usecases/liveness.py); the agent's next report ends it.
    UNKNOWN = "unknown"


def _enum_column(enum_cls: type[enum.Enum], **kw: Any) -> Any:
    # Stored as plain strings (no native ENUM types): portable and trivial to migrate; compared
    # with a member of `enum_cls` inline (`enumtype`: the planner sees the constant).
    return mapped_column(
        InlineEnum(enum_cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e],
                   validate_strings=True, create_constraint=False),
        **kw,
    )


class ClusterState(Base):
    """A single row (id=1): the placement generation of the whole cluster."""

    __tablename__ = "cluster_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)


class ClusterChangeRow(Base):
    """What each cluster generation bump changed (`domain.changes`): one row per object, or one
    with no object id; the reconciler's warm cache reads the rows above its generation. Old
    generations are pruned (`store.changes.CHANGES_KEPT`)."""

    __tablename__ = "cluster_changes"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    generation: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    object_id: Mapped[str | None] = mapped_column(String(2 * ID_LENGTH + 1))


class CapacityState(Base):
    """A single row (id=1): bumped by database triggers when what the cluster could ever hold
    changes (a node added, removed, or its rack, accelerators, model or HBM changed; a rack's
    row, a row's zone: migration 0012; only by statements that changed one, on PostgreSQL once
    a transaction: 0022), so the submit path's capacity aggregates are rebuilt only then."""

    __tablename__ = "capacity_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)


class Zone(Base):
    __tablename__ = "zones"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)

    rows: Mapped[list[Row]] = relationship(back_populates="zone")


class Row(Base):
    __tablename__ = "rows"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    zone_id: Mapped[str] = mapped_column(ForeignKey("zones.id"), index=True, nullable=False)
    power_budget_w: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)

    zone: Mapped[Zone] = relationship(back_populates="rows")
    racks: Mapped[list[Rack]] = relationship(back_populates="row")


class Rack(Base):
    __tablename__ = "racks"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    row_id: Mapped[str] = mapped_column(ForeignKey("rows.id"), index=True, nullable=False)
    power_budget_w: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)

    row: Mapped[Row] = relationship(back_populates="racks")
    nodes: Mapped[list[Node]] = relationship(back_populates="rack")


def operator_state(health: NodeHealth, cordoned: bool) -> str:
    """What operators see of a node: its health when not up (suspect, down), else cordoned or
    ready. One rule for a loaded row (`Node.state`) and for counts the database groups."""
    if health is not NodeHealth.UP:
        return health.value
    return "cordoned" if cordoned else "ready"


class Node(Base):
    """A server and what its agent last told us. Effective state: down > cordoned > ready."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), default="", nullable=False)
    rack_id: Mapped[str] = mapped_column(ForeignKey("racks.id"), index=True, nullable=False)
    accelerators: Mapped[int] = mapped_column(Integer, nullable=False)
    accelerator_model: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    hbm_gib: Mapped[float | None] = mapped_column(Float)
    cpu_milli: Mapped[int | None] = mapped_column(BigInteger)
    memory_mib: Mapped[int | None] = mapped_column(BigInteger)
    idle_power_w: Mapped[float] = mapped_column(Float, default=0.0, nullable=False)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict, nullable=False)
    agent_version: Mapped[str] = mapped_column(String(64), default="", nullable=False)

    cordoned: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)
    # A drain in progress (always with cordoned): its shards are replaced elsewhere first, then stopped.
    draining: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)
    health: Mapped[NodeHealth] = _enum_column(NodeHealth, default=NodeHealth.DOWN, nullable=False)
    # The agent session that may speak for this node (a newer Register supersedes older ones).
    session_id: Mapped[str | None] = mapped_column(String(64))
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When a DOWN node's work was evicted (its shards placed again elsewhere); null: not evicted.
    evicted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    power_draw_w: Mapped[float] = mapped_column(Float, default=0.0, nullable=False)
    # Accelerators its agent says failed, [{"index": i, "reason": text}] by index; NULL: none
    # (`usecases/faults.py`). The solver places nothing on them.
    failed_accelerators: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # Bumped whenever the node's desired assignment set changes; sent in AssignmentSet.
    assignment_generation: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)

    rack: Mapped[Rack] = relationship(back_populates="nodes")
    placements: Mapped[list[Placement]] = relationship(back_populates="node")

    @property
    def state(self) -> str:
        """What operators see: ready, cordoned, suspect or down."""
        return operator_state(self.health, self.cordoned)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    isolation: Mapped[Isolation] = _enum_column(Isolation, default=Isolation.SHARED, nullable=False)
    excludes: Mapped[list[str]] = mapped_column(JSON, default=list, nullable=False)
    zones: Mapped[list[str]] = mapped_column(JSON, default=list, nullable=False)
    reserved_accelerators: Mapped[float | None] = mapped_column(Float)
    max_accelerators: Mapped[float | None] = mapped_column(Float)
    max_power_w: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow, nullable=False
    )
    # What the tenant's id had used to date when this customer was created (migration 0030): its
    # customers' before it, which its own usage to date leaves out. NULL: created before 0030.
    usage_before_accelerator_s: Mapped[float | None] = mapped_column(Float)
    usage_before_energy_j: Mapped[float | None] = mapped_column(Float)

    deployments: Mapped[list[Deployment]] = relationship(back_populates="tenant")


class KnownTenant(Base):
    """Every tenant id the cluster ever had: a database trigger adds each id written to `tenants`
    (migration 0027) and nothing deletes one. Text stored while a tenant existed (reasons, events,
    audit entries) still names it after the tenant is deleted, so the redaction of what other
    tenants read (`controller.usecases.redaction.redactor_of`) reads its ids here."""

    __tablename__ = "known_tenants"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)


class Deployment(Base):
    """What a tenant asked for (the interchange format's `deployment`) and where it stands."""

    __tablename__ = "deployments"
    # Names are per tenant (like Kubernetes namespaces): two tenants may both have `chat`. Ids are
    # never reused, on SQLite too (AUTOINCREMENT, migration 0024): a deleted deployment's id names no other.
    __table_args__ = (UniqueConstraint("tenant_id", "name"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(63), nullable=False, index=True)  # a watch by name alone
    # No index of its own: the (tenant_id, name) unique index leads with it (migration 0025).
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    replicas: Mapped[int] = mapped_column(Integer, nullable=False)
    min_replicas: Mapped[int] = mapped_column(Integer, default=1, nullable=False)
    shards_per_replica: Mapped[int] = mapped_column(Integer, nullable=False)
    # The shard spec, one column per field.
    shard_accelerators: Mapped[int] = mapped_column(Integer, nullable=False)
    shard_accelerator_milli: Mapped[int] = mapped_column(Integer, default=1000, nullable=False)
    shard_hbm_gib: Mapped[float] = mapped_column(Float, default=0.0, nullable=False)
    shard_cpu_milli: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)
    shard_memory_mib: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)
    shard_power_w: Mapped[float] = mapped_column(Float, default=0.0, nullable=False)
    shard_accelerator_models: Mapped[list[str]] = mapped_column(JSON, default=list, nullable=False)
    locality: Mapped[Domain] = _enum_column(Domain, default=Domain.RACK, nullable=False)
    spread_domain: Mapped[Domain | None] = _enum_column(Domain, nullable=True)
    spread_max_per_domain: Mapped[int | None] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    preemptible: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)

    phase: Mapped[DeploymentPhase] = _enum_column(
        DeploymentPhase, default=DeploymentPhase.PENDING, nullable=False, index=True
    )
    # Why (part of) it is not placed: [{code, message, scope}], from the last solve.
    reasons: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list, nullable=False)
    generation: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)
    # Bumped on every spec change: an update based on an older version is refused.
    resource_version: Mapped[int] = mapped_column(BigInteger, default=1, nullable=False)
    # Bumped when a change needs new replicas (see usecases/rollout.py); placements carry theirs.
    template_revision: Mapped[int] = mapped_column(Integer, default=1, nullable=False)
    # Specs of older revisions whose replicas still run during a rolling update:
    # {"<revision>": interchange deployment document}.
    revision_specs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, nullable=False)
    # FAILED shards (domain/restarts.py): failures in a row, the last one, and when the failed
    # replicas are released to be placed again (None: no failure waiting).
    failures: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    last_failure_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    restart_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow, nullable=False
    )

    tenant: Mapped[Tenant] = relationship(back_populates="deployments")
    placements: Mapped[list[Placement]] = relationship(
        back_populates="deployment", cascade="all, delete-orphan", order_by="(Placement.replica, Placement.shard)"
    )


class Placement(Base):
    """One placed shard: the unit the node agent runs."""

    __tablename__ = "placements"
    __table_args__ = (UniqueConstraint("deployment_id", "replica", "shard"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # No index of its own: the (deployment_id, replica, shard) unique index leads with it (0025).
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), nullable=False)
    replica: Mapped[int] = mapped_column(Integer, nullable=False)
    shard: Mapped[int] = mapped_column(Integer, nullable=False)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True, nullable=False)
    accelerator_indices: Mapped[list[int]] = mapped_column(JSON, default=list, nullable=False)
    accelerator_milli: Mapped[int | None] = mapped_column(Integer)
    phase: Mapped[ShardPhase] = _enum_column(ShardPhase, default=ShardPhase.ASSIGNED, nullable=False, index=True)
    message: Mapped[str] = mapped_column(Text, default="", nullable=False)
    generation: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)
    # The deployment's template revision this shard was placed for.
    revision: Mapped[int] = mapped_column(Integer, default=1, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow, nullable=False
    )

    deployment: Mapped[Deployment] = relationship(back_populates="placements")
    node: Mapped[Node] = relationship(back_populates="placements")


class NominationRow(Base):
    """A head-of-line nomination in force (controller/scheduling/nominations.py): nodes kept for
    a deployment waiting for room others hold. The leader writes the set whenever it changes
    (with a plan commit, or at the pass's end); a new leader (or the same one restarted) takes them up, and every
    snapshot carries them (`maiactl snapshot`, dry runs: controller/store/nominations.py)."""

    __tablename__ = "nominations"

    # The solver's deployment id (a rolling deployment's revisions have their own: store/rollout.py).
    solver_id: Mapped[str] = mapped_column(String(320), primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), nullable=False)
    priority: Mapped[int] = mapped_column(Integer, nullable=False)
    nodes: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    nominated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # Since when it has waited (the line's order), and the replicas it missed when nominated.
    waiting_since: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    missing: Mapped[int] = mapped_column(Integer, nullable=False)
    # A digest of what the nodes were chosen for: an update of the deployment ends the nomination.
    shape: Mapped[str] = mapped_column(String(64), default="", nullable=False)


class DeploymentRevision(Base):
    """A template revision of a deployment, kept for `maiactl rollout history` and rollbacks to it
    (`usecases/revisions.py`): written when an update rolls (the revision it makes, and the one it
    leaves when that was never written: the first, or one made before revisions were kept), the
    newest `limits.REVISION_HISTORY` of each deployment kept, gone with the deployment. A
    deployment never rolled has none: its first revision is its row."""

    __tablename__ = "deployment_revisions"

    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The whole spec it was made with, as an interchange deployment document (`planning.deployment_doc`).
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    # None: made before the controller kept revisions (the revision it left, by an older controller).
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    changes: Mapped[list[str]] = mapped_column(JSON, default=list, nullable=False)


class ClientRequest(Base):
    """A submit's or update's client request id: a retry with the same id gets the first answer.
    It outlives its deployment (`deployment_id` turns null) for `limits.REQUEST_ID_RETENTION_S`,
    so a retry after a delete is refused instead of creating the deployment again."""

    __tablename__ = "client_requests"

    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    deployment_id: Mapped[int | None] = mapped_column(
        ForeignKey("deployments.id", ondelete="SET NULL"), index=True, nullable=True
    )
    deployment_name: Mapped[str] = mapped_column(String(ID_LENGTH), default="", nullable=False)
    action: Mapped[str] = mapped_column(String(16), nullable=False)  # submit | update
    spec_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


# The isolation watchdog's event kinds, an alarm and its clearing (`controller.watchdog`), and the
# partial index that reads them (migration 0021 wrote this same text).
ISOLATION_KINDS = ("isolation.violation", "isolation.cleared")
ISOLATION_RECORDS = text("kind IN ({})".format(", ".join(f"'{kind}'" for kind in ISOLATION_KINDS)))
# The event a node's drain starts with (usecases/nodes.py); its data carries the drain's baseline
# (store/rollout.py).
DRAIN_EVENT = "node.draining"


class Event(Base):
    """Append-only history: who changed what, when (the seam for the audit log)."""

    __tablename__ = "events"
    # The isolation watchdog's alarms and clearings (`controller.watchdog`: read once by a new
    # leader); no other event is indexed by kind (migration 0021).
    __table_args__ = (Index("ix_events_isolation", "id", postgresql_where=ISOLATION_RECORDS,
                            sqlite_where=ISOLATION_RECORDS),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False, index=True)
    actor: Mapped[str] = mapped_column(String(ID_LENGTH), default="system", nullable=False)
    kind: Mapped[str] = mapped_column(String(64), nullable=False)          # e.g. deployment.placed
    object_kind: Mapped[str] = mapped_column(String(32), nullable=False)   # deployment, node, tenant
    object_id: Mapped[str] = mapped_column(String(ID_LENGTH), nullable=False, index=True)
    message: Mapped[str] = mapped_column(Text, default="", nullable=False)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, nullable=False)


class EventRetentionMark(Base):
    """A single row (id=1): the highest event id retention deleted (0: none yet). A reader asking
    for the events after a lower id may have lost some (`usecases.events`: OUT_OF_RANGE), whatever
    its filter; `maia-controller --event-ttl`, `controller.store.retention.prune_events`."""

    __tablename__ = "event_retention"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deleted_through: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)


class AuditEntry(Base):
    """One row of the hash-chained audit log (see `controller.store.audit`): never updated.

    `hash` is the SHA-256 of the row's canonical content, which includes `seq` and `prev_hash`
    (the hash of row seq-1), so an edited, removed, inserted or reordered row breaks the chain.
    """

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    request_id: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    actor: Mapped[str] = mapped_column(String(ID_LENGTH), nullable=False)
    role: Mapped[str] = mapped_column(String(32), default="", nullable=False)
    tenant: Mapped[str] = mapped_column(String(ID_LENGTH), default="", nullable=False, index=True)
    action: Mapped[str] = mapped_column(String(128), nullable=False)
    object_kind: Mapped[str] = mapped_column(String(32), default="", nullable=False)
    object_id: Mapped[str] = mapped_column(String(255), default="", nullable=False)
    outcome: Mapped[str] = mapped_column(String(32), nullable=False)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, nullable=False)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


class AuditHead(Base):
    """A single row (id=1): the newest audit entry's seq and hash.

    Appenders lock it first (one chain, even with concurrent writers), and `verify` compares
    the table's tail with it, so deleting the newest rows alone is detected.
    """

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


class AuditBase(Base):
    """A single row (id=1): the last audit entry retention deleted (seq 0 and the genesis hash:
    none), where the chain now begins. `verify` checks entry seq+1 links to this hash
    (`controller.store.audit.prune`, `maia-controller --audit-ttl`). Its own row, not columns of
    `audit_head`: a deletion's transaction never holds the lock appenders take."""

    __tablename__ = "audit_base"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)
    # When that entry was recorded (None: nothing deleted yet).
    at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class UsageInterval(Base):
    """One placed shard's use of its node from start to stop: the usage meter's record.

    Opened and closed in the same transaction that writes or removes the placement (a restart
    loses nothing; an open interval counts up to "now"). It keeps names rather than foreign
    keys, so the history outlives the deployment, node and tenant rows. Times are epoch seconds
    so that the database can sum overlaps on SQLite and PostgreSQL alike.
    """

    __tablename__ = "usage_intervals"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    # The placement row it meters while open (closed intervals may name a reused id).
    placement_id: Mapped[int] = mapped_column(Integer, nullable=False, index=True)
    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), nullable=False)
    deployment: Mapped[str] = mapped_column(String(63), nullable=False)
    replica: Mapped[int] = mapped_column(Integer, nullable=False)
    shard: Mapped[int] = mapped_column(Integer, nullable=False)
    node_id: Mapped[str] = mapped_column(String(ID_LENGTH), nullable=False, index=True)
    zone_id: Mapped[str] = mapped_column(String(ID_LENGTH), nullable=False)
    accelerator_model: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    # Milli-accelerators held (2 whole accelerators: 2000; a quarter of one: 250).
    accelerator_milli: Mapped[int] = mapped_column(Integer, nullable=False)
    # Watts: the shard's load power (power_w x milli / 1000) and its share of the node's idle power.
    load_power_w: Mapped[float] = mapped_column(Float, nullable=False)
    idle_share_w: Mapped[float] = mapped_column(Float, nullable=False)
    started_s: Mapped[float] = mapped_column(Float, nullable=False)
    ended_s: Mapped[float | None] = mapped_column(Float, index=True)

    __table_args__ = (Index("ix_usage_intervals_tenant_started", "tenant_id", "started_s"),)


class ClosedUsage(Base):
    """The closed usage intervals summed per (tenant, accelerator model, zone), kept by database
    triggers on `usage_intervals` (migration 0028): what a scrape and a console build read instead
    of summing the whole history, adding only the open intervals' accrual (`metering.usage_to_date`).
    An interval deleted stays counted. On PostgreSQL the triggers add each statement's closes as
    rows of `closed_usage_deltas`, folded into these rows when no other transaction is folding."""

    __tablename__ = "closed_usage"

    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    accelerator_model: Mapped[str] = mapped_column(String(64), primary_key=True)
    zone_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    accelerator_seconds: Mapped[float] = mapped_column(Float, nullable=False)
    energy_j: Mapped[float] = mapped_column(Float, nullable=False)


class ClosedUsageDelta(Base):
    """Closed usage not folded into `ClosedUsage` yet (PostgreSQL; empty on SQLite, whose one
    writer adds to those rows directly)."""

    __tablename__ = "closed_usage_deltas"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), nullable=False)
    accelerator_model: Mapped[str] = mapped_column(String(64), nullable=False)
    zone_id: Mapped[str] = mapped_column(String(ID_LENGTH), nullable=False)
    accelerator_seconds: Mapped[float] = mapped_column(Float, nullable=False)
    energy_j: Mapped[float] = mapped_column(Float, nullable=False)


class ApiToken(Base):
    """A bearer token: its secret is stored only as a SHA-256 digest (shown once, at creation).

    `role` is one of controller.identity.Role; `tenant_id` binds a tenant token, `node_id` a
    node credential (issued by Register). Revoked tokens stay, for the record.
    """

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(ID_LENGTH), nullable=False)
    role: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    tenant_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), index=True)
    node_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    created_by: Mapped[str] = mapped_column(String(255), default="", nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DeploymentCount(Base):
    """A single row (id=1): the schedulable deployments (neither being deleted nor quarantined),
    kept by database triggers (migration 0016), so a reconcile pass reads a number instead of
    counting every deployment. On PostgreSQL the triggers add each statement's change as a row of
    `deployment_count_deltas` and fold those into this row when no other transaction is folding;
    the count is this row plus the rows not folded yet (`changes.schedulable_count`)."""

    __tablename__ = "deployment_counts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schedulable: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)


class DeploymentCountDelta(Base):
    """A change to `DeploymentCount.schedulable` and, with a tenant, to that tenant's
    `TenantDeploymentCount` not folded into them yet (PostgreSQL; empty on SQLite, whose one
    writer adds to the rows directly)."""

    __tablename__ = "deployment_count_deltas"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    schedulable: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tenant_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))  # migration 0017
    deployments: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")


class TenantDeploymentCount(Base):
    """A tenant's deployments (every phase), kept by the triggers that keep `DeploymentCount`
    (migration 0017): what a submit checks against the tenant's limit, read instead of counted;
    on PostgreSQL this row plus the tenant's deltas not folded yet (`repositories.tenant_deployments`).
    No row: none."""

    __tablename__ = "tenant_deployment_counts"

    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    deployments: Mapped[int] = mapped_column(BigInteger, nullable=False)


class IsolationState(Base):
    """A single row (id=1): bumped by database triggers on every change the isolation rules read
    (migration 0005), so the isolation watchdog re-checks only when something moved."""

    __tablename__ = "isolation_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)


class LeaderLease(Base):
    """A single row (id=1): which controller leads, under which fencing token, until when.

    Written only by `controller.store.lease`. `token` grows by one on every acquisition, so a
    deposed leader's writes (checked against it in their own transaction) are refused;
    `expires_at` is seconds since the epoch on the database's clock, never a controller's."""

    __tablename__ = "leader_lease"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str] = mapped_column(String(200), default="", nullable=False)
    token: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, default=0.0, nullable=False)
    # Where the holder serves gRPC (its --advertise-address): followers send agents there...
    address: Mapped[str] = mapped_column(String(300), default="", nullable=False)
    # ...or to its agent gateways (--agent-listen), when it runs them ('' when not).
    agent_address: Mapped[str] = mapped_column(String(300), default="", nullable=False)
    # The holder that wrote agent_address: a controller older than it takes the lease leaving it
    # (its UPDATE names no such column), and the address is then not the holder's.
    agent_holder: Mapped[str] = mapped_column(String(200), default="", nullable=False)
