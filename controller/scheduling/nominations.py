"""Head-of-line nominations: nodes kept for the deployments that have waited longest for room
that others hold (one a zone), so that what frees there accumulates for them (docs/operations.md,
"Head-of-line nominations").

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
  needs room gathered (more than one accelerator: `_gathers`) is nominated (`bring`, at the start
  of a fast pass), then the next in line, and so on, **one a zone**: the warm session picks the
  nodes (`Session.nominees`: a domain at its locality that could hold a replica once emptied,
  with the most room now), in the zones where no other deployment holds nominated nodes. So
  starving gangs in different zones gather room at once, and what stands idle while nodes drain
  is one deployment's nodes a zone at most. One only zones others hold would help keeps its place
  in the line (it is asked again when a nomination ends, or before one behind it is nominated);
  one no nodes would help goes to the back of the line;
- the nomination ends when its deployment stops waiting (placed, deleted), when a replica of it
  is placed (the nodes for the rest are chosen again at once), when the deployment is updated in
  what its nodes were chosen for (`shape_of`; it keeps its place), or after `max_s`: then it goes to
  the back of the line, so that one another rule holds back (its rack's power, another tenant's
  isolation) does not keep the nodes from everyone for ever. The nodes let go, what waits is
  decided again (a pass is due for it, and for the end, in a quiet cluster too: `due`).

Both paths honour the nomination: the warm session is handed it (`bring`, `hand`), the full
solve's problem carries it (`into`), and the scheduling queue sees it in that problem (work it
parked is let go when it changes). Events say when one is made and ended.

The set in force is stored with the pass's plan commit whenever it changes, or in a commit of
its own at the end of a pass when that committed nothing or changed it after (`take_stored`,
`PassState.store_nominations`; controller/store/nominations.py), so a new leader, or this one
restarted, takes it up on its first full pass (`adopt`): the nodes drained for a gang so far stay
kept, its place in the line and its `max_s` run on from when it was made, and snapshots (`maiactl
snapshot`, dry runs) show it. What the rest of the line had waited is not stored: the plans of
the new leader say it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from controller import limits
from controller.scheduling.cache import ClusterCache
from controller.store.nominations import StoredNomination
from controller.store.repositories.events import NewEvent
from controller.store.rollout import stored_key
from controller.store.snapshot import Snapshot
from scheduler import Plan
from scheduler.model import Nomination

log = logging.getLogger("maia.reconcile")

# Reasons a departure could end: nodes kept for the deployment fill up with room for it.
ROOM = frozenset({"CAPACITY", "HBM", "CPU", "MEMORY", "POWER_RACK", "POWER_ROW", "LOCALITY", "ISOLATION",
                  "EXCLUSION", "NODE_SHARDS"})
# Reasons that keeping nodes cannot end: the deployment's own tenant at its cap.
NOT_ROOM = frozenset({"QUOTA_ACCELERATORS", "QUOTA_POWER"})


@dataclass(frozen=True)
class Nominated:
    """A nomination in force, when it began (the reconciler's clock), how many replicas its
    deployment missed then (fewer since: progress, the nodes are chosen again), and the stored
    deployment's primary key (what the stored row names: `take_stored`)."""

    nomination: Nomination
    since: float
    missing: int
    deployment_id: int | None  # None: not in the snapshot it was made on (not stored)
    # What the nodes were chosen for (`shape_of` its deployment then): an update ends it (`expire`).
    shape: str = ""


class Nominations:
    """The waiting deployments and the nominations in force, one a zone (module docstring)."""

    def __init__(self, *, after_s: float = limits.NOMINATE_AFTER_S, max_s: float = limits.NOMINATION_MAX_S) -> None:
        self.after_s = after_s  # 0: never nominate
        self.max_s = max_s
        # Solver id -> (since when it waits, on the reconciler's clock; replicas it misses).
        self._waiting: dict[str, tuple[float, int]] = {}
        # Solver id -> its nomination in force, in the order they were made (no two in a zone).
        self.held: dict[str, Nominated] = {}
        # Waiting deployments only zones others hold would help, when last tried: not asked again
        # until a nomination ends or another deployment is due (each ask is a call into the session).
        self._blocked: set[str] = set()
        # A nomination ended since a pass last decided what waits: the next decides it again
        # (the nodes let go may fit it), idle or not (`Reconciler`).
        self.let_go = False
        # Events of nominations made and ended, for the next commit to record (`take_events`):
        # `maiactl describe deployment` shows them.
        self._events: list[NewEvent] = []
        # The set in force changed since the last commit stored it (`take_stored`).
        self._changed = False
        # What is stored is to be taken up by the next full pass (`adopt`): a new leadership.
        self.adopting = True

    def reset(self) -> None:
        """A new leadership: forget what this controller held (the stored set, which the last
        leader kept, is taken up by the next full pass: `adopt`) and what waited. No event: a
        nomination stored goes on under the new leader. The events not recorded yet go too: of
        nominations made or ended under a lead since lost (their commit refused), they would be
        recorded by the new term's first commit, a nomination never stored shown as made."""
        if self.held:
            log.info("nominations left to the store for the next full pass: %s", ",".join(self.held))
        self.held.clear()
        self._waiting.clear()
        self._blocked.clear()
        self._events.clear()
        self._changed = False
        self.let_go = False
        self.adopting = True

    def adopt(self, stored: Sequence[StoredNomination], now: float, wall_now: datetime) -> None:
        """Take up the stored nominations the state still has (`store.nominations.in_force`),
        each as made at its stored time and its deployment waiting since its stored time (on the
        reconciler's clock: `now` is `wall_now`). The next commit stores the set again (rows the
        state no longer has go)."""
        self.adopting = False
        for nom in stored if self.after_s > 0 else ():  # nominations turned off: the stored set goes
            if nom.solver_id in self.held:
                continue
            since = now - max(0.0, (wall_now - nom.nominated_at).total_seconds())
            waited = now - max(0.0, (wall_now - nom.waiting_since).total_seconds())
            self.held[nom.solver_id] = Nominated(Nomination(nom.solver_id, nom.priority, nom.nodes), since,
                                                 nom.missing, nom.deployment_id, nom.shape)
            self._waiting[nom.solver_id] = (min(waited, since), nom.missing)
            log.info("took up a stored nomination deployment=%s priority=%d held_s=%.0f nodes=%s", nom.solver_id,
                     nom.priority, now - since, ",".join(nom.nodes))
        self._changed = True

    def take_stored(self, now: float, wall_now: datetime) -> list[StoredNomination] | None:
        """The set in force to store with the commit under way, when it changed since the last
        one stored it (None: unchanged); `store_again` if that commit fails."""
        if not self._changed:
            return None
        self._changed = False

        def wall(at: float) -> datetime:
            return wall_now - timedelta(seconds=max(0.0, now - at))

        return [StoredNomination(name, held.deployment_id, held.nomination.priority, held.nomination.nodes,
                                 wall(held.since), wall(self._waiting.get(name, (held.since, 0))[0]), held.missing,
                                 held.shape)
                for name, held in self.held.items() if held.deployment_id is not None]

    @property
    def unstored(self) -> bool:
        """Whether the set in force or its events changed since a commit last took them."""
        return self._changed or bool(self._events)

    def store_again(self) -> None:
        """The commit that was to store the set failed (or may have): the next one stores it."""
        self._changed = True

    def take_events(self) -> list[NewEvent]:
        """The events to record with the commit under way (`put_back` if it fails)."""
        events, self._events = self._events, []
        return events

    def put_back(self, events: list[NewEvent]) -> None:
        """Events a commit that failed was to record: the next one records them."""
        self._events[:0] = events

    @property
    def nominated_nodes(self) -> int:
        return sum(len(held.nomination.nodes) for held in self.held.values())

    @property
    def nominations(self) -> tuple[Nomination, ...]:
        return tuple(held.nomination for held in self.held.values())

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
        self._blocked.intersection_update(self._waiting)
        for name, held in list(self.held.items()):
            if name not in self._waiting:
                self._end(name, "placed" if name in placed else "no longer waiting for room")
            elif self._waiting[name][1] < held.missing:  # progress: nodes for the rest chosen again
                self._end(name, f"{held.missing - self._waiting[name][1]} of its replicas placed")

    def due(self, now: float) -> bool:
        """Whether a pass is due for nominations alone, in a cluster where nothing else changes:
        nodes let go to decide again, or a nomination to end (`max_s`). Not one to make: where
        nothing changes nothing takes the room a waiting deployment needs, and the pass any
        change brings makes it."""
        return self.let_go or any(self._overdue(held, now) for held in self.held.values())

    def _overdue(self, held: Nominated, now: float) -> bool:
        """Whether a nomination in force has been held `max_s`."""
        return now - held.since >= self.max_s

    # --- both paths --------------------------------------------------------------------------
    def into(self, problem: dict[str, Any]) -> dict[str, Any]:
        """The full solve's problem with the nominations in force (their nodes the problem has),
        in place of those it was read with (the stored set, which may be older)."""
        rest = problem if "nominations" not in problem else {k: v for k, v in problem.items() if k != "nominations"}
        if not self.held:
            return rest
        known = {n["id"] for n in problem.get("nodes", ())}
        out = []
        for nom in self.nominations:
            nodes = [n for n in nom.nodes if n in known]
            if nodes:
                out.append({"deployment": nom.deployment, "priority": nom.priority, "nodes": nodes})
        return {**rest, "nominations": out} if out else rest

    def expire(self, now: float, snapshot: Snapshot) -> None:
        """End the nominations held `max_s` (their deployments to the back of the line), whose
        deployment is gone, or whose deployment was updated since its nodes were chosen (its
        priority or what a replica needs: `shape_of`; it keeps its place, and nodes are chosen
        again for what it is now), on either path."""
        if not self.held:
            return
        live = snapshot.deployment_ids
        docs = {d["id"]: d for d in snapshot.index.deployments_of(
            snapshot.problem, {stored_key(name) for name in self.held})}
        for name, held in list(self.held.items()):
            key = stored_key(name)
            if key not in live or held.deployment_id not in (None, live[key]):  # gone, or deleted and made anew
                self._waiting.pop(name, None)
                self._end(name, "deployment gone")
            elif self._overdue(held, now):
                self._waiting[name] = (now, self._waiting.get(name, (now, 0))[1])  # to the back of the line
                self._end(name, f"held {self.max_s:.0f} s without fitting")
            elif name in docs and held.shape and shape_of(docs[name]) != held.shape:
                self._end(name, "its deployment was updated: nodes are chosen again for what it asks now")

    async def bring(self, cache: ClusterCache, now: float) -> bool:
        """At a fast pass's start: `expire`, hand the session what is in force, make
        nominations for deployments that have waited `after_s` in zones no other holds (the
        session picks their nodes, with those of ended ones let go first) and hand them over
        too (blocking calls in a worker thread). Whether nodes were let go since the last pass
        decided what waits (work waiting elsewhere may fit on them now: decide it again)."""
        self.expire(now, cache.snapshot)
        await self.hand(cache)
        if self.after_s > 0:
            await self._elect(cache, now)
        let_go, self.let_go = self.let_go, False
        return let_go

    async def hand(self, cache: ClusterCache) -> None:
        """Hand the session what is in force, when it holds something else (a cache just built
        holds none)."""
        if cache.nominations != self.nominations:
            await asyncio.to_thread(cache.session.nominate, self.nominations)
            cache.nominations = self.nominations

    async def _elect(self, cache: ClusterCache, now: float) -> None:
        """Nominate, in the line's order, each deployment due that nodes in a zone no other
        holds would help; each one made is handed to the session before the next is chosen.
        Nothing is asked while every deployment due is one whose zones were all held (`_blocked`);
        when one is not, those are asked again too, in the line's order (a zone may have become
        of use to them since: a node added or repaired, a cordon lifted)."""
        due = [name for name, (since, _) in self._waiting.items()
               if now - since >= self.after_s and name not in self.held]
        if all(name in self._blocked for name in due):
            return
        snap = cache.snapshot
        docs = {d["id"]: d for d in snap.index.deployments_of(snap.problem, {stored_key(n) for n in due})}
        for name in [n for n in due if n not in docs or not _gathers(docs[n])]:
            del self._waiting[name]  # gone (or not in the cache: the next full solve says), or needs no gathering
            self._blocked.discard(name)
        ranked = sorted((n for n in due if n in self._waiting),
                        key=lambda n: (-int(docs[n].get("priority", 0)), self._waiting[n][0], n))
        for name in ranked:
            since, missing = self._waiting[name]
            nodes = await asyncio.to_thread(cache.session.nominees, name, True)
            if not nodes and self.held and await asyncio.to_thread(cache.session.nominees, name, False):
                self._blocked.add(name)  # only zones another holds would help it: it keeps its place
                continue
            self._blocked.discard(name)
            if not nodes:  # nodes would not help it now (or the session does not hold it): to the back of the line
                self._waiting[name] = (now, missing)
                continue
            priority = int(docs[name].get("priority", 0))
            self.held[name] = Nominated(Nomination(name, priority, nodes), now, missing,
                                        snap.deployment_ids.get(stored_key(name)), shape_of(docs[name]))
            self._changed = True
            log.info("nominated nodes for the head of the line deployment=%s priority=%d waited_s=%.0f nodes=%s",
                     name, priority, now - since, ",".join(nodes))
            self._event(name, "deployment.nominated",
                        f"nodes {', '.join(nodes)} kept for it after {now - since:.0f} s waiting for room: no new "
                        f"work of priority {priority} or lower is placed there until it fits",
                        {"nodes": list(nodes), "priority": priority, "waited_s": round(now - since, 1)})
            await self.hand(cache)

    def _end(self, name: str, why: str) -> None:
        nom = self.held.pop(name).nomination
        self._changed = True
        log.info("nomination ended deployment=%s reason=%s", nom.deployment, why)
        self._event(nom.deployment, "deployment.nomination_ended", f"nodes {', '.join(nom.nodes)} no longer kept "
                    f"for it: {why}", {"nodes": list(nom.nodes), "why": why})
        self._blocked.clear()  # its zone is free: those that waited for one are tried again
        self.let_go = True

    def _event(self, name: str, kind: str, message: str, data: dict[str, Any]) -> None:
        self._events.append(NewEvent(actor="controller", kind=kind, object_kind="deployment",
                                     object_id=stored_key(name), message=message, data=data))


# What nodes are chosen for, of a deployment's document: not its replica counts (a scale keeps
# the nomination; fewer missing is progress, `saw`).
_SHAPE_KEYS = ("tenant", "priority", "preemptible", "shards_per_replica", "shard", "locality", "spread")


def shape_of(doc: dict[str, Any]) -> str:
    """A digest of what a deployment's nominated nodes were chosen for (`_SHAPE_KEYS`)."""
    content = json.dumps({key: doc.get(key) for key in _SHAPE_KEYS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(content.encode()).hexdigest()[:32]


def _gathers(doc: dict[str, Any]) -> bool:
    """Whether a replica of this deployment needs room gathered: more than one accelerator (a
    gang, a shard of several). One of at most one accelerator takes the first that frees: what
    waits is decided again first, oldest first, on every departure (`ClusterCache.decide`), so
    it is never starved and nodes kept for it would only keep them from the rest."""
    shard = doc.get("shard", {})
    return int(doc.get("shards_per_replica", 1)) * int(shard.get("accelerators", 1)) > 1
