"""`maiactl wait deployment NAME... --for running` and `maiactl wait nodes --connected N`.

Deployments are followed with WatchDeployments (events as they happen). When the stream breaks
(an outage: UNAVAILABLE, CANCELLED; or the controller ended it) the command polls GetDeployment,
through an outage of the controller (said on stderr when it begins and when it ends:
`cli.outage`), and watches again once a poll is served: the new stream begins with the current
state. A controller that does not offer the stream (UNIMPLEMENTED, denied) is polled until the
end. No call outlasts --timeout: each is given --rpc-timeout or what is left of --timeout, if
less, the first reads too. Progress goes to stderr (a progress bar of running replicas on a
terminal); on timeout the exit code is 1 and the message lists each deployment's phase and the
reasons it is not there yet. `wait nodes` polls ListNodes, through an outage as well.

A deployment blocked for good — a reason that waiting alone cannot change (the tenant's quota,
its allowed zones, an accelerator model or HBM size no node has), Failed (until it is updated),
Quarantined (until it is submitted again), or deleted since the wait began — ends the wait at
once with its reasons and exit code 4,
unless --keep-waiting (someone may raise the quota meanwhile).
"""
from __future__ import annotations

import argparse
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from typing import TypeVar

import grpc

from controller.cli.bounds import count, seconds
from controller.cli.client import CliError, Exit, list_all, status_code
from controller.cli.context import Context
from controller.cli.documents import deployment_document
from controller.cli.outage import OUTAGE_CODES, Polls, clock
from controller.cli.refs import (
    DEPLOYMENT_WORDS, NODE_WORDS, DeploymentRef, add_tenant_flag, deployment_ref, kind_and_names,
)
from controller.cli.views import phase_text, reasons_text
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

P = deployments_pb2
T = TypeVar("T")

CONDITIONS: dict[str, Callable[[P.Deployment | None], bool]] = {
    "running": lambda d: d is not None and d.phase == P.DEPLOYMENT_PHASE_RUNNING,
    "scheduled": lambda d: d is not None and d.phase in (P.DEPLOYMENT_PHASE_SCHEDULED,
                                                         P.DEPLOYMENT_PHASE_RUNNING),
    "deleted": lambda d: d is None,
    # A rollout or drain is over: no replica is being replaced and every asked one runs the
    # current revision.
    "rolled-out": lambda d: d is not None and d.outgoing_replicas == 0 and d.updated_replicas >= d.spec.replicas,
    # A drain's part is over: no replica is being replaced and every placed one runs.
    "replaced": lambda d: d is None or (d.outgoing_replicas == 0 and d.running_replicas >= d.placed_replicas),
}
POLL_INTERVAL_S = 1.0
NODES_POLL_INTERVAL_S = 0.5
# Reason codes that do not go away by themselves (see the module docstring).
BLOCKING_CODES = frozenset({"QUOTA_ACCELERATORS", "QUOTA_POWER", "ZONE", "ACCELERATOR_MODEL", "HBM"})
# What `wait` waits for: deployments by name, or nodes (how many connect).
KINDS = {**DEPLOYMENT_WORDS, **NODE_WORDS}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("wait", parents=[common], help="wait until deployments reach a phase (or nodes connect)")
    p.add_argument("resource", metavar="KIND",
                   help="deployment | nodes; or deployment/[TENANT/]NAME as -o name prints it, more NAMEs after it")
    p.add_argument("names", nargs="*", metavar="NAME", help="deployments to wait for: NAME or TENANT/NAME")
    p.add_argument("--for", dest="condition", choices=sorted(CONDITIONS), default="running")
    p.add_argument("--timeout", type=seconds(), default=120.0, metavar="SECONDS",
                   help="give up after this many seconds, exit 1 (default: 120); no call outlasts it")
    p.add_argument("--connected", type=count(), metavar="N",
                   help="nodes: wait until N (at least 1) nodes are ready and connected")
    p.add_argument("--keep-waiting", action="store_true",
                   help="do not stop early when a deployment is blocked by quota, zones or hardware")
    add_tenant_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    kind, names = kind_and_names("wait", [args.resource, *args.names], KINDS)
    if kind == "node":
        if names:
            raise CliError("wait nodes takes no NAME: it waits for --connected N nodes", Exit.USAGE)
        if args.connected is None:
            raise CliError("wait nodes needs --connected N", 2)
        return _wait_nodes(args.connected, args.timeout, ctx)
    if not names:
        raise CliError("wait deployment needs at least one NAME", 2)
    return wait_deployments(names, args.condition, args.timeout, ctx, fail_fast=not args.keep_waiting,
                            tenant=args.tenant)


