"""A link's outbox (`controller.gateway.frames.Outbox`): events go as frames of at most
`FRAME_EVENTS_MAX` events and `FRAME_BYTES_MAX` bytes (a single larger event alone), in order,
however many were added while the link was busy."""

from __future__ import annotations

import asyncio

from controller.gateway.frames import FRAME_BYTES_MAX, FRAME_EVENTS_MAX, Outbox
from maia.v1 import relay_pb2


async def _frames_of(outbox: Outbox) -> list[list[relay_pb2.RelayEvent]]:
    return [list(frame.events) async for frame in outbox.frames()]


async def test_events_added_while_the_link_was_busy_go_as_bounded_frames_in_order() -> None:
    outbox = Outbox(linger_s=0.0)
    small = 3 * FRAME_EVENTS_MAX + 7
    for call in range(small):  # the link busy: all added before a frame is taken
        outbox.message(call + 1, b"x")
    big = 3 * 1024 * 1024  # two of them pass FRAME_BYTES_MAX: one a frame
    for call in range(small, small + 3):
        outbox.message(call + 1, b"y" * big)
    outbox.message(small + 4, b"y" * (FRAME_BYTES_MAX + 1))  # larger than a frame: alone
    outbox.message(small + 5, b"z")
    outbox.close()
    frames = await asyncio.wait_for(_frames_of(outbox), timeout=10)
    assert [len(f) for f in frames] == [FRAME_EVENTS_MAX] * 3 + [7 + 1, 1, 1, 1, 1]
    assert [e.call for f in frames for e in f] == list(range(1, small + 6))
    for frame in frames:
        assert len(frame) <= FRAME_EVENTS_MAX
        assert len(frame) == 1 or sum(len(e.message) for e in frame) <= FRAME_BYTES_MAX
    assert outbox.frames_sent == len(frames) and outbox.events_sent == small + 5


async def test_a_frame_lingers_for_others_to_join_it() -> None:
    outbox = Outbox(linger_s=0.05)
    outbox.message(1, b"a")
    frames = outbox.frames()
    first = asyncio.ensure_future(frames.__anext__())
    await asyncio.sleep(0.01)
    assert not first.done()
    outbox.message(2, b"b")
    frame = await asyncio.wait_for(first, timeout=5)
    assert [e.call for e in frame.events] == [1, 2]
    outbox.close()
    assert [f async for f in frames] == []
