"""The deployment phase rule (domain/phases), table-driven: no database."""

from __future__ import annotations

import pytest

from controller.domain.phases import ReplicaCounts, deployment_phase, replica_counts


@pytest.mark.parametrize(
    ("shards", "counts"),
    [
        ([], ReplicaCounts(0, 0)),
        ([(0, "running"), (0, "running")], ReplicaCounts(1, 1)),
        ([(0, "running"), (0, "loading"), (1, "running"), (1, "running")], ReplicaCounts(2, 1)),
        ([(0, "running")], ReplicaCounts(0, 0)),  # half a gang is not a placed replica
        ([(0, "running"), (0, "unknown"), (1, "running"), (1, "running")], ReplicaCounts(2, 1, unknown=1)),
    ],
)
def test_replica_counts_count_whole_gangs(shards, counts):
    assert replica_counts(2, shards) == counts


@pytest.mark.parametrize(
    ("replicas", "counts", "deleting", "phase"),
    [
        (2, ReplicaCounts(0, 0), False, "pending"),
        (2, ReplicaCounts(2, 1), False, "scheduled"),
        (2, ReplicaCounts(1, 0), False, "scheduled"),
        (2, ReplicaCounts(2, 2), False, "running"),
        (2, ReplicaCounts(1, 1), False, "degraded"),
        (2, ReplicaCounts(2, 2), True, "deleting"),
        (2, ReplicaCounts(0, 0), True, "deleting"),
        # a replica on a node that is down: degraded, whatever else runs or starts
        (2, ReplicaCounts(2, 1, unknown=1), False, "degraded"),
        (1, ReplicaCounts(1, 0, unknown=1), False, "degraded"),
        (2, ReplicaCounts(2, 0, unknown=2), True, "deleting"),
    ],
)
def test_deployment_phase(replicas, counts, deleting, phase):
    assert deployment_phase(replicas, counts, deleting=deleting) == phase


@pytest.mark.parametrize(
    ("replicas", "min_replicas", "counts", "failed", "failing", "phase"),
    [
        (3, 1, ReplicaCounts(3, 2, failed=1), False, False, "degraded"),   # a shard failed, 2 >= min run
        (3, 3, ReplicaCounts(3, 2, failed=1), False, False, "scheduled"),  # below min_replicas: not degraded
        (2, 1, ReplicaCounts(2, 0, failed=2), False, False, "scheduled"),  # nothing runs
        (2, 1, ReplicaCounts(2, 1), False, True, "degraded"),   # the failed replica is being placed again
        (2, 1, ReplicaCounts(2, 2), False, True, "running"),    # running again
        (2, 1, ReplicaCounts(2, 1, failed=1), True, True, "failed"),  # given up: sticky
    ],
)
def test_failed_shards_make_a_deployment_degraded_or_failed(replicas, min_replicas, counts, failed, failing, phase):
    assert deployment_phase(replicas, counts, failed=failed, failing=failing, min_replicas=min_replicas) == phase


def test_replica_counts_count_replicas_with_a_failed_shard():
    assert replica_counts(2, [(0, "running"), (0, "failed"), (1, "running"), (1, "running")]) == \
        ReplicaCounts(2, 1, failed=1)
