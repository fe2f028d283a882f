"""Others' changes reach the warm cache as deltas (controller/scheduling/cache/, warm.py):
after random sequences of node joins, hellos, cordons, uncordons, suspects, node deletions,
evictions of nodes (holding shards or not), nodes holding shards deleted or resized, contract changes, deployment deletions and arrivals,
arrivals placed by another controller, shards reported FAILED (their replicas released and placed again off the node), and a whole-cluster pass whose commit one of them makes stale, the warm cache is exactly what a
fresh `load_snapshot` reads, the committed state passes the independent checker, and what is committed is what
forced whole-cluster passes commit (best-fit scoring, so that the session and `solve()`
choose alike); a join of many nodes keeps the reconciler off the whole-cluster path."""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from bench.checking import check_state
from controller.reconcile import Reconciler
from controller.scheduling.cache import ClusterCache
from controller.scheduling.decider import DecideProcess
from controller.store.db import Database
from controller.store.models import Event
from controller.store import repositories as repo
from controller.store.plans import commit_plan
from controller.usecases import agents, deployments, liveness, nodes, tenants, updates
from controller.domain.liveness import Transition
from controller.usecases.ports import RecordingSignals
from controller.domain.restarts import RestartPolicy
from controller.domain.values import DeploymentSpec, NodeInfo, ShardReport, TenantSpec
from test_reconcile_fast import (  # noqa: F401  (four_racks_files: the fixture)
    FourRacksFiles, _arrivals, _committed, _four_racks, assert_same, fresh, four_racks_files, reconciler,
)
from uc_builders import WHO, add_nodes, apply_topology, deployment, no_publish, run_all, submit

RACKS = ("rack-a", "rack-b", "rack-c", "rack-d")
# The events the cache follows as deltas.
FOLLOWED = ("join", "hello", "cordon", "uncordon", "suspect", "evict", "contract", "delete_deployment", "fail",
            "drain", "update", "scale_down", "other_controller", "delete_node", "resize")


class Events:
    """Random changes by others (and arrivals), the same sequence for a seed."""

    def __init__(self, db: Database, seed: int) -> None:
        self.db = db
        self.rng = random.Random(seed)
        self.batches = iter(_arrivals(seed, 200))
        self.nodes = [f"{rack}-n{i}" for rack in RACKS for i in range(4)]
        self.registered: dict[str, str] = {}  # node -> session id, registered and not yet up
        self.deployments: list[str] = []
        self.joined = 0
        # One node holding shards has its work evicted, at a step of its own (its own random
        # numbers: the other events are the same with it or without it).
        self.evict_rng = random.Random(seed)
        self.evict_at = self.evict_rng.randrange(5, 25)
        # Contract and topology changes too, at steps of their own: a tenant without work
        # created, changed (excluding t1) and deleted (t1's exclusion of it goes with it), t1's
        # quota raised or lifted; rack power budgets set (ample) or lifted, an empty rack added.
        self.contract_rng = random.Random(seed + 1000)
        self.contract_at = set(self.contract_rng.sample(range(2, 40), 4)) - {self.evict_at}
        # A placed shard reported FAILED, at steps of their own: released by the next pass (no
        # back-off: `failing_reconciler`) and placed again off the node it failed on.
        self.fail_rng = random.Random(seed + 3000)
        self.fail_at = set(self.fail_rng.sample(range(3, 40), 3)) - {self.evict_at} - self.contract_at
        # A node holding shards drained, a deployment scaled up or down or given a new shape (a
        # rolling update), at steps of their own.
        self.roll_rng = random.Random(seed + 4000)
        self.roll_at = set(self.roll_rng.sample(range(4, 40), 5)) - {self.evict_at} - self.contract_at - self.fail_at
        # Arrivals placed by another controller on the same database (its whole-cluster pass), at
        # steps of their own: its plan commits name what they touched.
        self.other_rng = random.Random(seed + 5000)
        self.other_at = set(self.other_rng.sample(
            sorted(set(range(3, 40)) - {self.evict_at} - self.contract_at - self.fail_at - self.roll_at), 3))
        self.other = reconciler(db)
        # A node holding shards registering again with fewer accelerators, at steps of their own.
        self.resize_rng = random.Random(seed + 6000)
        self.resize_at = set(self.resize_rng.sample(sorted(
            set(range(3, 40)) - {self.evict_at} - self.contract_at - self.fail_at - self.roll_at - self.other_at), 2))
        self.specs: dict[str, DeploymentSpec] = {}
        self.steps = 0

    async def contract(self) -> str:
        rng = self.contract_rng
        async with self.db.unit_of_work() as uow:
            other = await repo.get_tenant(uow.session, "t2")
        async with self.db.unit_of_work() as uow:
            change = rng.choice(("t1", "t2", "topology"))
            if change == "topology":
                racks = {rack: "row-a" if rack in ("rack-a", "rack-b") else "row-b" for rack in RACKS}
                if rng.random() < 0.5:
                    racks["rack-e"] = "row-b"
                await apply_topology(self.db, racks, rack_budget_w=rng.choice((None, 100_000.0)))
            elif change == "t1":
                await tenants.update_tenant(uow, WHO, TenantSpec(
                    id="t1", excludes=("t2",) if other is not None else (),
                    max_accelerators=rng.choice((None, 1000.0))), RecordingSignals())
            elif other is None:
                await tenants.create_tenant(uow, WHO, TenantSpec(id="t2", isolation="dedicated_node"), RecordingSignals())
            elif rng.random() < 0.5:
                await tenants.update_tenant(uow, WHO, TenantSpec(id="t2", excludes=("t1",)), RecordingSignals())
            else:
                await tenants.delete_tenant(uow, WHO, "t2", RecordingSignals())
        return "contract"

    async def evict(self) -> str:
        """A node holding shards is down for good: its work is evicted (placed again elsewhere)."""
        holding = sorted({p["node"] for p in (await fresh(self.db)).problem["placements"]})
        if not holding:
            return "evict"
        async with self.db.unit_of_work() as uow:
            await liveness.apply_transitions(uow, [Transition(self.evict_rng.choice(holding), "down", "silent",
                                                              evict=True)], datetime.now(timezone.utc))
        return "evict"

    async def fail(self) -> str:
        """An agent reports a placed shard FAILED."""
        placements = (await fresh(self.db)).problem["placements"]
        if placements:
            p = self.fail_rng.choice(placements)
            tenant, name = p["deployment"].split("/")
            async with self.db.unit_of_work() as uow:
                await agents.flush_reports(uow, {}, [(p["node"], ShardReport(
                    name, p["replica"], p["shard"], 10**9, "failed", "crashed", tenant=tenant))])
        return "fail"

    async def roll(self) -> str:
        """A drain of a node holding shards, or an update of a deployment (scale up or down, new shape)."""
        rng = self.roll_rng
        holding = sorted({p["node"] for p in (await fresh(self.db)).problem["placements"]})
        if rng.random() < 0.4 and holding:
            async with self.db.unit_of_work() as uow:
                await nodes.drain_node(uow, WHO, rng.choice(holding), RecordingSignals(), set(), {})
            return "drain"
        if not self.deployments:
            return "update"
        name = rng.choice(self.deployments)
        spec = self.specs[name]
        kind = "update"
        if rng.random() < 0.5:
            spec = dataclasses.replace(spec, replicas=spec.replicas + 1)
        elif rng.random() < 0.5 and spec.replicas > 1:
            spec, kind = dataclasses.replace(spec, replicas=spec.replicas - 1), "scale_down"
        else:
            spec = dataclasses.replace(spec, shard=dataclasses.replace(spec.shard, hbm_gib=rng.choice((8.0, 16.0))))
        self.specs[name] = spec
        async with self.db.unit_of_work() as uow:
            row = await repo.get_deployment(uow.session, "t1", name)
            await updates.update_deployment(uow, WHO, spec, row.resource_version, RecordingSignals())
        return kind

    async def other_controller(self) -> str:
        """Arrivals another controller places (its pass reads the whole cluster and commits)."""
        await self.submit()
        await self.other.reconcile_once(force=True)
        return "other_controller"

    async def resize(self) -> str:
        """A node holding shards registers again with 2 accelerators (of 4): the shards on the
        others are released, what is left of their replicas completed elsewhere."""
        snapshot = await fresh(self.db)
        holding = sorted({p["node"] for p in snapshot.problem["placements"]})
        if holding:
            node = self.resize_rng.choice(holding)
            rack = next(n["rack"] for n in snapshot.problem["nodes"] if n["id"] == node)
            async with self.db.unit_of_work() as uow:
                reg = await agents.register_node(uow, WHO, NodeInfo(
                    node_id=node, rack=rack, accelerators=2, accelerator_model="maia-100", hbm_gib=64.0,
                    idle_power_w=500.0), heartbeat_interval_ms=1000)
            async with self.db.unit_of_work() as uow:
                await agents.hello(uow, WHO, node, reg.session_id, datetime.now(timezone.utc))
            self.registered.pop(node, None)
        return "resize"

    async def submit(self) -> None:
        for spec in next(self.batches):
            await submit(self.db, spec)
            self.deployments.append(spec.name)
            self.specs[spec.name] = spec

    async def one(self) -> str:
        self.steps += 1
        if self.steps in self.other_at:
            return await self.other_controller()
        if self.steps in self.resize_at:
            return await self.resize()
        if self.steps in self.roll_at:
            return await self.roll()
        if self.steps == self.evict_at:
            return await self.evict()
        if self.steps in self.fail_at:
            return await self.fail()
        if self.steps in self.contract_at:
            return await self.contract()
        rng = self.rng
        kind = rng.choice(("arrivals", "arrivals", "join", "join", "hello", "cordon", "uncordon", "suspect",
                           "delete_node", "delete_deployment"))
        async with self.db.unit_of_work() as uow:
            if kind == "join":
                node_id = f"late-{self.joined:02d}"
                self.joined += 1
                info = NodeInfo(node_id=node_id, rack=rng.choice(RACKS), accelerators=4, accelerator_model="maia-100",
                                hbm_gib=64.0, idle_power_w=500.0)
                reg = await agents.register_node(uow, WHO, info, heartbeat_interval_ms=1000)
                self.registered[node_id] = reg.session_id
                self.nodes.append(node_id)
            elif kind == "hello" and self.registered:
                node_id = rng.choice(sorted(self.registered))
                await agents.hello(uow, WHO, node_id, self.registered.pop(node_id), datetime.now(timezone.utc))
            elif kind in ("cordon", "uncordon") and self.nodes:
                use_case = nodes.cordon_node if kind == "cordon" else nodes.uncordon_node
                await use_case(uow, WHO, rng.choice(self.nodes), RecordingSignals(), set(), {})
            elif kind == "suspect" and self.nodes:
                await agents.mark_suspect(uow, rng.choice(self.nodes), session_id=None, why="its stream ended")
            elif kind == "delete_node" and self.nodes and rng.random() < 0.5:
                node_id = self.nodes.pop(rng.randrange(len(self.nodes)))
                self.registered.pop(node_id, None)
                await nodes.delete_node(uow, WHO, node_id, RecordingSignals())
            elif kind == "delete_deployment" and self.deployments:
                name = self.deployments.pop(rng.randrange(len(self.deployments)))
                await deployments.delete_deployment(uow, WHO, name, RecordingSignals(), tenant="t1")
            else:
                kind = "arrivals"
        if kind == "arrivals":
            await self.submit()
        return kind


