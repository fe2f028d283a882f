"""The reconcile loop: snapshot -> solve -> commit -> assign.

Woken by submissions, deletions and node changes (and on an interval as a safety net), one pass
1. skips everything unless the cluster generation moved or deployments arrived since the last
   solve (an idle cluster costs one cheap query per interval, never a solve; submissions leave
   the generation alone so that they never make a plan conflict), or the last solve stopped at its time
   limit with work left unplaced: that pass is retried after a back-off (doubling up to a cap)
   even on an unchanged cluster, or an unlucky time-limited solve would leave work pending
   until something else changed,
2. loads a snapshot, solves it in a worker thread (deployments no change has given a chance
   since they were found unplaceable are left out: `scheduling/queue.py`), and commits the plan
   in one transaction through the plan applier (`store/plans/`): each replica it places is
   re-checked against the committed state, and one that no longer fits is left out and solved
   again after a back-off; if the cluster changed while it solved, what still held is written
   and the cache of what that commit left catches up with the changes in between from the
   change log as deltas (what was turned away, or could be helped, is decided on the warm
   session by the next pass); only when the cache cannot follow them does the pass solve
   again from a fresh snapshot; the commit also releases the shards of DELETING deployments
   and removes their rows,
3. pushes new AssignmentSets to the nodes whose sets changed and publishes deployment events
   (in the background, in commit order: the run loop's next pass does not wait for watchers).
Before step 2, in the unit of work that reads the generation, replicas whose shards an agent
reported FAILED are handled and outgoing replicas whose replacements run are retired (below):
on PostgreSQL under load a pass waits mostly on round trips, so it takes as few transactions
as it can (the log line's `ms=` says where each pass spent its time).
The fast path skips the re-read: while the cached snapshot (`scheduling/cache/`, `warm.py`)
can follow what changed since this controller's own last commit, a pass reads just the new
deployment rows, decides them on a warm `Session` kept with the cached snapshot, and commits
them in one scoped transaction; an arrival the session cannot place gets one more try from the
full solve after `backoff_s` (the back-off; from the cache, which follows its commit), which
parks it if it fails again. Changes by others are read from the change log
(`store/changes.py`): node changes (joins, hellos, cordons, suspects, nodes removed or
resized, evictions: their shards re-placed on the session, committed by the pass; drains),
tenant contracts, the topology, and deployments changed (updates and rollouts, scale downs,
failed shards reported, failed replicas released, replaced replicas retired; an outgoing
replica's node going down; another controller's plan commits: each read again whole, the
shards the view leaves out released by the pass's scoped commit) are
applied to the cache as deltas, and when they could help, the work still short of replicas
(the unschedulable queue's included; a rollout's or a drain's replacements, within the surge)
is decided again on the session; deployments being deleted leave the cache and the session as
departures, their shards and rows removed by the pass's scoped commit. Anything else (a commit
by another controller touching very many deployments, a fast commit that was re-queued, a pass
the lease was lost in) drops the cache and takes the full path above, which leaves a cache of
what it committed for the next changes. A controller leading again (`resync`) solves the whole
cluster once, from the cache it kept when it can catch up with what the leader meanwhile
committed.
Before step 2, replicas whose shards an agent reported FAILED are counted and, once their back-off
is over, released (`store/failures.py`, rules in `domain/restarts.py`): that pass places them
again with the nodes they failed on cordoned for it alone (other nodes first; what finds none
is retried without that after the back-off). The report and the release are deltas (the
release logs the deployments it touched: their shards are read again), so the pass places them
on the warm session (`ClusterCache.decide(avoid=)`), or with the full solve when it takes the
full path.
A `Lease` decides whether this controller may reconcile at all: with several controllers on one
database only the leader does (`controller.leadership`; `AlwaysLeader` alone). The leader's
database is fenced (`Database.fenced`): a pass whose lease was lost meanwhile commits nothing
(`LeaseLost`), and the loop waits until it leads again.

One bad deployment never stalls the others: one beyond today's limits, or one the solver
raises on, is quarantined (`scheduling/quarantine.py`) and the rest solved again.
`consecutive_failures` and `running_for_s()` tell the health monitor whether it is doing its job.

The package, by concern (each module says why it exists):
- `reconciler.py`: the `Reconciler`, its run loop and one pass: the lock, the choice of path;
- `fast_path.py`: the fast path, arrivals and others' changes decided on the warm session;
- `full_path.py`: the full path, the whole cluster solved and committed (and quarantines);
- `pass_state.py`: what both paths share (`PassState`), and what either does after a commit;
- `first_checks.py`: failed replicas released and replaced ones retired before a pass;
- `publishing.py`: what a commit changed, told to watchers in commit order;
- `pacing.py`: when passes start, and the retry back-off of a pass that left work;
- `protocols.py`: the lease, the observer and the outcome of a pass;
- `helpers.py`: small pure helpers (`waits_on_report`, `time_limited`, `PassLaps`, ...).
"""

from controller.reconcile.protocols import NoObserver, ReconcileOutcome, ViewReader
from controller.reconcile.helpers import waits_on_report
from controller.reconcile.publishing import MIN_PUBLISH_RETRY_S
from controller.reconcile.reconciler import Reconciler

__all__ = ["MIN_PUBLISH_RETRY_S", "NoObserver", "ReconcileOutcome", "Reconciler", "ViewReader", "waits_on_report"]
