"""Lists page (page_size, page_token, next_page_token) and maiactl follows the pages; DeleteNode
removes a bad registration and its shards are placed again elsewhere."""

from __future__ import annotations

import asyncio
import base64
import functools
import json

import grpc
import pytest

from controller import limits
from controller.bearer import bearer_metadata
from controller.cli.client import list_all
from controller.cli.main import main
from controller.usecases import paging
from grpc_harness import HandAgent, Stubs, admin_token_of, api_state, eventually, issue_token, spec, topology
from maia.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, common_pb2, deployments_pb2


async def _pages(call, request, field_name: str) -> list[list[str]]:
    pages = []
    while True:
        response = await call(request)
        pages.append([getattr(item, "id", None) or item.spec.name for item in getattr(response, field_name)])
        if not response.next_page_token:
            return pages
        request.page_token = response.next_page_token


@pytest.fixture
async def populated(stubs: Stubs) -> Stubs:
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a", "rack-b": "row-a"}))
    for i in range(7):
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id=f"lab-{i}"))
    for i in range(5):
        await stubs.agent.Register(agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
            node_id=f"n{i}", rack="rack-a" if i % 2 else "rack-b", accelerators=4, accelerator_model="maia-100")))
    for i in range(7):
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
            spec=spec(f"svc-{i}", tenant=f"lab-{i % 2}")))
    return stubs


async def test_every_list_pages_in_order_and_ends_with_an_empty_token(populated: Stubs):
    s = populated
    assert await _pages(s.admin.ListTenants, admin_pb2.ListTenantsRequest(page_size=3), "tenants") == [
        ["lab-0", "lab-1", "lab-2"], ["lab-3", "lab-4", "lab-5"], ["lab-6"]]
    assert await _pages(s.admin.ListNodes, admin_pb2.ListNodesRequest(page_size=2), "nodes") == [
        ["n0", "n1"], ["n2", "n3"], ["n4"]]
    assert await _pages(s.admin.ListNodes, admin_pb2.ListNodesRequest(rack="rack-a", page_size=1), "nodes") == [
        ["n1"], ["n3"]]
    assert await _pages(s.deployments.ListDeployments, deployments_pb2.ListDeploymentsRequest(page_size=4),
                        "deployments") == [["svc-0", "svc-1", "svc-2", "svc-3"], ["svc-4", "svc-5", "svc-6"]]
    assert await _pages(s.deployments.ListDeployments,
                        deployments_pb2.ListDeploymentsRequest(tenant="lab-1", page_size=2), "deployments") == [
        ["svc-1", "svc-3"], ["svc-5"]]
    # A page exactly full says there is no more (no empty trailing page).
    assert await _pages(s.admin.ListNodes, admin_pb2.ListNodesRequest(page_size=5), "nodes") == [
        ["n0", "n1", "n2", "n3", "n4"]]
    for i in range(4):
        await s.admin.CreateToken(admin_pb2.CreateTokenRequest(role="tenant", tenant="lab-0", name=f"t{i}"))
    token_pages = []
    request = admin_pb2.ListTokensRequest(tenant="lab-0", page_size=3)
    while True:  # tokens page oldest first, like the rest
        response = await s.admin.ListTokens(request)
        token_pages.append([t.name for t in response.tokens])
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    assert token_pages == [["t0", "t1", "t2"], ["t3"]]
    bad = admin_pb2.ListTokensRequest(page_token=base64.urlsafe_b64encode(b'["x","y"]').decode())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.admin.ListTokens(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # No page_size: the default page, which holds them all here.
    whole = await s.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert len(whole.tenants) == 7 and whole.next_page_token == ""


async def test_a_page_token_of_another_list_or_filter_is_invalid_argument(populated: Stubs):
    """A token is the last key of its page: one from another list, or the same list with another
    filter, was read as a place to start, and the rows before it were silently skipped."""
    s = populated
    of_all = (await s.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest(page_size=2))).next_page_token
    of_lab1 = (await s.deployments.ListDeployments(
        deployments_pb2.ListDeploymentsRequest(tenant="lab-1", page_size=1))).next_page_token
    of_tenants = (await s.admin.ListTenants(admin_pb2.ListTenantsRequest(page_size=2))).next_page_token
    of_rack_a = (await s.admin.ListNodes(admin_pb2.ListNodesRequest(rack="rack-a", page_size=1))).next_page_token
    assert of_all and of_lab1 and of_tenants and of_rack_a
    refused = [(s.deployments.ListDeployments, deployments_pb2.ListDeploymentsRequest(tenant="lab-0", page_token=of_lab1)),
               (s.deployments.ListDeployments, deployments_pb2.ListDeploymentsRequest(tenant="lab-1", page_token=of_all)),
               (s.admin.ListNodes, admin_pb2.ListNodesRequest(page_token=of_tenants)),
               (s.admin.ListNodes, admin_pb2.ListNodesRequest(rack="rack-b", page_token=of_rack_a)),
               (s.admin.ListNodes, admin_pb2.ListNodesRequest(page_token=of_rack_a))]
    for call, request in refused:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request)
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token was returned for another list or other filters; ask with the same filters, "
            "or start again without one")
    # The same list and filters take it (the page size may change between pages).
    rest = await s.deployments.ListDeployments(
        deployments_pb2.ListDeploymentsRequest(tenant="lab-1", page_size=5, page_token=of_lab1))
    assert [d.spec.name for d in rest.deployments] == ["svc-3", "svc-5"]


