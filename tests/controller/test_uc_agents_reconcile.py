"""Agent use cases and one reconcile pass at a time, with the real solver and database."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from controller.api import convert
from controller.errors import FailedPrecondition, InvalidArgument
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.usecases import agents, deployments, nodes, planning
from controller.usecases.agents import NodeBeat
from controller.domain.values import NodeInfo, ShardReport
from controller.usecases.ports import RecordingSignals
from scheduler import Plan, Reason, Unplaced
from uc_builders import WHO, apply_topology, deployment, row_counts


class Recorder:
    def __init__(self) -> None:
        self.pushed: set[str] = set()
        self.published: set[str] = set()
        self.deleted: list[str] = []

    def push(self, node_ids: set[str]) -> None:
        self.pushed |= node_ids

    async def publish(self, names: set[str], deleted: list) -> None:
        self.published |= names
        self.deleted += [v.spec.name for v in deleted]


def reconciler(db, rec: Recorder) -> Reconciler:
    return Reconciler(db, push=rec.push, publish=rec.publish, solve_time_limit_ms=2000)


async def test_register_unknown_rack_is_refused(database):
    await apply_topology(database, {"rack-a": "row-a"})
    before = await row_counts(database)
    with pytest.raises(FailedPrecondition) as info:
        async with database.unit_of_work() as uow:
            await agents.register_node(uow, WHO, NodeInfo("n1", "rack-07", 4), heartbeat_interval_ms=1000)
    assert info.value.message == "rack rack-07 is not in the topology; apply it first"
    assert await row_counts(database) == before


async def test_hello_needs_the_current_session(database):
    await apply_topology(database, {"rack-a": "row-a"})
    async with database.unit_of_work() as uow:
        first = await agents.register_node(uow, WHO, NodeInfo("n1", "rack-a", 4), heartbeat_interval_ms=1000)
    async with database.unit_of_work() as uow:
        second = await agents.register_node(uow, WHO, NodeInfo("n1", "rack-a", 4), heartbeat_interval_ms=1000)
    assert first.session_id != second.session_id
    with pytest.raises(FailedPrecondition, match=f"session {first.session_id} is not the current session of node n1"):
        async with database.unit_of_work() as uow:
            await agents.hello(uow, WHO, "n1", first.session_id, datetime.now(timezone.utc))
    async with database.unit_of_work() as uow:
        assert await agents.hello(uow, WHO, "n1", second.session_id, datetime.now(timezone.utc)) is True
    # A stream of the superseded session ending does not make the node suspect.
    async with database.unit_of_work() as uow:
        assert await agents.mark_suspect(uow, "n1", session_id=first.session_id, why="test") is False
    async with database.unit_of_work() as uow:
        assert await agents.mark_suspect(uow, "n1", session_id=second.session_id, why="test") is True


async def test_a_hello_naming_no_possible_node_is_refused_alone_in_its_batch(database):
    """A NUL in a node id (which PostgreSQL's text cannot hold) refuses that hello, not the batch's read."""
    await apply_topology(database, {"rack-a": "row-a"})
    async with database.unit_of_work() as uow:
        reg = await agents.register_node(uow, WHO, NodeInfo("n1", "rack-a", 4), heartbeat_interval_ms=1000)
    async with database.unit_of_work() as uow:
        outcomes = await agents.hellos(uow, [agents.Hello(WHO, "a\x00b", "s"), agents.Hello(WHO, "n1", reg.session_id)],
                                       datetime.now(timezone.utc))
    assert isinstance(outcomes[0], InvalidArgument) and outcomes[1] is True


def _overtaken_before_its_first_write(uow, meanwhile) -> None:
    """`meanwhile()` (another unit of work: the hub's Hello, the node lifecycle's mark) commits
    once, just before `uow` first writes (a write statement, or a flush of changed rows): after
    whatever `uow` read, where a use case that reads and then writes is overtaken."""
    session = uow.session
    due = [meanwhile]

    def changed() -> bool:
        return bool(session.dirty or session.new or session.deleted)

    def before(method: str, writes) -> None:
        original = getattr(session, method)

        async def call(*args, **kwargs):
            if due and writes(*args):
                await due.pop()()
            return await original(*args, **kwargs)
        setattr(session, method, call)
    for method in ("execute", "scalar", "scalars"):
        before(method, lambda statement, *_: changed() or getattr(statement, "is_dml", False))
    for method in ("flush", "commit"):
        before(method, lambda *_: True)


async def _suspect_events(database, node_id: str) -> int:
    async with database.unit_of_work() as uow:
        return len((await uow.session.execute(select(m.Event).where(
            m.Event.object_id == node_id, m.Event.kind == "node.suspect"))).scalars().all())


async def _node(database, node_id: str) -> tuple[m.NodeHealth, str]:
    async with database.unit_of_work() as uow:
        row = await uow.session.get(m.Node, node_id)
        return row.health, row.session_id


async def _up(database, node_id: str) -> str:
    """Register `node_id` (rack-a) and say Hello with its session: up. Returns the session."""
    async with database.unit_of_work() as uow:
        reg = await agents.register_node(uow, WHO, NodeInfo(node_id, "rack-a", 4), heartbeat_interval_ms=1000)
    async with database.unit_of_work() as uow:
        await agents.hello(uow, WHO, node_id, reg.session_id, datetime.now(timezone.utc))
    return reg.session_id


async def test_a_stream_end_overtaken_by_a_newer_sessions_hello_leaves_the_node_up(database):
    """The old session's stream ended; before its suspect mark is written, the agent registered
    again and its new session said Hello: the node stays up, of the new session (marked suspect,
    a connected node would take no new shards until the lifecycle found it heard from)."""
    await apply_topology(database, {"rack-a": "row-a"})
    old = await _up(database, "n1")
    new: list[str] = []

    async def newer_hello() -> None:
        new.append(await _up(database, "n1"))
    async with database.unit_of_work() as uow:
        _overtaken_before_its_first_write(uow, newer_hello)
        assert await agents.mark_suspect(uow, "n1", session_id=old, why="stream ended") is False
    assert new and await _node(database, "n1") == (m.NodeHealth.UP, new[0])
    assert await _suspect_events(database, "n1") == 0


async def test_a_stream_end_overtaken_by_the_lifecycles_suspect_mark_writes_nothing(database):
    """The node lifecycle marked the node suspect (silent) while its stream's end was being
    written: it stays the lifecycle's one suspect mark, with one event (not a second)."""
    from controller.domain.liveness import Transition
    from controller.usecases import liveness
    await apply_topology(database, {"rack-a": "row-a"})
    session_id = await _up(database, "n1")

    async def lifecycle_marks() -> None:
        async with database.unit_of_work() as uow:
            assert await liveness.apply_transitions(
                uow, [Transition("n1", "suspect", "silent", was="up")], datetime.now(timezone.utc))
    async with database.unit_of_work() as uow:
        _overtaken_before_its_first_write(uow, lifecycle_marks)
        assert await agents.mark_suspect(uow, "n1", session_id=session_id, why="stream ended") is False
    assert await _node(database, "n1") == (m.NodeHealth.SUSPECT, session_id)
    assert await _suspect_events(database, "n1") == 1


async def test_hellos_of_a_join_storm_commit_together_each_judged_alone(database):
    """One transaction for many hellos: the good ones mark their nodes up with one generation bump,
    a stale session and an unknown node get their own errors, in their places."""
    from controller.store.plans import bump_cluster_generation
    await apply_topology(database, {"rack-a": "row-a"})
    regs = []
    for node in ("n1", "n2", "n3"):
        async with database.unit_of_work() as uow:
            regs.append(await agents.register_node(uow, WHO, NodeInfo(node, "rack-a", 4), heartbeat_interval_ms=1000))
    async with database.unit_of_work() as uow:
        generation = await bump_cluster_generation(uow.session)
        await uow.commit()
    batch = [agents.Hello(WHO, "n1", regs[0].session_id), agents.Hello(WHO, "n2", "stale"),
             agents.Hello(WHO, "n9", "whatever"), agents.Hello(WHO, "n3", regs[2].session_id, damped=True)]
    async with database.unit_of_work() as uow:
        outcomes = await agents.hellos(uow, batch, datetime.now(timezone.utc))
    assert outcomes[0] is True and outcomes[3] is True
    assert isinstance(outcomes[1], FailedPrecondition) and "session stale is not the current session of node n2" \
        in outcomes[1].message
    assert isinstance(outcomes[2], FailedPrecondition) and outcomes[2].message == \
        "node n9 is not registered; call Register first"
    async with database.unit_of_work() as uow:
        health = {n.id: n.health for n in await uow.session.scalars(select(m.Node))}
        assert await bump_cluster_generation(uow.session) == generation + 2  # the batch bumped it once
    assert health == {"n1": m.NodeHealth.UP, "n2": m.NodeHealth.DOWN, "n3": m.NodeHealth.SUSPECT}


async def test_submit_reconcile_running_then_delete(cluster):
    rec = Recorder()
    loop = reconciler(cluster, rec)
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, deployment("svc", replicas=2, shards=2), RecordingSignals())
    outcome = await loop.reconcile_once()
    assert outcome.solved and "t1/svc" in outcome.changed_deployments
    async with cluster.unit_of_work() as uow:
        view = await deployments.get_deployment(uow, WHO, "svc")
    assert view.phase == "scheduled" and view.placed_replicas == 2 and len(view.placements) == 4
    assert rec.pushed == {p.node for p in view.placements}

    # Agents report running (one report stale: an older generation is ignored).
    reports = [(p.node, ShardReport("svc", p.replica, p.shard, view.generation, "running", tenant="t1")) for p in view.placements]
    stale_node = view.placements[0].node
    async with cluster.unit_of_work() as uow:
        await agents.flush_reports(uow, {stale_node: NodeBeat(datetime.now(timezone.utc), 900.0)},
                                   [(stale_node, ShardReport("svc", 0, 0, view.generation - 1, "failed", tenant="t1"))])
    published: dict = {}
    async with cluster.unit_of_work() as uow:
        changed = await agents.flush_reports(uow, {}, reports, views=published)
    assert changed == {"t1/svc"}
    async with cluster.unit_of_work() as uow:  # what watchers are told is what a read finds afterwards
        [read] = await deployments.views_of(uow, {"t1/svc"})
    assert list(published) == ["t1/svc"] and published["t1/svc"].phase == "running"
    # as sent (SQLite reads its times back without their zone, which the message restores)
    assert convert.deployment_msg(published["t1/svc"]) == convert.deployment_msg(read)
    async with cluster.unit_of_work() as uow:
        view = await deployments.get_deployment(uow, WHO, "svc")
        node = await nodes.get_node(uow, WHO, stale_node, frozenset(), {})
    assert view.phase == "running" and view.running_replicas == 2
    assert node.power_draw_w == 900.0 and node.shards >= 1

    # Idle: nothing changed, so no solve.
    solves = loop.solves
    assert not (await loop.reconcile_once()).solved and loop.solves == solves

    async with cluster.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "svc", RecordingSignals())
    outcome = await loop.reconcile_once()
    assert outcome.deleted == ("t1/svc",) and rec.deleted == ["svc"]
    counts = await row_counts(cluster)
    assert counts["deployments"] == 0 and counts["placements"] == 0


