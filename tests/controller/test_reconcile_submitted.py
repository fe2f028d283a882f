"""The quarantine's judge and what this process's submit batches validated
(`usecases.submits.SubmittedRows`): a fast pass does not check against the limits again what a
submit batch here checked and inserted, read as inserted; everything else it judges as before: a
row another controller wrote under a key submitted here, a row updated since (another controller's
limits), a pass without the record."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import delete, select, update

from controller.reconcile import Reconciler
from controller.scheduling import quarantine
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.snapshot import inserted_row
from controller.usecases.ports import RecordingSignals
from controller.usecases.submits import SubmitBatcher, SubmittedRows
from uc_builders import WHO, deployment, no_publish

BEYOND = 10**6  # replicas: beyond `limits.REPLICAS_MAX`, as a controller with other limits could store


def _judged(monkeypatch: Any) -> list[str]:
    """The names the quarantine validates from now on."""
    names: list[str] = []
    validate = quarantine.validate_spec

    def counting(spec: Any) -> None:
        names.append(spec.name)
        validate(spec)
    monkeypatch.setattr(quarantine, "validate_spec", counting)
    return names


async def _warm(db: Database, submitted: SubmittedRows) -> tuple[Reconciler, SubmitBatcher]:
    """A reconciler past its first (full) pass, and a submit batcher, sharing `submitted`."""
    loop = Reconciler(db, push=lambda nodes: None, publish=no_publish, backoff_s=0.0, submitted=submitted)
    batcher = SubmitBatcher(db, RecordingSignals(), submitted=submitted)
    await batcher.submit(WHO, deployment("first", locality="node"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 0
    return loop, batcher


async def _phase(db: Database, name: str) -> m.DeploymentPhase:
    async with db.unit_of_work() as uow:
        return (await uow.session.execute(select(m.Deployment.phase).where(m.Deployment.name == name))).scalar_one()


async def test_a_fast_pass_does_not_judge_again_what_a_submit_batch_here_validated(cluster, monkeypatch):
    submitted = SubmittedRows()
    loop, batcher = await _warm(cluster, submitted)
    judged = _judged(monkeypatch)
    await batcher.submit(WHO, deployment("a", locality="node"))
    await batcher.submit(WHO, deployment("b", locality="node"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 1
    assert judged == []
    async with cluster.unit_of_work() as uow:
        placed = {name for (name,) in await uow.session.execute(
            select(m.Deployment.name).join(m.Placement))}
    assert {"a", "b"} <= placed
    assert submitted.take(["t1/a", "t1/b"]) == {}  # taken by the pass

    # Without the record (another controller's submits, a record forgotten): judged as before.
    await batcher.submit(WHO, deployment("c", locality="node"))
    assert "t1/c" in submitted.take(["t1/c"])
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 2
    assert judged == ["c"]


async def test_a_row_updated_since_its_submit_here_is_judged(cluster, monkeypatch):
    """Another controller (other limits) updated it before the pass read it: its resource version
    moved, so the pass checks it, and sets it aside."""
    submitted = SubmittedRows()
    loop, batcher = await _warm(cluster, submitted)
    judged = _judged(monkeypatch)
    await batcher.submit(WHO, deployment("grown", locality="node"))
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "grown")
                                  .values(replicas=BEYOND, resource_version=m.Deployment.resource_version + 1))
        await uow.commit()
    await loop.reconcile_once()
    assert "grown" in judged
    assert await _phase(cluster, "grown") == m.DeploymentPhase.QUARANTINED


async def test_a_row_another_controller_wrote_under_a_key_submitted_here_is_judged(cluster, monkeypatch):
    """Submitted here, deleted, stored again by another controller (other limits) before a pass
    read either: another row (primary key), judged, and set aside."""
    submitted = SubmittedRows()
    loop, batcher = await _warm(cluster, submitted)
    judged = _judged(monkeypatch)
    await batcher.submit(WHO, deployment("again", locality="node"))
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(delete(m.Deployment).where(m.Deployment.name == "again"))
        uow.session.add(repo.new_deployment_row(deployment("again", replicas=BEYOND, locality="node")))
        await uow.commit()
    await loop.reconcile_once()
    assert "again" in judged
    assert await _phase(cluster, "again") == m.DeploymentPhase.QUARANTINED


def test_submitted_rows_are_taken_once_and_the_oldest_forgotten_beyond_the_bound() -> None:
    at = datetime(2026, 12, 2, tzinfo=timezone.utc)
    submitted = SubmittedRows(most=2)
    submitted.add([("t/a", inserted_row(1, at)), ("t/b", inserted_row(2, at))])
    submitted.add([("t/c", inserted_row(3, at))])
    assert len(submitted) == 2
    assert submitted.take(["t/a", "t/b"]) == {"t/b": inserted_row(2, at)}  # t/a forgotten: judged as before
    assert submitted.take(["t/b"]) == {}  # taken once
    assert submitted.take(["t/c"]) == {"t/c": inserted_row(3, at.replace(tzinfo=None))}  # as SQLite reads it back
