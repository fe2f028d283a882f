"""What a repository is asked for when it reads one page of a list (keyset paging).

The use cases turn a caller's page request into these bounds (`usecases/paging.py`, which owns
the page size rules and the opaque token); the store only applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

Key = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class PageBounds:
    """At most `limit` rows after `after` (None: from the start). `scope` names the list and its
    filters (`usecases/paging.py` binds the page token to it; the store ignores it)."""

    limit: int
    after: Key | None
    scope: str = ""
