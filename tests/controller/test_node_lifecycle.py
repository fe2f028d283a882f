"""The node-lifecycle loop against a real database: suspect → down → evicted (rate-limited),
coming back keeps what is placed, a node re-registering smaller releases only its own shards,
a second agent for one node id is refused. Clocks are driven by hand."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from controller.agents import AgentHub
from controller.domain.liveness import FlapDamper, LivenessPolicy, Transition
from controller.domain.values import DeploymentEvent, NodeInfo, ShardReport
from controller.errors import FailedPrecondition
from controller.identity import Principal, Role
from controller import nodelifecycle
from controller.nodelifecycle import NodeLifecycle
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import agents, liveness, nodes, updates
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO, deployment, no_publish, quiet_agent, run_all, statements, submit

POLICY = LivenessPolicy(heartbeat_timeout_s=10, down_grace_s=30, eviction_grace_s=90, restart_grace_s=0,
                        eviction_rate=1.0)
NODE_AGENT = Principal("agent", Role.NODE_BOOTSTRAP)


class Clocks:
    def __init__(self) -> None:
        self.wall = datetime.now(timezone.utc)
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


def lifecycle(db: Database, clocks: Clocks, connected: set[str], woken: list[int] | None = None) -> NodeLifecycle:
    wakes = woken if woken is not None else []
    return NodeLifecycle(db, POLICY, connected=lambda: frozenset(connected), damper=FlapDamper(),
                         on_change=lambda: wakes.append(1), clock=lambda: clocks.mono,
                         wall_clock=lambda: clocks.wall)


async def placements(db: Database) -> dict[tuple[str, int, int], tuple[str, tuple[int, ...]]]:
    async with db.unit_of_work() as uow:
        rows = await uow.session.execute(select(m.Placement, m.Deployment.name).join(m.Deployment))
        return {(name, p.replica, p.shard): (p.node_id, tuple(p.accelerator_indices)) for p, name in rows}


async def health(db: Database) -> dict[str, tuple[str, bool]]:
    async with db.unit_of_work() as uow:
        return {n.id: (n.health.value, n.evicted_at is not None)
                for n in (await uow.session.execute(select(m.Node))).scalars()}


async def lose(db: Database, node_id: str, at: datetime) -> None:
    """The node's stream ends at `at` (its last heartbeat)."""
    async with db.unit_of_work() as uow:
        node = await uow.session.get(m.Node, node_id)
        node.last_heartbeat_at = at
        await uow.commit()
    async with db.unit_of_work() as uow:
        assert await agents.mark_suspect(uow, node_id, session_id=None, why="stream ended")


async def placed(cluster: Database, replicas: int = 2) -> tuple[Reconciler, dict]:
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish)
    await submit(cluster, deployment("svc", replicas=replicas, spread=None))
    await loop.reconcile_once()
    return loop, await placements(cluster)


async def placed_and_lost(cluster: Database, clocks: Clocks) -> tuple[Reconciler, dict, str, NodeLifecycle]:
    """Two replicas placed, then the node of the first one's stream ends now; the lifecycle of the
    other nodes (connected)."""
    loop, before = await placed(cluster)
    victim = before[("svc", 0, 0)][0]
    everyone = {"rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"} - {victim}
    await lose(cluster, victim, clocks.wall)
    return loop, before, victim, lifecycle(cluster, clocks, everyone)


async def test_a_silent_node_is_suspect_then_down_then_evicted_and_its_work_placed_again(cluster):
    clocks = Clocks()
    loop, before, victim, cycle = await placed_and_lost(cluster, clocks)

    clocks.advance(20)  # suspect, within the down grace: it keeps its shards
    assert await cycle.pass_once() == []
    await loop.reconcile_once(force=True)
    assert await placements(cluster) == before and (await health(cluster))[victim] == ("suspect", False)

    clocks.advance(15)  # 35 s silent: down, still holding its shards
    assert [(c.node_id, c.health, c.evict) for c in await cycle.pass_once()] == [(victim, "down", False)]
    await loop.reconcile_once(force=True)
    assert await placements(cluster) == before

    clocks.advance(60)  # 95 s silent: evicted; the next pass places its replica elsewhere
    assert [(c.node_id, c.evict) for c in await cycle.pass_once()] == [(victim, True)]
    assert (await health(cluster))[victim] == ("down", True)
    await loop.reconcile_once()
    after = await placements(cluster)
    assert set(after) == set(before) and victim not in {node for node, _ in after.values()}
    assert all(after[k] == where for k, where in before.items() if where[0] != victim)


async def shard_phases(db: Database) -> dict[tuple[int, int], tuple[str, str, str]]:
    """svc's shards: (replica, shard) -> (node, phase, message)."""
    async with db.unit_of_work() as uow:
        dep = await repo.get_deployment(uow.session, "t1", "svc")
        return {(p.replica, p.shard): (p.node_id, p.phase.value, p.message or "") for p in dep.placements}


async def svc_phase(db: Database) -> str:
    async with db.unit_of_work() as uow:
        return (await repo.get_deployment(uow.session, "t1", "svc")).phase.value


async def report(db: Database, node: str, phase: str, message: str = "") -> None:
    """`node`'s agent says `phase` of every svc shard it holds."""
    held = [(replica, shard) for (replica, shard), (on, _, _) in (await shard_phases(db)).items() if on == node]
    async with db.unit_of_work() as uow:
        generation = {(p.replica, p.shard): p.generation
                      for p in (await repo.get_deployment(uow.session, "t1", "svc")).placements}
        await agents.flush_reports(uow, {}, [(node, ShardReport("svc", replica, shard, generation[(replica, shard)],
                                                                phase, message, tenant="t1"))
                                             for replica, shard in held])


