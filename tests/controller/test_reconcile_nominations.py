"""Head-of-line nominations in the reconciler (controller/scheduling/nominations.py), with the
real solver and database, one pass at a time on a clock of the test's: a gang that waits for room
behind a stream of single-accelerator arrivals gets nodes kept for it after `nominate_after_s`,
arrivals stay off them (their reasons say why), and it is placed once the work there leaves;
without nominations each freed accelerator is taken again and the gang never fits."""

from __future__ import annotations

import pytest

from controller.reconcile import Reconciler
from controller.scheduling.decider import DecideProcess
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.lease import LeaseLost
from controller.store.nominations import read_nominations
from controller.domain.values import RackSpec, RowSpec, TopologySpec, ZoneSpec
from controller.store.snapshot import load_snapshot
from controller.scheduling.nominations import shape_of
from scheduler.model import Nomination
from controller.usecases import deployments, topology, updates
from controller.usecases import nodes as node_cases
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO, add_nodes, add_tenant, deployment, no_publish, submit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reconciler(db: Database, clock: Clock, *, after_s: float, decider: DecideProcess | None = None) -> Reconciler:
    return Reconciler(db, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000, backoff_s=0.0,
                      clock=clock, decider=decider, nominate_after_s=after_s, nomination_max_s=3600.0)


async def nodes_of(db: Database) -> dict[str, set[str]]:
    """Deployment name -> the nodes its shards are on."""
    async with db.unit_of_work() as uow:
        snapshot = await load_snapshot(uow.session)
    out: dict[str, set[str]] = {}
    for p in snapshot.problem["placements"]:
        out.setdefault(p["deployment"].split("/", 1)[1], set()).add(p["node"])
    return out


async def view(db: Database, name: str):
    async with db.unit_of_work() as uow:
        return await deployments.get_deployment(uow, WHO, name)


async def delete(db: Database, name: str) -> None:
    async with db.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, name, RecordingSignals())


async def full_cluster_and_a_waiting_gang(db: Database, loop: Reconciler) -> None:
    """16 single-accelerator fillers on the 16 accelerators, then an 8-shard gang (one rack's worth)."""
    for k in range(16):
        await submit(db, deployment(f"f{k}", accelerators=1, locality="node"))
    await loop.reconcile_once()
    assert len(await nodes_of(db)) == 16
    await submit(db, deployment("gang", shards=8, accelerators=1, locality="rack"))
    for _ in range(3):  # decided on the session, then the back-off's full solve: it waits
        await loop.reconcile_once()
    assert (await view(db, "gang")).phase == "pending"


async def churn(db: Database, loop: Reconciler, leaving: list[str], step: int) -> None:
    """One filler leaves and a new one arrives; one pass."""
    await delete(db, leaving.pop(0))
    await submit(db, deployment(f"new{step}", accelerators=1, locality="node"))
    await loop.reconcile_once()


async def test_a_gang_behind_a_stream_of_arrivals_gets_nominated_nodes_and_is_placed(cluster, decider):
    clock = Clock()
    loop = reconciler(cluster, clock, after_s=30.0, decider=decider)
    await full_cluster_and_a_waiting_gang(cluster, loop)
    assert loop.nominations == ()
    clock.now += 31.0
    placed = await nodes_of(cluster)
    # The first departure after the wait: its pass nominates a rack's two nodes for the gang.
    await churn(cluster, loop, ["f0"], 0)
    [nomination] = loop.nominations
    assert nomination.deployment == "t1/gang" and len(nomination.nodes) == 2
    nominated = set(nomination.nodes)
    racks = {n.split("-")[0] + n.split("-")[1] for n in nominated}
    assert len(racks) == 1, nominated  # one rack: the gang's locality
    # The fillers on the nominated nodes leave one by one while new ones arrive: the new ones go
    # nowhere else (the cluster is full) and never onto the nominated nodes.
    there = sorted(name for name, nodes in placed.items() if nodes & nominated and name != "f0")
    step = 1
    while there:
        await churn(cluster, loop, there, step)
        now = await nodes_of(cluster)
        assert not any(nodes & nominated for name, nodes in now.items() if name.startswith("new")), now
        arrival = await view(cluster, f"new{step}")
        assert arrival.phase == "pending"
        assert any(r.code == "NODE_STATE" and "nominated for t1/gang" in r.message for r in arrival.reasons), \
            arrival.reasons
        step += 1
    await loop.reconcile_once()
    assert (await view(cluster, "gang")).phase == "scheduled"
    assert (await nodes_of(cluster))["gang"] == nominated
    assert loop.nominations == ()  # placed: the nomination ended
    await submit(cluster, deployment("after", accelerators=1, locality="node"))
    await loop.reconcile_once()  # the next commit records the end
    async with cluster.unit_of_work() as uow:
        events = await repo.list_events(uow.session, object_kind="deployment", object_id="t1/gang")
    said = {e.kind: e.message for e in events}
    assert all(node in said["deployment.nominated"] for node in nominated)
    assert "waiting for room" in said["deployment.nominated"]
    assert said["deployment.nomination_ended"].endswith("placed")


