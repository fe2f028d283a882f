"""Shards an agent reports FAILED: the replica is placed again after a back-off, on another node
first; the deployment is Degraded meanwhile and Failed once it keeps failing (real database,
the reconciler with hand-driven clocks, reports through the agent use case)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from controller.domain.restarts import SHARD_FAILED, RestartPolicy
from controller.domain.values import ShardReport
from controller.observability.metrics import ControllerMetrics
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import agents, deployments, nodes, updates
from controller.usecases.ports import RecordingSignals
from bench.checking import check_state
from test_reconcile_fast import assert_same, fresh
from uc_builders import WHO, deployment, no_publish, submit

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


class Clocks:
    """The reconciler's monotonic and wall clocks, moved by hand."""

    def __init__(self) -> None:
        self.s = 0.0

    def monotonic(self) -> float:
        return self.s

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.s)


def reconciler(db: Database, clocks: Clocks, policy: RestartPolicy,
               metrics: ControllerMetrics | None = None) -> Reconciler:
    return Reconciler(db, push=lambda nodes: None, publish=no_publish, clock=clocks.monotonic,
                      wall_clock=clocks.wall, restart_policy=policy, retry_backoff_s=2.0, observer=metrics)


async def placed(db: Database, name: str) -> dict[int, tuple[str, str]]:
    """replica -> (node, shard phase) of a one-shard-per-replica deployment."""
    async with db.unit_of_work() as uow:
        return {p.replica: (p.node_id, p.phase.value)
                for p, _ in await repo.placements_of_deployments(uow.session, [f"t1/{name}"])}


async def report(db: Database, name: str, replica: int, phase: str, message: str = "") -> None:
    node = (await placed(db, name))[replica][0]
    async with db.unit_of_work() as uow:
        await agents.flush_reports(uow, {}, [(node, ShardReport(name, replica, 0, 10**9, phase, message, tenant="t1"))])


@dataclass(frozen=True)
class Seen:
    phase: m.DeploymentPhase
    reasons: list[dict[str, Any]]
    failures: int
    restart_after: datetime | None
    resource_version: int


async def state(db: Database, name: str) -> Seen:
    async with db.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", name)
        assert row is not None
        return Seen(row.phase, list(row.reasons or ()), row.failures, row.restart_after, row.resource_version)


async def _svc_running(cluster: Database, loop: Reconciler) -> str:
    """Deployment svc placed by `loop`, one whole node per replica (2), both running: replica 0's node."""
    await submit(cluster, deployment("svc", replicas=2, accelerators=4))
    await loop.reconcile_once()
    for replica in (0, 1):
        await report(cluster, "svc", replica, "running")
    return (await placed(cluster, "svc"))[0][0]


async def test_a_failed_replica_is_placed_again_on_another_node_after_its_back_off(cluster: Database) -> None:
    clocks = Clocks()
    metrics = ControllerMetrics()
    loop = reconciler(cluster, clocks, RestartPolicy(initial_delay_s=5, max_delay_s=20, limit=3), metrics)
    failed_node = await _svc_running(cluster, loop)

    await report(cluster, "svc", 0, "failed", "CUDA error: out of memory")
    row = await state(cluster, "svc")
    assert row.phase is m.DeploymentPhase.DEGRADED  # 1 of 2 runs, at least min_replicas
    assert row.reasons[0]["code"] == SHARD_FAILED and "CUDA error: out of memory" in row.reasons[0]["message"]

    await loop.reconcile_once()  # counts the failure and starts the back-off; nothing moves yet
    assert (await placed(cluster, "svc"))[0] == (failed_node, "failed")
    assert (await state(cluster, "svc")).failures == 1
    clocks.s = 4.9
    await loop.reconcile_once()
    assert (await placed(cluster, "svc"))[0] == (failed_node, "failed")

    clocks.s = 5.0
    await loop.reconcile_once()  # released and placed again, elsewhere
    node, phase = (await placed(cluster, "svc"))[0]
    assert node != failed_node and phase == "assigned"
    assert node != (await placed(cluster, "svc"))[1][0]
    assert metrics.registry.get_sample_value("maia_failed_replicas_released_total") == 1
    assert (await state(cluster, "svc")).phase is m.DeploymentPhase.DEGRADED

    await report(cluster, "svc", 0, "running")
    row = await state(cluster, "svc")
    assert row.phase is m.DeploymentPhase.RUNNING and row.reasons == []
    async with cluster.unit_of_work() as uow:
        kinds = [e.kind for e in await repo.list_events(uow.session, object_id="t1/svc")]
    assert "deployment.replicas_failed" in kinds and "deployment.replicas_released" in kinds


