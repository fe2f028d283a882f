"""A failed start of the agent gateways leaves none running: whatever stops the start after some
gateways started (here the next one's process cannot be created, with an error that is no
`GatewayStartError`) stops those started before it, in `GatewayProcesses.start` itself and so in
the controller's start."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from grpc import aio

from controller.gateway.children import GatewayProcesses, GatewaySettings
from controller.gateway.frames import link_server_options
from controller.gateway.relay import RelayServicer
from grpc_harness import running_controller
from maia.v1 import relay_pb2_grpc


class Refused(RuntimeError):
    pass


def second_spawn_refused(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[str]]:
    """Gateway 1's process cannot be created; the processes made before it, returned as they come."""
    spawned: list[subprocess.Popen[str]] = []
    spawn = GatewayProcesses._spawn

    def refusing(self: GatewayProcesses, index: int, listen: str) -> subprocess.Popen[str]:
        if index == 1:
            raise Refused("no process for gateway 1")
        process = spawn(self, index, listen)
        spawned.append(process)
        return process

    monkeypatch.setattr(GatewayProcesses, "_spawn", refusing)
    return spawned


async def test_gateways_that_started_are_stopped_when_a_later_one_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned = second_spawn_refused(monkeypatch)
    gateways = GatewayProcesses(GatewaySettings(count=2, listen="127.0.0.1:0", linger_ms=5.0))
    relay_server = aio.server(options=link_server_options())
    relay_pb2_grpc.add_AgentRelayServicer_to_server(RelayServicer(0.005), relay_server)
    relay_server.add_insecure_port(gateways.link_address)
    await relay_server.start()
    try:
        with pytest.raises(Refused):
            await gateways.start()
        [first] = spawned
        assert first.poll() is not None  # stopped (and waited for), not left running
        assert all(watcher.done() for watcher in gateways._watchers)
        assert not gateways.link_directory.path.exists()
    finally:
        await relay_server.stop(None)
        for process in spawned:
            process.kill()
            process.wait(10)


async def test_a_controller_whose_second_gateway_fails_to_start_leaves_no_gateway_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spawned = second_spawn_refused(monkeypatch)
    try:
        with pytest.raises(Refused):
            async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path, agent_gateways=2,
                                          agent_listen="127.0.0.1:0"):
                pass
        [first] = spawned
        assert first.poll() is not None
    finally:
        for process in spawned:
            process.kill()
            process.wait(10)
