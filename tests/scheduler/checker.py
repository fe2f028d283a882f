"""An independent checker for placement plans, written from the spec alone.

Why this module exists: the solver is the thing under test, so it must not grade its own
homework. `check_plan` reads the two JSON documents of the interchange format
(/work/shared/placement/README.md, "the spec") and lists every rule the plan breaks. It never
imports `scheduler`; it shares no code with it, only the contract.

Interpretations the spec leaves open, decided here (and documented so they can be argued with):
- A placement on a `cordoned` node is "new" unless the problem placed the same
  (deployment, replica, shard) on that same node.
- A replica with any shard on a `down` node is broken: its surviving shards may be dropped or
  re-placed, and re-placing it is not a "move" that needs rebalance mode. So is one with a shard
  on an accelerator its node lists in `unhealthy_accelerators` (an extension of the format,
  scheduler/interchange.py), where no plan may place a shard (INDICES).
- A node the problem's `nominations` (an extension, scheduler/interchange.py) keep for a
  deployment is as cordoned to every other deployment of that nomination's priority or lower: a
  placement of one there is "new" (NODE_STATE) unless the problem placed the same shard there.
- A node's `max_shards` (an extension, scheduler/interchange.py) bounds the shards it holds in the
  plan, whatever they need (NODE_SHARDS). As with power budgets, "existing placements are kept"
  wins over a cap the problem already breaks: a node may stay over it if every shard it holds in
  the plan is kept there; one newly placed (or moved) there breaks the rule. Its reason code
  NODE_SHARDS is allowed beside the spec's (`EXTENSION_CODES`).
- Likewise for the rules of a replica, a deployment or a tenant that the problem's own
  placements already break (a quota lowered below what a tenant runs, a spread tightened, a node
  re-modelled, a locality tightened): the solver never moves placed work for them (it reports
  such breaches as kept, scheduler/emit.py). A plan may keep such a breach, not make it worse:
  - QUOTA_ACCELERATORS, QUOTA_POWER: a tenant's total in the plan is at most the larger of its cap
    and its total in the problem's placements (all of them, as given);
  - SPREAD: a deployment's replicas in a domain are at most the larger of `max_per_domain` and
    its replicas there in the problem's placements (likewise);
  - ACCELERATOR_MODEL: a shard kept on its node may stay on a model it does not take; one newly
    placed (or moved) there may not;
  - LOCALITY: a replica may span several domains if its shards kept on their node span them all:
    a new shard may join them only in a domain a kept one holds (as the solver's repair completes
    a gang beside its first surviving shard), never in another.
  "Kept" is per shard: the same (deployment, replica, shard) on the same node as in the problem.
- Kept placements keep their node *and* their accelerator indices (a running process is bound
  to its accelerators); changing either is a move.
- `spread` counts a replica in every domain one of its shards touches; domain `none` is no limit.
- `unplaced` must account for exactly the replicas the plan does not run: for each deployment,
  the sum of its `unplaced[].replicas` equals `replicas - placed replicas`.
- `min_replicas` wins over "existing placements are kept": a deployment whose surviving
  replicas are fewer than `min_replicas` may drop them all, if the plan lists it as unplaced.
- Dropping a replica is no KEPT breach either when the problem places it incomplete (some of
  its shards have no placement): its gang cannot run as given and completing it may not fit, so
  it may be dropped whole; a plan that keeps it partial breaks GANG.
- A preemption must be justified by some newly placed replica (or one a down node broke that the
  plan places again: a repair is new work too) of another deployment that has a
  higher priority, or that is not preemptible and whose tenant is below its reservation: the
  tenant's accelerators in the plan, less that one replica's, are under `reserved_accelerators`
  (the tenant was below its reservation when the replica was placed, whatever the order).
- "Existing placements are kept" wins over a rack or row power budget the problem already
  breaks (a `down` node came back up under a full budget: the spec gives no rule that may drop
  or preempt kept work for it): a rack or row may stay over its budget if what it draws in the
  plan is the idle power of its nodes and placements kept on their node alone. Anything the
  plan newly puts there that draws power breaks the rule (as the solver's power filters refuse
  it, and the controller's re-check blames it).
- `status: optimal` claims the plan is proved best, so the plan must reach the bound it reports:
  its placed weight equals `stats.best_bound` when given. The weight is the solver's documented
  term 1 (scheduler/solve.py): per placed replica, shards x accelerator milli (1 for host-only
  shards) x (priority - lowest priority among the deployments + 1). `stats.objective`, when
  given, must be that weight too, whatever the status.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

# Rule identifiers: one per rule of the spec; a Violation carries exactly one.
SCHEMA = "SCHEMA"
REFERENCE = "REFERENCE"
DUPLICATE = "DUPLICATE"
GANG = "GANG"
MIN_REPLICAS = "MIN_REPLICAS"
INDICES = "INDICES"
EXCLUSIVE_ACCELERATOR = "EXCLUSIVE_ACCELERATOR"
SHARED_ACCELERATOR = "SHARED_ACCELERATOR"
HBM = "HBM"
CPU = "CPU"
MEMORY = "MEMORY"
NODE_SHARDS = "NODE_SHARDS"
ACCELERATOR_MODEL = "ACCELERATOR_MODEL"
NODE_STATE = "NODE_STATE"
LOCALITY = "LOCALITY"
SPREAD = "SPREAD"
ISOLATION = "ISOLATION"
EXCLUSION = "EXCLUSION"
ZONE = "ZONE"
QUOTA_ACCELERATORS = "QUOTA_ACCELERATORS"
QUOTA_POWER = "QUOTA_POWER"
POWER_RACK = "POWER_RACK"
POWER_ROW = "POWER_ROW"
KEPT = "KEPT"
MOVES = "MOVES"
PREEMPTION = "PREEMPTION"
UNPLACED = "UNPLACED"
STATUS = "STATUS"

ALL_RULES: tuple[str, ...] = (
    SCHEMA, REFERENCE, DUPLICATE, GANG, MIN_REPLICAS, INDICES, EXCLUSIVE_ACCELERATOR,
    SHARED_ACCELERATOR, HBM, CPU, MEMORY, NODE_SHARDS, ACCELERATOR_MODEL, NODE_STATE, LOCALITY,
    SPREAD, ISOLATION, EXCLUSION, ZONE, QUOTA_ACCELERATORS, QUOTA_POWER, POWER_RACK, POWER_ROW,
    KEPT, MOVES, PREEMPTION, UNPLACED, STATUS,
)

# Rules that can only get worse when placements are added: a partial plan that breaks one of
# them cannot be completed into a valid plan (used by the brute-force search to prune). For
# LOCALITY this holds of partial plans that hold every placement they keep (as the search's do):
# adding a kept shard could widen the domains a replica's new shards may join.
MONOTONE_RULES: frozenset[str] = frozenset({
    REFERENCE, DUPLICATE, INDICES, EXCLUSIVE_ACCELERATOR, SHARED_ACCELERATOR, HBM, CPU, MEMORY,
    NODE_SHARDS, ACCELERATOR_MODEL, NODE_STATE, LOCALITY, SPREAD, ISOLATION, EXCLUSION, ZONE,
    QUOTA_ACCELERATORS, QUOTA_POWER, POWER_RACK, POWER_ROW,
})

# Reason codes of the format's extensions (scheduler/interchange.py), beyond the spec's list: the
# plan schema is read with them allowed.
EXTENSION_CODES: frozenset[str] = frozenset({"NODE_SHARDS"})
REASON_CODES: frozenset[str] = frozenset({
    "CAPACITY", "ACCELERATOR_MODEL", "HBM", "CPU", "MEMORY", "POWER_RACK", "POWER_ROW",
    "ISOLATION", "EXCLUSION", "ZONE", "QUOTA_ACCELERATORS", "QUOTA_POWER", "LOCALITY", "SPREAD",
    "NODE_STATE", "TIME_LIMIT",
}) | EXTENSION_CODES

# Float sums (power, hbm, fractional accelerators) are compared with this slack.
EPSILON = 1e-6

DEFAULT_SPEC_DIR = Path("/work/shared/placement")


@dataclass(frozen=True)
class Violation:
    """One broken rule: which rule, and a message naming the objects and numbers involved."""

    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


@dataclass(frozen=True)
class _Shard:
    """The resolved demand of one placement (deployment defaults applied)."""

    deployment: str
    replica: int
    shard: int
    node: str
    indices: tuple[int, ...]
    milli: int  # per index: 1000 for a whole accelerator, less for a fraction
    fractional: bool
    tenant: str


def spec_dir() -> Path:
    """The contract folder (schemas and examples)."""
    return Path(os.environ.get("MAIA_PLACEMENT_SPEC_DIR", str(DEFAULT_SPEC_DIR)))


_VALIDATOR: Any = None


def _plan_validator() -> Any:
    """A jsonschema validator for plan.schema.json, resolving its $ref into problem.schema.json."""
    global _VALIDATOR
    if _VALIDATOR is None:
        import jsonschema
        from referencing import Registry, Resource

        spec = spec_dir()
        if not (spec / "plan.schema.json").exists():
            raise FileNotFoundError(
                f"plan.schema.json not found under {spec}; set MAIA_PLACEMENT_SPEC_DIR")
        problem_schema = json.loads((spec / "problem.schema.json").read_text())
        plan_schema = json.loads((spec / "plan.schema.json").read_text())
        reason = plan_schema["properties"]["unplaced"]["items"]["properties"]["reasons"]["items"]
        codes = reason["properties"]["code"]["enum"]
        codes.extend(sorted(EXTENSION_CODES - set(codes)))
        registry = Registry().with_resources([
            (problem_schema["$id"], Resource.from_contents(problem_schema)),
            (plan_schema["$id"], Resource.from_contents(plan_schema)),
        ])
        _VALIDATOR = jsonschema.Draft202012Validator(plan_schema, registry=registry)
    return _VALIDATOR


def _key(p: dict[str, Any]) -> tuple[str, int, int]:
    return (p["deployment"], p["replica"], p["shard"])


class _Problem:
    """Lookup tables over the problem document, defaults of the spec applied."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.rows = {r["id"]: r for r in doc.get("rows", [])}
        self.racks = {r["id"]: r for r in doc.get("racks", [])}
        self.nodes = {n["id"]: n for n in doc.get("nodes", [])}
        # Lists left out are implied from the ids referring to them (the interchange's rule): a
        # rack left out is in the one row listed (or one implied row), a row in the one zone.
        # Read as absent, a node of a document without racks was in no row or zone: ZONE was
        # refused wrongly, and a row's power budget never checked.
        if "racks" not in doc:
            row = next(iter(self.rows)) if len(self.rows) == 1 else "(implied row)"
            self.racks = {n["rack"]: {"id": n["rack"], "row": row} for n in self.nodes.values()}
        if "rows" not in doc:
            zones = [z["id"] for z in doc.get("zones", [])]
            zone = zones[0] if len(zones) == 1 else "(implied zone)"
            self.rows = {r["row"]: {"id": r["row"], "zone": zone} for r in self.racks.values()}
        self.tenants = {t["id"]: t for t in doc.get("tenants", [])}
        self.deployments = {d["id"]: d for d in doc.get("deployments", [])}
        self.options = doc.get("options", {}) or {}
        self.mode = self.options.get("mode", "batch")
        self.existing = list(doc.get("placements", []))
        self.existing_by_key = {_key(p): p for p in self.existing}
        # node -> the nomination keeping it (an extension: `nominations`)
        self.nominated = {node: nom for nom in doc.get("nominations", ()) for node in nom["nodes"]}
        # The problem's placements resolved (those naming a known deployment and node): what the
        # input already held, against which a plan's quota and spread are judged.
        self.given = [self.resolve(p) for p in self.existing
                      if p["deployment"] in self.deployments and p["node"] in self.nodes]

    def resolve(self, p: dict[str, Any]) -> _Shard:
        """The demand of placement `p` (its deployment and node known), defaults applied;
        indices the node lacks are left out (INDICES reports them)."""
        fractional = self.is_fractional(p["deployment"])
        milli = self.shard_spec(p["deployment"]).get("accelerator_milli", 1000) if fractional else 1000
        have = self.nodes[p["node"]]["accelerators"]
        return _Shard(p["deployment"], p["replica"], p["shard"], p["node"],
                      tuple(i for i in p["accelerator_indices"] if i < have), milli, fractional,
                      self.tenant_of(p["deployment"]))

    def kept_in_place(self, s: _Shard) -> bool:
        """Whether the problem placed the same shard on the same node: a breach such shards make
        alone was the problem's before the plan (see the module docstring)."""
        return self.existing_by_key.get((s.deployment, s.replica, s.shard), {}).get("node") == s.node

    def state(self, node: str) -> str:
        return self.nodes[node].get("state", "ready")

    def failed(self, node: str) -> set[int]:
        """The node's `unhealthy_accelerators` (an extension of the format: accelerators that failed)."""
        return set(self.nodes[node].get("unhealthy_accelerators", ()))

    def breaks(self, p: dict[str, Any]) -> bool:
        """Whether an existing placement lost its node: down, or one of its accelerators failed."""
        return p["node"] in self.nodes and (self.state(p["node"]) == "down"
                                            or bool(self.failed(p["node"]) & set(p["accelerator_indices"])))

    def domain(self, node: str, level: str) -> str | None:
        """The id of the node's enclosing domain at `level` (node/rack/row/zone)."""
        n = self.nodes[node]
        if level == "node":
            return node
        rack = n["rack"]
        if level == "rack":
            return rack
        row = self.racks.get(rack, {}).get("row")
        if level == "row":
            return row
        if level == "zone":
            return self.rows.get(row, {}).get("zone") if row is not None else None
        return None

    def tenant_of(self, deployment: str) -> str:
        return self.deployments[deployment]["tenant"]

    def tenant(self, tenant_id: str) -> dict[str, Any]:
        return self.tenants.get(tenant_id, {"id": tenant_id})

    def shard_spec(self, deployment: str) -> dict[str, Any]:
        return self.deployments[deployment]["shard"]

    def is_fractional(self, deployment: str) -> bool:
        s = self.shard_spec(deployment)
        return s["accelerators"] == 1 and s.get("accelerator_milli", 1000) < 1000

    def accelerators_of(self, deployment: str) -> float:
        """Accelerators one shard holds, fractions counted as milli/1000."""
        s = self.shard_spec(deployment)
        if self.is_fractional(deployment):
            return s.get("accelerator_milli", 1000) / 1000.0
        return float(s["accelerators"])

    def power_of(self, deployment: str) -> float:
        return self.shard_spec(deployment).get("power_w", 0.0) * self.accelerators_of(deployment)

    def priority(self, deployment: str) -> int:
        return self.deployments[deployment].get("priority", 0)