async def placed_whole(cluster: Database) -> tuple[Reconciler, dict]:
    """svc's two replicas placed, each a whole node, and running."""
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish)
    await submit(cluster, deployment("svc", replicas=2, accelerators=4, spread=None))
    await loop.reconcile_once()
    before = await placements(cluster)
    for node in {node for node, _ in before.values()}:
        await report(cluster, node, "running", "serving")
    return loop, before


async def test_a_node_gone_down_leaves_its_shards_unknown_until_its_agent_reports_again(cluster):
    clocks = Clocks()
    loop, before = await placed_whole(cluster)
    assert await svc_phase(cluster) == "running"
    victim = before[("svc", 0, 0)][0]
    everyone = {"rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"} - {victim}
    await lose(cluster, victim, clocks.wall)
    published: list[DeploymentEvent] = []
    restated: list[str] = []
    cycle = NodeLifecycle(cluster, POLICY, connected=lambda: frozenset(everyone), damper=FlapDamper(),
                          on_change=lambda: None, clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall,
                          publish=lambda *events: published.extend(events), restate=restated.extend)

    clocks.advance(20)  # suspect: it may be a blip, its shards are as last reported
    await cycle.pass_once()
    assert await svc_phase(cluster) == "running" and not published

    clocks.advance(15)  # down: nothing says its shards run
    assert [(c.node_id, c.health) for c in await cycle.pass_once()] == [(victim, "down")]
    shards = await shard_phases(cluster)
    assert shards[(0, 0)] == (victim, "unknown", (f"node {victim} is down: no contact for 35s (down grace 30s); "
                                               "last known running: serving"))
    assert shards[(1, 0)][1:] == ("running", "serving")  # the other replica's node is up
    assert await svc_phase(cluster) == "degraded"
    assert [(e.type, e.deployment.spec.name, e.deployment.phase, e.deployment.running_replicas)
            for e in published] == [("modified", "svc", "degraded", 1)]
    assert restated == [victim]  # a stream of it that came back since the read writes its shards again
    async with cluster.unit_of_work() as uow:
        told = [e.message for e in await repo.list_events(uow.session, object_kind="node", object_id=victim)
                if e.kind == "node.down"]
    assert told == ["no contact for 35s (down grace 30s): its 1 shard(s) unknown until its agent reports, "
                    "evicted after the eviction grace"]
    await loop.reconcile_once(force=True)  # held where it is until the eviction grace ends
    assert await placements(cluster) == before

    await report(cluster, victim, "running", "serving")  # its agent is back and says so
    assert (await shard_phases(cluster))[(0, 0)] == (victim, "running", "serving")
    assert await svc_phase(cluster) == "running"


async def test_a_pass_writes_its_changes_a_few_nodes_a_transaction(cluster, monkeypatch):
    clocks = Clocks()
    for node in ("rack-a-n0", "rack-a-n1", "rack-b-n0"):
        await lose(cluster, node, clocks.wall)
    transactions: list[list[str]] = []
    apply = liveness.apply_transitions

    async def counted(uow, changes, now, **kw):  # noqa: ANN001, ANN003
        transactions.append([c.node_id for c in changes])
        return await apply(uow, changes, now, **kw)

    monkeypatch.setattr(liveness, "apply_transitions", counted)
    monkeypatch.setattr(nodelifecycle, "CHANGES_PER_TRANSACTION", 2)
    cycle = lifecycle(cluster, clocks, {"rack-b-n1"})
    clocks.advance(35)
    assert sorted(c.node_id for c in await cycle.pass_once()) == ["rack-a-n0", "rack-a-n1", "rack-b-n0"]
    assert transactions == [["rack-a-n0", "rack-a-n1"], ["rack-b-n0"]]
    assert {node: state for node, (state, _) in (await health(cluster)).items()} == {
        "rack-a-n0": "down", "rack-a-n1": "down", "rack-b-n0": "down", "rack-b-n1": "up"}


async def test_a_node_whose_agent_came_back_before_the_write_keeps_its_shards_as_they_were(cluster):
    clocks = Clocks()
    _, before = await placed_whole(cluster)
    victim = before[("svc", 0, 0)][0]
    async with cluster.unit_of_work() as uow:  # judged suspect and silent; its Hello wrote it up since
        await repo.set_node_health(uow.session, victim, m.NodeHealth.UP)
        await uow.commit()
    views: dict = {}
    async with cluster.unit_of_work() as uow:
        assert await liveness.apply_transitions(uow, [Transition(victim, "down", "silent", was="suspect")],
                                                clocks.wall, views=views) == []
    assert (await shard_phases(cluster))[(0, 0)] == (victim, "running", "serving")
    assert await svc_phase(cluster) == "running" and views == {}


async def test_becoming_the_leader_gives_the_nodes_the_restart_grace_again(cluster):
    clocks = Clocks()
    async with cluster.unit_of_work() as uow:  # every node up, last heard from now
        for node in (await uow.session.execute(select(m.Node))).scalars():
            node.health, node.last_heartbeat_at = m.NodeHealth.UP, clocks.wall
        await uow.commit()
    cycle = NodeLifecycle(cluster, replace(POLICY, restart_grace_s=60), connected=frozenset, damper=FlapDamper(),
                          on_change=lambda: None, clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall)
    clocks.advance(100)  # a follower all along: now the leader (HA's on_elected), nobody connected yet
    cycle.lead()
    clocks.advance(50)   # within the restart grace: nobody is suspected
    assert await cycle.pass_once() == []
    clocks.advance(15)   # past it, silence counted from becoming the leader (65 s > the 10 s timeout)
    changes = await cycle.pass_once()
    assert changes and {c.health for c in changes} == {"suspect"}
    assert {state for state, _ in (await health(cluster)).values()} == {"suspect"}