def progress_line(name: str, dep: P.Deployment | None) -> str:
    if dep is None:
        return f"{name}: not found"
    s = dep.spec
    line = (f"{name}: {phase_text(dep)}, {dep.placed_replicas}/{s.replicas} placed, "
            f"{dep.running_replicas}/{s.replicas} running")
    outgoing = [p for p in dep.placements if p.outgoing]
    if outgoing and all(p.revision == dep.revision for p in outgoing):  # a drain, not a rollout
        line += f", {dep.outgoing_replicas} on draining nodes still running until replaced"
    elif dep.outgoing_replicas or dep.updated_replicas < dep.running_replicas:
        line += (f", revision {dep.revision}: {dep.updated_replicas}/{s.replicas} updated running, "
                 f"{dep.outgoing_replicas} old still running")
    if dep.reasons:
        line += f" ({dep.reasons[0].code}: {dep.reasons[0].message})"
    return line


class ProgressBars:
    """One rich progress bar per deployment (running replicas of replicas) on a terminal's stderr."""

    def __init__(self, names: Sequence[str], ctx: Context) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=Console(file=ctx.stderr), transient=False)
        self._tasks = {n: self._progress.add_task(n, total=None) for n in names}
        self._progress.start()

    def update(self, name: str, dep: P.Deployment | None) -> None:
        if dep is None:
            self._progress.update(self._tasks[name], description=f"{name}: gone")
            return
        reason = f" {dep.reasons[0].code}" if dep.reasons else ""
        self._progress.update(self._tasks[name], total=dep.spec.replicas, completed=dep.running_replicas,
                              description=f"{name}: {phase_text(dep)}{reason}")

    def close(self) -> None:
        self._progress.stop()


class _Tracker:
    """Latest state per deployment, shown as progress bars on a terminal, else as a line whenever
    one changes (stderr either way)."""

    def __init__(self, names: Sequence[str], condition: str, ctx: Context, fail_fast: bool = True,
                 progress: bool = True, reasons_block: bool = True) -> None:
        self.names = list(dict.fromkeys(names))
        self.progress = progress
        self.fail_fast = fail_fast and condition != "deleted"
        self.reasons_block = reasons_block  # off: only Failed and deleted ones end the wait early
        self.check = CONDITIONS[condition]
        self.ctx = ctx
        self.latest: dict[str, P.Deployment | None] = {}
        # Each name as given (NAME or TENANT/NAME) -> the deployment it means, its tenant resolved
        # by the first read (a bare NAME: the caller's own or the only tenant's of that name).
        self.refs: dict[str, DeploymentRef] = {n: deployment_ref(n, None) for n in self.names}
        self._shown: dict[str, str] = {}
        self.bars = ProgressBars(self.names, ctx) if progress and ctx.stderr.isatty() and not ctx.json else None

    def update(self, name: str, dep: P.Deployment | None) -> None:
        if name not in self.names:
            return
        self.latest[name] = dep
        if self.bars is not None:
            self.bars.update(name, dep)
            return
        line = progress_line(name, dep)
        if self.progress and self._shown.get(name) != line:
            self._shown[name] = line
            self.ctx.note(line)

    def name_of(self, spec: P.DeploymentSpec) -> str | None:
        """The tracked name that means the deployment of `spec`, if any."""
        for name, ref in self.refs.items():
            if ref.name == spec.name and ref.tenant in ("", spec.tenant):
                return name
        return None

    def close(self) -> None:
        if self.bars is not None:
            self.bars.close()

    def done(self) -> bool:
        return all(n in self.latest and self.check(self.latest[n]) for n in self.names)

    def blocked(self) -> list[str]:
        """Deployments not there yet that waiting cannot bring there: deleted since the wait began
        (each was read at its start), Failed (the controller gave up on them until they are
        updated) or Quarantined (set aside, holding nothing, until submitted again), or held by
        reasons waiting cannot change (`reasons_block`)."""
        return [n for n, dep in self.latest.items() if not self.check(dep) and (
            dep is None or dep.phase in (P.DEPLOYMENT_PHASE_FAILED, P.DEPLOYMENT_PHASE_QUARANTINED)
            or (self.reasons_block and any(r.code in BLOCKING_CODES for r in dep.reasons)))]

    def finished(self) -> bool:
        return self.done() or (self.fail_fast and bool(self.blocked()))

    def pending_text(self) -> str:
        lines = []
        for n in self.names:
            dep = self.latest.get(n)
            if n in self.latest and self.check(dep):
                continue
            lines.append("  " + progress_line(n, dep))
            if dep is not None and dep.reasons:
                lines.append(reasons_text(dep.reasons, indent="    "))
        return "\n".join(lines)


