"""maia-simnode: many simulated node agents in one process (like KWOK), each a real gRPC client.

`agent` is the pure state machine of one node (assignments in, shard reports out, a fake
clock in tests); `protocol` converts it to and from maia.v1 messages; `transport` runs one
agent over its own gRPC channel (register, connect, heartbeat, reconnect), or with
`--shared-channel` over one channel the fleet's agents share, a stream each; `fleet` and `main`
start many of them and shut them down cleanly.
"""
