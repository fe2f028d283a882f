"""A hostile or broken agent, over real gRPC on SQLite and PostgreSQL: bounded reports, a
per-stream rate limit, reports for shards the node was never given refused (and recorded),
and flushes that one node's bad data cannot fail for everyone."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import generate_latest
from sqlalchemy import select

from controller import limits
from controller.agents import AgentHub, _Batch
from controller.api.server import ControllerApp
from controller.groupcommit import PACE_JITTER, PACE_MAX_S, PACE_MIN_S
from controller.store import audit
from controller.store import models as m
from controller.usecases import agents as agent_cases
from controller.usecases.agents import NodeBeat, RefusedReports
from controller.domain.values import ShardReport
from grpc_harness import (
    SimFleet, Stubs, admin_token_of, connected_agent, eventually, issue_token, running_controller, spec, topology,
)
from maia.v1 import admin_pb2, agent_pb2, common_pb2, deployments_pb2


@pytest.fixture
async def strict_app(migrated_db_url: str, tmp_path) -> AsyncIterator[ControllerApp]:
    """A controller whose agent streams may send 20 reports at once, 5 a second after that."""
    async with running_controller(migrated_db_url, tmp_path, agent_reports_per_second=5.0, agent_reports_burst=20,
                                  heartbeat_timeout_s=60) as app:
        yield app


@asynccontextmanager
async def _seeded(app: ControllerApp) -> AsyncIterator[Stubs]:
    """Admin stubs on `app`, with rack rack-a and tenant lab."""
    stubs = Stubs.connect(app.address, admin_token_of(app))
    try:
        await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
        yield stubs
    finally:
        await stubs.channel.close()


@pytest.fixture
async def strict(strict_app: ControllerApp) -> AsyncIterator[Stubs]:
    async with _seeded(strict_app) as stubs:
        yield stubs


@pytest.fixture
async def slow_refill(migrated_db_url: str, tmp_path) -> AsyncIterator[Stubs]:
    """A controller whose agent streams may send 20 reports at once, then one every 10 s: 25
    reports overflow it unless they take 50 s to arrive (at 5 a second, 25 written at once were
    all let through once on a loaded machine: they arrived over more than a second)."""
    async with running_controller(migrated_db_url, tmp_path, agent_reports_per_second=0.1, agent_reports_burst=20,
                                  heartbeat_timeout_s=60) as app, _seeded(app) as stubs:
        yield stubs


def _status(deployment: str, phase: int = common_pb2.SHARD_PHASE_RUNNING, **kw) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(shard_status=agent_pb2.ShardStatus(deployment=deployment, phase=phase, **kw))


@pytest.mark.parametrize(("message", "details"), [
    (agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=1, shards=[
        agent_pb2.ShardStatus(deployment="svc", replica=i) for i in range(5000)])),
     "node n1: heartbeat shards has 5000 entries; at most 4096"),
    (_status("svc", message="m" * 2000), "node n1: shard status message is 2000 characters long; at most 1024"),
    (_status("svc", message="bad\x00"), "node n1: shard status message contains a control character (U+0000) at position 3"),
    (_status("x" * 100_000), "node n1: shard status deployment name 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... "
                             "(100000 characters) is 100000 characters long; at most 63"),
    (_status("svc", replica=-1), "node n1: shard status replica must be between 0 and 4095, got -1"),
    (agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=1, power_draw_w=float("nan"))),
     "node n1: heartbeat power_draw_w must be a finite number, got nan"),
    # Phases an agent never reports: ASSIGNED is the controller's (committed, not acknowledged yet),
    # UNSPECIFIED says nothing, and a value this controller does not know is not guessed at.
    (_status("svc", common_pb2.SHARD_PHASE_ASSIGNED),
     "node n1: shard status phase must be one an agent reports (LOADING, RUNNING, FAILED or STOPPED), got ASSIGNED"),
    (_status("svc", common_pb2.SHARD_PHASE_UNSPECIFIED),
     "node n1: shard status phase must be one an agent reports (LOADING, RUNNING, FAILED or STOPPED), "
     "got UNSPECIFIED"),
    (_status("svc", 42),
     "node n1: shard status phase must be one an agent reports (LOADING, RUNNING, FAILED or STOPPED), got 42"),
    (agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=1, shards=[
        agent_pb2.ShardStatus(deployment="svc", phase=common_pb2.SHARD_PHASE_RUNNING),
        agent_pb2.ShardStatus(deployment="svc", replica=1, phase=common_pb2.SHARD_PHASE_ASSIGNED)])),
     "node n1: shard status phase must be one an agent reports (LOADING, RUNNING, FAILED or STOPPED), got ASSIGNED"),
])
async def test_an_out_of_bounds_report_ends_the_stream_with_invalid_argument(strict: Stubs, message, details):
    agent = await connected_agent(strict, "n1")
    agent.send(message)
    error = await agent.reader_error()
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == details
    node = await eventually(lambda: strict.admin.GetNode(admin_pb2.GetNodeRequest(id="n1")),
                            lambda n: not n.connected, what="n1 disconnected")
    assert node.power_draw_w == 0.0  # nothing of the refused stream was written


async def _silent(until: asyncio.Event) -> AsyncIterator[agent_pb2.AgentMessage]:
    """A Connect stream's requests: none, until `until` is set (its caller holds it open, saying nothing)."""
    await until.wait()
    for message in ():  # then it ends, having said nothing
        yield message


