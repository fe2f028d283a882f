"""`maiactl apply -f FILE|DIR|-`, `maiactl diff -f ...` and `maiactl submit -f ...`.

apply works in three steps, so a bad batch writes nothing:
1. every document of every source is parsed and checked on the client (all problems at once,
   exit 2; an empty set of manifests is an error too);
2. a plan is made against the controller without writing (`apply_plan`): each object is `created`,
   `configured`, `unchanged`, or a conflict, each write asked of the controller as a dry run and
   new deployments solved where they would land. Any conflict stops here (exit 1; a controller's
   refusal exits as its code does, INVALID_ARGUMENT 2, NOT_FOUND 3);
3. the plan is written in dependency order (topology, tenants, deployments). A deployment update
   names the resource version read in step 2, so a change made by someone else meanwhile is
   refused rather than overwritten. Every write carries one client request id per apply run, so
   a retried call is not applied twice. New deployments are sent together, in SubmitDeployments
   calls of up to `limits.SUBMITS_PER_CALL_MAX` (`_Writer`; one SubmitDeployment each against a
   controller that answers UNIMPLEMENTED), each decided and answered on its own; those the
   tenant's submit rate refuses are sent again while each call writes some. Should a write
   still fail (a race, a rule only the server checks), what this run created is deleted again
   (the deployments of the failing call that were written too; a tenant once the deployments
   deleted in it are gone, waited for at most --rpc-timeout), updated tenants get their old
   contract and updated deployments their old spec back; a topology change cannot be undone
   (its RPC removes nothing) and is reported as such. The exit code is the failed call's
   (`client.exit_code_of`: INVALID_ARGUMENT 2, NOT_FOUND 3, others 1), as anywhere in maiactl.

`apply --dry-run` stops after step 2 and shows what would change, what the controller would
refuse and, for new deployments, where their shards would land now (a dry-run solve), like
`nomad job plan`. `diff` shows the differences only, asking the controller nothing but reads.
A dry run that would place only part of a deployment exits 4 (Exit.PARTIAL).
"""
from __future__ import annotations

import argparse
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import grpc

from controller import limits
from controller.cli.client import CliError, Exit, StatusError, exit_code_of, rpc_error_text, status_code
from controller.cli.commands import apply_plan
from controller.cli.commands.apply_plan import Step, _contract, _get_or_none, ordered_objects, plan
from controller.cli.commands.wait import wait_gone
from controller.cli.retry import RetryPolicy
from controller.cli.context import Context
from controller.cli.documents import deployment_document, list_document
from controller.cli.manifests import ManifestObject, load_manifest_sources
from controller.cli.views import placements_table, reasons_text
from controller.retryinfo import status_retry_s
from maia.v1 import admin_pb2, deployments_pb2


def _sources_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR|-",
                   help="manifests: a YAML file (multi-document), a directory of *.yaml/*.yml/*.json, "
                        "or - for stdin (repeatable)")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("apply", parents=[common], help="create or update objects from YAML manifests (all or nothing)")
    _sources_option(p)
    p.add_argument("--dry-run", action="store_true",
                   help="write nothing: show what would change, what the controller would refuse, and where "
                        "new deployments would land (exit 4 when only part would be placed)")
    p.add_argument("--no-solve", action="store_true",
                   help="plan without the dry-run solves of new deployments (the controller allows a tenant "
                        f"{limits.DRY_RUNS_PER_MINUTE:g} a minute by default, so a batch of many different specs takes "
                        "long to plan; its progress is on stderr): the tenant's deployment cap is still counted, "
                        "but what only a solve refuses (a deployment that could never fit) fails its write, which "
                        "rolls back, and --dry-run shows no placements")
    p.set_defaults(handler=run_apply)

    d = sub.add_parser("diff", parents=[common],
                       help="what apply would change, field by field (exit 0: nothing, 1: differences)")
    _sources_option(d)
    d.set_defaults(handler=run_diff)

    s = sub.add_parser("submit", parents=[common], help="submit deployments from YAML manifests")
    _sources_option(s)
    s.add_argument("--dry-run", action="store_true",
                   help="solve against the current cluster and show where shards would land, an existing "
                        "deployment's as updated in place (exit 4 when only part would be placed)")
    s.set_defaults(handler=run_submit)


