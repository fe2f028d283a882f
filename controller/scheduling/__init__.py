"""What the reconciler keeps between passes to schedule without re-reading the cluster.

- `cache.ClusterCache` (`cache/`, a module a concern): the last snapshot, kept current from this
  controller's own commits and from others' node changes and deletions (deltas, departures), and
  a warm `scheduler.session.Session` built from it; a pass reads the new deployment rows, decides
  them on the session and commits them in one transaction;
- `warm.WarmCluster`: when that cache may be used (the generation its own last commit left, or
  the one it caught up to from the change log, `store/changes.py`), how it is built and fed from
  the database, and what each commit leaves it;
- `queue.SchedulingQueue`: kube-scheduler's active / back-off / unschedulable queues: what the
  session cannot place gets one more try from the full solve, then waits, out of later solves,
  until a change could help it;
- `nominations.Nominations`: nodes kept for the deployments waiting longest for room others hold,
  one a zone (head-of-line nominations), so that a gang is not starved by a stream of smaller
  arrivals;
- `quarantine.Quarantine`: deployments beyond today's limits or that the solver fails on are
  taken out, so that one bad deployment never stalls the others;
- `decider.DecideProcess`: the warm session in a process of its own (the default,
  `--decide-process`), so its decisions do not share the event loop's GIL;
- `own_loop.OwnLoop`: the reconcile loop on a thread with an event loop of its own, only when
  asked (`Reconciler(own_thread=True)`: tests and measurements; no controller default uses it).
"""
