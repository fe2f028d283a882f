"""Node death: a real `maia-controller` (SQLite, or PostgreSQL with `--db postgres`), real
`maia-simnode` fleets, a share of the nodes killed at once through the fleets' fault injection
(`maia-simnode --control-socket`, docs/simnode.md).

The cluster is filled to `--fill` of its accelerators with multi-replica services (each replica
two one-accelerator shards on one node), every replica running. Then, for each share in
`--kill` (default 1 % and 10 %), that many nodes picked at random are killed together (their
agents cut their streams and lose their shards) and the run measures, from the controller's
node events (`ListEvents`, the controller's own timestamps) and its deployments:

- time to detect: kill -> `node.suspect` and -> `node.down` per node (p50/max);
- evictions: kill -> `node.evicted` per node, evictions a second per zone (the zone rate limit
  at work), the span from the first to the last;
- time until every evicted replica is placed again (no placement left on a killed node, every
  deployment fully placed) and Running, polled every `--poll` seconds;
- placements that moved although their node did not die (should be 0: valid placements stay).

The killed nodes are revived (they come back empty) before the next share is killed, and the
committed state is graded with the independent checker at the end.

    python -m bench nodedeath --nodes 4096 --kill 0.01 0.10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.e2e import NODES_PER_RACK, TENANTS, Process, Shape, admin_setup, database, grade, stop_all, wait_connected
from bench.fgd import percentile

SHARDS_PER_REPLICA = 2
REPLICAS_PER_DEPLOYMENT = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4096, help="simulated nodes (a multiple of 16)")
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite",
                   help="the controller's database: a SQLite file, or a throwaway PostgreSQL (bench/pgserver.py)")
    p.add_argument("--kill", type=float, nargs="+", default=[0.01, 0.10],
                   help="shares of the nodes killed at once, one round each")
    p.add_argument("--fill", type=float, default=0.5, help="share of the accelerators the services ask for")
    p.add_argument("--fleets", type=int, default=0, help="maia-simnode processes (0: one per 256 nodes)")
    p.add_argument("--node-down-grace", type=float, default=5.0, help="the controller's --node-down-grace")
    p.add_argument("--node-eviction-grace", type=float, default=10.0, help="the controller's --node-eviction-grace")
    p.add_argument("--eviction-rate", type=float, default=None, help="the controller's --eviction-rate (default: its own)")
    p.add_argument("--lease-ttl", type=float, default=None,
                   help="the controller's --lease-ttl (default: its own, 5 s); one SQLite controller on a loaded "
                        "machine can miss its own renewals during the join storm and step down (a finding)")
    p.add_argument("--load-delay", type=float, default=0.2, help="simnode LOADING -> RUNNING seconds")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between polls of events and deployments")
    p.add_argument("--timeout", type=float, default=600.0, help="give up on a round after this")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, SQLite file)")
    p.add_argument("--controller-log-level", default="WARNING",
                   help="the controller's --log-level (INFO: a line per reconcile pass in controller.log)")
    p.add_argument("--json", help="also write the results to this file")


# --- reading the controller ---------------------------------------------------------------------

Layout = dict[tuple[str, int, int], tuple[str, tuple[int, ...]]]  # (deployment, replica, shard) -> (node, indices)


@dataclass(frozen=True)
class ClusterView:
    layout: Layout
    incomplete: int  # deployments not fully placed or not Running

    def replicas_on(self, nodes: set[str]) -> set[tuple[str, int]]:
        return {(d, r) for (d, r, _), (node, _) in self.layout.items() if node in nodes}


async def read_cluster(stub: Any) -> ClusterView:
    """Every deployment's placements (all pages) and how many are not fully placed and Running."""
    from maia.v1 import deployments_pb2
    layout: Layout = {}
    incomplete = 0
    token = ""
    while True:
        page = await stub.ListDeployments(deployments_pb2.ListDeploymentsRequest(page_size=500, page_token=token),
                                          timeout=60)
        for d in page.deployments:
            incomplete += (d.placed_replicas < d.spec.replicas or d.running_replicas < d.spec.replicas
                           or d.phase != deployments_pb2.DEPLOYMENT_PHASE_RUNNING)
            for p in d.placements:
                layout[(d.spec.name, p.replica, p.shard)] = (p.node, tuple(p.accelerator_indices))
        token = page.next_page_token
        if not token:
            return ClusterView(layout, incomplete)


@dataclass(frozen=True)
class NodeEvent:
    id: int
    at: float  # wall clock, seconds
    kind: str
    node: str