async def test_a_node_whose_stream_ended_here_is_judged_by_the_heartbeat_the_hub_saw(cluster):
    """The hub writes a live stream's last contact only every few timeouts (`contact_write_every_s`):
    a node whose stream ended without being marked suspect (its credential revoked) still goes
    suspect at the heartbeat timeout though its stored time looks fresh, and a node whose stored
    time is older than what the hub saw is not taken down early by it."""
    clocks = Clocks()
    heard: dict[str, datetime] = {}
    connected = {"rack-b-n0", "rack-b-n1"}
    cycle = NodeLifecycle(cluster, POLICY, connected=lambda: frozenset(connected), damper=FlapDamper(),
                          on_change=lambda: None, released=lambda: heard, clock=lambda: clocks.mono,
                          wall_clock=lambda: clocks.wall)
    clocks.advance(100)  # leading for a while: silence is not counted from its start
    stale_write = clocks.wall - timedelta(seconds=60)  # the stored time lags what the hub saw
    async with cluster.unit_of_work() as uow:
        rows = {n.id: n for n in (await uow.session.execute(select(m.Node))).scalars()}
        rows["rack-a-n0"].health, rows["rack-a-n0"].last_heartbeat_at = m.NodeHealth.UP, clocks.wall
        rows["rack-a-n1"].health, rows["rack-a-n1"].last_heartbeat_at = m.NodeHealth.SUSPECT, stale_write
        await uow.commit()
    heard.update({"rack-a-n0": clocks.wall, "rack-a-n1": clocks.wall})  # both streams ended now
    clocks.advance(POLICY.heartbeat_timeout_s + 1)
    assert [(c.node_id, c.health) for c in await cycle.pass_once()] == [("rack-a-n0", "suspect")]
    clocks.advance(POLICY.down_grace_s - POLICY.heartbeat_timeout_s - 2)  # 29 s since the hub heard it
    assert await cycle.pass_once() == []
    clocks.advance(2)
    assert {(c.node_id, c.health) for c in await cycle.pass_once()} == {("rack-a-n0", "down"), ("rack-a-n1", "down")}


async def test_after_streams_ended_by_the_thousand_a_pass_reads_the_nodes_silent_for_a_timeout(cluster, monkeypatch):
    """More nodes released than a pass reads by id: it reads every node up and stored as silent for
    the timeout instead, and a released node still goes suspect at the timeout."""
    from controller import nodelifecycle
    monkeypatch.setattr(nodelifecycle, "RECENT_BY_ID_MAX", 1)
    clocks = Clocks()
    heard: dict[str, datetime] = {}
    cycle = NodeLifecycle(cluster, POLICY, connected=frozenset, damper=FlapDamper(), on_change=lambda: None,
                          released=lambda: heard, clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall)
    clocks.advance(100)
    async with cluster.unit_of_work() as uow:
        for node in (await uow.session.execute(select(m.Node))).scalars():
            node.health, node.last_heartbeat_at = m.NodeHealth.UP, clocks.wall
            heard[node.id] = clocks.wall
        await uow.commit()
    clocks.advance(POLICY.heartbeat_timeout_s - 1)
    assert await cycle.pass_once() == []
    clocks.advance(2)
    assert {c.health for c in await cycle.pass_once()} == {"suspect"}
    assert {state for state, _ in (await health(cluster)).values()} == {"suspect"}


async def test_a_connected_node_is_not_judged_by_its_stored_contact(cluster):
    """Its stream is its liveness: a stored time older than the timeout (written every few
    timeouts) neither suspects it nor makes the pass read it while it is within the write cadence."""
    from controller.usecases import liveness
    clocks = Clocks()
    async with cluster.unit_of_work() as uow:
        for node in (await uow.session.execute(select(m.Node))).scalars():
            node.health, node.last_heartbeat_at = m.NodeHealth.UP, clocks.wall
        await uow.commit()
    everyone = frozenset({"rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"})
    cycle = lifecycle(cluster, clocks, set(everyone))
    clocks.advance(POLICY.contact_write_every_s)
    assert await cycle.pass_once() == []
    async with cluster.unit_of_work() as uow:
        stale = clocks.wall - timedelta(seconds=POLICY.stored_contact_stale_s)
        assert await liveness.read_liveness(uow, everyone, silent_before=stale) == []
    clocks.advance(POLICY.stored_contact_stale_s)  # not written for that long: read, still up
    with statements(cluster) as seen:
        assert await cycle.pass_once() == []
    assert not [st for st in seen if "GROUP BY" in st]  # no node due for eviction: the zones are not counted
    assert {state for state, _ in (await health(cluster)).values()} == {"up"}


async def test_a_node_back_before_its_eviction_keeps_its_shards(cluster):
    clocks = Clocks()
    loop, before = await placed(cluster)
    victim = before[("svc", 0, 0)][0]
    await lose(cluster, victim, clocks.wall)
    cycle = lifecycle(cluster, clocks, {"rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"} - {victim})
    clocks.advance(60)
    await cycle.pass_once()
    assert (await health(cluster))[victim] == ("down", False)
    async with cluster.unit_of_work() as uow:  # the agent comes back: register, hello
        reg = await agents.register_node(uow, WHO, NodeInfo(victim, victim.rsplit("-", 1)[0], 4, hbm_gib=64.0,
                                                            accelerator_model="maia-100", idle_power_w=500.0),
                                         heartbeat_interval_ms=1000)
    async with cluster.unit_of_work() as uow:
        assert await agents.hello(uow, WHO, victim, reg.session_id, clocks.wall) is True
    await loop.reconcile_once(force=True)
    assert await placements(cluster) == before  # nothing reshuffled
    assert (await health(cluster))[victim] == ("up", False)


async def _back(cluster: Database, node: str, clocks: Clocks) -> None:
    """The node's agent comes back: register, hello."""
    async with cluster.unit_of_work() as uow:
        reg = await agents.register_node(uow, WHO, NodeInfo(node, node.rsplit("-", 1)[0], 4, hbm_gib=64.0,
                                                            accelerator_model="maia-100", idle_power_w=500.0),
                                         heartbeat_interval_ms=1000)
    async with cluster.unit_of_work() as uow:
        assert await agents.hello(uow, WHO, node, reg.session_id, clocks.wall) is True


