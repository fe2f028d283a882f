"""JSON interchange format (v1) <-> domain values.

`problem_from_dict` is the only door into the solver: it validates the document against the
shipped JSON schema, then checks what a schema cannot (ids that must exist, ids that must be
unique, replica/shard/accelerator indices in range, existing placements that agree with their
shards and with each other, numbers the solver can compute with) and raises `ProblemError`
naming the JSON path and the value. Lists the document leaves out (racks, rows, zones, tenants)
are implied from the ids that refer to them, so small hand-written problems stay small; a list
that is present is checked strictly.

What an existing placement may look like (the spec's "what runs now"): its shard's shape (as
many distinct indices as the shard has accelerators; a fraction's `accelerator_milli` is its
shard's, which an omitted one defaults to), and, taken together, an occupancy that could have
run: an accelerator held whole by one shard only, or shared by fractions of one tenant adding up
to at most 1000 milli. A placement today's rules would no longer allow (a cordoned node, a
stricter contract, an overdrawn budget) is still a valid input: the solver keeps or moves it. A
`down` node holds nothing, so what its placements claim is not counted.

One field beyond the spec (which lets a document carry fields a reader does not know):
a deployment's `spread_group`, a string. Deployments naming one group are one service to
`spread`: each one's new replicas go where its `spread` holds with the replicas of every
deployment of the group counted, where the solver finds such a place, and else where it holds
with the deployment's own replicas counted (the spec's rule, which always holds). The
controller names a deployment's replicas being replaced (a rollout, a drain) this way
(controller/store/rollout.py). A reader that ignores it still gets a plan the spec allows.

And a node's `condition`, a short string: why a node that is not `ready` is so, in words the
reasons use instead of its state ("not ready: n2 (suspect)"). The controller says `suspect` and
`down, its work not evicted yet` of nodes it gives the solver as `cordoned` (they keep their
shards and take no new ones), which the reasons called cordoned. Nothing is decided by it; a
value that is not a string of at most 64 characters is ignored.

And a node's `unhealthy_accelerators`, a list of distinct indices below its `accelerators`:
accelerators that failed (the controller hears it from the node's agent). No shard may be placed
on one. A placement in the problem that uses one is lost, as one on a `down` node is (its
replica is repaired: placed again whole, or beside its siblings), and a plan that places a shard
on one breaks INDICES in the independent checker (tests/scheduler/checker.py). A reader that
ignores the field may place on a failed accelerator.

And the problem's `nominations`, a list of `{"deployment": id, "priority": int, "nodes": [node
ids]}`: nodes kept for a deployment that waits at the head of the line (the controller names
them: docs/operations.md, "Head-of-line nominations"). No new shard of another deployment whose
priority is at most the nomination's is placed on a nominated node (a higher priority may: it
could preempt there anyway); what runs there stays. The deployment itself may be absent from
the problem (one the controller leaves out while it waits); its `priority` is given so the rule
needs nothing else. A node is nominated at most once; the reasons count a nominated node under
NODE_STATE ("nominated for acme/big"). The independent checker refuses a plan that places
against one (tests/scheduler/checker.py, NODE_STATE). A reader that ignores the field places as
if no node were nominated.

And a node's `max_shards`, an integer of at least 1: the most shards the node holds at once,
whatever each needs (Kubernetes' pods per node). The controller says its agents' bound
(`controller/limits.py`, `SHARDS_PER_NODE_MAX`) of every node, so that a node full of tiny
fractions or host-only shards is never handed more than its agent can list. A node that holds
more (its cap lowered since) keeps them and takes no new shard; what is left unplaced for it
says NODE_SHARDS, a reason code beyond the spec's list (the shipped plan schema lists it). The
independent checker refuses a plan that newly places onto a node beyond it
(tests/scheduler/checker.py, NODE_SHARDS). Absent: no bound, as before. A reader that ignores the
field may place any number of shards on a node.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from itertools import accumulate
from operator import attrgetter
from typing import Any

import jsonschema

from scheduler.errors import ProblemError
from scheduler.schema_check import Check, compile_schema
from scheduler.model import (IMPLIED_ROW, IMPLIED_ZONE, Deployment, Node, Nomination, Options, Placement, Plan,
                             Problem, Rack, Row, ShardSpec, Spread, Tenant, Zone)

CONDITION_MAX = 64  # characters of a node's `condition` (an extension, in the module docstring)
SPREAD_DOMAINS = ("node", "rack", "row", "zone")  # the spec's "any one node/rack/row/zone"
# Every quantity (watts, GiB, milli-CPU, MiB, tenant accelerators) stays below this. The solver
# stands for "not limited" with 1e15 (`scheduler.topology.UNLIMITED`) and leaves out of CP-SAT a
# budget or cap with 1e14 or more of headroom, so from 1e14 on a budget or cap would silently
# read as none and a demand as one that nothing, not even an undeclared resource, can meet (and
# a budget's slots overflow int64). 1e14 W is 100 TW; the controller's own limits stop at 1e12.
QUANTITY_LIMIT = 1e14
QUANTITIES = (  # (list, the quantities of each item), as named in the document
    ("rows", ("power_budget_w",)),
    ("racks", ("power_budget_w",)),
    ("nodes", ("hbm_gib", "cpu_milli", "memory_mib", "idle_power_w")),
    ("tenants", ("reserved_accelerators", "max_accelerators", "max_power_w")),
    ("deployments", ("shard.hbm_gib", "shard.cpu_milli", "shard.memory_mib", "shard.power_w")),
)
# Integer fields. JSON Schema calls any number without a fractional part an integer (3.0, 1e20)
# and json.loads reads integers of any size, so the parsers turn each into an int (`_int`) and
# `check_references` bounds it by what the solver can hold: a node's accelerators are a row of
# its (node, accelerator) arrays, and a shard's sit on one node; replicas and shards are listed
# one by one (a deployment's pending replicas, a gang's shards); the rest are numpy int64s and
# CP-SAT coefficients. The controller's own limits stay below these (`controller/limits.py`:
# 64 accelerators a node, 4,096 replicas, 256 shards a replica, |priority| <= 1e6).
ACCELERATORS_LIMIT = 1024
COUNT_LIMIT = 1 << 20
INT64_MAX = (1 << 63) - 1
_ACCELERATORS = (ACCELERATORS_LIMIT, "the most accelerators a node may have")
_COUNT = (COUNT_LIMIT, "the most replicas or shards the solver lists")
_INT64 = (INT64_MAX, "the largest 64-bit integer")
INTEGERS = (  # (list, ((dotted name, minimum, (maximum, why) or None: QUANTITIES bounds it)))
    ("nodes", (("accelerators", 0, _ACCELERATORS), ("cpu_milli", 0, None),
               ("memory_mib", 0, None), ("max_shards", 1, _INT64))),
    ("deployments", (("replicas", 1, _COUNT), ("min_replicas", 1, _COUNT),
                     ("shards_per_replica", 1, _COUNT), ("shard.accelerators", 0, _ACCELERATORS),
                     ("shard.accelerator_milli", 1, (1000, "a whole accelerator")),
                     ("shard.cpu_milli", 0, None), ("shard.memory_mib", 0, None),
                     ("spread.max_per_domain", 1, _COUNT), ("priority", -INT64_MAX, _INT64))),
    ("options", (("time_limit_ms", 1, _INT64), ("max_moves", 0, _INT64),
                 ("batch_size", 1, _INT64))),
)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ProblemError("", key, f"duplicate key {key!r} in an object (each key at most once)")
        document[key] = value
    return document


def document_from_json(text: str | bytes) -> Any:
    """A JSON document (a problem, a plan) as json.loads reads it, except that an object giving a
    key twice is refused with a ProblemError naming the key: json.loads keeps the last without a
    word, so `{"options": ..., "options": ...}` or a node's `hbm_gib` given twice would be solved
    as whichever came last. Otherwise as json.loads: json.JSONDecodeError (with the line and
    column), ValueError (an integer past Python's digit limit), RecursionError (nested deeper
    than Python's recursion limit)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """One of the shipped schemas: 'problem' or 'plan'."""
    text = resources.files("scheduler.schemas").joinpath(f"{name}.schema.json").read_text()
    return document_from_json(text)


@lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.protocols.Validator:
    problem_schema = load_schema("problem")
    schema = load_schema(name)
    registry = None
    from referencing import Registry, Resource  # jsonschema's own dependency
    registry = Registry().with_resources([
        ("problem.schema.json", Resource.from_contents(problem_schema)),
        (problem_schema["$id"], Resource.from_contents(problem_schema)),
    ])
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, registry=registry)


