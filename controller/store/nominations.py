"""Head-of-line nominations as stored (table `nominations`, migration 0034).

The leader's reconciler keeps them (controller/scheduling/nominations.py) and writes the whole set
whenever one is made or ends, with the pass's plan commit or in a commit of its own at the end of
the pass (`write_nominations`, fenced by the leader lease as every leader's write). Two readers:

- a new leader, or the same one restarted, takes them up on its first full pass rather than
  starting the line again (`read_nominations`): the nodes drained for a gang so far stay kept;
- every snapshot carries those still valid in its problem's `nominations` (`in_force`), so that
  `maiactl snapshot` shows them and a dry run decides as the leader will.

A row can outlive what it names: a node deleted, a rollout's outgoing revision (its own solver
id, `NAME~REV`) finished, a deployment deleted and one of its name created (the row's
`deployment_id` is the old one's; ids are never reused, and the foreign key deletes the row with
its deployment). `in_force` keeps only what the state it is read with still has.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.values import NominationView
from controller.store.models import Deployment, NominationRow, as_utc
from controller.store.rollout import stored_key


@dataclass(frozen=True, slots=True)
class StoredNomination:
    """One nomination in force: the solver deployment it keeps nodes for, which stored deployment
    that is, its priority and nodes, when it was made, since when that deployment has waited (the
    line's order) and how many replicas it missed then."""

    solver_id: str
    deployment_id: int
    priority: int
    nodes: tuple[str, ...]
    nominated_at: datetime
    waiting_since: datetime
    missing: int
    shape: str = ""  # what the nodes were chosen for (`scheduling.nominations.shape_of`)


async def read_nominations(session: AsyncSession, *, deployment_id: int | None = None) -> list[StoredNomination]:
    """Every stored nomination (of one stored deployment, with `deployment_id`), oldest first."""
    query = select(
        NominationRow.solver_id, NominationRow.deployment_id, NominationRow.priority, NominationRow.nodes,
        NominationRow.nominated_at, NominationRow.waiting_since, NominationRow.missing, NominationRow.shape,
    ).order_by(NominationRow.nominated_at, NominationRow.solver_id)
    if deployment_id is not None:
        query = query.where(NominationRow.deployment_id == deployment_id)
    return [StoredNomination(r.solver_id, r.deployment_id, r.priority, tuple(r.nodes), as_utc(r.nominated_at),
                             as_utc(r.waiting_since), r.missing, r.shape) for r in await session.execute(query)]


async def nomination_view(session: AsyncSession, deployment_id: int, *, rolling: bool) -> NominationView | None:
    """The nomination stored for one deployment, as `GetDeployment` shows it: its current
    revision's; else, while it has replicas being replaced (`rolling`), the oldest of its outgoing
    revisions' (`NAME~REV`: such a row can outlive its rollout a while, until the leader's
    nominations next change); None when it holds none."""
    stored = await read_nominations(session, deployment_id=deployment_id)
    nom = next((n for n in stored if n.solver_id == stored_key(n.solver_id)), stored[0] if stored and rolling else None)
    if nom is None:
        return None
    return NominationView(nom.nodes, nom.nominated_at, nom.waiting_since, nom.missing)


async def nominated_nodes(session: AsyncSession) -> dict[str, StoredNomination]:
    """Node -> the stored nomination keeping it (what `maiactl get nodes` and `describe node` show)."""
    return {node: nom for nom in await read_nominations(session) for node in nom.nodes}


async def write_nominations(session: AsyncSession, nominations: Sequence[StoredNomination]) -> None:
    """Replace the stored set with `nominations` (one a zone: a handful of rows), in the caller's
    transaction. One whose deployment's row is gone is left out: a foreign key refused would
    fail the plan commit it rides with, and every one after it."""
    await session.execute(delete(NominationRow))
    if nominations:
        live = set((await session.scalars(select(Deployment.id).where(
            Deployment.id.in_(sorted({n.deployment_id for n in nominations}))))).all())
        nominations = [n for n in nominations if n.deployment_id in live]
    if nominations:
        await session.execute(insert(NominationRow), [
            {"solver_id": n.solver_id, "deployment_id": n.deployment_id, "priority": n.priority,
             "nodes": list(n.nodes), "nominated_at": n.nominated_at, "waiting_since": n.waiting_since,
             "missing": n.missing, "shape": n.shape} for n in nominations])


def in_force(stored: Sequence[StoredNomination], deployment_ids: Mapping[str, int], solver_ids: Collection[str],
             node_ids: Collection[str]) -> list[StoredNomination]:
    """The stored nominations a state still has: their solver deployment among `solver_ids`, of
    the same stored deployment (`deployment_ids`: key -> primary key), with the nodes of
    `node_ids` only (a node in two, which one leader never writes, stays with the older); none
    left without a node."""
    kept: list[StoredNomination] = []
    taken: set[str] = set()
    for nom in stored:
        if nom.solver_id not in solver_ids or deployment_ids.get(stored_key(nom.solver_id)) != nom.deployment_id:
            continue
        nodes = tuple(n for n in nom.nodes if n in node_ids and n not in taken)
        if nodes:
            taken.update(nodes)
            kept.append(nom if nodes == nom.nodes else replace(nom, nodes=nodes))
    return kept


def problem_nominations(nominations: Sequence[StoredNomination]) -> list[dict[str, Any]]:
    """The problem document's `nominations` (scheduler/interchange.py) of these."""
    return [{"deployment": n.solver_id, "priority": n.priority, "nodes": list(n.nodes)} for n in nominations]

