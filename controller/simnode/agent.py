"""The state machine of one simulated node agent, free of gRPC and of real time.

The controller sends the node's complete desired shard set (level-triggered); the agent
converges to it: new shards report LOADING at once and RUNNING after `load_delay_s`, shards no
longer wanted report STOPPED and are forgotten, sets older than the last one applied are
ignored. Faults (`controller/simnode/faults.py`) fail a shard (`fail`, or `load_failure` for
every load it names): it reports FAILED with a message and stays so until the controller stops
it or assigns it anew. Every method takes `now` (seconds, any monotonic origin) so tests drive
the clock. `state_version` changes with every change of what `reports()` says (a heartbeat may
omit its shards while it has not changed since they were last sent). `kept()` and `restore()` carry
the shards across a restart of the agent's process (`controller/simnode/shardstate.py`): the
workloads outlive the agent, unlike a host's crash (`crash`), which loses them.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field


class Phase(enum.Enum):
    """Shard phases an agent reports (a subset of maia.v1.ShardPhase)."""

    LOADING = "loading"
    RUNNING = "running"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, order=True)
class ShardKey:
    deployment: str
    replica: int
    shard: int
    tenant: str = ""  # names are per tenant: two tenants' `chat` may share a node

    def __str__(self) -> str:
        return f"{self.tenant}/{self.deployment}/{self.replica}/{self.shard}"


@dataclass(frozen=True)
class DesiredShard:
    """One assignment: which shard, where on the node, and what it draws."""

    key: ShardKey
    tenant: str = ""
    accelerator_indices: tuple[int, ...] = ()
    accelerator_milli: int = 0  # 0 or 1000: whole accelerators
    accelerators: int = 1
    power_w: float = 0.0        # per whole accelerator under load
    generation: int = 0         # the deployment generation it belongs to
    deployment_uid: int = 0     # the deployment's identity (another after a delete and submit again)

    @property
    def load_power_w(self) -> float:
        """Power drawn when running: per accelerator, a fraction pro rata."""
        if 0 < self.accelerator_milli < 1000:
            return self.power_w * self.accelerator_milli / 1000
        whole = self.accelerators or len(self.accelerator_indices)
        return self.power_w * whole

    def same_slot(self, other: DesiredShard) -> bool:
        """Same deployment, accelerators and size: a running shard can stay as it is (a deployment
        deleted and submitted again under its name is another model server: started anew). A uid
        of 0 (a controller that sends none) is not known: the shard is adopted under the other
        (every shard restarted at an upgrade or a failover between controllers of two versions)."""
        known = self.deployment_uid and other.deployment_uid
        return ((not known or self.deployment_uid == other.deployment_uid)
                and self.accelerator_indices == other.accelerator_indices
                and self.accelerator_milli == other.accelerator_milli
                and self.accelerators == other.accelerators)


@dataclass(frozen=True)
class DesiredState:
    """An AssignmentSet: `generation` increases with every change for the node."""

    generation: int
    shards: tuple[DesiredShard, ...] = ()


@dataclass(frozen=True)
class ShardReport:
    """What the agent says about one shard (a ShardStatus)."""

    key: ShardKey
    generation: int
    phase: Phase
    power_draw_w: float = 0.0
    message: str = ""
    deployment_uid: int = 0  # the assignment's it answers


@dataclass(frozen=True)
class KeptShard:
    """A shard as an agent that restarts finds it again: its assignment, its phase, how long it has
    been in that phase (a load resumes where it was), and why it failed."""

    desired: DesiredShard
    phase: Phase
    elapsed_s: float = 0.0
    message: str = ""


@dataclass
class _Held:
    desired: DesiredShard
    phase: Phase
    since: float
    message: str = ""  # why it FAILED


@dataclass
class NodeAgent:
    """One node's shards and the rules that move them between phases."""

    node_id: str
    idle_power_w: float
    load_delay_s: float = 1.0
    last_generation: int | None = None
    stale_ignored: int = 0
    state_version: int = 1  # the shard state's version (0 means unversioned in the protocol)
    # A fault: the message a finishing load of this shard fails with (None: it runs).
    load_failure: Callable[[ShardKey], str | None] | None = None
    _held: dict[ShardKey, _Held] = field(default_factory=dict)
    _accept_any: bool = True

    # --- inputs -------------------------------------------------------------------------------
    def begin_session(self) -> None:
        """A new Connect stream: its first set is the controller's truth, whatever its number
        (a controller restored from an older database may count from lower)."""
        self._accept_any = True

    def apply(self, desired: DesiredState, now: float) -> list[ShardReport]:
        """Converge to `desired`; returns the reports of every shard whose phase changed."""
        if not self._accept_any and self.last_generation is not None and desired.generation < self.last_generation:
            self.stale_ignored += 1
            return []
        self._accept_any = False
        self.last_generation = desired.generation
        wanted = {s.key: s for s in desired.shards}
        reports: list[ShardReport] = []
        for key in sorted(set(self._held) - set(wanted)):
            held = self._held.pop(key)
            reports.append(ShardReport(key, held.desired.generation, Phase.STOPPED, 0.0, "stopped",
                                       held.desired.deployment_uid))
        for key in sorted(wanted):
            shard = wanted[key]
            held = self._held.get(key)
            if held is not None and held.desired.same_slot(shard) and not (
                    held.phase is Phase.FAILED and held.desired != shard):  # assigned anew: restart it
                if held.desired != shard:  # new generation or spec, same slot: keep it running
                    held.desired = shard
                    reports.append(self._report(held))
                continue
            self._held[key] = _Held(shard, Phase.LOADING, now)
            reports.append(self._report(self._held[key], "loading weights"))
        if reports:
            self.state_version += 1
        return reports

    def tick(self, now: float) -> list[ShardReport]:
        """Finish loads whose delay has passed."""
        reports = []
        for key in sorted(self._held):
            held = self._held[key]
            if held.phase is Phase.LOADING and now >= held.since + self.load_delay_s:
                failure = self.load_failure(key) if self.load_failure is not None else None
                if failure is not None:
                    reports.append(self._fail(held, failure, now))
                    continue
                held.phase, held.since = Phase.RUNNING, now
                reports.append(self._report(held))
        if reports:
            self.state_version += 1
        return reports

    def fail(self, key: ShardKey, message: str, now: float) -> ShardReport | None:
        """The shard fails (a crashed model server): FAILED with `message`; None if not held
        or failed already."""
        held = self._held.get(key)
        if held is None or held.phase is Phase.FAILED:
            return None
        return self._fail(held, message, now)

    def _fail(self, held: _Held, message: str, now: float) -> ShardReport:
        held.phase, held.since, held.message = Phase.FAILED, now, message
        self.state_version += 1
        return self._report(held)

    def crash(self) -> None:
        """Lose everything, as a rebooted host does."""
        self._held.clear()
        self.last_generation = None
        self._accept_any = True
        self.state_version += 1

    def restore(self, shards: list[KeptShard], now: float) -> None:
        """Hold `shards` again, as the agent's process left them (restarted, the workloads still
        running): RUNNING and FAILED as they were, LOADING finishing its load where it was. Said in
        the next stream's first heartbeat; its first set then keeps them or stops them."""
        for kept in shards:
            if kept.phase is not Phase.STOPPED:
                self._held[kept.desired.key] = _Held(kept.desired, kept.phase, now - kept.elapsed_s, kept.message)
        self.state_version += 1

    # --- outputs ------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (None: nothing is loading)."""
        times = [h.since + self.load_delay_s for h in self._held.values() if h.phase is Phase.LOADING]
        return min(times) if times else None

    def reports(self) -> list[ShardReport]:
        """Every shard the node holds now (the heartbeat's full state)."""
        return [self._report(self._held[k]) for k in sorted(self._held)]

    def kept(self, now: float) -> list[KeptShard]:
        """Every shard the node holds now, as `restore` takes them back."""
        return [KeptShard(h.desired, h.phase, max(0.0, now - h.since), h.message)
                for h in (self._held[k] for k in sorted(self._held))]

    def held(self) -> list[ShardKey]:
        """The shards the node holds, in order."""
        return sorted(self._held)

    def desired_of(self, key: ShardKey) -> DesiredShard | None:
        held = self._held.get(key)
        return held.desired if held else None

    def phase_of(self, key: ShardKey) -> Phase | None:
        held = self._held.get(key)
        return held.phase if held else None

    def power_draw_w(self) -> float:
        """Idle power plus the load of running shards."""
        return self.idle_power_w + sum(self._shard_power(h) for h in self._held.values())

    @staticmethod
    def _shard_power(held: _Held) -> float:
        return held.desired.load_power_w if held.phase is Phase.RUNNING else 0.0

    def _report(self, held: _Held, message: str = "") -> ShardReport:
        return ShardReport(held.desired.key, held.desired.generation, held.phase,
                           self._shard_power(held), message or held.message, held.desired.deployment_uid)
