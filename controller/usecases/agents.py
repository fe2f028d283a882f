"""The node agent protocol's state changes: register, hello, disconnect, reports.

An agent registers (upserting the node's capacity and getting a fresh session id), then opens
one stream whose Hello must carry that session; only the current session may speak for a node,
and while a live stream holds a node a second agent registering the same node id is refused.
Liveness changes (up on Hello, suspect when the stream ends; later ones in `usecases/liveness`)
bump the cluster generation so the reconciler sees which nodes take new shards. Heartbeats and shard reports arrive often and
are written in batches by `flush_reports`, one transaction for many nodes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from controller import limits
from controller import tokens as secrets_
from controller.errors import Conflict, FailedPrecondition, InvalidArgument, MaiaError, NotFound, PermissionDenied
from controller.identity import Principal, Role
from controller.tokens import MintedToken
from controller.store import audit
from controller.store import models as m
from controller.store import repositories as repo
from controller.store import tokens as node_tokens
from controller.store.changes import NODE_HARDWARE_COLUMNS
from controller.store.db import UnitOfWork
from controller.store.marks import deferred_writes
from controller.usecases import policy, tokens
from controller.domain.changes import ClusterChange
from controller.domain import restarts
from controller.domain.values import (
    DeploymentView, HeartbeatReport, NodeInfo, Registration, ShardReport, deployment_key, split_deployment_key,
)
from controller.usecases.validation import (
    ID_MAX, check_count, check_id, check_labels, check_name, check_optional_id, check_quantity, check_range, check_text,
)
from controller.usecases.ports import Signals

_SHARD_PHASES = {p.value for p in m.ShardPhase}
# The phases an agent reports; ASSIGNED is the controller's (committed, not acknowledged yet).
_AGENT_PHASES = {p.value for p in (m.ShardPhase.LOADING, m.ShardPhase.RUNNING, m.ShardPhase.FAILED,
                                   m.ShardPhase.STOPPED)}


def _validate(info: NodeInfo) -> None:
    """Everything an agent says about its node is bounded (`controller.limits`)."""
    check_id("node", info.node_id)
    where = f"node {info.node_id}"
    if not info.rack:
        raise InvalidArgument(f"{where}: rack is required")
    check_id(f"{where}: rack", info.rack)
    check_range(f"{where}: accelerators", info.accelerators, 0, limits.NODE_ACCELERATORS_MAX)
    check_text(f"{where}: hostname", info.hostname, limits.HOSTNAME_MAX)
    check_text(f"{where}: accelerator_model", info.accelerator_model, limits.MODEL_MAX)
    check_text(f"{where}: agent_version", info.agent_version, limits.AGENT_VERSION_MAX)
    check_quantity(f"{where}: hbm_gib", info.hbm_gib, limits.HBM_GIB_MAX)
    check_quantity(f"{where}: cpu_milli", info.cpu_milli, limits.CPU_MILLI_MAX)
    check_quantity(f"{where}: memory_mib", info.memory_mib, limits.MEMORY_MIB_MAX)
    check_quantity(f"{where}: idle_power_w", info.idle_power_w, limits.POWER_W_MAX)
    check_labels(f"{where}: labels", info.labels)


def check_connect(who: Principal) -> None:
    """A Connect stream is refused as it opens, before any message is read, when no Hello could
    admit its caller (a tenant or node-bootstrap token): which node it speaks for is judged at its
    Hello (`_accept_hello`), but a caller refused then would otherwise hold the stream until then."""
    policy.require_node_credential(who, "Connect")


def validate_report(node_id: str, report: ShardReport) -> None:
    """A shard status from an agent: every field bounded like a request's, its phase one an agent reports."""
    where = f"node {node_id}: shard status"
    check_name(f"{where} deployment", report.deployment)
    check_optional_id(f"{where} tenant", report.tenant)
    check_range(f"{where} replica", report.replica, 0, limits.REPLICAS_MAX - 1)
    check_range(f"{where} shard", report.shard, 0, limits.SHARDS_PER_REPLICA_MAX - 1)
    if report.phase not in _AGENT_PHASES:  # the phase as converted: a word, "" (UNSPECIFIED) or an unknown number
        raise InvalidArgument(f"{where} phase must be one an agent reports (LOADING, RUNNING, FAILED or STOPPED), "
                              f"got {report.phase.upper() or 'UNSPECIFIED'}")
    check_text(f"{where} message", report.message, limits.REPORT_MESSAGE_MAX)
    check_quantity(f"{where} power_draw_w", report.power_draw_w, limits.POWER_W_MAX)


def validate_heartbeat_header(node_id: str, beat: HeartbeatReport) -> None:
    """One heartbeat (the node's full shard state) is bounded by what one node may hold: its own
    fields and its shard count here; each shard report by `validate_report` when it is used (the
    hub uses those that changed since the stream's last heartbeat)."""
    check_quantity(f"node {node_id}: heartbeat power_draw_w", beat.power_draw_w, limits.POWER_W_MAX)
    check_count(f"node {node_id}: heartbeat shards", beat.shards, limits.SHARDS_PER_NODE_MAX)
    seen: set[int] = set()
    for fault in beat.failed_accelerators:  # against the node's own count when written (usecases/faults.py)
        where = f"node {node_id}: heartbeat failed_accelerators"
        check_range(f"{where} index", fault.index, 0, limits.NODE_ACCELERATORS_MAX - 1)
        if fault.index in seen:
            raise InvalidArgument(f"{where}: accelerator {fault.index} listed twice")
        seen.add(fault.index)
        check_text(f"{where} reason", fault.reason, limits.FAULT_REASON_MAX)


