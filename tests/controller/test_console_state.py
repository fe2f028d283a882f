"""The console's document and its HTTP API: the whole cluster for an operator, one tenant's
view for a tenant's token (other tenants' holdings only as "other"), 401 without a token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from datetime import datetime, timezone

import aiohttp
from sqlalchemy import select, update

from controller.console import server as console_server
from controller.console import state as console_doc
from controller.console.server import ConsoleServer
from controller.console.state import OTHER_TENANT, console_document, console_state
from controller.errors import Unauthenticated
from controller.identity import Principal, Role
from controller.tokenstreams import TokenStreams
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store.db import Database
from controller.store.nominations import StoredNomination, write_nominations
from controller.usecases.watch import DeploymentEventBus, deleted_elsewhere
from uc_builders import add_tenant, deployment, no_publish, submit


async def _two_tenants_placed(db: Database) -> None:
    await add_tenant(db, "t2")
    for name, tenant in (("a-svc", "t1"), ("b-svc", "t2")):
        await submit(db, deployment(name, tenant, accelerators=2))
    await Reconciler(db, push=lambda nodes: None, publish=no_publish).reconcile_once()


async def _serving_with_tokens(db: Database) -> tuple[ConsoleServer, str]:
    """A console serving on a free port whose tokens are `tenant-token` (tenant t2's user) and
    `admin-token` (an operator); the console and its address."""
    tokens = {"tenant-token": Principal("t2-user", Role.TENANT, tenant="t2"), "admin-token": Principal("admin")}

    async def resolve(token: str) -> Principal:
        if token not in tokens:
            raise Unauthenticated("invalid token")
        return tokens[token]

    console = ConsoleServer(db, DeploymentEventBus(), resolve_token=resolve)
    return console, await console.start("127.0.0.1:0")


def _holders(doc: dict) -> dict[str, int]:
    held: dict[str, int] = {}
    for zone in doc["zones"]:
        for row in zone["rows"]:
            for rack in row["racks"]:
                for node in rack["nodes"]:
                    for acc in node["accelerators"]:
                        for h in acc["holders"]:
                            held[h["tenant"]] = held.get(h["tenant"], 0) + h["milli"]
    return held


async def test_a_tenant_sees_its_own_work_and_others_only_as_other(cluster: Database) -> None:
    await _two_tenants_placed(cluster)
    async with cluster.unit_of_work() as uow:
        whole = await console_state(uow.session)
        own = await console_state(uow.session, viewer_tenant="t2")
    assert _holders(whole) == {"t1": 2000, "t2": 2000}
    assert [d["name"] for d in whole["deployments"]] == ["a-svc", "b-svc"]
    assert [t["id"] for t in whole["tenants"]] == ["t1", "t2"]
    assert _holders(own) == {OTHER_TENANT: 2000, "t2": 2000}
    assert [d["name"] for d in own["deployments"]] == ["b-svc"]
    assert [t["id"] for t in own["tenants"]] == ["t2"] and {u["tenant"] for u in own["usage"]} <= {"t2"}
    # The map keeps its shape: the same racks and nodes either way.
    racks = lambda doc: [r["id"] for z in doc["zones"] for row in z["rows"] for r in row["racks"]]  # noqa: E731
    assert racks(own) == racks(whole) == ["rack-a", "rack-b"]


async def test_a_tenant_whose_id_is_other_counts_only_its_own(cluster: Database) -> None:
    """Other tenants' holdings were labelled "other", a tenant id like any: the tenant `other`
    saw every other tenant's accelerators as its own (found in review). The label is no id."""
    await add_tenant(cluster, "other")
    for name, tenant in (("a-svc", "t1"), ("b-svc", "other")):
        await submit(cluster, deployment(name, tenant, accelerators=1 if tenant == "other" else 3))
    await Reconciler(cluster, push=lambda nodes: None, publish=no_publish).reconcile_once()
    async with cluster.unit_of_work() as uow:
        own = await console_state(uow.session, viewer_tenant="other")
    assert _holders(own) == {"other": 1000, OTHER_TENANT: 3000} and OTHER_TENANT == "*"


async def test_a_tenants_colour_does_not_tell_where_its_id_sorts_among_the_others(cluster: Database) -> None:
    """An operator's view colours the tenants in id order; a tenant's own view used that colour,
    so it told the tenant how many ids sort before its own (and changed as others came and went)."""
    await _two_tenants_placed(cluster)
    async with cluster.unit_of_work() as uow:
        before = (await console_state(uow.session, viewer_tenant="t2"))["tenants"]
    for tenant in ("a0", "a1", "a2"):  # three ids that sort before t2
        await add_tenant(cluster, tenant)
    async with cluster.unit_of_work() as uow:
        after = (await console_state(uow.session, viewer_tenant="t2"))["tenants"]
        whole = (await console_state(uow.session))["tenants"]
    assert before == after == [{"id": "t2", "colour": console_doc.own_colour("t2")}]
    assert len({t["colour"] for t in whole}) == len(whole)  # the operator's: distinct, in id order


async def test_the_http_api_asks_for_a_token_and_scopes_it(cluster: Database) -> None:
    await _two_tenants_placed(cluster)
    console, address = await _serving_with_tokens(cluster)
    try:
        async with aiohttp.ClientSession(f"http://{address}") as http:
            async with http.get("/api/state") as reply:
                assert reply.status == 401
            async with http.get("/api/state", headers={"Authorization": "Bearer wrong"}) as reply:
                assert reply.status == 401
            async with http.get("/api/state", headers={"Authorization": "Bearer tenant-token"}) as reply:
                doc = await reply.json()
                assert reply.status == 200 and doc["viewer_tenant"] == "t2" and doc["auth"] is True
                assert [d["name"] for d in doc["deployments"]] == ["b-svc"]
            async with http.get("/api/state", headers={"Authorization": "Bearer admin-token"}) as reply:
                assert [d["name"] for d in (await reply.json())["deployments"]] == ["a-svc", "b-svc"]
            async with http.get("/api/state", headers={"Authorization": "bearer  admin-token"}) as reply:
                assert reply.status == 200  # the scheme is any case (RFC 9110), as the gRPC side takes it
            async with http.get("/") as reply:  # the page itself is public: it shows the sign-in form
                assert reply.status == 200 and "sign-in" in await reply.text()
            async with http.get("/static/../server.py") as reply:
                assert reply.status == 404
    finally:
        await console.stop()


async def test_a_tenant_reads_reasons_without_other_tenants(cluster: Database) -> None:
    await _two_tenants_placed(cluster)
    said = "rack rack-a holds t1 (dedicated_rack); 1 more replica fits after preempting 1 replica of t1/a-svc"
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "b-svc")
                                  .values(reasons=[{"code": "ISOLATION", "message": said, "scope": "t1"}]))
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        whole = await console_state(uow.session)
        own = await console_state(uow.session, viewer_tenant="t2")
    assert [r["message"] for d in whole["deployments"] for r in d["reasons"]] == [said]
    (reason,) = [r for d in own["deployments"] for r in d["reasons"]]
    assert reason["message"] == ("rack rack-a holds another tenant; 1 more replica fits after preempting "
                                 "1 replica of another tenant's deployment")


