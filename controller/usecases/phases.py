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

from controller.store import repositories as repo


async def refresh_phases(session: AsyncSession, *, names: Iterable[str] | None = None) -> set[str]:
    """Recompute the phases of some (default: all) deployments; returns those that changed.

    Does not commit. Reasons are the plan's to set (`commit_plan`); this only judges phases.
    """
    rows = await repo.list_deployment_rows(session, names=names)
    changed: set[str] = set()
    for row in rows:
        phase = repo.desired_phase(row)
        if phase is not row.phase:
            row.phase = phase
            changed.add(row.name)
    await session.flush()
    return changed