class NodeEvents:
    """Node events as they come (ListEvents after the last id seen)."""

    def __init__(self, admin: Any) -> None:
        self._admin = admin
        self._after = 0
        self.events: list[NodeEvent] = []

    async def skip_past(self) -> None:
        """Start after everything already recorded."""
        await self.poll()
        self.events.clear()

    async def poll(self) -> None:
        from maia.v1 import admin_pb2
        reply = await self._admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", after_id=self._after,
                                                                         limit=1000), timeout=60)
        for e in sorted(reply.events, key=lambda e: e.id):
            self.events.append(NodeEvent(e.id, e.at.seconds + e.at.nanos / 1e9, e.kind, e.object_id))
            self._after = max(self._after, e.id)

    def first(self, kind: str, nodes: set[str]) -> dict[str, float]:
        """node -> when it first had an event of `kind` (among `nodes`)."""
        seen: dict[str, float] = {}
        for e in self.events:
            if e.kind == kind and e.node in nodes and e.node not in seen:
                seen[e.node] = e.at
        return seen


# --- the fleets -----------------------------------------------------------------------------------

@dataclass
class FleetProcess:
    process: Process
    control: Path
    node_ids: list[str]

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        from controller.simnode.faultcli import send
        answer = await asyncio.to_thread(send, self.control, request, 60.0)
        if not answer.get("ok"):
            raise RuntimeError(f"fault injection refused: {answer.get('error')}")
        return answer


async def inject(fleets: list[FleetProcess], op: str, nodes: set[str]) -> None:
    """`op` on `nodes`, every fleet asked at once."""
    await asyncio.gather(*(f.ask({"op": op, "nodes": sorted(nodes & set(f.node_ids))})
                           for f in fleets if nodes & set(f.node_ids)))


def start_fleet(i: int, prefix: str, racks: int, address: str, token: str, root: Path,
                options: list[str]) -> FleetProcess:
    """Fleet `i`: a `maia-simnode` process of `racks` racks named `prefix`..., controlled over a
    socket in `root`; `options`: more simnode flags (e.g. `--load-delay 0.2`)."""
    from controller.simnode.fleet import FleetShape
    control = root / f"fleet-{i}.sock"
    bin_dir = Path(sys.executable).parent
    process = Process(f"maia-simnode {i}", [
        str(bin_dir / "maia-simnode"), "--controller", address, "--racks", str(racks),
        "--nodes-per-rack", str(NODES_PER_RACK), "--rack-prefix", prefix, *options,
        "--state-dir", str(root / f"fleet-{i}"), "--control-socket", str(control), "--log-level", "WARNING"],
        root / f"simnode-{i}.log", env={"MAIA_TOKEN": token})
    ids = [s.node_id for s in FleetShape(racks, NODES_PER_RACK, rack_prefix=prefix).node_specs()]
    return FleetProcess(process, control, ids)


# --- one round --------------------------------------------------------------------------------------

def _spread(times: list[float]) -> dict[str, float]:
    if not times:
        return {"p50_s": 0.0, "max_s": 0.0}
    return {"p50_s": round(percentile(times, 50), 2), "max_s": round(max(times), 2)}


def eviction_rates(evicted: dict[str, float], zone_of: dict[str, str]) -> dict[str, Any]:
    """Evictions a second: the most in any one-second window per zone, and over the whole span."""
    by_zone: dict[str, list[float]] = defaultdict(list)
    for node, at in evicted.items():
        by_zone[zone_of.get(node, "?")].append(at)
    peak = 0
    for times in by_zone.values():
        times.sort()
        start = 0
        for end, t in enumerate(times):
            while t - times[start] >= 1.0:
                start += 1
            peak = max(peak, end - start + 1)
    span = max(evicted.values()) - min(evicted.values()) if evicted else 0.0
    return {"zones": len(by_zone), "peak_per_zone_per_s": peak, "span_s": round(span, 2),
            "overall_per_s": round(len(evicted) / span, 1) if span > 0 else float(len(evicted))}


