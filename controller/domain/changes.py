"""What a cluster generation bump changed: the change log the reconciler's warm cache reads.

Every writer that changes what the solver reads moves the cluster generation
(`store.plans.bump_cluster_generation`) and says what it changed, in the same transaction
(rows of `cluster_changes`). A reconciler whose cache was valid at an older generation reads
the changes since: node changes it applies to its cache as deltas; anything else, or a
generation with no change logged (pruned, or written by an older controller), makes it read the
whole cluster again. The log lives in the database, not in one process, so a second controller
(HA) sees the changes the first one made.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class ChangeKind(enum.StrEnum):
    NODE = "node"                       # nodes (ids) registered, up, suspect, down, cordoned, drained, removed
    DEPLOYMENT_DELETED = "deployment_deleted"  # deployments (keys TENANT/NAME) marked DELETING
    DEPLOYMENT = "deployment"           # deployments (keys) updated, quarantined, or released by a submit of the name
    PLACEMENTS = "placements"           # deployments (keys) whose placements a plan commit or another writer changed
    TENANT = "tenant"                   # tenants (ids) created, changed, removed
    TOPOLOGY = "topology"               # zones, rows, racks
    OTHER = "other"                     # anything else (the reader takes the whole-cluster path)


@dataclass(frozen=True, slots=True)
class ClusterChange:
    """What one generation bump changed: a kind and the ids of the objects it concerns."""

    kind: ChangeKind = ChangeKind.OTHER
    ids: tuple[str, ...] = ()

    @classmethod
    def nodes(cls, ids: Iterable[str]) -> ClusterChange:
        return cls(ChangeKind.NODE, tuple(sorted(set(ids))))

    @classmethod
    def node(cls, node_id: str) -> ClusterChange:
        return cls(ChangeKind.NODE, (node_id,))

    @classmethod
    def deployment_deleted(cls, *keys: str) -> ClusterChange:
        return cls(ChangeKind.DEPLOYMENT_DELETED, tuple(sorted(set(keys))))

    @classmethod
    def deployment(cls, key: str) -> ClusterChange:
        return cls(ChangeKind.DEPLOYMENT, (key,))

    @classmethod
    def placements(cls, deployments: Iterable[str] = ()) -> ClusterChange:
        return cls(ChangeKind.PLACEMENTS, tuple(sorted(set(deployments))))

    @classmethod
    def tenant(cls, tenant_id: str) -> ClusterChange:
        return cls(ChangeKind.TENANT, (tenant_id,))

    @classmethod
    def topology(cls) -> ClusterChange:
        return cls(ChangeKind.TOPOLOGY)

    @classmethod
    def other(cls) -> ClusterChange:
        return cls(ChangeKind.OTHER)