async def test_unplaceable_stays_pending_with_reasons(cluster):
    rec = Recorder()
    async with cluster.unit_of_work() as uow:
        await nodes.cordon_node(uow, WHO, "rack-a-n0", RecordingSignals(), frozenset(), {})
    # A whole rack of 8 is needed; rack-a has a cordoned node, so only rack-b fits one replica.
    spec = deployment("gang", replicas=2, min_replicas=2, shards=2, accelerators=4)
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, spec, RecordingSignals())
    await reconciler(cluster, rec).reconcile_once()
    async with cluster.unit_of_work() as uow:
        view = await deployments.get_deployment(uow, WHO, "gang")
    assert view.phase == "pending" and view.placements == ()
    assert view.reasons and all(r.code and r.message for r in view.reasons)


async def _run_everything(cluster) -> None:
    """What agents would report: every placed shard running."""
    async with cluster.unit_of_work() as uow:
        for p in await uow.session.scalars(select(m.Placement)):
            p.phase = m.ShardPhase.RUNNING
        await uow.commit()


async def _where(cluster, name: str) -> list[tuple[int, str, bool]]:
    async with cluster.unit_of_work() as uow:
        view = await deployments.get_deployment(uow, WHO, name)
    return [(p.replica, p.node, p.outgoing) for p in view.placements]


