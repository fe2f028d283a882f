"""Queries on the `api_tokens` table and the mapping of its rows to `TokenView`."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import models as m
from controller.store.inlist import any_of
from controller.domain import values as d
from controller.domain.paging import PageBounds


def is_active(row: m.ApiToken, now: datetime) -> bool:
    expires = m.as_utc(row.expires_at)
    return row.revoked_at is None and (expires is None or expires > now)


async def get_token(session: AsyncSession, token_id: str) -> m.ApiToken | None:
    return await session.get(m.ApiToken, token_id)


async def revoked_among(session: AsyncSession, token_ids: Iterable[str]) -> set[str]:
    """Which of these tokens are revoked, in one query."""
    ids = sorted(set(token_ids))
    if not ids:
        return set()
    query = select(m.ApiToken.id).where(any_of(session, m.ApiToken.id, ids), m.ApiToken.revoked_at.is_not(None))
    return set(await session.scalars(query))


async def list_token_rows(session: AsyncSession, *, role: str = "", tenant: str = "",
                          node: str = "", page: PageBounds | None = None) -> list[m.ApiToken]:
    """Tokens oldest first; with `page`, those after its key (created_at as the database returns
    it, in ISO format; id) and one more than the page holds (another page follows)."""
    query = select(m.ApiToken).order_by(m.ApiToken.created_at, m.ApiToken.id)
    if role:
        query = query.where(m.ApiToken.role == role)
    if tenant:
        query = query.where(m.ApiToken.tenant_id == tenant)
    if node:
        query = query.where(m.ApiToken.node_id == node)
    if page is not None:
        if page.after is not None:
            created, token_id = page.after
            query = query.where(tuple_(m.ApiToken.created_at, m.ApiToken.id)
                                > tuple_(datetime.fromisoformat(str(created)), str(token_id)))
        query = query.limit(page.limit + 1)
    return list((await session.scalars(query)).all())


def token_page_key(row: m.ApiToken) -> tuple[str, str]:
    """The keyset paging key of a token row (see `list_token_rows`)."""
    return (row.created_at.isoformat(), row.id)


async def active_tokens(session: AsyncSession, now: datetime, *, role: str = "", tenant: str = "",
                        node: str = "") -> list[m.ApiToken]:
    return [r for r in await list_token_rows(session, role=role, tenant=tenant, node=node) if is_active(r, now)]


def token_view(row: m.ApiToken) -> d.TokenView:
    return d.TokenView(id=row.id, name=row.name, role=row.role, tenant=row.tenant_id or "",
                       node=row.node_id or "", created_by=row.created_by, created_at=m.as_utc(row.created_at),
                       expires_at=m.as_utc(row.expires_at), revoked_at=m.as_utc(row.revoked_at))


async def active_tokens_of_nodes(session: AsyncSession, now: datetime, node_ids: Iterable[str], *,
                                 role: str) -> dict[str, list[m.ApiToken]]:
    """The active tokens of `role` bound to each of these nodes (nodes without one left out), in
    one query: what a batch of Registers judges its credentials by."""
    ids = sorted(set(node_ids))
    if not ids:
        return {}
    found: dict[str, list[m.ApiToken]] = {}
    query = (select(m.ApiToken).where(m.ApiToken.role == role, any_of(session, m.ApiToken.node_id, ids))
             .order_by(m.ApiToken.created_at, m.ApiToken.id))
    for row in await session.scalars(query):
        if is_active(row, now) and row.node_id is not None:
            found.setdefault(row.node_id, []).append(row)
    return found
