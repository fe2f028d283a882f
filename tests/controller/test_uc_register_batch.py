"""usecases.agents.register_nodes: a join storm's Registers in one transaction, each judged alone.

A batch where several Registers are refused: the others land (one generation bump, their audit
entries appended), each refused one gets exactly the error it gets alone, and nothing of it is
written (no node row, no credential, no event, no audit entry)."""

from __future__ import annotations

from sqlalchemy import func, select

from controller import tokens as secrets_
from controller.errors import FailedPrecondition, InvalidArgument, MaiaError, PermissionDenied
from controller.identity import Principal, Role
from controller.domain.changes import ChangeKind
from controller.store import audit
from controller.store.changes import read_changes_since
from controller.store import models as m
from controller.usecases import agents
from controller.domain.values import NodeInfo
from uc_builders import WHO, apply_topology

BOOT = Principal("boot", Role.NODE_BOOTSTRAP, token_id="b00t")
REGISTER = "/maia.v1.NodeAgentService/Register"


def _ask(node: str, *, rack: str = "rack-a", proposal: str = "", who: Principal = BOOT) -> agents.Register:
    call = audit.CallEntry(audit.AuditRecord(actor=who.name, action=REGISTER, object_kind="node", object_id=node),
                           None)
    return agents.Register(who, NodeInfo(node, rack, 4, accelerator_model="maia-100"), proposal, call)


async def _register_alone(database, ask: agents.Register, live: set[str]) -> agents.Registered | MaiaError:
    async with database.unit_of_work() as uow:
        [outcome] = await agents.register_nodes(uow, [ask], heartbeat_interval_ms=1000,
                                                held_by_live_agent=live.__contains__)
    return outcome


async def _node_tokens(database) -> dict[str, list[str]]:
    async with database.unit_of_work() as uow:
        rows = await uow.session.scalars(select(m.ApiToken).where(m.ApiToken.role == Role.NODE.value))
        found: dict[str, list[str]] = {}
        for row in rows:
            found.setdefault(row.node_id, []).append(row.id)
        return found