def _json_path(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@lru_cache(maxsize=None)
def _fast_check(name: str) -> Check | None:
    return compile_schema(load_schema(name))


def validate_document(doc: Any, name: str) -> None:
    """Raise ProblemError for the first schema violation (the deepest, most specific one).

    The compiled check (`schema_check`) answers "valid" in a few ms for a 4,096-node document;
    only a document it rejects goes through jsonschema, which names the field and the value."""
    fast = _fast_check(name)
    if fast is not None and fast(doc):
        return
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(doc))
    if error is not None:
        raise ProblemError(_json_path(error.absolute_path), error.instance,
                           f"{error.message}")


def problem_from_dict(doc: dict[str, Any], *, validate: bool = True) -> Problem:
    """Validate an interchange document and turn it into a Problem.

    `validate=False` skips the JSON schema check for a caller that built the document itself
    (the controller's own snapshot); the referential checks below always run."""
    if validate:
        validate_document(doc, "problem")
    zones = tuple(Zone(z["id"]) for z in doc.get("zones", ()))
    rows = tuple(Row(r["id"], r["zone"], r.get("power_budget_w")) for r in doc.get("rows", ()))
    racks = tuple(Rack(r["id"], r["row"], r.get("power_budget_w")) for r in doc.get("racks", ()))
    nodes = tuple(_node(n) for n in doc["nodes"])
    tenants = tuple(_tenant(t) for t in doc.get("tenants", ()))
    deployments = tuple(_deployment(d) for d in doc["deployments"])
    # A fraction's placement may leave its milli out: it is its shard's (the module docstring).
    fractions = {d.id: d.shard.accelerator_milli for d in deployments if d.shard.fractional}
    placements = tuple(_placement(p, fractions) for p in doc.get("placements", ()))
    opts = doc.get("options", {})
    options = Options(mode=opts.get("mode", "batch"),
                      time_limit_ms=_int(opts.get("time_limit_ms")),
                      max_moves=_int(opts.get("max_moves")),
                      allow_preemption=bool(opts.get("allow_preemption", False)),
                      batch_size=_int(opts.get("batch_size")))

    # Implied lists: absent means "whatever the references say"; present, even empty, it is
    # checked strictly (an empty `tenants` took a deployment's unknown tenant as implied). Where
    # the list above is present, its one entry is the implied entries' parent; with more (or
    # none) the document must say which.
    if "racks" not in doc:
        _one_parent("racks", "rows", "row", "rack", rows, "rows" in doc)
        racks = tuple(Rack(rid, rows[0].id if rows else IMPLIED_ROW)
                      for rid in dict.fromkeys(n.rack for n in nodes))
    if "rows" not in doc:
        _one_parent("rows", "zones", "zone", "row", zones, "zones" in doc)
        rows = tuple(Row(rid, zones[0].id if zones else IMPLIED_ZONE)
                     for rid in dict.fromkeys(r.row for r in racks))
    if "zones" not in doc:
        zones = tuple(Zone(zid) for zid in dict.fromkeys(r.zone for r in rows))
    if "tenants" not in doc:
        tenants = tuple(Tenant(tid) for tid in dict.fromkeys(d.tenant for d in deployments))

    problem = Problem(nodes=nodes, deployments=deployments, zones=zones, rows=rows, racks=racks,
                      tenants=tenants, placements=placements, options=options,
                      nominations=_nominations(doc.get("nominations")))
    check_references(problem)
    return problem


