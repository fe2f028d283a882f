"""Fault injection: simulated nodes against the fake controller of test_simnode_transport, driven
through a real control socket with the client `maia-simnode fault` uses."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.simnode import faultcli
from controller.simnode.agent import ShardKey
from controller.simnode.faults import ControlServer, FaultError, FaultInjector, ShardPattern
from controller.simnode.protocol import NodeSpec
from controller.simnode.transport import Backoff, SimulatedNode
from maia.v1 import common_pb2
from test_simnode_transport import FakeController, assignment_set, fake, wait_until  # noqa: F401 (fixture)

RUNNING, FAILED = common_pb2.SHARD_PHASE_RUNNING, common_pb2.SHARD_PHASE_FAILED


class Fleet:
    """Two nodes of rack-00 and one of rack-01 against the fake, and the control socket."""

    def __init__(self, address: str, socket_path: Path) -> None:
        specs = [NodeSpec("rack-00-n00", "rack-00"), NodeSpec("rack-00-n01", "rack-00"), NodeSpec("rack-01-n00", "rack-01")]
        self.nodes = {s.node_id: SimulatedNode(s, address, load_delay_s=0.0, backoff=Backoff(0.05, 0.1))
                      for s in specs}
        self.server = ControlServer(FaultInjector(self.nodes.values()), socket_path)
        self.tasks: list[asyncio.Task] = []

    async def ask(self, **request: object) -> dict:
        return await asyncio.to_thread(faultcli.send, self.server.path, request)


@pytest.fixture
async def fleet(fake: tuple[FakeController, str], tmp_path: Path) -> AsyncIterator[Fleet]:
    _, address = fake
    f = Fleet(address, tmp_path / "control.sock")
    await f.server.start()
    f.tasks = [asyncio.create_task(n.run()) for n in f.nodes.values()]
    await wait_until(lambda: all(n.connected for n in f.nodes.values()))
    yield f
    for n in f.nodes.values():
        n.stop()
    await asyncio.wait_for(asyncio.gather(*f.tasks), timeout=10)
    await f.server.close()
    assert not f.server.path.exists()


def registrations(controller: FakeController, node_id: str) -> int:
    return sum(1 for r in controller.registrations if r.node_id == node_id)


async def test_kill_cuts_the_stream_until_revived(
        fake: tuple[FakeController, str], fleet: Fleet) -> None:
    controller, _ = fake
    node = fleet.nodes["rack-00-n00"]
    answer = await fleet.ask(op="kill", racks=["rack-00"], nodes=["rack-00-n01"])
    assert answer["ok"] and answer["nodes"] == ["rack-00-n01", "rack-00-n00"]
    await wait_until(lambda: not node.connected)
    before = registrations(controller, "rack-00-n00")
    await asyncio.sleep(0.3)  # several back-offs long: a killed node does not come back by itself
    assert registrations(controller, "rack-00-n00") == before and not node.connected
    status = await fleet.ask(op="status")
    assert status["faults"] == {"rack-00-n00": ["killed"], "rack-00-n01": ["killed"]} and status["connected"] == 1

    assert (await fleet.ask(op="revive", all=True))["ok"]
    await wait_until(lambda: all(n.connected for n in fleet.nodes.values()))
    assert (await fleet.ask(op="status"))["faults"] == {}


async def test_partition_keeps_the_stream_open_but_silent_and_heals_into_a_new_session(
        fake: tuple[FakeController, str], fleet: Fleet) -> None:
    controller, _ = fake
    node = fleet.nodes["rack-01-n00"]
    await wait_until(lambda: node.heartbeats_sent > 0)
    assert (await fleet.ask(op="partition", racks=["rack-01"]))["ok"]
    sent, opened = node.heartbeats_sent, controller.streams_opened
    await wait_until(lambda: fleet.nodes["rack-00-n00"].heartbeats_sent > sent + 2)  # others keep beating
    assert node.heartbeats_sent == sent and node.connected  # silent, the stream still open
    assert controller.streams_opened == opened

    assert (await fleet.ask(op="revive", nodes=["rack-01-n00"]))["ok"]
    await wait_until(lambda: node.heartbeats_sent > sent and controller.streams_opened > opened)


async def test_timed_faults_undo_themselves_and_flaps_keep_the_shards(
        fake: tuple[FakeController, str], fleet: Fleet) -> None:
    controller, _ = fake
    node = fleet.nodes["rack-00-n01"]
    assert (await fleet.ask(op="kill", nodes=["rack-00-n01"], for_s=0.2))["ok"]
    await wait_until(lambda: not node.killed and node.connected)

    before = registrations(controller, "rack-00-n01")
    answer = await fleet.ask(op="flap", nodes=["rack-00-n01"], period_s=0.3, down_s=0.05, count=2)
    assert answer["ok"]
    await wait_until(lambda: registrations(controller, "rack-00-n01") >= before + 2 and node.connected)
    assert (await fleet.ask(op="status"))["faults"] == {}

    assert (await fleet.ask(op="delay-heartbeats", racks=["rack-00"], delay_s=5.0))["ok"]
    assert node.heartbeat_delay_s == 5.0
    assert (await fleet.ask(op="status"))["faults"]["rack-00-n00"] == ["heartbeat-delay"]
    await fleet.ask(op="revive", racks=["rack-00"])
    assert node.heartbeat_delay_s == 0.0


async def test_a_timed_kill_ends_the_kill_alone_and_a_partition_set_apart_still_holds(
        fake: tuple[FakeController, str], fleet: Fleet) -> None:
    """The end of `kill --for` revived the node, healing a partition set on it separately: the
    node reconnected while still meant to be cut off."""
    controller, _ = fake
    node = fleet.nodes["rack-01-n00"]
    assert (await fleet.ask(op="partition", nodes=["rack-01-n00"]))["ok"]
    assert (await fleet.ask(op="kill", nodes=["rack-01-n00"], for_s=0.1))["ok"]
    await wait_until(lambda: not node.killed)
    before = registrations(controller, "rack-01-n00")
    await asyncio.sleep(0.3)  # several back-offs long: partitioned, it does not come back
    assert node.partitioned and not node.connected and registrations(controller, "rack-01-n00") == before
    assert (await fleet.ask(op="status"))["faults"] == {"rack-01-n00": ["partitioned"]}

    assert (await fleet.ask(op="partition", nodes=["rack-01-n00"], for_s=0.1))["ok"]  # and the other way round
    assert (await fleet.ask(op="kill", nodes=["rack-01-n00"], for_s=0.4))["ok"]
    await wait_until(lambda: not node.partitioned)
    assert node.killed and not node.connected
    await wait_until(lambda: node.connected and not node.killed)  # both ended: back
    assert (await fleet.ask(op="status"))["faults"] == {}


async def test_fail_shard_reports_failed_with_the_message_and_keep_failing_fails_later_loads(
        fake: tuple[FakeController, str], fleet: Fleet) -> None:
    controller, _ = fake
    await controller.outgoing.put(assignment_set(1, 0, 1))
    await wait_until(lambda: sum(1 for s in controller.statuses() if s[2] == RUNNING) == 2)
    answer = await fleet.ask(op="fail-shard", deployment="claude", replica=0, shard=1, message="HBM ECC error")
    assert answer["ok"] and len(answer["failed"]) == 1 and answer["failed"][0].endswith(":anthropic/claude/0/1")  # TENANT/NAME/REPLICA/SHARD
    await wait_until(lambda: ("claude", 1, FAILED, 1) in controller.statuses())
    failed = [m.shard_status for m in controller.received
              if m.HasField("shard_status") and m.shard_status.phase == FAILED]
    assert failed[0].message == "HBM ECC error"

    assert (await fleet.ask(op="fail-shard", deployment="claude", keep_failing=True,
                            message="bad weights"))["ok"]
    await controller.outgoing.put(assignment_set(2, 2))  # a new shard: its load fails
    await wait_until(lambda: ("claude", 2, FAILED, 2) in controller.statuses())
    assert (await fleet.ask(op="stop-failing"))["stopped"] == 1


async def test_bad_requests_are_refused_and_change_nothing(fleet: Fleet) -> None:
    answer = await fleet.ask(op="kill", nodes=["rack-00-n00", "rack-09-n00"])
    assert not answer["ok"] and "rack-09-n00" in answer["error"]
    assert not fleet.nodes["rack-00-n00"].killed
    assert "rack-07" in (await fleet.ask(op="partition", racks=["rack-07"]))["error"]
    assert "name the nodes" in (await fleet.ask(op="kill"))["error"]
    assert "unknown op" in (await fleet.ask(op="explode"))["error"]
    assert "no node holds" in (await fleet.ask(op="fail-shard", deployment="nothing"))["error"]
    assert "shorter than the period" in (await fleet.ask(op="flap", all=True, period_s=1, down_s=2))["error"]
    assert "JSON" in fleet.server.answer(b"{not json")["error"]
    assert (await fleet.ask(op="status"))["faults"] == {}


def test_the_cli_parses_durations_and_exits_5_when_no_fleet_answers(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert [faultcli.parse_duration(t) for t in ("500ms", "2s", "1.5m", "3")] == [0.5, 2.0, 90.0, 3.0]
    args = faultcli.build_parser().parse_args(["delay-heartbeats", "--rack", "r1,r2", "--node", "n1", "--by", "0"])
    assert faultcli.request_of(args) == {"op": "delay-heartbeats", "racks": ["r1", "r2"], "nodes": ["n1"], "delay_s": 0.0}
    assert faultcli.main(["status", "--control-socket", str(tmp_path / "none.sock")]) == faultcli.EXIT_UNREACHABLE
    assert "no fleet answers" in capsys.readouterr().err
    # The socket and -o before the verb too ('fault --control-socket S kill' was a usage error).
    assert faultcli.main(["--control-socket", str(tmp_path / "none.sock"), "status"]) == faultcli.EXIT_UNREACHABLE
    assert "no fleet answers" in capsys.readouterr().err
    before = faultcli.build_parser().parse_args(["-o", "json", "--control-socket", "/s", "kill", "--node", "n1"])
    after = faultcli.build_parser().parse_args(["kill", "--node", "n1", "-o", "json", "--control-socket", "/s"])
    assert (before.output, str(before.control_socket)) == (after.output, str(after.control_socket)) == ("json", "/s")


def test_fail_shard_names_a_deployment_by_tenant_and_name_or_by_name_alone() -> None:
    """`--deployment anthropic/claude` never matched: the agent keeps the tenant apart from the
    name, and the name alone could not tell two tenants' `claude` apart."""
    ours, theirs = ShardKey("claude", 0, 3, tenant="anthropic"), ShardKey("claude", 0, 3, tenant="openlab")
    assert [ShardPattern("anthropic/claude").matches(k) for k in (ours, theirs)] == [True, False]
    assert [ShardPattern("claude").matches(k) for k in (ours, theirs)] == [True, True]
    assert not ShardPattern("anthropic/claude", replica=1).matches(ours)


