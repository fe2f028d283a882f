"""Head-of-line nominations as stored (controller/store/nominations.py): the set written and read
back, its rows gone with their deployment, and a snapshot carrying those the state still has."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import delete

from controller.store.db import Database
from controller.store.models import Deployment
from controller.store.nominations import StoredNomination, in_force, read_nominations, write_nominations
from controller.store.snapshot import load_snapshot
from scheduler import problem_from_dict

from .seed import seed_problem

SHARED = Path("/work/shared/placement")
AT = datetime(2026, 12, 6, 21, 0, tzinfo=timezone.utc)


async def _seeded(database: Database) -> dict[str, int]:
    """The tiny example cluster; its deployments' keys -> primary keys."""
    doc = json.loads((SHARED / "examples" / "tiny.problem.json").read_text())
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, doc)
        await uow.commit()
    async with database.unit_of_work() as uow:
        return dict((await load_snapshot(uow.session)).deployment_ids)


def _nomination(key: str, dep_id: int, nodes: tuple[str, ...], minutes_ago: int = 5) -> StoredNomination:
    return StoredNomination(key, dep_id, 3, nodes, AT - timedelta(minutes=minutes_ago),
                            AT - timedelta(minutes=minutes_ago + 2), 1, shape=f"shape-of-{key}")


async def _write(database: Database, *nominations: StoredNomination) -> None:
    async with database.unit_of_work() as uow:
        await write_nominations(uow.session, nominations)
        await uow.commit()


async def _read(database: Database) -> list[StoredNomination]:
    async with database.unit_of_work() as uow:
        return await read_nominations(uow.session)


async def test_the_set_is_replaced_whole_and_read_back_oldest_first(database: Database) -> None:
    ids = await _seeded(database)
    first, second = sorted(ids)
    older = _nomination(first, ids[first], ("a1-n1", "a1-n2"), minutes_ago=9)
    newer = _nomination(second, ids[second], ("a2-n1",), minutes_ago=1)
    await _write(database, newer, older)
    assert await _read(database) == [older, newer]
    await _write(database, newer)
    assert await _read(database) == [newer]
    await _write(database)
    assert await _read(database) == []


async def test_a_row_goes_with_its_deployment_and_one_whose_deployment_is_gone_is_not_written(
        database: Database) -> None:
    ids = await _seeded(database)
    first, second = sorted(ids)
    await _write(database, _nomination(first, ids[first], ("a1-n1",)), _nomination(second, ids[second], ("a2-n1",)))
    async with database.unit_of_work() as uow:
        await uow.session.execute(delete(Deployment).where(Deployment.id == ids[first]))
        await uow.commit()
    assert [n.solver_id for n in await _read(database)] == [second]  # the foreign key's cascade
    # A set naming the deleted deployment still commits, without it (a refused foreign key would
    # fail the plan commit it rides with).
    await _write(database, _nomination(first, ids[first], ("a1-n1",)), _nomination(second, ids[second], ("a2-n2",)))
    assert [(n.solver_id, n.nodes) for n in await _read(database)] == [(second, ("a2-n2",))]


async def test_a_snapshot_carries_the_nominations_the_state_still_has(database: Database) -> None:
    ids = await _seeded(database)
    first, second = sorted(ids)
    await _write(database,
                 _nomination(first, ids[first], ("a1-n1", "gone-node"), minutes_ago=9),  # a node deleted since
                 _nomination(second, ids[second] + 1000, ("a2-n1",)),  # another deployment of that name
                 _nomination("nobody/else", ids[first], ("a2-n2",)))  # not a solver id of the state
    async with database.unit_of_work() as uow:
        snapshot = await load_snapshot(uow.session)
    assert snapshot.problem["nominations"] == [{"deployment": first, "priority": 3, "nodes": ["a1-n1"]}]
    problem = problem_from_dict(snapshot.problem)  # the interchange format takes it (`maiactl snapshot`)
    assert [(n.deployment, n.nodes) for n in problem.nominations] == [(first, ("a1-n1",))]
    await _write(database)
    async with database.unit_of_work() as uow:
        assert "nominations" not in (await load_snapshot(uow.session)).problem


def test_a_node_in_two_stored_nominations_stays_with_the_older() -> None:
    """One leader never writes that; a problem naming a node twice would be refused whole."""
    older, newer = _nomination("t/a", 1, ("n1", "n2"), 9), _nomination("t/b", 2, ("n2", "n3"), 1)
    kept = in_force([older, newer], {"t/a": 1, "t/b": 2}, {"t/a", "t/b"}, {"n1", "n2", "n3"})
    assert [(k.solver_id, k.nodes) for k in kept] == [("t/a", ("n1", "n2")), ("t/b", ("n3",))]
    assert in_force([newer], {"t/b": 2}, {"t/b"}, {"n9"}) == []  # none of its nodes left: none
