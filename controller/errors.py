"""The controller's one error hierarchy.

Use cases raise these with a message that says exactly what is wrong ("rack rack-07 is not in
the topology; apply it first"); `controller.api.interceptors.status` is the only place that
turns them into gRPC status codes. Nothing else in the controller knows about status codes, so a
use case can be called from a test, a CLI or another transport and still say "no" the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReasonDetail:
    """A structured "why not" attached to an error (code of the placement spec, message, scope)."""

    code: str
    message: str
    scope: str = ""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """Which field of the request an INVALID_ARGUMENT is about (its path in the request message,
    `spec.replicas`), and what is wrong with it: a google.rpc.BadRequest field violation."""

    field: str
    description: str


class MaiaError(Exception):
    """Base of every expected failure; `message` is shown to the caller verbatim."""

    def __init__(self, message: str, *, reasons: tuple[ReasonDetail, ...] = (),
                 metadata: tuple[tuple[str, str], ...] = (), retry_after_ms: int | None = None,
                 may_have_landed: bool = False, violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.reasons = reasons
        self.violations = violations  # the request's fields it is about (none: not said)
        self.metadata = metadata  # extra trailing metadata for the caller (e.g. retry-after-ms)
        # When a retry may succeed: `retry-after-ms` on the wire, and google.rpc.RetryInfo ("call
        # again as it is", what clients retry on, `controller.retryinfo`) unless `may_have_landed`:
        # the call's writes may have been committed, so it is to be read before it is sent again.
        self.retry_after_ms = retry_after_ms
        self.may_have_landed = may_have_landed


class InvalidArgument(MaiaError):
    """The request itself is wrong, whatever the cluster's state."""


class NotFound(MaiaError):
    """The request names something that does not exist."""


class AlreadyExists(MaiaError):
    """The request creates something that exists already."""


class FailedPrecondition(MaiaError):
    """The request is well formed but the system is not in a state that allows it."""


class Conflict(MaiaError):
    """Someone else changed what the request relied on; retrying may succeed."""


class OutOfRange(MaiaError):
    """The request reads past what is kept (events after an id retention has deleted past)."""


class ResourceExhausted(MaiaError):
    """A quota or capacity limit refuses the request."""


class Unavailable(MaiaError):
    """The controller cannot serve the request right now (shutting down, not ready)."""


class Unauthenticated(MaiaError):
    """The caller did not prove who it is (no, malformed, unknown, expired or revoked token).

    `why` is for the operator's log and audit only, finer than `message` where the caller must not
    learn more ("invalid token" for an unknown token and a wrong secret alike; `why` tells them
    apart); the message when not given."""

    def __init__(self, message: str, *, why: str = "") -> None:
        super().__init__(message)
        self.why = why or message


class PermissionDenied(MaiaError):
    """The caller is known but its role may not do this."""
