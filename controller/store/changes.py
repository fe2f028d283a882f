"""The cluster generation and the log of what moved it.

The generation (`cluster_state`, one row) moves with every placement-relevant change; a plan
solved from an older one commits as stale (`plans.commit_plan`). Each move also says what it
changed (`domain.changes.ClusterChange`: rows of `cluster_changes` written in the same
transaction), so that the reconciler's warm cache can read what changed since the generation it
was valid at (`read_changes_since`) instead of the whole cluster. Under PostgreSQL the
generation row's write lock serialises the bumps; a generation a reader sees has its rows
visible too (same transaction, read after it).

PostgreSQL's lock order. Every transaction that moves the generation takes its locks in this order:
1. the generation writers' advisory lock (`GENERATION_WRITERS`), before any row lock: shared by
   one that moves the generation after its writes (`will_move_generation`: a delete batch, a
   cordon or drain, liveness, a Register or Hello batch, a report flush that fails shards, a
   release, a quarantine, a plan commit that takes the generation last), exclusive by a plan commit
   that takes the generation first (`moves_generation_first`: an unscoped pass, a fallback) and
   by a node's deletion (`moves_generation_alone`);
2. rows: placements, deployments, nodes (a plan commit and a report flush write them in this order),
   each table's rows in ascending id (`plans.writes._Writes`; the flush's `repo.write_reported_shards`,
   `deployments_named(lock=True)`, `write_heartbeats`; the other writers over a list through
   `inlist.any_of_in_order`/`any_of_named_in_order`, the node lifecycle's health changes sorted,
   placements the ORM deletes after their deployment's row locked first): two transactions that
   write rows of one table wait for each other at the first row both write, never each for a row
   the other holds;
   isolation_state's row, among them, before any nodes row: the database's triggers lock it (0005,
   0019, 0020) at a transaction's first write of a column the isolation rules read (placements'
   rows, deployments' shape, nodes' hardware, tenants, racks, rows), after that write's own rows,
   so a plan commit takes it after the placements it writes first and before its deployments and
   nodes (`plans.writes._write`), a release of shards after them and before their nodes. A Register batch
   releases the shards beyond the nodes it shrinks first, every such node's at once (their
   placements in ascending id, then their deployments and nodes: `release_placements_beyond`;
   node by node, one node's row came before the next one's placements, which a report flush held
   while it waited for that row). One that changes a node's rack, accelerators, model, HBM, CPU,
   memory or idle power (0036) (or adds one next to existing ones) then takes isolation_state
   itself before its first node row (`will_change_nodes_hardware`): else its node row came first
   and it waited, holding it, for a plan commit that held isolation_state and waited for that
   node's row (its assignment generation), tests/store/test_register_lock_order.py. A node's
   deletion takes it itself too, after the node's placements and before its row, and runs alone
   (the generation writers' lock exclusive, `moves_generation_alone`): a plan commit landing a
   shard on a node locks the node's row `FOR KEY SHARE` (its foreign key check, which only the
   row's DELETE waits for) before its
   statement's trigger takes isolation_state, so no place of isolation_state in the deletion's
   order kept the two apart, tests/store/test_node_delete_lock_order.py. Then capacity_state's
   row (0012, 0022), only ever after isolation_state's (0023). Closing usage intervals adds no
   lock to order: its trigger (0028) inserts rows of closed_usage_deltas and folds them into
   closed_usage only when it gets the fold's advisory lock at once, as the deployment counts (0016);
   nor do a deployment's kept revisions (deployment_revisions, 0031): only an update holding the
   deployment's row writes them, and a deletion of that row (its cascade) removes them. Failed
   accelerators (usecases/faults.py) release shards in a Register's order above, then write the
   node's row (no trigger watches the column);
3. the generation row (`cluster_state`), then the change log (inserts);
4. the audit chain's head (`audit_head`), then the leader lease (`FOR KEY SHARE`, with the COMMIT).
A plan commit that holds the generation row while it writes rows (step 3 before 2) does so under
the exclusive lock, so no transaction that holds rows and waits for the generation row is running
then: the cycle that PostgreSQL broke as a deadlock after `deadlock_timeout` (a second) cannot form.
A deadlock PostgreSQL still breaks (SQLSTATE 40P01) rolls back its victim's transaction whole: its
caller hears ABORTED with a retry time (`db.transaction_aborted`), a batch's members go alone.
Writers that take the generation row last hold it from their bump to their COMMIT only. SQLite
has one writer at a time: nothing to order.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import Integer, Select, bindparam, delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.changes import ChangeKind, ClusterChange
from controller.store import pg_driver
from controller.store.inlist import POSTGRESQL, dialect_of
from controller.store.marks import rowcount_unread
from controller.store.models import ClusterChangeRow, ClusterState, DeploymentCount, DeploymentCountDelta

_KINDS = frozenset(k.value for k in ChangeKind)

# The change log keeps this many generations (older rows are pruned every `_PRUNE_EVERY`
# generations): a cache further behind reads the whole cluster again.
CHANGES_KEPT = 20_000
_PRUNE_EVERY = 1_000


# The generation writers' advisory lock (PostgreSQL; module docstring), 'maiagen' as a number.
GENERATION_WRITERS = 0x6D61_6961_6765_6E
_SHARED = f"SELECT pg_advisory_xact_lock_shared({GENERATION_WRITERS})"
_EXCLUSIVE = f"SELECT pg_advisory_xact_lock({GENERATION_WRITERS})"


async def will_move_generation(session: AsyncSession) -> None:
    """Say, before the transaction's first row lock, that it will move the generation after its
    writes: the generation writers' lock, shared (PostgreSQL: module docstring; sent with the
    transaction's BEGIN when it has not begun, no round trip of its own). Once per transaction;
    nothing on SQLite. `bump_cluster_generation` takes it when its caller did not (in time for the
    rows the ORM holds pending; a caller that wrote rows with statements of its own calls this first)."""
    await _take(session, _SHARED)


# isolation_state's row, locked as the isolation triggers' UPDATE of it locks it (module docstring).
_ISOLATION_FIRST = "SELECT 1 FROM isolation_state WHERE id = 1 FOR NO KEY UPDATE"
# The nodes columns whose update fires the isolation or capacity triggers (`UPDATE OF` and `WHEN`,
# migrations 0005, 0012, 0019, 0022, 0036: isolation rack_id, accelerators, hbm_gib, cpu_milli,
# memory_mib; capacity rack_id, accelerators, accelerator_model, hbm_gib, idle_power_w): a write
# of one locks isolation_state's row (0023), so a writer that may change one takes it first
# (`will_change_nodes_hardware`). tests/store/test_node_hardware_columns.py holds this to the
# live schema's triggers: a migration that changes what they watch changes this too.
NODE_HARDWARE_COLUMNS: tuple[str, ...] = ("rack_id", "accelerators", "accelerator_model", "hbm_gib", "cpu_milli",
                                          "memory_mib", "idle_power_w")


async def will_change_nodes_hardware(session: AsyncSession) -> None:
    """Say, after `will_move_generation` and before the transaction's first node row lock, that it
    will add or delete a node or write a column of one that the isolation or capacity triggers
    watch (`NODE_HARDWARE_COLUMNS`): isolation_state's row lock,
    taken now rather than by those triggers after the node's row (PostgreSQL's lock order, step 2:
    module docstring). Sent with the transaction's BEGIN when it has not begun; nothing on SQLite."""
    await _isolation_first(session)


