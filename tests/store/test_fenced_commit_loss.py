"""The fenced COMMIT (`lease.commit_fenced`: the leader check rides in the COMMIT's message on
PostgreSQL) when the connection is lost around it, on a real server and real connection loss.

The connection is cut by a byte-level proxy between the controller and PostgreSQL (`_Cut`): it
drops the COMMIT's message, or forwards it and drops the answer once the server has sent it whole
(committed), or drops what the client sends after the guard's refusal (its ROLLBACK); or by
`pg_terminate_backend` from another connection while the COMMIT waits for the lease row's lock.
A client cannot tell a COMMIT lost on its way from one whose answer was lost: both must be told
apart from a refusal (the lease lost: nothing written, for sure) and reach callers as UNAVAILABLE
saying the write may have landed, never as a write known to have failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from controller import tokens
from controller.agents import AgentHub
from controller.api.interceptors import status_for
from controller.domain.values import DeploymentEvent, DeploymentView, NodeInfo
from controller.identity import Principal, Role
from controller.leadership import LeaderElection, LeaseSettings
from controller.reconcile import Reconciler
from controller.store import audit, lease, pg_driver
from controller.store import models as m
from controller.store.db import Database, database_failed
from controller.store.lease import CommitOutcomeUnknown, LeaseLost
from controller.store.plans import commit_plan
from controller.store.snapshot import load_snapshot
from controller.usecases.deployments import views_of
from controller.usecases.watch import DeploymentEventBus
from maia.v1 import agent_pb2
from scheduler import Placement as PlanPlacement, Plan

from .audited import through_the_audit_interceptor
from .seed import TWO_RACKS, seed_problem
from .test_lease import HOUR, POSTGRES_ONLY, _acquire, _add_zone, _until, _waiting_for_a_lock, _zones

pytestmark = POSTGRES_ONLY

REGISTER = "/maia.v1.NodeAgentService/Register"
_READY = b"Z\x00\x00\x00\x05"  # ReadyForQuery: the server's answer to a query is whole


class _Cut:
    """A TCP proxy to PostgreSQL that cuts the connection (closes both sides) at one moment:
    - "commit": the client's message holding the fenced COMMIT is dropped (never reaches the server);
    - "answer": that message is forwarded and the server's answer, once whole, dropped;
    - "after-refusal": the answer is forwarded and the client's next message dropped.
    Fenced COMMITs before the `after`+1-th pass; once it has cut, the proxy passes everything."""

    def __init__(self, target: tuple[str, int], moment: str, after: int = 0) -> None:
        self.target = target
        self.moment = moment
        self._passing = after
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._armed: tuple[asyncio.StreamWriter, asyncio.StreamWriter] | None = None  # the COMMIT's connection

    def _passes(self) -> bool:
        self._passing -= 1
        return self._passing >= 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        pair = (client_w, server_w)
        try:
            await asyncio.gather(self._pipe(client_r, server_w, pair, upstream=True),
                                 self._pipe(server_r, client_w, pair, upstream=False))
        finally:
            for writer in pair:
                writer.close()

    def _cut_now(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self.cut.set()
        for writer in pair:
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter], *, upstream: bool) -> None:
        answer = b""
        while data := await reader.read(65536):
            if self.cut.is_set():
                writer.write(data)
                continue
            if upstream and lease.FENCE_FUNCTION.encode() in data and self._armed is None and not self._passes():
                self._armed = pair
                if self.moment == "commit":
                    self._cut_now(pair)
                    return
            elif upstream and self._armed is pair and self.moment == "after-refusal":
                self._cut_now(pair)
                return
            elif not upstream and self._armed is pair and self.moment == "answer":
                answer += data
                if _READY in answer:
                    self._cut_now(pair)
                    return
                continue
            writer.write(data)
            await writer.drain()
        writer.close()  # one side closed: so is the other (a client closing waits for the server to)


@pytest.fixture
async def cut(database: Database) -> AsyncIterator[Callable[..., Database]]:
    """`cut(moment, after=0)`: a `Database` on `database`'s PostgreSQL through a proxy that cuts
    the connection at `moment` of the fenced COMMIT after the first `after` (see `_Cut`)."""
    opened: list[tuple[_Cut, Database]] = []
    url = make_url(database.url)

    async def through(moment: str, after: int = 0) -> Database:
        proxy = _Cut((url.host or "127.0.0.1", url.port or 5432), moment, after)
        port = await proxy.start()
        db = Database(url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False))
        opened.append((proxy, db))
        return db

    yield through  # type: ignore[misc]
    for proxy, db in opened:
        await db.dispose()
        await proxy.close()


async def _fenced_write(db: Database, zone: str, holder: str = "a", token: int = 1) -> None:
    async with db.unit_of_work() as uow:
        await _add_zone(uow.session, zone)
        await lease.commit_fenced(uow.session, holder, token, uow.session.commit)


async def _still_writes(db: Database, zone: str) -> None:
    """The pool gives a working connection again (the lost one was replaced)."""
    await _fenced_write(db, zone)


def _told_may_have_landed(exc: BaseException) -> None:
    assert isinstance(exc, CommitOutcomeUnknown), repr(exc)
    assert status_for(exc) is grpc.StatusCode.UNAVAILABLE
    assert "may have landed" in str(exc)
    assert database_failed(exc)  # a group commit fails every member with it (none retries alone)
    assert not isinstance(exc, LeaseLost)  # the leader does not step down for it


@pytest.mark.parametrize(("moment", "token", "landed"), [("commit", 1, []), ("answer", 1, ["lost"]), ("answer", 7, [])])
async def test_a_lost_commit_is_told_it_may_have_landed_whether_or_not_it_did(
        database: Database, cut: Callable[..., AsyncIterator[Database]], moment: str, token: int,
        landed: list[str]) -> None:
    """The COMMIT dropped on its way (nothing written), its answer dropped once the server
    committed (written), or once the guard refused (token 7: nothing written): the client sees the
    same loss, and says the same."""
    assert await _acquire(database, "a", HOUR) == 1
    db = await cut(moment)  # type: ignore[misc]
    with pytest.raises(Exception) as lost:
        await _fenced_write(db, "lost", token=token)
    _told_may_have_landed(lost.value)
    assert await _zones(database) == landed
    await _still_writes(db, "after")
    assert await _zones(database) == ["after", *landed]


async def test_a_connection_known_lost_before_the_commit_is_a_plain_database_failure(database: Database) -> None:
    """The server ended the connection (pg_terminate_backend) and the client saw it close before
    committing: the COMMIT was never sent, nothing was written, and that is known: not 'may have
    landed', a database failure (the pool replaces the connection)."""
    assert await _acquire(database, "a", HOUR) == 1
    async with database.unit_of_work() as uow:
        await _add_zone(uow.session, "never")
        adapted = await pg_driver.adapted_connection(uow.session)
        assert adapted is not None
        async with database.unit_of_work() as other:
            assert await other.session.scalar(text("SELECT pg_terminate_backend(:pid)"),
                                              {"pid": adapted._connection.get_server_pid()})
        await _until(lambda: _true(adapted._connection.is_closed()), "the client seeing its connection closed")
        with pytest.raises(DBAPIError) as lost:
            await lease.commit_fenced(uow.session, "a", 1, uow.session.commit)
    assert database_failed(lost.value) and not isinstance(lost.value, CommitOutcomeUnknown)
    assert await _zones(database) == []
    await _still_writes(database, "after")
    assert await _zones(database) == ["after"]


