"""Heartbeat pacing (domain/liveness.py, `HeartbeatPacing`): the interval agents are told grows
with the cluster past the cap, a stream's silence timeout is three of its agent's intervals, an
interval an agent states in its Hello is bounded, and what is counted in silence timeouts (the
stored contact's write cadence, how stale it may be) follows the longest one told; a new leader
finds the nodes that never came over at the end of its restart grace, however long the cadence.
The wire side: tests/integration/test_api_heartbeat_pacing.py, test_api_hello_interval.py."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from controller import nodelifecycle
from controller.agents import AgentHub
from controller.config import parse_args
from controller.domain.liveness import FlapDamper, HeartbeatPacing, LivenessPolicy
from controller.nodelifecycle import NodeLifecycle
from controller.store import models as m
from uc_builders import WHO, quiet_agent

POLICY = LivenessPolicy(heartbeat_timeout_s=10, restart_grace_s=0)


@pytest.mark.parametrize(("pacing", "nodes", "expected_ms"), [
    pytest.param(HeartbeatPacing(10, 1000), 1, 3333, id="one node: a third of the timeout"),
    pytest.param(HeartbeatPacing(10, 1000), 3333, 3333, id="the cap's size: still a third"),
    pytest.param(HeartbeatPacing(10, 1000), 4096, 4096, id="4,096 nodes at 1,000 a second: 4.1 s"),
    pytest.param(HeartbeatPacing(10, 1000), 16384, 16384, id="16,384 nodes: 16.4 s"),
    pytest.param(HeartbeatPacing(10, 500), 4096, 8192, id="half the cap, twice the interval"),
    pytest.param(HeartbeatPacing(10, 0), 16384, 3333, id="0: no cap"),
    pytest.param(HeartbeatPacing(0.2, 0), 1, 100, id="never below 100 ms"),
])
def test_the_interval_grows_with_the_nodes_past_the_cap(pacing: HeartbeatPacing, nodes: int,
                                                         expected_ms: int) -> None:
    assert pacing.interval_ms(nodes) == expected_ms


@pytest.mark.parametrize(("interval_ms", "expected_s"), [
    pytest.param(3333, 10.0, id="a third of the timeout: the timeout"),
    pytest.param(16384, 49.152, id="a longer interval: three of it"),
])
def test_a_streams_silence_timeout_is_three_of_its_intervals_never_below_the_timeout(
        interval_ms: int, expected_s: float) -> None:
    assert HeartbeatPacing(10, 1000).silence_timeout_s(interval_ms) == pytest.approx(expected_s)


@pytest.mark.parametrize(("pacing", "stated_ms", "told_longest_ms", "expected_ms"), [
    pytest.param(HeartbeatPacing(10, 500), 32_768, 0, 32_768, id="16,384 nodes' interval: as stated"),
    pytest.param(HeartbeatPacing(10, 500), 1_000, 0, 3_333, id="below a third of the timeout: that third"),
    pytest.param(HeartbeatPacing(10, 500), 3_600_000, 0, 131_072, id="an hour: 65,536 nodes' interval at most"),
    pytest.param(HeartbeatPacing(10, 500), 3_600_000, 200_000, 200_000, id="or the longest one told, if longer"),
    pytest.param(HeartbeatPacing(10, 0), 32_768, 0, 3_333, id="no cap: never longer than a third of the timeout"),
])
def test_a_stated_interval_is_bounded_by_what_the_pacing_could_tell(
        pacing: HeartbeatPacing, stated_ms: int, told_longest_ms: int, expected_ms: int) -> None:
    assert pacing.stated(stated_ms, told_longest_ms=told_longest_ms) == expected_ms


def test_the_stored_contacts_cadence_and_staleness_count_the_longest_silence_timeout() -> None:
    assert POLICY.contact_write_every_for(5.0) == POLICY.contact_write_every_s == 30.0  # never below the timeout's
    assert POLICY.stored_contact_stale_for(5.0) == POLICY.stored_contact_stale_s == 40.0
    assert POLICY.contact_write_every_for(49.0) == 147.0
    # A live stream's stored contact is at most one cadence and one interval (a third of the
    # timeout) old, and a flush: within the staleness.
    assert POLICY.stored_contact_stale_for(49.0) == 147.0 + 49.0


def test_the_controller_option_and_its_default() -> None:
    assert parse_args([]).heartbeat_pacing == HeartbeatPacing(10.0, 500.0)
    config = parse_args(["--heartbeat-timeout", "6", "--max-heartbeats-per-second", "250"])
    assert config.heartbeat_pacing == HeartbeatPacing(6.0, 250.0)
    assert config.heartbeat_pacing.base_interval_ms == 2000  # the shortest told: a third of the timeout
    assert parse_args(["--max-heartbeats-per-second", "0"]).heartbeat_pacing.interval_ms(100_000) == 3333
    with pytest.raises(SystemExit):
        parse_args(["--max-heartbeats-per-second", "-1"])
    with pytest.raises(SystemExit):  # intervals of days: past RegisterResponse's int32 milliseconds
        parse_args(["--max-heartbeats-per-second", "0.01"])
    assert parse_args(["--max-heartbeats-per-second", "1"]).heartbeat_pacing.interval_ms(100_000) == 100_000_000


async def test_the_lifecycle_leaves_alone_connected_nodes_whose_stored_contact_is_within_the_longest_cadence(
        cluster, monkeypatch) -> None:  # noqa: ANN001
    """Nodes told a 10 s interval (a 30 s silence timeout) have their stored contact written every
    90 s: a pass reads none of them while it is younger than that and a timeout (it would read
    all four, every second, at the heartbeat timeout's 40 s). The leader leads since before they
    came over (their Hellos wrote a stored time after its start)."""
    wall = datetime.now(timezone.utc)
    clock = [wall - timedelta(seconds=200)]
    async with cluster.unit_of_work() as uow:
        for node in (await uow.session.execute(select(m.Node))).scalars():
            node.health, node.last_heartbeat_at = m.NodeHealth.UP, wall - timedelta(seconds=100)
        await uow.commit()
    read: list[set[str]] = []
    real = nodelifecycle.liveness.read_liveness

    async def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        nodes = await real(*args, **kwargs)
        read.append({n.node_id for n in nodes})
        return nodes

    monkeypatch.setattr(nodelifecycle.liveness, "read_liveness", spy)
    everyone = frozenset({"rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"})
    cycle = NodeLifecycle(cluster, POLICY, connected=lambda: everyone, damper=FlapDamper(), on_change=lambda: None,
                          silence_timeout_s=lambda: 30.0, wall_clock=lambda: clock[0])
    clock[0] = wall
    assert await cycle.pass_once() == []
    assert read == [set()]


async def test_a_new_leader_finds_the_nodes_that_never_came_over_when_its_restart_grace_ends(
        cluster) -> None:  # noqa: ANN001
    """16,384 nodes at 500 heartbeats a second: told ~33 s, a ~98 s silence timeout, the stored
    contact written every ~295 s and read as stale past ~393 s. The old leader wrote two nodes'
    stored contact just before it went; they never come over. Past the new leader's restart grace
    (120 s) they are suspect, their silence counted from its start, not ~390 s after that write;
    the two nodes that came over (connected, up) are left alone."""
    pacing = HeartbeatPacing(10, 500)
    policy = LivenessPolicy(heartbeat_timeout_s=10, restart_grace_s=120)
    silence_timeout_s = pacing.silence_timeout_s(pacing.interval_ms(16_384))
    assert policy.stored_contact_stale_for(silence_timeout_s) > 390
    clock = [datetime.now(timezone.utc)]
    async with cluster.unit_of_work() as uow:
        for node in (await uow.session.execute(select(m.Node))).scalars():
            node.health, node.last_heartbeat_at = m.NodeHealth.UP, clock[0] - timedelta(seconds=5)
        await uow.commit()
    came_over = frozenset({"rack-b-n0", "rack-b-n1"})
    cycle = NodeLifecycle(cluster, policy, connected=lambda: came_over, damper=FlapDamper(), on_change=lambda: None,
                          silence_timeout_s=lambda: silence_timeout_s, wall_clock=lambda: clock[0])
    cycle.lead()
    clock[0] += timedelta(seconds=policy.restart_grace_s - 1)
    assert await cycle.pass_once() == []  # within the grace: nobody
    clock[0] += timedelta(seconds=2)
    changes = await cycle.pass_once()
    assert sorted((c.node_id, c.health) for c in changes) == [("rack-a-n0", "suspect"), ("rack-a-n1", "suspect")]
    assert all("121s" in c.why for c in changes)


async def test_a_stated_interval_counts_in_the_stored_contacts_cadence_only_as_far_as_the_connected_nodes_do(
        cluster) -> None:  # noqa: ANN001
    """One heartbeat a second, four nodes, each agent stating an hour (a hostile one, or one run with
    a long fixed interval; an hour is within 65,536 nodes' interval at this cap). Each stream is
    judged by what its agent states (bounded). The longest silence timeout, by which every node's
    stored contact is written and read as stale (`LivenessPolicy.contact_write_every_for`,
    `stored_contact_stale_for`), follows the nodes connected: a lone agent's hour would otherwise
    have made every node's stored contact hours old for the rest of the controller's life (the
    longest one told never shrinks), and a node left up with no stream (its Hello written as its
    connection died) found that late instead of within ~40 s."""
    hub = AgentHub(cluster, heartbeat_timeout_s=10, max_heartbeats_per_second=1.0, on_liveness_change=lambda: None,
                   on_deployments_changed=lambda views: asyncio.sleep(0))
    async with cluster.unit_of_work() as uow:
        sessions = {node.id: node.session_id for node in (await uow.session.execute(select(m.Node))).scalars()}
    longest_s = []
    streams = []
    for node_id, session_id in sorted(sessions.items()):
        streams.append(hub.converse(WHO, node_id, session_id, quiet_agent(), heartbeat_interval_ms=3_600_000))
        await anext(streams[-1])
        assert hub._sessions[node_id].timeout_s == 3 * 3_600
        longest_s.append(hub.longest_silence_timeout_s())
    assert longest_s == [10.0, 10.0, 10.0, 12.0]  # the timeout, then three of four nodes' interval (4 s)
    for stream in streams:
        await stream.aclose()
