"""The heartbeat intervals the hub tells agents, and how long it lets each stream stay silent.

Why a module of its own: which interval each agent was told, the longest and the shortest one
told, and when the whole connected fleet must be told a longer one (`HeartbeatPacing`'s steps) is
state and policy of its own, read by the hub at Register, at Hello (`judged`), when a stream
opens (`pace`) and by the flush (`longest_silence_timeout_s`: how often a live stream's contact is
written). `HeartbeatIntervals` keeps it behind those few calls; it reads the hub's open streams
(a live mapping it never changes) and tells an agent a longer interval through its session.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from controller.agents.session import AgentSession
from controller.domain.liveness import HeartbeatPacing

log = logging.getLogger("maia.agents")


class HeartbeatIntervals:
    """The heartbeat interval a Register tells its agent, by the connected nodes (0: no cap);
    what each node was told last (its stream is judged by it), and the longest one told; the
    shortest one a connected agent may have been told (a bound: `_pace_grown` raises it)."""

    def __init__(self, sessions: Mapping[str, AgentSession], *, heartbeat_timeout_s: float,
                 max_heartbeats_per_second: float) -> None:
        self._sessions = sessions  # the hub's open streams, read only
        self._pacing = HeartbeatPacing(timeout_s=heartbeat_timeout_s, max_per_second=max_heartbeats_per_second)
        self._told_ms: dict[str, int] = {}
        self._longest_ms = self._shortest_ms = self._pacing.base_interval_ms

    def silence_timeout_s(self, interval_ms: int) -> float:
        """How long a stream told `interval_ms` may stay silent (`HeartbeatPacing.silence_timeout_s`)."""
        return self._pacing.silence_timeout_s(interval_ms)

    def longest_silence_timeout_s(self) -> float:
        """The longest silence timeout of an interval this controller told an agent (the heartbeat
        timeout at least): how stale a live stream's stored last contact may be is counted in it."""
        return self._pacing.silence_timeout_s(self._longest_ms)

    def interval_for(self, node_ids: Iterable[str]) -> int:
        """The interval to tell the agents of `node_ids` registering now: the connected nodes,
        with them."""
        joining = sum(1 for node_id in set(node_ids) if node_id not in self._sessions)
        return self._pacing.interval_ms(len(self._sessions) + joining)

    def registered(self, node_id: str, interval_ms: int) -> None:
        """A Register told the node's agent `interval_ms` (`interval_for`)."""
        self._remember_told(node_id, interval_ms)
        # unlike a stream's (`_tell`), a Register's may be shorter than every connected agent follows
        self._shortest_ms = min(self._shortest_ms, interval_ms)

    def forget(self, node_id: str) -> None:
        """The node is gone: a Hello of its that states no interval is judged by the base one."""
        self._told_ms.pop(node_id, None)

    def _remember_told(self, node_id: str, interval_ms: int) -> None:
        """The node's agent was told `interval_ms` (at its Register, or on its stream): a Hello
        of its that states none is judged by it (`_told_to`), and the longest one told bounds how
        stale a live stream's stored contact may grow."""
        self._told_ms[node_id] = interval_ms
        self._longest_ms = max(self._longest_ms, interval_ms)

    def _tell(self, session: AgentSession, interval_ms: int) -> None:
        """Tell a connected agent a longer interval on its stream. Never a shorter one than it
        follows, so the shortest one a connected agent may follow stays as it is."""
        session.tell(interval_ms, self._pacing.silence_timeout_s(interval_ms))
        self._remember_told(session.node_id, interval_ms)

    def pace(self, session: AgentSession) -> None:
        """A stream opened: tell its agent the cluster's interval if it missed a `_pace_grown`
        since its Register (or stated a shorter one in its Hello); then every connected agent, if
        the cluster's interval grew enough. Never a shorter one than its agent follows: a new
        leader's connected nodes are few while the fleet comes over, and telling them its interval
        would make the agents that state a longer one beat faster than the cap until it grew."""
        current_ms = self._pacing.interval_ms(len(self._sessions))
        if session.interval_ms < self._shortest_ms and current_ms > session.interval_ms:
            self._tell(session, current_ms)
        if self._pacing.grown(self._shortest_ms, current_ms):
            self._pace_grown(current_ms)

    def _pace_grown(self, interval_ms: int) -> None:
        """The cluster's interval grew `PACING_STEP` times past the shortest one told: tell it to
        every connected agent told less (each grown step: O(nodes) now and then, not per connect)."""
        told = 0
        for session in self._sessions.values():
            if session.interval_ms < interval_ms:
                self._tell(session, interval_ms)
                told += 1
        self._shortest_ms = interval_ms
        log.info("heartbeat interval now %d ms for %d connected nodes (%d agents told)", interval_ms,
                 len(self._sessions), told)

    def _told_to(self, node_id: str, stated_ms: int = 0) -> int:
        """The interval the node's stream is judged by: the one its agent states in its Hello it
        follows (`stated_ms`; told at a Register or on a stream, here or by another controller),
        bounded (`HeartbeatPacing.stated`); from an agent that states none (0), the one told at
        Register here (one told by another controller, or before this one started: the shortest, a
        third of the timeout)."""
        if stated_ms > 0:
            return self._pacing.stated(stated_ms, told_longest_ms=self._longest_ms)
        return self._told_ms.get(node_id, self._pacing.base_interval_ms)

    def judged(self, node_id: str, stated_ms: int) -> int:
        """The interval the stream of a Hello accepted now is judged by (`_told_to`). A stated
        interval longer than any told counts in the longest one (the stored contact's cadence,
        `ReportBuffer._due_beats`, and how stale the node lifecycle lets it grow) as far as the
        cluster's interval with this node connected: an agent's own stream may be judged by up to
        `HeartbeatPacing.stated`, but one agent (hostile, or run with a long fixed interval) must
        not make every node's stored contact that old for the rest of this controller's life (the
        longest never shrinks). A fleet coming over from a leader that told it a long interval
        counts in full once back."""
        told_ms = self._told_to(node_id, stated_ms)
        self._longest_ms = max(self._longest_ms, min(told_ms, self._pacing.interval_ms(len(self._sessions) + 1)))
        return told_ms
