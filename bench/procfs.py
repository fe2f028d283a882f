"""CPU and parentage of processes, read from Linux's /proc (the benches' accounting)."""

from __future__ import annotations

import os
from pathlib import Path

# /proc/PID/stat's fields after the command name: state at 0, ppid at 1, utime 11, stime 12,
# cutime 13, cstime 14 (the children it has waited for).
PPID, UTIME, STIME, CUTIME, CSTIME = 1, 11, 12, 13, 14


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (the name may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int, named: str = "") -> list[tuple[int, list[str]]]:
    """(pid, stat fields) of the processes running now whose parent is `pid` (`named`: those whose
    command line holds it); one that exits while read is left out."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = stat_fields(int(entry.name))
                if int(fields[PPID]) != pid:
                    continue
                if named and named not in (entry / "cmdline").read_text(errors="replace"):
                    continue
            except (OSError, IndexError):
                continue
            found.append((int(entry.name), fields))
    return found


def ticks(fields: list[str]) -> int:
    """A process's own CPU (utime + stime), in clock ticks."""
    return int(fields[UTIME]) + int(fields[STIME])


def confine(pid: int, cpus: frozenset[int], *, with_children: bool) -> None:
    """Keep every thread of `pid` (and, `with_children`, of the processes it runs: the PostgreSQL
    postmaster's backends and writers) on `cpus`; what they start from now on inherits it. `pid`
    first, then its children as they are then: one forked in between inherits it. A process or
    thread that exits meanwhile, or that this one may not move (another user's, without
    CAP_SYS_NICE), is passed over: the caller checks where they run."""
    _confine_threads(pid, cpus)
    if with_children:
        for child, _ in children(pid):
            _confine_threads(child, cpus)


def _confine_threads(pid: int, cpus: frozenset[int]) -> None:
    try:
        tasks = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    except FileNotFoundError:
        return
    for task in tasks:
        try:
            os.sched_setaffinity(task, cpus)
        except (ProcessLookupError, PermissionError):
            pass


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of `pid`, of the children it has reaped and of those running now (one level):
    CPU moved to a child still counts, whether the child is alive or gone."""
    own = stat_fields(pid)
    total = ticks(own) + int(own[CUTIME]) + int(own[CSTIME])
    total += sum(ticks(fields) for _, fields in children(pid))
    return total / os.sysconf("SC_CLK_TCK")