async def _ended(call: grpc.aio.StreamStreamCall, timeout: float = 10.0) -> grpc.aio.AioRpcError:
    """The status a Connect `call` ends with, within `timeout` seconds (it sends its caller nothing)."""
    async def read() -> None:
        async for message in call:
            raise AssertionError(f"the controller sent {message!r}")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(read(), timeout)
    return info.value


@pytest.mark.parametrize(("role", "tenant"), [("tenant", "lab"), ("node-bootstrap", "")])
async def test_a_caller_whose_role_never_connects_is_refused_as_its_stream_opens(
        strict: Stubs, strict_app: ControllerApp, role: str, tenant: str):
    """Refused before any message is read: a Hello would be refused anyway, and without one a
    tenant's token held streams open for as long as it liked."""
    caller = Stubs.connect(strict_app.address, await issue_token(strict_app.db, role, tenant=tenant))
    said_nothing = asyncio.Event()
    try:
        calls = [caller.agent.Connect(_silent(said_nothing)) for _ in range(5)]
        errors = await asyncio.gather(*(_ended(call, timeout=5.0) for call in calls))
    finally:
        said_nothing.set()
        await caller.channel.close()
    assert {(e.code(), e.details()) for e in errors} == {(
        grpc.StatusCode.PERMISSION_DENIED,
        f"Connect needs a node's own credential (returned by Register); the caller's token has role {role}")}


