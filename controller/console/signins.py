"""The console's refused sign-ins, logged: why, the token's id, the peer; at a bounded rate.

Why a module of its own: the 401 the console sends says only "sign in with a token"; the
operator's line says why (the resolver's `Unauthenticated.why`: unknown token, wrong secret,
revoked, expired, a role that cannot view the console, malformed). The secret is never logged,
nor a malformed credential's text (it may be a secret mistyped).

A flood (a token-guessing run, a script with a stale token) must not flood the log: a sampler
(`ratelimit.Sampler`, as for gRPC's refused calls) lets `burst` lines through and then
`per_minute`; the refusals left out are counted into the next line written (`suppressed=N`).
A request without any credential (what the page sends before it has a token) is not logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from controller import limits, tokens
from controller.ratelimit import Sampler

log = logging.getLogger("maia.console")

MALFORMED = "malformed bearer token: expected maia_<id>.<secret>"


class RefusedSignIns:
    """Logs the console's refused credentials at warning level, at most at the sampler's rate."""

    def __init__(self, *, per_minute: float = limits.UNAUTHENTICATED_LINES_PER_MINUTE,
                 burst: float = limits.UNAUTHENTICATED_LINES_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lines = Sampler(per_minute, burst, clock)

    @property
    def suppressed(self) -> int:
        """Refusals since the last line that got none of their own."""
        return self._lines.left_out

    def refused(self, credential: str | None, why: str, *, path: str, peer: str) -> None:
        """A request to `path` from `peer` was refused with `credential` (None: an Authorization
        header that is not `Bearer <token>`) for `why`."""
        left_out = self._lines.sample()
        if left_out is None:
            return
        presented = tokens.parse(credential) if credential else None
        log.warning("console sign-in refused path=%s code=401 reason=%s token=%s peer=%s%s", path, why,
                    presented.id if presented is not None else "-", peer,
                    f" suppressed={left_out}" if left_out else "")