async def one_round(share: float, fleets: list[FleetProcess], stub: Any, admin: Any, zone_of: dict[str, str],
                    rng: random.Random, args: argparse.Namespace) -> dict[str, Any]:
    all_nodes = sorted(n for f in fleets for n in f.node_ids)
    victims = set(rng.sample(all_nodes, max(1, round(len(all_nodes) * share))))
    before = await read_cluster(stub)
    hit = before.replicas_on(victims)
    holding = {node for node, _ in before.layout.values()} & victims
    events = NodeEvents(admin)
    await events.skip_past()

    started_wall, started = time.time(), time.perf_counter()
    await inject(fleets, "kill", victims)
    injected_s = time.perf_counter() - started
    placed_s = running_s = None
    after = before
    errors: list[str] = []
    while time.perf_counter() - started < args.timeout:
        await asyncio.sleep(args.poll)
        await events.poll()
        evicted = events.first("node.evicted", holding)
        if len(evicted) < len(holding):
            continue  # some killed node still holds work the solver counts on
        after = await read_cluster(stub)
        if placed_s is None and not after.replicas_on(victims) and len(after.layout) == len(before.layout):
            placed_s = time.perf_counter() - started
        if placed_s is not None and after.incomplete == 0:
            running_s = time.perf_counter() - started
            break
    else:
        errors.append(f"not every evicted replica Running again after {args.timeout:.0f} s")
    # The wait above is for the nodes holding work; a killed node that held none can still be on
    # its way to eviction (suspect -> down -> evicted): its events are counted too.
    await events.poll()
    while len(events.first("node.evicted", victims)) < len(victims) and time.perf_counter() - started < args.timeout:
        await asyncio.sleep(args.poll)
        await events.poll()

    suspect, down, evicted = (events.first(k, victims) for k in ("node.suspect", "node.down", "node.evicted"))
    moved_needlessly = sum(1 for key, where in before.layout.items()
                           if key[:2] not in hit and after.layout.get(key) != where)
    result = {
        "share": share, "killed": len(victims), "holding_work": len(holding), "replicas_hit": len(hit),
        "shards_hit": sum(1 for key in before.layout if key[:2] in hit), "inject_s": round(injected_s, 3),
        "suspect": _spread([t - started_wall for t in suspect.values()]), "suspected": len(suspect),
        "down": _spread([t - started_wall for t in down.values()]), "downed": len(down),
        "evicted": _spread([t - started_wall for t in evicted.values()]), "evictions": len(evicted),
        "eviction_rate": eviction_rates(evicted, zone_of),
        "placed_again_s": round(placed_s, 2) if placed_s is not None else None,
        "running_again_s": round(running_s, 2) if running_s is not None else None,
        "moved_needlessly": moved_needlessly, "errors": errors,
    }
    await inject(fleets, "revive", victims)
    return result


# --- the run ----------------------------------------------------------------------------------------

async def fill(stub: Any, shape: Shape, args: argparse.Namespace) -> int:
    """Submit services for `fill` of the accelerators; their count."""
    from maia.v1 import common_pb2, deployments_pb2
    per = REPLICAS_PER_DEPLOYMENT * SHARDS_PER_REPLICA
    count = max(1, int(shape.nodes * 4 * args.fill) // per)
    queue = [deployments_pb2.DeploymentSpec(
        name=f"svc-{i:04d}", tenant=TENANTS[i % len(TENANTS)], replicas=REPLICAS_PER_DEPLOYMENT,
        shards_per_replica=SHARDS_PER_REPLICA, shard=common_pb2.ShardSpec(accelerators=1, hbm_gib=16, power_w=300),
        locality=common_pb2.DOMAIN_NODE) for i in range(count)]

    async def submitter() -> None:
        while queue:
            await stub.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=queue.pop()), timeout=120)
    await asyncio.gather(*(submitter() for _ in range(8)))
    return count


