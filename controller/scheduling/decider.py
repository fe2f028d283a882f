"""The warm session in a process of its own: the decide process and a proxy for its session.

The reconciler decides arrivals on a warm `scheduler.session.Session` (`cache.ClusterCache`) in
a worker thread. In the controller's interpreter that thread shares one GIL with the event loop
(asyncpg, the agent streams, the submits), and on a busy PostgreSQL controller it got 13-43 % of
its wall time on a CPU (docs/benchmarks.md, issue 8). `DecideProcess` keeps the session in a
long-lived child interpreter instead: the controller's thread sends it the calls and waits on a
pipe (which releases the GIL), the child computes on a core of its own.

Decisions are those of an in-process session: `RemoteSession` has the interface of the
`Session` methods the cache uses and forwards every call, in order, over one pipe (pickled
arguments and results), so the child's session sees exactly the sequence of calls an
in-process one would. Calls whose result is not needed (`release`, `adopt`, `replace`) are sent without
waiting (order is kept: one pipe, one reader); calls that need one wait for it. A session is
built in the child from the problem *document* (`DecideProcess.open`, with the controller's
`MAIA_*` environment of the moment, which the scheduler reads): parsing it is the child's CPU
too, as is parsing the arrivals' documents (`place_documents`). What the cache does as a loop of
calls per deployment goes as one message (`place_documents`, `held_placements`, `readopt`: the
child runs the same loop): each round trip costs the controller's thread a wait for the GIL.

Failures: a call whose child died, or that is not answered within `timeout_s` (plus the time
limit of each decision it may make: a batch of arrivals may take them all, as may the repairs of
an `apply` that takes nodes away, or of an `open` whose problem has shards on down nodes, which
the child counts and tells before it starts them), raises `DeciderFailed` (a hung child is
killed); so does an exception the session raised in the child (a later call reports one a
pipelined call raised, and nothing more is run on that session).
The reconciler then drops its cache, as for any exception of the session, and the next
`open` starts a fresh child when the last one is gone. The child exits when the controller
closes its end of the pipe (`close`, or the controller dying: the kernel closes it) or when
its parent is gone. It is started with `subprocess` (fork + exec of a fresh interpreter: never
a bare fork of a controller running gRPC and threads).

One owner drives it (the reconcile loop, which holds its lock): one call at a time; `close`
may come from another thread.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection, Pipe
from typing import TYPE_CHECKING, Any, Protocol

from scheduler import problem_from_dict
from scheduler.decisions import ClusterDelta, Decision
from scheduler.interchange import deployment_from_dict
from scheduler.model import Deployment, Nomination, Placement, Problem

if TYPE_CHECKING:
    from scheduler.session import Session

log = logging.getLogger(__name__)

# How long a call may wait for the child before it counts as hung (starting an interpreter and
# importing the solver takes seconds on a loaded machine; building a 16,384-node session a few).
DEFAULT_TIMEOUT_S = 120.0
# The most a call's decisions add to that (`DecideProcess.allowed_s`): a batch of hundreds of short
# deployments tried again would otherwise leave a hung child undetected for an hour.
WORK_MAX_S = 600.0
# The environment the scheduler reads (scheduler/solve.py: MAIA_SCORER), sent with each `open`:
# the child decides as the controller would with its environment at that moment.
_SCHEDULER_VARIABLES = "MAIA_"
# How often an idle child checks that its parent is still there.
_PARENT_CHECK_S = 2.0


# Why an `open` fails once the controller stopped the decider (`DecideProcess.stop`).
_STOPPED = "the decide process was stopped (the controller is stopping)"


class DeciderFailed(RuntimeError):
    """The decide process died, hung, or its session raised: the session is lost."""


class OpenSession(Protocol):
    """How the cache builds its session: `open_in_process` or `DecideProcess.open`."""

    def __call__(self, problem: dict[str, Any], *, time_limit_ms: int) -> Session | RemoteSession: ...


def open_in_process(problem: dict[str, Any], *, time_limit_ms: int,
                    repairing: Callable[[float], None] | None = None) -> Session:
    """A warm session of a problem document, in this interpreter (blocking). The solver is
    imported here, not with this module: the controller's sessions live in its decide process.
    `repairing` is told first how long the session's repairs at load may search, if it makes
    any (`Session.repairs_at_load`: one decision each, each up to the time limit)."""
    from scheduler.session import Session

    parsed = problem_from_dict(problem, validate=False)
    if repairing is not None:
        repairs = Session.repairs_at_load(parsed)
        if repairs:
            repairing(len(repairs) * time_limit_ms / 1000.0)
    return Session(parsed, time_limit_ms=time_limit_ms)


def place_documents(session: Session | RemoteSession, docs: Sequence[dict[str, Any]]) -> tuple[Decision, ...]:
    """`Session.place` of each deployment document, in order (blocking): in the decide process
    one round trip for them all, the documents parsed there."""
    if isinstance(session, RemoteSession):
        return session.place_documents(docs)
    return _place_documents(session, docs)


def _place_documents(session: Session, docs: Sequence[dict[str, Any]]) -> tuple[Decision, ...]:
    return tuple(session.place(deployment_from_dict(doc)) for doc in docs)


def held_placements(session: Session | RemoteSession, names: Iterable[str]) -> dict[str, tuple[Placement, ...]]:
    """`Session.placements_of` each deployment of `names` the session holds (blocking): in the
    decide process one round trip for them all."""
    if isinstance(session, RemoteSession):
        return session.held_placements(list(names))
    return _held_placements(session, list(names))


def _held_placements(session: Session, names: list[str]) -> dict[str, tuple[Placement, ...]]:
    return {name: session.placements_of(name) for name in names if name in session}


Adoption = tuple[Deployment, list[Placement]]


def readopt(session: Session | RemoteSession, adoptions: Sequence[Adoption]) -> None:
    """Each deployment's replicas released if the session holds it, then adopted where they are
    now (what `ClusterCache.follow` does after a commit it did not decide; blocking): to the
    decide process one message, sent without waiting."""
    if isinstance(session, RemoteSession):
        session.readopt(adoptions)
    else:
        _readopt(session, adoptions)


def _readopt(session: Session, adoptions: Sequence[Adoption]) -> None:
    for deployment, placements in adoptions:
        if deployment.id in session:
            session.release(deployment.id, session.placed_replicas(deployment.id))
        session.adopt(deployment, placements)


def release_held(session: Session | RemoteSession, names: Sequence[str]) -> None:
    """`Session.release` of each deployment of `names` the session holds (departures; blocking):
    to the decide process one message, sent without waiting."""
    if isinstance(session, RemoteSession):
        session.release_held(list(names))
    else:
        _release_held(session, names)


def _release_held(session: Session, names: Sequence[str]) -> None:
    for name in names:
        if name in session:
            session.release(name)


# What the child runs for the calls that stand for several session calls (one message each).
_COMPOUND = {"place_documents": _place_documents, "held_placements": _held_placements, "readopt": _readopt,
             "release_held": _release_held}


class _SendWatchdog:
    """Kills the child a send has waited on past its deadline (`arm`): one thread for all the
    sends, looking every `period_s` (a `threading.Timer` started a thread for every send, a few
    for each fast pass), started at the first send and ended by `close`."""

    def __init__(self, period_s: float) -> None:
        self._period_s = period_s
        self._armed: tuple[float, subprocess.Popen[bytes]] | None = None  # (deadline, the child)
        self._stop: threading.Event | None = None  # the watching thread's, while one runs

    def arm(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        self._armed = (time.monotonic() + timeout_s, proc)
        if self._stop is None:
            self._stop = threading.Event()
            threading.Thread(target=self._watch, args=(self._stop,), name="decide-send-watchdog", daemon=True).start()

    def disarm(self) -> None:
        self._armed = None

    def close(self) -> None:
        stop, self._stop, self._armed = self._stop, None, None
        if stop is not None:
            stop.set()

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self._period_s):
            armed = self._armed
            if armed is not None and time.monotonic() >= armed[0]:
                self._armed = None
                armed[1].kill()


class DecideProcess:
    """The long-lived child holding the warm session (one per controller). Sessions are built
    in it by `open`; a new one replaces the last (whose proxies then fail)."""

    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._watchdog = _SendWatchdog(min(1.0, timeout_s / 4))
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._token = 0        # the session the child holds now
        self._lock = threading.Lock()
        self._stopped = False  # `stop` was called: no child is started again
        self.starts = 0        # children started so far
        self.cpu_s = 0.0       # CPU the child spent in the calls answered so far (its own count)

    @property
    def pid(self) -> int | None:
        """The child's process id while one runs."""
        return None if self._proc is None or self._proc.poll() is not None else self._proc.pid

    def start(self) -> None:
        """Start the child now, if none runs (else `open` does): its interpreter and imports
        then overlap with what the caller does next. Does not wait for it."""
        with self._lock:
            self._start()

    def open(self, problem: dict[str, Any], *, time_limit_ms: int) -> RemoteSession:
        """A warm session of a problem document, built in the child (blocking: a worker
        thread); a fresh child if the last one is gone or failed. Building it repairs what the
        problem has on down nodes or failed accelerators, a decision per deployment: the child
        counts them before it builds (`Session.repairs_at_load`) and tells, and the call waits
        for them."""
        with self._lock:
            self._start()
            self._token += 1
            repaired = self._ask_locked(self._token, "open", (problem, time_limit_ms, _scheduler_environment()))
            return RemoteSession(self, self._token, repaired, time_limit_ms=time_limit_ms)

    def stop(self) -> None:
        """The controller's stop: `close`, and no child is started again. An `open` under way in
        a worker thread (the stop cancels the reconciler's task, not its thread) fails instead of
        starting a child after the stop, which outlived it at full CPU. Does not wait for the
        call under way (a call holds the lock for as long as the child takes)."""
        self._stopped = True
        self.close()

    def close(self) -> None:
        """Stop the child (its pipe closed: it exits; killed if it does not within a few
        seconds); the next `open` starts another. Safe to call twice, and from another thread
        than the calls'."""
        conn, proc = self._conn, self._proc
        self._conn, self._proc, self._ready = None, None, False
        self._watchdog.close()
        if conn is not None:
            conn.close()
        if proc is not None:
            _reap(proc, grace_s=5.0)

    # ---- calls ------------------------------------------------------------------------------

    def allowed_s(self, work_s: float) -> float:
        """How long a call may take before the child counts as hung: `timeout_s` plus `work_s`,
        the time its decisions may search (their time limits), at most `WORK_MAX_S` of that. A
        batch of arrivals, or the repairs of an `apply` or an `open`, that each searched to the
        limit, waited for `timeout_s` alone, had a working child killed and the session lost."""
        return self.timeout_s + min(work_s, WORK_MAX_S)

    def ask(self, token: int, method: str, args: tuple[Any, ...], *, work_s: float = 0.0) -> Any:
        """Call a session method in the child and wait for its result (`allowed_s(work_s)`, and
        more if the child tells of work it found the call makes: `apply`'s repairs, as `open`'s)."""
        with self._lock:
            return self._ask_locked(token, method, args, work_s)

    def tell(self, token: int, method: str, args: tuple[Any, ...]) -> None:
        """Call a session method in the child without waiting (a later `ask` reports its failure)."""
        with self._lock:
            self._send(token, method, args, reply=False)

    def _ask_locked(self, token: int, method: str, args: tuple[Any, ...], work_s: float = 0.0) -> Any:
        self._send(token, method, args, reply=True)
        conn = self._conn
        if conn is None:  # closed from another thread meanwhile
            raise DeciderFailed("the decide process was stopped during the call")
        if not self._ready:
            self._receive(conn, f"start (pid {self._proc.pid if self._proc else '?'})", time.monotonic(),
                          self.timeout_s)
            self._ready = True
        began = time.monotonic()
        kind, value, cpu_s = self._receive(conn, method, began, self.allowed_s(work_s))
        while kind == "work":  # the child found this much more (repairs): allowed from the start
            work_s += value
            kind, value, cpu_s = self._receive(conn, method, began, self.allowed_s(work_s))
        self.cpu_s += cpu_s
        if kind == "error":
            raise DeciderFailed(f"the session in the decide process raised in {method}: {value}")
        return value

    def _send(self, token: int, method: str, args: tuple[Any, ...], *, reply: bool) -> None:
        conn, proc = self._conn, self._proc  # read once: `close` may clear them from another thread
        if conn is None:
            raise DeciderFailed("the decide process is not running (stopped, or failed earlier)")
        # A child that takes nothing (hung, its pipe full) is killed after `timeout_s`, which
        # ends the send with a broken pipe: a call larger than the pipe holds blocked for good.
        if proc is not None:
            self._watchdog.arm(proc, self.timeout_s)
        try:
            conn.send((token, method, args, reply))
        except (OSError, EOFError) as exc:
            self._fail(f"the decide process is gone ({exc})")
        finally:
            self._watchdog.disarm()

    def _receive(self, conn: Connection, what: str, began: float, timeout_s: float) -> Any:
        try:
            if not conn.poll(max(0.0, began + timeout_s - time.monotonic())):
                self._fail(f"the decide process did not answer {what} within {timeout_s:.0f} s: killed")
            return conn.recv()
        except (OSError, EOFError) as exc:
            code = None if self._proc is None else self._proc.poll()
            self._fail(f"the decide process is gone during {what} (exit code {code}; {type(exc).__name__})")

    def _fail(self, why: str) -> None:
        log.error("%s", why)
        self.close()
        raise DeciderFailed(why)

    def _start(self) -> None:
        if self._stopped:
            raise DeciderFailed(_STOPPED)
        if self._proc is not None and self._proc.poll() is None and self._conn is not None:
            return
        self.close()  # a child that exited (crashed) is reaped first
        ours, theirs = Pipe(duplex=True)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "controller.scheduling.decider", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the child has its copy: a dead child is EOF on ours
        # Tokens go on from the last child's: a proxy of a session it held is no token of this one's.
        # Both set at once (`stop` may run on another thread now): then `_stopped` read after them.
        self._proc, self._conn, self._ready = proc, ours, False
        self.starts += 1
        log.info("decide process started (pid %d)", proc.pid)
        if self._stopped:  # `stop` ran while it started, and may have read no child to close
            self.close()
            raise DeciderFailed(_STOPPED)