def _one_parent(field: str, parents_field: str, parent: str, child: str, parents: tuple[Any, ...],
                present: bool) -> None:
    """`field` is left out and implied; `parents_field`, when present, must list one entry to
    hold them all (with several, which holds which is not said; it was told as an unknown
    internal id, `racks[0].row: unknown row '_row'`, of a list the document never had)."""
    if present and not parents:
        raise ProblemError(parents_field, [], f"is empty, and {field} is left out: list the {parent}(s), "
                                              f"or leave {parents_field} out too")
    if present and len(parents) != 1:
        raise ProblemError(field, None, f"left out, and {parents_field} lists {len(parents)} {parent}s: "
                                        f"give {field} to say which {parent} each {child} is in")


def _unique(items: Any, field: str) -> dict[str, int]:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            raise ProblemError(f"{field}[{i}].id", item.id, f"duplicate id {item.id!r}")
        seen[item.id] = i
    return seen


def check_references(problem: Problem) -> None:
    """What a schema cannot express (references, existing placements that agree with their
    shards and each other, numbers the solver can compute with); raise ProblemError on the
    first failure."""
    zones = _unique(problem.zones, "zones")
    rows = _unique(problem.rows, "rows")
    racks = _unique(problem.racks, "racks")
    nodes = _unique(problem.nodes, "nodes")
    tenants = _unique(problem.tenants, "tenants")
    deployments = _unique(problem.deployments, "deployments")
    for i, row in enumerate(problem.rows):
        if row.zone not in zones:
            raise ProblemError(f"rows[{i}].zone", row.zone, f"unknown zone {row.zone!r}")
    for i, rack in enumerate(problem.racks):
        if rack.row not in rows:
            raise ProblemError(f"racks[{i}].row", rack.row, f"unknown row {rack.row!r}")
    for i, node in enumerate(problem.nodes):
        if node.rack not in racks:
            raise ProblemError(f"nodes[{i}].rack", node.rack, f"unknown rack {node.rack!r}")
        for j, index in enumerate(node.unhealthy_accelerators):
            if index.__class__ is not int or not 0 <= index < node.accelerators:
                raise ProblemError(f"nodes[{i}].unhealthy_accelerators[{j}]", index,
                                   f"not an index of node {node.id!r}'s {node.accelerators} accelerators "
                                   f"(unhealthy_accelerators lists indices 0..accelerators-1)")
            if index in node.unhealthy_accelerators[:j]:
                raise ProblemError(f"nodes[{i}].unhealthy_accelerators[{j}]", index,
                                   f"accelerator {index} listed twice")
    for i, tenant in enumerate(problem.tenants):
        for j, other in enumerate(tenant.excludes):
            if other not in tenants:
                raise ProblemError(f"tenants[{i}].excludes[{j}]", other,
                                   f"unknown tenant {other!r}")
            if other == tenant.id:
                raise ProblemError(f"tenants[{i}].excludes[{j}]", other,
                                   f"tenant {tenant.id} cannot exclude itself")
        for j, zone in enumerate(tenant.zones or ()):
            if zone not in zones:
                raise ProblemError(f"tenants[{i}].zones[{j}]", zone, f"unknown zone {zone!r}")
    for i, dep in enumerate(problem.deployments):
        if dep.tenant not in tenants:
            raise ProblemError(f"deployments[{i}].tenant", dep.tenant,
                               f"unknown tenant {dep.tenant!r}")
        if dep.min_replicas > dep.replicas:
            raise ProblemError(f"deployments[{i}].min_replicas", dep.min_replicas,
                               f"min_replicas {dep.min_replicas} > replicas {dep.replicas}")
        if dep.spread is not None and dep.spread.domain not in SPREAD_DOMAINS:
            # The schema shares its domain list with `locality`, where "none" means anywhere; a
            # spread over domain "none" is read as no spread at all (`_deployment`: a spread over
            # no failure domain limits nothing), so what reaches here is a word outside the list.
            raise ProblemError(f"deployments[{i}].spread.domain", dep.spread.domain,
                               f"spread.domain must be one of {', '.join(SPREAD_DOMAINS)}, got "
                               f"{dep.spread.domain!r} (leave spread out, or say none, for no limit)")
        if dep.spread_group is not None and (not isinstance(dep.spread_group, str)
                                             or not dep.spread_group):
            raise ProblemError(f"deployments[{i}].spread_group", dep.spread_group,
                               "spread_group must be a non-empty string (leave it out for none)")
    _check_nominations(problem, nodes)
    for field, names in QUANTITIES:
        _check_quantities(field, getattr(problem, field), names)
    for field, integers in INTEGERS:
        _check_integers(field, getattr(problem, field), integers)
    _check_placements(problem, deployments, nodes)


