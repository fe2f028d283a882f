"""The reconciler's warm cluster: the last snapshot, kept current from its own commits, and a
warm `scheduler.session.Session` built from it.

A package so that the cache can be split by concern; the design is described in `cluster.py`.
"""

from controller.scheduling.cache.cluster import ClusterCache, FastPlan

__all__ = ["ClusterCache", "FastPlan"]
