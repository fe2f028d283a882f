"""Every end of a Connect stream the controller makes, as a grpc.aio agent sees it over a real
socket: its status code, its message, and what its trailer says (a retry time, the leader's
address). The hand-driven agents here write only their Hello, so no write of theirs races the
end (grpc/grpc#36066: a write as the controller ends a stream replaces its status on the client)."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from controller.leadership import LEADER_METADATA_KEY
from controller.retryinfo import controller_answered, told_retry_s
from grpc_harness import (HandAgent, Stubs, admin_token_of, connected_agent, controller_with_rack,
                          running_controller, topology)


def _trailer(ended: grpc.aio.AioRpcError, key: str) -> str | None:
    return dict(ended.trailing_metadata() or ()).get(key)


async def test_a_stream_superseded_by_a_newer_one_of_its_node_ends_aborted_and_is_told_not_to_reconnect(
        migrated_db_url: str, tmp_path: Path) -> None:
    # The hand agents never heartbeat: a long timeout, so only the newer stream ends the first.
    async with controller_with_rack(migrated_db_url, tmp_path, heartbeat_timeout_s=60) as (_, stubs):
        old = await connected_agent(stubs, "node-1")
        new = await connected_agent(stubs, "node-1")  # a second agent of node-1 (or its own reconnect)
        ended = await old.reader_error()
        assert ended is not None and ended.code() == grpc.StatusCode.ABORTED, ended
        assert ended.details() == (
            f"superseded by a newer stream of node node-1 (session {new.session_id}): the process that "
            f"held this stream must not reconnect (one agent per node)")
        assert controller_answered(ended.trailing_metadata())
        assert told_retry_s(ended.trailing_metadata()) is None  # not to be retried
        assert not new._reader.done()  # the newer stream goes on
        await new.close()


async def test_a_silent_stream_ends_unavailable_with_a_retry_time(stubs: Stubs) -> None:
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    agent = HandAgent(stubs, "node-1", "rack-a")
    registered = await agent.register()
    await agent.connect()
    await agent.next_set()
    # No heartbeat at all: the 2 s timeout of the test controller ends the stream.
    ended = await agent.reader_error()
    assert ended is not None and ended.code() == grpc.StatusCode.UNAVAILABLE, ended
    assert re.fullmatch(
        r"no heartbeat for \d+\.\ds \(timeout 2s\): node node-1 is suspect until its agent connects again; "
        rf"reconnect and heartbeat every {registered.heartbeat_interval_ms} ms", ended.details()), ended.details()
    assert told_retry_s(ended.trailing_metadata()) == registered.heartbeat_interval_ms / 1000
    assert _trailer(ended, "retry-after-ms") == str(registered.heartbeat_interval_ms)
    assert _trailer(ended, LEADER_METADATA_KEY) is None


async def test_a_stopping_controller_ends_its_streams_unavailable_sending_agents_to_the_next_leader(
        migrated_db_url: str, tmp_path: Path) -> None:
    async with controller_with_rack(migrated_db_url, tmp_path, heartbeat_timeout_s=60) as (app, stubs):
        agent = await connected_agent(stubs, "node-1")
        await app.stop(grace_s=5.0)
        ended = await agent.reader_error()
        assert ended is not None and ended.code() == grpc.StatusCode.UNAVAILABLE, ended
        assert ended.details() == ("controller is stopping: the stream of node node-1 ended; connect to the "
                                   "next leader")
        assert controller_answered(ended.trailing_metadata())
        # It led until now: no other leader is known, and no time to come back after either.
        assert _trailer(ended, LEADER_METADATA_KEY) is None
        assert told_retry_s(ended.trailing_metadata()) is None


async def test_a_leader_that_steps_down_with_no_successor_known_ends_its_streams_unavailable_without_a_hint(
        migrated_db_url: str, tmp_path: Path) -> None:
    """Its lease could not be renewed in time: it knows of no other leader (as a follower that
    knows none answers an agent)."""
    async with controller_with_rack(migrated_db_url, tmp_path, heartbeat_timeout_s=60) as (app, stubs):
        agent = await connected_agent(stubs, "node-1")
        app.election._step_down("the lease could not be renewed in time", app.election._term.token)
        ended = await agent.reader_error()
        assert ended is not None and ended.code() == grpc.StatusCode.UNAVAILABLE, ended
        assert ended.details() == ("this controller no longer leads (the lease could not be renewed in time): "
                                   "no leader is elected yet; retry")
        assert _trailer(ended, LEADER_METADATA_KEY) is None
        assert controller_answered(ended.trailing_metadata())


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_leader_that_steps_down_ends_its_streams_unavailable_naming_the_new_leader(
        migrated_db_url: str, tmp_path: Path) -> None:
    """Another controller took the lease: the deposed leader's streams end as a follower answers
    an agent, UNAVAILABLE with the new leader's address in `maia-leader`. (Its renewal finds who
    took it; a write of its refused by the fence first knows no successor, and its streams end as
    in the test above.)"""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    quiet = {"heartbeat_timeout_s": 60, "reconcile_interval_s": 30.0}
    async with running_controller(migrated_db_url, tmp_path / "a", **quiet) as leader, \
            running_controller(migrated_db_url, tmp_path / "b", **quiet) as follower:
        assert leader.election.should_run() and not follower.election.should_run()
        stubs = Stubs.connect(leader.address, admin_token_of(leader))
        try:
            await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
            agent = await connected_agent(stubs, "node-1")
            # No pass of the leader's commits meanwhile (one woken by the agent's Hello could): its
            # renewal, tried at once, finds the lease taken and by whom.
            async with leader.reconciler._lock:
                follower.election._force = True  # takes the live lease
                await follower.election.step()
                leader.election.wake()
                ended = await agent.reader_error()
            assert ended is not None and ended.code() == grpc.StatusCode.UNAVAILABLE, ended
            assert ended.details() == (f"this controller no longer leads (controller {follower.election.holder} "
                                       f"holds the lease now): the leader is at {follower.address}")
            assert _trailer(ended, LEADER_METADATA_KEY) == follower.address
            assert controller_answered(ended.trailing_metadata())
        finally:
            await stubs.channel.close()