def _check_nominations(problem: Problem, nodes: dict[str, int]) -> None:
    """The problem's `nominations` (an extension, in the module docstring): a deployment id, an
    integer priority, known nodes each nominated once."""
    nominated: dict[str, tuple[int, str]] = {}  # node -> (the nomination naming it, its deployment)
    for i, nom in enumerate(problem.nominations):
        if not isinstance(nom, Nomination):
            raise ProblemError(f"nominations[{i}]", nom,
                               'a nomination is {"deployment": id, "priority": int, "nodes": [node ids]}')
        if not isinstance(nom.deployment, str) or not nom.deployment:
            raise ProblemError(f"nominations[{i}].deployment", nom.deployment, "a deployment id (a non-empty string)")
        if nom.priority.__class__ is not int or not -INT64_MAX <= nom.priority <= INT64_MAX:
            raise ProblemError(f"nominations[{i}].priority", nom.priority,
                               "an integer priority, as a deployment's (within 64 bits)")
        for j, node in enumerate(nom.nodes):
            if not isinstance(node, str) or node not in nodes:
                raise ProblemError(f"nominations[{i}].nodes[{j}]", node, f"unknown node {node!r}")
            if node in nominated:
                raise ProblemError(f"nominations[{i}].nodes[{j}]", node,
                                   f"node {node} listed twice" if nominated[node][0] == i else
                                   f"node {node} is already nominated for {nominated[node][1]}")
            nominated[node] = (i, nom.deployment)


def _check_quantities(field: str, items: tuple[Any, ...], names: tuple[str, ...]) -> None:
    """`names` (dotted attributes) of every item are numbers the solver can compute with. The
    distinct values are few (a fleet repeats its node shapes), so they are tested first; only a
    bad one costs a walk that finds its path."""
    if all(-QUANTITY_LIMIT < v < QUANTITY_LIMIT for name in names for v in _values(items, name)):
        return
    for i, item in enumerate(items):
        for name in names:
            _check_quantity(f"{field}[{i}].{name}", attrgetter(name)(item))


def _check_quantity(field: str, value: float | None) -> None:
    """A number the solver can compute with: finite and below QUANTITY_LIMIT. json.loads takes
    NaN and Infinity, which are no JSON numbers (RFC 8259) and no schema rejects."""
    if value is None or -QUANTITY_LIMIT < value < QUANTITY_LIMIT:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ProblemError(field, value, f"{value} is not a finite number")
    if value > 0:
        raise ProblemError(field, value, f"{_shown(value)} is too large: a quantity must stay "
                                         f"below {QUANTITY_LIMIT:g} (leave the field out for no "
                                         "limit)")
    # Negative: the schema's minimum says so, for a caller that skipped the schema.
    raise ProblemError(field, value, f"{_shown(value)} is less than the minimum of 0")