async def test_a_stream_without_a_hello_in_time_ends_with_invalid_argument(
        strict: Stubs, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(limits, "HELLO_TIMEOUT_S", 0.5)
    began = time.monotonic()
    said_nothing = asyncio.Event()
    try:  # an admin may Connect: only the Hello is missing
        error = await _ended(strict.agent.Connect(_silent(said_nothing)))
    finally:
        said_nothing.set()
    assert time.monotonic() - began >= 0.5
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the first message on Connect must be Hello (node_id, session_id); none came within 0.5 s"
    agent = await connected_agent(strict, "n1")  # one that says it in time is served as ever
    agent.heartbeat(1, 700.0)
    await eventually(lambda: strict.admin.GetNode(admin_pb2.GetNodeRequest(id="n1")),
                     lambda n: n.power_draw_w == 700.0, what="heartbeat written")
    await agent.close()


async def test_a_refused_report_repeated_is_recorded_once_a_window(strict: Stubs, strict_app: ControllerApp):
    """An agent that keeps repeating a report of a shard that is not its own (one it was taken,
    STOPPED, in every heartbeat) wrote an event and a hash-chained audit entry at every flush, for
    ever (found by exploratory testing). Repeats wait for the window's end, counted; a shard not
    recorded yet is recorded at once and named, even with the samples full (found in review)."""
    impostor = await connected_agent(strict, "impostor")

    async def refusals() -> list[tuple]:
        async with strict_app.db.unit_of_work() as uow:
            events = await uow.session.scalars(
                select(m.Event).where(m.Event.kind == "agent.reports_refused").order_by(m.Event.id))
            return [(e.data["count"], e.data["samples"]) for e in events]

    for shard in range(5):  # five shards at once: the samples are full
        impostor.send(_status("ghost", replica=0, shard=shard))
    await eventually(refusals, lambda e: sum(count for count, _ in e) == 5, what="the first refusals recorded")
    first = len(await refusals())
    for _ in range(4):  # repeats of all five, across several flushes (every 0.2 s): held, samples full
        for shard in range(5):
            impostor.send(_status("ghost", replica=0, shard=shard))
        await asyncio.sleep(0.3)
    assert len(await refusals()) == first
    impostor.send(_status("ghost", replica=0, shard=9))  # a shard not recorded: at once, and named
    events = await eventually(refusals, lambda e: len(e) == first + 1, what="a new shard's refusal recorded")
    assert events[-1] == (21, [["ghost", 0, 0], ["ghost", 0, 1], ["ghost", 0, 2], ["ghost", 0, 3], ["ghost", 0, 9]])
    async with strict_app.db.unit_of_work() as uow:
        entries = [e for e in await audit.list_entries(uow.session) if e.action == "agent.reports_refused"]
    assert [e.detail["count"] for e in entries] == [count for count, _ in events]
    await impostor.close()


async def test_a_flooding_stream_is_refused_with_retry_info(slow_refill: Stubs):
    agent = await connected_agent(slow_refill, "n1")
    for seq in range(25):  # a burst of 20 is allowed
        agent.heartbeat(seq, 100.0)
    agent.send(None)  # half-close: every write is done before the controller answers
    error = await agent.reader_error()
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details().startswith("node n1 sent more than 0.1 reports a second (burst 20); retry in ")
    retry_ms = dict(error.trailing_metadata())["retry-after-ms"]
    assert 1_000 <= int(retry_ms) <= 10_000  # one report's refill at most, a second at least (1 ms was told)


async def test_reports_for_shards_never_given_are_refused_and_recorded(strict: Stubs, strict_app: ControllerApp):
    owner = await connected_agent(strict, "owner")
    await strict.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
        spec=spec("svc", accelerators=4, locality=common_pb2.DOMAIN_NODE)))
    given = await owner.next_set(lambda s: len(s.assignments) == 1)
    impostor = await connected_agent(strict, "impostor")
    assignment = given.assignments[0]
    impostor.report(assignment, common_pb2.SHARD_PHASE_FAILED)  # someone else's shard
    impostor.send(_status("ghost", replica=3, shard=1))           # a shard nobody has
    impostor.heartbeat(1, 700.0)                                  # its own heartbeat still counts

    async def refusals() -> list[tuple]:
        async with strict_app.db.unit_of_work() as uow:
            events = await uow.session.scalars(
                select(m.Event).where(m.Event.kind == "agent.reports_refused").order_by(m.Event.id))
            return [(e.object_id, e.data["count"], e.data["samples"]) for e in events]

    # One event a flush that took refused reports: the two reports arrive one after the other and
    # a flush (every 0.2 s) may come between them on a loaded machine (then two events of one).
    events = await eventually(refusals, lambda e: sum(count for _, count, _ in e) >= 2, what="refusals recorded")
    assert {node for node, _, _ in events} == {"impostor"} and sum(count for _, count, _ in events) == 2
    assert [sample for _, _, samples in events for sample in samples] == [["svc", 0, 0], ["ghost", 3, 1]]
    async with strict_app.db.unit_of_work() as uow:  # and handed to the audit log
        entries = [e for e in await audit.list_entries(uow.session) if e.action == "agent.reports_refused"]
    assert {(e.actor, e.outcome) for e in entries} == {("impostor", "PERMISSION_DENIED")}
    assert sum(e.detail["count"] for e in entries) == 2
    await eventually(lambda: strict.admin.GetNode(admin_pb2.GetNodeRequest(id="impostor")),
                     lambda n: n.power_draw_w == 700.0, what="impostor heartbeat written")
    dep = await strict.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc"))
    assert [p.phase for p in dep.placements] == [common_pb2.SHARD_PHASE_ASSIGNED]  # not FAILED
    owner.report(assignment, common_pb2.SHARD_PHASE_RUNNING)  # the owner's own report is taken
    await eventually(lambda: strict.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc")),
                     lambda d: [p.phase for p in d.placements] == [common_pb2.SHARD_PHASE_RUNNING],
                     what="owner's report applied")
    await owner.close()
    await impostor.close()


def test_a_batch_is_chunked_by_whole_nodes_those_with_reports_first():
    now = datetime.now(timezone.utc)
    report = ShardReport("svc", 0, 0, 1, "running")
    batch = _Batch({f"n{i}": NodeBeat(now, 1.0) for i in range(5)},
                   [("n1", report)] * 3 + [("n3", report)], {"n4": RefusedReports(1, ())})
    chunks = batch.chunks(4, beats_size=2)  # at most 4 reports and refusals, 2 heartbeats
    assert [c.nodes() for c in chunks] == [["n1", "n3"], ["n4", "n0"], ["n2"]]
    assert [len(c.reports) for c in chunks] == [4, 0, 0]
    assert sum(len(c.beats) for c in chunks) == 5 and chunks[1].refused == {"n4": RefusedReports(1, ())}


