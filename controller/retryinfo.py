"""When to call again, on the wire: the standard rich error both sides of the API share.

Every error the controller answers carries a `google.rpc.Status` (its code and message) in the
`grpc-status-details-bin` trailer (what `grpc_status.rpc_status.from_call`, grpc-go's
`status.FromError` and Envoy read): a client tells by it that the controller answered, where a
failure of the connection (or of a gateway's link to the controller) carries none
(`controller_answered`: maiactl words an UNAVAILABLE accordingly). An answer the controller gives
when nothing of the call was written and the same call is expected to succeed later (a deadlock's
victim or a serialization failure: ABORTED; a tenant over its rate or a busy controller:
RESOURCE_EXHAUSTED or UNAVAILABLE) has a `google.rpc.RetryInfo` detail in that Status. Clients
retry a call on that detail alone, never on a status code: an ABORTED without it (a stale
resource_version) is a conflict only a new read resolves, and an answer whose write may have
landed (the database failed mid-call) carries no RetryInfo either (`MaiaError.may_have_landed`).

The server builds the trailer with `error_status` (`api.interceptors.abort_with`); clients read
the pause with `told_retry_s` (`cli.retry`).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

# The standard rich-error trailer: a serialized google.rpc.Status with its details.
STATUS_DETAILS_METADATA_KEY = "grpc-status-details-bin"


def error_status(code: grpc.StatusCode, message: str, retry_after_ms: int | None = None,
                 details: Iterable[Message] = ()) -> bytes:
    """`rich_error` serialized (the trailer's value)."""
    return rich_error(code, message, retry_after_ms, details).SerializeToString()


def rich_error(code: grpc.StatusCode, message: str, retry_after_ms: int | None = None,
               details: Iterable[Message] = ()) -> status_pb2.Status:
    """A google.rpc.Status of `code` and `message`, carrying RetryInfo(retry_delay) when
    `retry_after_ms` is given ("call again as it is after this pause"), then `details`."""
    packed = []
    if retry_after_ms is not None:
        delay = duration_pb2.Duration(seconds=retry_after_ms // 1000, nanos=(retry_after_ms % 1000) * 1_000_000)
        packed.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed.extend(details)
    anys = []
    for detail in packed:
        wrapped = any_pb2.Any()
        wrapped.Pack(detail)
        anys.append(wrapped)
    return status_pb2.Status(code=code.value[0], message=message, details=anys)


def rich_status(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> status_pb2.Status | None:
    """The google.rpc.Status of a failed call's trailer, or None when it carries none (or one that
    cannot be read)."""
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_METADATA_KEY or not isinstance(value, bytes):
            continue
        try:
            return status_pb2.Status.FromString(value)
        except DecodeError:
            return None
    return None


def controller_answered(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether a failed call was answered by the controller (its trailer carries the Status every
    error of the controller's does), not ended by the connection or a gateway's lost link."""
    return rich_status(trailing_metadata) is not None


def told_retry_s(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The pause the RetryInfo of a failed call's trailer asks for (seconds), or None when the
    answer carries none (or one that cannot be read): the call is not to be retried as it is."""
    return status_retry_s(rich_status(trailing_metadata))


def status_retry_s(status: status_pb2.Status | None) -> float | None:
    """The pause a google.rpc.Status's RetryInfo asks for (seconds), or None when it carries none
    (a SubmitDeployments result's error, a failed call's trailer: `told_retry_s`)."""
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return max(0.0, info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None
