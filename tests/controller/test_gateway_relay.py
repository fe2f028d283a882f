"""A relayed call's requests pushed to their consumer as the link delivers them
(`RelayedRequests.push_to`, `controller.aio.PushedStream`), as the agent hub takes them."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from controller import errors, limits
from controller.api.interceptors import MalformedRequest, _parsed_stream
from controller.api.interceptors.completion import code_of
from controller.gateway.frames import Outbox
from controller.gateway.relay import RelayedRequests, _Link
from maia.v1 import relay_pb2


class Consumer:
    """What a consumer was given: the messages it took, and how the stream ended (if it did)."""

    def __init__(self, refuse: bytes | None = None) -> None:
        self.taken: list[Any] = []
        self.endings: list[BaseException | None] = []
        self._refuse = refuse

    def take(self, message: Any) -> None:
        if message == self._refuse:
            raise errors.InvalidArgument(f"refused {message!r}")
        self.taken.append(message)

    def ended(self, error: BaseException | None) -> None:
        self.endings.append(error)


def test_the_waiting_messages_go_first_then_each_as_it_arrives_then_the_end() -> None:
    requests = RelayedRequests(bytes.upper)
    requests.put(b"a")
    requests.put(b"b")
    consumer = Consumer()
    requests.push_to(consumer.take, consumer.ended)
    assert consumer.taken == [b"A", b"B"]
    requests.put(b"c")
    assert consumer.taken == [b"A", b"B", b"C"] and consumer.endings == []
    requests.end()
    requests.put(b"d")  # nothing after the end
    requests.end()
    assert consumer.taken == [b"A", b"B", b"C"] and consumer.endings == [None]


def test_a_stream_that_ended_before_the_push_began_ends_at_once() -> None:
    requests = RelayedRequests(None)
    requests.put(b"a")
    requests.end()
    consumer = Consumer()
    requests.push_to(consumer.take, consumer.ended)
    assert consumer.taken == [b"a"] and consumer.endings == [None]


@pytest.mark.parametrize("waiting", [True, False])
def test_a_refusal_ends_the_push_with_it(waiting: bool) -> None:
    requests = RelayedRequests(None)
    consumer = Consumer(refuse=b"bad")
    if waiting:
        for data in (b"a", b"bad", b"b"):
            requests.put(data)
        requests.push_to(consumer.take, consumer.ended)
    else:
        requests.push_to(consumer.take, consumer.ended)
        for data in (b"a", b"bad", b"b"):
            requests.put(data)
    requests.end()
    assert consumer.taken == [b"a"]
    [error] = consumer.endings
    assert isinstance(error, errors.InvalidArgument)


def test_a_consumer_that_stopped_is_given_nothing_more() -> None:
    requests = RelayedRequests(None)
    consumer = Consumer()
    stop = requests.push_to(consumer.take, consumer.ended)
    requests.put(b"a")
    stop()
    requests.put(b"b")
    requests.end()
    assert consumer.taken == [b"a"] and consumer.endings == []


def test_the_chains_check_refuses_a_malformed_pushed_request_as_a_read_one() -> None:
    requests = RelayedRequests(lambda data: MalformedRequest("DecodeError") if data == b"?" else data)
    checked = _parsed_stream(requests)
    consumer = Consumer()
    checked.push_to(consumer.take, consumer.ended)
    requests.put(b"a")
    requests.put(b"?")
    requests.put(b"b")
    assert consumer.taken == [b"a"]
    [error] = consumer.endings
    assert isinstance(error, errors.InvalidArgument) and "not a valid protobuf message" in str(error)


# --- a call whose agent sends faster than its handler reads (limits.RELAYED_UNREAD_BYTES_MAX) ---

_opened: list[Any] = []


async def _connect(requests: Any, context: Any) -> Any:
    _opened.append(context)
    await asyncio.sleep(3600)  # a handler that reads nothing: its Hello waits its turn
    yield b""


def _event(call: int, **body: Any) -> relay_pb2.RelayEvent:
    return relay_pb2.RelayEvent(call=call, **body)


def _opening(call: int) -> relay_pb2.RelayEvent:
    return _event(call, open=relay_pb2.RelayOpen(method="/m/Connect"))


def _link() -> _Link:
    return _Link("g", {"/m/Connect": grpc.stream_stream_rpc_method_handler(_connect)}, Outbox(0.0))


async def test_an_overflowed_call_ends_resource_exhausted_and_is_recorded_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent is told RESOURCE_EXHAUSTED, and the call's metrics, access log and audit record it
    so, not as the CANCELLED of its cancelled handler (found in review)."""
    monkeypatch.setattr(limits, "RELAYED_UNREAD_BYTES_MAX", 10)
    _opened.clear()
    link = _link()
    link.take(relay_pb2.RelayFrame(events=[_opening(1)]))
    await asyncio.sleep(0)
    link.take(relay_pb2.RelayFrame(events=[_event(1, message=b"x" * 6)]))
    assert link.open_calls() == 1  # 6 bytes unread: within the bound
    link.take(relay_pb2.RelayFrame(events=[_event(1, message=b"x" * 6)]))
    await asyncio.sleep(0.01)
    assert link.open_calls() == 0
    assert code_of(_opened[0], asyncio.CancelledError()) == "RESOURCE_EXHAUSTED"


async def test_an_overflow_that_ends_an_ending_link_opens_nothing_after_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """The overflow of an ending link's last call ends the link mid-frame: a call the same frame
    opens after it ran its handler with no status ever to be sent (found in review)."""
    monkeypatch.setattr(limits, "RELAYED_UNREAD_BYTES_MAX", 10)
    _opened.clear()
    link = _link()
    link.take(relay_pb2.RelayFrame(events=[_opening(1)]))
    await asyncio.sleep(0)
    link.end_when_idle()  # the controller stops: call 1 still open
    link.take(relay_pb2.RelayFrame(events=[_event(1, message=b"x" * 11), _opening(2)]))
    await asyncio.sleep(0)
    assert link.closed and link.open_calls() == 0 and len(_opened) == 1