class _WaitOver(Exception):
    """A poll's call cut by the wait's own deadline (--timeout): the wait ends, no outage is said."""


def _call_timeout(ctx: Context, deadline: float) -> float:
    """A call's timeout: --rpc-timeout, or what is left of the wait's --timeout when less (no call
    outlasts the wait; `deadline` is monotonic)."""
    return min(ctx.rpc_timeout, max(0.0, deadline - time.monotonic()))


def _get(ctx: Context, ref: DeploymentRef, deadline: float) -> P.Deployment | None:
    """The deployment, None when there is none; the call ends by `deadline`."""
    try:
        return ctx.controller.deployments.GetDeployment(P.GetDeploymentRequest(name=ref.name, tenant=ref.tenant),
                                                        timeout=_call_timeout(ctx, deadline))
    except grpc.RpcError as exc:
        if status_code(exc) == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def _polled(fetch: Callable[[], T], deadline: float) -> T:
    """`fetch()`, a poll of the wait: one not served because the wait's time ran out under it (a
    call given what was left of --timeout) raises `_WaitOver` instead of being an outage."""
    try:
        return fetch()
    except grpc.RpcError as exc:
        if status_code(exc) in OUTAGE_CODES and time.monotonic() >= deadline:
            raise _WaitOver() from None
        raise


def wait_deployments(names: Sequence[str], condition: str, timeout: float, ctx: Context,
                     fail_fast: bool = True, quiet: bool = False, tenant: str = "", progress: bool = True,
                     reasons_block: bool = True) -> int:
    """Block until every deployment meets `condition` (0), else CliError; each is NAME (in
    `tenant`, if given) or TENANT/NAME. `quiet`: the caller prints the result itself; `progress`
    off: no progress on stderr either (an outage of the controller is still said);
    `reasons_block` off: a blocking reason (quota, zones, hardware) does not end the wait early."""
    deadline = time.monotonic() + timeout
    tracker = _Tracker([str(deployment_ref(n, tenant)) for n in names], condition, ctx, fail_fast, progress,
                       reasons_block)
    try:
        for name in tracker.names:  # the first reads: a controller not there ends the command
            dep = _get(ctx, tracker.refs[name], deadline)
            if dep is None and condition != "deleted":
                raise CliError(f"NOT_FOUND: deployment {name} does not exist", Exit.NOT_FOUND)
            if dep is not None:
                tracker.refs[name] = DeploymentRef(dep.spec.tenant, dep.spec.name)
            tracker.update(name, dep)
        _follow(tracker, deadline, ctx)
    except _WaitOver:
        pass
    finally:
        tracker.close()
    if not tracker.done() and tracker.fail_fast and tracker.blocked():
        raise CliError(f"stopped waiting for {condition}: blocked until something changes (deleted, Failed until "
                       f"updated, or quota, zones or hardware; --keep-waiting waits anyway):\n"
                       f"{tracker.pending_text()}", Exit.PARTIAL)
    if not tracker.done():
        raise CliError(f"timed out after {timeout:g}s waiting for {condition}:\n{tracker.pending_text()}")
    if quiet:
        return 0
    if ctx.json:
        ctx.emit_json({"deployments": [deployment_document(dep) for n in tracker.names
                                       if (dep := tracker.latest[n]) is not None]})
    else:
        for n in tracker.names:
            ctx.out(f"deployment/{n} condition met ({condition})")
    return 0


