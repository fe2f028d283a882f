"""`maiactl apply` of a large batch against a real controller, in process (SQLite, port 0) so that
its per-tenant deployment cap (`limits.DEPLOYMENTS_PER_TENANT_MAX`, a constant) can be made small:
the plan refuses a batch beyond the cap before writing anything (it used to write up to the cap,
then roll back), and waits out the controller's dry-run rate (`--dry-runs-per-minute`) instead of
taking its refusal for the deployment's conflict."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller import limits
from controller.api.server import ControllerApp
from controller.cli.commands import apply_plan
from controller.cli.main import main
from maia.v1 import admin_pb2, deployments_pb2
from tests.integration.grpc_harness import Stubs, admin_token_of, running_controller, spec, topology

DEPLOYMENT = """kind: Deployment
name: {name}
tenant: bulk
replicas: {replicas}
shards_per_replica: 1
shard: {{accelerators: 1, hbm_gib: 16, power_w: 400}}
"""


async def _maiactl(app: ControllerApp, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["--controller", app.address, "--token", admin_token_of(app), *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def _seeded(app: ControllerApp, stored: int) -> Stubs:
    """Rack rack-a, tenant bulk with `stored` deployments."""
    stubs = Stubs.connect(app.address, admin_token_of(app))
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="bulk"))
    for i in range(stored):
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec(f"old-{i}", "bulk")))
    return stubs


async def _names(stubs: Stubs) -> list[str]:
    listed = await stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest(tenant="bulk", page_size=500))
    return sorted(d.spec.name for d in listed.deployments)


def _file(path: Path, names: list[str], replicas: int | None = None) -> str:
    path.write_text("---\n".join(DEPLOYMENT.format(name=name, replicas=replicas or i + 1)
                                 for i, name in enumerate(names)))
    return str(path)


async def test_a_batch_beyond_the_tenant_s_cap_is_refused_at_the_plan(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The SRE's 3,000 new deployments of tenant `bulk` (cap 512), scaled down: 2 stored, cap 6, 8 new
    of one spec. Each one's dry run alone passed; 4 were written, the 5th refused
    (`RESOURCE_EXHAUSTED: tenant bulk has 6 deployments; at most 6`) and the 4 deleted again."""
    monkeypatch.setattr(limits, "DEPLOYMENTS_PER_TENANT_MAX", 6)
    async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path) as app:
        stubs = await _seeded(app, stored=2)
        try:
            names = [f"new-{i}" for i in range(8)]
            batch = _file(tmp_path / "bulk.yaml", names, replicas=1)
            code, out, err = await _maiactl(app, capsys, "apply", "-f", batch)
            assert (code, out) == (1, ""), err
            assert err.splitlines() == [
                "error: nothing applied:",
                "deployment/new-4: tenant bulk would have 10 deployments (2 stored, 8 new in these manifests); "
                "at most 6 a tenant (and 3 more beyond it: deployment/new-5, deployment/new-6, ...)"]
            assert await _names(stubs) == ["old-0", "old-1"]

            code, out, err = await _maiactl(app, capsys, "apply", "--dry-run", "-f", batch)
            assert code == 1, err
            assert "! deployment/new-4: conflict\n    tenant bulk would have 10 deployments" in out

            code, out, err = await _maiactl(app, capsys, "apply", "-f", _file(tmp_path / "fits.yaml", names[:4]))
            assert code == 0, err
            assert await _names(stubs) == ["new-0", "new-1", "new-2", "new-3", "old-0", "old-1"]
        finally:
            await stubs.channel.close()


async def test_the_controller_s_dry_run_rate_is_waited_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """12 dry runs a minute (a bucket of 12, then one every 5 s, a pause longer than the channel
    waits out by itself): the 13th distinct spec's dry run was refused and stopped the apply as
    that deployment's conflict. Now the plan waits, saying so, and the apply goes through."""
    monkeypatch.setattr(apply_plan, "PROGRESS_EVERY_S", 1.0, raising=False)
    async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path,
                                  dry_runs_per_minute=12) as app:
        stubs = await _seeded(app, stored=0)
        try:
            names = [f"d-{i:02}" for i in range(13)]
            code, out, err = await _maiactl(app, capsys, "apply", "-f", _file(tmp_path / "many.yaml", names))
            assert code == 0, err
            assert [line.split(" (")[0] for line in out.splitlines()] == [f"deployment/{name} created" for name in names]
            assert "tenant bulk exceeded 12 dry runs a minute" in err and "planning: 12/13 objects checked" in err
            assert await _names(stubs) == names
        finally:
            await stubs.channel.close()


async def test_the_writes_wait_out_the_tenant_s_submit_rate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller's default of 120 submits a tenant a minute, bursting to 120: a SubmitDeployments
    call of 127 wrote 120 and was told to send 7 again after ~0.5 s; the writes gave up after 5
    calls (one more written each) and rolled the 124 back. Now they are sent again as long as each
    call writes some, after pauses long enough for several, saying so on stderr."""
    monkeypatch.setattr(apply_plan, "PROGRESS_EVERY_S", 1.0, raising=False)
    async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path) as app:
        stubs = await _seeded(app, stored=0)
        try:
            names = [f"d-{i:03}" for i in range(127)]
            code, out, err = await _maiactl(app, capsys, "apply", "-f", _file(tmp_path / "many.yaml", names, replicas=1))
            assert code == 0, err
            assert len(out.splitlines()) == 127 and "rolled back" not in err
            assert "writing: 12" in err and "/127 new deployments written; the controller asked to wait (" \
                "RESOURCE_EXHAUSTED: tenant bulk exceeded 120 submits a minute" in err, err
            assert await _names(stubs) == names
        finally:
            await stubs.channel.close()