async def test_a_new_leader_takes_up_the_stored_nomination_and_the_gang_is_placed_on_its_nodes(cluster, decider):
    """The nomination is stored with the pass's commit; a second reconciler on the database (a
    new leader: its own clock, nothing in memory) takes it up on its first pass, with no event
    ending it, and snapshots (`maiactl snapshot`) carry it."""
    clock = Clock()
    loop = reconciler(cluster, clock, after_s=30.0, decider=decider)
    await full_cluster_and_a_waiting_gang(cluster, loop)
    clock.now += 31.0
    placed = await nodes_of(cluster)
    await churn(cluster, loop, ["f0"], 0)
    [nomination] = loop.nominations
    async with cluster.unit_of_work() as uow:
        [stored] = await read_nominations(uow.session)
        snapshot = await load_snapshot(uow.session)
    assert (stored.solver_id, stored.nodes, stored.priority) == ("t1/gang", nomination.nodes, nomination.priority)
    assert snapshot.problem["nominations"] == [
        {"deployment": "t1/gang", "priority": nomination.priority, "nodes": list(nomination.nodes)}]
    async with cluster.unit_of_work() as uow:  # `maiactl describe node`, on any controller
        kept = await node_cases.get_node(uow, WHO, nomination.nodes[0], None, {})
        listed = await node_cases.list_nodes(uow, WHO, None, {})
    assert kept.nominated_for == "t1/gang" and kept.nominated_at == stored.nominated_at
    assert {n.info.node_id for n in listed.items if n.nominated_for == "t1/gang"} == set(nomination.nodes)
    loop.resync()  # this controller elected again (it lost the lease): what it held is taken up again
    await loop.reconcile_once()
    assert loop.nominations == (nomination,)
    later = Clock()
    later.now = 50_000.0  # another process's clock
    successor = reconciler(cluster, later, after_s=30.0)
    await successor.reconcile_once()
    assert successor.nominations == (nomination,)
    there = sorted(name for name, nodes in placed.items() if nodes & set(nomination.nodes) and name != "f0")
    step = 1
    while there:  # the fillers there leave under the new leader; arrivals stay off its nodes
        await churn(cluster, successor, there, step)
        assert not any(nodes & set(nomination.nodes) for name, nodes in (await nodes_of(cluster)).items()
                       if name.startswith("new"))
        step += 1
    while (await view(cluster, "gang")).phase != "scheduled":  # stop at the pass that places it
        assert (await successor.reconcile_once()).solved
    assert (await nodes_of(cluster))["gang"] == set(nomination.nodes)
    async with cluster.unit_of_work() as uow:  # the pass that placed it stored the end at once
        events = await repo.list_events(uow.session, object_kind="deployment", object_id="t1/gang")
        assert await read_nominations(uow.session) == []
    assert [e.kind for e in events if "nominat" in e.kind] == ["deployment.nominated", "deployment.nomination_ended"]
    assert [e for e in events if e.kind == "deployment.nomination_ended"][0].message.endswith("placed")


async def gang_nominated(db: Database, decider: DecideProcess | None) -> tuple[Reconciler, Nomination]:
    """`full_cluster_and_a_waiting_gang`, then the first departure after `--nominate-after`:
    the reconciler and the nomination it made for the gang."""
    clock = Clock()
    loop = reconciler(db, clock, after_s=30.0, decider=decider)
    await full_cluster_and_a_waiting_gang(db, loop)
    clock.now += 31.0
    await churn(db, loop, ["f0"], 0)
    [nomination] = loop.nominations
    return loop, nomination


async def update_gang(db: Database, **spec) -> None:
    async with db.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "gang")
        await updates.update_deployment(uow, WHO, deployment("gang", shards=8, accelerators=1, locality="rack", **spec),
                                        row.resource_version, RecordingSignals())