def _capacity(row: m.Node) -> tuple:
    return (row.rack_id, row.accelerators, row.accelerator_model, row.hbm_gib, row.cpu_milli,
            row.memory_mib, row.idle_power_w, dict(row.labels or {}))


def _registered_columns(info: NodeInfo) -> dict[str, Any]:
    """The node row's columns a Register writes from what its agent says, by column name."""
    return {"hostname": info.hostname, "rack_id": info.rack, "accelerators": info.accelerators,
            "accelerator_model": info.accelerator_model, "hbm_gib": info.hbm_gib, "cpu_milli": info.cpu_milli,
            "memory_mib": info.memory_mib, "idle_power_w": info.idle_power_w, "labels": dict(info.labels),
            "agent_version": info.agent_version}


def _changes_hardware(plan: _Plan) -> bool:
    """Whether the Register adds its node or changes a column of it that the database's isolation
    or capacity triggers watch (`NODE_HARDWARE_COLUMNS`, `repo.will_change_nodes_hardware`)."""
    if plan.row is None:
        return True
    written = _registered_columns(plan.ask.info)
    return any(getattr(plan.row, column) != written[column] for column in NODE_HARDWARE_COLUMNS)


@dataclass(frozen=True, slots=True)
class Register:
    """One Register call: who asks, for which node, with which credential proposal (see
    `_judge`). `call`: the call's audit entry when another task commits it (a group
    commit appends it with the registration); None when the caller's own commit writes it."""

    who: Principal
    info: NodeInfo
    credential_proposal: str = ""
    call: audit.CallEntry | None = None


@dataclass(frozen=True, slots=True)
class Registered:
    """A committed registration, and the node credentials it revoked (an admin re-registering
    the node): every controller's authenticator must forget them (`Signals.tokens_revoked`)."""

    registration: Registration
    revoked: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Facts:
    """What a batch of Registers reads before judging them, in a few queries for all."""

    racks: set[str]
    rows: dict[str, m.Node]
    credentials: dict[str, list[m.ApiToken]]  # the active node credentials of the existing nodes
    taken_ids: set[str]                          # token ids the proposals name that exist


@dataclass(slots=True)
class _Plan:
    """A Register judged admissible: what to write (nothing is written while judging)."""

    ask: Register
    row: m.Node | None
    proposal: MintedToken | None
    issue: bool = False                           # a node credential is issued (the proposal, or a fresh one)
    revoke: tuple[m.ApiToken, ...] = ()


async def _read_facts(uow: UnitOfWork, batch: Sequence[Register],
                      proposals: Mapping[int, MintedToken | None]) -> _Facts:
    s = uow.session
    rows = await repo.node_rows_by_id(s, {r.info.node_id for r in batch})
    judged_by_credentials = {r.info.node_id for r in batch if r.info.node_id in rows and r.who.role is not Role.NODE}
    return _Facts(
        racks=await repo.existing_ids(s, m.Rack, {r.info.rack for r in batch}),
        rows=rows,
        credentials=await node_tokens.active_tokens_of_nodes(s, datetime.now(timezone.utc), judged_by_credentials,
                                                             role=Role.NODE.value),
        taken_ids=await repo.existing_ids(s, m.ApiToken, {p.id for p in proposals.values() if p is not None}),
    )


def _judge(ask: Register, proposal: MintedToken | None, facts: _Facts, taken_ids: set[str],
           held_by_live_agent: Callable[[str], bool] | None) -> _Plan:
    """Whether `ask` may register its node, and what that writes (raises what refuses it).

    A new node: admin or node-bootstrap, and a fresh credential. An existing node: its own
    credential (nothing new), an admin (a fresh credential, the old ones revoked), or a
    node-bootstrap token only while the node holds no active credential (after an admin reset,
    or a node registered before credentials existed) or when it proves to be the agent that
    proposed the node's credential (a retry after a lost reply): so a bootstrap token cannot take
    over a node its agent still holds. The credential issued is the agent's `proposal` when it
    sent one (the reply then carries no secret), else a fresh one. A node a live agent stream
    holds is refused to anyone but an admin (a second agent with the same node id).
    """
    who, node_id = ask.who, ask.info.node_id
    # Who may register at all, first: a tenant's token learned from the answers below which racks
    # and nodes exist (its refusal differed by whether the node was registered).
    policy.require_role(who, "registering nodes", Role.NODE_BOOTSTRAP, Role.NODE)
    if who.role is Role.NODE_BOOTSTRAP and who.node and who.node != node_id:
        raise PermissionDenied(f"this node-bootstrap token registers node {who.node} only, not {node_id[:128]}")
    if ask.info.rack not in facts.racks:
        raise _not_in_topology([ask.info.rack])
    row = facts.rows.get(node_id)
    plan = _Plan(ask, row, proposal)
    action = f"registering node {node_id}"
    held = facts.credentials.get(node_id, [])
    if row is None:
        policy.require_role(who, action, Role.NODE_BOOTSTRAP)
        plan.issue = True
    elif who.role is Role.NODE:
        policy.require_node_speaker(who, node_id, action)
    elif who.role in (Role.NODE_BOOTSTRAP, Role.ADMIN) and proposal is not None and any(
            t.id == proposal.id and secrets_.secret_matches(proposal.secret, t.secret_sha256) for t in held):
        # The agent that proposed the node's credential, registering again (its reply was lost):
        # it keeps that credential. An admin too (every caller is one under --insecure-no-auth):
        # a fresh credential would be its own proposal again, an id taken, refused forever.
        pass
    elif who.role is Role.NODE_BOOTSTRAP and held:
        raise PermissionDenied(
            f"node {node_id} is already registered and holds a node credential: a node-bootstrap token "
            f"registers new nodes only; re-register with the node's own credential, or have an admin "
            f"reset it (maiactl node reset-credential {node_id})")
    else:
        if who.role is not Role.NODE_BOOTSTRAP:
            policy.require_admin(who, action)
        plan.issue, plan.revoke = True, tuple(held)
    if plan.issue and proposal is not None and proposal.id in taken_ids:
        raise InvalidArgument(f"credential_proposal: token id {proposal.id} is taken; mint another")
    if who.role is not Role.ADMIN and held_by_live_agent is not None and held_by_live_agent(node_id):
        raise FailedPrecondition(
            f"node {node_id} is held by a live agent stream: a second agent with the same node id is refused "
            f"(stop the other agent; once its stream ends, or falls silent past the heartbeat timeout, this one "
            f"may register)")
    if plan.issue and proposal is not None:
        taken_ids.add(proposal.id)
    return plan


