"""Agent gateways: processes that terminate the agents' gRPC calls and relay them to the controller.

Opt-in (`maia-controller --agent-gateways N --agent-listen HOST:PORT`). Every heartbeat, report
and set push on an agent's Connect stream is one gRPC message, and gRPC aio's and asyncio's own
work per message (~60-120 us) ran on the controller's one interpreter. A gateway serves
NodeAgentService (Register, Connect) on `--agent-listen` (N gateways share the port with
SO_REUSEPORT) and relays every call to the controller over one bidirectional stream on a unix
socket (`proto/maia/v1/relay.proto`), many calls' messages a frame (`frames.Outbox`).

What stays in the controller: everything that decides. Each relayed call is served by the
controller's own NodeAgentService through its own interceptor chain (`relay.RelayServicer`), so
the agent's bearer token is verified there, and the hub's liveness, pacing, reports, sets,
admission, revocation and HA answers are today's. The database writes stay in the controller's
process (SQLite has one writer: `store/turns.py`). A gateway holds no credential and keeps no state
but its open calls; its link ending ends them all (the controller judges their nodes as for lost
connections) and the gateway exits.

- `frames`: the frame batching both ends use, the link's pings, and metadata/status conversions.
- `relay`: the controller's end (a relayed call's context, the AgentRelay servicer).
- `process`: the gateway process (`python -m controller.gateway`).
- `children`: the controller starting and stopping its gateways.
- `linkdir`: the private directory of the links' socket, and the removal of those left behind.
"""
