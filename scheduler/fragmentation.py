"""How fragmented the cluster is, and how a placement changes that.

Measure (documented for the objective, the greedy and the benchmarks):

* **Node level — FGD.** Following Weng et al., "Beware of Fragmentation" (USENIX ATC'23), the
  fragmentation of a node w.r.t. a workload is the expected amount of free accelerator capacity
  (milli) that a task drawn from the workload could *not* use there: all of it when the task does
  not fit the node at all (not enough whole accelerators, CPU or memory, or a host-only task),
  otherwise the free milli of accelerators with less left than the task asks per accelerator.
  Unlike the paper we also count host memory (the Alibaba trace strands accelerators behind
  exhausted memory as often as behind CPU) and weight whole-accelerator shapes by 1 + their
  accelerator count (the paper's GpuResWeight idea).
  A single-node placement picks the node whose fragmentation grows least (the "gradient").
* **Node level — host balance.** FGD looks at one future task at a time, so it sees CPU and
  memory only when they fall below what a single task asks: a node can lose its CPU to many
  small tasks (host-only ones above all) while every step looks free, and its accelerators
  are stranded later. So each node also counts the free milli its free host resources cannot
  feed at the workload's own ratio (free milli beyond `cpu_free x milli-per-cpu`, likewise
  for memory, the larger of the two; ratios over the accelerator tasks seen), weighted by
  `BALANCE_WEIGHT`. On the openb `default` trace this takes online FGD from 5.00% to ~4.2%
  unallocated GPU at 100% arrived demand (seeds 42-51), see docs/benchmarks.md. The weight
  is 8 (it was 2): with no departures, milli the host cannot feed is lost for certain, while
  FGD's term is an expectation of at most the node's free milli, so the certain loss should
  dominate the choice. Over seeds 1-10 (weights 1 to 32 tried, none of 42-51) the online
  `default` run left 0.03-0.06 points less from 4 on, best at 8; on seeds 42-51, 3.823 ->
  3.788 % (docs/benchmarks.md, issue 9 part 9). `SCARCITY_WEIGHT` (the model-pressure term
  of the placer, the same unit: milli expected lost) moved with it, 1 -> 8: left at 1 next to
  a balance weight of 8, scarce models were spent freely (gpuspec33 +0.4-0.6 points).
  The workload is the distribution of arrivals seen so far in this solve (online decisions must
  not know later arrivals), falling back to the pending deployments themselves in batch.
* **Rack/row level — keep whole domains free.** Gangs are placed in the feasible domain that
  ends up with the least free capacity (best fit), so partially used racks fill first and whole
  racks (and their power headroom) stay free for the next big gang; inside a domain, nodes with
  the fewest free accelerators are filled first so whole nodes stay whole.

Why both: single-accelerator and fractional arrivals (the Alibaba trace) are hurt by stranded
slivers of accelerators, which FGD measures directly; 8- to 64-shard gangs are hurt by racks
that are partly free everywhere, which best fit on domains avoids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

import numpy as np

from scheduler.model import ShardSpec
from scheduler.pairing import PairingValues, expected_packing, pairing_values
from scheduler.state import ClusterState

_HASH = np.random.default_rng(7).integers(1, 2**63, size=64, dtype=np.uint64) | np.uint64(1)
MAX_TYPES = 256  # most popular task shapes kept in the workload model (FGD's "typical pods")
BALANCE_WEIGHT = 8.0  # host-balance term per unfed milli, next to FGD's expected milli
SCARCITY_WEIGHT = 8.0  # model-pressure term per milli taken from a contested model (= BALANCE_WEIGHT)
STATE_PRICE_EVERY = 32  # arrivals seen between two pricings of the cluster as it stands
DEDUP_FROM = 32  # rows from which `node_fragmentation` scores identical nodes once


class Workload:
    """Popularity of task shapes (accelerators, milli per accelerator, cpu) seen so far.

    Scores use a frozen snapshot (`arrays`) that changes only on `refresh()`, so that cached
    "before" fragmentation and freshly computed "after" fragmentation always use one
    distribution; mixing two makes the gradient meaningless.
    """

    def __init__(self) -> None:
        self.counts: Counter[tuple] = Counter()
        self.version = 0  # bumped by refresh()
        self._snapshot: tuple[np.ndarray, ...] | None = None
        self._seen_at_refresh = 0
        self.host_ratios: tuple[float, float] | None = None  # milli per cpu milli, per MiB
        self.node_model: np.ndarray | None = None  # per node, index into model_names
        self.model_names: tuple[str | None, ...] = ()
        self.allowed: np.ndarray | None = None  # (types, models): type may run on model
        # Model-restricted shapes: their share of the demand and the models they accept
        # (rows of `allowed`), for `model_pressure`; empty when no shape is restricted.
        self.restricted_share = np.zeros(0)
        self.restricted_models = np.zeros((0, 0), dtype=bool)
        self._pairing: PairingValues | None = None
        self._pairing_key: tuple[int, int, int] | None = None
        self._thresholds: tuple[tuple[np.ndarray, ...], np.ndarray, np.ndarray] | None = None
        self._keys: tuple = ()  # the snapshot's model restrictions, per shape
        self._models_bound = False  # `bind_models` since the last snapshot

    def bind_models(self, node_models: tuple[str | None, ...]) -> None:
        """Learn the cluster's accelerator models, so shapes restricted to some models
        (`accelerator_models`) count as not fitting elsewhere, as in FGD."""
        self.model_names = tuple(dict.fromkeys(node_models))
        index = {m: i for i, m in enumerate(self.model_names)}
        self.node_model = np.array([index[m] for m in node_models], dtype=np.int64)
        self._models_bound = True

    def observe(self, spec: ShardSpec, weight: int = 1) -> None:
        """Count one arrival; whole-accelerator tasks count 1 + accelerators times (like
        FGD's GpuResWeight): stranding a slot an 8-accelerator task needs costs more."""
        milli = spec.accelerator_milli if spec.fractional else (1000 if spec.accelerators else 0)
        bonus = 0 if spec.fractional else spec.accelerators
        self.counts[(spec.accelerators, milli, spec.cpu_milli, spec.memory_mib,
                     spec.accelerator_models)] += weight * (1 + bonus)

    @property
    def seen(self) -> int:
        return sum(self.counts.values())

    def stale(self) -> bool:
        """Worth re-snapshotting: nothing yet, or 25% more arrivals since the last one."""
        seen = self.seen
        return self._snapshot is None or seen > self._seen_at_refresh * 1.25 + 8

    def refresh(self) -> None:
        """Take a new snapshot of the shapes seen. The version (what the placer's score
        tables are valid for) moves only when the snapshot does: arrivals of the shapes in
        the same proportions as before (a stream of one shape, say) keep every score."""
        top = self.counts.most_common(MAX_TYPES)
        total = sum(c for _, c in top) or 1
        snapshot = (np.array([k[0] for k, _ in top], dtype=np.int64),
                    np.array([k[1] for k, _ in top], dtype=np.int64),
                    np.array([k[2] for k, _ in top], dtype=float),
                    np.array([k[3] for k, _ in top], dtype=float),
                    np.array([c / total for _, c in top], dtype=float))
        allowed = None
        restricted_share = np.zeros(0)
        restricted_models = np.zeros((0, len(self.model_names)), dtype=bool)
        if self.node_model is not None and any(k[4] is not None for k, _ in top):
            allowed = np.array([[k[4] is None or (m is not None and m in k[4])
                                 for m in self.model_names] for k, _ in top], dtype=bool)
            # Demand (milli per arrival) per shape, undoing observe()'s whole-task weight.
            demand = np.array([c * max(k[0], 1) * k[1] / (1 + (k[0] if k[1] >= 1000 else 0))
                               for k, c in top], dtype=float)
            restricted = np.array([k[4] is not None for k, _ in top]) & (demand > 0)
            if demand.sum() > 0 and restricted.any():
                restricted_share = demand[restricted] / demand.sum()
                restricted_models = allowed[restricted]
        self._seen_at_refresh = self.seen
        keys = tuple(k[4] for k, _ in top)  # model restrictions: `allowed` follows them
        if self._snapshot is not None and not self._models_bound and keys == self._keys and \
                all(np.array_equal(a, b) for a, b in zip(snapshot, self._snapshot)) and \
                np.array_equal(restricted_share, self.restricted_share):
            return  # the same snapshot: everything scored from it stands
        self._snapshot, self._keys, self._models_bound = snapshot, keys, False
        self.host_ratios = _host_ratios(*snapshot)
        self.allowed = allowed
        self.restricted_share = restricted_share
        self.restricted_models = restricted_models
        self.version += 1

    def pairing(self, accelerators: int,
                used: Callable[[], Mapping[int, int]] | None = None) -> PairingValues | None:
        """Prices of free room per accelerator (`pairing.py`) for this snapshot's demand on a
        cluster of `accelerators`; computed once per snapshot. With `used` (the cluster's
        accelerators with room, per milli used: `pairing_values`), priced on the cluster as
        it stands, again every `STATE_PRICE_EVERY` arrivals seen."""
        epoch = -1 if used is None else self.seen // STATE_PRICE_EVERY
        key = (self.version, accelerators, epoch)
        if self._pairing_key != key:
            self._pairing = pairing_values(self.demand(), accelerators,
                                           None if used is None else used())
            self._pairing_key = key
        return self._pairing

    def expected_packing(self, accelerators: int, used: Mapping[int, int]) -> float | None:
        """Milli of this snapshot's demand the cluster as it stands (`used`, as for
        `pairing`) can still take (`pairing.expected_packing`); not cached."""
        return expected_packing(self.demand(), accelerators, used)

    def demand(self) -> list[tuple[int, float]]:
        """(milli per accelerator, share of the milli asked) per accelerator shape of the
        snapshot, undoing observe()'s whole-task weight (`pairing.py`'s demand)."""
        gpus, milli, *_, prob = self.arrays()
        asked = prob * np.maximum(gpus, 1) * milli / (1 + np.where(milli >= 1000, gpus, 0))
        return [(int(m), float(x)) for m, g, x in zip(milli, gpus, asked) if g > 0]

    def thresholds(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct milli per accelerator of the typical shapes, and each shape's index
        into them (`node_fragmentation`), once per snapshot."""
        snapshot = self.arrays()
        if self._thresholds is None or self._thresholds[0] is not snapshot:
            self._thresholds = (snapshot, *np.unique(snapshot[1], return_inverse=True))
        return self._thresholds[1], self._thresholds[2]

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(gpus, milli per gpu, cpu, memory, probability) of the typical shapes."""
        if self._snapshot is None:
            self.refresh()
        assert self._snapshot is not None
        return self._snapshot


def model_pressure(workload: Workload, free_by_model: np.ndarray) -> np.ndarray | None:
    """Per accelerator model, the share of its free milli that model-restricted demand will
    want if the cluster fills up (capped at 1): what taking one milli of it is expected to
    displace. None when no shape seen is restricted to models.

    A restricted shape asks `share` of all demand; of the cluster's free milli F, it will want
    share x F, spread over the models it accepts in proportion to their free milli, so model m
    gets share x F x free_m / sum(free of its models) and the pressure on m is
    sum over shapes of share x F / sum(free of the shape's models). Shapes that run anywhere
    put no pressure on any model: they are what should go where the pressure is low.
    """
    if workload.restricted_share.size == 0:
        return None
    total = float(free_by_model.sum())
    if total <= 0:
        return np.zeros(free_by_model.shape)
    reachable = workload.restricted_models @ free_by_model                 # (K,)
    per_shape = np.where(reachable > 0, workload.restricted_share * total
                         / np.maximum(reachable, 1e-9), 0.0)
    return np.minimum(per_shape @ workload.restricted_models, 1.0)      # (models,)


def node_fragmentation(free: np.ndarray, cpu_free: np.ndarray, mem_free: np.ndarray,
                       workload: Workload, nodes: np.ndarray | None = None) -> np.ndarray:
    """Expected unusable free milli per node. free: (N, A) usable milli per accelerator;
    nodes: the node index of each row (for model-restricted shapes; None: all nodes)."""
    gpus, milli, cpu, mem, prob = workload.arrays()
    if len(prob) == 0 or free.shape[0] == 0:
        return np.zeros(free.shape[0])
    allowed = workload.allowed
    model = None
    if allowed is not None and workload.node_model is not None:
        model = workload.node_model if nodes is None else workload.node_model[nodes]
    # Identical nodes (same free accelerators, CPU, memory, model) are scored once.
    # (a 64-bit hash of the sorted row; a collision would only blur one score). A few rows
    # are scored as they come: finding the duplicates would cost more than it saves.
    host = np.minimum(np.stack([cpu_free, mem_free], axis=1), 2**53)
    extra = [host] if model is None else [host, model[:, None]]
    rows = np.concatenate([np.sort(free, axis=1), *extra], axis=1)
    back: np.ndarray | None = None
    if len(rows) > DEDUP_FROM:
        keys = (rows.astype(np.int64).astype(np.uint64) * _HASH[:rows.shape[1]]).sum(axis=1)
        _, first, back = np.unique(keys, return_index=True, return_inverse=True)
        rows = rows[first]
    a = free.shape[1]
    free_u, cpu_u, mem_u = rows[:, :a], rows[:, a], rows[:, a + 1]
    total = free_u.sum(axis=1)                                               # (U,)
    # Per distinct milli threshold: accelerators with enough room, and milli stranded below.
    thresholds, which = workload.thresholds()
    enough = free_u[:, :, None] >= thresholds[None, None, :]                 # (U, A, M)
    usable = enough.sum(axis=1)[:, which]                                    # (U, K)
    stranded = np.where(enough, 0, free_u[:, :, None]).sum(axis=1)[:, which]  # (U, K)
    fits = (usable >= np.maximum(gpus, 1)[None, :]) & (cpu_u[:, None] >= cpu[None, :]) & \
        (mem_u[:, None] >= mem[None, :]) & (gpus[None, :] > 0)
    if model is not None:
        fits &= allowed.T[rows[:, a + 2].astype(np.int64)]                    # (U, K)
    # Summed row by row (not a BLAS matrix-vector product, whose rounding depends on where a
    # row sits in the batch): a node's score is a function of its state alone, so a cached
    # score and a fresh one agree to the bit, however many nodes were scored together.
    frag = (np.where(fits, stranded, total[:, None]) * prob).sum(axis=1)      # (U,)
    if workload.host_ratios is not None and BALANCE_WEIGHT > 0:
        per_cpu, per_mib = workload.host_ratios
        unfed = np.maximum(total - np.minimum(cpu_u, 1e12) * per_cpu,
                           total - np.minimum(mem_u, 1e12) * per_mib)
        frag = frag + BALANCE_WEIGHT * np.maximum(unfed, 0.0)
    return frag if back is None else frag[back.reshape(-1)]


def _host_ratios(gpus: np.ndarray, milli: np.ndarray, cpu: np.ndarray, mem: np.ndarray,
                 prob: np.ndarray) -> tuple[float, float] | None:
    """Accelerator milli the workload asks per cpu milli and per MiB (accelerator tasks only);
    None when it has no accelerator tasks or asks no host resources."""
    acc = gpus > 0
    demand = float((np.maximum(gpus, 1) * milli * prob)[acc].sum())
    cpu_demand = float((cpu * prob)[acc].sum())
    mem_demand = float((mem * prob)[acc].sum())
    if demand <= 0 or (cpu_demand <= 0 and mem_demand <= 0):
        return None
    big = 1e12  # a resource the workload does not ask for never binds
    return (demand / cpu_demand if cpu_demand > 0 else big,
            demand / mem_demand if mem_demand > 0 else big)