class _Stream(Enum):
    """How a watch stream ended."""

    OVER = "over"        # the condition was met, or --timeout came
    BROKE = "broke"      # an outage (UNAVAILABLE, CANCELLED), or the controller ended it: poll, then watch again
    REFUSED = "refused"  # not offered (UNIMPLEMENTED, denied...): poll until the end


def _follow(tracker: _Tracker, deadline: float, ctx: Context) -> None:
    """The stream until the wait is over; when it breaks, polls until one is served (the outage,
    if any, said by `cli.outage.Polls`), then a new stream (it begins with the current state); a
    controller that does not offer the stream is polled until the end."""
    until = clock(time.time() + deadline - time.monotonic())
    polls = Polls(ctx, "wait", f"polling every {POLL_INTERVAL_S:g}s until --timeout ({until})")
    ended: _Stream | None = None  # None: no stream opened yet
    while not tracker.finished() and time.monotonic() < deadline:
        if ended in (None, _Stream.BROKE):
            opened = time.monotonic()
            ended = _watch(tracker, deadline, ctx)
            if ended is _Stream.OVER:
                return
        _poll(tracker, deadline, polls, until_served=ended is _Stream.BROKE)
        if ended is _Stream.BROKE:  # a stream that broke at once is opened again a poll interval later
            time.sleep(max(0.0, min(opened + POLL_INTERVAL_S, deadline) - time.monotonic()))


_END = object()  # the stream ended without an error


def _read_stream(stream: Iterator[P.DeploymentEvent], events: queue.Queue[object]) -> None:
    """Every event of `stream` into `events`, then its error (grpc.RpcError) or `_END`."""
    try:
        for event in stream:
            events.put(event)
    except grpc.RpcError as exc:
        events.put(exc)
        return
    events.put(_END)


def _watch(tracker: _Tracker, deadline: float, ctx: Context) -> _Stream:
    """Follow WatchDeployments until the wait is over or the stream ends. The stream begins with
    the current state of what it watches (the controller subscribes to changes before it reads
    it, so no change after that read is lost); a tracked deployment it has not named yet is read
    every POLL_INTERVAL_S meanwhile, since one deleted between the last read here and the
    stream's own read is in no event (the stream's current state has no end mark)."""
    only = tracker.refs[tracker.names[0]] if len(tracker.names) == 1 else DeploymentRef("", "")
    if deadline - time.monotonic() <= 0:
        return _Stream.OVER
    stream = ctx.controller.deployments.WatchDeployments(P.WatchDeploymentsRequest(name=only.name, tenant=only.tenant),
                                                         timeout=deadline - time.monotonic())
    events: queue.Queue[object] = queue.Queue()
    threading.Thread(target=_read_stream, args=(stream, events), name="wait-stream", daemon=True).start()
    unnamed = set(tracker.names)
    read_at = time.monotonic() + POLL_INTERVAL_S
    try:
        while True:
            try:
                got = events.get(timeout=max(0.0, read_at - time.monotonic()) if unnamed else None)
            except queue.Empty:
                try:
                    read = {name: _polled(lambda: _get(ctx, tracker.refs[name], deadline), deadline)
                            for name in sorted(unnamed)}
                except grpc.RpcError as exc:
                    if status_code(exc) not in OUTAGE_CODES:
                        raise
                    read = {}  # the stream breaks too, or the next turn reads again
                for name, dep in read.items():  # events that came meanwhile are newer: handled after
                    tracker.update(name, dep)
                if tracker.finished():
                    return _Stream.OVER
                read_at = time.monotonic() + POLL_INTERVAL_S
                continue
            if isinstance(got, P.DeploymentEvent):
                name = tracker.name_of(got.deployment.spec)
                if name is not None:
                    unnamed.discard(name)
                    tracker.update(name, None if got.type == P.DeploymentEvent.TYPE_DELETED else got.deployment)
                if tracker.finished():
                    return _Stream.OVER
                continue
            code = status_code(got) if isinstance(got, grpc.RpcError) else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return _Stream.OVER
            if got is _END or code in OUTAGE_CODES:
                ctx.note(f"(watch broke: {code.name if code else 'ended by the controller'}; polling, then watching "
                         "again once the controller answers)")
                return _Stream.BROKE
            ctx.note(f"(watch unavailable: {code.name if code else got}; polling)")
            return _Stream.REFUSED
    finally:
        stream.cancel()  # type: ignore[attr-defined]