def _kept_for_another(prob: _Problem, s: _Shard) -> bool:
    """Whether the shard's node is nominated for another deployment of its priority or higher."""
    nom = prob.nominated.get(s.node)
    return nom is not None and nom["deployment"] != s.deployment and \
        nom.get("priority", 0) >= prob.priority(s.deployment)


def placed_accelerators(problem_doc: dict[str, Any], plan_doc: dict[str, Any]) -> dict[str, float]:
    """Accelerators each deployment holds in the plan (fractions as milli/1000)."""
    prob = _Problem(problem_doc)
    held: dict[str, float] = defaultdict(float)
    for p in plan_doc.get("placements", []):
        if p.get("deployment") in prob.deployments:
            held[p["deployment"]] += prob.accelerators_of(p["deployment"])
    return dict(held)


def check_plan(problem_doc: dict[str, Any], plan_doc: dict[str, Any], *,
               validate_schema: bool = True,
               rules: Iterable[str] | None = None) -> list["Violation"]:
    """Every way `plan_doc` breaks the spec for `problem_doc`; empty means the plan is valid.

    `rules` restricts the result to those rule ids (the brute-force search asks only for the
    monotone ones); `validate_schema=False` skips the (slow) JSON-schema pass.
    """
    out: list[Violation] = []

    def bad(rule: str, message: str) -> None:
        out.append(Violation(rule, message))

    if validate_schema:
        for err in _plan_validator().iter_errors(plan_doc):
            path = "/".join(str(x) for x in err.absolute_path)
            bad(SCHEMA, f"/{path}: {err.message}")
        if out:
            return out  # the rest assumes the documented shape

    prob = _Problem(problem_doc)
    placements: list[dict[str, Any]] = list(plan_doc.get("placements", []))

    # --- references, duplicates, index shape -----------------------------------------------
    shards: list[_Shard] = []
    seen: set[tuple[str, int, int]] = set()
    for p in placements:
        k = _key(p)
        dep = prob.deployments.get(p["deployment"])
        if dep is None:
            bad(REFERENCE, f"placement {k} names unknown deployment {p['deployment']!r}")
            continue
        if p["node"] not in prob.nodes:
            bad(REFERENCE, f"placement {k} names unknown node {p['node']!r}")
            continue
        if p["replica"] >= dep["replicas"]:
            bad(REFERENCE, f"placement {k}: replica {p['replica']} >= replicas {dep['replicas']}")
            continue
        if p["shard"] >= dep["shards_per_replica"]:
            bad(REFERENCE, f"placement {k}: shard {p['shard']} >= shards_per_replica "
                           f"{dep['shards_per_replica']}")
            continue
        if k in seen:
            bad(DUPLICATE, f"placement {k} appears more than once")
            continue
        seen.add(k)
        spec = dep["shard"]
        fractional = prob.is_fractional(p["deployment"])
        want = spec["accelerators"]
        idx = tuple(p["accelerator_indices"])
        node_accels = prob.nodes[p["node"]]["accelerators"]
        milli = spec.get("accelerator_milli", 1000) if fractional else 1000
        if len(idx) != want:
            bad(INDICES, f"placement {k} on {p['node']}: {len(idx)} indices {list(idx)}, "
                         f"the shard needs {want}")
        if len(set(idx)) != len(idx):
            bad(INDICES, f"placement {k} on {p['node']}: repeated index in {list(idx)}")
        out_of_range = [i for i in idx if i >= node_accels]
        if out_of_range:
            bad(INDICES, f"placement {k}: indices {out_of_range} out of range, node "
                         f"{p['node']} has {node_accels} accelerators")
        failed = sorted(prob.failed(p["node"]) & set(idx))
        if failed:
            bad(INDICES, f"placement {k}: accelerators {failed} of node {p['node']} are unhealthy")
        if "accelerator_milli" in p and want > 0:
            declared = p["accelerator_milli"]
            if declared != (milli if fractional else 1000):
                bad(INDICES, f"placement {k}: accelerator_milli {declared} != the shard's "
                             f"{milli if fractional else 1000}")
        shards.append(prob.resolve(p))

    # --- gangs and min_replicas ------------------------------------------------------------
    by_replica: dict[tuple[str, int], list[_Shard]] = defaultdict(list)
    for s in shards:
        by_replica[(s.deployment, s.replica)].append(s)
    for (dep_id, rep), members in sorted(by_replica.items()):
        need = prob.deployments[dep_id]["shards_per_replica"]
        if len(members) != need:
            have = sorted(m.shard for m in members)
            bad(GANG, f"{dep_id} replica {rep}: shards {have} placed, the gang has {need}")
    replicas_placed: dict[str, int] = defaultdict(int)
    for dep_id, _rep in by_replica:
        replicas_placed[dep_id] += 1
    for dep_id, dep in prob.deployments.items():
        n = replicas_placed.get(dep_id, 0)
        low = dep.get("min_replicas", 1)
        if 0 < n < low:
            bad(MIN_REPLICAS, f"{dep_id}: {n} replicas placed, min_replicas is {low}")

    # --- accelerators: exclusivity, sharing within a tenant, HBM ---------------------------
    users: dict[tuple[str, int], list[_Shard]] = defaultdict(list)
    for s in shards:
        for i in s.indices:
            users[(s.node, i)].append(s)
    for (node_id, i), us in sorted(users.items()):
        node = prob.nodes[node_id]
        whole = [u for u in us if not u.fractional]
        if whole and len(us) > 1:
            names = [(u.deployment, u.replica, u.shard) for u in us]
            bad(EXCLUSIVE_ACCELERATOR, f"{node_id}[{i}] is held by a whole-accelerator shard "
                                       f"and shared with others: {names}")
            continue
        if whole:
            hbm = prob.shard_spec(whole[0].deployment).get("hbm_gib", 0)
            if "hbm_gib" in node and hbm > node["hbm_gib"] + EPSILON:
                bad(HBM, f"{node_id}[{i}]: shard {whole[0].deployment} needs {hbm} GiB HBM, "
                         f"the accelerator has {node['hbm_gib']}")
            continue
        tenants = sorted({u.tenant for u in us})
        if len(tenants) > 1:
            bad(SHARED_ACCELERATOR, f"{node_id}[{i}] is shared by tenants {tenants}")
        milli = sum(u.milli for u in us)
        if milli > 1000:
            bad(SHARED_ACCELERATOR, f"{node_id}[{i}]: fractions sum to {milli} milli > 1000")
        hbm = sum(prob.shard_spec(u.deployment).get("hbm_gib", 0) for u in us)
        if "hbm_gib" in node and hbm > node["hbm_gib"] + EPSILON:
            bad(HBM, f"{node_id}[{i}]: fractions need {hbm} GiB HBM, the accelerator has "
                     f"{node['hbm_gib']}")

    # --- node host resources, models, state -------------------------------------------------
    cpu: dict[str, int] = defaultdict(int)
    mem: dict[str, int] = defaultdict(int)
    for s in shards:
        spec = prob.shard_spec(s.deployment)
        cpu[s.node] += spec.get("cpu_milli", 0)
        mem[s.node] += spec.get("memory_mib", 0)
        node = prob.nodes[s.node]
        models = spec.get("accelerator_models")
        if models is not None and node.get("accelerator_model") not in models \
                and not prob.kept_in_place(s):
            bad(ACCELERATOR_MODEL, f"{s.deployment} r{s.replica} s{s.shard} on {s.node}: model "
                                   f"{node.get('accelerator_model')!r} not in {models}")
        state = prob.state(s.node)
        if state == "down":
            bad(NODE_STATE, f"{s.deployment} r{s.replica} s{s.shard} placed on down node {s.node}")
        elif state == "cordoned" or _kept_for_another(prob, s):
            before = prob.existing_by_key.get((s.deployment, s.replica, s.shard))
            if before is None or before["node"] != s.node:
                said = "cordoned node" if state == "cordoned" else \
                    f"node nominated for {prob.nominated[s.node]['deployment']}"
                bad(NODE_STATE, f"{s.deployment} r{s.replica} s{s.shard} newly placed on {said} {s.node}")
    on_node: dict[str, list[_Shard]] = defaultdict(list)
    for s in shards:
        on_node[s.node].append(s)
    for node_id, here in sorted(on_node.items()):
        cap = prob.nodes[node_id].get("max_shards")
        if cap is None or len(here) <= cap:
            continue
        new = [s for s in here if not prob.kept_in_place(s)]
        if new:
            bad(NODE_SHARDS, f"node {node_id}: {len(here)} shards > max_shards {cap}, "
                             f"{len(new)} newly placed there (first {new[0].deployment} r{new[0].replica} s{new[0].shard})")
    for node_id, used in sorted(cpu.items()):
        cap = prob.nodes[node_id].get("cpu_milli")
        if cap is not None and used > cap:
            bad(CPU, f"node {node_id}: {used} cpu_milli used > {cap}")
    for node_id, used in sorted(mem.items()):
        cap = prob.nodes[node_id].get("memory_mib")
        if cap is not None and used > cap:
            bad(MEMORY, f"node {node_id}: {used} memory_mib used > {cap}")

    # --- locality and spread, per replica ---------------------------------------------------
    # A breach the problem's placements already make may be kept, not made worse (module doc).
    for (dep_id, rep), members in sorted(by_replica.items()):
        level = prob.deployments[dep_id].get("locality", "rack")
        if level != "none":
            domains = {str(prob.domain(m.node, level)) for m in members}
            kept = {str(prob.domain(m.node, level)) for m in members if prob.kept_in_place(m)}
            if len(domains) > 1 and domains != kept:
                held = f" (its kept shards hold only {sorted(kept)})" if kept else ""
                bad(LOCALITY, f"{dep_id} replica {rep}: locality {level} but shards in "
                              f"{sorted(domains)}{held}")
    plan_tally, given_tally = _tally(prob, shards), _tally(prob, prob.given)
    for (dep_id, d), n in sorted(plan_tally.spread.items()):
        spread = prob.deployments[dep_id]["spread"]
        had = given_tally.spread[(dep_id, d)]
        if _worse(n, spread["max_per_domain"], had):
            bad(SPREAD, f"{dep_id}: {n} replicas in {spread['domain']} {d}, max_per_domain "
                        f"{spread['max_per_domain']}{_before(had, spread['max_per_domain'])}")

    # --- tenants: isolation, exclusion, zones, caps ----------------------------------------
    tenants_on_node: dict[str, set[str]] = defaultdict(set)
    tenants_on_rack: dict[str, set[str]] = defaultdict(set)
    for s in shards:
        tenants_on_node[s.node].add(s.tenant)
        tenants_on_rack[prob.nodes[s.node]["rack"]].add(s.tenant)
        zones = prob.tenant(s.tenant).get("zones")
        if zones is not None:
            z = prob.domain(s.node, "zone")
            if z not in zones:
                bad(ZONE, f"{s.deployment} r{s.replica} s{s.shard} on {s.node} in zone {z}; "
                          f"tenant {s.tenant} may run only in {zones}")
    # dedicated_rack implies dedicated_node; a shared node is also a shared rack, so each
    # isolation level is checked at its own scope only.
    for scope, holders in (("node", tenants_on_node), ("rack", tenants_on_rack)):
        for where, ts in sorted(holders.items()):
            for t in sorted(ts):
                iso = prob.tenant(t).get("isolation", "shared")
                if len(ts) > 1 and iso == f"dedicated_{scope}":
                    bad(ISOLATION, f"{scope} {where} holds tenant {t} ({iso}) together with "
                                   f"{sorted(ts - {t})}")
    for rack, ts in sorted(tenants_on_rack.items()):
        for a in sorted(ts):
            for b in sorted(ts):
                if a < b and (b in prob.tenant(a).get("excludes", [])
                              or a in prob.tenant(b).get("excludes", [])):
                    bad(EXCLUSION, f"rack {rack} holds tenants {a} and {b}, which exclude "
                                   f"each other")
    for t, used in sorted(plan_tally.accelerators.items()):
        cap, had = prob.tenant(t).get("max_accelerators"), given_tally.accelerators[t]
        if cap is not None and _worse(used, cap, had):
            bad(QUOTA_ACCELERATORS, f"tenant {t} holds {used:g} accelerators > max {cap}"
                                    f"{_before(had, cap)}")
    for t, used in sorted(plan_tally.power.items()):
        cap, had = prob.tenant(t).get("max_power_w"), given_tally.power[t]
        if cap is not None and _worse(used, cap, had):
            bad(QUOTA_POWER, f"tenant {t} draws {used:g} W > max_power_w {cap}{_before(had, cap)}")

    # --- power: racks and rows, idle of every node that is not down ------------------------
    # An overdraw made of idle power and placements kept on their node alone was the problem's
    # before the plan (see the module docstring): only power the plan adds there breaks the rule.
    kept_in_place = [s for s in shards if prob.kept_in_place(s)]
    drawn, inherited = _power_drawn(prob, shards), _power_drawn(prob, kept_in_place)
    for rule, level, domains in ((POWER_RACK, "rack", prob.racks), (POWER_ROW, "row", prob.rows)):
        for domain_id, domain in sorted(domains.items()):
            budget, used = domain.get("power_budget_w"), drawn[(level, domain_id)]
            if budget is not None and used > budget + EPSILON \
                    and used > inherited[(level, domain_id)] + EPSILON:
                bad(rule, f"{level} {domain_id}: {used:g} W > budget {budget:g} W")

    if rules is not None:
        wanted = set(rules)
        out = [v for v in out if v.rule in wanted]
        if wanted <= MONOTONE_RULES:
            return out

    _check_history(prob, plan_doc, placements, by_replica, replicas_placed, bad)

    if rules is not None:
        out = [v for v in out if v.rule in set(rules)]
    return out