def failing_reconciler(db: Database, decider: DecideProcess | None = None) -> Reconciler:
    """`reconciler` whose failed replicas are released at once (no back-off)."""
    return Reconciler(db, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000, backoff_s=0.0,
                      restart_policy=RestartPolicy(initial_delay_s=0.0), decider=decider)


def _change_while_committing(monkeypatch: pytest.MonkeyPatch, events: Events) -> list[str]:
    """The next plan commit first lets one more random change land (a stale commit); the change's kind."""
    import controller.reconcile.full_path as reconcile_module

    landed: list[str] = []

    async def commit_after_a_change(*args, **kw):
        if not landed:
            landed.append(await events.one())
        return await commit_plan(*args, **kw)

    monkeypatch.setattr(reconcile_module, "commit_plan", commit_after_a_change)
    return landed


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_deltas_commit_what_full_passes_commit(seed, decider, four_racks_files: FourRacksFiles,
                                                    tmp_path: Path, monkeypatch):
    # Room enough that everything is placed: a full solve that leaves work unplaced solves the
    # whole batch again (greedy, then CP-SAT), which may choose other nodes than online decisions.
    monkeypatch.setenv("MAIA_SCORER", "bestfit")  # the session and solve() then choose alike
    states = []
    for mode in ("deltas", "full"):
        # 3 more nodes a rack: room for everything after an eviction too.
        db = await four_racks_files.copy(tmp_path / f"{mode}.db", more_per_rack=3)
        try:
            loop = failing_reconciler(db, decider)
            events = Events(db, seed)
            followed: set[str] = set()
            stale_at = random.Random(seed + 2000).randrange(10, 35)
            for step in range(40):
                warm = loop.warm_snapshot is not None
                kind = await events.one()
                full = loop.full_passes
                if step == stale_at:  # a new leader's whole-cluster pass, a change by others lands as it commits
                    loop.resync()
                    landed = _change_while_committing(monkeypatch, events)
                await loop.reconcile_once(force=mode == "full")
                if step == stale_at:  # the patched commit ran (patched where the pass calls it)
                    assert landed, "no change landed as the pass committed"
                if mode == "deltas" and warm and kind in FOLLOWED and step != stale_at:  # e.g. an eviction's shards re-placed
                    assert loop.full_passes == full, kind             # on the session
                    followed.add(kind)
                if mode == "deltas" and step == stale_at and landed and landed[0] in FOLLOWED:
                    assert loop.full_passes == full + 1, landed  # caught up by deltas, not read again
                # (Arrivals landing as a commit does are read by the next pass: the cache lacks them till then.)
                if mode == "deltas" and loop.warm_snapshot is not None and not (step == stale_at and landed == ["arrivals"]):
                    assert_same(loop.warm_snapshot, await fresh(db))
                    cache = loop._warm.cache  # its newest key, followed as deployments arrive and depart
                    assert cache is not None and cache.highest_id() == max(cache.snapshot.deployment_ids.values(), default=0)
                    # Known to hold nothing short of replicas (`pending_docs` asks nothing) only when so.
                    assert not cache._none_pending or cache.session.pending() == []
            if mode == "deltas":  # the sequence went through the deltas, not only through full passes
                assert loop.delta_passes + loop.fast_passes > loop.full_passes / 2
                assert {"other_controller", "resize"} <= followed, sorted(followed)
            snapshot = await fresh(db)
            assert not check_state(snapshot.problem, snapshot.problem["placements"])
            states.append(await _committed(db))
        finally:
            await db.dispose()
    (delta_placed, delta_phases), (full_placed, full_phases) = states
    assert delta_phases == full_phases and set(delta_phases.values()) == {"scheduled"}
    assert delta_placed == full_placed