# --- step 3: writing, with rollback ----------------------------------------------------------

def _write(step: Step, ctx: Context, request_id: str) -> None:
    admin, deployments = ctx.controller.admin, ctx.controller.deployments
    if step.obj.kind == "Topology":
        admin.ApplyTopology(step.obj.message, timeout=ctx.rpc_timeout)
    elif step.obj.kind == "Tenant":
        call = admin.CreateTenant if step.action == "created" else admin.UpdateTenant
        try:
            call(step.obj.message, timeout=ctx.rpc_timeout)
        except grpc.RpcError as exc:  # created by the first pass of an exclusion cycle
            if status_code(exc) != grpc.StatusCode.ALREADY_EXISTS:
                raise
            admin.UpdateTenant(step.obj.message, timeout=ctx.rpc_timeout)
    elif step.action == "configured":
        answer = deployments.UpdateDeployment(deployments_pb2.UpdateDeploymentRequest(
            spec=step.obj.message, resource_version=step.previous.resource_version,
            client_request_id=f"{request_id}/{step.obj.name}"), timeout=ctx.rpc_timeout)
        step.updated = answer.deployment
        step.rolling = answer.rolling
    else:
        deployments.SubmitDeployment(_submit_request(step, request_id), timeout=ctx.rpc_timeout)


def _submit_request(step: Step, request_id: str) -> deployments_pb2.SubmitDeploymentRequest:
    return deployments_pb2.SubmitDeploymentRequest(spec=step.obj.message,
                                                   client_request_id=f"{request_id}/{step.obj.name}")


# The longest pause a submit rate may ask of apply's writes before they give up (and roll back).
RATE_PAUSE_MAX_S = 60.0


def _submit_many(steps: list[Step], ctx: Context, request_id: str,
                 policy: RetryPolicy = RetryPolicy(), rng: random.Random | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 progress: Callable[[int, str], None] | None = None) -> list[grpc.RpcError | None]:
    """The new deployments of `steps` submitted in one SubmitDeployments call; per step, what
    refused it (as the RpcError its own SubmitDeployment would have raised) or None: written.
    Requests answered "nothing written, send again after this pause" (RetryInfo) are sent again,
    alone, as the channel retries a call that is answered so (`cli.retry.RetryPolicy`), but for
    the tenant's submit rate (RESOURCE_EXHAUSTED): a batch beyond its burst is refused in part by
    every call, so they are sent again as long as a call writes some (`policy`'s attempts count
    the calls that wrote none), after a pause up to RATE_PAUSE_MAX_S, long enough for several of
    them (the pause told is one submit's), saying on stderr how far the writes are (`progress`:
    the number of `steps` written, the controller's words). A failure of a call itself is
    raised: UNIMPLEMENTED from an older controller wrote none; after any other any of `steps`
    may have been written (the controller may have served a call whose answer came too late, and
    a call sending some again follows one that wrote others)."""
    rng = rng or random.Random()
    failures: dict[int, grpc.RpcError | None] = {}
    pending = list(range(len(steps)))
    attempts = 0
    while pending:
        attempts += 1
        started = time.monotonic()
        answer = ctx.controller.deployments.SubmitDeployments(deployments_pb2.SubmitDeploymentsRequest(
            requests=[_submit_request(steps[i], request_id) for i in pending]), timeout=ctx.rpc_timeout)
        took = time.monotonic() - started
        again: list[int] = []
        told = 0.0
        rate = True  # every request told to come again was refused by the submit rate
        for i, result in zip(pending, answer.results, strict=True):
            if result.HasField("deployment"):
                failures[i] = None
                continue
            failures[i] = StatusError(result.error)
            pause = status_retry_s(result.error)
            if pause is not None:
                again.append(i)
                told = max(told, pause)
                rate = rate and result.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        if again and rate:
            if len(again) < len(pending):  # some were written: the rate lets more through as it refills
                attempts = 0
            told = min(RATE_PAUSE_MAX_S, max(told, min(told * len(again), apply_plan.PROGRESS_EVERY_S)))
            wait = replace(policy, max_wait_s=RATE_PAUSE_MAX_S).pause_s(told, attempts, None, took, rng)
            if progress is not None and wait is not None:
                progress(len(steps) - len(again), rpc_error_text(failures[again[0]], ctx.address)  # type: ignore[arg-type]
                         .removeprefix("error: "))
        else:
            wait = policy.pause_s(told, attempts, None, took, rng) if again else None
        if wait is None:
            break
        sleep(wait)
        pending = again
    return [failures[i] for i in range(len(steps))]


