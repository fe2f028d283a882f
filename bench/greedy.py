"""A simple best-fit greedy placer, the yardstick the solver is benchmarked against.

Written independently of `scheduler/` (it reads the interchange-format problem document, never
the solver's types) so a comparison with it means something. One replica at a time, in the
listed order: filter the nodes the tenant may use, group them by the replica's locality domain,
try the fullest domains that can still hold the whole gang, and fill the fullest nodes first
("best fit": least free accelerator capacity left). It honours every hard rule of the spec except
`spread` (the benchmark workloads do not use it), never moves or preempts, and has no
fragmentation objective. Also usable as a random-fit baseline (`policy="random"`).

Two best fits: `bestfit` ranks nodes by free accelerator milli (then free CPU), `bestfit-frac`
by the *fraction* of the node's accelerators plus the fraction of its CPU left free (the plain
best fit the FGD tables compare with; on model-constrained workloads it is the stronger one,
because small nodes of rare models are not "fuller" than big ones by absolute milli).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Doc = dict[str, Any]
Policy = Literal["bestfit", "bestfit-frac", "random"]
MAX_DOMAINS_TRIED = 8  # fullest-first domains tried per gang before giving up
INF = float("inf")


@dataclass
class GreedyResult:
    placements: list[Doc]
    unplaced: dict[str, int] = field(default_factory=dict)  # deployment -> replicas


def _cap(value: Any) -> float:
    return INF if value is None else float(value)


class BestFitGreedy:
    """Mutable cluster state plus the best-fit rule; `place(deployment)` decides one arrival."""

    def __init__(self, problem: Doc, policy: Policy = "bestfit", seed: int = 0) -> None:
        self.policy = policy
        self.rng = random.Random(seed)
        nodes = problem["nodes"]
        self.node_ids = [n["id"] for n in nodes]
        self.node_index = {nid: i for i, nid in enumerate(self.node_ids)}
        self.n = len(nodes)
        racks = {r["id"]: i for i, r in enumerate(problem.get("racks", []))}
        for n in nodes:  # racks may be implicit
            racks.setdefault(n["rack"], len(racks))
        rack_docs = {r["id"]: r for r in problem.get("racks", [])}
        rows = {w["id"]: i for i, w in enumerate(problem.get("rows", []))}
        row_docs = {w["id"]: w for w in problem.get("rows", [])}
        zones = {z["id"]: i for i, z in enumerate(problem.get("zones", []))}
        rack_row = {rid: rack_docs.get(rid, {}).get("row") for rid in racks}
        for w in rack_row.values():
            if w is not None:
                rows.setdefault(w, len(rows))
        for w in rows:
            zones.setdefault(row_docs.get(w, {}).get("zone", "?"), len(zones))
        self.zone_names = list(zones)
        self.rack_of = np.array([racks[n["rack"]] for n in nodes], dtype=np.int64)
        row_idx = [rows.get(rack_row[n["rack"]], -1) for n in nodes]
        self.row_of = np.array(row_idx, dtype=np.int64)
        self.zone_of = np.array([zones.get(row_docs.get(rack_row[n["rack"]], {}).get("zone", "?"),
                                           -1) for n in nodes], dtype=np.int64)
        self.n_racks, self.n_rows = len(racks), max(len(rows), 1)
        self.ready = np.array([n.get("state", "ready") == "ready" for n in nodes])
        self.models = [n.get("accelerator_model") for n in nodes]
        self.acc = np.array([n["accelerators"] for n in nodes], dtype=np.int64)
        amax = int(self.acc.max()) if self.n else 0
        exists = np.arange(max(amax, 1))[None, :] < self.acc[:, None]
        self.free_milli = np.where(exists, 1000, -1).astype(np.int64)  # -1: no such index
        self.acc_tenant = np.full(self.free_milli.shape, -1, dtype=np.int64)
        self.hbm_cap = np.array([_cap(n.get("hbm_gib")) for n in nodes])
        self.hbm_used = np.zeros(self.free_milli.shape)
        self.cpu_free = np.array([_cap(n.get("cpu_milli")) for n in nodes])
        self.cpu_cap = self.cpu_free.copy()
        self.mem_free = np.array([_cap(n.get("memory_mib")) for n in nodes])
        idle = np.array([0.0 if n.get("state", "ready") == "down" else n.get("idle_power_w", 0)
                         for n in nodes])
        self.rack_budget = np.full(self.n_racks, INF)
        for rid, i in racks.items():
            self.rack_budget[i] = _cap(rack_docs.get(rid, {}).get("power_budget_w"))
        self.row_budget = np.full(self.n_rows, INF)
        for wid, i in rows.items():
            self.row_budget[i] = _cap(row_docs.get(wid, {}).get("power_budget_w"))
        self.rack_power = np.bincount(self.rack_of, weights=idle, minlength=self.n_racks)
        self.row_power = np.zeros(self.n_rows)
        has_row = self.row_of >= 0
        np.add.at(self.row_power, self.row_of[has_row], idle[has_row])

        tenant_docs = {t["id"]: t for t in problem.get("tenants", [])}
        for d in problem["deployments"]:
            tenant_docs.setdefault(d["tenant"], {"id": d["tenant"]})
        self.tenants = {t: i for i, t in enumerate(tenant_docs)}
        self.tenant_docs = list(tenant_docs.values())
        nt = len(self.tenants)
        self.excl = np.zeros((nt, nt), dtype=bool)  # symmetric
        for t in self.tenant_docs:
            for o in t.get("excludes", []):
                if o in self.tenants:
                    a, b = self.tenants[t["id"]], self.tenants[o]
                    self.excl[a, b] = self.excl[b, a] = True
        self.iso = [t.get("isolation", "shared") for t in self.tenant_docs]
        self.node_tenants = np.zeros((self.n, nt), dtype=np.int64)  # shard counts
        self.rack_tenants = np.zeros((self.n_racks, nt), dtype=np.int64)
        self.tenant_acc = np.zeros(nt)
        self.tenant_power = np.zeros(nt)
        self.deployments = {d["id"]: d for d in problem["deployments"]}
        self.placements: list[Doc] = []
        self.replicas_of: dict[str, int] = {}
        for p in problem.get("placements", []):
            self._apply(self.deployments[p["deployment"]], self.node_index[p["node"]],
                        list(p["accelerator_indices"]))
            self.placements.append(dict(p))
        for d, r in {(p["deployment"], p["replica"]) for p in self.placements}:
            self.replicas_of[d] = max(self.replicas_of.get(d, 0), r + 1)

    # ---- bookkeeping --------------------------------------------------------------------

    @staticmethod
    def _fractional(shard: Doc) -> bool:
        return shard["accelerators"] == 1 and shard.get("accelerator_milli", 1000) < 1000

    def _shard_power(self, shard: Doc) -> float:
        return shard.get("power_w", 0.0) * self._shard_acc(shard)

    def _shard_acc(self, shard: Doc) -> float:
        if self._fractional(shard):
            return shard["accelerator_milli"] / 1000.0
        return float(shard["accelerators"])

    def _apply(self, dep: Doc, node: int, indices: list[int]) -> None:
        shard, t = dep["shard"], self.tenants[dep["tenant"]]
        milli = shard.get("accelerator_milli", 1000) if self._fractional(shard) else 1000
        for i in indices:
            self.free_milli[node, i] -= milli
            self.acc_tenant[node, i] = t
            self.hbm_used[node, i] += shard.get("hbm_gib", 0)
        self.cpu_free[node] -= shard.get("cpu_milli", 0)
        self.mem_free[node] -= shard.get("memory_mib", 0)
        w = self._shard_power(shard)
        self.rack_power[self.rack_of[node]] += w
        if self.row_of[node] >= 0:
            self.row_power[self.row_of[node]] += w
        self.node_tenants[node, t] += 1
        self.rack_tenants[self.rack_of[node], t] += 1
        self.tenant_acc[t] += self._shard_acc(shard)
        self.tenant_power[t] += w

    # ---- filters ------------------------------------------------------------------------

    def _eligible(self, dep: Doc) -> np.ndarray:
        """Nodes one shard of `dep` may use, ignoring how much is free."""
        shard, t = dep["shard"], self.tenants[dep["tenant"]]
        ok = self.ready.copy()
        models = shard.get("accelerator_models")
        if models:
            ok &= np.array([m in models for m in self.models])
        zones = self.tenant_docs[t].get("zones")
        if zones is not None:
            allowed = [self.zone_names.index(z) for z in zones if z in self.zone_names]
            ok &= np.isin(self.zone_of, allowed)
        others_node = self.node_tenants.sum(axis=1) - self.node_tenants[:, t]
        others_rack = self.rack_tenants.sum(axis=1) - self.rack_tenants[:, t]
        if self.iso[t] == "dedicated_node":
            ok &= others_node == 0
        if self.iso[t] == "dedicated_rack":
            ok &= others_rack[self.rack_of] == 0
        for o, iso in enumerate(self.iso):  # nodes and racks held by someone else's dedication
            if o == t:
                continue
            if iso == "dedicated_node":
                ok &= self.node_tenants[:, o] == 0
            elif iso == "dedicated_rack":
                ok &= self.rack_tenants[self.rack_of, o] == 0
        if self.excl[t].any():
            ok &= ~(self.rack_tenants[:, self.excl[t]].sum(axis=1) > 0)[self.rack_of]
        return ok

    def _slots(self, dep: Doc) -> np.ndarray:
        """How many shards of `dep` each node can take now (accelerators, cpu, memory)."""
        shard, t = dep["shard"], self.tenants[dep["tenant"]]
        need = shard["accelerators"]
        if self._fractional(shard):
            fits = ((self.free_milli >= shard["accelerator_milli"])
                    & ((self.acc_tenant == -1) | (self.acc_tenant == t))
                    & (self.hbm_used + shard.get("hbm_gib", 0) <= self.hbm_cap[:, None]))
            slots = fits.sum(axis=1).astype(float)
        else:
            whole = (self.free_milli == 1000)
            if shard.get("hbm_gib", 0) > 0:
                whole &= (shard["hbm_gib"] <= self.hbm_cap)[:, None]
            slots = (whole.sum(axis=1) // need).astype(float) if need else np.full(self.n, INF)
        for have, want in ((self.cpu_free, shard.get("cpu_milli", 0)),
                           (self.mem_free, shard.get("memory_mib", 0))):
            if want:
                slots = np.minimum(slots, np.floor(have / want))
        return slots

    def _free_key(self) -> np.ndarray:
        """Per node, how free it is (best fit fills the least free first): free accelerator
        milli (`bestfit`), or the free share of its accelerators plus that of its CPU
        (`bestfit-frac`)."""
        free = np.maximum(self.free_milli, 0).sum(axis=1).astype(float)
        if self.policy != "bestfit-frac":
            return free
        acc_share = free / np.maximum(1000.0 * self.acc, 1.0)
        finite = np.isfinite(self.cpu_cap) & (self.cpu_cap > 0)
        cpu_share = np.where(finite, self.cpu_free / np.where(finite, self.cpu_cap, 1.0), 0.0)
        return acc_share + cpu_share

    # ---- the decision -------------------------------------------------------------------

    def place(self, dep: Doc) -> int:
        """Place as many replicas of `dep` as fit (min_replicas honoured); returns placed."""
        start = self.replicas_of.get(dep["id"], 0)
        placed: list[list[Doc]] = []
        for r in range(start, dep["replicas"]):
            shards = self._place_replica(dep, r)
            if shards is None:
                break
            placed.append(shards)
        if placed and start + len(placed) < dep.get("min_replicas", 1):
            for shards in placed:  # too few to run at all: give the capacity back
                self._undo(dep, shards)
            return 0
        for shards in placed:
            self.placements.extend(shards)
        self.replicas_of[dep["id"]] = start + len(placed)
        return len(placed)

    def _place_replica(self, dep: Doc, r: int) -> list[Doc] | None:
        shard, t = dep["shard"], self.tenants[dep["tenant"]]
        count = dep["shards_per_replica"]
        acc_need, w = self._shard_acc(shard) * count, self._shard_power(shard)
        tdoc = self.tenant_docs[t]
        if self.tenant_acc[t] + acc_need > _cap(tdoc.get("max_accelerators")) + 1e-9:
            return None
        if self.tenant_power[t] + w * count > _cap(tdoc.get("max_power_w")) + 1e-9:
            return None
        slots = np.where(self._eligible(dep), self._slots(dep), 0)
        if w > 0:  # a node cannot take more shards than its rack and row power allow
            room = np.minimum((self.rack_budget - self.rack_power)[self.rack_of],
                              np.where(self.row_of >= 0,
                                       (self.row_budget - self.row_power)[self.row_of], INF))
            slots = np.minimum(slots, np.floor(room / w + 1e-9))
        slots = np.maximum(slots, 0)
        level = dep.get("locality", "rack")
        domain = {"node": np.arange(self.n), "rack": self.rack_of, "row": self.row_of,
                  "zone": self.zone_of, "none": np.zeros(self.n, dtype=np.int64)}[level]
        capped = np.minimum(slots, count)
        total = np.bincount(domain, weights=capped, minlength=int(domain.max()) + 1)
        candidates = np.flatnonzero(total >= count)
        if candidates.size == 0:
            return None
        if self.policy == "random":
            order = list(candidates)
            self.rng.shuffle(order)
        else:  # fullest domain first: least free capacity
            free = np.bincount(domain, weights=self._free_key(), minlength=int(domain.max()) + 1)
            order = list(candidates[np.argsort(free[candidates], kind="stable")])
        for dom in order[:MAX_DOMAINS_TRIED]:
            got = self._fill(dep, r, np.flatnonzero((domain == dom) & (slots > 0)), slots, w)
            if got is not None:
                return got
        return None

    def _fill(self, dep: Doc, r: int, nodes: np.ndarray, slots: np.ndarray,
              w: float) -> list[Doc] | None:
        """Put the gang on `nodes`, fullest first, checking power as it goes; commit or None."""
        shard, count = dep["shard"], dep["shards_per_replica"]
        if self.policy == "random":
            nodes = nodes.copy()
            self.rng.shuffle(nodes)
        elif self.policy == "bestfit-frac":
            nodes = nodes[np.argsort(self._free_key()[nodes], kind="stable")]
        else:
            free = np.maximum(self.free_milli[nodes], 0).sum(axis=1)
            nodes = nodes[np.lexsort((self.cpu_free[nodes], free))]
        rack_add: dict[int, float] = {}
        row_add: dict[int, float] = {}
        plan: list[tuple[int, int]] = []  # (node, shards)
        left = count
        for node in nodes:
            take = int(min(slots[node], left))
            rk, rw = int(self.rack_of[node]), int(self.row_of[node])
            if w > 0:
                room = self.rack_budget[rk] - self.rack_power[rk] - rack_add.get(rk, 0)
                if rw >= 0:
                    room = min(room, self.row_budget[rw] - self.row_power[rw] - row_add.get(rw, 0))
                take = min(take, int(np.floor(room / w + 1e-9)))
            if take <= 0:
                continue
            plan.append((int(node), take))
            rack_add[rk] = rack_add.get(rk, 0) + take * w
            if rw >= 0:
                row_add[rw] = row_add.get(rw, 0) + take * w
            left -= take
            if left == 0:
                break
        if left:
            return None
        out: list[Doc] = []
        s = 0
        for node, take in plan:
            for _ in range(take):
                idx = self._indices(dep, node)
                if idx is None:  # a fraction slot count was optimistic: undo and give up
                    self._undo(dep, out)
                    return None
                self._apply(dep, node, idx)
                p: Doc = {"deployment": dep["id"], "replica": r, "shard": s,
                          "node": self.node_ids[node], "accelerator_indices": idx}
                if self._fractional(shard):
                    p["accelerator_milli"] = shard["accelerator_milli"]
                out.append(p)
                s += 1
        return out

    def _undo(self, dep: Doc, done: list[Doc]) -> None:
        shard, t = dep["shard"], self.tenants[dep["tenant"]]
        milli = shard.get("accelerator_milli", 1000) if self._fractional(shard) else 1000
        for p in done:
            node = self.node_index[p["node"]]
            for i in p["accelerator_indices"]:
                self.free_milli[node, i] += milli
                self.hbm_used[node, i] -= shard.get("hbm_gib", 0)
                if self.free_milli[node, i] == 1000:
                    self.acc_tenant[node, i] = -1
            self.cpu_free[node] += shard.get("cpu_milli", 0)
            self.mem_free[node] += shard.get("memory_mib", 0)
            w = self._shard_power(shard)
            self.rack_power[self.rack_of[node]] -= w
            if self.row_of[node] >= 0:
                self.row_power[self.row_of[node]] -= w
            self.node_tenants[node, t] -= 1
            self.rack_tenants[self.rack_of[node], t] -= 1
            self.tenant_acc[t] -= self._shard_acc(shard)
            self.tenant_power[t] -= w

    def _indices(self, dep: Doc, node: int) -> list[int] | None:
        shard, t = dep["shard"], self.tenants[dep["tenant"]]
        row = self.free_milli[node]
        if self._fractional(shard):
            fits = ((row >= shard["accelerator_milli"])
                    & ((self.acc_tenant[node] == -1) | (self.acc_tenant[node] == t))
                    & (self.hbm_used[node] + shard.get("hbm_gib", 0) <= self.hbm_cap[node]))
            cand = np.flatnonzero(fits)
            if cand.size == 0:
                return None
            return [int(cand[np.argmin(row[cand])])]  # best fit: the fullest accelerator
        free = np.flatnonzero(row == 1000)
        need = shard["accelerators"]
        return [int(i) for i in free[:need]] if free.size >= need else None

    def run(self, deployments: list[Doc]) -> GreedyResult:
        """Place each deployment in order (online, no departures)."""
        unplaced: dict[str, int] = {}
        for d in deployments:
            got = self.place(d)
            missing = d["replicas"] - self.replicas_of.get(d["id"], 0)
            if missing > 0:
                unplaced[d["id"]] = missing
            del got
        return GreedyResult(self.placements, unplaced)


def greedy_plan(problem: Doc, policy: Policy = "bestfit", seed: int = 0) -> Doc:
    """The greedy's answer as a plan document (online order of `problem["deployments"]`)."""
    g = BestFitGreedy(problem, policy, seed)
    result = g.run(problem["deployments"])
    return {"status": "feasible", "placements": result.placements,
            "unplaced": [{"deployment": d, "replicas": n, "reasons": [
                {"code": "CAPACITY", "message": f"best-fit greedy found no room for {n} "
                                                f"replica(s)"}]}
                for d, n in result.unplaced.items()],
            "preempted": [], "moved": [], "stats": {"solve_ms": 0}}