async def test_deltas_follow_on_postgres_too(database: Database, decide_process, monkeypatch) -> None:
    # The same kind of sequence on each backend (`database`: SQLite and PostgreSQL): the cache
    # stays what a fresh read gives, the committed state is valid. The session in the decide process.
    monkeypatch.setenv("MAIA_SCORER", "bestfit")
    await _four_racks(database)
    loop = failing_reconciler(database, decide_process)
    events = Events(database, 7)
    for _ in range(30):
        await events.one()
        await loop.reconcile_once()
        if loop.warm_snapshot is not None:
            assert_same(loop.warm_snapshot, await fresh(database))
    assert loop.delta_passes + loop.fast_passes > 0
    snapshot = await fresh(database)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


async def test_a_join_of_many_nodes_stays_off_the_full_path(database: Database) -> None:
    await _four_racks(database)
    loop = reconciler(database)
    await submit(database, deployment("first", accelerators=4, locality="node"))
    await loop.reconcile_once()
    loop._warm.drop()  # a new leader without a cache: a full pass from a fresh read that writes
    loop.resync()      # nothing leaves a cache too
    await loop.reconcile_once()
    assert_same(loop.warm_snapshot, await fresh(database))
    full = loop.full_passes
    for i in range(8):  # registers and hellos, a pass after each round (each moves the generation)
        for rack in RACKS:
            await add_nodes(database, rack, 2, prefix=f"{rack}-join{i}")
        assert not (await loop.reconcile_once()).solved  # nothing to decide
    assert loop.full_passes == full and loop.delta_passes == 8  # every pass followed the joins as deltas
    assert_same(loop.warm_snapshot, await fresh(database))

    # The cluster full (80 nodes), one more deployment cannot be placed: after its back-off's
    # full solve it is unschedulable.
    await submit(database, deployment("fill", replicas=79, accelerators=4, locality="node"))
    await loop.reconcile_once()
    await submit(database, deployment("late", accelerators=4, locality="node"))
    await loop.reconcile_once()
    await loop.reconcile_once()
    assert loop.full_passes == full + 1 and loop._state.queue.depths().unschedulable == 1
    # A node registers: not ready yet, it cannot help.
    async with database.unit_of_work() as uow:
        reg = await agents.register_node(uow, WHO, NodeInfo(node_id="new", rack="rack-c", accelerators=4,
                                                            accelerator_model="maia-100", hbm_gib=64.0,
                                                            idle_power_w=500.0), heartbeat_interval_ms=1000)
    assert not (await loop.reconcile_once()).solved
    # Its hello makes it ready: the unschedulable deployment is decided again at once, on the session.
    async with database.unit_of_work() as uow:
        await agents.hello(uow, WHO, "new", reg.session_id, datetime.now(timezone.utc))
    assert (await loop.reconcile_once()).solved
    assert loop.full_passes == full + 1 and loop._state.queue.depths().unschedulable == 0
    snapshot = await fresh(database)
    assert {p["node"] for p in snapshot.problem["placements"] if p["deployment"] == "t1/late"} == {"new"}
    assert_same(loop.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


async def test_a_deletion_is_a_departure(cluster) -> None:
    # 16 accelerators (`cluster`): two deployments of 8 fill them, a third waits.
    published: list[str] = []

    async def publish(changed: set[str], deleted: list) -> None:
        published.extend(v.spec.key for v in deleted)

    loop = Reconciler(cluster, push=lambda nodes: None, publish=publish, solve_time_limit_ms=60_000, backoff_s=0.0)
    for name in ("one", "two"):
        await submit(cluster, deployment(name, replicas=2, accelerators=4, locality="node"))
    await loop.reconcile_once()
    await submit(cluster, deployment("waits", accelerators=4, locality="node"))
    await loop.reconcile_once()
    await loop.reconcile_once()  # its back-off's full solve: unschedulable
    full = loop.full_passes
    async with cluster.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "one", RecordingSignals(), tenant="t1")
    outcome = await loop.reconcile_once()
    assert outcome.solved and outcome.deleted == ("t1/one",) and published == ["t1/one"]
    assert loop.full_passes == full  # released in a scoped commit, on the warm cluster
    snapshot = await fresh(cluster)
    assert "t1/one" not in snapshot.deployment_ids
    assert {p["deployment"] for p in snapshot.problem["placements"]} == {"t1/two", "t1/waits"}  # placed at once
    assert_same(loop.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


async def test_an_eviction_of_a_node_holding_shards_is_a_delta(cluster) -> None:
    # 16 accelerators (`cluster`: two racks of two nodes): a rack-local gang of 2 and a single.
    loop = reconciler(cluster)
    await submit(cluster, deployment("gang", shards=2, accelerators=2, locality="rack"))
    await submit(cluster, deployment("one", accelerators=3, locality="node"))
    await loop.reconcile_once()
    before = await fresh(cluster)
    node = next(p["node"] for p in before.problem["placements"] if p["deployment"] == "t1/gang")
    full, fast = loop.full_passes, loop.fast_passes
    async with cluster.unit_of_work() as uow:
        await liveness.apply_transitions(uow, [Transition(node, "down", "silent", evict=True)], datetime.now(timezone.utc))
    outcome = await loop.reconcile_once()
    assert outcome.solved and node in outcome.changed_nodes
    assert (loop.full_passes, loop.fast_passes) == (full, fast + 1)  # re-placed on the session, a scoped commit
    snapshot = await fresh(cluster)
    assert node not in {p["node"] for p in snapshot.problem["placements"]}
    assert len(snapshot.problem["placements"]) == len(before.problem["placements"])  # all placed again
    assert_same(loop.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])
    await submit(cluster, deployment("after", accelerators=1, locality="node"))  # the cache goes on from there
    assert (await loop.reconcile_once()).solved and loop.full_passes == full
    assert_same(loop.warm_snapshot, await fresh(cluster))


async def test_a_replica_an_eviction_left_short_may_preempt_lower_priority_work(cluster) -> None:
    """The session re-places an evicted node's shards without preempting (`Session._repair`); a
    replica that found no room stayed short until some unrelated change, though lower-priority
    preemptible work held what it needed: it goes to the back-off's full solve, which preempts."""
    # 16 accelerators (`cluster`: two racks of two 4-accelerator nodes), filled by 4 node-local replicas.
    loop = reconciler(cluster)
    await submit(cluster, deployment("serve", replicas=2, accelerators=4, locality="node", priority=10))
    await submit(cluster, deployment("burst", replicas=2, accelerators=4, locality="node", preemptible=True))
    await loop.reconcile_once()
    before = await fresh(cluster)
    assert len(before.problem["placements"]) == 4
    node = next(p["node"] for p in before.problem["placements"] if p["deployment"] == "t1/serve")
    async with cluster.unit_of_work() as uow:
        await liveness.apply_transitions(uow, [Transition(node, "down", "silent", evict=True)], datetime.now(timezone.utc))
    for _ in range(3):  # the eviction's pass, then the back-off's (backoff_s=0) full solve
        await loop.reconcile_once()
    after = await fresh(cluster)
    held = {}
    for p in after.problem["placements"]:
        held.setdefault(p["deployment"], set()).add(p["node"])
    assert len(held["t1/serve"]) == 2 and node not in held["t1/serve"]  # whole again, one burst replica preempted
    assert len(held.get("t1/burst", ())) == 1
    assert not check_state(after.problem, after.problem["placements"])