async def test_requests_at_once_share_a_build(cluster: Database) -> None:
    """Eight browsers asking at once cost one or two builds (those that came after the first build
    began share a second), and all see the same document."""
    await _two_tenants_placed(cluster)
    console = ConsoleServer(cluster, DeploymentEventBus())
    address = await console.start("127.0.0.1:0")
    try:
        async with aiohttp.ClientSession(f"http://{address}") as http:
            async def state() -> dict:
                async with http.get("/api/state") as reply:
                    assert reply.status == 200 and reply.content_type == "application/json"
                    return await reply.json()

            docs = await asyncio.gather(*(state() for _ in range(8)))
    finally:
        await console.stop()
    assert 1 <= console.documents.builds <= 2
    assert [d["name"] for d in docs[0]["deployments"]] == ["a-svc", "b-svc"] and docs[0]["auth"] is False
    assert all(doc["deployments"] == docs[0]["deployments"] and doc["zones"] == docs[0]["zones"] for doc in docs)


async def test_an_operator_and_a_tenant_asking_at_once_each_get_their_own_view(cluster: Database) -> None:
    """Builds are shared per viewer: a tenant's requests, made while the operator's build runs,
    are answered with the tenant's view, never the operator's (nor the other way round)."""
    await _two_tenants_placed(cluster)
    console, address = await _serving_with_tokens(cluster)
    try:
        async with aiohttp.ClientSession(f"http://{address}") as http:
            async def state(token: str) -> dict:
                async with http.get("/api/state", headers={"Authorization": f"Bearer {token}"}) as reply:
                    assert reply.status == 200
                    return await reply.json()

            asked = ["admin-token", "tenant-token"] * 4
            docs = await asyncio.gather(*(state(token) for token in asked))
    finally:
        await console.stop()
    for token, doc in zip(asked, docs):
        if token == "admin-token":
            assert doc["viewer_tenant"] == "" and [d["name"] for d in doc["deployments"]] == ["a-svc", "b-svc"]
        else:
            assert doc["viewer_tenant"] == "t2" and [d["name"] for d in doc["deployments"]] == ["b-svc"]
            assert _holders(doc) == {OTHER_TENANT: 2000, "t2": 2000} and [t["id"] for t in doc["tenants"]] == ["t2"]


