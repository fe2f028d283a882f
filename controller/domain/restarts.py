"""When a replica whose shard FAILED is placed again, and when the controller gives up.

An agent reports a shard FAILED (it crashed, or would not load) with a message. The replica
(a gang: all its shards) is released and placed again, preferably on other nodes, after a
back-off per deployment that doubles with each failure in a row (5 s, 10 s, ... capped at
5 min) and starts over once the deployment has gone `reset_after_s` without failing: Kubernetes'
CrashLoopBackOff and Nomad's reschedule policy (exponential delay, max delay, attempts). `limit`
is the restarts in a row (as a Kubernetes Job's backoffLimit counts retries): the failure after
`limit` of them, the `limit + 1`-th in a row, makes the deployment FAILED: its failed replicas are not placed again
(what runs keeps running, the failed shards stay where they failed for the operator to read)
until its spec is updated or it is deleted.

Pure rules over plain values; the reconciler applies them (`store/failures.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

SHARD_FAILED = "SHARD_FAILED"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    initial_delay_s: float = 5.0
    max_delay_s: float = 300.0
    reset_after_s: float = 600.0  # this long without a failure: the next one counts as the first
    limit: int = 10               # restarts in a row; the failure after the last makes the deployment FAILED

    def __post_init__(self) -> None:
        if not (0 <= self.initial_delay_s <= self.max_delay_s and self.reset_after_s >= 0 and self.limit >= 1):
            raise ValueError(f"restart policy out of range: {self}")

    def failures_after(self, failures: int, last_failure_at: datetime | None, now: datetime) -> int:
        """The count of failures in a row once one more happened at `now`."""
        if last_failure_at is None or now - last_failure_at >= timedelta(seconds=self.reset_after_s):
            return 1
        return failures + 1

    def delay_s(self, failures: int) -> float:
        """How long after its `failures`-th failure in a row a replica is placed again."""
        return min(self.initial_delay_s * 2 ** max(0, min(failures - 1, 32)), self.max_delay_s)

    def gives_up(self, failures: int) -> bool:
        return failures > self.limit


def failure_reason(replica: int, shard: int, node: str, message: str) -> dict[str, Any]:
    """Why a deployment is not fully running: what the agent said about the shard that failed."""
    said = message.strip() or "no message"
    return {"code": SHARD_FAILED, "scope": f"node {node}",
            "message": f"replica {replica} shard {shard} failed on {node}: {said}"}


def with_failure(reasons: Sequence[Mapping[str, Any]], reason: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`reasons` with `reason` as the one SHARD_FAILED reason (the latest failure)."""
    return [dict(reason)] + [dict(r) for r in reasons if r.get("code") != SHARD_FAILED]


def failure_reasons(reasons: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The SHARD_FAILED reason among `reasons` (kept beside a new solve's reasons until the
    deployment runs again, or for good once it is FAILED)."""
    return [dict(r) for r in reasons if r.get("code") == SHARD_FAILED][:1]
