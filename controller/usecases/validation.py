"""Small checks shared by the use cases, each raising with a message that names the field."""

from __future__ import annotations

import math
import re

from controller.errors import InvalidArgument

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
NAME_MAX = 63
ID_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
ID_MAX = 128


def check_name(kind: str, name: str) -> None:
    """DNS-label names (deployments): [a-z0-9]([-a-z0-9]*[a-z0-9])?, at most 63 characters."""
    if not name:
        raise InvalidArgument(f"{kind} name is required")
    if len(name) > NAME_MAX:
        raise InvalidArgument(f"{kind} name {name!r} is {len(name)} characters long; at most {NAME_MAX}")
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"{kind} name {name!r} is invalid: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )


def check_id(kind: str, value: str) -> None:
    """Identifiers of tenants, zones, rows, racks and nodes."""
    if not value:
        raise InvalidArgument(f"{kind} id is required")
    if len(value) > ID_MAX:
        raise InvalidArgument(f"{kind} id {value[:20]!r}... is {len(value)} characters long; at most {ID_MAX}")
    if not ID_RE.match(value):
        raise InvalidArgument(
            f"{kind} id {value!r} is invalid: use letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit"
        )


def check_non_negative(field_name: str, value: float | int | None) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{field_name} must be a finite number, got {value}")
    if value < 0:
        raise InvalidArgument(f"{field_name} must be >= 0, got {value:g}")


def check_unique(kind: str, values: list[str] | tuple[str, ...]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise InvalidArgument(f"{kind} {value!r} is listed twice")
        seen.add(value)