@pytest.mark.parametrize("back", [True, False], ids=["back", "evicted"])
async def test_a_draining_node_that_goes_down_keeps_its_replica_until_back_or_evicted(cluster, back: bool):
    """A drain's outgoing replica on a node that went down was stopped at once (its shards on
    other nodes too): down, it did not run, and a replica that does not run "serves nothing".
    A node back within the eviction grace keeps its shards, so the replica now stays as all work
    there does: retired once its node is back and its replacement runs, or gone at the eviction."""
    clocks = Clocks()
    loop, before = await placed(cluster, replicas=1)
    victim = before[("svc", 0, 0)][0]
    await run_all(cluster)
    async with cluster.unit_of_work() as uow:
        await nodes.drain_node(uow, WHO, victim, RecordingSignals(), None, {})
    await loop.reconcile_once(force=True)  # the replacement, beside it
    replacement = {k: v for k, v in (await placements(cluster)).items() if k not in before}
    assert len(replacement) == 1 and victim not in {node for node, _ in replacement.values()}
    await lose(cluster, victim, clocks.wall)
    cycle = lifecycle(cluster, clocks, {"rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"} - {victim})
    clocks.advance(60)
    await cycle.pass_once()
    assert (await health(cluster))[victim] == ("down", False)
    await run_all(cluster)  # the replacement runs
    for _ in range(2):
        await loop.reconcile_once(force=True)
        assert await placements(cluster) == {**before, **replacement}  # the down node's replica stays
    if back:
        await _back(cluster, victim, clocks)
    else:
        clocks.advance(60)
        assert [(c.node_id, c.evict) for c in await cycle.pass_once()] == [(victim, True)]
    await loop.reconcile_once(force=True)
    await loop.reconcile_once(force=True)
    assert await placements(cluster) == replacement  # retired: its replacement runs


async def test_evictions_are_rate_limited_per_zone_and_stop_when_nothing_is_up(cluster):
    clocks = Clocks()
    nodes = ["rack-a-n0", "rack-a-n1", "rack-b-n0"]
    for node in nodes:
        await lose(cluster, node, clocks.wall)
    connected = {"rack-b-n1"}
    cycle = lifecycle(cluster, clocks, connected)
    clocks.advance(100)
    await cycle.pass_once()  # all three down
    assert [c.node_id for c in await cycle.pass_once() if c.evict] == ["rack-a-n0"]  # 1 a second, longest silent
    assert [c for c in await cycle.pass_once() if c.evict] == []
    clocks.advance(1)
    assert [c.node_id for c in await cycle.pass_once() if c.evict] == ["rack-a-n1"]
    # The last node up goes silent too: nothing is up anywhere, so nothing more is evicted.
    connected.clear()
    await lose(cluster, "rack-b-n1", clocks.wall - timedelta(seconds=100))
    clocks.advance(10)
    await cycle.pass_once()
    assert [c for c in await cycle.pass_once() if c.evict] == []
    assert {n: h for n, h in (await health(cluster)).items()} == {
        "rack-a-n0": ("down", True), "rack-a-n1": ("down", True), "rack-b-n0": ("down", False),
        "rack-b-n1": ("down", False)}


async def test_a_node_registering_with_fewer_accelerators_releases_only_its_own_invalid_shards(cluster):
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish)
    await submit(cluster, deployment("big", replicas=4, accelerators=2, spread=None))
    await loop.reconcile_once()
    before = await placements(cluster)
    node, high = next((n, key) for key, (n, idx) in before.items() if max(idx) >= 2)
    async with cluster.unit_of_work() as uow:  # an admin re-registers it with 2 accelerators
        await agents.register_node(uow, WHO, NodeInfo(node, node.rsplit("-", 1)[0], 2, accelerator_model="maia-100",
                                                      hbm_gib=64.0, idle_power_w=500.0), heartbeat_interval_ms=1000)
    after = await placements(cluster)
    assert high not in after
    assert {k: v for k, v in after.items()} == {k: v for k, v in before.items() if k != high}
    outcome = await loop.reconcile_once()  # the cluster still reconciles, and the shard is placed again
    assert outcome.solved and high in await placements(cluster)


@pytest.mark.parametrize("change", [dict(rack="rack-b"), dict(accelerator_model="maia-200"), dict(hbm_gib=32.0),
                                    dict(cpu_milli=1000), dict(memory_mib=1024)],
                         ids=["rack", "model", "hbm", "cpu", "memory"])
async def test_a_node_registering_as_another_machine_releases_every_shard_on_it(cluster, change):
    """A node re-registered in another rack (or with another model, less HBM, fewer CPUs or less
    memory) kept its shards: a tenant's shards stood in another tenant's dedicated rack, or shards
    needing 56 GiB on a 32 GiB node, or 3 CPUs on a 1-CPU node, until the node went (found by
    exploratory tests). Its shards are released and placed again, those that use no accelerator
    too (a gang of CPU shards stood split across two racks); the others' stay."""
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish)
    await submit(cluster, deployment("wide", replicas=4, accelerators=2, spread=None, shard_hbm_gib=48.0,
                                     shard_cpu_milli=3000, shard_memory_mib=4096))
    await submit(cluster, deployment("cpus", replicas=8, accelerators=0, spread=None, shard_cpu_milli=10))
    await loop.reconcile_once()
    before = await placements(cluster)
    node = "rack-a-n0"
    assert node in {n for n, _ in before.values()}
    assert any(n == node and not indices for n, indices in before.values())  # a shard of no accelerator there
    info = NodeInfo(node, "rack-a", 4, accelerator_model="maia-100", hbm_gib=64.0, idle_power_w=500.0)
    async with cluster.unit_of_work() as uow:  # its agent registers it again, as another machine
        await agents.register_node(uow, WHO, replace(info, **change), heartbeat_interval_ms=1000)
    after = await placements(cluster)
    assert after == {k: v for k, v in before.items() if v[0] != node}
    async with cluster.unit_of_work() as uow:
        [(about, message)] = (await uow.session.execute(select(m.Event.object_id, m.Event.message).where(
            m.Event.kind == "node.placements_released"))).all()
    assert about == node and "shard(s) it no longer fits are placed again" in message
    async with cluster.unit_of_work() as uow:  # the same machine again: nothing released
        await agents.register_node(uow, WHO, replace(info, **change), heartbeat_interval_ms=1000)
    assert await placements(cluster) == after


