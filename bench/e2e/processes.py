"""The processes a run starts and measures: the controller, the simnode fleets and py-spy as
`Process`es (their CPU seconds and peak RSS read from /proc), stopped together by `stop_all`, and
the machine's and this bench's own CPU. The other benches that start a controller and fleets
(`bench join`, `bench nodedeath`) use them too."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from bench import procfs
from bench.pgserver import LocalPostgres

GATEWAY_MODULE = "controller.gateway"  # the agent gateways' command line (their CPU is reported apart)


class Process:
    """A child process whose CPU time and peak memory are read from /proc."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self._log = log.open("w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, **(env or {})})

    def nicer(self, by: int) -> None:
        """Run this process `by` nicer than this one (a stand-in for other machines: simnode fleets)."""
        os.setpriority(os.PRIO_PROCESS, self.proc.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + by))

    def cpu_s(self) -> float:
        """CPU seconds of the process and of the children it started (the controller's decide
        process: running, or exited and reaped), so that CPU moved to a child still counts."""
        return procfs.tree_cpu_s(self.proc.pid)

    def children_cpu_s(self, named: str = "") -> float:
        """CPU seconds of the children it runs now (`named`: those whose command line holds it)."""
        return sum(procfs.ticks(fields) for _, fields in procfs.children(self.proc.pid, named)) / os.sysconf("SC_CLK_TCK")

    def children_peak_rss_mib(self, named: str) -> float:
        """The peak RSS of the children running now whose command line holds `named`, summed."""
        return sum(_peak_rss_mib(pid) for pid, _ in procfs.children(self.proc.pid, named))

    def peak_rss_mib(self) -> float:
        return _peak_rss_mib(self.proc.pid)

    def read_line(self, prefix: str, timeout_s: float) -> str:
        """The rest of the first stdout line starting with `prefix`."""
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}) before printing {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"{self.name} did not print {prefix!r} in {timeout_s:.0f} s")

    def stop(self, grace_s: float = 20.0, *, told: bool = False) -> int:
        """SIGTERM (unless `told`: sent already), `grace_s` to exit, then SIGKILL; its exit code."""
        if self.proc.poll() is None:
            if not told:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def stop_all(processes: list[Process], grace_s: float = 20.0) -> None:
    """Stop them all within one grace period: every one is told first, then each is waited for
    (one after the other, 32 fleets could take 32 grace periods), and not told again (a second
    SIGTERM: one that lands after a fleet's loop closed would kill it, exit -15)."""
    for process in processes:
        if process.proc.poll() is None:
            process.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.stop(max(0.0, deadline - time.monotonic()), told=True)


def confine_others(cpus: frozenset[int], db_server: LocalPostgres | None) -> None:
    """`--others-cpus`: the database server (its postmaster and the processes it runs) and this
    bench (its clients, and the fleets it starts from now on, which inherit it) kept on `cpus`;
    the controller, started before, and what it starts stay free. Called between the two; what
    could not be moved (another user's server without CAP_SYS_NICE) is `misplaced`'s to report."""
    if db_server is not None and (pid := db_server.postmaster_pid()) is not None:
        procfs.confine(pid, cpus, with_children=True)  # its later backends fork from the postmaster
    confine_self(cpus)


def confine_self(cpus: frozenset[int]) -> None:
    """This bench's threads (its clients) on `cpus`; what it starts from now on inherits them."""
    procfs.confine(os.getpid(), cpus, with_children=False)


def misplaced(cpus: frozenset[int], fleets: list[Process], db_server: LocalPostgres | None,
              controller: Process) -> list[str]:
    """What `confine_others` should have done and did not, as errors of the run: every fleet, the
    database server (its postmaster and the processes it runs) and this bench on `cpus`, the
    controller free to run elsewhere."""
    placed = [(f.name, f.proc.pid) for f in fleets] + [("this bench", os.getpid())]
    if db_server is not None and (pid := db_server.postmaster_pid()) is not None:
        placed += [("the database server", pid)] + [("a database server process", child)
                                                    for child, _ in procfs.children(pid)]
    errors = [f"{name} {pid} runs on CPUs {sorted(on)}, not {sorted(cpus)} (--others-cpus)"
              for name, pid in placed if (on := _cpus_of(pid)) is not None and on != cpus]
    if (on := _cpus_of(controller.proc.pid)) is not None and on <= cpus:
        errors.append(f"the controller is held to {sorted(cpus)} with the others (--others-cpus)")
    return errors


def _cpus_of(pid: int) -> set[int] | None:
    """The CPUs `pid` may run on (None: it exited)."""
    try:
        return os.sched_getaffinity(pid)
    except ProcessLookupError:
        return None


def machine_cpu_s() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine since boot, every core summed (/proc/stat's
    first line; idle and iowait are not busy): what is left of the machine for the controller."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return (total - fields[3] - fields[4]) / tick, total / tick


def own_cpu_s() -> float:
    """CPU seconds of this process (the bench's clients, watch and scrapes)."""
    t = os.times()
    return t.user + t.system


def _peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _profile(py_spy: str, controller: Process, root: Path) -> Process:
    return Process("py-spy", [py_spy, "record", "--pid", str(controller.proc.pid), "--format", "raw",
                              "--rate", "50", "--nonblocking", "--output", str(root / "controller.pyspy.txt")],
                   root / "py-spy.log")


def run_until_interrupted(run: Coroutine[Any, Any, int]) -> int:
    """A bench's run to its exit code; interrupted (Ctrl-C), 130 once everything it started was
    stopped (its own `finally`s stop its processes as the run is cancelled)."""
    try:
        return asyncio.run(run)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("stopped: everything this run started has been stopped", file=sys.stderr)
        return 130
