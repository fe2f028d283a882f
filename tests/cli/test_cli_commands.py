"""maiactl commands against a fake controller: a real (threaded) gRPC server on 127.0.0.1:0
holding tenants, topology and deployments in memory. Checks what is sent, what is printed and
the exit codes, including the error paths."""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import grpc
import pytest

from cli_harness import fake_controller, silent_address
from controller.cli.client import open_aio_channel
from controller.cli.commands import explain
from controller.cli.commands.nodes import drain_moves
from controller.cli.commands.wait import progress_line
from controller.cli.config import Connection
from controller.cli.main import main
from controller.cli.vocab import deployment_phase_word, node_state_word, shard_phase_word
from maia.v1 import admin_pb2, admin_pb2_grpc, common_pb2, deployments_pb2 as D, deployments_pb2_grpc
from tests.addresses import closed_port_address

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def dry_run(admin: FakeAdmin, context) -> bool:
    """Whether a write is asked as a dry run (`maia-dry-run: all`), said back as the controller
    does; never, as a controller older than dry runs by metadata, when `admin.knows_dry_runs` is off."""
    if not admin.knows_dry_runs or ("maia-dry-run", "all") not in tuple(context.invocation_metadata()):
        return False
    context.set_trailing_metadata((("maia-dry-run", "all"),))
    return True


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.tenants: dict[str, admin_pb2.Tenant] = {}
        self.created: list[str] = []
        self.topology = admin_pb2.Topology()
        self.knows_dry_runs = True  # off: as a controller older than dry runs by metadata (writes)
        self.refuse_writes: set[str] = set()  # tenants whose CreateTenant is refused, its dry run not
        self.answer_late: set[str] = set()  # tenants whose next UpdateTenant is written, then answered late
        self.events: list[admin_pb2.EventRecord] | None = None  # None: ListEvents unimplemented, as before
        self.refuse_events = False  # ListEvents refused PERMISSION_DENIED

    def ListEvents(self, request, context):  # noqa: N802
        if self.refuse_events:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "a tenant token may not read events of nodes")
        if self.events is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no events here")
        self.calls.append(f"ListEvents {request.object_kind}/{request.tenant}/{request.object_id}")
        return admin_pb2.ListEventsResponse(events=[e for e in self.events if e.object_kind == request.object_kind
                                                    and e.object_id == f"{request.tenant}/{request.object_id}"])

    def CreateTenant(self, request, context):  # noqa: N802
        dry = dry_run(self, context)
        self.calls.append("CreateTenant" + " (dry run)" * dry)
        if request.id in self.tenants:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"tenant {request.id} exists")
        missing = [t for t in request.excludes if t not in self.tenants]
        if missing:  # as the real controller: excluded tenants must exist
            context.abort(grpc.StatusCode.NOT_FOUND, f"tenant {request.id} excludes unknown tenant(s): {missing}")
        if dry:
            return request
        if request.id in self.refuse_writes:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"tenant {request.id}: refused at its write")
        self.created.append(request.id)
        self.tenants[request.id] = request
        return request

    def GetTenant(self, request, context):  # noqa: N802
        if request.id not in self.tenants:
            context.abort(grpc.StatusCode.NOT_FOUND, f"tenant {request.id} not found")
        return self.tenants[request.id]

    def UpdateTenant(self, request, context):  # noqa: N802
        if dry_run(self, context):
            self.calls.append("UpdateTenant (dry run)")
            return request
        self.calls.append("UpdateTenant")
        self.tenants[request.id] = request
        if request.id in self.answer_late:  # written; the answer comes after the caller's deadline
            self.answer_late.discard(request.id)
            time.sleep(1.5)
        return request

    def ListTenants(self, request, context):  # noqa: N802
        return admin_pb2.ListTenantsResponse(tenants=list(self.tenants.values()))

    def ApplyTopology(self, request, context):  # noqa: N802
        if dry_run(self, context):
            self.calls.append("ApplyTopology (dry run)")
            return request
        self.calls.append("ApplyTopology")
        self.topology.MergeFrom(request)
        return self.topology

    def GetTopology(self, request, context):  # noqa: N802
        return self.topology

    def CordonNode(self, request, context):  # noqa: N802
        if request.id.startswith("known-"):
            return admin_pb2.Node(id=request.id, shards=2)
        context.abort(grpc.StatusCode.NOT_FOUND, f"node {request.id} not found")

    def CreateToken(self, request, context):  # noqa: N802
        """As a controller older than node-bound tokens: `node` (field 5) is not read."""
        self.calls.append("CreateToken")
        return admin_pb2.CreateTokenResponse(secret="maia_tok_secret", token=admin_pb2.Token(
            id="t0ken", name=request.name, role=request.role, tenant=request.tenant))

    def RevokeToken(self, request, context):  # noqa: N802
        self.calls.append(f"RevokeToken {request.id}")
        return admin_pb2.Token(id=request.id)

    def GetVersion(self, request, context):  # noqa: N802
        self.calls.append("GetVersion")
        return admin_pb2.VersionInfo(version="9.9.9", schema_revision="0001_fake",
                                     database_revision=getattr(self, "database_revision", "0001_fake"))

    def GetClusterSummary(self, request, context):  # noqa: N802
        return admin_pb2.ClusterSummary(nodes_ready=4, accelerators_total=64.0, accelerators_used=2.5,
                                        deployments_by_phase={"running": 1}, tenants=list(self.tenants.values()))


