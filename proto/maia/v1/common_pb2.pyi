from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Isolation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ISOLATION_UNSPECIFIED: _ClassVar[Isolation]
    ISOLATION_SHARED: _ClassVar[Isolation]
    ISOLATION_DEDICATED_NODE: _ClassVar[Isolation]
    ISOLATION_DEDICATED_RACK: _ClassVar[Isolation]

class Domain(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DOMAIN_UNSPECIFIED: _ClassVar[Domain]
    DOMAIN_NODE: _ClassVar[Domain]
    DOMAIN_RACK: _ClassVar[Domain]
    DOMAIN_ROW: _ClassVar[Domain]
    DOMAIN_ZONE: _ClassVar[Domain]
    DOMAIN_NONE: _ClassVar[Domain]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_READY: _ClassVar[NodeState]
    NODE_STATE_CORDONED: _ClassVar[NodeState]
    NODE_STATE_DOWN: _ClassVar[NodeState]
    NODE_STATE_SUSPECT: _ClassVar[NodeState]

class ShardPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARD_PHASE_UNSPECIFIED: _ClassVar[ShardPhase]
    SHARD_PHASE_ASSIGNED: _ClassVar[ShardPhase]
    SHARD_PHASE_LOADING: _ClassVar[ShardPhase]
    SHARD_PHASE_RUNNING: _ClassVar[ShardPhase]
    SHARD_PHASE_FAILED: _ClassVar[ShardPhase]
    SHARD_PHASE_STOPPED: _ClassVar[ShardPhase]
    SHARD_PHASE_UNKNOWN: _ClassVar[ShardPhase]
ISOLATION_UNSPECIFIED: Isolation
ISOLATION_SHARED: Isolation
ISOLATION_DEDICATED_NODE: Isolation
ISOLATION_DEDICATED_RACK: Isolation
DOMAIN_UNSPECIFIED: Domain
DOMAIN_NODE: Domain
DOMAIN_RACK: Domain
DOMAIN_ROW: Domain
DOMAIN_ZONE: Domain
DOMAIN_NONE: Domain
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_READY: NodeState
NODE_STATE_CORDONED: NodeState
NODE_STATE_DOWN: NodeState
NODE_STATE_SUSPECT: NodeState
SHARD_PHASE_UNSPECIFIED: ShardPhase
SHARD_PHASE_ASSIGNED: ShardPhase
SHARD_PHASE_LOADING: ShardPhase
SHARD_PHASE_RUNNING: ShardPhase
SHARD_PHASE_FAILED: ShardPhase
SHARD_PHASE_STOPPED: ShardPhase
SHARD_PHASE_UNKNOWN: ShardPhase

class ShardSpec(_message.Message):
    __slots__ = ("accelerators", "accelerator_milli", "hbm_gib", "cpu_milli", "memory_mib", "power_w", "accelerator_models")
    ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_MILLI_FIELD_NUMBER: _ClassVar[int]
    HBM_GIB_FIELD_NUMBER: _ClassVar[int]
    CPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_MODELS_FIELD_NUMBER: _ClassVar[int]
    accelerators: int
    accelerator_milli: int
    hbm_gib: float
    cpu_milli: int
    memory_mib: int
    power_w: float
    accelerator_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, accelerators: _Optional[int] = ..., accelerator_milli: _Optional[int] = ..., hbm_gib: _Optional[float] = ..., cpu_milli: _Optional[int] = ..., memory_mib: _Optional[int] = ..., power_w: _Optional[float] = ..., accelerator_models: _Optional[_Iterable[str]] = ...) -> None: ...

class Spread(_message.Message):
    __slots__ = ("domain", "max_per_domain")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: Domain
    max_per_domain: int
    def __init__(self, domain: _Optional[_Union[Domain, str]] = ..., max_per_domain: _Optional[int] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("code", "message", "scope")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    scope: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., scope: _Optional[str] = ...) -> None: ...

class AcceleratorFault(_message.Message):
    __slots__ = ("index", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...
