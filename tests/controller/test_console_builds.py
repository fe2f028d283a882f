"""`console.builds.SharedBuilds`: each request answered by a build started after it arrived, one
viewer's builds never overlapping and spaced, shared by the requests that wait for them."""

from __future__ import annotations

import asyncio

import pytest

from controller.console.builds import SharedBuilds


class Builder:
    """Builds numbered documents; each build waits for `release` when `held`."""

    def __init__(self, *, held: bool = False, fail: int | None = None) -> None:
        self.started: list[str] = []
        self.release = asyncio.Event()
        self.running = 0
        self.most_running = 0
        if not held:
            self.release.set()
        self._fail = fail

    async def __call__(self, key: str) -> bytes:
        self.started.append(key)
        number = len(self.started)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
            if number == self._fail:
                raise RuntimeError(f"build {number} failed")
            return f"{key}#{number}".encode()
        finally:
            self.running -= 1


async def _started(builder: Builder, count: int) -> None:
    while len(builder.started) < count:
        await asyncio.sleep(0)


async def test_requests_during_a_build_share_the_next_one_started_after_they_arrived() -> None:
    builder = Builder(held=True)
    builds = SharedBuilds(builder, spacing_s=0)
    first = asyncio.ensure_future(builds.get("t"))
    await _started(builder, 1)
    later = [asyncio.ensure_future(builds.get("t")) for _ in range(5)]  # they arrived after build 1 began
    await asyncio.sleep(0.01)
    assert builder.started == ["t"]  # no second build while the first runs
    builder.release.set()
    assert await first == b"t#1"
    assert set(await asyncio.gather(*later)) == {b"t#2"}  # one build for the five, begun after they came
    assert builds.builds == 2 and builder.most_running == 1


async def test_viewers_are_built_apart_and_concurrently() -> None:
    builder = Builder(held=True)
    builds = SharedBuilds(builder, spacing_s=0)
    both = asyncio.gather(builds.get(""), builds.get("t2"))
    await _started(builder, 2)
    assert builder.most_running == 2  # the second viewer's build did not wait for the first's
    builder.release.set()
    assert [document.split(b"#")[0] for document in await both] == [b"", b"t2"]


async def test_builds_of_a_viewer_start_no_sooner_than_the_spacing_apart() -> None:
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    builder = Builder()

    async def timed(key: str) -> bytes:
        starts.append(loop.time())
        return await builder(key)

    builds = SharedBuilds(timed, spacing_s=0.2, clock=loop.time)
    assert await builds.get("") == b"#1"
    assert await builds.get("") == b"#2"  # asked at once: waits out the spacing
    assert starts[1] - starts[0] >= 0.2


async def test_a_failed_build_fails_its_requests_and_the_next_request_builds_again() -> None:
    builds = SharedBuilds(Builder(fail=1), spacing_s=0)
    with pytest.raises(RuntimeError, match="build 1 failed"):
        await asyncio.gather(builds.get(""), builds.get(""))
    assert await builds.get("") == b"#2"


async def test_a_request_that_goes_away_leaves_the_build_to_the_others() -> None:
    builder = Builder(held=True)
    builds = SharedBuilds(builder, spacing_s=0)
    gone, stays = asyncio.ensure_future(builds.get("")), asyncio.ensure_future(builds.get(""))
    await _started(builder, 1)
    gone.cancel()
    builder.release.set()
    assert await stays == b"#1"
    assert gone.cancelled()


async def test_close_cancels_the_builds_under_way_and_waiting() -> None:
    builder = Builder(held=True)
    builds = SharedBuilds(builder, spacing_s=0)
    running = asyncio.ensure_future(builds.get(""))
    await _started(builder, 1)
    waiting = asyncio.ensure_future(builds.get(""))
    await asyncio.sleep(0)
    await builds.close()
    assert builder.running == 0
    for request in (running, waiting):
        with pytest.raises(asyncio.CancelledError):
            await request
