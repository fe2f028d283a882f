"""The leader lease row and its fencing token, on SQLite and PostgreSQL.

Expiry is on the database's clock; the tests never sleep: a lease taken with a negative time
to live is already expired, one taken for an hour is live.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from controller.aio import within
from controller.api.interceptors import status_for

from controller.leadership import LeaderElection, LeaseSettings, NotLeader
from controller.store import lease
from controller.store import models as m
from controller.store.db import Database
from controller.store.lease import LeaseLost
from controller.store.pg_driver import counted_trips
from controller.store.plans import commit_plan
from controller.store.snapshot import load_snapshot
from scheduler import Placement as PlanPlacement, Plan

from .seed import TWO_RACKS, dump, seed_problem

HOUR = 3600.0
EXPIRED = -1.0


async def _acquire(db: Database, holder: str, ttl: float, token: int | None = None, force: bool = False) -> int | None:
    async with db.unit_of_work() as uow:
        held = await lease.acquire(uow.session, holder, f"{holder}:50051", ttl, token=token, force=force)
        await uow.session.commit()
    return held


async def _row(db: Database) -> lease.LeaseRow:
    async with db.unit_of_work() as uow:
        return await lease.read(uow.session)


async def test_one_holder_at_a_time_and_every_acquisition_a_new_token(database: Database) -> None:
    assert await _acquire(database, "a", HOUR) == 1
    assert await _acquire(database, "b", HOUR) is None          # a's lease is live
    assert await _acquire(database, "a", HOUR, token=1) == 1     # a renews: same token
    row = await _row(database)
    assert (row.holder, row.token, row.address, row.live) == ("a", 1, "a:50051", True)

    assert await _acquire(database, "a", EXPIRED, token=1) == 1  # a's renewal that has already run out
    assert await _acquire(database, "b", HOUR) == 2              # b takes the expired lease: a new token
    assert await _acquire(database, "a", HOUR, token=1) is None  # a's old token renews nothing
    assert await _acquire(database, "c", HOUR, force=True) == 3  # force (SQLite's lone controller) takes it


async def test_fence_refuses_a_stale_token_and_a_foreign_holder(database: Database) -> None:
    await _acquire(database, "a", EXPIRED)
    await _acquire(database, "b", HOUR)
    async with database.unit_of_work() as uow:
        await lease.fence(uow.session, "b", 2)
        for holder, token in (("a", 1), ("b", 1), ("a", 2), ("b", None)):
            with pytest.raises(LeaseLost):
                await lease.fence(uow.session, holder, token)


async def test_fence_refuses_a_lease_that_ran_out_though_nobody_took_it(database: Database) -> None:
    await _acquire(database, "a", EXPIRED)
    async with database.unit_of_work() as uow:
        with pytest.raises(LeaseLost):
            await lease.fence(uow.session, "a", 1)


CLUSTER: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [{"id": "n1", "rack": "rack1", "accelerators": 4}],
    "tenants": [{"id": "a"}],
    "deployments": [{"id": "web", "tenant": "a", "replicas": 1, "shards_per_replica": 1,
                     "shard": {"accelerators": 1}}],
}


async def test_a_deposed_leaders_plan_is_refused_and_nothing_is_written(database: Database) -> None:
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()
    old = LeaderElection(database, address="old:1", holder="old", settings=LeaseSettings())
    await old.step()
    assert old.should_run() and old.token == 1
    async with database.unit_of_work() as uow:
        snapshot = await load_snapshot(uow.session)
    plan = Plan(status="optimal", placements=(PlanPlacement("a/web", 0, 0, "n1", (0,), None),))

    # The old leader stalls (a long GC pause, a partition) past its lease; another takes over.
    async with database.unit_of_work() as uow:
        await uow.session.execute(m.LeaderLease.__table__.update().values(expires_at=0.0))
        await uow.session.commit()
    new = LeaderElection(database, address="new:1", holder="new")
    await new.step()
    assert new.should_run() and new.token == 2
    before = await _dump(database)

    # The old leader wakes up believing it still leads and commits the plan it computed.
    assert old.should_run()
    with pytest.raises(LeaseLost) as refused:
        async with database.fenced(old).unit_of_work() as uow:
            await commit_plan(uow.session, snapshot, plan, actor="old")
            await uow.commit()
    assert await _dump(database) == before
    # A caller whose write it refused (an agent's Register in a batch) hears UNAVAILABLE and when to retry.
    assert status_for(refused.value) is grpc.StatusCode.UNAVAILABLE and refused.value.retry_after_ms
    assert not old.should_run()  # the refusal deposes it at once
    await old.step()  # its next try at the lease finds where the leader is
    assert not old.should_run()
    with pytest.raises(NotLeader) as refused:
        old.require_leader()
    assert refused.value.metadata == (("maia-leader", "new:1"),)

    # The new leader's commit of the same plan lands.
    async with database.fenced(new).unit_of_work() as uow:
        await commit_plan(uow.session, snapshot, plan, actor="new")
        await uow.commit()
    async with database.unit_of_work() as uow:
        assert await uow.session.scalar(select(func.count()).select_from(m.Placement)) == 1


async def test_release_lets_a_follower_take_over_at_once(database: Database) -> None:
    elected: list[int] = []
    first = LeaderElection(database, address="first:1", holder="first")
    second = LeaderElection(database, address="second:1", holder="second", on_elected=elected.append)
    await first.step()
    await second.step()
    assert first.should_run() and not second.should_run()
    with pytest.raises(NotLeader) as refused:
        second.require_leader()
    assert refused.value.metadata == (("maia-leader", "first:1"),)
    await first.release()
    assert not first.should_run()
    await second.step()
    assert second.should_run() and elected == [2]


async def test_a_follower_sends_agents_to_the_leaders_gateways_when_it_runs_them(database: Database) -> None:
    gatewayed = LeaderElection(database, address="first:1", agent_address="first:7000", holder="first")
    plain = LeaderElection(database, address="second:1", holder="second")
    follower = LeaderElection(database, address="third:1", agent_address="third:7000", holder="third")
    await gatewayed.step()
    await follower.step()
    assert (await _row(database)).agent_address == "first:7000"
    with pytest.raises(NotLeader) as refused:
        follower.require_leader()
    assert refused.value.metadata == (("maia-leader", "first:7000"),)
    assert "the leader is at first:7000" in str(refused.value)

    await gatewayed.release()
    await plain.step()  # a leader without gateways: its row names none, and agents go to its --listen
    await follower.step()
    assert (await _row(database)).agent_address == ""
    with pytest.raises(NotLeader) as refused:
        follower.require_leader()
    assert refused.value.metadata == (("maia-leader", "second:1"),)


async def test_a_renewal_writes_the_agent_address_of_now(database: Database) -> None:
    assert await _acquire(database, "a", HOUR) == 1
    async with database.unit_of_work() as uow:  # the gateways came up after the first try at the lease
        assert await lease.acquire(uow.session, "a", "a:50051", HOUR, token=1, agent_address="a:7000") == 1
        await uow.session.commit()
    row = await _row(database)
    assert (row.address, row.agent_address) == ("a:50051", "a:7000")


async def test_a_leader_running_older_code_is_not_named_by_the_gateways_address_a_newer_one_left(
        database: Database) -> None:
    """A rolling upgrade: the schema is migrated while older controllers still run. One of them
    taking the lease from a leader with gateways leaves `agent_address` as that leader wrote it
    (its UPDATE knows no such column); followers must not send agents to the gone gateways."""
    gatewayed = LeaderElection(database, address="new:1", agent_address="new:7000", holder="new")
    follower = LeaderElection(database, address="third:1", holder="third")
    await gatewayed.step()
    async with database.unit_of_work() as uow:  # the gatewayed leader died; an older controller takes over
        await uow.session.execute(text("UPDATE leader_lease SET token = token + 1, holder = 'old', "
                                       "address = 'old:50051', expires_at = 1e12 WHERE id = 1"))
        await uow.session.commit()
    row = await _row(database)
    assert (row.holder, row.address, row.agent_address) == ("old", "old:50051", "")
    await follower.step()
    with pytest.raises(NotLeader) as refused:
        follower.require_leader()
    assert refused.value.metadata == (("maia-leader", "old:50051"),)


async def _dump(database: Database) -> dict[str, Any]:
    async with database.unit_of_work() as uow:
        return await dump(uow.session)


async def test_the_leader_stops_scheduling_a_margin_before_its_lease_could_expire(database: Database) -> None:
    now = [100.0]
    settings = LeaseSettings(ttl_s=5.0, renew_every_s=1.0, margin_s=1.5)
    election = LeaderElection(database, address="a:1", holder="a", settings=settings, clock=lambda: now[0])
    await election.step()  # renewal sent at local time 100: the lease holds until 105 on any clock
    now[0] = 103.4
    assert election.should_run()
    now[0] = 103.5  # ttl - margin after the renewal was sent: stop, although the row still says ours
    assert not election.should_run()
    with pytest.raises(NotLeader):
        election.require_leader()
    await election.step()  # a renewal that gets through: leading again, under the same token
    assert election.should_run() and election.token == 1 and election.acquisitions == 1


async def test_a_lease_that_cannot_be_read_names_no_leader_once_the_last_one_read_ran_out(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database gone read-only: every try fails. Every controller kept naming the leader it last
    read, the one that stepped down included (itself): agents bounced between "the leader is at
    A" and "no leader yet" for as long as it lasted, and `maiactl version` named a gone leader."""
    from sqlalchemy.exc import DBAPIError

    now = [100.0]
    settings = LeaseSettings(ttl_s=5.0, renew_every_s=0.01, retry_every_s=0.01, margin_s=1.5)
    leader = LeaderElection(database, address="a:1", holder="a", settings=settings, clock=lambda: now[0])
    follower = LeaderElection(database, address="b:1", holder="b", settings=settings, clock=lambda: now[0])
    await leader.step()
    await follower.step()
    assert leader.leader.api == follower.leader.api == "a:1"

    class ReadOnly(Exception):
        sqlstate = "25006"

    async def read_only(*args: Any, **kwargs: Any) -> None:
        raise DBAPIError("UPDATE leader_lease ...", None, ReadOnly("cannot execute UPDATE in a read-only transaction"))

    monkeypatch.setattr(lease, "acquire", read_only)
    keepers = [asyncio.create_task(e._keep(database)) for e in (leader, follower)]
    try:
        await asyncio.sleep(0.1)  # failing tries within the lease's time: the leader is still named
        assert follower.leader.api == "a:1" and leader.should_run()
        now[0] = 103.6  # past ttl - margin: the leader steps down and names itself no more
        await asyncio.sleep(0.1)
        assert not leader.should_run() and leader.leader.api == "" and follower.leader.api == "a:1"
        now[0] = 105.1  # past the ttl since the follower's read: that lease has run out
        await asyncio.sleep(0.1)
        assert follower.leader.api == ""
        with pytest.raises(NotLeader) as refused:
            follower.require_leader()
        assert refused.value.metadata == ()
    finally:
        for keeper in keepers:
            keeper.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)


