"""Head-of-line nominations: nodes kept for the deployment that has waited longest for room that
others hold, so that what frees there accumulates for it (docs/operations.md, "Head-of-line
nominations").

Without them a gang of 64 shards can wait for ever behind a stream of single-shard arrivals:
each departure frees an accelerator and the next arrival takes it
(tests/scheduler/test_nominations.py shows it on a warm session). The rule is the scheduler's
(`scheduler.model.Nomination`: a nominated node takes no new shard of another deployment of the
nomination's priority or lower; higher priorities may, as they could preempt there anyway); this
module is the policy the leader's reconciler keeps:

- every committed plan says what waits (`saw`): a deployment is *waiting* from the first plan
  that leaves replicas of it unplaced for want of room a departure could free (`ROOM`), unless
  its own quota binds too (`NOT_ROOM`: nodes kept for it would not help). It stops waiting when a
  plan places all it asked for, when a full solve (which lists every unplaced deployment) no
  longer lists it, or when it is gone;
- once one has waited `after_s`, the one waiting longest at the highest priority is nominated,
  one at a time (`bring`, at the start of a fast pass): the warm session picks the nodes
  (`Session.nominees`: a domain at its locality that could hold a replica once emptied, with
  the most room now). A deployment no nodes would help goes to the back of the line;
- the nomination ends when its deployment stops waiting (placed, deleted), or after `max_s`:
  then it goes to the back of the line, so that one another rule holds back (its rack's power,
  another tenant's isolation) does not keep the nodes from everyone for ever.

Both paths honour the nomination: the warm session is handed it (`bring`), the full solve's
problem carries it (`into`). It is the leader's memory, not stored: a new leader (or a restart)
starts with none and nominates again after `after_s`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from controller import limits
from controller.scheduling.cache import ClusterCache
from controller.store.repositories.events import NewEvent
from controller.store.rollout import stored_key
from scheduler import Plan
from scheduler.model import Nomination

log = logging.getLogger("maia.reconcile")

# Reasons a departure could end: nodes kept for the deployment fill up with room for it.
ROOM = frozenset({"CAPACITY", "HBM", "CPU", "MEMORY", "POWER_RACK", "POWER_ROW", "LOCALITY", "ISOLATION",
                  "EXCLUSION"})
# Reasons that keeping nodes cannot end: the deployment's own tenant at its cap.
NOT_ROOM = frozenset({"QUOTA_ACCELERATORS", "QUOTA_POWER"})



@dataclass(frozen=True)
class Nominated:
    """The nomination in force, and when it began (the reconciler's clock)."""

    nomination: Nomination
    since: float


class Nominations:
    """The waiting deployments and the one nomination in force (module docstring)."""

    def __init__(self, *, after_s: float = limits.NOMINATE_AFTER_S, max_s: float = limits.NOMINATION_MAX_S) -> None:
        self.after_s = after_s  # 0: never nominate
        self.max_s = max_s
        self._waiting: dict[str, float] = {}  # solver id -> since when (the reconciler's clock)
        self.current: Nominated | None = None
        # Events of nominations made and ended, for the next commit to record (`take_events`):
        # `maiactl describe deployment` shows them.
        self._events: list[NewEvent] = []

    def reset(self) -> None:
        """Start afresh (a new leader): nothing waiting, nothing nominated."""
        self._waiting.clear()
        self.current = None

    def take_events(self) -> list[NewEvent]:
        """The events to record with the commit under way (then forgotten here)."""
        events, self._events = self._events, []
        return events

    @property
    def nominated_nodes(self) -> int:
        return 0 if self.current is None else len(self.current.nomination.nodes)

    @property
    def nominations(self) -> tuple[Nomination, ...]:
        return () if self.current is None else (self.current.nomination,)

    def waiting_since(self, name: str) -> float | None:
        return self._waiting.get(name)

    # --- what plans say ------------------------------------------------------------------------
    def saw(self, plan: Plan, now: float, *, whole: bool) -> None:
        """A committed plan (`whole`: a full solve's, which lists every unplaced deployment)."""
        unplaced = {u.deployment for u in plan.unplaced}
        for u in plan.unplaced:
            codes = {r.code for r in u.reasons}
            if codes & ROOM and not codes & NOT_ROOM:
                self._waiting.setdefault(u.deployment, now)
            else:
                self._waiting.pop(u.deployment, None)
        for p in plan.placements:
            if p.deployment not in unplaced:
                self._waiting.pop(p.deployment, None)
        if whole:
            for name in [n for n in self._waiting if n not in unplaced]:
                del self._waiting[name]
        if self.current is not None and self.current.nomination.deployment not in self._waiting:
            self._end("placed" if any(p.deployment == self.current.nomination.deployment for p in plan.placements)
                      else "no longer waiting")

    # --- both paths --------------------------------------------------------------------------
    def into(self, problem: dict[str, Any]) -> dict[str, Any]:
        """The full solve's problem with the nomination in force (its nodes the problem has)."""
        if self.current is None:
            return problem
        nom = self.current.nomination
        known = {n["id"] for n in problem.get("nodes", ())}
        nodes = [n for n in nom.nodes if n in known]
        if not nodes:
            return problem
        return {**problem, "nominations": [{"deployment": nom.deployment, "priority": nom.priority, "nodes": nodes}]}

    async def bring(self, cache: ClusterCache, now: float) -> bool:
        """At a fast pass's start: end a nomination past `max_s` or whose deployment is gone,
        make one when a deployment has waited `after_s`, and hand the session what is in force
        (blocking calls in a worker thread). Whether nodes were let go (work waiting elsewhere
        may fit on them now: decide it again)."""
        live = cache.snapshot.deployment_ids
        if self.current is not None:
            name = self.current.nomination.deployment
            if stored_key(name) not in live:
                self._waiting.pop(name, None)
                self._end("deployment gone")
            elif now - self.current.since >= self.max_s:
                self._waiting[name] = now  # to the back of the line
                self._end(f"held {self.max_s:.0f} s without fitting")
        if self.current is None and self.after_s > 0:
            await self._elect(cache, now)
        before = set(n for nom in cache.nominations for n in nom.nodes)
        if cache.nominations != self.nominations:
            await asyncio.to_thread(cache.session.nominate, self.nominations)
            cache.nominations = self.nominations
        return bool(before - set(n for nom in self.nominations for n in nom.nodes))

    async def _elect(self, cache: ClusterCache, now: float) -> None:
        due = [name for name, since in self._waiting.items() if now - since >= self.after_s]
        if not due:
            return
        snap = cache.snapshot
        docs = {d["id"]: d for d in snap.index.deployments_of(snap.problem, {stored_key(n) for n in due})}
        for name in [n for n in due if n not in docs]:
            del self._waiting[name]  # gone (or not in the cache: the next full solve says)
        ranked = sorted((n for n in due if n in docs),
                        key=lambda n: (-int(docs[n].get("priority", 0)), self._waiting[n], n))
        for name in ranked:
            nodes = await asyncio.to_thread(cache.session.nominees, name)
            if not nodes:  # nodes would not help it now (or the session does not hold it): to the back of the line
                self._waiting[name] = now
                continue
            priority = int(docs[name].get("priority", 0))
            self.current = Nominated(Nomination(name, priority, nodes), now)
            waited = now - self._waiting[name]
            log.info("nominated nodes for the head of the line deployment=%s priority=%d waited_s=%.0f nodes=%s",
                     name, priority, waited, ",".join(nodes))
            self._event(name, "deployment.nominated",
                        f"nodes {', '.join(nodes)} kept for it after {waited:.0f} s waiting for room: no new work of "
                        f"priority {priority} or lower is placed there until it fits",
                        {"nodes": list(nodes), "priority": priority, "waited_s": round(waited, 1)})
            return

    def _end(self, why: str) -> None:
        assert self.current is not None
        nom = self.current.nomination
        log.info("nomination ended deployment=%s reason=%s", nom.deployment, why)
        self._event(nom.deployment, "deployment.nomination_ended", f"nodes {', '.join(nom.nodes)} no longer kept "
                    f"for it: {why}", {"nodes": list(nom.nodes), "why": why})
        self.current = None

    def _event(self, name: str, kind: str, message: str, data: dict[str, Any]) -> None:
        self._events.append(NewEvent(actor="controller", kind=kind, object_kind="deployment",
                                     object_id=stored_key(name), message=message, data=data))
