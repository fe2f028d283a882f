"""`maiactl delete [deployment|tenant|node|rack|row|zone] NAME...` and `maiactl delete -f FILE...`.

Every object named is tried; one line per object says what happened, and the exit code is
non-zero when any failed: the code of their failure when all failed alike (3 NOT_FOUND, 2
INVALID_ARGUMENT), else 1. Without a kind, NAMEs are deployments (`maiactl delete big-dep`),
unless a NAME says its kind as `-o name` prints it (`deployment/TENANT/NAME`, `tenant/ID`,
`node/ID`, `rack/ID`, `row/ID`, `zone/ID`), so `maiactl get ... -o name | xargs maiactl delete`
deletes what get listed. With -f, the file's deployments go first, then its tenants (each once
its deployments deleted here are gone: at most --rpc-timeout), then its Topology's racks, rows
and zones. Racks, rows and zones go last, each kind after the one it holds
(racks, then rows, then zones): a row whose racks are deleted in the same call is empty by then. The
controller refuses one that still holds something (FAILED_PRECONDITION naming it). A deleted
deployment is reported as `deployment/TENANT/NAME`, its tenant resolved.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import grpc

from controller.cli.client import CliError, Exit, exit_code_of, rpc_error_text, status_code
from controller.cli.commands.wait import wait_gone
from controller.cli.context import Context
from controller.cli.each import combined_exit
from controller.cli.manifests import ManifestObject, load_manifest_sources
from controller.cli.refs import add_tenant_flag, deployment_name, deployment_ref, split_kind
from controller.cli.views import phase_text
from maia.v1 import admin_pb2, deployments_pb2

KINDS = {"deployment": "deployment", "deployments": "deployment", "deploy": "deployment",
         "tenant": "tenant", "tenants": "tenant", "node": "node", "nodes": "node",
         "rack": "rack", "racks": "rack", "row": "row", "rows": "row", "zone": "zone", "zones": "zone"}
# The topology's items, each deleted after the kind it holds (and after every other kind).
TOPOLOGY_ORDER = {"rack": 1, "row": 2, "zone": 3}
_TOPOLOGY_RPC = {"rack": "DeleteRack", "row": "DeleteRow", "zone": "DeleteZone"}


@dataclass(frozen=True)
class Outcome:
    ref: str
    action: str  # deleted | failed | skipped
    detail: str = ""
    exit_code: int = Exit.OK


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("delete", parents=[common],
                       help="delete deployments (their shards are stopped), tenants, nodes (their shards move), "
                            "or empty racks, rows and zones",
                       description="maiactl delete [deployment|tenant|node|rack|row|zone] NAME... | maiactl delete "
                                   "-f FILE...: tries every object and reports each; when any failed, exit with the "
                                   "code of their failure if all failed alike (3 NOT_FOUND, 2 INVALID_ARGUMENT), "
                                   "else 1. Without a kind, NAMEs are deployments, or say their "
                                   "kind as -o name prints them: deployment/TENANT/NAME, tenant/ID, node/ID, rack/ID, "
                                   "row/ID, zone/ID. A rack is deleted only when no node is in it, a row when no rack "
                                   "is, a zone when no row is and no tenant's contract names it; racks go before "
                                   "rows and rows before zones, so a file's whole topology can be deleted at once.")
    p.add_argument("words", nargs="*", metavar="[KIND] NAME",
                   help="deployment|tenant|node|rack|row|zone (optional), then names: NAME, TENANT/NAME "
                        "(deployments) or KIND/NAME")
    p.add_argument("-f", "--filename", action="append", metavar="FILE|DIR|-",
                   help="delete the objects of these manifests (repeatable)")
    add_tenant_flag(p)
    p.set_defaults(handler=run)


def targets(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(kind, name) pairs to delete, from the words or the files; deployments as TENANT/NAME when
    the tenant is known (manifests carry it)."""
    if args.filename:
        if args.words:
            raise CliError("give either -f FILE or NAMEs, not both", Exit.USAGE)
        objects = load_manifest_sources(args.filename)
        pairs = [("deployment", _manifest_deployment(o)) for o in objects if o.kind == "Deployment"]
        pairs += [("tenant", o.name) for o in objects if o.kind == "Tenant"]
        for topo in (o.message for o in objects if o.kind == "Topology"):  # admin_pb2.Topology
            pairs += [("rack", k.id) for k in topo.racks]  # type: ignore[attr-defined]
            pairs += [("row", r.id) for r in topo.rows]  # type: ignore[attr-defined]
            pairs += [("zone", z.id) for z in topo.zones]  # type: ignore[attr-defined]
        if not pairs:
            raise CliError(f"{', '.join(args.filename)}: no objects to delete", Exit.USAGE)
        return _topology_last(list(dict.fromkeys(pairs)))
    words = list(args.words)
    kind = KINDS.get(words[0], "") if words else ""
    names = words[1:] if kind else words
    if not names:
        raise CliError("delete needs NAMEs (maiactl delete [deployment|tenant|node|rack|row|zone] NAME...) or -f FILE",
                       Exit.USAGE)
    pairs = [_target(name, kind) for name in names]
    others = sorted({k for k, _ in pairs if k != "deployment"})
    if args.tenant and others:
        raise CliError(f"delete {others[0]}: -n/--tenant applies to deployments only", Exit.USAGE)
    pairs = [(k, str(deployment_ref(n, args.tenant)) if k == "deployment" else n) for k, n in pairs]
    return _topology_last(list(dict.fromkeys(pairs)))


