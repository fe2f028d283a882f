"""The console's live stream (`/api/events`) closes when the token it was opened with is revoked or
expires, saying why first; a stream of another token goes on.

A token is checked as the stream opens: `curl -N -H 'Authorization: Bearer TOKEN' .../api/events`
went on delivering the tenant's deployment changes minutes after `maiactl token revoke`, while
`/api/state` answered 401. Plain HTTP from Python (what the page's script reads), not the browser.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pytest

from controller.api.server import ControllerApp
from controller.store.db import Database
from controller.store.models import as_utc
from controller.store.tokens import get_token
from grpc_harness import Stubs, admin_token_of, issue_token, running_controller, spec, topology
from maia.v1 import admin_pb2, deployments_pb2

ENDS_WITHIN_S = 5.0  # "at once", with room for a loaded machine; the old stream never closed


def _id(secret: str) -> str:
    return secret.split(".")[0].removeprefix("maia_")


@pytest.fixture
async def console(database: Database, tmp_path: Path) -> AsyncIterator[tuple[ControllerApp, Stubs]]:
    """A controller serving the console, with an admin's stubs, rack rack-a and tenant lab."""
    async with running_controller(database.url, tmp_path, http_listen="127.0.0.1:0") as app:
        async with Stubs.connect(app.address, admin_token_of(app)).channel as channel:
            stubs = Stubs.on(channel)
            await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
            await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
            yield app, stubs


class _Stream:
    """One `/api/events` stream, read as server-sent events (blocks separated by a blank line)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def next(self, timeout_s: float) -> str | None:
        """The next block (comment or event), None at the end of the stream; TimeoutError after
        `timeout_s` without one."""
        lines: list[str] = []
        async with asyncio.timeout(timeout_s):
            while True:
                line = await self._response.content.readline()
                if not line:
                    return "\n".join(lines) if lines else None
                text = line.decode().rstrip("\n")
                if not text and lines:
                    return "\n".join(lines)
                if text:
                    lines.append(text)

    async def until_closed(self, timeout_s: float) -> tuple[list[str], bool]:
        """The blocks until the stream closes, and whether it did within `timeout_s`."""
        blocks: list[str] = []
        deadline = time.monotonic() + timeout_s
        try:
            while (block := await self.next(max(0.0, deadline - time.monotonic()))) is not None:
                blocks.append(block)
        except TimeoutError:
            return blocks, False
        return blocks, True

    async def until_change_of(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            block = await self.next(max(0.0, deadline - time.monotonic()))
            assert block is not None, f"the stream closed before a change of {name}"
            if block.startswith("event: change") and json.loads(block.split("data: ", 1)[1])["deployment"] == name:
                return


async def _open(http: aiohttp.ClientSession, app: ControllerApp, token: str) -> _Stream:
    response = await http.get(f"http://{app.console_address}/api/events",
                              headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    stream = _Stream(response)
    assert await stream.next(ENDS_WITHIN_S) == ": connected"  # subscribed: what follows reaches it
    return stream


def _changes(blocks: list[str]) -> list[str]:
    return [json.loads(b.split("data: ", 1)[1])["deployment"] for b in blocks if b.startswith("event: change")]


def _ended(blocks: list[str]) -> list[str]:
    return [json.loads(b.split("data: ", 1)[1])["reason"] for b in blocks if b.startswith("event: ended")]


async def test_the_event_stream_closes_at_once_when_its_token_is_revoked_and_another_tokens_goes_on(
        console: tuple[ControllerApp, Stubs]) -> None:
    app, admin = console
    revoked = await issue_token(app.db, "tenant", tenant="lab", name="console")
    kept = await issue_token(app.db, "tenant", tenant="lab", name="other-console")
    async with aiohttp.ClientSession() as http:
        revoked_stream, kept_stream = await _open(http, app, revoked), await _open(http, app, kept)
        await admin.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=_id(revoked)))
        await admin.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec("after")))
        await kept_stream.until_change_of("after", ENDS_WITHIN_S)  # published, to the stream whose token stands
        blocks, closed = await revoked_stream.until_closed(ENDS_WITHIN_S)
        state = await http.get(f"http://{app.console_address}/api/state",
                               headers={"Authorization": f"Bearer {revoked}"})
    assert "after" not in _changes(blocks)
    assert closed, f"the revoked token's stream did not close; it sent {blocks}"
    assert _ended(blocks) == [f"token {_id(revoked)} was revoked"]
    assert state.status == 401


async def test_the_event_stream_of_an_expiring_token_closes_at_its_expiry_not_before(
        console: tuple[ControllerApp, Stubs]) -> None:
    app, _ = console
    expiring = await issue_token(app.db, "tenant", tenant="lab", name="short", ttl_s=4.0)
    async with app.db.unit_of_work() as uow:
        expires_at = as_utc((await get_token(uow.session, _id(expiring))).expires_at)
    async with aiohttp.ClientSession() as http:
        stream = await _open(http, app, expiring)
        left_s = (expires_at - datetime.now(timezone.utc)).total_seconds()
        blocks, closed = await stream.until_closed(left_s + ENDS_WITHIN_S)
        closed_at = datetime.now(timezone.utc)
    assert closed, f"the expired token's stream did not close; it sent {blocks}"
    assert _ended(blocks) == [f"token {_id(expiring)} expired at {expires_at.isoformat(timespec='seconds')}"]
    assert closed_at >= expires_at


async def test_a_document_read_in_flight_when_its_token_is_revoked_is_refused(
        console: tuple[ControllerApp, Stubs], monkeypatch: pytest.MonkeyPatch) -> None:
    """`/api/state` waits for the viewer's next build (up to 2 s, behind other viewers'): a token
    revoked during that wait got the document built after its revocation."""
    app, admin = console
    token = await issue_token(app.db, "tenant", tenant="lab", name="console")
    building, revoked = asyncio.Event(), asyncio.Event()
    build = app.console.documents._build

    async def held_until_revoked(key: str) -> bytes:
        building.set()
        await revoked.wait()
        return await build(key)

    monkeypatch.setattr(app.console.documents, "_build", held_until_revoked)
    async with aiohttp.ClientSession() as http:
        read = asyncio.create_task(http.get(f"http://{app.console_address}/api/state",
                                            headers={"Authorization": f"Bearer {token}"}))
        await asyncio.wait_for(building.wait(), ENDS_WITHIN_S)
        await admin.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=_id(token)))
        revoked.set()
        response = await asyncio.wait_for(read, ENDS_WITHIN_S)
        body = await response.read()
    assert response.status == 401, body
    assert b"lab" not in body
