"""The controller's gateway processes: started with it, stopped with it.

`GatewayProcesses.start` binds the controller's end of the links (a unix socket in a directory of
its own, mode 0700: only the controller's user can reach it; `linkdir`, which also removes those
of controllers killed before they could) and starts N gateway processes
(`python -m controller.gateway`) on the same agent address: the first one's port is the others'
(SO_REUSEPORT: the kernel spreads the agents' connections over them). A gateway that exits is
logged and started again after `restart_after_s` on the same address (its agents' streams ended:
their nodes are suspect, and they reconnect to the other gateways or to it); one that fails to
start is tried again after twice the last wait, up to `RESTART_BACKOFF_MAX_S` (a gateway that
cannot start, its port taken or its certificate gone, is not an interpreter started every second
on the controller's host). `stopping` (the controller's stop began) ends the restarts and sets
the gateways' deadline; `stop` sends SIGTERM and kills what is still there at the deadline. A
`start` that fails stops the gateways it started before the failure, whatever the failure.

A gateway that hangs (alive, answering nothing) does not exit: the links' keepalive pings
(the note under `frames.LINK_OPTIONS`: the controller's `agent_keepalive`, given to each gateway as
`--keepalive`), or for one whose event loop is stuck while its gRPC core still answers those, the
relay's own pings (`frames.link_ping_times`), end its link, and the relay tells `link_lost`; a
gateway whose link was lost exits on its own, so one still there `stop_grace_s` later (the time it
is given to end its agents' calls) is killed, and its watcher starts it again as one that exited.

The deadline grows with the agent streams the gateways hold (`stop_grace_s`): a gateway ends each
of its agents' calls with the controller's status (gRPC has no call for ending many at once, and
its own per-call work is most of the cost: ~80 us of CPU a stream, 0.7 s at 8,192 streams on a
quiet host, docs/benchmarks.md "a gateway's stop at many streams"); a fixed 5 s ran out at 16,384
streams on a loaded host, and the agents whose calls were not ended yet saw their connection reset
instead of the controller's goodbye. It counts from the start of the controller's stop, when the
gateways begin ending their calls (the statuses cross the link while the controller's servers
stop), and it is capped so that the controller's own stop stays within its shutdown deadline.

A gateway is given its settings as flags and only the part of the controller's environment that
the interpreter, the C library and gRPC core read (`gateway_environment`): not the controller's
own settings (`MAIA_DB_URL` and the password in it, `MAIA_TOKEN`) nor whatever else its host put
there (cloud credentials). It holds no credential and needs none.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from controller import limits
from controller.aio import in_own_thread
from controller.gateway.frames import keepalive_text
from controller.gateway.linkdir import LinkDirectory

log = logging.getLogger("maia.gateway")

READY_TIMEOUT_S = 30.0
# The gateways' stop deadline (module docstring): STOP_GRACE_S, plus STOP_GRACE_PER_STREAM_S a
# stream they hold (~12x the CPU a stream's end costs: a loaded host gives a niced gateway a small
# share of a core), at most STOP_GRACE_MAX_S after the controller's stop began (its shutdown
# deadline is 30 s: the lease's release and the database's disposal come after); a gateway is given
# at least STOP_AFTER_SIGTERM_S after its SIGTERM whatever the deadline.
STOP_GRACE_S = 5.0
STOP_GRACE_PER_STREAM_S = 0.001
STOP_GRACE_MAX_S = 20.0
# The grace of a gateway whose link was lost to unanswered relay pings (`link_lost(stuck=True)`):
# its event loop is known stuck, so it cannot end its agents' calls in any grace, and its gRPC core
# keeps their connections open (they go nowhere else) until it is killed. A second, for one that
# came unstuck just then to read the link's end and exit on its own.
STUCK_GRACE_S = 1.0
STOP_AFTER_SIGTERM_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
READY_PREFIX = "maia-gateway listening on "
# What a gateway takes of the controller's environment: the programs' path, the home directory
# (where the interpreter looks for a `pip install --user`'s packages), the locale and time zone,
# the temporary directory, the dynamic linker's libraries (an interpreter built with them
# elsewhere, a preloaded allocator), the C library's allocator settings, and the interpreter's
# (PYTHONPATH among them) and gRPC core's own settings.
INHERITED_VARIABLES = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "LD_PRELOAD",
                                 "GLIBC_TUNABLES"})
INHERITED_PREFIXES = ("LC_", "MALLOC_", "PYTHON", "GRPC_")


def stop_grace_s(streams: int) -> float:
    """How long gateways holding `streams` agent streams are given to stop, from the controller's
    stop's start."""
    return min(STOP_GRACE_MAX_S, STOP_GRACE_S + STOP_GRACE_PER_STREAM_S * max(0, streams))


