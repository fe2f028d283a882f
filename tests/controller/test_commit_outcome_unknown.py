"""A reconciler's commit whose COMMIT outcome is unknown (`CommitOutcomeUnknown`: on PostgreSQL the
connection lost with the COMMIT in flight) may have landed or not. Watchers are told the
deployments it touched as they are stored once the database answers: placed (or gone) if it
landed, as before if not; never a state that is not stored. Without it a landed plan reached no
watcher at all: the next pass finds nothing to change, so publishes nothing.

The outcome is made unknown by `UnitOfWork.commit` raising `CommitOutcomeUnknown` after the real
commit ("landed") or instead of it ("lost": the unit of work is rolled back as it closes), as
`tests/controller/test_reconcile_fast.py` does; `tests/store/test_fenced_commit_loss.py` shows the
real connection loss raises it both ways.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from controller.domain.values import DeploymentEvent, DeploymentView
from controller.errors import AlreadyExists
from controller.reconcile import MIN_PUBLISH_RETRY_S, Reconciler, ViewReader
from controller.store import audit
from controller.store.db import Database, UnitOfWork
from controller.store.lease import CommitOutcomeUnknown
from controller.usecases import deployments, submits
from controller.usecases.deletes import DeleteBatcher
from controller.usecases.deployments import views_of
from controller.usecases.ports import RecordingSignals
from controller.usecases.submits import SubmitBatcher
from controller.usecases.watch import DeploymentEventBus
from maia.v1 import deployments_pb2
from tests.store.audited import through_the_audit_interceptor
from uc_builders import WHO, deployment, submit


class _Watched:
    """A reconciler publishing to an event bus as the controller does (`ControllerApp.
    _publish_deployments`: deleted views, then the changed ones as read by `read_views`), and one
    watcher's queue on it (what `WatchDeployments` streams)."""

    def __init__(self, db: Database, read_views: ViewReader = views_of, interval_s: float = 1.0) -> None:
        self.bus = DeploymentEventBus()
        self.queue = self.bus.subscribe()
        self.loop = Reconciler(db, push=lambda nodes: None, publish=self._publish, read_views=read_views,
                               interval_s=interval_s, solve_time_limit_ms=60_000, backoff_s=0.0)

    async def _publish(self, keys: set[str], deleted: list[DeploymentView], views: list[DeploymentView]) -> None:
        for view in deleted:
            self.bus.publish(DeploymentEvent("deleted", view))
        for view in views:
            self.bus.publish(DeploymentEvent("modified", view))

    async def heard(self) -> list[DeploymentEvent]:
        """What the watcher was told since the last call, once every publish started is done."""
        await self.loop.published()
        events = []
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events


def _commit_outcome_unknown(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool | None]:
    """The next unit of work's commit (once `armed["landed"]` is True or False) raises
    CommitOutcomeUnknown, having committed (True) or not (False)."""
    armed: dict[str, bool | None] = {"landed": None}
    real_commit = UnitOfWork.commit

    async def commit(self: UnitOfWork) -> None:
        landed, armed["landed"] = armed["landed"], None
        if landed is not False:
            await real_commit(self)
        if landed is not None:
            raise CommitOutcomeUnknown("test", ConnectionError("the connection was lost with the COMMIT in flight"))

    monkeypatch.setattr(UnitOfWork, "commit", commit)
    return armed


async def _stored(db: Database, key: str) -> DeploymentView | None:
    async with db.unit_of_work() as uow:
        found = await views_of(uow, {key})
    return found[0] if found else None


def _utc(at: datetime | None) -> datetime | None:
    """`at` in naive UTC (SQLite reads it back naive, PostgreSQL aware)."""
    return at if at is None or at.tzinfo is None else at.astimezone(timezone.utc).replace(tzinfo=None)