async def wait_all_running(stub: Any, timeout_s: float, poll_s: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if (await read_cluster(stub)).incomplete == 0:
            return time.perf_counter() - started
        await asyncio.sleep(max(poll_s, 1.0))
    raise RuntimeError(f"the services are not all Running after {timeout_s:.0f} s")


def controller_args(args: argparse.Namespace) -> list[str]:
    flags = ["--node-down-grace", str(args.node_down_grace), "--node-eviction-grace", str(args.node_eviction_grace),
             "--restart-grace", "5"]
    if args.lease_ttl is not None:
        flags += ["--lease-ttl", str(args.lease_ttl)]
    return flags + (["--eviction-rate", str(args.eviction_rate)] if args.eviction_rate is not None else [])


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from controller.bearer import aio_channel
    from maia.v1 import admin_pb2_grpc, deployments_pb2_grpc
    shape = Shape(args.nodes, args.fleets or max(1, (args.nodes + 255) // 256))
    bin_dir = Path(sys.executable).parent
    async with database(args.db, root) as url:
        token_file = root / "admin.token"
        controller = Process("maia-controller", [
            str(bin_dir / "maia-controller"), "--listen", "127.0.0.1:0", "--db", url,
            "--bootstrap-admin-token-file", str(token_file), "--submits-per-minute", "0",
            "--log-level", args.controller_log_level, *controller_args(args)], root / "controller.log")
        fleets: list[FleetProcess] = []
        try:
            address = await asyncio.to_thread(controller.read_line, "maia-controller listening on ", 120)
            channel = aio_channel(address, token_file.read_text().strip())
            stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            node_token = await admin_setup(channel, shape)
            joined_s, expected = 0.0, 0
            for i, (prefix, racks) in enumerate(shape.fleet_racks()):
                fleets.append(start_fleet(i, prefix, racks, address, node_token, root,
                                          ["--load-delay", str(args.load_delay)]))
                expected += racks * NODES_PER_RACK
                waited, ready = await wait_connected(channel, expected, timeout_s=180.0)
                joined_s += waited
                if ready < expected:
                    raise RuntimeError(f"only {ready}/{expected} nodes ready after {joined_s:.0f} s")
            topology = shape.topology()
            zone_of_rack = {r.id: {row.id: row.zone for row in topology.rows}[r.row] for r in topology.racks}
            zone_of = {n: zone_of_rack[n.rsplit("-n", 1)[0]] for f in fleets for n in f.node_ids}
            deployments = await fill(stub, shape, args)
            filled_s = await wait_all_running(stub, args.timeout, args.poll)
            print(f"{shape.nodes} nodes joined in {joined_s:.0f} s; {deployments} services "
                  f"({deployments * REPLICAS_PER_DEPLOYMENT * SHARDS_PER_REPLICA} shards) Running in {filled_s:.0f} s",
                  file=sys.stderr, flush=True)
            rng = random.Random(args.seed)
            rounds = []
            for share in args.kill:
                rounds.append(await one_round(share, fleets, stub, admin, zone_of, rng, args))
                print(report_round(rounds[-1]), file=sys.stderr, flush=True)
                await wait_connected(channel, shape.nodes, timeout_s=180.0)  # the revived nodes are back
            await channel.close()
        finally:
            code = controller.stop()  # first: nodes stopping before it would be marked suspect
            stop_all([fleet.process for fleet in fleets])
        violations = await grade(url)
    return {"nodes": shape.nodes, "fleets": shape.fleets, "db": args.db, "services": deployments,
            "shards": deployments * REPLICAS_PER_DEPLOYMENT * SHARDS_PER_REPLICA,
            "controller_flags": controller_args(args), "nodes_joined_s": round(joined_s, 1),
            "rounds": rounds, "checker_violation_count": len(violations), "checker_violations": violations[:10],
            "controller_exit": code}


def report_round(r: dict[str, Any]) -> str:
    def pm(key: str) -> str:
        return f"{r[key]['p50_s']:.1f}/{r[key]['max_s']:.1f} s"
    rate = r["eviction_rate"]
    return (f"kill {r['share']:.0%}: {r['killed']} nodes ({r['holding_work']} holding work: {r['replicas_hit']} "
            f"replicas, {r['shards_hit']} shards) in {r['inject_s'] * 1000:.0f} ms\n"
            f"  suspect p50/max {pm('suspect')} ({r['suspected']}), down {pm('down')} ({r['downed']}), "
            f"evicted {pm('evicted')} ({r['evictions']}; at most {rate['peak_per_zone_per_s']}/s in a zone, "
            f"{rate['overall_per_s']}/s over {rate['span_s']} s in {rate['zones']} zones)\n"
            f"  every evicted replica placed again {r['placed_again_s']} s, Running {r['running_again_s']} s "
            f"after the kill; placements moved needlessly: {r['moved_needlessly']}"
            + "".join(f"\n  error: {e}" for e in r["errors"]))


async def _main(args: argparse.Namespace) -> int:
    if args.nodes % NODES_PER_RACK:
        print(f"error: --nodes {args.nodes} is not a multiple of {NODES_PER_RACK}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix=f"maia-bench-nodedeath-{args.nodes}-"))
    result = await run(args, root)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.keep:
        print(f"logs in {root}", file=sys.stderr)
    else:
        subprocess.run(["rm", "-rf", str(root)], check=False)
    bad = result["checker_violation_count"] or any(r["errors"] or r["moved_needlessly"] for r in result["rounds"])
    return 1 if bad else 0


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))

