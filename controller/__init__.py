"""maia-controller: the gRPC API, persistence and reconciliation around the `scheduler` library.

Its layers, each importing only those below it (the import-linter contracts in pyproject.toml):
`main` (the process) -> `api/` (the gRPC server, its interceptors and thin servicers; `server.py`
assembles the whole controller) -> the runtime services it wires (`agents/` the node agents'
streams, `reconcile/` the reconcile loop, `console/`, `observability/`, `watchdog.py`,
`retention.py`, `leadership.py`, `nodelifecycle.py`, `health.py`, `authn.py`, `config.py`,
`gateway/`, ...) ->
`scheduling/` (the reconcile loop's warm cache, session and queue) -> `usecases/` (the business
rules) -> `store/` (every write to the database) -> `domain/` (plain values and rules) -> the
leaf modules everyone shares (`errors.py`, `limits.py`, `aio.py`, ...). `cli/` (maiactl) and
`simnode/` (maia-simnode) reach the controller only over gRPC.
"""
