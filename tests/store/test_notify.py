"""Controllers on one PostgreSQL tell each other what changed (`store/notify.py`): the messages a
controller queues in one turn of its event loop reach the others in order, in one round trip, a
kind's consecutive messages merged; a controller ignores its own; long ones are split; a
controller alone sends nothing, and learns of another as it starts listening."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from controller.store.db import Database
from controller.store import notify
from controller.store.notify import PAYLOAD_MAX, PgChannel
from tests.store.listening import end_listening_connection, reconnections_held

POSTGRES_ONLY = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])


async def _listening(url: str, sender: str, heard: list[tuple[str, str]]) -> tuple[PgChannel, asyncio.Task]:
    channel = PgChannel(url, sender, lambda kind, data: heard.append((kind, data)))
    task = asyncio.create_task(channel.run())
    assert await channel.wait_ready(10.0)
    return channel, task


async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def _pair(url: str, heard_a: list[tuple[str, str]], heard_b: list[tuple[str, str]],
                ) -> list[tuple[PgChannel, asyncio.Task]]:
    """Two controllers listening, each knowing the other does (`a` from `b`'s HELLO)."""
    a = await _listening(url, "a", heard_a)
    b = await _listening(url, "b", heard_b)
    await _until(lambda: a[0].others_listening)
    assert b[0].others_listening  # it saw a's connection as it connected
    return [a, b]


def _counted_notifies(monkeypatch: pytest.MonkeyPatch, channel: PgChannel) -> list[str]:
    """The `pg_notify` statements `channel` runs from now on."""
    notifies: list[str] = []
    execute = asyncpg.Connection.execute

    async def counted(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> Any:
        if self is channel._conn and "pg_notify" in query:
            notifies.append(query)
        return await execute(self, query, *args, **kw)

    monkeypatch.setattr(asyncpg.Connection, "execute", counted)
    return notifies


async def _stop(*listening: tuple[PgChannel, asyncio.Task]) -> None:
    for channel, task in listening:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close()


@POSTGRES_ONLY
async def test_messages_queued_in_one_turn_arrive_in_order_in_one_round_trip(database: Database,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    heard_a: list[tuple[str, str]] = []
    heard_b: list[tuple[str, str]] = []
    listening = await _pair(database.url, heard_a, heard_b)
    a = listening[0][0]
    notifies = _counted_notifies(monkeypatch, a)
    try:
        a.send("wake")
        a.send("deployments", ["added:t/x"])
        a.send("deployments", ["added:t/y", "deleted:t/z"])
        a.send("nodes", ["n1"])
        a.send("released")
        await _until(lambda: len(heard_b) >= 4)
        await asyncio.sleep(0.2)  # nothing more comes
        assert heard_b == [("wake", ""), ("deployments", "added:t/x,added:t/y,deleted:t/z"), ("nodes", "n1"),
                           ("released", "")]
        assert len(notifies) == 1
        assert heard_a == []  # its own messages are ignored
    finally:
        await _stop(*listening)


@POSTGRES_ONLY
async def test_messages_sent_while_others_are_on_their_way_follow_them_and_long_ones_are_split(
        database: Database) -> None:
    heard: list[tuple[str, str]] = []
    listening = await _pair(database.url, [], heard)
    a = listening[0][0]
    try:
        items = [f"modified:tenant/deployment-{i:05d}" for i in range(2 * PAYLOAD_MAX // 30)]
        a.send("deployments", items)
        await asyncio.sleep(0)  # the first flush is under way
        a.send("wake")
        a.send("deployments", ["added:t/last"])
        await _until(lambda: heard and heard[-1] == ("deployments", "added:t/last"))
        kinds = [kind for kind, _ in heard]
        assert kinds[-2:] == ["wake", "deployments"] and set(kinds[:-2]) == {"deployments"} and len(kinds) >= 4
        assert [item for _, data in heard[:-2] for item in data.split(",")] == items
        assert all(len(f"deployments|a|{data}".encode()) <= PAYLOAD_MAX for _, data in heard)
    finally:
        await _stop(*listening)


@POSTGRES_ONLY
async def test_a_controller_alone_sends_nothing_and_sends_while_another_listens(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "RECONNECT_S", 0.05)  # the keepalive that looks again
    heard_b: list[tuple[str, str]] = []
    a_listening = await _listening(database.url, "a", [])
    a = a_listening[0]
    notifies = _counted_notifies(monkeypatch, a)
    b_listening: tuple[PgChannel, asyncio.Task] | None = None
    try:
        a.send("wake")
        a.send("deployments", ["added:t/x"])
        # A look that began after both found nobody: they are dropped, not held for `b` (a fixed
        # sleep was not enough on a loaded machine: the look had not run, b then heard them).
        await _until(lambda: not a._held)
        assert not a.others_listening and notifies == []

        b_listening = await _listening(database.url, "b", heard_b)
        await _until(lambda: a.others_listening)  # b's HELLO, or a's next look
        a.send("deployments", ["added:t/y"])
        await _until(lambda: heard_b == [("deployments", "added:t/y")])  # the HELLO is not handed on
        assert len(notifies) == 1

        await _stop(b_listening)
        b_listening = None
        await _until(lambda: not a.others_listening)  # its keepalive no longer sees b
        a.send("wake")
        await asyncio.sleep(0.1)
        assert len(notifies) == 1
    finally:
        await _stop(a_listening, *([b_listening] if b_listening else []))


async def _bare_listener(url: str, heard: list[str]) -> asyncpg.Connection:
    """A controller's listening connection as it is between its LISTEN and its HELLO: named as one,
    listening, not announced yet (`PgChannel.run` sends the HELLO just after the LISTEN)."""
    dsn = url.replace("postgresql+asyncpg", "postgresql")
    conn = await asyncpg.connect(dsn, server_settings={"application_name": notify.APPLICATION_NAME})
    await conn.add_listener(notify.CHANNEL, lambda _c, _p, _ch, payload: heard.append(payload))
    return conn


@POSTGRES_ONLY
async def test_a_message_sent_between_a_new_controllers_listen_and_its_hello_reaches_it(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "RECONNECT_S", 3600.0)  # no keepalive look: only the HELLO tells `a`
    a_listening = await _listening(database.url, "a", [])
    a = a_listening[0]
    heard: list[str] = []
    b = await _bare_listener(database.url, heard)
    try:
        assert not a.others_listening  # b listens; a has not heard of it yet
        a.send("deployments", ["modified:t/x"])  # b's watchers need this one
        await asyncio.sleep(0)
        await b.execute("SELECT pg_notify($1, $2)", notify.CHANNEL, f"{notify.HELLO}|b|")
        await _until(lambda: a.others_listening)
        a.send("wake")
        await _until(lambda: "wake|a|" in heard)
        assert [m for m in heard if not m.startswith("hello|")] == ["deployments|a|modified:t/x", "wake|a|"]
    finally:
        await b.close()
        await _stop(a_listening)


@POSTGRES_ONLY
async def test_messages_held_while_alone_go_when_a_look_finds_a_listener_and_are_dropped_when_none(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "RECONNECT_S", 3600.0)
    a_listening = await _listening(database.url, "a", [])
    a = a_listening[0]
    notifies = _counted_notifies(monkeypatch, a)
    heard: list[str] = []
    b: asyncpg.Connection | None = None
    try:
        a.send("deployments", ["modified:t/gone"])
        await a._look(a._conn.fetchval(notify._OTHERS))  # nobody listened when it was sent: dropped
        b = await _bare_listener(database.url, heard)
        a.send("deployments", ["modified:t/x"])  # b listens, silent: a looks before it drops this one
        await a._look(a._conn.fetchval(notify._OTHERS))
        assert a.others_listening
        await _until(lambda: heard == ["deployments|a|modified:t/x"])
        assert len(notifies) == 1
    finally:
        if b is not None:
            await b.close()
        await _stop(a_listening)


async def test_a_look_that_saw_nobody_keeps_what_was_held_since_it_began_even_past_the_cap(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Held messages beyond `HELD_MAX` drop the oldest (logged); those held while a look was on its
    way stay when it saw nobody, though the cap dropped older ones meanwhile."""
    monkeypatch.setattr(notify, "HELD_MAX", 3)
    channel = PgChannel("postgresql+asyncpg://nowhere/maia", "a", lambda kind, data: None)
    for name in ("o1", "o2", "o3"):
        channel.send("deployments", [name])
    answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    look = asyncio.create_task(channel._look(answer))
    await asyncio.sleep(0)  # the look's query is on its way
    with caplog.at_level("WARNING", logger="maia.notify"):
        channel.send("deployments", ["n1"])
        channel.send("deployments", ["n2"])
    assert "dropped 1 held notification(s)" in caplog.text
    answer.set_result(False)
    await look
    assert channel._held == [("deployments", ["n1"]), ("deployments", ["n2"])]


@POSTGRES_ONLY
async def test_messages_the_cap_dropped_while_a_listener_was_unseen_make_it_resync_first(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """`b` listens before `a` has seen it; `a` holds more than `HELD_MAX` items meanwhile and drops
    the oldest (owed to `b`). When `a` hears `b`'s HELLO, a RESYNC goes before what it still held:
    `b` resyncs instead of missing a change for good."""
    monkeypatch.setattr(notify, "RECONNECT_S", 3600.0)  # no keepalive look: only the HELLO tells `a`
    monkeypatch.setattr(notify, "HELD_MAX", 2)
    a_listening = await _listening(database.url, "a", [])
    a = a_listening[0]
    heard: list[str] = []
    b = await _bare_listener(database.url, heard)
    try:
        for key in ("t/x", "t/y", "t/z"):
            a.send("deployments", [f"modified:{key}"])  # t/x dropped past the cap
        await b.execute("SELECT pg_notify($1, $2)", notify.CHANNEL, f"{notify.HELLO}|b|")
        await _until(lambda: "deployments|a|modified:t/y,modified:t/z" in heard)
        assert [m for m in heard if not m.startswith("hello|")] == [
            "resync|a|", "deployments|a|modified:t/y,modified:t/z"]
        a.send("wake")  # said once
        await _until(lambda: "wake|a|" in heard)
        assert heard.count("resync|a|") == 1
    finally:
        await b.close()
        await _stop(a_listening)


async def test_messages_the_cap_dropped_before_a_look_that_saw_nobody_owe_no_resync(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropped past the cap, but held before a look that then saw nobody: nobody listened then, so
    the listener a later look or HELLO finds is owed nothing of them (no RESYNC). Dropped while
    that look was on its way: it may have been, and is told to resync."""
    monkeypatch.setattr(notify, "HELD_MAX", 2)

    async def look(channel: PgChannel, before: tuple[str, ...], during: tuple[str, ...]) -> None:
        for name in before:
            channel.send("deployments", [name])
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        looking = asyncio.create_task(channel._look(answer))
        await asyncio.sleep(0)  # the look's query is on its way
        for name in during:
            channel.send("deployments", [name])
        answer.set_result(False)
        await looking

    for during, resync in (((), False), (("n1", "n2"), True)):
        channel = PgChannel("postgresql+asyncpg://nowhere/maia", "a", lambda kind, data: None)
        await look(channel, ("o1", "o2", "o3"), during)  # o1 dropped past the cap (and o2 with `during`)
        channel.send("deployments", ["late"])
        channel._received(None, 0, notify.CHANNEL, f"{notify.HELLO}|b|")
        assert channel._resync_owed is resync  # a RESYNC goes before what is queued
        assert channel._queued[0][0] == "deployments"
        await channel.close()


class _Connection:
    """A listening connection whose NOTIFYs PostgreSQL refuses while `refusing` (the connection
    stays open), which breaks under the next NOTIFY once `breaking` (closed from then on), or
    whose NOTIFYs get no answer while `silent` (a network cut no error tells of); the NOTIFYs that
    went are kept."""

    def __init__(self) -> None:
        self.refusing = False
        self.breaking = False
        self.silent = False
        self.closed = False
        self.sent: list[list[str]] = []

    def is_closed(self) -> bool:
        return self.closed

    async def close(self) -> None:
        self.closed = True

    def terminate(self) -> None:
        self.closed = True

    async def execute(self, query: str, channel: str, messages: list[str]) -> None:
        if self.silent:
            await asyncio.Event().wait()
        if self.breaking:
            self.closed = True
            raise ConnectionResetError("connection reset by peer")
        if self.refusing:
            raise asyncpg.PostgresError("too many notifications in the NOTIFY queue")
        self.sent.append(list(messages))


async def _told_to_resync_and_failed(monkeypatch: pytest.MonkeyPatch) -> tuple[PgChannel, _Connection]:
    """A channel whose cap dropped a held message, which hears a HELLO while PostgreSQL refuses its
    NOTIFYs: the RESYNC it owes, and what it held, are not sent (what it held is dropped: a RESYNC
    is owed for it anyway)."""
    monkeypatch.setattr(notify, "HELD_MAX", 2)
    channel = PgChannel("postgresql+asyncpg://nowhere/maia", "a", lambda kind, data: None)
    channel._conn = conn = _Connection()
    for key in ("t/x", "t/y", "t/z"):
        channel.send("deployments", [f"modified:{key}"])  # t/x dropped past the cap
    conn.refusing = True
    channel._received(None, 0, notify.CHANNEL, f"{notify.HELLO}|b|")
    await _until(lambda: channel._flushing is None)
    assert conn.sent == []
    conn.refusing = False
    return channel, conn


async def test_a_resync_whose_notify_failed_goes_before_the_next_message_sent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The RESYNC a listener is owed is not lost with the NOTIFY that failed to carry it: it goes
    first with the next message sent, once."""
    channel, conn = await _told_to_resync_and_failed(monkeypatch)
    channel.send("wake")
    await _until(lambda: channel._flushing is None)
    channel.send("wake")
    await _until(lambda: len(conn.sent) == 2)
    assert conn.sent == [["resync|a|", "wake|a|"], ["wake|a|"]]
    await channel.close()


async def test_a_resync_whose_notify_failed_is_sent_by_the_next_look_that_sees_a_listener(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing more to send: the next look that sees another controller (the keepalive's, or the
    one a reconnection makes) sends the RESYNC still owed, once."""
    channel, conn = await _told_to_resync_and_failed(monkeypatch)
    for _ in range(2):
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        answer.set_result(True)
        await channel._look(answer)
        await _until(lambda: channel._flushing is None)
    assert conn.sent == [["resync|a|"]]
    await channel.close()


async def test_a_resync_queued_while_the_connection_is_down_is_sent_once_it_is_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection at all when the RESYNC was to go (between a drop and the reconnection):
    owed until a connection sends it, still before what is sent next; what it held goes after
    it (held again: the NOTIFY did not go)."""
    monkeypatch.setattr(notify, "HELD_MAX", 2)
    channel = PgChannel("postgresql+asyncpg://nowhere/maia", "a", lambda kind, data: None)
    for key in ("t/x", "t/y", "t/z"):
        channel.send("deployments", [f"modified:{key}"])
    channel._received(None, 0, notify.CHANNEL, f"{notify.HELLO}|b|")  # no connection: nothing sent
    await _until(lambda: channel._flushing is None)
    channel._conn = conn = _Connection()
    answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    answer.set_result(True)
    await channel._look(answer)  # the reconnection's look
    channel.send("wake")
    await _until(lambda: channel._flushing is None and conn.sent)
    assert [m for batch in conn.sent for m in batch] == [
        "resync|a|", "deployments|a|modified:t/y,modified:t/z", "wake|a|"]
    await channel.close()


async def _pair_reconnecting(url: str, heard_b: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch,
                             ) -> tuple[list[tuple[PgChannel, asyncio.Task]], asyncio.Event]:
    """`_pair`, whose keepalives notice a dropped connection soon (a look given less than that to
    answer may time out on a busy host: a reconnection, and a resync, more), and whose listening
    connections reconnect only once the event returned is set."""
    monkeypatch.setattr(notify, "RECONNECT_S", 0.5)
    listening = await _pair(url, [], heard_b)
    return listening, reconnections_held(monkeypatch)


@POSTGRES_ONLY
async def test_a_listener_whose_connection_dropped_resyncs_once_it_listens_again_and_hears_what_follows(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """`b`'s listening connection is ended (a restart, a network cut): what `a` sent meanwhile is
    lost to `b`, so `b` resyncs as if told to, once it listens again (not on its first connection),
    and hears what is sent from then on."""
    heard_b: list[tuple[str, str]] = []
    listening, allowed = await _pair_reconnecting(database.url, heard_b, monkeypatch)
    (a, _), (b, _) = listening
    try:
        assert heard_b == []  # the first connection owes nothing
        await end_listening_connection(database.url, b)
        a.send("deployments", ["modified:t/missed"])
        await _until(lambda: not a._held and not a._queued)  # sent to nobody, or dropped: lost to b
        allowed.set()
        await _until(lambda: heard_b == [(notify.RESYNC, "")])
        await _until(lambda: a.others_listening)
        a.send("wake")
        await _until(lambda: ("wake", "") in heard_b)
        assert heard_b[0] == (notify.RESYNC, "")
    finally:
        await _stop(*listening)


@POSTGRES_ONLY
async def test_a_listener_that_was_not_ready_in_time_resyncs_on_its_first_connection(database: Database) -> None:
    """Its controller gave up waiting for it (`wait_ready`) and serves meanwhile: what was sent
    before its first LISTEN is lost to it, so it resyncs then."""
    heard: list[tuple[str, str]] = []
    channel = PgChannel(database.url, "b", lambda kind, data: heard.append((kind, data)))
    assert not await channel.wait_ready(0.0)
    task = asyncio.create_task(channel.run())
    try:
        assert await channel.wait_ready(10.0)
        assert heard == [(notify.RESYNC, "")]
    finally:
        await _stop((channel, task))


@POSTGRES_ONLY
async def test_a_message_sent_while_the_senders_connection_is_down_goes_once_it_is_back(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """`a`'s own connection is ended: what it sends meanwhile is held, not lost, and reaches `b`
    (whose connection lived: it has nothing to resync) once `a` is back, in order, without a
    RESYNC."""
    heard_b: list[tuple[str, str]] = []
    listening, allowed = await _pair_reconnecting(database.url, heard_b, monkeypatch)
    (a, _), (b, _) = listening
    try:
        await end_listening_connection(database.url, a)
        a.send("deployments", ["modified:t/x"])
        a.send("node_removed", ["n1"])
        await _until(lambda: not a._queued and a._flushing is None)
        assert a._held  # not sent
        allowed.set()
        await _until(lambda: len(heard_b) == 2)
        assert heard_b == [("deployments", "modified:t/x"), ("node_removed", "n1")]
    finally:
        await _stop(*listening)


def _connected(monkeypatch: pytest.MonkeyPatch) -> tuple[PgChannel, _Connection]:
    """A channel on a fake connection, which knows another controller listens."""
    channel = PgChannel("postgresql+asyncpg://nowhere/maia", "a", lambda kind, data: None)
    channel._conn = conn = _Connection()
    channel._received(None, 0, notify.CHANNEL, f"{notify.HELLO}|b|")
    return channel, conn


async def _looked(channel: PgChannel, others: bool) -> None:
    answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    answer.set_result(others)
    await channel._look(answer)
    await _until(lambda: channel._flushing is None)


async def test_messages_whose_connection_broke_under_their_notify_go_in_order_after_the_next_look(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection breaks under a NOTIFY: what it carried, and what is sent until a look finds
    the other controller again (the reconnection's), go then, in order, in one NOTIFY; no RESYNC
    (the listener lost nothing)."""
    channel, conn = _connected(monkeypatch)
    conn.breaking = True
    channel.send("deployments", ["modified:t/x"])
    await _until(lambda: channel._flushing is None)
    channel.send("wake")
    channel.send("deployments", ["deleted:t/y"])
    assert not channel.others_listening and conn.sent == []
    channel._conn = conn = _Connection()  # the reconnection
    await _looked(channel, True)
    assert conn.sent == [["deployments|a|modified:t/x", "wake|a|", "deployments|a|deleted:t/y"]]
    assert not channel._resync_owed
    await channel.close()


async def test_messages_held_again_are_dropped_only_by_a_look_that_began_after_they_came_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A look on its way when a NOTIFY's messages came back that sees nobody drops none of them (a
    listener may have been there when they were sent); the next look that sees nobody drops them
    (nobody listens: a listener of then has gone, and resyncs when it listens again)."""
    channel, conn = _connected(monkeypatch)
    answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    look = asyncio.create_task(channel._look(answer))
    await asyncio.sleep(0)  # the look's query is on its way
    conn.breaking = True
    channel.send("deployments", ["modified:t/x"])
    await _until(lambda: channel._flushing is None)
    answer.set_result(False)
    await look
    assert channel._held == [("deployments", ["modified:t/x"])]
    await _looked(channel, False)
    assert channel._held == [] and not channel._resync_owed


async def test_a_notify_postgresql_refuses_is_dropped_and_a_resync_owed_for_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused on a live connection (sent again, it would be refused again, and hold up what
    follows): dropped, and the listeners are told to resync instead, with the next message."""
    channel, conn = _connected(monkeypatch)
    conn.refusing = True
    channel.send("deployments", ["modified:t/x"])
    await _until(lambda: channel._flushing is None)
    assert channel._held == [] and channel.others_listening
    conn.refusing = False
    channel.send("wake")
    await _until(lambda: channel._flushing is None and conn.sent)
    assert conn.sent == [["resync|a|", "wake|a|"]]
    await channel.close()


async def test_a_notify_without_an_answer_gives_its_connection_up_and_is_held_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY on a connection cut without an error (no answer, ever) would hold the lock the
    keepalive needs to notice: after `RECONNECT_S` the connection is given up (the keepalive
    then reconnects), and what the NOTIFY carried is held for the next look, as for a connection
    that broke."""
    monkeypatch.setattr(notify, "RECONNECT_S", 0.05)
    channel, conn = _connected(monkeypatch)
    conn.silent = True
    channel.send("deployments", ["modified:t/x"])
    await _until(lambda: channel._flushing is None)
    assert conn.closed and channel._held == [("deployments", ["modified:t/x"])]
    channel._conn = conn = _Connection()  # the reconnection
    await _looked(channel, True)
    assert conn.sent == [["deployments|a|modified:t/x"]]
    await channel.close()


@POSTGRES_ONLY
async def test_a_connection_the_server_ended_is_replaced_at_once_not_at_the_next_keepalive(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """No keepalive look and no wait before reconnecting within the test (an hour each): `b` listens
    again, and resyncs, because its connection's end was noticed as it came, and a connection that
    listened `RECONNECT_S` or longer (its clock moved on by two) is replaced at once. One that
    listened less is replaced `RECONNECT_S` later (a database that ends every new connection is
    not retried in a loop)."""
    monkeypatch.setattr(notify, "RECONNECT_S", 3600.0)
    later = 0.0
    monkeypatch.setattr(notify, "monotonic", lambda: time.monotonic() + later)
    heard_b: list[tuple[str, str]] = []
    listening = await _pair(database.url, [], heard_b)
    b = listening[1][0]
    try:
        later = 7200.0
        await end_listening_connection(database.url, b)
        await _until(lambda: heard_b == [(notify.RESYNC, "")] and b._ready.is_set())
        await end_listening_connection(database.url, b)
        await _until(lambda: not b._ready.is_set())
        await asyncio.sleep(0.2)  # a reconnection at once would have come by now (none within the hour)
        assert not b._ready.is_set() and heard_b == [(notify.RESYNC, "")]
    finally:
        await _stop(*listening)


@POSTGRES_ONLY
async def test_a_closed_channel_does_not_take_its_connections_end_for_a_reason_to_listen_again(
        database: Database, caplog: pytest.LogCaptureFixture) -> None:
    """`close` ends the connection (the controller stops): its run ends, without a warning that
    the connection failed and without connecting again."""
    channel, task = await _listening(database.url, "a", [])
    with caplog.at_level("WARNING", logger="maia.notify"):
        await channel.close()
        async with asyncio.timeout(10.0):
            await task
    assert "failed" not in caplog.text and channel._conn is None


@POSTGRES_ONLY
async def test_a_connection_that_fails_before_it_listens_is_not_left_open(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The announcement fails (the database went away just then): that connection is closed, not
    left to the garbage collector, and the next one listens."""
    monkeypatch.setattr(notify, "RECONNECT_S", 0.05)
    connections: list[asyncpg.Connection] = []
    connect = asyncpg.connect

    async def kept(*args: Any, **kw: Any) -> asyncpg.Connection:
        connections.append(await connect(*args, **kw))
        return connections[-1]

    monkeypatch.setattr(asyncpg, "connect", kept)
    look = PgChannel._look
    failures = [ConnectionResetError("connection reset by peer")]

    async def failing_once(self: PgChannel, others: Any) -> None:
        if failures:
            others.close()  # (the query's coroutine, never awaited)
            raise failures.pop()
        await look(self, others)

    monkeypatch.setattr(PgChannel, "_look", failing_once)
    channel, task = await _listening(database.url, "a", [])
    try:
        assert len(connections) == 2 and connections[0].is_closed() and channel._conn is connections[1]
    finally:
        await _stop((channel, task))

class _Announcing(_Connection):
    """A fresh connection whose announce is answered (nobody seen) only once `answer` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.listener: Any = None

    async def add_listener(self, channel: str, callback: Any) -> None:
        self.listener = callback

    def add_termination_listener(self, callback: Any) -> None:
        pass

    async def fetchval(self, query: str, *args: Any) -> bool:
        if args:  # the announce (the keepalive's look has no arguments)
            await self.answer.wait()
        return False


async def test_what_a_hello_heard_during_the_announce_releases_is_sent_once_connected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A controller alone holds what it sends; another's HELLO arrives while its own announce is on
    its way (both connecting at once): the held messages go, on the new connection, not into the
    void before it is the channel's (they were lost, and no RESYNC said so)."""
    monkeypatch.setattr(notify, "RECONNECT_S", 3600.0)
    conn = _Announcing()

    async def connect(*args: Any, **kw: Any) -> _Announcing:
        return conn

    monkeypatch.setattr(asyncpg, "connect", connect)
    channel = PgChannel("postgresql+asyncpg://nowhere/maia", "a", lambda kind, data: None)
    channel.send("deployments", ["modified:t/x"])  # alone: held
    task = asyncio.create_task(channel.run())
    try:
        await _until(lambda: conn.listener is not None)
        conn.listener(None, 0, notify.CHANNEL, f"{notify.HELLO}|b|")
        for _ in range(5):  # the flush the HELLO started runs as far as it can
            await asyncio.sleep(0)
        conn.answer.set()
        assert await channel.wait_ready(10.0)
        await _until(lambda: channel._flushing is None and not channel._queued)
        assert conn.sent == [["deployments|a|modified:t/x"]]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close()


async def test_a_connection_whose_announce_failed_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The announce fails (the database went away mid-way): the connection is closed before the
    next attempt, not left open."""
    monkeypatch.setattr(notify, "RECONNECT_S", 3600.0)
    closed = asyncio.Event()

    class Failing(_Announcing):
        async def fetchval(self, query: str, *args: Any) -> bool:
            raise ConnectionResetError("connection reset by peer")

        async def close(self) -> None:
            closed.set()

    async def connect(*args: Any, **kw: Any) -> Failing:
        return Failing()

    monkeypatch.setattr(asyncpg, "connect", connect)
    channel = PgChannel("postgresql+asyncpg://nowhere/maia", "a", lambda kind, data: None)
    task = asyncio.create_task(channel.run())
    try:
        await asyncio.wait_for(closed.wait(), 10)
        assert channel._conn is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close()