def test_keep_failing_on_named_nodes_fails_later_loads_on_those_nodes_only() -> None:
    """`fail-shard --node X --keep-failing` fails the later loads of X only (it failed every
    node's); without nodes named, every node's."""
    specs = [NodeSpec("rack-00-n00", "rack-00"), NodeSpec("rack-00-n01", "rack-00")]
    nodes = {s.node_id: SimulatedNode(s, "127.0.0.1:1") for s in specs}
    injector = FaultInjector(nodes.values())
    key = ShardKey("anthropic/claude", 0, 3)
    answer = injector.handle({"op": "fail-shard", "deployment": "claude", "nodes": ["rack-00-n00"],
                              "keep_failing": True, "message": "bad weights"})
    assert answer["ok"] and answer["failed"] == []
    failure = {node_id: node.agent.load_failure(key) for node_id, node in nodes.items()}  # type: ignore[misc]
    assert failure == {"rack-00-n00": "bad weights", "rack-00-n01": None}
    assert injector.handle({"op": "status"})["failing"] == ["claude on rack-00-n00"]
    assert answer["message"].endswith("every later load of one on the 1 nodes named fails too")
    assert injector.handle({"op": "stop-failing"})["stopped"] == 1
    for every in ({}, {"all": True}):  # --all: every node's, not a rule naming each
        injector.handle({"op": "fail-shard", "deployment": "claude", "keep_failing": True, **every})
        assert all(node.agent.load_failure(key) == "injected fault" for node in nodes.values())  # type: ignore[misc]
    assert injector.handle({"op": "status"})["failing"] == ["claude", "claude"]


