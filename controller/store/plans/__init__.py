"""Plan → database: the plan applier, one transaction per plan.

The solver works on a `Snapshot` taken at some cluster generation, without holding any lock
(solving takes seconds), so other commits may land meanwhile: another pass or controller, a
node going down, a cordon, a new contract. `commit_plan` takes the generation row's write
lock (commits serialise there), reads the committed state, and turns the plan into its changes
relative to the snapshot it was solved from, replica by replica, the way Nomad's plan applier
re-checks a plan against the state it lands on:
- a replica the plan leaves as the snapshot had it: nothing to write (even if it changed since);
- a replica someone else changed since the snapshot: not written, the next pass decides again;
- a replica the plan removes (preempted, scaled down, retired, lost with its node): removed;
- a replica the plan places or moves: re-checked against the committed state with the
  scheduler's own rules (`store/recheck.py`); one that no longer fits (or a new replica of a template
  replaced since the snapshot) is not written and is re-queued, the rest of the plan commits.
So concurrent plans are safe, and a plan solved from a stale snapshot still lands what holds.
The commit writes new, removed and moved shard rows, deployment phases/reasons/generations,
node assignment generations, events (`deployment.requeued` for what was turned away), and
audit entries for the decisions that place, preempt, remove or move a tenant's work (in the
same transaction: a decision is audited exactly when it is committed). `CommitResult.stale`
and `requeued` tell the caller to solve again.

A commit with a `scope` (deployment keys) speaks only for those deployments: it reads their
rows and placements (one statement), and, for the re-check, only the shards on the racks its
landing replicas touch, or on the nodes they land on when the re-check judges those alone
(`_judged_alone`), with totals of the rest of their rows and tenants where a budget or a quota
needs them (`_read_unread`): a fast pass that decides a few deployments on a cached snapshot
commits at the cost of those deployments, not of the cluster.
Such a commit reads and checks before it takes the lock, and under the lock reads its rows
again: when they and the generation are as before, the check stands (all else it depends on
moves the generation), and the lock is held for the reads and the writes alone. On PostgreSQL it
writes before it takes the lock, and the statement that takes it reads the rows again: when the
generation is as before and the rows are as written, the check stands and the lock is held for
the audit entries and the COMMIT alone; else the writes are undone and the commit goes lock first
(`_commit_locking_last`; also when its INSERT meets the unique key of a shard another commit
placed meanwhile).
On PostgreSQL a commit that takes the generation's row first (unscoped, or fallen back) does so
under the generation writers' advisory lock, exclusive, and one that takes it last under the same
lock, shared (the lock order: store/changes.py); and since agents' reports change shard phases
under no generation lock, one that takes it first reads again the shards of the deployments whose
rows it wrote, and reads and writes again when a report landed in between (`_ReportsSettled`).
`CommitResult.shards` and `requeued` tell such a caller what to apply to its cache.

Plans name solver deployments and replicas (`store/rollout.py`: a rolling update's outgoing
revisions are deployments of their own); the commit maps them back to stored keys with the
snapshot's `PlanKeys`.

Every other writer that changes what the solver reads (a node going down, a cordon, a new or
deleted deployment, a tenant contract) must call `bump_cluster_generation` in its own
transaction, saying what it changed (`domain.changes.ClusterChange`, logged in `cluster_changes`),
so the next pass knows its snapshot is stale and what to read again (`read_changes_since`).

The caller owns the transaction: run both inside one unit of work and `commit()` it.

The package, a module a concern, in the order they import each other (each imports only those
above it):
- `committed`: the committed state a commit reads (`_read_committed`), and the shapes the
  others share (`_Row`, `_where`, `_rows`);
- `neighbours`: what a scoped commit's re-check reads beyond its scope, from the snapshot or
  the database (`_judged_alone`, `_snapshot_neighbours`, `_neighbours`, `_read_unread`);
- `check`: the plan's changes to its snapshot, each placed or moved replica re-checked
  (`_check`, `_plan_changes`, `_recheck`; the rules are store/recheck.py's);
- `writes`: the rows a commit writes, in the lock order (`_write`, `_Writes`);
- `events`: its events and audit entries (`_events`, `_event_rows`: written with the entries, `_decision_records`,
  `preempted_reason`);
- `land`: the changes landed, deployments' phases judged, generation and change log
  (`_land`, `CommitResult`);
- `commit`: `commit_plan`, the order of the reads, the check, the lock and the writes
  (`_commit_locking_last`, `_ReportsSettled`).
"""

from __future__ import annotations

from controller.store.changes import bump_cluster_generation, read_changes_since, will_move_generation
from controller.store.plans.check import CHANGED_SINCE, TEMPLATE_REPLACED
from controller.store.plans.commit import commit_plan
from controller.store.plans.events import preempted_reason
from controller.store.plans.land import CommitResult

__all__ = [
    "CHANGED_SINCE",
    "TEMPLATE_REPLACED",
    "CommitResult",
    "bump_cluster_generation",
    "commit_plan",
    "preempted_reason",
    "read_changes_since",
    "will_move_generation",
]
