"""maiactl's channels (`cli.client.open_channel`, `open_aio_channel`) reach a controller that comes
back within seconds, however long it was away: their reconnect back-off stops growing at 2 s
(`limits.GRPC_CLI_RECONNECT_OPTIONS`), where gRPC's own grows to 2 minutes. Real sockets: a
listener that accepts each connection attempt and closes it at once (a controller not serving,
each attempt counted) is replaced by a real gRPC server on the same port."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
import pytest

from controller.cli.client import Controller, open_aio_channel
from controller.cli.config import Connection
from maia.v1 import admin_pb2, admin_pb2_grpc
from tests.addresses import closed_port_address

# Failed attempts before the controller comes back: gRPC's own back-off then waits ~10.5 s
# (x0.8-1.2) before the next attempt (1, 1.6, 2.6, 4.1, 6.6, 10.5 s...), ours 2 s at most.
ATTEMPTS = 6
REACHED_WITHIN_S = 8.0  # generous for a 2.4 s wait; under the 8.4 s gRPC's back-off waits at least
WAIT_S = 60.0           # a bound on the failed attempts coming, never reached when things work


class ClosingListener:
    """Accepts connections on 127.0.0.1:0 and closes each at once, counting them."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self._socket.settimeout(0.05)
        self.port = self._socket.getsockname()[1]
        self.accepted = 0
        self._open = True
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while self._open:
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            connection.close()
            self.accepted += 1

    def close(self) -> None:
        self._open = False
        self._thread.join()
        self._socket.close()


def _attempts_then_server(listener: ClosingListener, poll: Callable[[], None]) -> grpc.Server:
    """`poll` (a call the client makes meanwhile, as a watch does) until `ATTEMPTS` connection
    attempts failed; then a real server (no services: UNIMPLEMENTED is an answer) on the port."""
    deadline = time.monotonic() + WAIT_S
    while listener.accepted < ATTEMPTS:
        assert time.monotonic() < deadline, f"{listener.accepted} attempts in {WAIT_S}s"
        poll()
        time.sleep(0.05)
    listener.close()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_insecure_port(f"127.0.0.1:{listener.port}")
    server.start()
    return server


def _answered(error: grpc.RpcError | None) -> bool:
    return error is None or error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_channel_reaches_a_controller_back_after_many_failed_attempts_within_seconds() -> None:
    listener = ClosingListener()
    client = Controller(Connection(address=f"127.0.0.1:{listener.port}"))

    def version() -> grpc.RpcError | None:
        try:
            client.admin.GetVersion(admin_pb2.GetVersionRequest(), timeout=1.0)
        except grpc.RpcError as exc:
            return exc
        return None

    server = _attempts_then_server(listener, version)
    try:
        back = time.monotonic()
        while not _answered(version()):
            assert time.monotonic() - back < REACHED_WITHIN_S, "the controller, back, was not reached"
            time.sleep(0.05)
    finally:
        client.close()
        server.stop(grace=None)


async def test_the_asyncio_channel_reaches_a_controller_back_after_many_failed_attempts_within_seconds() -> None:
    listener = ClosingListener()
    channel = open_aio_channel(Connection(address=f"127.0.0.1:{listener.port}"))
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    loop = asyncio.get_running_loop()

    async def version() -> grpc.RpcError | None:
        try:
            await stub.GetVersion(admin_pb2.GetVersionRequest(), timeout=1.0)
        except grpc.RpcError as exc:
            return exc
        return None

    def poll() -> None:  # on the event loop, from the thread that counts attempts
        asyncio.run_coroutine_threadsafe(version(), loop).result()

    server = await asyncio.to_thread(_attempts_then_server, listener, poll)
    try:
        back = time.monotonic()
        while not _answered(await version()):
            assert time.monotonic() - back < REACHED_WITHIN_S, "the controller, back, was not reached"
            await asyncio.sleep(0.05)
    finally:
        await channel.close()
        server.stop(grace=None)


class SlowLink:
    """A TCP proxy on 127.0.0.1:0 to `port` that holds every read `delay_s` before passing it on,
    as a distant link does (the TCP, TLS and HTTP/2 handshakes take several of them)."""

    def __init__(self, port: int, delay_s: float) -> None:
        self._port, self._delay_s = port, delay_s
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                near, _ = self._socket.accept()
                far = socket.create_connection(("127.0.0.1", self._port))
                for source, sink in ((near, far), (far, near)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                time.sleep(self._delay_s)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._socket.close()


@pytest.mark.parametrize("several", [False, True], ids=["one-controller", "several-controllers"])
def test_a_first_call_over_a_slow_link_is_answered(several: bool) -> None:
    """gRPC core reads `min_reconnect_backoff_ms` as the least time a connection attempt is given,
    and a command's first call waits for its first attempt: one cut short at 250 ms (what several
    controllers were given) failed the call UNAVAILABLE through a link holding each read 300 ms."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    link = SlowLink(port, delay_s=0.3)
    address = f"{link.address},{closed_port_address()}" if several else link.address
    client = Controller(Connection(address=address))
    try:
        with pytest.raises(grpc.RpcError) as answered:
            client.admin.GetVersion(admin_pb2.GetVersionRequest(), timeout=10.0)
        assert answered.value.code() == grpc.StatusCode.UNIMPLEMENTED, answered.value.details()
    finally:
        client.close()
        link.close()
        server.stop(grace=None)
