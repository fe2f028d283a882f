"""How fragmented the cluster is, and how a placement changes that.

Measure (documented for the objective, the greedy and the benchmarks):

* **Node level — FGD.** Following Weng et al., "Beware of Fragmentation" (USENIX ATC'23), the
  fragmentation of a node w.r.t. a workload is the expected amount of free accelerator capacity
  (milli) that a task drawn from the workload could *not* use there: all of it when the task does
  not fit the node at all (not enough whole accelerators, CPU or memory, or a host-only task),
  otherwise the free milli of accelerators with less left than the task asks per accelerator.
  A single-node placement picks the node whose fragmentation grows least (the "gradient").
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

import numpy as np

from scheduler.model import ShardSpec
from scheduler.state import ClusterState

MAX_TYPES = 24  # most popular task shapes kept in the workload model (FGD's "typical pods")


class Workload:
    """Popularity of task shapes (accelerators, milli per accelerator, cpu) seen so far."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[int, int, int]] = Counter()
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def observe(self, spec: ShardSpec, weight: int = 1) -> None:
        milli = spec.accelerator_milli if spec.fractional else (1000 if spec.accelerators else 0)
        self.counts[(spec.accelerators, milli, spec.cpu_milli)] += weight
        self._cache = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(gpus, milli per gpu, cpu, probability) of the typical shapes."""
        if self._cache is None:
            top = self.counts.most_common(MAX_TYPES)
            total = sum(c for _, c in top) or 1
            self._cache = (np.array([k[0] for k, _ in top], dtype=np.int64),
                           np.array([k[1] for k, _ in top], dtype=np.int64),
                           np.array([k[2] for k, _ in top], dtype=float),
                           np.array([c / total for _, c in top], dtype=float))
        return self._cache


def node_fragmentation(free: np.ndarray, cpu_free: np.ndarray, workload: Workload
                       ) -> np.ndarray:
    """Expected unusable free milli per node. free: (N, A) usable milli per accelerator."""
    gpus, milli, cpu, prob = workload.arrays()
    if len(prob) == 0:
        return np.zeros(free.shape[0])
    total = free.sum(axis=1).astype(float)                                  # (N,)
    # (K, N, A): accelerator a of node n has room for task shape k.
    enough = free[None, :, :] >= milli[:, None, None]
    usable_accs = enough.sum(axis=2)                                        # (K, N)
    fits = (usable_accs >= np.maximum(gpus, 1)[:, None]) & \
        (cpu_free[None, :] >= cpu[:, None]) & (gpus[:, None] > 0)
    stranded = np.where(enough, 0, free[None, :, :]).sum(axis=2)            # (K, N)
    frag = np.where(fits, stranded, total[None, :])
    return prob @ frag
