"""Authentication: a bearer token in the call's metadata becomes a `Principal`, or UNAUTHENTICATED.

Every RPC except health checking and reflection carries `authorization: Bearer maia_<id>.<secret>`.
The row is found by id and the secret's digest compared in constant time; missing, malformed,
unknown, expired and revoked tokens are refused. Verified tokens are cached for `cache_ttl_s`
(a digest comparison instead of a database read per call); a revoke drops the entry at once
(`forget`; a read of its row in flight is not cached): on this controller as it commits, on the
others sharing the database as they hear of it (`ControllerApp`'s TOKENS_REVOKED message, and a
resync, after which this controller may have missed some, drops every entry: `forget_all`).
Expiry is checked on every call (a stream, one call, ends at its token's expiry or revocation:
`AgentHub` for agents, `controller.tokenstreams` for watches and the console's events). While a
controller cannot hear the others (its notification connection down: `hears_revocations`,
`PgChannel.listening`) a revocation on another controller reaches it only through the database, so a
cached verification is trusted for `UNHEARD_CACHE_TTL_S` at most (not `cache_ttl_s`): a token
revoked elsewhere meanwhile is refused within about that bound after the connection is known to be
down. Not bypassed: a read per call while the connection is down (most often with the database in
trouble) would multiply the reads of a busy controller by its calls per token; this bounds them to
one per token per second. Once it listens again it resyncs, forgetting every verification
(`forget_all`), then trusts the cache for `cache_ttl_s` again.

A call that presents the very text a cached entry was verified with is let through on that
entry without parsing the token and digesting its secret again (both were most of the
authenticator's CPU per call: docs/benchmarks.md, issue 8, `deletes`), as long as the entry is
still the cached one: a revoke (`forget`), a re-read after `cache_ttl_s` or a revoked row
replace or drop it, and the text is verified afresh. Expiry is checked on every call either
way. The texts are kept in memory as the calls carry them (at most `CACHE_MAX_ENTRIES`), each
for as long as its entry is cached; they are found by dictionary lookup, which compares a text
only with one of equal (keyed) hash, and by token id when the token is forgotten (revoked, or
found expired: no scan of every text remembered).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from controller import tokens, tokenstreams
from controller.errors import Unauthenticated
from controller.identity import INSECURE, Principal, Role, request_id_from_metadata
from controller.store import tokens as store
from controller.store.db import Database
from controller.store.models import as_utc

AUTHORIZATION_KEY = "authorization"
BOOTSTRAP_HINT = ("start the controller once with --bootstrap-admin-token-file PATH to create an admin token, "
                  "then `maiactl token create` the others")
DEFAULT_CACHE_TTL_S = 30.0
# How long a cached verification is trusted while this controller cannot hear the others' revocations.
UNHEARD_CACHE_TTL_S = 1.0
CACHE_MAX_ENTRIES = 10_000
INVALID = "invalid token"  # what an unknown token and a wrong secret are told alike


@dataclass(frozen=True, slots=True)
class _Verified:
    secret_sha256: str
    principal: Principal
    expires_at: datetime | None
    cached_at: float
    revoked: bool = False


def bearer_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The text after 'Bearer ' of the authorization metadata; None if absent."""
    for key, value in metadata or ():
        if key.lower() == AUTHORIZATION_KEY:
            credential = tokens.bearer_credential(value.decode(errors="replace") if isinstance(value, bytes) else value)
            if credential is None:
                raise Unauthenticated("malformed authorization metadata: expected 'Bearer <token>'")
            return credential
    return None


def principal_of(row_role: str, *, name: str, token_id: str, tenant: str | None, node: str | None,
                 expires_at: datetime | None = None) -> Principal:
    return Principal(name=name, role=Role(row_role), token_id=token_id, tenant=tenant or "", node=node or "",
                     expires_at=expires_at)


