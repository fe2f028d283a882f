"""The connection to the controller and the translation of gRPC failures into CLI errors.

Commands get a `Controller` with lazily created stubs; a unary call the controller answers
"nothing written, call again after this pause" is made again on the channel (`cli.retry`), so a
command meets only the answers it is to act on; any `grpc.RpcError` that escapes a command is
printed by `main` as `error: <CODE>: <details>` (exit code `exit_code_of`), never as a traceback.
A call whose deadline passed before any connection was made (a host that accepts TCP but answers
nothing) fails `Unreached`: "cannot reach the controller", exit 5, as a refused connection. Programs using the
API from asyncio get the same channel, retries included, from `open_aio_channel`.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
import queue
import socket
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc import aio

from controller import limits
from controller.bearer import aio_interceptors
from controller.cli.config import Connection
from controller.cli.retry import AioRetryTold, CallDetails, RetryTold
from controller.pipes import BROKEN_PIPE_EXIT
from controller.retryinfo import STATUS_DETAILS_METADATA_KEY, controller_answered, told_retry_s
from maia.v1 import admin_pb2_grpc, audit_pb2_grpc, deployments_pb2_grpc

M = TypeVar("M", bound=Any)


class Exit(IntEnum):
    """maiactl's exit codes: stable, documented in docs/cli.md; scripts may rely on them."""

    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_FOUND = 3
    PARTIAL = 4
    UNAVAILABLE = 5
    INTERRUPTED = 130
    BROKEN_PIPE = BROKEN_PIPE_EXIT


EXIT_MEANING: dict[Exit, str] = {
    Exit.OK: "success",
    Exit.FAILED: "the controller refused or failed a call, a conflict stopped apply, or a wait timed out",
    Exit.USAGE: "bad usage or input: flags, manifests, problem files, config file, INVALID_ARGUMENT",
    Exit.NOT_FOUND: "an object named does not exist (NOT_FOUND)",
    Exit.PARTIAL: "a dry run would place only part of a deployment; `wait` gave up on a deployment "
                  "blocked for good",
    Exit.UNAVAILABLE: "the controller could not be reached (refused, or no connection within the call's "
                      "timeout), or answered that it cannot serve the call now",
    Exit.INTERRUPTED: "interrupted (Ctrl-C)",
    Exit.BROKEN_PIPE: "whoever read stdout stopped early (`head -1` reading a pipe); ends without a word, as a "
                      "command killed by SIGPIPE does (128 + 13)",
}


# The metadata of a dry run of a write (controller/api/dryrun.py), said back by the controller.
DRY_RUN_METADATA = (("maia-dry-run", "all"),)


def dry_run_said_back(call: Any) -> bool:
    """Whether the answer of a write asked with `DRY_RUN_METADATA` says it back: a controller older
    than dry runs by metadata ignores the key and writes."""
    return set(DRY_RUN_METADATA) <= {tuple(m) for m in call.trailing_metadata() or ()}


_EXIT_OF_STATUS = {grpc.StatusCode.NOT_FOUND: Exit.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT: Exit.USAGE,
                   grpc.StatusCode.UNAVAILABLE: Exit.UNAVAILABLE}


def exit_code_of(error: grpc.RpcError) -> Exit:
    return _EXIT_OF_STATUS.get(status_code(error), Exit.FAILED)  # type: ignore[arg-type]


class CliError(Exception):
    """An error already phrased for the user, with the exit code it ends maiactl with."""

    def __init__(self, message: str, exit_code: int = Exit.FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._pair = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return CallDetails(details.method, details.timeout, [*(details.metadata or ()), self._pair],
                           details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), request)


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{what} {path}: cannot read: {exc.strerror or exc}", Exit.USAGE) from None


def channel_target(address: str) -> str:
    """The gRPC target of `--controller`: one HOST:PORT as is; several (comma-separated, one per
    controller) as one `ipv4:`/`ipv6:` target of their resolved addresses, so the channel uses
    whichever answers and moves on when it goes away (any controller serves the API)."""
    addresses = [a.strip() for a in address.split(",") if a.strip()]
    if len(addresses) <= 1:
        return address.strip()
    resolved: dict[str, list[str]] = {"ipv4": [], "ipv6": []}
    for one in addresses:
        host, _, port = one.rpartition(":")
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)[0]
        except (OSError, ValueError, IndexError) as exc:
            raise CliError(f"--controller {one}: cannot resolve it ({exc})", Exit.USAGE) from None
        if family == socket.AF_INET6:
            resolved["ipv6"].append(f"[{sockaddr[0]}]:{sockaddr[1]}")
        else:
            resolved["ipv4"].append(f"{sockaddr[0]}:{sockaddr[1]}")
    families = [family for family, found in resolved.items() if found]
    if len(families) > 1:
        raise CliError(f"--controller {address}: give controllers of one address family (IPv4 or IPv6)", Exit.USAGE)
    return f"{families[0]}:{','.join(resolved[families[0]])}"


