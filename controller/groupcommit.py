"""Group commit: callers' items written together, one transaction per batch.

Every write transaction takes the database's single writer (SQLite's lock; PostgreSQL's cluster
generation and audit chain head rows) from its first write to its commit, so one transaction
per call caps a burst of like calls (a join storm's Registers and hellos) at the writer's turn
time. A `GroupCommit` queues the items its callers hand it; one writer task at a time takes
everything queued (what arrived while the previous batch was committing: no timer, so an item
alone is written at once), up to `batch_max`, and hands the batch to `commit`, which returns
one outcome per item, in its place:
- a value: the caller's answer;
- an exception: raised in that caller alone (the item was judged and refused; the others stand);
- `ALONE` (None): the batch could not decide this item (it conflicts with another member, say);
  the caller decides it on its own, as if the batch had not existed.
If `commit` raises, nothing of the batch was written (one transaction) and every member goes
alone, so one bad item never fails the others; unless `shared_failure` says the exception is one
every member would meet alone too (the database or the lease failed): then each caller gets it,
rather than a batch's worth of lone transactions piling onto whatever failed. Items with the same `key` never share a batch:
the later one waits for the next (its outcome may depend on the earlier one's, as if they had
come one after the other). A caller that went away (cancelled) before its batch was formed is
left out. The writer runs in a context of its own: it is nobody's call.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger("maia.groupcommit")

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

ALONE = None  # the outcome of an item the batch could not decide: its caller goes alone


@dataclass
class GroupStats:
    batches: int = 0
    items: int = 0
    alone: int = 0    # handed back to their callers (a conflict, or a batch that failed)
    largest: int = 0


class GroupCommit(Generic[Item, Outcome]):
    """Items committed in batches (see the module docstring)."""

    def __init__(self, name: str, commit: Callable[[list[Item]], Awaitable[Sequence[Outcome | BaseException | None]]],
                 *, batch_max: int, key: Callable[[Item], Hashable] | None = None,
                 shared_failure: Callable[[Exception], bool] = lambda exc: False) -> None:
        if batch_max < 1:
            raise ValueError(f"{name}: batch_max must be >= 1")
        self.name = name
        self._commit = commit
        self._batch_max = batch_max
        self._key = key
        self._shared_failure = shared_failure
        self._pending: list[tuple[Item, asyncio.Future[Outcome | None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.stats = GroupStats()

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def submit(self, item: Item) -> Outcome | None:
        """The item's outcome once its batch committed; raises what refused it; `ALONE` (None)
        when the batch could not decide it."""
        future: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name=self.name, context=contextvars.Context())
        return await future

    def _take(self) -> list[tuple[Item, asyncio.Future[Outcome | None]]]:
        """The next batch: the pending items in order, up to `batch_max`, one per key."""
        batch: list[tuple[Item, asyncio.Future[Outcome | None]]] = []
        keys: set[Hashable] = set()
        rest = []
        for item, future in self._pending:
            if future.done():  # its caller went away
                continue
            key = self._key(item) if self._key is not None else None
            if len(batch) >= self._batch_max or (key is not None and key in keys):
                rest.append((item, future))
                continue
            if key is not None:
                keys.add(key)
            batch.append((item, future))
        self._pending = rest
        return batch

    async def _write(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Outcome | None]]] = []
        try:
            while self._pending:
                batch = self._take()
                if not batch:
                    continue
                try:
                    outcomes = await self._commit([item for item, _ in batch])
                except Exception as exc:  # nothing written: each member is decided alone, or fails with it
                    shared = self._shared_failure(exc)
                    log.warning("%s: a batch of %d did not commit (%s: %s); %s", self.name, len(batch),
                                type(exc).__name__, exc, "each fails with it" if shared else "each goes alone")
                    outcomes = [exc if shared else ALONE] * len(batch)
                self.stats.batches += 1
                self.stats.items += len(batch)
                self.stats.largest = max(self.stats.largest, len(batch))
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if outcome is ALONE:
                        self.stats.alone += 1
                    if future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        except BaseException:  # cancelled (the controller stops): so are the callers waiting
            for _, future in [*batch, *self._pending]:
                future.cancel()
            self._pending = []
            raise