async def test_a_flush_publishes_each_chunk_once_it_is_written_the_reports_first(database, monkeypatch):
    monkeypatch.setattr("controller.limits.FLUSH_CHUNK", 1)
    seen: list[tuple[str, list[str]]] = []

    async def written(chunk: _Batch) -> dict:
        seen.append(("written", chunk.nodes()))
        return {f"t1/of-{node_id}": object() for node_id, _ in chunk.reports}

    async def published(views: dict) -> None:
        seen.append(("published", sorted(views)))

    hub = AgentHub(database, heartbeat_timeout_s=10, on_liveness_change=lambda: None, on_deployments_changed=published)
    monkeypatch.setattr(hub._buffer, "_flush_chunk", written)
    now = datetime.now(timezone.utc)
    hub._buffer._beats = {f"n{i}": NodeBeat(now, 100.0) for i in range(3)}
    hub._buffer._reports = [(n, ShardReport("svc", 0, 0, 1, "running", tenant="t1")) for n in ("n2", "n0")]
    hub._buffer._received = [0.0, 0.0]
    await hub.flush()  # one report a chunk; the heartbeats ride along, the heartbeat-only node's last
    assert seen == [("written", ["n0"]), ("published", ["t1/of-n0"]),
                    ("written", ["n2", "n1"]), ("published", ["t1/of-n2"])]


async def test_one_node_failing_its_write_never_drops_the_others_heartbeats(database, monkeypatch):
    async with database.unit_of_work() as uow:
        uow.session.add(m.Zone(id="z"))
        uow.session.add(m.Row(id="r", zone_id="z"))
        uow.session.add(m.Rack(id="k", row_id="r"))
        for i in range(3):
            uow.session.add(m.Node(id=f"n{i}", rack_id="k", accelerators=4))
        await uow.commit()
    real = agent_cases.flush_reports

    async def failing_for_n1(uow, beats, reports, refused=None, *, views=None):
        if "n1" in beats:
            raise RuntimeError("n1's data breaks the write")
        return await real(uow, beats, reports, refused, views=views)

    monkeypatch.setattr(agent_cases, "flush_reports", failing_for_n1)

    async def nothing(_: set[str]) -> None:
        return None

    hub = AgentHub(database, heartbeat_timeout_s=10, on_liveness_change=lambda: None, on_deployments_changed=nothing)
    now = datetime.now(timezone.utc)
    hub._buffer._beats = {f"n{i}": NodeBeat(now, 100.0 + i) for i in range(3)}
    await hub.flush()
    async with database.unit_of_work() as uow:
        draws = {n.id: n.power_draw_w for n in await uow.session.scalars(select(m.Node))}
    assert draws == {"n0": 100.0, "n1": 0.0, "n2": 102.0}


