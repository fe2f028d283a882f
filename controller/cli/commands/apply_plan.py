"""The plan of `maiactl apply` and `maiactl diff` (step 2 of apply: controller/cli/commands/apply.py),
apart from the writing (step 3) because the plan judges every object before anything is written:
it only reads and asks dry runs, so that a batch with any conflict writes nothing. It holds `Step`
(what apply will do, or did, with one object; the writing fills in what it wrote), the order the
objects are planned and written in (`ordered_objects`) and `plan`.

A plan is made against the controller without writing: each object is `created`, `configured`,
`unchanged`, or a conflict — a deployment whose spec differs from the stored one is `configured`
(updated in place, the differing fields listed; replica counts scale at once, other changes roll
replica by replica); a deployment of a tenant that neither exists nor is in the batch is refused;
each write is asked of the controller as a dry run (the `maia-dry-run` metadata; new deployments:
SubmitDeployment's dry_run, which also says where they would land), so what the controller would
refuse (an unknown zone, a contract that running work breaks, a tenant's cap, ...) is a conflict
before anything is written; not asked of an object whose references the batch itself writes (a
tenant naming a zone of the batch's topology; a deployment of a tenant the batch creates or
changes): its write checks it. A dry run judges its object alone, so what the controller counts
over a batch is counted here: a tenant's new deployments, on top of its stored ones, against its
deployment cap (`_TenantCaps`). The dry-run solves are the one call of the plan the controller
rate-limits (a tenant's dry runs a minute): one per spec a tenant's new deployments share, a
refusal that says when to ask again waited out, progress on stderr (`_Solves`); `--no-solve` plans
without them.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Set
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from controller import limits
from controller.cli.client import (
    DRY_RUN_METADATA, CliError, Exit, dry_run_said_back, list_all, rpc_error_text, status_code,
)
from controller.cli.context import Context
from controller.cli.documents import DEPLOYMENT_DEFAULTS, spec_differences, spec_document, tenant_document
from controller.cli.manifests import ManifestObject
from controller.retryinfo import told_retry_s
from maia.v1 import admin_pb2, deployments_pb2

_ORDER = {"Topology": 0, "Tenant": 1, "Deployment": 2}
# The tenant fields the manifest sets (usage fields are filled in by the server).
_TENANT_CONTRACT = ("id", "isolation", "excludes", "zones", "reserved_accelerators",
                    "max_accelerators", "max_power_w")


@dataclass
class Step:
    """What apply will do (or did) with one object."""

    obj: ManifestObject
    action: str                      # created | configured | unchanged | conflict | failed
    detail: list[str] = field(default_factory=list)
    previous: Any = None             # the stored tenant or deployment, to restore on rollback
    dry_run: deployments_pb2.Deployment | None = None
    updated: deployments_pb2.Deployment | None = None  # a deployment updated in place
    rolling: bool = False            # its update replaces replicas one by one
    refused: grpc.RpcError | None = None  # a conflict that is the controller's refusal of a dry run
    same_as: Step | None = None      # a conflict told in full at that step's (apply's `_conflicts` counts it there)
    solved_as: str = ""              # its dry-run solve was that deployment's, whose spec it shares but the name

    @property
    def ref(self) -> str:
        return self.obj.ref


# --- the order objects are planned and written in ------------------------------------------

def ordered_objects(objects: list[ManifestObject], ctx: Context | None = None) -> list[ManifestObject]:
    """The objects in the order they are planned and written in; with `ctx`, the tenants of an
    exclusion cycle that the controller has already are asked of it (`existing_tenants`)."""
    objects = sorted(objects, key=lambda o: _ORDER[o.kind])
    tenants = [o for o in objects if o.kind == "Tenant"]
    existing = existing_tenants(tenants, ctx) if ctx is not None else frozenset()
    return [o for o in objects if o.kind == "Topology"] + order_tenants(tenants, existing) + \
        [o for o in objects if o.kind == "Deployment"]


def existing_tenants(tenants: list[ManifestObject], ctx: Context) -> frozenset[str]:
    """Of the file's tenants that another of them excludes (only those can be in a cycle), the
    ones the controller has already: a GetTenant each (none for a file without exclusions)."""
    names = {o.name for o in tenants}
    excluded = sorted({t for o in tenants for t in o.message.excludes if t in names})  # type: ignore[attr-defined]
    return frozenset(name for name in excluded
                     if _get_or_none(ctx.controller.admin.GetTenant, admin_pb2.GetTenantRequest(id=name), ctx))


def order_tenants(tenants: list[ManifestObject], existing: Set[str] = frozenset()) -> list[ManifestObject]:
    """Tenants another one excludes go first (the controller wants excluded tenants to exist).

    In a cycle (a excludes b, b excludes a) the first of the cycle is created without the
    exclusions of tenants not created yet (not `existing`), and applied again in full at the
    end. One of tenants that exist already is applied once, in full: stripped, an unchanged file
    applied again wrote the tenant twice, its exclusion gone in between (an isolation rule off
    for a moment), and `diff` showed that removal as drift on every run.
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
        pending = [t for t in obj.message.excludes  # type: ignore[attr-defined]
                   if state.get(t) == "visiting" and t not in existing]
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


