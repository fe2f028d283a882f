"""NodeAgentService: Register, and the Connect stream (Hello first, then reports; sets go out).

The conversation itself lives in `controller.agents.AgentHub`; this servicer only converts
messages (the hub's sets, state requests and heartbeat intervals to `ControllerMessage`s) and
checks that a stream starts with a Hello (whose stated heartbeat interval the hub judges the
stream by), within `limits.HELLO_TIMEOUT_S` of its opening, from a caller some Hello could admit
(refused before any read otherwise). Agents talk to the leader only: a
follower answers UNAVAILABLE with the leader's address in the `maia-leader` trailing metadata.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from grpc import aio

from controller import limits
from controller.api import convert
from controller.api.deps import ServiceDeps
from controller.errors import FailedPrecondition, InvalidArgument
from controller.identity import current_principal
from controller.agents import AgentInbound, AgentOutbound, HeartbeatPolicy, ShardStateRequest
from controller.usecases import agents as agent_cases
from maia.v1 import agent_pb2, agent_pb2_grpc

# The full method name of Register (its calls may be shed before the interceptor chain: server.py).
REGISTER_METHOD = f"/{agent_pb2.DESCRIPTOR.services_by_name['NodeAgentService'].full_name}/Register"
_SHARD_STATE_REQUEST = agent_pb2.ControllerMessage(shard_state_request=agent_pb2.ShardStateRequest())


def _outbound(item: AgentOutbound) -> agent_pb2.ControllerMessage:
    if isinstance(item, ShardStateRequest):
        return _SHARD_STATE_REQUEST
    if isinstance(item, HeartbeatPolicy):
        return agent_pb2.ControllerMessage(
            heartbeat_policy=agent_pb2.HeartbeatPolicy(heartbeat_interval_ms=item.interval_ms))
    return convert.assignment_set_msg(item)


def _inbound(message: agent_pb2.AgentMessage) -> AgentInbound | None:
    """What the hub judges of a message after the Hello (None: a repeated Hello or an unknown
    body carries nothing to act on)."""
    body = message.WhichOneof("body")
    if body == "heartbeat":
        return convert.heartbeat_report(message.heartbeat)
    if body == "shard_status":
        return convert.shard_report(message.shard_status)
    return None


class NodeAgentServicer(agent_pb2_grpc.NodeAgentServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._deps = deps

    async def Register(self, request: agent_pb2.RegisterRequest,
                       context: aio.ServicerContext) -> agent_pb2.RegisterResponse:
        self._deps.require_leader()
        registered = await self._deps.hub.register(current_principal(), convert.node_info(request.node),
                                                   credential_proposal=request.credential_proposal,
                                                   time_left_s=context.time_remaining())
        if registered.revoked:
            self._deps.signals.tokens_revoked(registered.revoked)
        self._deps.signals.wake_reconciler()
        return convert.registration_msg(registered.registration)

    async def Connect(self, request_iterator: AsyncIterator[agent_pb2.AgentMessage],
                      context: aio.ServicerContext) -> AsyncIterator[agent_pb2.ControllerMessage]:
        self._deps.require_leader()
        agent_cases.check_connect(current_principal())  # a caller no Hello could admit: before any read
        messages = request_iterator.__aiter__()
        try:
            async with asyncio.timeout(limits.HELLO_TIMEOUT_S):
                first = await messages.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise InvalidArgument(f"the first message on Connect must be Hello (node_id, session_id); none came "
                                  f"within {limits.HELLO_TIMEOUT_S:g} s") from None
        if first.WhichOneof("body") != "hello":
            raise FailedPrecondition("the first message on Connect must be Hello (node_id, session_id)")
        outbound = self._deps.hub.converse(current_principal(), first.hello.node_id, first.hello.session_id,
                                           messages, _inbound,
                                           heartbeat_interval_ms=first.hello.heartbeat_interval_ms)
        try:
            async for item in outbound:
                yield _outbound(item)
        finally:
            await outbound.aclose()
