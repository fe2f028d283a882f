import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from maia.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tenant(_message.Message):
    __slots__ = ("id", "isolation", "excludes", "zones", "reserved_accelerators", "max_accelerators", "max_power_w", "used_accelerators", "used_power_w")
    ID_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    EXCLUDES_FIELD_NUMBER: _ClassVar[int]
    ZONES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    MAX_POWER_W_FIELD_NUMBER: _ClassVar[int]
    USED_ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    USED_POWER_W_FIELD_NUMBER: _ClassVar[int]
    id: str
    isolation: _common_pb2.Isolation
    excludes: _containers.RepeatedScalarFieldContainer[str]
    zones: _containers.RepeatedScalarFieldContainer[str]
    reserved_accelerators: float
    max_accelerators: float
    max_power_w: float
    used_accelerators: float
    used_power_w: float
    def __init__(self, id: _Optional[str] = ..., isolation: _Optional[_Union[_common_pb2.Isolation, str]] = ..., excludes: _Optional[_Iterable[str]] = ..., zones: _Optional[_Iterable[str]] = ..., reserved_accelerators: _Optional[float] = ..., max_accelerators: _Optional[float] = ..., max_power_w: _Optional[float] = ..., used_accelerators: _Optional[float] = ..., used_power_w: _Optional[float] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants", "next_page_token")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    next_page_token: str
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteTenantRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Zone(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Row(_message.Message):
    __slots__ = ("id", "zone", "power_budget_w", "power_used_w")
    ID_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    POWER_BUDGET_W_FIELD_NUMBER: _ClassVar[int]
    POWER_USED_W_FIELD_NUMBER: _ClassVar[int]
    id: str
    zone: str
    power_budget_w: float
    power_used_w: float
    def __init__(self, id: _Optional[str] = ..., zone: _Optional[str] = ..., power_budget_w: _Optional[float] = ..., power_used_w: _Optional[float] = ...) -> None: ...

class Rack(_message.Message):
    __slots__ = ("id", "row", "power_budget_w", "power_used_w", "nodes")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    POWER_BUDGET_W_FIELD_NUMBER: _ClassVar[int]
    POWER_USED_W_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    id: str
    row: str
    power_budget_w: float
    power_used_w: float
    nodes: int
    def __init__(self, id: _Optional[str] = ..., row: _Optional[str] = ..., power_budget_w: _Optional[float] = ..., power_used_w: _Optional[float] = ..., nodes: _Optional[int] = ...) -> None: ...

class Topology(_message.Message):
    __slots__ = ("zones", "rows", "racks")
    ZONES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    RACKS_FIELD_NUMBER: _ClassVar[int]
    zones: _containers.RepeatedCompositeFieldContainer[Zone]
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    racks: _containers.RepeatedCompositeFieldContainer[Rack]
    def __init__(self, zones: _Optional[_Iterable[_Union[Zone, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ..., racks: _Optional[_Iterable[_Union[Rack, _Mapping]]] = ...) -> None: ...

class GetTopologyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TopologyItemRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("id", "hostname", "rack", "row", "zone", "state", "accelerators", "accelerator_model", "hbm_gib", "cpu_milli", "memory_mib", "idle_power_w", "labels", "connected", "last_heartbeat", "power_draw_w", "accelerators_used", "shards", "tenants", "cordoned", "draining", "evicted", "failed_accelerators", "nominated_for", "nominated_at")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    RACK_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_MODEL_FIELD_NUMBER: _ClassVar[int]
    HBM_GIB_FIELD_NUMBER: _ClassVar[int]
    CPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    IDLE_POWER_W_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_W_FIELD_NUMBER: _ClassVar[int]
    ACCELERATORS_USED_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    FAILED_ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    NOMINATED_FOR_FIELD_NUMBER: _ClassVar[int]
    NOMINATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    hostname: str
    rack: str
    row: str
    zone: str
    state: _common_pb2.NodeState
    accelerators: int
    accelerator_model: str
    hbm_gib: float
    cpu_milli: int
    memory_mib: int
    idle_power_w: float
    labels: _containers.ScalarMap[str, str]
    connected: bool
    last_heartbeat: _timestamp_pb2.Timestamp
    power_draw_w: float
    accelerators_used: float
    shards: int
    tenants: _containers.RepeatedScalarFieldContainer[str]
    cordoned: bool
    draining: bool
    evicted: bool
    failed_accelerators: _containers.RepeatedCompositeFieldContainer[_common_pb2.AcceleratorFault]
    nominated_for: str
    nominated_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., hostname: _Optional[str] = ..., rack: _Optional[str] = ..., row: _Optional[str] = ..., zone: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.NodeState, str]] = ..., accelerators: _Optional[int] = ..., accelerator_model: _Optional[str] = ..., hbm_gib: _Optional[float] = ..., cpu_milli: _Optional[int] = ..., memory_mib: _Optional[int] = ..., idle_power_w: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ..., connected: _Optional[bool] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., power_draw_w: _Optional[float] = ..., accelerators_used: _Optional[float] = ..., shards: _Optional[int] = ..., tenants: _Optional[_Iterable[str]] = ..., cordoned: _Optional[bool] = ..., draining: _Optional[bool] = ..., evicted: _Optional[bool] = ..., failed_accelerators: _Optional[_Iterable[_Union[_common_pb2.AcceleratorFault, _Mapping]]] = ..., nominated_for: _Optional[str] = ..., nominated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("rack", "page_size", "page_token")
    RACK_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rack: str
    page_size: int
    page_token: str
    def __init__(self, rack: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "next_page_token")
    NODES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    next_page_token: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteNodeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class NodeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ResetNodeCredentialResponse(_message.Message):
    __slots__ = ("node_id", "revoked_token_ids")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REVOKED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    revoked_token_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., revoked_token_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetClusterSummaryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterSnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterSnapshot(_message.Message):
    __slots__ = ("problem_json", "generation")
    PROBLEM_JSON_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    problem_json: str
    generation: int
    def __init__(self, problem_json: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class ClusterSummary(_message.Message):
    __slots__ = ("nodes_ready", "nodes_cordoned", "nodes_down", "accelerators_total", "accelerators_used", "power_budget_w", "power_used_w", "deployments_by_phase", "tenants", "nodes_suspect")
    class DeploymentsByPhaseEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODES_READY_FIELD_NUMBER: _ClassVar[int]
    NODES_CORDONED_FIELD_NUMBER: _ClassVar[int]
    NODES_DOWN_FIELD_NUMBER: _ClassVar[int]
    ACCELERATORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ACCELERATORS_USED_FIELD_NUMBER: _ClassVar[int]
    POWER_BUDGET_W_FIELD_NUMBER: _ClassVar[int]
    POWER_USED_W_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_BY_PHASE_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NODES_SUSPECT_FIELD_NUMBER: _ClassVar[int]
    nodes_ready: int
    nodes_cordoned: int
    nodes_down: int
    accelerators_total: float
    accelerators_used: float
    power_budget_w: float
    power_used_w: float
    deployments_by_phase: _containers.ScalarMap[str, int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    nodes_suspect: int
    def __init__(self, nodes_ready: _Optional[int] = ..., nodes_cordoned: _Optional[int] = ..., nodes_down: _Optional[int] = ..., accelerators_total: _Optional[float] = ..., accelerators_used: _Optional[float] = ..., power_budget_w: _Optional[float] = ..., power_used_w: _Optional[float] = ..., deployments_by_phase: _Optional[_Mapping[str, int]] = ..., tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ..., nodes_suspect: _Optional[int] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "name", "role", "tenant", "node", "created_by", "created_at", "expires_at", "revoked_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    role: str
    tenant: str
    node: str
    created_by: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., role: _Optional[str] = ..., tenant: _Optional[str] = ..., node: _Optional[str] = ..., created_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("role", "tenant", "name", "ttl_seconds", "node")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    role: str
    tenant: str
    name: str
    ttl_seconds: int
    node: str
    def __init__(self, role: _Optional[str] = ..., tenant: _Optional[str] = ..., name: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., node: _Optional[str] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "secret")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    token: Token
    secret: str
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ("role", "tenant", "page_size", "page_token")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    role: str
    tenant: str
    page_size: int
    page_token: str
    def __init__(self, role: _Optional[str] = ..., tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens", "next_page_token")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    next_page_token: str
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "schema_revision", "address", "leader", "leader_address", "database_revision")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_REVISION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATABASE_REVISION_FIELD_NUMBER: _ClassVar[int]
    version: str
    schema_revision: str
    address: str
    leader: bool
    leader_address: str
    database_revision: str
    def __init__(self, version: _Optional[str] = ..., schema_revision: _Optional[str] = ..., address: _Optional[str] = ..., leader: _Optional[bool] = ..., leader_address: _Optional[str] = ..., database_revision: _Optional[str] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("object_kind", "object_id", "after_id", "limit", "tenant", "oldest_first")
    OBJECT_KIND_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_FIRST_FIELD_NUMBER: _ClassVar[int]
    object_kind: str
    object_id: str
    after_id: int
    limit: int
    tenant: str
    oldest_first: bool
    def __init__(self, object_kind: _Optional[str] = ..., object_id: _Optional[str] = ..., after_id: _Optional[int] = ..., limit: _Optional[int] = ..., tenant: _Optional[str] = ..., oldest_first: _Optional[bool] = ...) -> None: ...

class EventRecord(_message.Message):
    __slots__ = ("id", "at", "actor", "kind", "object_kind", "object_id", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OBJECT_KIND_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    at: _timestamp_pb2.Timestamp
    actor: str
    kind: str
    object_kind: str
    object_id: str
    message: str
    def __init__(self, id: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., kind: _Optional[str] = ..., object_kind: _Optional[str] = ..., object_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "read_through")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    READ_THROUGH_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[EventRecord]
    read_through: int
    def __init__(self, events: _Optional[_Iterable[_Union[EventRecord, _Mapping]]] = ..., read_through: _Optional[int] = ...) -> None: ...
