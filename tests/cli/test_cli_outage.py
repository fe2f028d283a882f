"""`cli.outage.Polls`, what `get --watch` and `wait` poll through: which failures are an outage to
poll through (said once when it begins, once when it ends) and which end the command. The real
outages (a restart, a silent network) are in test_cli_watch.py and
tests/integration/test_cli_silent_network.py. `wait nodes` and `wait deployment` against scripted
controllers."""
from __future__ import annotations

import argparse
import io
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from controller.cli.client import CliError
from controller.cli.commands import wait
from controller.cli.config import Connection
from controller.cli.context import Context
from controller.cli.outage import Polls
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

ADDRESS = "ctl.example:50051"


class Failed(grpc.RpcError):
    """A failed call as grpc's channel raises it (code and details)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__()
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


def _fails(code: grpc.StatusCode, details: str = "...") -> Callable[[], int]:
    def fetch() -> int:
        raise Failed(code, details)
    return fetch


@pytest.fixture
def polls() -> Polls:
    return Polls(Context(Connection(address=ADDRESS), stderr=io.StringIO()), "wait", "polling every 1s")


def _said(polls: Polls) -> list[str]:
    return polls.ctx.stderr.getvalue().splitlines()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("code", "details", "begins"), [
    (grpc.StatusCode.UNAVAILABLE, "Connection refused", f"(wait: UNAVAILABLE: cannot reach the controller at {ADDRESS} "),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded",
     f"(wait: DEADLINE_EXCEEDED: the controller at {ADDRESS} did not answer in time"),
    # A stopping controller cancels the calls still in flight once its grace is over.
    (grpc.StatusCode.CANCELLED, "CANCELLED", f"(wait: CANCELLED: the controller at {ADDRESS} ended the call unanswered"),
], ids=["unavailable", "deadline", "cancelled"])
def test_an_outage_is_said_once_when_it_begins_and_once_when_it_ends(
        polls: Polls, code: grpc.StatusCode, details: str, begins: str) -> None:
    assert polls.poll(lambda: 1) == 1
    assert _said(polls) == []
    for _ in range(3):
        assert polls.poll(_fails(code, details)) is None
    assert polls.poll(_fails(grpc.StatusCode.UNAVAILABLE)) is None  # the same outage, whatever it looks like
    assert polls.poll(lambda: 2, back="; more") == 2
    assert polls.poll(lambda: 3) == 3
    begun, ended = _said(polls)
    assert begun.startswith(begins) and "; since " in begun and begun.endswith("; polling every 1s)"), begun
    assert ended.startswith(f"(wait: the controller at {ADDRESS} answers again, ") and ended.endswith("; more)"), ended


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED])
def test_any_other_failure_is_the_commands(polls: Polls, code: grpc.StatusCode) -> None:
    with pytest.raises(Failed):
        polls.poll(_fails(code))
    assert _said(polls) == []


class ScriptedNodes:
    """A controller whose ListNodes answers `script` in turn: a list of nodes, or a failure."""

    def __init__(self, *script: list[admin_pb2.Node] | Failed) -> None:
        self._script = list(script)
        self.admin = self

    def ListNodes(self, request: admin_pb2.ListNodesRequest, timeout: float) -> admin_pb2.ListNodesResponse:  # noqa: N802
        got = self._script.pop(0)
        if isinstance(got, Failed):
            raise got
        return admin_pb2.ListNodesResponse(nodes=got)


def _ready(*ids: str) -> list[admin_pb2.Node]:
    return [admin_pb2.Node(id=i, state=common_pb2.NODE_STATE_READY, connected=True) for i in ids]


def test_wait_nodes_polls_through_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """`wait nodes --connected N` is a wait as `wait deployment` is: an outage after its first
    call is said once and polled through (it ended the command, exit 5)."""
    monkeypatch.setattr(wait, "NODES_POLL_INTERVAL_S", 0.0)
    outage = Failed(grpc.StatusCode.UNAVAILABLE, "Connection refused")
    controller = ScriptedNodes(_ready("n1"), outage, Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
                               outage, _ready("n1", "n2"))
    ctx = Context(Connection(address=ADDRESS), stdout=io.StringIO(), stderr=io.StringIO(), _controller=controller)
    assert wait.run(argparse.Namespace(resource="nodes", names=[], connected=2, timeout=60.0), ctx) == 0
    said = ctx.stderr.getvalue().splitlines()  # type: ignore[attr-defined]
    assert said[0] == "nodes: 1/2 ready and connected (1 registered)"
    assert said[1].startswith(f"(wait: UNAVAILABLE: cannot reach the controller at {ADDRESS} "), said
    assert said[2].startswith(f"(wait: the controller at {ADDRESS} answers again"), said
    assert said[3:] == ["nodes: 2/2 ready and connected (2 registered)"]
    assert ctx.stdout.getvalue() == "2 nodes ready and connected\n"  # type: ignore[attr-defined]


def test_wait_nodes_first_call_still_ends_the_command() -> None:
    controller = ScriptedNodes(Failed(grpc.StatusCode.UNAVAILABLE, "Connection refused"))
    ctx = Context(Connection(address=ADDRESS), stderr=io.StringIO(), _controller=controller)
    with pytest.raises(Failed):
        wait.run(argparse.Namespace(resource="nodes", names=[], connected=2, timeout=60.0), ctx)


class UnansweredDeployments:
    """A controller whose GetDeployment never answers: each call ends DEADLINE_EXCEEDED at its
    timeout, as gRPC ends it."""

    def __init__(self) -> None:
        self.deployments = self

    def GetDeployment(self, request: deployments_pb2.GetDeploymentRequest,  # noqa: N802
                      timeout: float) -> deployments_pb2.Deployment:
        time.sleep(timeout)
        raise Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


def test_a_wait_poll_cut_by_its_own_timeout_is_no_outage() -> None:
    """The last poll of a wait is given what is left of --timeout; cut by it, the wait times out
    without saying the controller did not answer (it was given no time)."""
    ctx = Context(Connection(address=ADDRESS), stderr=io.StringIO(), rpc_timeout=15.0,
                  _controller=UnansweredDeployments())  # type: ignore[arg-type]
    tracker = wait._Tracker(["t/web"], "running", ctx)
    with pytest.raises(wait._WaitOver):  # the wait then says it timed out
        wait._poll(tracker, time.monotonic() + 0.05, Polls(ctx, "wait", "polling every 1s"))
    assert ctx.stderr.getvalue() == ""  # type: ignore[attr-defined]


class SilentStream:
    """A WatchDeployments stream that sends nothing: it ends CANCELLED when cancelled, else
    DEADLINE_EXCEEDED at its timeout (as gRPC's)."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._cancelled = threading.Event()

    def __iter__(self) -> SilentStream:
        return self

    def __next__(self) -> deployments_pb2.DeploymentEvent:
        if self._cancelled.wait(self._timeout):
            raise Failed(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        raise Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def cancel(self) -> None:
        self._cancelled.set()


class DeletedBeforeTheStreamRead:
    """t/web is there at the wait's first read and gone when its stream reads the current state:
    the stream names it in no event (its current state has no end mark to miss it by)."""

    def __init__(self) -> None:
        self.deployments = self
        self.reads = 0

    def GetDeployment(self, request: deployments_pb2.GetDeploymentRequest,  # noqa: N802
                      timeout: float) -> deployments_pb2.Deployment:
        self.reads += 1
        if self.reads == 1:
            return deployments_pb2.Deployment(spec=deployments_pb2.DeploymentSpec(name="web", tenant="t"),
                                              phase=deployments_pb2.DEPLOYMENT_PHASE_PENDING)
        raise Failed(grpc.StatusCode.NOT_FOUND, "deployment t/web not found")

    def WatchDeployments(self, request: deployments_pb2.WatchDeploymentsRequest,  # noqa: N802
                         timeout: float) -> SilentStream:
        return SilentStream(timeout)


def test_a_deployment_gone_before_the_stream_read_it_is_seen_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracked deployment the stream has not named is read meanwhile: the wait for its deletion
    ends (it waited on the silent stream until --timeout)."""
    monkeypatch.setattr(wait, "POLL_INTERVAL_S", 0.01)
    ctx = Context(Connection(address=ADDRESS), stdout=io.StringIO(), stderr=io.StringIO(),
                  _controller=DeletedBeforeTheStreamRead())  # type: ignore[arg-type]
    assert wait.wait_deployments(["t/web"], "deleted", 10.0, ctx) == 0
    assert ctx.stdout.getvalue() == "deployment/t/web condition met (deleted)\n"  # type: ignore[attr-defined]


def test_wait_nodes_timing_out_says_the_connected_nodes_that_are_cordoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """After an upgrade with every node cordoned (a drain), "0/2 nodes ready and connected" read
    as no node back (found by exploratory testing)."""
    monkeypatch.setattr(wait, "NODES_POLL_INTERVAL_S", 0.0)
    cordoned = [admin_pb2.Node(id=i, state=common_pb2.NODE_STATE_CORDONED, connected=True) for i in ("n1", "n2")]
    ctx = Context(Connection(address=ADDRESS), stdout=io.StringIO(), stderr=io.StringIO(),
                  _controller=ScriptedNodes(cordoned))
    with pytest.raises(CliError, match=r"0/2 nodes ready and connected \(2 more connected but cordoned: "
                                       r"maiactl uncordon NODE\)$"):
        wait.run(argparse.Namespace(resource="nodes", names=[], connected=2, timeout=0.0), ctx)


@pytest.mark.parametrize("output, shown", [("table", 1), ("name", 1), ("json", 3)])
def test_a_watch_prints_again_only_what_changed_in_its_format(monkeypatch: pytest.MonkeyPatch, output: str,
                                                               shown: int) -> None:
    """Each heartbeat changes a node's document, not its row in the table: `get nodes -w`
    compared the documents and printed the same table again every few seconds (found in review).
    A watch of the documents (-o json) prints each one that changed."""
    from controller.cli.commands import get

    monkeypatch.setattr(get.time, "sleep", lambda seconds: None)
    listings = [get.Listing(lambda beat=beat: {"name": "n1", "last_heartbeat": beat}, lambda: "NAME\nn1",
                            lambda: ["node/n1"]) for beat in range(3)]

    def fetch() -> get.Listing:
        if not listings:
            raise KeyboardInterrupt  # the operator's ^C
        return listings.pop(0)

    ctx = Context(Connection(address=ADDRESS), output=output, stdout=io.StringIO(), stderr=io.StringIO())
    with pytest.raises(KeyboardInterrupt):
        get._watch(fetch, 1.0, ctx)
    printed = ctx.stdout.getvalue()  # type: ignore[attr-defined]
    assert printed.count("n1") == shown  # a document a change, no separator between (one document a line)
    assert printed.count("---") == (0 if output == "json" else shown - 1)