def _not_in_topology(racks: Sequence[str], *, meanwhile: bool = False) -> FailedPrecondition:
    """The refusal of a Register into racks the topology does not hold (`meanwhile`: they were
    deleted after the Register read them)."""
    named, it = (f"rack {racks[0]} is", "it") if len(racks) == 1 else (f"racks {', '.join(racks)} are", "them")
    since = " (removed by a topology change meanwhile)" if meanwhile else ""
    return FailedPrecondition(f"{named} not in the topology{since}; apply {it} first")


async def _refusal_of_racks_gone(uow: UnitOfWork, plans: Sequence[_Plan]) -> MaiaError:
    """What refuses a batch whose node rows a rack's foreign key refused: its racks were read
    without a lock, and one was deleted (DeleteRack) before the rows were written. The
    transaction is done for (rolled back here); which racks are gone is read again."""
    await uow.rollback()
    racks = {plan.ask.info.rack for plan in plans}
    gone = sorted(racks - await repo.existing_ids(uow.session, m.Rack, racks))
    if gone:
        return _not_in_topology(gone, meanwhile=True)
    named = f"rack {next(iter(racks))} was" if len(racks) == 1 else f"one of racks {', '.join(sorted(racks))} was"
    return Conflict(f"{named} removed and applied again while the node(s) registered; nothing was written: "
                    f"register again",
                    retry_after_ms=limits.PARENT_REAPPLIED_RETRY_MS)


def _proposal(text: str) -> MintedToken | None:
    if not text:
        return None
    proposal = secrets_.proposed(text)
    if proposal is None:
        raise InvalidArgument(f"credential_proposal is not a token {secrets_.PREFIX}<16 hex>.<at least "
                              f"{secrets_.MIN_PROPOSED_SECRET_CHARS} url-safe characters>")
    return proposal


async def register_node(uow: UnitOfWork, who: Principal, info: NodeInfo, *, heartbeat_interval_ms: int,
                        signals: Signals | None = None,
                        held_by_live_agent: Callable[[str], bool] | None = None,
                        credential_proposal: str = "") -> Registration:
    """Register (or re-register) one node (see `register_nodes`), committed by the caller's own
    transaction; raises what refuses it."""
    [outcome] = await register_nodes(uow, [Register(who, info, credential_proposal)],
                                     heartbeat_interval_ms=heartbeat_interval_ms, held_by_live_agent=held_by_live_agent)
    if isinstance(outcome, MaiaError):
        raise outcome
    if signals is not None and outcome.revoked:
        signals.tokens_revoked(outcome.revoked)
    return outcome.registration