async def test_a_node_registering_with_fewer_cpus_keeps_its_shards_while_they_fit(cluster):
    """An agent registers again at every connect: one whose memory or CPUs read a little lower (a
    kernel's, a cgroup's figure) keeps its shards while what they ask fits what it has now; past
    that, all of them go (the test above)."""
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish)
    await submit(cluster, deployment("small", replicas=4, accelerators=1, spread=None, shard_cpu_milli=100,
                                     shard_memory_mib=64))
    await loop.reconcile_once()
    before = await placements(cluster)
    node = next(n for n, _ in before.values())
    held = sum(n == node for n, _ in before.values())
    info = NodeInfo(node, node.rsplit("-", 1)[0], 4, accelerator_model="maia-100", hbm_gib=64.0, idle_power_w=500.0)
    for cpu, memory in ((64_000, 512_000), (63_999, 511_999), (100 * held, 64 * held)):  # down, down, just fits
        async with cluster.unit_of_work() as uow:
            await agents.register_node(uow, WHO, replace(info, cpu_milli=cpu, memory_mib=memory),
                                       heartbeat_interval_ms=1000)
        assert await placements(cluster) == before, (cpu, memory)


async def test_a_second_agent_for_a_node_held_by_a_live_stream_is_refused(cluster):
    info = NodeInfo("rack-a-n0", "rack-a", 4, hbm_gib=64.0, idle_power_w=500.0)
    async with cluster.unit_of_work() as uow:  # its credential was reset: a bootstrap token may register it
        await uow.session.execute(m.ApiToken.__table__.update().values(revoked_at=m.utcnow()))
        await uow.commit()
    with pytest.raises(FailedPrecondition, match="held by a live agent stream"):
        async with cluster.unit_of_work() as uow:
            await agents.register_node(uow, NODE_AGENT, info, heartbeat_interval_ms=1000,
                                       held_by_live_agent=lambda node: True)
    async with cluster.unit_of_work() as uow:  # once the stream is gone it may
        await agents.register_node(uow, NODE_AGENT, info, heartbeat_interval_ms=1000,
                                   held_by_live_agent=lambda node: False)


async def test_a_pass_reads_only_the_nodes_a_rule_could_change(cluster):
    """Up and heard from within the heartbeat timeout: not read (at 16,384 nodes, reading every
    node every second was most of the controller's loop); the zone counts still count every node."""
    from controller.usecases import liveness
    now = datetime.now(timezone.utc)
    async with cluster.unit_of_work() as uow:
        rows = {n.id: n for n in (await uow.session.execute(select(m.Node))).scalars()}
        rows["rack-a-n0"].last_heartbeat_at = now - timedelta(seconds=60)  # up, silent: suspect soon
        rows["rack-a-n1"].last_heartbeat_at = now                            # up, heard from: nothing due
        rows["rack-b-n0"].health, rows["rack-b-n0"].last_heartbeat_at = m.NodeHealth.SUSPECT, now
        rows["rack-b-n1"].last_heartbeat_at = None                           # up, never heard from
        for i, (evicted, last) in enumerate([(None, None), (now, None), (now, now - timedelta(seconds=60)),
                                             (now, now)]):  # down: due eviction; registered, never connected;
            uow.session.add(m.Node(id=f"d{i}", rack_id="rack-a", accelerators=4,  # evicted, gone; evicted, back
                                   health=m.NodeHealth.DOWN, evicted_at=evicted, last_heartbeat_at=last))
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        read = await liveness.read_liveness(uow, {"rack-a-n1", "d3"}, silent_before=now - timedelta(seconds=10))
        assert sorted(n.node_id for n in read) == ["d0", "d3", "rack-a-n0", "rack-b-n0", "rack-b-n1"]
        named = await liveness.read_liveness(uow, set(), silent_before=now - timedelta(seconds=10), recent=["rack-a-n1"])
        assert "rack-a-n1" in {n.node_id for n in named}  # a node whose stream ended lately: read whatever it is
        assert len(await liveness.read_liveness(uow, set())) == 8
        assert await liveness.zone_health(uow) == ({"z1": 8}, {"z1": 5})


def _after_the_read(monkeypatch, meanwhile) -> None:
    """The lifecycle's read of the nodes is followed, before its write, by `meanwhile(node_id)` in
    a unit of work of its own (what the agent hub does on a stream's end or a Hello)."""
    from controller.usecases import liveness
    read = liveness.read_liveness

    async def read_then(uow, *args, **kwargs):
        nodes = await read(uow, *args, **kwargs)
        await meanwhile()
        return nodes
    monkeypatch.setattr(liveness, "read_liveness", read_then)


async def _events(db: Database, node_id: str, kind: str) -> int:
    async with db.unit_of_work() as uow:
        return len((await uow.session.execute(
            select(m.Event).where(m.Event.object_id == node_id, m.Event.kind == kind))).scalars().all())


