"""What the reconciler solves and when, with the real solver and database, one pass at a time:
submissions are seen without a generation bump and decided on the warm cluster (no solve), an
arrival the warm session cannot place is solved once more by the full path (back-off), and
deployments found unplaceable wait out of later solves until a change could help them
(controller/parking.py)."""

from __future__ import annotations

from controller.reconcile import Reconciler
from controller.usecases import deployments, planning, tenants
from controller.domain.values import TenantSpec, split_deployment_key
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO, deployment


class SolveRecorder:
    """The reconciler's solve, remembering which deployments each call was asked to place."""

    def __init__(self) -> None:
        self.asked: list[set[str]] = []

    async def __call__(self, problem, *, time_limit_ms):
        self.asked.append({split_deployment_key(d["id"])[1] for d in problem["deployments"]})  # all of tenant t1
        return await planning.solve_online_first(problem, time_limit_ms=time_limit_ms)


def reconciler(db, solve: SolveRecorder) -> Reconciler:
    # A time limit no solve here comes near, even on a loaded machine: a solve cut short by it
    # is retried by the back-off, never parked, and these tests are about parking.
    return Reconciler(db, push=lambda nodes: None, publish=lambda *a: _nothing(), solve=solve,
                      solve_time_limit_ms=120_000, backoff_s=0.0)


async def submit(db, spec) -> None:
    async with db.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, spec, RecordingSignals())


async def view(db, name):
    async with db.unit_of_work() as uow:
        return await deployments.get_deployment(uow, WHO, name)


async def test_unplaceable_work_waits_until_a_departure_and_keeps_its_reasons(cluster):
    # 16 accelerators in one row; "big" wants all of them once "filler" holds 4.
    solve = SolveRecorder()
    loop = reconciler(cluster, solve)
    await submit(cluster, deployment("filler", accelerators=4, locality="node"))
    assert (await loop.reconcile_once()).solved
    await submit(cluster, deployment("big", shards=4, accelerators=4, locality="row"))
    assert (await loop.reconcile_once()).solved  # decided on the warm cluster: not placed
    assert solve.asked == [{"filler"}] and loop.fast_passes == 1
    assert (await view(cluster, "big")).reasons
    assert (await loop.reconcile_once()).solved  # the back-off: one full solve
    assert solve.asked[-1] == {"filler", "big"}
    big = await view(cluster, "big")
    assert big.phase == "pending" and big.reasons
    assert (await view(cluster, "filler")).phase == "scheduled"
    assert not (await loop.reconcile_once()).solved  # then it waits

    # An arrival is decided without it (no solve), and its reasons stay.
    await submit(cluster, deployment("small", accelerators=1, locality="node"))
    assert (await loop.reconcile_once()).solved
    assert len(solve.asked) == 2 and loop.fast_passes == 2
    assert (await view(cluster, "small")).phase == "scheduled"
    assert (await view(cluster, "big")).reasons == big.reasons

    # Departures: it is solved again in the pass that releases them, and placed.
    for name in ("filler", "small"):
        async with cluster.unit_of_work() as uow:
            await deployments.delete_deployment(uow, WHO, name, RecordingSignals())
    assert (await loop.reconcile_once()).solved
    assert "big" in solve.asked[-1]
    assert (await view(cluster, "big")).phase == "scheduled"


async def test_a_submission_after_a_deletion_is_seen(cluster):
    # SQLite gives the new row the id the removed one had: the pass must see it all the same.
    solve = SolveRecorder()
    loop = reconciler(cluster, solve)
    await submit(cluster, deployment("first"))
    assert (await loop.reconcile_once()).solved
    async with cluster.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "first", RecordingSignals())
    assert (await loop.reconcile_once()).deleted == ("t1/first",)  # deployments by key TENANT/NAME
    assert not (await loop.reconcile_once()).solved  # nothing new
    await submit(cluster, deployment("second"))
    assert (await loop.reconcile_once()).solved
    assert (await view(cluster, "second")).phase == "scheduled"


