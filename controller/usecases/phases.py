"""What a deployment's phase is, given its placements and what its agents report.

RUNNING: every placed shard runs and every asked replica is placed; DEGRADED: everything placed
runs but fewer replicas than asked are placed; SCHEDULED: placed, some shards not running yet;
PENDING: nothing placed (the reasons say why). DELETING is set by the user and is sticky.
Both the reconciler (after a plan) and agent reports (shards turning running) call
`refresh_phases`, so the rule lives here once.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import models as m
from controller.store import repositories as repo


def desired_phase(row: m.Deployment) -> m.DeploymentPhase:
    """The phase its placements imply (DELETING is sticky)."""
    if row.phase is m.DeploymentPhase.DELETING:
        return row.phase
    counts = repo.replica_counts(row)
    if counts.placed == 0:
        return m.DeploymentPhase.PENDING
    if counts.running == counts.placed:
        return m.DeploymentPhase.RUNNING if counts.placed >= row.replicas else m.DeploymentPhase.DEGRADED
    return m.DeploymentPhase.SCHEDULED


async def refresh_phases(session: AsyncSession, *, names: Iterable[str] | None = None) -> set[str]:
    """Recompute the phases of some (default: all) deployments; returns those that changed.

    Does not commit. Reasons are the plan's to set (`commit_plan`); this only judges phases.
    """
    rows = await repo.list_deployment_rows(session, names=names)
    changed: set[str] = set()
    for row in rows:
        phase = desired_phase(row)
        if phase is not row.phase:
            row.phase = phase
            changed.add(row.name)
    await session.flush()
    return changed
