"""TLS and mutual TLS on a real socket: clients with and without the CA, node agents with their
own certificate, without one, and with another node's; real maia-simnode processes and maiactl."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller import devca
from controller.api.server import ControllerApp
from controller.cli.main import main as maiactl
from controller.config import Config
from controller.store import audit
from controller.bearer import aio_channel
from grpc_harness import SimFleet, Stubs, admin_token_of, eventually, issue_token, topology
from maia.v1 import admin_pb2, agent_pb2


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    devca.issue_server(directory)
    for node_id in ("n1", "tls-00-n00", "tls-00-n01"):
        devca.issue_node(directory, node_id)
    devca.issue_client(directory, "admin")
    return directory


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("other-pki")
    devca.issue_node(directory, "n1")
    return directory


async def _app(tmp_path: Path, pki: Path, *, mutual: bool, **overrides: Any) -> ControllerApp:
    app = ControllerApp(Config(listen="127.0.0.1:0", db_url=f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}",
                               reconcile_interval_s=0.2, heartbeat_timeout_s=2.0,
                               tls_cert=pki / "server.pem", tls_key=pki / "server-key.pem",
                               tls_client_ca=pki / devca.CA_CERT if mutual else None,
                               bootstrap_admin_token_file=str(tmp_path / "admin.token"), **overrides))
    await app.start()
    return app


@pytest.fixture
async def tls_app(tmp_path: Path, pki: Path) -> AsyncIterator[ControllerApp]:
    app = await _app(tmp_path, pki, mutual=False)
    try:
        yield app
    finally:
        await app.stop(grace_s=1.0)


@pytest.fixture
async def mtls_app(tmp_path: Path, pki: Path) -> AsyncIterator[ControllerApp]:
    app = await _app(tmp_path, pki, mutual=True)
    try:
        yield app
    finally:
        await app.stop(grace_s=1.0)


def _stubs(app: ControllerApp, ca: Path | None, cert_dir: Path | None = None, stem: str = "") -> Stubs:
    """Over TLS, with the app's admin token (the certificate is checked on top of the token)."""
    key = (cert_dir / f"{stem}-key.pem").read_bytes() if cert_dir else None
    chain = (cert_dir / f"{stem}.pem").read_bytes() if cert_dir else None
    credentials = grpc.ssl_channel_credentials(ca.read_bytes() if ca else None, key, chain)
    return Stubs.on(aio_channel(app.address, admin_token_of(app), credentials=credentials))


async def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


def _register(node_id: str) -> agent_pb2.RegisterRequest:
    return agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(node_id=node_id, rack="rack-a", accelerators=4,
                                                             accelerator_model="maia-100"))


async def test_tls_serves_clients_that_trust_the_ca_only(tls_app: ControllerApp, pki: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    trusted = _stubs(tls_app, pki / devca.CA_CERT)
    summary = await trusted.admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest(), timeout=5)
    assert summary.nodes_ready == 0
    untrusted = _stubs(tls_app, None)  # the system roots do not know the development CA
    assert await _code(untrusted.admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest(), timeout=5)) \
        == grpc.StatusCode.UNAVAILABLE
    plaintext = Stubs.on(grpc.aio.insecure_channel(tls_app.address))
    assert await _code(plaintext.admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest(), timeout=5)) \
        == grpc.StatusCode.UNAVAILABLE
    for stubs in (trusted, untrusted, plaintext):
        await stubs.channel.close()

    token = ("--token", admin_token_of(tls_app))
    ok = await asyncio.to_thread(maiactl, ["summary", "--controller", tls_app.address, "--ca", str(pki / "ca.pem"),
                                           *token])
    capsys.readouterr()
    refused = await asyncio.to_thread(maiactl, ["summary", "--controller", tls_app.address, "--rpc-timeout", "5",
                                                *token])
    assert (ok, refused) == (0, 5)
    # Told what to give, not "is maia-controller running there?" of a controller that runs.
    assert "give --ca" in capsys.readouterr().err