async def test_a_database_outage_fails_a_flush_once_not_node_by_node(database, monkeypatch, caplog):
    """With the database down, a failed chunk was written again node by node: each node's write
    failed too, a 15 KB traceback a node (4,096 at a time on a big cluster), each trying the
    database again. An outage is said once, and nothing is tried again until the next flush."""
    from sqlalchemy.exc import OperationalError

    calls: list[list[str]] = []

    async def database_down(uow, beats, reports, refused=None, *, views=None):
        calls.append(sorted(beats))
        raise OperationalError("UPDATE nodes", None, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(agent_cases, "flush_reports", database_down)

    async def nothing(_: set[str]) -> None:
        return None

    hub = AgentHub(database, heartbeat_timeout_s=10, on_liveness_change=lambda: None, on_deployments_changed=nothing)
    now = datetime.now(timezone.utc)
    for flush in range(3):
        hub._buffer._beats = {f"n{i}": NodeBeat(now, 100.0 + i) for i in range(5)}
        with caplog.at_level(logging.WARNING, logger="maia.agents"):
            await hub.flush()
    assert calls == [[f"n{i}" for i in range(5)]] * 3  # the chunk once a flush, never node by node
    said = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert said == ["could not write the heartbeats and 0 shard reports of 5 nodes (n0, n1, n2 and 2 more): the "
                    "database failed: OperationalError: (builtins.ConnectionRefusedError) connection refused"]
    assert not any(r.exc_info for r in caplog.records)


async def test_a_join_storm_beyond_the_admission_queue_is_told_when_to_retry(migrated_db_url: str, tmp_path) -> None:
    """One Register inside at a time and none queued: of 24 at once some are refused UNAVAILABLE
    with retry-after-ms (and google.rpc.RetryInfo), never INTERNAL, and each registers on retry."""
    async with running_controller(migrated_db_url, tmp_path, agent_admission_concurrency=1, agent_admission_queue=0) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        try:
            await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))

            async def register(i: int) -> float | None:
                node = agent_pb2.NodeInfo(node_id=f"n{i:02d}", rack="rack-a", accelerators=4,
                                          accelerator_model="maia-100")
                try:
                    await stubs.agent.Register(agent_pb2.RegisterRequest(node=node))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    assert "busy with agent registrations" in exc.details()
                    assert rpc_status.from_call(exc) is not None
                    return int(dict(exc.trailing_metadata())["retry-after-ms"]) / 1000
                return None

            told = await asyncio.gather(*(register(i) for i in range(24)))
            refused = [i for i, wait in enumerate(told) if wait is not None]
            assert refused and all(PACE_MIN_S <= told[i] <= PACE_MAX_S * (1 + PACE_JITTER) for i in refused)
            assert app.hub.admission.refused + app.hub.shed == len(refused)
            for i in refused:  # what the refusal said: come back later, and then it works
                assert await register(i) is None
            nodes = (await stubs.admin.ListNodes(admin_pb2.ListNodesRequest(page_size=100))).nodes
            assert len(nodes) == 24
        finally:
            await stubs.channel.close()


async def test_a_register_the_gate_would_refuse_is_shed_before_the_interceptor_chain(
        migrated_db_url: str, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """With the gate full (one inside, no queue), a Register is refused UNAVAILABLE with the
    pacer's retry time (retry-after-ms and google.rpc.RetryInfo) before any interceptor runs: a
    caller with a token nobody issued hears 'busy', not UNAUTHENTICATED (no token check), no audit
    entry is written for it, no per-call log line, and it is counted in maia_grpc_server_shed.
    Each refused caller takes a slot of the pacer. Once the gate has room, the next Register is
    served."""
    async with running_controller(migrated_db_url, tmp_path, agent_admission_concurrency=1, agent_admission_queue=0) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        stranger = Stubs.connect(app.address, "maia_0123456789abcdef.not-a-token-anyone-issued")
        bootstrap = Stubs.connect(app.address, await issue_token(app.db, "node-bootstrap", name="storm"))
        try:
            await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
            node = agent_pb2.NodeInfo(node_id="n00", rack="rack-a", accelerators=4, accelerator_model="maia-100")
            caplog.set_level("DEBUG", logger="maia.api")
            waits = []
            async with app.hub.admission.admit():  # the gate's one place taken: a storm in progress
                for caller in (stranger, bootstrap):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await caller.agent.Register(agent_pb2.RegisterRequest(node=node))
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
                    assert "busy with agent registrations" in refused.value.details()
                    waits.append(int(dict(refused.value.trailing_metadata())["retry-after-ms"]))
                    assert rpc_status.from_call(refused.value).details[0].Is(
                        error_details_pb2.RetryInfo.DESCRIPTOR)
            assert all(PACE_MIN_S * 1000 <= wait <= PACE_MAX_S * 1000 for wait in waits)
            assert app.hub.shed == 2 and app.hub.pacer.stats.paced == 2 and app.hub.admission.refused == 0
            assert not [r for r in caplog.records if "NodeAgentService/Register" in r.getMessage()
                        and r.getMessage().startswith("rpc ")]
            scrape = generate_latest(app.metrics.registry).decode()
            assert 'maia_grpc_server_shed_total{method="Register",service="maia.v1.NodeAgentService"} 2.0' in scrape
            assert 'method="Register"' not in "".join(
                line for line in scrape.splitlines() if line.startswith("maia_grpc_server_handled_total"))
            registered = await bootstrap.agent.Register(agent_pb2.RegisterRequest(node=node))  # room again
            assert registered.session_id
            async with app.db.unit_of_work() as uow:
                entries = [e for e in await audit.list_entries(uow.session, limit=1000)
                           if e.action == "/maia.v1.NodeAgentService/Register"]
            assert [(e.actor, e.outcome) for e in entries] == [("storm", "OK")]  # the refusals left none
        finally:
            for s in (stubs, stranger, bootstrap):
                await s.channel.close()


async def test_a_join_storm_of_real_agents_never_times_out_in_the_admission_queue(migrated_db_url: str, tmp_path) -> None:
    """128 `maia-simnode` agents start at once against one Register at a time, each Register with a
    2 s deadline: about as much work as that deadline (128 Registers one by one and the hellos'
    batches, more on a busy machine). A caller that would outwait its deadline is refused RESOURCE_EXHAUSTED at
    once and comes back when told; none waits in the queue until its deadline passes, and every
    node ends up ready."""
    racks, per_rack = 8, 16
    async with running_controller(migrated_db_url, tmp_path, agent_admission_concurrency=1,
                                  agent_admission_queue=10_000, heartbeat_timeout_s=60) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        await stubs.admin.ApplyTopology(topology({f"rack-{r:02d}": "row-a" for r in range(racks)}))
        token = await issue_token(app.db, "node-bootstrap", name="storm")
        fleet = SimFleet(app.address, racks=racks, nodes_per_rack=per_rack, token=token, log_dir=tmp_path,
                         extra_args=("--register-timeout", "2", "--stagger", "0"))
        try:
            await eventually(lambda: stubs.admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest()),
                             lambda s: s.nodes_ready == racks * per_rack, timeout=120, every=0.5,
                             what=f"{racks * per_rack} nodes ready")
            gate = app.hub.admission
            assert gate.abandoned == 0, fleet.log_tail()
            assert gate.admitted >= racks * per_rack  # every Register went through it (and the hellos' batches)
            scrape = generate_latest(app.metrics.registry).decode()
            assert "maia_agent_admission_abandoned_total 0.0" in scrape
            assert f"maia_agent_admission_admitted_total {float(gate.admitted)}" in scrape
        finally:
            await fleet.stop()
            await stubs.channel.close()


