"""Who is calling: the authenticated principal of one RPC.

The authentication interceptor (`controller.api.interceptors.authentication`) verifies the
caller's bearer token (`controller.authn`) and puts the resulting `Principal` into a context
variable for the duration of the RPC; servicers hand it to the use cases explicitly, and the use
cases ask the policy (`controller.usecases.policy`) what it may do. A principal carries what the
audit log and the policy need: the token it came from, its role, the tenant or node it is bound
to, and the request id of the call.
"""

from __future__ import annotations

import contextvars
import enum
import itertools
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

REQUEST_ID_METADATA_KEY = "x-request-id"
REQUEST_ID_MAX = 64


class Role(str, enum.Enum):
    ADMIN = "admin"                    # everything
    TENANT = "tenant"                  # one tenant's deployments, its contract read-only
    NODE_BOOTSTRAP = "node-bootstrap"  # registers new nodes, nothing else
    NODE = "node"                      # one node's agent: re-register and Connect as that node

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"role {text!r} is not one of {', '.join(r.value for r in cls)}") from None


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `name` is the token's name (or a system name), for logs and audit."""

    name: str
    role: Role = Role.ADMIN
    token_id: str = ""
    tenant: str = ""      # role TENANT: the one tenant it acts for
    node: str = ""        # role NODE: the one node it speaks for; NODE_BOOTSTRAP: the one it may register ("": any)
    request_id: str = ""
    # When its token expires (None: never): an agent stream opened with it ends then (`AgentHub`).
    expires_at: datetime | None = None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def actor(self) -> str:
        """How events name this caller: 'name (role, token id)'."""
        if not self.token_id:
            return self.name
        return f"{self.name} ({self.role.value}, token {self.token_id})"

    def with_request_id(self, request_id: str) -> Principal:
        # Built directly: `dataclasses.replace` looks the fields up again on every call (one per RPC).
        return Principal(name=self.name, role=self.role, token_id=self.token_id, tenant=self.tenant, node=self.node,
                         request_id=request_id, expires_at=self.expires_at)


# The controller itself (reconciler, start-up tasks) and tests that drive use cases directly.
CONTROLLER = Principal("controller", Role.ADMIN)
# Everyone, when the operator turned authentication off with --insecure-no-auth.
INSECURE = Principal("insecure-no-auth", Role.ADMIN)

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("maia_principal", default=None)


class _RequestIds:
    """Request ids unique to this process and, with a 64-bit random prefix drawn at its start (and
    again in a forked child), across processes: 32 hex characters, as `uuid4().hex` was. A counter
    after the prefix costs a formatting per call; `uuid4` read the OS's random source and built a
    UUID object for every RPC. An id names a call in logs and the audit log; nothing relies on it
    being unguessable (the bearer token is the credential)."""

    def __init__(self) -> None:
        self._prefix = ""
        self._count = itertools.count()
        self.restart()

    def restart(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


_request_ids = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.restart)


def new_request_id() -> str:
    return _request_ids.next()


def request_id_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's `x-request-id` (printable, at most 64 characters), or a fresh one."""
    for key, value in metadata or ():
        if key.lower() == REQUEST_ID_METADATA_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            text = text.strip()
            if text and len(text) <= REQUEST_ID_MAX and text.isprintable():
                return text
    return new_request_id()


def current_principal() -> Principal:
    """The principal of the RPC being served; outside an RPC, the controller itself."""
    return _current.get() or CONTROLLER


def peek_principal() -> Principal | None:
    """The principal of the RPC being served, None outside an authenticated RPC."""
    return _current.get()


def set_principal(principal: Principal) -> contextvars.Token[Principal | None]:
    return _current.set(principal)


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    _current.reset(token)