def _check_integers(field: str, items: Any,
                    integers: tuple[tuple[str, int, tuple[int, str] | None], ...]) -> None:
    """The integer fields (`INTEGERS`) of every item (of the options object) are ints within
    the solver's bounds. Like the quantities, the distinct values are tested first."""
    many = isinstance(items, tuple)
    for name, low, bound in integers:
        high = bound[0] if bound is not None else math.inf
        values = _values(items if many else (items,), name)
        if all(v.__class__ is int and low <= v <= high for v in values):
            continue
        for i, item in enumerate(items if many else (items,)):
            for value in _values((item,), name):
                where = f"{field}[{i}].{name}" if many else f"{field}.{name}"
                if value.__class__ is not int:  # a caller that skipped the schema
                    raise ProblemError(where, value, f"{value!r} is not an integer")
                shown = str(value) if -10 ** 19 < value < 10 ** 19 else _shown(value)
                if value < low:
                    raise ProblemError(where, value, f"{shown} is less than the minimum of {low}")
                if bound is not None and value > high:
                    raise ProblemError(where, value, f"{shown} is greater than the maximum of "
                                                     f"{high} ({bound[1]})")


def _values(items: Any, name: str) -> set[Any]:
    """The distinct values of a dotted field over items, leaving out absent ones (None, or an
    absent object on the way: a deployment without spread)."""
    head, _, last = name.rpartition(".")
    owners = filter(None, map(attrgetter(head), items)) if head else items
    values = set(map(attrgetter(last), owners))
    values.discard(None)
    return values


def _shown(value: Any) -> str:
    """A number as a message shows it (%g: 1e+20); an int too large for a float (json.loads
    reads 1 and 400 zeros as one) by its order of magnitude."""
    try:
        return f"{value:g}"
    except OverflowError:
        return f"about {'-' if value < 0 else ''}1e+{int(math.log10(abs(value)))}"


def _check_placements(problem: Problem, deployments: dict[str, int],
                      nodes: dict[str, int]) -> None:
    """Each placement in range and in its shard's shape; together, an occupancy that could run
    (see the module docstring). One pass, one dict lookup per accelerator index."""
    seen: set[tuple[str, int, int]] = set()
    deps, node_list = problem.deployments, problem.nodes
    node_acc = [n.accelerators for n in node_list]
    down = {j for j, n in enumerate(node_list) if n.state == "down"}
    # Per deployment: replicas, shards per replica, accelerators per shard, a fraction's milli
    # (0: whole accelerators), tenant.
    shapes = [(d.replicas, d.shards_per_replica, d.shard.accelerators,
               d.shard.accelerator_milli if d.shard.fractional else 0, d.tenant) for d in deps]
    # Who holds each accelerator of a node that is not down, keyed by its number in the cluster
    # (`first[node index] + accelerator index`): the index in `placements` of the
    # whole-accelerator shard holding it, or the fractions sharing it as [tenant, milli in
    # total, first holder's index, holders].
    first = list(accumulate(node_acc, initial=0))
    held: dict[int, int | list[Any]] = {}
    for i, p in enumerate(problem.placements):
        d = deployments.get(p.deployment)
        n = nodes.get(p.node)
        indices = p.accelerator_indices
        # The common case in one test; anything odd is re-checked below in the spec's order.
        if d is not None and n is not None:
            replicas, shards, accelerators, fraction, tenant = shapes[d]
            milli = p.accelerator_milli
            key = (p.deployment, p.replica, p.shard)
            if p.replica < replicas and p.shard < shards and len(indices) == accelerators and \
                    (milli == fraction if fraction else milli is None or milli >= 1000) and \
                    (not indices or (max(indices) < node_acc[n] and
                                     (len(indices) == 1 or len(set(indices)) == len(indices)))) \
                    and key not in seen:
                seen.add(key)
                if not indices or n in down:
                    continue
                at = first[n] + indices[0]
                if fraction:
                    holders = held.get(at)
                    if holders is None:
                        held[at] = [tenant, fraction, i, 1]
                        continue
                    if holders.__class__ is list and holders[0] == tenant and \
                            holders[1] + fraction <= 1000:
                        holders[1] += fraction
                        holders[3] += 1
                        continue
                elif len(indices) == 1 and held.setdefault(at, i) == i:
                    continue
                _hold(problem, held, first[n], i, p, deps[d])  # several indices, or a refusal
                continue
        dep = _check_placement(problem, i, p, deployments, nodes, seen)
        n = nodes[p.node]
        if indices and n not in down:
            _hold(problem, held, first[n], i, p, dep)


def _hold(problem: Problem, held: dict[int, int | list[Any]], first: int, i: int,
          p: Placement, dep: Deployment) -> None:
    """Record placement i on its accelerators (numbered from `first` on its node); raise if
    they cannot take it."""
    if not dep.shard.fractional:
        for idx in p.accelerator_indices:
            other = held.setdefault(first + idx, i)
            if other == i:
                continue
            raise ProblemError(f"placements[{i}]", idx, (
                f"node {p.node} accelerator {idx} is already held whole by "
                f"{_named(problem, other)}" if isinstance(other, int) else
                f"node {p.node} accelerator {idx} already holds fractions of "
                f"{_named(problem, other[2], other[3])}, so no shard can hold it whole"))
        return
    idx = p.accelerator_indices[0]
    milli = dep.shard.accelerator_milli
    other = held.setdefault(first + idx, [dep.tenant, milli, i, 1])
    if isinstance(other, list) and other[2] == i:
        return
    if isinstance(other, int):
        raise ProblemError(f"placements[{i}]", idx, f"node {p.node} accelerator {idx} is already "
                                                    f"held whole by {_named(problem, other)}")
    tenant, total, holder, count = other
    if tenant != dep.tenant:
        raise ProblemError(f"placements[{i}]", idx, (
            f"node {p.node} accelerator {idx} already holds a fraction of tenant {tenant} "
            f"({_named(problem, holder, count)}); accelerators are never shared between tenants"))
    if total + milli > 1000:
        raise ProblemError(f"placements[{i}]", idx, (
            f"node {p.node} accelerator {idx} would hold {total + milli} milli > 1000: {milli} "
            f"here on top of {total} held by {_named(problem, holder, count)}"))
    other[1] = total + milli
    other[3] = count + 1