@pytest.mark.parametrize(("health", "said"), [("suspect", "suspect"), ("down", "down, its work not evicted yet")])
async def test_a_reason_names_a_suspect_or_down_node_as_such_not_cordoned(cluster, health: str, said: str) -> None:
    """The solver sees a suspect node, and a down one whose work is not evicted yet, as cordoned
    (it keeps its shards, takes no new ones), and the reasons called it so: "not ready: n
    (cordoned)" of a node nobody cordoned. The node's condition (an interchange extension) is
    what they say now, on the warm session (a flip in place) and on a full solve alike."""
    loop = reconciler(cluster)
    await loop.reconcile_once()
    node = "rack-a-n0"
    for step in ("suspect", "down")[:1 + (health == "down")]:  # as the lifecycle goes: suspect first
        async with cluster.unit_of_work() as uow:
            await liveness.apply_transitions(uow, [Transition(node, step, "silent")], datetime.now(timezone.utc))
        await loop.reconcile_once()
    await submit(cluster, deployment("big", replicas=5, accelerators=4, locality="node"))  # 3 of 5 fit: reasons
    for _ in range(2):  # the arrival's pass (the warm session), then its back-off's full solve
        await loop.reconcile_once()
        async with cluster.unit_of_work() as uow:
            reasons = list((await repo.get_deployment(uow.session, "t1", "big")).reasons)
        messages = [r["message"] for r in reasons if r["code"] == "NODE_STATE"]
        assert messages and f"{node} ({said})" in messages[0], reasons
        assert "cordoned" not in messages[0]


async def test_a_node_holding_shards_going_suspect_then_down_is_a_flip_in_place(cluster, monkeypatch) -> None:
    """Its document changes in state and condition only: applied in place on the warm cluster,
    its deployments not read again (a condition that differed read them again, as if the node
    had been resized), and nothing unschedulable let go for a full solve."""
    reread: list[dict] = []
    real = ClusterCache.reread

    def recorded(self: ClusterCache, reads):  # type: ignore[no-untyped-def]
        out = real(self, reads)
        reread.append(out)
        return out

    monkeypatch.setattr(ClusterCache, "reread", recorded)
    loop = reconciler(cluster)
    await submit(cluster, deployment("gang", shards=2, accelerators=2, locality="rack"))
    await loop.reconcile_once()
    node = next(p["node"] for p in (await fresh(cluster)).problem["placements"] if p["deployment"] == "t1/gang")
    full = loop.full_passes
    for health in ("suspect", "down"):
        async with cluster.unit_of_work() as uow:
            await liveness.apply_transitions(uow, [Transition(node, health, "silent")], datetime.now(timezone.utc))
        await loop.reconcile_once()
    assert reread and all(not out for out in reread), reread
    assert loop.full_passes == full
    assert_same(loop.warm_snapshot, await fresh(cluster))


async def test_a_fast_commit_that_lands_on_a_change_keeps_the_cache(cluster, monkeypatch) -> None:
    # A deletion lands between the pass's read of the log and its commit: the commit is stale,
    # writes what it decided (re-checked), and the next pass reads the deletion from the log.
    import controller.reconcile.fast_path as reconcile_module

    loop = reconciler(cluster)
    await submit(cluster, deployment("gone", accelerators=2, locality="node"))
    await loop.reconcile_once()
    commit = reconcile_module.commit_plan
    landed: list[str] = []

    async def commit_after_a_deletion(*args, **kw):
        if not landed:
            async with cluster.unit_of_work() as uow:
                await deployments.delete_deployment(uow, WHO, "gone", RecordingSignals(), tenant="t1")
            landed.append("gone")
        return await commit(*args, **kw)

    monkeypatch.setattr(reconcile_module, "commit_plan", commit_after_a_deletion)
    await submit(cluster, deployment("new", accelerators=4, locality="node"))
    full = loop.full_passes
    assert (await loop.reconcile_once()).solved and landed
    assert (await loop.reconcile_once()).deleted == ("t1/gone",)
    assert loop.full_passes == full
    snapshot = await fresh(cluster)
    assert {p["deployment"] for p in snapshot.problem["placements"]} == {"t1/new"}
    assert_same(loop.warm_snapshot, snapshot)


async def test_an_arrival_committed_out_of_order_is_found(cluster, monkeypatch) -> None:
    # The first of two arrivals is not visible when the pass reads the new rows (its key was
    # committed after the second's): the counts differ, the cache finds the key it lacks and
    # decides it too, in key order, on the fast path.
    import controller.scheduling.warm as warm_module

    loop = reconciler(cluster)
    await submit(cluster, deployment("first", accelerators=1, locality="node"))
    await loop.reconcile_once()
    read = warm_module.load_arrivals
    hidden: list[str] = []

    async def read_without_the_first(session, **kw):
        arrivals = await read(session, **kw)
        if kw.get("only") is None and not hidden and arrivals.deployments:
            gone = arrivals.deployments[0]["id"]
            hidden.append(gone)
            return dataclasses.replace(arrivals, deployments=arrivals.deployments[1:],
                                       deployment_ids={k: v for k, v in arrivals.deployment_ids.items() if k != gone},
                                       solver_refs={k: v for k, v in arrivals.solver_refs.items() if k != gone})
        return arrivals

    monkeypatch.setattr(warm_module, "load_arrivals", read_without_the_first)
    await submit(cluster, deployment("late", accelerators=2, locality="node"))
    await submit(cluster, deployment("next", accelerators=2, locality="node"))
    full = loop.full_passes
    assert (await loop.reconcile_once()).solved and hidden == ["t1/late"]
    assert loop.full_passes == full
    snapshot = await fresh(cluster)
    assert {p["deployment"] for p in snapshot.problem["placements"]} == {"t1/first", "t1/late", "t1/next"}
    assert_same(loop.warm_snapshot, snapshot)


async def test_a_submit_landing_between_the_count_and_the_read_is_no_key_missed(cluster, monkeypatch) -> None:
    # The pass counts the schedulable deployments first and reads the new rows after: one
    # submitted in between is among the rows but not in that count. The rows' own statement
    # counts them too, so the cache does not go looking for keys it lacks (every key read).
    import controller.scheduling.warm as warm_module

    loop = reconciler(cluster)
    await submit(cluster, deployment("first", accelerators=1, locality="node"))
    await loop.reconcile_once()
    read = warm_module.load_arrivals
    looked_for: list[int] = []
    landed: list[str] = []

    async def read_after_a_submit(session, **kw):
        if not landed:
            landed.append("between")
            await submit(cluster, deployment("between", accelerators=1, locality="node"))
        return await read(session, **kw)

    async def keys(session, *, up_to_id):
        looked_for.append(up_to_id)
        return {}

    monkeypatch.setattr(warm_module, "load_arrivals", read_after_a_submit)
    monkeypatch.setattr(warm_module, "schedulable_keys", keys)
    await submit(cluster, deployment("next", accelerators=1, locality="node"))
    full = loop.full_passes
    assert (await loop.reconcile_once()).solved and landed
    assert looked_for == [] and loop.full_passes == full
    snapshot = await fresh(cluster)
    assert {p["deployment"] for p in snapshot.problem["placements"]} == {"t1/first", "t1/next", "t1/between"}
    assert_same(loop.warm_snapshot, snapshot)


