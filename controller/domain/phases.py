"""What a deployment's phase is, given its placements and what its agents report: the one rule.

PENDING: no replica placed (the reasons say why); SCHEDULED: placed, some shards not running
yet; RUNNING: every placed shard runs and every asked replica is placed; DEGRADED: everything
placed runs but fewer replicas than asked are placed, or a shard FAILED while at least
`min_replicas` replicas run, or a shard's node is down (the shard UNKNOWN: nothing says it runs,
until its agent reports again or the node's work is evicted). DELETING is set by the user,
FAILED by the controller when replicas keep failing (`domain/restarts.py`); both are sticky. A
replica counts as placed only with all its shards (a gang).

Pure functions over the interchange words: `commit_plan` applies them to the plan it writes,
the shard-report path to the placements its reports changed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReplicaCounts:
    placed: int
    running: int
    failed: int = 0  # placed replicas with a FAILED shard
    unknown: int = 0  # placed replicas with a shard on a node that is down (UNKNOWN)


def replica_counts(shards_per_replica: int, shards: Iterable[tuple[int, str]],
                   sizes: Mapping[int, int] | None = None) -> ReplicaCounts:
    """Replicas with every shard placed, and those with every shard running.

    `shards`: (replica, shard phase) of each placed shard; `sizes`: the shard count of replicas
    of another revision than the deployment's (a rolling update's outgoing replicas).
    """
    phases: dict[int, list[str]] = defaultdict(list)
    for replica, phase in shards:
        phases[replica].append(phase)
    sizes = sizes or {}
    placed = [ps for r, ps in phases.items() if len(ps) >= sizes.get(r, shards_per_replica)]
    running = [ps for ps in placed if all(p == "running" for p in ps)]
    failed = [ps for ps in placed if any(p == "failed" for p in ps)]
    unknown = [ps for ps in placed if any(p == "unknown" for p in ps)]
    return ReplicaCounts(placed=len(placed), running=len(running), failed=len(failed), unknown=len(unknown))


def deployment_phase(replicas: int, counts: ReplicaCounts, *, deleting: bool = False, failed: bool = False,
                     failing: bool = False, min_replicas: int = 1) -> str:
    """The phase a deployment of `replicas` replicas is in, given its replica counts (`failed`:
    the controller gave up on it; `failing`: replicas that failed are being placed again)."""
    if deleting:
        return "deleting"
    if failed:
        return "failed"
    if counts.placed == 0:
        return "pending"
    if (counts.failed or failing) and max(1, min_replicas) <= counts.running < replicas:
        return "degraded"
    if counts.unknown:  # placed on a node that is down: not starting, whatever runs beside it
        return "degraded"
    if counts.running < counts.placed:
        return "scheduled"
    return "running" if counts.placed >= replicas else "degraded"
