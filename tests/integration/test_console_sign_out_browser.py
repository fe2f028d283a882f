"""The console page's tokens in headless Chromium: signing out of one token and into another
ends the first one's live stream (it went on: held on the server for that token, telling the
page about the first token's tenant, and its revocation hid the second token's console); a
malformed token in the link shows the sign-in form (the page stayed blank); a read under way at
a sign-out or a sign-in is never drawn; a refused token is not sent again until a sign-in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from controller.console import server as console_server
from controller.console.server import ConsoleServer
from controller.errors import Unauthenticated
from controller.identity import Principal, Role
from controller.store.db import Database
from controller.tokenstreams import TokenStreams
from controller.usecases.watch import DeploymentEventBus
from test_console_browser import FLAGS, chromium

TOKENS = {"tok-a": Principal("a", Role.TENANT, token_id="A", tenant="t1"),
          "tok-b": Principal("b", Role.TENANT, token_id="B", tenant="t2")}


async def _resolve(token: str) -> Principal:
    if token not in TOKENS:
        raise Unauthenticated("invalid token")
    return TOKENS[token]


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not met in {timeout_s:g} s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def console(database: Database, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, TokenStreams]]:
    # The server learns a stream's page let go of it at its next write: a keep-alive every 0.5 s, not 15.
    monkeypatch.setattr(console_server, "KEEPALIVE_S", 0.5)
    streams = TokenStreams()
    server = ConsoleServer(database, DeploymentEventBus(), resolve_token=_resolve, streams=streams)
    address = await server.start("127.0.0.1:0")
    try:
        yield address, streams
    finally:
        await server.stop()


@asynccontextmanager
async def _signed_in_with_a(address: str, streams: TokenStreams) -> AsyncIterator[Any]:
    """A page of a headless Chromium, signed in with token A through the link (its stream held)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium(), args=FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(f"http://{address}/#token=tok-a")
            await page.wait_for_selector("#console:not([hidden])")
            await _until(lambda: streams.held_by("A") == 1, "A's stream held")
            yield page
        finally:
            await browser.close()


@pytest.mark.parametrize("db_backend", ["sqlite"])  # the page, not the database, is under test
async def test_signing_out_and_in_ends_the_old_tokens_stream(console: tuple[str, TokenStreams]) -> None:
    address, streams = console
    async with _signed_in_with_a(address, streams) as page:
        await page.click("#sign-out")
        await _until(lambda: streams.held_by("A") == 0, "A's stream ended by the sign-out")
        await page.fill("#token", "tok-b")
        await page.click("#sign-in button[type=submit]")
        await page.wait_for_selector("#console:not([hidden])")
        await _until(lambda: streams.held_by("B") == 1, "B's stream held")
        assert streams.held_by("A") == 0 and await page.text_content("#viewer") == "tenant t2"
        assert streams.revoke(["A"]) == 0  # A revoked long after: nothing of B's page ends
        await asyncio.sleep(0.5)
        assert await page.get_attribute("#console", "hidden") is None
        assert streams.revoke(["B"]) == 1  # B revoked: its page says so
        await page.wait_for_selector("#sign-in:not([hidden])")
        assert "revoked" in (await page.text_content("#sign-in-error") or "")


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_malformed_token_in_the_link_shows_the_sign_in_form(console: tuple[str, TokenStreams]) -> None:
    address, streams = console
    async with _signed_in_with_a(address, streams) as page:  # signed in with A earlier in the tab
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.goto(f"http://{address}/?again#token=maia_abc.x%zz")  # a load, not a hash change
        await page.wait_for_selector("#sign-in:not([hidden])")
        assert "malformed" in (await page.text_content("#sign-in-error") or "")
        assert errors == [] and "#" not in page.url  # the fragment is gone from the address bar
        # Neither A (stored before: the link meant another token) nor a refusal takes its place
        # (the 2 s retry wiped the message; the 10 s refresh showed A's console).
        await page.evaluate("refreshSoon()")
        await asyncio.sleep(3.0)
        assert await page.get_attribute("#console", "hidden") is not None
        assert "malformed" in (await page.text_content("#sign-in-error") or "")
        assert streams.held_by("A") == 0


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_read_under_way_at_a_sign_out_or_in_is_not_drawn(console: tuple[str, TokenStreams]) -> None:
    """It showed the last viewer's data again on a screen signed out, or over the next viewer's
    (found in review). A read now waits for the viewer's next build (one every 2 s at most)."""
    address, streams = console
    async with _signed_in_with_a(address, streams) as page:
        await page.evaluate("void refresh()")
        await page.click("#sign-out")
        await asyncio.sleep(3.0)
        assert await page.get_attribute("#console", "hidden") is not None
        assert await page.text_content("#viewer") == ""
        assert await page.locator("#map *").count() == 0  # nothing of the last viewer's left, hidden or not

        await page.fill("#token", "tok-a")  # signed in again; a read for t1 under way when t2 signs in
        await page.click("#sign-in button[type=submit]")
        await page.wait_for_selector("#console:not([hidden])")
        await page.evaluate("void refresh()")
        await page.click("#sign-out")
        await page.fill("#token", "tok-b")
        await page.click("#sign-in button[type=submit]")
        for _ in range(200):  # (the page's policy runs no string as script: no wait_for_function)
            if await page.text_content("#viewer") == "tenant t2":
                break
            await asyncio.sleep(0.05)
        seen = set()
        for _ in range(30):
            seen.add(await page.text_content("#viewer"))
            await asyncio.sleep(0.1)
        assert seen == {"tenant t2"}


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_refused_token_is_not_sent_again_until_a_sign_in(console: tuple[str, TokenStreams]) -> None:
    """The page asked with it every second for as long as the tab stayed open, spending the
    console's budget of refusal log lines (found in review)."""
    address, streams = console
    async with _signed_in_with_a(address, streams) as page:
        await page.click("#sign-out")
        sent: list[str] = []
        page.on("request", lambda r: sent.append(r.url) if "/api/" in r.url else None)
        await page.fill("#token", "maia_0123456789abcdef.typo")
        await page.click("#sign-in button[type=submit]")
        await page.wait_for_selector("#sign-in:not([hidden])")
        await asyncio.sleep(8.0)
        assert len(sent) <= 3, sent  # its read and its stream, not one every 2 s
        await page.fill("#token", "tok-a")
        await page.click("#sign-in button[type=submit]")
        await page.wait_for_selector("#console:not([hidden])")
        await _until(lambda: streams.held_by("A") == 1, "A's stream held again")
