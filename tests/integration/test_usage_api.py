"""GetUsage over real gRPC and `maiactl usage` against a real controller with one agent."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from datetime import datetime, timedelta

import grpc
import pytest

from controller.api.server import ControllerApp
from controller.cli.main import main as maiactl
from grpc_harness import HandAgent, Stubs, admin_token_of, eventually, spec, topology
from maia.v1 import admin_pb2, deployments_pb2


async def _placed(stubs: Stubs) -> HandAgent:
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    agent = HandAgent(stubs, "n1", "rack-a")
    await agent.register()
    await agent.connect()
    agent.keep_beating()  # the node stays ready under load (a silent stream ends after 2 s)
    await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
        spec=spec("svc", accelerators=2)))
    await eventually(lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc")),
                     lambda d: len(d.placements) == 1, what="svc placed")
    return agent


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = maiactl(list(argv))
    except SystemExit as exc:  # argparse refuses bad input with exit code 2
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_usage_rpc_and_cli(controller_app: ControllerApp, stubs: Stubs, capsys) -> None:
    agent = await _placed(stubs)
    try:
        await _check_usage(controller_app, stubs, capsys)
    finally:
        await agent.close()


async def _check_usage(controller_app: ControllerApp, stubs: Stubs, capsys) -> None:
    reply = await stubs.deployments.GetUsage(deployments_pb2.GetUsageRequest(tenant="lab"))
    [record] = reply.records
    assert (record.tenant, record.deployment, record.accelerator_model, record.zone) == ("lab", "svc", "maia-100", "z1")
    assert record.accelerator_seconds > 0 and record.accelerator_hours == pytest.approx(record.accelerator_seconds / 3600)
    # 2 accelerators x (400 W load + 500 W / 4 idle share) per second of 2 accelerator-seconds.
    assert record.energy_kwh * 3.6e6 == pytest.approx(record.accelerator_seconds * (400 + 125))

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stubs.deployments.GetUsage(deployments_pb2.GetUsageRequest(tenant="nobody"))
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND

    # The CLI is synchronous: run it in a thread while this loop serves the controller.
    at = ("--controller", controller_app.address, "--token", admin_token_of(controller_app))
    code, out, _ = await asyncio.to_thread(_run_cli, capsys, "usage", *at, "-o", "csv", "--since", "1h")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [(r["tenant"], r["deployment"], r["zone"]) for r in rows] == [("lab", "svc", "z1")]
    assert float(rows[0]["accelerator_seconds"]) > 0
    # The window it covers on every row, in RFC 3339 UTC: a file said nothing of it, nor that a
    # --until in the future had been cut to the controller's now.
    since, until = (datetime.fromisoformat(rows[0][k].replace("Z", "+00:00")) for k in ("since", "until"))
    assert rows[0]["until"].endswith("Z") and timedelta(minutes=59) < until - since <= timedelta(hours=1, seconds=1)
    code, out, _ = await asyncio.to_thread(_run_cli, capsys, "usage", *at, "-o", "csv", "--until", "2099-01-01")
    [row] = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and row["since"] == "" and row["until"] < "2099"
    code, out, _ = await asyncio.to_thread(_run_cli, capsys, "usage", *at, "-o", "json", "--tenant", "lab")
    assert code == 0 and json.loads(out)["records"][0]["deployment"] == "svc"
    code, out, _ = await asyncio.to_thread(_run_cli, capsys, "usage", *at)
    assert code == 0 and "ACCEL-HOURS" in out and "svc" in out and "kWh" in out
    # Three places in every row, as in the total: 12.8 accelerator-seconds showed as "0".
    assert re.search(r"\bsvc\s+maia-100\s+z1\s+\d+\.\d{3}\s+\d+\.\d{3}\n", out), out
    code, _, err = await asyncio.to_thread(_run_cli, capsys, "usage", *at, "--since", "1h", "--until", "2h")
    assert code == 2 and "must be before" in err  # INVALID_ARGUMENT: bad input
    code, _, err = await asyncio.to_thread(_run_cli, capsys, "usage", *at, "--since", "yesterday-ish")
    assert code == 2 and "neither an ISO-8601 time" in err
