"""The node-liveness rules (domain/liveness.py), table-driven on plain values: no database, no clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from controller.domain.liveness import (
    EvictionLimiter, FlapDamper, LivenessPolicy, NodeLiveness, eviction_candidates, health_changes, zone_rates,
)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
POLICY = LivenessPolicy(heartbeat_timeout_s=10, down_grace_s=30, eviction_grace_s=90, restart_grace_s=60,
                        eviction_rate=2, unhealthy_zone_threshold=0.55, unhealthy_zone_rate=0.5)
STARTED = T0 - timedelta(hours=1)  # the controller runs for an hour already


def N(node_id: str, health: str = "up", silent_s: float | None = 0.0, *, zone: str = "z1", evicted: bool = False,
      connected: bool = False) -> NodeLiveness:
    last = None if silent_s is None else T0 - timedelta(seconds=silent_s)
    return NodeLiveness(node_id, zone, health, last, evicted, connected)


@pytest.mark.parametrize(("node", "expected"), [
    pytest.param(N("a", "up", 5), None, id="up, within the heartbeat timeout"),
    pytest.param(N("a", "up", 11), "suspect", id="up, silent past the heartbeat timeout"),
    pytest.param(N("a", "suspect", 29), None, id="suspect, within the down grace"),
    pytest.param(N("a", "suspect", 31), "down", id="suspect past the down grace"),
    pytest.param(N("a", "down", 500), None, id="down stays down (eviction is separate)"),
    pytest.param(N("a", "suspect", 500, connected=True), "up", id="connected again"),
    pytest.param(N("a", "down", None), None, id="never heard from"),
])
def test_health_changes(node: NodeLiveness, expected: str | None) -> None:
    changes = health_changes([node], T0, STARTED, POLICY, damped=set())
    assert [c.health for c in changes] == ([expected] if expected else [])


def test_a_damped_node_stays_suspect_while_connected() -> None:
    assert health_changes([N("a", "suspect", 0, connected=True)], T0, STARTED, POLICY, damped={"a"}) == []


def test_after_a_restart_nothing_is_suspected_and_silence_counts_from_the_start() -> None:
    started = T0 - timedelta(seconds=50)  # within the 60 s restart grace
    herd = [N(f"n{i}", "up", 3600) for i in range(4)] + [N("back", "suspect", 3600, connected=True)]
    assert [(c.node_id, c.health) for c in health_changes(herd, T0, started, POLICY, set())] == [("back", "up")]
    assert eviction_candidates([N("d", "down", 3600)], T0, started, POLICY) == []
    later = started + timedelta(seconds=61)  # past the grace: silent 61 s since the start, not an hour
    assert [c.health for c in health_changes(herd[:1], later, started, POLICY, set())] == ["suspect"]
    assert eviction_candidates([N("d", "down", 3600)], later, started, POLICY) == []


def test_eviction_candidates_are_down_silent_past_the_grace_and_not_yet_evicted() -> None:
    nodes = [N("old", "down", 200), N("older", "down", 300), N("recent", "down", 60), N("done", "down", 300, evicted=True),
             N("suspect", "suspect", 300), N("back", "down", 300, connected=True)]
    assert [n.node_id for n in eviction_candidates(nodes, T0, STARTED, POLICY)] == ["older", "old"]


@pytest.mark.parametrize(("zones", "expected"), [
    pytest.param({"z1": (10, 1), "z2": (10, 0)}, {"z1": 2, "z2": 2}, id="healthy zones: the normal rate"),
    pytest.param({"z1": (10, 6), "z2": (10, 0)}, {"z1": 0.5, "z2": 2}, id="most of z1 not up: slow there"),
    pytest.param({"z1": (10, 10), "z2": (10, 1)}, {"z1": 2, "z2": 2}, id="all of z1 gone, z2 fine: z1 is dead"),
    pytest.param({"z1": (10, 10), "z2": (10, 10)}, {"z1": 0, "z2": 0}, id="nothing up anywhere: no eviction"),
    pytest.param({"z1": (1, 1), "z2": (1, 0)}, {"z1": 2, "z2": 2}, id="one node is not a partial outage"),
])
def test_zone_rates(zones: dict[str, tuple[int, int]], expected: dict[str, float]) -> None:
    nodes = [N(f"{z}-{i}", "down" if i < bad else "up", zone=z) for z, (total, bad) in zones.items()
             for i in range(total)]
    assert zone_rates(nodes, POLICY) == expected


def test_the_eviction_limiter_spends_one_bucket_per_zone() -> None:
    limiter = EvictionLimiter()
    assert [limiter.allow("z1", 2.0, 0.0) for _ in range(3)] == [True, True, False]  # burst 2
    assert limiter.allow("z2", 2.0, 0.0)                                               # z2 has its own
    assert limiter.allow("z1", 2.0, 0.5) and not limiter.allow("z1", 2.0, 0.5)        # 2 a second
    assert not limiter.allow("z3", 0.0, 100.0)                                         # rate 0: never


def test_a_zone_whose_rate_changes_keeps_what_it_spent() -> None:
    """A zone hovering at the unhealthy threshold (a node flapping) switches between the two
    rates pass after pass: each switch made a fresh bucket with a full burst, and the zone turning
    unhealthy, which should slow evictions, granted one at once (20 in 20 s at 0.1 and 0.01 a
    second; found in review)."""
    limiter = EvictionLimiter()
    allowed = sum(limiter.allow("z1", 0.1 if second % 2 == 0 else 0.01, 1000.0 + second) for second in range(20))
    assert allowed <= 3  # the burst (1) and at most 20 s x 0.1 a second
    limiter = EvictionLimiter()
    assert limiter.allow("z1", 0.5, 0.0) and not limiter.allow("z1", 0.25, 0.0)  # the one token spent stays spent
    assert limiter.allow("z1", 0.25, 4.0)  # 4 s at 0.25 a second: one more
    assert [limiter.allow("z1", 5.0, 4.0) for _ in range(2)] == [False, False]  # a faster rate holds no more yet
    assert limiter.allow("z1", 5.0, 4.2) and not limiter.allow("z1", 0.5, 4.2)


def test_flapping_is_damped_until_the_penalty_decays() -> None:
    damper = FlapDamper(half_life_s=60, suppress=2.5, reuse=1)
    damper.dropped("a", 0.0)
    assert not damper.returns_damped("a", 1.0)  # one drop is no flapping
    damper.dropped("a", 2.0)
    damper.dropped("a", 3.0)
    assert damper.returns_damped("a", 4.0)      # three in a few seconds
    assert damper.damped(60.0) == {"a"}          # still about 1.5
    assert damper.damped(130.0) == set()         # halved twice: below 1
    assert not damper.returns_damped("a", 131.0)