# --- step 2: the plan ------------------------------------------------------------------------

def _get_or_none(call: Any, request: Any, ctx: Context) -> Any:
    try:
        return call(request, timeout=ctx.rpc_timeout)
    except grpc.RpcError as exc:
        if status_code(exc) == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def _contract(tenant: admin_pb2.Tenant) -> admin_pb2.Tenant:
    out = admin_pb2.Tenant()
    for name in _TENANT_CONTRACT:
        f = tenant.DESCRIPTOR.fields_by_name[name]
        if f.is_repeated:
            getattr(out, name).extend(getattr(tenant, name))
        elif f.has_presence and not tenant.HasField(name):
            continue
        else:
            setattr(out, name, getattr(tenant, name))
    return out


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


def _topology_changes(wanted: admin_pb2.Topology, current: admin_pb2.Topology) -> list[str]:
    have = {("zone", z.id): (z.id,) for z in current.zones}
    have |= {("row", r.id): (r.zone, r.power_budget_w if r.HasField("power_budget_w") else None) for r in current.rows}
    have |= {("rack", r.id): (r.row, r.power_budget_w if r.HasField("power_budget_w") else None) for r in current.racks}
    want = {("zone", z.id): (z.id,) for z in wanted.zones}
    want |= {("row", r.id): (r.zone, r.power_budget_w if r.HasField("power_budget_w") else None) for r in wanted.rows}
    want |= {("rack", r.id): (r.row, r.power_budget_w if r.HasField("power_budget_w") else None) for r in wanted.racks}
    return [f"{kind} {name}: {'new' if (kind, name) not in have else 'changed'}"
            for (kind, name), value in want.items() if have.get((kind, name)) != value]


def _left_out(wanted: admin_pb2.Topology, current: admin_pb2.Topology, shown: int = 5) -> list[str]:
    """'rack R' / 'row W' / 'zone Z' stored and not in `wanted` (the first `shown`, then how many more)."""
    left = [f"{kind} {item.id}" for kind, items, named in (
        ("zone", current.zones, {z.id for z in wanted.zones}), ("row", current.rows, {r.id for r in wanted.rows}),
        ("rack", current.racks, {r.id for r in wanted.racks})) for item in items if item.id not in named]
    return left[:shown] + ([f"{len(left) - shown} more"] if len(left) > shown else [])