async def register_nodes(uow: UnitOfWork, batch: Sequence[Register], *, heartbeat_interval_ms: int,
                         held_by_live_agent: Callable[[str], bool] | None = None) -> list[Registered | MaiaError]:
    """Register (or re-register) nodes in one transaction: a join storm's Registers are committed
    together, with one cluster generation bump and one audit append for all. Each Register is
    judged alone, against the database as it was before the batch (the nodes of a batch are
    distinct) and the proposals ahead of it in the batch, exactly as if it came alone; its outcome,
    in its place, is what it registered or the error that refuses it (nothing of it is written).
    Nothing is committed when every one is refused.

    `held_by_live_agent` says whether a live agent stream holds the node now: a second agent with
    the same node id is refused (an admin may still re-register it). A node registering with fewer
    accelerators than its placements use has those placements released (only that node's; the
    solver places them again). Each Register's `call` (its audit entry) is appended with it.

    A rack deleted after the batch read it refuses the node's row by its foreign key, which does
    not say whose: the batch raises, nothing written (FAILED_PRECONDITION naming the racks gone;
    its group commit then decides each Register alone, controller/groupcommit.py).
    """
    if len({r.info.node_id for r in batch}) != len(batch):
        raise ValueError("a batch of Registers names each node once")
    outcomes: list[Registered | MaiaError | _Plan] = []
    proposals: dict[int, MintedToken | None] = {}
    for i, ask in enumerate(batch):
        try:
            _validate(ask.info)
            proposals[i] = _proposal(ask.credential_proposal)
        except MaiaError as exc:
            outcomes.append(exc)
            continue
        outcomes.append(_Plan(ask, None, None))  # judged below, once the facts are read
    facts = await _read_facts(uow, [batch[i] for i in proposals], proposals)
    taken_ids = set(facts.taken_ids)
    for i, proposal in proposals.items():
        try:
            outcomes[i] = _judge(batch[i], proposal, facts, taken_ids, held_by_live_agent)
        except MaiaError as exc:
            outcomes[i] = exc
    plans = [o for o in outcomes if isinstance(o, _Plan)]
    if not plans:
        return [o for o in outcomes if isinstance(o, MaiaError)]
    await repo.will_move_generation(uow.session)  # before the nodes' rows (lock order: store/changes.py)
    await _release_invalidated(uow, plans)  # placements before nodes (the same)
    # isolation_state's row before the nodes' rows (the same), unless the batch only adds nodes: their
    # new rows, which nobody else can wait for, are all it holds when its INSERT's trigger waits.
    if any(plan.row is not None for plan in plans) and any(map(_changes_hardware, plans)):
        await repo.will_change_nodes_hardware(uow.session)
    try:
        written = {id(plan): await _write(uow, plan, heartbeat_interval_ms) for plan in plans}
        await uow.session.flush()  # the nodes' rows: a rack read above may have been deleted since
    except Exception as exc:
        if repo.topology_parent_gone(exc):  # which Register's rack, the database does not say: all refused
            raise await _refusal_of_racks_gone(uow, plans) from None
        raise
    changed = [plan.ask.info.node_id for plan in plans if written[id(plan)][1]]
    if changed:  # last before the commit: the row stays locked only until it
        await repo.bump_cluster_generation(uow.session, ClusterChange.nodes(changed))
    calls = [plan.ask.call for plan in plans if plan.ask.call is not None]
    await audit.append_calls(uow.session, calls)
    await uow.commit()
    for call in calls:
        call.written = True
    return [written[id(o)][0] if isinstance(o, _Plan) else o for o in outcomes]


def _no_longer_holds(row: m.Node, info: NodeInfo) -> tuple[int | None, str] | None:
    """How many of its accelerators a node registering as `info` still holds shards on (its
    placements on the others are released; None: on none, and those that use no accelerator go
    too), and why; None: all it holds stays. A node in another rack, with another accelerator
    model or less HBM an accelerator is another machine as far as its shards go (placed for that
    rack's isolation and power, that model, that memory): all of them go. One with fewer
    accelerators loses those on the ones it lost. (Fewer CPUs or less memory: `_over_host`.)"""
    if info.rack != row.rack_id:
        return None, f"registered in rack {info.rack} (was {row.rack_id})"
    if info.accelerator_model != row.accelerator_model:
        return None, f"registered with accelerator model {info.accelerator_model} (was {row.accelerator_model})"
    if info.hbm_gib is not None and (row.hbm_gib is None or info.hbm_gib < row.hbm_gib):  # None: not limited
        was = "not limited" if row.hbm_gib is None else f"{row.hbm_gib:g}"
        return None, f"registered with {info.hbm_gib:g} GiB of HBM an accelerator (was {was})"
    if info.accelerators < row.accelerators:
        return info.accelerators, f"registered with {info.accelerators} accelerators (was {row.accelerators})"
    return None


def _shrank(row: m.Node, info: NodeInfo) -> bool:
    """Whether a node registers with fewer CPUs or less memory than it had (None: not limited)."""
    return any(now is not None and (was is None or now < was)
               for now, was in ((info.cpu_milli, row.cpu_milli), (info.memory_mib, row.memory_mib)))


async def _over_host(uow: UnitOfWork, plans: Sequence[_Plan]) -> dict[str, tuple[str, tuple[int | None, str]]]:
    """Of nodes registering with fewer CPUs or less memory, those whose placed shards ask more than
    they have now: all their shards go (which of them still fit is the solver's to say; it places
    them again, here where they do), as `_no_longer_holds` says (by node: who, (None, why)). A
    node whose figures went down but still hold its shards keeps them: an agent registers again
    at every connect, and one whose memory reads a little lower (a kernel's, a cgroup's) would
    have its shards restarted each time."""
    if not plans:
        return {}
    placed = await repo.placed_host_use(uow.session, [plan.ask.info.node_id for plan in plans])
    over: dict[str, tuple[str, tuple[int | None, str]]] = {}
    for plan in plans:
        info = plan.ask.info
        cpu, memory = placed.get(info.node_id, (0, 0))
        short = [f"{asked} {what} placed > {has}" for what, asked, has in (
            ("millicores of CPU", cpu, info.cpu_milli), ("MiB of memory", memory, info.memory_mib))
            if has is not None and asked > has]
        if short:
            over[info.node_id] = (plan.ask.who.name, (None, f"registered with fewer CPUs or less memory "
                                                            f"({', '.join(short)})"))
    return over