class FakeDeployments(deployments_pb2_grpc.DeploymentServiceServicer):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.deployments: dict[str, D.Deployment] = {}
        self.run_after_s: float | None = 0.3  # a submitted deployment turns Running after this
        self.fit_replicas = 0  # a dry run places this many replicas at most
        self.all_or_nothing = False  # ... and none when that is fewer than its min_replicas (as the solver)
        self.refuse_dry_runs: grpc.StatusCode | None = None  # every dry run refused so
        self.invalid: set[str] = set()  # deployments refused INVALID_ARGUMENT (dry runs too)
        self.answer_late: set[str] = set()  # deployments whose next update is written, then answered late
        self.lock = threading.Lock()

    def _dry_run(self, request, context) -> D.SubmitDeploymentResponse:
        # As the controller: a dry run of a stored name must replace it, and only a stored one can be.
        if request.spec.name in self.deployments and not request.replace_existing:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"deployment {request.spec.name} already exists")
        if request.replace_existing and request.spec.name not in self.deployments:
            context.abort(grpc.StatusCode.NOT_FOUND, f"deployment {request.spec.name} not found (nothing to replace)")
        if self.refuse_dry_runs is not None:
            context.abort(self.refuse_dry_runs, "a token that may not make dry runs")
        placed = min(self.fit_replicas, request.spec.replicas)
        if self.all_or_nothing and placed < request.spec.min_replicas:
            placed = 0
        dep = D.Deployment(spec=request.spec, phase=D.DEPLOYMENT_PHASE_PENDING, placed_replicas=placed)
        if dep.placed_replicas < request.spec.replicas:
            dep.reasons.add(code="CAPACITY", message="0/64 nodes fit", scope="")
        return D.SubmitDeploymentResponse(deployment=dep, dry_run=True)

    def SubmitDeployment(self, request, context):  # noqa: N802
        self.calls.append("SubmitDeployment")
        if request.spec.name in self.invalid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"deployment {request.spec.name}: priority out of range")
        if request.dry_run:
            return self._dry_run(request, context)
        with self.lock:
            if request.spec.name in self.deployments:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"deployment {request.spec.name} exists")
            dep = D.Deployment(spec=request.spec, phase=D.DEPLOYMENT_PHASE_PENDING)
            dep.reasons.add(code="CAPACITY", message="waiting for nodes")
            self.deployments[request.spec.name] = dep
        if self.run_after_s is not None:
            threading.Timer(self.run_after_s, self._run, args=[request.spec.name]).start()
        return D.SubmitDeploymentResponse(deployment=dep)

    def _run(self, name: str) -> None:
        with self.lock:
            dep = self.deployments[name]
            dep.phase = D.DEPLOYMENT_PHASE_RUNNING
            dep.ClearField("reasons")
            dep.placed_replicas = dep.running_replicas = dep.spec.replicas

    def GetDeployment(self, request, context):  # noqa: N802
        with self.lock:
            if request.name not in self.deployments:
                context.abort(grpc.StatusCode.NOT_FOUND, f"deployment {request.name} not found")
            return D.Deployment.FromString(self.deployments[request.name].SerializeToString())

    def ListDeployments(self, request, context):  # noqa: N802
        with self.lock:
            return D.ListDeploymentsResponse(deployments=[d for d in self.deployments.values()
                                                          if not request.tenant or d.spec.tenant == request.tenant])

    def UpdateDeployment(self, request, context):  # noqa: N802
        """As the controller, without dry runs: written at the resource version asked; those
        named in `answer_late` answered after their caller's deadline."""
        dry = ("maia-dry-run", "all") in tuple(context.invocation_metadata())
        self.calls.append("UpdateDeployment" + " (dry run)" * dry)
        with self.lock:
            dep = self.deployments.get(request.spec.name)
            if dep is None or dep.resource_version != request.resource_version:
                context.abort(grpc.StatusCode.ABORTED, f"deployment {request.spec.name}: another version")
            if dry:
                context.set_trailing_metadata((("maia-dry-run", "all"),))
                return D.UpdateDeploymentResponse(deployment=D.Deployment(spec=request.spec,
                                                                          resource_version=dep.resource_version))
            dep.spec.CopyFrom(request.spec)
            dep.resource_version += 1
            answer = D.UpdateDeploymentResponse(deployment=dep)
        if request.spec.name in self.answer_late:
            self.answer_late.discard(request.spec.name)
            time.sleep(1.5)
        return answer

    def WatchDeployments(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "no watch here: clients poll")


@pytest.fixture
def fake():
    calls: list[str] = []
    admin, deployments = FakeAdmin(calls), FakeDeployments(calls)
    with fake_controller(admin, deployments, workers=8) as address:
        yield address, admin, deployments, calls


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_apply_examples_then_again_is_unchanged(fake, capsys) -> None:
    address, admin, deployments, calls = fake
    files = [str(EXAMPLES / "topology.yaml"), str(EXAMPLES / "tenants.yaml"), str(EXAMPLES / "claude-serving.yaml")]
    args = ["--controller", address, "apply"] + [a for f in files for a in ("-f", f)]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    # openlab first: anthropic excludes it, and the controller wants excluded tenants to exist
    assert out.splitlines() == ["topology configured", "tenant/openlab created", "tenant/anthropic created",
                                "tenant/msft-internal created", "deployment/claude-serving created"]
    # The plan asks the controller to judge each write as a dry run, except where the batch writes
    # what it refers to (anthropic's zones are the batch topology's; claude-serving's tenant is
    # new); then the writes, in dependency order.
    assert calls == ["ApplyTopology (dry run)", "CreateTenant (dry run)", "CreateTenant (dry run)",
                     "ApplyTopology", "CreateTenant", "CreateTenant", "CreateTenant", "SubmitDeployment"]
    assert admin.tenants["anthropic"].isolation == common_pb2.ISOLATION_DEDICATED_RACK
    assert deployments.deployments["claude-serving"].spec.shards_per_replica == 16

    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "tenant/anthropic unchanged" in out.splitlines()
    assert "deployment/claude-serving unchanged" in out.splitlines()
    assert "UpdateTenant" not in calls


def test_apply_changed_tenant_is_configured(fake, capsys, tmp_path) -> None:
    address, admin, _, calls = fake
    f = tmp_path / "t.yaml"
    f.write_text("kind: Tenant\nid: a\nisolation: shared\n")
    assert run(capsys, "--controller", address, "apply", "-f", str(f))[0] == 0
    f.write_text("kind: Tenant\nid: a\nisolation: dedicated_node\nmax_accelerators: 8\n")
    code, out, _ = run(capsys, "--controller", address, "diff", "-f", str(f))  # field by field, as for deployments
    assert code == 1 and "isolation: shared -> dedicated_node" in out and "max_accelerators: (unset) -> 8" in out, out
    code, out, _ = run(capsys, "--controller", address, "apply", "-f", str(f))
    assert (code, out.splitlines()[0]) == (0, "tenant/a configured")
    assert admin.tenants["a"].isolation == common_pb2.ISOLATION_DEDICATED_NODE


def test_malformed_manifest_exits_2_and_sends_nothing(fake, capsys, tmp_path) -> None:
    address, _, _, calls = fake
    f = tmp_path / "x.yaml"
    f.write_text("kind: Tenant\nid: a\n---\nkind: Deployment\nname: foo\ntenant: a\nreplicas: 1\n"
                 "shards_per_replica: 1\nshard: {accelerators: four}\n")
    code, out, err = run(capsys, "--controller", address, "apply", "-f", str(f))
    assert code == 2
    assert out == ""
    assert err.strip() == (f"error: {f} document 2 (Deployment 'foo'): shard.accelerators: "
                           "expected an integer, got 'four'")
    assert calls == []


