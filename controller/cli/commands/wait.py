"""`maiactl wait deployment NAME... --for running` and `maiactl wait nodes --connected N`.

Deployments are followed with WatchDeployments (events as they happen); if the server does
not offer the stream, or it breaks, the command falls back to polling GetDeployment. Progress
goes to stderr; on timeout the exit code is 1 and the message lists each deployment's phase and
the reasons it is not there yet.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import grpc

from controller.cli.client import CliError, list_all, status_code
from controller.cli.context import Context
from controller.cli.views import phase_text, reasons_text
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

P = deployments_pb2

CONDITIONS: dict[str, Callable[[P.Deployment | None], bool]] = {
    "running": lambda d: d is not None and d.phase == P.DEPLOYMENT_PHASE_RUNNING,
    "scheduled": lambda d: d is not None and d.phase in (P.DEPLOYMENT_PHASE_SCHEDULED,
                                                         P.DEPLOYMENT_PHASE_RUNNING),
    "deleted": lambda d: d is None,
}
POLL_INTERVAL_S = 1.0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("wait", parents=[common], help="wait until deployments reach a phase (or nodes connect)")
    p.add_argument("resource", choices=("deployment", "deployments", "deploy", "nodes"))
    p.add_argument("names", nargs="*", metavar="NAME", help="deployments to wait for")
    p.add_argument("--for", dest="condition", choices=sorted(CONDITIONS), default="running")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS")
    p.add_argument("--connected", type=int, metavar="N", help="nodes: wait until N nodes are ready and connected")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    if args.resource == "nodes":
        if args.connected is None:
            raise CliError("wait nodes needs --connected N", 2)
        return _wait_nodes(args.connected, args.timeout, ctx)
    if not args.names:
        raise CliError("wait deployment needs at least one NAME", 2)
    return wait_deployments(args.names, args.condition, args.timeout, ctx)


def progress_line(name: str, dep: P.Deployment | None) -> str:
    if dep is None:
        return f"{name}: not found"
    s = dep.spec
    line = (f"{name}: {phase_text(dep)}, {dep.placed_replicas}/{s.replicas} placed, "
            f"{dep.running_replicas}/{s.replicas} running")
    if dep.reasons:
        line += f" ({dep.reasons[0].code}: {dep.reasons[0].message})"
    return line


class _Tracker:
    """Latest state per deployment, printing a progress line whenever one changes."""

    def __init__(self, names: Sequence[str], condition: str, ctx: Context) -> None:
        self.names = list(dict.fromkeys(names))
        self.check = CONDITIONS[condition]
        self.ctx = ctx
        self.latest: dict[str, P.Deployment | None] = {}
        self._shown: dict[str, str] = {}

    def update(self, name: str, dep: P.Deployment | None) -> None:
        if name not in self.names:
            return
        self.latest[name] = dep
        line = progress_line(name, dep)
        if self._shown.get(name) != line:
            self._shown[name] = line
            self.ctx.note(line)

    def done(self) -> bool:
        return all(n in self.latest and self.check(self.latest[n]) for n in self.names)

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


def _get(ctx: Context, name: str) -> P.Deployment | None:
    try:
        return ctx.controller.deployments.GetDeployment(P.GetDeploymentRequest(name=name), timeout=ctx.rpc_timeout)
    except grpc.RpcError as exc:
        if status_code(exc) == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def wait_deployments(names: Sequence[str], condition: str, timeout: float, ctx: Context) -> int:
    deadline = time.monotonic() + timeout
    tracker = _Tracker(names, condition, ctx)
    for name in tracker.names:
        dep = _get(ctx, name)
        if dep is None and condition != "deleted":
            raise CliError(f"NOT_FOUND: deployment {name} does not exist")
        tracker.update(name, dep)
    if not tracker.done():
        if not _watch(tracker, deadline, ctx):
            _poll(tracker, deadline, ctx)
    if not tracker.done():
        raise CliError(f"timed out after {timeout:g}s waiting for {condition}:\n{tracker.pending_text()}")
    if ctx.json:
        ctx.emit_json({"deployments": [tracker.latest[n] for n in tracker.names if tracker.latest[n] is not None]})
    else:
        for n in tracker.names:
            ctx.out(f"deployment/{n} condition met ({condition})")
    return 0


def _watch(tracker: _Tracker, deadline: float, ctx: Context) -> bool:
    """Follow events until done; False when the stream is unavailable and polling should take over."""
    request = P.WatchDeploymentsRequest(name=tracker.names[0] if len(tracker.names) == 1 else "")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return True
    stream = ctx.controller.deployments.WatchDeployments(request, timeout=remaining)
    try:
        for event in stream:
            name = event.deployment.spec.name
            tracker.update(name, None if event.type == P.DeploymentEvent.TYPE_DELETED else event.deployment)
            if tracker.done():
                return True
    except grpc.RpcError as exc:
        if status_code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED:
            return True
        ctx.note(f"(watch unavailable: {status_code(exc).name if status_code(exc) else exc}; polling)")
        return False
    finally:
        stream.cancel()
    return tracker.done()


def _poll(tracker: _Tracker, deadline: float, ctx: Context) -> None:
    while not tracker.done() and time.monotonic() < deadline:
        for name in tracker.names:
            try:
                tracker.update(name, _get(ctx, name))
            except grpc.RpcError as exc:
                if status_code(exc) != grpc.StatusCode.UNAVAILABLE:
                    raise
        if not tracker.done():
            time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))


def _wait_nodes(wanted: int, timeout: float, ctx: Context) -> int:
    deadline = time.monotonic() + timeout
    shown = -1
    while True:
        response = list_all(ctx.controller.admin.ListNodes, admin_pb2.ListNodesRequest(), "nodes",
                            timeout=ctx.rpc_timeout)
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
        time.sleep(0.5)
