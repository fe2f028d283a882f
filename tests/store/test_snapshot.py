"""load_snapshot: the database read back as an interchange problem, in a fixed number of queries."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sqlalchemy import event, select

from controller.limits import SHARDS_PER_NODE_MAX
from controller.store.db import Database
from controller.store.models import (
    Deployment,
    DeploymentPhase,
    Domain,
    Isolation,
    Node,
    NodeHealth,
    Placement,
    Rack,
    Row,
    ShardPhase,
    Tenant,
    Zone,
    utcnow,
)
from controller.store.plans import bump_cluster_generation
from controller.store import snapshot as snapshot_module
from controller.store.snapshot import Snapshot, build_snapshot, load_snapshot, load_spec_doc, node_state, read_snapshot_rows
from scheduler import problem_from_dict

from .seed import seed_problem

SHARED = Path("/work/shared/placement")
PROBLEM_SCHEMA = SHARED / "problem.schema.json"
if not PROBLEM_SCHEMA.exists():  # the copy the solver ships
    PROBLEM_SCHEMA = Path(__file__).resolve().parents[2] / "scheduler" / "schemas" / "problem.schema.json"


def assert_valid_problem(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, json.loads(PROBLEM_SCHEMA.read_text()))
    problem_from_dict(doc)  # and the solver accepts it (references, indices)


async def _build_small_cluster(db: Database) -> None:
    async with db.unit_of_work() as uow:
        s = uow.session
        s.add(Zone(id="z1"))
        s.add(Row(id="row1", zone_id="z1", power_budget_w=20000.0))
        s.add_all([Rack(id="rack1", row_id="row1", power_budget_w=9000.0), Rack(id="rack2", row_id="row1")])
        s.add_all([
            Node(id="n1", rack_id="rack1", accelerators=4, accelerator_model="maia-100", hbm_gib=64.0,
                 cpu_milli=96000, memory_mib=786432, idle_power_w=600.0, labels={"pool": "a"},
                 health=NodeHealth.UP),
            Node(id="n2", rack_id="rack1", accelerators=4, accelerator_model="maia-100", hbm_gib=64.0,
                 idle_power_w=600.0, health=NodeHealth.UP, cordoned=True),
            Node(id="n3", rack_id="rack2", accelerators=4, health=NodeHealth.DOWN, evicted_at=utcnow()),
        ])
        s.add_all([
            Tenant(id="t1", isolation=Isolation.DEDICATED_RACK, excludes=["t2"], reserved_accelerators=4.0,
                   max_accelerators=8.0),
            Tenant(id="t2", zones=["z1"], max_power_w=4000.0),
        ])
        await s.flush()
        d1 = Deployment(name="big", tenant_id="t1", replicas=2, min_replicas=1, shards_per_replica=2,
                        shard_accelerators=1, shard_hbm_gib=48.0, shard_power_w=700.0,
                        shard_accelerator_models=["maia-100"], locality=Domain.RACK,
                        spread_domain=Domain.NODE, spread_max_per_domain=1, priority=100)
        d2 = Deployment(name="small", tenant_id="t2", replicas=1, shards_per_replica=1, shard_accelerators=1,
                        shard_accelerator_milli=500, locality=Domain.NODE, preemptible=True)
        d3 = Deployment(name="gone", tenant_id="t2", replicas=1, shards_per_replica=1, shard_accelerators=1,
                        phase=DeploymentPhase.DELETING)
        s.add(d1)
        await s.flush()
        s.add(d2)
        await s.flush()
        s.add(d3)
        await s.flush()
        s.add_all([
            Placement(deployment_id=d1.id, replica=0, shard=0, node_id="n1", accelerator_indices=[0],
                      phase=ShardPhase.RUNNING),
            Placement(deployment_id=d1.id, replica=0, shard=1, node_id="n3", accelerator_indices=[1]),
            Placement(deployment_id=d2.id, replica=0, shard=0, node_id="n2", accelerator_indices=[0],
                      accelerator_milli=500),
            Placement(deployment_id=d3.id, replica=0, shard=0, node_id="n1", accelerator_indices=[3]),
        ])
        await uow.commit()


EXPECTED = {
    "version": 1,
    "zones": [{"id": "z1"}],
    "rows": [{"id": "row1", "zone": "z1", "power_budget_w": 20000.0}],
    "racks": [{"id": "rack1", "row": "row1", "power_budget_w": 9000.0}, {"id": "rack2", "row": "row1"}],
    "nodes": [
        {"id": "n1", "rack": "rack1", "state": "ready", "accelerators": 4, "accelerator_model": "maia-100",
         "hbm_gib": 64.0, "cpu_milli": 96000, "memory_mib": 786432, "idle_power_w": 600.0, "labels": {"pool": "a"},
         "max_shards": SHARDS_PER_NODE_MAX},
        {"id": "n2", "rack": "rack1", "state": "cordoned", "accelerators": 4, "accelerator_model": "maia-100",
         "hbm_gib": 64.0, "idle_power_w": 600.0, "max_shards": SHARDS_PER_NODE_MAX},
        {"id": "n3", "rack": "rack2", "state": "down", "accelerators": 4, "idle_power_w": 0.0,
         "max_shards": SHARDS_PER_NODE_MAX},
    ],
    "tenants": [
        {"id": "t1", "isolation": "dedicated_rack", "excludes": ["t2"], "reserved_accelerators": 4.0,
         "max_accelerators": 8.0},
        {"id": "t2", "isolation": "shared", "zones": ["z1"], "max_power_w": 4000.0},
    ],
    "deployments": [
        {"id": "t1/big", "tenant": "t1", "replicas": 2, "min_replicas": 1, "shards_per_replica": 2,
         "shard": {"accelerators": 1, "accelerator_milli": 1000, "hbm_gib": 48.0, "cpu_milli": 0, "memory_mib": 0,
                   "power_w": 700.0, "accelerator_models": ["maia-100"]},
         "locality": "rack", "priority": 100, "preemptible": False, "spread": {"domain": "node", "max_per_domain": 1}},
        {"id": "t2/small", "tenant": "t2", "replicas": 1, "min_replicas": 1, "shards_per_replica": 1,
         "shard": {"accelerators": 1, "accelerator_milli": 500, "hbm_gib": 0.0, "cpu_milli": 0, "memory_mib": 0,
                   "power_w": 0.0},
         "locality": "node", "priority": 0, "preemptible": True},
    ],
    # The deleting deployment's shard is left out; the one on the down node is kept. Deployments
    # are named by their keys TENANT/NAME (names are per tenant).
    "placements": [
        {"deployment": "t1/big", "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [0]},
        {"deployment": "t1/big", "replica": 0, "shard": 1, "node": "n3", "accelerator_indices": [1]},
        {"deployment": "t2/small", "replica": 0, "shard": 0, "node": "n2", "accelerator_indices": [0],
         "accelerator_milli": 500},
    ],
}


async def test_snapshot_has_exactly_the_expected_content(database: Database) -> None:
    await _build_small_cluster(database)
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    assert snap.problem == EXPECTED
    assert list(snap.problem) == list(EXPECTED)  # key order too: readable dumps
    assert snap.generation == 0
    assert set(snap.deployment_ids) == {"t1/big", "t2/small"}
    assert snap.placements_by_shard[("t1/big", 0, 1)]["node"] == "n3"
    assert_valid_problem(snap.problem)


async def test_snapshot_reads_the_current_generation(database: Database) -> None:
    async with database.unit_of_work() as uow:
        assert await bump_cluster_generation(uow.session) == 1
        assert await bump_cluster_generation(uow.session) == 2
        await uow.commit()
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    assert snap.generation == 2
    assert snap.problem["nodes"] == [] and snap.problem["placements"] == []


@pytest.mark.parametrize("example", ["tiny", "maia-64"])
async def test_example_documents_round_trip(database: Database, example: str) -> None:
    path = SHARED / "examples" / f"{example}.problem.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    doc = json.loads(path.read_text())
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, doc)
        await uow.commit()
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    assert_valid_problem(snap.problem)
    # Same problem for the solver (the snapshot spells out defaults, sorts by id and names
    # deployments TENANT/NAME).
    tenant_of = {d["id"]: d["tenant"] for d in doc["deployments"]}
    doc["deployments"] = [{**d, "id": f"{d['tenant']}/{d['id']}"} for d in doc["deployments"]]
    doc["placements"] = [{**p, "deployment": f"{tenant_of[p['deployment']]}/{p['deployment']}"}
                         for p in doc.get("placements", ())]
    # ... and gives every node its agent's bound on the shards it lists (the solver's max_shards).
    doc["nodes"] = [{**n, "max_shards": SHARDS_PER_NODE_MAX} for n in doc["nodes"]]
    original = problem_from_dict({**doc, "options": {}})
    loaded = problem_from_dict(snap.problem)
    for part in ("zones", "rows", "racks", "nodes", "tenants", "placements"):
        assert sorted(getattr(loaded, part), key=repr) == sorted(getattr(original, part), key=repr), part
    assert loaded.deployments == original.deployments  # arrival order kept


async def test_snapshot_runs_one_query_per_table(database: Database) -> None:
    doc = json.loads((SHARED / "examples" / "tiny.problem.json").read_text())
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, doc)
        await uow.commit()
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", count)
    try:
        async with database.unit_of_work() as uow:
            await load_snapshot(uow.session)
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", count)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 9, selects  # the nominations too


@pytest.mark.parametrize(("health", "cordoned", "evicted", "solver", "shown"), [
    (NodeHealth.UP, False, False, "ready", "ready"),
    (NodeHealth.UP, True, False, "cordoned", "cordoned"),
    (NodeHealth.SUSPECT, False, False, "cordoned", "suspect"),   # keeps its shards, takes no new ones
    (NodeHealth.DOWN, False, False, "cordoned", "down"),         # ... until its work is evicted
    (NodeHealth.DOWN, True, True, "down", "down"),               # then the solver places its shards again
])
def test_what_the_solver_and_operators_see_of_a_node(health: NodeHealth, cordoned: bool, evicted: bool, solver: str,
                                                      shown: str) -> None:
    assert node_state(health, cordoned, evicted) == solver
    assert Node(health=health, cordoned=cordoned).state == shown


async def test_the_spec_document_names_every_revision_and_reads_only_what_it_is_asked(database: Database) -> None:
    await _build_small_cluster(database)
    async with database.unit_of_work() as uow:  # t1/big rolls to revision 2; revision 1 kept as its spec
        big = (await uow.session.scalars(select(Deployment).where(Deployment.name == "big"))).one()
        old = dict(EXPECTED["deployments"][0], id="t1/big")
        big.template_revision, big.revision_specs, big.shard_hbm_gib = 2, {"1": old}, 56.0
        small_id = (await uow.session.scalars(select(Deployment.id).where(Deployment.name == "small"))).one()
        await uow.commit()
    async with database.unit_of_work() as uow:
        whole = await load_spec_doc(uow.session)
        part = await load_spec_doc(uow.session, within_rows=["nowhere"], deployment_ids=[small_id])
    assert {k: whole[k] for k in ("zones", "rows", "racks", "nodes", "tenants")} == {
        k: EXPECTED[k] for k in ("zones", "rows", "racks", "nodes", "tenants")}
    assert whole["placements"] == []  # the deleting deployment has no spec either
    specs = {d["id"]: d for d in whole["deployments"]}
    assert set(specs) == {"t1/big~1", "t1/big~2", "t2/small~1"}
    assert specs["t1/big~1"]["shard"]["hbm_gib"] == 48.0 and specs["t1/big~2"]["shard"]["hbm_gib"] == 56.0
    assert part["rows"] == part["racks"] == part["nodes"] == []
    assert [d["id"] for d in part["deployments"]] == ["t2/small~1"] and part["tenants"] == EXPECTED["tenants"]


async def _build_varied_cluster(db: Database) -> None:
    """The small cluster, with what else the build reads: a deployment rolling to revision 2
    (its revision 1 replica outgoing), a draining node, a node beyond today's limits holding a
    shard, a quarantined deployment."""
    await _build_small_cluster(db)
    async with db.unit_of_work() as uow:
        s = uow.session
        big = (await s.scalars(select(Deployment).where(Deployment.name == "big"))).one()
        big.template_revision, big.revision_specs, big.shard_hbm_gib = 2, {"1": dict(EXPECTED["deployments"][0])}, 56.0
        s.add_all([Node(id="n4", rack_id="rack2", accelerators=4, health=NodeHealth.UP, draining=True),
                   Node(id="n5", rack_id="rack2", accelerators=500, health=NodeHealth.UP)])
        wide = Deployment(name="wide", tenant_id="t2", replicas=2, shards_per_replica=1, shard_accelerators=1)
        odd = Deployment(name="odd", tenant_id="t2", replicas=1, shards_per_replica=1, shard_accelerators=1,
                         phase=DeploymentPhase.QUARANTINED)
        s.add_all([wide, odd])
        await s.flush()
        s.add_all([
            Placement(deployment_id=wide.id, replica=0, shard=0, node_id="n4", accelerator_indices=[0]),
            Placement(deployment_id=wide.id, replica=3, shard=0, node_id="n5", accelerator_indices=[7]),
            Placement(deployment_id=odd.id, replica=0, shard=0, node_id="n1", accelerator_indices=[2]),
        ])
        await uow.commit()


def _fields(snap: Snapshot) -> dict[str, object]:
    """Every field of a snapshot; of its index (fresh: nothing read yet), what it answers."""
    fields = {f.name: getattr(snap, f.name) for f in dataclasses.fields(snap) if f.name != "index"}
    index, problem = snap.index, snap.problem
    nodes = [n["id"] for n in problem["nodes"]]
    keys = sorted(snap.deployment_ids)
    fields["index"] = (index.whole_reads, index.nodes_by_id(problem), index.nodes_on(problem, ["rack1", "rack2"]),
                       index.racks_in(problem, ["row1"]), index.placements_on(problem, nodes),
                       index.placements_of(problem, keys), index.deployments_of(problem, keys))
    return fields


@pytest.mark.parametrize("surge", [0, 1, 2])
async def test_the_snapshot_built_in_a_thread_is_the_one_built_on_the_loop(database: Database, surge: int) -> None:
    await _build_varied_cluster(database)
    async with database.unit_of_work() as uow:
        on_loop = build_snapshot(await read_snapshot_rows(uow.session), surge=surge)
        loaded = await load_snapshot(uow.session, surge=surge)
    assert loaded.released and loaded.deleting and len(loaded.solver_refs) > len(loaded.deployment_ids)
    assert _fields(loaded) == _fields(on_loop)
    assert json.dumps(loaded.problem) == json.dumps(on_loop.problem)  # key order too


async def test_the_snapshot_is_built_off_the_event_loop(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_snapshot` reads on the loop and builds in a worker thread: at 4,096 nodes and 10,000
    deployments the build is ~0.4 s of CPU the loop (the API server's, for a dry run) would
    otherwise spend serving nothing (store/snapshot.py)."""
    await _build_small_cluster(database)
    built_on: list[int] = []
    build = snapshot_module.build_snapshot

    def recording(*args: object, **kwargs: object) -> Snapshot:
        built_on.append(threading.get_ident())
        return build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot_module, "build_snapshot", recording)
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    assert snap.problem == EXPECTED
    assert built_on and threading.get_ident() not in built_on