async def test_an_update_in_a_quiet_cluster_ends_the_nomination_and_it_is_made_again_for_what_it_asks_now(
        cluster, decider):
    """The pass after the update follows it into the warm cache and ends the nomination there,
    not `--nomination-max` later; the gang keeps its place (nominated again in that pass)."""
    loop, nomination = await gang_nominated(cluster, decider)
    for _ in range(2):  # quiet: nothing ends it
        await loop.reconcile_once()
    assert loop.nominations == (nomination,)
    await update_gang(cluster, priority=5)
    await loop.reconcile_once()
    [again] = loop.nominations
    assert (again.deployment, again.priority) == ("t1/gang", 5)
    async with cluster.unit_of_work() as uow:
        [stored] = await read_nominations(uow.session)
        events = await repo.list_events(uow.session, object_kind="deployment", object_id="t1/gang")
    assert stored.priority == 5 and stored.shape == shape_of({**next(
        d for d in (await _docs(cluster)) if d["id"] == "t1/gang")})
    ended = [e.message for e in events if e.kind == "deployment.nomination_ended"]
    assert len(ended) == 1 and "was updated" in ended[0]


async def test_a_new_leader_ends_a_stored_nomination_its_deployment_was_updated_since(cluster, decider):
    await gang_nominated(cluster, decider)
    await update_gang(cluster, priority=5)  # the leader dies before it follows the update
    successor = reconciler(cluster, Clock(), after_s=30.0)
    await successor.reconcile_once()
    assert all(n.priority == 5 for n in successor.nominations)  # the stale one ended; made again, or not yet
    async with cluster.unit_of_work() as uow:
        events = await repo.list_events(uow.session, object_kind="deployment", object_id="t1/gang")
    assert any(e.kind == "deployment.nomination_ended" and "was updated" in e.message for e in events)


async def _docs(db: Database) -> list[dict]:
    async with db.unit_of_work() as uow:
        return (await load_snapshot(uow.session)).problem["deployments"]


async def test_without_nominations_each_freed_accelerator_is_taken_again(cluster):
    clock = Clock()
    loop = reconciler(cluster, clock, after_s=0.0)  # never nominate
    await full_cluster_and_a_waiting_gang(cluster, loop)
    clock.now += 31.0
    placed = await nodes_of(cluster)
    rack_a = sorted(name for name, nodes in placed.items() if any(n.startswith("rack-a") for n in nodes))
    assert len(rack_a) == 8
    for step in range(8):  # all of rack a's fillers leave, one a pass, each replaced by an arrival
        await churn(cluster, loop, rack_a, step)
    assert loop.nominations == ()
    assert (await view(cluster, "gang")).phase == "pending"
    assert [(await view(cluster, f"new{k}")).phase for k in range(8)] == ["scheduled"] * 8


async def test_a_nomination_held_too_long_ends_in_a_quiet_cluster_and_what_waited_takes_the_room(cluster, decider):
    clock = Clock()
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000,
                      backoff_s=0.0, clock=clock, decider=decider, nominate_after_s=30.0, nomination_max_s=100.0)
    await full_cluster_and_a_waiting_gang(cluster, loop)
    clock.now += 31.0
    placed = await nodes_of(cluster)
    there = sorted(name for name, nodes in placed.items() if name.startswith("f") and name != "f0")
    await churn(cluster, loop, ["f0"], 0)
    [nomination] = loop.nominations
    there = [name for name in there if placed[name] & set(nomination.nodes)][:2]
    for step in (1, 2):  # two of the nominated nodes' fillers leave; the arrivals wait
        await churn(cluster, loop, there, step)
    waiting = [k for k in range(3) if (await view(cluster, f"new{k}")).phase == "pending"]
    assert len(waiting) >= 2
    for _ in range(5):  # the back-off's full solve of the arrivals left short, then nothing to do
        if not (await loop.reconcile_once()).solved:
            break
    else:
        raise AssertionError("no idle pass: the quiet cluster keeps being solved")
    assert loop.nominations == (nomination,)
    clock.now += 100.0  # the nomination has been held --nomination-max: the next pass ends it
    assert (await loop.reconcile_once()).solved
    assert loop.nominations == ()
    assert [(await view(cluster, f"new{k}")).phase for k in waiting] == ["scheduled"] * len(waiting)
    assert (await view(cluster, "gang")).phase == "pending"
    async with cluster.unit_of_work() as uow:
        events = await repo.list_events(uow.session, object_kind="deployment", object_id="t1/gang")
    assert "held 100 s without fitting" in [e for e in events if e.kind == "deployment.nomination_ended"][0].message