async def test_a_deployment_that_keeps_failing_is_failed_until_it_is_updated(cluster: Database, caplog) -> None:
    caplog.set_level(logging.INFO, logger="maia.reconcile")
    clocks = Clocks()
    loop = reconciler(cluster, clocks, RestartPolicy(initial_delay_s=5, max_delay_s=20, limit=2))
    await submit(cluster, deployment("svc", replicas=1, accelerators=4))
    await loop.reconcile_once()
    delays = []
    for attempt in range(3):
        await report(cluster, "svc", 0, "failed", f"crash {attempt}")
        await loop.reconcile_once()
        row = await state(cluster, "svc")
        if row.restart_after is None:
            break
        delays.append((row.restart_after.replace(tzinfo=timezone.utc) - clocks.wall()).total_seconds())
        clocks.s += delays[-1]
        await loop.reconcile_once()  # released and placed again
    assert delays == [5.0, 10.0]
    row = await state(cluster, "svc")
    assert row.phase is m.DeploymentPhase.FAILED and row.failures == 3
    assert "failed 3 times in a row" in row.reasons[0]["message"] and "crash 2" in row.reasons[0]["message"]
    # Failed for good is a WARNING (seen at --log-level WARNING, as deployed); each back-off an INFO.
    levels = {r.getMessage().split(": ", 2)[-1][:20]: r.levelname for r in caplog.records
              if r.getMessage().startswith("failed shards:")}
    assert levels == {"failed 3 times in a ": "WARNING", "replicas [0] failed ": "INFO",
                      "replicas [0] release": "INFO"}, levels

    clocks.s += 60  # nothing is placed again while it is FAILED, and the failed shard stays for reading
    await loop.reconcile_once(force=True)
    assert (await placed(cluster, "svc"))[0][1] == "failed"
    assert (await state(cluster, "svc")).phase is m.DeploymentPhase.FAILED

    async with cluster.unit_of_work() as uow:  # an update (here a scale) is a fresh start
        await updates.update_deployment(uow, WHO, deployment("svc", replicas=2, accelerators=4),
                                        row.resource_version, RecordingSignals())
    row = await state(cluster, "svc")
    assert row.phase is not m.DeploymentPhase.FAILED and row.failures == 0
    await loop.reconcile_once()   # the failed shard counts as failure 1 again
    clocks.s += 5
    await loop.reconcile_once()
    assert [phase for _, phase in (await placed(cluster, "svc")).values()] == ["assigned", "assigned"]


