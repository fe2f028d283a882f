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
- once one has waited `after_s`, the one waiting longest at the highest priority whose replica
  needs room gathered (more than one accelerator: `_gathers`) is nominated, one at a time
  (`bring`, at the start of a fast pass):
  the warm session picks the nodes (`Session.nominees`: a domain at its locality that could hold
  a replica once emptied, with the most room now). A deployment no nodes would help goes to the
  back of the line;
- the nomination ends when its deployment stops waiting (placed, deleted), when a replica of it
  is placed (the nodes for the rest are chosen again at once), or after `max_s`: then it goes to
  the back of the line, so that one another rule holds back (its rack's power, another tenant's
  isolation) does not keep the nodes from everyone for ever. The nodes let go, what waits is
  decided again (a pass is due for it, and for the end, in a quiet cluster too: `due`).

Both paths honour the nomination: the warm session is handed it (`bring`, `hand`), the full
solve's problem carries it (`into`), and the scheduling queue sees it in that problem (work it
parked is let go when it changes). Events say when one is made and ended. It is the leader's
memory, not stored: a new leader (or a restart) starts with none and nominates again after
`after_s`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
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
    """The nomination in force, when it began (the reconciler's clock), and how many replicas
    its deployment missed then (fewer since: progress, the nodes are chosen again)."""

    nomination: Nomination
    since: float
    missing: int


