"""`maiactl explain deployment NAME`: why it is pending or degraded, and the smallest change that fits.

It shows the solver's reasons from the last reconcile pass, then asks the controller for dry
runs of variants of the spec, each solved as if it replaced the stored deployment (nothing is
written): the spec as it is now, fewer replicas (when some fit; a gang that places none, with
min_replicas, first tells with `min_replicas: 1` how many would), a wider locality (rack -> row
-> zone -> none; for replicas of more than one shard) and fewer, bigger shards per replica (not
bigger than one already refused as never fitting), and reports how many replicas each would
place. A dry run refused for the caller (its rate, its token) ends it with that error.
The first variant that places everything asked is the suggestion, with how to make it: every
field tried changes in place (a replica count at once with `maiactl scale`, the others replica
by replica through `apply` of the changed manifest), never by deleting the deployment. Reasons
such as a tenant's quota are named as they are (the fix is the tenant's contract, not the
deployment). A deployment waiting at the head of the line also shows its nomination: the nodes
kept for it, as the leader stored them (with the deployment: `Deployment.nomination`), else the
last nomination among its events (why the nodes are no longer kept) (docs/operations.md,
"Head-of-line nominations").
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

import grpc

from controller.cli.client import Exit, retry_told_s, rpc_error_text, status_code
from controller.cli.commands.get import fetch_events
from controller.cli.context import Context
from controller.cli.documents import event_document, nomination_document
from controller.cli.refs import DEPLOYMENT_WORDS, add_tenant_flag, deployment_ref, kind_and_name
from controller.cli.views import phase_text, reasons_text, time_text
from controller.cli.vocab import DOMAIN_BY_WORD, domain_word
from maia.v1 import admin_pb2, deployments_pb2

WIDER = ("node", "rack", "row", "zone", "none")
MAX_TRIES = 6
# How a change of what a replica is (locality, shards per replica) is made: in place, rolling.
_ROLLS = "it applies in place, replica by replica: change it in the manifest and `maiactl apply -f` it"
# ... and of min_replicas (with the replicas: `maiactl scale` keeps min_replicas, above them).
_MIN_REPLICAS = "it applies in place: change it in the manifest and `maiactl apply -f` it"
# Refusals of the dry run itself, not of the variant tried (with RetryInfo: a rate, a busy solver).
# (Not DEADLINE_EXCEEDED: a variant whose search outlasts --rpc-timeout is that variant's.)
_NOT_THE_VARIANTS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED,
                               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
NOMINATED, NOMINATION_ENDED = "deployment.nominated", "deployment.nomination_ended"
RECENT_EVENTS = 100  # of the deployment's, looked through for its last nomination


@dataclass(frozen=True)
class Variant:
    change: str                      # 'as it is', 'replicas: 2', 'locality: row'
    spec: deployments_pb2.DeploymentSpec
    placed: int | None = None        # replicas it would place; None when refused
    error: str = ""
    how: str = ""                    # how to make the change on the stored deployment
    bigger_shards: bool = False      # fewer, bigger shards: refused as never fitting, bigger ones are too

    @property
    def fits(self) -> bool:
        return self.placed is not None and self.placed >= self.spec.replicas


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("explain", parents=[common],
                       help="why a deployment is pending or degraded, and the smallest change that would fit")
    p.add_argument("resource", metavar="deployment",
                   help="deployment (it may be left out: explain TENANT/NAME); or deployment/[TENANT/]NAME as "
                        "-o name prints it, with no NAME after it")
    p.add_argument("name", metavar="NAME", nargs="?", help="NAME or TENANT/NAME")
    add_tenant_flag(p)
    p.set_defaults(handler=run)


def _variant(base: deployments_pb2.DeploymentSpec, change: str, how: str = "", **fields: Any) -> Variant:
    spec = deployments_pb2.DeploymentSpec()
    spec.CopyFrom(base)
    for key, value in fields.items():
        setattr(spec, key, value)
    if spec.min_replicas > spec.replicas:
        spec.min_replicas = spec.replicas
    return Variant(change, spec, how=how)


def candidates(spec: deployments_pb2.DeploymentSpec, placed_now: int) -> list[Variant]:
    """The spec as it is, then single changes, smallest first, each with how to make it."""
    out = [_variant(spec, "as it is")]
    if 0 < placed_now < spec.replicas:
        out.append(_variant(spec, f"replicas: {placed_now}", replicas=placed_now,
                            how=f"it applies in place, at once: maiactl scale {spec.tenant}/{spec.name} "
                                f"--replicas {placed_now}"))
    elif placed_now == 0 and spec.min_replicas > 1:  # all or nothing: how many would fit, one at least?
        out.append(_variant(spec, "min_replicas: 1", how=_MIN_REPLICAS, min_replicas=1))
    current = domain_word(spec.locality)
    # A replica of one shard sits on one node whatever its locality: no wider one places more.
    if current in WIDER and spec.shards_per_replica > 1:
        for word in WIDER[WIDER.index(current) + 1:]:
            out.append(_variant(spec, f"locality: {word}", how=_ROLLS, locality=DOMAIN_BY_WORD[word]))
    # Fewer, bigger shards: the replica keeps its accelerators (a shard then holds more of the
    # model). Fewer shards of the same size asked a quarter of the hardware and "fitted" so,
    # told as if each shard held more. Not for fractions of one accelerator.
    shards, total = spec.shards_per_replica // 2, spec.shards_per_replica * spec.shard.accelerators
    fraction = 0 < spec.shard.accelerator_milli < 1000  # the controller says 1000 of a whole accelerator
    while shards >= 1 and len(out) < MAX_TRIES and not fraction:
        each = total // shards
        if each * shards != total:
            break
        variant = _variant(spec, f"shards_per_replica: {shards} of {each} accelerators each (the same {total} a "
                                 f"replica, in fewer, bigger shards)", how=_ROLLS, shards_per_replica=shards)
        variant.spec.shard.accelerators = each
        out.append(replace(variant, bigger_shards=True))
        shards //= 2
    return out[:MAX_TRIES]


def _try(variant: Variant, ctx: Context) -> Variant:
    """The variant's dry run: how many replicas it would place, or why the controller refused it.
    A refusal of the call, not of the variant (the controller away, the caller's dry-run rate or
    the solver's slots spent, its token), is raised: the variants after it would meet it too,
    and were told as "no change fits" (exit 0)."""
    request = deployments_pb2.SubmitDeploymentRequest(spec=variant.spec, dry_run=True, replace_existing=True)
    try:
        dep = ctx.controller.deployments.SubmitDeployment(request, timeout=ctx.rpc_timeout).deployment
    except grpc.RpcError as exc:
        if status_code(exc) in _NOT_THE_VARIANTS or retry_told_s(exc) is not None:
            raise
        return replace(variant, placed=None, error=rpc_error_text(exc, ctx.address).removeprefix("error: "))
    return replace(variant, placed=dep.placed_replicas)


def _tried(spec: deployments_pb2.DeploymentSpec, placed_now: int, ctx: Context) -> list[Variant]:
    """`candidates` tried in order until one fits; fewer, bigger shards stop at the first refused
    (a bigger one is refused too); a gang that places nothing tries, after `min_replicas: 1` told
    how many fit, that many replicas."""
    tried: list[Variant] = []
    queue = candidates(spec, placed_now)
    while queue and len(tried) < MAX_TRIES + 1:
        variant = queue.pop(0)
        if variant.bigger_shards and any(t.bigger_shards and t.placed is None for t in tried):
            continue
        tried.append(_try(variant, ctx))
        if tried[-1].fits:  # 'as it is' fitting: the last pass saw another state
            break
        fit = tried[-1].placed or 0
        if variant.change == "min_replicas: 1" and 0 < fit < spec.replicas:
            queue.insert(0, _variant(spec, f"replicas: {fit}, min_replicas: {fit}", how=_MIN_REPLICAS,
                                     replicas=fit, min_replicas=fit))
    return tried


def last_nomination(ctx: Context, spec: deployments_pb2.DeploymentSpec) -> admin_pb2.EventRecord | None:
    """The deployment's last nomination event among its recent ones (made, or ended); None when
    there is none, or when the caller may not read events or the controller has none to list."""
    try:
        events = fetch_events(ctx, "deployment", spec.name, limit=RECENT_EVENTS, tenant=spec.tenant)
    except grpc.RpcError as exc:
        if status_code(exc) in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED):
            return None
        raise
    return next((e for e in reversed(events) if e.kind in (NOMINATED, NOMINATION_ENDED)), None)


def _nomination_document(dep: deployments_pb2.Deployment, event: admin_pb2.EventRecord | None) -> dict[str, Any] | None:
    """What -o json says of the deployment's nomination: the one stored (held; `source` "stored"),
    else its last event (`source` "event", with the event's fields)."""
    if dep.HasField("nomination"):
        return {"held": True, "source": "stored", **nomination_document(dep.nomination)}
    return None if event is None else {"held": event.kind == NOMINATED, "source": "event", **event_document(event)}


def _nomination_text(dep: deployments_pb2.Deployment, event: admin_pb2.EventRecord | None) -> str | None:
    """The 'Head of the line' paragraph: the nomination stored, else the deployment's last event of one."""
    if dep.HasField("nomination"):
        n = dep.nomination
        return (f"Head of the line (nominated at {time_text(n.nominated_at)}): nodes {', '.join(n.nodes)} kept for "
                f"it, waiting since {time_text(n.waiting_since)}, {n.missing_replicas} replica(s) short when they "
                f"were chosen")
    if event is None:
        return None
    what = "nominated" if event.kind == NOMINATED else "nomination ended"
    return f"Head of the line ({what} at {time_text(event.at)}): {event.message}"


def run(args: argparse.Namespace, ctx: Context) -> int:
    _, name = kind_and_name("explain", [args.resource, *([] if args.name is None else [args.name])],
                            DEPLOYMENT_WORDS, default="deployment")  # it explains deployments only
    ref = deployment_ref(name, args.tenant)
    dep = ctx.controller.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name=ref.name,
                                                                                        tenant=ref.tenant),
                                                   timeout=ctx.rpc_timeout)
    s = dep.spec
    settled = dep.placed_replicas >= s.replicas and not dep.reasons
    tried: list[Variant] = []
    # The nomination stored comes with the deployment; else its last event says how one ended.
    nomination = None if settled or dep.HasField("nomination") else last_nomination(ctx, s)
    if not settled:
        tried = _tried(s, dep.placed_replicas, ctx)
    suggestion = next((v for v in tried if v.fits), None)
    if ctx.json:
        ctx.emit_json({"deployment": s.name, "phase": phase_text(dep).lower(), "replicas": s.replicas,
                       "placed_replicas": dep.placed_replicas,
                       "reasons": [{"code": r.code, "message": r.message, "scope": r.scope} for r in dep.reasons],
                       "tried": [{"change": v.change, "would_place": v.placed, **({"error": v.error} if v.error else {})}
                                 for v in tried],
                       "suggestion": suggestion.change if suggestion else None,
                       "how": suggestion.how if suggestion else None,
                       "nomination": None if settled else _nomination_document(dep, nomination)})
        return Exit.OK
    ctx.out(f"deployment/{s.name}: {phase_text(dep)}, {dep.placed_replicas}/{s.replicas} replicas placed, "
            f"{dep.running_replicas} running")
    if settled:
        ctx.out("Every replica asked for is placed: nothing to explain.")
        return Exit.OK
    if dep.reasons:
        ctx.out("\nWhy (the solver's reasons at the last reconcile pass):\n" + reasons_text(dep.reasons, indent="  "))
    head = _nomination_text(dep, nomination)
    if head is not None:
        ctx.out("\n" + head)
    ctx.out("\nWhat would fit now (dry runs, nothing written):")
    for v in tried:
        outcome = v.error if v.error else f"would place {v.placed}/{v.spec.replicas} replicas"
        ctx.out(f"  {v.change:<40} {outcome}")
    if suggestion is None:
        ctx.out("\nNo single change tried fits; see the reasons (a quota is changed on the tenant, "
                "capacity by adding or freeing nodes).")
    elif suggestion.change == "as it is":
        ctx.out("\nIt fits as it is now: the next reconcile pass should place it.")
    else:
        ctx.out(f"\nSmallest change that fits: {suggestion.change}; {suggestion.how}.")
    return Exit.OK
