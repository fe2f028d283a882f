"""The back-off and give-up rules for replicas whose shards FAILED (domain/restarts), no database."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from controller.domain.restarts import SHARD_FAILED, RestartPolicy, failure_reason, failure_reasons, with_failure

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(("failures", "delay"), [(1, 5), (2, 10), (3, 20), (6, 160), (7, 300), (50, 300)])
def test_the_back_off_doubles_up_to_its_cap(failures, delay):
    assert RestartPolicy().delay_s(failures) == delay


@pytest.mark.parametrize(
    ("failures", "last_failure", "counted"),
    [
        (0, None, 1),                           # the first failure
        (3, T0 - timedelta(seconds=30), 4),     # failing again soon: one more in a row
        (3, T0 - timedelta(seconds=600), 1),    # ran 10 min without failing: starts over
    ],
)
def test_failures_in_a_row_start_over_after_a_quiet_while(failures, last_failure, counted):
    assert RestartPolicy().failures_after(failures, last_failure, T0) == counted


def test_the_controller_gives_up_past_the_limit():
    policy = RestartPolicy(limit=3)
    assert [policy.gives_up(n) for n in (1, 3, 4)] == [False, False, True]


def test_a_policy_out_of_range_is_refused():
    with pytest.raises(ValueError):
        RestartPolicy(initial_delay_s=10, max_delay_s=5)


def test_the_latest_failure_replaces_the_previous_reason_and_keeps_the_others():
    unplaced = {"code": "CAPACITY", "message": "0/4 nodes fit", "scope": ""}
    first = failure_reason(0, 1, "n1", "CUDA error")
    second = failure_reason(2, 0, "n3", "  ")
    reasons = with_failure(with_failure([unplaced], first), second)
    assert reasons == [{"code": SHARD_FAILED, "scope": "node n3", "message": "replica 2 shard 0 failed on n3: no message"},
                       unplaced]
    assert failure_reasons(reasons) == [reasons[0]]
