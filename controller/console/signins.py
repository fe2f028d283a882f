"""The console's refused sign-ins, logged: why, the token's id, the peer; at a bounded rate.

Why a module of its own: the console's token resolver answers a principal or None (a node's
token, or any refused one, is simply not a viewer), so the reason a credential was refused is
not known where the 401 is sent. It is worked out here, for the lines that are written only:
a malformed credential needs nothing more; any other is told by its stored row (unknown, wrong
secret, revoked, expired, a role that cannot view the console), one primary-key read. The
secret is never logged, nor a malformed credential's text (it may be a secret mistyped).

A flood (a token-guessing run, a script with a stale token) must not flood the log: a token
bucket, as for the gRPC API's refused calls' audit entries (`api.auditing.AuditSampler`), lets
`burst` lines through and then `per_minute`; the refusals left out are counted into the next
line written (`suppressed=N`), and the bucket also bounds the row reads made for the log.
A request without any credential (what the page sends before it has a token) is not logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

from controller import tokens, tokenstreams
from controller.identity import Role
from controller.ratelimit import TokenBucket
from controller.store import models
from controller.store import tokens as store
from controller.store.db import Database

log = logging.getLogger("maia.console")

# Lines a minute, after a burst: a bucket of 10 refilled at 10 a minute (as gRPC's refusals' audit).
REFUSED_LINES_PER_MINUTE = 10.0
REFUSED_LINES_BURST = 10.0
MALFORMED = "malformed bearer token: expected maia_<id>.<secret>"
VIEWER_ROLES = (Role.ADMIN, Role.TENANT)


class RefusedSignIns:
    """Logs the console's refused credentials at warning level, at most at the bucket's rate."""

    def __init__(self, db: Database, *, per_minute: float = REFUSED_LINES_PER_MINUTE,
                 burst: float = REFUSED_LINES_BURST, clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._bucket = TokenBucket(per_minute / 60.0, burst)
        self._clock = clock
        self.suppressed = 0  # refusals since the last line that got none of their own

    async def refused(self, credential: str | None, *, path: str, peer: str) -> None:
        """A request to `path` from `peer` was refused with `credential` (None: an Authorization
        header that is not `Bearer <token>`)."""
        if self._bucket.take(self._clock()):
            self.suppressed += 1
            return
        suppressed, self.suppressed = self.suppressed, 0
        presented = tokens.parse(credential) if credential is not None else None
        reason = MALFORMED if presented is None else await self._why(presented)
        log.warning("console sign-in refused path=%s code=401 reason=%s token=%s peer=%s%s", path, reason,
                    presented.id if presented is not None else "-", peer,
                    f" suppressed={suppressed}" if suppressed else "")

    async def _why(self, presented: tokens.PresentedToken) -> str:
        """Why a well-formed token was refused, from its row."""
        try:
            async with self._db.unit_of_work() as uow:
                row = await store.get_token(uow.session, presented.id)
                return _why(presented, row)
        except Exception as exc:  # the refusal is logged anyway
            return f"refused (its row could not be read: {type(exc).__name__})"


def _why(presented: tokens.PresentedToken, row: models.ApiToken | None) -> str:
    """Why the authenticator refused `presented`, its row as read (`Authenticator._verified`'s order)."""
    if row is None:
        return "unknown token"
    if not tokens.secret_matches(presented.secret, row.secret_sha256):
        return "wrong secret"
    if row.revoked_at is not None:
        return tokenstreams.revoked(presented.id).message
    expires_at = store.aware(row.expires_at)
    if expires_at is not None and expires_at <= datetime.now(timezone.utc):
        return tokenstreams.expired(presented.id, expires_at).message
    if Role(row.role) not in VIEWER_ROLES:
        return f"a {row.role} token cannot view the console (admin and tenant tokens can)"
    return "refused"
