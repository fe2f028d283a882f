"""Small checks shared by the use cases, each raising with a message that names the field.

Every bound comes from `controller.limits`; a message names the field and the limit and
quotes the caller's value only through `quoted` (truncated), so an error never echoes a whole
input back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sized

from controller import limits
from controller.errors import InvalidArgument

NAME_RE = re.compile(limits.NAME_PATTERN)
NAME_MAX = limits.NAME_MAX
ID_RE = re.compile(limits.ID_PATTERN)
ID_MAX = limits.ID_MAX
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")
_CONTROL_RE = re.compile(limits.CONTROL_CHARACTERS)


def quoted(value: object, limit: int = limits.QUOTED_VALUE_MAX) -> str:
    """`repr(value)`, cut to `limit` characters with the full length said, for error messages."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:limit]}...{size}"


def check_name(kind: str, name: str) -> None:
    """DNS-label names (deployments): [a-z0-9]([-a-z0-9]*[a-z0-9])?, at most 63 characters."""
    if not name:
        raise InvalidArgument(f"{kind} name is required")
    if len(name) > NAME_MAX:
        raise InvalidArgument(f"{kind} name {quoted(name)} is {len(name)} characters long; at most {NAME_MAX}")
    if not NAME_RE.fullmatch(name):  # fullmatch: `$` matches before a final newline too
        raise InvalidArgument(
            f"{kind} name {quoted(name)} is invalid: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )


def check_id(kind: str, value: str) -> None:
    """Identifiers of tenants, zones, rows, racks and nodes."""
    if not value:
        raise InvalidArgument(f"{kind} id is required")
    if len(value) > ID_MAX:
        raise InvalidArgument(f"{kind} id {quoted(value, 20)} is {len(value)} characters long; at most {ID_MAX}")
    if not ID_RE.fullmatch(value):
        raise InvalidArgument(
            f"{kind} id {quoted(value)} is invalid: use letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit"
        )


def check_tenant_id(value: str) -> None:
    """A tenant id: an id short enough that `TENANT/NAME` (a deployment's key, see
    `domain.deployment_key`) stays within the interchange format's 128-character ids."""
    check_id("tenant", value)
    if len(value) > limits.TENANT_ID_MAX:
        raise InvalidArgument(
            f"tenant id {quoted(value, 20)} is {len(value)} characters long; at most {limits.TENANT_ID_MAX}")


def check_optional_id(kind: str, value: str) -> None:
    """A filter or reference that may be empty (meaning "all" or "none")."""
    if value:
        check_id(kind, value)


def check_text(field_name: str, value: str, max_len: int) -> None:
    """Free text (hostnames, models, messages): at most `max_len` characters, no control characters."""
    if len(value) > max_len:
        raise InvalidArgument(f"{field_name} is {len(value)} characters long; at most {max_len}")
    bad = _CONTROL_RE.search(value)
    if bad:
        raise InvalidArgument(
            f"{field_name} contains a control character (U+{ord(bad.group()):04X}) at position {bad.start()}"
        )


def check_count(field_name: str, values: Sized, max_count: int) -> None:
    if len(values) > max_count:
        raise InvalidArgument(f"{field_name} has {len(values)} entries; at most {max_count}")


def check_range(field_name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidArgument(f"{field_name} must be between {low} and {high}, got {value}")


def check_quantity(field_name: str, value: float | int | None, max_value: float) -> None:
    """A finite, non-negative amount of at most `max_value` (None: not given)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{field_name} must be a finite number, got {value}")
    if value < 0:
        raise InvalidArgument(f"{field_name} must be >= 0, got {_amount(value)}")
    if value > max_value:
        raise InvalidArgument(f"{field_name} must be at most {_amount(max_value)}, got {_amount(value)}")


def _amount(value: float | int) -> str:
    """A quantity as a message shows it: %g where that is the number itself ("1e+08"), a whole
    number %g would round in full ("at most 1073741824, got 4611686018427387904", not
    "1.07374e+09, got 4.61169e+18")."""
    shown = f"{value:g}"
    if float(shown) == value or not float(value).is_integer() or abs(value) >= 2**64:
        return shown
    return str(int(value))


def check_labels(field_name: str, labels: Mapping[str, str]) -> None:
    check_count(field_name, labels, limits.LABELS_MAX)
    for key, value in labels.items():
        if len(key) > limits.LABEL_KEY_MAX:
            raise InvalidArgument(
                f"{field_name}: key {quoted(key, 20)} is {len(key)} characters long; at most {limits.LABEL_KEY_MAX}")
        if not LABEL_KEY_RE.fullmatch(key):
            raise InvalidArgument(
                f"{field_name}: key {quoted(key)} is invalid: use letters, digits, '-', '_', '.' and '/', "
                "starting and ending with a letter or digit")
        check_text(f"{field_name}[{key}]", value, limits.LABEL_VALUE_MAX)


def check_unique(kind: str, values: list[str] | tuple[str, ...]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise InvalidArgument(f"{kind} {quoted(value)} is listed twice")
        seen.add(value)
