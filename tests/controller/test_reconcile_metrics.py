"""The reconcile loop reports solves, stale-plan conflicts and first placements to the metrics."""

from __future__ import annotations

from controller.observability.metrics import ControllerMetrics
from controller.reconcile import Reconciler
from controller.store import repositories as repo
from controller.usecases import deployments, planning
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO, deployment


async def test_a_stale_plan_is_counted_as_a_conflict_then_the_placement_is_observed(cluster):
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
    status = "optimal" if sample("maia_solves_total", {"status": "optimal"}) else "feasible"
    assert sample("maia_solves_total", {"status": status}) == 2
    assert sample("maia_solve_duration_seconds_count", {"status": status}) == 2
    assert sample("maia_deployment_submit_to_placed_seconds_count") == 1
    # Placed once: a second pass changes nothing and observes no second placement.
    await loop.reconcile_once(force=True)
    assert sample("maia_deployment_submit_to_placed_seconds_count") == 1