def _undo(done: list[Step], ctx: Context, unknown: list[Step] | None = None) -> list[str]:
    """Reverse what `done` wrote; returns one line per undo (or per thing that could not be undone).
    `unknown`: those of `done` that may not have been written (NOT_FOUND: nothing to undo)."""
    lines = []
    maybe = {id(step) for step in unknown or []}
    deleted: dict[str, list[str]] = {}  # tenant -> TENANT/NAME of its deployments deleted here
    for step in reversed(done):
        try:
            if step.obj.kind == "Deployment" and step.action == "created":
                tenant = step.obj.message.tenant
                ctx.controller.deployments.DeleteDeployment(
                    deployments_pb2.DeleteDeploymentRequest(name=step.obj.name, tenant=tenant),
                    timeout=ctx.rpc_timeout)
                deleted.setdefault(tenant, []).append(f"{tenant}/{step.obj.name}")
                lines.append(f"{step.ref} deleted again")
            elif step.obj.kind == "Deployment" and step.action == "configured" and step.updated is not None:
                ctx.controller.deployments.UpdateDeployment(deployments_pb2.UpdateDeploymentRequest(
                    spec=step.previous.spec, resource_version=step.updated.resource_version), timeout=ctx.rpc_timeout)
                lines.append(f"{step.ref} spec restored")
            elif step.obj.kind == "Deployment" and step.action == "configured" and id(step) in maybe:
                spec = step.previous.spec  # its update went unanswered: restored if it landed
                now = ctx.controller.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(
                    name=spec.name, tenant=spec.tenant), timeout=ctx.rpc_timeout)
                if now.resource_version != step.previous.resource_version:
                    ctx.controller.deployments.UpdateDeployment(deployments_pb2.UpdateDeploymentRequest(
                        spec=spec, resource_version=now.resource_version), timeout=ctx.rpc_timeout)
                    lines.append(f"{step.ref} spec restored")
            elif step.obj.kind == "Tenant" and step.previous is not None:
                ctx.controller.admin.UpdateTenant(_contract(step.previous), timeout=ctx.rpc_timeout)
                lines.append(f"{step.ref} restored")
            elif step.obj.kind == "Tenant" and step.action == "created":
                wait_gone(deleted.pop(step.obj.name, []), ctx)
                ctx.controller.admin.DeleteTenant(admin_pb2.DeleteTenantRequest(id=step.obj.name),
                                                  timeout=ctx.rpc_timeout)
                lines.append(f"{step.ref} deleted again")
            elif step.obj.kind == "Topology" and step.action == "configured":
                lines.append("topology: changes stay (a topology cannot be rolled back)")
        except grpc.RpcError as exc:
            if id(step) in maybe and status_code(exc) == grpc.StatusCode.NOT_FOUND:
                continue  # it was not written
            lines.append(f"{step.ref}: could not be undone: {rpc_error_text(exc, ctx.address).removeprefix('error: ')}")
    return lines


def _step_line(step: Step) -> str:
    line = f"{step.ref} {step.action}"
    if step.updated is not None:
        line += f" ({'; '.join(step.detail)})" if step.detail else ""
        line += (f": rolling to revision {step.updated.revision} (maiactl rollout status {step.obj.name})"
                 if step.rolling else "")
    dep = step.dry_run
    if dep is not None and dep.placed_replicas < dep.spec.replicas:
        first = _split(dep)[0][:1]
        why = f": {first[0].code}: {first[0].message}" if first else ""
        line += (f" (only {dep.placed_replicas}/{dep.spec.replicas} replicas would be placed now{why}; "
                 f"the rest waits as Pending)")
    return line


