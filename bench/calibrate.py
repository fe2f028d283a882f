"""How fast this host runs Python now: a fixed CPU workload timed before and after a benchmark run.

The same tree on the same machine has measured 1.3x more controller CPU for the same 2,435
deployments from one day to the next (docs/benchmarks.md, 2026-12-06 `host`), with no steal time
shown: the host's speed moves, and figures of different hours compare only beside a reading of
it. `calibrate` runs `workload` (the interpreter's own work of the kind a controller does:
small objects made and dropped, dict and list traffic, sorting, string formatting, JSON) a few
times on one thread and keeps the least thread CPU time one took: a slower host reads higher.
The workload never changes (`CHECKSUM` pins it), or readings of different days would not compare.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass

ROWS = 40_000
REPEATS = 5
CHECKSUM = 81480110  # what `workload` returns: a changed workload fails tests/bench/test_calibrate.py


def workload() -> int:
    """One fixed run of Python work; a checksum of what it computed."""
    rows = [{"id": i, "tenant": f"t{i % 37}", "node": f"rack-{i % 251}-n{i % 16}", "milli": (i * 7919) % 1000,
             "indices": [i % 4, (i + 1) % 4]} for i in range(ROWS)]
    by_tenant: dict[str, list[dict]] = {}
    for row in rows:
        by_tenant.setdefault(row["tenant"], []).append(row)
    total = 0
    for tenant, held in sorted(by_tenant.items()):
        held.sort(key=lambda r: (r["node"], -r["milli"]))
        total += sum(r["milli"] for r in held[:100]) + len(tenant)
    text = json.dumps(rows[: ROWS // 4], separators=(",", ":"))
    decoded = json.loads(text)
    total += len(text) + sum(len(r["indices"]) for r in decoded)
    labels = "".join(f"{r['tenant']}/{r['id']}:{r['milli']};" for r in rows[::7])
    return (total * 31 + sum(map(ord, labels[-4096:])) + len(labels)) % 2**31


@dataclass(frozen=True)
class Calibration:
    """The least thread CPU time one run of `workload` took, and the median, in ms."""

    best_ms: float
    median_ms: float


def calibrate(repeats: int = REPEATS) -> Calibration:
    """`workload` `repeats` times on this thread, timed by its CPU time (what other processes take
    of the core does not count; a slower core, a busier memory bus do). The cyclic collector is
    off meanwhile: the workload makes no cycles, and its allocations would otherwise set off
    collections that walk the calling process's own heap (a reading 1.7x as high in the bench's
    process as in a bare interpreter)."""
    took = []
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.thread_time()
            if workload() != CHECKSUM:
                raise AssertionError("the calibration workload computed another result: it is not the fixed one")
            took.append((time.thread_time() - start) * 1000)
    finally:
        if collecting:
            gc.enable()
    took.sort()
    return Calibration(round(took[0], 1), round(took[len(took) // 2], 1))