async def test_the_lone_sqlite_controller_keeps_leading_through_slow_renewals(database: Database) -> None:
    """`force` (SQLite's lock file: nobody else can hold the database): a renewal late past the
    lease does not make the only controller step down, and its commits stay fenced by token."""
    now = [100.0]
    election = LeaderElection(database, address="a:1", holder="a", settings=LeaseSettings(), force=True,
                              clock=lambda: now[0])
    await election.step()
    async with database.unit_of_work() as uow:  # the row runs out (no renewal got through)
        assert election.token is not None and await lease.release(uow.session, "a", election.token)
        await uow.session.commit()
    now[0] = 10_000.0  # hours later on this controller's clock
    assert election.should_run()
    token = election.token
    await election.step()  # the late renewal gets through: the same term, no new election
    assert (election.token, election.acquisitions) == (token, 1)
    async with database.fenced(election).unit_of_work() as uow:
        await _add_zone(uow.session, "z1")
        await uow.commit()  # the lease ran out, but it is still ours: not refused
    assert election.should_run() and await _zones(database) == ["z1"]
    async with database.unit_of_work() as uow:  # another holder's token is refused all the same
        with pytest.raises(LeaseLost):
            await lease.fence(uow.session, "b", election.token, live=False)
        await _add_zone(uow.session, "z2")
        with pytest.raises(LeaseLost):
            await lease.commit_fenced(uow.session, "b", election.token, uow.session.commit, live=False)
    assert await _zones(database) == ["z1"]