async def _release_invalidated(uow: UnitOfWork, plans: Sequence[_Plan]) -> None:
    """Nodes registering as a machine their shards no longer fit (`_no_longer_holds`): those
    shards are released (the solver places them again), every such node's at once and before
    any node's row is written (PostgreSQL's lock order, store/changes.py: placements, isolation_state,
    deployments, nodes; `repo.release_placements_beyond`). Kept, a shard moved into another
    tenant's dedicated rack or onto a node too small for it would stand until the node went
    (the isolation watchdog's alarm meanwhile)."""
    changed = {plan.ask.info.node_id: (plan.ask.who.name, why) for plan in plans if plan.row is not None
               and (why := _no_longer_holds(plan.row, plan.ask.info)) is not None}
    changed.update(await _over_host(uow, [plan for plan in plans if plan.row is not None and plan.ask.info.node_id
                                          not in changed and _shrank(plan.row, plan.ask.info)]))
    if not changed:
        return
    released = await repo.release_placements_beyond(
        uow.session, {node_id: kept for node_id, (_, (kept, _)) in changed.items()})
    for node_id, shards in sorted(released.items()):
        actor, (_, why) = changed[node_id]
        repo.record_event(uow.session, actor=actor, kind="node.placements_released", object_kind="node",
                          object_id=node_id, data={"shards": shards},
                          message=f"{why}: {len(shards)} shard(s) it no longer fits are placed again")


async def _write(uow: UnitOfWork, plan: _Plan, heartbeat_interval_ms: int) -> tuple[Registered, bool]:
    """Stage one judged Register; (what it registered, whether the node's capacity changed)."""
    who, info = plan.ask.who, plan.ask.info
    revoked = tokens.revoke_credentials(uow, who, info.node_id, plan.revoke)
    credential = ""
    if plan.issue:
        issued = tokens.add_token(uow, who, role=Role.NODE, name=f"node-{info.node_id}"[:ID_MAX], node=info.node_id,
                                  minted=plan.proposal)
        credential = "" if plan.proposal is not None else issued.secret
    row, created = plan.row, plan.row is None
    if row is None:  # never connected: down, with nothing to evict
        row = m.Node(id=info.node_id, health=m.NodeHealth.DOWN, evicted_at=m.utcnow(), cordoned=False,
                     assignment_generation=0, power_draw_w=0.0)
        uow.session.add(row)
    before = None if created else _capacity(row)
    for column, value in _registered_columns(info).items():
        setattr(row, column, value)
    row.session_id = uuid.uuid4().hex
    repo.record_event(uow.session, actor=who.name, kind="node.registered", object_kind="node", object_id=info.node_id,
                      data={"rack": info.rack, "accelerators": info.accelerators, "created": created})
    registration = Registration(node_id=row.id, session_id=row.session_id, heartbeat_interval_ms=heartbeat_interval_ms,
                                node_credential=credential)
    return Registered(registration, tuple(revoked)), created or before != _capacity(row)


async def reset_node_credential(uow: UnitOfWork, who: Principal, node_id: str, signals: Signals) -> list[str]:
    """Revoke a node's credentials (lost, or leaked): its agent, holding only a node-bootstrap
    token, may then register it again and receives a new credential. Returns the revoked ids."""
    policy.require_admin(who, "resetting node credentials")
    check_id("node", node_id)  # as every node RPC: a NUL in it is INVALID_ARGUMENT, not PostgreSQL's error
    if await repo.get_node(uow.session, node_id) is None:
        raise NotFound(f"node {node_id} not found")
    # Commits; the stream its credential opened (if any) ends now, not at its next call.
    return await tokens.revoke_node_credentials(uow, who, node_id, signals)


@dataclass(frozen=True, slots=True)
class Hello:
    """A Connect stream's first message: the node and the session it speaks for."""

    who: Principal
    node_id: str
    session_id: str
    damped: bool = False  # the node flaps: suspect, not up


async def hello(uow: UnitOfWork, who: Principal, node_id: str, session_id: str, now: datetime, *,
                damped: bool = False) -> bool:
    """One hello (see `hellos`): True if it changed whether the node takes new shards."""
    [outcome] = await hellos(uow, [Hello(who, node_id, session_id, damped)], now)
    if isinstance(outcome, MaiaError):
        raise outcome
    return outcome


async def hellos(uow: UnitOfWork, batch: Sequence[Hello], now: datetime) -> list[bool | MaiaError]:
    """Accept streams for their nodes' current sessions and mark the nodes up (suspect while
    `damped`: they flap), in one transaction: a join storm's hellos are committed together, with one
    cluster generation bump for all. Each hello is judged alone; its outcome, in its place, is
    True if it changed whether the node takes new shards, or the error that refuses it. The
    nodes' placements are kept: their agents are sent them and converge to them. Only a node's own
    credential (or an admin) may speak for it."""
    # Only ids that could name a node are read: one PostgreSQL cannot take (a NUL in it) would fail
    # the whole batch's read, where `_accept_hello` refuses that hello alone (INVALID_ARGUMENT).
    rows = await repo.node_rows_by_id(uow.session, {h.node_id for h in batch if _may_name_a_node(h.node_id)})
    outcomes: list[bool | MaiaError] = []
    for h in batch:
        try:
            outcomes.append(_accept_hello(uow, h, rows.get(h.node_id), now))
        except MaiaError as exc:
            outcomes.append(exc)
    if any(o is True for o in outcomes):
        await repo.bump_cluster_generation(uow.session, ClusterChange.nodes(
            h.node_id for h, o in zip(batch, outcomes) if o is True))
    await uow.commit()
    return outcomes


