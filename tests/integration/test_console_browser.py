"""The web console in headless Chromium (Debian's package, installed by tools/ensure_chromium.sh)
against a real controller with simulated nodes: what the page shows, live updates, screenshots.

Screenshots are saved under .run/console/ (not committed). Without a Chromium the tests skip
with a message, except in CI (`CI` set) or with MAIA_REQUIRE_BROWSER=1, where that fails.
"""

from __future__ import annotations

import os
import re
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from controller.api.server import ControllerApp
from controller.config import Config
from controller.console.state import tenant_colours
from controller.store import models as m
from controller.store.models import utcnow
from controller.store.nominations import StoredNomination, write_nominations
from grpc_harness import (
    PENDING, RUNNING, SimFleet, Stubs, admin_token_of, eventually, issue_token, spec, topology,
)
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = ROOT / ".run" / "console"
CHROMIUM = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")  # the binary, then Debian's wrapper
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    for path in CHROMIUM:
        if os.access(path, os.X_OK):
            return path
    message = "no Chromium at /usr/lib/chromium or /usr/bin: run `make chromium` (tools/ensure_chromium.sh)"
    if os.environ.get("CI") or os.environ.get("MAIA_REQUIRE_BROWSER") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


# Every violation of the page's Content-Security-Policy, told on the console (with Chromium's own
# "Refused to ..." message): the page must run under the policy without one.
CSP_WATCH = """document.addEventListener("securitypolicyviolation", (e) =>
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"}`));"""


async def csp_watched(browser: Any, violations: list[str]) -> Any:
    """A new page whose Content-Security-Policy violations are appended to `violations`."""
    page = await browser.new_page(viewport={"width": 1280, "height": 1100})
    await page.add_init_script(CSP_WATCH)
    page.on("console", lambda message: violations.append(message.text)
            if "CSP violation" in message.text or "Content Security Policy" in message.text else None)
    return page


def one_shard_failed(name: str) -> Any:
    """A route handler: the state document as it is, but for deployment `name`, which has one
    replica fewer running than placed (degraded, with the agent's reason)."""
    async def handle(route: Any) -> None:
        reply = await route.fetch()
        doc = await reply.json()
        for d in doc["deployments"]:
            if d["name"] == name:
                d.update(phase="degraded", running_replicas=d["placed_replicas"] - 1,
                         reasons=[{"code": "SHARD_FAILED", "message": "replica 0 shard 0: HBM ECC error"}])
        await route.fulfill(response=reply, body=json.dumps(doc))
    return handle


def rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[ControllerApp, Stubs]]:
    """Two racks of two nodes; `lab` runs svc, `acme` runs quarter-accelerator shards and has a
    deployment pending on its accelerator cap; one node cordoned."""
    chromium()
    app = ControllerApp(Config(listen="127.0.0.1:0", db_url=f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}",
                               reconcile_interval_s=0.2, heartbeat_timeout_s=5.0, solve_time_limit_ms=1000,
                               http_listen="127.0.0.1:0",
                               bootstrap_admin_token_file=str(tmp_path / "admin.token")))
    await app.start()
    stubs = Stubs.connect(app.address, admin_token_of(app))
    channel = stubs.channel
    fleet = SimFleet(app.address, racks=2, nodes_per_rack=2, token=await issue_token(app.db, "node-bootstrap"),
                     log_dir=tmp_path)
    try:
        await stubs.admin.ApplyTopology(topology({"rack-00": "row-a", "rack-01": "row-a"}, rack_budget_w=8000.0))
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="acme", max_accelerators=4))
        await eventually(lambda: stubs.admin.ListNodes(admin_pb2.ListNodesRequest()),
                         lambda r: sum(n.connected and n.state == common_pb2.NODE_STATE_READY for n in r.nodes) == 4,
                         what="4 agents connected")
        submit = stubs.deployments.SubmitDeployment
        await submit(deployments_pb2.SubmitDeploymentRequest(spec=spec("svc", "lab", shards=2, accelerators=2)))
        frac = spec("frac", "acme", replicas=2, accelerators=1)
        frac.shard.accelerator_milli = 250
        await submit(deployments_pb2.SubmitDeploymentRequest(spec=frac))
        await eventually(lambda: stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest()),
                         lambda r: {d.spec.name: d.phase for d in r.deployments} == {"svc": RUNNING, "frac": RUNNING},
                         what="svc and frac running")
        await submit(deployments_pb2.SubmitDeploymentRequest(spec=spec("big", "acme", accelerators=4)))
        await eventually(lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="big")),
                         lambda d: d.phase == PENDING and len(d.reasons) > 0, what="big pending with reasons")
        await stubs.admin.CordonNode(admin_pb2.NodeRequest(id="rack-01-n01"))
        async with app.db.unit_of_work() as uow:  # as its agent's heartbeats would have it stored
            await uow.session.execute(update(m.Node).where(m.Node.id == "rack-01-n01").values(
                failed_accelerators=[{"index": 3, "reason": "link down"}]))
            # As the leader stores a head-of-line nomination (its own are made after 30 s of waiting).
            big = await uow.session.scalar(select(m.Deployment.id).where(m.Deployment.name == "big"))
            await write_nominations(uow.session, [StoredNomination("acme/big", big, 0, ("rack-00-n00",), utcnow(),
                                                                   utcnow(), 1)])
            await uow.commit()
        yield app, stubs
    finally:
        await fleet.stop()
        await channel.close()
        await app.stop(grace_s=1.0)


