"""A plan commit's history: its events and the audit entries of its decisions.

`_events` tells what a commit changed (replicas placed, preempted or removed, shards moved, why
replicas were not placed, deployments deleted, replicas the applier turned away); those that
start, stop or move a tenant's work (`AUDITED_DECISIONS`) are audited in the same transaction
(`_decision_records`), so a decision is audited exactly when it is committed. `preempted_reason`
is what a deployment that lost replicas to preemption is told.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from controller.store import audit
from controller.store.models import Event
from controller.store.unnest import InsertRows
from controller.store.recheck import ReplicaKey
from controller.store.snapshot import ShardKey
from controller.store.plans.committed import _Row


def _event_rows(events: list[dict[str, Any]], actor: str, now: datetime) -> InsertRows:
    """The events' rows, written by Core (the ORM's bulk INSERT's per-row bookkeeping costs more
    than the statement) with the commit's audit entries (`audit.append(along=)`)."""
    return InsertRows(Event.__table__, [{**e, "actor": actor, "at": now} for e in events])


def _reason_dicts(reasons: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for r in reasons:
        reason: dict[str, Any] = {"code": r.code, "message": r.message}
        if getattr(r, "scope", None) is not None:
            reason["scope"] = r.scope
        out.append(reason)
    return out


PREEMPTED = "PREEMPTED"


def preempted_reason(replicas: list[int]) -> dict[str, Any]:
    """Why a deployment lost replicas to preemption (no other tenant's names: tenants read it);
    `replicas` kept as data too, for a later preemption to add to (`preempted_before`)."""
    return {"code": PREEMPTED, "scope": "", "replicas": replicas,
            "message": f"replica(s) {replicas} preempted (stopped) for work of higher priority or a tenant's "
                       f"reservation; re-queued: placed again when capacity frees up"}


def preempted_before(reasons: Iterable[dict[str, Any]]) -> set[int]:
    """The replicas an earlier preemption's reason names (none for a reason stored without them)."""
    return {int(r) for reason in reasons if reason.get("code") == PREEMPTED for r in reason.get("replicas") or ()}


# Placement decisions that start, stop or move a tenant's work: audited with the plan commit.
AUDITED_DECISIONS = frozenset({"deployment.placed", "deployment.preempted", "deployment.replicas_removed",
                               "shard.moved", "shard.placed"})


def _decision_records(events: list[dict[str, Any]], tenants: dict[str, str], actor: str) -> list[audit.AuditRecord]:
    """The audit entries of one commit's decisions; one request id ties them together."""
    request_id = f"plan-{uuid.uuid4().hex}"
    return [
        audit.AuditRecord(actor=actor, role="controller", tenant=tenants.get(e["object_id"], ""), action=e["kind"],
                          object_kind=e["object_kind"], object_id=e["object_id"], request_id=request_id,
                          detail={"message": e["message"], **e["data"]})
        for e in events if e["kind"] in AUDITED_DECISIONS
    ]


def _events(
    current: dict[ShardKey, _Row],
    final: dict[ShardKey, str],
    deletes: list[_Row],
    updates: list[tuple[_Row, Any]],
    preempted: dict[str, set[int]],
    unplaced: dict[str, Any],
    reasons_told: set[str],
    deleted_deployments: set[str],
    requeued: dict[ReplicaKey, tuple[str, ...]],
    released: Iterable[_Row] = (),
) -> list[dict[str, Any]]:
    """The history of this commit: placed/removed replicas, moved shards, shards placed again
    into a running replica, new 'why not's, replicas the applier turned away. `released`: shards
    the view left out (`current` holds none of them); a replica none of whose shards is left is
    removed (one placed again under its number is a placement, as it was before)."""
    before: dict[str, set[int]] = defaultdict(set)
    for name, replica, _ in current:
        before[name].add(replica)
    after: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for (name, replica, _), node in final.items():
        after[name][replica].add(node)
    for row in released:
        name, replica, _ = row.key
        if replica not in after.get(name, {}):
            before[name].add(replica)
    events: list[dict[str, Any]] = []

    def add(kind: str, name: str, message: str, data: dict[str, Any]) -> None:
        events.append({"kind": kind, "object_kind": "deployment", "object_id": name, "message": message, "data": data})

    for name in sorted(set(before) | set(after)):
        placed = sorted(set(after.get(name, {})) - before.get(name, set()))
        if placed:
            nodes = sorted(set().union(*(after[name][r] for r in placed)))
            add("deployment.placed", name, f"placed replicas {placed} on {', '.join(nodes)}",
                {"replicas": placed, "nodes": nodes})
        removed = sorted(before.get(name, set()) - set(after.get(name, {})))
        by_preemption = [r for r in removed if r in preempted.get(name, ())]
        otherwise = [r for r in removed if r not in preempted.get(name, ())]
        if by_preemption:
            add("deployment.preempted", name,
                f"preempted replicas {by_preemption}: stopped for work of higher priority or a tenant's "
                f"reservation; re-queued", {"replicas": by_preemption})
        if otherwise:
            # Left unplaced by this plan: say its first reason (min_replicas not reachable, ...).
            why = _reason_dicts(unplaced[name].reasons)[:1] if name in unplaced else []
            add("deployment.replicas_removed", name,
                f"replicas {otherwise} are no longer placed: {why[0]['message']}" if why else
                f"replicas {otherwise} are no longer placed (node down, scaled down or not placeable again)",
                {"replicas": otherwise})
    for row, pl in updates:
        name, replica, shard = row.key
        if pl.node != row.node:
            add("shard.moved", name, f"moved replica {replica} shard {shard} from {row.node} to {pl.node}",
                {"replica": replica, "shard": shard, "from": row.node, "to": pl.node})
    # Shards placed into a replica that ran before the commit: those its node lost before the plan
    # was committed (the node deleted, or registered again without room for them: their rows went
    # then), placed again beside the replica's other shards. Neither a new replica nor a move.
    refilled: dict[tuple[str, int], dict[int, str]] = defaultdict(dict)
    for key, node in final.items():
        name, replica, shard = key
        if key not in current and replica in before.get(name, ()):
            refilled[(name, replica)][shard] = node
    for (name, replica), shards in sorted(refilled.items()):
        nodes = sorted(set(shards.values()))
        add("shard.placed", name, f"placed replica {replica} shard(s) {sorted(shards)} again on {', '.join(nodes)} "
                                  "(their node lost them; the replica's other shards kept)",
            {"replica": replica, "shards": sorted(shards), "nodes": nodes})
    for name in sorted(reasons_told & set(unplaced)):
        u = unplaced[name]
        reasons = _reason_dicts(u.reasons)
        add("deployment.unplaceable", name,
            f"{u.replicas} replica(s) not placed: " + "; ".join(r["message"] for r in reasons),
            {"replicas": u.replicas, "reasons": reasons})
    for name in sorted(deleted_deployments):
        shards = sum(1 for row in deletes if row.key[0] == name)
        add("deployment.deleted", name, f"deleted; {shards} shard(s) released", {"shards": shards})
    turned_away: dict[str, dict[int, tuple[str, ...]]] = defaultdict(dict)
    for (name, replica), why in requeued.items():
        turned_away[name][replica] = why
    for name in sorted(turned_away):
        replicas = sorted(turned_away[name])
        why = [turned_away[name][r][0] for r in replicas]
        add("deployment.requeued", name,
            f"replicas {replicas} no longer fit where the plan put them ({why[0]}); placed again by the next pass",
            {"replicas": replicas, "why": why})
    return events