async def test_registers_arriving_together_commit_together_and_a_refused_one_fails_alone(migrated_db_url: str,
                                                                                         tmp_path) -> None:
    """32 Registers at once over real gRPC: they are committed in batches (fewer transactions than
    calls), the one naming an unknown rack gets its own FAILED_PRECONDITION and its own audit entry,
    the others are registered and audited OK, and the chain stays intact."""
    async with running_controller(migrated_db_url, tmp_path) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        bootstrap = Stubs.connect(app.address, await issue_token(app.db, "node-bootstrap", name="storm"))
        try:
            await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))

            async def register(i: int) -> agent_pb2.RegisterResponse | grpc.aio.AioRpcError:
                node = agent_pb2.NodeInfo(node_id=f"n{i:02d}", rack="rack-zz" if i == 7 else "rack-a",
                                          accelerators=4, accelerator_model="maia-100")
                try:
                    return await bootstrap.agent.Register(agent_pb2.RegisterRequest(node=node))
                except grpc.aio.AioRpcError as exc:
                    return exc

            answers = await asyncio.gather(*(register(i) for i in range(32)))
            refused = {i: a for i, a in enumerate(answers) if isinstance(a, grpc.aio.AioRpcError)}
            assert list(refused) == [7]
            assert refused[7].code() == grpc.StatusCode.FAILED_PRECONDITION
            assert refused[7].details() == "rack rack-zz is not in the topology; apply it first"
            assert all(a.node_credential and a.session_id for i, a in enumerate(answers) if i != 7)
            stats = app.hub._joins._registers.stats
            assert stats.items == 32 and stats.batches < 32 and stats.alone == 0
            nodes = (await stubs.admin.ListNodes(admin_pb2.ListNodesRequest(page_size=100))).nodes
            assert sorted(n.id for n in nodes) == [f"n{i:02d}" for i in range(32) if i != 7]
            async with app.db.unit_of_work() as uow:
                entries = [e for e in await audit.list_entries(uow.session, limit=1000)
                           if e.action == "/maia.v1.NodeAgentService/Register"]
                assert (await audit.verify_chain(uow.session)).intact
            assert sorted((e.object_id, e.outcome) for e in entries) == sorted(
                (f"n{i:02d}", "FAILED_PRECONDITION" if i == 7 else "OK") for i in range(32))
            assert all(e.actor == "storm" for e in entries)
        finally:
            await bootstrap.channel.close()
            await stubs.channel.close()