class RemoteSession:
    """A session held by the decide process: the `Session` methods `ClusterCache` uses,
    forwarded in order. Blocking calls: run them in a worker thread, never on the event loop."""

    def __init__(self, process: DecideProcess, token: int, repaired_at_load: list[Decision], *,
                 time_limit_ms: int) -> None:
        self._process = process
        self._token = token
        self.repaired_at_load = repaired_at_load
        self._decision_s = time_limit_ms / 1000.0  # the most one decision may search for

    def place(self, deployment: Deployment | str) -> Decision:
        result: Decision = self._process.ask(self._token, "place", (deployment,), work_s=self._decision_s)
        return result

    def place_documents(self, docs: Sequence[dict[str, Any]]) -> tuple[Decision, ...]:
        """`place` of each deployment document in order, parsed in the child: one round trip."""
        result: tuple[Decision, ...] = self._process.ask(self._token, "place_documents", (list(docs),),
                                                         work_s=self._decision_s * len(docs))
        return result

    def held_placements(self, names: list[str]) -> dict[str, tuple[Placement, ...]]:
        """`placements_of` each of `names` the session holds: one round trip."""
        result: dict[str, tuple[Placement, ...]] = self._process.ask(self._token, "held_placements", (names,))
        return result

    def readopt(self, adoptions: Sequence[Adoption]) -> None:
        """`release` (if held) then `adopt` of each, in the child: one message, not waited for."""
        self._process.tell(self._token, "readopt", (list(adoptions),))

    def release(self, deployment: str, replicas: list[int] | None = None) -> None:
        self._process.tell(self._token, "release", (deployment, replicas))

    def release_held(self, names: list[str]) -> None:
        """`release` of each of `names` the session holds, in the child: one message, not waited for."""
        self._process.tell(self._token, "release_held", (names,))

    def adopt(self, deployment: Deployment, placements: Iterable[Placement]) -> None:
        self._process.tell(self._token, "adopt", (deployment, list(placements)))

    def replace(self, deployment: Deployment, placements: Iterable[Placement]) -> None:
        self._process.tell(self._token, "replace", (deployment, list(placements)))

    def apply(self, delta: ClusterDelta) -> list[Decision]:
        """`Session.apply`: the repairs of the deployments on nodes it takes away are decisions,
        each of which may search to the time limit. How many only the child knows
        (`Session.displaced_by`): it tells that before it repairs, and the call waits for them."""
        result: list[Decision] = self._process.ask(self._token, "apply", (delta,))
        return result

    def nominate(self, nominations: Iterable[Nomination]) -> None:
        self._process.tell(self._token, "nominate", (tuple(nominations),))

    def nominees(self, deployment: Deployment | str, zones_apart: bool = False) -> tuple[str, ...]:
        result: tuple[str, ...] = self._process.ask(self._token, "nominees", (deployment, zones_apart))
        return result

    def snapshot(self) -> Problem:
        result: Problem = self._process.ask(self._token, "snapshot", ())
        return result

    def placements_of(self, deployment: str) -> tuple[Placement, ...]:
        result: tuple[Placement, ...] = self._process.ask(self._token, "placements_of", (deployment,))
        return result

    def pending(self) -> list[str]:
        result: list[str] = self._process.ask(self._token, "pending", ())
        return result

    def placed_replicas(self, deployment: str) -> list[int]:
        result: list[int] = self._process.ask(self._token, "placed_replicas", (deployment,))
        return result

    def __contains__(self, deployment: str) -> bool:
        result: bool = self._process.ask(self._token, "__contains__", (deployment,))
        return result


