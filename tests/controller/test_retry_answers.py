"""Which answers tell a client to call again as it is (google.rpc.RetryInfo, `controller.retryinfo`):
those that wrote nothing and may succeed later; never a conflict only a new read resolves, nor an
answer whose write may have landed (that one says when, `retry-after-ms`, to read before writing).
Every answer carries the standard google.rpc.Status all the same: a client tells by it that the
controller answered (maiactl's UNAVAILABLE is "cannot reach the controller" only without it)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from sqlalchemy.exc import OperationalError

from controller import errors
from controller.api.interceptors import ErrorInterceptor, _database_unavailable, _transaction_aborted, abort_with
from controller.ratelimit import RETRY_AFTER_METADATA_KEY, rate_limited
from controller.retryinfo import rich_status, told_retry_s
from controller.store.lease import CommitOutcomeUnknown, LeaseLost


class _Aborted(Exception):
    pass


class _Context:
    """What `abort_with` ends a call with (grpc.aio's context raises out of abort too)."""

    code: grpc.StatusCode
    details: str
    trailing: tuple[tuple[str, Any], ...]

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple = ()) -> None:
        self.code, self.details, self.trailing = code, details, tuple(trailing_metadata)
        raise _Aborted(details)


ANSWERS = [
    ("deadlock victim", lambda: _transaction_aborted("/m", "a deadlock with a concurrent transaction", RuntimeError()),
     grpc.StatusCode.ABORTED, "100", 0.1),
    ("stale resource version", lambda: errors.Conflict("deployment svc changed since resource version 2"),
     grpc.StatusCode.ABORTED, None, None),
    ("over the tenant's rate", lambda: rate_limited("tenant lab exceeded 2 submits a minute", 29.5),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "29500", 29.5),
    ("lease lost, nothing written", lambda: LeaseLost("a", 3), grpc.StatusCode.UNAVAILABLE, "1000", 1.0),
    ("commit outcome unknown", lambda: CommitOutcomeUnknown("a", ConnectionResetError()),
     grpc.StatusCode.UNAVAILABLE, "1000", None),
    ("database failed mid-call", lambda: _database_unavailable("/m", OperationalError("SELECT", {}, Exception())),
     grpc.StatusCode.UNAVAILABLE, "1000", None),
]


@pytest.mark.parametrize(("make", "code", "retry_after", "retry_info_s"), [a[1:] for a in ANSWERS],
                         ids=[a[0] for a in ANSWERS])
async def test_retry_info_only_on_answers_that_wrote_nothing(make, code, retry_after, retry_info_s) -> None:
    context = _Context()
    with pytest.raises(_Aborted):
        await abort_with(context, make())  # type: ignore[arg-type]
    assert context.code == code
    assert dict(context.trailing).get(RETRY_AFTER_METADATA_KEY) == retry_after
    assert told_retry_s(context.trailing) == (pytest.approx(retry_info_s) if retry_info_s is not None else None)
    status = rich_status(context.trailing)  # the controller answered, whether to retry or not
    assert status is not None and (status.code, status.message) == (code.value[0], context.details)


async def test_an_unexpected_error_carries_the_status_too() -> None:
    context = _Context()
    with pytest.raises(_Aborted):
        await ErrorInterceptor()._translated("/m", context, RuntimeError("a bug"))  # type: ignore[arg-type]
    status = rich_status(context.trailing)
    assert context.code == grpc.StatusCode.INTERNAL
    assert status is not None and (status.code, status.message, len(status.details)) == (
        grpc.StatusCode.INTERNAL.value[0], context.details, 0)