async def test_the_document_is_made_off_the_loop_after_its_unit_of_work_closed(cluster: Database,
                                                                                monkeypatch) -> None:
    """The rows are read in a unit of work that is closed (its connection back in the pool)
    before the document is made from them, in a worker thread."""
    await _two_tenants_placed(cluster)
    open_units: list[int] = []
    made: list[tuple[int, int]] = []  # (thread, units open then)
    opened = cluster.unit_of_work

    @contextlib.asynccontextmanager
    async def counted():
        open_units.append(1)
        try:
            async with opened() as uow:
                yield uow
        finally:
            open_units.pop()

    def making(read):  # type: ignore[no-untyped-def]
        made.append((threading.get_ident(), len(open_units)))
        return console_document(read)

    monkeypatch.setattr(cluster, "unit_of_work", counted)
    monkeypatch.setattr(console_server, "console_document", making)
    console = ConsoleServer(cluster, DeploymentEventBus())
    try:
        doc = json.loads(await console.documents.get(""))
    finally:
        await console.stop()
    assert [d["name"] for d in doc["deployments"]] == ["a-svc", "b-svc"]
    assert made and made[0][0] != threading.get_ident() and made[0][1] == 0


async def test_every_viewers_builds_run_one_at_a_time_on_the_consoles_own_thread(cluster: Database,
                                                                                  monkeypatch) -> None:
    """Three viewers asking at once: their documents are made one after another on the console's
    build thread, never two at once and never on the loop's default pool (where the reconciler's
    decisions wait for a thread)."""
    await _two_tenants_placed(cluster)
    running: list[int] = []
    seen: list[tuple[str, int]] = []  # (thread name, builds running then)

    def making(read):  # type: ignore[no-untyped-def]
        running.append(1)
        seen.append((threading.current_thread().name, len(running)))
        time.sleep(0.05)  # long enough that builds on a pool of several threads would overlap
        running.pop()
        return console_document(read)

    monkeypatch.setattr(console_server, "console_document", making)
    console = ConsoleServer(cluster, DeploymentEventBus())
    try:
        docs = await asyncio.gather(*(console.documents.get(viewer) for viewer in ("", "t1", "t2")))
    finally:
        await console.stop()
    assert [json.loads(doc)["viewer_tenant"] for doc in docs] == ["", "t1", "t2"]
    assert len(seen) == 3
    assert all(name.startswith("console-build") and running_then == 1 for name, running_then in seen), seen


async def test_a_grpc_client_on_the_console_port_is_a_warning_line_not_a_traceback(
        cluster: Database, caplog) -> None:  # noqa: ANN001
    """A gRPC client pointed at --http-listen made aiohttp log 'Error handling request' with a
    traceback at error level, for every call."""
    console = ConsoleServer(cluster, DeploymentEventBus())
    address = await console.start("127.0.0.1:0")
    try:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00")  # gRPC's first bytes
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)  # answered 400 and closed
        writer.close()
    finally:
        await console.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert any("not HTTP/1.x" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


async def test_other_tenants_events_do_not_hold_back_a_tenants_keep_alives(cluster: Database, monkeypatch) -> None:
    """A tenant's event stream sent its keep-alive a quiet interval after the last bus event, its
    own or not: while other tenants were busy its keep-alives stopped, telling it so."""
    monkeypatch.setattr(console_server, "KEEPALIVE_S", 0.4)
    console, address = await _serving_with_tokens(cluster)

    async def others_busy() -> None:
        while True:
            console._bus.publish(deleted_elsewhere("a-svc", "t1"))
            await asyncio.sleep(0.1)

    busy = asyncio.create_task(others_busy())
    lines: list[bytes] = []
    try:
        async with aiohttp.ClientSession(f"http://{address}") as http:
            async with http.get("/api/events", headers={"Authorization": "Bearer tenant-token"}) as reply:
                assert reply.status == 200
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.2):
                        async for line in reply.content:
                            lines.append(line)
    finally:
        busy.cancel()
        await console.stop()
    assert b"event: change\n" not in lines  # t1's events are not t2's to see
    assert lines.count(b": keep-alive\n") >= 3, lines  # one each 0.4 s (5 in 2.2 s), however busy t1 is


