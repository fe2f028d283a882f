"""Live agent sessions: one Connect stream per node, assignment pushes, liveness, batched reports.

A package so that the hub can be split by concern; the design is described in `hub.py`.
"""

from controller.agents.hub import NODE_DELETED, AgentHub, _Batch
from controller.agents.session import (
    AgentInbound, AgentOutbound, AgentSession, HeartbeatPolicy, HubObserver, ShardStateRequest,
)
from controller.aio import Wakeup  # imported from here by tests (it was a name of the old module)

__all__ = [
    "NODE_DELETED", "AgentHub", "AgentInbound", "AgentOutbound", "AgentSession", "HeartbeatPolicy",
    "HubObserver", "ShardStateRequest", "Wakeup", "_Batch",
]
