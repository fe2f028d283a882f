"""The controller's threads are named for operators (`controller.threads`): once `name_threads`
ran, each Python thread started carries its name to the operating system (/proc's `comm`, what
`top -H` and `ps -L` show), aiosqlite's connection threads and the loop's workers included, and
is not profiled after its first call. Run in a child process: the hook is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from controller.threads import OS_NAME_MAX, short_name

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")


def test_library_threads_get_short_names_others_keep_theirs() -> None:
    assert short_name("Thread-7 (_connection_worker_thread)") == "aiosqlite-7"
    assert short_name("Thread-1 (_poll_wrapper)") == "grpc-poller-1"
    assert short_name("Thread-3 (some_target)") == "Thread-3 (some_target)"
    assert short_name("reconciler") == "reconciler"


def test_threads_started_after_name_threads_carry_their_names_to_the_os() -> None:
    script = textwrap.dedent("""
        import asyncio, json, sys, threading
        import aiosqlite
        from controller.threads import name_threads

        def seen():
            tid = threading.get_native_id()
            with open(f"/proc/self/task/{tid}/comm") as comm:
                return {"python": threading.current_thread().name, "os": comm.read().strip(),
                        "profiled": sys.getprofile() is not None}

        name_threads()
        found = {}

        def own():
            found["own"] = seen()
        thread = threading.Thread(target=own, name="a-long-thread-name-of-ours")
        thread.start()
        thread.join()

        async def main():
            found["to_thread"] = await asyncio.to_thread(seen)
            async with aiosqlite.connect(":memory:") as db:
                await db.execute("SELECT 1")
                tid = db._thread.native_id
                with open(f"/proc/self/task/{tid}/comm") as comm:
                    found["aiosqlite"] = {"python": db._thread.name, "os": comm.read().strip()}
        asyncio.run(main())
        print(json.dumps(found))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["own"] == {"python": "a-long-thread-name-of-ours", "os": "a-long-thread-name-of-ours"[:OS_NAME_MAX],
                            "profiled": False}
    assert found["to_thread"]["python"].startswith("asyncio_") and found["to_thread"]["os"] == found["to_thread"]["python"]
    assert not found["to_thread"]["profiled"]
    assert found["aiosqlite"]["python"].startswith("aiosqlite-")
    assert found["aiosqlite"]["os"] == found["aiosqlite"]["python"]


def test_a_profile_hook_set_for_new_threads_before_is_kept() -> None:
    """A profiler of every thread (`threading.setprofile`) set before `name_threads` still sees
    the new threads' calls, which are named too."""
    script = textwrap.dedent("""
        import json, sys, threading
        from controller.threads import name_threads

        seen = []

        def theirs(frame, event, arg):
            seen.append((threading.current_thread().name, event, frame.f_code.co_name))

        threading.setprofile(theirs)
        name_threads()

        named = []

        def work():
            with open(f"/proc/self/task/{threading.get_native_id()}/comm") as comm:
                named.append(comm.read().strip())

        thread = threading.Thread(target=lambda: work(), name="worker-1")
        thread.start()
        thread.join()
        print(json.dumps({"named": named,
                          "seen": sorted({(name, event, code) for name, event, code in seen
                                          if code == "work" and event in ("call", "return")})}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["named"] == ["worker-1"]
    assert found["seen"] == [["worker-1", "call", "work"], ["worker-1", "return", "work"]]
