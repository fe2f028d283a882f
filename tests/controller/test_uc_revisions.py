"""Revision history (`usecases/revisions.py`): an update that rolls keeps the revision it makes and
the one it leaves, the newest `limits.REVISION_HISTORY` of a deployment are kept, and they go
with their deployment; what a rollback goes back to, and what it refuses (on SQLite and
PostgreSQL)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sqlalchemy import delete, func, select, update

from controller import limits
from controller.errors import FailedPrecondition, NotFound, ResourceExhausted
from controller.identity import Principal, Role
from controller.ratelimit import KeyedRateLimiter, SubmitLimits
from controller.store import models as m
from controller.store.db import Database
from controller.usecases import planning, revisions, updates
from controller.usecases.ports import RecordingSignals
from controller.reconcile import Reconciler
from uc_builders import WHO, deployment, no_publish, submit, with_shard

SVC = deployment("svc", "t1", replicas=2, shards=1, accelerators=1, shard_hbm_gib=16.0)


async def _roll(db: Database, hbm_gib: float) -> None:
    async with db.unit_of_work() as uow:
        row = await uow.session.scalar(select(m.Deployment).where(m.Deployment.name == "svc"))
        version = row.resource_version
    async with db.unit_of_work() as uow:
        done = await updates.update_deployment(uow, WHO, with_shard(SVC, hbm_gib=hbm_gib), version, RecordingSignals())
    assert done.rolling


async def _history(db: Database) -> list[tuple[int, float, bool]]:
    async with db.unit_of_work() as uow:
        views = await revisions.list_revisions(uow, WHO, "svc", tenant="t1")
    return [(v.revision, v.spec.shard.hbm_gib, v.current) for v in views]


async def test_the_newest_revisions_are_kept_and_go_with_their_deployment(cluster: Database) -> None:
    await submit(cluster, SVC)
    assert await _history(cluster) == [(1, 16.0, True)]
    for n in range(1, limits.REVISION_HISTORY + 3):  # revisions 2 .. REVISION_HISTORY + 3
        await _roll(cluster, 16.0 + n)
    history = await _history(cluster)
    newest = limits.REVISION_HISTORY + 3
    assert [r for r, _, _ in history] == list(range(newest, 3, -1))  # 13 .. 4: ten kept
    assert history[0] == (newest, 16.0 + newest - 1, True) and history[-1] == (4, 19.0, False)
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(delete(m.Deployment).where(m.Deployment.name == "svc"))
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        assert await uow.session.scalar(select(func.count()).select_from(m.DeploymentRevision)) == 0


async def test_a_revision_made_before_revisions_were_kept_is_kept_without_a_time(cluster: Database) -> None:
    await submit(cluster, SVC)
    async with cluster.unit_of_work() as uow:  # as an older controller left a rolled deployment: no rows
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "svc").values(template_revision=2))
        await uow.commit()
    await _roll(cluster, 24.0)
    async with cluster.unit_of_work() as uow:
        views = await revisions.list_revisions(uow, WHO, "svc", tenant="t1")
    assert [(v.revision, v.spec.shard.hbm_gib, v.created_at is None, v.changes) for v in views] == [
        (3, 24.0, False, ("shard.hbm_gib: 16 -> 24",)), (2, 16.0, True, ())]


async def _rollback(db: Database, who: Principal = WHO, **kw: object) -> int:
    async with db.unit_of_work() as uow:
        done = await revisions.rollback_deployment(uow, who, "svc", RecordingSignals(), tenant="t1", **kw)
    return done.to_revision


async def test_a_revision_still_running_but_never_kept_is_listed_and_can_be_rolled_back_to(cluster: Database) -> None:
    """Mid-rollout when revisions began to be kept: revision 1 is only in `revision_specs`."""
    await submit(cluster, with_shard(SVC, hbm_gib=24.0))
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "svc").values(
            template_revision=2, revision_specs={"1": planning.deployment_doc(SVC)}))
        await uow.commit()
    assert await _history(cluster) == [(2, 24.0, True), (1, 16.0, False)]
    assert await _rollback(cluster) == 1
    assert await _history(cluster) == [(3, 16.0, True), (2, 24.0, False), (1, 16.0, False)]


async def test_undo_goes_back_past_a_restart_to_the_newest_other_template(cluster: Database) -> None:
    await submit(cluster, SVC)
    async with cluster.unit_of_work() as uow:
        await revisions.restart_deployment(uow, WHO, "svc", RecordingSignals(), tenant="t1")
    with pytest.raises(FailedPrecondition, match="no revision before 2 with another template"):
        await _rollback(cluster)
    await _roll(cluster, 24.0)  # revision 3
    async with cluster.unit_of_work() as uow:
        await revisions.restart_deployment(uow, WHO, "svc", RecordingSignals(), tenant="t1")  # revision 4
    assert await _rollback(cluster) == 2  # revisions 2 and 1 run 16 GiB; 2 is the newest
    assert (await _history(cluster))[0] == (5, 16.0, True)


async def test_a_rollback_of_a_deployment_being_deleted_says_so(cluster: Database) -> None:
    await submit(cluster, SVC)
    await _roll(cluster, 24.0)
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "svc").values(
            phase=m.DeploymentPhase.DELETING))
        await uow.commit()
    with pytest.raises(FailedPrecondition, match="deployment svc is being deleted"):
        await _rollback(cluster, to_revision=7)


async def test_a_tenant_tokens_refused_rollbacks_take_its_change_tokens(cluster: Database) -> None:
    await submit(cluster, SVC)
    lab = Principal("lab-token", Role.TENANT, tenant="t1")
    throttle = SubmitLimits(submits=KeyedRateLimiter(0, "submits"), dry_runs=KeyedRateLimiter(0, "dry runs"),
                            changes=KeyedRateLimiter(1, "updates and deletions"))
    with pytest.raises(NotFound):
        await _rollback(cluster, lab, to_revision=9, throttle=throttle)
    with pytest.raises(ResourceExhausted):
        await _rollback(cluster, lab, to_revision=9, throttle=throttle)


async def test_a_request_id_used_by_an_update_is_not_a_rollbacks(cluster: Database) -> None:
    await submit(cluster, SVC)
    async with cluster.unit_of_work() as uow:
        await updates.update_deployment(uow, WHO, with_shard(SVC, hbm_gib=24.0), 1, RecordingSignals(),
                                        request_id="r1")
    await _roll(cluster, 16.0)  # back to 16 GiB by an update: revision 3
    with pytest.raises(FailedPrecondition, match="'r1' was already used by tenant t1 to update deployment svc"):
        await _rollback(cluster, request_id="r1")


async def test_an_update_back_after_a_restart_does_not_adopt_the_replicas_the_restart_replaces(
        cluster: Database) -> None:
    await submit(cluster, SVC)
    await Reconciler(cluster, push=lambda nodes: None, publish=no_publish).reconcile_once()  # revision 1 placed
    async with cluster.unit_of_work() as uow:
        await revisions.restart_deployment(uow, WHO, "svc", RecordingSignals(), tenant="t1")  # revision 2, not placed
    await _roll(cluster, 24.0)  # revision 3
    async with cluster.unit_of_work() as uow:
        row = await uow.session.scalar(select(m.Deployment).where(m.Deployment.name == "svc"))
        version = row.resource_version
    async with cluster.unit_of_work() as uow:
        back = await updates.update_deployment(uow, WHO, SVC, version, RecordingSignals())  # revision 4: 16 GiB
    assert back.rolling and not any("replicas run this spec" in c for c in back.changes), back.changes


async def test_a_restart_retried_after_another_change_is_answered_not_refused(cluster: Database) -> None:
    await submit(cluster, SVC)

    async def restart() -> int:
        async with cluster.unit_of_work() as uow:
            return (await revisions.restart_deployment(uow, WHO, "svc", RecordingSignals(), tenant="t1",
                                                       request_id="r1")).deployment.revision

    assert await restart() == 2
    async with cluster.unit_of_work() as uow:
        await updates.update_deployment(uow, WHO, replace(SVC, replicas=3), 2, RecordingSignals())  # a scale
    assert await restart() == 2  # the first call's restart, not a second one