def _named(problem: Problem, j: int, count: int = 1) -> str:
    """Placement j as a person finds it in the document ("placements[0] (t/x replica 0 shard
    0)"), and how many more hold the same accelerator."""
    p = problem.placements[j]
    more = f" and {count - 1} more" if count > 1 else ""
    return f"placements[{j}] ({p.deployment} replica {p.replica} shard {p.shard}){more}"


def _check_placement(problem: Problem, i: int, p: Placement, deployments: dict[str, int],
                     nodes: dict[str, int], seen: set[tuple[str, int, int]]) -> Deployment:
    """Every check on one placement, raising the first failure (the slow path); its deployment."""
    where = f"placements[{i}]"
    if p.deployment not in deployments:
        raise ProblemError(f"{where}.deployment", p.deployment,
                           f"unknown deployment {p.deployment!r}")
    dep = problem.deployments[deployments[p.deployment]]
    if p.replica >= dep.replicas:
        raise ProblemError(f"{where}.replica", p.replica,
                           f"replica {p.replica} out of range 0..{dep.replicas - 1}")
    if p.shard >= dep.shards_per_replica:
        raise ProblemError(f"{where}.shard", p.shard,
                           f"shard {p.shard} out of range 0..{dep.shards_per_replica - 1}")
    key = (p.deployment, p.replica, p.shard)
    if key in seen:
        raise ProblemError(where, list(key), f"duplicate placement of {key}")
    seen.add(key)
    if p.node not in nodes:
        raise ProblemError(f"{where}.node", p.node, f"unknown node {p.node!r}")
    node = problem.nodes[nodes[p.node]]
    if len(p.accelerator_indices) != dep.shard.accelerators:
        raise ProblemError(f"{where}.accelerator_indices", list(p.accelerator_indices),
                           f"{len(p.accelerator_indices)} indices for a shard of "
                           f"{dep.shard.accelerators} accelerators")
    if len(set(p.accelerator_indices)) != len(p.accelerator_indices):
        raise ProblemError(f"{where}.accelerator_indices", list(p.accelerator_indices),
                           "repeated accelerator index")
    for j, idx in enumerate(p.accelerator_indices):
        if idx >= node.accelerators:
            raise ProblemError(f"{where}.accelerator_indices[{j}]", idx,
                               f"index {idx} out of range for node {node.id!r} with "
                               f"{node.accelerators} accelerators")
    milli = p.accelerator_milli if p.accelerator_milli is not None else 1000
    if dep.shard.fractional:
        # None only from a Problem built without problem_from_dict: the model reads it as 1000.
        if milli != dep.shard.accelerator_milli:
            raise ProblemError(f"{where}.accelerator_milli", p.accelerator_milli,
                               f"{milli} milli where deployment {dep.id!r} asks for "
                               f"{dep.shard.accelerator_milli} of an accelerator")
    elif milli < 1000:  # only from a Problem built without problem_from_dict, which leaves it out
        raise ProblemError(f"{where}.accelerator_milli", milli,
                           f"deployment {dep.id!r} asks for whole accelerators")
    return dep


def _int(value: Any) -> Any:
    """An integer field's value as an int (`INTEGERS`): 3.0 and 1e20 are integers to JSON
    Schema, but the solver counts, indexes and builds CP-SAT models with them. Anything else is
    returned as it is: None (absent), or 2.5 or NaN from a caller that skipped the schema, which
    `check_references` refuses."""
    return int(value) if value.__class__ is float and value.is_integer() else value


def _real(value: Any) -> Any:
    """A number the model holds as a float (16 and 16.0 are one spec); an int too large for a
    float (json.loads reads 1 and 400 zeros as one) stays as it is, for `check_references` to
    refuse (`QUANTITY_LIMIT`)."""
    try:
        return float(value)
    except OverflowError:
        return value


def _node(n: dict[str, Any]) -> Node:
    return Node(id=n["id"], rack=n["rack"], accelerators=_int(n["accelerators"]),
                state=n.get("state", "ready"), accelerator_model=n.get("accelerator_model"),
                hbm_gib=n.get("hbm_gib"), cpu_milli=_int(n.get("cpu_milli")),
                memory_mib=_int(n.get("memory_mib")),
                idle_power_w=_real(n.get("idle_power_w", 0)),
                labels=tuple(sorted(n.get("labels", {}).items())),
                condition=_condition(n.get("condition")),
                unhealthy_accelerators=_indices(n.get("unhealthy_accelerators")),
                max_shards=_int(n.get("max_shards")))


