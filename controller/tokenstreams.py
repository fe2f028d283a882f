"""The streams open on this controller, by the token each was opened with: each ends when its token
is revoked or expires.

Why a module of its own: a token is checked as a call starts, and a stream is one call, so a stream
outlived its token's revocation or expiry (a tenant's deployment watch, and the console's event
stream, went on delivering placements and reasons minutes after `maiactl token revoke`, while every
new call was refused). The deployment watches (`usecases/watch.py`) and the console's event stream
(`console/server.py`) hold themselves here while they are open (`TokenStreams.hold`):
- a revocation ends every stream its token opened (`TokenStreams.revoke`): on the controller that
  revoked it as it commits (`AppSignals.tokens_revoked`), on the others sharing the database as they
  hear it (`PeerMessages.revoked_elsewhere`); a controller that may have missed the message resyncs,
  which ends every watch anyway (its clients watch again, authenticated afresh);
- a stream opened with an expiring token ends at the expiry, never before (`ExpiryTimer`, the timer
  the agent hub ends its Connect streams by too).
The agent hub keeps its Connect streams by node, not here (`AgentHub.revoke_credentials`): a stream
whose node was deleted ends as a deletion, which takes a read to tell from a revocation.

Cost: a set entry per stream and a timer per stream opened with an expiring token, made as it
opens and dropped as it ends; a revocation touches only the streams of the tokens it names; per
event, a stream tests one attribute (`StreamHold.check`) and reads nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from controller import limits
from controller.errors import ResourceExhausted, Unauthenticated
from controller.identity import Principal

# Revoked token ids remembered (`TokenStreams.hold`): far more than are revoked within the moment
# between a call's authentication and its stream's hold; 10,000 ids are ~1 MB.
REVOKED_REMEMBERED = 10_000


class ExpiryTimer:
    """Calls `expired` once the wall clock reaches `expires_at` (at once, from the constructor, if it
    has): a timer on the running event loop, stopped by `cancel`. Never before the expiry: the loop's
    clock and the wall clock may drift apart, so it reads the wall clock when it fires and waits
    again if it came early."""

    __slots__ = ("_expires_at", "_expired", "_handle", "_cancelled")

    def __init__(self, expires_at: datetime, expired: Callable[[], None]) -> None:
        self._expires_at = expires_at
        self._expired = expired
        self._handle: asyncio.TimerHandle | None = None
        self._cancelled = False
        self._arm()

    def _arm(self) -> None:
        left_s = (self._expires_at - datetime.now(timezone.utc)).total_seconds()
        if left_s > 0:
            self._handle = asyncio.get_running_loop().call_later(left_s, self._arm)
            return
        self._handle = None
        self._expired()

    def cancel(self) -> None:
        self._cancelled = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def cancelled(self) -> bool:
        return self._cancelled


def revoked(token_id: str) -> Unauthenticated:
    """Why a stream opened with a revoked token ended: what a new call with it is told (`authn`)."""
    return Unauthenticated(f"token {token_id} was revoked")


def expired(token_id: str, expires_at: datetime) -> Unauthenticated:
    """Why a stream opened with an expired token ended: what a new call with it is told (`authn`)."""
    return Unauthenticated(f"token {token_id} expired at {expires_at.isoformat(timespec='seconds')}")


class StreamHold:
    """One open stream's place in `TokenStreams`: `error` says why it must end (None while it may
    go on), and `wake` was called once when it was set, so that the stream looks at it wherever it
    waits."""

    __slots__ = ("error", "_wake", "_timer")

    def __init__(self, wake: Callable[[], None]) -> None:
        self.error: Unauthenticated | None = None
        self._wake = wake
        self._timer: ExpiryTimer | None = None

    def check(self) -> None:
        """Raise why the stream must end (its token revoked or expired), if it must: before the
        stream sends anything."""
        if self.error is not None:
            raise self.error

    def end(self, error: Unauthenticated) -> None:
        if self.error is None:
            self.error = error
            self._stop_timer()
            self._wake()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class TokenStreams:
    """The streams open here, by the id of the token each was opened with; at most `per_token`
    each (a tenant's token opened 3,000 watches: every deployment event is put on each one's
    queue, and the other tenants' updates took six times as long)."""

    def __init__(self, per_token: int = limits.STREAMS_PER_TOKEN) -> None:
        self._per_token = per_token
        self._by_token: dict[str, set[StreamHold]] = {}
        # The tokens revoked lately (oldest first, at most `REVOKED_REMEMBERED`): a stream whose call
        # was authenticated just before its token was revoked, and held only after (the awaits
        # between the interceptor and the handler's first step), ends as it is held.
        self._revoked: dict[str, None] = {}

    def admit(self, who: Principal | None) -> None:
        """Raise RESOURCE_EXHAUSTED when `who`'s token holds the most streams it may (`hold` asks)."""
        token_id = who.token_id if who is not None else ""
        if token_id and len(self._by_token.get(token_id, ())) >= self._per_token:
            raise ResourceExhausted(f"token {token_id} holds {self._per_token} open streams (watches and console "
                                    f"event streams) on this controller, the most a token may: close one first")

    @contextmanager
    def hold(self, who: Principal | None, wake: Callable[[], None]) -> Iterator[StreamHold]:
        """Hold a stream `who` opened while the block runs. When its token is revoked (`revoke`) or
        expires, the hold's `error` says so (UNAUTHENTICATED, with the words a new call would be
        told) and `wake` is called, once, on the event loop. A caller of no token (None: the console
        without authentication; `--insecure-no-auth`; the controller itself) is never ended so.
        Refused RESOURCE_EXHAUSTED when the token holds the most streams it may (`admit`)."""
        self.admit(who)
        held = StreamHold(wake)
        token_id = who.token_id if who is not None else ""
        if token_id in self._revoked:
            held.end(revoked(token_id))
        elif token_id:
            self._by_token.setdefault(token_id, set()).add(held)
            if who is not None and who.expires_at is not None:
                expires_at = who.expires_at
                held._timer = ExpiryTimer(expires_at, lambda: held.end(expired(token_id, expires_at)))
        try:
            yield held
        finally:
            held._stop_timer()
            if token_id:
                holds = self._by_token.get(token_id)
                if holds is not None:
                    holds.discard(held)
                    if not holds:
                        del self._by_token[token_id]

    def revoke(self, token_ids: Iterable[str]) -> int:
        """End the streams opened with these tokens (revoked), each told `token X was revoked`;
        how many there were."""
        ended = 0
        for token_id in token_ids:
            self._revoked.pop(token_id, None)
            self._revoked[token_id] = None
            if len(self._revoked) > REVOKED_REMEMBERED:
                del self._revoked[next(iter(self._revoked))]
            for held in self._by_token.pop(token_id, ()):
                held.end(revoked(token_id))
                ended += 1
        return ended

    def revoked_lately(self, token_id: str) -> bool:
        """Whether `token_id` is among the tokens revoked lately (the last `REVOKED_REMEMBERED`):
        what a stream held by another registry (the agent hub's) asks as it opens."""
        return token_id in self._revoked

    def held(self) -> int:
        """How many streams are held (not `__len__`: an empty registry must not be falsy)."""
        return sum(map(len, self._by_token.values()))

    def held_by(self, token_id: str) -> int:
        """How many streams opened with this token are held."""
        return len(self._by_token.get(token_id, ()))
