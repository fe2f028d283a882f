"""The warm session in the decide process (controller/scheduling/decider.py): the same calls
give the same decisions as an in-process session; a child that dies, hangs or raises makes the
call raise and the next `open` starts afresh; the child never outlives its parent."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from controller.scheduling import decider as decider_module
from controller.scheduling.decider import (
    DecideProcess, DeciderFailed, RemoteSession, held_placements, open_in_process, place_documents, readopt)
from scheduler import problem_from_dict
from scheduler.model import Node
from scheduler.session import ClusterDelta, Session

sys.path.insert(0, str(Path(__file__).parents[1] / "scheduler"))
from strategies import problems  # noqa: E402

Doc = dict[str, Any]


def gone(pid: int) -> bool:
    """Whether a process has exited (a zombie nobody reaped counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pid: int, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.05)
    return gone(pid)


@pytest.fixture(scope="module")
def process():
    """One decide process for the module (a fresh interpreter costs a second or more)."""
    decider = DecideProcess()
    yield decider
    pid = decider.pid
    decider.close()
    assert pid is None or wait_gone(pid, 10)


# ---- the same calls, the same answers --------------------------------------------------------

@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Doc, list[tuple[str, int]]]:
    """A random cluster with some work running, the rest arriving, and calls in between (each
    an action and a number that picks its target), as the cache makes them."""
    doc = draw(problems(modes=("online",), max_nodes=6, max_deployments=6))
    doc["options"].pop("batch_size", None)
    actions = st.sampled_from(["arrive"] * 4 + ["retry", "depart", "release_one", "adopt", "replace", "cordon", "down",
                                                 "add_node", "remove_node", "contract", "ask"])
    return doc, draw(st.lists(st.tuples(actions, st.integers(0, 1000)), min_size=1, max_size=12))


