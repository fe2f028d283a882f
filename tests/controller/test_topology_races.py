"""ApplyTopology beside the reconciler's plan commits (usecases/topology.py). Its checks of what
runs (a budget cut, a rack moved) read without a lock, and a plan commit may land before its
write: it checks again holding the generation, so the commit that landed is judged against the
new topology. It takes the generation writers' lock before any row (PostgreSQL's lock order,
store/changes.py). The same topology again writes and wakes nothing. Found in review."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bench.checking import check_state
from controller.errors import Conflict, FailedPrecondition
from controller.reconcile import Reconciler
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.snapshot import load_snapshot
from controller.usecases import topology
from controller.usecases.ports import RecordingSignals
from controller.domain.values import RackSpec, RowSpec, TopologySpec, ZoneSpec
from uc_builders import WHO, add_nodes, add_tenant, apply_topology, deployment, every_row, no_publish, submit


def _reconciler(db: Database) -> Reconciler:
    return Reconciler(db, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000, backoff_s=0.0)


async def _apply(db: Database, spec: TopologySpec, signals: RecordingSignals | None = None) -> Any:
    async with db.unit_of_work() as uow:
        return await topology.apply_topology(uow, WHO, spec, signals or RecordingSignals())


async def _placements(db: Database) -> list[dict[str, Any]]:
    async with db.unit_of_work() as uow:
        problem = (await load_snapshot(uow.session)).problem
    assert not check_state(problem, problem["placements"])
    return problem["placements"]


TWO_ZONES = TopologySpec(zones=(ZoneSpec("z1"), ZoneSpec("z2")),
                         rows=(RowSpec("row-a", "z1"), RowSpec("row-b", "z2")),
                         racks=(RackSpec("rack-a", "row-a"), RackSpec("rack-b", "row-b")))


async def test_a_rack_moved_while_a_plan_lands_zoned_work_on_it_is_refused(database: Database,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    await _apply(database, TWO_ZONES)
    for rack in ("rack-a", "rack-b"):
        await add_nodes(database, rack, 2)
    await add_tenant(database, "t2", zones=("z2",))
    loop = _reconciler(database)
    await submit(database, deployment("resident", tenant="t2"))  # only rack-b (z2) may take it
    read = topology.load_work_on_racks

    async def then_a_plan_lands(session: Any, *args: Any, **kwargs: Any) -> Any:
        work = await read(session, *args, **kwargs)  # the move's check: nothing on rack-b
        if not landed:
            landed.append(await loop.reconcile_once())  # t2's shard committed on rack-b meanwhile
        return work

    landed: list[Any] = []
    monkeypatch.setattr(topology, "load_work_on_racks", then_a_plan_lands)
    with pytest.raises(FailedPrecondition, match="moves racks or rows under work that runs now: t2/resident"):
        await _apply(database, TopologySpec(racks=(RackSpec("rack-b", "row-a"),)))  # rack-b into z1
    assert landed
    monkeypatch.setattr(topology, "load_work_on_racks", read)
    [placed] = await _placements(database)
    assert placed["node"].startswith("rack-b")  # in z2 still: the move was not written


def _a_plan_lands_after_the_first_check(monkeypatch: pytest.MonkeyPatch, loop: Reconciler) -> list[Any]:
    """The apply's first read of the power it judges (`_with_power_judged`, without a lock) is
    followed, the first time, by a reconciler pass that commits: what that pass did."""
    read, landed = topology._with_power_judged, []

    async def then_a_plan_lands(*args: Any) -> Any:
        views = await read(*args)
        if not landed:
            landed.append(await loop.reconcile_once())
        return views

    monkeypatch.setattr(topology, "_with_power_judged", then_a_plan_lands)
    return landed


async def test_a_budget_cut_while_a_plan_lands_is_refused(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await _apply(database, TopologySpec(zones=(ZoneSpec("z1"),), rows=(RowSpec("row-a", "z1"),),
                                        racks=(RackSpec("rack-a", "row-a", 10_000.0),)))
    await add_nodes(database, "rack-a", 2)  # 2 x 500 W idle
    await add_tenant(database, "t1")
    loop = _reconciler(database)
    await submit(database, deployment("hot", accelerators=4, shard_power_w=1000.0, locality="node"))  # 4 kW
    landed = _a_plan_lands_after_the_first_check(monkeypatch, loop)  # 4 kW lands after the check read 1 kW
    with pytest.raises(FailedPrecondition, match="rack rack-a uses 5 kW .* over its budget of 2 kW"):
        await _apply(database, TopologySpec(racks=(RackSpec("rack-a", "row-a", 2_000.0),)))
    assert landed
    async with database.unit_of_work() as uow:
        [rack] = (await topology.get_topology(uow, WHO)).racks
    assert (rack.power_used_w, rack.spec.power_budget_w) == (5_000.0, 10_000.0)
    assert len(await _placements(database)) == 1


@pytest.mark.parametrize(("row_a_w", "with_nodes", "spec"), [
    pytest.param(None, ("rack-a", "rack-b"), TopologySpec(rows=(RowSpec("row-a", "z1", 5_500.0),),
                                                          racks=(RackSpec("rack-a", "row-a", 20_000.0),)),
                 id="row-cut"),
    pytest.param(5_500.0, ("rack-a", "rack-c"), TopologySpec(racks=(RackSpec("rack-c", "row-a"),)), id="rack-moved-in"),
])
async def test_a_row_cut_or_a_rack_moved_in_while_a_plan_lands_is_refused(
        database: Database, monkeypatch: pytest.MonkeyPatch, row_a_w: float | None, with_nodes: tuple[str, ...],
        spec: TopologySpec) -> None:
    """Held under the generation, the check reads the power of the racks and rows the apply
    changes, not the cluster's; a row's is all its racks', those the apply does not name too
    (rack-b beside rack-a; rack-a, where rack-c moves in). 2 kW idle in row-a (or to be), 4 kW
    lands on one of the two racks after the first check: 6 kW, over 5.5 kW."""
    await _apply(database, TopologySpec(zones=(ZoneSpec("z1"),),
                                        rows=(RowSpec("row-a", "z1", row_a_w), RowSpec("row-b", "z1")),
                                        racks=(RackSpec("rack-a", "row-a"), RackSpec("rack-b", "row-a"),
                                               RackSpec("rack-c", "row-b"))))
    for rack in with_nodes:
        await add_nodes(database, rack, 2)  # 2 x 500 W idle
    await add_tenant(database, "t1")
    loop = _reconciler(database)
    await submit(database, deployment("hot", accelerators=4, shard_power_w=1000.0, locality="node"))  # 4 kW
    landed = _a_plan_lands_after_the_first_check(monkeypatch, loop)
    with pytest.raises(FailedPrecondition, match=r"row row-a uses 6 kW .* over its budget of 5\.5 kW"):
        await _apply(database, spec)
    assert landed and len(await _placements(database)) == 1
    async with database.unit_of_work() as uow:
        view = await topology.get_topology(uow, WHO)
    assert ({r.spec.id: r.spec.power_budget_w for r in view.rows}["row-a"],
            {k.spec.id: k.spec.row for k in view.racks}["rack-c"]) == (row_a_w, "row-b")  # not written


async def test_the_same_topology_again_writes_nothing_and_wakes_nothing(database: Database) -> None:
    """It moved the generation (every plan in flight then committed stale and was solved again),
    recorded a "no change" event and woke the reconciler."""
    await _apply(database, TWO_ZONES)
    before = await every_row(database)
    signals = RecordingSignals()
    view = await _apply(database, TWO_ZONES, signals)
    assert await every_row(database) == before and signals.wakes == 0
    assert [k.spec.id for k in view.racks] == ["rack-a", "rack-b"]


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_an_apply_beside_a_plan_commit_that_takes_the_generation_first_does_not_deadlock(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """It flushed its rows (isolation_state locked by their trigger) before it took the generation
    writers' lock: a whole-cluster plan commit holding that lock waited for isolation_state, and
    the apply for the lock (PostgreSQL: deadlock detected, the pass failed)."""
    await apply_topology(database, {"rack-a": "row-a"})
    await add_nodes(database, "rack-a", 2)
    await add_tenant(database, "t1")
    await submit(database, deployment("svc"))
    loop = _reconciler(database)
    bump = repo.bump_cluster_generation
    passes: list[asyncio.Task[Any]] = []

    async def pass_meanwhile(session: Any, change: Any = None, *args: Any, **kwargs: Any) -> Any:
        if change is not None and change.kind.value == "topology" and not passes:
            passes.append(asyncio.create_task(loop.reconcile_once(force=True)))
            await asyncio.sleep(2.0)  # the pass commits now, or waits for this apply
        return await bump(session, change, *args, **kwargs)

    monkeypatch.setattr(repo, "bump_cluster_generation", pass_meanwhile)
    await _apply(database, TopologySpec(rows=(RowSpec("row-n", "z1"),)))
    await passes[0]


async def test_a_rack_another_apply_added_meanwhile_with_work_on_it_is_refused_retryably(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """An apply that adds rack-c read no rack-c. Another added it in row-b (z2) before its write, a
    node joined it and z2-only work landed there: the upsert then moved rack-c into z1 under that
    work, and the held re-check, rebuilding the old topology from what the apply read, saw no move
    (found in review). It is refused, retryably, writing nothing; applied again, it judges the move."""
    await _apply(database, TWO_ZONES)
    await add_tenant(database, "t2", zones=("z2",))
    loop = _reconciler(database)
    read = topology._with_power_judged
    meanwhile: list[Any] = []

    async def then_rack_c_is_added_and_used(*args: Any) -> Any:
        views = await read(*args)
        if not meanwhile:
            meanwhile.append("rack-c added")  # first: that apply comes through here too
            await _apply(database, TopologySpec(racks=(RackSpec("rack-c", "row-b"),)))
            await add_nodes(database, "rack-c", 1)
            await submit(database, deployment("resident", tenant="t2"))  # only rack-c may take it (z2)
            meanwhile.append(await loop.reconcile_once())
        return views

    monkeypatch.setattr(topology, "_with_power_judged", then_rack_c_is_added_and_used)
    moved = TopologySpec(racks=(RackSpec("rack-c", "row-a"),))
    with pytest.raises(Conflict, match="a zone, row or rack this apply adds was added by another topology change "
                                       "while this one was applied; nothing was written") as refused:
        await _apply(database, moved)
    assert refused.value.retry_after_ms and len(meanwhile) == 2
    monkeypatch.setattr(topology, "_with_power_judged", read)
    [placed] = await _placements(database)
    assert placed["node"].startswith("rack-c")
    async with database.unit_of_work() as uow:
        assert {k.spec.id: k.spec.row for k in (await topology.get_topology(uow, WHO)).racks}["rack-c"] == "row-b"
    with pytest.raises(FailedPrecondition, match="moves racks or rows under work that runs now: t2/resident"):
        await _apply(database, moved)  # again: rack-c read, its move judged


async def test_a_zone_another_apply_inserted_between_the_read_and_the_insert_is_refused_retryably(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zone's upsert found no z3, another apply inserted and committed it, then this one's
    INSERT met the primary key: a retryable Conflict, not an internal error."""
    await _apply(database, TWO_ZONES)
    upsert, inserted = repo.upsert, []

    async def then_another_inserts_it(session: Any, model: Any, key: str, **values: Any) -> None:
        await upsert(session, model, key, **values)
        if key == "z3" and not inserted:
            inserted.append("z3")  # first: that apply comes through here too
            await _apply(database, TopologySpec(zones=(ZoneSpec("z3"),)))

    monkeypatch.setattr(repo, "upsert", then_another_inserts_it)
    with pytest.raises(Conflict, match="a zone, row or rack this apply adds was added by another topology change"):
        await _apply(database, TopologySpec(zones=(ZoneSpec("z3"),), rows=(RowSpec("row-c", "z3"),)))
    assert inserted
    monkeypatch.undo()
    async with database.unit_of_work() as uow:
        assert [r.spec.id for r in (await topology.get_topology(uow, WHO)).rows] == ["row-a", "row-b"]  # none written
    await _apply(database, TopologySpec(zones=(ZoneSpec("z3"),), rows=(RowSpec("row-c", "z3"),)))  # again: applied


