"""Which agents' reports give a reconcile pass work (`reconcile.waits_on_report`, what the report
flush's views are judged by before the reconciler is woken), on the views a real flush
publishes: a drain's replacement running does (the pass then stops the old replica), a shard
failing does, a new deployment's shards loading and running do not (a pass after them finds
nothing to do)."""

from __future__ import annotations

from controller.domain.values import DeploymentView, ShardReport
from controller.reconcile import NoObserver, Reconciler, waits_on_report
from controller.store.db import Database
from controller.usecases import agents, deployments, nodes
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO, deployment, no_publish, submit


async def _view(db: Database, name: str) -> DeploymentView:
    async with db.unit_of_work() as uow:
        return await deployments.get_deployment(uow, WHO, name)


async def _report(db: Database, view: DeploymentView, phase: str, *, replica: int | None = None,
                  ) -> dict[str, DeploymentView]:
    """Each shard of `view` (of `replica` alone if given) reported `phase` by its node, flushed;
    the views the flush publishes."""
    published: dict[str, DeploymentView] = {}
    reports = [(p.node, ShardReport(view.spec.name, p.replica, p.shard, view.generation, phase, tenant="t1"))
               for p in view.placements if replica is None or p.replica == replica]
    async with db.unit_of_work() as uow:
        await agents.flush_reports(uow, {}, reports, views=published)
    return published


class Paths(NoObserver):
    """The path of each pass, in order."""

    def __init__(self) -> None:
        self.taken: list[str] = []

    def pass_taken(self, path: str) -> None:
        self.taken.append(path)


async def test_only_reports_a_pass_waits_on_wake_the_reconciler(cluster: Database) -> None:
    paths = Paths()
    loop = Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000, observer=paths)
    await submit(cluster, deployment("svc", locality="node"))
    await loop.reconcile_once()
    placed = await _view(cluster, "svc")
    for phase in ("loading", "running"):  # a new deployment's shards: nothing waits on them
        published = await _report(cluster, placed, phase)
        assert [v.placements[0].phase for v in published.values()] == [phase]
        assert not any(map(waits_on_report, published.values()))
    assert not (await loop.reconcile_once()).solved and paths.taken[-1] == "idle"  # a pass they woke: nothing to do

    old = placed.placements[0].node
    async with cluster.unit_of_work() as uow:
        await nodes.drain_node(uow, WHO, old, RecordingSignals(), frozenset(), {})
    await loop.reconcile_once()  # places the replacement beside the replica it replaces
    draining = await _view(cluster, "svc")
    [new] = [p for p in draining.placements if not p.outgoing]
    assert new.node != old and draining.outgoing_replicas == 1
    published = await _report(cluster, draining, "loading", replica=new.replica)
    assert all(map(waits_on_report, published.values()))  # still replacing: a report of it may matter
    published = await _report(cluster, draining, "running", replica=new.replica)
    assert list(published) == ["t1/svc"] and waits_on_report(published["t1/svc"])
    await loop.reconcile_once()  # the pass the report wakes stops the old replica
    replaced = await _view(cluster, "svc")
    assert [(p.node, p.outgoing) for p in replaced.placements] == [(new.node, False)]

    published = await _report(cluster, replaced, "failed")
    assert list(published) == ["t1/svc"] and waits_on_report(published["t1/svc"])
