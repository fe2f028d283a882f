"""Group commit of deletions (usecases/deletes.py): a batch marks its members' deployments
DELETING in one transaction with one cluster generation bump (logging every key), one event and
one audit entry each; every caller gets what a lone delete gives it (NOT_FOUND for a name it
cannot see, the same view again for one already deleting), and a batch that cannot commit
writes nothing and hands every member to the lone delete."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from sqlalchemy import func, select, text

from controller.errors import MaiaError, NotFound
from controller.identity import Principal, Role
from controller.reconcile import Reconciler
from controller.store import audit
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.audit import AuditRecord, CallEntry
from controller.store.changes import GENERATION_WRITERS
from controller.store import sqlite_driver
from controller.store.marks import deferred_writes
from controller.store.pg_driver import counted_trips
from controller.store.turns import WritePriority
from controller.usecases import deletes, deployments
from controller.usecases.deletes import DeleteBatcher, QueuedDelete
from controller.usecases.ports import RecordingSignals
from maia.v1 import deployments_pb2
from tests.store.audited import through_the_audit_interceptor
from uc_builders import WHO, add_tenant, appended_elsewhere, batch_priorities, deployment, no_publish, submit

T1 = Principal("t1-token", Role.TENANT, tenant="t1")


def _queued(who: Principal, name: str, tenant: str = "t1") -> QueuedDelete:
    record = AuditRecord(actor=who.name, action="/maia.v1.DeploymentService/DeleteDeployment", tenant=tenant,
                         object_kind="deployment", object_id=f"{tenant}/{name}")
    return QueuedDelete(who, tenant, name, CallEntry(record, None))


async def _count(db, model) -> int:
    async with db.unit_of_work() as uow:
        return int(await uow.session.scalar(select(func.count()).select_from(model)) or 0)


async def _generation(db) -> int:
    async with db.unit_of_work() as uow:
        return await repo.read_cluster_generation(uow.session)


async def _logged(db, generation: int) -> list[tuple[str, str | None]]:
    async with db.unit_of_work() as uow:
        rows = await uow.session.execute(select(m.ClusterChangeRow.kind, m.ClusterChangeRow.object_id)
                                         .where(m.ClusterChangeRow.generation == generation))
        return sorted((kind, object_id) for kind, object_id in rows)


async def _submit(db, *keys: tuple[str, str]) -> None:
    async with db.unit_of_work() as uow:
        for tenant, name in keys:
            await deployments.submit_deployment(uow, WHO, deployment(name, tenant), RecordingSignals())


async def _alone(db, who: Principal, name: str, tenant: str = "") -> object:
    try:
        async with db.unit_of_work() as uow:
            return await deployments.delete_deployment(uow, who, name, RecordingSignals(), tenant=tenant)
    except MaiaError as exc:
        return exc


def _answer(outcome: object) -> object:
    """What a caller reads of an outcome: an error's code and message, or the view (but its
    updated_at: the database's, read again by a later call, is not the one the marking call held)."""
    if isinstance(outcome, BaseException):
        return type(outcome).__name__, str(outcome)
    return replace(outcome, updated_at=None)