async def _add_zone(session: AsyncSession, zone: str) -> None:
    await session.execute(m.Zone.__table__.insert().values(id=zone))


async def _zones(database: Database) -> list[str]:
    async with database.unit_of_work() as uow:
        return list(await uow.session.scalars(select(m.Zone.id).order_by(m.Zone.id)))


async def test_the_lone_sqlite_controller_writes_no_renewals_once_it_leads(database: Database) -> None:
    """`force` (SQLite): after taking the lease the loop never writes it again (a renewal only
    waited for SQLite's one writer, and one cut off by its deadline could hold the lock)."""
    election = LeaderElection(database, address="a:1", holder="a", force=True,
                              settings=LeaseSettings(ttl_s=0.5, renew_every_s=0.05, margin_s=0.1))
    task = asyncio.create_task(election.run())
    try:
        for _ in range(200):
            if election.should_run():
                break
            await asyncio.sleep(0.01)
        assert election.should_run()
        taken = await _row(database)
        for _ in range(5):  # ten renewal intervals and more: nothing written, still leading
            election.wake()
            await asyncio.sleep(0.05)
        after = await _row(database)
        assert (after.holder, after.token, after.expires_at) == (taken.holder, taken.token, taken.expires_at)
        assert election.should_run() and election.acquisitions == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- renewal off the event loop (PostgreSQL: the only backend where a lease is renewed) --------

