"""Group commit of submits (usecases/submits.py): a batch checks its members and writes those
that pass in one transaction, with one event and one audit entry each; refuses with the lone
submit's own error what it can judge (the submit rate, a spec no node could run), and hands
every other member back to the lone submit, which gives it the answer it would have had alone."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import func, select, update

from controller import limits
from controller.domain.values import Spread
from controller.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from controller.ratelimit import KeyedRateLimiter, SubmitLimits
from controller.store import audit
from controller.store import models as m
from controller.store import pg_driver, sqlite_driver
from controller.store.audit import AuditRecord, CallEntry
from controller.store.turns import WritePriority
from controller.usecases import deployments, submits
from controller.usecases.capacity import CapacityCache
from controller.usecases.deployments import views_of
from controller.usecases.ports import RecordingSignals
from controller.usecases.submits import Queued, SubmitBatcher
from maia.v1 import deployments_pb2
from tests.store.audited import through_the_audit_interceptor
from uc_builders import WHO, add_tenant, appended_elsewhere, batch_priorities, deployment


def _queued(name: str, tenant: str = "t1", request_id: str = "", **spec: Any) -> Queued:
    record = AuditRecord(actor="tester", action="/maia.v1.DeploymentService/SubmitDeployment", tenant=tenant,
                         object_kind="deployment", object_id=f"{tenant}/{name}")
    return Queued(deployment(name, tenant, **spec), request_id, "tester", CallEntry(record, None))


async def _count(db, model) -> int:
    async with db.unit_of_work() as uow:
        return int(await uow.session.scalar(select(func.count()).select_from(model)) or 0)


async def test_a_batch_writes_the_members_nothing_changed_for_and_hands_back_the_rest(cluster):
    signals = RecordingSignals()
    batcher = SubmitBatcher(cluster, signals)
    async with cluster.unit_of_work() as uow:  # taken since the checks ran
        await batcher.submit(WHO, deployment("taken"), request_id="used-before")
    events, entries = await _count(cluster, m.Event), await _count(cluster, m.AuditEntry)
    batch = [_queued("a"), _queued("b", request_id="r-b"), _queued("a"),  # the same name twice
             _queued("taken"), _queued("c", request_id="used-before"),   # a name taken, an id used
             _queued("d", request_id="r-b")]                             # an id used earlier in the batch
    views = await batcher.commit_batch(batch)

    assert [q.spec.name for q in batch if id(q) in views] == ["a", "b"]
    assert [q.call.written for q in batch] == [True, True, False, False, False, False]
    assert await _count(cluster, m.Event) == events + 2
    assert await _count(cluster, m.AuditEntry) == entries + 2
    assert [e.type for e in signals.events][-2:] == ["added", "added"] and signals.wakes == 2
    async with cluster.unit_of_work() as uow:
        assert (await audit.verify_chain(uow.session)).intact
        assert await uow.session.get(m.ClientRequest, ("t1", "r-b")) is not None


async def test_a_batch_stops_at_the_tenants_deployment_limit(cluster, monkeypatch):
    monkeypatch.setattr(limits, "DEPLOYMENTS_PER_TENANT_MAX", 3)
    await add_tenant(cluster, "t2")
    batcher = SubmitBatcher(cluster, RecordingSignals())
    batch = [_queued(f"x{i}") for i in range(5)] + [_queued("y", "t2")]
    views = await batcher.commit_batch(batch)
    assert sorted(q.spec.key for q in batch if id(q) in views) == ["t1/x0", "t1/x1", "t1/x2", "t2/y"]


async def test_concurrent_submits_each_get_the_answer_they_would_get_alone(cluster, monkeypatch):
    monkeypatch.setattr(limits, "DEPLOYMENTS_PER_TENANT_MAX", 5)
    await add_tenant(cluster, "t2")
    batcher = SubmitBatcher(cluster, RecordingSignals())
    calls = [("t1", "dup", ""), ("t1", "dup", ""), ("t1", "replayed", "rid-1"), ("t1", "replayed", "rid-1")] + \
            [("t2", f"n{i}", "") for i in range(7)]
    results = await asyncio.gather(*(batcher.submit(WHO, deployment(name, tenant), request_id=rid)
                                     for tenant, name, rid in calls), return_exceptions=True)
    by_name: dict[str, list] = {}
    for (_, name, _), result in zip(calls, results):
        by_name.setdefault(name.rstrip("0123456789") if name.startswith("n") else name, []).append(result)
    assert sorted(type(r).__name__ for r in by_name["dup"]) == ["AlreadyExists", "DeploymentView"]
    assert [type(r).__name__ for r in by_name["replayed"]] == ["DeploymentView"] * 2  # one write, two answers
    assert sorted(type(r).__name__ for r in by_name["n"]) == ["DeploymentView"] * 5 + ["ResourceExhausted"] * 2
    assert await _count(cluster, m.Deployment) == 7
    async with cluster.unit_of_work() as uow:
        assert (await audit.verify_chain(uow.session)).intact


async def test_a_batch_that_cannot_commit_writes_nothing_and_each_goes_alone(cluster, monkeypatch):
    batcher = SubmitBatcher(cluster, RecordingSignals())

    async def failing_append(*args, **kwargs):
        raise RuntimeError("the audit chain could not be appended to")

    monkeypatch.setattr(submits.audit, "append_calls", failing_append)
    with pytest.raises(RuntimeError):
        await batcher.commit_batch([_queued("good"), _queued("good2")])
    assert await _count(cluster, m.Deployment) == 0
    monkeypatch.undo()
    results = await asyncio.gather(batcher.submit(WHO, deployment("good")),
                                   batcher.submit(WHO, deployment("good2")), return_exceptions=True)
    assert [r.spec.name for r in results] == ["good", "good2"]


def _failing_once(batcher: SubmitBatcher) -> None:
    """The batcher's first batch does not commit (a transient failure): every member goes alone."""
    commit = batcher.commit_batch
    failed: list[bool] = []

    async def fail_once(batch):  # noqa: ANN001, ANN202
        if not failed:
            failed.append(True)
            raise RuntimeError("the batch's commit failed")
        return await commit(batch)

    batcher.commit_batch = fail_once  # type: ignore[method-assign]