@dataclass(frozen=True)
class _Tally:
    """What a set of shards holds, as the quota and spread rules count it."""

    accelerators: defaultdict[str, float]  # per tenant, fractions as milli/1000
    power: defaultdict[str, float]  # per tenant, W
    spread: defaultdict[tuple[str, str], int]  # per (deployment, domain id): replicas touching it


def _tally(prob: _Problem, shards: Iterable[_Shard]) -> _Tally:
    """The tally of `shards`: counted alike over the plan's and the problem's placements, so the
    plan is judged against what the problem already held by the same measure. A replica counts
    once in every domain of its deployment's spread level one of its shards touches."""
    tally = _Tally(defaultdict(float), defaultdict(float), defaultdict(int))
    touched: dict[tuple[str, int], set[str]] = defaultdict(set)
    for s in shards:
        tally.accelerators[s.tenant] += prob.accelerators_of(s.deployment)
        tally.power[s.tenant] += prob.power_of(s.deployment)
        spread = prob.deployments[s.deployment].get("spread")
        if spread and spread["domain"] != "none":
            touched[(s.deployment, s.replica)].add(str(prob.domain(s.node, spread["domain"])))
    for (dep_id, _r), domains in touched.items():
        for d in domains:
            tally.spread[(dep_id, d)] += 1
    return tally