def _conflicts(steps: list[Step]) -> list[str]:
    """One line per conflict (its details indented), but those told at another's (`same_as`: the
    deployments beyond a tenant's cap, those sharing a refused spec) are counted in its line."""
    alike: dict[int, list[Step]] = {}
    for step in steps:
        if step.action == "conflict" and step.same_as is not None:
            alike.setdefault(id(step.same_as), []).append(step)
    lines = []
    for step in steps:
        if step.action != "conflict" or step.same_as is not None:
            continue
        more = alike.get(id(step), [])
        also = (f" (and {len(more)} more {'of the same spec' if more[0].solved_as else 'beyond it'}: "
                f"{', '.join(s.ref for s in more[:2])}{', ...' if len(more) > 2 else ''})" if more else "")
        lines.append(f"{step.ref}: {step.detail[0]}{also}" if len(step.detail) == 1 else f"{step.ref}:{also}")
        if len(step.detail) > 1:
            lines.extend(f"  {d}" for d in step.detail)
    return lines


def _conflict_exit(steps: list[Step]) -> int:
    """The exit code of a plan with conflicts: the first one's, a refusal by the controller's code
    (INVALID_ARGUMENT 2, as the same call would exit alone), a conflict of the plan's own 1."""
    first = next(step for step in steps if step.action == "conflict")
    return exit_code_of(first.refused) if first.refused is not None else Exit.FAILED


def run_apply(args: argparse.Namespace, ctx: Context) -> int:
    objects = ordered_objects(load_manifest_sources(args.filename), ctx)
    steps = plan(objects, ctx, judge=True, solve=not args.no_solve)
    if args.dry_run:
        return _show_plan(steps, ctx)
    conflicts = _conflicts(steps)
    if conflicts:
        raise CliError("nothing applied:\n" + "\n".join(conflicts), _conflict_exit(steps))
    writer = _Writer(ctx, request_id=f"apply-{uuid.uuid4().hex}",  # one id per run: a retried call is not applied twice
                     new=sum(s.obj.kind == "Deployment" and s.action == "created" for s in steps))
    for step in steps:
        if step.obj.kind == "Deployment" and step.action == "created" and writer.batched:
            writer.created.append(step)
            if len(writer.created) == limits.SUBMITS_PER_CALL_MAX:
                writer.flush()
            continue
        writer.flush()
        writer.write(step)
    writer.flush()
    _report(steps, ctx)
    return Exit.OK


# A call that ended so may have been written all the same (the controller's answer was not heard).
_OUTCOME_UNKNOWN = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN})


