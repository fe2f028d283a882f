"""Why a gang larger than any domain waits, worded for a person: with no locality the cluster
is the one domain, so its room is the reason (CAPACITY), not a locality "none"; a row or zone the
document left out is not named by its internal id."""

from __future__ import annotations

import pytest

from scheduler import problem_from_dict, solve


def _why(locality: str) -> list[tuple[str, str, str | None]]:
    doc = {"version": 1, "nodes": [{"id": f"n{i}", "rack": "r0" if i < 2 else "r1", "accelerators": 4}
                                   for i in range(4)],
           "deployments": [{"id": "t/g", "tenant": "t", "replicas": 1, "shards_per_replica": 17,
                            "shard": {"accelerators": 1}, "locality": locality}]}
    plan = solve(problem_from_dict(doc))
    return [(r.code, r.message, r.scope) for u in plan.unplaced for r in u.reasons]


@pytest.mark.parametrize("locality, why", [
    ("none", [("CAPACITY", "a replica needs 17 shards; the cluster has room for 16 now", None)]),
    ("zone", [("LOCALITY", "locality zone: a replica needs 17 shards in one zone; the best, the only zone "
                           "(none declared), has room for 16", None)]),  # was "the best, _zone, ..."
    ("rack", [("LOCALITY", "locality rack: a replica needs 17 shards in one rack; the best, r0, has room for 8",
               "r0")]),
])
def test_a_gang_larger_than_any_domain_says_why_in_words(locality: str, why: list) -> None:
    assert _why(locality) == why
