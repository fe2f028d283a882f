"""A fleet of simulated nodes in one event loop: naming, staggered start, clean stop, and the
nodes' shards kept across its restarts (`shardstate.py`)."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from controller.aio import wait_event
from controller.simnode.agent import NodeAgent
from controller.simnode.protocol import NodeSpec
from controller.simnode.shardstate import ShardStateFile
from controller.simnode.transport import SimulatedNode

log = logging.getLogger("simnode")


@dataclass(frozen=True)
class FleetShape:
    """How many racks and nodes, and what each node is like."""

    racks: int
    nodes_per_rack: int
    rack_prefix: str = "rack-"
    accelerators: int = 4
    accelerator_model: str = "maia-100"
    hbm_gib: float = 64.0
    idle_power_w: float = 600.0

    def rack_id(self, r: int) -> str:
        """Rack r's id: the prefix, then r in two digits, more when needed (every rack's is as long)."""
        return f"{self.rack_prefix}{r:0{max(2, len(str(self.racks - 1)))}d}"

    def node_id(self, rack: str, n: int) -> str:
        """The id of node n of `rack`: rack-00-n00 (two digits, more when needed)."""
        return f"{rack}-n{n:0{max(2, len(str(self.nodes_per_rack - 1)))}d}"

    def node_specs(self) -> list[NodeSpec]:
        """rack-00 .. rack-{R-1}, nodes rack-00-n00 .. (`rack_id`, `node_id`)."""
        specs = []
        for r in range(self.racks):
            rack = self.rack_id(r)
            for n in range(self.nodes_per_rack):
                specs.append(NodeSpec(
                    node_id=self.node_id(rack, n), rack=rack, accelerators=self.accelerators,
                    accelerator_model=self.accelerator_model, hbm_gib=self.hbm_gib,
                    idle_power_w=self.idle_power_w))
        return specs


class Fleet:
    """Runs every node as its own task; `stop()` ends them all and `run()` returns. With
    `shard_state`, what the nodes hold is written there as it runs and once more as it ends."""

    def __init__(self, nodes: list[SimulatedNode], stagger_s: float = 0.01,
                 shard_state: ShardStateFile | None = None) -> None:
        self.nodes = nodes
        self.stagger_s = stagger_s
        self.shard_state = shard_state
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()

    def node(self, node_id: str) -> SimulatedNode:
        return next(n for n in self.nodes if n.spec.node_id == node_id)

    async def run(self) -> int:
        """Run every node until each has stopped; how many ended with an error (not stopped)."""
        log.info("starting %d simulated nodes", len(self.nodes))
        ended = asyncio.Event()
        saving = None if self.shard_state is None else asyncio.create_task(
            self.shard_state.keep_saving(self._agents, ended), name="shard-state")
        try:
            for node in self.nodes:  # a stop ends the start: the nodes not started yet never are
                if self._stopping.is_set():  # (it slept out the stagger of each: 100 s at 10,000 nodes)
                    break
                self._tasks.append(asyncio.create_task(node.run(), name=f"node-{node.spec.node_id}"))
                await wait_event(self._stopping, self.stagger_s)
            results = await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            ended.set()  # the last write holds what the nodes hold as they stopped
            if saving is not None:
                await saving
        failed = 0
        for node, result in zip(self.nodes, results):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("%s ended with %r", node.spec.node_id, result)
                failed += 1
        log.info("all %d nodes stopped%s", len(self.nodes), f", {failed} of them with an error" if failed else "")
        return failed

    def _agents(self) -> list[tuple[str, NodeAgent]]:
        return [(node.spec.node_id, node.agent) for node in self.nodes]

    def stop(self) -> None:
        self._stopping.set()
        for node in self.nodes:
            node.stop()

    def connected(self) -> int:
        return sum(1 for n in self.nodes if n.connected)