def _of(events: list[DeploymentEvent], key: str) -> list[DeploymentEvent]:
    return [e for e in events if e.deployment.spec.key == key]


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "lost"])
async def test_watchers_hear_a_plan_whose_commit_outcome_is_unknown_as_it_is_stored(cluster, monkeypatch, landed):
    """Both paths: the full one (first pass), then the fast one (a warm cache). Landed: the watcher
    is told the deployment placed, as stored. Lost: it is told nothing that is not stored (the
    deployment as it was, pending); the next pass places it and says so."""
    armed = _commit_outcome_unknown(monkeypatch)
    watched = _Watched(cluster)
    for name, warm in (("first", False), ("second", True)):
        key = f"t1/{name}"
        await submit(cluster, deployment(name, accelerators=4, locality="node"))
        assert (watched.loop.warm_snapshot is not None) == warm
        full_passes = watched.loop.full_passes
        armed["landed"] = landed
        with pytest.raises(CommitOutcomeUnknown):
            await watched.loop.reconcile_once()
        assert watched.loop.full_passes == full_passes + (0 if warm else 1)
        stored = await _stored(cluster, key)
        assert stored is not None and bool(stored.placements) == landed
        told = _of(await watched.heard(), key)
        assert told, "the watcher was told nothing of a commit that may have landed"
        assert all(e.type == "modified" and e.deployment == stored for e in told), (told, stored)

        await watched.loop.reconcile_once()  # the next pass (full: the cache was dropped) places it if it did not land
        placed = await _stored(cluster, key)
        assert placed is not None and placed.placements
        later = [e.deployment for e in _of(await watched.heard(), key)]
        if landed:  # nothing to change: whatever is said is the stored state
            assert all(view == placed for view in later), (later, placed)
        else:
            assert later == [placed]


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "lost"])
async def test_a_deletion_whose_commit_outcome_is_unknown_is_told_deleted_only_if_it_landed(
        cluster, monkeypatch, landed):
    """A pass's commit removes a deployment being deleted; its outcome is unknown. Landed: the row
    is gone and the watcher is told it was deleted (its last view). Lost: the row is still there,
    DELETING: no deleted event; the next pass removes it and says so."""
    armed = _commit_outcome_unknown(monkeypatch)
    watched = _Watched(cluster)
    await submit(cluster, deployment("gone", accelerators=2, locality="node"))
    await watched.loop.reconcile_once()
    async with cluster.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "gone", RecordingSignals())
    deleting = await _stored(cluster, "t1/gone")
    assert deleting is not None and deleting.phase == "deleting"
    await watched.heard()
    armed["landed"] = landed
    with pytest.raises(CommitOutcomeUnknown):
        await watched.loop.reconcile_once()
    assert (await _stored(cluster, "t1/gone") is None) == landed
    told = _of(await watched.heard(), "t1/gone")
    assert [e.type for e in told] == (["deleted"] if landed else [])
    await watched.loop.reconcile_once()
    assert await _stored(cluster, "t1/gone") is None
    later = _of(await watched.heard(), "t1/gone")
    assert [e.type for e in later] == ([] if landed else ["deleted"])



