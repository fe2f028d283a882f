"""`commit_plan`: the order in which a plan commit reads, checks, takes the lock and writes.

The design is the package's docstring (plans/__init__.py). This module holds the sequence: a
scoped commit's read and check before the lock; the generation's lock taken first (SQLite, and
PostgreSQL unscoped or fallen back, where `_ReportsSettled` has it read and write again when an
agent's report landed in between) or last (PostgreSQL, scoped: `_commit_locking_last`, whose
check stands when the generation moved by deletions alone: `_deletions_alone`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Integer, bindparam, or_, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from controller.store import audit
from controller.store.changes import (move_generation_unread, moves_generation_first, prune_changes, read_changes_since,
    will_move_generation)
from controller.store.inlist import POSTGRESQL, dialect_of
from controller.store.models import ShardPhase, utcnow
from controller.store.snapshot import Snapshot
from controller.store import pg_driver
from controller.store.marks import deferred_writes
from controller.domain.changes import ChangeKind
from controller.store.plans.check import _Checked, _check
from controller.store.plans.committed import _P, _read_committed, _rows
from controller.store.plans.land import CommitResult, _Landed, _land

if TYPE_CHECKING:  # the controller may import the solver's types; it never needs them at run time
    from scheduler import Plan


def _will_change(snapshot: Snapshot, plan: Plan, scope: frozenset[str] | None) -> bool:
    """Whether a commit is expected to change placements, guessed before reading anything: a
    scoped commit (the fast path's: it names what it decides) that places a shard of its scope or
    removes something. A wrong guess costs one statement, never a wrong generation (`commit_plan`)."""
    if scope is None:
        return False
    keys = snapshot.plan_keys()
    return (any(keys.name(pl.deployment) in scope for pl in plan.placements)
            or any(key[0] in scope for key in snapshot.released) or any(key in scope for key in snapshot.deleting))


def _no_lap(_step: str) -> None:
    pass


async def commit_plan(
    session: AsyncSession, snapshot: Snapshot, plan: Plan, *, scope: Collection[str] | None = None,
    actor: str = "controller", now: datetime | None = None, laps: Callable[[str], None] | None = None,
    claimants: Mapping[tuple[str, int], str] | None = None,
) -> CommitResult:
    """Apply `plan` (solved from `snapshot`) in the caller's transaction; the caller commits.

    What the plan changes relative to its snapshot is written where it still holds: a replica
    that no longer fits the committed state is left out and reported in `requeued` (see the
    package's docstring, plans/__init__.py). Raises ValueError for a plan that places one shard
    twice.

    `scope` (stored deployment keys `TENANT/NAME`; None: every deployment): the plan speaks only
    for these deployments, and the commit costs the scope, not the cluster. Name every
    deployment whose replicas the plan places, moves, preempts or removes (victims included).
    Replicas of other deployments are neither changed nor taken as removed by the plan (the plan
    may name them or not: they are ignored); the commit reads them only where the re-check needs
    them, on the rows its landing replicas touch. A deployment being deleted (or quarantined)
    loses its shards only when in scope, and its row goes when in scope and in
    `snapshot.deleting`, as an unscoped commit does for all of them; the others wait for a commit
    that names them (an unscoped pass does). Scoped or not, the same plan lands the same changes
    for the scope's deployments (tests/store/test_commit_scope.py).

    `claimants` (victim's solver deployment and replica -> the solver deployment it was
    preempted for; the fast path's decisions say it): a victim whose claimant has a replica
    turned away by the re-check stays where it runs, and is neither removed nor told preempted
    (`_Changes.spared`); without it (a full solve's plan, which does not say), every victim of
    the plan goes.

    `laps(step)` is told as each step ends (a caller's timings): `commit_early` (a scoped
    commit's read and check before the lock), `commit_turn` (on SQLite the wait for the writer's
    turn; the writer is held from its end to the caller's commit), `commit_read` (the committed
    state), `commit_check` (the plan's changes, re-checked: nothing when the early check stands);
    the writes follow.
    """
    lap = laps or _no_lap
    # The generation row's write lock (PostgreSQL row lock, SQLite write lock) to the end of the
    # caller's transaction: commits serialise here, so each plan is checked against a state no
    # other commit changes under it. A commit that will change placements bumps the generation in
    # the same statement; one that changes nothing leaves it (its watchers are not woken), a
    # wrong guess is put right before the end (nobody sees the row before the commit).
    scope = None if scope is None else frozenset(scope)
    bumped = _will_change(snapshot, plan, scope)
    # A scoped commit reads its rows and checks the plan against them before it takes the lock,
    # and again under the lock only when the rows read there differ (`_check`): the writer is
    # held for the reads and the writes. An unscoped one (the whole cluster) reads once, under it.
    # On PostgreSQL as on SQLite: there the early read is two statements more, and the generation
    # row's lock (every writer that bumps the generation waits for it) is held ~60 % shorter
    # (measured: docs/benchmarks.md, issue 8, night 2, `tidy2`); shorter still when it is taken
    # after the writes (`_commit_locking_last`).
    early = None
    if scope is not None:
        early = await _check(session, snapshot, plan, await _read_committed(session, scope), claimants)
        lap("commit_early")
        if dialect_of(session) == POSTGRESQL:
            landed = await _commit_locking_last(session, snapshot, plan, early, actor=actor, now=now or utcnow(), lap=lap)
            if landed is not None:
                return landed
    # The generation's row before the writes: under the generation writers' lock, exclusive
    # (PostgreSQL's lock order: store/changes.py).
    await moves_generation_first(session)
    now = now or utcnow()
    settled = _ReportsSettled(session)
    while True:
        await settled.begin()
        with deferred_writes():  # on SQLite the generation's UPDATE goes with the read that follows it
            await move_generation_unread(session, 1 if bumped else 0)
            lap("commit_turn")
            # Current state (read under the generation lock): every deployment and placement, or the scope's.
            read = await _read_committed(session, scope, moved_by=int(bumped),
                                         same_as=None if early is None else early.read)
        lap("commit_read")
        checked = early if early is not None and early.read is read else await _check(session, snapshot, plan, read,
                                                                                        claimants)
        lap("commit_check")
        # Write: placements, deployments, nodes, the cluster generation; the events go with the audit
        # entries (on PostgreSQL in the same statement: `audit.append(along=)`). On SQLite the writes
        # whose results nothing reads ride with the next statement that returns rows, or the caller's
        # commit (`marks.deferred_writes`: four trips to SQLite's thread under the writer
        # instead of thirteen): the commit fails or commits whole.
        with deferred_writes():
            landed = await _land(session, snapshot, plan, checked, stale=read.generation != snapshot.generation,
                                 generation=read.generation + int(bumped), bumped=bumped, actor=actor, now=now)
            if await settled.stands(landed):
                await audit.append(session, landed.audited, at=now, along=(landed.events,))
                return landed.result
        lap("commit_undone")


# A plan commit's savepoint on PostgreSQL (`_commit_locking_last`).
_SAVEPOINT = "maia_plan_commit"
# The savepoint of a PostgreSQL commit that takes the lock first (`_ReportsSettled`).
_READ_SAVEPOINT = "maia_plan_read"
_PLACED_PHASES = select(_P.deployment_id, _P.replica, _P.shard, _P.phase).where(_P.deployment_id == func.any(
    bindparam("ids", type_=ARRAY(Integer))))
# The shards of some deployments locked (a report flush writes a deployment's shards before its
# row: locking the shards keeps the order of the locks a flush takes), with the shards a former
# try deleted or moved (`written`), all in ascending id in one statement (the lock order):
# `FOR UPDATE`, what a DELETE takes.
_LOCK_SHARDS = (select(_P.id).where(or_(_P.deployment_id == func.any(bindparam("ids", type_=ARRAY(Integer))),
                                        _P.id == func.any(bindparam("written", type_=ARRAY(Integer)))))
                .order_by(_P.id).with_for_update())


class _ReportsSettled:
    """PostgreSQL: what makes a commit that takes the generation's lock first (before its read)
    write its deployments' phases from their shards as committed.

    Agents' reports (the hub's flush) change shard phases, and the phases of their deployments, under
    no generation lock: a report landing between this commit's read and its write of a deployment's
    row was written over, with a phase judged from the shards as read (issue 8, `pgcost`'s leftover).
    Once written, the rows are its own: a report on their shards waits for them (the flush locks a
    deployment before it writes its phase) and then reads what this commit wrote. So after its
    writes the commit reads again the shards of the deployments it wrote (one statement); when one
    of them is not as the commit judged its phase by (a report landed in between), what it wrote is
    undone (to a savepoint taken with its read) and it reads again, those deployments' shards
    locked first (a flush writes a deployment's shards before it locks its row, so no report on
    them lands after that read, and the two take their locks in one order), with the shards it
    deleted or moved, all in ascending id (taken after those, one of a lower id waited for a
    flush that held it and waited for one of them: a deadlock). Only a plan commit adds
    shards, and this one holds the generation writers' lock exclusive. SQLite's writer lock keeps
    reports out already."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session
        self._postgres = dialect_of(session) == POSTGRESQL
        self._savepoint: pg_driver.Savepoint | None = None
        self._locked: set[int] = set()  # deployments locked before the read
        self._written: set[int] = set()  # placements a former try deleted or moved, locked with them

    async def begin(self) -> None:
        """Before the read: the savepoint (sent with the transaction's BEGIN when it has not begun:
        no round trip), and the shards of the deployments reports moved under a former try."""
        if not self._postgres:
            return
        self._savepoint = pg_driver.Savepoint(self._session, _READ_SAVEPOINT)
        await self._savepoint.open()
        if self._locked:
            await self._session.execute(_LOCK_SHARDS, {"ids": sorted(self._locked), "written": sorted(self._written)})

    async def stands(self, landed: _Landed) -> bool:
        """Whether the deployments `landed` wrote have the shards it judged their phases by; if
        not, its writes are undone and the next `begin` locks those deployments' shards."""
        savepoint = self._savepoint
        if savepoint is None or not landed.judged_by:
            return True
        placed: dict[int, set[tuple[int, int, ShardPhase]]] = defaultdict(set)
        for deployment_id, replica, shard, phase in await self._session.execute(
                _PLACED_PHASES, {"ids": sorted(landed.judged_by)}):
            placed[deployment_id].add((replica, shard, ShardPhase(phase)))
        moved = {i for i, judged in landed.judged_by.items() if placed.get(i, set()) != judged}
        if not moved:
            savepoint.close()
            return True
        await savepoint.rollback()
        self._locked |= moved
        # The next try writes these again (reports move no shard, and the writers that do wait
        # for this commit's exclusive lock): taken before its read with the others, in ascending
        # id, never after shards of a higher id (a flush holding one waited for those).
        self._written |= landed.shards_written
        return False


async def _commit_locking_last(session: AsyncSession, snapshot: Snapshot, plan: Plan, early: _Checked, *,
                               actor: str, now: datetime, lap: Callable[[str], None]) -> CommitResult | None:
    """PostgreSQL, a scoped commit checked early: its writes first, the generation's lock last.

    The plan's changes as checked against the early read are written (the change log at the
    generation they will have), then one statement moves the generation (its row lock, to the
    commit) and reads the scope's rows again. When the generation was the early read's (no writer
    that bumps it committed since) and the rows are the early read's with this commit's writes on
    them (no report changed them since), the check stands as under the lock: the audit entries
    follow and the commit is done, the lock held for two statements and the COMMIT rather than
    for every write (a delete or submit batch's generation bump waited for it: docs/benchmarks.md,
    `pg10`, `pgcost`). Else what it wrote is rolled back (to a savepoint sent with the BEGIN) and
    None returned: the caller commits as before, the lock first."""
    savepoint = pg_driver.Savepoint(session, _SAVEPOINT)
    await savepoint.open()
    # The generation writers' lock, shared, after the savepoint: undone with it when the commit
    # falls back to taking it exclusive (PostgreSQL's lock order: store/changes.py).
    await will_move_generation(session)
    try:
        try:
            landed = await _land(session, snapshot, plan, early, stale=early.read.generation != snapshot.generation,
                                 generation=None, bumped=False, actor=actor, now=now)
        except (StaleDataError, IntegrityError):
            # A shard it moves was removed since the early read (a node's shards released), or one
            # it places was placed meanwhile by another controller's commit (two passes at once
            # around a leader change: its INSERT waited for that row, then met its unique key).
            await savepoint.rollback()
            lap("commit_undone")
            return None
        lap("commit_write")
        moved = int(landed.change is not None)
        read = await _read_committed(session, early.read.scope, moved_by=moved, locking=True, change=landed.change)
        lap("commit_turn")
    finally:
        savepoint.close()
    if _rows(read) == landed.rows and await _deletions_alone(session, early.read.generation, read.generation,
                                                             early.read.scope or frozenset()):
        generation = read.generation + moved
        await prune_changes(session, generation)
        await audit.append(session, landed.audited, at=now, along=(landed.events,))
        return replace(landed.result, generation=generation, stale=read.generation != snapshot.generation)
    await savepoint.rollback()
    lap("commit_undone")
    return None


async def _deletions_alone(session: AsyncSession, checked: int, generation: int, scope: frozenset[str]) -> bool:
    """Whether the cluster generation moved from `checked` (a commit's early read) to `generation`
    (under the lock) by deletions alone (deployments marked DELETING, all the usual moves under
    load: each delete batch's) of deployments outside `scope` (the commit's), which leave a check
    made at `checked` standing: their shards stay stored until a commit removes them, and leaving
    only frees what they held. A deletion of one the commit speaks for (or of unnamed ones) does
    not: the commit's UPDATE of that deployment's row wrote its phase over DELETING, so its rows
    read as written. One statement, only when it moved."""
    if generation == checked:
        return True
    since = await read_changes_since(session, checked, generation=generation)
    return since.complete and all(kind is ChangeKind.DEPLOYMENT_DELETED and key is not None and key not in scope
                                  for logged in since.changes.values() for kind, key in logged)