async def test_a_node_the_hub_marked_suspect_after_the_lifecycle_read_it_gets_one_suspect_event(cluster, monkeypatch):
    clocks = Clocks()
    async with cluster.unit_of_work() as uow:  # every node up, last heard from now
        for node in (await uow.session.execute(select(m.Node))).scalars():
            node.health, node.last_heartbeat_at = m.NodeHealth.UP, clocks.wall
        await uow.commit()
    victim = "rack-a-n0"

    async def stream_ends() -> None:
        async with cluster.unit_of_work() as uow:
            assert await agents.mark_suspect(uow, victim, session_id=None, why="stream ended")
    _after_the_read(monkeypatch, stream_ends)
    cycle = lifecycle(cluster, clocks, {"rack-a-n1", "rack-b-n0", "rack-b-n1"})
    clocks.advance(45)  # past the stored contact's staleness: read, judged silent; the hub's mark lands before the write
    assert await cycle.pass_once() == []  # nothing written by the lifecycle: none reported (nor logged)
    assert (await health(cluster))[victim] == ("suspect", False)
    assert await _events(cluster, victim, "node.suspect") == 1


async def test_a_node_back_between_the_lifecycle_read_and_its_write_is_not_evicted(cluster, monkeypatch):
    clocks = Clocks()
    loop, before, victim, cycle = await placed_and_lost(cluster, clocks)
    clocks.advance(35)
    assert [(c.node_id, c.health) for c in await cycle.pass_once()] == [(victim, "down")]

    async def hello() -> None:  # its agent is back: up again (the hub's Hello)
        async with cluster.unit_of_work() as uow:
            node = await uow.session.get(m.Node, victim)
            node.health, node.last_heartbeat_at = m.NodeHealth.UP, clocks.wall
            await uow.commit()
    _after_the_read(monkeypatch, hello)
    clocks.advance(60)  # 95 s silent in the read: due for eviction
    assert [c for c in await cycle.pass_once() if c.evict] == []  # the eviction was not written: not reported
    assert (await health(cluster))[victim] == ("up", False)
    assert await _events(cluster, victim, "node.evicted") == 0
    await loop.reconcile_once(force=True)
    assert await placements(cluster) == before


async def _all_up_and_heard(db: Database, at: datetime) -> None:
    async with db.unit_of_work() as uow:
        for node in (await uow.session.execute(select(m.Node))).scalars():
            node.health, node.last_heartbeat_at = m.NodeHealth.UP, at
        await uow.commit()


async def _reads(cycle: NodeLifecycle, db: Database) -> tuple[list, bool]:
    """One pass: its transitions, and whether it read the database."""
    with statements(db) as seen:
        changes = await cycle.pass_once()
    return changes, bool(seen)


async def test_an_idle_pass_reads_nothing_until_a_stream_opens_or_ends(cluster):
    """Every node connected and up: after a read that found no node a rule could change, passes
    read nothing while no stream opens or ends; a stream's end makes the next pass read, and its
    node still goes suspect, down and evicted on time."""
    clocks = Clocks()
    await _all_up_and_heard(cluster, clocks.wall)
    connected = {"rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"}
    heard: dict[str, datetime] = {}
    streams = [4]
    cycle = NodeLifecycle(cluster, POLICY, connected=lambda: connected, damper=FlapDamper(), on_change=lambda: None,
                          released=lambda: heard, streams=lambda: streams[0], clock=lambda: clocks.mono,
                          wall_clock=lambda: clocks.wall)
    assert await _reads(cycle, cluster) == ([], True)
    for _ in range(int(POLICY.heartbeat_timeout_s) - 2):
        clocks.advance(1)
        assert await _reads(cycle, cluster) == ([], False)
    connected.discard("rack-a-n0")  # its stream ends (the hub releases it and marks it suspect)
    heard["rack-a-n0"] = clocks.wall
    streams[0] += 1
    await lose(cluster, "rack-a-n0", clocks.wall)
    clocks.advance(1)
    assert await _reads(cycle, cluster) == ([], True)
    seen: dict[str, float] = {}
    for second in range(2, int(POLICY.eviction_grace_s) + 2):
        clocks.advance(1)
        changes, read = await _reads(cycle, cluster)
        assert read  # a node a rule could change: every pass reads
        for c in changes:
            seen.setdefault("evicted" if c.evict else c.health, second)
    assert seen == {"down": POLICY.down_grace_s + 1, "evicted": POLICY.eviction_grace_s + 1}


async def test_a_quiet_lifecycle_still_reads_within_a_heartbeat_timeout(cluster):
    """What no stream signals (here a node up that no stream holds, its stored time going stale)
    is still read, at most a heartbeat timeout after a pass reading every second would have."""
    clocks = Clocks()
    await _all_up_and_heard(cluster, clocks.wall)
    connected = {"rack-a-n1", "rack-b-n0", "rack-b-n1"}  # rack-a-n0: up, held by no stream here
    cycle = NodeLifecycle(cluster, POLICY, connected=lambda: connected, damper=FlapDamper(), on_change=lambda: None,
                          streams=lambda: 3, clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall)
    reads, suspected = 0, None
    for second in range(1, 80):
        clocks.advance(1)
        changes, read = await _reads(cycle, cluster)
        reads += read
        if changes:
            assert [(c.node_id, c.health) for c in changes] == [("rack-a-n0", "suspect")]
            suspected = second
            break
    stale = int(POLICY.stored_contact_stale_s) + 1  # when a read every second finds it
    assert suspected is not None and stale <= suspected <= stale + POLICY.heartbeat_timeout_s
    assert reads <= suspected / POLICY.heartbeat_timeout_s + 1  # one pass in a timeout read, until then


async def test_becoming_the_leader_ends_a_quiet_lifecycle(cluster):
    clocks = Clocks()
    await _all_up_and_heard(cluster, clocks.wall)
    connected = {"rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"}
    cycle = NodeLifecycle(cluster, POLICY, connected=lambda: connected, damper=FlapDamper(), on_change=lambda: None,
                          streams=lambda: 4, clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall)
    assert await _reads(cycle, cluster) == ([], True)
    clocks.advance(1)
    assert await _reads(cycle, cluster) == ([], False)
    cycle.lead()
    clocks.advance(1)
    assert await _reads(cycle, cluster) == ([], True)