async def will_change_deployment_shape(session: AsyncSession) -> None:
    """As `will_change_nodes_hardware`, for a writer of a deployment's shard (its accelerators,
    milli, HBM, CPU or memory: migration 0012's isolation trigger watches them) before its row's
    first lock: by the trigger, after that row, it waited holding the row for a plan commit that
    held isolation_state and waited for the row."""
    await _isolation_first(session)


async def _isolation_first(session: AsyncSession) -> None:
    if dialect_of(session) == POSTGRESQL:
        await pg_driver.run_at_begin(session, _ISOLATION_FIRST)


async def moves_generation_first(session: AsyncSession) -> None:
    """The generation writers' lock, exclusive, for a plan commit about to take the generation row
    before its writes (PostgreSQL: module docstring): it waits for those that will move the
    generation last to end, and they for it. Call it before the transaction's first row lock, in
    a transaction that does not hold it shared (`LockUpgrade`)."""
    await _take(session, _EXCLUSIVE)


async def moves_generation_alone(session: AsyncSession) -> None:
    """The generation writers' lock, exclusive, for a node's deletion (`usecases.nodes.delete_node`),
    before its first row lock (PostgreSQL: module docstring): no other transaction that moves the
    generation runs beside it. A plan commit that lands a shard on the node locks the node's row
    `FOR KEY SHARE` (its INSERT's or UPDATE's foreign key check, a row trigger) before its statement's
    isolation trigger, or holds isolation_state from an earlier DELETE of its own: the deletion's
    DELETE of the node's row then waited for it while it waited for isolation_state, or the other
    way round, whichever of the two the deletion took first. Alone, it reads the node's shards with
    nobody landing more: taken now, with the transaction's BEGIN, before the reads that follow
    (which else ran outside it: `pg_driver`). A deletion of a node not stored answers before it
    (its plain read of the node, outside any transaction), so it waits for no plan commit. Not in a
    transaction that holds the lock shared (`LockUpgrade`)."""
    await _take(session, _EXCLUSIVE, now=True)


