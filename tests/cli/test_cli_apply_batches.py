"""`maiactl apply` sends a file's new deployments in SubmitDeployments calls (chunked at the
per-call limit), keeps its output and its undo when a request is refused, sends again what the
controller said to send again, and falls back to one SubmitDeployment each against a controller
without the call. Against a fake controller: a real (threaded) gRPC server on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import Iterator
import time
from pathlib import Path

import grpc
import pytest

from cli_harness import fake_controller
from controller import limits
from controller.cli.main import main
from controller.retryinfo import rich_error
from maia.v1 import admin_pb2, admin_pb2_grpc, deployments_pb2 as D, deployments_pb2_grpc


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    def GetTenant(self, request, context):  # noqa: N802
        return admin_pb2.Tenant(id=request.id)


class FakeDeployments(deployments_pb2_grpc.DeploymentServiceServicer):
    """Stores what it is sent; `refuse` names refused INVALID_ARGUMENT, `busy` names refused once
    RESOURCE_EXHAUSTED with RetryInfo (nothing written: send again); `batched` False: no
    SubmitDeployments (an older controller)."""

    def __init__(self, batched: bool) -> None:
        self.batched = batched
        self.calls: list[str] = []
        self.stored: dict[str, D.Deployment] = {}
        self.refuse: set[str] = set()
        self.busy: set[str] = set()
        self.late_s = 0.0  # SubmitDeployments answers this late, after writing (the caller's deadline passes)

    def _submit(self, request: D.SubmitDeploymentRequest) -> D.Deployment | None:
        name = request.spec.name
        if name in self.refuse or name in self.stored:
            return None
        self.stored[name] = D.Deployment(spec=request.spec, phase=D.DEPLOYMENT_PHASE_PENDING)
        return self.stored[name]

    def SubmitDeployment(self, request, context):  # noqa: N802
        if request.dry_run:
            return D.SubmitDeploymentResponse(deployment=D.Deployment(spec=request.spec, placed_replicas=1),
                                              dry_run=True)
        self.calls.append("SubmitDeployment")
        stored = self._submit(request)
        if stored is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"deployment {request.spec.name}: refused")
        return D.SubmitDeploymentResponse(deployment=stored)

    def SubmitDeployments(self, request, context):  # noqa: N802
        if not self.batched:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self.calls.append(f"SubmitDeployments:{len(request.requests)}")
        results = []
        for item in request.requests:
            if item.spec.name in self.busy:
                self.busy.discard(item.spec.name)
                results.append(D.SubmitDeploymentResult(error=rich_error(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant lab exceeded 3 submits a minute", 10)))
                continue
            stored = self._submit(item)
            results.append(D.SubmitDeploymentResult(deployment=stored) if stored is not None else
                           D.SubmitDeploymentResult(error=rich_error(
                               grpc.StatusCode.INVALID_ARGUMENT, f"deployment {item.spec.name}: refused")))
        time.sleep(self.late_s)
        return D.SubmitDeploymentsResponse(results=results)

    def GetDeployment(self, request, context):  # noqa: N802
        if request.name not in self.stored:
            context.abort(grpc.StatusCode.NOT_FOUND, f"deployment {request.name} not found")
        return self.stored[request.name]

    def ListDeployments(self, request, context):  # noqa: N802
        return D.ListDeploymentsResponse(deployments=list(self.stored.values()))  # the plan counts them (its cap)

    def DeleteDeployment(self, request, context):  # noqa: N802
        self.calls.append(f"DeleteDeployment:{request.name}")
        if request.name not in self.stored:
            context.abort(grpc.StatusCode.NOT_FOUND, f"deployment {request.name} not found")
        return self.stored.pop(request.name)


@pytest.fixture(params=[True, False], ids=["batched", "older-controller"])
def fake(request: pytest.FixtureRequest) -> Iterator[tuple[str, FakeDeployments]]:
    deployments = FakeDeployments(batched=request.param)
    with fake_controller(FakeAdmin(), deployments) as address:
        yield address, deployments


def manifests(path: Path, *names: str) -> str:
    path.write_text("---\n".join(
        f"kind: Deployment\nname: {name}\ntenant: lab\nreplicas: 1\nshards_per_replica: 1\n"
        f"shard: {{accelerators: 1, hbm_gib: 16, power_w: 400}}\n" for name in names))
    return str(path)


def apply(capsys: pytest.CaptureFixture[str], address: str, path: str) -> tuple[int, str, str]:
    code = main(["--controller", address, "apply", "-f", path])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_new_deployments_go_in_calls_of_the_limit_with_the_same_output(
        fake: tuple[str, FakeDeployments], capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    address, deployments = fake
    monkeypatch.setattr(limits, "SUBMITS_PER_CALL_MAX", 2)
    code, out, err = apply(capsys, address, manifests(tmp_path / "d.yaml", "a", "b", "c", "d", "e"))
    assert code == 0, err
    assert out.splitlines() == [f"deployment/{name} created" for name in "abcde"]
    assert sorted(deployments.stored) == list("abcde")
    if deployments.batched:
        assert deployments.calls == ["SubmitDeployments:2", "SubmitDeployments:2", "SubmitDeployments:1"]
    else:  # UNIMPLEMENTED: one call each, as before
        assert deployments.calls == ["SubmitDeployment"] * 5


def test_a_refused_deployment_undoes_the_others(fake: tuple[str, FakeDeployments], capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    address, deployments = fake
    deployments.refuse = {"bad"}
    code, out, err = apply(capsys, address, manifests(tmp_path / "d.yaml", "a", "b", "bad", "c"))
    assert (code, out) == (2, "")  # INVALID_ARGUMENT exits 2 (docs/cli.md), at the write step as anywhere
    if deployments.batched:  # c was in the same call: written, then undone with the others
        assert err.splitlines() == ["error: deployment/bad failed: INVALID_ARGUMENT: deployment bad: refused",
                                    "rolled back:", "  deployment/c deleted again", "  deployment/b deleted again",
                                    "  deployment/a deleted again"]
    else:
        assert err.splitlines() == ["error: deployment/bad failed: INVALID_ARGUMENT: deployment bad: refused",
                                    "rolled back:", "  deployment/b deleted again", "  deployment/a deleted again"]
    assert deployments.stored == {}


# A lone call's retries are the channel's (tests/cli/test_cli_retry.py): the batched fake only.
@pytest.mark.parametrize("fake", [True], ids=["batched"], indirect=True)
def test_a_request_told_to_come_again_is_sent_again(fake: tuple[str, FakeDeployments],
                                                   capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    address, deployments = fake
    deployments.busy = {"b"}
    code, out, err = apply(capsys, address, manifests(tmp_path / "d.yaml", "a", "b", "c"))
    assert code == 0, err
    assert out.splitlines() == ["deployment/a created", "deployment/b created", "deployment/c created"]
    assert deployments.calls == ["SubmitDeployments:3", "SubmitDeployments:1"]  # only b again
    assert sorted(deployments.stored) == ["a", "b", "c"]


# A lone SubmitDeployment is not answered late by this fake: the batched fake only.
@pytest.mark.parametrize("fake", [True], ids=["batched"], indirect=True)
def test_a_call_that_ended_without_an_answer_undoes_what_it_wrote(
        fake: tuple[str, FakeDeployments], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """DEADLINE_EXCEEDED for the call itself says nothing of its requests: the controller may have
    written them all (its answer came too late). The undo deletes those that were written."""
    address, deployments = fake
    deployments.late_s = 1.5
    deployments.refuse = {"b"}  # not written: nothing to undo (its delete is NOT_FOUND, not an error)
    deployments.stored["z"] = D.Deployment()  # not this run's: left alone
    code = main(["--controller", address, "--rpc-timeout", "0.5", "apply", "-f",
                 manifests(tmp_path / "d.yaml", "a", "b", "c")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.splitlines()[0].startswith("error: deployment/a (and 2 more deployments sent with it) failed: ")
    assert "DEADLINE_EXCEEDED" in err
    assert err.splitlines()[1:] == ["rolled back:", "  deployment/c deleted again", "  deployment/a deleted again"]
    assert sorted(deployments.stored) == ["z"]
