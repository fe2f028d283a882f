"""The types a reconcile pass is told and tells: the lease it asks, the observer it reports to
and the outcome of one pass. Kept apart so the API and the metrics can name them without
importing the loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from controller.scheduling.queue import QueueDepths
from controller.store.db import UnitOfWork
from controller.domain.values import DeploymentView


class Lease(Protocol):
    def should_run(self) -> bool: ...


class ReconcileObserver(Protocol):
    """What the loop reports as it goes (the metrics implement it)."""

    def solved(self, status: str, seconds: float) -> None: ...

    def plan_conflict(self) -> None: ...

    def requeued(self, replicas: int) -> None: ...

    def failed_replicas_released(self, replicas: int) -> None: ...

    def placed(self, latencies_s: Iterable[float]) -> None: ...

    def queue_depths(self, depths: QueueDepths) -> None: ...

    def nominated(self, nodes: int) -> None: ...

    def pass_taken(self, path: str) -> None: ...


class NoObserver:
    def solved(self, status: str, seconds: float) -> None:
        pass

    def plan_conflict(self) -> None:
        pass

    def requeued(self, replicas: int) -> None:
        pass

    def failed_replicas_released(self, replicas: int) -> None:
        pass

    def placed(self, latencies_s: Iterable[float]) -> None:
        pass

    def queue_depths(self, depths: QueueDepths) -> None:
        pass

    def nominated(self, nodes: int) -> None:
        pass

    def pass_taken(self, path: str) -> None:
        pass


class AlwaysLeader:
    """The single-controller lease: always the leader."""

    def should_run(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class ReconcileOutcome:
    solved: bool = False
    generation: int = 0
    conflicts: int = 0
    changed_nodes: frozenset[str] = frozenset()
    changed_deployments: frozenset[str] = frozenset()
    deleted: tuple[str, ...] = ()
    # Seconds until a pass is solved again although nothing changed (None: no retry): it was
    # time-limited with work left, or the plan applier turned replicas away.
    retry_in_s: float | None = None


# Reads the views of deployments by key (TENANT/NAME) in a unit of work (`usecases.deployments.views_of`).
ViewReader = Callable[[UnitOfWork, set[str]], Awaitable[list[DeploymentView]]]
