"""The server as a whole: health, reflection, the caller principal, and the real binary's
start-up contract (address line, --no-migrate on an old schema, graceful SIGTERM)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import select

from controller.store import models as m
from grpc_harness import Stubs, issue_token, spec, topology
from maia.v1 import admin_pb2, deployments_pb2

SERVICES = {"maia.v1.DeploymentService", "maia.v1.AdminService", "maia.v1.NodeAgentService"}


async def test_health_is_serving(stubs: Stubs):
    health = health_pb2_grpc.HealthStub(stubs.channel)
    for service in ("", *sorted(SERVICES)):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_reflection_lists_the_services(stubs: Stubs):
    stub = reflection_pb2_grpc.ServerReflectionStub(stubs.channel)

    async def one_request():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for reply in stub.ServerReflectionInfo(one_request()):
        names |= {s.name for s in reply.list_services_response.service}
    assert SERVICES | {"grpc.health.v1.Health"} <= names


async def test_the_caller_principal_is_recorded(stubs: Stubs, controller_app):
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    alice = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "admin", name="alice"))
    try:
        await alice.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    finally:
        await alice.channel.close()
    await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec("svc")))
    async with controller_app.db.unit_of_work() as uow:
        actors = dict((await uow.session.execute(
            select(m.Event.kind, m.Event.actor).where(m.Event.kind.in_(["tenant.created", "deployment.submitted"]))
        )).all())
    assert actors == {"tenant.created": "alice", "deployment.submitted": "bootstrap-admin"}


def _controller(*args: str, tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "controller.main", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_no_migrate_on_an_empty_database_exits_2_with_one_line(tmp_path: Path):
    proc = _controller("--listen", "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}",
                       "--no-migrate", tmp_path=tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("maia-controller: database schema is at revision <empty: no revision> but this "
                               "controller needs head revision")
    assert "maia-controller listening" not in out


def test_binary_prints_its_port_serves_and_stops_on_sigterm(tmp_path: Path):
    db = f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}"
    proc = _controller("--listen", "127.0.0.1:0", "--db", db, tmp_path=tmp_path)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("maia-controller listening on 127.0.0.1:"), proc.stderr.read() if proc.poll() else line
        port = int(line.rsplit(":", 1)[1])
        assert port > 0
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert '"msg": "stopped"' in err
        assert "serving on asyncio's event loop" in err  # main.choose_event_loop: asyncio's on SQLite
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# The controller's main() returned after a clean stop, then signalled as a supervisor's second
# SIGTERM (or a harness that signals twice) may: the loop has closed and given its handlers back.
_SIGNALLED_AFTER_MAIN = """
import os, signal, sys, time
from controller import main
code = main.main(sys.argv[1:])
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
sys.exit(code)
"""


def test_a_sigterm_after_the_controllers_clean_stop_does_not_kill_it(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", _SIGNALLED_AFTER_MAIN, "--listen", "127.0.0.1:0", "--db",
                             f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("maia-controller listening on 127.0.0.1:"), proc.stderr.read() if proc.poll() else line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # not -15 (SIGTERM's default action)
        assert '"msg": "stopped"' in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.postgres
@pytest.mark.parametrize("db_backend", ["postgres"])  # on SQLite: the test above
def test_the_binary_serves_on_uvloop_on_postgres(tmp_path: Path, db_url: str):
    proc = _controller("--listen", "127.0.0.1:0", "--db", db_url, tmp_path=tmp_path)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("maia-controller listening on 127.0.0.1:"), proc.stderr.read() if proc.poll() else line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "serving on uvloop's event loop" in proc.stderr.read()  # main.choose_event_loop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_calls_log_line_names_the_object_it_is_about(stubs: Stubs, caplog: pytest.LogCaptureFixture):
    """The line of an UpdateDeployment (or a cordon) did not say which deployment (or node): an
    on-call engineer had to find it in the audit log by its request id."""
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    with caplog.at_level(logging.INFO, logger="maia.api"):
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec("svc")))
        with pytest.raises(grpc.aio.AioRpcError):
            await stubs.admin.CordonNode(admin_pb2.NodeRequest(id="rack-a-n9"))
        await stubs.admin.ListNodes(admin_pb2.ListNodesRequest())
    said = {r.getMessage().split()[1]: r.getMessage() for r in caplog.records if r.getMessage().startswith("rpc ")}
    assert " object=deployment/lab/svc code=OK " in said["method=/maia.v1.DeploymentService/SubmitDeployment"]
    assert " object=node/rack-a-n9 code=NOT_FOUND " in said["method=/maia.v1.AdminService/CordonNode"]
    assert " object=" not in said["method=/maia.v1.AdminService/ListNodes"]