def node_shape(doc: dict[str, Any]) -> dict[str, Any]:
    """A node document without how the node is doing (its `state` and `condition`): what it is.
    Two documents of one node that differ only there are one node flipped in place (a cordon, a
    suspect node), not a node resized, moved or relabelled."""
    return {k: v for k, v in doc.items() if k not in ("state", "condition")}


def _indices(value: Any) -> tuple[Any, ...]:
    """A node's `unhealthy_accelerators` (an extension, in the module docstring) as given, each
    an int where it is one (`_int`); `check_references` refuses what is not a list of distinct
    indices of the node's accelerators. Absent: none."""
    if value is None:
        return ()
    return tuple(_int(i) for i in value) if isinstance(value, list) else (value,)


def _condition(value: Any) -> str | None:
    """A node's `condition` (an extension): words for the reasons, or None (absent, or not a
    short string: another producer's field of that name is ignored, as the spec says)."""
    return value if isinstance(value, str) and 0 < len(value) <= CONDITION_MAX else None


def _nominations(value: Any) -> tuple[Any, ...]:
    """The problem's `nominations` (an extension) as given; what is not a list of objects with
    a list of nodes is passed on as it is, for `check_references` to refuse. Absent: none."""
    if value is None:
        return ()
    if not isinstance(value, list):
        return (value,)
    return tuple(Nomination(deployment=n.get("deployment"), priority=_int(n.get("priority", 0)),
                            nodes=tuple(n["nodes"])) if isinstance(n, dict) and isinstance(n.get("nodes"), list)
                 else n for n in value)


def _tenant(t: dict[str, Any]) -> Tenant:
    zones = t.get("zones")
    return Tenant(id=t["id"], isolation=t.get("isolation", "shared"),
                  excludes=tuple(t.get("excludes", ())),
                  zones=tuple(zones) if zones is not None else None,
                  reserved_accelerators=_real(t.get("reserved_accelerators", 0)),
                  max_accelerators=t.get("max_accelerators"), max_power_w=t.get("max_power_w"))


def shard_spec_from_dict(s: dict[str, Any]) -> ShardSpec:
    """One interchange shard (a deployment's `shard`, already valid) as the model's: the inverse
    of `deployment_to_dict`'s. Absent fields take the schema's defaults; `hbm_gib` and `power_w`
    are floats whatever number the JSON holds (16 and 16.0 are one spec); `accelerator_models`
    absent means any model."""
    models = s.get("accelerator_models")
    accelerators = _int(s["accelerators"])
    # The spec gives accelerator_milli a meaning with `accelerators: 1` only: else it is 1000
    # (the checker reads it so; the parser refused such a shard, which the schema accepts).
    return ShardSpec(accelerators=accelerators,
                     accelerator_milli=_int(s.get("accelerator_milli", 1000)) if accelerators == 1 else 1000,
                     hbm_gib=_real(s.get("hbm_gib", 0)), cpu_milli=_int(s.get("cpu_milli", 0)),
                     memory_mib=_int(s.get("memory_mib", 0)), power_w=_real(s.get("power_w", 0)),
                     accelerator_models=tuple(models) if models is not None else None)


def _deployment(d: dict[str, Any]) -> Deployment:
    spread = d.get("spread")
    if spread and spread.get("domain") == "none":  # the schema's domain list allows it: no failure domain, no limit
        spread = None
    return Deployment(id=d["id"], tenant=d["tenant"], replicas=_int(d["replicas"]),
                      shards_per_replica=_int(d["shards_per_replica"]),
                      shard=shard_spec_from_dict(d["shard"]),
                      min_replicas=_int(d.get("min_replicas", 1)),
                      locality=d.get("locality", "rack"),
                      spread=Spread(spread["domain"], _int(spread["max_per_domain"]))
                      if spread else None,
                      priority=_int(d.get("priority", 0)), preemptible=d.get("preemptible", False),
                      spread_group=d.get("spread_group"))


def deployment_from_dict(d: dict[str, Any]) -> Deployment:
    """One interchange deployment (already valid: the caller built it) as the model's."""
    return _deployment(d)


def node_from_dict(n: dict[str, Any]) -> Node:
    """One interchange node (already valid) as the model's."""
    return _node(n)


def tenant_from_dict(t: dict[str, Any]) -> Tenant:
    """One interchange tenant (already valid) as the model's."""
    return _tenant(t)


def placement_from_dict(p: dict[str, Any]) -> Placement:
    """One interchange placement (already valid) as the model's."""
    return _placement(p)