_DELETE, _SUBMIT = "/maia.v1.DeploymentService/DeleteDeployment", "/maia.v1.DeploymentService/SubmitDeployment"


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "lost"])
@pytest.mark.parametrize("call", ["batched delete", "batched submit", "lone delete"])
async def test_a_call_whose_commit_answer_was_lost_has_one_audit_entry(cluster, monkeypatch, call, landed):
    """The commit that carried a call's audit entry (a delete or submit batch, or the call's own
    unit of work) lands or not, and its answer is lost (`CommitOutcomeUnknown`). A batch's member
    then goes alone: it finds what landed (the deployment DELETING; the submit's request id, whose
    answer is replayed) and writes nothing, or writes it now; a lone call is answered UNAVAILABLE
    'may have landed'. Either way the call has ONE entry: the one that landed is not written again
    by the lone call's commit nor by the audit interceptor (by the entry's seq and hash)."""
    await submit(cluster, deployment("a"))
    armed = _commit_outcome_unknown(monkeypatch)
    method, request, key = _DELETE, deployments_pb2.DeleteDeploymentRequest(name="a", tenant="t1"), "t1/a"
    if call == "batched delete":
        batcher = DeleteBatcher(cluster, RecordingSignals())
        behaviour = lambda: batcher.delete(WHO, "a", "t1")
    elif call == "batched submit":
        batcher = SubmitBatcher(cluster, RecordingSignals())
        method, request, key = _SUBMIT, deployments_pb2.SubmitDeploymentRequest(
            spec=deployments_pb2.DeploymentSpec(name="b", tenant="t1"), client_request_id="retry-safe"), "t1/b"
        behaviour = lambda: batcher.submit(WHO, deployment("b"), request_id="retry-safe")
    else:
        behaviour = lambda: deployments.delete_deployment_alone(cluster, WHO, "a", RecordingSignals(), tenant="t1")
    armed["landed"] = landed
    try:
        await through_the_audit_interceptor(cluster, method, request, WHO, behaviour)
    except CommitOutcomeUnknown:
        assert call == "lone delete"
    else:
        assert call != "lone delete" and batcher.stats.alone == 1
    async with cluster.unit_of_work() as uow:
        entries = [e for e in await audit.list_entries(uow.session) if e.action == method]
        report = await audit.verify_chain(uow.session)
    expected = "UNAVAILABLE" if call == "lone delete" and not landed else "OK"
    assert [(e.object_id, e.outcome) for e in entries] == [(key, expected)]
    assert report.intact, report.problem

@pytest.mark.parametrize("landed", [True, False], ids=["landed", "lost"])
async def test_a_batched_submit_without_a_request_id_whose_commit_answer_was_lost_is_answered_its_deployment(
        cluster, monkeypatch, landed):
    """A submit without a request id; its batch's commit lands or not and its answer is lost. The
    member goes alone and is answered as a committed submit is: its deployment as stored (landed:
    the row its batch inserted, not ALREADY_EXISTS for it; lost: written now), told to watchers,
    with one audit entry, OK."""
    armed = _commit_outcome_unknown(monkeypatch)
    signals = RecordingSignals()
    batcher = SubmitBatcher(cluster, signals)
    request = deployments_pb2.SubmitDeploymentRequest(spec=deployments_pb2.DeploymentSpec(name="b", tenant="t1"))
    armed["landed"] = landed
    view = await through_the_audit_interceptor(cluster, _SUBMIT, request, WHO,
                                               lambda: batcher.submit(WHO, deployment("b")))
    assert batcher.stats.alone == 1
    stored = await _stored(cluster, "t1/b")
    assert stored is not None and (view.spec, view.phase, view.resource_version, _utc(view.created_at)) == (
        stored.spec, stored.phase, stored.resource_version, _utc(stored.created_at))
    assert [(e.type, e.deployment.spec.key) for e in signals.events] == [("added", "t1/b")]
    async with cluster.unit_of_work() as uow:
        entries = [e for e in await audit.list_entries(uow.session) if e.action == _SUBMIT]
    assert [(e.object_id, e.outcome) for e in entries] == [("t1/b", "OK")]


async def test_a_batched_submit_whose_lost_commit_did_not_land_is_refused_a_name_taken_since(cluster, monkeypatch):
    """The batch's commit did not land and its answer was lost; before its member goes alone,
    another call stores a deployment of the same name (on SQLite under the same id: the batch's
    was never kept). That row is not the member's: ALREADY_EXISTS, as for any name taken."""
    armed = _commit_outcome_unknown(monkeypatch)
    batcher = SubmitBatcher(cluster, RecordingSignals())
    batched = submits.outcome_or_alone

    async def then_taken(*args):  # noqa: ANN002
        outcome = await batched(*args)
        assert outcome is None  # the batch's commit raised: alone
        await submit(cluster, deployment("b", accelerators=2))
        return outcome
    monkeypatch.setattr(submits, "outcome_or_alone", then_taken)
    armed["landed"] = False
    with pytest.raises(AlreadyExists):
        await batcher.submit(WHO, deployment("b"))
    stored = await _stored(cluster, "t1/b")
    assert stored is not None and stored.spec.shard.accelerators == 2


