"""`maiactl apply`'s plan of a large batch, against a fake controller (a real threaded gRPC server
on 127.0.0.1:0): the batch's new deployments counted together against the tenant's deployment cap
(each one's dry run alone meets only what is stored), one dry-run solve per spec a tenant's new
deployments share, the controller's dry-run rate waited out with progress on stderr rather than
taken for a refusal, and `--no-solve`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

from cli_harness import fake_controller
from controller import limits
from controller.cli.commands import apply_plan
from controller.cli.main import main
from controller.retryinfo import rich_error
from maia.v1 import admin_pb2, admin_pb2_grpc, deployments_pb2 as D, deployments_pb2_grpc


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    def GetTenant(self, request, context):  # noqa: N802
        return admin_pb2.Tenant(id=request.id)


class FakeDeployments(deployments_pb2_grpc.DeploymentServiceServicer):
    """Tenant lab's deployments `stored`; each dry run asked is recorded (`dry_runs`). `refuse_dry_runs`:
    that many attempts of each dry run are refused RESOURCE_EXHAUSTED with a retry time (nothing
    solved: ask again), as the controller's per-tenant dry-run rate refuses them."""

    def __init__(self) -> None:
        self.stored: dict[str, D.Deployment] = {}
        self.dry_runs: list[str] = []
        self.refused: dict[str, int] = {}
        self.refuse_dry_runs = 0
        self.calls: list[str] = []

    def SubmitDeployment(self, request, context):  # noqa: N802
        name = request.spec.name
        if request.dry_run:
            if self.refused.get(name, 0) < self.refuse_dry_runs:
                self.refused[name] = self.refused.get(name, 0) + 1
                context.abort_with_status(rpc_status.to_status(rich_error(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant lab exceeded 30 dry runs a minute; retry in 0.01s", 10)))
            self.dry_runs.append(name)
            return D.SubmitDeploymentResponse(deployment=D.Deployment(
                spec=request.spec, placed_replicas=request.spec.replicas), dry_run=True)
        self.calls.append("SubmitDeployment")
        self.stored[name] = D.Deployment(spec=request.spec)
        return D.SubmitDeploymentResponse(deployment=self.stored[name])

    def SubmitDeployments(self, request, context):  # noqa: N802
        self.calls.append(f"SubmitDeployments:{len(request.requests)}")
        for item in request.requests:
            self.stored[item.spec.name] = D.Deployment(spec=item.spec)
        return D.SubmitDeploymentsResponse(results=[D.SubmitDeploymentResult(deployment=self.stored[i.spec.name])
                                                    for i in request.requests])

    def GetDeployment(self, request, context):  # noqa: N802
        if request.name not in self.stored:
            context.abort(grpc.StatusCode.NOT_FOUND, f"deployment {request.name} not found")
        return self.stored[request.name]

    def ListDeployments(self, request, context):  # noqa: N802
        names = sorted(self.stored)
        start = int(request.page_token or 0)
        size = request.page_size or 100
        token = str(start + size) if start + size < len(names) else ""
        return D.ListDeploymentsResponse(deployments=[self.stored[n] for n in names[start:start + size]],
                                         next_page_token=token)


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeDeployments]]:
    deployments = FakeDeployments()
    with fake_controller(FakeAdmin(), deployments) as address:
        yield address, deployments


def manifests(path: Path, *names: str, replicas: int | None = None) -> str:
    """Deployments of tenant lab; each its own spec (replicas 1, 2, ...) unless `replicas` says one."""
    path.write_text("---\n".join(
        f"kind: Deployment\nname: {name}\ntenant: lab\nreplicas: {replicas or i + 1}\nshards_per_replica: 1\n"
        f"shard: {{accelerators: 1, hbm_gib: 16, power_w: 400}}\n" for i, name in enumerate(names)))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], address: str, *args: str) -> tuple[int, str, str]:
    code = main(["--controller", address, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_batch_s_new_deployments_count_together_against_the_tenant_s_cap(
        fake: tuple[str, FakeDeployments], capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each new deployment's dry run alone met the 2 stored: all 5 passed the plan, and the writes
    hit the cap (RESOURCE_EXHAUSTED) and rolled back. The plan counts them now: nothing written,
    exit 1 (a conflict), one line for the tenant, the deployments beyond it counted in it."""
    address, deployments = fake
    monkeypatch.setattr(limits, "DEPLOYMENTS_PER_TENANT_MAX", 4)
    for name in ("old-1", "old-2"):
        deployments.stored[name] = D.Deployment(spec=D.DeploymentSpec(name=name, tenant="lab"))
    path = manifests(tmp_path / "d.yaml", "a", "b", "c", "d", "e")
    code, out, err = run(capsys, address, "apply", "-f", path)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "error: nothing applied:",
        "deployment/c: tenant lab would have 7 deployments (2 stored, 5 new in these manifests); at most 4 a tenant "
        "(and 2 more beyond it: deployment/d, deployment/e)"]
    assert deployments.calls == [] and sorted(deployments.stored) == ["old-1", "old-2"]

    code, out, err = run(capsys, address, "apply", "--dry-run", "-f", path)
    assert code == 1, err
    assert "+ deployment/b: would be created" in out and "! deployment/c: conflict" in out
    assert "! deployment/e: conflict\n    beyond tenant lab's cap of 4 deployments (see deployment/c)\n" in out

    code, out, err = run(capsys, address, "apply", "-f", manifests(tmp_path / "fits.yaml", "a", "b"))
    assert code == 0, err  # 2 stored + 2 new: the cap, not beyond it
    assert sorted(deployments.stored) == ["a", "b", "old-1", "old-2"]


def test_new_deployments_sharing_a_spec_are_solved_once(
        fake: tuple[str, FakeDeployments], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A dry run's checks and its solve do not depend on the name: 40 copies of one spec cost one
    dry run (the controller allows a tenant 30 a minute by default), each still shown where it lands."""
    address, deployments = fake
    names = [f"d-{i:02}" for i in range(40)]
    code, out, err = run(capsys, address, "apply", "--dry-run", "-f",
                         manifests(tmp_path / "d.yaml", *names, replicas=2))
    assert code == 0, err
    assert deployments.dry_runs == ["d-00"]
    assert out.count("would place 2/2 replicas") == 40
    assert "+ deployment/d-07: would be created\n    would place 2/2 replicas" in out
    assert "solved as deployment/d-00 (the same spec but its name)" in out

    deployments.dry_runs.clear()
    code, out, err = run(capsys, address, "apply", "-f", manifests(tmp_path / "two.yaml", "x", "y", "z"))
    assert code == 0, err
    assert deployments.dry_runs == ["x", "y", "z"]  # three specs: three solves


def test_the_controller_s_dry_run_rate_is_waited_out_with_progress(
        fake: tuple[str, FakeDeployments], capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A dry run refused "retry in ..." (the tenant's dry-run rate) past the channel's own retries
    was the deployment's conflict: the apply stopped, blaming a deployment for the controller's
    pace (or, when the channel's retries sufficed, waited silently). It waits now, saying on stderr
    how far the plan is and how long the rest may take."""
    address, deployments = fake
    monkeypatch.setattr(apply_plan, "PROGRESS_EVERY_S", 0.0, raising=False)
    deployments.refuse_dry_runs = 6  # more than the channel's 5 attempts of one call
    code, out, err = run(capsys, address, "apply", "-f", manifests(tmp_path / "d.yaml", "a", "b", "c"))
    assert code == 0, err
    assert out.splitlines() == ["deployment/a created", "deployment/b created", "deployment/c created"]
    assert deployments.dry_runs == ["a", "b", "c"]
    progress = [line for line in err.splitlines() if line.startswith("planning: ")]
    assert progress, err
    assert progress[0].startswith("planning: 0/3 objects checked")
    assert "; the controller asked to wait (RESOURCE_EXHAUSTED: tenant lab exceeded 30 dry runs a minute" in err
    assert "; dry-run solves left: at most 2" in err
    assert any(", coming at about " in line and " s left (--no-solve plans without them)" in line
               for line in progress), err


def test_no_solve_asks_for_no_dry_run_solve_and_still_counts_the_cap(
        fake: tuple[str, FakeDeployments], capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    address, deployments = fake
    code, out, err = run(capsys, address, "apply", "--no-solve", "-f", manifests(tmp_path / "d.yaml", "a", "b"))
    assert code == 0, err
    assert deployments.dry_runs == [] and sorted(deployments.stored) == ["a", "b"]
    monkeypatch.setattr(limits, "DEPLOYMENTS_PER_TENANT_MAX", 3)
    code, out, err = run(capsys, address, "apply", "--no-solve", "-f", manifests(tmp_path / "e.yaml", "c", "d"))
    assert code == 1 and "deployment/d: tenant lab would have 4 deployments" in err, err
    assert sorted(deployments.stored) == ["a", "b"]
