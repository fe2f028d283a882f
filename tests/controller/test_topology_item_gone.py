"""A Register or an ApplyTopology naming a rack, row or zone that a DeleteRack, DeleteRow or
DeleteZone removed after the request read it (usecases/agents.py, usecases/topology.py). The
read holds no lock, and the write's foreign key refused it: the caller was answered INTERNAL.
It is answered as when the item was absent at the start (FAILED_PRECONDITION for a Register,
NOT_FOUND for an apply), saying it was removed meanwhile, and nothing is written; ABORTED with a
retry time when, read again, it was applied again since. Found in review."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from controller import limits
from controller.errors import Conflict, FailedPrecondition, NotFound
from controller.identity import Principal, Role
from controller.store import audit
from controller.store.db import Database
from controller.usecases import agents, topology
from controller.usecases.ports import RecordingSignals
from controller.domain.values import NodeInfo, RackSpec, RowSpec, TopologySpec, ZoneSpec
from uc_builders import WHO, add_nodes, apply_topology, every_row
from tests.topology_races import after_first_read, applied_again_before_reread

BOOT = Principal("boot", Role.NODE_BOOTSTRAP, token_id="b00t")
REGISTER = "/maia.v1.NodeAgentService/Register"
MEANWHILE = "removed by a topology change meanwhile"


def _ask(node: str, rack: str) -> agents.Register:
    call = audit.CallEntry(audit.AuditRecord(actor=BOOT.name, action=REGISTER, object_kind="node", object_id=node),
                           None)
    return agents.Register(BOOT, NodeInfo(node, rack, 4, accelerator_model="maia-100"), "", call)


async def _register(db: Database, batch: list[agents.Register]) -> list[Any]:
    async with db.unit_of_work() as uow:
        return await agents.register_nodes(uow, batch, heartbeat_interval_ms=1000)


def _deleting_after(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, db: Database, kind: str,
                    item_id: str) -> list[dict[str, list[str]]]:
    """`module.name` is followed, the first time, by the deletion of `kind item_id` in a
    transaction of its own; every row of the database as that deletion left it."""
    async def delete() -> None:
        async with db.unit_of_work() as uow:
            await topology.delete_item(uow, WHO, kind, item_id, RecordingSignals())

    return after_first_read(monkeypatch, module, name, delete, lambda: every_row(db))


async def _with_empty_parents(db: Database) -> None:
    """rack-a in row-a (zone z1), an empty row-b in z1, and an empty zone z2: parents to delete."""
    await apply_topology(db, {"rack-a": "row-a"})
    async with db.unit_of_work() as uow:
        await topology.apply_topology(uow, WHO, TopologySpec(zones=(ZoneSpec("z2"),), rows=(RowSpec("row-b", "z1"),)),
                                      RecordingSignals())


def _applied_again_before_reread(monkeypatch: pytest.MonkeyPatch, db: Database,
                                 apply: Callable[[], Awaitable[Any]]) -> list[dict[str, list[str]]]:
    return applied_again_before_reread(monkeypatch, apply, lambda: every_row(db))


async def test_a_register_into_a_rack_deleted_after_its_read_is_refused_as_an_unknown_rack(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await apply_topology(database, {"rack-a": "row-a", "rack-b": "row-a"})
    deleted = _deleting_after(monkeypatch, agents, "_read_facts", database, "rack", "rack-b")
    with pytest.raises(FailedPrecondition) as refused:
        await _register(database, [_ask("n1", "rack-b")])
    assert refused.value.message == f"rack rack-b is not in the topology ({MEANWHILE}); apply it first"
    [as_deleted] = deleted
    assert await every_row(database) == as_deleted  # no node, credential, event nor audit entry


async def test_a_node_moved_into_a_rack_deleted_after_its_read_is_refused_and_stays(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await apply_topology(database, {"rack-a": "row-a", "rack-b": "row-a"})
    [node] = await add_nodes(database, "rack-a", 1, up=False)
    deleted = _deleting_after(monkeypatch, agents, "_read_facts", database, "rack", "rack-b")
    with pytest.raises(FailedPrecondition) as refused:
        async with database.unit_of_work() as uow:
            await agents.register_node(uow, WHO, NodeInfo(node, "rack-b", 4, accelerator_model="maia-100"),
                                       heartbeat_interval_ms=1000)
    assert refused.value.message == f"rack rack-b is not in the topology ({MEANWHILE}); apply it first"
    [as_deleted] = deleted
    assert await every_row(database) == as_deleted  # still in rack-a, its session and credential as they were


async def test_a_batch_with_a_register_into_a_rack_deleted_meanwhile_fails_whole_and_each_alone_is_judged(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The foreign key does not say which Register it refused: the batch raises, writing nothing
    (its group commit then decides each alone, controller/groupcommit.py); alone, the one into the
    deleted rack is refused as an unknown rack and the other lands."""
    await apply_topology(database, {"rack-a": "row-a", "rack-b": "row-a"})
    deleted = _deleting_after(monkeypatch, agents, "_read_facts", database, "rack", "rack-b")
    with pytest.raises(FailedPrecondition) as refused:
        await _register(database, [_ask("n1", "rack-a"), _ask("n2", "rack-b")])
    assert refused.value.message == f"rack rack-b is not in the topology ({MEANWHILE}); apply it first"
    [as_deleted] = deleted
    assert await every_row(database) == as_deleted
    [landed] = await _register(database, [_ask("n1", "rack-a")])
    [alone] = await _register(database, [_ask("n2", "rack-b")])
    assert isinstance(landed, agents.Registered)
    assert isinstance(alone, FailedPrecondition) and alone.message == "rack rack-b is not in the topology; apply it first"


