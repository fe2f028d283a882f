"""Failed accelerators an agent reports (`usecases/faults.py`), on SQLite and PostgreSQL: the
node stores them and the solver's snapshot lists them, the shards on a newly failed one are
released (and only those), a superseded session or an index the node lacks changes nothing, and
a repaired accelerator leaves the list."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from controller.agents import faults as faults_module
from controller.agents.faults import FaultWriter
from controller.agents.session import AgentSession
from controller.domain.values import AcceleratorFault
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store.db import Database
from controller.store.snapshot import load_snapshot
from controller.usecases.faults import FaultsRecorded, record_faults
from uc_builders import deployment, no_publish, row_counts, submit

NODE = "rack-a-n0"


async def _session_of(db: Database, node_id: str = NODE) -> str:
    async with db.unit_of_work() as uow:
        return (await uow.session.get(m.Node, node_id)).session_id


async def _placed(db: Database) -> dict[tuple[str, int], tuple[str, tuple[int, ...]]]:
    async with db.unit_of_work() as uow:
        rows = await uow.session.execute(select(m.Deployment.name, m.Placement.replica, m.Placement.node_id,
                                                m.Placement.accelerator_indices).join(m.Deployment))
        return {(name, replica): (node, tuple(indices)) for name, replica, node, indices in rows}


async def _record(db: Database, *faults: AcceleratorFault, session: str | None = None):
    async with db.unit_of_work() as uow:
        return await record_faults(uow, NODE, session or await _session_of(db), faults)


async def test_a_failed_accelerator_releases_its_shards_and_the_solver_is_told(cluster: Database) -> None:
    await submit(cluster, deployment("svc", replicas=8, accelerators=2, locality="node"))  # every accelerator
    await Reconciler(cluster, push=lambda nodes: None, publish=no_publish).reconcile_once()
    on_node = {k: v for k, v in (await _placed(cluster)).items() if v[0] == NODE}
    assert sorted(indices for _, indices in on_node.values()) == [(0, 1), (2, 3)]

    done = await _record(cluster, AcceleratorFault(2, "uncorrectable ECC error"))
    assert done is not None and done.failed == (2,) and done.recovered == ()
    left = {k: v for k, v in (await _placed(cluster)).items() if v[0] == NODE}
    assert list(left.values()) == [(NODE, (0, 1))] and len(done.released) == 1
    async with cluster.unit_of_work() as uow:
        problem = (await load_snapshot(uow.session)).problem
    [doc] = [n for n in problem["nodes"] if n["id"] == NODE]
    assert doc["unhealthy_accelerators"] == [2]
    kinds = await _events(cluster)
    assert "node.accelerator_failed" in kinds and "node.placements_released" in kinds

    assert await _record(cluster, AcceleratorFault(2, "uncorrectable ECC error")) is None  # said again: nothing
    repaired = await _record(cluster)
    assert repaired is not None and repaired.recovered == (2,) and repaired.released == ()
    async with cluster.unit_of_work() as uow:
        assert (await uow.session.get(m.Node, NODE)).failed_accelerators is None


async def test_a_superseded_session_changes_nothing_and_an_index_the_node_lacks_is_ignored(cluster: Database) -> None:
    before = await row_counts(cluster)
    assert await _record(cluster, AcceleratorFault(1, "x"), session="not-its-session") is None
    alone = await _record(cluster, AcceleratorFault(4, "x"))
    assert alone is not None and (alone.ignored, alone.changed) == ((4,), False)
    assert await row_counts(cluster) == before
    both = await _record(cluster, AcceleratorFault(4, "x"), AcceleratorFault(1, "link down"))
    assert both is not None and (both.failed, both.ignored) == ((1,), (4,))
    async with cluster.unit_of_work() as uow:
        assert (await uow.session.get(m.Node, NODE)).failed_accelerators == [{"index": 1, "reason": "link down"}]


async def test_a_new_reason_alone_moves_nothing_and_a_repair_stores_sql_null(cluster: Database) -> None:
    await _record(cluster, AcceleratorFault(1, "ECC errors: 1"))
    async with cluster.unit_of_work() as uow:
        generation = (await uow.session.get(m.ClusterState, 1)).generation
    again = await _record(cluster, AcceleratorFault(1, "ECC errors: 2"))
    assert again is not None and not again.changed
    async with cluster.unit_of_work() as uow:
        assert (await uow.session.get(m.ClusterState, 1)).generation == generation
        assert (await uow.session.get(m.Node, NODE)).failed_accelerators == [{"index": 1, "reason": "ECC errors: 2"}]
    await _record(cluster)
    async with cluster.unit_of_work() as uow:  # SQL NULL, not JSON null: the nodes with faults are read by IS NOT NULL
        assert await uow.session.scalar(select(func.count()).select_from(m.Node)
                                        .where(m.Node.failed_accelerators.is_not(None))) == 0


async def test_a_failed_accelerator_the_node_no_longer_has_is_dropped_not_repaired(cluster: Database) -> None:
    """Registered again with fewer accelerators, its next heartbeat told accelerator 3 repaired
    (an event, a generation moved) though it no longer has one; stored still, it would come back
    failed were the node to register with four again."""
    await _record(cluster, AcceleratorFault(3, "ECC errors"))
    async with cluster.unit_of_work() as uow:  # what a Register with two accelerators leaves
        (await uow.session.get(m.Node, NODE)).accelerators = 2
        await uow.commit()
        generation = (await uow.session.get(m.ClusterState, 1)).generation
    events = await _events(cluster)
    done = await _record(cluster)
    assert done is not None and (done.failed, done.recovered, done.changed) == ((), (), False)
    assert await _events(cluster) == events
    async with cluster.unit_of_work() as uow:
        assert (await uow.session.get(m.ClusterState, 1)).generation == generation
        assert (await uow.session.get(m.Node, NODE)).failed_accelerators is None
    assert await _record(cluster) is None  # nothing more to say


async def _events(db: Database) -> list[str]:
    async with db.unit_of_work() as uow:
        return list(await uow.session.scalars(select(m.Event.kind).where(m.Event.object_id == NODE)))


async def test_the_hub_writes_a_list_only_when_it_differs_from_what_is_stored(cluster: Database,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream's first heartbeat is compared with what is stored: an agent back after its
    accelerator was repaired (listing none) clears it; a node with none stored and listing none
    costs no write; a change within a stream is written."""
    await _record(cluster, AcceleratorFault(1, "link down"))
    asked: list[str] = []

    async def counted(uow, node_id, session_id, faults):  # noqa: ANN001, ANN202
        asked.append(node_id)
        return await record_faults(uow, node_id, session_id, faults)

    monkeypatch.setattr(faults_module, "record_faults", counted)
    recorded: list[tuple[str, FaultsRecorded]] = []
    writer = FaultWriter(cluster, leading=lambda: True, on_recorded=lambda n, r: recorded.append((n, r)))
    sick = AgentSession(NODE, await _session_of(cluster), interval_ms=1000, timeout_s=3.0)
    well = AgentSession("rack-a-n1", await _session_of(cluster, "rack-a-n1"), interval_ms=1000, timeout_s=3.0)
    writer.heard(sick, ())
    writer.heard(well, ())
    await writer.settled()
    assert [(n, r.recovered) for n, r in recorded] == [(NODE, (1,))] and asked == [NODE]
    writer.heard(well, ())  # unchanged: nothing handed over
    writer.heard(well, (AcceleratorFault(3, "no answer"),))
    await writer.settled()
    assert [(n, r.failed) for n, r in recorded[1:]] == [("rack-a-n1", (3,))] and asked == [NODE, "rack-a-n1"]
    # A stream's first list naming failed accelerators is handed over whatever the writer holds:
    # the row may have lost them (the node deleted and registered again).
    async with cluster.unit_of_work() as uow:
        (await uow.session.get(m.Node, "rack-a-n1")).failed_accelerators = None
        await uow.commit()
    anew = AgentSession("rack-a-n1", well.session_id, interval_ms=1000, timeout_s=3.0)
    writer.heard(anew, (AcceleratorFault(3, "no answer"),))
    await writer.settled()
    assert [(n, r.failed) for n, r in recorded[2:]] == [("rack-a-n1", (3,))]
