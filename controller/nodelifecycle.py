"""The node-lifecycle loop: suspects, downs and evicts nodes that fell silent, rate-limited.

Once a second (on the leader only) it reads every node's liveness, applies the rules of
`controller/domain/liveness.py` (graces, restart grace, flap damping) and evicts the work of
nodes silent past the eviction grace at most at each zone's rate, longest silent first. The
agent hub (`controller/agents/`) handles what happens on a stream: a node goes suspect at
once when its stream ends, and up on Hello (or stays suspect while it flaps).

A connected node is judged by its stream (the hub ends a stream silent for the heartbeat
timeout), never by its stored last contact, which the hub writes only every
`LivenessPolicy.contact_write_every_for` the longest silence timeout the hub told an agent
(`silence_timeout_s`) while the stream lives. A node whose stream ended on this
leader's watch is judged by the last heartbeat the hub saw (`released`), read by id while its stored
time may still look fresh; any other node up whose stored time is older than
`stored_contact_stale_for` that timeout is read too, and once the restart grace is over every node
up whose stored time is older than this leader's start (`_silent_before`): a new leader's nodes that
never came over are found at the end of the grace, which counts silence from the leader's start,
however fresh their stored time looks. (It may be a cadence old, or fresh: written by the old
leader just before it went. Those nodes must be read then, not once their stored time grows
stale: a cadence of three silence timeouts is ~300 s at 16,384 nodes paced at 500 heartbeats a
second, well past the 120 s grace. A node that came over said Hello here, which wrote its stored
time after this leader's start.) A node whose Hello the hub is writing (`greeting`) is left to
that Hello, which writes its health: its agent is back, though no stream holds it yet.

A pass whose read found no node a rule could change leaves the next passes nothing to read while
nothing that could make one happened here (`streams`: the hub's count of streams opened and
ended; this loop's own writes come only from nodes it read): every change to a node's liveness
on the leader comes with a stream opening or ending (a Hello; a stream ended, marked suspect and
released, or revoked and released), so an idle cluster of thousands of connected nodes costs no
scan of every node each second. What no stream signals (a node's row written by hand, a stored
time going stale on a node no stream holds) is read at least every heartbeat timeout; never
during the restart grace, which ends with a read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Set
from datetime import datetime, timedelta

from controller.aio import leader_passes
from controller.domain.liveness import (
    DOWN, UP, EvictionLimiter, FlapDamper, LivenessPolicy, Transition, eviction_candidates, health_changes,
    zone_rates_of,
)
from controller.domain.values import DeploymentEvent, DeploymentView
from controller.store.db import Database
from controller.store.lease import LeaseLost
from controller.store.models import utcnow
from controller.usecases import liveness

log = logging.getLogger("maia.nodelifecycle")

# The changes a transaction writes at most: a zone going dark marks thousands of nodes down in one
# pass, each with its shards (UNKNOWN) and their deployments, and one transaction of them all held
# SQLite's writer (and PostgreSQL's row locks) against every report flush and plan commit.
CHANGES_PER_TRANSACTION = 128
# The nodes whose stream ended lately that a pass reads by id at most; with more, it reads every
# node up and stored as silent for a timeout instead (most of the connected ones too: their stored
# time is written every few timeouts), not one bind parameter per node.
RECENT_BY_ID_MAX = 2048


class NodeLifecycle:
    def __init__(
        self, db: Database, policy: LivenessPolicy, *, connected: Callable[[], Set[str]],
        damper: FlapDamper, on_change: Callable[[], None], is_leader: Callable[[], bool] = lambda: True,
        released: Callable[[], Mapping[str, datetime]] = dict, greeting: Callable[[], Set[str]] = frozenset,
        silence_timeout_s: Callable[[], float] | None = None, streams: Callable[[], int] | None = None,
        interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utcnow, publish: Callable[..., None] = lambda *events: None,
        restate: Callable[[Iterable[str]], None] = lambda node_ids: None,
    ) -> None:
        self._db = db
        self._policy = policy
        self._connected = connected
        self._released = released  # nodes whose stream ended here -> their last heartbeat the hub saw
        self._greeting = greeting  # nodes whose Hello the hub is writing (`AgentHub.greeting`): left to it
        # The longest silence timeout the hub told an agent (`AgentHub.longest_silence_timeout_s`).
        self._silence_timeout = silence_timeout_s or (lambda: policy.heartbeat_timeout_s)
        # Moves whenever a stream opens or ends here (`AgentHub.streams_changed`); None: every pass reads.
        self._streams = streams
        # (the streams count, clock) of the last read that found no node a rule could change, past
        # the restart grace: until the count moves or a heartbeat timeout passes, passes read nothing.
        self._quiet: tuple[int, float] | None = None
        self._damper = damper
        self._on_change = on_change
        self._publish = publish  # deployment events for watchers (`Signals.publish`): shards gone UNKNOWN
        self._restate = restate  # the live streams of these nodes write every shard again (`AgentHub.restate`)
        self._is_leader = is_leader
        self._interval = interval_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._limiter = EvictionLimiter()
        self._started = wall_clock()
        self._held_back = 0  # evictions due but refused by the zone rates, last pass

    def lead(self) -> None:
        """This controller became the leader: the nodes get the restart grace to come over."""
        self._started = self._wall_clock()
        self._quiet = None

    async def run(self) -> None:
        self._started = self._wall_clock()
        # LeaseLost: another controller leads now and judges the nodes
        await leader_passes(self._interval, self._is_leader, self.pass_once, what="node lifecycle pass",
                            quiet=(LeaseLost,), logger=log)

    def _nothing_due(self, streams: int | None, mono: float) -> bool:
        """The last read found no node a rule could change, no stream opened or ended here since,
        and it is less than a heartbeat timeout old (module docstring)."""
        if streams is None or self._quiet is None:
            return False
        quiet_streams, quiet_at = self._quiet
        return streams == quiet_streams and mono - quiet_at < self._policy.heartbeat_timeout_s

    def _silent_before(self, stale: datetime, past_grace: bool) -> datetime:
        """The stored time before which a node up is read: `stale` (a live stream's stored time is
        never older), and once the restart grace is over this leader's start at least (a node not
        heard from since then never came over: module docstring)."""
        return max(stale, self._started) if past_grace else stale

    async def pass_once(self) -> list[Transition]:
        """One pass: the transitions written (evictions included)."""
        now, mono = self._wall_clock(), self._clock()
        streams = None if self._streams is None else self._streams()
        if self._nothing_due(streams, mono):
            return []
        # Only the nodes a rule could change (not every node, every second: at 16,384 nodes that
        # read was most of the event loop), and the zones' counts from the database when a node is
        # due for eviction (a count of every node: not every second when nothing is).
        silent_before = now - timedelta(seconds=self._policy.stored_contact_stale_for(self._silence_timeout()))
        heard = self._released()
        recent = [node_id for node_id, at in heard.items() if at >= silent_before]
        if len(recent) > RECENT_BY_ID_MAX:  # streams ended by the thousand: every node silent for a timeout
            recent, silent_before = [], now - timedelta(seconds=self._policy.heartbeat_timeout_s)
        past_grace = (now - self._started).total_seconds() >= self._policy.restart_grace_s
        silent_before = self._silent_before(silent_before, past_grace)
        async with self._db.unit_of_work() as uow:
            nodes = await liveness.read_liveness(uow, self._connected(), silent_before=silent_before, heard=heard,
                                                 recent=recent)
            due = eviction_candidates(nodes, now, self._started, self._policy)
            total, unhealthy = await liveness.zone_health(uow) if due else ({}, {})
        self._quiet = (streams, mono) if streams is not None and not nodes and past_grace else None
        changes = health_changes(nodes, now, self._started, self._policy, self._damper.damped(mono))
        rates = zone_rates_of(total, unhealthy, self._policy)
        held_back = 0
        for node in due:
            if self._limiter.allow(node.zone, rates.get(node.zone, 0.0), mono):
                changes.append(Transition(node.node_id, DOWN, f"silent past the eviction grace "
                                          f"({self._policy.eviction_grace_s:g}s)", evict=True, was=DOWN))
            else:
                held_back += 1
        if held_back and held_back != self._held_back:
            log.warning("%d node(s) due for eviction are held back by the zone eviction rates %s", held_back,
                        {z: r for z, r in sorted(rates.items())})
        self._held_back = held_back
        if changes:
            # Each change was judged by whether the node's agent was connected at the read (up: it
            # was; suspect, down, evicted: it was not). One whose stream ended or opened since is left
            # out: the compare-and-set on health cannot tell when the hub wrote the same health (a
            # stream's end finds a damped node suspect already; a damped node's Hello keeps it
            # suspect), and it would mark up a disconnected node or down a connected one. So is one
            # whose Hello is being written: its agent is back, and that Hello writes its health (judged
            # silent, a node coming over to a new leader when its restart grace ends, its Hello
            # waiting for the writer, would be marked suspect, down and evicted, a pass each).
            connected, greeting = self._connected(), self._greeting()
            changes = [change for change in changes if change.node_id not in greeting
                       and (change.health == UP) == (change.node_id in connected)]
        if not changes:
            return []
        applied: list[Transition] = []
        for start in range(0, len(changes), CHANGES_PER_TRANSACTION):
            views: dict[str, DeploymentView] = {}
            async with self._db.unit_of_work() as uow:
                # Only those written: a change whose node moved on since the read is left out.
                written = await liveness.apply_transitions(uow, changes[start:start + CHANGES_PER_TRANSACTION],
                                                           now, views=views)
            applied += written
            if views:  # the deployments whose shards went UNKNOWN with their node
                self._publish(*(DeploymentEvent("modified", view) for _, view in sorted(views.items())))
            # A node marked down whose agent said Hello since the read (a damped one comes back
            # suspect, which the change was judged with): what its stream said before is written
            # over by UNKNOWN; its next heartbeat writes every shard again.
            self._restate([c.node_id for c in written if c.health == DOWN and not c.evict])
        for change in applied:
            log.warning("node %s node=%s why=%s", "evicted" if change.evict else change.health, change.node_id,
                        change.why)
        if applied:  # each changes what the solver sees (`liveness.apply_transitions`)
            self._on_change()
        return applied
