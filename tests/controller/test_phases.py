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
    ],
)
def test_deployment_phase(replicas, counts, deleting, phase):
    assert deployment_phase(replicas, counts, deleting=deleting) == phase