def play(session: Session | RemoteSession, doc: Doc, events: list[tuple[str, int]]) -> list[Any]:
    """Every answer the session gives to the calls the events make (state read by `snapshot`)."""
    running = {p["deployment"] for p in doc["placements"]}
    arrivals = [d for d in doc["deployments"] if d["id"] not in running]
    answers: list[Any] = [session.repaired_at_load]
    for action, k in events:
        state = session.snapshot()
        live = [d.id for d in state.deployments]
        nodes = list(state.nodes)
        if action == "arrive" and arrivals:
            answers.append(place_documents(session, [arrivals.pop(0)]))
        elif action == "retry" and session.pending():
            pending = session.pending()
            answers.append(session.place(pending[k % len(pending)]))
        elif action == "depart" and live:
            session.release(live[k % len(live)])
        elif action == "release_one" and live:
            name = live[k % len(live)]
            session.release(name, session.placed_replicas(name)[:1])
        elif action == "adopt" and live:  # as `ClusterCache.follow` does: all released, then adopted
            name = live[k % len(live)]
            spec = next(d for d in state.deployments if d.id == name)
            held = session.placements_of(name)
            replicas = session.placed_replicas(name)
            if k % 2:
                session.release(name, replicas)
                session.adopt(spec, [p for p in held if p.replica in replicas[: len(replicas) // 2 + 1]])
            else:  # the same, one message to the decide process
                readopt(session, [(spec, [p for p in held if p.replica in replicas[: len(replicas) // 2 + 1]])])
        elif action == "replace" and live:  # a deployment changed elsewhere, held as given
            name = live[k % len(live)]
            spec = next(d for d in state.deployments if d.id == name)
            held = session.placements_of(name)
            session.replace(dataclasses.replace(spec, replicas=spec.replicas + k % 2),
                            [p for p in held if p.replica == min((q.replica for q in held), default=0)])
        elif action in ("cordon", "down") and nodes:
            changed = dataclasses.replace(nodes[k % len(nodes)], state="cordoned" if action == "cordon" else "down")
            answers.append(session.apply(ClusterDelta(nodes=(changed,))))
        elif action == "add_node":
            new = Node(id=f"extra{k}", rack=state.racks[k % len(state.racks)].id, accelerators=1 + k % 4,
                       accelerator_model="m1")
            answers.append(session.apply(ClusterDelta(nodes=(new,))))
        elif action == "remove_node" and len(nodes) > 1:
            answers.append(session.apply(ClusterDelta(removed_nodes=(nodes[k % len(nodes)].id,))))
        elif action == "contract" and state.tenants:
            looser = dataclasses.replace(state.tenants[k % len(state.tenants)], max_accelerators=None)
            answers.append(session.apply(ClusterDelta(tenants=(looser,))))
        elif action == "ask" and live:
            name = live[k % len(live)]
            answers.append((name in session, "nobody" in session, session.placements_of(name),
                            session.placed_replicas(name), session.pending(),
                            held_placements(session, [name, "nobody", *live])))
        answers.append(session.snapshot())
    return answers


@given(scenarios())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
def test_the_process_decides_what_an_in_process_session_decides(process: DecideProcess, scenario) -> None:
    doc, events = scenario
    note(str(events))
    running = {p["deployment"] for p in doc["placements"]}
    start = dict(doc, deployments=[d for d in doc["deployments"] if d["id"] in running])
    here = play(open_in_process(copy.deepcopy(start), time_limit_ms=2000), doc, events)
    there = play(process.open(copy.deepcopy(start), time_limit_ms=2000), doc, events)
    assert there == here


def test_the_proxy_has_every_session_method_the_cache_calls() -> None:
    # The cache's session may be a `RemoteSession`: a method the cache starts calling must be
    # forwarded too (else the decide process fails every pass that calls it).
    # The cache is a package (`controller/scheduling/cache/`): its modules call the session as
    # `self.session` or as the `session` they are given.
    import controller.scheduling.cache as cache_package

    called = {name for module in Path(cache_package.__file__).parent.glob("*.py")
              for name in re.findall(r"\bsession\.(\w+)\(", module.read_text())}
    assert called and called <= {name for name in dir(RemoteSession) if not name.startswith("_")}


# ---- failures --------------------------------------------------------------------------------

def _tiny() -> tuple[Doc, list[Doc]]:
    racks = [{"id": "r1", "row": "w1"}]
    nodes = [{"id": f"n{i}", "rack": "r1", "accelerators": 4, "state": "ready"} for i in range(4)]
    deployments = [{"id": f"d{i}", "tenant": "t", "replicas": 1, "shards_per_replica": 1,
                    "shard": {"accelerators": 2}, "locality": "node"} for i in range(4)]
    doc = {"version": 1, "zones": [{"id": "z1"}], "rows": [{"id": "w1", "zone": "z1"}], "racks": racks,
           "nodes": nodes, "tenants": [{"id": "t"}], "deployments": [], "placements": [],
           "options": {"mode": "online"}}
    return doc, deployments


def test_a_session_that_raises_fails_the_call_and_the_next_open_works(process: DecideProcess) -> None:
    doc, arrivals = _tiny()
    session = process.open(doc, time_limit_ms=2000)
    with pytest.raises(DeciderFailed, match="place"):
        session.place("nobody")  # not a deployment the session knows
    with pytest.raises(DeciderFailed, match="earlier call failed"):  # nothing more runs on it
        session.pending()
    session = process.open(doc, time_limit_ms=2000)
    session.release("nobody")  # sent without waiting: the next answer reports it
    with pytest.raises(DeciderFailed, match="release"):
        session.pending()
    older, newer = process.open(doc, time_limit_ms=2000), process.open(doc, time_limit_ms=2000)
    with pytest.raises(DeciderFailed, match="newer session"):
        older.pending()
    assert place_documents(newer, arrivals[:1])[0].placements
    assert process.pid is not None  # the same child all along


def test_a_child_that_dies_fails_the_call_and_the_next_open_starts_another(process: DecideProcess) -> None:
    doc, arrivals = _tiny()
    session = process.open(doc, time_limit_ms=2000)
    place_documents(session, arrivals[:1])
    pid, starts = process.pid, process.starts
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    with pytest.raises(DeciderFailed, match="gone"):
        place_documents(session, arrivals[1:2])
    assert process.pid is None
    with pytest.raises(DeciderFailed):  # its sessions are lost with it
        session.pending()
    again = process.open(doc, time_limit_ms=2000)
    assert process.starts == starts + 1 and process.pid not in (None, pid)
    here = open_in_process(doc, time_limit_ms=2000)
    assert place_documents(again, arrivals) == place_documents(here, arrivals)


# A call of a few MB (more than the pipe holds) to a hung child blocked in send() for good: the
# timeout covered only waiting for the answer, and the reconcile pass never ended.
_BIG = [{"id": f"t/d{i}", "tenant": "t", "replicas": 1, "shards_per_replica": 1, "shard": {"accelerators": 1},
         "locality": "node", "padding": "x" * 200} for i in range(20000)]


@pytest.mark.parametrize("call, says", [
    (lambda session: session.pending(), "did not answer"),  # a small call: waiting for the answer
    (lambda session: session.place_documents(_BIG), "gone"),  # a large one: sending it
], ids=["answer", "send"])
def test_a_child_that_hangs_is_killed_and_the_call_fails(call: Any, says: str) -> None:
    with _stopped_child(time_limit_ms=2000) as (decider, session, pid):
        with pytest.raises(DeciderFailed, match=says):
            call(session)
        assert wait_gone(pid, 10) and decider.pid is None


@contextmanager
def _stopped_child(*, time_limit_ms: int) -> Iterator[tuple[DecideProcess, RemoteSession, int]]:
    """A decide process holding `_tiny`'s session, its child stopped (SIGSTOP), calls waiting 1 s."""
    doc, _ = _tiny()
    decider = DecideProcess(timeout_s=120.0)  # room to start an interpreter on a busy machine
    try:
        session = decider.open(doc, time_limit_ms=time_limit_ms)
        pid = decider.pid
        assert pid is not None
        decider.timeout_s = 1.0
        os.kill(pid, signal.SIGSTOP)
        yield decider, session, pid
    finally:
        decider.close()


def test_a_call_may_take_its_decisions_time_limits_before_the_child_counts_as_hung() -> None:
    """A batch of arrivals may search to the time limit in each decision: the call waits
    `timeout_s` plus that. It waited `timeout_s` alone, and a child working through a long
    batch was killed as hung and the session lost. A call that decides nothing still waits
    `timeout_s` alone."""
    _, arrivals = _tiny()
    with _stopped_child(time_limit_ms=4000) as (decider, session, pid):
        # The child busy for 3 s: within 1 + 4 x 4 s, not within 1 s.
        resume = threading.Timer(3.0, os.kill, (pid, signal.SIGCONT))
        resume.start()
        try:
            decisions = place_documents(session, arrivals)
        finally:
            resume.join()
        assert [len(d.placements) for d in decisions] == [1, 1, 1, 1]
        assert decider.pid == pid and decider.starts == 1
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(DeciderFailed, match="did not answer pending within 1 s"):
            session.pending()
        assert wait_gone(pid, 10)


class _SlowAnswers:
    """The parent's end of the pipe, the child's answer to a call made after `stall` held back
    until `seconds` after it (a slow call, on any machine: a real stop of the child came too
    late for a tiny cluster's apply); what the child tells of its work ("work") goes through at
    once, and is recorded."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.told: list[float] = []
        self._held: Any = None  # a message read from the pipe, not yet given
        self._answer_at: float | None = None

    def stall(self, seconds: float) -> None:
        self._answer_at = time.monotonic() + seconds

    def poll(self, timeout: float) -> bool:
        began = time.monotonic()
        if self._held is None:
            if not self._conn.poll(timeout):
                return False
            self._held = self._conn.recv()
        if self._held[0] == "work" or self._answer_at is None:
            return True
        wait = self._answer_at - time.monotonic()
        if wait > began + timeout - time.monotonic():
            time.sleep(max(0.0, began + timeout - time.monotonic()))
            return False
        time.sleep(max(0.0, wait))
        return True

    def recv(self) -> Any:
        message, self._held = (self._held if self._held is not None else self._conn.recv()), None
        if message[0] == "work":
            self.told.append(message[1])
        else:
            self._answer_at = None
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@contextmanager
def _slow_answers(*, time_limit_ms: int) -> Iterator[tuple[DecideProcess, RemoteSession, _SlowAnswers, Node, int]]:
    """`_tiny`'s cluster with its four deployments placed, calls waiting 1 s: the decider, the
    session, the pipe (`stall` it to slow an answer), a node holding work, and how many
    deployments that node holds."""
    doc, arrivals = _tiny()
    decider = DecideProcess(timeout_s=120.0)  # room to start an interpreter on a busy machine
    try:
        session = decider.open(doc, time_limit_ms=time_limit_ms)
        assert all(d.placements for d in place_documents(session, arrivals))
        state = session.snapshot()
        node = next(n for n in state.nodes if n.id == state.placements[0].node)
        held = len({p.deployment for p in state.placements if p.node == node.id})
        decider.timeout_s = 1.0
        slow = _SlowAnswers(decider._conn)
        decider._conn = slow  # type: ignore[assignment]
        yield decider, session, slow, node, held
    finally:
        decider.close()


def test_an_apply_may_take_its_repairs_time_limits_before_the_child_counts_as_hung() -> None:
    """A node going down makes `apply` repair each deployment it held: a decision each, and one
    left short may search to the time limit for its preemption hint. The child tells how many
    before it starts, and the call waits `timeout_s` plus their time limits. It waited
    `timeout_s` alone (unlike `place`), and a child repairing after a node loss was killed as
    hung and the session lost."""
    with _slow_answers(time_limit_ms=4000) as (decider, session, slow, node, held):
        pid = decider.pid
        slow.stall(3.0)  # within 1 + held x 4 s, not within 1 s
        repaired = session.apply(ClusterDelta(nodes=(dataclasses.replace(node, state="down"),)))
        assert slow.told == [held * 4.0] and len(repaired) == held
        assert decider.pid == pid and decider.starts == 1


def test_an_apply_still_counts_as_hung_past_its_repairs_time_limits() -> None:
    with _slow_answers(time_limit_ms=1000) as (decider, session, slow, node, held):
        pid = decider.pid
        assert pid is not None
        began = time.monotonic()
        slow.stall(60.0)
        with pytest.raises(DeciderFailed, match=f"did not answer apply within {1 + held} s"):
            session.apply(ClusterDelta(removed_nodes=(node.id,)))
        assert slow.told == [held * 1.0] and time.monotonic() - began < 30
        assert wait_gone(pid, 10) and decider.pid is None


def test_an_apply_that_repairs_nothing_waits_timeout_s_alone() -> None:
    """A cordon flip (the fast pass's avoided nodes), a contract or topology change displaces
    nothing: the child tells no work and the call waits `timeout_s` alone."""
    with _slow_answers(time_limit_ms=4000) as (decider, session, slow, node, _):
        assert session.apply(ClusterDelta(nodes=(dataclasses.replace(node, state="cordoned"),))) == []
        assert session.apply(ClusterDelta(tenants=session.snapshot().tenants)) == []
        assert slow.told == [] and decider.starts == 1
        pid = decider.pid
        assert pid is not None
        slow.stall(3.0)
        with pytest.raises(DeciderFailed, match="did not answer apply within 1 s"):
            session.apply(ClusterDelta(nodes=(node,)))  # the flip back, answered after 3 s
        assert wait_gone(pid, 10)


def test_displaced_by_names_the_deployments_an_apply_repairs() -> None:
    """`Session.displaced_by` (what the child tells the parent) covers every repair an apply
    makes, and names nothing for a cordon flip or a contract."""
    doc, arrivals = _tiny()
    session = open_in_process(doc, time_limit_ms=2000)
    place_documents(session, arrivals)
    state = session.snapshot()
    for node in state.nodes:
        for delta in (ClusterDelta(nodes=(dataclasses.replace(node, state="cordoned"),)),
                      ClusterDelta(tenants=state.tenants)):
            assert session.displaced_by(delta) == []
        on_it = sorted({p.deployment for p in state.placements if p.node == node.id})
        for delta in (ClusterDelta(nodes=(dataclasses.replace(node, state="down"),)),
                      ClusterDelta(removed_nodes=(node.id,)),
                      ClusterDelta(nodes=(dataclasses.replace(node, accelerators=1),))):
            here = open_in_process(doc, time_limit_ms=2000)
            place_documents(here, arrivals)
            assert here.displaced_by(delta) == on_it
            assert {d.deployment for d in here.apply(delta)} <= set(on_it)


def _with_work_on_a_down_node() -> Doc:
    """`_tiny`'s cluster with three of its deployments running, two of them on n0, which is down."""
    doc, deployments = _tiny()
    doc["deployments"] = deployments[:3]
    doc["placements"] = [{"deployment": d, "replica": 0, "shard": 0, "node": node, "accelerator_indices": indices}
                         for d, node, indices in (("d0", "n0", [0, 1]), ("d1", "n0", [2, 3]), ("d2", "n1", [0, 1]))]
    doc["nodes"][0]["state"] = "down"
    return doc


@contextmanager
def _slow_opens() -> Iterator[tuple[DecideProcess, _SlowAnswers]]:
    """A decide process whose child is up (it holds `_tiny`'s session), calls waiting 1 s: the
    decider and the pipe (`stall` it to slow an answer)."""
    decider = DecideProcess(timeout_s=120.0)  # room to start an interpreter on a busy machine
    try:
        decider.open(_tiny()[0], time_limit_ms=1000)
        decider.timeout_s = 1.0
        slow = _SlowAnswers(decider._conn)
        decider._conn = slow  # type: ignore[assignment]
        yield decider, slow
    finally:
        decider.close()


def test_an_open_may_take_its_repairs_time_limits_before_the_child_counts_as_hung() -> None:
    """A problem with shards on down nodes makes the session repair each deployment they belong
    to as it is built: a decision each, which may search to the time limit. The child counts
    them before it builds and tells, and the call waits `timeout_s` plus their time limits. It
    waited `timeout_s` alone, and a child repairing as it loaded (a controller started while
    nodes were down) was killed as hung and the session lost."""
    with _slow_opens() as (decider, slow):
        pid = decider.pid
        slow.stall(3.0)  # within 1 + 2 x 4 s, not within 1 s
        session = decider.open(_with_work_on_a_down_node(), time_limit_ms=4000)
        assert slow.told == [2 * 4.0]
        assert sorted(d.deployment for d in session.repaired_at_load) == ["d0", "d1"]
        assert decider.pid == pid and decider.starts == 1


def test_an_open_that_repairs_nothing_waits_timeout_s_alone() -> None:
    with _slow_opens() as (decider, slow):
        pid = decider.pid
        assert pid is not None
        doc = _with_work_on_a_down_node()
        doc["nodes"][0]["state"] = "cordoned"  # keeps its shards
        assert decider.open(doc, time_limit_ms=4000).repaired_at_load == []
        assert slow.told == []
        slow.stall(3.0)
        with pytest.raises(DeciderFailed, match="did not answer open within 1 s"):
            decider.open(doc, time_limit_ms=4000)
        assert wait_gone(pid, 10) and decider.pid is None


@st.composite
def _loads(draw: st.DrawFn) -> Doc:
    """A problem as a session loads it, with shards on down nodes, on failed accelerators, and
    replicas placed short of shards."""
    doc = draw(problems(modes=("online",), max_nodes=6, max_deployments=6))
    doc["options"].pop("batch_size", None)
    for node in doc["nodes"]:
        failed = draw(st.sets(st.integers(0, node["accelerators"] - 1), max_size=node["accelerators"]))
        if failed:
            node["unhealthy_accelerators"] = sorted(failed)
    keep = draw(st.lists(st.booleans(), min_size=len(doc["placements"]), max_size=len(doc["placements"])))
    doc["placements"] = [p for p, kept in zip(doc["placements"], keep) if kept or draw(st.booleans())]
    return doc


@given(_loads())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_repairs_at_load_names_the_deployments_a_session_repairs_as_it_loads(doc: Doc) -> None:
    """`Session.repairs_at_load` (what the child tells before it builds a session) is exactly
    the deployments the session repairs as it loads: the solver's load decides that on its own
    (`Solver._load_existing`), and this keeps the two from drifting apart."""
    problem = problem_from_dict(doc)
    repaired = Session(problem, time_limit_ms=2000).repaired_at_load
    assert Session.repairs_at_load(problem) == sorted(d.deployment for d in repaired)


def test_a_proxy_of_a_dead_childs_session_cannot_drive_the_next_childs() -> None:
    """Tokens go on across children: the new child's first session had token 1 again, and a
    proxy left from the dead child's passed its check."""
    doc, _ = _tiny()
    decider = DecideProcess(timeout_s=120.0)
    try:
        old = decider.open(doc, time_limit_ms=2000)
        pid = decider.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, 10)
        with pytest.raises(DeciderFailed):
            old.pending()
        new = decider.open(doc, time_limit_ms=2000)
        assert new.pending() == []
        with pytest.raises(DeciderFailed):
            old.pending()
    finally:
        decider.close()


def test_no_child_starts_after_the_controllers_stop() -> None:
    """The stop cancels the reconciler's task, not the worker thread under it: an `open` that
    thread made after the stop started a fresh child, which built its session at full CPU after
    the controller had stopped the decider and lived on (found in review). An `open` under way
    when the stop comes fails as a DeciderFailed (not an AttributeError of the connection the
    stop cleared), and nothing is started again."""
    doc, _ = _tiny()
    decider = DecideProcess(timeout_s=120.0)
    outcome: list[BaseException | RemoteSession] = []

    def opening() -> None:
        try:
            outcome.append(decider.open(doc, time_limit_ms=2000))
        except BaseException as exc:  # noqa: BLE001 - what the worker thread would have seen
            outcome.append(exc)

    worker = threading.Thread(target=opening)
    worker.start()
    deadline = time.monotonic() + 60
    while decider.starts == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    first = decider.pid
    assert first is not None
    decider.stop()
    worker.join(120)
    assert len(outcome) == 1 and isinstance(outcome[0], DeciderFailed), outcome
    assert wait_gone(first, 10)
    with pytest.raises(DeciderFailed, match="stopped"):
        decider.open(doc, time_limit_ms=2000)
    assert decider.pid is None and decider.starts == 1


def test_a_stop_that_lands_while_a_child_starts_fails_the_start_and_closes_its_pipe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`stop` takes no lock (a call holds it as long as the child takes), so it may land inside
    `_start`, after the child was made: the start read the child `stop` had just cleared and
    raised an AttributeError, and our end of the pipe stayed open (found in review)."""
    decider = DecideProcess(timeout_s=30.0)
    made = decider_module.Pipe

    class Theirs:  # the child's end: closed by `_start` once the child holds its copy
        def __init__(self, conn: Any) -> None:
            self.conn = conn

        def fileno(self) -> int:
            return self.conn.fileno()

        def close(self) -> None:
            self.conn.close()
            decider.stop()  # the controller's stop, from its own thread, lands here

    ends: list[Any] = []

    def pipe(duplex: bool = True) -> tuple[Any, Any]:
        ours, theirs = made(duplex=duplex)
        ends.append(ours)
        return ours, Theirs(theirs)

    monkeypatch.setattr(decider_module, "Pipe", pipe)
    with pytest.raises(DeciderFailed, match="stopped"):
        decider.start()
    assert decider.pid is None and ends[0].closed


def test_the_child_exits_when_its_parent_dies(tmp_path: Path) -> None:
    # A parent that opens a session, says its child's pid, and is killed without closing anything.
    script = textwrap.dedent("""
        import sys, time
        from controller.scheduling.decider import DecideProcess
        decider = DecideProcess()
        decider.open({"version": 1, "zones": [], "rows": [], "racks": [], "nodes": [], "tenants": [],
                      "deployments": [], "placements": [], "options": {"mode": "online"}}, time_limit_ms=1000)
        print(decider.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        assert not gone(child)
    finally:
        parent.kill()
        parent.wait()
    assert wait_gone(child, 30)


# ---- a real controller ------------------------------------------------------------------------

BIN = Path(sys.executable).parent
TOPOLOGY = """\
kind: Topology
zones: [{id: z1}]
rows: [{id: row-a, zone: z1}]
racks: [{id: rack-00, row: row-a}]
---
kind: Tenant
id: team-a
"""
DEPLOYMENT = """\
kind: Deployment
name: {name}
tenant: team-a
replicas: 2
shards_per_replica: 1
shard: {{accelerators: 1}}
locality: node
"""


def decide_children(pid: int) -> list[int]:
    """The decide processes a process started, still running."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if ppid == pid and b"controller.scheduling.decider" in cmdline and not gone(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_a_controller_decides_in_its_decide_process_and_leaves_no_child(tmp_path: Path) -> None:
    """The default: `maia-controller` without the flag decides in its decide process."""
    log = tmp_path / "controller.log"
    controller = subprocess.Popen(
        [str(BIN / "maia-controller"), "--listen", "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{tmp_path}/maia.db",
         "--reconcile-interval", "0.2", "--bootstrap-admin-token-file", str(tmp_path / "admin.token"),
         "--log-level", "INFO"],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    fleet: subprocess.Popen[bytes] | None = None
    try:
        line = controller.stdout.readline().strip()  # type: ignore[union-attr]
        assert line.startswith("maia-controller listening on "), log.read_text()[-2000:]
        address = line.rsplit(" ", 1)[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAIA_")}
        env.update(MAIA_CONFIG=os.devnull, MAIA_TOKEN=(tmp_path / "admin.token").read_text().strip())

        def ctl(*args: str, stdin: str | None = None) -> str:
            done = subprocess.run([str(BIN / "maiactl"), "--controller", address, *args], input=stdin,
                                  capture_output=True, text=True, timeout=120, env=env)
            assert done.returncode == 0, done.stderr
            return done.stdout

        ctl("apply", "-f", "-", stdin=TOPOLOGY)
        bootstrap = ctl("token", "create", "--role", "node-bootstrap").strip()
        fleet = subprocess.Popen([str(BIN / "maia-simnode"), "--controller", address, "--racks", "1",
                                  "--nodes-per-rack", "4", "--load-delay", "0.1",
                                  "--state-dir", str(tmp_path / "nodes")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**env, "MAIA_TOKEN": bootstrap})
        ctl("wait", "nodes", "--connected", "4", "--timeout", "60")
        for name in ("first", "second", "third"):  # the first by a full pass, the others on the warm session
            ctl("apply", "-f", "-", stdin=DEPLOYMENT.format(name=name))
            ctl("wait", "deployment", name, "--for", "running", "--timeout", "120")
        (child,) = decide_children(controller.pid)
        assert "path=fast" in log.read_text()
        assert "decide process" not in log.read_text().replace("decide process started", "")  # no failure
    finally:
        if fleet is not None:
            fleet.send_signal(signal.SIGINT)
            fleet.wait(timeout=30)
        controller.send_signal(signal.SIGTERM)
        code = controller.wait(timeout=60)
    assert code == 0
    assert wait_gone(child, 10)  # stopped with the controller
