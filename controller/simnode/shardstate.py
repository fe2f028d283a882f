"""Where simulated agents keep the shards they hold between runs of the fleet.

A real node agent that restarts finds the model servers it started still running (the workloads
outlive the agent): its new stream's first heartbeat reports them, and the controller keeps them
where they are. A simulated one that forgot them loaded every shard of the fleet again at each
restart. So the fleet keeps each node's shards (assignment, phase, message and how long each has
been in its phase) in one JSON file beside its credentials (`shards-<cluster>-<rack prefix>.json`,
mode 0600, rewritten atomically: a temporary file, then a rename), and a restarted `maia-simnode`
restores them (`NodeAgent.restore`): RUNNING and FAILED as they were, LOADING finishing its load
where it was, the time the fleet was down counted as loading. A host that dies (`kill`, `crash`:
faults.py) loses its shards, and the file says so at its next write.

Written in batches, never per change: every `SAVE_EVERY_S` the entries of the nodes whose shard
state changed since (`NodeAgent.state_version`) are encoded again on the loop, the others kept as
encoded, and the file, their entries joined, is rewritten in a worker thread; once more as the
fleet stops. A fleet killed (SIGKILL) loses at most the last period's changes. Entries of nodes the
fleet does not run now (fewer racks this time) are kept as found.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from controller.aio import wait_event
from controller.simnode.agent import DesiredShard, KeptShard, NodeAgent, Phase, ShardKey
from controller.simnode.credentials import CredentialFile

log = logging.getLogger("simnode")

FORMAT_VERSION = 1
SAVE_EVERY_S = 1.0


class ShardStateFile:
    """node id -> the shards its agent holds, persisted in one 0600 file."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.wall = wall
        self._entries: dict[str, str] = {}  # node id -> its entry, encoded (JSON)
        self._saved_versions: dict[str, int] = {}  # node id -> the state version its entry holds
        self._unwritten = False  # entries the file does not hold yet (forgotten, a write that failed)
        if path.exists():
            self._entries = self._read(path)

    @classmethod
    def beside(cls, credentials: CredentialFile, **kw: Any) -> ShardStateFile:
        """The fleet's file, named as its credential file is (by cluster and rack prefix)."""
        name = credentials.path.name.removeprefix("credentials-")
        return cls(credentials.path.with_name(f"shards-{name}"), **kw)

    @staticmethod
    def _read(path: Path) -> dict[str, str]:
        """The entries of a file; none (and a warning) from one that cannot be read: the fleet starts
        with no shards, as before it kept any, rather than not at all."""
        try:
            loaded = json.loads(path.read_text() or "{}")
            if loaded.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {loaded.get('version')!r}, not {FORMAT_VERSION}")
            return {str(node_id): json.dumps(entry, separators=(",", ":"))
                    for node_id, entry in loaded["nodes"].items()}
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            log.warning("%s: cannot read it (%s); the nodes start with no shards", path, exc)
            return {}

    def forget(self) -> None:
        """Start every node with no shards (`--forget-shards`): the next write holds what they hold then."""
        self._entries.clear()
        self._unwritten = True

    def restore(self, node_id: str, agent: NodeAgent) -> int:
        """Give `agent` the shards kept for `node_id`; how many (an entry that cannot be read: none)."""
        entry = self._entries.get(node_id)
        if entry is not None:
            try:
                loaded = json.loads(entry)
                down_s = max(0.0, self.wall() - float(loaded["at"]))
                agent.restore([_decode(shard, down_s) for shard in loaded["shards"]], self.clock())
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s: the shards of node %s cannot be read (%s); it starts with none",
                            self.path, node_id, exc)
        self._saved_versions[node_id] = agent.state_version
        return len(agent.held())

    def changed(self, agents: Iterable[tuple[str, NodeAgent]]) -> bool:
        """Encode again the entries of the agents whose shard state changed since last encoded; whether any did."""
        any_changed = False
        now, at = self.clock(), self.wall()
        for node_id, agent in agents:
            if self._saved_versions.get(node_id) == agent.state_version:
                continue
            self._saved_versions[node_id] = agent.state_version
            kept = agent.kept(now)
            if kept:
                self._entries[node_id] = json.dumps({"at": at, "shards": [_encode(k) for k in kept]},
                                                    separators=(",", ":"))
            else:
                self._entries.pop(node_id, None)
            any_changed = True
        return any_changed

    async def save(self, agents: Iterable[tuple[str, NodeAgent]]) -> None:
        """Write the file (in a worker thread) if a node's shards changed since the last write."""
        if self.changed(agents) or self._unwritten:
            self._unwritten = True
            await asyncio.to_thread(self._write_file, dict(self._entries))
            self._unwritten = False

    async def keep_saving(self, agents: Callable[[], Iterable[tuple[str, NodeAgent]]], until: asyncio.Event) -> None:
        """Write the changes every `SAVE_EVERY_S` until `until` is set, then once more (the last word).
        A write that fails is logged and tried again at the next period (the fleet runs on)."""
        while True:
            done = await wait_event(until, SAVE_EVERY_S)
            try:
                await self.save(agents())
            except OSError as exc:
                log.error("cannot write the nodes' shards to %s: %s", self.path, exc)
            if done:
                return

    def _write_file(self, entries: dict[str, str]) -> None:
        text = "".join((f'{{"version":{FORMAT_VERSION},"nodes":{{',
                        ",".join(f"{json.dumps(node_id)}:{entry}" for node_id, entry in sorted(entries.items())),
                        "}}"))
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _encode(kept: KeptShard) -> dict[str, Any]:
    d = kept.desired
    shard: dict[str, Any] = {
        "deployment": d.key.deployment, "tenant": d.key.tenant, "replica": d.key.replica, "shard": d.key.shard,
        "accelerator_indices": list(d.accelerator_indices), "accelerator_milli": d.accelerator_milli,
        "accelerators": d.accelerators, "power_w": d.power_w, "generation": d.generation,
        "deployment_uid": d.deployment_uid, "phase": kept.phase.value}
    if kept.phase is Phase.LOADING:
        shard["elapsed_s"] = kept.elapsed_s
    if kept.message:
        shard["message"] = kept.message
    return shard


def _decode(shard: dict[str, Any], down_s: float) -> KeptShard:
    """A kept shard; a LOADING one has loaded on for the `down_s` the fleet was down."""
    phase = Phase(shard["phase"])
    if phase is Phase.STOPPED:
        raise ValueError("a STOPPED shard is not held")
    key = ShardKey(str(shard["deployment"]), int(shard["replica"]), int(shard["shard"]), str(shard["tenant"]))
    desired = DesiredShard(
        key=key, tenant=key.tenant, accelerator_indices=tuple(int(i) for i in shard["accelerator_indices"]),
        accelerator_milli=int(shard["accelerator_milli"]), accelerators=int(shard["accelerators"]),
        power_w=float(shard["power_w"]), generation=int(shard["generation"]),
        deployment_uid=int(shard["deployment_uid"]))
    elapsed_s = float(shard.get("elapsed_s", 0.0)) + down_s if phase is Phase.LOADING else 0.0
    return KeptShard(desired, phase, elapsed_s, str(shard.get("message", "")))
