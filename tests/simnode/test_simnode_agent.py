"""The node agent state machine, driven with a fake clock: no gRPC, no sleeping."""
from __future__ import annotations

import pytest

from controller.simnode.agent import DesiredShard, DesiredState, NodeAgent, Phase, ShardKey
from controller.simnode.fleet import FleetShape
from controller.simnode.transport import Backoff

A0 = ShardKey("claude", 0, 0)
A1 = ShardKey("claude", 0, 1)
B0 = ShardKey("embed", 0, 0)


def shard(key: ShardKey, indices: tuple[int, ...] = (0,), milli: int = 0, power: float = 700.0,
          generation: int = 1) -> DesiredShard:
    return DesiredShard(key=key, tenant="t", accelerator_indices=indices, accelerator_milli=milli,
                        accelerators=1 if milli else len(indices), power_w=power, generation=generation)


def agent(load_delay: float = 1.0) -> NodeAgent:
    return NodeAgent("rack-00-n00", idle_power_w=600.0, load_delay_s=load_delay)


def test_new_assignment_loads_at_once_and_runs_after_the_delay() -> None:
    a = agent(load_delay=2.0)
    reports = a.apply(DesiredState(1, (shard(A0, (0,)), shard(A1, (1,)))), now=10.0)
    assert [(r.key, r.phase) for r in reports] == [(A0, Phase.LOADING), (A1, Phase.LOADING)]
    assert a.next_deadline() == 12.0
    assert a.tick(11.9) == []
    running = a.tick(12.0)
    assert [(r.key, r.phase) for r in running] == [(A0, Phase.RUNNING), (A1, Phase.RUNNING)]
    assert a.next_deadline() is None
    assert a.tick(20.0) == []  # nothing changes twice


def test_shard_missing_from_the_set_is_stopped_and_forgotten() -> None:
    a = agent(load_delay=0.0)
    a.apply(DesiredState(1, (shard(A0, (0,)), shard(B0, (1,)))), now=0.0)
    a.tick(0.0)
    reports = a.apply(DesiredState(2, (shard(B0, (1,)),)), now=1.0)
    assert [(r.key, r.phase, r.power_draw_w) for r in reports] == [(A0, Phase.STOPPED, 0.0)]
    assert [r.key for r in a.reports()] == [B0]
    assert a.phase_of(A0) is None
    assert a.phase_of(B0) is Phase.RUNNING


def test_stale_generation_is_ignored() -> None:
    a = agent(load_delay=0.0)
    a.apply(DesiredState(5, (shard(A0),)), now=0.0)
    reports = a.apply(DesiredState(4, ()), now=1.0)
    assert reports == []
    assert a.stale_ignored == 1
    assert a.last_generation == 5
    assert a.phase_of(A0) is Phase.LOADING


def test_same_generation_again_is_a_no_op() -> None:
    a = agent(load_delay=0.0)
    state = DesiredState(3, (shard(A0),))
    a.apply(state, now=0.0)
    a.tick(0.0)
    assert a.apply(state, now=1.0) == []
    assert a.phase_of(A0) is Phase.RUNNING


def test_first_set_of_a_new_session_is_accepted_whatever_its_generation() -> None:
    a = agent(load_delay=0.0)
    a.apply(DesiredState(9, (shard(A0),)), now=0.0)
    a.begin_session()
    reports = a.apply(DesiredState(2, ()), now=1.0)
    assert [(r.key, r.phase) for r in reports] == [(A0, Phase.STOPPED)]
    assert a.last_generation == 2
    assert a.apply(DesiredState(1, (shard(A0),)), now=2.0) == []  # stale again afterwards


def test_moved_shard_reloads_and_same_slot_new_generation_keeps_running() -> None:
    a = agent(load_delay=1.0)
    a.apply(DesiredState(1, (shard(A0, (0,)),)), now=0.0)
    a.tick(1.0)
    same_slot = a.apply(DesiredState(2, (shard(A0, (0,), generation=2),)), now=2.0)
    assert [(r.phase, r.generation) for r in same_slot] == [(Phase.RUNNING, 2)]
    moved = a.apply(DesiredState(3, (shard(A0, (3,), generation=3),)), now=3.0)
    assert [(r.phase, r.generation) for r in moved] == [(Phase.LOADING, 3)]


def test_the_same_shard_of_another_deployment_is_started_anew_and_reported_as_its() -> None:
    """A deployment deleted and submitted again under its name is another (its uid): its shard in
    the same slot, with the same generation, is another model server, loaded anew (the old one's
    FAILED or RUNNING stood for it), and every report names the uid it answers."""
    from dataclasses import replace

    a = agent(load_delay=0.0)
    old = replace(shard(A0, (0,)), deployment_uid=7)
    a.apply(DesiredState(1, (old,)), now=0.0)
    assert [(r.phase, r.deployment_uid) for r in a.tick(0.0)] == [(Phase.RUNNING, 7)]
    reports = a.apply(DesiredState(2, (replace(old, deployment_uid=9),)), now=1.0)
    assert [(r.key, r.phase, r.generation, r.deployment_uid) for r in reports] == [(A0, Phase.LOADING, 1, 9)]
    assert [(r.phase, r.deployment_uid) for r in a.tick(1.0)] == [(Phase.RUNNING, 9)]