async def test_a_publish_waits_for_the_database_to_answer(cluster, monkeypatch):
    """The read of what a commit of unknown outcome changed fails while the database does not
    answer (as it may right after the connection was lost): it is tried again until it answers,
    then the watcher is told the stored state."""
    armed = _commit_outcome_unknown(monkeypatch)
    failing = [2]  # the next two reads of the views fail as a refused connection does

    async def read_views(uow: UnitOfWork, keys: set[str]) -> list[DeploymentView]:
        if failing[0]:
            failing[0] -= 1
            raise OSError("connection refused")
        return await views_of(uow, keys)

    watched = _Watched(cluster, read_views, interval_s=0.0)  # tried again after the shortest wait
    await submit(cluster, deployment("svc", accelerators=4, locality="node"))
    armed["landed"] = True
    with pytest.raises(CommitOutcomeUnknown):
        await watched.loop.reconcile_once()
    told = _of(await watched.heard(), "t1/svc")
    assert failing == [0]
    stored = await _stored(cluster, "t1/svc")
    assert stored is not None and stored.placements
    assert [e.deployment for e in told] == [stored]


class _LeadsOnce:
    """A lease held for the first pass only (a controller following after it): the run loop then
    waits between passes, where the controller's stop finds it."""

    def __init__(self) -> None:
        self.passes = 0

    def should_run(self) -> bool:
        self.passes += 1
        return self.passes == 1


def _publishes_running() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "Publisher._publish_after"]


@pytest.mark.parametrize("own_thread", [False, True], ids=["controller_loop", "own_thread"])
async def test_a_publish_waiting_out_a_database_outage_ends_with_the_reconciler(cluster, own_thread, monkeypatch):
    """A publish whose read fails while the database does not answer is tried again until it
    answers (`Publisher._read_stored`); the reconciler stopped meanwhile (its `run` cancelled, as
    `ControllerApp.stop` does before it disposes the engine), the publish is cancelled and waited
    for with it: no read of the database after the stop. (On its own thread the publishes run on
    that thread's loop, cancelled before its engine is disposed; not among this loop's tasks. Its
    loop's runner would cancel them too as it closes, after that engine was disposed: the publishes
    running on the disposing loop are looked at then.)"""
    at_dispose: list[list[asyncio.Task]] = []
    dispose = Database.dispose

    async def disposing(db: Database) -> None:
        at_dispose.append(_publishes_running())
        await dispose(db)
    monkeypatch.setattr(Database, "dispose", disposing)
    reads: list[set[str]] = []

    async def read_views(uow: UnitOfWork, keys: set[str]) -> list[DeploymentView]:
        reads.append(keys)
        raise OSError("connection refused")

    published: list[tuple] = []

    async def publish(*args) -> None:  # noqa: ANN002
        published.append(args)

    loop = Reconciler(cluster, push=lambda nodes: None, publish=publish, read_views=read_views, lease=_LeadsOnce(),
                      interval_s=MIN_PUBLISH_RETRY_S, solve_time_limit_ms=60_000, backoff_s=0.0, own_thread=own_thread)
    await submit(cluster, deployment("svc", accelerators=4, locality="node"))
    running = asyncio.create_task(loop.run())
    loop.wake()
    for _ in range(1000):  # the pass committed; its publish tries again while the database is down
        if len(reads) >= 2:
            break
        await asyncio.sleep(0.01)
    assert len(reads) >= 2 and reads[0] == {"t1/svc"} and bool(_publishes_running()) is not own_thread
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert _publishes_running() == []
    stopped_at = len(reads)
    await asyncio.sleep(10 * MIN_PUBLISH_RETRY_S)  # past the next tries it would have made
    assert len(reads) == stopped_at and published == []
    assert at_dispose == ([[]] if own_thread else [])  # the thread's engine, disposed once its publishes ended