def test_stop_failing_takes_a_deployment_key_and_refuses_a_malformed_one_or_one_no_rule_names() -> None:
    """stop-failing compared the text given with each rule's: a malformed deployment (`Claude`,
    `a/b/claude`) or one no rule names removed nothing and answered ok, the shards failing on."""
    specs = [NodeSpec("rack-00-n00", "rack-00")]
    injector = FaultInjector(SimulatedNode(s, "127.0.0.1:1") for s in specs)
    for deployment in ("anthropic/claude", "claude", "openlab/claude"):
        injector.handle({"op": "fail-shard", "deployment": deployment, "keep_failing": True})
    for malformed, said in [("Claude", "deployment name 'Claude' is invalid"),
                            ("a/b/claude", "tenant id 'a/b' is invalid"),
                            ("anthropic/", "deployment name is required"), ("/claude", "tenant id is required"),
                            ("", "needs the deployment"), (7, "needs the deployment")]:
        with pytest.raises(FaultError, match=said):
            injector.handle({"op": "stop-failing", "deployment": malformed})
    with pytest.raises(FaultError, match=r"no keep-failing rule names deployment anthropic/chat "
                                         r"\(rules name: anthropic/claude, claude, openlab/claude\)"):
        injector.handle({"op": "stop-failing", "deployment": "anthropic/chat"})
    with pytest.raises(FaultError, match="deployment name 'Claude' is invalid"):  # fail-shard reads it alike
        injector.handle({"op": "fail-shard", "deployment": "Claude", "keep_failing": True})
    assert injector.handle({"op": "status"})["failing"] == ["anthropic/claude", "claude", "openlab/claude"]

    assert injector.handle({"op": "stop-failing", "deployment": "anthropic/claude"})["stopped"] == 1
    assert injector.handle({"op": "stop-failing", "deployment": "claude"})["stopped"] == 1  # the any-tenant rule only
    assert injector.handle({"op": "status"})["failing"] == ["openlab/claude"]
    assert injector.handle({"op": "stop-failing"})["stopped"] == 1


