"""`console.builds.SharedBuilds`: each request answered by a build started after it arrived, one
viewer's builds never overlapping and spaced, shared by the requests that wait for them."""

from __future__ import annotations

import asyncio
import gc

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


async def test_a_request_after_its_lone_waiter_left_gets_a_build_begun_after_it_came() -> None:
    """The only request waiting for a build not yet begun goes away; that build still runs (for
    nobody), and a request that came after it began is given the next one, not that one."""
    gates = [asyncio.Event() for _ in range(3)]
    started: list[int] = []

    async def build(key: str) -> bytes:
        number = len(started) + 1
        started.append(number)
        await gates[number - 1].wait()
        return f"#{number}".encode()

    builds = SharedBuilds(build, spacing_s=0)
    first = asyncio.ensure_future(builds.get(""))
    while len(started) < 1:
        await asyncio.sleep(0)
    gone = asyncio.ensure_future(builds.get(""))  # waits for build 2, not begun
    await asyncio.sleep(0)
    gone.cancel()
    gates[0].set()
    assert await first == b"#1"
    while len(started) < 2:  # build 2 begins, wanted by nobody now
        await asyncio.sleep(0)
    late = asyncio.ensure_future(builds.get(""))  # came after build 2 began
    await asyncio.sleep(0.01)
    assert started == [1, 2]  # no build beside the running one
    gates[1].set()
    await asyncio.sleep(0.01)
    assert not late.done() and started == [1, 2, 3]  # build 2's document was not given to it
    gates[2].set()
    assert await late == b"#3"
    assert gone.cancelled()


async def test_a_failed_build_nobody_waits_for_is_no_unretrieved_error_and_the_next_builds() -> None:
    """A build fails after every request waiting for it went away: nothing is left for the
    loop's handler ('exception was never retrieved'), and the next request builds again."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        builder = Builder(held=True, fail=1)
        builds = SharedBuilds(builder, spacing_s=0)
        gone = asyncio.ensure_future(builds.get(""))
        await _started(builder, 1)
        gone.cancel()
        builder.release.set()
        await asyncio.sleep(0.01)
        assert gone.cancelled()
        del gone  # (its cancellation's traceback holds the frame that held the build)
        gc.collect()
        assert await builds.get("") == b"#2"
        assert not unhandled
    finally:
        loop.set_exception_handler(None)


async def test_a_build_that_fails_under_a_waiting_one_leaves_the_waiting_one_to_build() -> None:
    """Requests waiting for the next build while the running one fails: the running one's
    requests get its error, the waiting ones a document of their own build."""
    builder = Builder(held=True, fail=1)
    builds = SharedBuilds(builder, spacing_s=0)
    first = asyncio.ensure_future(builds.get(""))
    await _started(builder, 1)
    waiting = [asyncio.ensure_future(builds.get("")) for _ in range(3)]
    await asyncio.sleep(0)
    builder.release.set()
    with pytest.raises(RuntimeError, match="build 1 failed"):
        await first
    assert set(await asyncio.gather(*waiting)) == {b"#2"} and builds.builds == 2


async def test_each_viewer_is_given_its_own_keys_build_only() -> None:
    """Viewers asking at once, many times each: every request is answered with a build of its own
    key (a tenant's view never shared with another tenant or the operator)."""
    builder = Builder(held=True)
    builds = SharedBuilds(builder, spacing_s=0)
    keys = ["", "t1", "t2"] * 4
    asked = [asyncio.ensure_future(builds.get(key)) for key in keys]
    await asyncio.sleep(0.01)
    builder.release.set()
    answers = await asyncio.gather(*asked)
    assert [answer.split(b"#")[0].decode() for answer in answers] == keys