async def test_mutual_tls_binds_agent_certificates_to_their_node(mtls_app: ControllerApp, pki: Path,
                                                                 other_pki: Path) -> None:
    ca = pki / devca.CA_CERT
    admin = _stubs(mtls_app, ca, pki, "client-admin")
    await admin.admin.ApplyTopology(topology({"rack-a": "row-a"}), timeout=5)
    n1 = _stubs(mtls_app, ca, pki, "node-n1")
    assert (await n1.agent.Register(_register("n1"), timeout=5)).session_id

    # Another node's id with n1's certificate: refused, and audited as refused.
    assert await _code(n1.agent.Register(_register("n2"), timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    # A Connect whose Hello names another node: refused on the stream.
    call = n1.agent.Connect(iter([agent_pb2.AgentMessage(hello=agent_pb2.Hello(node_id="n2", session_id="x"))]))
    assert await _code(_first(call)) == grpc.StatusCode.PERMISSION_DENIED

    # No client certificate, or one from another CA: the handshake fails.
    anonymous = _stubs(mtls_app, ca)
    assert await _code(anonymous.agent.Register(_register("n1"), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    forged = _stubs(mtls_app, ca, other_pki, "node-n1")
    assert await _code(forged.agent.Register(_register("n1"), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    # A tool's certificate is no node's: it cannot register "n1" either, nor a node named as the tool
    # ("admin": the certificate's common name is "tool:admin", which no node id can be).
    assert await _code(admin.agent.Register(_register("n1"), timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    assert await _code(admin.agent.Register(_register("admin"), timeout=5)) == grpc.StatusCode.PERMISSION_DENIED

    async def registers() -> list[tuple[str, str]]:
        async with mtls_app.db.unit_of_work() as uow:
            return [(e.object_id, e.outcome) for e in await audit.list_entries(uow.session)
                    if e.action.endswith("/Register")]

    # A refusal's status reaches the client as the abort happens, its audit entry a moment later.
    await eventually(registers, lambda r: r == [("n1", "OK"), ("n2", "PERMISSION_DENIED"), ("n1", "PERMISSION_DENIED"),
                                                ("admin", "PERMISSION_DENIED")],
                     timeout=10, what="the four Register calls audited")
    for stubs in (admin, n1, anonymous, forged):
        await stubs.channel.close()


async def _first(call):  # type: ignore[no-untyped-def]
    async for message in call:
        return message


async def test_simnode_agents_connect_over_mutual_tls_with_their_own_certificates(
        mtls_app: ControllerApp, pki: Path, tmp_path: Path) -> None:
    admin = _stubs(mtls_app, pki / devca.CA_CERT, pki, "client-admin")
    await admin.admin.ApplyTopology(topology({"tls-00": "row-a"}), timeout=5)
    fleet = SimFleet(mtls_app.address, racks=1, nodes_per_rack=2, rack_prefix="tls-", log_dir=tmp_path,
                     token=await issue_token(mtls_app.db, "node-bootstrap"),
                     extra_args=("--ca", str(pki / devca.CA_CERT), "--cert-dir", str(pki)))
    try:
        nodes = await eventually(lambda: admin.admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=5),
                                 lambda r: sorted(n.id for n in r.nodes if n.connected) == fleet.node_ids,
                                 what="both simulated nodes connected over mTLS")
        assert len(nodes.nodes) == 2
    finally:
        await fleet.stop()
        await admin.channel.close()


async def test_the_healthcheck_checks_a_tls_controller_over_tls(tls_app: ControllerApp, pki: Path, capsys) -> None:
    """`python -m controller.healthcheck` (the image's HEALTHCHECK) spoke plaintext only: a
    controller serving TLS was "unreachable" for ever, and compose's setup waiting for it never ran."""
    from controller.healthcheck import main as healthcheck

    ca = str(pki / devca.CA_CERT)
    assert await asyncio.to_thread(healthcheck, [tls_app.address]) == 1  # plaintext at a TLS server
    assert await asyncio.to_thread(healthcheck, [tls_app.address, "--ca", ca]) == 0
    assert await asyncio.to_thread(healthcheck, [tls_app.address, "--ca", ca, "--server-name", "localhost"]) == 0
    assert await asyncio.to_thread(healthcheck, [tls_app.address, "--ca", ca, "--server-name", "elsewhere"]) == 1
    with pytest.raises(SystemExit) as refused:
        healthcheck([tls_app.address, "--ca", str(pki / "missing.pem")])
    assert refused.value.code == 2 and "--ca" in capsys.readouterr().err


async def test_the_healthcheck_sends_a_client_certificate_where_one_is_asked_for(mtls_app: ControllerApp,
                                                                                 pki: Path) -> None:
    from controller.healthcheck import main as healthcheck

    mutual = [mtls_app.address, "--ca", str(pki / devca.CA_CERT)]
    assert await asyncio.to_thread(healthcheck, mutual) == 1  # it asks for a client certificate
    client = [*mutual, "--cert", str(pki / "client-admin.pem"), "--key", str(pki / "client-admin-key.pem")]
    assert await asyncio.to_thread(healthcheck, client) == 0


async def test_replaced_tls_files_serve_new_connections_without_a_restart(tmp_path: Path) -> None:
    """The files were read once, at start-up: a rotated certificate (or CA) changed nothing until a
    restart, which no document said. Replaced, they serve the next connections (old ones keep
    theirs); a pair caught half replaced (a key not the certificate's) is not taken, the last good
    one served until both are in place; a client CA replaced trusts the new CA's clients."""
    live, old, new = tmp_path / "live", tmp_path / "old", tmp_path / "new"
    for directory in (old, new):
        directory.mkdir()
        devca.issue_server(directory)
        devca.issue_client(directory, "admin")
    live.mkdir()
    for name in ("server.pem", "server-key.pem", devca.CA_CERT):
        (live / name).write_bytes((old / name).read_bytes())
    app = await _app(tmp_path, live, mutual=True)

    async def answers(pki: Path) -> bool:
        stubs = _stubs(app, pki / devca.CA_CERT, pki, "client-admin")  # a new channel: a new handshake
        try:
            await stubs.admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest(), timeout=5)
            return True
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return False
        finally:
            await stubs.channel.close()

    try:
        assert (await answers(old), await answers(new)) == (True, False)
        (live / "server.pem").write_bytes((new / "server.pem").read_bytes())  # the key not yet
        await asyncio.sleep(1.2)  # past tlsfiles.RELOAD_CHECK_S
        assert await answers(old)  # the old pair still served
        (live / "server-key.pem").write_bytes((new / "server-key.pem").read_bytes())
        (live / devca.CA_CERT).write_bytes((new / devca.CA_CERT).read_bytes())
        await eventually(lambda: answers(new), lambda ok: ok, timeout=10, what="the new files served")
        assert not await answers(old)
    finally:
        await app.stop(grace_s=1.0)


async def test_agent_gateways_serve_tls_to_agents(tmp_path: Path, pki: Path) -> None:
    """The gateway processes serve the agents TLS with the controller's certificate (no test
    covered it: a gateway read its files apart from the controller)."""
    app = await _app(tmp_path, pki, mutual=False, agent_gateways=1, agent_listen="127.0.0.1:0")
    admin = _stubs(app, pki / devca.CA_CERT)
    fleet = None
    try:
        await admin.admin.ApplyTopology(topology({"tls-00": "row-a"}), timeout=5)
        fleet = SimFleet(app.agent_address, racks=1, nodes_per_rack=2, rack_prefix="tls-", log_dir=tmp_path,
                         token=await issue_token(app.db, "node-bootstrap"), extra_args=("--ca", str(pki / devca.CA_CERT)))
        await eventually(lambda: admin.admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=5),
                         lambda r: sorted(n.id for n in r.nodes if n.connected) == fleet.node_ids,
                         what="both simulated nodes connected over TLS through the gateway")
        plaintext = Stubs.on(grpc.aio.insecure_channel(app.agent_address))
        assert await _code(plaintext.agent.Register(_register("n1"), timeout=5)) == grpc.StatusCode.UNAVAILABLE
        await plaintext.channel.close()
    finally:
        if fleet is not None:
            await fleet.stop()
        await admin.channel.close()
        await app.stop(grace_s=1.0)
