"""A deployment's kept template revisions (`models.DeploymentRevision`): what an update that rolls
writes, and what `maiactl rollout history` and a rollback read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller import limits
from controller.store import models as m


@dataclass(frozen=True, slots=True)
class StoredRevision:
    """One kept revision: the spec it was made with (an interchange deployment document), when
    (None: before revisions were kept), and the changes of the update that made it."""

    revision: int
    spec: dict[str, Any]
    created_at: datetime | None
    changes: tuple[str, ...]


def made_at(row: m.Deployment, revision: int) -> datetime | None:
    """When revision `revision` of `row` was made, if no kept row says: the first at the
    deployment's creation; a later one unknown (made before revisions were kept)."""
    return m.as_utc(row.created_at) if revision == 1 else None


async def stored_revisions(session: AsyncSession, deployment_id: int) -> list[StoredRevision]:
    """The deployment's kept revisions, newest first."""
    rows = await session.execute(
        select(m.DeploymentRevision.revision, m.DeploymentRevision.spec, m.DeploymentRevision.created_at,
               m.DeploymentRevision.changes)
        .where(m.DeploymentRevision.deployment_id == deployment_id)
        .order_by(m.DeploymentRevision.revision.desc()))
    return [StoredRevision(r.revision, r.spec, m.as_utc(r.created_at), tuple(r.changes or ())) for r in rows]


async def keep_revisions(session: AsyncSession, deployment_id: int, revisions: Sequence[StoredRevision]) -> None:
    """Writes `revisions` of the deployment that are not kept yet, then forgets all but its newest
    `limits.REVISION_HISTORY` (revision numbers are consecutive: an update that rolls adds one)."""
    kept = set((await session.scalars(
        select(m.DeploymentRevision.revision).where(m.DeploymentRevision.deployment_id == deployment_id))).all())
    for r in revisions:
        if r.revision not in kept:
            session.add(m.DeploymentRevision(deployment_id=deployment_id, revision=r.revision, spec=r.spec,
                                             created_at=r.created_at, changes=list(r.changes)))
    newest = max([*kept, *(r.revision for r in revisions)], default=0)
    await session.flush()
    await session.execute(delete(m.DeploymentRevision).where(
        m.DeploymentRevision.deployment_id == deployment_id,
        m.DeploymentRevision.revision <= newest - limits.REVISION_HISTORY))