@pytest.mark.parametrize("late", [False, True])
async def test_a_deletion_landing_between_the_log_and_the_count_reads_no_keys(cluster, monkeypatch, late: bool) -> None:
    # A deletion lands after the pass read the change log, before it counts the new rows: fewer
    # are counted than the cache holds. No key can be lacking for that: the pass reads no
    # schedulable keys, and the next one takes the deletion from the log. With two such
    # deletions and an arrival committed out of order in the same pass (`late`), the counts
    # still say fewer; the next pass, counting again after the deletions, finds the late one.
    import controller.scheduling.warm as warm_module

    loop = reconciler(cluster)
    for name in ("first", "gone", "gone2"):
        await submit(cluster, deployment(name, accelerators=1, locality="node"))
    await loop.reconcile_once()
    read = warm_module.load_arrivals
    keys = warm_module.schedulable_keys
    looked_for: list[int] = []
    hidden: list[str] = []

    async def read_after_deletions(session, **kw):
        if kw.get("only") is None and not hidden:
            async with cluster.unit_of_work() as uow:
                for name in ("gone", "gone2") if late else ("gone",):
                    await deployments.delete_deployment(uow, WHO, name, RecordingSignals(), tenant="t1")
            arrivals = await read(session, **kw)
            hidden.append(arrivals.deployments[0]["id"] if late else "")
            if late:  # its key committed after the next one's: not among the rows read
                gone = hidden[0]
                return dataclasses.replace(
                    arrivals, deployments=arrivals.deployments[1:],
                    deployment_ids={k: v for k, v in arrivals.deployment_ids.items() if k != gone},
                    solver_refs={k: v for k, v in arrivals.solver_refs.items() if k != gone})
            return arrivals
        return await read(session, **kw)

    async def counted_keys(session, *, up_to_id):
        looked_for.append(up_to_id)
        return await keys(session, up_to_id=up_to_id)

    monkeypatch.setattr(warm_module, "load_arrivals", read_after_deletions)
    monkeypatch.setattr(warm_module, "schedulable_keys", counted_keys)
    await submit(cluster, deployment("late", accelerators=1, locality="node"))
    await submit(cluster, deployment("next", accelerators=1, locality="node"))
    full = loop.full_passes
    assert (await loop.reconcile_once()).solved and hidden
    assert looked_for == []
    deleted = ("t1/gone", "t1/gone2") if late else ("t1/gone",)
    assert (await loop.reconcile_once()).deleted == deleted
    assert bool(looked_for) == late and loop.full_passes == full
    snapshot = await fresh(cluster)
    assert {p["deployment"] for p in snapshot.problem["placements"]} == \
        {"t1/first", "t1/late", "t1/next"} | ({"t1/gone2"} if not late else set())
    assert_same(loop.warm_snapshot, snapshot)


