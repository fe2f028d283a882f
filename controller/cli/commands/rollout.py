"""`maiactl scale DEPLOYMENT --replicas N`, `maiactl rollout status DEPLOYMENT [--timeout]`, `maiactl
rollout history DEPLOYMENT [--revision N]`, `maiactl rollout undo DEPLOYMENT [--to-revision N]` and
`maiactl rollout restart DEPLOYMENT`.

DEPLOYMENT is NAME or TENANT/NAME, after the word `deployment` or as `-o name` prints it
(`deployment/TENANT/NAME`), as kubectl reads `scale deployment web` and `scale deployment/web`.

scale reads the deployment and updates it with the new replica count, naming the resource
version it read (a change made by someone else in between is refused, and read again once).
rollout status follows a rolling update (or a drain) of one deployment until every asked
replica runs the current revision and no old replica is left, printing its progress; it stops at
once (exit 4) when the deployment is Failed or deleted, and prints the deployment with `-o json`
(`rolled_out` false and the error when it ends otherwise: timed out, Failed, deleted).
rollout history lists the revisions the controller keeps (the newest ten), rollout undo rolls back
to one of them (RollbackDeployment: only the template goes back, the replica count stays), rollout
restart replaces every replica with a new one (RestartDeployment: a new revision of the same spec).
"""
from __future__ import annotations

import argparse
import uuid
from typing import Any

import grpc

from controller.cli.bounds import int_max, seconds
from controller.cli.client import DRY_RUN_METADATA, CliError, Exit, dry_run_said_back, status_code
from controller.cli.commands.wait import wait_deployments
from controller.cli.context import Context
from controller.cli.documents import deployment_document, revision_document
from controller.cli.refs import (
    DEPLOYMENT_WORDS, DeploymentRef, KindAndNameFormatter, add_tenant_flag, deployment_name, deployment_ref,
    kind_and_name,
)
from controller.cli.views import revision_detail, revisions_table
from maia.v1 import deployments_pb2

P = deployments_pb2
REPLICAS_MAX = int_max(P.DeploymentSpec.DESCRIPTOR.fields_by_name["replicas"])  # the API's int32


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("scale", parents=[common], formatter_class=KindAndNameFormatter,
                       help="change a deployment's replica count (at once)")
    _add_deployment(s)
    s.add_argument("--replicas", type=int, required=True, metavar="N")
    add_tenant_flag(s)
    s.set_defaults(handler=run_scale)
    r = sub.add_parser("rollout", parents=[common],
                       help="follow a rolling update, list a deployment's revisions, roll one back, restart")
    verbs = r.add_subparsers(dest="rollout_command", metavar="VERB", required=True)
    st = verbs.add_parser("status", parents=[common], formatter_class=KindAndNameFormatter,
                          help="wait until a deployment's rolling update (or drain) is done, showing progress")
    _add_deployment(st)
    st.add_argument("--timeout", type=seconds(), default=300.0, metavar="SECONDS")
    add_tenant_flag(st)
    st.set_defaults(handler=run_status)
    hi = verbs.add_parser("history", parents=[common], formatter_class=KindAndNameFormatter,
                          help="list a deployment's kept revisions (newest first), or show one")
    _add_deployment(hi)
    hi.add_argument("--revision", type=int, metavar="N", help="show revision N alone, with its spec")
    add_tenant_flag(hi)
    hi.set_defaults(handler=run_history)
    un = verbs.add_parser("undo", parents=[common], formatter_class=KindAndNameFormatter,
                          help="roll a deployment back to an older revision's template (shard, shards per "
                               "replica, locality, spread), replica by replica")
    _add_deployment(un)
    un.add_argument("--to-revision", type=int, default=0, metavar="N",
                    help="the revision to go back to (default: the newest before the current one with "
                         "another template)")
    un.add_argument("--dry-run", action="store_true",
                    help="ask the controller what the rollback would change, writing nothing")
    add_tenant_flag(un)
    un.set_defaults(handler=run_undo)
    rs = verbs.add_parser("restart", parents=[common], formatter_class=KindAndNameFormatter,
                          help="replace every replica of a deployment with a new one, one at a time, "
                               "make-before-break (a new revision of the same spec)")
    _add_deployment(rs)
    rs.add_argument("--dry-run", action="store_true",
                    help="ask the controller whether it would restart, writing nothing")
    add_tenant_flag(rs)
    rs.set_defaults(handler=run_restart)


