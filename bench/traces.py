"""Reading the Alibaba GPU trace (openb) and the FGD paper's results, in place.

The traces live outside the repository (`MAIA_DATA_DIR`, default /work/shared/data); when they are
missing the benchmarks stop with `TraceMissing`, which names the file and the variable to set.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path("/work/shared/data")
TRACE_SUBDIR = "alibaba-gpu-v2023"
FGD_RESULTS = "fgd-expected-results/analysis_allo_discrete.csv"
GPU_NODE_LIST = "openb_node_list_gpu_node.csv"


class TraceMissing(FileNotFoundError):
    """A trace file the benchmark needs is not on this machine."""


@dataclass(frozen=True)
class TraceNode:
    name: str
    cpu_milli: int
    memory_mib: int
    gpus: int
    model: str | None


@dataclass(frozen=True)
class TracePod:
    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int  # per GPU; below 1000 only when num_gpu == 1
    gpu_spec: tuple[str, ...]  # allowed models, empty: any

    @property
    def gpu_request_milli(self) -> int:
        """GPU demand in milli-GPUs, what the FGD protocol sums to reach a share of capacity."""
        if self.num_gpu == 1:
            return self.gpu_milli
        return 1000 * self.num_gpu


def data_dir() -> Path:
    return Path(os.environ.get("MAIA_DATA_DIR", str(DEFAULT_DATA_DIR)))


def _require(path: Path) -> Path:
    if not path.is_file():
        raise TraceMissing(
            f"trace file {path} not found. The benchmarks read the shared traces in place; "
            f"set MAIA_DATA_DIR to the directory holding {TRACE_SUBDIR}/ and "
            f"fgd-expected-results/ (default {DEFAULT_DATA_DIR}).")
    return path


def trace_path(filename: str, root: Path | None = None) -> Path:
    return _require((root or data_dir()) / TRACE_SUBDIR / filename)


def load_nodes(path: Path) -> list[TraceNode]:
    with _require(path).open(newline="") as f:
        return [TraceNode(r["sn"], int(r["cpu_milli"]), int(r["memory_mib"]), int(r["gpu"]),
                          r["model"] or None) for r in csv.DictReader(f)]


def load_pods(path: Path) -> list[TracePod]:
    pods = []
    with _require(path).open(newline="") as f:
        for r in csv.DictReader(f):
            spec = tuple(s for s in (r.get("gpu_spec") or "").split("|") if s)
            num_gpu = int(r["num_gpu"])
            milli = int(r["gpu_milli"] or 0)
            pods.append(TracePod(r["name"], int(r["cpu_milli"]), int(r["memory_mib"]), num_gpu,
                                 milli if num_gpu == 1 else (1000 if num_gpu else 0), spec))
    return pods


def load_lifetimes(path: Path) -> list[tuple[int, int]]:
    """(creation_time, deletion_time) of each pod, in the order of `load_pods`."""
    with _require(path).open(newline="") as f:
        return [(int(r["creation_time"] or 0), int(r["deletion_time"] or 0))
                for r in csv.DictReader(f)]


def workload_file(workload: str) -> str:
    return f"openb_pod_list_{workload}.csv"


def paper_unallocated(workload: str, root: Path | None = None,
                      at: str = "100") -> dict[str, tuple[float, int]]:
    """Per policy of the paper: (mean unallocated GPU % at `at`% arrived demand, seeds)."""
    path = _require((root or data_dir()) / FGD_RESULTS)
    sums: dict[str, list[float]] = defaultdict(list)
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            if r["workload"] == f"openb_pod_list_{workload}":
                sums[r["sc_policy"]].append(100.0 - float(r[at]))
    return {p: (sum(v) / len(v), len(v)) for p, v in sorted(sums.items())}
