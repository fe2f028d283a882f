"""A drain keeps a deployment's spread while both the replica being replaced and its replacement
run (docs/rollout.md, "Spread during a rollout or a drain"), end to end with real agents:
4 racks x 4 nodes, one rack left free, the replacement goes there rather than beside the
draining replica in its own rack (which best fit prefers)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from grpc_harness import RUNNING, SimFleet, Stubs, eventually, running_fleet, spec
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

RACKS = {f"rack-0{r}": "row-a" for r in range(4)}
P = deployments_pb2


@pytest.fixture
async def fleet(stubs: Stubs, controller_app, tmp_path: Path) -> AsyncIterator[SimFleet]:
    async with running_fleet(stubs, controller_app, tmp_path, RACKS, tenants=("beta",)) as sim:
        yield sim


def _rack(node: str) -> str:
    return node.rsplit("-", 1)[0]


def _per_rack(d: P.Deployment) -> Counter[str]:
    """Replicas (outgoing ones included: they are stored until stopped) per rack."""
    return Counter(_rack(node) for node in {p.replica: p.node for p in d.placements}.values())


async def test_a_drain_places_the_replacement_in_a_rack_without_a_replica(stubs: Stubs, fleet: SimFleet):
    roll = spec("roll", "beta", replicas=3, shards=2, accelerators=4,
                spread=common_pb2.Spread(domain=common_pb2.DOMAIN_RACK, max_per_domain=1))
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=roll))
    get = lambda: stubs.deployments.GetDeployment(P.GetDeploymentRequest(name="roll", tenant="beta"))  # noqa: E731
    running = await eventually(get, lambda d: d.phase == RUNNING, what="roll running")
    before = _per_rack(running)
    assert max(before.values()) == 1 and len(before) == 3
    [free] = set(RACKS) - set(before)
    victim = sorted(p.node for p in running.placements)[0]

    await stubs.admin.DrainNode(admin_pb2.NodeRequest(id=victim))
    seen: list[Counter[str]] = []

    def replaced(d: P.Deployment) -> bool:
        seen.append(_per_rack(d))
        return d.outgoing_replicas == 0 and d.phase == RUNNING and victim not in {p.node for p in d.placements}

    done = await eventually(get, replaced, timeout=60, what="roll replaced off the drained node")
    assert all(max(counts.values()) == 1 for counts in seen), seen  # never two in one rack meanwhile
    assert set(_per_rack(done)) == set(before) - {_rack(victim)} | {free}