async def _true(value: bool) -> bool:
    return value


async def test_a_refusal_stays_a_refusal_when_the_connection_is_lost_before_its_rollback(
        database: Database, cut: Callable[..., AsyncIterator[Database]]) -> None:
    """The guard refused (the lease is another's): nothing was committed, whatever happens to the
    connection after; the caller hears LeaseLost (the leader steps down), not 'may have landed'."""
    assert await _acquire(database, "a", HOUR) == 1
    db = await cut("after-refusal")  # type: ignore[misc]
    with pytest.raises(Exception) as refused:
        await _fenced_write(db, "refused", token=7)
    assert isinstance(refused.value, LeaseLost), repr(refused.value)
    assert await _zones(database) == []
    await _still_writes(db, "after")
    assert await _zones(database) == ["after"]


async def _backend_of(database: Database) -> int:
    """The server process of the fenced COMMIT waiting for a lock."""
    async with database.unit_of_work() as uow:
        pid = await uow.session.scalar(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND state <> 'idle' "
            f"AND wait_event_type = 'Lock' AND query LIKE '%{lease.FENCE_FUNCTION}%'"))
    assert pid is not None, "no fenced COMMIT waiting"
    return int(pid)


async def test_a_commit_cut_while_it_waits_for_the_lease_row_writes_nothing(database: Database) -> None:
    """The server process ends (pg_terminate_backend) while the COMMIT's check waits for the lease
    row (a takeover holds it): nothing is committed, the caller is told it may have landed."""
    assert await _acquire(database, "a", HOUR) == 1
    async with database.unit_of_work() as holding:
        await holding.session.execute(text("SELECT token FROM leader_lease WHERE id = 1 FOR UPDATE"))
        write = asyncio.create_task(_fenced_write(database, "cut"))
        await _until(lambda: _waiting_for_a_lock(database), "the fenced commit waiting for the row")
        pid = await _backend_of(database)
        async with database.unit_of_work() as uow:
            assert await uow.session.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(Exception) as lost:
            await write
        await holding.rollback()
    _told_may_have_landed(lost.value)
    assert await _zones(database) == []
    await _still_writes(database, "after")
    assert await _zones(database) == ["after"]