async def test_a_stale_full_pass_catches_up_by_deltas(cluster, monkeypatch) -> None:
    # A join and a cordon land while a whole-cluster pass solves (a join storm): its commit is
    # stale, the replica placed on the cordoned node is turned away. The cache is what the commit
    # left at the snapshot's generation and reads the join and the cordon from the log; the next
    # pass places the turned-away replica on the session, without reading the cluster again.
    import controller.reconcile.full_path as reconcile_module

    loop = reconciler(cluster)
    await submit(cluster, deployment("a", accelerators=4, locality="node"))
    commit = reconcile_module.commit_plan
    cordoned: list[str] = []

    async def commit_after_a_join_and_a_cordon(session, snapshot, plan, **kw):
        if not cordoned:
            await add_nodes(cluster, "rack-b", 1, prefix="joined")
            cordoned.append(plan.placements[0].node)
            async with cluster.unit_of_work() as uow:
                await nodes.cordon_node(uow, WHO, cordoned[0], RecordingSignals(), set(), {})
        return await commit(session, snapshot, plan, **kw)

    monkeypatch.setattr(reconcile_module, "commit_plan", commit_after_a_join_and_a_cordon)
    outcome = await loop.reconcile_once()
    assert outcome.solved and outcome.conflicts == 1 and loop.full_passes == 1
    assert not (await fresh(cluster)).problem["placements"]  # turned away: the node was cordoned meanwhile
    assert (await loop.reconcile_once()).solved
    assert loop.full_passes == 1 and loop.fast_passes == 1  # caught up by deltas, decided on the session
    snapshot = await fresh(cluster)
    assert {p["deployment"] for p in snapshot.problem["placements"]} == {"t1/a"}
    assert cordoned[0] not in {p["node"] for p in snapshot.problem["placements"]}
    assert_same(loop.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


async def test_a_stale_full_pass_that_wrote_it_all_is_followed(cluster, monkeypatch) -> None:
    # Nodes join while the first pass solves: what it placed holds, the joins are deltas.
    import controller.reconcile.full_path as reconcile_module

    loop = reconciler(cluster)
    await submit(cluster, deployment("a", accelerators=4, locality="node"))
    commit = reconcile_module.commit_plan
    joined: list[str] = []

    async def commit_after_joins(*args, **kw):
        if not joined:
            joined.extend(await add_nodes(cluster, "rack-a", 2, prefix="joined"))
        return await commit(*args, **kw)

    monkeypatch.setattr(reconcile_module, "commit_plan", commit_after_joins)
    assert (await loop.reconcile_once()).conflicts == 1
    assert not (await loop.reconcile_once()).solved  # the joins followed: nothing to decide
    assert (loop.full_passes, loop.delta_passes) == (1, 1)
    assert_same(loop.warm_snapshot, await fresh(cluster))
    await submit(cluster, deployment("b", accelerators=4, locality="node"))
    assert (await loop.reconcile_once()).solved and loop.full_passes == 1
    assert_same(loop.warm_snapshot, await fresh(cluster))


async def _stored(db: Database, name: str) -> set[tuple[int, str]]:
    """(stored replica, node) of a deployment's shards."""
    async with db.unit_of_work() as uow:
        return {(p.replica, p.node_id) for p, _ in await repo.placements_of_deployments(uow.session, [f"t1/{name}"])}


async def _drain_one_of_two(cluster: Database, loop: Reconciler) -> tuple[int, str]:
    """Two running replicas of a whole node each; one's node drained: its replacement is placed
    beside it on the warm cluster (make-before-break). The full passes before the drain, the node."""
    await submit(cluster, deployment("svc", replicas=2, accelerators=4, locality="node"))
    await loop.reconcile_once()
    await run_all(cluster)
    full = loop.full_passes
    drained = sorted(await _stored(cluster, "svc"))[0][1]
    async with cluster.unit_of_work() as uow:
        await nodes.drain_node(uow, WHO, drained, RecordingSignals(), set(), {})
    assert (await loop.reconcile_once()).solved and loop.full_passes == full
    stored = await _stored(cluster, "svc")
    assert len(stored) == 3 and drained in {node for _, node in stored}  # make-before-break: the old one runs
    assert_same(loop.warm_snapshot, await fresh(cluster))
    return full, drained


@pytest.mark.parametrize("then", ["replacement_runs", "node_down"])
async def test_a_drain_replaces_make_before_break_on_the_warm_cluster(cluster, then: str) -> None:
    # Two running replicas of a whole node each (of four): a drain of one's node places its
    # replacement on the session beside it; the outgoing replica stops once the replacement
    # runs, or at once when the drained node goes down and its work is evicted before that (the
    # view drops an outgoing replica on a down node). No whole-cluster pass; the cache stays
    # what a fresh read gives.
    loop = reconciler(cluster)
    full, drained = await _drain_one_of_two(cluster, loop)
    if then == "replacement_runs":
        await run_all(cluster)
    else:
        async with cluster.unit_of_work() as uow:
            await liveness.apply_transitions(uow, [Transition(drained, "down", "silent", evict=True)],
                                             datetime.now(timezone.utc))
    await loop.reconcile_once()  # the outgoing replica is retired
    assert loop.full_passes == full
    stored = await _stored(cluster, "svc")
    assert len(stored) == 2 and drained not in {node for _, node in stored}
    snapshot = await fresh(cluster)
    assert_same(loop.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


@pytest.mark.parametrize("in_process", [True, False])
async def test_a_rolling_update_and_a_scale_up_roll_on_the_warm_cluster(cluster, in_process: bool) -> None:
    # In this process, and with the session in the decide process (`Session.replace` forwarded).
    decider = None if in_process else DecideProcess()
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000,
                      backoff_s=0.0, decider=decider)
    try:
        await _roll_and_scale(cluster, loop)
    finally:
        if decider is not None:
            decider.close()


async def _roll_and_scale(cluster: Database, loop: Reconciler) -> None:
    await submit(cluster, deployment("svc", replicas=2, accelerators=2, locality="node"))
    await loop.reconcile_once()
    await run_all(cluster)
    full = loop.full_passes
    async with cluster.unit_of_work() as uow:  # a new shape: rolls replica by replica (surge 1)
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, deployment("svc", replicas=2, accelerators=3, locality="node"),
                                        row.resource_version, RecordingSignals())
    for _ in range(4):  # place a replacement, it runs, an old replica retires; and again
        await loop.reconcile_once()
        assert loop.full_passes == full
        assert_same(loop.warm_snapshot, await fresh(cluster))
        await run_all(cluster)
    snapshot = await fresh(cluster)
    shapes = {len(p["accelerator_indices"]) for p in snapshot.problem["placements"] if p["deployment"] == "t1/svc"}
    assert shapes == {3} and len(await _stored(cluster, "svc")) == 2  # rolled: two replicas of the new shape
    assert not check_state(snapshot.problem, snapshot.problem["placements"])
    async with cluster.unit_of_work() as uow:  # a scale up applies at once
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, deployment("svc", replicas=3, accelerators=3, locality="node"),
                                        row.resource_version, RecordingSignals())
    assert (await loop.reconcile_once()).solved and loop.full_passes == full
    assert len(await _stored(cluster, "svc")) == 3
    snapshot = await fresh(cluster)
    assert_same(loop.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


def _count_fresh_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the whole-cluster reads of the full path (`planning.load_snapshot`) from now on."""
    from controller.usecases import planning

    read = planning.load_snapshot
    reads: list[int] = []

    async def counted(*args, **kw):
        reads.append(1)
        return await read(*args, **kw)

    monkeypatch.setattr(planning, "load_snapshot", counted)
    return reads


async def test_a_back_off_retry_after_changes_by_others_catches_up_instead_of_reading_again(cluster, monkeypatch):
    # The cluster is full: an arrival the session cannot place waits for its back-off's full
    # solve. A node joins meanwhile: that solve starts from the cache caught up with the join,
    # not from a fresh read of the whole cluster.
    loop = reconciler(cluster)
    await submit(cluster, deployment("fill", replicas=4, accelerators=4, locality="node"))
    await loop.reconcile_once()
    await submit(cluster, deployment("late", accelerators=4, locality="node"))
    await loop.reconcile_once()  # the session cannot place it: backed off (0 s here)
    reads = _count_fresh_reads(monkeypatch)
    full = loop.full_passes
    await add_nodes(cluster, "rack-a", 1, prefix="joined")
    assert (await loop.reconcile_once()).solved
    assert loop.full_passes == full + 1 and not reads  # the back-off's full solve, from the caught-up cache
    snapshot = await fresh(cluster)
    assert {p["node"] for p in snapshot.problem["placements"] if p["deployment"] == "t1/late"} == {"joined-n0"}
    assert_same(loop.warm_snapshot, snapshot)


async def test_a_scale_down_releases_on_the_warm_cluster(cluster) -> None:
    # Three replicas of a whole node each (of four): scaled down to one, the two beyond the count
    # are released by the next pass's commit on the warm cluster (the view leaves them out), and
    # the capacity they freed takes an arrival that was waiting. No whole-cluster pass.
    loop = reconciler(cluster)
    await submit(cluster, deployment("svc", replicas=3, accelerators=4, locality="node"))
    await loop.reconcile_once()
    await submit(cluster, deployment("wait", replicas=2, accelerators=4, locality="node"))
    await loop.reconcile_once()  # one replica of it placed, one short
    await loop.reconcile_once()  # the back-off's full retry (0 s here) parks it: unschedulable
    full = loop.full_passes
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, deployment("svc", replicas=1, accelerators=4, locality="node"),
                                        row.resource_version, RecordingSignals())
    assert (await loop.reconcile_once()).solved and loop.full_passes == full
    assert {replica for replica, _ in await _stored(cluster, "svc")} == {0}
    assert len(await _stored(cluster, "wait")) == 2  # the freed node took the replica short
    snapshot = await fresh(cluster)
    assert not snapshot.released
    assert_same(loop.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])
    assert not (await loop.reconcile_once()).solved and loop.full_passes == full


async def test_a_scale_down_keeps_the_replicas_that_run(cluster) -> None:
    # Three replicas, the lowest (0) still loading (a replacement), 1 and 2 running: scaled down to
    # two, the one that does not run goes. The lowest indices were kept whatever ran: running
    # replica 2 stopped for one still loading (2 -> 1 running, nothing replacing it). On the warm
    # cluster as on a fresh read.
    loop = reconciler(cluster)
    await submit(cluster, deployment("svc", replicas=3, accelerators=4, locality="node"))
    await loop.reconcile_once()
    await run_all(cluster)
    async with cluster.unit_of_work() as uow:  # replica 0 loads again (its agent restarted it)
        await agents.flush_reports(uow, {}, [(node, ShardReport("svc", 0, 0, 10**9, "loading", tenant="t1"))
                                             for replica, node in await _stored(cluster, "svc") if replica == 0])
    await loop.reconcile_once()
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, deployment("svc", replicas=2, accelerators=4, locality="node"),
                                        row.resource_version, RecordingSignals())
    assert (await loop.reconcile_once()).solved
    assert {replica for replica, _ in await _stored(cluster, "svc")} == {1, 2}
    assert_same(loop.warm_snapshot, await fresh(cluster))
    async with cluster.unit_of_work() as uow:  # the history says which stopped (it said "replicas: 3 -> 2")
        removed = (await uow.session.execute(select(Event.message, Event.data).where(
            Event.kind == "deployment.replicas_removed", Event.object_id == "t1/svc"))).all()
    assert [data["replicas"] for _, data in removed] == [[0]] and "scaled down" in removed[0][0]


async def _phase_and_reasons(db: Database, name: str) -> tuple[str, list[dict[str, str]]]:
    async with db.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", name)
        assert row is not None
        return row.phase.value, row.reasons or []


async def test_a_scale_down_to_the_replicas_placed_judges_phase_and_reasons_again(cluster) -> None:
    # Six replicas of a whole node asked, four nodes: Degraded, with why two wait. Scaled down to
    # the four placed, nothing is left to decide or release, yet the stored phase and reasons are
    # wrong: the next pass's commit speaks for the deployment (as a full solve's would) and
    # writes Running, no reasons. No whole-cluster pass.
    loop = reconciler(cluster)
    await submit(cluster, deployment("svc", replicas=6, accelerators=4, locality="node"))
    await loop.reconcile_once()
    await run_all(cluster)
    phase, reasons = await _phase_and_reasons(cluster, "svc")
    assert phase == "degraded" and [r["code"] for r in reasons] == ["CAPACITY"]
    full = loop.full_passes
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, deployment("svc", replicas=4, accelerators=4, locality="node"),
                                        row.resource_version, RecordingSignals())
    await loop.reconcile_once()
    assert await _phase_and_reasons(cluster, "svc") == ("running", [])
    assert loop.full_passes == full and len(await _stored(cluster, "svc")) == 4
    assert_same(loop.warm_snapshot, await fresh(cluster))
    assert not (await loop.reconcile_once()).solved  # judged once: nothing more to commit


async def test_a_drain_ended_before_its_replacement_was_placed_leaves_no_reasons(cluster) -> None:
    # Two running replicas of a whole node each, the other two nodes cordoned: a drain of one's
    # node finds no node for its replacement (the deployment keeps running, told why). The drain
    # ended (the node uncordoned) leaves nothing to place, and the next pass's commit clears the
    # reasons; before, they stayed until a whole-cluster pass (a controller restart).
    loop = reconciler(cluster)
    await submit(cluster, deployment("svc", replicas=2, accelerators=4, locality="node"))
    await loop.reconcile_once()
    await run_all(cluster)
    held = sorted(node for _, node in await _stored(cluster, "svc"))
    others = sorted({"rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"} - set(held))
    for node in others:
        async with cluster.unit_of_work() as uow:
            await nodes.cordon_node(uow, WHO, node, RecordingSignals(), set(), {})
    async with cluster.unit_of_work() as uow:
        await nodes.drain_node(uow, WHO, held[0], RecordingSignals(), set(), {})
    await loop.reconcile_once()
    phase, reasons = await _phase_and_reasons(cluster, "svc")
    assert phase == "running" and "NODE_STATE" in {r["code"] for r in reasons}
    full = loop.full_passes
    for node in (held[0], *others):
        async with cluster.unit_of_work() as uow:
            await nodes.uncordon_node(uow, WHO, node, RecordingSignals(), set(), {})
    await loop.reconcile_once()
    assert await _phase_and_reasons(cluster, "svc") == ("running", [])
    assert loop.full_passes == full and sorted(node for _, node in await _stored(cluster, "svc")) == held
    assert_same(loop.warm_snapshot, await fresh(cluster))


async def test_a_deployment_deleted_while_it_rolls_leaves_the_warm_cluster_whole(cluster) -> None:
    # Two replicas of a whole node each, given a new shape: the outgoing replicas are a solver
    # deployment of their own (`t1/svc~1`), placed beside the new ones. Deleted before the rollout
    # ends, only the current revision left the cache: the outgoing one held its nodes in the
    # session until a restart, and work that fitted waited, its reasons naming them.
    loop = reconciler(cluster)
    await submit(cluster, deployment("svc", replicas=2, accelerators=4, locality="node"))
    await loop.reconcile_once()
    await run_all(cluster)
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, deployment("svc", replicas=2, accelerators=4, locality="node",
                                                             shard_hbm_gib=16.0),
                                        row.resource_version, RecordingSignals())
    await loop.reconcile_once()  # a new replica beside the old ones (make-before-break)
    assert any("~" in name for name in loop.warm_snapshot.solver_refs)  # an outgoing revision is held
    async with cluster.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "svc", RecordingSignals(), tenant="t1")
    await loop.reconcile_once()  # the departure's commit releases every shard of it
    full = loop.full_passes
    snapshot = await fresh(cluster)
    assert not snapshot.problem["placements"]
    assert_same(loop.warm_snapshot, snapshot)
    await submit(cluster, deployment("all", replicas=4, accelerators=4, locality="node"))
    await loop.reconcile_once()
    assert len(await _stored(cluster, "all")) == 4 and loop.full_passes == full  # every node free, on the session


async def test_another_controllers_plan_commits_are_followed(cluster) -> None:
    # Two controllers on one database (a deposed leader's late pass, or a cache kept across a
    # handover): each plan commit logs the deployments it touched, and the other's warm cache
    # reads those again whole (arrivals it placed, replicas it preempted or added) instead of
    # reading the whole cluster. Deciding on the caught-up cache places beside what the other placed.
    mine, theirs = reconciler(cluster), reconciler(cluster)
    await submit(cluster, deployment("first", accelerators=2, locality="node"))
    await mine.reconcile_once()
    await submit(cluster, deployment("second", accelerators=2, locality="node"))
    await theirs.reconcile_once()  # builds its own cache from a fresh read, commits
    await submit(cluster, deployment("third", replicas=2, accelerators=4, locality="node"))
    await theirs.reconcile_once()  # a fast pass on its cache
    full = mine.full_passes
    assert not (await mine.reconcile_once()).solved and mine.full_passes == full and mine.delta_passes == 1
    assert_same(mine.warm_snapshot, await fresh(cluster))
    await submit(cluster, deployment("fourth", accelerators=1, locality="node"))
    assert (await mine.reconcile_once()).solved and mine.full_passes == full  # decided on the caught-up cache
    snapshot = await fresh(cluster)
    assert_same(mine.warm_snapshot, snapshot)
    assert {p["deployment"] for p in snapshot.problem["placements"]} == {"t1/first", "t1/second", "t1/third",
                                                                        "t1/fourth"}
    assert not check_state(snapshot.problem, snapshot.problem["placements"])
    assert not (await theirs.reconcile_once()).solved  # and the other follows this one's commit
    assert_same(theirs.warm_snapshot, snapshot)


@pytest.mark.parametrize("change", ["delete", "resize"])
async def test_a_node_holding_shards_deleted_or_resized_is_a_delta(cluster, change: str) -> None:
    # A node holding shards deleted (its shards released with it), or registering again with
    # fewer accelerators (the shards on those it no longer has released): the deployments that
    # held shards there are read again whole, and the session completes what is left of their
    # replicas beside their gangs (or places them again), as a whole-cluster solve would. No
    # whole-cluster pass; the cache stays what a fresh read gives.
    loop = reconciler(cluster)
    await submit(cluster, deployment("gang", shards=2, accelerators=2, locality="rack"))
    await submit(cluster, deployment("pair", replicas=2, accelerators=1, locality="node"))
    await loop.reconcile_once()
    await submit(cluster, deployment("more", replicas=2, accelerators=2, locality="node"))
    await loop.reconcile_once()
    full = loop.full_passes
    placed = (await fresh(cluster)).problem["placements"]
    node = next(p["node"] for p in placed if p["deployment"] == "t1/gang")
    if change == "delete":
        async with cluster.unit_of_work() as uow:
            await nodes.delete_node(uow, WHO, node, RecordingSignals())
    else:
        async with cluster.unit_of_work() as uow:
            reg = await agents.register_node(uow, WHO, NodeInfo(
                node_id=node, rack=node.rsplit("-n", 1)[0], accelerators=1, accelerator_model="maia-100",
                hbm_gib=64.0, idle_power_w=500.0), heartbeat_interval_ms=1000)
        async with cluster.unit_of_work() as uow:
            await agents.hello(uow, WHO, node, reg.session_id, datetime.now(timezone.utc))
    assert (await loop.reconcile_once()).solved and loop.full_passes == full
    snapshot = await fresh(cluster)
    assert_same(loop.warm_snapshot, snapshot)
    held = [p for p in snapshot.problem["placements"] if p["deployment"] == "t1/gang"]
    assert len(held) == 2 and not any(p["node"] == node and max(p["accelerator_indices"]) > 0 for p in held)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


async def test_a_node_holding_only_shards_placed_after_a_node_change_is_known_to_hold_them(cluster) -> None:
    # The cache learns which deployments hold shards on each node once (at the first node change
    # it applies) and follows its own commits from there: a node holding only shards placed
    # after that, deleted, is one holding shards (their deployment read again, its replica
    # placed again elsewhere), not an empty node removed.
    loop = reconciler(cluster)
    await submit(cluster, deployment("first", accelerators=1, locality="node"))
    await loop.reconcile_once()
    await add_nodes(cluster, "rack-a", 1, prefix="joined")
    full = loop.full_passes
    await loop.reconcile_once()
    await submit(cluster, deployment("whole", accelerators=4, locality="node"))
    assert (await loop.reconcile_once()).solved and loop.full_passes == full
    node = next(p["node"] for p in (await fresh(cluster)).problem["placements"] if p["deployment"] == "t1/whole")
    async with cluster.unit_of_work() as uow:
        await nodes.delete_node(uow, WHO, node, RecordingSignals())
    assert (await loop.reconcile_once()).solved and loop.full_passes == full
    snapshot = await fresh(cluster)
    assert_same(loop.warm_snapshot, snapshot)
    assert {p["node"] for p in snapshot.problem["placements"] if p["deployment"] == "t1/whole"} - {node}


async def test_what_the_cache_holds_on_each_node_follows_commits_and_departures(cluster) -> None:
    # `ClusterCache.holding` (which node changes must read deployments again) answers from an
    # index kept with the snapshot's placements: after node changes, commits and departures it
    # is what a scan of the placements says.
    loop = reconciler(cluster)
    for name in ("a", "b", "c"):
        await submit(cluster, deployment(name, replicas=2, accelerators=1, locality="node"))
    await loop.reconcile_once()
    cache = ClusterCache.build(await fresh(cluster), allow_preemption=True, time_limit_ms=60_000)
    assert cache is not None
    every = [n["id"] for n in cache.snapshot.problem["nodes"]]

    def scanned() -> dict[str, frozenset[str]]:
        held: dict[str, set[str]] = {}
        for p in cache.snapshot.problem["placements"]:
            held.setdefault(p["node"], set()).add(p["deployment"])
        return {node: frozenset(keys) for node, keys in held.items()}

    assert {node: keys for node, (keys, _) in cache.holding(every).items()} == scanned()
    ids = cache.snapshot.deployment_ids
    assert cache.highest_id() == ids["t1/c"] > ids["t1/b"]
    cache.depart(["t1/a"], cache.snapshot.generation)
    assert {node: keys for node, (keys, _) in cache.holding(every).items()} == scanned()
    assert all("t1/a" not in keys for keys, _ in cache.holding(every).values())
    newest, second = ids["t1/c"], ids["t1/b"]
    cache.depart(["t1/c"], cache.snapshot.generation)  # the newest leaves: the next one's key
    assert cache.highest_id() == second < newest
    cache.depart(["t1/b"], cache.snapshot.generation)
    assert cache.holding(every) == {} == scanned()
    assert cache.highest_id() == 0


async def test_a_leader_again_catches_its_cache_up_instead_of_reading_again(cluster, monkeypatch) -> None:
    # A leader loses its lease between passes; the new leader places arrivals and scales a
    # deployment down; the first one leads again (`resync`): its whole-cluster pass starts from
    # its cache caught up with those commits from the change log, not from a fresh read.
    first, second = reconciler(cluster), reconciler(cluster)
    await submit(cluster, deployment("svc", replicas=3, accelerators=2, locality="node"))
    await first.reconcile_once()
    await submit(cluster, deployment("other", accelerators=2, locality="node"))
    second.resync()
    await second.reconcile_once()  # the new leader: a fresh read (it has no cache)
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, deployment("svc", replicas=2, accelerators=2, locality="node"),
                                        row.resource_version, RecordingSignals())
    await second.reconcile_once()
    await submit(cluster, deployment("late", accelerators=4, locality="node"))
    reads = _count_fresh_reads(monkeypatch)
    full = first.full_passes
    first.resync()
    assert (await first.reconcile_once()).solved
    assert first.full_passes == full + 1 and not reads  # a whole-cluster pass, from the caught-up cache
    snapshot = await fresh(cluster)
    assert {p["deployment"] for p in snapshot.problem["placements"]} == {"t1/svc", "t1/other", "t1/late"}
    assert_same(first.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


async def test_a_scale_up_short_of_min_replicas_places_none_on_the_warm_cluster(cluster, decider) -> None:
    # Two deployments of two whole-node replicas each fill the four nodes. `m` (the lower
    # priority) scaled to three replicas, min_replicas three: it cannot reach min_replicas (a
    # third node would be `blk`'s, which outranks it), so it runs none, as `solve()` on the same state
    # decides, told that min_replicas is why. The session dropped the two it ran; the fast plan
    # kept them from the snapshot (Degraded, 2 placed: short of min_replicas), and the session
    # took their nodes for free: a later arrival was put there and re-queued by the commit.
    from scheduler import problem_from_dict, solve

    loop = reconciler(cluster, decider)
    shape = {"accelerators": 4, "locality": "node"}
    await submit(cluster, deployment("m", replicas=2, min_replicas=2, priority=10, **shape))
    await submit(cluster, deployment("blk", replicas=2, priority=50, **shape))
    await loop.reconcile_once()
    await run_all(cluster)
    assert len(await _stored(cluster, "m")) == 2 and len(await _stored(cluster, "blk")) == 2
    full = loop.full_passes
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "m")
        await updates.update_deployment(uow, WHO, deployment("m", replicas=3, min_replicas=3, priority=10, **shape),
                                        row.resource_version, RecordingSignals())
    before = await fresh(cluster)  # what solve() decides on the same state
    expected = solve(problem_from_dict(dict(before.problem, options={"mode": "online"})))
    assert not [p for p in expected.placements if p.deployment == "t1/m"]
    assert (await loop.reconcile_once()).solved and loop.full_passes == full
    assert await _stored(cluster, "m") == set() and len(await _stored(cluster, "blk")) == 2
    phase, reasons = await _phase_and_reasons(cluster, "m")
    assert phase != "degraded" and any("min_replicas 3" in r["message"] for r in reasons), reasons
    async with cluster.unit_of_work() as uow:  # its history says why its two replicas stopped
        removed = list(await uow.session.scalars(select(Event.message).where(
            Event.kind == "deployment.replicas_removed")))
    assert len(removed) == 1 and "no longer placed: min_replicas 3 not reachable" in removed[0], removed
    snapshot = await fresh(cluster)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])
    assert_same(loop.warm_snapshot, snapshot)
    # The session agrees with the database: an arrival takes a node `m` freed, with no re-queue.
    await submit(cluster, deployment("probe", **shape))
    outcome = await loop.reconcile_once()
    assert outcome.solved and loop.full_passes == full and len(await _stored(cluster, "probe")) == 1
    assert await _stored(cluster, "m") == set() and len(await _stored(cluster, "blk")) == 2
    snapshot = await fresh(cluster)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])
    assert_same(loop.warm_snapshot, snapshot)
