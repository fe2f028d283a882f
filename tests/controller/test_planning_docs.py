"""`planning.deployment_doc` and `planning.spec_of_doc` are inverses: a deployment's spec kept as
an interchange document (an older revision's, in `revision_specs`, through JSON) reads back as
the spec it was, field for field and type for type."""

from __future__ import annotations

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