@dataclass(frozen=True, slots=True)
class _Target:
    """Where and how a channel to the controller connects (both channel kinds read it)."""

    target: str
    options: tuple[tuple[str, Any], ...]
    credentials: grpc.ChannelCredentials | None  # TLS; None: plaintext


def _target_of(connection: Connection) -> _Target:
    """The message limits; a reconnect back-off of at most 2 s, so a controller back from a
    restart or an outage is reached within seconds, however long it was away; keepalive pings, so
    a connection that died silently (no FIN, no RST) is given up and made again (`limits`)."""
    target = channel_target(connection.address)
    options: tuple[tuple[str, Any], ...] = (*limits.GRPC_CLIENT_OPTIONS, *limits.GRPC_CLI_RECONNECT_OPTIONS,
                                            *limits.CLIENT_KEEPALIVE.client_options())
    credentials = None
    if connection.ca or connection.cert or connection.key:
        ca, key, cert = _tls_files(connection)
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return _Target(target, options, credentials)


def _tls_files(connection: Connection) -> tuple[bytes | None, bytes | None, bytes | None]:
    """The CA bundle, client key and certificate, read and checked before gRPC gets them: it takes
    any bytes and fails only at the handshake, with its C core's log lines on stderr and an
    UNAVAILABLE that reads as a controller not there (exit 5). Here: one line naming the file,
    exit 2. Each certificate file must hold a PEM certificate, the key a PEM private key that
    is the certificate's (OpenSSL, through `ssl`, reads them as gRPC will)."""
    import ssl  # here: only TLS needs it

    ca, key, cert = (_read(connection.ca, "CA file"), _read(connection.key, "key file"),
                     _read(connection.cert, "certificate file"))
    if bool(cert) != bool(key):
        raise CliError("mutual TLS needs both a client certificate (--cert) and its key (--key)", Exit.USAGE)
    for path, pem, what in ((connection.ca, ca, "CA file"), (connection.cert, cert, "certificate file")):
        if pem is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("utf-8", "replace"))
            except (ssl.SSLError, ValueError):
                raise CliError(f"{what} {path}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                               Exit.USAGE) from None
    if key is not None and b"PRIVATE KEY-----" not in key:
        raise CliError(f"key file {connection.key}: holds no PEM private key (-----BEGIN PRIVATE KEY-----)", Exit.USAGE)
    if key is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(connection.cert, connection.key, password=b"")
        except ssl.SSLError:
            raise CliError(f"key file {connection.key}: not the private key of certificate file {connection.cert} "
                           f"(or encrypted, which gRPC cannot use)", Exit.USAGE) from None
    return ca, key, cert


def connectivity_now(channel: grpc.Channel, wait_s: float = 1.0) -> grpc.ChannelConnectivity | None:
    """The channel's connection state as gRPC reports it now (None: not told within `wait_s`). A
    subscription only while asked: one kept for the channel's life races its close (gRPC's
    watching thread may then fail "Cannot monitor channel state: Channel closed!" on stderr)."""
    told: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
    channel.subscribe(told.put, try_to_connect=False)
    try:
        return told.get(timeout=wait_s)
    except queue.Empty:
        return None
    finally:
        channel.unsubscribe(told.put)


class Unreached(grpc.RpcError):
    """A call that ended at its deadline with no connection under it: nothing was sent, the
    controller was not reached (a host that accepts TCP but never answers it, a SYN
    dropped by a firewall, a port that is not gRPC). Failed `UNAVAILABLE`, as a refused connection
    fails, so it reads and exits as one (`rpc_error_text`: "cannot reach the controller", exit 5);
    gRPC itself says only DEADLINE_EXCEEDED, which reads as a controller that took too long."""

    def __init__(self, timeout_s: float | None) -> None:
        within = f" within {round(timeout_s, 1):g}s" if timeout_s is not None else ""
        self._details = f"no connection: nothing answered there{within}"
        super().__init__(self._details)

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()  # nothing answered: no trailer (`controller_answered` is False)


class _Failed(grpc.Future):
    """The outcome an interceptor returns for a blocking call it fails itself."""

    def __init__(self, error: grpc.RpcError) -> None:
        self._error = error

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self._error

    def exception(self, timeout: float | None = None) -> grpc.RpcError:
        return self._error

    def traceback(self, timeout: float | None = None) -> None:
        return None

    def add_done_callback(self, fn: Callable[[grpc.Future], None]) -> None:
        fn(self)


@dataclass
class NeverConnected(grpc.UnaryUnaryClientInterceptor):
    """Turns a blocking unary call's DEADLINE_EXCEEDED into `Unreached` when its channel has no
    connection at the end: the call was never sent (a call sent on a connection that then broke
    ends UNAVAILABLE, not at its deadline). One that ended on a connection keeps its
    DEADLINE_EXCEEDED: the controller has it and was slow, and may have served it."""

    channel: grpc.Channel  # the channel under the interceptors

    def intercept_unary_unary(self, continuation: Callable[[grpc.ClientCallDetails, Any], Any],
                              details: grpc.ClientCallDetails, request: Any) -> Any:
        outcome = continuation(details, request)
        if not outcome.done():  # `.future()`: not waited for here
            return outcome
        error = outcome.exception()
        if error is None or status_code(error) != grpc.StatusCode.DEADLINE_EXCEEDED:
            return outcome
        if connectivity_now(self.channel) in (None, grpc.ChannelConnectivity.READY):
            return outcome
        return _Failed(Unreached(details.timeout))


@dataclass
class AioNeverConnected(aio.UnaryUnaryClientInterceptor):
    """`NeverConnected` for asyncio channels: an awaited unary call that ended DEADLINE_EXCEEDED
    while its channel had no connection fails UNAVAILABLE with `Unreached`'s details (an
    `aio.AioRpcError`, which the call's awaiter gets as gRPC's own). Outermost on the channel,
    so it judges the call's last attempt after the retries."""

    channel: aio.Channel | None = None  # the channel it intercepts (set once made: it takes its interceptors)

    async def intercept_unary_unary(self, continuation: Callable[[aio.ClientCallDetails, Any], Any],
                                    details: aio.ClientCallDetails, request: Any) -> Any:
        call = await continuation(details, request)
        try:
            code = await call.code()
        except asyncio.CancelledError:  # the caller's call cancelled: the attempt too (`AioRetryTold`)
            call.cancel()
            raise
        if code != grpc.StatusCode.DEADLINE_EXCEEDED or self.channel is None \
                or self.channel.get_state() == grpc.ChannelConnectivity.READY:
            return call
        unreached = Unreached(details.timeout)
        raise aio.AioRpcError(unreached.code(), aio.Metadata(), aio.Metadata(), details=unreached.details())


def open_channel(connection: Connection) -> grpc.Channel:
    """TLS when a CA (or client certificate) is configured, plaintext otherwise; the token rides
    along as call metadata; a unary call the controller answers "nothing written, call again after
    this pause" (google.rpc.RetryInfo) is made again (`retry.RetryTold`); one whose deadline passed
    before any connection was made fails `Unreached` (`NeverConnected`). Several controllers: see
    `channel_target`; reconnection and keepalive: `_target_of`."""
    to = _target_of(connection)
    if to.credentials is not None:
        channel = grpc.secure_channel(to.target, to.credentials, options=to.options)
    else:
        channel = grpc.insecure_channel(to.target, options=to.options)
    interceptors: list[Any] = [NeverConnected(channel), RetryTold()]
    if connection.token:
        interceptors.append(_BearerToken(connection.token))
    return grpc.intercept_channel(channel, *interceptors)


def open_aio_channel(connection: Connection) -> aio.Channel:
    """`open_channel` for programs calling the API from asyncio: the same target, options, TLS and
    token, and the same retries of unary calls (`retry.AioRetryTold`, the same policy). Make the
    stubs of `maia.v1` on it; `config.resolve_connection` reads a connection as maiactl does. A
    call whose deadline passed before any connection was made fails UNAVAILABLE, "no connection"
    (`AioNeverConnected`), as `open_channel`'s does."""
    to = _target_of(connection)
    never = AioNeverConnected()
    interceptors = (never, AioRetryTold(), *aio_interceptors(connection.token))
    if to.credentials is not None:
        channel = aio.secure_channel(to.target, to.credentials, options=to.options, interceptors=interceptors)
    else:
        channel = aio.insecure_channel(to.target, options=to.options, interceptors=interceptors)
    never.channel = channel
    return channel


@dataclass
class Controller:
    """Stubs over one channel to the controller; `timeout` is per call (seconds)."""

    connection: Connection
    timeout: float = 15.0
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return self.connection.address

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = open_channel(self.connection)
        return self._channel

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    @property
    def deployments(self) -> deployments_pb2_grpc.DeploymentServiceStub:
        return deployments_pb2_grpc.DeploymentServiceStub(self.channel)

    @property
    def audit(self) -> audit_pb2_grpc.AuditServiceStub:
        return audit_pb2_grpc.AuditServiceStub(self.channel)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def list_all(call: Callable[..., M], request: Message, field_name: str, *,
             timeout: float | Callable[[], float]) -> M:
    """Every page of a list RPC, merged into the first response (its next_page_token cleared);
    `timeout` is each page's, or gives it as each page is asked for (what is left of a wait)."""
    merged: M | None = None
    seen: set[str] = set()
    while True:
        response = call(request, timeout=timeout() if callable(timeout) else timeout)
        if merged is None:
            merged = response
        else:
            getattr(merged, field_name).extend(getattr(response, field_name))
        token = response.next_page_token
        if not token or token in seen:  # a token seen before would loop forever
            break
        seen.add(token)
        request = type(request).FromString(request.SerializeToString())
        request.page_token = token
    merged.next_page_token = ""
    return merged


def rpc_error_text(error: grpc.RpcError, address: str) -> str:
    """'error: NOT_FOUND: deployment foo not found', clearer when the controller is unreachable:
    an UNAVAILABLE the controller answered itself (a database failure, a busy or stopping
    controller, a follower) is its own message, not "cannot reach the controller"."""
    code = status_code(error)
    details = error.details() if hasattr(error, "details") else str(error)
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.UNAVAILABLE and controller_answered(_trailer(error)):
        return (f"error: UNAVAILABLE: {details}\n"
                f"hint: the controller at {address} answered but cannot serve the call now; run the command "
                f"again shortly")
    if code == grpc.StatusCode.UNAVAILABLE and _closed_by_tls(details):
        return (f"error: UNAVAILABLE: cannot reach the controller at {address} ({details})\n"
                f"hint: something answers there and closed the connection: a controller serving TLS does so to "
                f"a client without it (give --ca), and one asking for client certificates to a client "
                f"without one (give --cert and --key)")
    if code == grpc.StatusCode.UNAVAILABLE:
        return (f"error: UNAVAILABLE: cannot reach the controller at {address} ({details})\n"
                f"hint: is maia-controller running there? Point maiactl elsewhere with --controller HOST:PORT, "
                f"$MAIA_CONTROLLER or a config context (maiactl config get-contexts)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"error: DEADLINE_EXCEEDED: the controller at {address} did not answer in time ({details})"
    if code == grpc.StatusCode.CANCELLED:  # maiactl cancels no call: a stopping controller cancels those in flight
        return f"error: CANCELLED: the controller at {address} ended the call unanswered; is it stopping? ({details})"
    return f"error: {name}: {details}"


def _closed_by_tls(details: str) -> bool:
    """gRPC's words for a connection the other end closed at or before the TLS handshake (a
    plaintext client of a TLS server, a client without the certificate a server asks for):
    told as "is maia-controller running there?", although it was."""
    return any(word in details for word in ("Socket closed", "handshake", "SSL", "certificate"))


class StatusError(grpc.RpcError):
    """A google.rpc.Status a response carries for one of its parts (a SubmitDeployments result),
    as the RpcError that part's own call would have ended with: the same code, message and
    trailer (`rpc_error_text`, `status_code`, `exit_code_of` and the retry rules read it alike)."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status

    def code(self) -> grpc.StatusCode:
        return _CODES.get(self.status.code, grpc.StatusCode.UNKNOWN)

    def details(self) -> str:
        return self.status.message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return ((STATUS_DETAILS_METADATA_KEY, self.status.SerializeToString()),)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    return error.code() if hasattr(error, "code") else None


def _trailer(error: grpc.RpcError) -> Any:
    return error.trailing_metadata() if hasattr(error, "trailing_metadata") else None


def retry_told_s(error: grpc.RpcError) -> float | None:
    """The pause a refused call's RetryInfo asks for (a rate, a busy solver: nothing of it was
    written, make it again then), or None when it carries none."""
    return told_retry_s(_trailer(error))