def gateway_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of `environ` a gateway process is started with."""
    return {name: value for name, value in environ.items()
            if name in INHERITED_VARIABLES or name.startswith(INHERITED_PREFIXES)}


class GatewayStartError(OSError):
    """A gateway process did not start serving (it exited, or did not say so in time)."""


@dataclass(frozen=True)
class GatewaySettings:
    count: int
    listen: str  # HOST:PORT the agents connect to (port 0: the first gateway picks one)
    linger_ms: float
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_level: str = "INFO"
    restart_after_s: float = 1.0  # a gateway that exited is started again this long after
    keepalive: limits.Keepalive = limits.AGENT_KEEPALIVE  # the agents' and the links' pings (`--keepalive`)


class GatewayProcesses:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.link_directory = LinkDirectory()  # in the temporary directory ($TMPDIR)
        self.link_address = f"unix:{self.link_directory.socket}"
        self.address = ""
        self.processes: list[subprocess.Popen[str]] = []  # by index: the one running now (or the last one)
        self.restarts = 0
        self._watchers: list[asyncio.Task[None]] = []
        self._reapers: list[asyncio.Task[None]] = []  # `link_lost`'s, each waiting for a gateway to exit
        self._stopping = False
        self._stop_deadline: float | None = None  # time.monotonic() at which `stop` kills what is left

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    async def start(self) -> str:
        """Start the gateways (the link's socket must be served already); returns the agents' HOST:PORT.
        Whatever fails (a gateway that does not start, a process that cannot be created, a
        cancellation) stops those started before it (`stop`) and is raised: none is left running
        for a caller to know of."""
        listen = self.settings.listen
        try:
            for index in range(self.settings.count):
                process = self._spawn(index, listen)
                self.processes.append(process)
                self.address = await self._ready(process, index)
                listen = self.address  # the others share the first one's port
                self._watchers.append(asyncio.create_task(self._watch(index), name=f"gateway-{index}-watch"))
        except BaseException:
            await self.stop()
            raise
        return self.address

    def _spawn(self, index: int, listen: str) -> subprocess.Popen[str]:
        s = self.settings
        args = [sys.executable, "-m", "controller.gateway", "--listen", listen, "--link", self.link_address,
                "--name", f"gateway-{index}", "--linger-ms", str(s.linger_ms), "--log-level", s.log_level,
                "--keepalive", keepalive_text(s.keepalive)]
        if s.tls_cert is not None and s.tls_key is not None:
            args += ["--tls-cert", str(s.tls_cert), "--tls-key", str(s.tls_key)]
        # A session of its own: a terminal's ^C reaches the controller, which stops its gateways itself.
        return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, start_new_session=True,
                                env=gateway_environment(os.environ))

    @staticmethod
    async def _ready(process: subprocess.Popen[str], index: int) -> str:
        assert process.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                line = await in_own_thread(process.stdout.readline, name=f"gateway-{index}-ready")
        except TimeoutError:
            process.kill()
            raise GatewayStartError(f"agent gateway {index} did not start serving within {READY_TIMEOUT_S:.0f}s")
        if not line.startswith(READY_PREFIX):
            process.kill()
            raise GatewayStartError(f"agent gateway {index} exited before serving (code {process.wait()}); "
                                    f"see its log lines above")
        return line[len(READY_PREFIX):].strip()

    async def _watch(self, index: int) -> None:
        """Start gateway `index` again whenever it exits (until `stop`): after `restart_after_s`
        once it served, after twice the last wait (at most `RESTART_BACKOFF_MAX_S`) when it did not."""
        delay = self.settings.restart_after_s
        while True:
            process = self.processes[index]
            code = await in_own_thread(process.wait, name=f"gateway-{index}-watch")
            if self._stopping:
                return
            log.error("agent gateway %d (pid %d) exited with code %s; its agents' streams ended; starting it again "
                      "in %.1fs", index, process.pid, code, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                self.processes[index] = self._spawn(index, self.address)
                self.restarts += 1
                await self._ready(self.processes[index], index)
            except OSError as exc:  # GatewayStartError, or the process could not be created
                log.error("agent gateway %d did not start again: %s", index, exc)
                delay = min(max(delay, 0.1) * 2, RESTART_BACKOFF_MAX_S)
            else:
                delay = self.settings.restart_after_s

    def link_lost(self, pid: int | None, calls: int, stuck: bool = False) -> None:
        """The link of the gateway `pid` was lost while it held `calls` agent calls (the controller's
        stop did not end it). A gateway that lost its link exits on its own (`process.serve`), and
        its watcher starts it again; one that does not within `stop_grace_s(calls)` is hung (a
        process stopped, or stuck so that it no longer answers the link's keepalive pings) and is
        killed: its watcher then starts it again as one that exited. `stuck`: the link was lost to
        the relay's own pings left unanswered (its event loop is stuck): killed after
        `STUCK_GRACE_S`, whatever the calls it holds."""
        if self._stopping or pid is None:
            return
        for index, process in enumerate(self.processes):
            if process.pid == pid and process.poll() is None:
                self._reapers.append(asyncio.create_task(self._reap(index, process, STUCK_GRACE_S if stuck else stop_grace_s(calls)),
                                                         name=f"gateway-{index}-reap"))
                self._reapers = [reaper for reaper in self._reapers if not reaper.done()]
                return

    async def _reap(self, index: int, process: subprocess.Popen[str], grace: float) -> None:
        try:
            await in_own_thread(partial(process.wait, grace), name=f"gateway-{index}-reap")
        except subprocess.TimeoutExpired:
            if self._stopping:  # `stop` deals with it
                return
            log.error("agent gateway %d (pid %d) lost its link to the controller and did not exit within %.1fs: "
                      "hung; killed", index, process.pid, grace)
            process.kill()

    def stopping(self, streams: int = 0) -> None:
        """The controller began to stop, its gateways holding `streams` agent streams: a gateway that
        exits from now on is not started again (its link ends with the controller's servers; one
        started now would linger until `stop`), and `stop` kills what is left `stop_grace_s(streams)`
        from now (the first call sets it)."""
        self._stopping = True
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + stop_grace_s(streams)

    async def stop(self) -> None:
        """SIGTERM to every gateway; those still there at the deadline (`stopping`) are killed."""
        self.stopping()
        assert self._stop_deadline is not None
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        # One moment after the SIGTERMs (sent together) for them all, not one a gateway in turn: k
        # gateways stuck past the deadline would hold the stop k-1 s more.
        kill_at = max(self._stop_deadline, time.monotonic() + STOP_AFTER_SIGTERM_S)
        for process in self.processes:
            grace = max(kill_at - time.monotonic(), 0.0)
            try:
                await in_own_thread(partial(process.wait, grace), name="gateway-stop")
            except subprocess.TimeoutExpired:
                log.warning("agent gateway pid %d did not stop by its deadline (%.1fs more after the SIGTERMs); "
                            "killed", process.pid, grace)
                process.kill()
                await in_own_thread(process.wait, name="gateway-stop")
        tasks = (*self._watchers, *self._reapers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # none left pending once stopped
        self.link_directory.remove()
