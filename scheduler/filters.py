"""Feasibility filters: which nodes can take a shard of a deployment, and how many.

Every hard rule that can be judged per node is a *filter plugin* (the Kubernetes scheduling
framework's Filter extension point, Nomad's feasibility iterators): one class with its reason
code, a vectorised check over all nodes, and the words that explain a failure. `NODE_FILTERS`
is the one table of them; its order is the order reasons are read in, and the first filter a
node fails is the reason it is counted under ("0/96 nodes fit: 64 POWER_RACK, 32 ISOLATION").

Two kinds of filter:
  * a `MaskFilter` says yes or no per node (not ready, wrong zone, another tenant there);
  * a `SlotFilter` says how many shards of this deployment a node could take (accelerators,
    CPU, power); zero is a failure.
What survives is turned into *slots*: the minimum over slot filters on nodes every mask admits.
A slot filter whose answer for a node depends only on that node's own occupancy and the shard
(`node_local`: accelerators, HBM, CPU, memory) is kept per node between calls, by tenant and
shard shape, and judged again only for nodes whose stamp moved (`ClusterState.node_version`):
a decision pays for the nodes that changed, not for every node.
Rules over tenants rather than nodes are the `TENANT_CAPS` table (`quota_room`); rules over
domains (a whole gang in one rack within its power) are in `gang_capacity`.

Adding a per-node rule: write one filter class here, put it in `NODE_FILTERS` where its
reason should rank, add its code to the plan schema's enum, and test it. The greedy placer,
CP-SAT (which only sees (deployment, node class) pairs with slots), preemption and `explain`
all read slots and codes from `node_fit`, so nothing else changes for a rule judged on each node
alone. A rule whose budget is shared by several nodes (rack and row power, a tenant alone in its
racks) also needs its section in `cpsat.CONSTRAINTS`, its check in `violations.py` (and
`controller/store/recheck.py`), and, for a budget a gang's domain must hold whole (power), its
total in `gang_capacity`: the table "Where each rule lives" in scheduler/README.md.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, NamedTuple

import numpy as np

from scheduler.model import Deployment, ShardSpec
from scheduler.state import ClusterState, NodeTable, kept
from scheduler.topology import Topology

BIG = 1 << 40
MAX_NAMED = 3  # nodes or domains named in one message before "+N more"
_ISOLATION_SCAN = 256  # nodes an ISOLATION message looks at to name who holds them


class FitInput:
    """What the filters of one `node_fit` call share: the deployment, its tenant, and
    intermediate arrays computed once (the Kubernetes CycleState of one filter pass).
    With `rows`, node-local filters judge only those nodes (their answers come in that order).
    With `replica`, the shards are more of that replica of d (a gang made whole again): the
    rules over replicas (spread) do not count it against itself."""

    def __init__(self, state: ClusterState, d: int, rows: np.ndarray | None = None,
                 replica: int | None = None) -> None:
        self.state = state
        self.topo: Topology = state.topo
        self.d = d
        self.replica = replica
        self.dep: Deployment = state.deps[d]
        self.spec: ShardSpec = self.dep.shard
        self.tenant = int(state.dep_tenant[d])
        self.rows = rows
        self.n = self.topo.n_nodes if rows is None else len(rows)

    def at(self, per_node: np.ndarray) -> np.ndarray:
        """The rows of a per-node array this pass judges."""
        return per_node if self.rows is None else per_node[self.rows]

    @cached_property
    def static(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ready, zone ok, model ok) per node; these never change during a solve."""
        cache = self.state.static_cache
        d = self.d
        if d not in cache:
            topo = self.topo
            zone_ok = topo.tenant_zone_ok[self.tenant][topo.node_zone] if len(topo.zone_ids) \
                else np.ones(topo.n_nodes, dtype=bool)
            cache[d] = (topo.node_ready, zone_ok, topo.model_mask(self.dep))
        return cache[d]

    @cached_property
    def tenant_ok(self) -> tuple[np.ndarray, np.ndarray]:
        return tenant_masks(self.state, self.tenant)

    @cached_property
    def whole(self) -> np.ndarray:
        """(N, A) accelerators entirely free."""
        return self.at(self.state.acc_exists) & (self.at(self.state.acc_free) >= 1000)

    @cached_property
    def per_accelerator(self) -> np.ndarray:
        """(N, A) fractional shards each accelerator this tenant may share could take."""
        s, t = self.state, self.tenant
        owner = self.at(s.acc_owner)
        usable = self.at(s.acc_exists) & ((owner == -1) | (owner == t))
        return np.where(usable, self.at(s.acc_free) // self.spec.accelerator_milli, 0)

    def unlimited(self) -> np.ndarray:
        return np.full(self.n, BIG, dtype=np.int64)


def names(items: list[str]) -> str:
    """"a, b, c +2 more": at most MAX_NAMED named."""
    shown = ", ".join(items[:MAX_NAMED])
    return shown + (f" +{len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


def first(items: np.ndarray, render: Callable[[int], str]) -> list[str]:
    """Render only the items a message shows; the rest count for "+N more"."""
    shown = [render(int(i)) for i in items[:MAX_NAMED]]
    return shown + [""] * max(len(items) - MAX_NAMED, 0)


def _and(*parts: str) -> str:
    """The parts that say something, joined by "; "."""
    return "; ".join(part for part in parts if part)


def watts(value: float) -> str:
    return f"{value / 1000:.1f} kW" if value >= 10000 else f"{value:.0f} W"


def power_line(kind: str, name: str, used: float, need: float, budget: float) -> str:
    return (f"{kind} {name} power: {watts(used)} used + {watts(need)} needed > "
            f"{watts(budget)} budget; fits if the budget were {watts(used + need)}")


# ---- the plugin interfaces ----------------------------------------------------------------

class NodeFilter:
    """One per-node rule: its reason code and how a failure is worded."""

    code: str = ""
    # A requirement the deployment itself makes (its tenant's zones, its accelerator model): no
    # change of load moves it, so its reason follows the others' in `explain` (the reasons' head
    # still counts its nodes). "3/120 nodes fit: 100 ZONE, 17 CAPACITY" leads with CAPACITY:
    # the tenant's own zone is full.
    standing: bool = False

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        """Why these nodes (all failing this filter first) cannot take a shard of d."""
        return names(first(nodes, lambda n: state.topo.node_ids[n]))

    def scope(self, state: ClusterState, nodes: np.ndarray) -> str | None:
        """What a person should look at: the one node (or domain) concerned, if only one."""
        return state.topo.node_ids[nodes[0]] if len(nodes) == 1 else None


class MaskFilter(NodeFilter):
    def mask(self, fit: FitInput) -> np.ndarray | None:
        """(N,) bool: nodes this rule admits (None: the rule does not apply, all admitted)."""
        raise NotImplementedError


class SlotFilter(NodeFilter):
    # True when a node's answer depends only on its own occupancy (what its stamp covers) and
    # the deployment's tenant and shard; `slots` then reads per-node arrays through `fit.at`.
    node_local = False

    def slots(self, fit: FitInput) -> np.ndarray:
        """(N,) int: shards of the deployment each node could take under this rule alone."""
        raise NotImplementedError


# ---- the filters, in the order their reasons are read ---------------------------------------

class NodeState(MaskFilter):
    """Ready, and not nominated for another deployment of this one's priority or higher (the
    problem's `nominations`: a node kept for the head of the line is as cordoned to the rest)."""

    code = "NODE_STATE"

    def mask(self, fit: FitInput) -> np.ndarray:
        against = fit.topo.nominated_against(fit.dep)
        return fit.static[0] if against is None else fit.static[0] & ~against

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        topo = state.topo
        ready = topo.node_ready[nodes]
        parts = []
        if not ready.all():
            states = first(nodes[~ready], lambda n: f"{topo.node_ids[n]} ({topo.node_said(n)})")
            parts.append(f"not ready: {names(states)}")
        if ready.any():
            nominated = nodes[ready]
            for i in np.unique(topo.node_nominated[nominated]).tolist():
                nom = topo.nominations[i]
                these = nominated[topo.node_nominated[nominated] == i]
                parts.append(f"nominated for {nom.deployment} (priority {nom.priority}, waiting at the head of "
                             f"the line): {names(first(these, lambda n: topo.node_ids[n]))}")
        return "; ".join(parts)


class Zone(MaskFilter):
    code = "ZONE"
    standing = True

    def mask(self, fit: FitInput) -> np.ndarray:
        return fit.static[1]

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        t = int(state.dep_tenant[d])
        zones = state.topo.problem.tenants[t].zones or ()
        if not zones:  # an empty list, not an absent one (anywhere)
            return f"tenant {state.topo.tenant_ids[t]} may run in no zone (its zones list is empty)"
        return f"tenant {state.topo.tenant_ids[t]} may only run in zones {', '.join(zones)}"


class AcceleratorModel(MaskFilter):
    code = "ACCELERATOR_MODEL"
    standing = True

    def mask(self, fit: FitInput) -> np.ndarray:
        return fit.static[2]

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        spec = state.deps[d].shard
        have = sorted({"no model declared" if state.topo.node_model[n] is None else str(state.topo.node_model[n])
                       for n in nodes[:64]})
        models = spec.accelerator_models or ()
        wanted = "|".join(models) if models else "no model (its accelerator_models list is empty)"
        return f"needs {wanted}, nodes have {names(have)}"


class Exclusion(MaskFilter):
    code = "EXCLUSION"

    def mask(self, fit: FitInput) -> np.ndarray:
        return fit.tenant_ok[0]

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        topo = state.topo
        excluded = topo.tenant_excludes[int(state.dep_tenant[d])]

        def held_by(rack: int) -> str:
            holders = [topo.tenant_ids[o] for o in np.flatnonzero(
                excluded & (state.rack_tenant[rack] > 0))]
            return f"rack {topo.rack_ids[rack]} holds {', '.join(holders)}"
        parts = first(np.unique(topo.node_rack[nodes]), held_by)
        return f"excluded tenants share the rack: {names(parts)}"

    def scope(self, state: ClusterState, nodes: np.ndarray) -> str | None:
        return _one_rack(state, nodes)


class Isolation(MaskFilter):
    code = "ISOLATION"

    def mask(self, fit: FitInput) -> np.ndarray:
        return fit.tenant_ok[1]

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        topo = state.topo
        t = int(state.dep_tenant[d])

        # Name the rack only when a dedicated_rack tenant is why; dedicated_node is about
        # the node.
        def holders(counts: np.ndarray) -> str:
            return ", ".join(f"{topo.tenant_ids[o]} ({topo.tenant_isolation[o]})"
                             for o in np.flatnonzero(counts > 0) if o != t) or "nothing"

        def held_by(key: int) -> str:  # key: a node, or -1 - a rack
            if key < 0:
                rack = -1 - key
                return f"rack {topo.rack_ids[rack]} holds {holders(state.rack_tenant[rack])}"
            return f"node {topo.node_ids[key]} holds {holders(state.node_tenant[key])}"
        looked = nodes[:_ISOLATION_SCAN]  # one line per rack or node, duplicates dropped
        racks = topo.node_rack[looked]
        ded_others = state.dedicated_rack.copy()
        ded_others[t] = False
        by_rack = state.dedicated_rack[t] | (state.rack_tenant[racks][:, ded_others] > 0).any(
            axis=1)
        keys = list(dict.fromkeys(np.where(by_rack, -1 - racks, looked).tolist()))
        text = names(first(np.array(keys, dtype=np.int64), held_by))
        if len(nodes) > len(looked):
            text += f" (+{len(nodes) - len(looked)} more nodes)"
        if topo.tenant_isolation[t] == "shared":  # others' isolation shuts it out, not its own
            return f"others' isolation: {text}"
        return f"tenant {topo.tenant_ids[t]} is {topo.tenant_isolation[t]}: {text}"


class Spread(MaskFilter):
    code = "SPREAD"

    def mask(self, fit: FitInput) -> np.ndarray | None:
        return spread_mask(fit.state, fit.d, fit.replica)

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        sp = state.deps[d].spread
        assert sp is not None
        return f"spread: at most {sp.max_per_domain} replica(s) per {sp.domain} reached"


class Capacity(SlotFilter):
    code = "CAPACITY"
    node_local = True

    def slots(self, fit: FitInput) -> np.ndarray:
        spec = fit.spec
        if spec.accelerators == 0:
            return fit.unlimited()
        if not spec.fractional:
            return fit.whole.sum(axis=1) // spec.accelerators
        return fit.per_accelerator.sum(axis=1)

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        spec = state.deps[d].shard
        topo = state.topo
        ids = topo.node_ids

        def failed(n: int) -> str:  # what a node's count leaves out: its failed accelerators
            k = int(topo.node_accelerators[n] - topo.node_healthy[n])
            return f" ({k} failed)" if k else ""

        # A node without accelerators (a host-only server) is not full: it has none.
        bare = topo.node_accelerators[nodes] == 0
        none = ""
        if bare.any():
            verb = "has" if bare.sum() == 1 else "have"
            none = f"{names(first(nodes[bare], lambda n: ids[n]))} {verb} no accelerators"
            nodes = nodes[~bare]
        if spec.fractional:
            what = f"need {spec.accelerator_milli} milli of an accelerator: "
            return what + _and(f"{names(first(nodes, lambda n: ids[n] + failed(n)))} full" if len(nodes) else "", none)
        need = f"{spec.accelerators} free accelerator(s)"
        free = (state.acc_free[nodes[:MAX_NAMED]] >= 1000).sum(axis=1)
        if not free.any():
            full = f"{names(first(nodes, lambda n: ids[n] + failed(n)))} full" if len(nodes) else ""
            return f"need {need}: " + _and(full, none)
        # "n4 full" read as wrong where n4 had 3 of the 4 needed free.
        have = dict(zip(nodes[:MAX_NAMED].tolist(), free.tolist()))
        return f"need {need} on one node: " + _and(
            names(first(nodes, lambda n: f'{ids[n]} has {have[n]}{failed(n)}')), none)


class Hbm(SlotFilter):
    code = "HBM"
    node_local = True

    def slots(self, fit: FitInput) -> np.ndarray:
        spec, s = fit.spec, fit.state
        if spec.accelerators == 0:
            return fit.unlimited()
        if not spec.fractional:
            return (fit.whole & (fit.at(s.acc_hbm) >= spec.hbm_gib)).sum(axis=1) \
                // spec.accelerators
        if spec.hbm_gib <= 0:
            return fit.per_accelerator.sum(axis=1)
        by_hbm = within(fit.at(s.acc_hbm), spec.hbm_gib, 1e-9)  # 0.3 / 0.1 is 2.999...
        return np.minimum(fit.per_accelerator, by_hbm).sum(axis=1)

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        hbm = state.deps[d].shard.hbm_gib
        return (f"need {hbm:g} GiB HBM per accelerator: "
                f"{names(first(nodes, lambda n: state.topo.node_ids[n]))}")


class NodeQuantity(SlotFilter):
    """A quantity each node has free (`free`, a per-node array of the state) and each shard needs
    (`need`, a field of its spec; 0: none): as many shards as what is free holds."""

    node_local = True
    need = ""
    free = ""

    def slots(self, fit: FitInput) -> np.ndarray:
        need = getattr(fit.spec, self.need)
        if need <= 0:
            return fit.unlimited()
        free = fit.at(getattr(fit.state, self.free))
        return np.floor(np.maximum(free, 0) / need).astype(np.int64)

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        n = nodes[0]
        need, free = getattr(state.deps[d].shard, self.need), getattr(state, self.free)[n]
        return f"need {need} {self.need}, {state.topo.node_ids[n]} has {max(free, 0):.0f} free"


class Cpu(NodeQuantity):
    code, need, free = "CPU", "cpu_milli", "cpu_free"


class Memory(NodeQuantity):
    code, need, free = "MEMORY", "memory_mib", "mem_free"


class NodeShards(SlotFilter):
    """A node's `max_shards`: as many more shards as it has room for, whatever each needs (the
    Kubernetes pods-per-node bound: a node's agent lists every shard it holds in one message).
    Tiny fractions and host-only shards are what reach it. Where no node has a cap it costs
    nothing (all unlimited); else its room is node-local, kept per node like the others."""

    code = "NODE_SHARDS"
    node_local = True

    def slots(self, fit: FitInput) -> np.ndarray:
        if not fit.topo.shards_capped:
            return fit.unlimited()
        # One table of rooms for every (tenant, shape) table: the same for any shard.
        state, n = fit.state, fit.topo.n_nodes
        table = kept(state.fit_cache, (self.code,), lambda: NodeTable(n, room=np.zeros(n, dtype=np.int64)),
                     FIT_TABLES_KEPT)
        stale = table.stale(state, fit.rows)
        if len(stale):
            table.store(state, stale, room=state.shard_room(stale))
        room = table.arrays["room"]
        assert room is not None
        return room.copy() if fit.rows is None else room[fit.rows]

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        topo = state.topo
        held = state.node_shards(nodes[:MAX_NAMED])
        at = dict(zip(nodes[:MAX_NAMED].tolist(), held.tolist()))
        return "shards per node: " + names(first(nodes, lambda n: (
            f"{topo.node_ids[n]} holds {at[n]} of max_shards {int(topo.node_max_shards[n])}")))


class PowerDomains(NamedTuple):
    """The domains of one level with a power budget (racks, rows), as `DomainPower` reads them
    (a tuple: built on every call of the filter)."""

    of_node: np.ndarray  # (N,) each node's domain
    used: np.ndarray     # per domain, the power drawn now
    budget: np.ndarray   # per domain, UNLIMITED if none
    ids: tuple[str, ...]


class DomainPower(SlotFilter):
    """A power budget per domain (`level`: rack or row): a node takes as many shards as its
    domain's headroom powers."""

    level = ""

    def domains(self, state: ClusterState) -> PowerDomains:
        raise NotImplementedError

    def slots(self, fit: FitInput) -> np.ndarray:
        power = fit.spec.shard_power_w
        if power <= 0:
            return fit.unlimited()
        at = self.domains(fit.state)
        return power_slots(at.budget - at.used, power)[at.of_node]

    def detail(self, state: ClusterState, d: int, nodes: np.ndarray) -> str:
        at, need = self.domains(state), state.deps[d].shard.shard_power_w
        return names(first(np.unique(at.of_node[nodes]), lambda i: power_line(
            self.level, at.ids[i], at.used[i], need, at.budget[i])))

    def scope(self, state: ClusterState, nodes: np.ndarray) -> str | None:
        at = self.domains(state)
        domains = np.unique(at.of_node[nodes])
        return at.ids[domains[0]] if len(domains) == 1 else None


class PowerRack(DomainPower):
    code, level = "POWER_RACK", "rack"

    def domains(self, state: ClusterState) -> PowerDomains:
        topo = state.topo
        return PowerDomains(topo.node_rack, state.rack_power, topo.rack_budget, topo.rack_ids)


class PowerRow(DomainPower):
    code, level = "POWER_ROW", "row"

    def domains(self, state: ClusterState) -> PowerDomains:
        topo = state.topo
        return PowerDomains(topo.node_row, state.row_power, topo.row_budget, topo.row_ids)


def _one_rack(state: ClusterState, nodes: np.ndarray) -> str | None:
    racks = np.unique(state.topo.node_rack[nodes])
    return state.topo.rack_ids[racks[0]] if len(racks) == 1 else None


# The one table of per-node rules; a node failing several is counted under the first.
NODE_FILTERS: tuple[MaskFilter | SlotFilter, ...] = (
    NodeState(), Zone(), AcceleratorModel(), Exclusion(), Isolation(), Spread(),
    Capacity(), Hbm(), Cpu(), Memory(), NodeShards(), PowerRack(), PowerRow(),
)
NODE_CODES = tuple(f.code for f in NODE_FILTERS)
LOCAL_FILTERS = tuple(f for f in NODE_FILTERS if isinstance(f, SlotFilter) and f.node_local)
FIT_TABLES_KEPT = 64  # (tenant, shard shape) tables of node-local slots a state keeps


# ---- running the filters ----------------------------------------------------------------

@dataclass(frozen=True)
class NodeFit:
    slots: np.ndarray                 # (N,) shards each node can take now; 0 where filtered
    codes: np.ndarray | None = None   # (N,) index into NODE_FILTERS of the first failed one
    # The nodes every mask filter admits (None: none applies) and, with explain, each slot
    # filter's room alone, in NODE_FILTERS' order: what a reason finds a rule cut (`explain._cut_by`).
    passes: np.ndarray | None = None
    rooms: tuple[tuple[SlotFilter, np.ndarray], ...] = ()


def node_fit(state: ClusterState, d: int, explain: bool = False, replica: int | None = None) -> NodeFit:
    """Slots per node for shards of deployment d (and, with explain, why a node has none);
    with `replica`, for more shards of that replica (`FitInput`: its spread not counted
    against itself)."""
    fit = FitInput(state, d, replica=replica)
    passes: np.ndarray | None = None
    # Without explain, the node-local filters' minimum comes from the kept table.
    slots: np.ndarray | None = None if explain or not LOCAL_FILTERS else \
        local_slots(state, d).copy()
    admitted: list[np.ndarray | None] = []  # per filter, nodes it admits (explain only)
    rooms: list[tuple[SlotFilter, np.ndarray]] = []  # per slot filter, its room alone (explain only)
    for f in NODE_FILTERS:
        if isinstance(f, MaskFilter):
            ok = f.mask(fit)
            if ok is not None:
                passes = ok if passes is None else passes & ok
        elif explain or not f.node_local:
            room = f.slots(fit)
            slots = room if slots is None else np.minimum(slots, room)
            ok = room > 0 if explain else None
            if explain:
                rooms.append((f, room))
        if explain:
            admitted.append(ok)
    if slots is None:
        slots = fit.unlimited()
    if passes is not None:
        slots = np.where(passes, slots, 0)
    codes = None
    if explain:
        codes = np.full(state.topo.n_nodes, -1, dtype=np.int64)
        for i in range(len(admitted) - 1, -1, -1):  # the first failed filter wins
            ok = admitted[i]
            if ok is not None:
                codes[~ok] = i
    return NodeFit(slots=slots, codes=codes, rooms=tuple(rooms), passes=passes)


def local_slots(state: ClusterState, d: int, nodes: np.ndarray | None = None) -> np.ndarray:
    """(N,) the minimum over `LOCAL_FILTERS` for shards of d, from the state's table for d's
    tenant and shard shape: only nodes changed since they were judged are judged now. The
    table's own array: read it, do not change it. With `nodes`, only those are brought up
    to date and returned (a new array)."""
    spec = state.deps[d].shard
    key = (int(state.dep_tenant[d]), spec.accelerators, spec.accelerator_milli, spec.hbm_gib,
           spec.cpu_milli, spec.memory_mib)
    n = state.topo.n_nodes
    table = kept(state.fit_cache, key, lambda: NodeTable(n, slots=np.zeros(n, dtype=np.int64)),
                 FIT_TABLES_KEPT)
    stale = table.stale(state, nodes)
    if len(stale):
        fit = FitInput(state, d, rows=stale)
        table.store(state, stale, slots=np.minimum.reduce([f.slots(fit) for f in LOCAL_FILTERS]))
    return table.arrays["slots"] if nodes is None else table.arrays["slots"][nodes]  # type: ignore[index,return-value]


# What a power budget or cap may be passed by, in watts: float noise in a headroom summed from
# draws (0.3 W of room for 0.1 W shards divides to 2.999...), far below what a plan's checkers
# allow (`violations.EPSILON`, 1e-6 W). The slack was 1e-9 of a shard, in watts 1e-9 of its draw:
# a 15 kW shard passed a budget by 1.5e-5 W, a plan the commit's re-check refused.
POWER_SLACK_W = 1e-7


def power_slots(headroom: np.ndarray, power: float) -> np.ndarray:
    """Shards of `power` W each domain's headroom still feeds (`within`), `POWER_SLACK_W` kept."""
    return within(headroom + POWER_SLACK_W, power)


def within(room: np.ndarray, need: float, slack: float = 0.0) -> np.ndarray:
    """How many shards needing `need` (> 0) each entry of `room` holds, at most BIG: more than
    any node could use, so it reads as unlimited, as `FitInput.unlimited` does. The room is
    clipped before the division and the int64 cast: a budget within QUANTITY_LIMIT over a tiny
    shard (9e13 W over 1e-6 W; the 1e15 of "no budget" over 1e-4 W) holds more shards than an
    int64 does, and the cast made that count negative."""
    return np.floor(np.clip(room, 0, BIG * need) / need + slack).astype(np.int64)


def fits_within(room: float, need: float) -> int:
    """`power_slots` for one domain or cap (a Python int): also of whole milli-accelerators,
    which the slack does not change."""
    return int(np.floor((min(max(room, 0), BIG * need) + POWER_SLACK_W) / need))


def tenant_masks(state: ClusterState, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(exclusion ok, isolation ok) per node for tenant t, from who is placed where now."""
    rack_of = state.topo.node_rack
    excl_rack, iso_rack = tenant_rack_masks(state, t)
    return excl_rack[rack_of], isolation_node_mask(state, t) & iso_rack[rack_of]


def tenant_rack_masks(state: ClusterState, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Per rack, for tenant t: no tenant it excludes there; no isolation rule of a rack
    (its own dedicated_rack, another's) against it there."""
    topo = state.topo
    n_racks = len(topo.rack_ids)
    excluded = topo.tenant_excludes[t]
    if excluded.any():
        excl_ok = ~(state.rack_tenant[:, excluded].sum(axis=1) > 0)
    else:
        excl_ok = np.ones(n_racks, dtype=bool)
    others = _others(state, t)
    iso_ok = np.ones(n_racks, dtype=bool)
    if state.dedicated_rack[t]:
        iso_ok &= state.rack_tenant[:, others].sum(axis=1) == 0
    ded_rack = state.dedicated_rack & others
    if ded_rack.any():
        iso_ok &= state.rack_tenant[:, ded_rack].sum(axis=1) == 0
    return excl_ok, iso_ok


def isolation_node_mask(state: ClusterState, t: int, nodes: np.ndarray | None = None
                        ) -> np.ndarray:
    """Per node (of `nodes`, None: all), no isolation rule of a node (its own
    dedicated_node, another's) against tenant t there: a function of the node's own
    occupancy, which its stamp covers."""
    held = state.node_tenant if nodes is None else state.node_tenant[nodes]
    others = _others(state, t)
    iso_ok = np.ones(len(held), dtype=bool)
    if state.dedicated_node[t]:
        iso_ok &= held[:, others].sum(axis=1) == 0
    ded_node = state.dedicated_node & others
    if ded_node.any():
        iso_ok &= held[:, ded_node].sum(axis=1) == 0
    return iso_ok


def _others(state: ClusterState, t: int) -> np.ndarray:
    others = np.ones(len(state.topo.tenant_ids), dtype=bool)
    others[t] = False
    return others


def spread_mask(state: ClusterState, d: int, replica: int | None = None) -> np.ndarray | None:
    """Nodes whose spread domain still has room for one more replica (None: no rule). With
    `replica`, for more shards of that replica of d, placed in part: the domains its shards
    touch already are counted without it (it touches them once however many shards it adds
    there), so a gang that lost shards is made whole beside its own survivors."""
    dep = state.deps[d]
    if dep.spread is None:
        return None
    counts = state.spread_count[d]
    dom = state.topo.domain_of(dep.spread.domain)
    own = state.replicas.get((d, replica)) if replica is not None else None
    if own:
        counts = counts.copy()
        counts[sorted({int(dom[at.node]) for at in own.values()})] -= 1
    return (counts < dep.spread.max_per_domain)[dom]


def group_spread_mask(state: ClusterState, d: int) -> np.ndarray | None:
    """Nodes whose spread domain has room for one more replica of d with the replicas of its
    spread group counted too (`ClusterState.group_spread_count`; None: nothing more to count
    than `spread_mask` does). Not a filter: the placer prefers these nodes (`Placer`)."""
    counts = state.group_spread_count(d)
    if counts is None:
        return None
    sp = state.deps[d].spread
    assert sp is not None
    return (counts < sp.max_per_domain)[state.topo.domain_of(sp.domain)]


def gang_capacity(state: ClusterState, d: int, slots: np.ndarray, level: str,
                  unpowered: Collection[str] = ()) -> np.ndarray:
    """Shards of deployment d each `level` domain can take at once, within rack/row power (but
    the budgets of the levels in `unpowered`: what a domain would take without them)."""
    topo = state.topo
    power = state.deps[d].shard.shard_power_w
    n_racks, n_rows = len(topo.rack_ids), len(topo.row_ids)
    if level == "node":
        return slots
    rack_sum = np.bincount(topo.node_rack, weights=slots, minlength=n_racks).astype(np.int64)
    rack_pow = np.full(n_racks, BIG, dtype=np.int64)
    row_pow = np.full(n_rows, BIG, dtype=np.int64)
    if power > 0 and "rack" not in unpowered:
        rack_pow = power_slots(state.rack_headroom(), power)
    if power > 0 and "row" not in unpowered:
        row_pow = power_slots(state.row_headroom(), power)
    if level == "rack":
        return np.minimum.reduce([rack_sum, rack_pow, row_pow[topo.rack_row]])
    rack_c = np.minimum(rack_sum, rack_pow)
    row_sum = np.bincount(topo.rack_row, weights=rack_c, minlength=n_rows).astype(np.int64)
    row_c = np.minimum(row_sum, row_pow)
    if level == "row":
        return row_c
    zone_c = np.bincount(topo.row_zone, weights=row_c,
                         minlength=len(topo.zone_ids)).astype(np.int64)
    if level == "zone":
        return zone_c
    return np.array([zone_c.sum()], dtype=np.int64)


# ---- tenant caps ------------------------------------------------------------------------

class TenantCap:
    """A rule over everything a tenant holds: how many more shards it allows."""

    code: str = ""

    def room(self, state: ClusterState, d: int) -> int | None:
        """Shards of d the cap still allows (None: the cap does not bear on d)."""
        raise NotImplementedError

    def detail(self, state: ClusterState, d: int, count: int) -> str:
        """Why `count` more shards of d do not fit under the cap."""
        raise NotImplementedError


class QuotaAccelerators(TenantCap):
    code = "QUOTA_ACCELERATORS"

    def room(self, state: ClusterState, d: int) -> int | None:
        milli = state.deps[d].shard.milli
        if milli <= 0:
            return None
        t = int(state.dep_tenant[d])
        left = state.topo.tenant_max_milli[t] - state.tenant_milli[t]
        return fits_within(left, milli)

    def detail(self, state: ClusterState, d: int, count: int) -> str:
        t = int(state.dep_tenant[d])
        topo = state.topo
        used, cap = state.tenant_milli[t] / 1000, topo.tenant_max_milli[t] / 1000
        need = count * state.deps[d].shard.milli / 1000
        return (f"tenant {topo.tenant_ids[t]} holds {used:g} accelerators + {need:g} needed > "
                f"{cap:g} max_accelerators")


class QuotaPower(TenantCap):
    code = "QUOTA_POWER"

    def room(self, state: ClusterState, d: int) -> int | None:
        power = state.deps[d].shard.shard_power_w
        if power <= 0:
            return None
        t = int(state.dep_tenant[d])
        left = state.topo.tenant_max_power[t] - state.tenant_power[t]
        return fits_within(left, power)

    def detail(self, state: ClusterState, d: int, count: int) -> str:
        t = int(state.dep_tenant[d])
        topo = state.topo
        need = count * state.deps[d].shard.shard_power_w
        return (f"tenant {topo.tenant_ids[t]} draws {watts(state.tenant_power[t])} + "
                f"{watts(need)} needed > {watts(topo.tenant_max_power[t])} max_power_w")


TENANT_CAPS: tuple[TenantCap, ...] = (QuotaAccelerators(), QuotaPower())


def quota_room(state: ClusterState, d: int) -> tuple[int, TenantCap | None]:
    """Shards of d the tenant's caps still allow, and the binding cap (the first on ties)."""
    room, binding = BIG, None
    for cap in TENANT_CAPS:
        r = cap.room(state, d)
        if r is not None and (binding is None or r < room):
            room, binding = r, cap
    return room, binding


# Every reason code a plan can carry, in the order a person reads them: the node filters', the
# tenant caps', a gang no locality domain fits, and a search the deadline cut short.
REASON_CODES: tuple[str, ...] = (NODE_CODES + tuple(c.code for c in TENANT_CAPS)
                                 + ("LOCALITY", "TIME_LIMIT"))