def _scheduler_environment() -> dict[str, str]:
    """The variables the scheduler reads when it builds a session (`MAIA_SCORER`, ...), as now."""
    return {key: value for key, value in os.environ.items() if key.startswith(_SCHEDULER_VARIABLES)}


def _take_environment(environment: dict[str, str]) -> None:
    """The child's scheduler variables made the parent's (a session built now reads them)."""
    for key in [key for key in os.environ if key.startswith(_SCHEDULER_VARIABLES)]:
        del os.environ[key]
    os.environ.update(environment)


def _reap(proc: subprocess.Popen[bytes], *, grace_s: float) -> None:
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- the child ------------------------------------------------------------------------------

def serve(conn: Connection, parent_pid: int) -> None:
    """The child's loop: one session at a time, calls answered in order, until the pipe closes
    or the parent is gone."""
    conn.send(("ready", os.getpid(), 0.0))
    session: Session | None = None
    token = 0
    failed: str | None = None  # what a call on this session raised: nothing more runs on it
    unreported_cpu_s = 0.0     # spent on calls sent without waiting: told with the next answer
    while True:
        if not conn.poll(_PARENT_CHECK_S):
            if os.getppid() != parent_pid:
                return
            continue
        try:
            call_token, method, args, reply = conn.recv()
        except (EOFError, OSError):
            return
        began = time.process_time()
        try:
            if method == "open":
                problem, time_limit_ms, environment = args
                session, token, failed = None, call_token, None  # the last one's memory goes first
                _take_environment(environment)
                # The session is not there to ask until its repairs are done: the parent is told first.
                session = open_in_process(problem, time_limit_ms=time_limit_ms,
                                          repairing=lambda work_s: conn.send(("work", work_s, 0.0)))
                result: Any = session.repaired_at_load
            elif failed is not None:
                raise RuntimeError(f"an earlier call failed: {failed}")
            elif call_token != token or session is None:
                raise RuntimeError("a newer session replaced this one")
            elif method == "apply":
                displaced = session.displaced_by(*args)
                if displaced and reply:  # the time its repairs may search: the parent waits for it
                    conn.send(("work", len(displaced) * session.time_limit_ms / 1000.0, 0.0))
                result = session.apply(*args)
            elif method in _COMPOUND:
                result = _COMPOUND[method](session, *args)
            else:
                result = getattr(session, method)(*args)
            answer = ("ok", result)
        except Exception as exc:
            if call_token == token:
                failed = failed or f"{method}: {type(exc).__name__}: {exc}"
            answer = ("error", "".join(traceback.format_exception_only(exc)).strip())
            if method != "open" and not isinstance(exc, RuntimeError):
                traceback.print_exc()
        unreported_cpu_s += time.process_time() - began
        if reply:
            try:
                conn.send((*answer, unreported_cpu_s))
            except (OSError, EOFError):
                return
            unreported_cpu_s = 0.0


def _main(argv: Sequence[str]) -> None:
    fd, parent_pid = int(argv[0]), int(argv[1])
    conn = Connection(fd)
    # ^C at a terminal reaches the whole process group: the controller stops us (`stop`).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != parent_pid:  # the parent died before we started
        return
    import scheduler.session  # noqa: F401  (the solver, before "ready": `start` overlaps it with the caller)

    serve(conn, parent_pid)


if __name__ == "__main__":
    _main(sys.argv[1:])
