"""maiactl's channel (`cli.client.open_channel`, the public client's too) makes a unary call again
when, and only when, the controller's answer carries google.rpc.RetryInfo (`cli.retry`): a real
gRPC server on a real socket answers as told, and counts the attempts that reach it."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from controller.cli.client import Controller, Exit, open_aio_channel
from controller.cli.config import Connection
from controller.cli.main import main as maiactl
from controller.cli.retry import RetryPolicy
from maia.v1 import admin_pb2, admin_pb2_grpc
from tests.addresses import closed_port_address

TOKEN = "test-token"


@dataclass
class Answers(admin_pb2_grpc.AdminServiceServicer):
    """GetVersion answered `code` `refusals` times (with RetryInfo of `retry_ms` unless None, and
    any `trailing` metadata), then OK; each answer after `hold_s`; the time each attempt arrived
    and its bearer token. `rich`: a refusal without RetryInfo carries a google.rpc.Status all the
    same (as every error the controller answers does)."""

    refusals: int
    retry_ms: int | None
    code: grpc.StatusCode = grpc.StatusCode.ABORTED
    trailing: tuple[tuple[str, str], ...] = ()
    hold_s: float = 0.0
    rich: bool = False
    arrived: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def GetVersion(self, request: admin_pb2.GetVersionRequest, context: grpc.ServicerContext) -> admin_pb2.VersionInfo:
        with self.lock:
            self.arrived.append(time.monotonic())
            self.tokens.append(dict(context.invocation_metadata()).get("authorization", ""))
            attempt = len(self.arrived)
        time.sleep(self.hold_s)
        if attempt > self.refusals:
            return admin_pb2.VersionInfo(version="9.9.9")
        message = f"refused, attempt {attempt}"
        if self.retry_ms is None and not self.rich:
            context.set_trailing_metadata(self.trailing)
            context.abort(self.code, message)
        # The standard encoding, built with grpcio-status (not with the controller's own code).
        details = []
        if self.retry_ms is not None:
            details.append(any_pb2.Any())
            details[0].Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
                seconds=self.retry_ms // 1000, nanos=(self.retry_ms % 1000) * 1_000_000)))
        status = rpc_status.to_status(status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=message, details=details))
        context.set_trailing_metadata((*self.trailing, *status.trailing_metadata))
        context.abort(status.code, status.details)


class Servers:
    """Real gRPC servers on 127.0.0.1:0, each serving `Answers`, and maiactl's client to each."""

    def __init__(self) -> None:
        self.servers: list[grpc.Server] = []
        self.clients: list[Controller] = []

    def __call__(self, answers: Answers) -> Controller:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        admin_pb2_grpc.add_AdminServiceServicer_to_server(answers, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.servers.append(server)
        self.clients.append(Controller(Connection(address=f"127.0.0.1:{port}", token=TOKEN), timeout=10.0))
        return self.clients[-1]

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for server in self.servers:
            server.stop(grace=None)


@pytest.fixture
def serve() -> Iterator[Servers]:
    servers = Servers()
    yield servers
    servers.close()


def _version(controller: Controller, timeout: float | None = None) -> admin_pb2.VersionInfo:
    return controller.admin.GetVersion(admin_pb2.GetVersionRequest(), timeout=timeout or controller.timeout)


def test_an_answer_with_retry_info_is_retried_after_the_pause_it_asks_for_until_it_succeeds(serve: Servers) -> None:
    answers = Answers(refusals=3, retry_ms=200)
    assert _version(serve(answers)).version == "9.9.9"
    assert len(answers.arrived) == 3 + 1
    gaps = [later - earlier for earlier, later in zip(answers.arrived, answers.arrived[1:])]
    assert all(gap >= 0.2 for gap in gaps), gaps
    assert answers.tokens == [f"Bearer {TOKEN}"] * 4  # each attempt authenticated


def test_a_resource_exhausted_answer_with_retry_info_is_retried_too(serve: Servers) -> None:
    answers = Answers(refusals=1, retry_ms=50, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _version(serve(answers)).version == "9.9.9"
    assert len(answers.arrived) == 2


def test_an_aborted_answer_without_retry_info_is_not_retried(serve: Servers) -> None:
    answers = Answers(refusals=1, retry_ms=None)
    with pytest.raises(grpc.RpcError) as refused:
        _version(serve(answers))
    assert refused.value.code() == grpc.StatusCode.ABORTED and refused.value.details() == "refused, attempt 1"
    assert len(answers.arrived) == 1


def test_a_retry_time_without_retry_info_is_not_retried(serve: Servers) -> None:
    """`retry-after-ms` alone is what the controller sends when the call's write may have landed
    (the database failed mid-call): to be read before it is sent again, not retried blindly."""
    answers = Answers(refusals=1, retry_ms=None, code=grpc.StatusCode.UNAVAILABLE, trailing=(("retry-after-ms", "10"),))
    with pytest.raises(grpc.RpcError) as refused:
        _version(serve(answers))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(answers.arrived) == 1


def test_a_pause_longer_than_the_policy_waits_is_the_callers_to_wait(serve: Servers) -> None:
    answers = Answers(refusals=1, retry_ms=int(RetryPolicy().max_wait_s * 1000) + 1000)
    with pytest.raises(grpc.RpcError) as refused:
        _version(serve(answers))
    assert refused.value.code() == grpc.StatusCode.ABORTED
    assert len(answers.arrived) == 1


def test_no_attempt_is_made_past_the_calls_own_timeout(serve: Servers) -> None:
    answers = Answers(refusals=1, retry_ms=1500)
    with pytest.raises(grpc.RpcError) as refused:
        _version(serve(answers), timeout=1.0)
    assert refused.value.code() == grpc.StatusCode.ABORTED  # the controller's answer, not DEADLINE_EXCEEDED
    assert len(answers.arrived) == 1


def test_no_attempt_is_made_that_the_calls_timeout_leaves_too_little_time_for(serve: Servers) -> None:
    """Each attempt takes 0.5 s to be answered, told to wait 0.2 s: after the first (at 0.5 s of a
    1.2 s timeout) and the pause, under 0.5 s would be left, so a second attempt would end
    DEADLINE_EXCEEDED and hide the controller's answer, which the caller gets instead."""
    answers = Answers(refusals=1, retry_ms=200, hold_s=0.5)
    with pytest.raises(grpc.RpcError) as refused:
        _version(serve(answers), timeout=1.2)
    assert refused.value.code() == grpc.StatusCode.ABORTED, refused.value.details()
    assert len(answers.arrived) == 1


def test_attempts_are_bounded(serve: Servers) -> None:
    answers = Answers(refusals=100, retry_ms=10)
    with pytest.raises(grpc.RpcError) as refused:
        _version(serve(answers))
    assert refused.value.code() == grpc.StatusCode.ABORTED
    assert len(answers.arrived) == RetryPolicy().max_attempts


class _Rng:
    def __init__(self, value: float) -> None:
        self.value = value

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.value


@pytest.mark.parametrize(("told", "attempts", "left", "took", "stretch", "pause"), [
    (0.1, 1, None, 0.0, 0.0, 0.1),    # the pause told, at least
    (0.1, 1, None, 0.0, 1.0, 0.125),  # stretched by up to a quarter
    (1.9, 1, None, 0.0, 1.0, 2.0),    # never past max_wait_s
    (2.5, 1, None, 0.0, 0.0, None),   # a longer pause asked: not waited out
    (0.1, 5, None, 0.0, 0.0, None),   # the last attempt made
    (0.5, 1, 0.4, 0.0, 0.0, None),    # the call's timeout ends first
    (0.5, 1, 0.65, 0.0, 0.0, 0.5),    # more than min_attempt_s (0.1) left after the pause
    (0.5, 1, 0.55, 0.0, 0.0, None),   # 50 ms left after the pause: too little for an attempt
    (0.5, 1, 0.8, 0.2, 0.0, 0.5),     # the last attempt took 0.2 s and 0.3 s are left after the pause
    (0.5, 1, 0.8, 0.4, 0.0, None),    # ... 0.4 s: the next one would not finish in the 0.3 s left
])
def test_the_pause_before_the_next_attempt(told: float, attempts: int, left: float | None, took: float,
                                           stretch: float, pause: float | None) -> None:
    got = RetryPolicy().pause_s(told, attempts, left, took, _Rng(stretch))  # type: ignore[arg-type]
    assert got == pytest.approx(pause) if pause is not None else got is None


@dataclass
class Held(Answers):
    """`Answers` whose first attempt is answered only once `release` is set."""

    release: threading.Event = field(default_factory=threading.Event)

    def GetVersion(self, request: admin_pb2.GetVersionRequest, context: grpc.ServicerContext) -> admin_pb2.VersionInfo:
        self.release.wait(10.0)
        return super().GetVersion(request, context)


def test_a_future_call_is_handed_back_before_it_is_answered_and_not_retried(serve: Servers) -> None:
    answers = Held(refusals=1, retry_ms=10)
    client = serve(answers)
    future = client.admin.GetVersion.future(admin_pb2.GetVersionRequest(), timeout=5.0)
    assert not future.done()  # the interceptor did not wait for the answer (it blocked until the timeout)
    answers.release.set()
    assert future.exception().code() == grpc.StatusCode.ABORTED  # the caller's to retry
    assert len(answers.arrived) == 1


async def _aio_version(address: str, timeout: float = 10.0) -> admin_pb2.VersionInfo:
    async with open_aio_channel(Connection(address=address, token=TOKEN)) as channel:
        return await admin_pb2_grpc.AdminServiceStub(channel).GetVersion(admin_pb2.GetVersionRequest(),
                                                                         timeout=timeout)


async def test_the_asyncio_client_retries_an_answer_with_retry_info_until_it_succeeds(serve: Servers) -> None:
    answers = Answers(refusals=2, retry_ms=200)
    assert (await _aio_version(serve(answers).address)).version == "9.9.9"
    assert len(answers.arrived) == 2 + 1
    gaps = [later - earlier for earlier, later in zip(answers.arrived, answers.arrived[1:])]
    assert all(gap >= 0.2 for gap in gaps), gaps
    assert answers.tokens == [f"Bearer {TOKEN}"] * 3


async def test_the_asyncio_client_does_not_retry_an_aborted_answer_without_retry_info(serve: Servers) -> None:
    answers = Answers(refusals=1, retry_ms=None)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _aio_version(serve(answers).address)
    assert refused.value.code() == grpc.StatusCode.ABORTED and refused.value.details() == "refused, attempt 1"
    assert len(answers.arrived) == 1


async def test_the_asyncio_client_follows_the_same_policy(serve: Servers) -> None:
    """Bounded attempts, and no attempt the call's timeout leaves too little time for (as above)."""
    bounded = Answers(refusals=100, retry_ms=10)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _aio_version(serve(bounded).address)
    assert refused.value.code() == grpc.StatusCode.ABORTED
    assert len(bounded.arrived) == RetryPolicy().max_attempts
    slow = Answers(refusals=1, retry_ms=200, hold_s=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _aio_version(serve(slow).address, timeout=1.2)
    assert refused.value.code() == grpc.StatusCode.ABORTED, refused.value.details()
    assert len(slow.arrived) == 1


def test_maiactl_tells_an_unavailable_the_controller_answered_from_one_it_could_not_reach(
        serve: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    """The controller's answer to a call its database failed under (UNAVAILABLE, a google.rpc.Status
    without RetryInfo, `retry-after-ms`) is the controller's message with a hint that it answered;
    a closed port is "cannot reach the controller". Both exit 5."""
    answers = Answers(refusals=1, retry_ms=None, rich=True, code=grpc.StatusCode.UNAVAILABLE,
                      trailing=(("retry-after-ms", "1000"),))
    address = serve(answers).address
    assert maiactl(["--controller", address, "--token", TOKEN, "version"]) == Exit.UNAVAILABLE
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: refused, attempt 1\n"), err
    assert f"hint: the controller at {address} answered but cannot serve the call now" in err
    assert "cannot reach" not in err and len(answers.arrived) == 1
    closed = closed_port_address()
    assert maiactl(["--controller", closed, "--rpc-timeout", "3", "version"]) == Exit.UNAVAILABLE
    err = capsys.readouterr().err
    assert err.startswith(f"error: UNAVAILABLE: cannot reach the controller at {closed} ("), err
    assert "hint: is maia-controller running there?" in err


@dataclass
class Awaited(Answers):
    """`Answers` whose GetVersion holds its answer until the call ends on the client's side (a
    cancellation reaches the server) or 30 s pass; `started` once it holds, `ended` once the call
    ended."""

    started: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    def GetVersion(self, request: admin_pb2.GetVersionRequest, context: grpc.ServicerContext) -> admin_pb2.VersionInfo:
        context.add_callback(self.ended.set)
        self.started.set()
        self.ended.wait(30.0)
        return super().GetVersion(request, context)


async def test_cancelling_an_asyncio_call_cancels_the_attempt_under_way(serve: Servers) -> None:
    """The retries run inside the call object the caller holds: cancelling it while an attempt is
    under way cancels that attempt on the wire (the controller stops serving it), as a call on a
    channel without the retries is cancelled; it must not go on unseen, its write landing after the
    caller gave it up."""
    answers = Awaited(refusals=0, retry_ms=None)
    address = serve(answers).address
    async with open_aio_channel(Connection(address=address, token=TOKEN)) as channel:
        call = admin_pb2_grpc.AdminServiceStub(channel).GetVersion(admin_pb2.GetVersionRequest(), timeout=60.0)
        assert await asyncio.to_thread(answers.started.wait, 10.0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await asyncio.to_thread(answers.ended.wait, 10.0), "the attempt went on after its call was cancelled"
