"""The reconcile loop reports solves, stale plans, re-queued replicas and first placements to the metrics."""

from __future__ import annotations

from dataclasses import replace

from controller.observability.metrics import ControllerMetrics
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.usecases import deployments, planning
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO, deployment, no_publish, submit


async def test_a_stale_plan_is_counted_and_solved_again_and_the_placement_is_observed(cluster):
    metrics = ControllerMetrics()
    solves = 0

    async def solve_while_the_cluster_changes(problem, *, time_limit_ms):
        nonlocal solves
        solves += 1
        if solves == 1:  # someone changes the cluster while the first solve runs
            async with cluster.unit_of_work() as uow:
                await repo.bump_cluster_generation(uow.session)
                await uow.commit()
        return await planning.solve_in_thread(problem, time_limit_ms=time_limit_ms)

    async def publish(names, deleted) -> None:
        return None

    loop = Reconciler(cluster, push=lambda nodes: None, publish=publish, solve=solve_while_the_cluster_changes,
                      observer=metrics)
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, deployment("svc"), RecordingSignals())
    outcome = await loop.reconcile_once()

    sample = metrics.registry.get_sample_value
    assert outcome.conflicts == 1 and solves == 2
    assert sample("maia_plan_conflicts_total") == 1
    statuses = ("optimal", "feasible")
    assert sum(sample("maia_solves_total", {"status": s}) or 0 for s in statuses) == 2
    assert sum(sample("maia_solve_duration_seconds_count", {"status": s}) or 0 for s in statuses) == 2
    # The stale plan still landed "svc" (nothing it placed conflicted): placed once, observed once.
    assert sample("maia_deployment_submit_to_placed_seconds_count") == 1
    # Placed once: a second pass changes nothing and observes no second placement.
    await loop.reconcile_once(force=True)
    assert sample("maia_deployment_submit_to_placed_seconds_count") == 1


async def test_a_replica_the_applier_turns_away_is_placed_again_after_a_back_off(cluster):
    metrics = ControllerMetrics()
    now = [0.0]
    solves = 0

    async def solve_onto_a_node_that_is_gone_the_first_time(problem, *, time_limit_ms):
        nonlocal solves
        solves += 1
        plan = await planning.solve_in_thread(problem, time_limit_ms=time_limit_ms)
        if solves == 1:  # as if solved from a state that still had node "ghost"
            plan = replace(plan, placements=tuple(replace(p, node="ghost") for p in plan.placements))
        return plan

    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, observer=metrics,
                      solve=solve_onto_a_node_that_is_gone_the_first_time, clock=lambda: now[0], retry_backoff_s=2.0)
    await submit(cluster, deployment("svc"))

    first = await loop.reconcile_once()
    assert first.retry_in_s == 2.0 and first.changed_nodes == frozenset()
    assert metrics.registry.get_sample_value("maia_plan_replicas_requeued_total") == 1
    assert (await loop.reconcile_once()).solved is False  # nothing changed and the back-off is not over
    now[0] = 2.0
    second = await loop.reconcile_once()
    assert second.solved and second.retry_in_s is None and len(second.changed_nodes) == 1
    async with cluster.unit_of_work() as uow:
        assert (await repo.get_deployment(uow.session, "t1", "svc")).phase is m.DeploymentPhase.SCHEDULED


async def test_the_scheduling_queue_depths_are_exported(cluster):
    metrics = ControllerMetrics()
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, observer=metrics, backoff_s=0.0,
                      solve_time_limit_ms=60_000)
    sample = metrics.registry.get_sample_value
    await submit(cluster, deployment("small", accelerators=1, locality="node"))
    await loop.reconcile_once()
    await submit(cluster, deployment("huge", shards=4, accelerators=4, locality="row"))  # 16 of the 15 left
    await loop.reconcile_once()  # the warm session cannot place it: back-off
    assert [sample("maia_scheduling_queue_deployments", {"queue": q}) for q in ("active", "backoff", "unschedulable")] \
        == [0, 1, 0]
    await loop.reconcile_once()  # the full solve tries it once more: unschedulable
    assert [sample("maia_scheduling_queue_deployments", {"queue": q}) for q in ("active", "backoff", "unschedulable")] \
        == [0, 0, 1]


def test_a_deposed_leader_stops_reporting_its_scheduling_queue() -> None:
    """The queue's depths and the nominated nodes are set by the leader's passes only: a deposed
    leader kept its last ones (an unschedulable deployment deleted through the new leader stood
    at 1 on it for good, and the dashboard's max across controllers showed it)."""
    from controller.scheduling.queue import QueueDepths

    metrics = ControllerMetrics()
    metrics.leadership_changed(True)
    metrics.queue_depths(QueueDepths(active=2, backoff=1, unschedulable=1))
    metrics.nominated(3)
    metrics.leadership_changed(False)
    sample = metrics.registry.get_sample_value
    assert [sample("maia_scheduling_queue_deployments", {"queue": q}) for q in ("active", "backoff", "unschedulable")] \
        == [0.0, 0.0, 0.0]
    assert sample("maia_scheduling_nominated_nodes") == 0.0
    metrics.queue_depths(QueueDepths(unschedulable=4))  # a pass in flight as the lease went
    metrics.nominated(2)
    assert sample("maia_scheduling_queue_deployments", {"queue": "unschedulable"}) == 0.0
    assert sample("maia_scheduling_nominated_nodes") == 0.0
    metrics.leadership_changed(True)  # leading again: its passes' word counts
    metrics.queue_depths(QueueDepths(unschedulable=4))
    assert sample("maia_scheduling_queue_deployments", {"queue": "unschedulable"}) == 4.0