async def test_a_commit_cancelled_while_it_waits_for_the_lease_row_leaves_no_transaction_open(
        database: Database) -> None:
    """The writer's task is cancelled (an RPC's deadline, a stop) while the COMMIT's check waits:
    nothing is committed and no connection goes back to the pool inside the aborted transaction."""
    assert await _acquire(database, "a", HOUR) == 1
    async with database.unit_of_work() as holding:
        await holding.session.execute(text("SELECT token FROM leader_lease WHERE id = 1 FOR UPDATE"))
        write = asyncio.create_task(_fenced_write(database, "cancelled"))
        await _until(lambda: _waiting_for_a_lock(database), "the fenced commit waiting for the row")
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        await holding.rollback()
    assert await _zones(database) == []
    for zone in ("after-1", "after-2", "after-3"):
        await _still_writes(database, zone)
    assert await _zones(database) == ["after-1", "after-2", "after-3"]
    async with database.unit_of_work() as uow:
        aborted = await uow.session.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'idle in transaction (aborted)'"))
    assert aborted == 0


async def test_the_lease_row_stays_locked_from_the_check_to_the_commit(database: Database) -> None:
    """Between the COMMIT's check and the COMMIT itself (held here by a deferred trigger waiting
    for an advisory lock the test holds) a takeover waits: the write lands before the new leader
    exists; the leader's own renewal and the lease running out do not wait and do not undo it."""
    assert await _acquire(database, "a", HOUR) == 1
    async with database.unit_of_work() as uow:
        await uow.session.execute(text(
            "CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$"))
        await uow.session.execute(text(
            "CREATE CONSTRAINT TRIGGER hold_commit AFTER INSERT ON zones DEFERRABLE INITIALLY DEFERRED "
            "FOR EACH ROW EXECUTE FUNCTION hold_commit()"))
        await uow.session.commit()
    async with database.unit_of_work() as gate:
        await gate.session.execute(text("SELECT pg_advisory_lock(4242)"))
        write = asyncio.create_task(_fenced_write(database, "late"))
        await _until(lambda: _waiting_for(database, "advisory"), "the COMMIT held after its check")
        assert await _acquire(database, "a", HOUR, token=1) == 1  # the renewal does not wait
        async with database.unit_of_work() as uow:  # the lease runs out meanwhile
            await uow.session.execute(m.LeaderLease.__table__.update().values(expires_at=0.0))
            await uow.session.commit()
        takeover = asyncio.create_task(_acquire(database, "b", HOUR))
        await _until(lambda: _waiting_for(database, "tuple", "transactionid"), "the takeover waiting for the row")
        assert not takeover.done() and not write.done()
        await gate.session.execute(text("SELECT pg_advisory_unlock(4242)"))
        await write  # checked before the lease ran out: it lands
    assert await takeover == 2
    assert await _zones(database) == ["late"]
    with pytest.raises(LeaseLost):  # and the next one is refused
        await _fenced_write(database, "later")