def _poll(tracker: _Tracker, deadline: float, polls: Polls, until_served: bool = False) -> None:
    """Every deployment read every POLL_INTERVAL_S until done or `deadline` (or, `until_served`,
    until one round is served); a round the controller does not serve is skipped, and the outage
    said once on stderr (`cli.outage`)."""
    ctx = polls.ctx
    while not tracker.finished() and time.monotonic() < deadline:
        latest = polls.poll(lambda: _polled(lambda: {name: _get(ctx, tracker.refs[name], deadline)
                                                     for name in tracker.names}, deadline),
                            back="; watching again" if until_served else "")
        for name, dep in (latest or {}).items():
            tracker.update(name, dep)
        if latest is not None and until_served:
            return
        if not tracker.finished():
            time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))


def _wait_nodes(wanted: int, timeout: float, ctx: Context) -> int:
    """ListNodes every NODES_POLL_INTERVAL_S until `wanted` nodes are ready and connected or
    `timeout`, no call outlasting it; after the first, a poll the controller does not serve is
    skipped, and the outage said once on stderr (`cli.outage`)."""
    deadline = time.monotonic() + timeout
    polls = Polls(ctx, "wait", f"polling every {NODES_POLL_INTERVAL_S:g}s until --timeout "
                               f"({clock(time.time() + timeout)})")
    shown = -1
    cordoned = 0  # connected but cordoned: not ready, said in the timeout (all cordoned read "0/64")

    def nodes() -> admin_pb2.ListNodesResponse:
        return list_all(ctx.controller.admin.ListNodes, admin_pb2.ListNodesRequest(), "nodes",
                        timeout=lambda: _call_timeout(ctx, deadline))

    response: admin_pb2.ListNodesResponse | None = nodes()  # the first: a controller not there ends the command
    while True:
        if response is not None:  # None: not served, the last count stands
            ready = [n for n in response.nodes if n.connected and n.state == common_pb2.NODE_STATE_READY]
            cordoned = sum(n.connected and n.state == common_pb2.NODE_STATE_CORDONED for n in response.nodes)
            if len(ready) != shown:
                shown = len(ready)
                ctx.note(f"nodes: {shown}/{wanted} ready and connected ({len(response.nodes)} registered)")
            if shown >= wanted:
                if ctx.json:
                    ctx.emit_json({"ready_connected": shown, "registered": len(response.nodes)})
                else:
                    ctx.out(f"{shown} nodes ready and connected")
                return 0
        if time.monotonic() >= deadline:
            besides = f" ({cordoned} more connected but cordoned: maiactl uncordon NODE)" if cordoned else ""
            raise CliError(f"timed out after {timeout:g}s: {shown}/{wanted} nodes ready and connected{besides}")
        time.sleep(min(NODES_POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))
        try:
            response = polls.poll(lambda: _polled(nodes, deadline))
        except _WaitOver:
            response = None


def wait_gone(deployments: Sequence[str], ctx: Context) -> None:
    """Until the deployments just deleted (TENANT/NAME) are gone, at most --rpc-timeout: a deleted
    deployment stays, DELETING, until the controller has released its shards, and its tenant
    cannot be deleted before (FAILED_PRECONDITION). Past the bound the caller goes on all the
    same (DeleteTenant is tried, and its refusal reported)."""
    if not deployments:
        return
    try:
        wait_deployments(deployments, "deleted", ctx.rpc_timeout, ctx, fail_fast=False, quiet=True, progress=False)
    except CliError:  # timed out
        pass