def plan(objects: list[ManifestObject], ctx: Context, *, judge: bool, solve: bool = True) -> list[Step]:
    """Step 2: what each object needs, writing nothing. `judge`: the controller judges each
    write as a dry run (`_judged`), and new deployments are solved where they would land, wherever
    what is stored is what the write would meet (`_Batch`; `solve` off: not solved, `_Solves`); a
    refusal is the step's conflict. New deployments beyond their tenant's cap, counted with the
    batch's others (`_TenantCaps`), are conflicts whatever `judge` says."""
    admin, deployments = ctx.controller.admin, ctx.controller.deployments
    batch = _Batch()
    caps = _TenantCaps(ctx)
    solves = _Solves(ctx, objects, solving=judge and solve)
    steps: list[Step] = []
    planned: set[str] = set()
    for obj in objects:
        solves.progress()
        if obj.kind == "Topology":
            current = admin.GetTopology(admin_pb2.GetTopologyRequest(), timeout=ctx.rpc_timeout)
            changes = _topology_changes(obj.message, current)  # type: ignore[arg-type]
            step = Step(obj, "configured" if changes else "unchanged", changes)
            left = _left_out(obj.message, current)  # type: ignore[arg-type]
            if left:  # a removal would read as done: say it is not (exploratory testing: "unchanged")
                ctx.note(f"note: {obj.source}: the topology keeps {', '.join(left)}, which the file leaves out "
                         f"(applying a topology adds and changes; it removes nothing: maiactl delete "
                         f"rack|row|zone ID removes one that holds nothing)")
            if judge and changes and not batch.topology:
                step = _judged(step, admin.ApplyTopology, obj.message, ctx)
            if changes:
                batch.topology = True
                batch.zones |= {z.id for z in obj.message.zones}  # type: ignore[attr-defined]
        elif obj.kind == "Tenant":
            current = _get_or_none(admin.GetTenant, admin_pb2.GetTenantRequest(id=obj.name), ctx)
            if obj.name in planned:  # second pass of an exclusion cycle
                step = Step(obj, "configured", [], previous=current)
            elif current is None:
                step = Step(obj, "created")
            else:
                differences = spec_differences(tenant_document(_contract(current)),
                                               tenant_document(_contract(obj.message)))  # type: ignore[arg-type]
                step = Step(obj, "configured" if differences else "unchanged", differences, previous=current)
            if judge and step.action != "unchanged" and obj.name not in planned and not batch.meets(obj.message):
                call = admin.CreateTenant if step.action == "created" else admin.UpdateTenant
                step = _judged(step, call, obj.message, ctx)
            if step.action in ("created", "configured"):
                batch.tenants.add(obj.name)
            planned.add(obj.name)
        else:
            step = _plan_deployment(obj, ctx, {o.name for o in objects if o.kind == "Tenant"},
                                    judge and obj.message.tenant not in batch.tenants,  # type: ignore[attr-defined]
                                    deployments, admin, caps, solves if solves.solving else None)
        steps.append(step)
        solves.checked += 1
    caps.explain()
    return steps


@dataclass
class _Batch:
    """What the writes of a batch before an object change, so that the controller's judgement of
    that object against what is stored would not be the one its write meets: a dry run is asked
    only of objects that meet none of it (the write checks the rest when it comes)."""

    topology: bool = False                          # the batch changes the topology
    zones: set[str] = field(default_factory=set)    # named by a topology the batch changes
    tenants: set[str] = field(default_factory=set)  # tenants the batch creates or changes

    def meets(self, tenant: admin_pb2.Tenant) -> bool:
        """Whether `tenant`'s references (zones, excluded tenants) may be ones the batch writes."""
        return bool(set(tenant.zones) & self.zones or set(tenant.excludes) & self.tenants)


def _judged(step: Step, call: Any, request: Any, ctx: Context) -> Step:
    """`step`, or a conflict carrying the controller's refusal of its write asked as a dry run.
    A controller that does not say the dry run back knew none and may have written (older than
    this maiactl): stop, saying so."""
    try:
        _, answer = call.with_call(request, timeout=ctx.rpc_timeout, metadata=DRY_RUN_METADATA)
    except grpc.RpcError as exc:
        if status_code(exc) == grpc.StatusCode.UNAVAILABLE:
            raise
        return _refused(step.obj, exc, ctx)
    if not dry_run_said_back(answer):
        raise CliError(f"{step.ref}: the controller at {ctx.address} does not know dry runs of this write (it is "
                       f"older than maiactl) and may have applied it; see `maiactl get`", Exit.FAILED)
    return step


def _refused(obj: ManifestObject, exc: grpc.RpcError, ctx: Context) -> Step:
    return Step(obj, "conflict", [rpc_error_text(exc, ctx.address).removeprefix("error: ")], refused=exc)