async def _waiting_for(database: Database, *events: str) -> bool:
    async with database.unit_of_work() as uow:
        waiting = await uow.session.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND wait_event = ANY(:events)"), {"events": list(events)})
    return bool(waiting)


async def test_an_election_does_not_step_down_for_a_lost_commit(
        database: Database, cut: Callable[..., AsyncIterator[Database]]) -> None:
    """A COMMIT whose outcome is unknown says nothing about the lease: the leader keeps leading."""
    db = await cut("answer")  # type: ignore[misc]
    election = LeaderElection(db, address="a:1", holder="a", settings=LeaseSettings())
    await election.step()
    assert election.should_run()
    with pytest.raises(Exception) as lost:
        async with db.fenced(election).unit_of_work() as uow:
            await _add_zone(uow.session, "landed")
            await uow.commit()
    _told_may_have_landed(lost.value)
    assert election.should_run()
    assert await _zones(database) == ["landed"]


CLUSTER: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [{"id": "n1", "rack": "rack1", "accelerators": 4}, {"id": "n2", "rack": "rack2", "accelerators": 4}],
    "tenants": [{"id": "a"}],
    "deployments": [{"id": "web", "tenant": "a", "replicas": 1, "shards_per_replica": 1,
                     "shard": {"accelerators": 1}}],
}


async def _placements(database: Database) -> list[tuple[str, int, int, str]]:
    async with database.unit_of_work() as uow:
        rows = await uow.session.execute(select(m.Placement.deployment_id, m.Placement.replica, m.Placement.shard,
                                                m.Placement.node_id))
        return sorted(tuple(row) for row in rows)


async def _leading_through(database: Database, cut: Callable[..., AsyncIterator[Database]],
                           moment: str) -> tuple[Database, LeaderElection]:
    """CLUSTER seeded, and a leader on a connection `cut` at `moment` of its first fenced COMMIT."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()
    db = await cut(moment)  # type: ignore[misc]
    election = LeaderElection(db, address="a:1", holder="a", settings=LeaseSettings())
    await election.step()
    return db, election


@pytest.mark.parametrize("moment", ["commit", "answer"])
async def test_a_plan_committed_again_after_a_lost_commit_is_placed_once(
        database: Database, cut: Callable[..., AsyncIterator[Database]], moment: str) -> None:
    """A leader that commits the same plan again after a lost COMMIT (from the same snapshot, as
    a retry would): whether or not the first landed, the deployment's replica is placed once."""
    db, election = await _leading_through(database, cut, moment)
    async with database.unit_of_work() as uow:
        snapshot = await load_snapshot(uow.session)
    plan = Plan(status="optimal", placements=(PlanPlacement("a/web", 0, 0, "n1", (0,), None),))
    with pytest.raises(Exception) as lost:
        async with db.fenced(election).unit_of_work() as uow:
            await commit_plan(uow.session, snapshot, plan, actor="a")
            await uow.commit()
    _told_may_have_landed(lost.value)
    landed = await _placements(database)
    assert len(landed) == (1 if moment == "answer" else 0)
    async with db.fenced(election).unit_of_work() as uow:
        again = await commit_plan(uow.session, snapshot, plan, actor="a")
        await uow.commit()
    assert again.stale == (moment == "answer")
    assert [row[1:] for row in await _placements(database)] == [(0, 0, "n1")]


@pytest.mark.parametrize(("moment", "placed"), [("commit", False), ("answer", True)])
async def test_a_watcher_hears_a_plan_whose_commit_was_lost_as_it_is_stored(
        database: Database, cut: Callable[..., AsyncIterator[Database]], moment: str, placed: bool) -> None:
    """A reconciler's plan commit whose COMMIT was dropped on its way (nothing written) or whose
    answer was dropped (written): the pass fails 'may have landed'; once the pool connects again
    the watcher is told the deployment as stored: placed if the COMMIT landed, still pending if
    not (`PassState.commit`). Before, a landed plan reached no watcher: the next pass finds
    nothing to change."""
    db, election = await _leading_through(database, cut, moment)
    bus = DeploymentEventBus()
    watcher = bus.subscribe()

    async def publish(keys: set[str], deleted: list[DeploymentView], views: list[DeploymentView]) -> None:
        for view in views:
            bus.publish(DeploymentEvent("modified", view))

    loop = Reconciler(db.fenced(election), push=lambda nodes: None, publish=publish, read_views=views_of,
                      lease=election, own_thread=False)
    with pytest.raises(Exception) as lost:
        await loop.reconcile_once()
    _told_may_have_landed(lost.value)
    await loop.published()
    told = [watcher.get_nowait() for _ in range(watcher.qsize())]
    async with database.unit_of_work() as uow:
        [stored] = await views_of(uow, {"a/web"})
    assert bool(stored.placements) == placed
    assert [e.deployment for e in told] == [stored]