async def test_a_contract_change_lets_parked_work_go(cluster):
    solve = SolveRecorder()
    loop = reconciler(cluster, solve)
    async with cluster.unit_of_work() as uow:
        await tenants.update_tenant(uow, WHO, TenantSpec(id="t1", max_accelerators=2), RecordingSignals())
    await submit(cluster, deployment("wide", shards=4, accelerators=1, locality="row"))
    assert (await loop.reconcile_once()).solved
    assert (await view(cluster, "wide")).phase == "pending"
    asked = len(solve.asked)
    await submit(cluster, deployment("tiny", accelerators=1, locality="node"))
    assert (await loop.reconcile_once()).solved
    assert len(solve.asked) == asked and loop.fast_passes == 1  # decided on the warm cluster
    assert (await view(cluster, "tiny")).phase == "scheduled"

    async with cluster.unit_of_work() as uow:
        await tenants.update_tenant(uow, WHO, TenantSpec(id="t1", max_accelerators=8), RecordingSignals())
    assert (await loop.reconcile_once()).solved
    # The contract reaches the warm session as a delta, which decides the parked work again.
    assert len(solve.asked) == asked and loop.fast_passes == 2
    assert (await view(cluster, "wide")).phase == "scheduled"


async def _nothing() -> None:
    return None