def _topology_last(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`pairs` with racks, rows and zones last, in that order (each kind in the order given)."""
    return sorted(pairs, key=lambda pair: TOPOLOGY_ORDER.get(pair[0], 0))


def _target(word: str, kind: str) -> tuple[str, str]:
    """(kind, name) of one NAME: of `kind` (the word before the NAMEs, if any), else the kind
    the NAME starts with (`tenant/ID`, `node/ID`, `deployment/...`), else a deployment."""
    split = split_kind(word, KINDS)
    if split is None:
        return kind or "deployment", word
    if kind and split[0] != kind:
        raise CliError(f"delete {kind}: {word!r} names a {split[0]}", Exit.USAGE)
    # A deployment keeps its word whole: `deployment_ref` reads deployment/[TENANT/]NAME.
    return split[0], word if split[0] == "deployment" else split[1]


def _manifest_deployment(obj: ManifestObject) -> str:
    tenant = obj.message.tenant  # a Deployment manifest's message is its DeploymentSpec
    return f"{tenant}/{obj.name}" if tenant else obj.name


def _delete(kind: str, name: str, ctx: Context) -> Outcome:
    try:
        if kind in _TOPOLOGY_RPC:
            getattr(ctx.controller.admin, _TOPOLOGY_RPC[kind])(admin_pb2.TopologyItemRequest(id=name),
                                                              timeout=ctx.rpc_timeout)
            return Outcome(f"{kind}/{name}", "deleted")
        if kind == "tenant":
            ctx.controller.admin.DeleteTenant(admin_pb2.DeleteTenantRequest(id=name), timeout=ctx.rpc_timeout)
            return Outcome(f"tenant/{name}", "deleted")
        if kind == "node":
            ctx.controller.admin.DeleteNode(admin_pb2.NodeRequest(id=name), timeout=ctx.rpc_timeout)
            return Outcome(f"node/{name}", "deleted", "its shards are placed again elsewhere")
        ref = deployment_ref(name, None)
        dep = ctx.controller.deployments.DeleteDeployment(
            deployments_pb2.DeleteDeploymentRequest(name=ref.name, tenant=ref.tenant), timeout=ctx.rpc_timeout)
        return Outcome(deployment_name(dep.spec.tenant or ref.tenant, dep.spec.name or ref.name), "deleted",
                       f"phase {phase_text(dep)}")
    except grpc.RpcError as exc:
        if status_code(exc) == grpc.StatusCode.UNAVAILABLE:
            raise  # nothing else will work either: one clear message from main
        return Outcome(f"{kind}/{name}", "failed", rpc_error_text(exc, ctx.address).removeprefix("error: "),
                       exit_code_of(exc))


def run(args: argparse.Namespace, ctx: Context) -> int:
    outcomes: list[Outcome] = []
    deleted: dict[str, list[str]] = {}  # tenant -> its deployments deleted here (TENANT/NAME)
    for kind, name in targets(args):
        if kind == "tenant":  # its deployments deleted here stay DELETING a while: the tenant waits for them
            wait_gone(deleted.pop(name, []), ctx)
        outcome = _delete(kind, name, ctx)
        if kind == "deployment" and outcome.action == "deleted":
            ref = outcome.ref.removeprefix("deployment/")
            deleted.setdefault(ref.partition("/")[0], []).append(ref)
        outcomes.append(outcome)
    if ctx.json:
        ctx.emit_json({"results": [{"object": o.ref, "action": o.action, **({"detail": o.detail} if o.detail else {})}
                                   for o in outcomes]})
    else:
        for o in outcomes:
            if o.action == "failed":
                ctx.note(f"{o.ref} failed: {o.detail}")
            elif ctx.output == "name":
                ctx.out(o.ref)
            else:
                ctx.out(f"{o.ref} {o.action}" + (f" ({o.detail})" if o.detail else ""))
    return combined_exit(o.exit_code for o in outcomes if o.action == "failed")