@dataclass
class _Writer:
    """Step 3: each step written in order; new deployments gathered (`created`) and sent together
    in SubmitDeployments calls of at most `limits.SUBMITS_PER_CALL_MAX` (`flush`), or one
    SubmitDeployment each when the controller does not know that call (UNIMPLEMENTED: `batched`
    off). A step that fails undoes what was written (`done`), as one failing alone always did."""

    ctx: Context
    request_id: str
    done: list[Step] = field(default_factory=list)
    created: list[Step] = field(default_factory=list)
    batched: bool = True
    new: int = 0                     # new deployments to write, all told (for progress)
    said: float = field(default_factory=time.monotonic)  # progress last said

    def write(self, step: Step) -> None:
        if step.action == "unchanged":  # nothing to write, so nothing a rollback may touch
            return
        try:
            _write(step, self.ctx, self.request_id)
        except grpc.RpcError as exc:
            # No answer in time (or none at all): the write may have landed, so it is undone too
            # where it was (it was said failed while its change stood, the rest rolled back).
            self.fail([(step, exc)], unknown=[step] if status_code(exc) in _OUTCOME_UNKNOWN else None)
        self.done.append(step)

    def flush(self) -> None:
        steps, self.created = self.created, []
        if not steps:
            return
        try:
            failures = _submit_many(steps, self.ctx, self.request_id, progress=self._progress)
        except grpc.RpcError as exc:
            if status_code(exc) != grpc.StatusCode.UNIMPLEMENTED:  # any of them may have been written
                self.fail([(steps[0], exc)], more=len(steps) - 1, unknown=steps)
            self.batched = False  # an older controller: one call each, as before SubmitDeployments
            for step in steps:
                self.write(step)
            return
        self.done.extend(step for step, failure in zip(steps, failures) if failure is None)
        failed = [(step, failure) for step, failure in zip(steps, failures) if failure is not None]
        if failed:
            self.fail(failed)

    def _progress(self, written: int, told: str) -> None:
        """While a call's deployments wait for the tenant's submit rate, every `apply_plan.PROGRESS_EVERY_S` (read
        there when called, so the plan's and the writes' progress keep one pace)."""
        now = time.monotonic()
        if now - self.said < apply_plan.PROGRESS_EVERY_S:
            return
        self.said = now
        created = sum(step.obj.kind == "Deployment" and step.action == "created" for step in self.done)
        self.ctx.note(f"writing: {created + written}/{self.new} new deployments written; the controller asked to "
                      f"wait ({told})")

    def fail(self, failed: list[tuple[Step, grpc.RpcError]], more: int = 0,
             unknown: list[Step] | None = None) -> NoReturn:
        """Stop: undo what was written and say what failed, exiting as the first failed call
        (`exit_code_of`). An UNAVAILABLE is raised as it is,
        nothing undone (its write may have landed: the controller could not say; apply again).
        `unknown`: new deployments of a SubmitDeployments call that ended without an answer (its
        answer came after the deadline, say, or a call sending some again failed), undone too where
        they were written (a delete that finds none is nothing to undo)."""
        for _, exc in failed:
            if status_code(exc) == grpc.StatusCode.UNAVAILABLE:
                raise exc
        undone = _undo([*self.done, *(unknown or [])], self.ctx, unknown=unknown or [])
        lines = [f"{step.ref}{f' (and {more} more deployments sent with it)' if more else ''} failed: "
                 f"{rpc_error_text(exc, self.ctx.address).removeprefix('error: ')}" for step, exc in failed]
        raise CliError("\n".join([*lines, *(["rolled back:", *(f"  {u}" for u in undone)] if undone else
                                             ["nothing else had been written"])]),
                       exit_code_of(failed[0][1])) from None


def _report(steps: list[Step], ctx: Context) -> None:
    if ctx.json:
        ctx.emit_json({"results": [_result(s) for s in steps]})
        return
    for step in steps:
        ctx.out(step.obj.name_line if ctx.output == "name" else _step_line(step))


def _result(step: Step) -> dict[str, Any]:
    out: dict[str, Any] = {"object": step.ref, "action": step.action}
    if step.detail:
        out["changes"] = step.detail
    if step.dry_run is not None:
        out["would_place_replicas"] = step.dry_run.placed_replicas
        out["replicas"] = step.dry_run.spec.replicas
    return out


def _partial(step: Step) -> bool:
    return step.dry_run is not None and step.dry_run.placed_replicas < step.dry_run.spec.replicas


def _show_plan(steps: list[Step], ctx: Context) -> int:
    if ctx.json:
        ctx.emit_json({"dry_run": True, "results": [_result(s) for s in steps]})
    else:
        for i, step in enumerate(steps):
            marker = {"created": "+", "configured": "~", "unchanged": "=", "conflict": "!"}[step.action]
            ctx.out(f"{marker} {step.ref}: {'would be ' + step.action if step.action != 'conflict' else 'conflict'}")
            for line in step.detail:
                ctx.out(f"    {line}")
            if step.dry_run is not None:
                ctx.out("    " + where_it_lands(step.dry_run).replace("\n", "\n    "))
            if step.solved_as and step.action != "conflict":
                ctx.out(f"    (solved as {step.solved_as} (the same spec but its name))")
    if any(s.action == "conflict" for s in steps):
        return _conflict_exit(steps)
    return Exit.PARTIAL if any(_partial(s) for s in steps) else Exit.OK


# A dry run's reason saying what the pass placing it would preempt (usecases.deployments.PREEMPTS).
PREEMPTS = "PREEMPTS"


def _split(dep: deployments_pb2.Deployment) -> tuple[list[Any], list[Any]]:
    """A dry run's reasons: (why not placed, what placing it would preempt)."""
    return [r for r in dep.reasons if r.code != PREEMPTS], [r for r in dep.reasons if r.code == PREEMPTS]


