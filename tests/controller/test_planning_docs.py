"""`planning.deployment_doc` and `planning.spec_of_doc` are inverses: a deployment's spec kept as
an interchange document (an older revision's, in `revision_specs`, through JSON) reads back as
the spec it was, field for field and type for type."""

from __future__ import annotations

import dataclasses
import json

import pytest

from controller.domain.values import DeploymentSpec, ShardSpec, Spread
from controller.usecases import planning


@pytest.mark.parametrize("spec", [
    DeploymentSpec(name="web", tenant="a", replicas=2, shards_per_replica=1,
                   shard=ShardSpec(accelerators=1, accelerator_milli=500)),
    DeploymentSpec(name="train", tenant="b", replicas=4, shards_per_replica=8,
                   shard=ShardSpec(accelerators=8, hbm_gib=80.0, cpu_milli=16000, memory_mib=131072,
                                   power_w=700.0, accelerator_models=("maia-100",)),
                   min_replicas=3, locality="row", spread=Spread("zone", 2), priority=7, preemptible=True),
])
def test_a_spec_reads_back_from_its_document(spec: DeploymentSpec) -> None:
    doc = json.loads(json.dumps(planning.deployment_doc(spec)))
    assert doc["id"] == spec.key
    back = planning.spec_of_doc(doc)
    assert back == spec
    assert repr(back) == repr(spec)


@pytest.mark.parametrize("replace", [False, True])
def test_a_deployment_added_to_a_problem_leaves_the_problem_as_it_was(replace: bool) -> None:
    """`with_deployment` (the dry run's what-if) gives a new document with the spec added (with
    `replace`, instead of the deployment of its key; a shape change drops that one's placements);
    the problem it was given keeps its lists and their contents unchanged."""
    stored = DeploymentSpec(name="web", tenant="a", replicas=1, shards_per_replica=1, shard=ShardSpec(accelerators=1))
    spec = dataclasses.replace(stored, shard=ShardSpec(accelerators=2))
    problem = {
        "nodes": [{"id": "n1", "rack": "r1", "state": "ready", "accelerators": 4}],
        "deployments": [planning.deployment_doc(stored), {"id": "b/other", "replicas": 1}],
        "placements": [{"deployment": spec.key, "replica": 0, "shard": 0, "node": "n1"},
                       {"deployment": "b/other", "replica": 0, "shard": 0, "node": "n1"}],
    }
    before = json.loads(json.dumps(problem))
    lists = {key: problem[key] for key in ("nodes", "deployments", "placements")}
    doc = planning.with_deployment(problem, spec, replace=replace)
    assert problem == before and all(problem[key] is value for key, value in lists.items())
    ids = [d["id"] for d in doc["deployments"]]
    assert ids == (["b/other", spec.key] if replace else [spec.key, "b/other", spec.key])
    assert doc["deployments"][-1] == planning.deployment_doc(spec)
    assert [p["deployment"] for p in doc["placements"]] == (["b/other"] if replace else [spec.key, "b/other"])
    assert doc["nodes"] is problem["nodes"]


@pytest.mark.parametrize(("change", "kept"), [
    ({}, [0, 1]), ({"replicas": 1}, [0]), ({"replicas": 3, "priority": 5, "preemptible": True}, [0, 1]),
    ({"min_replicas": 2}, [0, 1]), ({"shard": ShardSpec(accelerators=2)}, []), ({"locality": "node"}, []),
    ({"shards_per_replica": 2}, []),
])
def test_a_replacing_what_if_keeps_the_replicas_an_update_would_keep(change: dict, kept: list[int]) -> None:
    """A dry run of an update (`replace_existing`, `maiactl explain`'s variants) released every
    replica first: a running deployment re-applied as it is was answered "would place 0/2" when
    pending work took what it held. A change that does not roll keeps the replicas it keeps
    running, as the update does; one that rolls re-places them all (its shards released first)."""
    stored = DeploymentSpec(name="web", tenant="a", replicas=2, shards_per_replica=1, shard=ShardSpec(accelerators=1))
    problem = {
        "nodes": [{"id": "n1", "rack": "r1", "state": "ready", "accelerators": 4}],
        "deployments": [planning.deployment_doc(stored)],
        "placements": [{"deployment": stored.key, "replica": r, "shard": 0, "node": "n1"} for r in (0, 1)],
    }
    doc = planning.with_deployment(problem, dataclasses.replace(stored, **change), replace=True)
    assert [p["replica"] for p in doc["placements"]] == kept
