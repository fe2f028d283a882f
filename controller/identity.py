"""Who is calling: the seam for per-tenant authentication and authorization.

The identity interceptor puts the caller's principal (gRPC metadata `x-maia-principal`, default
"anonymous") into a context variable for the duration of one RPC; use cases receive it
explicitly. Today nothing is authenticated; later a verified token replaces the metadata read in
one place (`principal_from_metadata`) and use cases can start checking `principal.name`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from dataclasses import dataclass

PRINCIPAL_METADATA_KEY = "x-maia-principal"
ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    name: str

    @property
    def is_anonymous(self) -> bool:
        return self.name == ANONYMOUS


CONTROLLER = Principal("controller")

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "maia_principal", default=Principal(ANONYMOUS)
)


def principal_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
    """The caller named in the request metadata, or the anonymous principal."""
    for key, value in metadata or ():
        if key.lower() == PRINCIPAL_METADATA_KEY:
            name = value.decode() if isinstance(value, bytes) else value
            name = name.strip()
            if name:
                return Principal(name)
    return Principal(ANONYMOUS)


def current_principal() -> Principal:
    return _current.get()


def set_principal(principal: Principal) -> contextvars.Token[Principal]:
    return _current.set(principal)


def reset_principal(token: contextvars.Token[Principal]) -> None:
    _current.reset(token)
