"""Leader election: which of several controllers on one database schedules.

Every controller runs a `LeaderElection`. It tries to take the lease row
(`controller.store.lease`) every `retry_every_s` while it follows, and renews it every
`renew_every_s` while it leads. Only the leader reconciles, watches agents' liveness and runs
the watchdog; followers serve the API (their writes go to the database; the leader is woken
through PostgreSQL NOTIFY) and send node agents to the leader's advertised address.

Stepping down happens on this controller's own clock, before the database could hand the
lease to anyone else: a lease renewed by a statement sent at local time t is ours until
t + ttl on the database's clock at the earliest, so the leader stops scheduling at
t + ttl - margin unless a renewal succeeded meanwhile. That is a courtesy; safety comes from
the fencing token, checked inside every leader transaction (`LeaderElection.check`, the
`Fence` of `Database.fenced`): a deposed leader's late plan is refused and rolled back.

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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from controller.aio import wait_event, within
from controller.errors import Unavailable
from controller.store import lease
from controller.store.db import Database
from controller.store.lease import LeaseLost

log = logging.getLogger("maia.leadership")

LEADER_METADATA_KEY = "maia-leader"  # trailing metadata of a follower's UNAVAILABLE: the leader's address


class NotLeader(Unavailable):
    """This controller follows; the call belongs to the leader (its address in the metadata)."""

    def __init__(self, leader_address: str) -> None:
        where = f"the leader is at {leader_address}" if leader_address else "no leader is elected yet; retry"
        super().__init__(f"this controller is a follower: {where}",
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


class LeaderElection:
    """Takes, renews and releases the lease; `should_run` says whether to schedule now."""

    def __init__(self, db: Database, *, address: str, settings: LeaseSettings | None = None,
                 holder: str | None = None, force: bool = False,
                 on_elected: Callable[[int], None] | None = None,
                 on_deposed: Callable[[str], None] | None = None,
                 observer: LeadershipObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self.address = address
        self.settings = settings or LeaseSettings()
        self.holder = holder or new_holder_id()
        self._force = force
        self._exclusive = force  # nothing else can hold this database: the lease is ours for good
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._observer = observer
        self._clock = clock
        self.token: int | None = None     # the token last held (kept after stepping down)
        self.leading = False
        self._valid_until = 0.0           # local clock: stop scheduling at this instant
        self.leader_address = ""          # where the leader is, as last read (followers)
        self.acquisitions = 0
        self._wake = asyncio.Event()

    # --- what others ask --------------------------------------------------------------------
    def should_run(self) -> bool:
        return self.leading and self._clock() < self._valid_until

    def require_leader(self) -> None:
        """Raise `NotLeader` (with where the leader is) unless this controller leads now."""
        if not self.should_run():
            raise NotLeader(self.leader_address if self.leader_address != self.address else "")

    async def check(self, session: AsyncSession) -> None:
        """The fence: inside a leader transaction, refuse it unless the lease is still ours."""
        try:
            await lease.fence(session, self.holder, self.token if self.leading else None,
                              live=not self._exclusive)
        except LeaseLost:
            self._step_down("a write was refused by the fencing token")
            raise

    def wake(self) -> None:
        """Try now (a lease was released)."""
        self._wake.set()

    # --- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Acquire or renew until cancelled."""
        while True:
            if self._exclusive and self.leading:
                # SQLite: the lease is ours until this process stops (nobody else can open the
                # file), so it is never renewed. A renewal only queued one more write behind
                # SQLite's one writer, and one cut off by the deadline below mid-statement could
                # keep the database locked until its connection was really closed (30-40 s
                # stalls of every write during a join storm).
                self._wake.clear()
                await wait_event(self._wake, 3600.0)
                continue
            try:  # bounded: a statement stuck on a lock must not keep a stale leader from stepping down
                await within(self.step(), self.settings.ttl_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leader lease: acquiring or renewing failed (%s: %s)", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")
            if self.leading and self._clock() >= self._valid_until:
                self._step_down("the lease could not be renewed in time")
            wait = self.settings.renew_every_s if self.leading else self.settings.retry_every_s
            if self.leading:
                wait = max(0.0, min(wait, self._valid_until - self._clock()))
            self._wake.clear()
            await wait_event(self._wake, wait)

    async def step(self) -> None:
        """One try: renew (leading) or acquire (following); steps up or down accordingly."""
        sent = self._clock()
        async with self._db.unit_of_work() as uow:
            held = await lease.acquire(uow.session, self.holder, self.address, self.settings.ttl_s,
                                       token=self.token, force=self._force, keep=self._exclusive)
            row = await lease.read(uow.session) if held is None else None
            await uow.session.commit()
        self._force = False  # once: afterwards the lease is ours until we let it go
        if held is None:
            assert row is not None
            self.leader_address = row.address if row.live else ""
            if self.leading:
                self._step_down(f"controller {row.holder} holds the lease now")
            return
        self._valid_until = math.inf if self._exclusive else sent + self.settings.ttl_s - self.settings.margin_s
        self.leader_address = self.address
        if held != self.token or not self.leading:
            self.token = held
            self.leading = True
            self.acquisitions += 1
            log.warning("leader lease acquired: this controller leads holder=%s token=%d address=%s",
                        self.holder, held, self.address)
            if self._observer is not None:
                self._observer.leadership_changed(True)
            if self._on_elected is not None:
                self._on_elected(held)

    async def release(self) -> None:
        """A clean stop: stop leading and expire the lease now, so a follower takes over at once."""
        if self.token is None:
            return
        was_leading = self.leading
        self._step_down("shutting down")
        if not was_leading or self._exclusive:
            # SQLite: the next controller on the file forces the lease anyway, and a write at
            # stop could wait out the busy timeout behind a transaction a cancelled task left open.
            return
        try:
            async with self._db.unit_of_work() as uow:
                released = await lease.release(uow.session, self.holder, self.token)
                await uow.session.commit()
        except Exception as exc:
            log.warning("could not release the leader lease (%s); it expires in %.0fs", exc, self.settings.ttl_s)
            return
        if released:
            log.info("leader lease released token=%d", self.token)

    def _step_down(self, why: str) -> None:
        if not self.leading:
            return
        self.leading = False
        self._valid_until = 0.0
        log.warning("leader lease lost: this controller stops scheduling (%s) token=%s", why, self.token)
        if self._observer is not None:
            self._observer.leadership_changed(False)
        if self._on_deposed is not None:
            self._on_deposed(why)
