"""What a call names: the kind, id and tenant of the object its request is about, read from the
request's fields (the audit log's entries, `auditing.py`, and the per-call log line,
`interceptors/completion.py`)."""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.message import Message

# Methods whose object is not named by their last word.
OBJECT_KIND_OF = {"Register": "node", "ResetNodeCredential": "node"}
_WORDS = re.compile(r"[A-Z][a-z0-9]*")


def _field(message: Message, name: str) -> Any:
    if not isinstance(message, Message):  # a request that did not parse (refused as INVALID_ARGUMENT)
        return None
    return getattr(message, name) if name in message.DESCRIPTOR.fields_by_name else None


def describe_target(method: str, request: Message) -> tuple[str, str, str]:
    """(object kind, object id, tenant) of a call, read from its request (the id "" where it names none)."""
    name = method.rpartition("/")[2]
    words = _WORDS.findall(name)
    kind = OBJECT_KIND_OF.get(name) or (words[-1].lower() if words else name.lower())
    target = request
    for wrapper in ("spec", "node"):  # SubmitDeployment(spec=...), Register(node=...)
        inner = _field(request, wrapper)
        if isinstance(inner, Message):
            target = inner
            break
    object_id = next((v for v in (_field(target, f) for f in ("name", "id", "node_id")) if isinstance(v, str) and v), "")
    tenant = _field(target, "tenant") or _field(request, "tenant") or ""
    if kind == "tenant":
        tenant = object_id
    return kind, object_id, tenant if isinstance(tenant, str) else ""