async def test_a_batch_of_registers_lands_the_good_ones_and_refuses_each_bad_one_alone(database):
    await apply_topology(database, {"rack-a": "row-a"})
    held, kept = secrets_.mint(), secrets_.mint()
    live = {"n5"}  # a live agent stream holds n5 (a second agent with its id)
    assert isinstance(await _register_alone(database, _ask("old", proposal=held.text), live), agents.Registered)
    assert isinstance(await _register_alone(database, _ask("kept", proposal=kept.text), live), agents.Registered)
    async with database.unit_of_work() as uow:
        generation = int(await uow.session.scalar(select(m.ClusterState.generation)))
        events = int(await uow.session.scalar(select(func.count()).select_from(m.Event)))
    entries = len(await _entries(database))
    a, b = secrets_.mint(), secrets_.mint()
    batch = [
        _ask("n1", proposal=a.text),                # new: lands with the agent's own credential
        _ask("n2", rack="rack-zz"),                 # no such rack
        _ask("n3", proposal="maia_nonsense"),       # not a token
        _ask("n4", proposal=a.text),                # the id n1 just took
        _ask("old"),                                # a bootstrap token cannot take over a held node
        _ask("kept", proposal=kept.text),           # the agent that proposed kept's credential, again
        _ask("n5", proposal=b.text),                # held by a live stream
        _ask("n6"),                                 # new, no proposal: a fresh credential in the reply
    ]
    async with database.unit_of_work() as uow:
        outcomes = await agents.register_nodes(uow, batch, heartbeat_interval_ms=1000,
                                               held_by_live_agent=live.__contains__)

    refused = {i: o for i, o in enumerate(outcomes) if isinstance(o, MaiaError)}
    assert {i: type(o) for i, o in refused.items()} == {
        1: FailedPrecondition, 2: InvalidArgument, 3: InvalidArgument, 4: PermissionDenied, 6: FailedPrecondition}
    assert refused[1].message == "rack rack-zz is not in the topology; apply it first"
    assert refused[3].message == f"credential_proposal: token id {a.id} is taken; mint another"
    assert "n5 is held by a live agent stream" in refused[6].message
    landed = {batch[i].info.node_id: o for i, o in enumerate(outcomes) if i not in refused}
    assert set(landed) == {"n1", "kept", "n6"}
    assert landed["n1"].registration.node_credential == "" and landed["kept"].registration.node_credential == ""
    assert secrets_.parse(landed["n6"].registration.node_credential) is not None
    assert len({o.registration.session_id for o in landed.values()}) == 3
    # Exactly the answer each refused Register gets alone (after the batch, as if it came next).
    for i, error in refused.items():
        alone = await _register_alone(database, batch[i], live)
        assert type(alone) is type(error) and alone.message == error.message

    credentials = await _node_tokens(database)
    assert set(credentials) == {"old", "kept", "n1", "n6"}  # nothing for the refused ones
    assert credentials["n1"] == [a.id] and credentials["kept"] == [kept.id] and credentials["old"] == [held.id]
    async with database.unit_of_work() as uow:
        nodes = set(await uow.session.scalars(select(m.Node.id)))
        assert nodes == {"old", "kept", "n1", "n6"}
        since = await read_changes_since(uow.session, generation)
        assert since.generation == generation + 1  # one bump, saying which nodes joined
        # kept registered again as it was: not a change
        assert sorted(since.changes[generation + 1]) == [(ChangeKind.NODE, "n1"), (ChangeKind.NODE, "n6")]
        registered = list(await uow.session.scalars(
            select(m.Event.object_id).where(m.Event.kind == "node.registered", m.Event.id > events)))
        assert sorted(registered) == ["kept", "n1", "n6"]
    assert [batch[i].call.written for i in range(len(batch))] == [i not in refused for i in range(len(batch))]
    written = (await _entries(database))[entries:]
    assert [(e.action, e.object_id, e.outcome) for e in written] == [
        (REGISTER, "n1", "OK"), (REGISTER, "kept", "OK"), (REGISTER, "n6", "OK")]
    async with database.unit_of_work() as uow:
        assert (await audit.verify_chain(uow.session)).intact


async def test_a_batch_where_every_register_is_refused_writes_nothing(database):
    await apply_topology(database, {"rack-a": "row-a"})
    async with database.unit_of_work() as uow:
        generation = int(await uow.session.scalar(select(m.ClusterState.generation)))
    batch = [_ask("n1", rack="rack-zz"), _ask("n2", who=Principal("lab", Role.TENANT, tenant="lab"))]
    async with database.unit_of_work() as uow:
        outcomes = await agents.register_nodes(uow, batch, heartbeat_interval_ms=1000)
    assert [type(o) for o in outcomes] == [FailedPrecondition, PermissionDenied]
    async with database.unit_of_work() as uow:
        assert int(await uow.session.scalar(select(m.ClusterState.generation))) == generation
        assert int(await uow.session.scalar(select(func.count()).select_from(m.Node))) == 0
    assert not any(a.call.written for a in batch) and await _entries(database) == []


async def test_an_admin_re_registering_in_a_batch_revokes_the_old_credential(database):
    await apply_topology(database, {"rack-a": "row-a"})
    first = secrets_.mint()
    assert isinstance(await _register_alone(database, _ask("n1", proposal=first.text), set()), agents.Registered)
    async with database.unit_of_work() as uow:
        [again, new] = await agents.register_nodes(uow, [_ask("n1", who=WHO), _ask("n2", who=WHO)],
                                                   heartbeat_interval_ms=1000)
    assert again.revoked == (first.id,) and new.revoked == ()
    async with database.unit_of_work() as uow:
        old = await uow.session.get(m.ApiToken, first.id)
        assert old.revoked_at is not None
    assert len((await _node_tokens(database))["n1"]) == 2  # the revoked one and the fresh one


async def _entries(database) -> list:
    async with database.unit_of_work() as uow:
        return [e for e in await audit.list_entries(uow.session, limit=1000) if e.action == REGISTER]