def _may_name_a_node(node_id: str) -> bool:
    try:
        check_id("node", node_id)
    except MaiaError:
        return False
    return True


def _accept_hello(uow: UnitOfWork, h: Hello, row: m.Node | None, now: datetime) -> bool:
    policy.require_node_speaker(h.who, h.node_id, f"Connect as node {h.node_id}")
    check_id("node", h.node_id)
    check_text("hello.session_id", h.session_id, limits.SESSION_ID_MAX)
    if row is None:
        raise FailedPrecondition(f"node {h.node_id} is not registered; call Register first")
    if not h.session_id or row.session_id != h.session_id:
        raise FailedPrecondition(
            f"session {h.session_id or '(empty)'} is not the current session of node {h.node_id}; register again"
        )
    before = (row.health, row.evicted_at is not None)
    row.health = m.NodeHealth.SUSPECT if h.damped else m.NodeHealth.UP
    row.last_heartbeat_at = now
    repo.clear_eviction(row)
    if before == (row.health, False):
        return False
    if h.damped:
        repo.record_event(uow.session, actor="controller", kind="node.flapping", object_kind="node",
                          object_id=h.node_id, message="its agent keeps dropping its stream: it stays suspect "
                                                       "(keeps its shards, takes no new ones) until that calms down")
    else:
        repo.record_event(uow.session, actor=h.node_id, kind="node.up", object_kind="node", object_id=h.node_id)
    return True


async def mark_suspect(uow: UnitOfWork, node_id: str, *, session_id: str | None, why: str,
                       unless: Callable[[], bool] = lambda: False) -> bool:
    """The node's stream ended: suspect (keeps its shards, takes no new ones) if it is up and
    `session_id` (None: any) is still its session, and `unless` is false once the row is written
    (its lock held); True if it changed.

    One conditional UPDATE, not a read and then a write: another unit of work may change the node
    in between (the node lifecycle marking it suspect itself, or a newer session's Hello: that
    session owns the node's liveness), and what it wrote is never overwritten. A Hello of the
    same session (the agent reconnecting) leaves the row as the old stream's was, so the UPDATE
    cannot tell it: `unless` does (the hub: the agent is back, its Hello being written or
    written), asked holding the row, so that a Hello committed before is seen and one not
    committed yet commits after. Then nothing is committed."""
    await repo.will_move_generation(uow.session)  # before the node's row (lock order: store/changes.py)
    if not await repo.set_node_health(uow.session, node_id, m.NodeHealth.SUSPECT, was=m.NodeHealth.UP,
                                      session_id=session_id):
        return False
    if unless():
        return False  # rolled back with the unit of work
    await repo.bump_cluster_generation(uow.session, ClusterChange.node(node_id))
    repo.record_event(uow.session, actor="controller", kind="node.suspect", object_kind="node", object_id=node_id,
                      message=why)
    await uow.commit()
    return True


@dataclass(frozen=True, slots=True)
class RefusedReports:
    """Reports one node sent for shards it does not hold (never given it, or taken from it since:
    a node back from a partition reports what was evicted meanwhile), since the last flush."""

    count: int
    # (deployment, replica, shard), the first few; the deployment as TENANT/NAME when the report said the tenant
    samples: tuple[tuple[str, int, int], ...]
    fresh: bool = False  # one names a shard not recorded in its node's window (`agents/reports.py`)


async def record_refused_reports(uow: UnitOfWork, node_id: str, refused: RefusedReports) -> None:
    """An agent spoke about shards that are not its own: one event and one audit entry per node
    per flush (never one per report, which a hostile agent could flood), and of shards already
    recorded at most one a node every `REFUSED_REPEAT_S` (`agents/reports.py`)."""
    data = {"count": refused.count, "samples": [list(k) for k in refused.samples]}
    repo.record_event(
        uow.session, actor=node_id, kind="agent.reports_refused", object_kind="node", object_id=node_id,
        message=f"{refused.count} shard report(s) for shards this node does not hold (never given, or taken "
                f"from it: released, moved, evicted)", data=data,
    )
    await audit.append(uow.session, [audit.AuditRecord(
        actor=node_id, action="agent.reports_refused", outcome="PERMISSION_DENIED", role="node",
        object_kind="node", object_id=node_id, request_id=f"flush-{uuid.uuid4().hex}", detail=data,
    )])


@dataclass(frozen=True, slots=True)
class NodeBeat:
    at: datetime
    power_draw_w: float


STOPPED_WHILE_ASSIGNED = "stopped by its agent while still assigned"