def _add_deployment(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("deployment", nargs="+", metavar="[deployment] NAME",
                        help="NAME or TENANT/NAME, after the word deployment or not, or deployment/TENANT/NAME "
                             "as -o name prints it")


def _deployment(command: str, words: list[str]) -> str:
    """The one deployment of `words` (`[deployment] NAME`, `deployment/...`), for `deployment_ref`."""
    return kind_and_name(command, words, DEPLOYMENT_WORDS, default="deployment")[1]


def run_scale(args: argparse.Namespace, ctx: Context) -> int:
    if args.replicas < 1:
        raise CliError(f"--replicas must be at least 1, got {args.replicas} (delete the deployment to remove it)",
                       Exit.USAGE)
    if args.replicas > REPLICAS_MAX:
        raise CliError(f"--replicas must be at most {REPLICAS_MAX}, got {args.replicas}", Exit.USAGE)
    ref = deployment_ref(_deployment("scale", args.deployment), args.tenant)
    for attempt in range(2):
        current = ctx.controller.deployments.GetDeployment(P.GetDeploymentRequest(name=ref.name, tenant=ref.tenant),
                                                           timeout=ctx.rpc_timeout)
        spec = P.DeploymentSpec()
        spec.CopyFrom(current.spec)
        spec.replicas = args.replicas
        try:
            answer = ctx.controller.deployments.UpdateDeployment(
                P.UpdateDeploymentRequest(spec=spec, resource_version=current.resource_version),
                timeout=ctx.rpc_timeout)
        except grpc.RpcError as exc:
            if status_code(exc) == grpc.StatusCode.ABORTED and attempt == 0:
                continue  # changed between our read and write: read it again, once
            raise
        break
    name = deployment_name(answer.deployment.spec.tenant or ref.tenant, answer.deployment.spec.name or ref.name)
    if ctx.json:
        ctx.emit_json({"deployment": deployment_document(answer.deployment), "changes": list(answer.changes)})
    elif answer.changes:
        ctx.out(f"{name} scaled: replicas {current.spec.replicas} -> {args.replicas} "
                f"(resource version {answer.deployment.resource_version})")
    else:
        ctx.out(f"{name} unchanged: already {args.replicas} replicas")
    return Exit.OK


def run_status(args: argparse.Namespace, ctx: Context) -> int:
    word = _deployment("rollout status", args.deployment)
    # A rollout that cannot end by waiting (the deployment Failed, or deleted) ends the command at
    # once (exit 4); one held by quota or zones waits: an operator may lift them mid-rollout.
    ref = deployment_ref(word, args.tenant)
    try:
        code = wait_deployments([word], "rolled-out", args.timeout, ctx, quiet=True, tenant=args.tenant,
                                reasons_block=False)
    except CliError as exc:
        # -o json prints its one document whatever the end (the deployment as it stands; none
        # when there is none), the error on stderr and the exit code as without it.
        if ctx.json and exc.exit_code != Exit.NOT_FOUND:
            _emit_status(ctx, ref, rolled_out=False, error=str(exc))
        raise
    if ctx.json:
        _emit_status(ctx, ref, rolled_out=True)
    else:
        ctx.out(f'deployment "{ref}" successfully rolled out')
    return code


def _emit_status(ctx: Context, ref: DeploymentRef, *, rolled_out: bool, error: str = "") -> None:
    try:
        dep = ctx.controller.deployments.GetDeployment(P.GetDeploymentRequest(name=ref.name, tenant=ref.tenant),
                                                       timeout=ctx.rpc_timeout)
    except grpc.RpcError:
        if rolled_out:
            raise
        # Deleted while it waited, or the controller out of reach (often why it timed out): the
        # wait's own error stands, with its exit code.
        ctx.emit_json({"deployment": None, "rolled_out": False, "error": error})
        return
    doc: dict[str, object] = {"deployment": deployment_document(dep), "rolled_out": rolled_out}
    if error:
        doc["error"] = error
    ctx.emit_json(doc)


def run_history(args: argparse.Namespace, ctx: Context) -> int:
    if args.revision is not None and args.revision < 1:
        raise CliError(f"--revision must be a revision number (1 or more), got {args.revision}", Exit.USAGE)
    ref = deployment_ref(_deployment("rollout history", args.deployment), args.tenant)
    revisions = list(ctx.controller.deployments.ListDeploymentRevisions(
        P.ListDeploymentRevisionsRequest(name=ref.name, tenant=ref.tenant), timeout=ctx.rpc_timeout).revisions)
    if args.revision is not None:
        one = next((r for r in revisions if r.revision == args.revision), None)
        if one is None:
            kept = ", ".join(str(r.revision) for r in sorted(revisions, key=lambda r: r.revision))
            raise CliError(f"deployment {ref} has no revision {args.revision} kept (kept: {kept})", Exit.NOT_FOUND)
        ctx.emit(lambda: revision_document(one), lambda: revision_detail(one))
        return Exit.OK
    ctx.emit(lambda: {"kind": "List", "items": [revision_document(r) for r in revisions]},
             lambda: revisions_table(revisions),
             names=lambda: [f"revision/{r.spec.tenant}/{r.spec.name}/{r.revision}" for r in revisions], is_table=True)
    return Exit.OK


def run_undo(args: argparse.Namespace, ctx: Context) -> int:
    if args.to_revision < 0:
        raise CliError(f"--to-revision must be a revision number, got {args.to_revision}", Exit.USAGE)
    ref = deployment_ref(_deployment("rollout undo", args.deployment), args.tenant)
    answer = _write(ctx, ctx.controller.deployments.RollbackDeployment, P.RollbackDeploymentRequest(
        name=ref.name, tenant=ref.tenant, to_revision=args.to_revision, client_request_id=f"undo-{uuid.uuid4()}"),
        dry_run=args.dry_run, what=f"rolled {ref} back")
    dep = answer.deployment
    name = deployment_name(dep.spec.tenant or ref.tenant, dep.spec.name or ref.name)
    if ctx.json:
        ctx.emit_json({"deployment": deployment_document(dep), "to_revision": answer.to_revision,
                       "changes": list(answer.changes), "rolling": answer.rolling, "dry_run": args.dry_run})
        return Exit.OK
    prefix = "(dry run) " if args.dry_run else ""
    if answer.changes:
        ctx.out(f"{prefix}{name} rolled back to revision {answer.to_revision}'s template (now revision "
                f"{dep.revision}): {'; '.join(answer.changes)}")
    else:
        ctx.out(f"{prefix}{name} unchanged: its template already is revision {answer.to_revision}'s")
    return Exit.OK


def run_restart(args: argparse.Namespace, ctx: Context) -> int:
    ref = deployment_ref(_deployment("rollout restart", args.deployment), args.tenant)
    answer = _write(ctx, ctx.controller.deployments.RestartDeployment, P.RestartDeploymentRequest(
        name=ref.name, tenant=ref.tenant, client_request_id=f"restart-{uuid.uuid4()}"),
        dry_run=args.dry_run, what=f"restarted {ref}")
    dep = answer.deployment
    name = deployment_name(dep.spec.tenant or ref.tenant, dep.spec.name or ref.name)
    if ctx.json:
        ctx.emit_json({"deployment": deployment_document(dep), "changes": list(answer.changes),
                       "dry_run": args.dry_run})
    else:
        ctx.out(f"{'(dry run) ' if args.dry_run else ''}{name} restarted (revision {dep.revision}): its replicas "
                f"are replaced one at a time; follow with: maiactl rollout status {name}")
    return Exit.OK


def _write(ctx: Context, method: Any, request: Any, *, dry_run: bool, what: str) -> Any:
    """The answer of a write (`method` with `request`), asked as a dry run when `dry_run`: a
    controller that does not say the dry run back knew none and may have written (`what`)."""
    answer, call = method.with_call(request, timeout=ctx.rpc_timeout, metadata=DRY_RUN_METADATA if dry_run else None)
    if dry_run and not dry_run_said_back(call):
        raise CliError(f"the controller at {ctx.address} does not know dry runs of this write (it is older than "
                       f"maiactl) and may have {what}; see `maiactl rollout history`", Exit.FAILED)
    return answer