def where_it_lands(dep: deployments_pb2.Deployment) -> str:
    """'would place 3/4 replicas: rack-00 8 shards, rack-01 4 shards' plus the reasons."""
    s = dep.spec
    per_rack = Counter(p.rack for p in dep.placements)
    racks = ", ".join(f"{rack} {n} shard{'s' if n != 1 else ''}" for rack, n in sorted(per_rack.items()))
    text = f"would place {dep.placed_replicas}/{s.replicas} replicas" + (f": {racks}" if racks else "")
    if dep.placed_replicas < s.replicas:
        text += f" (PARTIAL: {s.replicas - dep.placed_replicas} would wait as Pending)"
    why, preempts = _split(dep)
    if why:
        text += "\nnot placed because:\n" + reasons_text(why, indent="  ")
    if preempts:
        text += "\nwould preempt:\n" + "\n".join(f"  {r.message}" for r in preempts)
    return text


def run_diff(args: argparse.Namespace, ctx: Context) -> int:
    steps = plan(ordered_objects(load_manifest_sources(args.filename), ctx), ctx, judge=False)
    changed = [s for s in steps if s.action != "unchanged"]
    if ctx.json:
        ctx.emit_json({"results": [_result(s) for s in steps]})
    else:
        for step in changed:
            ctx.out(f"{step.ref}: {'new' if step.action == 'created' else step.action}")
            for line in step.detail:
                ctx.out(f"  {line}")
        if not changed:
            ctx.note("no differences")
    return Exit.FAILED if changed else Exit.OK


def run_submit(args: argparse.Namespace, ctx: Context) -> int:
    objects = load_manifest_sources(args.filename)
    others = [o for o in objects if o.kind != "Deployment"]
    if others:
        raise CliError(f"submit takes Deployment manifests only; use apply for {others[0].source}", Exit.USAGE)
    if not args.dry_run:
        return run_apply(argparse.Namespace(filename=args.filename, dry_run=False, no_solve=False), ctx)
    answers = [_dry_run(obj, ctx) for obj in objects]
    if ctx.json:  # the would-be deployments in the manifest vocabulary, as `get -o json` prints them
        ctx.emit_json(list_document(deployment_document(d) for d in answers))
    else:
        for i, dep in enumerate(answers):
            if i:
                ctx.out()
            ctx.out(dry_run_text(dep))
    partial = [d.spec.name for d in answers if d.placed_replicas < d.spec.replicas]
    if partial:
        ctx.note(f"partial: only part of {', '.join(partial)} would be placed (exit {int(Exit.PARTIAL)})")
        return Exit.PARTIAL
    return Exit.OK


def _dry_run(obj: ManifestObject, ctx: Context) -> deployments_pb2.Deployment:
    """Where `obj` would land if submitted now. A deployment that exists is solved in place of
    the stored one (`replace_existing`), as the real submit updates it in place: a plain dry run
    would refuse it ALREADY_EXISTS, where the submit itself says unchanged or configured."""
    spec: deployments_pb2.DeploymentSpec = obj.message  # type: ignore[assignment]
    stored = _get_or_none(ctx.controller.deployments.GetDeployment,
                          deployments_pb2.GetDeploymentRequest(name=spec.name, tenant=spec.tenant), ctx)
    request = deployments_pb2.SubmitDeploymentRequest(spec=spec, dry_run=True, replace_existing=stored is not None)
    return ctx.controller.deployments.SubmitDeployment(request, timeout=ctx.rpc_timeout).deployment


def dry_run_text(dep: deployments_pb2.Deployment) -> str:
    s = dep.spec
    head = (f"deployment/{s.name} (dry run): would place {dep.placed_replicas}/{s.replicas} replicas "
            f"({s.shards_per_replica} shards each)")
    if dep.placed_replicas < s.replicas:
        head += f" -- PARTIAL: {s.replicas - dep.placed_replicas} would not be placed now"
    parts = [head]
    if dep.placements:
        parts.append(placements_table(dep.placements))
    why, preempts = _split(dep)
    if why:
        parts.append("Not placed because:\n" + reasons_text(why, indent="  "))
    if preempts:
        parts.append("Would preempt:\n" + "\n".join(f"  {r.message}" for r in preempts))
    return "\n".join(parts)
