"""The one interceptor chain every RPC goes through: (load shedding ->) authentication -> metrics ->
logging -> error translation -> audit (`controller/api/auditing.py`: inside the translation, so it
sees a failure before its status is sent; with mTLS the node certificates' check inside it).

- load shedding (`LoadShedInterceptor`, outermost, for the methods it is given: agent Registers):
  a call the controller would refuse anyway for want of room (a join storm) is refused first,
  UNAVAILABLE with a retry time (`retry-after-ms` and google.rpc.RetryInfo), before its request is
  parsed and before any other interceptor runs: no token check, no audit entry, no log line of
  its own (a summary line every `SHED_LOG_EVERY_S`), counted in `maia_grpc_server_shed`. In a
  4,096-node join storm the refusals, each through the whole chain, took the event loop from the
  writes that would have let the agents in. While the controller starts (`refuse_all`: its
  schema checked, its tokens read) every call is refused there the same way, so a client
  meets "starting, call again" with a retry time, not a port that accepts and never answers;

- authentication: the bearer token in the metadata verified (`controller.authn`) and the
  caller's `Principal` (with the call's request id) put into a context variable; a call that
  fails is answered UNAUTHENTICATED here, before any servicer runs. Health checking and
  reflection need no token;
- metrics: each finished RPC counted by method and status code, with its duration (the
  `RpcObserver` given, the controller's metrics);
- logging: one structured line per RPC (method, principal, role, request id, status, milliseconds),
  at the level its status code calls for (`completion.LOG_LEVEL_BY_CODE`);
- errors: the only place where `controller.errors` become gRPC status codes, with the error's
  message verbatim and its structured reasons in trailing metadata (`maia-reason-bin`); anything unexpected becomes INTERNAL with a short message and is logged
  with its traceback.

The package, one concern a module, each importing only those below it (a contract in
pyproject.toml):
- `chain.py`: `interceptor_chain`, the levels in their order, each method's handler built once
  (`BuiltOncePerMethod`);
- `shedding.py`: `LoadShedInterceptor`; `authentication.py`: `AuthenticationInterceptor`;
  `completion.py`: `MetricsInterceptor` and `LoggingInterceptor` (`RpcObserver`, `code_of`);
- `status.py`: `ErrorInterceptor` and the translation it and the others answer with
  (`abort_with`, `status_of`, `status_for`, `as_maia_error`);
- `behaviour.py`: how a level wraps a method's handler (its docstring: a scope around a
  streaming call, a coroutine around a unary one), the tolerant request parsing
  (`MalformedRequest`) and the levels' base class, `_BehaviourInterceptor`.
"""

from controller.api.interceptors.behaviour import (
    MalformedRequest, _BehaviourInterceptor, _LeveledStream, _parsed_stream,
)
from controller.api.interceptors.chain import BuiltOncePerMethod, interceptor_chain
from controller.api.interceptors.completion import SENT_AT_METADATA_KEY, code_of
from controller.api.interceptors.shedding import LoadShedInterceptor
from controller.api.interceptors.status import (
    ErrorInterceptor, _database_unavailable, _transaction_aborted, abort_with, as_maia_error, internal_error,
    reads_only, status_for, status_of,
)

__all__ = [
    "SENT_AT_METADATA_KEY", "BuiltOncePerMethod", "ErrorInterceptor", "LoadShedInterceptor", "MalformedRequest",
    "_BehaviourInterceptor", "_LeveledStream", "_database_unavailable", "_parsed_stream", "_transaction_aborted",
    "abort_with", "as_maia_error", "code_of", "interceptor_chain", "internal_error", "reads_only", "status_for",
    "status_of",
]
