"""The gRPC edge: server assembly, the interceptor chain, thin servicers, protobuf conversion.

`server.py` assembles the whole controller (`ControllerApp`: the database, the hub, the
reconciler, the background loops and the gRPC server); a servicer module a service
(`deployments.py`, `admin.py`, `agents.py`, `audit.py`), `convert.py` protobuf to and from the
domain values, `interceptors/` the chain every call passes through (the audit entry's interceptor
is `auditing.py`), `tls.py` TLS and node certificates, `peers.py` what this controller does on
hearing the other controllers' messages (no RPC of its own).
"""
