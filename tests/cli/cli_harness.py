"""Real processes for CLI tests: `maia-controller` on SQLite and port 0 with a bootstrap admin
token, and `maiactl` run as a subprocess with that token and no config file of the user's; and
an in-process server of fake servicers (`fake_controller`) for the tests that script the answers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from maia.v1 import admin_pb2_grpc, deployments_pb2_grpc

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class RunningController:
    address: str
    token: str
    folder: Path

    def ctl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return maiactl(self.address, *args, stdin=stdin, token=self.token)


@contextmanager
def fake_controller(admin: object, deployments: object, *, workers: int = 4) -> Iterator[str]:
    """The address of an in-process gRPC server answering AdminService with `admin` and
    DeploymentService with `deployments` (the tests' fakes), on port 0, stopped after."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
    deployments_pb2_grpc.add_DeploymentServiceServicer_to_server(deployments, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@contextmanager
def silent_address() -> Iterator[str]:
    """An address that accepts TCP connections (the kernel completes the handshake) and never
    answers on them: a hung process, a port that is not gRPC, a middlebox that swallows traffic."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def maiactl_env(token: str | None) -> dict[str, str]:
    """maiactl's environment: the token given, no config file of the user's, no MAIA_* of theirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIA_")}
    env["MAIA_CONFIG"] = os.devnull
    if token:
        env["MAIA_TOKEN"] = token
    return env


def maiactl(address: str, *args: str, stdin: str | None = None,
            token: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "maiactl"), "--controller", address, *args], input=stdin,
                          capture_output=True, text=True, timeout=120, env=maiactl_env(token))


@contextmanager
def controller_process(folder: Path, listen: str = "127.0.0.1:0") -> Iterator[RunningController]:
    """A controller on `folder`'s database (made on the first start, kept by the next: a restart)."""
    proc = subprocess.Popen([str(BIN / "maia-controller"), "--listen", listen, "--db",
                             f"sqlite+aiosqlite:///{folder / 'maia.db'}", "--reconcile-interval", "0.2",
                             "--bootstrap-admin-token-file", str(folder / "admin.token")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert line.startswith("maia-controller listening on "), line
        yield RunningController(line.rsplit(" ", 1)[1], (folder / "admin.token").read_text().strip(), folder)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
