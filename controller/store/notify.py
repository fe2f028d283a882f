"""Controllers on one PostgreSQL tell each other what changed: LISTEN/NOTIFY on one channel.

A follower that accepted a submission wakes the leader's reconciler; the leader tells
followers which deployments changed (for their watch streams) and that it released the lease.
A message is `kind|sender|data`; a controller ignores its own. A lost WAKE or lease release
only delays things (the leader also reconciles on an interval, followers poll the lease); watch
streams and agent streams have no such repair (a watcher would miss a deployment's change until
its next one), so what a listener may have missed is either sent again or resynced (below).

A controller sends only while another one listens (a lone controller sent one `pg_notify` round
trip per batch of watch events, 9 % of its round trips under load, to hear it back and drop it:
docs/benchmarks.md, `pg10`). Each listening connection names itself (`APPLICATION_NAME`); on
connecting it asks `pg_stat_activity` whether another controller's is there and says HELLO (in one
statement), and every `RECONNECT_S` its keepalive asks again. A HELLO heard makes the others send
at once.

A controller that believes itself alone holds what it would send instead of dropping it, and
drops a message only once a look at `pg_stat_activity` that began after it was queued found no
other controller's connection: a controller that LISTENs has its (named) connection there before
it listens, so one listening when a message was queued is seen by the next look, or is heard
(HELLO) first; either sends the held messages, in order. A new controller's watchers so miss
nothing sent between its LISTEN and the moment the others hear its HELLO (the few milliseconds
until then, or until the next look). Held messages are bounded (`HELD_MAX` items, the oldest
dropped beyond, logged). A message so dropped may have been owed to a controller that listened
unseen: unless a look that began after it saw nobody, the held messages go out after a RESYNC,
on which each listener resyncs what it kept from the messages (its watchers watch again from the
current state, its agents are sent their sets: `PeerMessages.resync`). A RESYNC whose NOTIFY
failed stays owed until one gets through: it goes before the next message sent, or with the next
look that sees another controller (the keepalive's every `RECONNECT_S`, the reconnection's).

A listener misses what is sent while its own listening connection is down: from its end (noticed
as it comes when the server ended it, else by the keepalive's look) to the reconnection (at once
when it had listened `RECONNECT_S` or longer, else `RECONNECT_S` later: `PgChannel.run`). On
listening again (any connection after the first, or the first once `wait_ready` gave up on it)
it resyncs itself as if it had heard a RESYNC, after its LISTEN is in place: what it missed is
read again from the database, and what is sent from then on reaches it.

A sender keeps what it could not send: a NOTIFY that did not go because the connection was down,
broke under it, or gave no answer within `RECONNECT_S` (a cut no error tells of: the connection is
given up, as the keepalive's look, which would wait behind it, gives it up), it and whatever was
queued behind it, goes back to the front of the held messages, and the controller believes itself
alone until its next look (the reconnection's): one that sees another controller sends them, in
order, late by the reconnection's delay; one that began after they came back and saw nobody drops
them (a listener of then has gone, and resyncs when it listens again). They are not replaced by a
RESYNC: that would end every watch of every follower on each blip of one controller's connection,
where the messages late cost nothing. A message may then arrive twice (a NOTIFY that went as its
connection broke, before the answer): each kind is read again from the database or repeated
harmlessly. Late, it may come after another controller's newer message about the same thing (a
deployment's `deleted` after its name was submitted again elsewhere), as two controllers' messages
racing may: a listener hands a `deleted` to its watchers only while no deployment of that name is
stored (`PeerMessages._republish`), and a NODE_REMOVED heard after the node registered again ends
no stream of that registration (`PeerMessages._removed_elsewhere`: its session read). A NOTIFY
PostgreSQL refused on a live connection (sent again it would be refused again, and hold up
everything behind it) is dropped, and a RESYNC is owed for it.

SQLite has one controller per file (`controller.store.exclusive`): `LocalChannel` drops
everything, in-process signals already reached everyone.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from sqlalchemy.engine import make_url
from controller.aio import wait_event, within

log = logging.getLogger("maia.notify")

CHANNEL = "maia_cluster"
# The listening connections' name, by which a controller finds the others (`pg_stat_activity`).
APPLICATION_NAME = "maia-cluster-channel"
HELLO = "hello"  # a controller started listening (the channel's own kind: never handed on)
RESYNC = "resync"  # messages a listener may have been owed were dropped (`HELD_MAX`): it resyncs
PAYLOAD_MAX = 7000  # PostgreSQL refuses payloads of 8000 bytes and more
RECONNECT_S = 2.0
HELD_MAX = 100_000  # items held while alone (`PgChannel.send`), about one look's worth under any load

Handler = Callable[[str, str], None]  # (kind, data)
# What became of a NOTIFY (`PgChannel._send`).
SENT, DOWN, REFUSED = "sent", "down", "refused"  # went; no live connection (held again); refused on a live one


class ClusterChannel(Protocol):
    def send(self, kind: str, items: Iterable[str] = ()) -> None: ...

    def listening(self) -> bool: ...

    async def run(self) -> None: ...

    async def wait_ready(self, timeout_s: float) -> bool: ...

    async def close(self) -> None: ...


class LocalChannel:
    """One controller: nobody to tell."""

    def send(self, kind: str, items: Iterable[str] = ()) -> None:
        pass

    def listening(self) -> bool:
        """Nothing to miss: there is nobody else."""
        return True

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def wait_ready(self, timeout_s: float) -> bool:
        return True

    async def close(self) -> None:
        pass


def payloads(kind: str, sender: str, items: Iterable[str]) -> list[str]:
    """`items` joined by commas into as few messages as fit (at least one)."""
    head = f"{kind}|{sender}|"
    out: list[str] = []
    current: list[str] = []
    size = len(head.encode())
    for item in items:
        extra = len(item.encode()) + 1
        if current and size + extra > PAYLOAD_MAX:
            out.append(head + ",".join(current))
            current, size = [], len(head.encode())
        current.append(item)
        size += extra
    out.append(head + ",".join(current))
    return out


# Whether another controller listens on this database (its listening connection is there).
_OTHERS = ("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
           f"AND application_name = '{APPLICATION_NAME}' AND pid <> pg_backend_pid())")
# On connecting: `_OTHERS`, and HELLO to those (one round trip).
_ANNOUNCE = f"SELECT ({_OTHERS}), pg_notify($1, $2)"


class PgChannel:
    """LISTEN/NOTIFY over one dedicated asyncpg connection, reconnected when it drops; messages
    are sent only while another controller listens (module docstring)."""

    def __init__(self, url: str, sender: str, on_message: Handler) -> None:
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._sender = sender
        self._on_message = on_message
        self._conn = None  # asyncpg.Connection while connected
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task] = set()
        self._queued: list[tuple[str, list[str]]] = []  # (kind, items) not sent yet, in order
        self._flushing: asyncio.Task | None = None
        self._ready = asyncio.Event()  # set while listening
        self._others = False  # another controller listens (as last seen or heard)
        self._hellos = 0  # HELLOs heard
        # What `send` held while alone, in order: sent when another controller is seen or heard,
        # dropped by a look that began after it was held and saw none (module docstring).
        self._held: list[tuple[str, list[str]]] = []
        self._held_items = 0
        self._held_gone = 0  # messages gone from the front of `_held` (sent, dropped), ever
        # The cap dropped held messages before this one (counted as `_held_gone`; 0: none owed):
        # a RESYNC goes before the held ones unless a look that began after them saw nobody.
        self._cap_dropped_to = 0
        # A RESYNC to send before the next message: the cap dropped some that were owed, the
        # NOTIFY that carried one failed, or PostgreSQL refused one. Cleared when one is sent.
        self._resync_owed = False
        self._reheld = 0  # times messages came back to `_held` from a NOTIFY that did not go
        self._listened = False  # a connection listened (the next one resyncs this controller)
        self._waited_out = False  # `wait_ready` gave up: even the first connection resyncs
        self._closed = False

    def listening(self) -> bool:
        """Whether this controller listens now (and resynced what it missed before it did): while it
        does not, what the others send is lost to it (its authenticator trusts its cache less:
        `controller.authn`). A connection cut without an error is noticed by the keepalive's look,
        within `2 * RECONNECT_S`; till then it counts as listening."""
        return self._ready.is_set()

    @property
    def others_listening(self) -> bool:
        """Whether another controller listens, as last seen (`pg_stat_activity`) or heard (HELLO):
        messages are sent only then."""
        return self._others

    def send(self, kind: str, items: Iterable[str] = ()) -> None:
        """Queue the message (fire and forget: never blocks the caller), or hold it while no other
        controller is known to listen (module docstring). Those queued while the last ones are
        being sent, or in the same turn of the event loop, go out together: one round trip for all
        of them, in order, a kind's consecutive messages merged."""
        items = list(items)
        if not self._others:
            self._hold(kind, items)
            return
        self._queue(kind, items)

    def _hold(self, kind: str, items: list[str]) -> None:
        self._held.append((kind, items))
        self._held_items += max(1, len(items))
        self._trim_held()

    def _trim_held(self) -> None:
        """The oldest held messages dropped past `HELD_MAX` items (a RESYNC owed for them, unless a
        look that began after they were held saw nobody)."""
        dropped = 0
        while self._held_items > HELD_MAX and len(self._held) > 1:
            _, gone = self._held.pop(0)
            self._held_items -= max(1, len(gone))
            self._held_gone += 1
            dropped += 1
            self._cap_dropped_to = self._held_gone
        if dropped:  # a controller listening unseen would miss them: said, not silent
            log.warning("dropped %d held notification(s): more than %d items held while no other controller "
                        "was seen listening", dropped, HELD_MAX)

    def _release(self, held: int | None = None) -> None:
        """Another controller listens: the messages held so far are sent, in order (after a RESYNC
        when the cap dropped some since nobody was last seen). `held`: only drop those held before
        the `held`-th message ever held (`_held_gone` counts from the first: a look that saw nobody;
        those held since it began stay)."""
        if held is not None:
            gone = max(0, held - self._held_gone)
            del self._held[:gone]
            self._held_gone += gone
            self._held_items = sum(max(1, len(items)) for _, items in self._held)
            if self._cap_dropped_to <= held:  # those the cap dropped were owed to nobody
                self._cap_dropped_to = 0
            return
        held_now, self._held, self._held_items = self._held, [], 0
        self._held_gone += len(held_now)
        if self._cap_dropped_to:  # some may have been owed to a listener: it resyncs first
            self._cap_dropped_to = 0
            self._resync_owed = True
        if self._resync_owed:
            self._flush_soon()
        for kind, items in held_now:
            self._queue(kind, items)

    def _queue(self, kind: str, items: list[str]) -> None:
        if self._queued and self._queued[-1][0] == kind:
            self._queued[-1][1].extend(items)
        else:
            self._queued.append((kind, items))
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flushing is None:
            self._flushing = task = asyncio.get_running_loop().create_task(self._flush())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _flush(self) -> None:
        try:
            while self._queued or self._resync_owed:
                queued, self._queued = self._queued, []
                resync, self._resync_owed = self._resync_owed, False
                if resync:
                    queued.insert(0, (RESYNC, []))
                outcome = await self._send([m for kind, items in queued for m in payloads(kind, self._sender, items)])
                if outcome == SENT:
                    continue
                # owed still (with the next message, or the next look), whoever queued it
                self._resync_owed |= resync or any(kind == RESYNC for kind, _ in queued)
                unsent = [(kind, items) for kind, items in queued if kind != RESYNC]
                if outcome == DOWN:
                    self._hold_again(unsent)
                    break
                if unsent:  # refused: dropped, and the listeners owed them resync instead
                    log.warning("dropped %d notification(s) PostgreSQL refused; the other controllers will "
                                "resync", len(unsent))
                    self._resync_owed = True
                if not self._queued:
                    break
        finally:
            self._flushing = None

    def _hold_again(self, unsent: list[tuple[str, list[str]]]) -> None:
        """A NOTIFY did not go (no live connection): what it carried, and what was queued behind
        it, go back to the front of the held messages, before those held since (later ones), and
        this controller believes itself alone until its next look tells (module docstring)."""
        unsent += self._queued
        self._queued = []
        self._others = False
        if not unsent:
            return
        self._reheld += 1
        self._held[:0] = unsent
        self._held_items += sum(max(1, len(items)) for _, items in unsent)
        self._trim_held()
        log.info("holding %d notification(s) until the connection to the other controllers is back",
                 len(unsent))

    async def _send(self, messages: list[str]) -> str:
        """What became of the NOTIFY: SENT; DOWN (the connection is down, broke under it, or gave
        no answer within `RECONNECT_S`: a cut no error tells, given up as the keepalive gives it
        up, which waits behind it for the lock); REFUSED (it failed on a connection that is still
        open: sent again, it would fail again)."""
        async with self._lock:
            conn = self._conn
            if conn is None or conn.is_closed():
                return DOWN
            try:  # one statement: PostgreSQL delivers them in this order (and one of identical ones)
                await within(conn.execute("SELECT pg_notify($1, m) FROM unnest($2::text[]) AS m", CHANNEL, messages),
                             RECONNECT_S)
            except TimeoutError:
                log.warning("notifying the other controllers got no answer within %.1fs: reconnecting", RECONNECT_S)
                conn.terminate()
                return DOWN
            except Exception as exc:
                log.warning("could not notify the other controllers (%s)", exc)
                return DOWN if conn.is_closed() else REFUSED
            return SENT

    def _received(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        kind, _, rest = payload.partition("|")
        sender, _, data = rest.partition("|")
        if sender == self._sender:
            return
        if kind == HELLO:
            self._hellos += 1
            self._others = True
            self._release()
            return
        try:
            self._on_message(kind, data)
        except Exception:
            log.exception("handling the notification %r failed", kind)

    async def run(self) -> None:
        """Listen until cancelled, reconnecting every `RECONNECT_S` while the database is away. A
        connection that listened and ended (the server ended it: a restart, `pg_terminate_backend`)
        is noticed as it ends, not at the next keepalive, and one that listened `RECONNECT_S` or
        longer is replaced at once (a database that ends each new connection is retried every
        `RECONNECT_S`, not in a loop): this controller misses less meanwhile."""
        import asyncpg

        listening_since = 0.0
        while True:
            wait_s, conn = RECONNECT_S, None
            try:
                conn = await asyncpg.connect(self._dsn, server_settings={"application_name": APPLICATION_NAME})
                ended = asyncio.Event()
                conn.add_termination_listener(lambda _conn: ended.set())
                # The connection is the channel's before it listens: what a HELLO heard during the
                # announce releases is sent on it once the announce is answered (it waits for the
                # lock), not dropped for want of a connection.
                async with self._lock:
                    self._conn = conn
                    await conn.add_listener(CHANNEL, self._received)
                    if self._listened or self._waited_out:
                        self._resync_self()
                    self._listened = True
                    await self._look(conn.fetchval(_ANNOUNCE, CHANNEL, f"{HELLO}|{self._sender}|"))
                self._ready.set()
                listening_since = monotonic()
                log.info("listening for other controllers on channel %s (others listening: %s)", CHANNEL,
                         self._others)
                while True:  # a query notices a dead connection that is_closed() would not
                    if await wait_event(ended, RECONNECT_S):
                        raise ConnectionError("the server ended the connection")
                    async with self._lock:
                        await within(self._look(conn.fetchval(_OTHERS)), RECONNECT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return
                if self._ready.is_set() and monotonic() - listening_since >= RECONNECT_S:
                    wait_s = 0.0
                log.warning("the notification connection failed (%s); reconnecting in %.0fs", exc, wait_s)
            finally:
                if conn is not None and conn is not self._conn:  # it failed before it was the channel's
                    conn.terminate()
                await self._drop()
            await asyncio.sleep(wait_s)

    def _resync_self(self) -> None:
        """Listening again: what was sent while this controller did not listen is lost to it, so it
        resyncs as if it had heard a RESYNC (its LISTEN is in place: nothing sent from now on is
        missed)."""
        log.warning("listening again to the other controllers: resyncing what their messages kept, "
                    "some may have been sent while this controller did not listen")
        try:
            self._on_message(RESYNC, "")
        except Exception:
            log.exception("resyncing after listening again failed")

    async def _look(self, others: Awaitable[bool]) -> None:
        """Whether others listen, as `others` (a query on the connection, sent now) tells; a HELLO
        heard while it was on its way stands (the query may have looked before that controller
        connected). Seen: what was held goes; not seen: what was held before the query went out is
        dropped (nobody listened then), what was held since stays for the next look, and all of it
        when messages came back from a NOTIFY that did not go meanwhile (they count as held when
        they came back: the next look judges them)."""
        hellos, reheld = self._hellos, self._reheld
        held = self._held_gone + len(self._held)  # counted from the first ever held
        self._others = bool(await others) or self._hellos != hellos
        if self._others:
            self._release()
        elif self._reheld == reheld:
            self._release(held)

    async def wait_ready(self, timeout_s: float) -> bool:
        """Until listening (True), or `timeout_s` passed (False: messages sent meanwhile are lost to
        this controller, which resyncs once it listens)."""
        ready = await wait_event(self._ready, timeout_s)
        self._waited_out |= not ready
        return ready

    async def _drop(self) -> None:
        self._ready.clear()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await within(conn.close(), 2.0)
            except Exception:
                conn.terminate()

    async def close(self) -> None:
        self._closed = True  # its connection's end is not a reason to listen again
        for task in list(self._pending):
            try:
                await within(task, 1.0)
            except Exception:
                pass
        try:
            await within(self._drop(), 3.0)
        except TimeoutError:
            pass