class LockUpgrade(RuntimeError):
    """A transaction holding the generation writers' lock shared asked for it exclusive: the
    upgrade waits for every other holder, and two transactions upgrading at once wait for each
    other (PostgreSQL aborts one as a deadlock a second later). Commit what moved the generation
    first, or take the lock only when writing (a programming error, raised before any wait)."""


async def _take(session: AsyncSession, statement: str, *, now: bool = False) -> None:
    if dialect_of(session) != POSTGRESQL:
        return
    transaction = session.sync_session.get_transaction()
    held = session.info.get(pg_driver.SAVEPOINT_HELD)
    if held is not None and transaction is not None and held[0] is transaction:
        if statement in (held[1], _SHARED):
            return  # held already (the exclusive lock stands for the shared one)
        raise LockUpgrade("the generation writers' lock is held shared by this transaction: "
                          "it cannot be taken exclusive (store/changes.py)")
    if now:
        with session.sync_session.no_autoflush:  # the caller's pending writes come after it
            await session.execute(text(statement))
    else:
        await pg_driver.run_at_begin(session, statement)
    session.info[pg_driver.SAVEPOINT_HELD] = (session.sync_session.get_transaction(), statement)


async def bump_cluster_generation(session: AsyncSession, change: ClusterChange = ClusterChange()) -> int:
    """Mark a placement-relevant change (in the caller's transaction) and log what it changed
    (`domain.changes`; the default, OTHER, makes the reconciler read the whole cluster again);
    returns the new generation.

    A plan in flight, computed before this change, then commits as stale: each replica it
    places is re-checked against the new state, and the caller solves again.
    """
    await will_move_generation(session)
    if dialect_of(session) != POSTGRESQL:
        generation = await move_generation(session, 1)
        await log_change(session, generation, change)
        return generation
    # One statement, not two (each a round trip on the event loop's turns): the bump and its rows.
    generation = (await session.execute(_BUMP_AND_LOG, {
        "kind": change.kind.value, "ids": list(logged_ids(change))})).scalars().first()
    if generation is None:
        raise MissingGeneration()
    await prune_changes(session, generation)
    return generation


# PostgreSQL: `move_generation` by 1 and `log_change`'s rows, in order, in one statement.
_BUMP_AND_LOG = text(
    "WITH moved AS (UPDATE cluster_state SET generation = generation + 1 WHERE id = 1 RETURNING generation) "
    "INSERT INTO cluster_changes (generation, kind, object_id) "
    "SELECT moved.generation, :kind, changed.id "
    "FROM moved, unnest(CAST(:ids AS TEXT[])) WITH ORDINALITY AS changed(id, n) ORDER BY changed.n "
    "RETURNING generation")


async def bump_cluster_generation_unread(session: AsyncSession, change: ClusterChange) -> None:
    """`bump_cluster_generation` for a caller that does not read the new generation. On SQLite
    its three statements (the bump, the change rows at the generation it moved to, the pruning
    when that generation is due) are written so that nothing is read back: inside
    `marks.deferred_writes` they take no trip of their own to SQLite's thread but go with
    the transaction's next statement or its commit (a delete batch held SQLite's writer for four
    trips, each a turn of a busy event loop). A missing generation row fails the change rows'
    INSERT (their generation NULL), so the transaction fails, as `MissingGeneration` makes it.
    PostgreSQL: `bump_cluster_generation` (one statement, and the pruning when due)."""
    if dialect_of(session) == POSTGRESQL:
        await bump_cluster_generation(session, change)
        return
    await move_generation_unread(session, 1)
    await session.execute(_LOG_AT_CURRENT, [{"kind": change.kind.value, "object_id": object_id}
                                            for object_id in logged_ids(change)])
    await session.execute(_PRUNE_AT_CURRENT, {"every": _PRUNE_EVERY, "kept": CHANGES_KEPT})


