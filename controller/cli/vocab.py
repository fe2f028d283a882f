"""One place that maps the API's enums to the lowercase words people and manifests use.

Manifests, tables and the interchange format share one vocabulary (`dedicated_rack`, `rack`,
`running`); the proto enums carry prefixes (`ISOLATION_DEDICATED_RACK`). Keeping both directions
here means a new enum value is added once.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from maia.v1 import common_pb2, deployments_pb2

ISOLATION_BY_WORD: dict[str, int] = {
    "shared": common_pb2.ISOLATION_SHARED,
    "dedicated_node": common_pb2.ISOLATION_DEDICATED_NODE,
    "dedicated_rack": common_pb2.ISOLATION_DEDICATED_RACK,
}

DOMAIN_BY_WORD: dict[str, int] = {
    "node": common_pb2.DOMAIN_NODE,
    "rack": common_pb2.DOMAIN_RACK,
    "row": common_pb2.DOMAIN_ROW,
    "zone": common_pb2.DOMAIN_ZONE,
    "none": common_pb2.DOMAIN_NONE,
}

# What an unset enum means, as the proto comments say.
_ISOLATION_DEFAULT = "shared"
_DOMAIN_DEFAULT = "rack"


def _word(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix).lower()


def _named(enum: EnumTypeWrapper, value: int, prefix: str) -> str:
    """The word of `enum`'s `value`; one this client does not know (a newer controller's) reads
    as `value N`, never a traceback."""
    try:
        return _word(enum.Name(value), prefix)
    except ValueError:
        return f"value {value}"


def isolation_word(value: int) -> str:
    if value == common_pb2.ISOLATION_UNSPECIFIED:
        return _ISOLATION_DEFAULT
    return _named(common_pb2.Isolation, value, "ISOLATION_")


def domain_word(value: int, default: str = _DOMAIN_DEFAULT) -> str:
    if value == common_pb2.DOMAIN_UNSPECIFIED:
        return default
    return _named(common_pb2.Domain, value, "DOMAIN_")


def node_state_word(value: int) -> str:
    if value == common_pb2.NODE_STATE_UNSPECIFIED:
        return "unknown"
    return _named(common_pb2.NodeState, value, "NODE_STATE_")


def shard_phase_word(value: int) -> str:
    if value == common_pb2.SHARD_PHASE_UNSPECIFIED:
        return "unspecified"  # "unknown" is a phase of its own: the shard's node is down
    return _named(common_pb2.ShardPhase, value, "SHARD_PHASE_")


def deployment_phase_word(value: int) -> str:
    if value == deployments_pb2.DEPLOYMENT_PHASE_UNSPECIFIED:
        return "unknown"
    return _named(deployments_pb2.DeploymentPhase, value, "DEPLOYMENT_PHASE_")


_WORD_OF_ENUM: dict[str, Callable[[int], str]] = {
    "maia.v1.Isolation": isolation_word,
    "maia.v1.Domain": domain_word,
    "maia.v1.NodeState": node_state_word,
    "maia.v1.ShardPhase": shard_phase_word,
    "maia.v1.DeploymentPhase": deployment_phase_word,
}


def enum_word(enum: EnumDescriptor, value: int) -> str | int:
    """Any API enum's value as its word: the words above for the enums they name, else the value's
    name without its type's prefix, lowercase (`Type.TYPE_DELETED` -> `deleted`). A value this
    maiactl does not know (a newer controller's) stays its number, as protobuf's JSON prints it."""
    named = enum.values_by_number.get(value)
    if named is None:
        return value
    word_of = _WORD_OF_ENUM.get(enum.full_name)
    if word_of is not None:
        return word_of(value)
    return _word(named.name, re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_")


def title(word: str) -> str:
    """`running` -> `Running`, for phases shown in tables."""
    return word[:1].upper() + word[1:]
