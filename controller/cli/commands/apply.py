"""`maiactl apply` (tenants, topology, deployments from manifests) and `maiactl submit`.

Objects are applied in dependency order whatever the file order: topology, then tenants,
then deployments. One line per object says what happened; a failure on one object does not
stop the others, but makes the exit code 1.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import grpc

from controller.cli.client import CliError, rpc_error_text, status_code
from controller.cli.context import Context
from controller.cli.manifests import ManifestObject, load_manifests
from controller.cli.views import placements_table, reasons_text
from maia.v1 import admin_pb2, deployments_pb2

_ORDER = {"Topology": 0, "Tenant": 1, "Deployment": 2}
# The tenant fields the manifest sets (usage fields are filled in by the server).
_TENANT_CONTRACT = ("id", "isolation", "excludes", "zones", "reserved_accelerators",
                    "max_accelerators", "max_power_w")


@dataclass(frozen=True)
class ApplyResult:
    ref: str
    action: str  # created | configured | unchanged | failed
    detail: str = ""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("apply", parents=[common], help="create or update objects from YAML manifests")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                   help="manifest file (repeatable; multi-document YAML)")
    p.set_defaults(handler=run_apply)

    s = sub.add_parser("submit", parents=[common], help="submit deployments from YAML manifests")
    s.add_argument("-f", "--filename", action="append", required=True, metavar="FILE")
    s.add_argument("--dry-run", action="store_true",
                   help="solve against the current cluster and show where shards would land")
    s.set_defaults(handler=run_submit)


def run_apply(args: argparse.Namespace, ctx: Context) -> int:
    objects = sorted(load_manifests(args.filename), key=lambda o: _ORDER[o.kind])
    tenants = order_tenants([o for o in objects if o.kind == "Tenant"])
    objects = [o for o in objects if o.kind == "Topology"] + tenants + [o for o in objects if o.kind == "Deployment"]
    results = [_apply_one(obj, ctx) for obj in objects]
    return _report(results, ctx)


def order_tenants(tenants: list[ManifestObject]) -> list[ManifestObject]:
    """Tenants another one excludes go first (the controller wants excluded tenants to exist).

    In a cycle (a excludes b, b excludes a) the first of the cycle is created without the
    exclusions of tenants not created yet, and applied again in full at the end.
    """
    by_id = {o.name: o for o in tenants}
    ordered: list[ManifestObject] = []
    again: list[ManifestObject] = []
    state: dict[str, str] = {}

    def visit(name: str) -> None:
        if name in state:
            return
        state[name] = "visiting"
        obj = by_id[name]
        for other in obj.message.excludes:  # type: ignore[attr-defined]
            if other in by_id:
                visit(other)
        state[name] = "done"
        pending = [t for t in obj.message.excludes if state.get(t) == "visiting"]  # type: ignore[attr-defined]
        if pending:
            stripped = admin_pb2.Tenant()
            stripped.CopyFrom(obj.message)
            del stripped.excludes[:]
            stripped.excludes.extend(t for t in obj.message.excludes if t not in pending)  # type: ignore[attr-defined]
            ordered.append(replace(obj, message=stripped))
            again.append(obj)
        else:
            ordered.append(obj)

    for obj in tenants:
        visit(obj.name)
    return ordered + again


def _report(results: list[ApplyResult], ctx: Context) -> int:
    if ctx.json:
        ctx.emit_json({"results": [{"object": r.ref, "action": r.action, **({"error": r.detail} if r.detail else {})}
                                   for r in results]})
    else:
        for r in results:
            if r.action == "failed":
                ctx.note(f"{r.ref} failed: {r.detail}")
            else:
                ctx.out(f"{r.ref} {r.action}")
    return 1 if any(r.action == "failed" for r in results) else 0


def _apply_one(obj: ManifestObject, ctx: Context) -> ApplyResult:
    try:
        if obj.kind == "Topology":
            ctx.controller.admin.ApplyTopology(obj.message, timeout=ctx.rpc_timeout)
            return ApplyResult(obj.ref, "configured")
        if obj.kind == "Tenant":
            return ApplyResult(obj.ref, _apply_tenant(obj.message, ctx))
        return ApplyResult(obj.ref, _submit_deployment(obj.message, ctx))
    except grpc.RpcError as exc:
        if status_code(exc) == grpc.StatusCode.UNAVAILABLE:
            raise  # nothing else will work either: one clear message from main
        return ApplyResult(obj.ref, "failed", rpc_error_text(exc, ctx.address).removeprefix("error: "))


def _contract(tenant: admin_pb2.Tenant) -> admin_pb2.Tenant:
    out = admin_pb2.Tenant()
    for name in _TENANT_CONTRACT:
        field = tenant.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated:
            getattr(out, name).extend(getattr(tenant, name))
        elif field.has_presence and not tenant.HasField(name):
            continue
        else:
            setattr(out, name, getattr(tenant, name))
    return out


def _apply_tenant(tenant: admin_pb2.Tenant, ctx: Context) -> str:
    admin = ctx.controller.admin
    try:
        admin.CreateTenant(tenant, timeout=ctx.rpc_timeout)
        return "created"
    except grpc.RpcError as exc:
        if status_code(exc) != grpc.StatusCode.ALREADY_EXISTS:
            raise
    current = admin.GetTenant(admin_pb2.GetTenantRequest(id=tenant.id), timeout=ctx.rpc_timeout)
    if _contract(current) == _contract(tenant):
        return "unchanged"
    admin.UpdateTenant(tenant, timeout=ctx.rpc_timeout)
    return "configured"


def _submit_deployment(spec: deployments_pb2.DeploymentSpec, ctx: Context) -> str:
    stub = ctx.controller.deployments
    try:
        stub.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec), timeout=ctx.rpc_timeout)
        return "created"
    except grpc.RpcError as exc:
        if status_code(exc) != grpc.StatusCode.ALREADY_EXISTS:
            raise
        try:
            current = stub.GetDeployment(deployments_pb2.GetDeploymentRequest(name=spec.name),
                                         timeout=ctx.rpc_timeout)
        except grpc.RpcError:
            return "unchanged"  # the server said it exists; trust it
        if _normalised(current.spec) == _normalised(spec):
            return "unchanged"
        raise CliError(f"deployment/{spec.name} exists with a different spec; "
                       f"delete it first (maiactl delete deployment {spec.name})") from None


def _normalised(spec: deployments_pb2.DeploymentSpec) -> deployments_pb2.DeploymentSpec:
    """Defaults made explicit, so a server that fills them in still compares equal."""
    out = deployments_pb2.DeploymentSpec()
    out.CopyFrom(spec)
    out.min_replicas = out.min_replicas or 1
    out.locality = out.locality or 2  # DOMAIN_RACK
    if out.shard.accelerator_milli == 1000:
        out.shard.accelerator_milli = 0
    if out.HasField("spread") and out.spread.max_per_domain == 0:
        out.ClearField("spread")
    return out


def run_submit(args: argparse.Namespace, ctx: Context) -> int:
    objects = load_manifests(args.filename)
    deployments = [o for o in objects if o.kind == "Deployment"]
    others = [o for o in objects if o.kind != "Deployment"]
    if others:
        raise CliError(f"submit takes Deployment manifests only; use apply for {others[0].source}", 2)
    if not args.dry_run:
        results = []
        for obj in deployments:
            try:
                results.append(_apply_one(obj, ctx))
            except CliError as exc:
                results.append(ApplyResult(obj.ref, "failed", str(exc)))
        return _report(results, ctx)
    answers = []
    for obj in deployments:
        request = deployments_pb2.SubmitDeploymentRequest(spec=obj.message, dry_run=True)
        answers.append(ctx.controller.deployments.SubmitDeployment(request, timeout=ctx.rpc_timeout))
    if ctx.json:
        ctx.emit_json({"results": [a.deployment for a in answers]})
        return 0
    for i, answer in enumerate(answers):
        if i:
            ctx.out()
        ctx.out(dry_run_text(answer.deployment))
    return 0


def dry_run_text(dep: deployments_pb2.Deployment) -> str:
    s = dep.spec
    head = (f"deployment/{s.name} (dry run): would place {dep.placed_replicas}/{s.replicas} replicas "
            f"({s.shards_per_replica} shards each)")
    parts = [head]
    if dep.placements:
        parts.append(placements_table(dep.placements))
    if dep.reasons:
        parts.append("Not placed because:\n" + reasons_text(dep.reasons, indent="  "))
    return "\n".join(parts)
