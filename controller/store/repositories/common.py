"""Row helpers every repository module shares: paging a listing, counting rows, which ids exist, an upsert."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import models as m
from controller.store.inlist import any_of
from controller.domain.paging import PageBounds


def _paged(stmt: Select, page: PageBounds | None, *columns: object) -> Select:
    """Keyset paging on `columns` (the statement's sort order): rows after the page's key,
    one more than the page holds (to tell whether another page follows)."""
    if page is None:
        return stmt
    if page.after is not None:
        stmt = stmt.where(tuple_(*columns) > tuple_(*page.after))
    return stmt.limit(page.limit + 1)


async def count_rows(session: AsyncSession, model: type[m.Base]) -> int:
    return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def existing_ids(session: AsyncSession, model: type, ids: Iterable[str], *, key_share: bool = False) -> set[str]:
    """Which of `ids` have a row of `model`; `key_share`: those rows locked `FOR KEY SHARE` to the
    end of the transaction (PostgreSQL), as a foreign key's check locks what it refers to: their
    deletion waits for this transaction, and this one for a deletion under way (then reads it)."""
    wanted = set(ids)
    if not wanted:
        return set()
    query = select(model.id).where(any_of(session, model.id, wanted))
    return set(await session.scalars(query.with_for_update(read=True, key_share=True) if key_share else query))


async def upsert(session: AsyncSession, model: type[m.Base], key: str, **values: object) -> None:
    """Insert the row of `model` whose id is `key` with `values`, or set them on the stored one."""
    row = await session.get(model, key)
    if row is None:
        session.add(model(id=key, **values))
    else:
        for name, value in values.items():
            setattr(row, name, value)
