"""Pages of a list: every list RPC returns at most `page_size` items and a token for the rest.

Keyset paging: a page token is the sort key of the last item returned (opaque to callers,
base64 of JSON), and the next page starts strictly after it, so items added or removed between
pages never shift the others. `page_size` 0 means `limits.PAGE_SIZE_DEFAULT`; a larger size
than `limits.PAGE_SIZE_MAX` is served as that maximum (as Google's AIP-158 says).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from controller import limits
from controller.domain.paging import Key, PageBounds
from controller.errors import InvalidArgument

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True, slots=True)
class PageRequest:
    size: int = 0
    token: str = ""


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_token: str = ""

    def map(self, fn: Callable[[T], U]) -> Page[U]:
        return Page(tuple(fn(item) for item in self.items), self.next_token)


def encode_token(key: Key) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key), separators=(",", ":")).encode()).decode()


# What a key's parts may be: a printable text, or an integer a BIGINT column holds (a forged
# token's 2**63 reached the database driver: OverflowError, INTERNAL; its NUL or lone surrogate,
# PostgreSQL's encoding: INTERNAL, a traceback logged for every such call of any token).
KeyKind = type[str] | type[int]
_BIGINT = range(-(2**63), 2**63)


def decode_token(token: str, kinds: tuple[KeyKind, ...]) -> Key:
    """The key a token of a list whose keys are of `kinds` (e.g. `(str, int)`: a name, a row id)
    carries, or InvalidArgument for anything else."""
    if len(token) > limits.PAGE_TOKEN_MAX:
        raise InvalidArgument(f"page_token is {len(token)} characters long; at most {limits.PAGE_TOKEN_MAX}")
    try:
        key = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        key = None
    if (not isinstance(key, list) or len(key) != len(kinds)
            or not all(type(k) is kind and (k.isprintable() if kind is str else k in _BIGINT)
                       for k, kind in zip(key, kinds))):
        raise InvalidArgument("page_token is not a token this list returned; start again without one")
    return tuple(key)


def bounds(page: PageRequest, kinds: tuple[KeyKind, ...] = (str,)) -> PageBounds:
    """The page a request asks for, its token read as a key of `kinds` (the list's sort key)."""
    if page.size < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {page.size}")
    size = min(page.size or limits.PAGE_SIZE_DEFAULT, limits.PAGE_SIZE_MAX)
    return PageBounds(size, decode_token(page.token, kinds) if page.token else None)


def page_of(rows: Sequence[T], page: PageBounds, key: Callable[[T], Key]) -> Page[T]:
    """`rows` as fetched with `limit + 1`: the extra row only says another page exists."""
    items = tuple(rows[:page.limit])
    more = len(rows) > page.limit
    return Page(items, encode_token(key(items[-1])) if more and items else "")