async def test_a_page_starts_after_the_last_item_even_if_items_were_removed(populated: Stubs):
    first = await populated.admin.ListTenants(admin_pb2.ListTenantsRequest(page_size=3))
    await populated.admin.DeleteTenant(admin_pb2.DeleteTenantRequest(id="lab-3"))
    rest = await populated.admin.ListTenants(admin_pb2.ListTenantsRequest(page_size=3,
                                                                         page_token=first.next_page_token))
    assert [t.id for t in rest.tenants] == ["lab-4", "lab-5", "lab-6"]


@pytest.mark.parametrize(("request_", "message"), [
    (admin_pb2.ListTenantsRequest(page_size=-1), "page_size must be >= 0, got -1"),
    (admin_pb2.ListTenantsRequest(page_token="not-a-token"),
     "page_token is not a token this list returned; start again without one"),
    (admin_pb2.ListTenantsRequest(page_token="W10="),  # a valid encoding of the wrong shape: []
     "page_token is not a token this list returned; start again without one"),
    (admin_pb2.ListTenantsRequest(page_token="x" * 1000), "page_token is 1000 characters long; at most 256"),
])
async def test_bad_page_requests_are_invalid_argument(populated: Stubs, request_, message):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await populated.admin.ListTenants(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == message


def _token(list_name: str, *key: object, **filters: str) -> str:
    """A token of that list (unfiltered) whose key a caller forged."""
    default = {"deployments": {"tenant": "", "name": ""}, "nodes": {"rack": ""}, "tenants": {},
               "tokens": {"role": "", "tenant": ""}}[list_name]
    return paging.encode_token(key, paging.scope_of(list_name, **{**default, **filters}))  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [("svc-0", 2**63), ("svc-0", -(2**63) - 1), ("svc-0", "1"), (1, 2)])
async def test_a_forged_page_token_of_the_right_length_is_invalid_argument(populated: Stubs, key: tuple[object, ...]):
    """Any caller could send one: a key out of BIGINT's range reached the database driver
    (OverflowError: INTERNAL), one of the wrong types was read as a bound."""
    calls = [(populated.deployments.ListDeployments, deployments_pb2.ListDeploymentsRequest(
                 page_token=_token("deployments", *key))),
             (populated.admin.ListNodes, admin_pb2.ListNodesRequest(page_token=_token("nodes", 2**70))),  # keyed by id
             (populated.admin.ListTenants, admin_pb2.ListTenantsRequest(page_token=_token("tenants", 2**70)))]
    for call, request in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request)
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT, "page_token is not a token this list returned; start again without one")


_FORGED = "page_token is not a token this list returned; start again without one"


@pytest.mark.parametrize("text", ["\x00", "svc\x00", "\ud800", "a\nb"])
async def test_a_forged_page_token_with_a_text_no_list_returns_is_invalid_argument(populated: Stubs, text: str):
    """A NUL (or a lone surrogate) in a token's text reached PostgreSQL's encoding: INTERNAL, a
    traceback logged for each such call of any token (SQLite answered a page after it)."""
    calls = [(populated.deployments.ListDeployments,
              deployments_pb2.ListDeploymentsRequest(page_token=_token("deployments", text, 1))),
             (populated.admin.ListNodes, admin_pb2.ListNodesRequest(page_token=_token("nodes", text))),
             (populated.admin.ListTenants, admin_pb2.ListTenantsRequest(page_token=_token("tenants", text))),
             (populated.admin.ListTokens, admin_pb2.ListTokensRequest(page_token=_token("tokens", "2020-01-01", text)))]
    for call, request in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, _FORGED)


@pytest.mark.parametrize("created", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2020-13-01"])
async def test_a_list_tokens_page_token_of_a_time_out_of_range_is_invalid_argument(populated: Stubs, created: str):
    """A time that leaves years 1-9999 once in UTC failed INTERNAL on PostgreSQL."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await populated.admin.ListTokens(admin_pb2.ListTokensRequest(page_token=_token("tokens", created, "x")))
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, _FORGED)


async def test_list_tokens_of_a_role_that_does_not_exist_is_invalid_argument(populated: Stubs):
    """It listed none, as if no token of that role existed (a typo looked like an empty answer)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await populated.admin.ListTokens(admin_pb2.ListTokensRequest(role="tennant"))
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "role 'tennant' is not one of admin, tenant, node-bootstrap, node")