def _plan_deployment(obj: ManifestObject, ctx: Context, batch_tenants: set[str], judge: bool,
                     deployments: Any, admin: Any, caps: _TenantCaps, solves: _Solves | None) -> Step:
    """`judge`: its tenant is not one the batch writes (see `plan`); `solves`: None when new
    deployments are not solved as dry runs."""
    spec: deployments_pb2.DeploymentSpec = obj.message  # type: ignore[assignment]
    current = _get_or_none(deployments.GetDeployment, deployments_pb2.GetDeploymentRequest(name=spec.name, tenant=spec.tenant), ctx)
    if current is not None:
        if _normalised(current.spec) == _normalised(spec):
            return Step(obj, "unchanged")
        differences = spec_differences(spec_document(_normalised(current.spec)), spec_document(_normalised(spec)),
                                       DEPLOYMENT_DEFAULTS)
        step = Step(obj, "configured", differences, previous=current)
        if judge:
            step = _judged(step, deployments.UpdateDeployment, deployments_pb2.UpdateDeploymentRequest(
                spec=spec, resource_version=current.resource_version), ctx)
        return step
    tenant_known = spec.tenant in batch_tenants or _get_or_none(
        admin.GetTenant, admin_pb2.GetTenantRequest(id=spec.tenant), ctx) is not None
    if not tenant_known:
        return Step(obj, "conflict", [f"tenant {spec.tenant} does not exist and is not in these manifests"])
    step = caps.admit(Step(obj, "created"))
    if judge and solves is not None and step.action == "created":
        step = solves.judge(step)
    return step


@dataclass
class _TenantCaps:
    """The deployments a tenant may have (`limits.DEPLOYMENTS_PER_TENANT_MAX`), which the controller
    checks on each submit against what is stored by then. A dry run of each new deployment alone
    meets only what is stored, not the batch's others written before it: so the plan counts them,
    each on top of the tenant's stored deployments (one listing a tenant) and those before it. The
    deployments beyond the cap are conflicts, told in full at the first (`explain`)."""

    ctx: Context
    stored: dict[str, int] = field(default_factory=dict)
    new: Counter[str] = field(default_factory=Counter)
    beyond: dict[str, list[Step]] = field(default_factory=dict)

    def admit(self, step: Step) -> Step:
        """`step` (a new deployment), or its conflict when it would be beyond its tenant's cap."""
        tenant = step.obj.message.tenant  # type: ignore[attr-defined]
        if tenant not in self.stored:
            self.stored[tenant] = self._count(tenant)
        self.new[tenant] += 1
        if self.stored[tenant] + self.new[tenant] <= limits.DEPLOYMENTS_PER_TENANT_MAX:
            return step
        first = self.beyond.setdefault(tenant, [])
        conflict = Step(step.obj, "conflict", same_as=first[0] if first else None)
        first.append(conflict)
        return conflict

    def _count(self, tenant: str) -> int:
        """The tenant's stored deployments (0: a tenant the batch creates)."""
        try:
            return len(list_all(self.ctx.controller.deployments.ListDeployments, deployments_pb2.ListDeploymentsRequest(
                tenant=tenant, page_size=limits.PAGE_SIZE_MAX), "deployments", timeout=self.ctx.rpc_timeout).deployments)
        except grpc.RpcError as exc:
            if status_code(exc) == grpc.StatusCode.NOT_FOUND:
                return 0
            raise

    def explain(self) -> None:
        """The conflicts' words, once the batch's count of each tenant is known."""
        most = limits.DEPLOYMENTS_PER_TENANT_MAX
        for tenant, steps in self.beyond.items():
            stored, new = self.stored[tenant], self.new[tenant]
            steps[0].detail = [f"tenant {tenant} would have {stored + new} deployments ({stored} stored, {new} new "
                               f"in these manifests); at most {most} a tenant"]
            for step in steps[1:]:
                step.detail = [f"beyond tenant {tenant}'s cap of {most} deployments (see {steps[0].ref})"]


# How often a plan says on stderr how far it is (it can take long: `_Solves`).
PROGRESS_EVERY_S = 15.0


