"""What a deployment's phase is, given its placements and what its agents report: the one rule.

PENDING: no replica placed (the reasons say why); SCHEDULED: placed, some shards not running
yet; RUNNING: every placed shard runs and every asked replica is placed; DEGRADED: everything
placed runs but fewer replicas than asked are placed. DELETING is set by the user and is sticky.
A replica counts as placed only with all its shards (a gang).

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
    return ReplicaCounts(placed=len(placed), running=len(running))


def deployment_phase(replicas: int, counts: ReplicaCounts, *, deleting: bool = False) -> str:
    """The phase a deployment of `replicas` replicas is in, given its replica counts."""
    if deleting:
        return "deleting"
    if counts.placed == 0:
        return "pending"
    if counts.running < counts.placed:
        return "scheduled"
    return "running" if counts.placed >= replicas else "degraded"