def logged_ids(change: ClusterChange) -> Sequence[str | None]:
    """The object ids of a change's rows (one row without an id when it names none)."""
    return change.ids or (None,)


_INSERT_CHANGE = insert(ClusterChangeRow.__table__)  # Core: the ORM's bulk INSERT costs more CPU than the statement


async def log_change(session: AsyncSession, generation: int, change: ClusterChange) -> None:
    """Write what the bump to `generation` changed (`cluster_changes`), pruning old generations."""
    await session.execute(_INSERT_CHANGE, [
        {"generation": generation, "kind": change.kind.value, "object_id": object_id}
        for object_id in logged_ids(change)])
    await prune_changes(session, generation)


async def prune_changes(session: AsyncSession, generation: int) -> None:
    """Every `_PRUNE_EVERY` generations (`generation` the one just logged), the log's rows older
    than `CHANGES_KEPT` generations go (for a writer that logs its change itself)."""
    if generation % _PRUNE_EVERY == 0:
        await session.execute(rowcount_unread(delete(ClusterChangeRow))
                              .where(ClusterChangeRow.generation <= generation - CHANGES_KEPT)
                              .execution_options(synchronize_session=False))


@dataclass(frozen=True)
class ChangesSince:
    """The changes logged for each generation above `after`, up to the current `generation`."""

    after: int
    generation: int
    changes: dict[int, list[tuple[ChangeKind, str | None]]]  # generation -> (kind, object id) rows

    @property
    def complete(self) -> bool:
        """Every generation in between logged what it changed (none pruned, none unlogged)."""
        return self.generation >= self.after and len(self.changes) == self.generation - self.after

    def objects_after(self, kind: ChangeKind, after: int) -> set[str] | None:
        """The objects changes of `kind` named in the generations above `after`; None when one
        named none (any may have changed) or the log is not complete."""
        if not self.complete:
            return None
        named: set[str] = set()
        for gen, logged in self.changes.items():
            if gen > after:
                for logged_kind, object_id in logged:
                    if logged_kind == kind:
                        if object_id is None:
                            return None
                        named.add(object_id)
        return named

    def last_other_than(self, kinds: Collection[ChangeKind], *, ignoring: Collection[int] = ()) -> int | None:
        """The latest generation whose change was of another kind than `kinds`, generations
        `ignoring` aside (`after` when none was); None when the log is not complete (anything
        may have changed)."""
        if not self.complete:
            return None
        return max((gen for gen, logged in self.changes.items()
                    if gen not in ignoring and any(kind not in kinds for kind, _ in logged)), default=self.after)


_COUNTS = DeploymentCount.__table__
_COUNT_DELTAS = DeploymentCountDelta.__table__


def schedulable_count() -> Select[tuple[int]]:
    """The count of schedulable deployments: neither being deleted nor quarantined
    (`repositories.count_schedulable_deployments` reads it alone), as the database's triggers keep
    it (`models.DeploymentCount`, migration 0016): the row plus the changes not folded into it yet,
    in one statement. A `count(*)` of those deployments scanned every one, twice a reconcile pass."""
    unfolded = select(func.coalesce(func.sum(_COUNT_DELTAS.c.schedulable), 0)).scalar_subquery()
    return select(_COUNTS.c.schedulable + unfolded).where(_COUNTS.c.id == 1)


# The statements a reconcile pass runs every time, built once (building one and its cache key
# costs more CPU than running it on SQLite), with the tables' columns (Core: an ORM-enabled
# statement costs more per execution for the same rows).
_STATE = ClusterState.__table__
_CHANGE_ROWS = ClusterChangeRow.__table__
_GENERATION = select(_STATE.c.generation).where(_STATE.c.id == 1)
_GENERATION_AND_SCHEDULABLE = select(_STATE.c.generation, schedulable_count().scalar_subquery()).where(
    _STATE.c.id == 1)