def _placement(p: dict[str, Any], fractions: dict[str, int] | None = None) -> Placement:
    """`fractions`: the milli of each fractional deployment's shard, which a placement of it
    that leaves `accelerator_milli` out holds; a placement of any other deployment has none
    (the spec gives it no meaning there)."""
    replica, shard, milli = p["replica"], p["shard"], p.get("accelerator_milli")
    indices = tuple(p["accelerator_indices"])
    # Integer-valued floats (`_int`) are rare and a cluster has many placements, so they are
    # looked for first, at the cost of one sum: it is an int only if all its terms are.
    if sum(indices, replica + shard).__class__ is not int or \
            not (milli is None or milli.__class__ is int):
        replica, shard, milli = _int(replica), _int(shard), _int(milli)
        indices = tuple(map(_int, indices))
    if fractions is not None:  # a whole or host-only shard's milli means nothing: left out
        milli = fractions.get(p["deployment"]) if milli is None or p["deployment"] not in fractions else milli
    return Placement(deployment=p["deployment"], replica=replica, shard=shard, node=p["node"],
                     accelerator_indices=indices, accelerator_milli=milli)


def placement_to_dict(p: Placement) -> dict[str, Any]:
    out: dict[str, Any] = {"deployment": p.deployment, "replica": p.replica, "shard": p.shard,
                           "node": p.node, "accelerator_indices": list(p.accelerator_indices)}
    if p.accelerator_milli is not None:
        out["accelerator_milli"] = p.accelerator_milli
    return out


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as an interchange document (valid against plan.schema.json)."""
    return {
        "status": plan.status,
        "placements": [placement_to_dict(p) for p in plan.placements],
        "unplaced": [{"deployment": u.deployment, "replicas": u.replicas,
                      "reasons": [{"code": r.code, "message": r.message,
                                   **({"scope": r.scope} if r.scope is not None else {})}
                                  for r in u.reasons]} for u in plan.unplaced],
        "preempted": [{"deployment": p.deployment, "replica": p.replica}
                      for p in plan.preempted],
        "moved": [{"deployment": m.deployment, "replica": m.replica, "shard": m.shard,
                   "from": m.from_node, "to": m.to_node} for m in plan.moved],
        "stats": dict(plan.stats),
    }


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def deployment_to_dict(d: Deployment) -> dict[str, Any]:
    """One deployment as an interchange document (absent optional fields left out)."""
    return _drop_none({
        "id": d.id, "tenant": d.tenant, "replicas": d.replicas,
        "min_replicas": d.min_replicas, "shards_per_replica": d.shards_per_replica,
        "shard": _drop_none({
            "accelerators": d.shard.accelerators,
            "accelerator_milli": d.shard.accelerator_milli, "hbm_gib": d.shard.hbm_gib,
            "cpu_milli": d.shard.cpu_milli, "memory_mib": d.shard.memory_mib,
            "power_w": d.shard.power_w,
            "accelerator_models": (list(d.shard.accelerator_models)
                                   if d.shard.accelerator_models is not None else None)}),
        "locality": d.locality,
        "spread": ({"domain": d.spread.domain, "max_per_domain": d.spread.max_per_domain}
                   if d.spread else None),
        "priority": d.priority, "preemptible": d.preemptible, "spread_group": d.spread_group})


def problem_to_dict(problem: Problem) -> dict[str, Any]:
    """The problem as an interchange document (handy for tests and model dumps)."""
    return {
        "version": 1,
        "zones": [{"id": z.id} for z in problem.zones],
        "rows": [_drop_none({"id": r.id, "zone": r.zone, "power_budget_w": r.power_budget_w})
                 for r in problem.rows],
        "racks": [_drop_none({"id": r.id, "row": r.row, "power_budget_w": r.power_budget_w})
                  for r in problem.racks],
        "nodes": [_drop_none({"id": n.id, "rack": n.rack, "state": n.state,
                             "accelerators": n.accelerators,
                             "accelerator_model": n.accelerator_model, "hbm_gib": n.hbm_gib,
                             "cpu_milli": n.cpu_milli, "memory_mib": n.memory_mib,
                             "idle_power_w": n.idle_power_w,
                             "labels": dict(n.labels) or None, "condition": n.condition,
                             "unhealthy_accelerators": list(n.unhealthy_accelerators) or None,
                             "max_shards": n.max_shards})
                  for n in problem.nodes],
        "tenants": [_drop_none({"id": t.id, "isolation": t.isolation,
                               "excludes": list(t.excludes) or None,
                               "zones": list(t.zones) if t.zones is not None else None,
                               "reserved_accelerators": t.reserved_accelerators or None,
                               "max_accelerators": t.max_accelerators,
                               "max_power_w": t.max_power_w}) for t in problem.tenants],
        "deployments": [deployment_to_dict(d) for d in problem.deployments],
        "placements": [placement_to_dict(p) for p in problem.placements],
        **({"nominations": [{"deployment": n.deployment, "priority": n.priority, "nodes": list(n.nodes)}
                            for n in problem.nominations]} if problem.nominations else {}),
        "options": _drop_none({"mode": problem.options.mode,
                              "time_limit_ms": problem.options.time_limit_ms,
                              "max_moves": problem.options.max_moves,
                              "allow_preemption": problem.options.allow_preemption,
                              "batch_size": problem.options.batch_size}),
    }
