"""Register and ApplyTopology over gRPC naming a rack or row that DeleteRack or DeleteRow removed
after the call read it: the precise status (what the call answers when it was absent at the start),
not INTERNAL from the foreign key that refused the write, and nothing written; ABORTED with a
RetryInfo when it was applied again before the call read it again. The use cases:
tests/controller/test_topology_item_gone.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from controller import limits
from controller.api.server import ControllerApp
from controller.retryinfo import told_retry_s
from controller.usecases import agents, topology as topology_cases
from grpc_harness import Stubs, api_state, topology
from tests.topology_races import after_first_read, applied_again_before_reread
from maia.v1 import admin_pb2, agent_pb2


def _deleting_after(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, stubs: Stubs,
                    delete: Callable[[], Awaitable[Any]]) -> list[tuple]:
    """`module.name` is followed, the first time, by `delete()` (a DeleteRack or DeleteRow call of
    its own); the API's state as that left it."""
    return after_first_read(monkeypatch, module, name, delete, lambda: api_state(stubs))


def _applied_again_before_reread(monkeypatch: pytest.MonkeyPatch, stubs: Stubs,
                                 apply: Callable[[], Awaitable[Any]]) -> list[tuple]:
    return applied_again_before_reread(monkeypatch, apply, lambda: api_state(stubs))


async def test_a_register_into_a_rack_deleted_meanwhile_answers_failed_precondition(
        controller_app: ControllerApp, stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its batch fails whole (the foreign key says not whose); alone, the Register reads again and
    is answered as for a rack absent from the start."""
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a", "rack-b": "row-a"}))
    deleted = _deleting_after(monkeypatch, agents, "_read_facts", stubs,
                              lambda: stubs.admin.DeleteRack(admin_pb2.TopologyItemRequest(id="rack-b")))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.agent.Register(agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
            node_id="n1", rack="rack-b", accelerators=4, accelerator_model="maia-100")))
    assert (refused.value.code(), refused.value.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION, "rack rack-b is not in the topology; apply it first")
    [as_deleted] = deleted
    assert await api_state(stubs) == as_deleted  # no node n1, no credential


async def test_a_register_whose_rack_is_deleted_again_under_its_lone_attempt_answers_failed_precondition(
        controller_app: ControllerApp, stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rack deleted after the batch read it, applied again and deleted again after the
    Register, alone, read it: INTERNAL, from the foreign key, until this was fixed."""
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a", "rack-b": "row-a"}))
    read, reads, states = agents._read_facts, [], []

    async def then_deleted(*args: Any, **kwargs: Any) -> Any:
        reads.append(None)
        if len(reads) == 2:  # the lone attempt: rack-b is back as it reads, gone again after
            await stubs.admin.ApplyTopology(topology({"rack-b": "row-a"}))
        out = await read(*args, **kwargs)
        if len(reads) <= 2:
            await stubs.admin.DeleteRack(admin_pb2.TopologyItemRequest(id="rack-b"))
            states.append(await api_state(stubs))
        return out

    monkeypatch.setattr(agents, "_read_facts", then_deleted)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.agent.Register(agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
            node_id="n1", rack="rack-b", accelerators=4, accelerator_model="maia-100")))
    assert (refused.value.code(), refused.value.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "rack rack-b is not in the topology (removed by a topology change meanwhile); apply it first")
    assert len(reads) == 2
    assert await api_state(stubs) == states[-1]  # no node n1, no credential


async def test_an_apply_into_a_row_deleted_meanwhile_answers_not_found(
        controller_app: ControllerApp, stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await stubs.admin.ApplyTopology(admin_pb2.Topology(rows=[admin_pb2.Row(id="row-b", zone="z1")]))
    deleted = _deleting_after(monkeypatch, topology_cases, "_validate", stubs,
                              lambda: stubs.admin.DeleteRow(admin_pb2.TopologyItemRequest(id="row-b")))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.admin.ApplyTopology(admin_pb2.Topology(racks=[admin_pb2.Rack(id="rack-n", row="row-b")]))
    assert (refused.value.code(), refused.value.details()) == (
        grpc.StatusCode.NOT_FOUND, "unknown row(s) row-b (rack rack-n -> row row-b; removed by a topology change "
                                   "meanwhile); add them to the topology")
    [as_deleted] = deleted
    assert await api_state(stubs) == as_deleted  # no rack rack-n


async def test_a_register_whose_rack_is_deleted_and_applied_again_before_each_reread_answers_aborted_with_retry_info(
        controller_app: ControllerApp, stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its batch and then its lone attempt: the rack deleted after each read it, back as each reads
    again what is gone."""
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a", "rack-b": "row-a"}))
    read, reads = agents._read_facts, []

    async def then_deleted(*args: Any, **kwargs: Any) -> Any:
        out = await read(*args, **kwargs)
        reads.append(None)
        await stubs.admin.DeleteRack(admin_pb2.TopologyItemRequest(id="rack-b"))
        return out

    monkeypatch.setattr(agents, "_read_facts", then_deleted)
    applied = _applied_again_before_reread(monkeypatch, stubs,
                                           lambda: stubs.admin.ApplyTopology(topology({"rack-b": "row-a"})))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.agent.Register(agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
            node_id="n1", rack="rack-b", accelerators=4, accelerator_model="maia-100")))
    assert (refused.value.code(), refused.value.details()) == (
        grpc.StatusCode.ABORTED, "rack rack-b was removed and applied again while the node(s) registered; "
                                 "nothing was written: register again")
    assert told_retry_s(refused.value.trailing_metadata()) == limits.PARENT_REAPPLIED_RETRY_MS / 1000
    assert len(reads) == len(applied) == 2
    assert await api_state(stubs) == applied[-1]  # rack-b back; no node n1, no credential


async def test_an_apply_into_a_row_deleted_and_applied_again_before_its_recheck_answers_aborted_with_retry_info(
        controller_app: ControllerApp, stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    row_b = admin_pb2.Topology(rows=[admin_pb2.Row(id="row-b", zone="z1")])
    await stubs.admin.ApplyTopology(row_b)
    _deleting_after(monkeypatch, topology_cases, "_validate", stubs,
                    lambda: stubs.admin.DeleteRow(admin_pb2.TopologyItemRequest(id="row-b")))
    applied = _applied_again_before_reread(monkeypatch, stubs, lambda: stubs.admin.ApplyTopology(row_b))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.admin.ApplyTopology(admin_pb2.Topology(racks=[admin_pb2.Rack(id="rack-n", row="row-b")]))
    assert (refused.value.code(), refused.value.details()) == (
        grpc.StatusCode.ABORTED, "a zone or row this apply names was removed while it was applied (one it holds "
                                 "itself, or one applied again since); nothing was written: apply it again")
    assert told_retry_s(refused.value.trailing_metadata()) == limits.PARENT_REAPPLIED_RETRY_MS / 1000
    [as_applied] = applied
    assert await api_state(stubs) == as_applied  # row-b back; no rack rack-n