class Authenticator:
    """Verifies bearer tokens against the database (with a short cache); or, when `enabled` is
    False (--insecure-no-auth), lets everyone in as an admin. `hears_revocations`: whether this
    controller hears the other controllers' revocations now (while it does not, the cache is
    trusted for `UNHEARD_CACHE_TTL_S` at most)."""

    def __init__(self, db: Database, *, enabled: bool = True, cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
                 clock: Callable[[], float] = time.monotonic,
                 hears_revocations: Callable[[], bool] = lambda: True) -> None:
        self.db = db
        self.enabled = enabled
        self.cache_ttl_s = cache_ttl_s
        self._unheard_ttl_s = min(cache_ttl_s, UNHEARD_CACHE_TTL_S)
        self._hears = hears_revocations
        self._clock = clock
        self._cache: dict[str, _Verified] = {}
        self._by_text: dict[str, _Verified] = {}  # a bearer text -> the cached entry it was verified against
        # A token id -> its text in `_by_text` (a token has one: `maia_<id>.<secret>`, the secret
        # the one its digest was stored for), which `_drop` drops.
        self._text_of: dict[str, str] = {}
        # Reads in flight, one per token: a join storm's thousands of agents share one bootstrap
        # token, and each reading it alone would drain the connection pool (lease renewals included).
        self._loading: dict[str, asyncio.Future[_Verified | None]] = {}

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        metadata = tuple(metadata or ())
        request_id = request_id_from_metadata(metadata)
        if not self.enabled:
            return INSECURE.with_request_id(request_id)
        text = bearer_from_metadata(metadata)
        if text is None:
            raise Unauthenticated("authentication required: send 'authorization: Bearer <token>' metadata "
                                  "(maiactl: --token or MAIA_TOKEN)")
        verified = self._verified_before(text)
        if verified is None:
            presented = tokens.parse(text)
            if presented is None:
                raise Unauthenticated("malformed bearer token: expected maia_<id>.<secret>")
            verified = await self._verified(presented)
            self._remember(text, verified)
        else:
            self._check_unexpired(verified)
        return verified.principal.with_request_id(request_id)

    def _verified_before(self, text: str) -> _Verified | None:
        """The cached entry `text` was verified against, if it is still the cached one and fresh
        (else the text is dropped: it is verified afresh)."""
        entry = self._by_text.get(text)
        if entry is None:
            return None
        if self._cache.get(entry.principal.token_id) is not entry or self._stale(entry):
            self._drop_text(entry.principal.token_id)
            return None
        return entry

    def _remember(self, text: str, entry: _Verified) -> None:
        token_id = entry.principal.token_id
        if self._cache.get(token_id) is not entry:  # not cached (revoked): never remembered
            return
        if len(self._by_text) >= CACHE_MAX_ENTRIES:
            self._by_text.clear()
            self._text_of.clear()
        self._drop_text(token_id)
        self._by_text[text] = entry
        self._text_of[token_id] = text

    def _drop_text(self, token_id: str) -> None:
        text = self._text_of.pop(token_id, None)
        if text is not None:
            del self._by_text[text]

    async def _verified(self, presented: tokens.PresentedToken) -> _Verified:
        entry = self._cache.get(presented.id)
        if entry is None or self._stale(entry):
            entry = await self._load(presented.id)
        # The caller learns "invalid token" either way; the operator's log and audit which one.
        if entry is None:
            raise Unauthenticated(INVALID, why=f"unknown token {presented.id}")
        if not tokens.secret_matches(presented.secret, entry.secret_sha256):
            raise Unauthenticated(INVALID, why=f"wrong secret for token {presented.id}")
        # Only a caller holding the secret learns why its token no longer works.
        if entry.revoked:
            raise tokenstreams.revoked(presented.id)
        self._check_unexpired(entry)
        return entry

    def _stale(self, entry: _Verified) -> bool:
        """Cached too long to be trusted: `cache_ttl_s`, or `UNHEARD_CACHE_TTL_S` while this
        controller cannot hear the others' revocations."""
        return self._clock() - entry.cached_at > (self.cache_ttl_s if self._hears() else self._unheard_ttl_s)

    def _check_unexpired(self, entry: _Verified) -> None:
        if entry.expires_at is not None and entry.expires_at <= datetime.now(timezone.utc):
            self._drop(entry.principal.token_id)
            raise tokenstreams.expired(entry.principal.token_id, entry.expires_at)

    async def _load(self, token_id: str) -> _Verified | None:
        """The token's row, read once for every caller that asks while the read is in flight, and
        cached once read (`_loaded`)."""
        loading = self._loading.get(token_id)
        if loading is None:
            loading = self._loading[token_id] = asyncio.ensure_future(self._read(token_id))
            loading.add_done_callback(lambda done: self._loaded(token_id, done))  # before any caller wakes
        return await asyncio.shield(loading)  # a caller that goes away leaves the read to the others

    def _loaded(self, token_id: str, done: asyncio.Future[_Verified | None]) -> None:
        """A read of the token's row ended: its entry cached, unless it is revoked (every use reads
        the row again) or the token was forgotten while it was read (`forget`: a revoke here
        committed while the row, as it was before, was on its way; the callers waiting for this
        read are answered with it, the next one reads again)."""
        if self._loading.get(token_id) is not done:
            return
        del self._loading[token_id]
        entry = None if done.cancelled() or done.exception() is not None else done.result()
        if entry is not None and not entry.revoked:
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[token_id] = entry

    async def _read(self, token_id: str) -> _Verified | None:
        self._cache.pop(token_id, None)
        async with self.db.unit_of_work() as uow:
            row = await store.get_token(uow.session, token_id)
            if row is None:
                return None
            expires_at = as_utc(row.expires_at)
            return _Verified(
                row.secret_sha256,
                principal_of(row.role, name=row.name, token_id=row.id, tenant=row.tenant_id, node=row.node_id,
                             expires_at=expires_at),
                expires_at, self._clock(), revoked=row.revoked_at is not None,
            )

    def forget(self, token_id: str) -> None:
        """The token was revoked: drop its cached verification and the text it was verified with
        (`_drop`), and leave a read of its row in flight uncached (`_loaded`): its next use reads
        the database."""
        self._loading.pop(token_id, None)
        self._drop(token_id)

    def forget_nodes(self, node_ids: Collection[str]) -> None:
        """The nodes were deleted (by another controller: their credentials were revoked there):
        forget the cached verifications of their credentials, in one pass over the cache, so their
        next use reads the database."""
        node_ids = set(node_ids)
        for token_id in [token_id for token_id, entry in self._cache.items() if entry.principal.node in node_ids]:
            self.forget(token_id)

    def forget_all(self) -> None:
        """Revokes may have been missed (a resync: the other controllers' messages may be lost):
        forget every cached verification and text, and leave every read in flight uncached, so
        each token's next use reads the database."""
        self._loading.clear()
        self._cache.clear()
        self._by_text.clear()
        self._text_of.clear()

    def _drop(self, token_id: str) -> None:
        """Drop a cached verification (revoked, or found expired: a read in flight finds it
        expired as well, and the callers sharing it share it still) and its text."""
        self._cache.pop(token_id, None)
        self._drop_text(token_id)