async def test_drain_replaces_make_before_break(cluster):
    rec = Recorder()
    loop = reconciler(cluster, rec)
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, deployment("svc", locality="node"), RecordingSignals())
    await loop.reconcile_once()
    await _run_everything(cluster)
    [(_, first, _)] = await _where(cluster, "svc")
    signals = RecordingSignals()
    async with cluster.unit_of_work() as uow:
        view = await nodes.drain_node(uow, WHO, first, signals, frozenset(), {})
    assert view.state == "cordoned" and view.shards == 1 and signals.wakes == 1  # still running there
    await loop.reconcile_once()
    placed = await _where(cluster, "svc")
    assert placed[0] == (0, first, True) and placed[1][0] == 1 and placed[1][1] != first  # the replacement
    await loop.reconcile_once()
    assert len(await _where(cluster, "svc")) == 2  # not running yet: the old replica keeps serving
    await _run_everything(cluster)
    await loop.reconcile_once()
    assert await _where(cluster, "svc") == [(1, placed[1][1], False)]
    async with cluster.unit_of_work() as uow:
        state = await uow.session.execute(select(m.Node.cordoned, m.Node.draining).where(m.Node.id == first))
        assert state.one() == (True, True)
        kinds = [e.kind for e in await uow.session.scalars(select(m.Event).order_by(m.Event.id))]
    assert "deployment.replica_retired" in kinds


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_time_limited_pass_is_retried_after_a_back_off(cluster):
    # The first solve "runs out of time" and places nothing; later solves are the real solver's.
    calls: list[int] = []

    async def solve(problem, *, time_limit_ms):
        calls.append(time_limit_ms)
        if len(calls) == 1:
            return Plan("feasible", (), unplaced=(
                Unplaced("t1/svc", 1, (Reason("TIME_LIMIT", "the solver stopped at its time limit"),)),))
        return await planning.solve_in_thread(problem, time_limit_ms=time_limit_ms)

    clock = FakeClock()
    loop = Reconciler(cluster, push=Recorder().push, publish=Recorder().publish, solve=solve, clock=clock,
                      retry_backoff_s=5.0)
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, deployment("svc"), RecordingSignals())
    first = await loop.reconcile_once()
    assert first.solved and first.retry_in_s == 5.0
    async with cluster.unit_of_work() as uow:
        view = await deployments.get_deployment(uow, WHO, "svc")
    assert view.phase == "pending" and [r.code for r in view.reasons] == ["TIME_LIMIT"]

    # Nothing changed and the back-off has not passed: no solve.
    clock.now += 4.9
    assert not (await loop.reconcile_once()).solved and len(calls) == 1
    # Back-off over: solved again on the same generation, and this time placed.
    clock.now += 0.1
    second = await loop.reconcile_once()
    assert second.solved and second.retry_in_s is None and len(calls) == 2
    async with cluster.unit_of_work() as uow:
        view = await deployments.get_deployment(uow, WHO, "svc")
    assert view.phase == "scheduled" and view.reasons == ()
    # Placed: no more retries.
    clock.now += 1000.0
    assert not (await loop.reconcile_once()).solved and len(calls) == 2