async def test_list_nodes_refuses_another_role_before_it_reads_a_page_token(populated: Stubs, controller_app):
    """A tenant's or a node's token is told it may not list nodes, not how its page token fared
    (it was INVALID_ARGUMENT, and INTERNAL on PostgreSQL for a forged one, before the role check)."""
    for role, tenant in (("tenant", "lab-0"), ("node-bootstrap", "")):
        token = await issue_token(controller_app.db, role, tenant=tenant)
        other = Stubs.connect(controller_app.address, token)
        try:
            for page_token in ("!!", _token("nodes", "\x00")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await other.admin.ListNodes(admin_pb2.ListNodesRequest(page_token=page_token))
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, (role, info.value.details())
        finally:
            await other.channel.close()


async def test_maiactl_follows_every_page(populated: Stubs, controller_app):
    def fetch() -> list[str]:
        channel = grpc.insecure_channel(controller_app.address)
        try:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            authed = functools.partial(admin.ListNodes, metadata=bearer_metadata(admin_token_of(controller_app)))
            merged = list_all(authed, admin_pb2.ListNodesRequest(page_size=2), "nodes", timeout=10)
            assert merged.next_page_token == ""
            return [n.id for n in merged.nodes]
        finally:
            channel.close()

    assert await asyncio.to_thread(fetch) == ["n0", "n1", "n2", "n3", "n4"]


async def test_delete_node_releases_its_shards_and_they_are_placed_again(stubs: Stubs):
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    bad, good = HandAgent(stubs, "bad-node", "rack-a"), HandAgent(stubs, "good-node", "rack-a")
    await bad.register()
    await bad.connect()
    bad.keep_beating()  # both nodes stay ready under load (a silent stream ends after 2 s)
    await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
        spec=spec("svc", accelerators=4, locality=common_pb2.DOMAIN_NODE)))
    await bad.next_set(lambda s: len(s.assignments) == 1)
    await good.register()
    await good.connect()
    good.keep_beating()

    await stubs.admin.DeleteNode(admin_pb2.NodeRequest(id="bad-node"))

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="bad-node"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    moved = await good.next_set(lambda s: len(s.assignments) == 1)
    assert moved.assignments[0].deployment == "svc"
    dep = await eventually(lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc")),
                           lambda d: [p.node for p in d.placements] == ["good-node"], what="svc on good-node")
    assert dep.placed_replicas == 1
    ended = await bad.reader_error()  # the deleted node's stream was ended by the controller, saying why
    assert ended is not None and ended.code() == grpc.StatusCode.NOT_FOUND, ended
    assert "node bad-node was deleted by an administrator" in (ended.details() or ""), ended
    await bad.close()
    await good.close()


async def test_delete_unknown_node_is_not_found_and_writes_nothing(stubs: Stubs):
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    before = await api_state(stubs)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.admin.DeleteNode(admin_pb2.NodeRequest(id="ghost"))
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.NOT_FOUND, "node ghost not found")
    assert await api_state(stubs) == before


async def test_maiactl_get_nodes_reads_every_page_and_delete_node_removes_one(stubs: Stubs, controller_app, capsys):
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    count = limits.PAGE_SIZE_DEFAULT + 5  # more than one default page
    for i in range(count):
        await stubs.agent.Register(agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
            node_id=f"n{i:03d}", rack="rack-a", accelerators=4)))

    async def maiactl(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, [*argv, "--controller", controller_app.address,
                                              "--token", admin_token_of(controller_app)])
        return code, capsys.readouterr().out

    code, out = await maiactl("get", "nodes", "-o", "json")
    assert code == 0
    assert [n["id"] for n in json.loads(out)["items"]] == [f"n{i:03d}" for i in range(count)]
    code, out = await maiactl("delete", "node", "n000")
    assert (code, out.strip()) == (0, "node/n000 deleted (its shards are placed again elsewhere)")
    with pytest.raises(grpc.aio.AioRpcError):
        await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="n000"))


async def test_a_deleted_nodes_credential_is_revoked_and_its_agent_brings_it_back_with_a_bootstrap_token(
        stubs: Stubs, controller_app):
    """Its agent is refused its credential UNAUTHENTICATED (so it drops it, as `maia-simnode` does),
    not PERMISSION_DENIED for a node it can no longer speak for; a bootstrap token registers it again."""
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    credential = (await HandAgent(stubs, "n1", "rack-a").register()).node_credential
    own = Stubs.connect(controller_app.address, credential)
    bootstrap = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "node-bootstrap"))
    try:
        await HandAgent(own, "n1", "rack-a").register()  # its own credential speaks for it
        await stubs.admin.DeleteNode(admin_pb2.NodeRequest(id="n1"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await HandAgent(own, "n1", "rack-a").register()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        again = await HandAgent(bootstrap, "n1", "rack-a").register()
        assert again.node_credential and again.node_credential != credential
        assert (await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="n1"))).id == "n1"
    finally:
        await own.channel.close()
        await bootstrap.channel.close()