async def test_gangs_waiting_in_two_zones_are_nominated_at_once_one_a_zone_and_both_placed(database, decider):
    """Zone z1 with racks 1a and 1b, zone z2 with rack 2, two 4-accelerator nodes a rack, every
    accelerator taken; three 8-shard gangs wait. One nomination a zone: two gather room at once,
    each in its own zone, and the third waits its turn (rack 1b would do, but z1 is held)."""
    spec = TopologySpec(zones=(ZoneSpec("z1"), ZoneSpec("z2")), rows=(RowSpec("row-1", "z1"), RowSpec("row-2", "z2")),
                        racks=(RackSpec("rack-1a", "row-1", None), RackSpec("rack-1b", "row-1", None),
                               RackSpec("rack-2", "row-2", None)))
    async with database.unit_of_work() as uow:
        await topology.apply_topology(uow, WHO, spec, RecordingSignals())
    for rack in ("rack-1a", "rack-1b", "rack-2"):
        await add_nodes(database, rack, 2)
    await add_tenant(database, "t1")
    clock = Clock()
    loop = reconciler(database, clock, after_s=30.0, decider=decider)
    for k in range(24):
        await submit(database, deployment(f"f{k}", accelerators=1, locality="node"))
    await loop.reconcile_once()
    gangs = ("gang-a", "gang-b", "gang-c")
    for name in gangs:
        await submit(database, deployment(name, shards=8, accelerators=1, locality="rack"))
    for _ in range(3):
        await loop.reconcile_once()
    assert {(await view(database, n)).phase for n in gangs} == {"pending"}
    clock.now += 31.0
    placed = await nodes_of(database)
    await churn(database, loop, ["f0"], 0)
    noms = loop.nominations
    assert len(noms) == 2, noms
    racks = sorted(sorted({node.rsplit("-n", 1)[0] for node in n.nodes}) for n in noms)
    assert racks in ([["rack-1a"], ["rack-2"]], [["rack-1b"], ["rack-2"]]), racks  # a zone each
    [left] = set(gangs) - {n.deployment.split("/")[1] for n in noms}
    # The fillers on the nominated nodes leave, one a step, each replaced by an arrival that finds
    # no room: both nominated gangs fit there. Never two nominations in one zone meanwhile (the
    # third gang has one once a zone is free: on a placed gang's nodes, which it waits to leave).
    nominated = {node for n in noms for node in n.nodes}
    fillers = sorted(name for name, nodes in placed.items() if nodes & nominated and name != "f0")
    step = 1
    while fillers:
        await churn(database, loop, fillers, step)
        zones = [{"z2" if node.startswith("rack-2") else "z1" for node in n.nodes} for n in loop.nominations]
        assert all(len(z) == 1 for z in zones) and len(set().union(*zones)) == len(zones), loop.nominations
        step += 1
    await loop.reconcile_once()
    now = await nodes_of(database)
    assert sorted(n.deployment for n in noms) == sorted(f"t1/{g}" for g in gangs if g != left)
    assert {frozenset(now[n.deployment.split("/")[1]]) for n in noms} == {frozenset(n.nodes) for n in noms}
    assert (await view(database, left)).phase == "pending"


class _Fence:
    """A leader lease that refuses commits while `lost`."""

    lost = False

    def opened(self, session) -> None:  # noqa: ANN001
        pass

    async def commit(self, session, commit) -> None:  # noqa: ANN001
        if self.lost:
            raise LeaseLost("a", 1)
        await commit()


async def test_a_nomination_whose_commit_a_lost_lead_refused_is_not_recorded_in_the_next_term(cluster):
    """The pass that nominated was refused (the lead lost); its events were put back for the next
    commit, and the next term's first commit recorded a `deployment.nominated` for nodes never
    stored nor held, which no `nomination_ended` ever followed."""
    clock, fence = Clock(), _Fence()
    loop = reconciler(cluster.fenced(fence), clock, after_s=30.0)
    await full_cluster_and_a_waiting_gang(cluster, loop)
    clock.now += 31.0
    fence.lost = True
    with pytest.raises(LeaseLost):
        await churn(cluster, loop, ["f0"], 0)
    fence.lost = False
    loop.resync()  # elected again
    await loop.reconcile_once()
    async with cluster.unit_of_work() as uow:
        stored = await read_nominations(uow.session)
        events = await repo.list_events(uow.session, object_kind="deployment", object_id="t1/gang")
    assert loop.nominations == () and stored == []
    assert not [e.kind for e in events if "nominat" in e.kind]
