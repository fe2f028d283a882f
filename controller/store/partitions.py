"""A big read handed to the event loop a partition at a time.

`AsyncSession.execute` buffers the whole result and its rows are decoded (JSON, enums, datetimes)
in one piece on the event loop: for the 10,000 deployments' reasons or the 4,096 nodes a metrics
scrape reads, 20-90 ms during which nothing else runs (issue 8). `partitions` streams the result
(a server-side cursor) `PARTITION` rows at a time: each fetch is a turn of the loop of its own,
and the caller's work on a partition runs between them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import Row, Select
from sqlalchemy.ext.asyncio import AsyncSession

PARTITION = 256  # rows fetched and decoded in one turn of the event loop


async def partitions(session: AsyncSession, statement: Select[Any]) -> AsyncIterator[Sequence[Row[Any]]]:
    """The statement's rows, `PARTITION` at a time (streamed: on PostgreSQL each partition is a
    round trip; on SQLite a hop to the driver's thread)."""
    result = await session.stream(statement)
    try:
        async for part in result.partitions(PARTITION):
            yield part
    finally:
        await result.close()
