"""`repo.assignment_sets` reads plain columns and keeps the shard specs it builds: the sets it
returns are exactly those the ORM reading of the rows gives (every field, every type, the order),
on random deployments with fractional shards and rolling updates (placements of older revisions,
kept in `revision_specs` or not); and a spec kept from one database or one deployment is never
given to another that reuses its id and revision."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import delete, insert, select

from controller.domain import values as d
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import planning

from .seed import TWO_RACKS, seed_problem

NODES = [f"n{i}" for i in range(6)]
TENANTS = ["a", "b"]


async def _cluster(database: Database) -> None:
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, {
            **TWO_RACKS, "nodes": [{"id": n, "rack": "rack1", "accelerators": 8} for n in NODES],
            "tenants": [{"id": t} for t in TENANTS], "deployments": []})
        await uow.commit()


def _shard(pick: random.Random) -> d.ShardSpec:
    fractional = pick.random() < 0.4
    return d.ShardSpec(
        accelerators=1 if fractional else pick.choice([1, 2, 4]),
        accelerator_milli=pick.choice([250, 500, 750]) if fractional else 1000,
        hbm_gib=pick.choice([0.0, 8.0, 16.5]), cpu_milli=pick.choice([0, 500, 4000]),
        memory_mib=pick.choice([0, 1024]), power_w=pick.choice([0.0, 300.0, 412.5]),
        accelerator_models=pick.choice([None, ("maia-100",), ("maia-100", "maia-200")]))


def _spec(pick: random.Random, name: str, tenant: str) -> d.DeploymentSpec:
    return d.DeploymentSpec(name=name, tenant=tenant, replicas=pick.randint(1, 3),
                            shards_per_replica=pick.randint(1, 3), shard=_shard(pick))


def _columns(spec: d.DeploymentSpec, pick: random.Random) -> dict[str, Any]:
    """A deployment at a random revision whose older revisions' specs are kept, some of them."""
    revision = pick.randint(1, 4)
    older = {str(r): planning.deployment_doc(_spec(pick, spec.name, spec.tenant))
             for r in range(1, revision) if pick.random() < 0.7}
    return {**repo.new_deployment_columns(spec, m.utcnow()), "template_revision": revision,
            "revision_specs": older, "generation": pick.randint(0, 9)}


def _placements(pick: random.Random, dep_id: int, spec: d.DeploymentSpec, revision: int) -> list[dict[str, Any]]:
    """Its shards on random nodes, each of a random revision up to the current one (an older one
    kept in `revision_specs` or not), some with no generation of their own."""
    return [{"deployment_id": dep_id, "replica": replica, "shard": shard, "node_id": pick.choice(NODES),
             "accelerator_indices": sorted(pick.sample(range(8), spec.shard.accelerators)),
             "accelerator_milli": pick.choice([None, spec.shard.accelerator_milli]),
             "generation": pick.choice([0, pick.randint(1, 50)]), "revision": pick.randint(1, revision),
             "phase": pick.choice(list(m.ShardPhase))}
            for replica in range(spec.replicas) for shard in range(spec.shards_per_replica)
            if pick.random() < 0.8]


async def _random_work(database: Database, seed: int) -> None:
    pick = random.Random(seed)
    async with database.unit_of_work() as uow:
        s = uow.session
        for i in range(24):
            tenant = pick.choice(TENANTS)
            name = f"svc{pick.randint(0, 7)}"  # names repeat across tenants: the order is (name, tenant)
            if await repo.get_deployment(s, tenant, name) is not None:
                continue
            spec = _spec(pick, name, tenant)
            columns = _columns(spec, pick)
            dep_id = await s.scalar(insert(m.Deployment).returning(m.Deployment.id), columns)
            rows = _placements(pick, dep_id, spec, columns["template_revision"])
            if rows:
                await s.execute(insert(m.Placement), rows)
        await uow.commit()