async def test_the_console_shows_racks_tenants_and_why_work_is_pending(cluster) -> None:
    from playwright.async_api import async_playwright, expect

    app, stubs = cluster
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    colours = tenant_colours(["acme", "lab"])
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium(), args=FLAGS)
        try:
            violations: list[str] = []
            page = await csp_watched(browser, violations)
            # An operator's link: the admin token in the fragment (never sent to the server).
            response = await page.goto(f"http://{app.console_address}/#token={admin_token_of(app)}")
            # The page runs under a strict policy (and, checked at the end, violates none of it).
            policy = await response.header_value("content-security-policy") or ""
            assert "default-src 'none'" in policy and "script-src 'self'" in policy, policy
            await page.wait_for_selector('[data-deployment="big"]')
            assert "#token" not in page.url  # taken out of the address bar at once

            racks = await page.locator("[data-rack]").evaluate_all("els => els.map(e => e.dataset.rack)")
            assert racks == ["rack-00", "rack-01"]
            # The legend: each tenant with its colour, and the map uses the same colours. The page
            # replaces the legend's elements on every render, and `locator.evaluate` finds the element
            # and then evaluates on it in two steps, so it could read one just detached (computed
            # style ''): `expect` retries until the live element answers.
            for tenant in ("acme", "lab"):
                item = page.locator(f'#legend [data-tenant="{tenant}"]')
                await expect(item).to_have_text(tenant)
                await expect(item.locator(".swatch")).to_have_css("background-color", rgb(colours[tenant]))
            fills = await page.locator(".acc > span").evaluate_all(  # one script in the page: atomic
                "els => els.map(e => getComputedStyle(e).backgroundColor)")
            assert set(fills) == {rgb(colours["acme"]), rgb(colours["lab"])}
            # 4 whole accelerators of lab; acme's two quarters as fractions (on one accelerator or two).
            assert await page.locator(".acc[title*='lab']").count() == 4
            acme_titles = await page.locator(".acc[title*='acme']").evaluate_all("els => els.map(e => e.title)")
            assert sum(int(m) for t in acme_titles for m in re.findall(r"acme (\d+)m", t)) == 500
            assert await page.locator('.node.cordoned[data-node="rack-01-n01"]').count() == 1
            kept = page.locator('.node.nominated[data-node="rack-00-n00"]')
            assert await kept.count() == 1 and await page.locator(".node.nominated").count() == 1
            assert (await kept.get_attribute("title")).endswith(": kept for acme/big at the head of the line")
            assert "dashed" in await kept.evaluate("e => getComputedStyle(e).outlineStyle")
            failed = page.locator('[data-node="rack-01-n01"] .acc.failed')
            assert await failed.count() == 1
            assert await failed.get_attribute("title") == "accelerator 3: failed (link down)"
            assert "repeating-linear-gradient" in await failed.evaluate("e => getComputedStyle(e).backgroundImage")
            # The pending deployment and the solver's reason.
            reason = await page.locator('[data-deployment="big"] .reason').inner_text()
            assert "QUOTA_ACCELERATORS" in reason
            assert (await page.locator('[data-deployment="big"] .tag').inner_text()) == "pending"
            # Power: every rack against its budget.
            assert "/ 8.0 kW" in await page.locator('[data-power="rack-00"]').inner_text()
            await page.screenshot(path=str(ARTEFACTS / "console.png"), full_page=True)

            # Live: a deployment submitted now appears without reloading the page.
            await page.wait_for_selector("#live.on")
            await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
                spec=spec("late", "lab", accelerators=1)))
            await page.wait_for_selector('[data-deployment="late"]', timeout=20_000)
            await page.screenshot(path=str(ARTEFACTS / "console-live.png"), full_page=True)

            # A tenant signs in with its token: its own deployments, its own colour, the rest "other tenants".
            tenant_page = await csp_watched(browser, violations)
            await tenant_page.goto(f"http://{app.console_address}/")
            await tenant_page.wait_for_selector("#sign-in:not([hidden])")
            tenant_token = await issue_token(app.db, "tenant", tenant="acme", name="acme-console")
            await tenant_page.fill("#token", tenant_token)
            await tenant_page.click("#sign-in button[type=submit]")
            await tenant_page.wait_for_selector('[data-deployment="big"]')
            names = await tenant_page.locator("[data-deployment]").evaluate_all(
                "els => els.map(e => e.dataset.deployment)")
            assert sorted(names) == ["big", "frac"]
            legend = await tenant_page.locator("#legend [data-tenant]").evaluate_all(
                "els => els.map(e => e.dataset.tenant)")
            assert legend == ["acme", "*"]
            assert await tenant_page.locator(".acc[title*='lab']").count() == 0
            assert await tenant_page.locator(".acc[title*='other']").count() >= 4
            assert (await tenant_page.locator("#viewer").inner_text()) == "tenant acme"
            await tenant_page.screenshot(path=str(ARTEFACTS / "console-tenant.png"), full_page=True)

            # Its token revoked: the live stream ends saying why, and the page signs out at once.
            await tenant_page.wait_for_selector("#live.on")
            await stubs.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=tenant_token[5:21]))
            await tenant_page.wait_for_selector("#sign-in:not([hidden])", timeout=20_000)
            await tenant_page.wait_for_function(
                "document.getElementById('sign-in-error').textContent.includes('was revoked')", timeout=20_000)
            # The page's next read of the state is refused (401): it still says why, not a generic refusal.
            async with tenant_page.expect_response(
                    lambda r: r.url.endswith("/api/state") and r.status == 401, timeout=20_000):
                pass
            assert "was revoked" in await tenant_page.locator("#sign-in-error").inner_text()

            # Replicas: running told apart from placed. A shard of frac failed (its document as the
            # controller makes it then: placed 2, running 1, degraded, a reason), and "2/2" hid it.
            ops = await csp_watched(browser, violations)
            await ops.route("**/api/state", one_shard_failed("frac"))
            await ops.goto(f"http://{app.console_address}/#token={admin_token_of(app)}")
            await ops.wait_for_selector('[data-deployment="frac"] .tag.degraded')
            replicas = "[data-deployment='{}'] td:nth-child(4)"  # the replicas column
            assert await ops.locator(replicas.format("frac")).inner_text() == "1 running / 2 placed of 2"
            assert await ops.locator(replicas.format("svc")).inner_text() == "1 running / 1 placed of 1"
            # Reasons are shown for running and degraded deployments too: not titled "why pending".
            headings = await ops.locator("#deployments thead th").all_inner_texts()
            assert "why pending" not in headings and "why not all running" in headings, headings
            assert "SHARD_FAILED" in await ops.locator('[data-deployment="frac"] .reason').inner_text()
            assert await ops.locator("#age").is_hidden()  # live data: no age shown
            await ops.unroute("**/api/state")

            # The controller stopped: the page keeps its last map, and says how old it is.
            await ops.wait_for_selector("#live.on")
            await app.stop(grace_s=1.0)
            await ops.wait_for_selector("#live.off", timeout=20_000)
            await ops.wait_for_selector("#age:not([hidden])", timeout=20_000)
            age = await ops.locator("#age").inner_text()
            assert re.fullmatch(r"data from \d\d:\d\d:\d\d, \d+ s ago", age), age
            await ops.screenshot(path=str(ARTEFACTS / "console-stale.png"), full_page=True)

            assert violations == [], violations
        finally:
            await browser.close()