_CHANGES_BETWEEN = (select(_CHANGE_ROWS.c.generation, _CHANGE_ROWS.c.kind, _CHANGE_ROWS.c.object_id)
                    .where(_CHANGE_ROWS.c.generation > bindparam("after", type_=Integer),
                           _CHANGE_ROWS.c.generation <= bindparam("generation", type_=Integer))
                    .order_by(_CHANGE_ROWS.c.id))


async def read_generation_and_schedulable(session: AsyncSession) -> tuple[int, int]:
    """The cluster generation and `schedulable_count()`, in one statement: what a reconcile pass
    reads first (on PostgreSQL under load, each round trip is a wait)."""
    row = (await session.execute(_GENERATION_AND_SCHEDULABLE)).one_or_none()
    return (0, 0) if row is None else (int(row[0] or 0), int(row[1] or 0))


async def read_generation(session: AsyncSession) -> int:
    """The cluster generation (as committed, or as this transaction moved it)."""
    return (await session.execute(_GENERATION)).scalar_one()


async def read_changes_since(session: AsyncSession, after: int, *, generation: int | None = None) -> ChangesSince:
    """The current generation and the changes logged for each generation above `after` (read
    after it: a generation that is visible has its rows visible, written in its transaction).
    `generation`: the generation the caller read earlier in the same transaction (the changes
    up to it, one statement fewer); the next read finds the later ones."""
    if generation is None:
        generation = await read_generation(session)
    changes: dict[int, list[tuple[ChangeKind, str | None]]] = {}
    if generation > after:
        for gen, kind, object_id in await session.execute(_CHANGES_BETWEEN, {"after": after, "generation": generation}):
            # A kind this controller does not know (a newer one wrote it): OTHER.
            changes.setdefault(gen, []).append((ChangeKind(kind) if kind in _KINDS else ChangeKind.OTHER, object_id))
    return ChangesSince(after, generation, changes)


# The generation moved by the parameter `by`: built once, with its new value returned or not.
_MOVED = (update(_STATE).where(_STATE.c.id == 1)
          .values(generation=_STATE.c.generation + bindparam("by", type_=Integer)))
_MOVED_RETURNING = _MOVED.returning(_STATE.c.generation)
_MOVED_UNREAD = rowcount_unread(_MOVED)


async def move_generation(session: AsyncSession, by: int) -> int:
    """Add `by` to the cluster generation (0: take its row's write lock only); the new value."""
    result = await session.execute(_MOVED_RETURNING, {"by": by})
    generation = result.scalar_one_or_none()
    if generation is None:
        raise MissingGeneration()
    return generation


async def move_generation_unread(session: AsyncSession, by: int) -> None:
    """`move_generation` for a caller that reads the new value with its next statement (in the
    same transaction): `rowcount_unread`, so on SQLite inside `deferred_writes` the two take one trip."""
    await session.execute(_MOVED_UNREAD, {"by": by})


# SQLite, `bump_cluster_generation_unread`: the generation as this transaction moved it, read by the
# statements that need it instead of by the caller (the change rows; the pruning, every
# `_PRUNE_EVERY` generations, of what `prune_changes` prunes). The pruning's bound is NULL (no row
# to visit) when the generation is not due: a condition on the generation beside the range was
# checked on each row below the cut (up to `_PRUNE_EVERY` generations' rows) by every bump.
_CURRENT = select(_STATE.c.generation).where(_STATE.c.id == 1).scalar_subquery()
_LOG_AT_CURRENT = insert(ClusterChangeRow.__table__).values(
    generation=_CURRENT, kind=bindparam("kind"), object_id=bindparam("object_id"))
_PRUNE_AT_CURRENT = rowcount_unread(delete(ClusterChangeRow.__table__).where(
    ClusterChangeRow.__table__.c.generation <= select(_STATE.c.generation - bindparam("kept", type_=Integer))
    .where(_STATE.c.id == 1, _STATE.c.generation % bindparam("every", type_=Integer) == 0).scalar_subquery()))


class MissingGeneration(RuntimeError):
    """The generation row is not there: the schema was never migrated."""

    def __init__(self) -> None:
        super().__init__("cluster_state row id=1 is missing: is the schema migrated?")
