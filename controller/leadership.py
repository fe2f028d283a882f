"""Leader election: which of several controllers on one database schedules.

Every controller runs a `LeaderElection`. It tries to take the lease row
(`controller.store.lease`) every `retry_every_s` while it follows, and renews it every
`renew_every_s` while it leads. Only the leader reconciles, watches agents' liveness and runs
the watchdog; followers serve the API (their writes go to the database; the leader is woken
through PostgreSQL NOTIFY) and send node agents to the leader: to its agent gateways'
address when it runs gateways, else to its advertised address (both in the lease row). On
PostgreSQL the renewing is done by a thread of its own (its own event loop and connection), so
a saturated event loop cannot starve it (see `LeaderElection`).

Stepping down happens on this controller's own clock, before the database could hand the
lease to anyone else: a lease renewed by a statement sent at local time t is ours until
t + ttl on the database's clock at the earliest, so the leader stops scheduling at
t + ttl - margin unless a renewal succeeded meanwhile. That is a courtesy; safety comes from
the fencing token, checked as every leader transaction commits (`LeaderElection.commit`, the
`Fence` of `Database.fenced`): a deposed leader's late plan is refused and rolled back. So is
a transaction opened in an earlier term of this controller (it was deposed, another led, and it
was elected again before that transaction committed): its token is the lease's again, but what
it decided was decided under a lead it lost (`LeaderElection.opened`).

On SQLite one controller holds the file (`controller.store.exclusive`), so its election
takes the lease at once (`force`), even from a predecessor killed before it could release it,
and keeps it: nobody else can take it, so a renewal that waits long for SQLite's one writer
(a join storm of thousands of agents on a loaded machine) must not make the only controller
step down and drop every agent stream, which only brings the storm back. A late renewal keeps
its token (no new term: in-flight commits stay valid, nodes get no new restart grace), and
its fence checks the holder and token, not the expiry. Once it leads it stops renewing at all
(`run`): the row's expiry then says nothing, and nothing on SQLite reads it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from controller.aio import call_soon_from_thread, wait_event, within
from controller.errors import Unavailable
from controller.store import lease
from controller.store.db import Database
from controller.store.lease import LeaseLost

log = logging.getLogger("maia.leadership")

LEADER_METADATA_KEY = "maia-leader"  # trailing metadata of a follower's UNAVAILABLE: the leader's address
# Trailing metadata of a starting controller's UNAVAILABLE (`api.server.STARTING`): it leads no one
# yet, so an agent given several controllers tries the next instead of waiting on this one.
STATE_METADATA_KEY, STARTING_STATE = "maia-controller-state", "starting"


@dataclass(frozen=True, slots=True)
class LeaderAddress:
    """Where the leader serves, as the lease row says (replaced whole: read from any thread)."""

    api: str = ""     # its gRPC server (--advertise-address)
    agents: str = ""  # its agent gateways (--agent-listen), '' when it runs none

    @property
    def for_agents(self) -> str:
        return self.agents or self.api


class NotLeader(Unavailable):
    """This controller follows; the call belongs to the leader (its address in the metadata).
    `stepped_down`: why it stopped leading, for an agent whose stream that ended."""

    def __init__(self, leader_address: str, *, stepped_down: str = "") -> None:
        where = f"the leader is at {leader_address}" if leader_address else "no leader is elected yet; retry"
        what = f"this controller no longer leads ({stepped_down})" if stepped_down else "this controller is a follower"
        super().__init__(f"{what}: {where}",
                         metadata=((LEADER_METADATA_KEY, leader_address),) if leader_address else ())
        self.leader_address = leader_address


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    ttl_s: float = 5.0           # a lease not renewed for this long (database clock) is free
    renew_every_s: float = 1.0   # how often the leader renews
    retry_every_s: float = 1.0   # how often a follower tries to take it
    margin_s: float = 1.5        # the leader stops this long before its lease could expire

    def __post_init__(self) -> None:
        if not 0 < self.renew_every_s < self.ttl_s - self.margin_s:
            raise ValueError(f"the lease renewal interval ({self.renew_every_s}s) must be shorter than the "
                             f"lease time ({self.ttl_s}s) minus the safety margin ({self.margin_s}s)")


class LeadershipObserver(Protocol):
    def leadership_changed(self, leading: bool) -> None: ...


def new_holder_id() -> str:
    """Unique per process start: host, pid and a random part (a restarted pid is a new holder)."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