def test_a_shard_held_or_assigned_without_a_uid_is_adopted_not_restarted() -> None:
    """A uid of 0 is not known (a controller that sends none): the running shard is kept, under
    the uid now given, at an upgrade, and at a failover to a controller of the version before."""
    from dataclasses import replace

    a = agent(load_delay=0.0)
    a.apply(DesiredState(1, (shard(A0, (0,)),)), now=0.0)
    a.tick(0.0)
    for generation, uid in ((2, 42), (3, 0)):
        reports = a.apply(DesiredState(generation, (replace(shard(A0, (0,)), deployment_uid=uid),)), now=1.0)
        assert [(r.phase, r.deployment_uid) for r in reports] == [(Phase.RUNNING, uid)]


def test_power_draw_is_idle_plus_running_shards_with_fractions_pro_rata() -> None:
    a = agent(load_delay=1.0)
    a.apply(DesiredState(1, (
        shard(A0, (0, 1), power=700.0),          # 2 whole accelerators: 1400 W
        shard(B0, (2,), milli=500, power=600.0),  # half an accelerator: 300 W
    )), now=0.0)
    assert a.power_draw_w() == 600.0  # loading shards draw nothing yet
    a.tick(1.0)
    assert a.power_draw_w() == pytest.approx(600.0 + 1400.0 + 300.0)
    by_key = {r.key: r.power_draw_w for r in a.reports()}
    assert by_key == {A0: 1400.0, B0: 300.0}


def test_crash_forgets_everything() -> None:
    a = agent(load_delay=0.0)
    a.apply(DesiredState(7, (shard(A0),)), now=0.0)
    a.crash()
    assert a.reports() == []
    assert a.power_draw_w() == 600.0
    assert a.apply(DesiredState(1, (shard(A0),)), now=1.0)[0].phase is Phase.LOADING


def test_fleet_names_racks_and_nodes() -> None:
    specs = FleetShape(racks=4, nodes_per_rack=16).node_specs()
    assert len(specs) == 64
    assert specs[0].node_id == "rack-00-n00" and specs[0].rack == "rack-00"
    assert specs[-1].node_id == "rack-03-n15" and specs[-1].rack == "rack-03"
    assert len({s.node_id for s in specs}) == 64


def test_backoff_grows_with_jitter_up_to_the_maximum_and_resets() -> None:
    import random

    b = Backoff(initial_s=0.5, maximum_s=4.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    for d, c in zip(delays, ceilings):
        assert c / 2 <= d <= c
    b.reset()
    assert b.next_delay() <= 0.5


def test_backoff_at_its_maximum_for_hours_stays_there() -> None:
    """Past the maximum the exponent grows no more: its 1,024th delay (~3 h without a controller
    at 15 s) raised OverflowError, and every node of the fleet ended with it."""
    import random

    b = Backoff(initial_s=0.5, maximum_s=15.0, rng=random.Random(2))
    delays = [b.next_delay() for _ in range(5000)]
    assert all(7.5 <= d <= 15.0 for d in delays[10:])
    b.reset()
    assert b.next_delay() <= 0.5


def test_a_failed_shard_reports_its_message_until_assigned_anew() -> None:
    a = agent(load_delay=0.0)
    a.apply(DesiredState(1, (shard(A0, (0,)), shard(A1, (1,)))), now=0.0)
    a.tick(0.0)
    report = a.fail(A0, "model server crashed", now=1.0)
    assert report is not None and (report.phase, report.message, report.power_draw_w) == (
        Phase.FAILED, "model server crashed", 0.0)
    assert a.fail(A0, "again", now=1.5) is None  # failed already
    assert a.fail(B0, "not held", now=1.5) is None
    assert {(r.key, r.phase, r.message) for r in a.reports()} == {
        (A0, Phase.FAILED, "model server crashed"), (A1, Phase.RUNNING, "")}
    assert a.apply(DesiredState(2, (shard(A0, (0,)), shard(A1, (1,)))), now=2.0) == []  # same set: stays failed
    restarted = a.apply(DesiredState(3, (shard(A0, (0,), generation=2), shard(A1, (1,)))), now=3.0)
    assert [(r.key, r.phase) for r in restarted] == [(A0, Phase.LOADING)]


def test_a_load_failure_rule_fails_matching_loads_instead_of_running_them() -> None:
    a = agent(load_delay=1.0)
    a.load_failure = lambda key: "out of HBM" if key.deployment == "claude" else None
    a.apply(DesiredState(1, (shard(A0, (0,)), shard(B0, (1,)))), now=0.0)
    done = a.tick(1.0)
    assert [(r.key, r.phase, r.message) for r in done] == [(A0, Phase.FAILED, "out of HBM"), (B0, Phase.RUNNING, "")]
    assert a.next_deadline() is None


def test_the_fleet_finds_the_controller_where_maiactl_does(monkeypatch) -> None:
    """maia-simnode ignored $MAIA_CONTROLLER, which maiactl reads: a fleet started beside a
    configured maiactl retried 'connection refused' against 127.0.0.1:50051 without a word."""
    from controller.simnode.main import build_parser

    required = ["--racks", "1", "--nodes-per-rack", "1"]
    monkeypatch.delenv("MAIA_CONTROLLER", raising=False)
    assert build_parser().parse_args(required).controller == "127.0.0.1:50051"
    monkeypatch.setenv("MAIA_CONTROLLER", "10.0.0.7:51072")
    assert build_parser().parse_args(required).controller == "10.0.0.7:51072"
    assert build_parser().parse_args([*required, "--controller", "h:1"]).controller == "h:1"  # the flag wins
