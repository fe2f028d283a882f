"""Agents joining: their Registers and Hellos, committed in batches behind the admission gate.

Why a module of its own: a join storm (a fleet registering at once, a new leader's nodes coming
over) is met by its own machinery: the admission gate that bounds the writes waiting, the pacer
that tells a refused Register when to come back, the shedding check asked before the interceptor
chain, and the group commits that write the Registers and Hellos arriving together in one
transaction. `Joins` owns them; the hub hands it each Register and each stream's Hello, tells it
which nodes a live stream holds, and lets it tell each registered agent its heartbeat interval
(`HeartbeatIntervals`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone

from controller import limits
from controller.admission import AdmissionGate, judge
from controller.agents.pacing import HeartbeatIntervals
from controller.errors import MaiaError, Unavailable
from controller.groupcommit import GroupCommit, RetryPacer
from controller.identity import Principal
from controller.store import audit
from controller.store.db import Database, UnitOfWork, database_failed
from controller.store.lease import LeaseLost
from controller.usecases import agents as agent_cases
from controller.domain.values import NodeInfo


class Joins:
    """The Registers and Hellos of agents, committed with those arriving together."""

    def __init__(self, db: Database, admission: AdmissionGate, intervals: HeartbeatIntervals, *,
                 held_by_live_agent: Callable[[str], bool]) -> None:
        self._db = db
        self.admission = admission
        self._intervals = intervals
        self._held_by_live_agent = held_by_live_agent  # `AgentHub.holds_live_session`
        # Hellos and Registers that arrive together are committed together (controller/groupcommit.py).
        # A batch that fails for want of the database or the lease fails its members alike.
        # A refused Register is told to come back at the next slot of the rate Registers are written
        # (groupcommit.RetryPacer), whoever refuses it: the shedding check, the gate, the group commit.
        self.pacer = RetryPacer()
        self.shed = 0  # Registers refused before the interceptor chain (`shed_register`)
        self.admission.pace = self.pacer.retry_after_s
        self._hellos: GroupCommit[agent_cases.Hello, bool] = GroupCommit(
            "agent-hellos", self._write_hellos, batch_max=limits.HELLO_BATCH_MAX, shared_failure=shared_failure)
        self._registers: GroupCommit[agent_cases.Register, agent_cases.Registered] = GroupCommit(
            "agent-registers", self._write_registers, batch_max=limits.REGISTER_BATCH_MAX,
            key=lambda r: r.info.node_id, shared_failure=shared_failure,
            writers=1 if db.is_sqlite else limits.REGISTER_WRITERS_POSTGRES,
            answer_reserve=self.admission.answer_reserve_s, pacer=self.pacer,
            left=lambda register, batch: audit.carried_by(register.call, batch))

    def shed_register(self, time_left_s: float | None) -> MaiaError | None:
        """The refusal of a Register arriving now with `time_left_s` until its deadline, if the
        admission gate would refuse it (its queue is full, or it would wait past its deadline),
        else None. Asked before the interceptor chain (`api.interceptors.LoadShedInterceptor`):
        a refusal then costs no token check, audit entry or log line. The retry time is the
        pacer's next slot."""
        if judge(self.admission.state(), time_left_s) is None:
            return None
        self.shed += 1
        wait_s = self.pacer.retry_after_s()
        return Unavailable(f"the controller is busy with agent registrations ({self.admission.waiting} waiting, "
                           f"about {self.pacer.rate():.0f} written a second); nothing was written; retry in "
                           f"{wait_s:.3g}s", retry_after_ms=math.ceil(wait_s * 1000))

    async def register(self, who: Principal, info: NodeInfo, *, credential_proposal: str = "",
                       time_left_s: float | None = None) -> agent_cases.Registered:
        """Register a node (`usecases.agents.register_nodes`), committed with the Registers around
        it; raises what refuses it. Each Register is one caller of the admission gate (`time_left_s`
        until its deadline): the gate bounds how many wait for the batches, and refuses with a retry
        time those that would wait past their deadline; its batch answers before the deadline too."""
        deadline = None if time_left_s is None else time.monotonic() + time_left_s
        async with self.admission.admit(time_left_s):
            ask = agent_cases.Register(who, info, credential_proposal, call=audit.current_call())
            outcome = await self._registers.submit(ask, None if deadline is None else deadline - time.monotonic())
            if outcome is not None:
                return outcome
            async with self._db.unit_of_work() as uow:  # the batch could not decide it: alone
                [alone] = await self._register_nodes(uow, [replace(ask, call=None)])
        if isinstance(alone, MaiaError):
            raise alone
        return alone

    async def _write_registers(self, batch: list[agent_cases.Register]) -> list[agent_cases.Registered | MaiaError]:
        async with self._db.unit_of_work() as uow:
            return await self._register_nodes(uow, batch)

    async def _register_nodes(self, uow: UnitOfWork, batch: list[agent_cases.Register]
                              ) -> list[agent_cases.Registered | MaiaError]:
        """`usecases.agents.register_nodes`, telling the batch the interval of the connected nodes
        with its own, and remembering what each registered agent was told."""
        interval_ms = self._intervals.interval_for(ask.info.node_id for ask in batch)
        outcomes = await agent_cases.register_nodes(uow, batch, heartbeat_interval_ms=interval_ms,
                                                    held_by_live_agent=self._held_by_live_agent)
        for outcome in outcomes:
            if not isinstance(outcome, MaiaError):
                self._intervals.registered(outcome.registration.node_id, interval_ms)
        return outcomes

    async def hello(self, hello: agent_cases.Hello) -> bool:
        """Whether the node's liveness changed; raises what refuses the hello."""
        outcome = await self._hellos.submit(hello)
        if outcome is not None:
            return outcome
        async with self.admission.admit(), self._db.unit_of_work() as uow:  # its batch failed: alone
            [alone] = await agent_cases.hellos(uow, [hello], datetime.now(timezone.utc))
        if isinstance(alone, MaiaError):
            raise alone
        return alone

    async def _write_hellos(self, batch: list[agent_cases.Hello]) -> list[bool | MaiaError]:
        """One batch of hellos: one caller of the admission gate (without a deadline: the streams
        have none), taking its turn with the Registers; but never refused for a full queue: a hello
        completes a join whose Register was written (refused, its agent had to register again),
        and one writer at a time bounds the batches anyway."""
        async with self.admission.admit(pass_when_full=True), self._db.unit_of_work() as uow:
            return await agent_cases.hellos(uow, batch, datetime.now(timezone.utc))


def shared_failure(exc: Exception) -> bool:
    """A batch failed for a reason each of its members would meet alone: the lease, the database."""
    return isinstance(exc, LeaseLost) or database_failed(exc)
