"""The whole-cluster reads (a full pass's fresh read, `maiactl snapshot`, a dry run) see every table
as of one moment (`Database.read_unit`): a tenant and its first deployment committed between the
tenants' SELECT and the deployments' made a problem naming an unknown tenant, and the full pass
quarantined that valid deployment, the dry run answered INVALID_ARGUMENT, and `maiactl snapshot`
gave a document `maiactl solve` refuses."""

from __future__ import annotations

import pytest

from controller.reconcile import Reconciler
from controller.store import snapshot as snapshot_module
from controller.store.db import Database
from controller.usecases import deployments
from controller.usecases import nodes as node_cases
from scheduler import problem_from_dict
from uc_builders import WHO, add_tenant, deployment, no_publish, submit


def _commit_between_the_reads(monkeypatch: pytest.MonkeyPatch, db: Database) -> list[int]:
    """Another client's tenant and deployment committed right after the snapshot's tenants' SELECT."""
    read_tenants = snapshot_module._tenant_rows
    fired: list[int] = []

    async def tenant_rows(session):  # noqa: ANN001, ANN202
        rows = await read_tenants(session)
        if not fired:
            fired.append(1)
            await add_tenant(db, "t2")
            await submit(db, deployment("late", tenant="t2"))
        return rows

    monkeypatch.setattr(snapshot_module, "_tenant_rows", tenant_rows)
    return fired


async def test_the_snapshot_document_is_a_valid_problem(cluster: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    fired = _commit_between_the_reads(monkeypatch, cluster)
    async with cluster.read_unit() as uow:
        snapshot = await node_cases.cluster_snapshot(uow, WHO)
    assert fired and "t2/late" not in {d["id"] for d in snapshot.problem["deployments"]}
    problem_from_dict(snapshot.problem)  # `maiactl solve` takes it


async def test_a_dry_run_meanwhile_is_answered(cluster: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    fired = _commit_between_the_reads(monkeypatch, cluster)
    view = await deployments.dry_run_deployment(cluster, WHO, deployment("probe"), time_limit_ms=2000)
    assert fired and view.spec.name == "probe"


async def test_a_full_pass_meanwhile_quarantines_nothing(cluster: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    fired = _commit_between_the_reads(monkeypatch, cluster)
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=2000, backoff_s=0.0)
    await loop.reconcile_once()
    assert fired
    await loop.reconcile_once()  # the next pass reads it, whole
    async with cluster.unit_of_work() as uow:
        view = await deployments.get_deployment(uow, WHO, "late", tenant="t2")
    assert view.phase in ("scheduled", "running"), (view.phase, view.reasons)