POSTGRES_ONLY = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])


async def _until(condition: Any, what: str, timeout_s: float = 30.0) -> None:
    """Yield to the loop until `condition()` (an awaitable's result) holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


@POSTGRES_ONLY
async def test_the_lease_is_renewed_while_the_event_loop_is_blocked(database: Database) -> None:
    """A leader whose loop is stuck (a long synchronous stretch) longer than the lease time keeps
    its lease: its own thread renews it, and the follower next to it never takes over."""
    settings = LeaseSettings(ttl_s=4.0, renew_every_s=0.25, margin_s=1.0)
    elected: list[int] = []
    deposed: list[str] = []
    leader = LeaderElection(database, address="a:1", holder="a", settings=settings,
                            on_elected=elected.append, on_deposed=deposed.append)
    follower = LeaderElection(database, address="b:1", holder="b", settings=settings)
    await leader.step()
    tasks = [asyncio.create_task(leader.run()), asyncio.create_task(follower.run())]
    try:
        await _until(lambda: _renewed(leader), "a renewal from the lease thread")
        before = await _row(database)
        time.sleep(settings.ttl_s + 0.5)  # the loop is blocked: no coroutine runs, no timer fires
        # Read before the loop runs anything: only a renewal made during the block explains it.
        assert leader.should_run() and not follower.should_run()
        after = await _row(database)
        assert (after.holder, after.token) == ("a", before.token)
        # renewed late in the block (a loaded host's renewals may come 1-2 s apart, hence not + ttl)
        assert after.expires_at > before.expires_at + settings.ttl_s / 2
        assert (leader.acquisitions, follower.acquisitions) == (1, 0)
        assert elected == [before.token] and deposed == []
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _renewed(election: LeaderElection) -> bool:
    return election.renewals > 0


@POSTGRES_ONLY
async def test_a_blocked_loop_does_not_keep_a_lease_taken_meanwhile(database: Database) -> None:
    """Safety: the lease thread finds the lease gone while the loop is stuck and stops the
    leader at once (before its own deadline would); the loop hears of it when it runs again, and
    a commit its stale pass tries is refused by the fence."""
    settings = LeaseSettings(ttl_s=6.0, renew_every_s=0.25, margin_s=1.0)
    deposed: list[str] = []
    leader = LeaderElection(database, address="a:1", holder="a", settings=settings, on_deposed=deposed.append)
    await leader.step()
    task = asyncio.create_task(leader.run())
    try:
        await _until(lambda: _renewed(leader), "a renewal from the lease thread")
        async with database.unit_of_work() as uow:  # another controller holds it now (its own term)
            await uow.session.execute(m.LeaderLease.__table__.update().values(
                holder="b", token=m.LeaderLease.__table__.c.token + 1, address="b:1"))
            await uow.session.commit()
        assert leader.should_run()  # its deadline has not come: only a renewal can tell it
        time.sleep(3.0)  # shorter than the lease time minus the margin: the clock alone says "leading"
        assert not leader.should_run()
        assert deposed == []  # announced on the loop, which has not run since
        await _until(lambda: _true(bool(deposed)), "the deposition announced on the loop")
        assert "holds the lease now" in deposed[0]
        with pytest.raises(LeaseLost):
            async with database.fenced(leader).unit_of_work() as uow:
                await uow.commit()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _true(value: bool) -> bool:
    return value


@POSTGRES_ONLY
@pytest.mark.parametrize("check", ["fence", "guard"])
async def test_a_renewal_never_waits_for_the_leaders_fenced_transactions_but_a_takeover_does(
        database: Database, check: str) -> None:
    """The fence's row lock keeps a new leader out until a deposed leader's late commit is done;
    the leader's own renewal must not wait for it (its loop may be slow to commit). `guard`: the
    check a COMMIT's message carries (migration 0026's function), run on its own in the transaction."""
    assert await _acquire(database, "a", HOUR) == 1
    async with database.unit_of_work() as fenced:
        # a leader transaction about to commit, holding the row
        if check == "fence":
            await lease.fence(fenced.session, "a", 1)
        else:
            await fenced.session.execute(text(lease.fence_guard("a", 1)))
        assert await within(_acquire(database, "a", HOUR, token=1), 10.0) == 1  # renewed without waiting
        async with database.unit_of_work() as uow:  # the lease runs out (the leader stalled)
            await uow.session.execute(m.LeaderLease.__table__.update().values(expires_at=0.0))
            await uow.session.commit()
        takeover = asyncio.create_task(_acquire(database, "b", HOUR))
        await _until(lambda: _waiting_for_a_lock(database), "the takeover waiting for the fenced transaction")
        assert not takeover.done()
        await fenced.session.commit()
    assert await takeover == 2


async def _waiting_for_a_lock(database: Database) -> bool:
    async with database.unit_of_work() as uow:
        waiting = await uow.session.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"))
    return bool(waiting)


@POSTGRES_ONLY
async def test_a_fenced_commit_costs_no_round_trip_of_its_own(database: Database) -> None:
    """On PostgreSQL the fence rides in the COMMIT's message: a fenced unit of work makes as many
    round trips as the same unit unfenced, and its last one is the check and the COMMIT."""
    election = LeaderElection(database, address="a:1", holder="a", settings=LeaseSettings())
    await election.step()
    trips: dict[str, list[str]] = {}
    for name, db in (("unfenced", database), ("fenced", database.fenced(election))):
        async with db.unit_of_work() as uow:
            await _add_zone(uow.session, "warm-" + name)  # prepared on this connection (LIFO) before counting
            await uow.commit()
        with counted_trips() as seen:
            async with db.unit_of_work() as uow:
                await _add_zone(uow.session, name)
                await uow.commit()
        trips[name] = [t.statement for t in seen]
    assert trips["unfenced"] == ["BEGIN", "INSERT INTO zones", "COMMIT"]
    assert len(trips["fenced"]) == 3 and trips["fenced"][:2] == ["BEGIN", "INSERT INTO zones"]
    assert trips["fenced"][2].startswith(f"SELECT {lease.FENCE_FUNCTION}(")
    assert await _zones(database) == ["fenced", "unfenced", "warm-fenced", "warm-unfenced"]


@POSTGRES_ONLY
async def test_a_fenced_commit_waits_for_a_takeover_in_flight_and_is_refused(database: Database) -> None:
    """A takeover that locked the row first: the fenced COMMIT's check waits for it, then reads the
    row it committed (READ COMMITTED re-reads a row locked meanwhile) and refuses."""
    assert await _acquire(database, "a", HOUR) == 1
    async with database.unit_of_work() as takeover:
        assert await lease.acquire(takeover.session, "b", "b:1", HOUR, token=None, force=True) == 2

        async def late_commit() -> None:
            async with database.unit_of_work() as uow:
                await _add_zone(uow.session, "late")
                await lease.commit_fenced(uow.session, "a", 1, uow.session.commit)

        late = asyncio.create_task(late_commit())
        await _until(lambda: _waiting_for_a_lock(database), "the fenced commit waiting for the takeover")
        assert not late.done()
        await takeover.session.commit()
    with pytest.raises(LeaseLost):
        await late
    assert await _zones(database) == []


@POSTGRES_ONLY
async def test_the_commit_fence_judges_the_expiry_only_when_told_live(database: Database) -> None:
    """The check in the COMMIT's message (migration 0026's function) refuses a lease that ran out
    though nobody took it when `live`, and lets it commit when not (a lone controller's fence)."""
    assert await _acquire(database, "a", EXPIRED) == 1
    async with database.unit_of_work() as uow:
        await _add_zone(uow.session, "refused")
        with pytest.raises(LeaseLost):
            await lease.commit_fenced(uow.session, "a", 1, uow.session.commit)
    async with database.unit_of_work() as uow:
        await _add_zone(uow.session, "kept")
        await lease.commit_fenced(uow.session, "a", 1, uow.session.commit, live=False)
    async with database.unit_of_work() as uow:
        await _add_zone(uow.session, "foreign")
        with pytest.raises(LeaseLost):
            await lease.commit_fenced(uow.session, "b", 1, uow.session.commit, live=False)
    assert await _zones(database) == ["kept"]


@POSTGRES_ONLY
@pytest.mark.parametrize("holder", ["it's", "back\\slash", "$fence$ END $fence$; COMMIT; --", "e'\\$x"])
async def test_the_commit_fence_quotes_any_holder(database: Database, holder: str) -> None:
    """The check in the COMMIT's message has no parameters: the holder is quoted into it."""
    assert await _acquire(database, holder, HOUR) == 1
    async with database.unit_of_work() as uow:
        await _add_zone(uow.session, "theirs")
        await lease.commit_fenced(uow.session, holder, 1, uow.session.commit)
    for other in (holder + "x", holder[:-1], "it"):
        async with database.unit_of_work() as uow:
            await _add_zone(uow.session, "not-theirs")
            with pytest.raises(LeaseLost):
                await lease.commit_fenced(uow.session, other, 1, uow.session.commit)
    assert await _zones(database) == ["theirs"]


@POSTGRES_ONLY
async def test_a_transaction_opened_in_a_term_this_controller_lost_is_refused_in_its_next(database: Database) -> None:
    """Deposed, then elected again (another led between, and stopped) while a transaction it had
    opened as leader was still open: its token is the lease's again, and the fence, which
    checked only the token of now, committed what was decided under the lead it had lost. The
    term in office stands (it does not step down for it), and its own new work commits."""
    a = LeaderElection(database, address="a:1", holder="a")
    b = LeaderElection(database, address="b:1", holder="b")
    await a.step()
    async with database.fenced(a).unit_of_work() as uow:
        await uow.session.execute(select(m.Zone.id))  # decided as the leader of term 1 ...
        async with database.unit_of_work() as expire:
            await expire.session.execute(m.LeaderLease.__table__.update().values(expires_at=0.0))
            await expire.session.commit()
        await b.step()
        await a.step()
        assert b.token == 2 and not a.should_run()
        await b.release()
        await a.step()
        assert a.should_run() and a.token == 3
        await uow.session.execute(m.Zone.__table__.insert().values(id="decided-in-term-1"))
        with pytest.raises(LeaseLost, match="fencing token 1"):
            await uow.commit()
    assert a.should_run()
    async with database.fenced(a).unit_of_work() as uow:
        await uow.session.execute(m.Zone.__table__.insert().values(id="decided-in-term-3"))
        await uow.commit()
    assert await _zones(database) == ["decided-in-term-3"]