async def test_a_failed_replica_is_placed_again_on_the_warm_cluster(cluster: Database) -> None:
    # The failure report and the release are deltas: the released replica is decided on the
    # session, off the node it failed on, without a whole-cluster pass; the cache stays what a
    # fresh read gives.
    clocks = Clocks()
    loop = reconciler(cluster, clocks, RestartPolicy(initial_delay_s=5, max_delay_s=20, limit=3))
    await submit(cluster, deployment("svc", replicas=2, accelerators=4))  # one whole node per replica
    await loop.reconcile_once()
    full = loop.full_passes
    failed_node = (await placed(cluster, "svc"))[0][0]
    await report(cluster, "svc", 0, "failed", "CUDA error: out of memory")
    await loop.reconcile_once()  # the failure counted, its back-off started: nothing moves
    assert loop.full_passes == full and loop.warm_snapshot is not None
    assert_same(loop.warm_snapshot, await fresh(cluster))
    clocks.s = 5.0
    outcome = await loop.reconcile_once()  # released and placed again, elsewhere, on the session
    assert outcome.solved and loop.full_passes == full
    node, phase = (await placed(cluster, "svc"))[0]
    assert node not in (failed_node, (await placed(cluster, "svc"))[1][0]) and phase == "assigned"
    snapshot = await fresh(cluster)
    assert_same(loop.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


async def test_a_failed_replica_with_no_other_node_is_placed_anywhere_after_the_retry(cluster: Database) -> None:
    # Every node is taken: the session finds no node other than the one the replica failed on,
    # the retry after the back-off places it anywhere (there), as the full path does.
    clocks = Clocks()
    loop = reconciler(cluster, clocks, RestartPolicy(initial_delay_s=5, max_delay_s=20, limit=3))
    await submit(cluster, deployment("svc", replicas=4, accelerators=4))
    await loop.reconcile_once()
    full = loop.full_passes
    failed_node = (await placed(cluster, "svc"))[0][0]
    await report(cluster, "svc", 0, "failed", "crash")
    await loop.reconcile_once()
    clocks.s = 5.0
    outcome = await loop.reconcile_once()
    assert loop.full_passes == full and outcome.retry_in_s is not None
    assert 0 not in await placed(cluster, "svc")  # released, not placed again yet
    # Why, in words that fit: the node it failed on is ready, and "(cordoned)" sent operators
    # looking for a cordon nobody made.
    async with cluster.unit_of_work() as uow:
        reasons = (await repo.get_deployment(uow.session, "t1", "svc")).reasons
    said = [r["message"] for r in reasons if r["code"] == "NODE_STATE"]
    assert said and f"{failed_node} (avoided: a replica failed there lately)" in said[0], reasons
    clocks.s = 5.0 + outcome.retry_in_s
    await loop.reconcile_once()
    assert (await placed(cluster, "svc"))[0] == (failed_node, "assigned")
    snapshot = await fresh(cluster)
    assert_same(loop.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


def _counted_scans(monkeypatch: Any) -> list[str]:
    """The scans of every placement a pass makes first (`reconcile.first_checks`), named in the
    list returned as each runs: "failures", "retire"."""
    import controller.reconcile.first_checks as reconcile_module
    scans: list[str] = []

    def counted(name: str, scan: Any) -> Any:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            scans.append(name)
            return await scan(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(reconcile_module, "handle_failures", counted("failures", reconcile_module.handle_failures))
    monkeypatch.setattr(reconcile_module, "retire_replaced", counted("retire", reconcile_module.retire_replaced))
    return scans


async def test_a_pass_after_deletions_and_own_commits_alone_scans_no_placements_for_failures_or_replacements(
        cluster: Database, monkeypatch) -> None:
    scans = _counted_scans(monkeypatch)
    clocks = Clocks()
    loop = reconciler(cluster, clocks, RestartPolicy(initial_delay_s=5, max_delay_s=20, limit=3))
    for name in ("svc", "gone", "gone2"):
        await submit(cluster, deployment(name, replicas=1, accelerators=1))
    await loop.reconcile_once()
    scans.clear()
    await loop.reconcile_once()  # the generation moved by the pass's own commit alone: neither scan
    assert scans == []

    async with cluster.unit_of_work() as uow:  # a deletion moves the generation
        await deployments.delete_deployment(uow, WHO, "gone", RecordingSignals())
        await uow.commit()
    await loop.reconcile_once()  # releases its shards: neither scan
    assert scans == []

    await report(cluster, "svc", 0, "failed", "crash")  # a failure reported, then a deletion
    async with cluster.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "gone2", RecordingSignals())
        await uow.commit()
    await loop.reconcile_once()  # both scans: a change besides deletions
    assert scans == ["failures", "retire"]
    assert (await state(cluster, "svc")).failures == 1


async def test_nodes_changed_but_none_draining_skip_the_scan_for_replacements(cluster: Database, monkeypatch) -> None:
    """A node's change moves the generation (a join moves it once a registration): the failures'
    scan follows it (a node gone down fails its shards), the rollout's only when one of those
    nodes is draining now (a drain makes its replicas outgoing; nothing else of a node does)."""
    scans = _counted_scans(monkeypatch)
    loop = reconciler(cluster, Clocks(), RestartPolicy(initial_delay_s=5, max_delay_s=20, limit=3))
    await submit(cluster, deployment("svc", replicas=1, accelerators=1))
    await loop.reconcile_once()
    await loop.reconcile_once()
    node = (await placed(cluster, "svc"))[0][0]
    other = next(n for n in await _node_ids(cluster) if n != node)

    async def cordoned(node_id: str, *, drain: bool = False, undo: bool = False) -> None:
        action = nodes.uncordon_node if undo else nodes.drain_node if drain else nodes.cordon_node
        async with cluster.unit_of_work() as uow:
            await action(uow, WHO, node_id, RecordingSignals(), set(), {})

    scans.clear()
    await cordoned(other)  # a node's change, not a drain
    await loop.reconcile_once()
    assert scans == ["failures"]
    await cordoned(other, undo=True)
    await cordoned(node, drain=True)  # and now a drain besides
    scans.clear()
    await loop.reconcile_once()
    assert scans == ["failures", "retire"]


async def _node_ids(db: Database) -> list[str]:
    async with db.unit_of_work() as uow:
        return [row.id for row in await repo.list_node_rows(uow.session)]


async def test_a_shard_its_agent_stopped_while_still_assigned_fails_and_is_placed_again_after_its_back_off(
        cluster: Database) -> None:
    # An agent stops only what its set no longer names: a STOPPED shard still placed on its node
    # does not run though nothing was asked, so it is a failure (its back-off, placed elsewhere),
    # not a placement left STOPPED that nothing ever moves again.
    clocks = Clocks()
    loop = reconciler(cluster, clocks, RestartPolicy(initial_delay_s=5, max_delay_s=20, limit=3))
    stopped_node = await _svc_running(cluster, loop)

    await report(cluster, "svc", 0, "stopped", "model server exited 0")
    assert (await placed(cluster, "svc"))[0] == (stopped_node, "failed")
    row = await state(cluster, "svc")
    assert row.phase is m.DeploymentPhase.DEGRADED
    assert row.reasons[0]["code"] == SHARD_FAILED
    assert row.reasons[0]["message"] == (f"replica 0 shard 0 failed on {stopped_node}: stopped by its agent while "
                                         "still assigned: model server exited 0")

    await loop.reconcile_once()  # counted as a failure: its back-off starts
    assert (await state(cluster, "svc")).failures == 1
    await report(cluster, "svc", 0, "stopped", "again")  # said again (a full state): nothing more
    assert (await placed(cluster, "svc"))[0] == (stopped_node, "failed")
    await loop.reconcile_once()
    assert (await state(cluster, "svc")).failures == 1
    clocks.s = 5.0
    await loop.reconcile_once()  # released and placed again, elsewhere
    node, phase = (await placed(cluster, "svc"))[0]
    assert node != stopped_node and phase == "assigned"


async def test_a_stopped_report_for_a_placement_not_taken_up_yet_changes_nothing(cluster: Database) -> None:
    # A replica released and placed again on the same node: the STOPPED its agent sent for the
    # old placement may be written after the new one is committed, before the agent got the set
    # naming it again. Not a failure of the new placement (that would release it again).
    clocks = Clocks()
    loop = reconciler(cluster, clocks, RestartPolicy(initial_delay_s=5, max_delay_s=20, limit=3))
    await submit(cluster, deployment("svc", replicas=1, accelerators=4))
    await loop.reconcile_once()
    node = (await placed(cluster, "svc"))[0][0]
    await report(cluster, "svc", 0, "stopped", "stopped")
    assert (await placed(cluster, "svc"))[0] == (node, "assigned")
    row = await state(cluster, "svc")
    assert row.reasons == [] and row.failures == 0
    await report(cluster, "svc", 0, "running")
    assert (await state(cluster, "svc")).phase is m.DeploymentPhase.RUNNING


async def test_a_shard_taken_up_and_stopped_within_one_flush_fails(cluster: Database) -> None:
    # Its LOADING and its STOPPED written together: the placement, ASSIGNED as stored, was taken up.
    loop = reconciler(cluster, Clocks(), RestartPolicy(initial_delay_s=5, max_delay_s=20, limit=3))
    await submit(cluster, deployment("svc", replicas=1, accelerators=4))
    await loop.reconcile_once()
    node = (await placed(cluster, "svc"))[0][0]
    async with cluster.unit_of_work() as uow:
        await agents.flush_reports(uow, {}, [(node, ShardReport("svc", 0, 0, 10**9, phase, tenant="t1"))
                                             for phase in ("loading", "stopped")])
    assert (await placed(cluster, "svc"))[0] == (node, "failed")
    assert (await state(cluster, "svc")).reasons[0]["code"] == SHARD_FAILED


async def test_a_report_of_a_deleted_deployment_never_applies_to_one_submitted_again_under_its_name(
        cluster: Database) -> None:
    """A deployment deleted and submitted again under its name counts its generations from 0
    again: the old one's FAILED (an agent's heartbeat repeating it, or one late) named the same
    shard and generation, and failed the new one's shard with the old crash (its back-off and
    restart count too). Reports say which deployment they answer (`deployment_uid`, its row
    id): another's is dropped; one that says none is judged as before."""
    from sqlalchemy import select

    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish)
    spec = deployment("svc", accelerators=4, locality="node")

    async def placed() -> tuple[int, str, int, m.ShardPhase]:
        async with cluster.unit_of_work() as uow:
            [(dep_id, node, generation, phase)] = (await uow.session.execute(select(
                m.Placement.deployment_id, m.Placement.node_id, m.Placement.generation, m.Placement.phase))).all()
        return dep_id, node, generation, phase

    await submit(cluster, spec)
    await loop.reconcile_once()
    old_id, node, generation, _ = await placed()
    crashed = ShardReport("svc", 0, 0, generation, "failed", "OOM in the old build", tenant="t1",
                          deployment_uid=old_id)
    async with cluster.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "svc", RecordingSignals(), tenant="t1")
    await loop.reconcile_once()
    await submit(cluster, spec)
    await loop.reconcile_once()
    new_id, new_node, new_generation, _ = await placed()
    assert (new_id, new_generation) != (old_id, generation) and new_generation == generation  # the same numbers
    async with cluster.unit_of_work() as uow:
        await agents.flush_reports(uow, {}, [(new_node, crashed)])
    assert (await placed())[3] is m.ShardPhase.ASSIGNED
    running = ShardReport("svc", 0, 0, new_generation, "running", tenant="t1", deployment_uid=new_id)
    async with cluster.unit_of_work() as uow:
        await agents.flush_reports(uow, {}, [(new_node, running)])
    assert (await placed())[3] is m.ShardPhase.RUNNING
    # Both in one flush, the old one's FAILED last (a node running the new shard while its
    # heartbeat still repeats the old one's crash): the new one's word is what counts.
    loading = ShardReport("svc", 0, 0, new_generation, "loading", tenant="t1", deployment_uid=new_id)
    async with cluster.unit_of_work() as uow:
        await agents.flush_reports(uow, {}, [(new_node, loading), (new_node, crashed)])
    assert (await placed())[3] is m.ShardPhase.LOADING