@pytest.mark.parametrize(("spec", "kind", "gone", "message"), [
    (TopologySpec(racks=(RackSpec("rack-n", "row-b"),)), "row", "row-b",
     f"unknown row(s) row-b (rack rack-n -> row row-b; {MEANWHILE}); add them to the topology"),
    (TopologySpec(rows=(RowSpec("row-n", "z2"),), racks=(RackSpec("rack-n", "row-n"),)), "zone", "z2",
     f"unknown zone(s) z2 (row row-n -> zone z2; {MEANWHILE}); add them to the topology"),
    (TopologySpec(racks=(RackSpec("rack-a", "row-b"),)), "row", "row-b",  # a stored rack moved into it
     f"unknown row(s) row-b (rack rack-a -> row row-b; {MEANWHILE}); add them to the topology"),
], ids=["rack-into-row", "row-into-zone", "rack-moved-into-row"])
async def test_an_apply_naming_a_parent_deleted_after_its_check_is_refused_as_unknown(
        database: Database, monkeypatch: pytest.MonkeyPatch, spec: TopologySpec, kind: str, gone: str,
        message: str) -> None:
    await _with_empty_parents(database)
    deleted = _deleting_after(monkeypatch, topology, "_validate", database, kind, gone)
    signals = RecordingSignals()
    with pytest.raises(NotFound) as refused:
        async with database.unit_of_work() as uow:
            await topology.apply_topology(uow, WHO, spec, signals)
    assert refused.value.message == message
    [as_deleted] = deleted
    assert await every_row(database) == as_deleted and signals.wakes == 0


async def test_a_register_whose_rack_is_deleted_and_applied_again_before_its_reread_is_aborted_with_a_retry_time(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read again, the rack the foreign key refused is there: which Register to refuse, nothing
    says; the batch is answered ABORTED with a retry time, nothing written."""
    await apply_topology(database, {"rack-a": "row-a", "rack-b": "row-a"})
    _deleting_after(monkeypatch, agents, "_read_facts", database, "rack", "rack-b")
    applied = _applied_again_before_reread(monkeypatch, database,
                                           lambda: apply_topology(database, {"rack-b": "row-a"}))
    with pytest.raises(Conflict) as refused:
        await _register(database, [_ask("n1", "rack-a"), _ask("n2", "rack-b")])
    assert refused.value.message == ("one of racks rack-a, rack-b was removed and applied again while the node(s) "
                                     "registered; nothing was written: register again")
    assert refused.value.retry_after_ms == limits.PARENT_REAPPLIED_RETRY_MS
    [as_applied] = applied
    assert await every_row(database) == as_applied  # rack-b back; no node, credential, event nor audit entry


@pytest.mark.parametrize(("spec", "kind", "gone", "again"), [
    (TopologySpec(racks=(RackSpec("rack-n", "row-b"),)), "row", "row-b", TopologySpec(rows=(RowSpec("row-b", "z1"),))),
    (TopologySpec(rows=(RowSpec("row-n", "z2"),), racks=(RackSpec("rack-n", "row-n"),)), "zone", "z2",
     TopologySpec(zones=(ZoneSpec("z2"),))),
], ids=["rack-into-row", "row-into-zone"])
async def test_an_apply_whose_parent_is_deleted_and_applied_again_before_its_recheck_is_aborted_with_a_retry_time(
        database: Database, monkeypatch: pytest.MonkeyPatch, spec: TopologySpec, kind: str, gone: str,
        again: TopologySpec) -> None:
    await _with_empty_parents(database)

    async def apply_again() -> None:
        async with database.unit_of_work() as uow:
            await topology.apply_topology(uow, WHO, again, RecordingSignals())

    _deleting_after(monkeypatch, topology, "_validate", database, kind, gone)
    applied = _applied_again_before_reread(monkeypatch, database, apply_again)
    signals = RecordingSignals()
    with pytest.raises(Conflict) as refused:
        async with database.unit_of_work() as uow:
            await topology.apply_topology(uow, WHO, spec, signals)
    assert refused.value.message == ("a zone or row this apply names was removed while it was applied (one it holds "
                                     "itself, or one applied again since); nothing was written: apply it again")
    assert refused.value.retry_after_ms == limits.PARENT_REAPPLIED_RETRY_MS
    [as_applied] = applied
    assert await every_row(database) == as_applied and signals.wakes == 0
