"""Pages of a list: every list RPC returns at most `page_size` items and a token for the rest.

Keyset paging: a page token is the sort key of the last item returned (opaque to callers,
base64 of JSON), and the next page starts strictly after it, so items added or removed between
pages never shift the others. A token also carries a fingerprint of the list and filters it was
returned for (its scope), and any other list or filter refuses it, as AIP-158 asks: a token of
one tenant's deployments given to a list of another's, or of nodes to tokens, used to be read as
a place to start and silently skipped rows. `page_size` 0 means `limits.PAGE_SIZE_DEFAULT`; a
larger size than `limits.PAGE_SIZE_MAX` is served as that maximum (as Google's AIP-158 says).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
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


def scope_of(list_name: str, **filters: object) -> str:
    """The scope of a list and its filters, e.g. `scope_of("nodes", rack="r1")`."""
    return " ".join([list_name, *(f"{k}={v!r}" for k, v in sorted(filters.items()))])


def _fingerprint(scope: str) -> str:
    return hashlib.blake2s(scope.encode(), digest_size=6).hexdigest()


def encode_token(key: Key, scope: str = "") -> str:
    """The token of a page ending at `key` of the list `scope` names."""
    parts = [*key, _fingerprint(scope)]
    return base64.urlsafe_b64encode(json.dumps(parts, separators=(",", ":")).encode()).decode()


# What a key's parts may be: a printable text, or an integer a BIGINT column holds (a forged
# token's 2**63 reached the database driver: OverflowError, INTERNAL; its NUL or lone surrogate,
# PostgreSQL's encoding: INTERNAL, a traceback logged for every such call of any token).
KeyKind = type[str] | type[int]
_BIGINT = range(-(2**63), 2**63)


def decode_token(token: str, kinds: tuple[KeyKind, ...], scope: str = "") -> Key:
    """The key a token of the list `scope` names, whose keys are of `kinds` (e.g. `(str, int)`: a
    name, a row id), carries, or InvalidArgument for anything else (another list's token too)."""
    if len(token) > limits.PAGE_TOKEN_MAX:
        raise InvalidArgument(f"page_token is {len(token)} characters long; at most {limits.PAGE_TOKEN_MAX}")
    try:
        key = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        key = None
    if isinstance(key, list) and len(key) == len(kinds):  # a controller's before fingerprints (a rolling
        key = [*key, _fingerprint(scope)]  # upgrade: a client's pages served by both); to go in the next release
    if (not isinstance(key, list) or len(key) != len(kinds) + 1
            or not all(type(k) is kind and (k.isprintable() if kind is str else k in _BIGINT)
                       for k, kind in zip(key, kinds))):
        raise InvalidArgument("page_token is not a token this list returned; start again without one")
    if key[-1] != _fingerprint(scope):
        raise InvalidArgument("page_token was returned for another list or other filters; "
                              "ask with the same filters, or start again without one")
    return tuple(key[:-1])


def bounds(page: PageRequest, scope: str, kinds: tuple[KeyKind, ...] = (str,)) -> PageBounds:
    """The page a request of the list `scope` (`scope_of`) asks for, its token read as a key of
    `kinds` (the list's sort key)."""
    if page.size < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {page.size}")
    size = min(page.size or limits.PAGE_SIZE_DEFAULT, limits.PAGE_SIZE_MAX)
    return PageBounds(size, decode_token(page.token, kinds, scope) if page.token else None, scope)


def page_of(rows: Sequence[T], page: PageBounds, key: Callable[[T], Key]) -> Page[T]:
    """`rows` as fetched with `limit + 1`: the extra row only says another page exists."""
    items = tuple(rows[:page.limit])
    more = len(rows) > page.limit
    return Page(items, encode_token(key(items[-1]), page.scope) if more and items else "")
