"""The gRPC edge: server assembly, the interceptor chain, thin servicers, protobuf conversion."""