async def _as_the_orm_reads_them(database: Database, node_ids: list[str]) -> dict[str, d.AssignmentSet]:
    """The sets as the deployment rows read through the ORM say (how `assignment_sets` read them
    before): the current revision's spec from the row's columns, an older one's from its
    `revision_specs` document where it is kept there."""
    async with database.unit_of_work() as uow:
        s = uow.session
        generations = dict((await s.execute(select(m.Node.id, m.Node.assignment_generation)
                                             .where(m.Node.id.in_(node_ids)))).all())
        rows = await s.execute(
            select(m.Placement, m.Deployment).join(m.Deployment).where(m.Placement.node_id.in_(node_ids))
            .order_by(m.Placement.node_id, m.Deployment.name, m.Deployment.tenant_id, m.Placement.replica,
                      m.Placement.shard))
        held: dict[str, list[d.Assignment]] = {}
        for p, dep in rows:
            doc = None if p.revision == dep.template_revision else (dep.revision_specs or {}).get(str(p.revision))
            if doc is None:
                spec, shards = repo.deployment_spec(dep).shard, dep.shards_per_replica
            else:
                spec, shards = planning.spec_of_doc(doc).shard, doc["shards_per_replica"]
            milli = p.accelerator_milli if dep.shard_accelerators == 1 and p.accelerator_milli and \
                p.accelerator_milli < 1000 else 1000 * dep.shard_accelerators
            held.setdefault(p.node_id, []).append(d.Assignment(
                deployment=dep.name, tenant=dep.tenant_id, replica=p.replica, shard=p.shard, shards_per_replica=shards,
                accelerator_indices=tuple(p.accelerator_indices), accelerator_milli=milli if milli < 1000 else 0,
                spec=spec, generation=p.generation or dep.generation, deployment_uid=dep.id))
    return {n: d.AssignmentSet(n, g, tuple(held.get(n, ()))) for n, g in generations.items()}


async def _read(database: Database, node_ids: list[str]) -> dict[str, d.AssignmentSet]:
    async with database.unit_of_work() as uow:
        return await repo.assignment_sets(uow.session, node_ids)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_sets_are_those_the_orm_reading_gives(database: Database, seed: int) -> None:
    await _cluster(database)
    await _random_work(database, seed)
    wanted = [*NODES, "no-such-node"]
    expected = await _as_the_orm_reads_them(database, wanted)
    assert sum(len(s.assignments) for s in expected.values()) > 20
    assert any(a.spec.fractional for s in expected.values() for a in s.assignments)
    for _ in range(2):  # built, then kept
        got = await _read(database, wanted)
        assert got == expected
        assert repr(got) == repr(expected)  # the same types too (no 16 for 16.0)


async def test_a_kept_spec_is_never_given_to_another_deployment_with_the_same_id_and_revision(
        database: Database) -> None:
    await _cluster(database)
    first = _spec(random.Random(5), "web", "a")
    second = replace(first, shards_per_replica=first.shards_per_replica + 1,
                     shard=replace(first.shard, accelerators=first.shard.accelerators % 4 + 1, accelerator_milli=1000))
    ids: list[int] = []
    for spec in (first, second):
        # The second under the first's id: a database never gives an id twice (SQLite since 0024), but
        # one process opens many (tests, benches), and the kept specs are the process's.
        same_id = {"id": ids[0]} if ids else {}
        async with database.unit_of_work() as uow:
            await uow.session.execute(delete(m.Placement))
            await uow.session.execute(delete(m.Deployment))
            dep_id = await uow.session.scalar(insert(m.Deployment).returning(m.Deployment.id),
                                              {**repo.new_deployment_columns(spec, m.utcnow()), **same_id})
            await uow.session.execute(insert(m.Placement), [{
                "deployment_id": dep_id, "replica": 0, "shard": 0, "node_id": "n0",
                "accelerator_indices": list(range(spec.shard.accelerators)), "revision": 1}])
            await uow.commit()
        ids.append(dep_id)
        [assignment] = (await _read(database, ["n0"]))["n0"].assignments
        assert assignment.spec == spec.shard
        assert assignment.shards_per_replica == spec.shards_per_replica
    assert ids[0] == ids[1]  # what a cache keyed by (deployment id, revision) would get wrong
