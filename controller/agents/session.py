"""One agent's stream as the hub keeps it, and the messages the stream carries.

Why a module of its own: `AgentSession` is the per-stream state every part of the hub reads and
writes (the pusher in `hub.py`, the inbound checks and the batched writes in `reports.py`, the
interval telling in `pacing.py`); it and the message types are the package's shared vocabulary, so
they sit at the bottom of its import order and import nothing of it. What the hub does with them
is described in `controller/agents/__init__.py`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

from controller import limits
from controller.aio import Wakeup
from controller.errors import MaiaError, Unauthenticated
from controller.ratelimit import TokenBucket
from controller.tokenstreams import ExpiryTimer
from controller.domain.values import AcceleratorFault, AssignmentSet, HeartbeatReport, ShardReport

AgentInbound = HeartbeatReport | ShardReport
# Why a shard its agent never took up failed (`AgentSession.overdue`).
NOT_ACKNOWLEDGED = ("not taken up by its agent within {timeout_s:g}s of the assignment set that named it "
                    "(no LOADING, RUNNING or FAILED report of it)")
Message = TypeVar("Message")  # what a stream's agent sends, before `converse`'s `convert`


@dataclass(frozen=True, slots=True)
class ShardStateRequest:
    """Sent to an agent: its next heartbeat must carry its full shard state (`reports.ReportBuffer.accept`)."""


@dataclass(frozen=True, slots=True)
class HeartbeatPolicy:
    """Sent to an agent: heartbeat every `interval_ms` from now on (the cluster grew, or the
    interval its Hello stated is past what this controller allows)."""

    interval_ms: int


AgentOutbound = AssignmentSet | ShardStateRequest | HeartbeatPolicy

ShardKey = tuple[str, int, int]  # (deployment name, replica, shard): the tenant is looked up in `given`
SaidKey = tuple[str, str, int, int]  # (tenant as the agent said it, deployment name, replica, shard)


class HubObserver(Protocol):
    """Where the hub's timings and counts go (the metrics implement it).

    `shard_start_stage`: a shard's way from its commit to RUNNING recorded, stage by stage: `push`,
    a node's set changed (`notify`) -> the set handed to its stream; `agent`, the set that first
    named a shard handed to the stream -> the agent's RUNNING report of it received (the agent's
    load time included); `flush_wait`, a shard report received -> the flush that writes it began;
    `flush_write`, that flush began -> the report's chunk committed (the writer's turns and the
    transactions of the chunks up to its own).

    `heartbeats_written`: node rows a committed flush wrote heartbeats to (what `beat`'s
    `contact_write_every_s` bounds while streams live)."""

    def shard_start_stage(self, stage: str, seconds: Iterable[float]) -> None: ...

    def heartbeats_written(self, rows: int) -> None: ...


class _NoObserver:
    def shard_start_stage(self, stage: str, seconds: Iterable[float]) -> None:
        pass

    def heartbeats_written(self, rows: int) -> None:
        pass


@dataclass(eq=False, slots=True)
class AgentSession:
    node_id: str
    session_id: str
    # The heartbeat interval its agent was told, and the silence that ends the stream (`_expire`).
    interval_ms: int
    timeout_s: float
    last_seen: float = field(default_factory=time.monotonic)
    credential: str = ""  # the id of the token its Connect was authenticated with (`AgentHub.revoke_credentials`)
    # The timer that ends the stream when that token expires (`hub._expired`; None: it never does).
    expiry: ExpiryTimer | None = None
    beat_at: datetime | None = None  # the last heartbeat's time (wall clock), written or not
    # The stream's pusher waits on `dirty` alone: its set changed, or the stream closed (`close`
    # sets it; one event to wait on costs no waiter tasks per push). `closed` is a flag, not an
    # event: nothing waits on it.
    dirty: Wakeup = field(default_factory=Wakeup)
    closed: bool = False
    close_reason: str = ""
    mark_down_on_close: bool = True
    error: MaiaError | None = None  # why the controller ended the stream (sent as its status: `close`)
    # Shards sent to this stream in any set, with the tenants whose deployment of that name they
    # belong to (bounded: reset to the current set when it grows too big).
    given: dict[ShardKey, set[str]] = field(default_factory=dict)
    reports: TokenBucket = field(default_factory=lambda: TokenBucket(limits.REPORTS_PER_SECOND, limits.REPORTS_BURST))
    # What this stream's agent last said about each shard, as written (bounded like `given`): a
    # heartbeat repeats every shard's state, and only the shards whose state changed are written;
    # all of them again every `FULL_REPORTS_EVERY_S`, and after a write of this node's failed.
    said: dict[SaidKey, ShardReport] = field(default_factory=dict)
    said_all_at: float = field(default_factory=time.monotonic)
    # The shard_state_version of the last full heartbeat judged on this stream (None: none, or its
    # write failed): a heartbeat that omits its shards under this version changed nothing.
    state_version: int | None = None
    # The failed accelerators this stream's heartbeats last listed (None: no heartbeat yet, or its
    # list's write failed): `FaultWriter.heard`.
    faults: tuple[AcceleratorFault, ...] | None = None
    # The pusher's work besides closing: the node's set changed (`set_due`), the agent must be
    # asked for its full shard state (`ask_state`; `state_asked` once sent, until a full heartbeat),
    # or told a heartbeat interval (`tell_due`: `interval_ms`; a longer one as the cluster grows, or
    # the bound of what its Hello stated: `_judge`).
    set_due: bool = True
    ask_state: bool = False
    tell_due: bool = False
    state_asked: bool = False
    due_since: float | None = field(default_factory=time.monotonic)  # when `set_due` was set (the `push` stage)
    # The shards named by a set sent on this stream whose agent has not said RUNNING, FAILED or
    # STOPPED of them yet, with when that set was sent (the `agent` stage; bounded like `given`).
    starting: dict[ShardKey, float] = field(default_factory=dict)
    # The shards a set on this stream named first (or under a new generation) whose agent has
    # said nothing of them under it yet (no LOADING, RUNNING, FAILED or STOPPED), with when that
    # set was sent and the assignment's (generation, deployment uid): an agent that never takes one
    # up fails it (`overdue`; the hub's `--assignment-ack-timeout`). Only shards still named by the
    # set last sent (so at most one set's worth).
    unacknowledged: dict[SaidKey, tuple[float, int, int]] = field(default_factory=dict)
    # Each shard the set last sent named, with its assignment's (generation, deployment uid): a
    # shard a set names anew, or under another generation (placed again in the same slot) or
    # deployment (one deleted, another submitted under its name), is owed a word again.
    named: dict[SaidKey, tuple[int, int]] = field(default_factory=dict)

    def close(self, reason: str, *, mark_down: bool = True, told: MaiaError | None = None) -> None:
        """End the stream (once: a later close changes nothing). `reason`: the log's, and the
        suspect mark's when `mark_down`; `told`: the status its agent is sent, what it acts on
        (None: the agent ended the stream itself, or its call is gone: nobody to tell)."""
        if not self.closed:
            self.close_reason = reason
            self.mark_down_on_close = mark_down
            self.error = told
            self.closed = True
            self.dirty.set()

    def fail(self, error: MaiaError) -> None:
        self.error = error
        self.close(f"refused: {error.message}", told=error)

    def refuse_credential(self, reason: str) -> None:
        """End the stream UNAUTHENTICATED (if it is still open): the credential it was opened with
        was revoked, or expired. Liveness is left to the heartbeat timeout, so an agent that
        registers again in time (with a node-bootstrap token) keeps its shards."""
        self.close(f"refused: {reason}", mark_down=False, told=Unauthenticated(reason))

    def push_set(self) -> None:
        self.set_due = True
        if self.due_since is None:
            self.due_since = time.monotonic()
        self.dirty.set()

    def want_state(self) -> None:
        """Ask the agent for its full shard state (once until a heartbeat carries it)."""
        if not self.state_asked:
            self.state_asked = self.ask_state = True
            self.dirty.set()

    def tell(self, interval_ms: int, timeout_s: float) -> None:
        """Tell the agent a longer heartbeat interval; judged by its timeout from now on (longer
        than the last one: the agent's beats at its old interval pass it too)."""
        self.interval_ms, self.timeout_s, self.tell_due = interval_ms, timeout_s, True
        self.dirty.set()

    def forget_state(self) -> None:
        """What this stream's agent said was not written: its next heartbeat writes every shard."""
        self.said = {}
        self.state_version = None

    def sent(self, assignment_set: AssignmentSet, now: float) -> None:
        fresh = [a for a in assignment_set.assignments if (a.deployment, a.replica, a.shard) not in self.given]
        if len(self.given) + len(assignment_set.assignments) > 2 * limits.SHARDS_PER_NODE_MAX:
            self.given = {}
        if len(self.starting) + len(fresh) > 2 * limits.SHARDS_PER_NODE_MAX:
            self.starting = {}
        named = {(a.tenant, a.deployment, a.replica, a.shard): (a.generation, a.deployment_uid)
                 for a in assignment_set.assignments}
        if self.unacknowledged:  # a shard taken away before its agent said anything is not owed any more
            self.unacknowledged = {key: due for key, due in self.unacknowledged.items() if key in named}
        for key, (generation, uid) in named.items():
            if self.named.get(key) != (generation, uid):
                # Owed again (another generation): to the end, so that the first is the oldest (`overdue`).
                self.unacknowledged.pop(key, None)
                self.unacknowledged[key] = (now, generation, uid)
        self.named = named
        for a in fresh:
            self.starting[(a.deployment, a.replica, a.shard)] = now
        for a in assignment_set.assignments:
            self.given.setdefault((a.deployment, a.replica, a.shard), set()).add(a.tenant)

    def acknowledged(self, tenant: str, report: ShardReport) -> None:
        """The agent said something of the shard (of `tenant`'s deployment) under the generation
        it is owed or a later one, of the deployment it is owed of (when it says which): it took it
        up (an older one's word is of the last placement, another deployment's of one deleted)."""
        key = (tenant, report.deployment, report.replica, report.shard)
        owed = self.unacknowledged.get(key)
        if owed is not None and report.generation >= owed[1] and report.answers(owed[2]):
            del self.unacknowledged[key]

    def overdue(self, now: float, timeout_s: float) -> list[ShardReport]:
        """The shards named by a set sent more than `timeout_s` ago that the agent has said
        nothing of, forgotten here, each as the FAILED report the controller writes for it. The
        first owed is the oldest (`sent` keeps them in the order they were sent): when it is not
        late, none is, which the hub's silence check finds for most streams every second."""
        if not self.unacknowledged or now - next(iter(self.unacknowledged.values()))[0] <= timeout_s:
            return []
        late = [(key, generation, uid) for key, (sent_at, generation, uid) in self.unacknowledged.items()
                if now - sent_at > timeout_s]
        for key, _, _ in late:
            del self.unacknowledged[key]
        message = NOT_ACKNOWLEDGED.format(timeout_s=timeout_s)
        return [ShardReport(deployment, replica, shard, generation, "failed", message, tenant=tenant,
                            deployment_uid=uid)
                for (tenant, deployment, replica, shard), generation, uid in late]

    def started(self, report: ShardReport, now: float) -> float | None:
        """Seconds from the set that first named the shard to this report saying RUNNING (None: not
        such a report, or the shard's start was timed already)."""
        if report.phase == "loading":
            return None
        at = self.starting.pop((report.deployment, report.replica, report.shard), None)
        return None if at is None or report.phase != "running" else now - at

    def unchanged(self, report: ShardReport) -> bool:
        """The agent said exactly this about the shard last time, and it was written."""
        return self.said.get((report.tenant, report.deployment, report.replica, report.shard)) == report

    def say(self, report: ShardReport) -> None:
        if len(self.said) >= 2 * limits.SHARDS_PER_NODE_MAX:
            self.said = {}
        self.said[(report.tenant, report.deployment, report.replica, report.shard)] = report

    def given_tenant(self, report: ShardReport) -> str | None:
        """The tenant of the shard a report is about, if this node was given it: the report's own
        tenant, or (an agent that does not send one) the only tenant given a shard of that name."""
        tenants = self.given.get((report.deployment, report.replica, report.shard), set())
        if report.tenant:
            return report.tenant if report.tenant in tenants else None
        return next(iter(tenants)) if len(tenants) == 1 else None