async def test_an_event_stream_past_its_tokens_share_is_refused_429(cluster: Database, monkeypatch) -> None:
    """The console's event streams count against the token's share as watches do (`TokenStreams`):
    one past it is refused 429 before the stream begins; the ones open go on."""
    monkeypatch.setattr(console_server, "KEEPALIVE_S", 0.3)  # the open stream notices its reader left soon
    viewer = Principal("t2-user", Role.TENANT, token_id="0123456789abcdef", tenant="t2")

    async def resolve(token: str) -> Principal:
        return viewer

    console = ConsoleServer(cluster, DeploymentEventBus(), resolve_token=resolve, streams=TokenStreams(per_token=1))
    address = await console.start("127.0.0.1:0")
    try:
        async with aiohttp.ClientSession(f"http://{address}") as http:
            headers = {"Authorization": "Bearer t2"}
            async with http.get("/api/events", headers=headers) as first:
                assert first.status == 200 and await first.content.readline() == b": connected\n"
                async with http.get("/api/events", headers=headers) as second:
                    assert second.status == 429
                    assert "holds 1 open streams" in (await second.json())["error"]
    finally:
        await console.stop()


async def test_an_older_revisions_shard_shows_what_it_holds_on_the_map(cluster: Database) -> None:
    """Mid-rollout (a-svc's spec now 4 accelerators a shard, its replica still the old 2-accelerator
    one), the map showed 4000 milli on each of its 2 accelerators (found by review)."""
    await _two_tenants_placed(cluster)
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "a-svc")
                                  .values(template_revision=2, shard_accelerators=4))
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        whole = await console_state(uow.session)
    assert _holders(whole) == {"t1": 2000, "t2": 2000}


async def test_a_failed_accelerator_is_marked_on_the_map(cluster: Database) -> None:
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(update(m.Node).where(m.Node.id == "rack-a-n0").values(
            failed_accelerators=[{"index": 3, "reason": "link down"}]))
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        doc = await console_state(uow.session)
    nodes = {n["id"]: n for z in doc["zones"] for row in z["rows"] for r in row["racks"] for n in r["nodes"]}
    assert [a.get("failed") for a in nodes["rack-a-n0"]["accelerators"]] == [None, None, None, "link down"]
    assert all("failed" not in a for a in nodes["rack-a-n1"]["accelerators"])


async def test_a_nominated_node_says_for_whom_and_a_tenant_sees_another_tenants_as_other(cluster: Database) -> None:
    await _two_tenants_placed(cluster)
    async with cluster.unit_of_work() as uow:
        ids = {d.name: d.id for d in (await uow.session.scalars(select(m.Deployment))).all()}
        at = datetime(2026, 12, 6, 21, 0, tzinfo=timezone.utc)
        await write_nominations(uow.session, [
            StoredNomination("t1/a-svc", ids["a-svc"], 0, ("rack-a-n0",), at, at, 1),
            StoredNomination("t2/b-svc", ids["b-svc"], 0, ("rack-a-n1",), at, at, 1)])
        await uow.commit()

    def nodes(doc: dict) -> dict[str, dict]:
        return {n["id"]: n for z in doc["zones"] for row in z["rows"] for r in row["racks"] for n in r["nodes"]}

    async with cluster.unit_of_work() as uow:
        operator = nodes(await console_state(uow.session))
        tenant = nodes(await console_state(uow.session, viewer_tenant="t2"))
    assert operator["rack-a-n0"]["nominated_for"] == "t1/a-svc" and operator["rack-a-n1"]["nominated_for"] == "t2/b-svc"
    assert tenant["rack-a-n0"]["nominated_for"] == OTHER_TENANT and tenant["rack-a-n1"]["nominated_for"] == "t2/b-svc"
    assert not any("nominated_for" in n for name, n in operator.items() if name not in ("rack-a-n0", "rack-a-n1"))