def _judged(placed: m.ShardPhase, report: ShardReport) -> ShardReport | None:
    """What a report says of the placement it applies to, in phase `placed` (None: nothing).

    An agent stops a shard when its set no longer names it, and then the placement is gone (or on
    another node) and the report applies to nothing. A STOPPED that applies is about a shard still
    assigned to that node: the agent stopped it unasked (its process exited, someone stopped it
    by hand) and runs it no more. That is a failure, as a real operator expects of a process that
    exits when it should run (Kubernetes restarts a container that exits 0 with the same back-off
    as one that crashes): FAILED with the agent's message, so the replica is placed again after
    its restart back-off (`domain/restarts.py`), elsewhere first, and counts towards the restart
    limit. Not a STOPPED placement nothing moves again, and not the same set pushed again, which
    would restart at once, without a back-off, a shard that keeps exiting, nothing telling why.
    Except: a placement not taken up yet (ASSIGNED) is left alone, since its STOPPED may answer
    the set that took an earlier placement of the shard away (a gang released and placed again on
    the same node: the report written after the new placement was committed, before the agent got
    the set naming it again); and a FAILED one stays as it failed (its failure counted once, its
    message kept)."""
    if report.phase != m.ShardPhase.STOPPED.value:
        return report
    if placed in (m.ShardPhase.ASSIGNED, m.ShardPhase.FAILED):
        return None
    said = report.message.strip()
    return replace(report, phase=m.ShardPhase.FAILED.value,
                   message=f"{STOPPED_WHILE_ASSIGNED}: {said}" if said else STOPPED_WHILE_ASSIGNED)


def _changes(said: ShardReport | None, state: repo.ShardState, *,
             taken_up: bool = False) -> ShardReport | None:
    """What the report `said` by the placement's node of the placement's deployment (the caller
    looks it up by uid) changes of the placement `state` (None: nothing): it answers the
    placement's generation or a newer one (older reports are stale), and says something else of
    it (`_judged`). `taken_up`: the node said LOADING or RUNNING of this placement in the same
    batch, before `said` (so it is not ASSIGNED any more to it)."""
    if said is None or said.generation < state.generation:
        return None
    placed = m.ShardPhase.LOADING if taken_up and state.phase is m.ShardPhase.ASSIGNED else state.phase
    report = _judged(placed, said)
    if report is None or (state.phase is m.ShardPhase(report.phase) and state.message == report.message):
        return None
    return report


async def flush_reports(
    uow: UnitOfWork, beats: Mapping[str, NodeBeat], reports: Iterable[tuple[str, ShardReport]],
    refused: Mapping[str, RefusedReports] | None = None, *, views: dict[str, DeploymentView] | None = None,
) -> set[str]:
    """Write batched heartbeats, shard reports and refused-report events in one transaction.

    A report is applied only if the shard is still placed on the reporting node and answers the
    placement's generation or a newer one (older reports are stale); a STOPPED one so applied is a
    failure (`_judged`). Every report names its
    tenant (the hub fills it in from what it gave the node). A shard newly FAILED gives its
    deployment a SHARD_FAILED reason with the agent's message (dropped once it runs again) and
    bumps the cluster generation: the reconciler places the replica again after a back-off.
    Returns the keys (TENANT/NAME) of the deployments whose shard phases (and so perhaps their
    phase) changed; `views`, when given, receives their views as committed (what watchers are
    told), built from the columns this transaction read and wrote rather than read again.
    No ORM rows: the placements first as plain columns (most reports repeat what is stored: a
    heartbeat's full state every minute), the shards that reports change written by key in one
    executemany, then the deployments they belong to read with their placements
    (`repo.deployments_named`) and their phases written in another, each only while still in the
    phase read (loading, tracking and flushing those deployments as ORM rows was most of a
    flush's CPU).
    """
    s = uow.session
    # The latest report of each shard from each node: per node, since a shard that moved is
    # reported by both (STOPPED by the node it left, LOADING by the one it went to) and only the
    # placement's node's word counts; kept per shard alone, the other node's report read last hid it.
    # And per deployment uid it says (0: none): a deployment deleted and submitted again under its
    # name has the same shard keys and counts its generations from 0 again; the old one's FAILED
    # failed the new one's shard with the old crash, and its report read last hid the new one's.
    # A placement takes the word of its own deployment's uid, else of a report naming none.
    latest: dict[tuple[str, tuple[str, int, int], int], ShardReport] = {}
    # The newest generation each node said LOADING or RUNNING of each shard in this batch, by the
    # deployment uid it said (0: none): a placement still ASSIGNED as stored was taken up by that
    # node if it answers it.
    taken_up: dict[tuple[str, tuple[str, int, int], int], int] = {}
    for node_id, report in reports:
        if report.phase in _SHARD_PHASES:
            key = (deployment_key(report.tenant, report.deployment), report.replica, report.shard)
            latest[(node_id, key, report.deployment_uid)] = report
            if report.phase in (m.ShardPhase.LOADING.value, m.ShardPhase.RUNNING.value):
                said = (node_id, key, report.deployment_uid)
                taken_up[said] = max(report.generation, taken_up.get(said, report.generation))
    hits: dict[tuple[str, int, int], tuple[repo.ShardState, ShardReport]] = {}  # the reports that change their shard
    for state in await repo.shard_states(s, {key[0] for _, key, _ in latest}) if latest else ():
        place, uids = (state.key, state.replica, state.shard), (state.deployment_id, 0)
        answered = max(taken_up.get((state.node_id, place, uid), -1) for uid in uids)
        said = next(filter(None, (latest.get((state.node_id, place, uid)) for uid in uids)), None)
        report = _changes(said, state, taken_up=answered >= state.generation)
        if report is not None:
            hits[place] = (state, report)
    at = m.utcnow()
    if any(report.phase == m.ShardPhase.FAILED.value for _, report in hits.values()):
        # A shard newly failed moves the generation below: the generation writers' lock before
        # the rows (PostgreSQL's lock order: store/changes.py).
        await repo.will_move_generation(s)
    # Deferred (SQLite): each write goes with the statement or the commit after it, one trip fewer
    # each while the chunk holds the writer (the chunk fails or commits whole: the hub retries it
    # node by node).
    with deferred_writes():
        # The shards first, each only if the report still applies as it is written: on SQLite the write
        # takes the writer's turn (and begins the transaction), so the deployments read next, whose
        # phases are written from that read, are what this transaction commits over; read before it
        # (outside any transaction: the heartbeats are written last), a deletion or a plan commit
        # landing in between was overwritten with a phase computed from the older read.
        await repo.write_reported_shards(s, [
            replace(state, generation=report.generation, phase=m.ShardPhase(report.phase), message=report.message)
            for state, report in hits.values()], at)
        # Locked as read (PostgreSQL): a plan commit that changes their reasons and not their phase
        # (which the write below checks) landing between this read and that write was written over.
        names = {split_deployment_key(k)[1] for k, _, _ in hits}
        named = await repo.deployments_named(s, names, lock=True) if hits else []
        reported = [changed for dep in sorted(named, key=lambda dep: (dep.row.name, dep.row.id))
                    if (changed := _reported(dep, hits)) is not None]
        await repo.write_deployment_phases(
            s, [(r.read.row.id, r.read.row.phase, r.phase, r.reasons) for r in reported if r.moved], at)
        # The nodes after the shards and deployments, as a plan commit writes them, and each table's
        # rows in ascending id, as it locks them (PostgreSQL row locks taken in one order: a flush
        # that locked a node, a shard or a deployment first and a commit that locked another one
        # first waited for each other until one was aborted as a deadlock; store/changes.py).
        if beats:  # one executemany for every node that beat since the last flush
            await repo.write_heartbeats(s, {node_id: (beat.at, beat.power_draw_w) for node_id, beat in beats.items()})
        failed = {r.key: r.failure for r in reported if r.failure is not None}
        if failed:  # the reconciler places the failed replicas again after a back-off (store/failures.py)
            await repo.bump_cluster_generation(s, ClusterChange.placements(failed))
    for node_id, refusal in (refused or {}).items():  # ORM rows (their ids read back): not deferred
        await record_refused_reports(uow, node_id, refusal)
    await uow.commit()
    if views is not None:
        views.update((r.key, r.view(at)) for r in reported)
    return {r.key for r in reported}