def _then_another_apply(monkeypatch: pytest.MonkeyPatch, db: Database, first: TopologySpec, *,
                        after: Callable[[], Awaitable[Any]]) -> list[str]:
    """After the apply's first check read (`_with_power_judged`), the first time: another apply of
    `first`, then `after` (nodes joining, work landing). Said in the list returned once begun."""
    read, begun = topology._with_power_judged, []

    async def then_another(*args: Any) -> Any:
        views = await read(*args)
        if not begun:
            begun.append("another apply")  # first: that apply comes through here too
            await _apply(db, first)
            await after()
        return views

    monkeypatch.setattr(topology, "_with_power_judged", then_another)
    return begun


async def _rack_x_in_z1_and_z2_only_work(db: Database) -> Callable[[], Awaitable[None]]:
    """TWO_ZONES and rack-x in row-x (z1), tenant t2 (z2 only): what makes work land on rack-x once
    another apply moved it into z2 (a node joins it, t2's deployment is placed there)."""
    await _apply(db, TopologySpec(zones=TWO_ZONES.zones, rows=TWO_ZONES.rows + (RowSpec("row-x", "z1"),),
                                  racks=TWO_ZONES.racks + (RackSpec("rack-x", "row-x"),)))
    await add_tenant(db, "t2", zones=("z2",))
    loop = _reconciler(db)

    async def work_lands_on_rack_x() -> None:
        await add_nodes(db, "rack-x", 1)
        await submit(db, deployment("resident", tenant="t2"))  # only rack-x, in z2 now, may take it
        assert (await loop.reconcile_once()).changed_nodes

    return work_lands_on_rack_x