def _worse(used: float, cap: float, had: float) -> bool:
    """Whether `used` breaks `cap` by the plan's doing: over the cap and over what the problem's
    placements already held (`had`), a breach the plan may keep but not deepen."""
    return used > max(cap, had) + EPSILON


def _before(had: float, cap: float) -> str:
    """What a breach's message adds when the problem's placements were over the cap already."""
    return f", and more than the {had:g} the problem's placements held" if had > cap + EPSILON else ""


def _power_drawn(prob: _Problem, shards: Iterable[_Shard]) -> dict[tuple[str, str], float]:
    """Per ("rack" | "row", id): the idle power of its nodes that are not down plus what
    `shards` draw there."""
    drawn: dict[tuple[str, str], float] = defaultdict(float)

    def add(rack: str, watts: float) -> None:
        drawn[("rack", rack)] += watts
        row = prob.racks.get(rack, {}).get("row")
        if row is not None:
            drawn[("row", row)] += watts
    for node in prob.nodes.values():
        if node.get("state", "ready") != "down":
            add(node["rack"], node.get("idle_power_w", 0))
    for s in shards:
        add(prob.nodes[s.node]["rack"], prob.power_of(s.deployment))
    return drawn


def _check_history(prob: _Problem, plan_doc: dict[str, Any], placements: list[dict[str, Any]],
                   by_replica: dict[tuple[str, int], list[_Shard]],
                   replicas_placed: dict[str, int], bad: Any) -> None:
    """Rules relating the plan to the problem's placements: kept, moved, preempted, unplaced."""
    plan_by_key = {_key(p): p for p in placements}
    moved = list(plan_doc.get("moved", []) or [])
    preempted = list(plan_doc.get("preempted", []) or [])
    preempted_keys = {(e["deployment"], e["replica"]) for e in preempted}
    moved_by_key = {(e["deployment"], e["replica"], e["shard"]): e for e in moved}

    # Replicas broken by a down node (or a failed accelerator), and deployments allowed to drop
    # below min_replicas.
    broken: set[tuple[str, int]] = set()
    for p in prob.existing:
        if prob.breaks(p):
            broken.add((p["deployment"], p["replica"]))
    surviving: dict[str, set[int]] = defaultdict(set)
    for p in prob.existing:
        if (p["deployment"], p["replica"]) not in broken:
            surviving[p["deployment"]].add(p["replica"])
    unplaced_ids = {u["deployment"] for u in plan_doc.get("unplaced", [])}
    may_drop = {d for d, reps in surviving.items()
                if d in prob.deployments and replicas_placed.get(d, 0) == 0 and d in unplaced_ids
                and len(reps) < prob.deployments[d].get("min_replicas", 1)}
    dropped_incomplete = _incomplete(prob) - set(by_replica)

    # --- existing placements are kept unless moved or preempted -----------------------------
    for p in prob.existing:
        k = _key(p)
        rep = (p["deployment"], p["replica"])
        if p["deployment"] not in prob.deployments or rep in broken or p["deployment"] in may_drop \
                or rep in dropped_incomplete:
            continue
        if rep in preempted_keys:
            continue
        now = plan_by_key.get(k)
        if now is None:
            bad(KEPT, f"existing placement {k} on {p['node']} is gone without being moved or "
                      f"preempted")
            continue
        if now["node"] != p["node"]:
            if k not in moved_by_key:
                bad(KEPT, f"existing placement {k} went from {p['node']} to {now['node']} "
                          f"without a moved[] entry")
        elif sorted(now["accelerator_indices"]) != sorted(p["accelerator_indices"]) \
                and k not in moved_by_key:
            bad(KEPT, f"existing placement {k} on {p['node']} changed accelerators "
                      f"{p['accelerator_indices']} -> {now['accelerator_indices']}")

    # --- moves: only in rebalance mode, at most max_moves, and true to the placements -------
    counted = 0
    for e in moved:
        k = (e["deployment"], e["replica"], e["shard"])
        before = prob.existing_by_key.get(k)
        now = plan_by_key.get(k)
        if before is None:
            bad(MOVES, f"moved {k} was not placed before")
            continue
        if before["node"] != e["from"]:
            bad(MOVES, f"moved {k}: from {e['from']} but it ran on {before['node']}")
        if now is None or now["node"] != e["to"]:
            bad(MOVES, f"moved {k}: to {e['to']} but the plan has it on "
                       f"{None if now is None else now['node']}")
        if (e["deployment"], e["replica"]) in broken:
            continue  # re-placing what a down node lost is repair, not a move
        counted += 1
        if prob.mode != "rebalance":
            bad(MOVES, f"moved {k} in {prob.mode} mode; only rebalance may move shards"
                + (" (online decisions are never moved)" if prob.mode == "online" else ""))
    limit = prob.options.get("max_moves")
    if prob.mode == "rebalance" and limit is not None and counted > limit:
        bad(MOVES, f"{counted} moves > max_moves {limit}")

    # --- preemption: only preemptible replicas, only when allowed, only for better work -----
    newly_placed = [rep for rep in by_replica
                    if not any((rep[0], rep[1], s) in prob.existing_by_key
                               for s in range(prob.deployments[rep[0]]["shards_per_replica"]))]
    # Work the plan places that did not run whole before it: the new replicas and those a down
    # node broke and the plan repairs (placing them again is as much new work for preemption).
    placed_anew = newly_placed + [rep for rep in by_replica if rep in broken and rep not in newly_placed]
    tenant_held: dict[str, float] = defaultdict(float)  # accelerators per tenant in the plan
    for (d_id, _r) in by_replica:
        if d_id in prob.deployments:
            tenant_held[prob.tenant_of(d_id)] += _replica_accelerators(prob, d_id)
    # What each tenant held before the plan's new replicas: the reservation rule ("a tenant that
    # is below its reservation may preempt") is judged there. Judged against the plan's total
    # less one replica, the first of two new replicas looked as if it came last: a victim the
    # first needed (a tenant excluded from the rack, say) was refused.
    tenant_before: dict[str, float] = dict(tenant_held)
    for (d_id, _r) in placed_anew:
        tenant_before[prob.tenant_of(d_id)] -= _replica_accelerators(prob, d_id)
    for e in preempted:
        dep = prob.deployments.get(e["deployment"])
        label = f"preempted {e['deployment']} replica {e['replica']}"
        if dep is None:
            bad(PREEMPTION, f"{label}: unknown deployment")
            continue
        if not prob.options.get("allow_preemption", False):
            bad(PREEMPTION, f"{label} but options.allow_preemption is not set")
        if not dep.get("preemptible", False):
            bad(PREEMPTION, f"{label}: the deployment is not preemptible")
        if not any(p["deployment"] == e["deployment"] and p["replica"] == e["replica"]
                   for p in prob.existing):
            bad(PREEMPTION, f"{label}: it was not running")
        if (e["deployment"], e["replica"]) in by_replica:
            bad(PREEMPTION, f"{label} but the plan still runs it")
        prio = dep.get("priority", 0)
        justified = False
        for d2, _r2 in placed_anew:
            other = prob.deployments[d2]
            if d2 == e["deployment"]:
                continue
            if other.get("priority", 0) > prio:
                justified = True
            elif (not other.get("preemptible", False)
                  and other["tenant"] != dep["tenant"]
                  and tenant_before[other["tenant"]]
                  < prob.tenant(other["tenant"]).get("reserved_accelerators", 0) - EPSILON):
                justified = True
        if not justified:
            bad(PREEMPTION, f"{label}: no newly placed higher-priority or reserved work needs it")

    # --- unplaced: reasons with valid codes, counts that add up -----------------------------
    unplaced_count: dict[str, int] = defaultdict(int)
    for u in plan_doc.get("unplaced", []):
        if u["deployment"] not in prob.deployments:
            bad(UNPLACED, f"unplaced names unknown deployment {u['deployment']!r}")
            continue
        unplaced_count[u["deployment"]] += u["replicas"]
        if not u.get("reasons"):
            bad(UNPLACED, f"unplaced {u['deployment']} carries no reason")
        for r in u.get("reasons", []):
            if r.get("code") not in REASON_CODES:
                bad(UNPLACED, f"unplaced {u['deployment']}: unknown reason code {r.get('code')!r}")
            if not r.get("message"):
                bad(UNPLACED, f"unplaced {u['deployment']}: reason {r.get('code')} has no message")
    for dep_id, dep in prob.deployments.items():
        missing = dep["replicas"] - replicas_placed.get(dep_id, 0)
        if unplaced_count.get(dep_id, 0) != missing:
            bad(UNPLACED, f"{dep_id}: {missing} replicas not placed, unplaced[] accounts for "
                          f"{unplaced_count.get(dep_id, 0)}")

    # --- status: infeasible means nothing new was placed ------------------------------------
    if plan_doc.get("status") == "infeasible" and newly_placed:
        bad(STATUS, f"status infeasible but {len(newly_placed)} replicas were newly placed, "
                    f"e.g. {sorted(newly_placed)[0]}")

    # --- status: optimal reaches its own bound; the objective is the placed weight ----------
    stats = plan_doc.get("stats") or {}
    weight = _placed_weight(prob, by_replica)
    bound = stats.get("best_bound")
    if plan_doc.get("status") == "optimal" and isinstance(bound, (int, float)) \
            and abs(bound - weight) > EPSILON:
        bad(STATUS, f"status optimal but the placed weight {weight:g} is not the reported "
                    f"best_bound {bound:g}")
    objective = stats.get("objective")
    if isinstance(objective, (int, float)) and abs(objective - weight) > EPSILON:
        bad(STATUS, f"stats.objective {objective:g} but the placed weight is {weight:g}")