@dataclass
class _Solves:
    """The dry-run solves of new deployments (SubmitDeployment's dry_run): the one call of a plan
    the controller rate-limits (a tenant's `--dry-runs-per-minute`, 30 by default, and its few
    dry-run solver slots), so a large batch's plan is as long as its solves. Hence:
    - one solve per spec: new deployments of a tenant whose specs differ only in the name share
      the first one's answer (`solved_as`), as a dry run's checks and its solve (each deployment
      solved alone) do not depend on the name; a refusal so shared is a conflict of each;
    - a refusal that tells when to ask again (the rate, the slots busy; beyond what the channel
      waits out itself, `cli.retry`) is no conflict: it is waited out and the solve asked again;
    - every `PROGRESS_EVERY_S` of planning, stderr says how far the plan is and, while solves are
      left, the pace they come at and the time the rest may take."""

    ctx: Context
    objects: list[ManifestObject]
    solving: bool                                   # off: new deployments are not solved (progress only)
    checked: int = 0                                # objects of `objects` planned so far
    answers: dict[bytes, Step] = field(default_factory=dict)  # per spec (its name cleared), the step solved
    started: float = field(default_factory=time.monotonic)
    said: float = field(default_factory=time.monotonic)
    answered: deque[float] = field(default_factory=lambda: deque(maxlen=10))  # when the last solves came
    told: str = ""                                  # the controller's last "ask again after..."
    told_s: float = 0.0                             # ... and its pause: the least a solve takes since
    until: float = 0.0                              # when the pause under way ends

    @staticmethod
    def _shape(spec: deployments_pb2.DeploymentSpec) -> bytes:
        shape = deployments_pb2.DeploymentSpec()
        shape.CopyFrom(spec)
        shape.name = ""
        return shape.SerializeToString(deterministic=True)

    def judge(self, step: Step) -> Step:
        """`step` with where it would land, or its conflict: the controller's refusal."""
        spec: deployments_pb2.DeploymentSpec = step.obj.message  # type: ignore[assignment]
        first = self.answers.get(self._shape(spec))
        if first is not None:
            if first.action == "conflict":
                return Step(step.obj, "conflict", [f"as {first.ref} (the same spec but its name): {first.detail[0]}"],
                            refused=first.refused, same_as=first, solved_as=first.ref)
            step.dry_run = deployments_pb2.Deployment()
            step.dry_run.CopyFrom(first.dry_run)
            step.dry_run.spec.CopyFrom(spec)
            step.solved_as = first.ref
            return step
        try:
            step.dry_run = self._solve(spec)
        except grpc.RpcError as exc:
            if status_code(exc) == grpc.StatusCode.UNAVAILABLE:
                raise
            step = _refused(step.obj, exc, self.ctx)
        self.answers[self._shape(spec)] = step
        return step

    def _solve(self, spec: deployments_pb2.DeploymentSpec) -> deployments_pb2.Deployment:
        request = deployments_pb2.SubmitDeploymentRequest(spec=spec, dry_run=True)
        while True:
            try:
                answer = self.ctx.controller.deployments.SubmitDeployment(request, timeout=self.ctx.rpc_timeout)
            except grpc.RpcError as exc:
                pause = told_retry_s(exc.trailing_metadata()) if isinstance(exc, grpc.Call) else None
                if pause is None or status_code(exc) != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                self.told = rpc_error_text(exc, self.ctx.address).removeprefix("error: ")
                self.told_s = pause
                self._wait(pause)
                continue
            self.answered.append(time.monotonic())
            return answer.deployment

    def _wait(self, pause: float) -> None:
        until = self.until = time.monotonic() + pause
        while (left := until - time.monotonic()) > 0:
            self.progress()
            time.sleep(min(left, max(PROGRESS_EVERY_S, 0.01)))
        self.progress()

    def progress(self) -> None:
        """Say how far the plan is, once every PROGRESS_EVERY_S."""
        now = time.monotonic()
        if now - self.said < PROGRESS_EVERY_S or now - self.started < PROGRESS_EVERY_S:
            return
        self.said = now
        line = f"planning: {self.checked}/{len(self.objects)} objects checked in {_duration(now - self.started)}"
        left = len({self._shape(o.message) for o in self.objects[self.checked:]  # type: ignore[arg-type]
                    if o.kind == "Deployment"} - self.answers.keys()) if self.solving else 0
        if left and self.told:
            line += f"; the controller asked to wait ({self.told})"
        if left:
            line += f"; dry-run solves left: at most {left}"
        if left and (len(self.answered) >= 2 or self.told_s):
            # The recent pace (the wait under way in it), at least the controller's last pause.
            pace = (now - self.answered[0]) / (len(self.answered) - 1) if len(self.answered) >= 2 else 0.0
            each = max(pace, self.told_s)
            per_minute = 60 / each
            line += (f", coming at about {per_minute:.0f}" if per_minute >= 1 else f", coming at about {per_minute:.2f}")
            waiting = max(0.0, self.until - now)  # the rest of the pause under way, then one solve each
            line += (f" a minute (the controller limits a tenant's): about "
                     f"{_duration(waiting + (left - (waiting > 0)) * each)} left "
                     f"(--no-solve plans without them)")
        self.ctx.note(line)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
