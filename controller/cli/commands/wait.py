"""`maiactl wait deployment NAME... --for running` and `maiactl wait nodes --connected N`.

Deployments are followed with WatchDeployments (events as they happen); if the server does
not offer the stream, or it breaks, the command falls back to polling GetDeployment, which goes on
through an outage of the controller until --timeout (said on stderr when it begins and when it
ends: `cli.outage`). Progress goes to stderr (a progress bar of running replicas on a terminal);
on timeout the exit code is 1 and the message lists each deployment's phase and the reasons it is
not there yet. `wait nodes` polls ListNodes, through an outage as well.

A deployment blocked for good — a reason that waiting alone cannot change (the tenant's quota,
its allowed zones, an accelerator model or HBM size no node has) — ends the wait at once with
its reasons and exit code 4, unless --keep-waiting (someone may raise the quota meanwhile).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import grpc

from controller.cli.client import CliError, Exit, list_all, status_code
from controller.cli.context import Context
from controller.cli.outage import Polls, clock
from controller.cli.refs import DeploymentRef, add_tenant_flag, deployment_ref
from controller.cli.views import phase_text, reasons_text
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

P = deployments_pb2

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


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("wait", parents=[common], help="wait until deployments reach a phase (or nodes connect)")
    p.add_argument("resource", choices=("deployment", "deployments", "deploy", "nodes"))
    p.add_argument("names", nargs="*", metavar="NAME", help="deployments to wait for")
    p.add_argument("--for", dest="condition", choices=sorted(CONDITIONS), default="running")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS")
    p.add_argument("--connected", type=int, metavar="N", help="nodes: wait until N nodes are ready and connected")
    p.add_argument("--keep-waiting", action="store_true",
                   help="do not stop early when a deployment is blocked by quota, zones or hardware")
    add_tenant_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    if args.resource == "nodes":
        if args.connected is None:
            raise CliError("wait nodes needs --connected N", 2)
        return _wait_nodes(args.connected, args.timeout, ctx)
    if not args.names:
        raise CliError("wait deployment needs at least one NAME", 2)
    return wait_deployments(args.names, args.condition, args.timeout, ctx, fail_fast=not args.keep_waiting,
                            tenant=args.tenant)


def progress_line(name: str, dep: P.Deployment | None) -> str:
    if dep is None:
        return f"{name}: not found"
    s = dep.spec
    line = (f"{name}: {phase_text(dep)}, {dep.placed_replicas}/{s.replicas} placed, "
            f"{dep.running_replicas}/{s.replicas} running")
    if dep.outgoing_replicas or dep.updated_replicas < dep.running_replicas:
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

    def __init__(self, names: Sequence[str], condition: str, ctx: Context, fail_fast: bool = True) -> None:
        self.names = list(dict.fromkeys(names))
        self.fail_fast = fail_fast and condition != "deleted"
        self.check = CONDITIONS[condition]
        self.ctx = ctx
        self.latest: dict[str, P.Deployment | None] = {}
        # Each name as given (NAME or TENANT/NAME) -> the deployment it means, its tenant resolved
        # by the first read (a bare NAME: the caller's own or the only tenant's of that name).
        self.refs: dict[str, DeploymentRef] = {n: deployment_ref(n, None) for n in self.names}
        self._shown: dict[str, str] = {}
        self.bars = ProgressBars(self.names, ctx) if ctx.stderr.isatty() and not ctx.json else None

    def update(self, name: str, dep: P.Deployment | None) -> None:
        if name not in self.names:
            return
        self.latest[name] = dep
        if self.bars is not None:
            self.bars.update(name, dep)
            return
        line = progress_line(name, dep)
        if self._shown.get(name) != line:
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
        """Deployments not there yet whose reasons waiting cannot change (or that are Failed:
        the controller gave up on them until they are updated)."""
        return [n for n, dep in self.latest.items()
                if dep is not None and not self.check(dep) and (dep.phase == P.DEPLOYMENT_PHASE_FAILED or any(
                    r.code in BLOCKING_CODES for r in dep.reasons))]

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


def _get(ctx: Context, ref: DeploymentRef, deadline: float | None = None) -> P.Deployment | None:
    """The deployment, None when there is none; the call ends by `deadline` (monotonic) if given,
    and one cut by it raises `_WaitOver`."""
    timeout = ctx.rpc_timeout if deadline is None else min(ctx.rpc_timeout, max(0.0, deadline - time.monotonic()))
    try:
        return ctx.controller.deployments.GetDeployment(P.GetDeploymentRequest(name=ref.name, tenant=ref.tenant),
                                                        timeout=timeout)
    except grpc.RpcError as exc:
        if status_code(exc) == grpc.StatusCode.NOT_FOUND:
            return None
        if (deadline is not None and status_code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED
                and time.monotonic() >= deadline):
            raise _WaitOver() from None
        raise


def wait_deployments(names: Sequence[str], condition: str, timeout: float, ctx: Context,
                     fail_fast: bool = True, quiet: bool = False, tenant: str = "") -> int:
    """Block until every deployment meets `condition` (0), else CliError; each is NAME (in
    `tenant`, if given) or TENANT/NAME. `quiet`: the caller prints the result itself."""
    deadline = time.monotonic() + timeout
    tracker = _Tracker([str(deployment_ref(n, tenant)) for n in names], condition, ctx, fail_fast)
    try:
        for name in tracker.names:
            dep = _get(ctx, tracker.refs[name])
            if dep is None and condition != "deleted":
                raise CliError(f"NOT_FOUND: deployment {name} does not exist", Exit.NOT_FOUND)
            if dep is not None:
                tracker.refs[name] = DeploymentRef(dep.spec.tenant, dep.spec.name)
            tracker.update(name, dep)
        if not tracker.finished():
            if not _watch(tracker, deadline, ctx):
                _poll(tracker, deadline, ctx)
    finally:
        tracker.close()
    if not tracker.done() and tracker.fail_fast and tracker.blocked():
        raise CliError(f"stopped waiting for {condition}: blocked until something changes (quota, zones or "
                       f"hardware; --keep-waiting waits anyway):\n{tracker.pending_text()}", Exit.PARTIAL)
    if not tracker.done():
        raise CliError(f"timed out after {timeout:g}s waiting for {condition}:\n{tracker.pending_text()}")
    if quiet:
        return 0
    if ctx.json:
        ctx.emit_json({"deployments": [tracker.latest[n] for n in tracker.names if tracker.latest[n] is not None]})
    else:
        for n in tracker.names:
            ctx.out(f"deployment/{n} condition met ({condition})")
    return 0


def _watch(tracker: _Tracker, deadline: float, ctx: Context) -> bool:
    """Follow events until done; False when the stream is unavailable and polling should take over."""
    only = tracker.refs[tracker.names[0]] if len(tracker.names) == 1 else DeploymentRef("", "")
    request = P.WatchDeploymentsRequest(name=only.name, tenant=only.tenant)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return True
    stream = ctx.controller.deployments.WatchDeployments(request, timeout=remaining)
    try:
        for event in stream:
            name = tracker.name_of(event.deployment.spec)
            if name is not None:
                tracker.update(name, None if event.type == P.DeploymentEvent.TYPE_DELETED else event.deployment)
            if tracker.finished():
                return True
    except grpc.RpcError as exc:
        if status_code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED:
            return True
        ctx.note(f"(watch unavailable: {status_code(exc).name if status_code(exc) else exc}; polling)")
        return False
    finally:
        stream.cancel()
    return tracker.finished()


def _poll(tracker: _Tracker, deadline: float, ctx: Context) -> None:
    """Every deployment read every POLL_INTERVAL_S until done or `deadline`; a round the controller
    does not serve is skipped, and the outage said once on stderr (`cli.outage`)."""
    until = clock(time.time() + deadline - time.monotonic())
    polls = Polls(ctx, "wait", f"polling every {POLL_INTERVAL_S:g}s until --timeout ({until})")
    while not tracker.finished() and time.monotonic() < deadline:
        try:
            latest = polls.poll(lambda: {name: _get(ctx, tracker.refs[name], deadline) for name in tracker.names})
        except _WaitOver:
            return
        for name, dep in (latest or {}).items():
            tracker.update(name, dep)
        if not tracker.finished():
            time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))


def _wait_nodes(wanted: int, timeout: float, ctx: Context) -> int:
    """ListNodes every NODES_POLL_INTERVAL_S until `wanted` nodes are ready and connected or
    `timeout`; after the first, a poll the controller does not serve is skipped, and the outage
    said once on stderr (`cli.outage`)."""
    deadline = time.monotonic() + timeout
    polls = Polls(ctx, "wait", f"polling every {NODES_POLL_INTERVAL_S:g}s until --timeout "
                               f"({clock(time.time() + timeout)})")
    shown = -1

    def nodes() -> admin_pb2.ListNodesResponse:
        return list_all(ctx.controller.admin.ListNodes, admin_pb2.ListNodesRequest(), "nodes", timeout=ctx.rpc_timeout)

    response: admin_pb2.ListNodesResponse | None = nodes()  # the first: a controller not there ends the command
    while True:
        if response is not None:  # None: not served, the last count stands
            ready = [n for n in response.nodes if n.connected and n.state == common_pb2.NODE_STATE_READY]
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
            raise CliError(f"timed out after {timeout:g}s: {shown}/{wanted} nodes ready and connected")
        time.sleep(NODES_POLL_INTERVAL_S)
        response = polls.poll(nodes)
