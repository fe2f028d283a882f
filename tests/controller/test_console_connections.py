"""The console's connections: at most `max_connections` at once and `max_connections_per_peer`
from one address (`--console-max-connections[-per-peer]`; one more is answered 503 and
closed, the ones open go on), and, without authentication, only requests whose Host names this
machine (a DNS-rebinding page sends its own name). Real sockets, HTTP written by hand: the Host
header and the connections are what is under test, and a client library would choose them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from controller.console import server as console_server
from controller.console.server import SECURITY_HEADERS, ConsoleServer, _names_this_host
from controller.identity import Principal
from controller.store.db import Database
from controller.usecases.watch import DeploymentEventBus

PAGE = "/static/console.css"  # served without a token, reads no database


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names lower case
    body: str


async def _reply(reader: asyncio.StreamReader) -> Reply:
    """One response off a connection: its status line, headers and Content-Length body."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)).decode()
    status_line, *lines = head.strip().split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5.0)
    return Reply(int(status_line.split()[1]), headers, body.decode())


def _request(path: str, host: str, *, close: bool = False, token: str = "") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}",
             *([f"Authorization: Bearer {token}"] if token else []), *(["Connection: close"] if close else [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    async def get(self, path: str = PAGE) -> Reply:
        self.writer.write(_request(path, self.host))
        await self.writer.drain()
        return await _reply(self.reader)

    def close(self) -> None:
        self.writer.close()


async def _connect(address: str) -> Connection:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    return Connection(reader, writer, address)


async def _once(address: str, path: str = PAGE, *, host: str, token: str = "") -> Reply:
    """One request on a connection of its own, `host` as its Host header."""
    connection = await _connect(address)
    try:
        connection.writer.write(_request(path, host, close=True, token=token))
        await connection.writer.drain()
        return await _reply(connection.reader)
    finally:
        connection.close()


@asynccontextmanager
async def _open_console(**caps: int) -> AsyncIterator[str]:
    """A console without authentication (`--insecure-no-auth`) on 127.0.0.1, with `caps` (its
    connection caps: `max_connections`, `max_connections_per_peer`); its address."""
    never_read = Database("sqlite+aiosqlite://")  # the tests' requests read no document
    console = ConsoleServer(never_read, DeploymentEventBus(), **caps)
    try:
        yield await console.start("127.0.0.1:0")
    finally:
        await console.stop()
        await never_read.dispose()


@pytest.fixture
async def open_console() -> AsyncIterator[str]:
    async with _open_console() as address:
        yield address


async def _place_again(address: str, why: str) -> None:
    """Wait until a connection closed is seen by the console: a new one is served again."""
    for _ in range(50):
        await asyncio.sleep(0.02)
        if (await _once(address, host=address)).status == 200:
            return
    pytest.fail(why)


# --- the caps on connections --------------------------------------------------------------------
@pytest.mark.parametrize("cap", [2, 3])
async def test_a_connection_beyond_the_configured_cap_is_refused_503_and_those_open_go_on(cap: int) -> None:
    """There was no cap: only the idle timeout bounded the sockets, the file descriptors the API
    and the database share. Then a fixed one (MAX_CONNECTIONS), which an operator could not set."""
    async with _open_console(max_connections=cap, max_connections_per_peer=cap) as address:
        held = [await _connect(address) for _ in range(cap)]
        try:
            assert [(await c.get()).status for c in held] == [200] * cap

            refused = await _connect(address)
            try:
                reply = await refused.get()
                assert reply.status == 503 and reply.headers["retry-after"] == str(console_server.RETRY_AFTER_S)
                assert reply.body.startswith(f"the console serves {cap} connections at most")
                assert all(reply.headers[name.lower()] == value for name, value in SECURITY_HEADERS.items())
                assert await asyncio.wait_for(refused.reader.read(), 5.0) == b""  # and closed
            finally:
                refused.close()

            assert [(await c.get()).status for c in held] == [200] * cap  # kept, served
            held.pop().close()
            await _place_again(address, "a connection closed left no place for a new one")
        finally:
            for connection in held:
                connection.close()


@pytest.mark.parametrize("caps", [dict(max_connections=0, max_connections_per_peer=0),
                                  dict(max_connections=4, max_connections_per_peer=0),
                                  dict(max_connections=2, max_connections_per_peer=3)])
def test_a_share_beyond_the_whole_or_below_one_is_refused(caps: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="max_connections_per_peer must be from 1 to max_connections"):
        ConsoleServer(Database("sqlite+aiosqlite://"), DeploymentEventBus(), **caps)


# --- the Host check without authentication ---------------------------------------------------------
@pytest.mark.parametrize("host", ["{address}", "127.0.0.1", "localhost:8080", "LOCALHOST", "localhost.", "[::1]:9",
                                  "127.0.0.2:80", "[::2]:80", "10.0.0.5"])
async def test_without_authentication_a_request_to_this_host_is_served(open_console: str, host: str) -> None:
    assert (await _once(open_console, host=host.format(address=open_console))).status == 200


@pytest.mark.parametrize("host", ["rebind.example", "rebind.example:{port}", "localhost.rebind.example",
                                  "127.0.0.1.nip.io", ""])
@pytest.mark.parametrize("path", [PAGE, "/api/state"])
async def test_without_authentication_a_request_to_another_host_is_refused_403(
        open_console: str, host: str, path: str) -> None:
    """A page of rebind.example, its name re-pointed at 127.0.0.1 once loaded, read the whole
    cluster from a browser on the controller's machine: the console checked no Host."""
    reply = await _once(open_console, path, host=host.format(port=open_console.rpartition(":")[2]))
    assert reply.status == 403
    assert "--insecure-no-auth" in reply.body and "localhost" in reply.body
    assert reply.headers["x-frame-options"] == "DENY" and reply.headers["server"] == "maia"


@pytest.mark.parametrize("name, listen_host, local", [
    ("maia-head.example", "maia-head.example", True),
    ("maia-head.example", "[::]", False),
    ("::", "[::]", True),
    ("", "", False),
    ("10.0.0.5", "0.0.0.0", True),  # an address: where the browser went, not a name re-pointed
    ("maia-head.example", "0.0.0.0", False),
])
def test_the_listen_host_names_this_host(name: str, listen_host: str, local: bool) -> None:
    assert _names_this_host(name, listen_host) is local


async def test_with_authentication_the_host_is_not_checked(shared_cluster: Database) -> None:
    async def resolve(token: str) -> Principal:
        return Principal("admin")

    console = ConsoleServer(shared_cluster, DeploymentEventBus(), resolve_token=resolve)
    address = await console.start("127.0.0.1:0")
    try:
        assert (await _once(address, host="rebind.example")).status == 200
        assert (await _once(address, "/api/state", host="rebind.example")).status == 401
        assert (await _once(address, "/api/state", host="rebind.example", token="any")).status == 200
    finally:
        await console.stop()


@pytest.fixture
async def two_per_peer() -> AsyncIterator[str]:
    """A console serving 2 connections from one address (`--console-max-connections-per-peer 2`)."""
    async with _open_console(max_connections_per_peer=2) as address:
        yield address


async def test_one_address_holds_its_share_of_the_connections_and_others_are_served(two_per_peer: str) -> None:
    """One client re-opening MAX_CONNECTIONS sockets every idle timeout kept every browser on 503."""
    held = [await _connect(two_per_peer) for _ in range(2)]
    try:
        assert [(await c.get()).status for c in held] == [200, 200]
        refused = await _connect(two_per_peer)
        try:
            reply = await refused.get()
            assert reply.status == 503 and "serves 2 connections from one address at most" in reply.body
            assert reply.headers["x-frame-options"] == "DENY"
        finally:
            refused.close()
        host, _, port = two_per_peer.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=("127.0.0.2", 0))
        other = Connection(reader, writer, two_per_peer)  # another address: its own share
        try:
            assert (await other.get()).status == 200
        finally:
            other.close()
        assert [(await c.get()).status for c in held] == [200, 200]
        held.pop().close()
        await _place_again(two_per_peer, "a connection closed left no place for its address")
    finally:
        for connection in held:
            connection.close()


def test_the_caps_refuse_on_uvloop_too() -> None:
    """The controller runs uvloop on PostgreSQL (controller/main.py), whose transports are not
    `asyncio.Transport`s: a refusal asserted one, and raised in the loop instead of answering 503."""
    uvloop = pytest.importorskip("uvloop")

    async def refused_status() -> int:
        async with _open_console(max_connections_per_peer=1) as address:
            first = await _connect(address)
            try:
                assert (await first.get()).status == 200
                return (await _once(address, host=address)).status
            finally:
                first.close()

    assert uvloop.run(refused_status()) == 503
