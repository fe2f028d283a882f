"""Failed accelerators: what a node's agent says in its heartbeats (`Heartbeat.failed_accelerators`).

A real server loses one accelerator far more often than it loses itself (an uncorrectable memory
error, a link down, a device that stops answering); cordoning the node for it would idle the
others. The agent lists every failed accelerator of its node in each heartbeat; when the list
changes, the hub (`controller/agents/faults.py`) hands it to `record_faults`, which in one
transaction:
- stores it on the node (`nodes.failed_accelerators`; NULL: none), which the solver reads as
  the node's `unhealthy_accelerators`: no shard is placed on one;
- releases the shards placed on an accelerator that failed (they leave the node's assignment
  set, so its agent stops them; their replicas are placed again, as after a down node's
  eviction, not counted as the deployment's failures);
- records `node.accelerator_failed` and `node.accelerator_recovered` events, and moves the
  cluster generation (the node changed) so the reconciler and the warm session see it.
A repaired accelerator leaves the list and takes shards again. Only the node's current session
speaks for it: a list from a superseded stream changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controller.domain.changes import ClusterChange
from controller.domain.values import AcceleratorFault
from controller.store import repositories as repo
from controller.store.db import UnitOfWork


@dataclass(frozen=True, slots=True)
class FaultsRecorded:
    """What `record_faults` changed: the accelerators that failed and recovered, the shards it
    released ([TENANT/NAME, replica, shard]), and the indices it ignored (the node has no such
    accelerator). Nothing failed or recovered: at most a reason changed (no event, the solver's
    view unchanged)."""

    failed: tuple[int, ...]
    recovered: tuple[int, ...]
    released: tuple[list[object], ...] = ()
    ignored: tuple[int, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether which accelerators work changed (what the solver and the node's set see)."""
        return bool(self.failed or self.recovered)


async def record_faults(uow: UnitOfWork, node_id: str, session_id: str,
                        faults: Sequence[AcceleratorFault]) -> FaultsRecorded | None:
    """Store `faults` as node `node_id`'s failed accelerators, said by its agent on the stream of
    `session_id` (an index the node does not have is ignored, and said so); None when the node is
    gone or the session no longer its own, or nothing is to be said (the same list stored)."""
    row = (await repo.node_rows_by_id(uow.session, [node_id])).get(node_id)
    if row is None or row.session_id != session_id:
        return None
    ignored = tuple(sorted(f.index for f in faults if not 0 <= f.index < row.accelerators))
    stored = repo.stored_faults(row.failed_accelerators)
    # Of the accelerators it has: one registered since with fewer lost the others, which are
    # neither repaired (no event) nor to come back failed were it to register larger again.
    before = {f.index: f.reason for f in stored if f.index < row.accelerators}
    now = {f.index: f.reason for f in faults if 0 <= f.index < row.accelerators}
    if now == before and len(stored) == len(before):
        return FaultsRecorded((), (), ignored=ignored) if ignored else None
    failed = tuple(sorted(set(now) - set(before)))
    recovered = tuple(sorted(set(before) - set(now)))
    if not failed and not recovered:  # the reasons alone, or what it no longer has: no one's view changes
        repo.set_failed_accelerators(row, [AcceleratorFault(i, now[i]) for i in sorted(now)])
        await uow.commit()
        return FaultsRecorded((), (), ignored=ignored)
    # The generation writers' lock before any row, then the placements, then the node's row
    # (PostgreSQL's lock order: store/changes.py, as a Register that shrinks a node).
    await repo.will_move_generation(uow.session)
    released: dict[str, list[list[object]]] = {}
    if failed:
        usable = set(range(row.accelerators)) - set(now)
        released = await repo.release_placements_off(uow.session, {node_id: usable})
    repo.set_failed_accelerators(row, [AcceleratorFault(i, now[i]) for i in sorted(now)])
    shards = tuple(released.get(node_id, ()))
    for index in failed:
        repo.record_event(uow.session, actor=node_id, kind="node.accelerator_failed", object_kind="node",
                          object_id=node_id, data={"index": index, "reason": now[index]},
                          message=f"accelerator {index} failed ({now[index] or 'no reason given'}): it takes no "
                                  f"shard until its agent says it works again")
    if shards:
        repo.record_event(uow.session, actor=node_id, kind="node.placements_released", object_kind="node",
                          object_id=node_id, data={"shards": list(shards)},
                          message=f"accelerator(s) {', '.join(map(str, failed))} failed: {len(shards)} shard(s) "
                                  f"on them are placed again")
    for index in recovered:
        repo.record_event(uow.session, actor=node_id, kind="node.accelerator_recovered", object_kind="node",
                          object_id=node_id, data={"index": index},
                          message=f"accelerator {index} works again: it takes shards")
    await repo.bump_cluster_generation(uow.session, ClusterChange.nodes([node_id]))
    await uow.commit()
    return FaultsRecorded(failed, recovered, shards, ignored)