async def test_a_suspect_node_whose_stream_ends_between_the_lifecycle_read_and_its_write_is_not_marked_up(
        cluster, monkeypatch):
    """Connected and suspect (its flap damping over): the lifecycle marks it up. Its stream ends
    after the read: the hub's own mark finds it suspect already and writes nothing, so the health
    the lifecycle's compare-and-set checks is unchanged; it stays suspect, not up (and given new
    shards) while disconnected."""
    clocks = Clocks()
    victim = "rack-a-n0"
    async with cluster.unit_of_work() as uow:
        for node in (await uow.session.execute(select(m.Node))).scalars():
            node.health, node.last_heartbeat_at = m.NodeHealth.UP, clocks.wall
        (await uow.session.get(m.Node, victim)).health = m.NodeHealth.SUSPECT
        await uow.commit()
    connected = {"rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"}

    async def stream_ends() -> None:
        connected.discard(victim)
        async with cluster.unit_of_work() as uow:
            assert not await agents.mark_suspect(uow, victim, session_id=None, why="stream ended")
    _after_the_read(monkeypatch, stream_ends)
    cycle = lifecycle(cluster, clocks, connected)
    ups = await _events(cluster, victim, "node.up")
    assert await cycle.pass_once() == []
    assert (await health(cluster))[victim] == ("suspect", False)
    assert await _events(cluster, victim, "node.up") == ups


async def test_a_suspect_node_back_damped_between_the_lifecycle_read_and_its_write_is_not_marked_down(
        cluster, monkeypatch):
    """Suspect and silent past the down grace in the read; its agent says Hello before the write,
    damped (it flaps): the hub keeps it suspect, so the health the compare-and-set checks is
    unchanged. It stays suspect, not down while connected."""
    clocks = Clocks()
    victim = "rack-a-n0"
    async with cluster.unit_of_work() as uow:
        for node in (await uow.session.execute(select(m.Node))).scalars():
            node.health, node.last_heartbeat_at = m.NodeHealth.UP, clocks.wall
        await uow.commit()
    connected = {"rack-a-n1", "rack-b-n0", "rack-b-n1"}
    cycle = lifecycle(cluster, clocks, connected)
    await lose(cluster, victim, clocks.wall)
    clocks.advance(35)  # past the down grace

    async def back_damped() -> None:  # what a damped Hello writes: the contact, the health kept suspect
        connected.add(victim)
        async with cluster.unit_of_work() as uow:
            node = await uow.session.get(m.Node, victim)
            node.health, node.last_heartbeat_at = m.NodeHealth.SUSPECT, clocks.wall
            await uow.commit()
    _after_the_read(monkeypatch, back_damped)
    assert await cycle.pass_once() == []
    assert (await health(cluster))[victim] == ("suspect", False)


async def test_a_node_whose_hello_is_being_written_is_left_to_it_when_the_restart_grace_ends(cluster, monkeypatch):
    """A new leader's restart grace ends while one node's Hello waits for the writer (a join storm's
    batches queue for it; a batch that failed is written again, each hello alone). Its stored
    contact is the old leader's, older than this leader's start, and no stream holds it yet: judged
    silent since that start, it would be marked suspect, then down, then its work evicted, a pass
    each, before its Hello lands. Its Hello writes its health: the lifecycle leaves it alone. The
    nodes that never came over are suspect, then down."""
    clocks = Clocks()
    await _all_up_and_heard(cluster, clocks.wall - timedelta(seconds=5))  # the old leader's last writes
    hub = AgentHub(cluster, heartbeat_timeout_s=POLICY.heartbeat_timeout_s, on_liveness_change=lambda: None,
                   on_deployments_changed=lambda views: asyncio.sleep(0))
    cycle = NodeLifecycle(cluster, replace(POLICY, restart_grace_s=120), connected=hub.connected,
                          greeting=hub.greeting, released=hub.released, damper=FlapDamper(), on_change=lambda: None,
                          clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall)
    cycle.lead()
    comer = "rack-a-n0"
    async with cluster.unit_of_work() as uow:
        session_id = (await uow.session.get(m.Node, comer)).session_id
    written = asyncio.Event()
    write_hello = hub._hello

    async def held_back(hello):  # noqa: ANN001, ANN202
        await written.wait()
        return await write_hello(hello)
    monkeypatch.setattr(hub, "_hello", held_back)
    stream = hub.converse(WHO, comer, session_id, quiet_agent())
    opening = asyncio.create_task(anext(stream))
    await asyncio.sleep(0)  # its Hello is under way
    clocks.advance(121)
    for _ in range(3):  # suspect, down, evicted: one pass each
        await cycle.pass_once()
        clocks.advance(1)
    states = await health(cluster)
    assert states.pop(comer) == ("up", False)
    assert {state for state, _ in states.values()} == {"down"}
    # Held back all along (else a stream, not the Hello under way, kept it up).
    assert comer in hub.greeting() and comer not in hub.connected()
    written.set()
    await opening
    assert comer in hub.connected()
    await stream.aclose()


async def _revisions(db: Database, name: str) -> dict[tuple[int, int], tuple[str, int]]:
    """(replica, shard) -> (node, revision) of one deployment's placements."""
    async with db.unit_of_work() as uow:
        rows = await uow.session.execute(select(m.Placement.replica, m.Placement.shard, m.Placement.node_id,
                                                m.Placement.revision).join(m.Deployment)
                                         .where(m.Deployment.name == name))
        return {(replica, shard): (node, revision) for replica, shard, node, revision in rows}