async def test_work_a_full_solve_left_unplaced_is_placed_by_the_fast_pass_a_departure_helps(cluster):
    # "late" arrives as the back-off's full solve runs: only that solve decides it (the warm
    # session never does). The departures after it must still reach it, on the fast path.
    solve = SolveRecorder()
    loop = reconciler(cluster, solve)
    for k in range(16):  # every accelerator taken
        await submit(cluster, deployment(f"f{k}", accelerators=1, locality="node"))
    assert (await loop.reconcile_once()).solved
    await submit(cluster, deployment("early", accelerators=1, locality="node"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 1  # no room: backs off
    await submit(cluster, deployment("late", accelerators=1, locality="node"))
    assert (await loop.reconcile_once()).solved and solve.asked[-1] >= {"early", "late"}  # the full solve
    assert [(await view(cluster, n)).phase for n in ("early", "late")] == ["pending", "pending"]
    for gone in ("f0", "f1"):
        async with cluster.unit_of_work() as uow:
            await deployments.delete_deployment(uow, WHO, gone, RecordingSignals())
        assert (await loop.reconcile_once()).solved
    full = len(solve.asked)
    assert [(await view(cluster, n)).phase for n in ("early", "late")] == ["scheduled", "scheduled"]
    assert len(solve.asked) == full and loop.fast_passes == 3  # placed on the warm cluster


async def _delete(db, name: str) -> None:
    async with db.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, name, RecordingSignals())


async def _big_parked_beside_late(cluster, loop: Reconciler) -> None:
    """Three of the four 4-accelerator nodes full; "big" (a whole node) parked by a full solve
    that placed "late" on the fourth (with "blocker", placed there by a fast pass, deleted)."""
    for k in range(3):
        await submit(cluster, deployment(f"fill{k}", accelerators=4, locality="node"))
    assert (await loop.reconcile_once()).solved
    await submit(cluster, deployment("blocker", accelerators=1, locality="node"))
    assert (await loop.reconcile_once()).solved  # a fast pass: on the free node
    await submit(cluster, deployment("big", accelerators=4, locality="node"))
    assert (await loop.reconcile_once()).solved  # a fast pass: no room, backs off
    await _delete(cluster, "blocker")
    await submit(cluster, deployment("late", accelerators=1, locality="node", priority=10))
    assert (await loop.reconcile_once()).solved  # the back-off's full solve: late placed, big parked
    assert (await view(cluster, "late")).phase == "scheduled"
    assert (await view(cluster, "big")).phase == "pending"


async def test_a_departure_a_full_pass_catches_up_with_lets_parked_work_go(cluster):
    """The departure that frees a parked deployment's node is read by a full pass (another
    arrival's back-off fell due): it lets the parked work go. The full pass caught up and threw
    away whether that could help, and the parked work waited beside a free node for good."""
    solve = SolveRecorder()
    loop = reconciler(cluster, solve)
    await _big_parked_beside_late(cluster, loop)
    await submit(cluster, deployment("wide", shards=2, accelerators=4, locality="rack"))  # never fits
    assert (await loop.reconcile_once()).solved  # a fast pass: backs off, so the next pass is full
    await _delete(cluster, "late")
    for _ in range(3):
        await loop.reconcile_once()
    big = await view(cluster, "big")
    assert big.phase == "scheduled", big.reasons


async def test_a_departure_of_work_placed_after_the_full_solve_lets_parked_work_go_on_a_fresh_read(cluster):
    """The full solve's own placements (and a fast pass's after it) count among those whose
    departure could help: read from the database afresh (the warm cache dropped), the deletion
    of "late", placed by that solve, lets "big" go (only the placements before it were known)."""
    solve = SolveRecorder()
    loop = reconciler(cluster, solve)
    await _big_parked_beside_late(cluster, loop)
    loop._warm.drop()  # a change it cannot follow, a lost decide process, ...
    await _delete(cluster, "late")
    for _ in range(3):
        await loop.reconcile_once()
    assert (await view(cluster, "big")).phase == "scheduled"


async def _big_parked_beside_filler(cluster, solve: SolveRecorder) -> Reconciler:
    """A reconciler whose full solve parked "big" (the whole row) beside "filler" (a node)."""
    loop = reconciler(cluster, solve)
    await submit(cluster, deployment("filler", accelerators=4, locality="node"))
    assert (await loop.reconcile_once()).solved
    await submit(cluster, deployment("big", shards=4, accelerators=4, locality="row"))
    assert (await loop.reconcile_once()).solved  # a fast pass: backs off
    assert (await loop.reconcile_once()).solved  # the full solve: parked
    return loop


async def test_a_parked_deployment_deleted_and_submitted_again_as_it_was_gets_its_full_solve(cluster):
    """Deleted while parked (it held nothing) and submitted again unchanged, a deployment backs
    off anew and the full solve tries it: its parked entry matched it, and it was left out."""
    solve = SolveRecorder()
    loop = await _big_parked_beside_filler(cluster, solve)
    assert loop._state.queue.depths().unschedulable == 1
    await _delete(cluster, "big")
    assert (await loop.reconcile_once()).deleted == ("t1/big",)
    asked = len(solve.asked)
    await submit(cluster, deployment("big", shards=4, accelerators=4, locality="row"))
    for _ in range(3):
        await loop.reconcile_once()
    assert any("big" in names for names in solve.asked[asked:])  # the full solve was asked to place it


async def test_a_parked_deployment_deleted_and_submitted_again_is_solved_by_a_full_pass_too(cluster):
    """As above, the new deployment read by a full pass (another's back-off falls due as it
    arrives): the deletion forgot the parked entry, so the solve is asked to place it."""
    solve = SolveRecorder()
    loop = await _big_parked_beside_filler(cluster, solve)
    await _delete(cluster, "big")
    await submit(cluster, deployment("nofit", shards=4, accelerators=4, locality="row"))  # no room beside filler
    assert (await loop.reconcile_once()).deleted == ("t1/big",)  # and nofit backs off
    assert loop._state.queue.depths().unschedulable == 0
    asked = len(solve.asked)
    await submit(cluster, deployment("big", shards=4, accelerators=4, locality="row"))
    loop._warm.drop()  # the next pass is a full one
    await loop.reconcile_once()
    assert "big" in solve.asked[asked]