_OPENED_IN = "maia_opened_in_term"  # session.info: (term in office, token) as its unit of work opened (`opened`)


@dataclass(frozen=True, slots=True)
class _Term:
    """The lease as this controller holds it, replaced whole (read without a lock from any thread)."""

    token: int | None = None   # the token held or last held (kept after stepping down)
    leading: bool = False      # in office: its term was announced on the controller's loop
    valid_until: float = 0.0   # local clock: stop scheduling at this instant (0: stepped down)
    number: int = 0            # this controller's terms in office so far, this one's included once announced


class LeaderElection:
    """Takes, renews and releases the lease; `should_run` says whether to schedule now.

    On PostgreSQL `run` keeps the lease from a thread of its own, with its own event loop and its
    own connection (`_keep_in_thread`): a renewal never waits for the controller's event loop,
    however busy it is (solver results, big commits, thousands of agent calls). The thread
    extends `should_run`'s deadline itself; a new term and a step-down are announced on the
    controller's loop (`on_elected`, `on_deposed`, the observer), and a new term counts only
    from there (`leading`): a pass never runs as leader before `on_elected` resynced it. A stalled
    loop cannot keep acting on an expired lease either: `should_run` reads the local clock, and
    every leader transaction is fenced on the database. On SQLite the lease is never renewed once
    taken (see the module docstring), so there is nothing to keep off the loop: `run` stays on it.
    """

    def __init__(self, db: Database, *, address: str, agent_address: str = "", settings: LeaseSettings | None = None,
                 holder: str | None = None, force: bool = False,
                 on_elected: Callable[[int], None] | None = None,
                 on_deposed: Callable[[str], None] | None = None,
                 observer: LeadershipObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self.address = address
        self.agent_address = agent_address  # where this controller's agent gateways serve ('' without)
        self.settings = settings or LeaseSettings()
        self.holder = holder or new_holder_id()
        self._force = force
        self._exclusive = force  # nothing else can hold this database: the lease is ours for good
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._observer = observer
        self._clock = clock
        self._term = _Term()
        self._lock = threading.Lock()     # term changes (the keeper thread and the loop both make them)
        self.leader = LeaderAddress()     # where the leader is, as last read (followers)
        self._leader_read_at = -math.inf  # when `leader` was read (its lease runs out a ttl after at most)
        self.acquisitions = 0
        self.renewals = 0                 # renewals that got through (of a term already held)
        self._loop: asyncio.AbstractEventLoop | None = None     # the controller's: announcements run there
        self._wake: Callable[[], None] = _nothing          # wakes `_keep`, from any thread
        self._stop_keeper: Callable[[], None] = _nothing   # cancels the keeper thread's loop

    # --- what others ask --------------------------------------------------------------------
    @property
    def token(self) -> int | None:
        """The token held, or last held (kept after stepping down)."""
        return self._term.token

    @property
    def leading(self) -> bool:
        return self._term.leading

    def should_run(self) -> bool:
        term = self._term
        return term.leading and self._clock() < term.valid_until

    def require_leader(self) -> None:
        """Raise `not_leader()` unless this controller leads now."""
        if not self.should_run():
            raise self.not_leader()

    def not_leader(self, stepped_down: str = "") -> NotLeader:
        """What an agent is told here while this controller follows: `NotLeader` with where the
        leader serves agents, as last read (none while that is this controller: no other known).
        `stepped_down`: why it stopped leading, told to the agents whose streams that ended."""
        leader = self.leader
        return NotLeader(leader.for_agents if leader.api != self.address else "", stepped_down=stepped_down)

    def opened(self, session: AsyncSession) -> None:
        """A fenced unit of work opens `session`: the term in office now is the one it works in."""
        term = self._term  # one read: its fields are of one moment, whatever thread changes it
        session.info[_OPENED_IN] = (term.number if term.leading else None, term.token)

    async def commit(self, session: AsyncSession, commit: Callable[[], Awaitable[None]]) -> None:
        """The fence: commit a leader transaction (`commit`) only if the lease is still ours, in
        the term its unit of work opened in (`opened`): one opened before this controller was
        deposed and elected again, or while it followed, is refused (it does not step down: the
        term in office stands)."""
        term = self._term
        opened_in, opened_token = session.info.get(_OPENED_IN, (term.number, term.token))
        if term.leading and opened_in != term.number:
            raise LeaseLost(self.holder, opened_token)
        try:
            await lease.commit_fenced(session, self.holder, term.token if term.leading else None, commit,
                                      live=not self._exclusive)
        except LeaseLost:
            if term.leading:  # a term not yet announced had no writes to refuse: it stands
                self._step_down("a write was refused by the fencing token", term.token)
            raise

    def wake(self) -> None:
        """Try now (a lease was released)."""
        self._wake()

    # --- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Acquire or renew until cancelled (on PostgreSQL from a thread of its own)."""
        self._loop = asyncio.get_running_loop()
        if self._exclusive:
            await self._keep(self._db)
            return
        stopping = threading.Event()
        keeper = threading.Thread(target=asyncio.run, args=(self._keep_in_thread(stopping),),
                                  name=f"leader-lease-{self.holder}", daemon=True)
        keeper.start()
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            stopping.set()
            self._stop_keeper()
            # bounded: a renewal is cut off after the lease time anyway
            await asyncio.to_thread(keeper.join, self.settings.ttl_s + 1.0)
            if keeper.is_alive():
                log.warning("the leader lease thread did not stop in time; leaving it (a daemon)")

    async def _keep_in_thread(self, stopping: threading.Event) -> None:
        """The keeper thread's loop: `_keep` on a database handle (pool) of its own."""
        db = Database(self._db.url)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._stop_keeper = lambda: call_soon_from_thread(loop, task.cancel)
        try:
            if not stopping.is_set():  # checked after `_stop_keeper` is set: one of the two sees the stop
                await self._keep(db)
        except asyncio.CancelledError:
            pass
        except BaseException:  # it must not die in silence: without it the lease runs out
            log.exception("the leader lease thread failed; this controller stops leading when its lease runs out")
            raise
        finally:
            self._wake = self._stop_keeper = _nothing
            await db.dispose()

    async def _keep(self, db: Database) -> None:
        """Acquire or renew on `db` every interval, on whichever loop runs it, until cancelled."""
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._wake = lambda: call_soon_from_thread(loop, wake.set)
        while True:
            term = self._term
            if self._exclusive and term.leading:
                # SQLite: the lease is ours until this process stops (nobody else can open the
                # file), so it is never renewed. A renewal only queued one more write behind
                # SQLite's one writer, and one cut off by the deadline below mid-statement could
                # keep the database locked until its connection was really closed (30-40 s
                # stalls of every write during a join storm).
                wake.clear()
                await wait_event(wake, 3600.0)
                continue
            try:  # bounded: a statement stuck on a lock must not keep a stale leader from stepping down
                await within(self._try(db), self.settings.ttl_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leader lease: acquiring or renewing failed (%s: %s)", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")
                self._forget_a_lapsed_leader()
            term = self._term
            if term.valid_until and self._clock() >= term.valid_until:
                self._step_down("the lease could not be renewed in time", term.token)
                term = self._term
            wait = self.settings.renew_every_s if term.valid_until else self.settings.retry_every_s
            if term.valid_until:
                wait = max(0.0, min(wait, term.valid_until - self._clock()))
            wake.clear()
            await wait_event(wake, wait)

    async def step(self) -> None:
        """One try, on this loop and its database: renew (leading) or acquire (following); steps
        up or down accordingly."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        await self._try(self._db)

    async def _try(self, db: Database) -> None:
        sent = self._clock()
        term = self._term
        async with db.unit_of_work() as uow:
            held = await lease.acquire(uow.session, self.holder, self.address, self.settings.ttl_s,
                                       token=term.token, force=self._force, keep=self._exclusive,
                                       agent_address=self.agent_address)
            row = await lease.read(uow.session) if held is None else None
            await uow.session.commit()
        self._force = False  # once: afterwards the lease is ours until we let it go
        took = self._clock() - sent
        if took > self.settings.renew_every_s:  # what eats the margin: worth seeing before it runs out
            log.warning("leader lease: one try took %.2fs (renewing every %.2fs, stepping down %.2fs after the "
                        "last renewal sent)", took, self.settings.renew_every_s,
                        self.settings.ttl_s - self.settings.margin_s)
        self._leader_read_at = sent
        if held is None:
            assert row is not None
            self.leader = LeaderAddress(row.address, row.agent_address) if row.live else LeaderAddress()
            self._step_down(f"controller {row.holder} holds the lease now", term.token)
            return
        valid_until = math.inf if self._exclusive else sent + self.settings.ttl_s - self.settings.margin_s
        with self._lock:  # with the term: a step-down between them cleared it under a term renewed
            self.leader = LeaderAddress(self.address, self.agent_address)
            now = self._term
            if now.token == held and now.valid_until:  # a renewal of the term held (announced or not yet)
                self._term = _Term(held, now.leading, max(now.valid_until, valid_until), now.number)
                self.renewals += 1
                return
            self._term = _Term(held, False, valid_until, now.number)  # a new term: it counts once announced
        self._on_loop(self._take_office, held)

    def _take_office(self, token: int) -> None:
        """On the controller's loop: a new term begins (unless it ended before it got here)."""
        with self._lock:
            term = self._term
            if term.token != token or term.leading or not term.valid_until:
                return
            self._term = _Term(token, True, term.valid_until, term.number + 1)
            self.acquisitions += 1
        log.warning("leader lease acquired: this controller leads holder=%s token=%d address=%s",
                    self.holder, token, self.address)
        if self._observer is not None:
            self._observer.leadership_changed(True)
        if self._on_elected is not None:
            self._on_elected(token)

    def _on_loop(self, announce: Callable[..., None], *args: object) -> None:
        """Run `announce` on the controller's loop: now when called there, else as soon as it can."""
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            announce(*args)
            return
        call_soon_from_thread(loop, announce, *args)

    async def release(self) -> None:
        """A clean stop: stop leading and expire the lease now, so a follower takes over at once."""
        term = self._term
        if term.token is None:
            return
        was_leading = term.leading
        self._step_down("shutting down", term.token)
        if not was_leading or self._exclusive:
            # SQLite: the next controller on the file forces the lease anyway, and a write at
            # stop could wait out the busy timeout behind a transaction a cancelled task left open.
            return
        try:
            async with self._db.unit_of_work() as uow:
                released = await lease.release(uow.session, self.holder, term.token)
                await uow.session.commit()
        except Exception as exc:
            log.warning("could not release the leader lease (%s); it expires in %.0fs", exc, self.settings.ttl_s)
            return
        if released:
            log.info("leader lease released token=%d", term.token)

    def _forget_a_lapsed_leader(self) -> None:
        """The lease could not be read: the leader last read is forgotten once its lease must have
        run out (a ttl after that read), so that no controller names a leader that is gone (agents
        and clients sent to it, or to this controller itself, after it stepped down)."""
        if self.leader != LeaderAddress() and self._clock() - self._leader_read_at > self.settings.ttl_s:
            log.warning("leader lease: not read for %.1fs: no leader known (was %s)",
                        self._clock() - self._leader_read_at, self.leader.api)
            self.leader = LeaderAddress()

    def _step_down(self, why: str, token: int | None) -> None:
        """Stop leading under `token` (from any thread): at once for `should_run`; the deposition
        is announced on the controller's loop. The leader it names is no longer itself."""
        with self._lock:
            term = self._term
            if term.token != token or not term.valid_until:
                return
            self._term = _Term(term.token, False, 0.0, term.number)
            if self.leader.api == self.address:
                self.leader = LeaderAddress()
        if term.leading:
            self._on_loop(self._announce_deposed, why, term.token)

    def _announce_deposed(self, why: str, token: int | None) -> None:
        log.warning("leader lease lost: this controller stops scheduling (%s) token=%s", why, token)
        if self._observer is not None:
            self._observer.leadership_changed(False)
        if self._on_deposed is not None:
            self._on_deposed(why)


def _nothing() -> None:
    pass