async def test_a_control_socket_path_holding_a_file_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    """A --control-socket naming a file (a typo) is refused; the file was deleted to bind there."""
    path = tmp_path / "notes.txt"
    path.write_text("precious")
    server = ControlServer(FaultInjector([]), path)
    with pytest.raises(FaultError, match="not a socket"):
        await server.start()
    assert path.read_text() == "precious"
    folder = tmp_path / "a-dir"
    folder.mkdir()
    with pytest.raises(FaultError, match="not a socket"):
        await ControlServer(FaultInjector([]), folder).start()
    linked = tmp_path / "notes-link"  # a symlink to a file is no socket either: kept
    linked.symlink_to(path)
    with pytest.raises(FaultError, match="not a socket"):
        await ControlServer(FaultInjector([]), linked).start()
    assert linked.is_symlink() and path.read_text() == "precious"
    dangling = tmp_path / "left.sock"  # a symlink a fleet left (to a socket gone): replaced
    dangling.symlink_to(tmp_path / "gone.sock")
    server = ControlServer(FaultInjector([]), dangling)
    await server.start()
    try:
        assert dangling.is_socket() and not dangling.is_symlink()
    finally:
        await server.close()


def test_a_reader_gone_ends_the_fault_command_as_sigpipe_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """`maia-simnode fault status -o json | head` ended in a traceback once the answer outgrew
    the pipe (BrokenPipeError); maiactl exits 141 without a word there, and so does this."""

    class Gone:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            raise ValueError("not a file")

    monkeypatch.setattr(faultcli, "send", lambda path, request: {"ok": True, "faults": {}})
    monkeypatch.setattr("sys.stdout", Gone())
    assert faultcli.main(["--control-socket", "/s", "status", "-o", "json"]) == 141