class Nominations:
    """The waiting deployments and the one nomination in force (module docstring)."""

    def __init__(self, *, after_s: float = limits.NOMINATE_AFTER_S, max_s: float = limits.NOMINATION_MAX_S) -> None:
        self.after_s = after_s  # 0: never nominate
        self.max_s = max_s
        # Solver id -> (since when it waits, on the reconciler's clock; replicas it misses).
        self._waiting: dict[str, tuple[float, int]] = {}
        self.current: Nominated | None = None
        # A nomination ended since a pass last decided what waits: the next decides it again
        # (the nodes let go may fit it), idle or not (`Reconciler`).
        self.let_go = False
        # Events of nominations made and ended, for the next commit to record (`take_events`):
        # `maiactl describe deployment` shows them.
        self._events: list[NewEvent] = []

    def reset(self) -> None:
        """Start afresh (a new leader): nothing waiting, nothing nominated."""
        if self.current is not None:
            self._end("this controller's leadership changed")
        self._waiting.clear()

    def take_events(self) -> list[NewEvent]:
        """The events to record with the commit under way (`put_back` if it fails)."""
        events, self._events = self._events, []
        return events

    def put_back(self, events: list[NewEvent]) -> None:
        """Events a commit that failed was to record: the next one records them."""
        self._events[:0] = events

    @property
    def nominated_nodes(self) -> int:
        return 0 if self.current is None else len(self.current.nomination.nodes)

    @property
    def nominations(self) -> tuple[Nomination, ...]:
        return () if self.current is None else (self.current.nomination,)

    def waiting_since(self, name: str) -> float | None:
        waiting = self._waiting.get(name)
        return None if waiting is None else waiting[0]

    # --- what plans say ------------------------------------------------------------------------
    def saw(self, plan: Plan, now: float, *, whole: bool, requeued: Collection[str] = ()) -> None:
        """A committed plan (`whole`: a full solve's, which lists every unplaced deployment;
        `requeued`: deployments of which the commit turned placed replicas away, placed again
        later: they still wait)."""
        unplaced = {u.deployment for u in plan.unplaced} | set(requeued)
        for u in plan.unplaced:
            codes = {r.code for r in u.reasons}
            if codes & ROOM and not codes & NOT_ROOM:
                since = self._waiting.get(u.deployment, (now, 0))[0]
                self._waiting[u.deployment] = (since, u.replicas)
            else:
                self._waiting.pop(u.deployment, None)
        placed = {p.deployment for p in plan.placements}
        for name in placed - unplaced:
            self._waiting.pop(name, None)
        if whole:
            for name in [n for n in self._waiting if n not in unplaced]:
                del self._waiting[name]
        if self.current is None:
            return
        name = self.current.nomination.deployment
        if name not in self._waiting:
            self._end("placed" if name in placed else "no longer waiting for room")
        elif self._waiting[name][1] < self.current.missing:  # progress: nodes for the rest chosen again
            self._end(f"{self.current.missing - self._waiting[name][1]} of its replicas placed")

    def due(self, now: float) -> bool:
        """Whether a pass is due for nominations alone, in a cluster where nothing else changes:
        nodes let go to decide again, or a nomination to end (`max_s`). Not one to make: where
        nothing changes nothing takes the room a waiting deployment needs, and the pass any
        change brings makes it."""
        return self.let_go or self._overdue(now)

    def _overdue(self, now: float) -> bool:
        """Whether the nomination in force has been held `max_s`."""
        return self.current is not None and now - self.current.since >= self.max_s

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

    def expire(self, now: float, live: Collection[str]) -> None:
        """End a nomination held `max_s` (its deployment to the back of the line) or whose
        deployment is gone (`live`: the stored deployments' keys), on either path."""
        if self.current is None:
            return
        name = self.current.nomination.deployment
        if stored_key(name) not in live:
            self._waiting.pop(name, None)
            self._end("deployment gone")
        elif self._overdue(now):
            self._waiting[name] = (now, self._waiting.get(name, (now, 0))[1])  # to the back of the line
            self._end(f"held {self.max_s:.0f} s without fitting")

    async def bring(self, cache: ClusterCache, now: float) -> bool:
        """At a fast pass's start: `expire`, hand the session what is in force, make a
        nomination when a deployment has waited `after_s` (the session picks its nodes, with
        the ended one's let go first) and hand it over too (blocking calls in a worker
        thread). Whether nodes were let go since the last pass decided what waits (work
        waiting elsewhere may fit on them now: decide it again)."""
        self.expire(now, cache.snapshot.deployment_ids)
        await self.hand(cache)
        if self.current is None and self.after_s > 0:
            await self._elect(cache, now)
            await self.hand(cache)
        let_go, self.let_go = self.let_go, False
        return let_go

    async def hand(self, cache: ClusterCache) -> None:
        """Hand the session what is in force, when it holds something else (a cache just built
        holds none)."""
        if cache.nominations != self.nominations:
            await asyncio.to_thread(cache.session.nominate, self.nominations)
            cache.nominations = self.nominations

    async def _elect(self, cache: ClusterCache, now: float) -> None:
        due = [name for name, (since, _) in self._waiting.items() if now - since >= self.after_s]
        if not due:
            return
        snap = cache.snapshot
        docs = {d["id"]: d for d in snap.index.deployments_of(snap.problem, {stored_key(n) for n in due})}
        for name in [n for n in due if n not in docs or not _gathers(docs[n])]:
            del self._waiting[name]  # gone (or not in the cache: the next full solve says), or needs no gathering
        ranked = sorted((n for n in due if n in self._waiting),
                        key=lambda n: (-int(docs[n].get("priority", 0)), self._waiting[n][0], n))
        for name in ranked:
            nodes = await asyncio.to_thread(cache.session.nominees, name)
            since, missing = self._waiting[name]
            if not nodes:  # nodes would not help it now (or the session does not hold it): to the back of the line
                self._waiting[name] = (now, missing)
                continue
            priority = int(docs[name].get("priority", 0))
            self.current = Nominated(Nomination(name, priority, nodes), now, missing)
            log.info("nominated nodes for the head of the line deployment=%s priority=%d waited_s=%.0f nodes=%s",
                     name, priority, now - since, ",".join(nodes))
            self._event(name, "deployment.nominated",
                        f"nodes {', '.join(nodes)} kept for it after {now - since:.0f} s waiting for room: no new "
                        f"work of priority {priority} or lower is placed there until it fits",
                        {"nodes": list(nodes), "priority": priority, "waited_s": round(now - since, 1)})
            return

    def _end(self, why: str) -> None:
        assert self.current is not None
        nom = self.current.nomination
        log.info("nomination ended deployment=%s reason=%s", nom.deployment, why)
        self._event(nom.deployment, "deployment.nomination_ended", f"nodes {', '.join(nom.nodes)} no longer kept "
                    f"for it: {why}", {"nodes": list(nom.nodes), "why": why})
        self.current = None
        self.let_go = True

    def _event(self, name: str, kind: str, message: str, data: dict[str, Any]) -> None:
        self._events.append(NewEvent(actor="controller", kind=kind, object_kind="deployment",
                                     object_id=stored_key(name), message=message, data=data))


def _gathers(doc: dict[str, Any]) -> bool:
    """Whether a replica of this deployment needs room gathered: more than one accelerator (a
    gang, a shard of several). One of at most one accelerator takes the first that frees: what
    waits is decided again first, oldest first, on every departure (`ClusterCache.decide`), so
    it is never starved and nodes kept for it would only keep them from the rest."""
    shard = doc.get("shard", {})
    return int(doc.get("shards_per_replica", 1)) * int(shard.get("accelerators", 1)) > 1