@pytest.mark.parametrize("moment", ["commit", "answer"])
async def test_the_audit_chain_stays_whole_after_a_lost_commit(
        database: Database, cut: Callable[..., AsyncIterator[Database]], moment: str) -> None:
    """An audited leader write whose COMMIT is lost: the next entries link to what the chain
    really holds (the process's remembered head may be one that never landed): no fork, no gap."""
    db = await cut(moment, after=1)  # type: ignore[misc]
    election = LeaderElection(db, address="a:1", holder="a", settings=LeaseSettings())
    await election.step()

    async def audited(what: str) -> None:
        token = audit.open_call(audit.AuditRecord(actor="a", action=what))
        try:
            async with db.fenced(election).unit_of_work() as uow:
                await _add_zone(uow.session, what)
                await uow.commit()
        finally:
            audit.close_call(token)

    await audited("first")
    with pytest.raises(Exception) as lost:
        await audited("lost")
    _told_may_have_landed(lost.value)
    await audited("next")
    async with database.unit_of_work() as uow:
        report = await audit.verify_chain(uow.session)
        actions = list(await uow.session.scalars(select(m.AuditEntry.action).order_by(m.AuditEntry.seq)))
    assert report.intact, report.problem
    assert actions == (["first", "lost", "next"] if moment == "answer" else ["first", "next"])


async def test_a_register_whose_commit_was_lost_is_answered_unavailable_and_not_written_again(
        database: Database, cut: Callable[..., AsyncIterator[Database]]) -> None:
    """An agent's Register (a group commit of the leader's) whose COMMIT's answer was lost: its
    caller hears UNAVAILABLE 'may have landed' (was INTERNAL), the batch is not written again alone
    behind its back (one node row), and the call has one audit entry, the batch's (the audit
    interceptor does not add one saying UNAVAILABLE); the agent's retry with its credential
    proposal is answered (what an agent does with UNAVAILABLE), a call with an entry of its own."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, {**TWO_RACKS, "nodes": [], "tenants": [], "deployments": []})
        await uow.commit()
    db = await cut("answer")  # type: ignore[misc]
    election = LeaderElection(db, address="a:1", holder="a", settings=LeaseSettings())
    await election.step()
    hub = AgentHub(db.fenced(election), heartbeat_timeout_s=60, on_liveness_change=lambda: None,
                   on_deployments_changed=lambda changed: asyncio.sleep(0))
    boot = Principal("boot", Role.NODE_BOOTSTRAP, token_id="b00t")
    info = NodeInfo("n1", "rack1", 4, accelerator_model="maia-100")
    proposal = tokens.mint().text

    request = agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(node_id="n1"))

    async def register() -> Any:
        return await through_the_audit_interceptor(
            database, REGISTER, request, boot, lambda: hub.register(boot, info, credential_proposal=proposal))

    async def entries() -> list[tuple[str, str, str]]:
        async with database.unit_of_work() as uow:
            return [(e.action, e.object_id, e.outcome) for e in await audit.list_entries(uow.session)]

    with pytest.raises(Exception) as lost:
        await register()
    _told_may_have_landed(lost.value)
    async with database.unit_of_work() as uow:
        assert list(await uow.session.scalars(select(m.Node.id))) == ["n1"]
    assert await entries() == [(REGISTER, "n1", "OK")]
    retried = await register()
    assert retried.registration.node_id == "n1"
    assert await entries() == [(REGISTER, "n1", "OK")] * 2
    hub.close_all()
