"""A relayed call's requests pushed to their consumer as the link delivers them
(`RelayedRequests.push_to`, `controller.aio.PushedStream`), as the agent hub takes them."""

from __future__ import annotations

from typing import Any

import pytest

from controller import errors
from controller.api.interceptors import MalformedRequest, _parsed_stream
from controller.gateway.relay import RelayedRequests


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
