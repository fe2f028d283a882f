"""The simulated cluster and what is asked of it: its shape (racks of `NODES_PER_RACK` nodes split
among the fleets), the workload of singles and gangs over enough tenants, and the admin calls
that set it up (topology, tenants, a node token) and wait for its nodes to join."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.preload import Layout

NODES_PER_RACK = 16
GANG_SIZES = (8, 16, 32, 64)
PER_TENANT = 400  # submitted deployments per tenant, at most (under limits.DEPLOYMENTS_PER_TENANT_MAX)
MIN_TENANTS = 4
TENANTS = ("lab-a", "lab-b", "lab-c", "lab-d")  # bench nodedeath's


@dataclass(frozen=True)
class Shape:
    nodes: int
    fleets: int
    preloaded: int = 0  # placements (single-shard deployments) written before the start

    @property
    def racks(self) -> int:
        return self.nodes // NODES_PER_RACK

    def fleet_racks(self) -> list[tuple[str, int]]:
        """(rack prefix, racks) per simnode process."""
        per, extra = divmod(self.racks, self.fleets)
        return [(f"f{i}-rack-", per + (1 if i < extra else 0)) for i in range(self.fleets)]

    def layout(self) -> Layout:
        return Layout(tuple(self.fleet_racks()), NODES_PER_RACK)

    def topology(self) -> Any:
        from maia.v1 import admin_pb2
        layout = self.layout()
        rows = layout.rows()
        return admin_pb2.Topology(
            zones=[admin_pb2.Zone(id=z) for z in dict.fromkeys(rows.values())],
            rows=[admin_pb2.Row(id=r, zone=z) for r, z in rows.items()],
            racks=[admin_pb2.Rack(id=k, row=r) for k, r in layout.rack_rows().items()])


@dataclass(frozen=True)
class Work:
    name: str
    tenant: str
    shards: int  # one replica of this many one-accelerator shards

    def spec(self) -> Any:
        from maia.v1 import common_pb2, deployments_pb2
        return deployments_pb2.DeploymentSpec(
            name=self.name, tenant=self.tenant, replicas=1, shards_per_replica=self.shards,
            shard=common_pb2.ShardSpec(accelerators=1, hbm_gib=16, power_w=300),
            locality=common_pb2.DOMAIN_NODE if self.shards == 1 else common_pb2.DOMAIN_ROW)


def tenants_for(shape: Shape, args: argparse.Namespace) -> list[str]:
    """Enough tenants that none is sent more than `PER_TENANT` deployments (an upper bound: as
    if every accelerator asked for were a deployment of its own)."""
    count = max(MIN_TENANTS, -(-int((shape.nodes * 4 - shape.preloaded) * args.fill) // PER_TENANT))
    return [f"lab-{i:03d}" for i in range(count)]


def workload(shape: Shape, args: argparse.Namespace) -> list[Work]:
    """Singles and gangs in a random arrival order, asking for `fill` of the accelerators the
    preload left free; the tenants in turn."""
    rng = random.Random(args.seed)
    tenants = tenants_for(shape, args)
    wanted = int((shape.nodes * 4 - shape.preloaded) * args.fill)
    gang_accels = int(wanted * args.gang_share)
    sizes: list[int] = []
    while sum(sizes) + min(GANG_SIZES) <= gang_accels:
        sizes.append(rng.choice([s for s in GANG_SIZES if sum(sizes) + s <= gang_accels]))
    sizes += [1] * (wanted - sum(sizes))
    rng.shuffle(sizes)
    return [Work(f"gang-{i:05d}" if size > 1 else f"one-{i:06d}", tenants[i % len(tenants)], size)
            for i, size in enumerate(sizes)]


async def admin_setup(channel: Any, shape: Shape, tenants: Sequence[str] = TENANTS) -> str:
    """Topology and tenants (unless preloaded); returns a node-bootstrap token."""
    from maia.v1 import admin_pb2, admin_pb2_grpc, common_pb2
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    if not shape.preloaded:
        await admin.ApplyTopology(shape.topology())
        for tenant in tenants:
            await admin.CreateTenant(admin_pb2.Tenant(id=tenant, isolation=common_pb2.ISOLATION_SHARED))
    return (await admin.CreateToken(admin_pb2.CreateTokenRequest(role="node-bootstrap"))).secret


async def wait_connected(channel: Any, nodes: int, timeout_s: float,
                         ready_now: list[int] | None = None) -> tuple[float, int]:
    """(seconds, nodes ready): all of them, or as many as made it within `timeout_s`
    (`ready_now[0]`: the last count, for whoever reports progress meanwhile)."""
    import grpc
    from maia.v1 import admin_pb2, admin_pb2_grpc
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    started = time.perf_counter()
    ready = 0
    while time.perf_counter() - started < timeout_s:
        try:
            ready = (await admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest(), timeout=30)).nodes_ready
        except grpc.aio.AioRpcError:  # a controller busy with a join storm: ask again
            pass
        if ready_now is not None:
            ready_now[0] = ready
        if ready >= nodes:
            break
        await asyncio.sleep(0.5)
    return time.perf_counter() - started, ready
