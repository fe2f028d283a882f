"""The console page's sessions in a browser (found in review): a state read under way when the
viewer signs out, or signs in with another token, is not drawn (it showed the last viewer's data
again on a screen signed out, or over the next viewer's); a token the controller refused is not
sent again until a sign-in (the page asked with it every second for as long as the tab stayed
open, spending the console's budget of refusal log lines)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

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


@pytest.fixture
async def console(database: Database) -> AsyncIterator[str]:
    server = ConsoleServer(database, DeploymentEventBus(), resolve_token=_resolve, streams=TokenStreams())
    address = await server.start("127.0.0.1:0")
    try:
        yield address
    finally:
        await server.stop()


@pytest.fixture
async def page() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium(), args=FLAGS)
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_read_under_way_at_a_sign_out_or_in_is_not_drawn(console: str, page: object) -> None:
    await page.goto(f"http://{console}/#token=tok-a")  # type: ignore[attr-defined]
    await page.wait_for_selector("#console:not([hidden])")  # type: ignore[attr-defined]
    # A read now waits for the viewer's next build (one every 2 s at most); it signs out meanwhile.
    await page.evaluate("void refresh()")  # type: ignore[attr-defined]
    await page.click("#sign-out")  # type: ignore[attr-defined]
    await asyncio.sleep(3.0)
    assert await page.get_attribute("#console", "hidden") is not None  # type: ignore[attr-defined]
    assert await page.text_content("#viewer") == ""  # type: ignore[attr-defined]
    assert await page.locator("#map *").count() == 0  # type: ignore[attr-defined]  (nothing left, hidden or not)

    # Signed in again; a read for t1 under way when t2 signs in.
    await page.fill("#token", "tok-a")  # type: ignore[attr-defined]
    await page.click("#sign-in button[type=submit]")  # type: ignore[attr-defined]
    await page.wait_for_selector("#console:not([hidden])")  # type: ignore[attr-defined]
    await page.evaluate("void refresh()")  # type: ignore[attr-defined]
    await page.click("#sign-out")  # type: ignore[attr-defined]
    await page.fill("#token", "tok-b")  # type: ignore[attr-defined]
    await page.click("#sign-in button[type=submit]")  # type: ignore[attr-defined]
    for _ in range(200):  # (no wait_for_function: the page's policy runs no string as script)
        if await page.text_content("#viewer") == "tenant t2":  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.05)
    seen = set()
    for _ in range(30):
        seen.add(await page.text_content("#viewer"))  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
    assert seen == {"tenant t2"}


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_refused_token_is_not_sent_again_until_a_sign_in(console: str, page: object) -> None:
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/api/" in r.url else None)  # type: ignore[attr-defined]
    await page.goto(f"http://{console}/#token=maia_0123456789abcdef.typo")  # type: ignore[attr-defined]
    await page.wait_for_selector("#sign-in:not([hidden])")  # type: ignore[attr-defined]
    await asyncio.sleep(8.0)
    assert len(sent) <= 3, sent  # its first read and stream, not one every 2 s
    await page.fill("#token", "tok-a")  # type: ignore[attr-defined]
    await page.click("#sign-in button[type=submit]")  # type: ignore[attr-defined]
    await page.wait_for_selector("#console:not([hidden])")  # type: ignore[attr-defined]
    await page.wait_for_selector("#live.on")  # type: ignore[attr-defined]