async def test_members_of_a_failed_batch_go_alone_one_after_another(cluster, monkeypatch):
    """Handed back at once, each checked the tenant's deployment cap and the name, then wrote,
    with nothing to keep the others from doing the same meanwhile: four at a cap of two all
    wrote, and twins got an IntegrityError (INTERNAL) instead of ALREADY_EXISTS. As if they had
    come one after the other: two of the four are refused, one twin is written."""
    monkeypatch.setattr(limits, "DEPLOYMENTS_PER_TENANT_MAX", 2)
    batcher = SubmitBatcher(cluster, RecordingSignals())
    await batcher.submit(WHO, deployment("first"))
    _failing_once(batcher)
    results = await asyncio.gather(*(batcher.submit(WHO, deployment(f"x{i}")) for i in range(4)),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["DeploymentView", "ResourceExhausted", "ResourceExhausted",
                                                          "ResourceExhausted"]
    assert await _count(cluster, m.Deployment) == 2
    _failing_once(batcher)
    monkeypatch.setattr(limits, "DEPLOYMENTS_PER_TENANT_MAX", 10)
    twins = await asyncio.gather(*(batcher.submit(WHO, deployment("twin")) for _ in range(4)), return_exceptions=True)
    assert sorted(type(r).__name__ for r in twins) == ["AlreadyExists"] * 3 + ["DeploymentView"]


async def test_a_batch_written_while_a_submit_is_decided_alone_waits_for_it(cluster, monkeypatch):
    """A member of a batch that did not commit checked the tenant's cap alone, then the next
    batch counted the tenant's deployments and wrote before the lone submit wrote: at a cap of
    two with one stored, both were written. The batch waits for the tenant's lone submit now."""
    monkeypatch.setattr(limits, "DEPLOYMENTS_PER_TENANT_MAX", 2)
    batcher = SubmitBatcher(cluster, RecordingSignals())
    await batcher.submit(WHO, deployment("first"))
    checked, go = asyncio.Event(), asyncio.Event()
    admit = deployments.admit

    async def checked_then_held(*args, **kwargs):  # the lone submit's checks, then a pause before its write
        admitted = await admit(*args, **kwargs)
        if not checked.is_set():
            checked.set()
            await go.wait()
        return admitted

    monkeypatch.setattr(deployments, "admit", checked_then_held)
    _failing_once(batcher)
    alone = asyncio.create_task(batcher.submit(WHO, deployment("alone")))
    await checked.wait()
    batched = asyncio.create_task(batcher.submit(WHO, deployment("batched")))
    for _ in range(20):  # the next batch's writer runs as far as it may
        await asyncio.sleep(0.01)
    go.set()
    results = await asyncio.gather(alone, batched, return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["DeploymentView", "ResourceExhausted"]
    assert await _count(cluster, m.Deployment) == 2


@pytest.mark.parametrize("commits", [True, False])
async def test_a_submit_answered_late_is_audited_once_its_batch_ended(cluster, monkeypatch, commits):
    """Answered UNAVAILABLE (its batch had not committed in time, and may still land it), the call
    was audited UNAVAILABLE at once, and then OK by the batch that wrote it: two entries."""
    batcher = SubmitBatcher(cluster, RecordingSignals(), spacing=None)
    release, commit_batch = asyncio.Event(), batcher.commit_batch

    async def held(batch):
        await release.wait()
        if not commits:
            raise RuntimeError("this batch could not commit")
        return await commit_batch(batch)

    monkeypatch.setattr(batcher, "commit_batch", held)
    with pytest.raises(Unavailable, match="had not committed"):
        await through_the_audit_interceptor(
            cluster, "/maia.v1.DeploymentService/SubmitDeployment", deployments_pb2.SubmitDeploymentRequest(), WHO,
            lambda: batcher.submit(WHO, deployment("late"), time_left_s=0.5))
    release.set()
    while any(t.get_name() in ("submit-batches", "audit-after-batch") for t in asyncio.all_tasks()):
        await asyncio.sleep(0.01)
    async with cluster.unit_of_work() as uow:
        outcomes = [e.outcome for e in await audit.list_entries(uow.session, limit=100)
                    if e.action.endswith("/SubmitDeployment")]
    assert outcomes == (["OK"] if commits else ["UNAVAILABLE"])


def _throttle(per_minute: float) -> SubmitLimits:
    return SubmitLimits(submits=KeyedRateLimiter(per_minute, "submits"), dry_runs=KeyedRateLimiter(0, "dry runs"))


async def test_a_batch_refuses_what_a_lone_submit_refuses_and_writes_the_others(cluster):
    """A spec no node could run and a tenant past its submit rate are refused by the batch with
    the lone submit's errors; a tenant that does not exist is answered by the lone submit."""
    await add_tenant(cluster, "t2")
    batcher = SubmitBatcher(cluster, RecordingSignals())
    throttle, capacity = _throttle(2), CapacityCache()
    batch = [replace(_queued("a"), throttle=throttle, capacity=capacity),
             replace(_queued("huge"), spec=deployment("huge", accelerators=8), throttle=throttle, capacity=capacity),
             replace(_queued("b"), throttle=throttle, capacity=capacity),  # t1's third submit: over its rate
             replace(_queued("c", "t2"), throttle=throttle, capacity=capacity),
             replace(_queued("d", "nobody"), throttle=throttle, capacity=capacity)]
    outcomes = await batcher.commit_batch(batch)

    assert [type(outcomes.get(id(q))).__name__ for q in batch] == [
        "DeploymentView", "InvalidArgument", "ResourceExhausted", "DeploymentView", "NoneType"]
    assert "the largest node has 4" in str(outcomes[id(batch[1])])
    assert [q.call.written for q in batch] == [True, False, False, True, False]
    assert [q.charged for q in batch] == [True, True, False, True, False]  # "d" is charged by its lone submit
    assert await _count(cluster, m.Deployment) == 2


async def test_a_member_handed_back_is_charged_the_submit_rate_once(cluster):
    """A name taken goes alone after the batch charged its tenant's rate: the lone submit does not
    charge it again (with a rate of 2, the third call is the first refused)."""
    batcher = SubmitBatcher(cluster, RecordingSignals())
    throttle = _throttle(2)
    await batcher.submit(WHO, deployment("a"), throttle=throttle)
    with pytest.raises(AlreadyExists):
        await batcher.submit(WHO, deployment("a"), throttle=throttle)
    with pytest.raises(ResourceExhausted):
        await batcher.submit(WHO, deployment("b"), throttle=throttle)
    with pytest.raises(NotFound):
        await batcher.submit(WHO, deployment("x", "nobody"), throttle=throttle)
    with pytest.raises(InvalidArgument):
        await batcher.submit(WHO, deployment("y", shards=3, replicas=0), throttle=throttle)


async def test_a_batch_reads_names_and_request_ids_per_tenant_and_writes_each_row_under_its_own_id(cluster):
    """A name or a request id taken in another tenant does not count against this one; the
    deployments written in one statement each get their own id (their request ids point at them,
    the views answered are the rows as stored, whatever optional fields their specs hold)."""
    await add_tenant(cluster, "t2")
    batcher = SubmitBatcher(cluster, RecordingSignals())
    await batcher.submit(WHO, deployment("x", "t2"), request_id="r-1")
    batch = [_queued("x", "t1", request_id="r-1", shard_accelerator_models=("maia-100",), priority=3),
             _queued("y", "t2", request_id="r-2", replicas=2, spread=Spread("rack", 1), shard_accelerator_models=()),
             _queued("x", "t2", request_id="r-3"),  # taken in t2: goes alone
             _queued("z", "t1", request_id="r-2", locality="row", preemptible=True)]  # r-2 is t2's, not t1's
    outcomes = await batcher.commit_batch(batch)
    assert [id(q) in outcomes for q in batch] == [True, True, False, True]
    async with cluster.unit_of_work() as uow:
        s = uow.session
        ids = {(r.tenant_id, r.name): r.id for r in await s.scalars(select(m.Deployment))}
        requests = {(r.tenant_id, r.request_id): r.deployment_id for r in await s.scalars(select(m.ClientRequest))}
        stored = {view.spec.key: view for view in await views_of(uow, {"t1/x", "t2/y", "t1/z"})}
    assert requests == {("t2", "r-1"): ids[("t2", "x")], ("t1", "r-1"): ids[("t1", "x")],
                        ("t2", "r-2"): ids[("t2", "y")], ("t1", "r-2"): ids[("t1", "z")]}
    for q in batch[:2] + batch[3:]:
        answered = outcomes[id(q)]
        assert replace(answered, created_at=None, updated_at=None) == \
            replace(stored[q.spec.key], created_at=None, updated_at=None)
        assert answered.phase == "pending" and answered.resource_version == 1


class _Stages:
    def __init__(self) -> None:
        self.seen: list[submits.SubmitStages] = []

    def submit_staged(self, stages: submits.SubmitStages) -> None:
        self.seen.append(stages)


async def test_a_batched_submit_tells_where_its_time_went_the_writer_turn_included(cluster, monkeypatch):
    observer = _Stages()
    batcher = SubmitBatcher(cluster, RecordingSignals(), observer=observer)
    await batcher.submit(WHO, deployment("a"))
    assert len(observer.seen) == 1 and observer.seen[0].writer_turn == 0.0  # the writer was free
    if not cluster.is_sqlite:
        return  # SQLite's writer turns only
    writing = asyncio.Event()
    insert = submits.repo.insert_deployments

    async def noted_insert(*args, **kwargs):
        writing.set()  # its first write statement waits for the writer's turn next
        return await insert(*args, **kwargs)

    monkeypatch.setattr(submits.repo, "insert_deployments", noted_insert)
    async with cluster.unit_of_work() as holder:  # another transaction holds the writer
        await holder.session.execute(update(m.Tenant).where(m.Tenant.id == "nobody").values(max_accelerators=1))
        submitted = asyncio.create_task(batcher.submit(WHO, deployment("b")))
        await writing.wait()
        await asyncio.sleep(0.1)
        assert not submitted.done()  # waiting for the writer
        await holder.commit()
    await submitted
    assert len(observer.seen) == 2
    stages = observer.seen[-1]
    assert stages.writer_turn >= 0.1 and all(seconds >= 0.0 for _, seconds in stages.items())


async def test_a_batch_takes_its_turn_at_the_writer_before_reports_and_passes(cluster, monkeypatch):
    batcher = SubmitBatcher(cluster, RecordingSignals())
    priorities = batch_priorities(batcher, monkeypatch)
    await batcher.submit(WHO, deployment("a", "t1"))
    assert priorities == [WritePriority.ANSWER]


async def test_a_batch_keeps_the_writer_from_passes_and_reports_while_it_reads(cluster, monkeypatch):
    """On SQLite a plan commit or a report flush asking for a free writer during a batch's read
    waits for the batch's transaction (`WriterTurns.intend`), not the batch for theirs."""
    turns = cluster.turns
    if turns is None:
        return  # SQLite's writer turns only
    batcher = SubmitBatcher(cluster, RecordingSignals())
    reads = submits.repo.submit_batch_reads
    kept: list[bool] = []

    async def noted_reads(*args, **kwargs):
        kept.append(turns.answering())  # no ANSWER writer holds or waits for the writer: the batch's intent
        return await reads(*args, **kwargs)

    monkeypatch.setattr(submits.repo, "submit_batch_reads", noted_reads)
    await batcher.submit(WHO, deployment("a"))
    assert kept == [True]  # on its way while it read
    assert not turns.answering()  # taken back


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_batch_holds_sqlites_writer_for_one_trip_its_commit(cluster):
    """On SQLite a batch chooses its deployments' ids from its read (above every id SQLite ever
    gave), so its deployments' INSERT reads nothing back: it goes, with every other write (the old
    request ids' DELETE, the request ids, the events, the audit head's compare and set and the
    entries), with its COMMIT. One trip to SQLite's thread while it holds the writer, where a busy
    event loop made each cost milliseconds (two before, the INSERT reading the ids back, and the
    COMMIT: docs/benchmarks.md, `p99c`, `p99tail`)."""
    batcher = SubmitBatcher(cluster, RecordingSignals())
    capacity = CapacityCache()
    await batcher.commit_batch([replace(_queued("w"), capacity=capacity)])  # the audit head this process wrote: known
    with sqlite_driver.counted_trips() as trips:
        outcomes = await batcher.commit_batch([replace(_queued("a"), capacity=capacity),
                                               replace(_queued("b", request_id="r-b"), capacity=capacity)])
    assert len(outcomes) == 2
    assert [trip.statement for trip in trips][1:] == ["COMMIT"]  # after the batch's one read
    assert trips[1].deferred >= 4  # the deployments, the request ids, the events, the audit entries
    async with cluster.unit_of_work() as uow:
        report = await audit.verify_chain(uow.session)
        assert [e.object_id for e in await audit.list_entries(uow.session)] == ["t1/w", "t1/a", "t1/b"]
        ids = {name: id_ for id_, name in await uow.session.execute(select(m.Deployment.id, m.Deployment.name))}
        request = await uow.session.get(m.ClientRequest, ("t1", "r-b"))
        assert request is not None and request.deployment_id == ids["b"]
    assert report.intact and report.entries == 3
    assert [ids["a"], ids["b"]] == [ids["w"] + 1, ids["w"] + 2]
    assert batcher.written_again == 0


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_batch_takes_one_read_and_three_trips_on_postgresql(cluster):
    """A submit batch's round trips on PostgreSQL, with request ids or without: its one read
    (which also takes its deployments' ids from the sequence), then BEGIN with the deployments'
    INSERT in its message (`marks.deferred_writes`: it reads nothing back), the audit head moved
    with its entries and, in the same statement, the events, the request ids and the DELETE of the
    tenants' expired ones (`audit.append(along=)`), then COMMIT. Five before (BEGIN and the INSERT
    reading its ids back apart), eight before that, with request ids (`docs/benchmarks.md`,
    `pgtrips`, `pgscript`)."""
    batcher = SubmitBatcher(cluster, RecordingSignals())
    capacity = CapacityCache()
    for warm in (["w0"], ["w1", "w2"]):  # its statements prepared on this connection (the pool's LIFO)
        await batcher.commit_batch([replace(_queued(name, request_id=f"r-{name}"), capacity=capacity)
                                    for name in warm])
    for named in ([("a", "r-a"), ("b", "r-b"), ("c", "r-c")], [("d", ""), ("e", "")]):
        with pg_driver.counted_trips() as trips:
            outcomes = await batcher.commit_batch([replace(_queued(name, request_id=rid), capacity=capacity)
                                                   for name, rid in named])
        assert len(outcomes) == len(named)
        assert [(t.kind, t.statement) for t in trips if t.kind != "prepare"] == [
            ("execute", "SELECT tenants.id, tenants.zones,"), ("query", "BEGIN; INSERT INTO"),
            ("execute", "WITH along0_ AS"), ("query", "COMMIT")]
    assert batcher.written_again == 0
    async with cluster.unit_of_work() as uow:
        report = await audit.verify_chain(uow.session)
        ids = {name: id_ for id_, name in await uow.session.execute(select(m.Deployment.id, m.Deployment.name))}
        requests = {r.request_id: (r.deployment_id, r.deployment_name, r.action) for r in (await uow.session.scalars(
            select(m.ClientRequest))).all()}
        events = [(e.kind, e.object_id) for e in (await uow.session.scalars(
            select(m.Event).where(m.Event.object_kind == "deployment").order_by(m.Event.id))).all()]
    assert report.intact and report.entries == 8
    assert requests == {f"r-{name}": (ids[name], name, "submit") for name in ("w0", "w1", "w2", "a", "b", "c")}
    assert events == [("deployment.submitted", f"t1/{name}") for name in ("w0", "w1", "w2", "a", "b", "c", "d", "e")]


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_batch_never_gives_the_id_of_a_deployment_deleted_since(cluster):
    """The ids a batch chooses are above every id SQLite's AUTOINCREMENT ever gave (its
    `sqlite_sequence`), not only above those the table holds: the id of the newest deployment,
    deleted, names no other (migration 0024's promise, kept by the batch's own ids)."""
    batcher = SubmitBatcher(cluster, RecordingSignals())
    await batcher.commit_batch([_queued("old")])
    async with cluster.unit_of_work() as uow:
        old = await uow.session.scalar(select(m.Deployment.id).where(m.Deployment.name == "old"))
        await uow.session.execute(m.Deployment.__table__.delete().where(m.Deployment.__table__.c.id == old))
        await uow.commit()
    await batcher.commit_batch([_queued("new")])
    async with cluster.unit_of_work() as uow:
        new = await uow.session.scalar(select(m.Deployment.id).where(m.Deployment.name == "new"))
    assert new == old + 1


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_batch_whose_chosen_id_was_taken_since_its_read_is_written_again_with_the_databases_ids(
        cluster, monkeypatch):
    """Another transaction (a submit gone alone) inserts a deployment after the batch read the
    next id and before it committed: the batch's INSERT meets the primary key, nothing of it is
    written, and it is read, checked and written once more with the ids SQLite gives. Every
    member is answered by the batch (none goes alone), each request id names its own deployment,
    and the audit chain holds one entry each."""
    batcher = SubmitBatcher(cluster, RecordingSignals())
    reads = submits.repo.submit_batch_reads
    interloped: list[int] = []

    async def read_then_another_inserts(*args, **kwargs):
        facts = await reads(*args, **kwargs)
        if not interloped:
            async with cluster.unit_of_work() as uow:
                row = submits.repo.new_deployment_row(deployment("lone"))
                uow.session.add(row)
                await uow.commit()
                interloped.append(row.id)
        return facts

    monkeypatch.setattr(submits.repo, "submit_batch_reads", read_then_another_inserts)
    outcomes = await batcher.commit_batch([_queued("a"), _queued("b", request_id="r-b")])
    assert sorted(view.spec.name for view in outcomes.values()) == ["a", "b"]
    assert batcher.written_again == 1
    async with cluster.unit_of_work() as uow:
        ids = {name: id_ for id_, name in await uow.session.execute(select(m.Deployment.id, m.Deployment.name))}
        request = await uow.session.get(m.ClientRequest, ("t1", "r-b"))
        assert request is not None and request.deployment_id == ids["b"]
        report = await audit.verify_chain(uow.session)
        entries = [e.object_id for e in await audit.list_entries(uow.session)]
    assert ids["lone"] == interloped[0] and ids["a"] > ids["lone"] and ids["b"] > ids["lone"]
    assert report.intact and entries == ["t1/a", "t1/b"]


async def test_a_batch_behind_a_stale_audit_head_is_answered_whole_with_one_chain(cluster):
    """The audit head this process wrote last is not the database's (another process appended
    since). On SQLite the batch's compare and set, which reads nothing back, misses and fails the
    batch whole (nothing written: `audit.head_missed`), and the batch is written once more reading
    the head (before, every member went alone); on PostgreSQL the compare and set reads back and
    the head is read in place. Either way its members are answered by it (none goes alone), each
    with its own audit entry in one chain, and the batch after links to the database's head."""
    batcher = SubmitBatcher(cluster, RecordingSignals())
    await appended_elsewhere(cluster)

    async def submit_in_a_call(name: str):
        call = _queued(name).call
        audit.open_call(call.record)
        return await batcher.submit(WHO, deployment(name))

    results = await asyncio.gather(submit_in_a_call("a"), submit_in_a_call("b"))
    assert [r.spec.name for r in results] == ["a", "b"]
    again = 1 if cluster.is_sqlite else 0
    assert (batcher.stats.alone, batcher.written_again) == (0, again)
    await asyncio.create_task(submit_in_a_call("c"))
    assert (batcher.stats.alone, batcher.written_again) == (0, again)
    async with cluster.unit_of_work() as uow:
        report = await audit.verify_chain(uow.session)
        written = [e.object_id for e in await audit.list_entries(uow.session)]
    assert report.intact and report.entries == 5
    assert sorted(written[2:4]) == ["t1/a", "t1/b"] and written[4] == "t1/c"
    assert await _count(cluster, m.Deployment) == 3


async def test_a_batch_forgets_the_tenants_old_request_ids_of_deleted_deployments_and_keeps_the_rest(cluster):
    """The old request ids' DELETE goes with the batch's COMMIT on SQLite (deferred, its count
    unread), and in the audit append's statement on PostgreSQL: it is run, not lost. After a
    batch records a request id, the tenant's ids of deployments deleted before the retention are
    gone; an id as old whose deployment stands is kept (its retry is answered with that
    deployment, never submitted twice), and so is another tenant's."""
    from datetime import timedelta

    from sqlalchemy import delete

    await add_tenant(cluster, "t2")
    batcher = SubmitBatcher(cluster, RecordingSignals())
    await batcher.commit_batch([_queued("gone", request_id="r-gone"), _queued("kept", request_id="r-kept"),
                                _queued("gone", "t2", request_id="r-gone")])
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(delete(m.Deployment).where(m.Deployment.name == "gone"))
        await uow.session.execute(update(m.ClientRequest).values(
            created_at=m.utcnow() - timedelta(seconds=limits.REQUEST_ID_RETENTION_S + 60)))
        await uow.commit()
    outcomes = await batcher.commit_batch([_queued("new", request_id="r-new")])
    assert len(outcomes) == 1
    async with cluster.unit_of_work() as uow:
        kept = {(r.tenant_id, r.request_id) for r in await uow.session.scalars(select(m.ClientRequest))}
    assert kept == {("t1", "r-kept"), ("t1", "r-new"), ("t2", "r-gone")}
    again = await batcher.submit(WHO, deployment("kept"), request_id="r-kept")
    assert again.spec.name == "kept" and await _count(cluster, m.Deployment) == 2


async def test_a_batch_checks_its_members_against_others_reservations_itself(cluster, monkeypatch):
    """Where another tenant reserves, non-preemptible members went alone, each with its own
    transaction and two reads of the placements (found in review: reservations are a
    multi-tenant cluster's normal state). The batch reads the figures once and refuses what
    would take owed capacity, as the lone submit does, counting what its members before took."""
    from controller.errors import FailedPrecondition

    await add_tenant(cluster, "t2", reserved_accelerators=4.0)  # owed 4 of the 16 free
    reads = []
    real = submits.owed_capacity

    async def counted(uow):  # noqa: ANN001, ANN202
        reads.append(1)
        return await real(uow)

    monkeypatch.setattr(submits, "owed_capacity", counted)
    batcher = SubmitBatcher(cluster, RecordingSignals())
    batch = [replace(_queued("a"), who=WHO), replace(_queued("b"), who=WHO),
             replace(_queued("big", replicas=13), who=WHO), replace(_queued("burst", replicas=13, preemptible=True), who=WHO)]
    outcomes = await batcher.commit_batch(batch)
    assert [q.spec.name for q in batch if not isinstance(outcomes.get(id(q)), Exception)] == ["a", "b", "burst"]
    refused = outcomes[id(batch[2])]
    assert isinstance(refused, FailedPrecondition) and refused.message == (
        "deployment big: 13 accelerators, not preemptible, would take capacity reserved for other tenants: "
        "16 free on ready nodes (2 of it asked already by work accepted, not placed yet), 4 still owed (t2 4)")
    assert reads == [1]


async def test_a_batch_counts_what_its_unchecked_members_ask_against_others_reservations(cluster):
    """The only tenant that reserves is checked against no one, and its members went uncounted:
    one asking 13 (9 beyond its own 4) and another tenant's 4 after it in the same batch were both
    taken, where submitted one after the other the second was refused."""
    from controller.errors import FailedPrecondition

    await add_tenant(cluster, "t2", reserved_accelerators=4.0)
    batcher = SubmitBatcher(cluster, RecordingSignals())
    batch = [replace(_queued("big", "t2", replicas=13), who=WHO), replace(_queued("small", replicas=4), who=WHO)]
    outcomes = await batcher.commit_batch(batch)
    assert not isinstance(outcomes.get(id(batch[0])), Exception)
    assert isinstance(outcomes[id(batch[1])], FailedPrecondition)



async def test_a_batch_counts_an_ask_its_own_tenants_cap_holds_back_as_taking_no_free_capacity(cluster):
    """t2 owed 8 of the 16; t3, capped at 4, holds 4 and asks 4 more, which wait for its own
    work to end. Submitted alone, t1's 4 after it is taken (16 - 4 held - 8 owed); in one batch
    the member's whole ask was counted as taking free capacity, and t1's 4 refused."""
    from controller.errors import FailedPrecondition
    from controller.reconcile import Reconciler
    from uc_builders import no_publish, submit

    await add_tenant(cluster, "t2", reserved_accelerators=8.0)
    await add_tenant(cluster, "t3", max_accelerators=4.0)
    await submit(cluster, deployment("a", "t3", replicas=4, accelerators=1, locality="node"))
    await Reconciler(cluster, push=lambda nodes: None, publish=no_publish).reconcile_once()
    batch = [replace(_queued("b", "t3", replicas=4, accelerators=1, locality="node"), who=WHO),
             replace(_queued("c", "t1", replicas=4, accelerators=1, locality="node"), who=WHO),
             replace(_queued("d", "t1", replicas=1, accelerators=1, locality="node"), who=WHO)]
    outcomes = await SubmitBatcher(cluster, RecordingSignals()).commit_batch(batch)
    assert [isinstance(outcomes.get(id(q)), FailedPrecondition) for q in batch] == [False, False, True]


async def test_a_batch_members_ask_drawing_fewer_watts_raises_what_its_power_capped_tenant_takes(cluster):
    """t2 owed 8 of the 16; t3, capped at 1,000 W, holds 2 accelerators of 250 W and waits for 4 of
    500 W, of which the 500 W left hold 1. A member of t3 asking 2 of 100 W holds 2 in 200 W, and
    the 300 W left 0.6 of a 500 W one: 2.6 take free capacity, 3.4 are left to t1 (14 - 8 - 2.6),
    as submitted one after the other. Counted by its accelerators alone (the bound left at 1),
    t1's 3 and 1 more were both taken (14 - 8 - 1 = 5)."""
    from controller.errors import FailedPrecondition
    from controller.reconcile import Reconciler
    from uc_builders import no_publish, submit

    await add_tenant(cluster, "t2", reserved_accelerators=8.0)
    await add_tenant(cluster, "t3", max_power_w=1000.0)
    await submit(cluster, deployment("a", "t3", replicas=2, accelerators=1, shard_power_w=250.0, locality="node"))
    await Reconciler(cluster, push=lambda nodes: None, publish=no_publish).reconcile_once()
    await submit(cluster, deployment("b", "t3", replicas=4, accelerators=1, shard_power_w=500.0, locality="node"))
    batch = [replace(_queued("c", "t3", replicas=2, accelerators=1, shard_power_w=100.0, locality="node"), who=WHO),
             replace(_queued("d", "t1", replicas=3, accelerators=1, locality="node"), who=WHO),
             replace(_queued("e", "t1", replicas=1, accelerators=1, locality="node"), who=WHO)]
    outcomes = await SubmitBatcher(cluster, RecordingSignals()).commit_batch(batch)
    assert [isinstance(outcomes.get(id(q)), FailedPrecondition) for q in batch] == [False, False, True]