async def test_time_limited_retries_back_off_and_answers_without_a_time_limit_are_not_retried(cluster):
    cut_short = Plan("feasible", (), unplaced=(Unplaced("svc", 1, (Reason("CAPACITY", "no room"),)),),
                     stats={"time_limit_hit": True})
    # Not proved optimal, but the solver did not run out of time: nothing to gain from a retry.
    unproved = Plan("feasible", (), unplaced=(Unplaced("svc", 1, (Reason("CAPACITY", "no room"),)),),
                    stats={"time_limit_hit": False})
    plans = [cut_short] * 3 + [unproved]

    async def solve(problem, *, time_limit_ms):
        return plans.pop(0)

    clock = FakeClock()
    loop = Reconciler(cluster, push=Recorder().push, publish=Recorder().publish, solve=solve, clock=clock,
                      retry_backoff_s=5.0, max_retry_backoff_s=15.0)
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, deployment("svc"), RecordingSignals())
    delays = [(await loop.reconcile_once()).retry_in_s]
    for _ in range(3):
        clock.now += delays[-1] or 0.0
        delays.append((await loop.reconcile_once()).retry_in_s)
    assert delays == [5.0, 10.0, 15.0, None]  # doubling up to the cap; an answer in time is final
    clock.now += 1000.0
    assert not (await loop.reconcile_once()).solved and plans == []


def test_a_cut_short_solve_that_preempted_is_solved_again_at_the_first_step_of_the_back_off() -> None:
    """A reserved tenant's claim on a full cluster: each solve's preemption search (its trial
    budget) places a few replicas. The back-off doubled per pass though each made progress; a
    pass that preempted starts it over (one that did not still doubles)."""
    from controller.reconcile.pacing import RetryBackoff
    from scheduler import Preemption

    cut = Plan("feasible", (), unplaced=(Unplaced("gold/x", 5, (Reason("TIME_LIMIT", "trials"),)),))
    progressed = Plan("feasible", (), unplaced=cut.unplaced, preempted=(Preemption("burst/bg", 3),))
    retry = RetryBackoff(backoff_s=2.0, max_backoff_s=60.0, clock=lambda: 0.0)
    assert [retry.schedule(p) for p in (progressed, progressed, progressed)] == [2.0, 2.0, 2.0]
    assert [retry.schedule(p) for p in (cut, cut, progressed, cut)] == [4.0, 8.0, 2.0, 4.0]
