"""Fault injection into a running fleet: the injector and the control socket that drives it.

An operator (or a test, or a benchmark) rehearses failures against a fleet that is running:
`maia-simnode --control-socket PATH ...` serves a Unix socket (mode 0600: whoever may write it
owns the fleet), and `maia-simnode fault VERB ...` (`controller/simnode/faultcli.py`) sends one
JSON request line and reads one JSON answer line. The faults, on nodes picked by id, by rack or
all of them:

- `kill`: the host dies (its stream is cut, every shard lost) until `revive`;
- `partition`: the nodes stop talking to the controller (streams stay open but silent both
  ways, no reconnects) until `revive`;
- `flap`: the stream drops every `period` and comes back after `down` (shards kept);
- `delay-heartbeats`: `by` seconds more between heartbeats;
- `fail-shard`: the agent holding a shard reports it FAILED with a message; `keep_failing`
  fails every later load of a matching shard too (on the nodes named, if any), until `stop-failing`;
- `fail-accelerator`: accelerator `index` of the nodes failed (their heartbeats list it, with a
  reason), until `repair-accelerator` (one index, or all) or the timed fault ends;
- `revive`: undoes kill, partition, flap, heartbeat delay and failed accelerators, and brings back a node whose stream
  a newer one of its node superseded; `status`: what is injected (and which nodes gave way to a
  newer stream), and how the nodes' Registers went (latencies of those that succeeded, failures
  by status code).

Timed faults (`for_s`) undo themselves, and only themselves: a timed kill's end leaves a partition
in force. A request naming an unknown node or rack changes nothing.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import socket
import stat
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller import limits
from controller.simnode.agent import ShardKey
from controller.simnode.transport import SimulatedNode

log = logging.getLogger("simnode.faults")
_NAME = re.compile(limits.NAME_PATTERN)
_TENANT = re.compile(limits.ID_PATTERN)

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a request naming every node of a 100k fleet fits
DEFAULT_FLAP_COUNT = 5


class FaultError(ValueError):
    """A request that cannot be carried out as asked; nothing was changed."""


@dataclass(frozen=True)
class ShardPattern:
    """Which shards a fail-shard fault names: a deployment, optionally one replica and shard.
    The deployment matches its TENANT/NAME (the id the controller assigns), or its name alone
    (any tenant's)."""

    deployment: str
    replica: int | None = None
    shard: int | None = None
    message: str = "injected fault"

    def matches(self, key: ShardKey) -> bool:
        # The agent keeps a shard's name and tenant apart (TENANT/NAME never matched: a name
        # alone could not tell two tenants' `chat` apart); an older key held both in its name.
        names = (key.deployment, key.deployment.rsplit("/", 1)[-1], f"{key.tenant}/{key.deployment}")
        return self.deployment in names and self.replica in (None, key.replica) and self.shard in (None, key.shard)

    def describe(self) -> str:
        where = "".join(f"/{part}" for part in (self.replica, self.shard) if part is not None)
        return f"{self.deployment}{where}"


@dataclass(frozen=True)
class _FailingRule:
    """A `keep_failing` rule: the later loads of `pattern`'s shards fail, on `nodes` (None: any)."""

    pattern: ShardPattern
    nodes: frozenset[str] | None = None

    def fails(self, node_id: str, key: ShardKey) -> bool:
        return (self.nodes is None or node_id in self.nodes) and self.pattern.matches(key)

    def describe(self) -> str:
        if self.nodes is None:
            return self.pattern.describe()
        return f"{self.pattern.describe()} on {', '.join(sorted(self.nodes))}"


@dataclass
class _NodeFaults:
    """The timers and flapping task of one node's faults (to cancel on revive)."""

    tasks: dict[str, asyncio.Task] = field(default_factory=dict)

    def replace(self, kind: str, task: asyncio.Task | None) -> None:
        old = self.tasks.pop(kind, None)
        if old is not None and old is not asyncio.current_task():
            old.cancel()
        if task is not None:
            self.tasks[kind] = task

    def cancel_all(self) -> None:
        for kind in list(self.tasks):
            self.replace(kind, None)


class FaultInjector:
    """Applies fault requests to the nodes of one fleet (in its event loop)."""

    def __init__(self, nodes: Iterable[SimulatedNode]) -> None:
        self._nodes = {n.spec.node_id: n for n in nodes}
        self._faults = {node_id: _NodeFaults() for node_id in self._nodes}
        self._failing: list[_FailingRule] = []
        for node_id, node in self._nodes.items():
            node.agent.load_failure = functools.partial(self._load_failure, node_id)

    # --- requests -------------------------------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request (a decoded JSON object) -> its answer; FaultError for a bad request."""
        op = request.get("op")
        handler = self._HANDLERS.get(op) if isinstance(op, str) else None
        if handler is None:
            raise FaultError(f"unknown op {op!r}; one of: {', '.join(sorted(self._HANDLERS))}")
        return handler(self, request)

    def _kill(self, request: dict[str, Any]) -> dict[str, Any]:
        nodes = self._select(request)
        for_s = _optional_seconds(request, "for_s")
        for node in nodes:
            node.kill()
            self._schedule(node, "kill", for_s, node.restart)  # a partition set apart still holds
        return self._done("killed", nodes, for_s)

    def _partition(self, request: dict[str, Any]) -> dict[str, Any]:
        nodes = self._select(request)
        for_s = _optional_seconds(request, "for_s")
        for node in nodes:
            node.partition()
            self._schedule(node, "partition", for_s, node.heal)
        return self._done("partitioned", nodes, for_s)

    def _delay_heartbeats(self, request: dict[str, Any]) -> dict[str, Any]:
        nodes = self._select(request)
        delay_s = _seconds(request, "delay_s", minimum=0.0)
        for_s = _optional_seconds(request, "for_s")
        for node in nodes:
            node.heartbeat_delay_s = delay_s
            self._schedule(node, "delay", for_s, lambda n=node: setattr(n, "heartbeat_delay_s", 0.0))
        return self._done(f"heartbeats delayed by {delay_s:g}s on", nodes, for_s)

    def _flap(self, request: dict[str, Any]) -> dict[str, Any]:
        nodes = self._select(request)
        period_s = _seconds(request, "period_s", default=2.0)
        down_s = _seconds(request, "down_s", default=min(0.5, period_s / 2), minimum=0.0)
        for_s = _optional_seconds(request, "for_s")
        count = request.get("count")
        if count is None:
            count = None if for_s is not None else DEFAULT_FLAP_COUNT
        elif not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise FaultError(f"count must be a positive integer, got {count!r}")
        if down_s >= period_s:
            raise FaultError(f"down ({down_s:g}s) must be shorter than the period ({period_s:g}s)")
        for node in nodes:
            task = asyncio.create_task(self._flapping(node, period_s, down_s, count, for_s),
                                       name=f"flap-{node.spec.node_id}")
            self._faults[node.spec.node_id].replace("flap", task)
        times = f"{count} times" if count is not None else f"for {for_s:g}s"
        return self._done(f"flapping every {period_s:g}s ({times}):", nodes, None)

    def _revive(self, request: dict[str, Any]) -> dict[str, Any]:
        nodes = self._select(request)
        for node in nodes:
            self._faults[node.spec.node_id].cancel_all()
            node.heartbeat_delay_s = 0.0
            node.repair_accelerator()
            node.revive()
        return self._done("revived", nodes, None)

    def _fail_shard(self, request: dict[str, Any]) -> dict[str, Any]:
        pattern = _shard_pattern(request)
        nodes = self._select(request) if _names_nodes(request) else list(self._nodes.values())
        failed = [f"{node.spec.node_id}:{key}" for node in nodes for key in node.agent.held()
                  if pattern.matches(key) and node.fail_shard(key, pattern.message)]
        keep = bool(request.get("keep_failing", False))
        scoped = _names_nodes(request) and not request.get("all")
        if keep:  # on the nodes named only (it failed the loads of every node)
            self._failing.append(_FailingRule(pattern, frozenset(n.spec.node_id for n in nodes) if scoped else None))
        elif not failed:
            raise FaultError(f"no node{' of those named' if _names_nodes(request) else ''} holds a shard of "
                             f"{pattern.describe()} (keep_failing would fail its next loads)")
        where = f" on the {len(nodes)} nodes named" if scoped else ""
        log.warning("fault: failed %d shards of %s (%s)%s", len(failed), pattern.describe(), pattern.message,
                    f"; its later loads{where} fail too" if keep else "")
        return {"ok": True, "failed": failed, "keep_failing": keep,
                "message": f"failed {len(failed)} shards of {pattern.describe()}"
                           + (f"; every later load of one{where} fails too" if keep else "")}

    def _fail_accelerator(self, request: dict[str, Any]) -> dict[str, Any]:
        nodes = self._select(request)
        index = request.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise FaultError(f"index must be an accelerator's index (0 or more), got {index!r}")
        too_few = [n.spec.node_id for n in nodes if index >= n.spec.accelerators]
        if too_few:
            verb = "has" if len(too_few) == 1 else "have"
            raise FaultError(f"{', '.join(too_few[:5])} {verb} no accelerator {index}")
        reason = _agent_text("reason", request.get("reason") or "injected accelerator fault",
                             limits.FAULT_REASON_MAX)
        for_s = _optional_seconds(request, "for_s")
        for node in nodes:
            node.fail_accelerator(index, reason)
            self._schedule(node, f"accelerator-{index}", for_s, lambda n=node: n.repair_accelerator(index))
        return self._done(f"accelerator {index} failed on", nodes, for_s)

    def _repair_accelerator(self, request: dict[str, Any]) -> dict[str, Any]:
        nodes = self._select(request)
        index = request.get("index")
        if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
            raise FaultError(f"index must be an accelerator's index (0 or more), got {index!r}")
        repaired = [node for node in nodes if node.repair_accelerator(index)]
        return self._done(f"{'every accelerator' if index is None else f'accelerator {index}'} repaired on",
                          repaired, None)

    def _stop_failing(self, request: dict[str, Any]) -> dict[str, Any]:
        """Every rule, or those of one deployment as fail-shard named it (TENANT/NAME, or NAME: any
        tenant's); a deployment no rule names is refused, the rules there are listed."""
        deployment = request.get("deployment")
        if deployment is not None:
            deployment = _deployment(deployment, "stop-failing")
        kept = [r for r in self._failing if deployment is not None and r.pattern.deployment != deployment]
        stopped = len(self._failing) - len(kept)
        if deployment is not None and not stopped:
            rules = ", ".join(sorted({r.pattern.deployment for r in self._failing})) or "none"
            raise FaultError(f"no keep-failing rule names deployment {deployment} (rules name: {rules})")
        self._failing = kept
        return {"ok": True, "stopped": stopped, "message": f"{stopped} shard failure rules removed"}

    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        faulty = {}
        for node_id, node in sorted(self._nodes.items()):
            kinds = [kind for kind, on in (("killed", node.killed), ("partitioned", node.partitioned),
                                           ("superseded", node.superseded),
                                           ("flapping", "flap" in self._faults[node_id].tasks),
                                           ("heartbeat-delay", node.heartbeat_delay_s > 0),
                                           ("failed-accelerators", bool(node.failed_accelerators))) if on]
            if kinds:
                faulty[node_id] = kinds
        connected = sum(1 for n in self._nodes.values() if n.connected and not n.muted)
        failures: Counter[str] = sum((n.register_failures for n in self._nodes.values()), Counter())
        return {"ok": True, "nodes": len(self._nodes), "connected": connected, "faults": faulty,
                "failing": [r.describe() for r in self._failing],
                "register_ms": [round(s * 1000, 1) for n in self._nodes.values() for s in n.register_latencies_s],
                "register_failures": dict(failures),
                "heartbeats_sent": sum(n.heartbeats_sent for n in self._nodes.values()),
                "message": f"{connected}/{len(self._nodes)} nodes connected, {len(faulty)} with faults"}

    _HANDLERS: dict[str, Callable[[FaultInjector, dict[str, Any]], dict[str, Any]]] = {
        "kill": _kill, "partition": _partition, "delay-heartbeats": _delay_heartbeats, "flap": _flap,
        "revive": _revive, "fail-shard": _fail_shard, "stop-failing": _stop_failing, "status": _status,
        "fail-accelerator": _fail_accelerator, "repair-accelerator": _repair_accelerator,
    }

    # --- helpers --------------------------------------------------------------------------------
    def _select(self, request: dict[str, Any]) -> list[SimulatedNode]:
        """The nodes a request names (ids, racks, or all); FaultError for unknown names or none."""
        if request.get("all"):
            return list(self._nodes.values())
        ids, racks = _strings(request, "nodes"), set(_strings(request, "racks"))
        unknown = [i for i in ids if i not in self._nodes]
        known_racks = {n.spec.rack for n in self._nodes.values()}
        unknown += [f"rack {r}" for r in sorted(racks - known_racks)]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise FaultError(f"this fleet has no {shown}")
        chosen = dict.fromkeys(ids)
        chosen.update(dict.fromkeys(n.spec.node_id for n in self._nodes.values() if n.spec.rack in racks))
        if not chosen:
            raise FaultError("name the nodes: node ids, racks, or all")
        return [self._nodes[i] for i in chosen]

    def _schedule(self, node: SimulatedNode, kind: str, for_s: float | None, undo: Callable[[], None]) -> None:
        faults = self._faults[node.spec.node_id]
        faults.replace(kind, None if for_s is None else asyncio.create_task(
            self._undo_after(faults, kind, for_s, undo), name=f"undo-{kind}-{node.spec.node_id}"))

    @staticmethod
    async def _undo_after(faults: _NodeFaults, kind: str, for_s: float, undo: Callable[[], None]) -> None:
        await asyncio.sleep(for_s)
        faults.replace(kind, None)
        undo()

    async def _flapping(self, node: SimulatedNode, period_s: float, down_s: float, count: int | None,
                        for_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + for_s if for_s is not None else None
        done = 0
        while True:
            node.drop(down_s)
            done += 1
            if (count is not None and done >= count) or (end is not None and loop.time() + period_s >= end):
                break
            await asyncio.sleep(period_s)
        self._faults[node.spec.node_id].replace("flap", None)

    def _load_failure(self, node_id: str, key: ShardKey) -> str | None:
        for rule in self._failing:
            if rule.fails(node_id, key):
                return rule.pattern.message
        return None

    @staticmethod
    def _done(what: str, nodes: list[SimulatedNode], for_s: float | None) -> dict[str, Any]:
        ids = [n.spec.node_id for n in nodes]
        until = f" for {for_s:g}s" if for_s is not None else ""
        log.warning("fault: %s %d nodes%s: %s", what, len(ids), until,
                    ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else ""))
        return {"ok": True, "nodes": ids, "message": f"{what} {len(ids)} nodes{until}"}


def _names_nodes(request: dict[str, Any]) -> bool:
    return bool(request.get("all") or request.get("nodes") or request.get("racks"))


def _strings(request: dict[str, Any], key: str) -> list[str]:
    value = request.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FaultError(f"{key} must be a list of strings")
    return value


def _seconds(request: dict[str, Any], key: str, *, default: float | None = None, minimum: float = 1e-3) -> float:
    value = request.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
        raise FaultError(f"{key} must be a number of seconds >= {minimum:g}, got {value!r}")
    return float(value)


def _optional_seconds(request: dict[str, Any], key: str) -> float | None:
    return None if request.get(key) is None else _seconds(request, key)


def _deployment(value: Any, op: str) -> str:
    """A deployment's key as the controller writes it (TENANT/NAME), or its NAME alone (any
    tenant's), each part as the controller bounds it (`limits`: its patterns and lengths)."""
    if not isinstance(value, str) or not value:
        raise FaultError(f"{op} needs the deployment: TENANT/NAME, or NAME alone")
    tenant, slash, name = value.rpartition("/")
    parts = [("deployment name", name, _NAME, limits.NAME_MAX, "lowercase letters, digits and '-'")]
    if slash:
        parts.append(("tenant id", tenant, _TENANT, limits.TENANT_ID_MAX, "letters, digits, '-', '_' and '.'"))
    for what, text, pattern, longest, made_of in parts:
        if not text:
            raise FaultError(f"{what} is required (expected TENANT/NAME, or NAME alone)")
        if len(text) > longest or not pattern.fullmatch(text):
            raise FaultError(f"{what} {text[:80]!r} is invalid: use {made_of}, starting and ending with a letter "
                             f"or digit, at most {longest} (expected TENANT/NAME, or NAME alone)")
    return value


def _shard_pattern(request: dict[str, Any]) -> ShardPattern:
    deployment = _deployment(request.get("deployment"), "fail-shard")
    numbers = {}
    for key in ("replica", "shard"):
        value = request.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise FaultError(f"{key} must be a non-negative integer, got {value!r}")
        numbers[key] = value
    message = _agent_text("message", request.get("message") or "injected fault", limits.REPORT_MESSAGE_MAX)
    return ShardPattern(deployment, numbers["replica"], numbers["shard"], message)


_CONTROL = re.compile(limits.CONTROL_CHARACTERS)


def _agent_text(what: str, value: Any, most: int) -> str:
    """Text the fleet's agents will report, within what the controller takes of an agent: it
    refused the heartbeat carrying more, or a control character, every one of them, and the node
    reconnected for ever, its failure never told (found in review)."""
    if not isinstance(value, str):
        raise FaultError(f"{what} must be a string")
    if len(value) > most:
        raise FaultError(f"{what} is {len(value)} characters long; the protocol takes at most {most}")
    if _CONTROL.search(value):
        raise FaultError(f"{what} holds a control character (a line break, a tab, ...), which the protocol refuses")
    return value


def _answers(path: Path) -> bool:
    """Something listens on the Unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _left_socket(path: Path) -> bool:
    """Whether `path` is a socket, or a symlink to one or to nothing (left by a fleet): what
    may be removed to bind the control socket there."""
    if not path.is_symlink():
        return stat.S_ISSOCK(path.lstat().st_mode)
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except FileNotFoundError:  # dangling
        return True


class ControlServer:
    """The fleet's control socket: one JSON request line in, one JSON answer line out."""

    def __init__(self, injector: FaultInjector, path: Path) -> None:
        self.injector = injector
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if not _left_socket(self.path):  # a typo must not delete a file (or a link to one)
                raise FaultError(f"--control-socket {self.path}: there is a file there, not a socket; "
                                 "give another path")
            if _answers(self.path):
                raise FaultError(f"another fleet serves the control socket {self.path}")
            self.path.unlink()  # left behind by a fleet that died
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o177)  # created 0600, never briefly readable by others
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES)
        finally:
            os.umask(old_umask)
        log.info("fault injection control socket at %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = self.answer(await reader.readline())
        except ValueError:  # the line is longer than MAX_REQUEST_BYTES
            answer = {"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"}
        try:
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    def answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"not a JSON request line: {exc}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "the request must be a JSON object"}
        try:
            return self.injector.handle(request)
        except FaultError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug here must not take the fleet down: say so and carry on
            log.exception("fault request %r failed", request)
            return {"ok": False, "error": f"the fleet could not carry it out: {type(exc).__name__}: {exc}"}