async def test_a_stalled_rollout_places_its_old_replica_again_when_the_node_under_it_is_evicted(cluster):
    """A rollout whose new revision cannot be placed keeps its old replica running; when that
    replica's node went down and its work was evicted, the replica was dropped (an outgoing
    replica was never placed again) and the deployment was left with none at all. Like a
    Kubernetes Deployment's old ReplicaSet recreating its pod, it is placed again at its own
    revision, and kept while it starts (a replica that does not run is otherwise stopped at once)."""
    clocks = Clocks()
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish)
    every = ["rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"]
    victim, spare, *others = every
    signals = RecordingSignals()
    async with cluster.unit_of_work() as uow:  # only the victim takes work: svc (1 of its 4) goes there
        for node in (spare, *others):
            await nodes.cordon_node(uow, WHO, node, signals, None, {})
    await submit(cluster, deployment("svc", replicas=1, accelerators=1, spread=None, shard_power_w=300.0))
    await loop.reconcile_once()
    async with cluster.unit_of_work() as uow:  # then the spare alone: 3 of its 4 taken
        await nodes.cordon_node(uow, WHO, victim, signals, None, {})
        await nodes.uncordon_node(uow, WHO, spare, signals, None, {})
    await submit(cluster, deployment("filler", replicas=1, accelerators=3, spread=None))
    await loop.reconcile_once()
    await run_all(cluster)
    assert await _revisions(cluster, "svc") == {(0, 0): (victim, 1)}
    assert {node for node, _ in (await _revisions(cluster, "filler")).values()} == {spare}
    async with cluster.unit_of_work() as uow:  # a whole node a shard: nowhere has 4 free
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, deployment("svc", replicas=1, accelerators=4, spread=None,
                                                             shard_power_w=500.0),
                                        row.resource_version, signals)
    await loop.reconcile_once(force=True)
    assert await _revisions(cluster, "svc") == {(0, 0): (victim, 1)}  # stalled: the old one runs on
    await lose(cluster, victim, clocks.wall)
    cycle = lifecycle(cluster, clocks, {spare, *others})
    clocks.advance(60)
    await cycle.pass_once()
    await loop.reconcile_once()  # down, not evicted yet: left where it is
    clocks.advance(60)
    assert [(c.node_id, c.evict) for c in await cycle.pass_once()] == [(victim, True)]
    for _ in range(3):
        await loop.reconcile_once()
        assert await _revisions(cluster, "svc") == {(0, 0): (spare, 1)}  # placed again, at revision 1
        async with cluster.unit_of_work() as uow:  # still saying why the new revision waits
            row = await repo.get_deployment(uow.session, "t1", "svc")
            assert [reason["code"] for reason in row.reasons] == ["NODE_STATE", "CAPACITY"]
    async with cluster.unit_of_work() as uow:  # metered at what it holds (1) and draws (its revision's
        # 300 W), not the new spec's 4 accelerators at 500 W
        assert (await uow.session.execute(
            select(m.UsageInterval.node_id, m.UsageInterval.accelerator_milli, m.UsageInterval.load_power_w).where(
                m.UsageInterval.deployment == "svc", m.UsageInterval.ended_s.is_(None)))
                ).all() == [(spare, 1000, 300.0)]
    # Room frees: the rollout goes on, and the old replica goes once its replacement runs. It
    # stayed for good: with the old replica on the down node, the pass judged nothing outgoing
    # and stopped looking until an unrelated change (found by exploratory testing).
    await run_all(cluster)
    async with cluster.unit_of_work() as uow:
        await nodes.uncordon_node(uow, WHO, others[0], signals, None, {})
    await loop.reconcile_once()
    await run_all(cluster)
    for _ in range(2):
        await loop.reconcile_once()
    assert list((await _revisions(cluster, "svc")).values()) == [(others[0], 2)]


async def test_an_old_replica_stuck_starting_since_before_the_rollout_still_makes_room_for_its_replacement(cluster):
    """The other side of keeping an old replica that starts again (above): one that never ran
    (placed, never reported running) and holds the only room its replacement could take goes at
    once, as before, or the fix pushed for it could never be placed (found by review)."""
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish)
    only, *others = ["rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"]
    signals = RecordingSignals()
    async with cluster.unit_of_work() as uow:
        for node in others:
            await nodes.cordon_node(uow, WHO, node, signals, None, {})
    await submit(cluster, deployment("svc", replicas=1, accelerators=4, spread=None))
    await loop.reconcile_once()
    assert await _revisions(cluster, "svc") == {(0, 0): (only, 1)}  # assigned, never running
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, deployment("svc", replicas=1, accelerators=3, spread=None),
                                        row.resource_version, signals)
    for _ in range(3):
        await loop.reconcile_once(force=True)
    assert [(node, revision) for node, revision in (await _revisions(cluster, "svc")).values()] == [(only, 2)]


async def test_a_hello_that_races_an_eviction_clears_it(cluster: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lifecycle's eviction commits after a Hello read the node row and before it writes: the
    Hello's flush wrote only the columns it changed as read, not `evicted_at` (read NULL, set
    None), and the node was up and evicted at once: its next outage counted as evicted already
    (its work moved at the down grace) and the lifecycle never evicted it again (found in review)."""
    node = "rack-a-n0"
    now = datetime.now(timezone.utc)
    async with cluster.unit_of_work() as uow:
        await liveness.apply_transitions(uow, [Transition(node, "down", "silent")], now)
    read_rows = repo.node_rows_by_id
    evicted: list[bool] = []

    async def read_then_evicted(session, ids):  # type: ignore[no-untyped-def]
        rows = await read_rows(session, ids)
        if not evicted:  # the lifecycle's write, on a connection of its own
            async with cluster.unit_of_work() as other:
                written = await liveness.apply_transitions(
                    other, [Transition(node, "down", "silent past the eviction grace", evict=True, was="down")], now)
            evicted.append(bool(written) and written[0].evict)
        return rows

    monkeypatch.setattr(agents.repo, "node_rows_by_id", read_then_evicted)
    async with cluster.unit_of_work() as uow:
        session_id = (await uow.session.get(m.Node, node)).session_id
    async with cluster.unit_of_work() as uow:
        await agents.hello(uow, WHO, node, session_id, now)
    assert evicted == [True]
    async with cluster.unit_of_work() as uow:
        row = await uow.session.get(m.Node, node)
        assert (row.health, row.evicted_at) == (m.NodeHealth.UP, None)
