"""What use cases may ask of the running controller after they commit.

A use case that changes placement-relevant state wakes the reconciler, tells live agents that
their assignment sets changed, and publishes deployment events for watchers; revoking tokens
makes every controller forget their cached verifications and end the agent streams they opened
(this one as it is told, the others as they hear of it). These are
fire-and-forget signals behind one small protocol, so use cases stay testable with
`RecordingSignals` and never import the reconciler or the agent hub.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from controller.domain.values import DeploymentEvent


class Signals(Protocol):
    def wake_reconciler(self) -> None: ...

    def assignments_changed(self, node_ids: Iterable[str]) -> None: ...

    def publish(self, *events: DeploymentEvent) -> None: ...

    def tokens_revoked(self, token_ids: Sequence[str]) -> None: ...

    def node_removed(self, node_id: str) -> None: ...


@dataclass
class RecordingSignals:
    """A `Signals` that remembers what it was told (tests, and tools without a server)."""

    wakes: int = 0
    nodes: set[str] = field(default_factory=set)
    events: list[DeploymentEvent] = field(default_factory=list)
    revoked_tokens: list[str] = field(default_factory=list)
    removed_nodes: list[str] = field(default_factory=list)

    def wake_reconciler(self) -> None:
        self.wakes += 1

    def assignments_changed(self, node_ids: Iterable[str]) -> None:
        self.nodes.update(node_ids)

    def publish(self, *events: DeploymentEvent) -> None:
        self.events.extend(events)

    def tokens_revoked(self, token_ids: Sequence[str]) -> None:
        self.revoked_tokens.extend(token_ids)

    def node_removed(self, node_id: str) -> None:
        self.removed_nodes.append(node_id)
