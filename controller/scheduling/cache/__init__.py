"""The reconciler's warm cluster: the last snapshot, kept current from its own commits, and a
warm `scheduler.session.Session` built from it.

Reading the whole cluster into a problem document and building the solver's indexes from it
costs hundreds of milliseconds at 4,096 nodes; deciding one arrival on a warm session costs
milliseconds. So while nobody else changes the cluster (the generation is the one this
controller's last commit left) and a pass only meets arrivals, the reconciler:

1. reads only the deployments stored since (`snapshot.load_arrivals`: primary key above the
   last one seen; a count compare catches keys committed out of order) and adds them to the
   cached snapshot, exactly as `load_snapshot` would have read them;
2. decides them one by one with `Session.place` (in one worker thread call: `decide`), each
   arrival whole, and turns the decisions into one `Plan` speaking for them alone (its scope
   for `commit_plan(scope=)`: the decided deployments and the victims of their preemptions);
3. after the commit, applies the decisions' placements to the cached snapshot (`committed`),
   which then again equals what `load_snapshot` would read (tests compare the two).
A full solve may start from the cache too while it is valid (the back-off's retry of what the
session could not place): its commit is scoped to what it changed (`scope_of`) and the cache
follows what it wrote (`follow`: `CommitResult.shards` applied to the snapshot, and to the
session through `Session.adopt`).

A fast plan that preempted (or that placed more replicas of a deployment already holding some)
is followed the same way. A full solve from a fresh read leaves a cache too (`settled`: its
snapshot with what the commit wrote), so that changes by others can be followed from there.

Changes by others reach the cache through the change log (`store/changes.py`, read by
`warm.py`): node changes (a join, a node coming up or going suspect, a cordon, a new label or
capacity, a node removed) are read as those node rows and applied to the snapshot and to the
session as one `ClusterDelta` (`apply_nodes`). A node holding shards whose work is evicted is
one too: the session re-places its shards (`Session.apply` repairs them as `solve()` would) and
the next fast plan commits that, speaking for those deployments whole (`repairs`). A node
holding shards drained (or no longer drained), going down while holding a replica being
replaced, removed or resized is one too (`reread`): the deployments holding shards there are
read again whole before the node changes are applied (the view drops an outgoing replica on an
evicted node, which the session must not re-place, or keeps an older revision's there for the
solver to place again while its deployment is short without it: `solver_view`; a node's removal
or a registration with fewer accelerators released its shards there, and the session,
rebuilding its indexes for the node change, completes what is left of their replicas beside
their gangs as `solve()` does: repairs).
Deployments whose change log names them (`apply_deployments`: updated, scaled up, rolled; a
failure reported; failed replicas released by `store/failures.py`; replaced replicas retired by
`store/rollout.py`; placed, moved, preempted or removed by another controller's plan commit,
which names what it touched) are read again whole, as `load_snapshot` lists them (their current revision
and the outgoing revisions of a rollout or a drain, `solver_view`), and take the place of what
the cache held of them; what that leaves short of replicas (a replacement within the surge, a
replica released) is decided by the next fast plan, which speaks for the deployment whole, its
outgoing replicas included. Released replicas are decided with the nodes they failed on
cordoned for that plan alone (`decide(avoid=)`). A deployment whose read leaves shards out (a
scale down's replicas beyond the count, an outgoing replica on an evicted node) is one too: the
shards go to the snapshot's `released`, and the next fast plan speaks for it whole, so that its
scoped commit releases them (`releasing`). One another controller placed before this cache read
it is added where `load_snapshot` lists it (`_adopt`; the arrivals read later skip it). One
quarantined is not. A stale commit of
a full solve leaves a cache too (`settled` or `follow` at its snapshot's generation), which
catches up with the changes in between like any other.
Deployments being deleted are departures (`depart`): taken out of the snapshot and the session,
and named by the next commit's scope and `Snapshot.deleting`, which releases their shards and
removes their rows. When changes could help (a node added or ready, a departure), the
deployments still short of replicas are decided again on the session (`pending_docs`). Anything
else (a re-queued fast commit; another kind of change: a commit by another controller touching
more than `plans.land.LOGGED_DEPLOYMENTS_MAX` deployments, which names none; a pass the lease was lost
in) drops the cache; the reconciler takes its full path. The cache never undoes a
decision: it is rebuilt instead. A cache is driven by one owner (the reconcile loop, which holds its lock); `build`,
`decide`, `scope_of` and `follow` run in a worker thread, never two at once. The session may live
in the decide process (`decider.py`: `build(open_session=DecideProcess.open)`), with the same
decisions: every call that touches it blocks, so none runs on the event loop.

The package, one concern a module, each importing only those below it (a contract in
pyproject.toml):
- `cluster.py`: `ClusterCache`, the state the cache keeps and what each call moves of it (the
  generation a change or a commit leaves, the keys read, the repairs, whether the session may
  hold work short of replicas), and how it is built (`build`, `settled`);
- `changes.py`: others' changes as the change log names them, written into the snapshot and the
  session (`apply_nodes`, `apply_tenants`, `apply_topology`, `depart`, `apply_deployments`), and
  which node changes need their deployments read again first (`reread`);
- `arriving.py`: the deployments stored since, added to the snapshot and counted (`add`,
  `unaccounted`, `pending_since`); `deciding.py`: a pass's decisions as one `FastPlan` (`decide`);
- `commits.py`: what a commit leaves the snapshot (`committed`, `follow`, `settled`, `scope_of`,
  `releasing`).
"""

from controller.scheduling.cache.cluster import ClusterCache
from controller.scheduling.cache.deciding import FastPlan

__all__ = ["ClusterCache", "FastPlan"]
