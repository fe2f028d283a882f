"""The console's refused sign-ins are logged (why, the token's id, the peer; never the secret), at
most at a bounded rate, the rest counted into the next line; so are gRPC's refused calls.

200 requests to `/api/state` with random `maia_...` tokens were answered 401 and the controller
wrote no line at all, while gRPC logs `code=UNAUTHENTICATED reason=... peer=...` for each: a
token-guessing run against the console went unseen. Plain HTTP from Python.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import aiohttp
import pytest

from controller.api.server import ControllerApp
from controller.console.server import ConsoleServer
from controller.console.signins import RefusedSignIns
from controller.errors import Unauthenticated
from controller.identity import Principal
from grpc_harness import Stubs, admin_token_of, issue_token
from maia.v1 import admin_pb2
from test_console_revocation import _id, console  # noqa: F401  (console: the fixture, a controller and tenant lab)

LOGGER = "maia.console"




def _random_token() -> str:
    return f"maia_{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}"


async def _get_state(http: aiohttp.ClientSession, address: str, authorization: str | None) -> int:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with http.get(f"http://{address}/api/state", headers=headers) as reply:
        return reply.status


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


async def test_each_refused_sign_in_is_logged_with_why_the_token_id_and_the_peer_never_the_secret(
        console: tuple[ControllerApp, Stubs], caplog: pytest.LogCaptureFixture) -> None:
    app, admin = console
    revoked = await issue_token(app.db, "tenant", tenant="lab", name="revoked")
    await admin.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=_id(revoked)))
    expired = await issue_token(app.db, "tenant", tenant="lab", name="expired", ttl_s=0.5)
    node = await issue_token(app.db, "node-bootstrap", name="fleet")
    unknown = _random_token()
    wrong_secret = f"maia_{_id(revoked)}.{secrets.token_urlsafe(32)}"
    malformed = "maia_not-a-token-" + secrets.token_urlsafe(16)
    await asyncio.sleep(0.7)  # `expired` is past its expiry
    caplog.set_level(logging.INFO, logger=LOGGER)
    presented = {"unknown": unknown, "wrong secret": wrong_secret, "revoked": revoked, "expired": expired,
                 "node": node, "malformed": malformed}
    async with aiohttp.ClientSession() as http:
        for token in presented.values():
            assert await _get_state(http, app.console_address, f"Bearer {token}") == 401
        assert await _get_state(http, app.console_address, "Basic dXNlcjpwYXNz") == 401
        assert await _get_state(http, app.console_address, None) == 401  # no credential: a page's first read
        assert await _get_state(http, app.console_address, f"Bearer {admin_token_of(app)}") == 200

    lines = _lines(caplog)
    assert len(lines) == 7, lines  # one a refused credential; none for the request without one
    for line in lines:
        assert "peer=127.0.0.1:" in line and "path=/api/state" in line and "code=401" in line, line
        for token in (*presented.values(), admin_token_of(app)):
            secret = token.partition(".")[2]
            assert not secret or secret not in line, f"a secret was logged: {line}"
        assert malformed not in line
    by_kind = dict(zip([*presented, "basic"], lines))
    assert f"token={_id(unknown)}" in by_kind["unknown"] and "unknown token" in by_kind["unknown"]
    assert f"token={_id(revoked)}" in by_kind["wrong secret"] and "wrong secret" in by_kind["wrong secret"]
    assert f"token={_id(revoked)}" in by_kind["revoked"] and "was revoked" in by_kind["revoked"]
    assert f"token={_id(expired)}" in by_kind["expired"] and "expired at" in by_kind["expired"]
    assert f"token={_id(node)}" in by_kind["node"] and "node-bootstrap token" in by_kind["node"]
    assert "token=-" in by_kind["malformed"] and "malformed" in by_kind["malformed"]
    assert "token=-" in by_kind["basic"] and "malformed" in by_kind["basic"]


async def test_a_flood_of_refusals_is_logged_at_the_bound_and_the_rest_are_counted(
        console: tuple[ControllerApp, Stubs], caplog: pytest.LogCaptureFixture) -> None:
    app, _ = console
    now = [1000.0]
    sign_ins = RefusedSignIns(per_minute=6.0, burst=5.0, clock=lambda: now[0])

    async def nobody(token: str) -> Principal:
        raise Unauthenticated("invalid token", why="unknown token")

    server = ConsoleServer(app.db, app.bus, resolve_token=nobody, sign_ins=sign_ins)
    address = await server.start("127.0.0.1:0")
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                assert await _get_state(http, address, f"Bearer {_random_token()}") == 401
            flooded = _lines(caplog)
            now[0] += 10.0  # one line's worth of the bucket (6 a minute)
            assert await _get_state(http, address, f"Bearer {_random_token()}") == 401
    finally:
        await server.stop()
    lines = _lines(caplog)
    assert len(flooded) == 5, flooded  # the burst, then nothing until the bucket refills
    assert all("suppressed" not in line for line in flooded)
    assert len(lines) == 6 and "suppressed=195" in lines[-1], lines[-1]
