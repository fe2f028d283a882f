"""maia-controller --console-max-connections N --console-max-connections-per-peer M: the
controller's console serves at most N connections at once, M from one address, as the flags say
(they were constants, which an operator behind a proxy could not raise). The flags parsed as the
command line gives them, the controller in process, connections held open on real sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.config import parse_args
from grpc_harness import running_controller


async def _status(address: str, source: str) -> tuple[int, str, asyncio.StreamWriter]:
    """One request on a connection of its own from `source` (kept open); its status and body."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(source, 0))
    writer.write(f"GET /static/console.css HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)).decode()
    length = next(int(value) for name, _, value in (line.partition(":") for line in head.split("\r\n"))
                  if name.lower() == "content-length")
    body = await asyncio.wait_for(reader.readexactly(length), 5.0)
    return int(head.split()[1]), body.decode(errors="replace"), writer


async def test_the_console_serves_as_many_connections_as_its_flags_say(tmp_path: Path) -> None:
    flags = parse_args(["--http-listen", "127.0.0.1:0", "--console-max-connections", "3",
                        "--console-max-connections-per-peer", "2"], env={})
    caps = {name: getattr(flags, name) for name in ("http_listen", "console_max_connections",
                                                    "console_max_connections_per_peer")}
    async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path, **caps) as app:
        address = app.console_address
        held: list[asyncio.StreamWriter] = []
        try:
            for source, status, said in [("127.0.0.1", 200, ""), ("127.0.0.1", 200, ""),
                                         ("127.0.0.1", 503, "serves 2 connections from one address at most"),
                                         ("127.0.0.2", 200, ""),
                                         ("127.0.0.3", 503, "serves 3 connections at most")]:
                got, body, writer = await _status(address, source)
                held.append(writer)
                assert (got, said in body) == (status, True), (source, got, body)
        finally:
            for writer in held:
                writer.close()