def _incomplete(prob: _Problem) -> set[tuple[str, int]]:
    """Replicas the problem places only some shards of: a plan may drop them whole (module doc)."""
    have: dict[tuple[str, int], set[int]] = defaultdict(set)
    for p in prob.existing:
        if p["deployment"] in prob.deployments:
            have[(p["deployment"], p["replica"])].add(p["shard"])
    return {rep for rep, got in have.items()
            if len(got) < prob.deployments[rep[0]]["shards_per_replica"]}


def _replica_accelerators(prob: _Problem, deployment: str) -> float:
    return prob.deployments[deployment]["shards_per_replica"] * prob.accelerators_of(deployment)


def _placed_weight(prob: _Problem, by_replica: dict[tuple[str, int], list[_Shard]]) -> float:
    """Term 1 of the objective as documented (module doc): the priority-weighted placed
    demand over every replica the plan runs."""
    low = min((d.get("priority", 0) for d in prob.deployments.values()), default=0)
    total = 0.0
    for d_id, _r in by_replica:
        if d_id not in prob.deployments:
            continue
        d = prob.deployments[d_id]
        shard = d["shard"]
        milli = shard["accelerator_milli"] if prob.is_fractional(d_id) else \
            1000 * shard["accelerators"]
        total += d["shards_per_replica"] * max(milli, 1) * (d.get("priority", 0) - low + 1)
    return total