@pytest.mark.parametrize("kind", ["rack", "row"])
async def test_a_rack_or_row_another_apply_moved_meanwhile_under_work_is_not_moved_back_unjudged(
        database: Database, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """This apply read rack-x in row-x, row-x in z1, and names them so again (with a budget). Another
    moved rack-x to row-b, or row-x to z2, before its write; a node joined rack-x and z2-only work
    landed there. Its UPDATE moved it back into z1 under that work, and the held re-check (the old
    topology rebuilt from what it read) saw no move (found in review). Refused, retryably, writing
    nothing; applied again, the move back is judged."""
    work_lands_on_rack_x = await _rack_x_in_z1_and_z2_only_work(database)
    moved, back = ((RackSpec("rack-x", "row-b"), RackSpec("rack-x", "row-x", 50_000.0)) if kind == "rack" else
                   (RowSpec("row-x", "z2"), RowSpec("row-x", "z1", 90_000.0)))
    field = "racks" if kind == "rack" else "rows"
    begun = _then_another_apply(monkeypatch, database, TopologySpec(**{field: (moved,)}), after=work_lands_on_rack_x)
    with pytest.raises(Conflict, match=f"{kind} {back.id}, which this apply changes, was changed by another "
                                       f"topology change while this one was applied; nothing was written"):
        await _apply(database, TopologySpec(**{field: (back,)}))
    assert begun
    monkeypatch.undo()
    [placed] = await _placements(database)
    assert placed["node"].startswith("rack-x")  # in z2 still, as `_placements` checked
    with pytest.raises(FailedPrecondition, match="moves racks or rows under work that runs now: t2/resident"):
        await _apply(database, TopologySpec(**{field: (back,)}))


async def test_a_budget_another_apply_raised_meanwhile_under_work_is_not_cut_unjudged(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """This apply read rack-a's 2 kW budget and sets 3 kW, beside a new zone. Another raised it to
    10 kW before its write and 4 kW landed: written, 3 kW stood under 5 kW placed, the held re-check
    judging 2 -> 3 kW as read (found in review). Refused; applied again, the cut is judged."""
    await _apply(database, TopologySpec(zones=(ZoneSpec("z1"),), rows=(RowSpec("row-a", "z1"),),
                                        racks=(RackSpec("rack-a", "row-a", 2_000.0),)))
    await add_nodes(database, "rack-a", 2)  # 1 kW idle
    await add_tenant(database, "t1")
    loop = _reconciler(database)

    async def four_kw_land() -> None:
        await submit(database, deployment("hot", accelerators=4, shard_power_w=1000.0, locality="node"))
        assert (await loop.reconcile_once()).changed_nodes

    begun = _then_another_apply(monkeypatch, database, TopologySpec(racks=(RackSpec("rack-a", "row-a", 10_000.0),)),
                                after=four_kw_land)
    again = TopologySpec(zones=(ZoneSpec("z9"),), racks=(RackSpec("rack-a", "row-a", 3_000.0),))
    with pytest.raises(Conflict, match="rack rack-a, which this apply changes, was changed by another topology"):
        await _apply(database, again)
    assert begun
    monkeypatch.undo()
    async with database.unit_of_work() as uow:
        view = await topology.get_topology(uow, WHO)
    assert ([z.id for z in view.zones], view.racks[0].spec.power_budget_w) == (["z1"], 10_000.0)  # nothing written
    with pytest.raises(FailedPrecondition, match="rack rack-a uses 5 kW .* over its budget of 3 kW"):
        await _apply(database, again)


async def test_a_rack_restated_unchanged_that_another_apply_moved_meanwhile_keeps_that_move(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole topology file applied again with one change: the racks it restates as it read them
    are not written (nor locked: a deadlock with another apply or a deletion, found in review), so
    a move another made of one meanwhile stands, judged by the held re-check as a change from what
    this apply read; what runs there breaks nothing."""
    work_lands_on_rack_x = await _rack_x_in_z1_and_z2_only_work(database)
    begun = _then_another_apply(monkeypatch, database, TopologySpec(racks=(RackSpec("rack-x", "row-b"),)),
                                after=work_lands_on_rack_x)
    await _apply(database, TopologySpec(zones=(ZoneSpec("z9"),), racks=(RackSpec("rack-x", "row-x"),)))
    assert begun
    monkeypatch.undo()
    async with database.unit_of_work() as uow:
        view = await topology.get_topology(uow, WHO)
    assert ({k.spec.id: k.spec.row for k in view.racks}["rack-x"], [z.id for z in view.zones]) == (
        "row-b", ["z1", "z2", "z9"])
    [placed] = await _placements(database)  # and the state clean (`_placements` checks it)
    assert placed["node"].startswith("rack-x")


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_an_apply_restating_a_row_another_apply_changes_does_not_deadlock_with_it(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A changes r2 and restates r3 as it read it; B changes r3. A wrote r2 (its trigger took
    isolation_state), B then wrote r3 (its trigger waiting for isolation_state), and A's UPDATE of
    the r3 it did not change waited for B: deadlock detected after a second, one apply failed
    (found in review). A writes only what it changes: both are applied, one after the other."""
    await _apply(database, TopologySpec(zones=(ZoneSpec("z1"),),
                                        rows=(RowSpec("r2", "z1", 1000.0), RowSpec("r3", "z1", 1000.0))))
    write, a_wrote_r2, b_wrote_r3 = repo.write_topology_item, asyncio.Event(), asyncio.Event()

    async def interleaved(session: Any, model: Any, key: str, was: Any, **values: Any) -> bool:
        me = asyncio.current_task().get_name()  # type: ignore[union-attr]
        if me == "A" and key == "r3":  # only if A writes the row it restates
            await b_wrote_r3.wait()
            await asyncio.sleep(0.3)  # B's trigger now waits for isolation_state
        if me == "B":
            await a_wrote_r2.wait()
            b_wrote_r3.set()
        written = await write(session, model, key, was, **values)
        if me == "A" and key == "r2":
            a_wrote_r2.set()
        return written

    monkeypatch.setattr(repo, "write_topology_item", interleaved)
    a = asyncio.create_task(_apply(database, TopologySpec(rows=(RowSpec("r2", "z1", 2000.0),
                                                                RowSpec("r3", "z1", 1000.0)))), name="A")
    b = asyncio.create_task(_apply(database, TopologySpec(rows=(RowSpec("r3", "z1", 3000.0),))), name="B")
    outcomes = await asyncio.gather(a, b, return_exceptions=True)
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    monkeypatch.undo()
    async with database.unit_of_work() as uow:
        view = await topology.get_topology(uow, WHO)
    assert {r.spec.id: r.spec.power_budget_w for r in view.rows} == {"r2": 2000.0, "r3": 3000.0}