def _first_batch_fails(batcher: DeleteBatcher, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batcher's next batch fails to commit (nothing written: each member goes alone)."""
    failing = {"left": 1}
    commit_batch = batcher.commit_batch

    async def fails_once(batch):
        if failing["left"]:
            failing["left"] -= 1
            raise RuntimeError("this batch could not commit")
        return await commit_batch(batch)

    monkeypatch.setattr(batcher, "commit_batch", fails_once)


async def test_a_batch_gives_each_caller_the_lone_answer_in_one_transaction_and_one_bump(cluster):
    await add_tenant(cluster, "t2")
    await _submit(cluster, ("t1", "a"), ("t1", "b"), ("t1", "again"), ("t2", "theirs"))
    await _alone(cluster, WHO, "again", "t1")  # already DELETING
    signals = RecordingSignals()
    batcher = DeleteBatcher(cluster, signals)
    before, events, entries = await _generation(cluster), await _count(cluster, m.Event), \
        await _count(cluster, m.AuditEntry)
    batch = [_queued(WHO, "a"), _queued(T1, "b"), _queued(WHO, "nope"),  # ok (admin), ok (tenant), unknown
             _queued(T1, "theirs"),                                       # t2's, asked for by t1's token
             _queued(WHO, "again")]                                       # already deleting
    outcomes = await batcher.commit_batch(batch)

    answers = [_answer(outcomes[id(q)]) for q in batch]
    assert [a.phase if not isinstance(a, tuple) else a[0] for a in answers] == \
        ["deleting", "deleting", "NotFound", "NotFound", "deleting"]
    # One transaction, one generation bump for the batch, logging both deployments it marked.
    assert await _generation(cluster) == before + 1
    assert await _logged(cluster, before + 1) == [("deployment_deleted", "t1/a"), ("deployment_deleted", "t1/b")]
    assert [q.call.written for q in batch] == [True, True, False, False, False]
    assert await _count(cluster, m.Event) == events + 2
    assert await _count(cluster, m.AuditEntry) == entries + 2
    assert [e.type for e in signals.events] == ["modified"] * 3 and signals.wakes == 1
    async with cluster.unit_of_work() as uow:
        assert (await audit.verify_chain(uow.session)).intact
    # The lone delete answers the same (a second delete is idempotent: the same view, nothing written).
    alone = [_answer(await _alone(cluster, q.who, q.name, q.tenant if q.who.is_admin else "")) for q in batch]
    assert alone == answers
    assert answers[2] == ("NotFound", "deployment nope not found in tenant t1")
    assert answers[3] == ("NotFound", "deployment theirs not found")
    assert await _generation(cluster) == before + 1


async def test_a_batch_answers_placed_deployments_as_the_lone_delete_reads_their_rows(cluster):
    """The batch reads its deployments as plain columns (`repo.deployments_named`), not as ORM rows:
    its views of placed deployments (a shard running with a message, a replica outgoing on a
    draining node, accelerator indices; marked now or already deleting) are what the lone delete
    reads of the stored rows (`repo.deployment_view`)."""
    await submit(cluster, deployment("svc", replicas=2, accelerators=4, spread=None))  # a node each
    for name in ("web", "old"):
        await submit(cluster, deployment(name, spread=None, shard_accelerator_milli=500))
    await Reconciler(cluster, push=lambda nodes: None, publish=no_publish).reconcile_once()
    async with cluster.unit_of_work() as uow:
        svc = await repo.get_deployment(uow.session, "t1", "svc")
        running, outgoing = sorted(svc.placements, key=lambda p: (p.replica, p.shard))
        running.phase, running.message = m.ShardPhase.RUNNING, "serving"
        outgoing.node.draining = True
        await uow.commit()
    await _alone(cluster, WHO, "old", "t1")  # already DELETING
    batch = [_queued(WHO, "svc"), _queued(T1, "web"), _queued(WHO, "old")]
    outcomes = await DeleteBatcher(cluster, RecordingSignals()).commit_batch(batch)

    answers = [_answer(outcomes[id(q)]) for q in batch]
    assert [len(a.placements) for a in answers] == [2, 1, 1] and {a.phase for a in answers} == {"deleting"}
    svc_view = answers[0]
    assert (svc_view.running_replicas, svc_view.updated_replicas, svc_view.outgoing_replicas) == (1, 1, 1)
    assert [(p.phase, p.message, p.outgoing, p.accelerator_indices) for p in svc_view.placements] == \
        [("running", "serving", False, (0, 1, 2, 3)), ("assigned", "", True, (0, 1, 2, 3))]
    assert all(p.rack for p in svc_view.placements) and answers[1].placements[0].accelerator_milli == 500
    assert [_answer(await _alone(cluster, q.who, q.name, q.tenant if q.who.is_admin else "")) for q in batch] == answers


async def test_concurrent_deletes_each_get_the_lone_answer(cluster):
    await add_tenant(cluster, "t2")
    names = [f"d{i}" for i in range(8)]
    await _submit(cluster, *(("t1", n) for n in names), ("t2", "theirs"))
    batcher = DeleteBatcher(cluster, RecordingSignals())
    before = await _generation(cluster)
    calls = [(WHO, n, "t1") for n in names] + [(WHO, "d0", "t1"),  # the same deployment twice
                                               (T1, "theirs", ""), (T1, "theirs", "t2"), (WHO, "nope", "t1")]
    results = await asyncio.gather(*(batcher.delete(who, name, tenant) for who, name, tenant in calls),
                                   return_exceptions=True)
    assert [r.phase for r in results[:9]] == ["deleting"] * 9
    assert [_answer(r) for r in results[9:]] == [("NotFound", "deployment theirs not found"),
                                                 ("NotFound", "tenant t2 not found"),  # refused before the batch
                                                 ("NotFound", "deployment nope not found in tenant t1")]
    # The eight deletions shared a batch (the repeat waited for the next): far fewer bumps than deletes.
    assert batcher.stats.largest >= 8 and batcher.stats.alone == 0
    assert await _generation(cluster) - before <= batcher.stats.batches < len(calls)
    async with cluster.unit_of_work() as uow:
        phases = [r.phase for r in await repo.list_deployment_rows(uow.session, tenant="t2")]
    assert phases == [m.DeploymentPhase.PENDING]


async def test_a_batch_that_cannot_commit_writes_nothing_and_each_goes_alone(cluster, monkeypatch):
    await _submit(cluster, ("t1", "a"), ("t1", "b"))
    batcher = DeleteBatcher(cluster, RecordingSignals())
    before = await _generation(cluster)

    async def failing_append(*args, **kwargs):
        raise RuntimeError("the audit chain could not be appended to")

    monkeypatch.setattr(deletes.audit, "append_calls", failing_append)
    with pytest.raises(RuntimeError):
        await batcher.commit_batch([_queued(WHO, "a"), _queued(WHO, "b")])
    assert await _generation(cluster) == before
    async with cluster.unit_of_work() as uow:
        assert {r.phase for r in await repo.list_deployment_rows(uow.session)} == {m.DeploymentPhase.PENDING}
    monkeypatch.undo()

    _first_batch_fails(batcher, monkeypatch)
    results = await asyncio.gather(batcher.delete(WHO, "a", "t1"), batcher.delete(WHO, "b", "t1"),
                                   batcher.delete(WHO, "nope", "t1"), return_exceptions=True)
    assert [_answer(r) if isinstance(r, NotFound) else r.phase for r in results] == \
        ["deleting", "deleting", ("NotFound", "deployment nope not found in tenant t1")]
    assert batcher.stats.alone == 3


async def test_an_admin_naming_no_tenant_is_answered_in_the_batch_as_alone(cluster):
    await add_tenant(cluster, "t2")
    await _submit(cluster, ("t1", "shared"), ("t2", "shared"), ("t2", "solo"))
    batcher = DeleteBatcher(cluster, RecordingSignals())
    before = await _generation(cluster)
    batch = [_queued(WHO, "solo", ""), _queued(WHO, "shared", ""), _queued(WHO, "ghost", "")]
    outcomes = await batcher.commit_batch(batch)
    answers = [_answer(outcomes[id(q)]) for q in batch]
    assert answers[0].spec.tenant == "t2" and answers[0].phase == "deleting"
    assert answers[1:] == [("FailedPrecondition", "deployment shared exists in several tenants (t1, t2); name the "
                                                  "tenant (maiactl ... -n TENANT NAME, or TENANT/NAME)"),
                           ("NotFound", "deployment ghost not found")]
    assert [_answer(await _alone(cluster, WHO, q.name)) for q in batch] == answers
    assert await _logged(cluster, before + 1) == [("deployment_deleted", "t2/solo")]
    assert await _generation(cluster) == before + 1


async def test_a_batch_takes_its_turn_at_the_writer_before_reports_and_passes(cluster, monkeypatch):
    await _submit(cluster, ("t1", "a"))
    batcher = DeleteBatcher(cluster, RecordingSignals())
    priorities = batch_priorities(batcher, monkeypatch)
    assert (await batcher.delete(WHO, "a", "t1")).phase == "deleting"
    assert priorities == [WritePriority.ANSWER]


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_batch_takes_one_read_and_four_trips_on_postgresql(cluster):
    """A delete batch's round trips on PostgreSQL: its deployments with their placements in one
    read (joined, whatever the batch's size: no statement to prepare for a new size), then BEGIN
    with the generation writers' lock (store/changes.py) and the phases' UPDATE in its message
    (`marks.deferred_writes`: it reads nothing back), the generation bump with its change rows in
    one statement, the audit head moved with its entries and the events in one statement
    (`audit.append(along=)`), COMMIT. Six before (the UPDATE a round trip of its own)."""
    await _submit(cluster, *(("t1", f"d{i}") for i in range(8)))
    batcher = DeleteBatcher(cluster, RecordingSignals())
    for warm in (["d0"], ["d6", "d7"]):  # its statements prepared on this connection (the pool's LIFO)
        await batcher.commit_batch([_queued(WHO, name) for name in warm])
    before = await _generation(cluster)
    with counted_trips() as trips:
        outcomes = await batcher.commit_batch([_queued(WHO, "d1"), _queued(T1, "d2"), _queued(WHO, "d3")])
    assert {outcome.phase for outcome in outcomes.values()} == {"deleting"}
    assert [(t.kind, t.statement) for t in trips] == [
        ("execute", "SELECT deployments.id, deployments.name,"),
        ("query", f"BEGIN; SELECT pg_advisory_xact_lock_shared({GENERATION_WRITERS});"),
        ("execute", "WITH moved AS"), ("execute", "WITH along0_ AS"), ("query", "COMMIT")]
    assert await _logged(cluster, before + 1) == [("deployment_deleted", f"t1/d{i}") for i in (1, 2, 3)]


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_batch_holds_sqlites_writer_for_one_trip_its_commit(cluster):
    """On SQLite a batch reads its deployments, then every write (the phases, the events, the
    generation bump and its change rows, the audit head and entries) goes with its COMMIT: one
    trip to SQLite's thread while it holds the writer, where a busy event loop made each trip
    cost milliseconds (four trips before: docs/benchmarks.md, `delbatch`)."""
    await _submit(cluster, *(("t1", f"d{i}") for i in range(3)))
    batcher = DeleteBatcher(cluster, RecordingSignals())
    await batcher.commit_batch([_queued(WHO, "d0")])  # the audit head this process wrote: known
    before = await _generation(cluster)
    with sqlite_driver.counted_trips() as trips:
        outcomes = await batcher.commit_batch([_queued(WHO, "d1"), _queued(T1, "d2")])
    assert {outcome.phase for outcome in outcomes.values()} == {"deleting"}
    assert [trip.statement for trip in trips] == ["SELECT deployments.id, deployments.name,", "COMMIT"]
    assert await _logged(cluster, before + 1) == [("deployment_deleted", "t1/d1"), ("deployment_deleted", "t1/d2")]
    assert await _generation(cluster) == before + 1
    async with cluster.unit_of_work() as uow:
        report = await audit.verify_chain(uow.session)
        assert [e.object_id for e in await audit.list_entries(uow.session)] == ["t1/d0", "t1/d1", "t1/d2"]
    assert report.intact and report.entries == 3


async def test_a_batch_behind_a_stale_audit_head_writes_nothing_and_each_delete_lands_alone(cluster):
    """The audit head this process wrote last is not the database's (another process appended
    since): on SQLite the batch's compare and set, which reads nothing back, misses and fails the
    batch whole; its members go alone, each marked with its own audit entry in one chain."""
    await _submit(cluster, ("t1", "a"), ("t1", "b"))
    await appended_elsewhere(cluster)
    batcher = DeleteBatcher(cluster, RecordingSignals())

    async def delete_in_a_call(name: str):
        call = _queued(WHO, name).call
        audit.open_call(call.record)
        return await batcher.delete(WHO, name, "t1")

    results = await asyncio.gather(delete_in_a_call("a"), delete_in_a_call("b"))
    assert [r.phase for r in results] == ["deleting", "deleting"]
    if cluster.url.startswith("sqlite"):
        assert batcher.stats.alone == 2
    async with cluster.unit_of_work() as uow:
        report = await audit.verify_chain(uow.session)
        assert sorted(e.object_id for e in await audit.list_entries(uow.session))[-2:] == ["t1/a", "t1/b"]
        assert {r.phase for r in await repo.list_deployment_rows(uow.session)} == {m.DeploymentPhase.DELETING}
    assert report.intact and report.entries == 4


async def test_a_batch_after_one_that_missed_the_audit_head_commits(cluster):
    """A batch whose unread compare and set missed (another process appended since this one
    last did) fails whole; the head it wrote was never committed, so the next batch links to the
    database's again (it read nothing back either): it does not miss in turn, and neither do the
    ones after it (each linked to the last failed one's head: a run of failed batches, every
    member sent alone)."""
    await _submit(cluster, ("t1", "a"), ("t1", "b"), ("t1", "c"))
    await appended_elsewhere(cluster)
    batcher = DeleteBatcher(cluster, RecordingSignals())
    if cluster.url.startswith("sqlite"):
        with pytest.raises(Exception):
            await batcher.commit_batch([_queued(WHO, "a")])
    else:
        await batcher.commit_batch([_queued(WHO, "a")])
    assert {view.phase for view in (await batcher.commit_batch([_queued(WHO, "b")])).values()} == {"deleting"}
    with sqlite_driver.counted_trips() as trips:
        await batcher.commit_batch([_queued(WHO, "c")])
    if cluster.url.startswith("sqlite"):
        assert [trip.statement for trip in trips] == ["SELECT deployments.id, deployments.name,", "COMMIT"]
    async with cluster.unit_of_work() as uow:
        report = await audit.verify_chain(uow.session)
        written = [e.object_id for e in await audit.list_entries(uow.session)]
    assert report.intact and written[-2:] == ["t1/b", "t1/c"]


async def _events(db, kind: str) -> list[str]:
    async with db.unit_of_work() as uow:
        return list(await uow.session.scalars(select(m.Event.object_id).where(m.Event.kind == kind)))


async def test_a_member_of_a_failed_batch_racing_a_later_delete_of_its_name_marks_it_once(cluster, monkeypatch):
    """A batch fails and its member goes alone; while the lone delete has read the deployment (not
    DELETING yet) a second delete of the same name is batched (the group commit released the name
    with the failed batch) and marks it. The lone delete's mark then finds it DELETING: nothing is
    written (no second event, no second generation bump, no second audit entry with a change),
    and it answers as a delete of a deployment already DELETING does (its call's entry is then the
    audit interceptor's, as for any call that committed nothing)."""
    await _submit(cluster, ("t1", "a"))
    batcher = DeleteBatcher(cluster, RecordingSignals())
    _first_batch_fails(batcher, monkeypatch)
    read, go_on = asyncio.Event(), asyncio.Event()
    lone_mark = deployments.mark_deleting

    async def mark_after_the_second(uow, rows):  # the lone path's mark (the batch imported its own name)
        read.set()
        await go_on.wait()
        return await lone_mark(uow, rows)

    monkeypatch.setattr(deployments, "mark_deleting", mark_after_the_second)
    before = await _generation(cluster)

    async def delete_in_a_call(name: str):
        audit.open_call(_queued(WHO, name).call.record)
        return await batcher.delete(WHO, name, "t1")

    first = asyncio.create_task(delete_in_a_call("a"))
    await asyncio.wait_for(read.wait(), 10)  # alone, after its read
    second = await delete_in_a_call("a")  # batched: marks it
    go_on.set()
    first = await first
    assert (first.phase, second.phase) == ("deleting", "deleting")
    assert batcher.stats.alone == 1
    assert _answer(first) == _answer(second)
    assert await _events(cluster, "deployment.deleting") == ["t1/a"]
    assert await _generation(cluster) == before + 1
    async with cluster.unit_of_work() as uow:
        report = await audit.verify_chain(uow.session)
        assert [e.object_id for e in await audit.list_entries(uow.session)] == ["t1/a"]
    assert report.intact


async def _lone(db, name: str) -> object:
    """What a DeleteDeployment served without a batcher answers (`delete_deployment_alone`)."""
    try:
        return await deployments.delete_deployment_alone(db, WHO, name, RecordingSignals(), tenant="t1")
    except MaiaError as exc:
        return exc


async def _removed(db) -> None:
    """Deployment `t1/a` deleted by another call and removed by the reconciler's pass."""
    assert await _alone(db, WHO, "a", "t1")
    await Reconciler(db, push=lambda nodes: None, publish=no_publish).reconcile_once()
    async with db.unit_of_work() as uow:
        assert await repo.get_deployment(uow.session, "t1", "a") is None


def _hold_after_read(module, monkeypatch: pytest.MonkeyPatch, meanwhile) -> None:
    """`module`'s next `mark_deleting` (its delete has read the deployment) runs `meanwhile` first."""
    mark, held = module.mark_deleting, {"left": 1}

    async def mark_after(uow, rows, *calls):
        if held["left"]:
            held["left"] -= 1
            await meanwhile()
        return await mark(uow, rows, *calls)

    monkeypatch.setattr(module, "mark_deleting", mark_after)


@pytest.mark.parametrize("path", ["alone", "batched"])
async def test_a_delete_whose_deployment_was_removed_after_its_read_writes_nothing_and_answers_not_found(
        cluster, monkeypatch, path):
    """Between a delete's read and its mark the deployment is removed (another delete marked it,
    the reconciler removed it). Its UPDATE then matches no row: nothing is written (no second
    `deployment.deleting` event, no generation bump, no audit entry with a change) and the caller
    hears what a delete of a deployment that is not there hears (NOT_FOUND), alone or batched
    (the batch fails whole and its member goes alone)."""
    await _submit(cluster, ("t1", "a"))
    before = {}

    async def remove() -> None:
        await _removed(cluster)
        before.update(generation=await _generation(cluster), entries=await _count(cluster, m.AuditEntry))

    batcher = DeleteBatcher(cluster, RecordingSignals())
    _hold_after_read(deployments if path == "alone" else deletes, monkeypatch, remove)
    if path == "alone":
        outcome = await _lone(cluster, "a")
    else:
        audit.open_call(_queued(WHO, "a").call.record)
        try:
            outcome = await batcher.delete(WHO, "a", "t1")
        except MaiaError as exc:
            outcome = exc
        assert batcher.stats.alone == 1
    assert _answer(outcome) == _answer(await _alone(cluster, WHO, "a", "t1"))
    assert isinstance(outcome, NotFound)
    assert await _events(cluster, "deployment.deleting") == ["t1/a"]
    assert await _generation(cluster) == before["generation"]
    assert await _count(cluster, m.AuditEntry) == before["entries"]


async def test_a_delete_never_marks_a_deployment_that_took_the_removed_ones_id(cluster, monkeypatch):
    """The deployment a delete read is removed and another is submitted before the delete's mark;
    on SQLite the new row took the removed one's id (the largest id, freed) until migration 0024
    (no backend gives an id twice now). The delete's mark by id must not mark it: the delete answers
    NOT_FOUND and the other stays as it was."""
    await _submit(cluster, ("t1", "a"))

    async def replace_it() -> None:
        await _removed(cluster)
        await _submit(cluster, ("t1", "b"))

    _hold_after_read(deployments, monkeypatch, replace_it)
    assert isinstance(await _lone(cluster, "a"), NotFound)
    assert await _events(cluster, "deployment.deleting") == ["t1/a"]
    async with cluster.unit_of_work() as uow:
        assert {r.name: r.phase for r in await repo.list_deployment_rows(uow.session)} == {
            "b": m.DeploymentPhase.PENDING}


async def test_a_mark_of_a_deployment_marked_since_it_was_read_fails_its_transaction_whole(cluster):
    """A batch read a deployment not DELETING and another transaction marked it before the batch's
    mark (its statements deferred to the COMMIT on SQLite): the mark is refused, nothing of the
    batch is written (no event, no bump), and the refusal is told apart (`changed_since_read`)."""
    await _submit(cluster, ("t1", "a"), ("t1", "b"))
    async with cluster.unit_of_work() as uow:
        read = await repo.deployments_named(uow.session, {"a", "b"})
    assert await _alone(cluster, WHO, "a", "t1")
    before = await _generation(cluster)
    with pytest.raises(Exception) as refused:
        async with cluster.unit_of_work() as uow:
            with deferred_writes():
                await deployments.mark_deleting(uow, [(named.row, WHO.name) for named in read])
            await uow.commit()
    assert repo.changed_since_read(refused.value)
    assert await _generation(cluster) == before
    assert await _events(cluster, "deployment.deleting") == ["t1/a"]
    async with cluster.unit_of_work() as uow:
        assert {r.name: r.phase for r in await repo.list_deployment_rows(uow.session)} == {
            "a": m.DeploymentPhase.DELETING, "b": m.DeploymentPhase.PENDING}


async def test_only_a_mark_refused_as_raced_is_told_apart_from_other_integrity_errors(cluster):
    """`changed_since_read` is the NULL written into `deployments.phase` (marked since the read) or
    `events.object_id` (removed since: `deleting_events`) and nothing else: another column's NOT
    NULL, another table's `phase` (placements have one) and a unique violation are other failures
    (a lone delete would otherwise take them for a mark raced and read again)."""
    await _submit(cluster, ("t1", "a"), ("t1", "b"))
    await Reconciler(cluster, push=lambda nodes: None, publish=no_publish).reconcile_once()

    async def refusal(statement: str) -> BaseException:
        with pytest.raises(Exception) as refused:
            async with cluster.unit_of_work() as uow:
                await uow.session.execute(text(statement))
                await uow.commit()
        return refused.value

    told = {statement: repo.changed_since_read(await refusal(statement)) for statement in (
        "UPDATE deployments SET phase = NULL WHERE name = 'a'",
        "UPDATE placements SET phase = NULL",
        "UPDATE deployments SET name = NULL WHERE name = 'a'",
        "UPDATE deployments SET name = 'b' WHERE name = 'a'",
        "UPDATE events SET object_id = NULL",  # a mark's event for a row removed since its read
        "UPDATE events SET kind = NULL",
    )}
    assert list(told.values()) == [True, False, False, False, True, False], told
    assert not repo.changed_since_read(RuntimeError("phase"))


async def _a_delete_left_while_its_batch_commits(db, monkeypatch: pytest.MonkeyPatch, *, commits: bool) -> list[str]:
    """A tenant's DeleteDeployment, served through the audit interceptor, whose caller goes away
    (cancelled) once a batch holds it; the batch then commits or fails. The outcomes of the
    call's audit entries, once everything written for it was."""
    await _submit(db, ("t1", "a"))
    batcher = DeleteBatcher(db, RecordingSignals())
    taken, release = asyncio.Event(), asyncio.Event()
    commit_batch = batcher.commit_batch

    async def held(batch):
        taken.set()
        await release.wait()
        if not commits:
            raise RuntimeError("this batch could not commit")
        return await commit_batch(batch)

    monkeypatch.setattr(batcher, "commit_batch", held)
    call = asyncio.create_task(through_the_audit_interceptor(
        db, "/maia.v1.DeploymentService/DeleteDeployment", deployments_pb2.DeleteDeploymentRequest(name="a"), T1,
        lambda: batcher.delete(T1, "a")))
    await taken.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    release.set()
    while any(t.get_name() in ("delete-batches", "audit-after-batch") for t in asyncio.all_tasks()):
        await asyncio.sleep(0.01)
    async with db.unit_of_work() as uow:
        return [e.outcome for e in await audit.list_entries(uow.session, limit=100)
                if e.action.endswith("/DeleteDeployment")]


async def test_a_delete_its_caller_left_while_its_batch_committed_has_the_batchs_entry_alone(cluster, monkeypatch):
    """A caller cancelled once its delete was taken into a batch had two entries: CANCELLED,
    written as it went, and OK, written by the batch that deleted all the same."""
    assert await _a_delete_left_while_its_batch_commits(cluster, monkeypatch, commits=True) == ["OK"]


async def test_a_delete_its_caller_left_while_its_batch_failed_is_audited_cancelled(cluster, monkeypatch):
    assert await _a_delete_left_while_its_batch_commits(cluster, monkeypatch, commits=False) == ["CANCELLED"]