@dataclass(frozen=True, slots=True)
class _Reported:
    """A deployment whose shards reports changed: as read after the reports were written
    (`placements`: as they left them), and its phase and reasons that follow."""

    key: str
    read: repo.NamedDeployment
    phase: m.DeploymentPhase
    reasons: list[dict[str, Any]]
    failure: dict[str, Any] | None  # why its latest newly failed shard failed

    @property
    def moved(self) -> bool:
        """Its phase or reasons changed (its row is written, and its time of update with them)."""
        return self.phase is not self.read.row.phase or self.reasons != (self.read.row.reasons or [])

    def view(self, at: datetime) -> DeploymentView:
        """Its view as written `at`."""
        written = {"phase": self.phase, "reasons": self.reasons, "updated_at": at} if self.moved else {}
        return repo.view_as_written(self.read.row, self.read.placements, **written)


def _reported(dep: repo.NamedDeployment,
              hits: Mapping[tuple[str, int, int], tuple[repo.ShardState, ShardReport]]) -> _Reported | None:
    """What the reports `hits` (by deployment key, replica and shard: the placement as judged, the
    report), written already, changed of `dep` as read since (None: nothing)."""
    key = deployment_key(dep.row.tenant_id, dep.row.name)
    placements = sorted(dep.placements, key=lambda p: (p.replica, p.shard))  # a later failure is the latest
    applied = False
    failure: dict[str, Any] | None = None
    for placement in placements:
        hit = hits.get((key, placement.replica, placement.shard))
        if hit is None:
            continue
        judged, report = hit
        if placement.node_id != judged.node_id or (placement.phase.value, placement.message) != (report.phase,
                                                                                                  report.message):
            continue  # moved or placed again before the write: the report did not apply
        applied = True
        if placement.phase is m.ShardPhase.FAILED and judged.phase is not m.ShardPhase.FAILED:
            failure = restarts.failure_reason(placement.replica, placement.shard, judged.node_id, report.message)
    if not applied:
        return None
    row = dep.row
    phase = repo.implied_phase(row, placements)  # the deployment's phase may follow its shards'
    reasons = list(row.reasons or [])
    if failure is not None:
        reasons = restarts.with_failure(reasons, failure)
    elif phase is m.DeploymentPhase.RUNNING and any(r.get("code") == restarts.SHARD_FAILED for r in reasons):
        reasons = [r for r in reasons if r.get("code") != restarts.SHARD_FAILED]
    return _Reported(key, dep, phase, reasons, failure)