def test_get_json_is_one_document_and_table_lists_names(fake, capsys) -> None:
    address, _, _, _ = fake
    run(capsys, "--controller", address, "apply", "-f", str(EXAMPLES / "tenants.yaml"),
        "-f", str(EXAMPLES / "copilot-chat.yaml"), "-f", str(EXAMPLES / "phi-row.yaml"))
    code, out, _ = run(capsys, "--controller", address, "get", "deployments", "-o", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["kind"] == "List"
    assert sorted(d["name"] for d in doc["items"]) == ["copilot-chat", "phi-row"]
    code, out, _ = run(capsys, "get", "deployments", "--controller", address, "--tenant", "msft-internal")
    assert code == 0
    assert out.splitlines()[0].startswith("NAME")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["copilot-chat", "phi-row"]
    code, out, _ = run(capsys, "--controller", address, "get", "tenants")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["anthropic", "msft-internal", "openlab"]


def test_grpc_errors_print_code_and_details(fake, capsys) -> None:
    address, _, _, _ = fake
    code, out, err = run(capsys, "--controller", address, "get", "deployment", "nope")
    assert (code, out) == (3, "")
    assert err.strip() == "error: NOT_FOUND: deployment nope not found"
    code, _, err = run(capsys, "--controller", address, "cordon", "rack-09-n00")
    assert code == 3 and err.strip() == "node/rack-09-n00 failed: NOT_FOUND: node rack-09-n00 not found"


def test_cordon_prints_names_with_o_name(fake, capsys) -> None:
    """`-o name` was ignored: a script reading the names back got the sentences."""
    address, _, _, _ = fake
    code, out, _ = run(capsys, "--controller", address, "cordon", "known-a", "known-b", "-o", "name")
    assert (code, out) == (0, "node/known-a\nnode/known-b\n")
    code, out, _ = run(capsys, "--controller", address, "cordon", "known-a")
    assert code == 0 and out.startswith("node/known-a cordoned (state ")


def test_unreachable_controller_says_so(capsys, monkeypatch) -> None:
    address = closed_port_address()
    monkeypatch.setenv("MAIA_CONTROLLER", address)
    code, out, err = run(capsys, "summary")
    assert code == 5 and out == ""
    assert "hint: is maia-controller running there?" in err
    assert err.startswith(f"error: UNAVAILABLE: cannot reach the controller at {address}")
    assert "Traceback" not in err


def test_a_controller_that_never_answers_is_said_unreachable_within_the_rpc_timeout(capsys) -> None:
    """A host that accepts TCP and answers nothing: the call's deadline passes with no connection
    made, said as a controller not reached (exit 5, as a refused connection), not as a bare
    DEADLINE_EXCEEDED (exit 1) that reads as a slow controller."""
    with silent_address() as address:
        code, out, err = run(capsys, "--controller", address, "--rpc-timeout", "1", "get", "deployments")
    assert code == 5 and out == ""
    assert err.startswith(f"error: UNAVAILABLE: cannot reach the controller at {address} "
                          "(no connection: nothing answered there within 1s)\nhint: "), err


async def test_an_asyncio_channel_says_a_controller_that_never_answers_unreached() -> None:
    """`open_aio_channel` for programs: the same silent host is UNAVAILABLE "no connection" (a
    controller not reached), not DEADLINE_EXCEEDED."""
    with silent_address() as address:
        async with open_aio_channel(Connection(address=address)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await deployments_pb2_grpc.DeploymentServiceStub(channel).GetDeployment(
                    D.GetDeploymentRequest(name="web"), timeout=1)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == "no connection: nothing answered there within 1s"


async def test_an_asyncio_call_a_connected_controller_was_slow_to_answer_keeps_its_deadline_exceeded() -> None:
    """The call went out on a connection: the controller has it and may serve it, so its
    DEADLINE_EXCEEDED is not turned into "not reached"."""

    class Slow(deployments_pb2_grpc.DeploymentServiceServicer):
        async def GetDeployment(self, request, context):  # type: ignore[no-untyped-def]
            await asyncio.sleep(5)
            return D.Deployment()

    server = grpc.aio.server()
    deployments_pb2_grpc.add_DeploymentServiceServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with open_aio_channel(Connection(address=f"127.0.0.1:{port}")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await deployments_pb2_grpc.DeploymentServiceStub(channel).GetDeployment(
                    D.GetDeploymentRequest(name="web"), timeout=1)
    finally:
        await server.stop(None)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("what", [("deployment", "web"), ("nodes", "--connected", "1")], ids=["deployment", "nodes"])
def test_a_waits_first_read_ends_by_its_timeout(capsys, what: tuple[str, ...]) -> None:
    """`wait --timeout 1` against a controller that never answers ends by its --timeout: its
    first read is given what is left of it, not --rpc-timeout (15 s by default)."""
    with silent_address() as address:
        code, _, err = run(capsys, "--controller", address, "wait", *what, "--timeout", "1")
    assert code == 5
    within = re.search(r"nothing answered there within ([\d.]+)s\)", err)
    assert within is not None and float(within.group(1)) <= 1.0, err


def test_wait_polls_until_running(fake, capsys) -> None:
    address, _, _, _ = fake
    run(capsys, "--controller", address, "apply", "-f", str(EXAMPLES / "tenants.yaml"),
        "-f", str(EXAMPLES / "phi-row.yaml"), "-f", str(EXAMPLES / "batch-eval.yaml"))
    started = time.monotonic()
    code, out, err = run(capsys, "--controller", address, "wait", "deployment", "phi-row", "batch-eval",
                         "--for", "running", "--timeout", "10")
    assert code == 0, err
    assert time.monotonic() - started < 5
    assert "deployment/phi-row condition met (running)" in out
    assert "phi-row: Pending" in err or "phi-row: Running" in err


def test_wait_timeout_exits_1_with_reasons(fake, capsys) -> None:
    address, _, deployments, _ = fake
    deployments.run_after_s = None
    run(capsys, "--controller", address, "apply", "-f", str(EXAMPLES / "tenants.yaml"),
        "-f", str(EXAMPLES / "phi-row.yaml"))
    code, _, err = run(capsys, "--controller", address, "wait", "deployment", "phi-row", "--timeout", "1.5")
    assert code == 1
    assert "error: timed out after 1.5s waiting for running" in err
    assert "CAPACITY: waiting for nodes" in err


def test_submit_dry_run_prints_reasons_and_stores_nothing(fake, capsys) -> None:
    address, _, deployments, _ = fake
    code, out, err = run(capsys, "--controller", address, "submit", "--dry-run", "-f", str(EXAMPLES / "phi-row.yaml"))
    assert code == 4  # Exit.PARTIAL: 0 of 1 replica would be placed
    assert "partial: only part of phi-row would be placed" in err
    assert out.startswith("deployment/phi-row (dry run): would place 0/1 replicas")
    assert "CAPACITY: 0/64 nodes fit" in out
    assert deployments.deployments == {}


def test_excluded_tenants_are_created_first_even_in_a_cycle(fake, capsys, tmp_path) -> None:
    address, admin, _, _ = fake
    f = tmp_path / "t.yaml"
    f.write_text("kind: Tenant\nid: a\nexcludes: [b]\n---\nkind: Tenant\nid: b\nexcludes: [c]\n---\n"
                 "kind: Tenant\nid: c\n---\nkind: Tenant\nid: x\nexcludes: [y]\n---\nkind: Tenant\nid: y\nexcludes: [x]\n")
    code, out, err = run(capsys, "--controller", address, "apply", "-f", str(f))
    assert code == 0, err
    assert admin.created[:3] == ["c", "b", "a"]
    assert list(admin.tenants["x"].excludes) == ["y"] and list(admin.tenants["y"].excludes) == ["x"]
    assert out.splitlines()[-1] in ("tenant/x configured", "tenant/y configured")


def test_a_cycle_of_tenants_that_exist_already_is_applied_again_unchanged(fake, capsys, tmp_path) -> None:
    """The same file applied again: one of the cycle was written without its exclusion, then with
    it (an isolation rule off for a moment, "tenant/y configured" twice), and `diff` showed that
    removal as drift on every run. Now nothing is written and nothing differs."""
    address, admin, _, _ = fake
    f = tmp_path / "t.yaml"
    f.write_text("kind: Tenant\nid: x\nexcludes: [y]\n---\nkind: Tenant\nid: y\nexcludes: [x]\n")
    assert run(capsys, "--controller", address, "apply", "-f", str(f))[0] == 0
    admin.calls.clear()
    code, out, err = run(capsys, "--controller", address, "apply", "-f", str(f))
    assert code == 0, err
    assert sorted(out.splitlines()) == ["tenant/x unchanged", "tenant/y unchanged"]
    assert "UpdateTenant" not in admin.calls
    assert run(capsys, "--controller", address, "diff", "-f", str(f))[0] == 0


def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No config file and no MAIA_* settings of the environment: only the flags given count."""
    monkeypatch.setenv("MAIA_CONFIG", str(tmp_path / "none.yaml"))
    for name in ("MAIA_CONTEXT", "MAIA_CONTROLLER", "MAIA_TOKEN", "MAIA_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("flags, says", [
    (("--context", "nosuch"), "error: context 'nosuch' not found"),
    (("--token-file", "/nonexistent/token"), "error: token file /nonexistent/token: cannot read"),
], ids=["unknown-context", "missing-token-file"])
def test_version_reports_a_config_error_as_every_command_does(fake, capsys, monkeypatch, tmp_path,
                                                              flags: tuple[str, ...], says: str) -> None:
    """It used to ignore the error and call the default address, dropping --controller too."""
    address, _, _, calls = fake
    no_config(monkeypatch, tmp_path)
    code, out, err = run(capsys, *flags, "--controller", address, "version")
    assert (code, out) == (2, "")
    assert err.startswith(says), err
    assert calls == []
    code, out, err = run(capsys, *flags, "version", "--client")  # calls nothing: needs no config
    assert (code, err) == (0, "") and out.startswith("Client: maiactl ")


def test_version_asks_the_controller_given(fake, capsys, monkeypatch, tmp_path) -> None:
    address, _, _, calls = fake
    no_config(monkeypatch, tmp_path)
    code, out, err = run(capsys, "--controller", address, "version")
    assert code == 0, err
    assert f"Server: maia-controller 9.9.9 (schema 0001_fake) at {address}" in out
    assert calls == ["GetVersion"]


def test_version_says_a_database_migrated_under_the_controller(fake, capsys, monkeypatch, tmp_path) -> None:
    """During a roll "(schema X)" read as the database's revision, which a newer controller had
    migrated on (or a downgrade moved back) under this one (found by exploratory testing)."""
    address, admin, _, _ = fake
    no_config(monkeypatch, tmp_path)
    admin.database_revision = "0002_newer"
    code, out, err = run(capsys, "--controller", address, "version")
    assert code == 0, err
    assert f"(schema 0001_fake; the database is at 0002_newer) at {address}" in out


def test_a_rollback_leaves_the_unchanged_tenants_alone(fake, capsys, tmp_path) -> None:
    """Only what this apply wrote is undone: the tenants it found unchanged get no UpdateTenant
    (an audit entry and an event each, and PERMISSION_DENIED for a tenant's token)."""
    address, admin, _, calls = fake
    assert run(capsys, "--controller", address, "apply", "-f", str(EXAMPLES / "tenants.yaml"))[0] == 0
    f = tmp_path / "t.yaml"
    f.write_text(EXAMPLES.joinpath("tenants.yaml").read_text() + "---\nkind: Tenant\nid: newcomer\n")
    admin.refuse_writes.add("newcomer")  # its dry run passes, its write fails (a race with another writer)
    calls.clear()
    code, out, err = run(capsys, "--controller", address, "apply", "-f", str(f))
    assert (code, out) == (1, "")  # FAILED_PRECONDITION, as the CreateTenant's own refusal exits
    assert err.splitlines() == ["error: tenant/newcomer failed: FAILED_PRECONDITION: tenant newcomer: "
                                "refused at its write", "nothing else had been written"]
    assert calls == ["CreateTenant (dry run)", "CreateTenant"]


def test_a_write_answered_too_late_is_undone_with_the_rest_for_it_may_have_landed(fake, capsys, tmp_path) -> None:
    """A tenant's UpdateTenant was written, its answer came after --rpc-timeout: apply said it
    failed and rolled back the rest, leaving its change in place (not all or nothing; "nothing
    else had been written" here). It is undone too now."""
    address, admin, _, _ = fake
    assert run(capsys, "--controller", address, "apply", "-f", str(EXAMPLES / "tenants.yaml"))[0] == 0
    before = admin_pb2.Tenant()
    before.CopyFrom(admin.tenants["openlab"])
    f = tmp_path / "t.yaml"
    f.write_text(EXAMPLES.joinpath("tenants.yaml").read_text().replace("max_power_w: 40000", "max_power_w: 99999"))
    admin.answer_late.add("openlab")
    code, out, err = run(capsys, "--controller", address, "--rpc-timeout", "0.5", "apply", "-f", str(f))
    assert code != 0 and out == ""
    assert err.splitlines()[0].startswith("error: tenant/openlab failed: DEADLINE_EXCEEDED"), err
    assert err.splitlines()[1:] == ["rolled back:", "  tenant/openlab restored"], err
    assert admin.tenants["openlab"] == before


def test_a_deployment_update_answered_too_late_is_restored_with_the_rest(fake, capsys, tmp_path) -> None:
    """The same for a deployment's update: its change, written, is restored at the version it is
    at now (it was left in place, `embeddings-small` at 5 replicas after "failed ... rolled back")."""
    address, _, deployments, _ = fake
    f = tmp_path / "d.yaml"
    f.write_text("kind: Tenant\nid: lab\n---\nkind: Deployment\nname: svc\ntenant: lab\nreplicas: 1\n"
                 "shards_per_replica: 1\nshard: {accelerators: 1}\n")
    code, _, err = run(capsys, "--controller", address, "apply", "-f", str(f), "--no-solve")
    assert code == 0, err
    deployments.answer_late.add("svc")
    f.write_text(f.read_text().replace("replicas: 1", "replicas: 5"))
    code, _, err = run(capsys, "--controller", address, "--rpc-timeout", "0.5", "apply", "-f", str(f), "--no-solve")
    assert code != 0 and "deployment/svc failed: DEADLINE_EXCEEDED" in err, err
    assert err.splitlines()[1:] == ["rolled back:", "  deployment/svc spec restored"], err
    assert deployments.deployments["svc"].spec.replicas == 1


def test_what_the_controller_would_refuse_is_a_conflict_before_any_write(fake, capsys, tmp_path) -> None:
    """The controller judges each write as a dry run at the plan: a tenant excluding one that does
    not exist stops the apply before anything is written (the topology and the other tenant
    included), exiting as the refusal's code; `apply --dry-run` shows it as a conflict."""
    address, admin, _, calls = fake
    f = tmp_path / "t.yaml"
    f.write_text(EXAMPLES.joinpath("topology.yaml").read_text()
                 + "---\nkind: Tenant\nid: first\n---\nkind: Tenant\nid: newcomer\nexcludes: [ghost]\n")
    code, out, err = run(capsys, "--controller", address, "apply", "-f", str(f))
    assert (code, out) == (3, "")  # NOT_FOUND
    assert err.splitlines() == ["error: nothing applied:", "tenant/newcomer: NOT_FOUND: tenant newcomer excludes "
                                "unknown tenant(s): ['ghost']"]
    assert [c for c in calls if "dry run" not in c] == [] and admin.tenants == {}
    code, out, err = run(capsys, "--controller", address, "apply", "--dry-run", "-f", str(f))
    assert code == 3
    assert out.splitlines()[-2:] == ["! tenant/newcomer: conflict",
                                     "    NOT_FOUND: tenant newcomer excludes unknown tenant(s): ['ghost']"]


def test_a_controller_that_knows_no_dry_runs_is_said_to_have_maybe_written(fake, capsys, tmp_path) -> None:
    """A controller older than dry runs by metadata ignores the key and writes: maiactl stops at
    the first write whose answer does not say the dry run back, naming it."""
    address, admin, _, calls = fake
    admin.knows_dry_runs = False
    f = tmp_path / "t.yaml"
    f.write_text("kind: Tenant\nid: first\n---\nkind: Tenant\nid: second\n")
    code, out, err = run(capsys, "--controller", address, "apply", "--dry-run", "-f", str(f))
    assert (code, out) == (1, "")
    assert err.strip() == (f"error: tenant/first: the controller at {address} does not know dry runs of this "
                           f"write (it is older than maiactl) and may have applied it; see `maiactl get`")
    assert list(admin.tenants) == ["first"]  # what such a controller did


DEPLOY_WEB = ("kind: Deployment\nname: web\ntenant: {tenant}\nreplicas: 1\nshards_per_replica: 1\n"
              "shard: {{accelerators: 1}}\n")


@pytest.mark.parametrize("command", ["apply", "diff", "submit", "apply --dry-run", "submit --dry-run"])
def test_an_object_given_twice_is_refused_before_anything_is_sent(fake, capsys, tmp_path, command: str) -> None:
    """Two documents of one deployment (here across two files) would both be created in a dry run
    and fail the real apply halfway (the second submit reuses the run's request id)."""
    address, admin, _, calls = fake
    admin.tenants["lab"] = admin_pb2.Tenant(id="lab")
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(DEPLOY_WEB.format(tenant="lab"))
    second.write_text(DEPLOY_WEB.format(tenant="other") + "---\n" + DEPLOY_WEB.format(tenant="lab"))
    code, out, err = run(capsys, "--controller", address, *command.split(), "-f", str(first), "-f", str(second))
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"error: {second} document 2 (Deployment 'web'): deployment lab/web is given twice "
                                f"(first in {first} document 1 (Deployment 'web'))"]  # web of another tenant is not
    assert calls == []


def test_a_tenant_or_a_rack_given_twice_is_refused(fake, capsys, tmp_path) -> None:
    """A second Tenant document of an id silently won; a rack twice in the topology, too."""
    address, _, _, calls = fake
    f = tmp_path / "t.yaml"
    f.write_text("kind: Tenant\nid: a\n---\nkind: Tenant\nid: a\nisolation: dedicated_node\n---\n"
                 "kind: Topology\nzones: [{id: z}]\nrows: [{id: r, zone: z}]\nracks: [{id: k, row: r}]\n---\n"
                 "kind: Topology\nracks: [{id: j, row: r}, {id: k, row: r, power_budget_w: 5}]\n")
    code, _, err = run(capsys, "--controller", address, "apply", "-f", str(f))
    assert code == 2
    assert err.splitlines() == [
        f"error: {f} document 2 (Tenant 'a'): tenant a is given twice (first in {f} document 1 (Tenant 'a'))",
        f"error: {f} document 4 (Topology): racks[1]: rack k is given twice (first in {f} document 3 (Topology): "
        "racks[0])"]
    assert calls == []


def test_submit_dry_run_of_a_stored_deployment_agrees_with_submit(fake, capsys, tmp_path) -> None:
    """`submit` of a stored deployment says unchanged; its dry run used to fail ALREADY_EXISTS (it
    did not solve in place of the stored one), and printed raw protobuf JSON that apply cannot read."""
    address, _, deployments, _ = fake
    files = ["-f", str(EXAMPLES / "phi-row.yaml")]
    assert run(capsys, "--controller", address, "apply", "-f", str(EXAMPLES / "tenants.yaml"), *files)[0] == 0
    code, out, err = run(capsys, "--controller", address, "submit", *files)
    assert (code, out) == (0, "deployment/phi-row unchanged\n"), err
    deployments.fit_replicas = 1
    code, out, err = run(capsys, "--controller", address, "submit", "--dry-run", *files)
    assert code == 0, err
    assert out.startswith("deployment/phi-row (dry run): would place 1/1 replicas")
    code, out, err = run(capsys, "--controller", address, "submit", "--dry-run", "-o", "json", *files)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["kind"] == "List" and [item["kind"] for item in doc["items"]] == ["Deployment"]
    assert doc["items"][0]["locality"] == "row" and doc["items"][0]["status"]["placed_replicas"] == 1
    (tmp_path / "dry.json").write_text(out)  # the manifest vocabulary: apply reads it back
    assert run(capsys, "--controller", address, "apply", "-f", str(tmp_path / "dry.json"))[1] == \
        "deployment/phi-row unchanged\n"


def _pending_copilot_chat(address: str, deployments: FakeDeployments, capsys) -> D.Deployment:
    """copilot-chat applied, and left pending (the fake never runs it)."""
    deployments.run_after_s = None
    run(capsys, "--controller", address, "apply", "-f", str(EXAMPLES / "tenants.yaml"),
        "-f", str(EXAMPLES / "copilot-chat.yaml"))
    return deployments.deployments["copilot-chat"]


def test_explain_names_the_in_place_way_to_make_the_change(fake, capsys) -> None:
    """A smaller replica count is applied in place (`maiactl scale`), never by deleting the deployment."""
    address, _, deployments, _ = fake
    dep = _pending_copilot_chat(address, deployments, capsys)
    dep.placed_replicas = 1
    deployments.fit_replicas = 1
    code, out, err = run(capsys, "--controller", address, "explain", "deployment", "copilot-chat")
    assert code == 0, err
    assert (f"Smallest change that fits: replicas: 1; it applies in place, at once: "
            f"maiactl scale {dep.spec.tenant}/copilot-chat --replicas 1.") in out
    assert "delete" not in out
    code, out, err = run(capsys, "--controller", address, "explain", "deployment", "copilot-chat", "-o", "json")
    assert code == 0, err
    doc = json.loads(out)  # a script gets how to make it too
    assert (doc["suggestion"], doc["how"]) == (
        "replicas: 1", f"it applies in place, at once: maiactl scale {dep.spec.tenant}/copilot-chat --replicas 1")


def test_explain_finds_how_many_replicas_a_gang_that_places_none_could_have(fake, capsys) -> None:
    """With min_replicas a deployment places all or nothing: placed 0, no fewer replicas were
    tried, and explain said no change fits where fewer replicas (and min_replicas) ran (found in
    review). `min_replicas: 1` says how many fit; that many, as the gang, is the suggestion."""
    address, _, deployments, calls = fake
    dep = _pending_copilot_chat(address, deployments, capsys)  # 3 replicas, min_replicas 2
    deployments.fit_replicas, deployments.all_or_nothing = 1, True
    calls.clear()
    code, out, err = run(capsys, "--controller", address, "explain", "deployment", "copilot-chat", "-o", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert [(t["change"], t["would_place"]) for t in doc["tried"]] == [
        ("as it is", 0), ("min_replicas: 1", 1), ("replicas: 1, min_replicas: 1", 1)]
    assert doc["suggestion"] == "replicas: 1, min_replicas: 1" and "maiactl apply -f" in doc["how"]
    assert calls.count("SubmitDeployment") == 3 and dep.spec.min_replicas == 2


def test_a_dry_run_the_controller_refuses_ends_explain_with_that_error(fake, capsys) -> None:
    """The caller's dry runs refused (its rate, a token that may not): every variant was tried
    and told as refused, then "no single change tried fits", exit 0 (found in review)."""
    address, _, deployments, calls = fake
    _pending_copilot_chat(address, deployments, capsys)
    deployments.refuse_dry_runs = grpc.StatusCode.PERMISSION_DENIED
    calls.clear()
    code, out, err = run(capsys, "--controller", address, "explain", "deployment", "copilot-chat")
    assert code != 0 and "PERMISSION_DENIED" in err and "No single change" not in out
    assert calls.count("SubmitDeployment") == 1


def test_explain_tries_fewer_bigger_shards_of_whole_accelerators_as_the_controller_says_them() -> None:
    """The controller says a whole accelerator's shard is 1000 milli: fewer, bigger shards were
    tried only for 0, that is never (found in review). A replica of one shard is on one node
    whatever its locality: no wider one is tried."""
    spec = D.DeploymentSpec(name="big", tenant="lab", replicas=1, shards_per_replica=4, locality=common_pb2.DOMAIN_RACK,
                            shard=common_pb2.ShardSpec(accelerators=2, accelerator_milli=1000))
    assert [c.change.split(":")[0] for c in explain.candidates(spec, placed_now=0)] == [
        "as it is", "locality", "locality", "locality", "shards_per_replica", "shards_per_replica"]
    spec.shard.accelerator_milli = 500
    assert "shards_per_replica" not in {c.change.split(":")[0] for c in explain.candidates(spec, placed_now=0)}
    single = D.DeploymentSpec(name="one", tenant="lab", replicas=2, shards_per_replica=1,
                              locality=common_pb2.DOMAIN_RACK, shard=common_pb2.ShardSpec(accelerators=2))
    assert [c.change for c in explain.candidates(single, placed_now=1)] == ["as it is", "replicas: 1"]


def test_bigger_shards_than_one_refused_as_never_fitting_are_not_tried() -> None:
    from types import SimpleNamespace

    from google.rpc import status_pb2

    from controller.cli.client import StatusError

    asked: list[int] = []

    def dry_run(request: D.SubmitDeploymentRequest, timeout: float | None = None) -> D.SubmitDeploymentResponse:
        asked.append(request.spec.shard.accelerators)
        if request.spec.shard.accelerators > 4:
            raise StatusError(status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                message="one shard needs 8 accelerators on one node; the largest has 4"))
        return D.SubmitDeploymentResponse(deployment=D.Deployment(placed_replicas=0))

    ctx = SimpleNamespace(controller=SimpleNamespace(deployments=SimpleNamespace(SubmitDeployment=dry_run)),
                          rpc_timeout=5.0, address="127.0.0.1:1")
    spec = D.DeploymentSpec(name="big", tenant="lab", replicas=1, shards_per_replica=16, locality=common_pb2.DOMAIN_ZONE,
                            shard=common_pb2.ShardSpec(accelerators=2, accelerator_milli=1000))
    tried = explain._tried(spec, 0, ctx)  # type: ignore[arg-type]
    assert asked == [2, 2, 4, 8]  # as it is, locality: none, 8 shards of 4, 4 of 8 (refused): not 16, 32
    assert tried[-1].error.startswith("INVALID_ARGUMENT") or "largest has 4" in tried[-1].error


def test_describe_says_what_is_wrong_with_the_object_before_its_events(fake, capsys) -> None:
    """Its events were read first: a tenant naming a node or tenant it may not read was told it
    may not read events (found in review)."""
    address, admin, _, _ = fake
    admin.refuse_events = True
    code, out, err = run(capsys, "--controller", address, "describe", "tenant", "nobody")
    assert code == 3 and "tenant nobody not found" in err and "events" not in err


def test_explain_shows_the_last_nomination_of_a_deployment_at_the_head_of_the_line(fake, capsys) -> None:
    address, admin, deployments, _ = fake
    key = f"{_pending_copilot_chat(address, deployments, capsys).spec.tenant}/copilot-chat"
    code, out, err = run(capsys, "--controller", address, "explain", "deployment", "copilot-chat")
    assert code == 0 and "Head of the line" not in out, err  # a controller without ListEvents: none said

    def event(id_: int, kind: str, message: str, object_id: str = key) -> admin_pb2.EventRecord:
        record = admin_pb2.EventRecord(id=id_, kind=kind, object_kind="deployment", object_id=object_id,
                                       message=message)
        record.at.FromSeconds(1_765_000_000 + id_)
        return record

    admin.events = [event(1, "deployment.submitted", "submitted"),
                    event(2, "deployment.nominated", "nodes n1, n2 kept for it after 31 s waiting for room"),
                    event(3, "deployment.nominated", "nodes n9 kept for it", object_id="other/copilot-chat")]
    code, out, err = run(capsys, "--controller", address, "explain", "deployment", "copilot-chat")
    assert code == 0, err
    assert ("\nHead of the line (nominated at 2025-12-06 05:46:42): nodes n1, n2 kept for it after 31 s waiting "
            "for room\n") in out
    admin.events.append(event(4, "deployment.nomination_ended", "nodes n1, n2 no longer kept for it: held 600 s "
                                                                 "without fitting"))
    code, out, err = run(capsys, "--controller", address, "explain", "deployment", "copilot-chat", "-o", "json")
    assert code == 0, err
    nomination = json.loads(out)["nomination"]
    assert nomination["held"] is False and nomination["message"].endswith("held 600 s without fitting")
    assert nomination["source"] == "event"
    assert nomination["event"] == "deployment.nomination_ended"


def test_explain_shows_the_nomination_stored_with_the_deployment_before_any_event(fake, capsys) -> None:
    """The nodes kept for it come with the deployment (`Deployment.nomination`, as the leader
    stored them): shown without the events (a tenant may not read them; these may be pruned)."""
    address, admin, deployments, _ = fake
    dep = _pending_copilot_chat(address, deployments, capsys)
    dep.nomination.nodes.extend(["n1", "n2"])
    dep.nomination.nominated_at.FromSeconds(1_765_000_042)
    dep.nomination.waiting_since.FromSeconds(1_765_000_011)
    dep.nomination.missing_replicas = 2
    admin.events = []
    code, out, err = run(capsys, "--controller", address, "explain", "deployment", "copilot-chat")
    assert code == 0, err
    assert ("\nHead of the line (nominated at 2025-12-06 05:47:22): nodes n1, n2 kept for it, waiting since "
            "2025-12-06 05:46:51, 2 replica(s) short when they were chosen\n") in out
    code, out, err = run(capsys, "--controller", address, "explain", "deployment", "copilot-chat", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["nomination"] == {"held": True, "source": "stored", "nodes": ["n1", "n2"],
                                             "nominated_at": "2025-12-06T05:47:22Z",
                                             "waiting_since": "2025-12-06T05:46:51Z", "missing_replicas": 2}
    code, out, err = run(capsys, "--controller", address, "describe", "deployment", "copilot-chat")
    assert code == 0, err
    assert "Nominated:" in out and "n1,n2 kept for it since 2025-12-06T05:47:22Z" in out
    code, out, err = run(capsys, "--controller", address, "get", "deployment", "copilot-chat", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["status"]["nomination"]["nodes"] == ["n1", "n2"]


def test_every_change_explain_can_suggest_says_how_to_make_it_in_place() -> None:
    spec = D.DeploymentSpec(name="web", tenant="lab", replicas=4, shards_per_replica=8,
                            locality=common_pb2.DOMAIN_ZONE)
    changes = explain.candidates(spec, placed_now=2)[1:]  # the first is the spec as it is
    assert {c.change.split(":")[0] for c in changes} == {"replicas", "locality", "shards_per_replica"}
    for change in changes:
        assert "in place" in change.how and "delete" not in change.how, change


def test_fewer_shards_explain_suggests_keep_the_replicas_accelerators() -> None:
    """16 shards of 4 accelerators blocked: "shards_per_replica: 4 (each shard then holds more of
    the model)" kept 4 accelerators a shard, a quarter of the replica's hardware, and "fitted" so.
    The shards it suggests are fewer and bigger: the same 64 a replica."""
    spec = D.DeploymentSpec(name="big", tenant="lab", replicas=1, shards_per_replica=16,
                            shard=common_pb2.ShardSpec(accelerators=4), locality=common_pb2.DOMAIN_ZONE)
    fewer = [c for c in explain.candidates(spec, placed_now=0) if c.change.startswith("shards_per_replica")]
    assert [(c.spec.shards_per_replica, c.spec.shard.accelerators) for c in fewer] == [
        (8, 8), (4, 16), (2, 32), (1, 64)]
    assert fewer[0].change == "shards_per_replica: 8 of 8 accelerators each (the same 64 a replica, in fewer, " \
                              "bigger shards)"
    assert spec.shards_per_replica == 16 and spec.shard.accelerators == 4  # the spec asked about is left alone


@pytest.mark.parametrize("dry_run", [False, True], ids=["apply", "apply --dry-run"])
def test_a_refusal_at_the_plan_exits_as_its_code(fake, capsys, dry_run: bool) -> None:
    """INVALID_ARGUMENT from the plan's dry run exits 2, as it does at the write step and anywhere."""
    address, _, deployments, calls = fake
    run(capsys, "--controller", address, "apply", "-f", str(EXAMPLES / "tenants.yaml"))
    deployments.invalid = {"phi-row"}
    code, out, err = run(capsys, "--controller", address, "apply", *(["--dry-run"] if dry_run else []),
                         "-f", str(EXAMPLES / "phi-row.yaml"))
    assert code == 2, err
    assert "INVALID_ARGUMENT: deployment phi-row: priority out of range" in (out if dry_run else err)
    assert "phi-row" not in deployments.deployments


def test_a_drains_moves_include_a_replacement_that_took_a_freed_replica_number() -> None:
    """Two replicas drained off rack-02-n13: one replacement took a new number (2), the other the
    number the first retired replica freed (1). Only new numbers counted as new replicas, and
    `drain --wait` said one shard had moved of two."""
    def placed(*where: tuple[int, str]) -> list[D.ShardPlacement]:
        return [D.ShardPlacement(replica=replica, shard=0, node=node) for replica, node in where]

    before = placed((0, "rack-00-n01"), (1, "rack-02-n13"), (5, "rack-02-n13"))
    after = placed((0, "rack-00-n01"), (1, "rack-02-n03"), (2, "rack-02-n04"))
    moves = drain_moves("openlab/embeddings-small", before, after, {"rack-02-n13"})
    assert [(m["from_replica"], m["from"], m["to"]) for m in moves] == [
        (1, "rack-02-n13", "rack-02-n03"), (5, "rack-02-n13", "rack-02-n04")]
    assert drain_moves("openlab/embeddings-small", before, before, {"rack-02-n13"}) == []  # not replaced yet


def test_summary_json_is_in_the_documented_vocabulary(fake, capsys) -> None:
    """`-o json` prints lowercase enum words and numbers as numbers, zero ones too; it printed
    "ISOLATION_DEDICATED_RACK", 64.0 and left nodes_cordoned out (protobuf's own JSON)."""
    address, admin, _, _ = fake
    admin.tenants["lab"] = admin_pb2.Tenant(id="lab", isolation=common_pb2.ISOLATION_DEDICATED_RACK,
                                            max_accelerators=8.0)
    code, out, err = run(capsys, "--controller", address, "summary", "-o", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert {k: doc[k] for k in ("nodes_ready", "nodes_cordoned", "accelerators_total", "accelerators_used")} == \
        {"nodes_ready": 4, "nodes_cordoned": 0, "accelerators_total": 64, "accelerators_used": 2.5}
    assert type(doc["accelerators_total"]) is int and doc["deployments_by_phase"] == {"running": 1}
    [tenant] = doc["tenants"]
    assert (tenant["isolation"], tenant["max_accelerators"], tenant["used_accelerators"]) == ("dedicated_rack", 8, 0)
    assert "max_power_w" not in tenant  # an optional field not set stays out


def test_get_of_several_names_prints_those_found_and_says_each_missing(fake, capsys) -> None:
    """kubectl-like: `get deployment sub1 nosuch` printed only the NOT_FOUND and dropped sub1."""
    address, admin, deployments, _ = fake
    deployments.run_after_s = None
    run(capsys, "--controller", address, "apply", "-f", str(EXAMPLES / "tenants.yaml"),
        "-f", str(EXAMPLES / "phi-row.yaml"))
    code, out, err = run(capsys, "--controller", address, "get", "deployment", "phi-row", "nosuch", "gone",
                         "-o", "name")
    assert (code, out) == (3, "deployment/msft-internal/phi-row\n")
    assert err.splitlines() == ["error: NOT_FOUND: deployment nosuch not found",
                                "error: NOT_FOUND: deployment gone not found"]
    code, out, err = run(capsys, "--controller", address, "get", "tenants", "nosuch", "openlab", "-o", "json")
    assert code == 3 and err == "error: NOT_FOUND: tenant nosuch not found\n"
    assert [t["id"] for t in json.loads(out)["items"]] == ["openlab"]


def test_a_drains_progress_is_not_worded_as_a_rollout() -> None:
    """`drain --wait` printed "revision 1: 2/3 updated running, 1 old still running" though no
    revision changed: the outgoing replicas of a drain run the current revision."""
    def shard(replica: int, revision: int, outgoing: bool) -> D.ShardPlacement:
        return D.ShardPlacement(replica=replica, node=f"n{replica}", revision=revision, outgoing=outgoing)

    spec = D.DeploymentSpec(name="svc", replicas=3)
    drain = D.Deployment(spec=spec, revision=1, placed_replicas=3, running_replicas=3, updated_replicas=2,
                         outgoing_replicas=1, placements=[shard(0, 1, False), shard(1, 1, False), shard(2, 1, True)])
    assert progress_line("svc", drain).endswith(", 1 on draining nodes still running until replaced")
    rollout = D.Deployment(spec=spec, revision=2, placed_replicas=3, running_replicas=3, updated_replicas=2,
                           outgoing_replicas=1, placements=[shard(0, 2, False), shard(1, 2, False), shard(2, 1, True)])
    assert "revision 2: 2/3 updated running, 1 old still running" in progress_line("svc", rollout)


def test_every_command_naming_one_kind_reads_kind_slash_name_as_o_name_prints_it(fake, capsys) -> None:
    """`wait deployment/x`, `explain deployment/x`, `rollout status deployment x` were argparse
    errors (exit 2), and `cordon node/n1` asked for a node named 'node/n1'; each reads the word
    `get -o name` prints, as get, describe and delete do, or the kind and the name apart."""
    address, _, deployments, _ = fake
    run(capsys, "--controller", address, "apply", "-f", str(EXAMPLES / "tenants.yaml"),
        "-f", str(EXAMPLES / "phi-row.yaml"))
    word = "deployment/msft-internal/phi-row"
    code, out, err = run(capsys, "--controller", address, "wait", word, "--for", "running", "--timeout", "10")
    assert (code, out) == (0, "deployment/msft-internal/phi-row condition met (running)\n"), err
    code, out, err = run(capsys, "--controller", address, "wait", "deployment", word, "deploy/phi-row",
                         "--timeout", "10")
    assert code == 0 and "condition met" in out, err
    code, out, err = run(capsys, "--controller", address, "explain", word)
    assert code == 0 and out.startswith("deployment/phi-row: Running"), err
    code, out, err = run(capsys, "--controller", address, "explain", "deploy", word, "-o", "json")
    assert code == 0 and json.loads(out)["deployment"] == "phi-row", err
    code, out, err = run(capsys, "--controller", address, "explain", "msft-internal/phi-row")  # the kind left out
    assert code == 0 and out.startswith("deployment/phi-row: Running"), err
    for words in ([word], ["deployment", "msft-internal/phi-row"], ["deployment", "phi-row", "-n", "msft-internal"]):
        code, _, err = run(capsys, "--controller", address, "rollout", "status", *words, "--timeout", "0.5")
        # The fake never rolls out: the wait ran for the deployment named, until its timeout.
        assert code == 1 and "timed out after 0.5s waiting for rolled-out:\n  msft-internal/phi-row: Running" in err, err
    for words in (["node/rack-09-n00"], ["node", "rack-09-n00"], ["rack-09-n00"]):
        code, _, err = run(capsys, "--controller", address, "cordon", *words)
        assert (code, err) == (3, "node/rack-09-n00 failed: NOT_FOUND: node rack-09-n00 not found\n")


@pytest.mark.parametrize("argv, says", [
    (["wait", "deployment/a", "node/b"], "wait deployment: 'node/b' names a node (one kind per wait)"),
    (["wait", "nodes", "n1", "--connected", "1"], "wait nodes takes no NAME: it waits for --connected N nodes"),
    (["wait", "pods", "x"], "wait: unknown kind 'pods' (one of deployment, node, or KIND/NAME)"),
    (["explain", "deployment/a", "b"], "explain: expected [KIND] NAME or KIND/NAME, one object"),
    (["explain", "deployment/a/b", "c"], "explain: expected [KIND] NAME or KIND/NAME, one object"),
    (["scale", "deployment", "a", "b", "--replicas", "1"], "scale: expected [KIND] NAME or KIND/NAME, one object"),
    (["rollout", "status", "deployment"], "rollout status: expected [KIND] NAME or KIND/NAME, one object"),
    (["describe", "deployment"], "describe: expected KIND NAME or KIND/NAME, one object"),
    (["drain", "node"], "drain needs a NODE"),
])
def test_kind_and_name_words_that_do_not_fit_are_usage_errors_before_any_call(capsys, argv: list[str],
                                                                              says: str) -> None:
    """Exit 2 with nothing sent (nothing listens at 127.0.0.1:9: a call would exit 5)."""
    code, out, err = run(capsys, "--controller", "127.0.0.1:9", *argv)
    assert (code, out) == (2, "") and err.startswith(f"error: {says}"), err


def test_placements_by_name_carry_their_tenant(fake, capsys) -> None:
    """`get placements -o name` printed placement/NAME/REPLICA/SHARD: two tenants' `chat` gave
    the same lines. Names are per tenant, as `deployment/TENANT/NAME` is."""
    address, _, deployments, _ = fake
    for tenant in ("openlab", "msft-internal"):
        deployments.deployments[f"{tenant}-chat"] = D.Deployment(
            spec=D.DeploymentSpec(name="chat", tenant=tenant, replicas=1, shards_per_replica=2),
            placements=[D.ShardPlacement(replica=0, shard=s, node=f"n{s}", rack="r0") for s in (0, 1)])
    code, out, err = run(capsys, "--controller", address, "get", "placements", "-o", "name")
    assert code == 0, err
    assert sorted(out.splitlines()) == ["placement/msft-internal/chat/0/0", "placement/msft-internal/chat/0/1",
                                        "placement/openlab/chat/0/0", "placement/openlab/chat/0/1"]


def test_a_node_bound_token_a_controller_did_not_bind_is_revoked_not_handed_out(fake, capsys) -> None:
    address, _, _, calls = fake
    code, out, err = run(capsys, "--controller", address, "token", "create", "--node", "rack-00-n01")
    assert code == 1 and out == ""  # no secret printed
    assert "made token t0ken without binding it to node rack-00-n01" in err and "it was revoked at once" in err
    assert calls[-2:] == ["CreateToken", "RevokeToken t0ken"]


def test_an_enum_value_this_client_does_not_know_is_a_word_not_a_traceback() -> None:
    assert (shard_phase_word(99), node_state_word(99), deployment_phase_word(99)) == ("value 99",) * 3
    assert shard_phase_word(common_pb2.SHARD_PHASE_UNKNOWN) == "unknown"
    assert shard_phase_word(common_pb2.SHARD_PHASE_UNSPECIFIED) == "unspecified"


def _phi_row(fake, capsys) -> tuple[str, FakeDeployments]:  # noqa: ANN001
    address, _, deployments, _ = fake
    deployments.run_after_s = None  # stays Pending unless a test says otherwise
    run(capsys, "--controller", address, "apply", "-f", str(EXAMPLES / "tenants.yaml"),
        "-f", str(EXAMPLES / "phi-row.yaml"))
    return address, deployments


def test_rollout_status_stops_at_once_on_a_failed_deployment_and_waits_through_a_quota(fake, capsys) -> None:
    address, deployments = _phi_row(fake, capsys)
    with deployments.lock:
        dep = deployments.deployments["phi-row"]
        dep.reasons.add(code="QUOTA_ACCELERATORS", message="tenant msft-internal over max_accelerators")
    started = time.monotonic()
    code, _, err = run(capsys, "--controller", address, "rollout", "status", "phi-row", "--timeout", "1.5")
    assert code == 1 and "timed out after 1.5s" in err  # a quota may be raised mid-rollout: it waited
    with deployments.lock:
        dep.phase = D.DEPLOYMENT_PHASE_FAILED
    started = time.monotonic()
    code, _, err = run(capsys, "--controller", address, "rollout", "status", "phi-row", "--timeout", "30")
    assert code == 4 and "stopped waiting for rolled-out: blocked" in err and "Failed" in err, err
    assert time.monotonic() - started < 20  # not the timeout


def test_a_wait_ends_at_once_when_its_deployment_is_deleted(fake, capsys) -> None:
    address, deployments = _phi_row(fake, capsys)

    def delete() -> None:
        with deployments.lock:
            del deployments.deployments["phi-row"]

    threading.Timer(0.5, delete).start()
    started = time.monotonic()
    code, _, err = run(capsys, "--controller", address, "wait", "deployment", "phi-row", "--for", "running",
                       "--timeout", "30")
    assert code == 4 and "stopped waiting for running" in err and "phi-row" in err, err
    assert time.monotonic() - started < 20


def test_rollout_status_prints_the_deployment_as_json(fake, capsys) -> None:
    address, deployments = _phi_row(fake, capsys)
    with deployments.lock:
        dep = deployments.deployments["phi-row"]
        dep.phase = D.DEPLOYMENT_PHASE_RUNNING
        dep.placed_replicas = dep.running_replicas = dep.updated_replicas = dep.spec.replicas
    code, out, err = run(capsys, "--controller", address, "rollout", "status", "phi-row", "-o", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["rolled_out"] is True and doc["deployment"]["name"] == "phi-row"


def test_rollout_status_prints_its_json_document_when_it_ends_without_the_rollout(fake, capsys) -> None:
    """Timed out, or stopped on a Failed deployment, `rollout status -o json` printed nothing on
    stdout (found by exploratory testing): it prints the deployment as it stands, `rolled_out`
    false and the error (also on stderr), with the exit code as without -o json."""
    address, deployments = _phi_row(fake, capsys)
    code, out, err = run(capsys, "--controller", address, "rollout", "status", "phi-row", "-o", "json",
                         "--timeout", "0.5")
    doc = json.loads(out)
    assert code == 1 and "timed out after 0.5s" in err
    assert (doc["rolled_out"], doc["deployment"]["name"]) == (False, "phi-row") and "timed out" in doc["error"]
    with deployments.lock:
        deployments.deployments["phi-row"].phase = D.DEPLOYMENT_PHASE_FAILED
    code, out, err = run(capsys, "--controller", address, "rollout", "status", "phi-row", "-o", "json")
    assert code == 4 and json.loads(out)["deployment"]["status"]["phase"] == "failed", out
