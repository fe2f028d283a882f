"""The reconciler's fast path (controller/scheduling/cache/): arrivals decided on the warm
cluster and committed without re-reading it. The cached snapshot must stay exactly what a fresh
`load_snapshot` reads, and fast passes must commit what full passes commit (best-fit scoring, so
that the session and `solve()` choose the same nodes)."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bench.checking import check_state
from controller.reconcile import Reconciler
from controller.scheduling.decider import DecideProcess
from controller.store import models as m
from controller.store.db import Database, UnitOfWork
from controller.store.lease import CommitOutcomeUnknown
from controller.store.snapshot import Snapshot, load_snapshot
from controller.domain.values import DeploymentSpec, deployment_key
from controller.usecases import deployments, nodes
from controller.usecases.ports import RecordingSignals
from tests.store.snapshot_walks import assert_index_walks
from uc_builders import WHO, add_nodes, add_tenant, apply_topology, deployment, no_publish, submit


def reconciler(db: Database, decider: DecideProcess | None = None) -> Reconciler:
    return Reconciler(db, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000, backoff_s=0.0,
                      decider=decider)


async def fresh(db: Database) -> Snapshot:
    async with db.unit_of_work() as uow:
        return await load_snapshot(uow.session)


def assert_same(cached: Snapshot | None, read: Snapshot) -> None:
    assert cached is not None
    assert cached.generation == read.generation
    assert cached.problem["nodes"] == read.problem["nodes"]
    assert cached.problem["deployments"] == read.problem["deployments"]
    assert cached.problem["placements"] == read.problem["placements"]
    assert cached.problem == read.problem
    assert dict(cached.deployment_ids) == dict(read.deployment_ids)
    assert dict(cached.solver_refs) == dict(read.solver_refs)
    assert dict(cached.replica_indices) == dict(read.replica_indices)
    assert (dict(cached.released), cached.deleting) == (dict(read.released), read.deleting)
    assert_index_walks(cached)  # its index, kept as the cache followed, answers as walks of it


async def test_the_warm_snapshot_stays_what_a_fresh_read_gives(cluster, decider):
    # 16 accelerators: 2 racks x 2 nodes x 4.
    loop = reconciler(cluster, decider)
    await submit(cluster, deployment("first", accelerators=2, locality="node"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 0  # the first pass reads it all
    assert_same(loop.warm_snapshot, await fresh(cluster))  # and leaves a cache of what it committed

    await submit(cluster, deployment("gang", shards=2, accelerators=2, locality="rack"))
    await submit(cluster, deployment("half", accelerators=1, locality="node", shard_accelerator_milli=500))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 1  # decided on it
    assert_same(loop.warm_snapshot, await fresh(cluster))

    await submit(cluster, deployment("pair", replicas=2, accelerators=1, locality="node"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 2  # on the cache: new rows only
    assert_same(loop.warm_snapshot, await fresh(cluster))

    # Partly placeable (4 replicas of 3 accelerators on the 7 left): placed in part, the rest
    # with its reasons; the cache follows.
    await submit(cluster, deployment("wide", replicas=4, accelerators=3, locality="node"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 3
    assert_same(loop.warm_snapshot, await fresh(cluster))
    snapshot = await fresh(cluster)
    placed = {p["replica"] for p in snapshot.problem["placements"] if p["deployment"] == "t1/wide"}
    assert 0 < len(placed) < 4

    # The back-off: the full path solves it once more, from the cache, which follows the commit.
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 3
    assert_same(loop.warm_snapshot, await fresh(cluster))
    await submit(cluster, deployment("late", accelerators=1, locality="node"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 4
    assert_same(loop.warm_snapshot, await fresh(cluster))
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


async def test_node_contract_topology_changes_and_a_drain_are_followed(cluster):
    loop = reconciler(cluster)
    await submit(cluster, deployment("a"))
    await loop.reconcile_once()
    await submit(cluster, deployment("b"))
    await loop.reconcile_once()
    assert (loop.full_passes, loop.fast_passes) == (1, 1) and loop.warm_snapshot is not None
    await add_nodes(cluster, "rack-b", 1, prefix="late")  # a node change: read as that node's row
    await submit(cluster, deployment("c"))
    assert (await loop.reconcile_once()).solved
    assert (loop.full_passes, loop.fast_passes) == (1, 2)
    assert_same(loop.warm_snapshot, await fresh(cluster))
    await add_tenant(cluster, "t2", excludes=("t1",))  # a contract: followed too (the tenants read again)
    await submit(cluster, deployment("c2"))
    assert (await loop.reconcile_once()).solved
    assert (loop.full_passes, loop.fast_passes) == (1, 3)
    assert_same(loop.warm_snapshot, await fresh(cluster))
    await apply_topology(cluster, {"rack-a": "row-a", "rack-b": "row-a", "rack-c": "row-a"})  # a topology: followed
    await submit(cluster, deployment("c3"))
    assert (await loop.reconcile_once()).solved
    assert (loop.full_passes, loop.fast_passes) == (1, 4)
    assert_same(loop.warm_snapshot, await fresh(cluster))
    before = (await fresh(cluster)).problem["placements"]
    held = before[0]["node"]
    async with cluster.unit_of_work() as uow:  # a drain: its replicas are replaced (none runs: they go at once)
        await nodes.drain_node(uow, WHO, held, RecordingSignals(), set(), {})
    await submit(cluster, deployment("d"))
    assert (await loop.reconcile_once()).solved
    assert (loop.full_passes, loop.fast_passes) == (1, 5)  # followed: the replacements placed on the session
    snapshot = await fresh(cluster)
    assert_same(loop.warm_snapshot, snapshot)
    assert held not in {p["node"] for p in snapshot.problem["placements"]}
    assert len(snapshot.problem["placements"]) == len(before) + 1  # every replica placed again, and "d"
    assert not check_state(snapshot.problem, snapshot.problem["placements"])
    loop.resync()  # leading again: the whole cluster solved again, from the cache it kept
    await loop.reconcile_once()
    assert loop.full_passes == 2
    assert_same(loop.warm_snapshot, await fresh(cluster))


@pytest.mark.parametrize("many", [False, True], ids=["few-on-the-loop", "many-on-a-worker"])
async def test_node_changes_are_looked_over_on_the_loop_unless_many(cluster, monkeypatch, many: bool) -> None:
    """`ClusterCache.reread` is short Python: on the event loop for a few node changes, in a
    worker thread for many (16,384 nodes changed: 55-130 ms), where the loop gets its turns."""
    import threading

    from controller.scheduling import warm
    from controller.scheduling.cache import ClusterCache

    threads: list[threading.Thread] = []
    real = ClusterCache.reread

    def reread(self: ClusterCache, reads: Any) -> Any:
        threads.append(threading.current_thread())
        return real(self, reads)

    monkeypatch.setattr(ClusterCache, "reread", reread)
    if many:  # one node change counts as many
        monkeypatch.setattr(warm, "REREAD_ON_LOOP_MAX_NODES", 0, raising=False)
    loop = reconciler(cluster)
    await submit(cluster, deployment("a"))
    await loop.reconcile_once()
    await add_nodes(cluster, "rack-b", 1, prefix="late")  # a node change: caught up on the warm cluster
    await submit(cluster, deployment("b"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 1
    assert_same(loop.warm_snapshot, await fresh(cluster))
    assert threads and all((thread is threading.main_thread()) is not many for thread in threads)


def _arrivals(seed: int, count: int) -> list[list[DeploymentSpec]]:
    """Batches of random arrivals that all fit the 64 accelerators (at most ~half asked)."""
    rng = random.Random(seed)
    batches: list[list[DeploymentSpec]] = []
    for i in range(count):
        kind = rng.choice(("single", "single", "fraction", "gang", "pair"))
        if kind == "single":
            spec = deployment(f"d{i}", accelerators=rng.choice((1, 2)), locality="node")
        elif kind == "fraction":
            spec = deployment(f"d{i}", accelerators=1, locality="node",
                              shard_accelerator_milli=rng.choice((250, 500)))
        elif kind == "gang":
            spec = deployment(f"d{i}", shards=rng.choice((2, 4)), accelerators=1, locality="rack")
        else:
            spec = deployment(f"d{i}", replicas=2, accelerators=1, locality="node")
        if not batches or rng.random() < 0.4:
            batches.append([])
        batches[-1].append(spec)
    return batches


FOUR_RACKS = ("rack-a", "rack-b", "rack-c", "rack-d")


async def _four_racks(db: Database, more_per_rack: int = 0) -> None:
    """Four racks of four nodes in two rows, tenant t1; and `more_per_rack` nodes a rack besides
    (named RACK-more-nI)."""
    await apply_topology(db, {"rack-a": "row-a", "rack-b": "row-a", "rack-c": "row-b", "rack-d": "row-b"})
    for rack in FOUR_RACKS:
        await add_nodes(db, rack, 4)
    await add_tenant(db, "t1")
    for rack in FOUR_RACKS:
        await add_nodes(db, rack, more_per_rack, prefix=f"{rack}-more")


class FourRacksFiles:
    """`_four_racks`'s cluster built once into a SQLite file (per `more_per_rack`), then copied
    for each run that starts from it: the random-run tests start every seed and mode from the
    same cluster. A copy holds the same rows as a cluster built afresh, bar the registrations'
    times and session ids, which no reconcile pass reads."""

    def __init__(self, template: Path, folder: Path) -> None:
        self._template = template  # the migrated, empty database
        self._folder = folder
        self._built: dict[int, Path] = {}

    async def copy(self, path: Path, more_per_rack: int = 0) -> Database:
        """A `Database` on a copy at `path` (the caller disposes of it)."""
        built = self._built.get(more_per_rack)
        if built is None:
            built = self._folder / f"four-racks-{more_per_rack}.db"
            shutil.copyfile(self._template, built)
            db = Database(f"sqlite+aiosqlite:///{built}")
            try:
                await _four_racks(db, more_per_rack)
            finally:
                await db.dispose()
            self._built[more_per_rack] = built
        shutil.copyfile(built, path)
        return Database(f"sqlite+aiosqlite:///{path}")


@pytest.fixture(scope="module")
def four_racks_files(_sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> FourRacksFiles:
    return FourRacksFiles(_sqlite_template, tmp_path_factory.mktemp("four-racks"))


async def _committed(db: Database) -> tuple[set[tuple[Any, ...]], dict[str, str]]:
    async with db.unit_of_work() as uow:
        names = {d.id: deployment_key(d.tenant_id, d.name) for d in (await uow.session.scalars(select(m.Deployment)))}
        phases = {names[d.id]: d.phase.value for d in (await uow.session.scalars(select(m.Deployment)))}
        rows = (await uow.session.scalars(select(m.Placement))).all()
        placed = {(names[p.deployment_id], p.replica, p.shard, p.node_id, tuple(p.accelerator_indices),
                   p.accelerator_milli) for p in rows}
    return placed, phases


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_fast_passes_commit_what_full_passes_commit(seed, decider, four_racks_files: FourRacksFiles,
                                                          tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MAIA_SCORER", "bestfit")  # the session and solve() then choose alike
    states = []
    for mode in ("fast", "full"):
        db = await four_racks_files.copy(tmp_path / f"{mode}.db")
        try:
            loop = reconciler(db, decider)
            for batch in _arrivals(seed, 24):
                for spec in batch:
                    await submit(db, spec)
                assert (await loop.reconcile_once(force=mode == "full")).solved
            assert (loop.fast_passes > 0) == (mode == "fast")
            states.append(await _committed(db))
            snapshot = await fresh(db)
            assert not check_state(snapshot.problem, snapshot.problem["placements"])
        finally:
            await db.dispose()
    (fast_placed, fast_phases), (full_placed, full_phases) = states
    assert fast_phases == full_phases and set(fast_phases.values()) == {"scheduled"}
    assert fast_placed == full_placed


async def test_an_arrival_preempts_on_the_fast_path(cluster, decider):
    # 16 accelerators held by preemptible low-priority work; a high-priority arrival takes some.
    loop = reconciler(cluster, decider)
    await submit(cluster, deployment("filler", replicas=4, accelerators=4, locality="node", preemptible=True))
    await loop.reconcile_once()
    await submit(cluster, deployment("urgent", accelerators=4, locality="node", priority=100))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 1
    snapshot = await fresh(cluster)
    by_deployment: dict[str, set[int]] = {}
    for p in snapshot.problem["placements"]:
        by_deployment.setdefault(p["deployment"], set()).add(p["replica"])
    assert len(by_deployment["t1/urgent"]) == 1 and len(by_deployment["t1/filler"]) == 3
    async with cluster.unit_of_work() as uow:
        reasons = (await uow.session.scalars(select(m.Deployment.reasons).where(m.Deployment.name == "filler"))).one()
    assert [r["code"] for r in reasons][:1] == ["PREEMPTED"]
    # The cache follows what the commit wrote (the victim's replicas renumbered as a fresh read numbers them).
    assert_same(loop.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])
    assert (await loop.reconcile_once()).solved  # the back-off: the victim is solved once more
    assert_same(loop.warm_snapshot, await fresh(cluster))
    # The cluster is full, so the next arrival goes to the back-off, whose full solve (from the
    # cache) preempts for a high-priority arrival: the cache follows that commit too.
    await submit(cluster, deployment("later", accelerators=1, locality="node", preemptible=True))
    await loop.reconcile_once()
    assert loop.fast_passes == 2 and loop.warm_snapshot is not None
    await submit(cluster, deployment("urgent2", replicas=2, accelerators=4, locality="node", priority=100))
    solves = loop.solves
    await loop.reconcile_once()
    assert loop.solves == solves + 1 and loop.fast_passes == 2
    assert_same(loop.warm_snapshot, await fresh(cluster))
    await submit(cluster, deployment("tiny", accelerators=1, locality="node", shard_accelerator_milli=250))
    await loop.reconcile_once()
    assert loop.fast_passes == 3
    assert (await loop.reconcile_once()).solved and loop.solves == solves + 2  # its back-off, from the cache
    assert_same(loop.warm_snapshot, await fresh(cluster))


async def test_a_decide_process_that_dies_drops_the_cache_and_the_next_pass_commits(cluster, decide_process):
    loop = reconciler(cluster, decide_process)
    await submit(cluster, deployment("first", accelerators=1, locality="node"))
    await loop.reconcile_once()  # a full pass: it leaves a cache whose session is in the process
    await submit(cluster, deployment("second", accelerators=1, locality="node"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 1
    pid, starts = decide_process.pid, decide_process.starts
    assert pid is not None and loop.warm_snapshot is not None
    os.kill(pid, signal.SIGKILL)
    await submit(cluster, deployment("third", accelerators=2, locality="node"))
    full = loop.full_passes
    # The decision fails: the cache is dropped, the full path commits it and leaves a cache
    # whose session is in a fresh process.
    assert (await loop.reconcile_once()).solved and loop.full_passes == full + 1
    assert decide_process.starts == starts + 1 and decide_process.pid not in (None, pid)
    snapshot = await fresh(cluster)
    assert {p["deployment"] for p in snapshot.problem["placements"]} == {"t1/first", "t1/second", "t1/third"}
    assert_same(loop.warm_snapshot, snapshot)
    await submit(cluster, deployment("fourth", accelerators=1, locality="node"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 2  # on the new process
    assert_same(loop.warm_snapshot, await fresh(cluster))
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


async def test_a_decide_process_lost_while_following_changes_sends_the_pass_down_the_full_path(
        cluster, decide_process):
    loop = reconciler(cluster, decide_process)
    await submit(cluster, deployment("first", accelerators=1, locality="node"))
    await loop.reconcile_once()
    pid, starts = decide_process.pid, decide_process.starts
    assert pid is not None and loop.warm_snapshot is not None
    os.kill(pid, signal.SIGKILL)
    # A node joins (applied to the session as a delta: the call finds the child gone) and a
    # deployment arrives: the pass is not a failure, it reads and solves the whole cluster.
    await add_nodes(cluster, "rack-b", 1, prefix="late")
    await submit(cluster, deployment("second", accelerators=4, locality="node"))
    full = loop.full_passes
    assert (await loop.reconcile_once()).solved
    assert loop.full_passes == full + 1 and loop.consecutive_failures == 0
    assert decide_process.starts == starts + 1 and decide_process.pid not in (None, pid)
    snapshot = await fresh(cluster)
    assert {p["deployment"] for p in snapshot.problem["placements"]} == {"t1/first", "t1/second"}
    assert_same(loop.warm_snapshot, snapshot)


async def test_the_pass_log_says_what_the_decide_process_spent(cluster, decide_process, caplog):
    loop = reconciler(cluster, decide_process)
    await submit(cluster, deployment("first", accelerators=1, locality="node"))
    await loop.reconcile_once()
    await submit(cluster, deployment("second", accelerators=1, locality="node"))
    with caplog.at_level(logging.INFO, logger="maia.reconcile"):
        assert (await loop.reconcile_once()).solved and loop.fast_passes == 1
    (line,) = [r.getMessage() for r in caplog.records if "path=fast" in r.getMessage()]
    assert "decide_cpu:" in line and "decide_child_cpu:" in line  # the session's CPU, in the child


async def test_a_plan_commit_whose_outcome_is_unknown_still_sends_its_nodes_their_sets(cluster, monkeypatch):
    """A plan's COMMIT that landed but whose answer was lost (`CommitOutcomeUnknown`, as on
    PostgreSQL when the connection drops with it in flight) fails the pass; the nodes it placed on
    are sent their sets all the same (sets are pushed on change, not polled: else the agents would
    hear of the landed placements only at their nodes' next change). Both paths: full, then fast."""
    pushed: list[set[str]] = []
    loop = Reconciler(cluster, push=lambda nodes: pushed.append(set(nodes)), publish=no_publish,
                      solve_time_limit_ms=60_000, backoff_s=0.0)
    armed = [False]
    real_commit = UnitOfWork.commit

    async def landed_then_lost(self: UnitOfWork) -> None:
        await real_commit(self)
        if armed[0]:
            armed[0] = False
            raise CommitOutcomeUnknown("test", ConnectionError("the answer was lost"))

    monkeypatch.setattr(UnitOfWork, "commit", landed_then_lost)
    for name, warm in (("first", False), ("second", True)):  # the full path first, then the fast one
        await submit(cluster, deployment(name, accelerators=4, locality="node"))
        assert (loop.warm_snapshot is not None) == warm
        pushed.clear()
        armed[0] = True
        full_before = loop.full_passes
        with pytest.raises(CommitOutcomeUnknown):
            await loop.reconcile_once()
        assert loop.full_passes == full_before + (0 if warm else 1)  # counted as it starts
        assert loop.warm_snapshot is None  # dropped: it may hold what was never committed
        placed_on = {p["node"] for p in (await fresh(cluster)).problem["placements"] if p["deployment"] == f"t1/{name}"}
        assert placed_on and placed_on <= set().union(*pushed), (placed_on, pushed)
        await loop.reconcile_once()  # the next pass (full: the cache was dropped) finds it placed
        assert not (await loop.reconcile_once()).solved


async def test_the_session_is_asked_what_waits_only_when_something_may(cluster, monkeypatch):
    # After a departure a pass decides again what the session holds short of replicas
    # (`ClusterCache.pending_docs`). It asks the session (a walk of every deployment it holds; in
    # the decide process a round trip) only when a call since its last answer may have left one
    # short: a decision left unplaced, a full solve's commit followed, ...
    from scheduler.session import Session

    answers: list[list[str]] = []
    real = Session.pending

    def pending(self: Session) -> list[str]:
        answers.append(real(self))
        return answers[-1]

    monkeypatch.setattr(Session, "pending", pending)
    # Not even a trip to a worker thread when the session is not asked (`ClusterCache.may_hold_pending`).
    from controller.scheduling.cache import ClusterCache

    looked = [0]
    real_docs = ClusterCache.pending_docs

    def pending_docs(self: ClusterCache, also: Any = ()) -> list[dict[str, Any]]:
        looked[0] += 1
        return real_docs(self, also)

    monkeypatch.setattr(ClusterCache, "pending_docs", pending_docs)
    # (A back-off the test never reaches: what waits is decided again on the session, not by a full solve.)
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000,
                      backoff_s=3600.0)

    async def delete(name: str) -> None:
        async with cluster.unit_of_work() as uow:
            await deployments.delete_deployment(uow, WHO, name, RecordingSignals(), tenant="t1")
        assert (await loop.reconcile_once()).deleted == (f"t1/{name}",)

    for name in ("a", "b", "c"):
        await submit(cluster, deployment(name, accelerators=4, locality="node"))
    await loop.reconcile_once()  # the full path: a cache of what it committed
    await submit(cluster, deployment("d", accelerators=1, locality="node"))
    await loop.reconcile_once()
    assert loop.fast_passes == 1
    await delete("a")  # not known yet: asked, nothing waits
    assert answers == [[]]
    await delete("b")  # nothing since could leave one short: not asked
    assert answers == [[]] and loop.fast_passes == 3 and looked[0] == 1
    # 3 replicas of a whole node each: 2 nodes free, one replica left short.
    await submit(cluster, deployment("wide", replicas=3, accelerators=4, locality="node"))
    await loop.reconcile_once()
    assert loop.fast_passes == 4 and answers == [[]]
    await delete("c")  # asked: it waits, and is placed whole on the node c leaves
    assert answers[-1] == ["t1/wide"] and loop.fast_passes == 5
    placed = {p["replica"] for p in (await fresh(cluster)).problem["placements"] if p["deployment"] == "t1/wide"}
    assert placed == {0, 1, 2}
    asked = len(answers)
    await delete("d")  # asked again (it waited at the last answer): nothing waits now
    assert len(answers) == asked + 1 and answers[-1] == []
    await submit(cluster, deployment("e", accelerators=1, locality="node"))
    await loop.reconcile_once()
    await delete("e")
    assert len(answers) == asked + 1
    assert_same(loop.warm_snapshot, await fresh(cluster))


async def test_an_arrival_beside_a_deletion_is_decided_in_its_pass(cluster):
    # The deletion leaves the schedulable count as the last pass left it (one gone being deleted,
    # one stored): the pass that follows the deletion reads the new row all the same.
    loop = reconciler(cluster)
    for name in ("a", "b"):
        await submit(cluster, deployment(name))
    await loop.reconcile_once()
    await submit(cluster, deployment("c"))
    await loop.reconcile_once()
    assert loop.fast_passes == 1
    async with cluster.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "a", RecordingSignals())
    await submit(cluster, deployment("d"))
    outcome = await loop.reconcile_once()
    assert outcome.solved and loop.fast_passes == 2 and outcome.deleted == ("t1/a",)
    async with cluster.unit_of_work() as uow:
        assert (await deployments.get_deployment(uow, WHO, "d")).phase == "scheduled"
    assert_same(loop.warm_snapshot, await fresh(cluster))
