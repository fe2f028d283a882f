from maia.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "hostname", "rack", "accelerators", "accelerator_model", "hbm_gib", "cpu_milli", "memory_mib", "idle_power_w", "labels", "agent_version")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    RACK_FIELD_NUMBER: _ClassVar[int]
    ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_MODEL_FIELD_NUMBER: _ClassVar[int]
    HBM_GIB_FIELD_NUMBER: _ClassVar[int]
    CPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    IDLE_POWER_W_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    rack: str
    accelerators: int
    accelerator_model: str
    hbm_gib: float
    cpu_milli: int
    memory_mib: int
    idle_power_w: float
    labels: _containers.ScalarMap[str, str]
    agent_version: str
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., rack: _Optional[str] = ..., accelerators: _Optional[int] = ..., accelerator_model: _Optional[str] = ..., hbm_gib: _Optional[float] = ..., cpu_milli: _Optional[int] = ..., memory_mib: _Optional[int] = ..., idle_power_w: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ..., agent_version: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node", "credential_proposal")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    credential_proposal: str
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., credential_proposal: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node_id", "session_id", "heartbeat_interval_ms", "node_credential")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_id: str
    heartbeat_interval_ms: int
    node_credential: str
    def __init__(self, node_id: _Optional[str] = ..., session_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., node_credential: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "shard_status")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    SHARD_STATUS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    shard_status: ShardStatus
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., shard_status: _Optional[_Union[ShardStatus, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node_id", "session_id", "heartbeat_interval_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_id: str
    heartbeat_interval_ms: int
    def __init__(self, node_id: _Optional[str] = ..., session_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq", "power_draw_w", "shards", "shard_state_version", "shards_omitted", "failed_accelerators")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_W_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    FAILED_ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    power_draw_w: float
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    shard_state_version: int
    shards_omitted: bool
    failed_accelerators: _containers.RepeatedCompositeFieldContainer[_common_pb2.AcceleratorFault]
    def __init__(self, seq: _Optional[int] = ..., power_draw_w: _Optional[float] = ..., shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ..., shard_state_version: _Optional[int] = ..., shards_omitted: _Optional[bool] = ..., failed_accelerators: _Optional[_Iterable[_Union[_common_pb2.AcceleratorFault, _Mapping]]] = ...) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("deployment", "replica", "shard", "generation", "phase", "message", "power_draw_w", "tenant", "deployment_uid")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_W_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_UID_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    replica: int
    shard: int
    generation: int
    phase: _common_pb2.ShardPhase
    message: str
    power_draw_w: float
    tenant: str
    deployment_uid: int
    def __init__(self, deployment: _Optional[str] = ..., replica: _Optional[int] = ..., shard: _Optional[int] = ..., generation: _Optional[int] = ..., phase: _Optional[_Union[_common_pb2.ShardPhase, str]] = ..., message: _Optional[str] = ..., power_draw_w: _Optional[float] = ..., tenant: _Optional[str] = ..., deployment_uid: _Optional[int] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("assignments", "shard_state_request", "heartbeat_policy")
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    SHARD_STATE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_POLICY_FIELD_NUMBER: _ClassVar[int]
    assignments: AssignmentSet
    shard_state_request: ShardStateRequest
    heartbeat_policy: HeartbeatPolicy
    def __init__(self, assignments: _Optional[_Union[AssignmentSet, _Mapping]] = ..., shard_state_request: _Optional[_Union[ShardStateRequest, _Mapping]] = ..., heartbeat_policy: _Optional[_Union[HeartbeatPolicy, _Mapping]] = ...) -> None: ...

class HeartbeatPolicy(_message.Message):
    __slots__ = ("heartbeat_interval_ms",)
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_ms: int
    def __init__(self, heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class ShardStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AssignmentSet(_message.Message):
    __slots__ = ("generation", "assignments")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    generation: int
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, generation: _Optional[int] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("deployment", "tenant", "replica", "shard", "shards_per_replica", "accelerator_indices", "accelerator_milli", "spec", "generation", "deployment_uid")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_PER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_INDICES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_MILLI_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_UID_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    tenant: str
    replica: int
    shard: int
    shards_per_replica: int
    accelerator_indices: _containers.RepeatedScalarFieldContainer[int]
    accelerator_milli: int
    spec: _common_pb2.ShardSpec
    generation: int
    deployment_uid: int
    def __init__(self, deployment: _Optional[str] = ..., tenant: _Optional[str] = ..., replica: _Optional[int] = ..., shard: _Optional[int] = ..., shards_per_replica: _Optional[int] = ..., accelerator_indices: _Optional[_Iterable[int]] = ..., accelerator_milli: _Optional[int] = ..., spec: _Optional[_Union[_common_pb2.ShardSpec, _Mapping]] = ..., generation: _Optional[int] = ..., deployment_uid: _Optional[int] = ...) -> None: ...
