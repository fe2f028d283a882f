"""Node liveness: when a node that stopped talking is suspect, down, and has its work evicted.

The Kubernetes node-lifecycle lessons, as rules over plain values (no database, no real clock):
- a node whose agent stream drops, or whose heartbeats stop for `heartbeat_timeout_s`, is
  SUSPECT at once: it keeps its shards and takes no new ones;
- silent for `down_grace_s` it is DOWN: still holding its shards, still taking nothing new;
- only once silent for `eviction_grace_s` (longer) is its work evicted (the solver places its
  shards again elsewhere, as whole gangs where they cannot be completed beside their replica),
  and then at most `eviction_rate` nodes a second per zone; `unhealthy_zone_rate` in a zone
  where at least `unhealthy_zone_threshold` of the nodes are not up (part of a zone failing
  is more likely a network or power event that heals than many nodes dying), and none at all
  while every zone has no node up (a whole-fleet outage is more likely the controller's own
  network than every node at once: evicting would only reshuffle everything on return);
- after a controller start nothing changes for `restart_grace_s`, and silence counts from the
  start at the earliest: a reconnecting herd is not mistaken for dead nodes;
- agents are told to heartbeat three times per timeout, less often as the cluster grows
  (`HeartbeatPacing`: all nodes together send at most `max_per_second`, like Nomad's
  `max_heartbeats_per_second`), and each stream is judged silent by three of the intervals its
  agent was told, never less than `heartbeat_timeout_s`;
- while a node's agent stream lives, its stream is its liveness: the stored last contact is
  written at most every `contact_write_every_for` the longest silence timeout told (plus one
  heartbeat interval and a flush), so the stored time of a connected node may be that stale; the
  leader judges a node whose stream ended on its watch by what it saw itself (its last heartbeat,
  in memory), and a new leader counts silence from its own start (the restart grace), never from a
  stale stored time, and judges every node not heard from since its start at the grace's end,
  however fresh its stored time (`NodeLifecycle`): a node that came over said Hello to it;
- a node that comes back before its eviction keeps its shards (nothing is reshuffled); a node
  that keeps dropping is damped (`FlapDamper`): it comes back SUSPECT (connected, holding its
  shards, taking no new ones) until its penalty decays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from controller import limits
from controller.ratelimit import TokenBucket

UP, SUSPECT, DOWN = "up", "suspect", "down"
# A connected node's stored last contact is written at most every this many heartbeat timeouts
# (the longest silence timeout told, `HeartbeatPacing`): with the timeout added
# (`LivenessPolicy.stored_contact_stale_s`), 40 s at the default 10 s timeout, ~390 s at 16,384
# nodes paced at the default 500 heartbeats a second. A new leader does not wait for it: at the end
# of its restart grace it judges every node it has not heard from since it began to lead, whatever
# its stored time (`controller/nodelifecycle.py`).
CONTACT_WRITE_TIMEOUTS = 3.0
BEATS_PER_TIMEOUT = 3  # heartbeats an agent is told to send per silence timeout
MIN_HEARTBEAT_INTERVAL_MS = 100
# A connected agent is told a longer interval once the cluster's has grown this much beyond the
# shortest one told to any connected agent (`HeartbeatPacing.grown`): the cluster then sends at most
# this many times `max_per_second`, and each agent is told anew at most every such step.
PACING_STEP = 1.5
# The largest cluster whose interval an agent may state in its Hello (`HeartbeatPacing.stated`):
# four times the largest fleet measured on one controller (16,384 nodes, docs/scaling.md). At the
# default 500 heartbeats a second: a 131 s interval, a 393 s silence timeout at most.
STATED_INTERVAL_NODES_MAX = 65_536


@dataclass(frozen=True, slots=True)
class HeartbeatPacing:
    """How often an agent is told to heartbeat, and how long its stream may stay silent.

    The interval is a third of the heartbeat timeout, longer once the cluster is big enough that
    its nodes together would send more than `max_per_second` (0: no cap): `nodes / max_per_second`
    seconds (Nomad's servers scale each client's heartbeat TTL the same way,
    `max_heartbeats_per_second`). A stream is judged silent by three of the intervals its agent
    was told (never less than the timeout): an agent beating at its interval is never found silent,
    and one that stops is found within its own timeout."""

    timeout_s: float = 10.0
    max_per_second: float = limits.MAX_HEARTBEATS_PER_SECOND

    @property
    def base_interval_ms(self) -> int:
        """The interval of a cluster below the cap: three heartbeats per timeout."""
        return max(MIN_HEARTBEAT_INTERVAL_MS, int(self.timeout_s * 1000 / BEATS_PER_TIMEOUT))

    def interval_ms(self, nodes: int) -> int:
        """The interval to tell an agent when the cluster has `nodes` nodes (connected ones)."""
        if self.max_per_second <= 0:
            return self.base_interval_ms
        return max(self.base_interval_ms, math.ceil(nodes * 1000 / self.max_per_second))

    def silence_timeout_s(self, interval_ms: int) -> float:
        """How long the stream of an agent told `interval_ms` may stay silent."""
        return max(self.timeout_s, BEATS_PER_TIMEOUT * interval_ms / 1000)

    @property
    def longest_interval_ms(self) -> int:
        """The longest interval this pacing tells a cluster it supports (`STATED_INTERVAL_NODES_MAX`
        nodes; without a cap, the base interval whatever the size)."""
        return self.interval_ms(STATED_INTERVAL_NODES_MAX)

    def stated(self, interval_ms: int, *, told_longest_ms: int = 0) -> int:
        """The interval to judge a stream by whose agent states it follows `interval_ms` (one this
        controller did not necessarily tell: another leader's, or one told before a restart): at
        least the base interval (a stream is never judged silent sooner than the timeout), at most
        the longest interval this pacing tells, or the longest one it told (`told_longest_ms`), if
        longer: an agent cannot buy itself more silence than any cluster here could be given."""
        longest = max(self.longest_interval_ms, told_longest_ms)
        return min(max(interval_ms, self.base_interval_ms), longest)

    @staticmethod
    def grown(shortest_ms: int, current_ms: int) -> bool:
        """The cluster's interval grew enough past the shortest one told to tell agents anew."""
        return current_ms >= PACING_STEP * shortest_ms


@dataclass(frozen=True, slots=True)
class LivenessPolicy:
    heartbeat_timeout_s: float = 10.0
    down_grace_s: float = 30.0
    eviction_grace_s: float = 90.0
    restart_grace_s: float = 120.0
    eviction_rate: float = 10.0            # nodes a second per zone (Kubernetes: 0.1)
    unhealthy_zone_threshold: float = 0.55
    unhealthy_zone_rate: float = 1.0       # Kubernetes: 0.01
    flap_half_life_s: float = 60.0
    flap_suppress: float = 2.5             # penalty (drops, decaying) at which a return is damped: ~3 drops in a minute
    flap_reuse: float = 1.0                # ... and at or below which a damped node is up again

    @property
    def contact_write_every_s(self) -> float:
        """How often a connected node's last contact is written at most (a changed power draw, or
        its stream's end, at once), while no agent was told a longer silence timeout."""
        return self.contact_write_every_for(self.heartbeat_timeout_s)

    @property
    def stored_contact_stale_s(self) -> float:
        """`stored_contact_stale_for` the heartbeat timeout."""
        return self.stored_contact_stale_for(self.heartbeat_timeout_s)

    def contact_write_every_for(self, silence_timeout_s: float) -> float:
        """`contact_write_every_s` when the longest silence timeout an agent was told is
        `silence_timeout_s` (`HeartbeatPacing`): a few of those timeouts."""
        return CONTACT_WRITE_TIMEOUTS * max(self.heartbeat_timeout_s, silence_timeout_s)

    def stored_contact_stale_for(self, silence_timeout_s: float) -> float:
        """A node up whose stored last contact is older than this is not being written by a live
        stream: the write cadence plus the longest silence timeout (its agent's interval and the
        flush fit in it)."""
        timeout_s = max(self.heartbeat_timeout_s, silence_timeout_s)
        return self.contact_write_every_for(timeout_s) + timeout_s


@dataclass(frozen=True, slots=True)
class NodeLiveness:
    """What the rules read of one node."""

    node_id: str
    zone: str
    health: str                    # up, suspect, down
    last_contact: datetime | None  # its last heartbeat (or Hello)
    evicted: bool                  # its work was evicted (it holds nothing the solver counts on)
    connected: bool                # its agent holds a live stream to this controller


@dataclass(frozen=True, slots=True)
class Transition:
    """A node's health change, judged from a read (`was`: the health it was read with; None: write
    whatever it is now). Written only if the node still has that health (`apply_transitions`)."""
    node_id: str
    health: str
    why: str
    evict: bool = False
    was: str | None = None


def later_contact(stored: datetime | None, heard: datetime | None) -> datetime | None:
    """A node's last contact: the later of its stored one (naive: UTC, as SQLite hands it back) and
    what the leader heard itself (`AgentHub.last_heard`: the stored one is written only every
    `contact_write_every_s` while its stream lives)."""
    if stored is not None and stored.tzinfo is None:
        stored = stored.replace(tzinfo=timezone.utc)
    if heard is None or (stored is not None and stored >= heard):
        return stored
    return heard


def silence_s(node: NodeLiveness, now: datetime, started: datetime) -> float:
    """Seconds without contact, counted from the controller's start at the earliest."""
    since = started if node.last_contact is None else max(node.last_contact, started)
    return max(0.0, (now - since).total_seconds())


def health_changes(nodes: list[NodeLiveness], now: datetime, started: datetime, policy: LivenessPolicy,
                   damped: set[str]) -> list[Transition]:
    """Every health change due now, evictions aside (`eviction_candidates`, `zone_rates`)."""
    if (now - started).total_seconds() < policy.restart_grace_s:
        return [Transition(n.node_id, UP, "its agent is connected", was=n.health) for n in nodes
                if n.connected and n.health != UP and n.node_id not in damped]
    out: list[Transition] = []
    for n in nodes:
        if n.connected:
            if n.health != UP and n.node_id not in damped:
                out.append(Transition(n.node_id, UP, "its agent is connected", was=n.health))
            continue
        silent = silence_s(n, now, started)
        if n.health == UP and silent > policy.heartbeat_timeout_s:
            out.append(Transition(n.node_id, SUSPECT, f"no agent stream and no heartbeat for {silent:.0f}s", was=UP))
        elif n.health == SUSPECT and silent > policy.down_grace_s:
            out.append(Transition(n.node_id, DOWN, f"no contact for {silent:.0f}s (down grace {policy.down_grace_s:g}s)",
                                  was=SUSPECT))
    return out


def eviction_candidates(nodes: list[NodeLiveness], now: datetime, started: datetime,
                        policy: LivenessPolicy) -> list[NodeLiveness]:
    """DOWN nodes silent past the eviction grace whose work is not evicted yet, longest silent first."""
    if (now - started).total_seconds() < policy.restart_grace_s:
        return []
    due = [n for n in nodes if n.health == DOWN and not n.evicted and not n.connected
           and silence_s(n, now, started) > policy.eviction_grace_s]
    return sorted(due, key=lambda n: (-silence_s(n, now, started), n.node_id))


def zone_rates(nodes: list[NodeLiveness], policy: LivenessPolicy) -> dict[str, float]:
    """Evictions a second each zone may make now (Kubernetes' zone states, simplified)."""
    total: dict[str, int] = {}
    unhealthy: dict[str, int] = {}
    for n in nodes:
        total[n.zone] = total.get(n.zone, 0) + 1
        if n.health != UP:
            unhealthy[n.zone] = unhealthy.get(n.zone, 0) + 1
    return zone_rates_of(total, unhealthy, policy)


def zone_rates_of(total: Mapping[str, int], unhealthy: Mapping[str, int], policy: LivenessPolicy) -> dict[str, float]:
    """`zone_rates` from each zone's node count and count of nodes not up."""
    full = {z for z, count in total.items() if unhealthy.get(z, 0) == count}
    if full == set(total):  # no node up anywhere: the controller is more likely the one cut off
        return {z: 0.0 for z in total}
    rates = {}
    for zone, count in total.items():
        share = unhealthy.get(zone, 0) / count
        partial = zone not in full and unhealthy.get(zone, 0) >= 2 and share >= policy.unhealthy_zone_threshold
        rates[zone] = policy.unhealthy_zone_rate if partial else policy.eviction_rate
    return rates


@dataclass
class EvictionLimiter:
    """One token bucket per zone: at most `rate` evictions a second, bursting to max(1, rate)."""

    _buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def allow(self, zone: str, rate: float, now: float) -> bool:
        if rate <= 0:
            return False
        bucket = self._buckets.get(zone)
        if bucket is None:
            bucket = self._buckets[zone] = TokenBucket(rate, max(1.0, rate))
        elif bucket.rate != rate:  # the zone turned (un)healthy: what it spent stays spent
            bucket.retune(rate, max(1.0, rate), now)
        return bucket.take(now) == 0.0


@dataclass
class FlapDamper:
    """A penalty per node: +1 for each dropped stream, halving every `half_life_s` (like BGP
    route-flap damping). A node whose penalty reaches `suppress` when it returns is damped until
    its penalty falls to `reuse`. Times are monotonic seconds."""

    half_life_s: float = 60.0
    suppress: float = 2.5
    reuse: float = 1.0
    _penalty: dict[str, tuple[float, float]] = field(default_factory=dict)  # node -> (penalty, at)
    _damped: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, policy: LivenessPolicy) -> FlapDamper:
        return cls(policy.flap_half_life_s, policy.flap_suppress, policy.flap_reuse)

    def penalty(self, node_id: str, now: float) -> float:
        value, at = self._penalty.get(node_id, (0.0, now))
        return value * math.pow(0.5, max(0.0, now - at) / self.half_life_s)

    def dropped(self, node_id: str, now: float) -> None:
        self._penalty[node_id] = (self.penalty(node_id, now) + 1.0, now)

    def returns_damped(self, node_id: str, now: float) -> bool:
        """A node's agent is back: True if it must stay damped."""
        if node_id in self._damped or self.penalty(node_id, now) >= self.suppress:
            self._damped.add(node_id)
            return True
        return False

    def damped(self, now: float) -> set[str]:
        """The nodes still damped now (those whose penalty decayed to `reuse` are released)."""
        for node_id in [n for n in self._damped if self.penalty(n, now) <= self.reuse]:
            self._damped.discard(node_id)
            self._penalty.pop(node_id, None)
        return set(self._damped)