def _one_loading_node() -> tuple[FaultInjector, SimulatedNode]:
    from controller.simnode.agent import DesiredShard, DesiredState

    node = SimulatedNode(NodeSpec("rack-00-n00", "rack-00"), "127.0.0.1:1")
    node.agent.apply(DesiredState(1, (DesiredShard(ShardKey("svc", 0, 0, "lab"), generation=1),)), 0.0)
    return FaultInjector([node]), node


@pytest.mark.parametrize("request_, said", [
    ({"op": "fail-accelerator", "index": 1, "reason": "x" * 300}, "reason is 300 characters long; the protocol takes "
                                                                  "at most 256"),
    ({"op": "fail-accelerator", "index": 1, "reason": "link\ndown"}, "reason holds a control character"),
    ({"op": "fail-shard", "deployment": "svc", "message": "m" * 1100}, "message is 1100 characters long"),
    ({"op": "fail-shard", "deployment": "svc", "message": "HBM ECC\nerror"}, "message holds a control character"),
], ids=["reason too long", "reason with a line break", "message too long", "message with a line break"])
def test_a_fault_whose_text_the_protocol_refuses_is_refused_changing_nothing(request_: dict, said: str) -> None:
    """Accepted, the agent reported it in every heartbeat, the controller refused each one, and
    the node reconnected for ever with its failure never told (found in review)."""
    injector, node = _one_loading_node()
    with pytest.raises(FaultError, match=said.replace("(", r"\(")):
        injector.handle({"nodes": ["rack-00-n00"], **request_})
    assert node.failed_accelerators == {} and [r.phase.value for r in node.agent.reports()] == ["loading"]


async def test_a_heartbeat_delay_ended_counts_at_once(fake: tuple[FakeController, str]) -> None:
    """Revived (or the delay's --for run out), the node stayed silent until the heartbeat the delay
    had put off, up to the whole delay more, and the controller suspected it meanwhile (found in
    review)."""
    controller, address = fake  # it tells 200 ms heartbeats
    node = SimulatedNode(NodeSpec("rack-00-n00", "rack-00"), address, load_delay_s=0.0)
    injector = FaultInjector([node])
    task = asyncio.create_task(node.run())
    try:
        await wait_until(lambda: len(controller.heartbeats()) >= 2)
        injector.handle({"op": "delay-heartbeats", "nodes": ["rack-00-n00"], "delay_s": 60})
        count = len(controller.heartbeats())
        await asyncio.sleep(1.0)
        assert len(controller.heartbeats()) <= count + 1  # delayed: the next is due in 60 s
        injector.handle({"op": "revive", "nodes": ["rack-00-n00"]})
        count = len(controller.heartbeats())
        await wait_until(lambda: len(controller.heartbeats()) >= count + 2, timeout=3)
    finally:
        node.stop()
        await asyncio.wait_for(task, timeout=5)
