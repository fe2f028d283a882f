"""Every console response carries the browser's security headers and no server banner: the page,
its assets, the state document, the event stream, and the refusals (401, 404, and the 400 aiohttp
answers itself to a request it cannot parse).

`/`, `/static/console.js` and `/api/state` sent Cache-Control, Content-Type, Date and `Server:
Python/3.11 aiohttp/3.14.5` only: the page could be framed (clickjacking a signed-in operator),
sniffed as another type, and nothing bounded what a script injected into it could load or where
it could send the token. Plain HTTP from Python; the browser test checks that the page itself
runs under the policy without a violation (test_console_browser.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from controller.api.server import ControllerApp
from grpc_harness import admin_token_of, running_controller

EXPECTED = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# What the policy must say, directive by directive (the page has no inline script or style).
POLICY = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "connect-src": "'self'",
    "frame-ancestors": "'none'",
    "base-uri": "'none'",
    "form-action": "'none'",
}


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[ControllerApp]:
    async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path,
                                  http_listen="127.0.0.1:0") as app:
        yield app


def _policy(header: str) -> dict[str, str]:
    directives = (part.strip().split(None, 1) for part in header.split(";") if part.strip())
    return {d[0]: d[1] if len(d) > 1 else "" for d in directives}


def _check(path: str, headers: CIMultiDictProxy[str]) -> None:
    for name, value in EXPECTED.items():
        assert headers.get(name) == value, f"{path}: {name} is {headers.get(name)!r}"
    assert _policy(headers.get("Content-Security-Policy", "")) == POLICY, f"{path}: {dict(headers)}"
    server = headers.get("Server", "")
    assert "aiohttp" not in server and "Python" not in server, f"{path}: Server: {server}"


@pytest.mark.parametrize("path, authorised, status", [
    ("/", False, 200),
    ("/static/console.js", False, 200),
    ("/static/console.css", False, 200),
    ("/api/state", True, 200),
    ("/api/state", False, 401),
    ("/static/missing.js", False, 404),
    ("/nowhere", False, 404),
])
async def test_every_console_response_carries_the_security_headers_and_no_server_banner(
        console: ControllerApp, path: str, authorised: bool, status: int) -> None:
    headers = {"Authorization": f"Bearer {admin_token_of(console)}"} if authorised else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{console.console_address}{path}", headers=headers) as reply:
            assert reply.status == status
            _check(path, reply.headers)


async def test_the_event_stream_carries_the_security_headers(console: ControllerApp) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{console.console_address}/api/events",
                            headers={"Authorization": f"Bearer {admin_token_of(console)}"}) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"] == "text/event-stream"
            _check("/api/events", reply.headers)


@pytest.mark.parametrize("sent", [
    b"GET\x01 / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["malformed request line", "malformed header", "request line too long"])
async def test_the_400_aiohttp_answers_itself_carries_the_security_headers(console: ControllerApp,
                                                                           sent: bytes) -> None:
    """A request aiohttp cannot parse is answered 400 by its protocol before any handler, of no
    application (no `on_response_prepare`): it carried none of the headers, and `Server: Python/3.11
    aiohttp/3.14.5`."""
    import asyncio

    host, _, port = console.console_address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(sent)
        await writer.drain()
        answer = (await asyncio.wait_for(reader.read(), 10.0)).decode(errors="replace")  # to its end: closed
    finally:
        writer.close()
    head, _, body = answer.partition("\r\n\r\n")
    status_line, *lines = head.split("\r\n")
    assert status_line.split()[1] == "400", answer
    headers = CIMultiDict((name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines))
    _check("a malformed request", CIMultiDictProxy(headers))
    assert "aiohttp" not in body and "Python" not in body


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "part of its headers"])
async def test_a_connection_without_a_request_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        sent: bytes) -> None:
    """It was kept aiohttp's hour (3,630 s), any number of them, in the file descriptors the API
    and the database share: 290 idle sockets under a limit of 300 made every RPC UNAVAILABLE
    (found in review)."""
    import asyncio

    from controller.console import server as console_server

    monkeypatch.setattr(console_server, "IDLE_CONNECTION_S", 1.0)
    async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path,
                                  http_listen="127.0.0.1:0") as app:
        host, _, port = app.console_address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(sent)
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(), 10.0)  # to its end: the console closed it
            assert reader.at_eof()
        finally:
            writer.close()
