"""The controller's threads, named for operators: `top -H`, `/proc/<pid>/task/*/comm`, `ps -L`
and py-spy show which thread burns the CPU.

CPython names a thread only for itself (`threading.Thread.name`, which py-spy reads); the
operating system's name stays the process's (`maia-controller`) for every thread. The threads
the controller starts carry names of their own (`asyncio_<n>`: the loop's default executor,
which `asyncio.to_thread` uses; `OwnLoop`'s; the lease keeper's); `name_threads` gives every
Python thread started after it the OS name its Python name says, and a short name to the
libraries' threads that CPython names after their target (`Thread-7
(_connection_worker_thread)`: aiosqlite's connection threads, one a connection).
gRPC's own threads (`event_engine`, `grpc_global_tim`) name themselves.
"""

from __future__ import annotations

import re
import sys
import threading
from types import FrameType
from typing import Any

# Library threads CPython names "Thread-<n> (<target>)": the name they get instead, "<short>-<n>".
LIBRARY_THREADS = {
    "_connection_worker_thread": "aiosqlite",  # one per SQLite connection (aiosqlite.core)
    "_poll_wrapper": "grpc-poller",  # gRPC aio's completion-queue poller (grpc._cython)
    "serve_forever": "metrics-http",  # prometheus_client's /metrics server
}
OS_NAME_MAX = 15  # Linux's limit (TASK_COMM_LEN, less its NUL)
_DEFAULT_NAME = re.compile(r"Thread-(\d+) \((\w+)\)$")


def short_name(name: str) -> str:
    """The name a thread goes by: its own, or a library's thread's short one (`LIBRARY_THREADS`)."""
    match = _DEFAULT_NAME.match(name)
    if match is None or match.group(2) not in LIBRARY_THREADS:
        return name
    return f"{LIBRARY_THREADS[match.group(2)]}-{match.group(1)}"


def name_os_thread() -> None:
    """Name the calling thread (its Python name made short: `short_name`) and give the operating
    system the same name, cut to `OS_NAME_MAX` characters. Nothing where /proc has no such file."""
    thread = threading.current_thread()
    thread.name = short_name(thread.name)
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(thread.name[:OS_NAME_MAX])
    except OSError:
        pass


def name_threads() -> None:
    """Every Python thread started from now on names itself (`name_os_thread`) as it starts. A
    profile hook set for new threads before (`threading.setprofile`: a profiler of every thread,
    yappi's) is kept: each new thread hands it its first event and is profiled by it from then on."""
    theirs = threading.getprofile()

    def name_once(frame: FrameType, event: str, arg: Any) -> None:
        """A new thread's first profile event: name it, then leave the thread to the hook set
        before (none: not profiled, it costs nothing after)."""
        sys.setprofile(theirs)
        name_os_thread()
        if theirs is not None:
            theirs(frame, event, arg)

    threading.setprofile(name_once)

