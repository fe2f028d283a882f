import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from maia.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeploymentPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOYMENT_PHASE_UNSPECIFIED: _ClassVar[DeploymentPhase]
    DEPLOYMENT_PHASE_PENDING: _ClassVar[DeploymentPhase]
    DEPLOYMENT_PHASE_SCHEDULED: _ClassVar[DeploymentPhase]
    DEPLOYMENT_PHASE_RUNNING: _ClassVar[DeploymentPhase]
    DEPLOYMENT_PHASE_DEGRADED: _ClassVar[DeploymentPhase]
    DEPLOYMENT_PHASE_DELETING: _ClassVar[DeploymentPhase]
    DEPLOYMENT_PHASE_QUARANTINED: _ClassVar[DeploymentPhase]
    DEPLOYMENT_PHASE_FAILED: _ClassVar[DeploymentPhase]
DEPLOYMENT_PHASE_UNSPECIFIED: DeploymentPhase
DEPLOYMENT_PHASE_PENDING: DeploymentPhase
DEPLOYMENT_PHASE_SCHEDULED: DeploymentPhase
DEPLOYMENT_PHASE_RUNNING: DeploymentPhase
DEPLOYMENT_PHASE_DEGRADED: DeploymentPhase
DEPLOYMENT_PHASE_DELETING: DeploymentPhase
DEPLOYMENT_PHASE_QUARANTINED: DeploymentPhase
DEPLOYMENT_PHASE_FAILED: DeploymentPhase

class DeploymentSpec(_message.Message):
    __slots__ = ("name", "tenant", "replicas", "min_replicas", "shards_per_replica", "shard", "locality", "spread", "priority", "preemptible")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_PER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIBLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    replicas: int
    min_replicas: int
    shards_per_replica: int
    shard: _common_pb2.ShardSpec
    locality: _common_pb2.Domain
    spread: _common_pb2.Spread
    priority: int
    preemptible: bool
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., replicas: _Optional[int] = ..., min_replicas: _Optional[int] = ..., shards_per_replica: _Optional[int] = ..., shard: _Optional[_Union[_common_pb2.ShardSpec, _Mapping]] = ..., locality: _Optional[_Union[_common_pb2.Domain, str]] = ..., spread: _Optional[_Union[_common_pb2.Spread, _Mapping]] = ..., priority: _Optional[int] = ..., preemptible: _Optional[bool] = ...) -> None: ...

class ShardPlacement(_message.Message):
    __slots__ = ("replica", "shard", "node", "rack", "accelerator_indices", "accelerator_milli", "phase", "message", "revision", "outgoing")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    RACK_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_INDICES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_MILLI_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    OUTGOING_FIELD_NUMBER: _ClassVar[int]
    replica: int
    shard: int
    node: str
    rack: str
    accelerator_indices: _containers.RepeatedScalarFieldContainer[int]
    accelerator_milli: int
    phase: _common_pb2.ShardPhase
    message: str
    revision: int
    outgoing: bool
    def __init__(self, replica: _Optional[int] = ..., shard: _Optional[int] = ..., node: _Optional[str] = ..., rack: _Optional[str] = ..., accelerator_indices: _Optional[_Iterable[int]] = ..., accelerator_milli: _Optional[int] = ..., phase: _Optional[_Union[_common_pb2.ShardPhase, str]] = ..., message: _Optional[str] = ..., revision: _Optional[int] = ..., outgoing: _Optional[bool] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("spec", "phase", "generation", "placed_replicas", "running_replicas", "placements", "reasons", "created_at", "updated_at", "resource_version", "revision", "updated_replicas", "outgoing_replicas", "nomination")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PLACED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    OUTGOING_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    NOMINATION_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    phase: DeploymentPhase
    generation: int
    placed_replicas: int
    running_replicas: int
    placements: _containers.RepeatedCompositeFieldContainer[ShardPlacement]
    reasons: _containers.RepeatedCompositeFieldContainer[_common_pb2.Reason]
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    resource_version: int
    revision: int
    updated_replicas: int
    outgoing_replicas: int
    nomination: Nomination
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., phase: _Optional[_Union[DeploymentPhase, str]] = ..., generation: _Optional[int] = ..., placed_replicas: _Optional[int] = ..., running_replicas: _Optional[int] = ..., placements: _Optional[_Iterable[_Union[ShardPlacement, _Mapping]]] = ..., reasons: _Optional[_Iterable[_Union[_common_pb2.Reason, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resource_version: _Optional[int] = ..., revision: _Optional[int] = ..., updated_replicas: _Optional[int] = ..., outgoing_replicas: _Optional[int] = ..., nomination: _Optional[_Union[Nomination, _Mapping]] = ...) -> None: ...

class Nomination(_message.Message):
    __slots__ = ("nodes", "nominated_at", "waiting_since", "missing_replicas")
    NODES_FIELD_NUMBER: _ClassVar[int]
    NOMINATED_AT_FIELD_NUMBER: _ClassVar[int]
    WAITING_SINCE_FIELD_NUMBER: _ClassVar[int]
    MISSING_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    nominated_at: _timestamp_pb2.Timestamp
    waiting_since: _timestamp_pb2.Timestamp
    missing_replicas: int
    def __init__(self, nodes: _Optional[_Iterable[str]] = ..., nominated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., waiting_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., missing_replicas: _Optional[int] = ...) -> None: ...

class SubmitDeploymentRequest(_message.Message):
    __slots__ = ("spec", "dry_run", "replace_existing", "client_request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REPLACE_EXISTING_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    dry_run: bool
    replace_existing: bool
    client_request_id: str
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., dry_run: _Optional[bool] = ..., replace_existing: _Optional[bool] = ..., client_request_id: _Optional[str] = ...) -> None: ...

class SubmitDeploymentResponse(_message.Message):
    __slots__ = ("deployment", "dry_run")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    dry_run: bool
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class SubmitDeploymentsRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SubmitDeploymentRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SubmitDeploymentRequest, _Mapping]]] = ...) -> None: ...

class SubmitDeploymentResult(_message.Message):
    __slots__ = ("deployment", "error")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    error: _status_pb2.Status
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class SubmitDeploymentsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitDeploymentResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitDeploymentResult, _Mapping]]] = ...) -> None: ...

class UpdateDeploymentRequest(_message.Message):
    __slots__ = ("spec", "resource_version", "client_request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    resource_version: int
    client_request_id: str
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., resource_version: _Optional[int] = ..., client_request_id: _Optional[str] = ...) -> None: ...

class UpdateDeploymentResponse(_message.Message):
    __slots__ = ("deployment", "changes", "rolling")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    ROLLING_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    changes: _containers.RepeatedScalarFieldContainer[str]
    rolling: bool
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., changes: _Optional[_Iterable[str]] = ..., rolling: _Optional[bool] = ...) -> None: ...

class ListDeploymentRevisionsRequest(_message.Message):
    __slots__ = ("name", "tenant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class DeploymentRevision(_message.Message):
    __slots__ = ("revision", "spec", "created_at", "changes", "current")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    revision: int
    spec: DeploymentSpec
    created_at: _timestamp_pb2.Timestamp
    changes: _containers.RepeatedScalarFieldContainer[str]
    current: bool
    def __init__(self, revision: _Optional[int] = ..., spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., changes: _Optional[_Iterable[str]] = ..., current: _Optional[bool] = ...) -> None: ...

class ListDeploymentRevisionsResponse(_message.Message):
    __slots__ = ("revisions",)
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    revisions: _containers.RepeatedCompositeFieldContainer[DeploymentRevision]
    def __init__(self, revisions: _Optional[_Iterable[_Union[DeploymentRevision, _Mapping]]] = ...) -> None: ...

class RollbackDeploymentRequest(_message.Message):
    __slots__ = ("name", "tenant", "to_revision", "resource_version", "client_request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TO_REVISION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    to_revision: int
    resource_version: int
    client_request_id: str
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., to_revision: _Optional[int] = ..., resource_version: _Optional[int] = ..., client_request_id: _Optional[str] = ...) -> None: ...

class RollbackDeploymentResponse(_message.Message):
    __slots__ = ("deployment", "changes", "rolling", "to_revision")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    ROLLING_FIELD_NUMBER: _ClassVar[int]
    TO_REVISION_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    changes: _containers.RepeatedScalarFieldContainer[str]
    rolling: bool
    to_revision: int
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., changes: _Optional[_Iterable[str]] = ..., rolling: _Optional[bool] = ..., to_revision: _Optional[int] = ...) -> None: ...

class RestartDeploymentRequest(_message.Message):
    __slots__ = ("name", "tenant", "resource_version", "client_request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    resource_version: int
    client_request_id: str
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., resource_version: _Optional[int] = ..., client_request_id: _Optional[str] = ...) -> None: ...

class RestartDeploymentResponse(_message.Message):
    __slots__ = ("deployment", "changes")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    changes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., changes: _Optional[_Iterable[str]] = ...) -> None: ...

class GetDeploymentRequest(_message.Message):
    __slots__ = ("name", "tenant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ("tenant", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments", "next_page_token")
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    next_page_token: str
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteDeploymentRequest(_message.Message):
    __slots__ = ("name", "tenant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class WatchDeploymentsRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeploymentEvent(_message.Message):
    __slots__ = ("type", "deployment")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[DeploymentEvent.Type]
        TYPE_ADDED: _ClassVar[DeploymentEvent.Type]
        TYPE_MODIFIED: _ClassVar[DeploymentEvent.Type]
        TYPE_DELETED: _ClassVar[DeploymentEvent.Type]
    TYPE_UNSPECIFIED: DeploymentEvent.Type
    TYPE_ADDED: DeploymentEvent.Type
    TYPE_MODIFIED: DeploymentEvent.Type
    TYPE_DELETED: DeploymentEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    type: DeploymentEvent.Type
    deployment: Deployment
    def __init__(self, type: _Optional[_Union[DeploymentEvent.Type, str]] = ..., deployment: _Optional[_Union[Deployment, _Mapping]] = ...) -> None: ...

class DeploymentEventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[DeploymentEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[DeploymentEvent, _Mapping]]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant", "since", "until")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    def __init__(self, tenant: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UsageRecord(_message.Message):
    __slots__ = ("tenant", "deployment", "accelerator_model", "zone", "accelerator_seconds", "accelerator_hours", "energy_kwh")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_MODEL_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_HOURS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_KWH_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    deployment: str
    accelerator_model: str
    zone: str
    accelerator_seconds: float
    accelerator_hours: float
    energy_kwh: float
    def __init__(self, tenant: _Optional[str] = ..., deployment: _Optional[str] = ..., accelerator_model: _Optional[str] = ..., zone: _Optional[str] = ..., accelerator_seconds: _Optional[float] = ..., accelerator_hours: _Optional[float] = ..., energy_kwh: _Optional[float] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("records", "since", "until")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[UsageRecord]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    def __init__(self, records: _Optional[_Iterable[_Union[UsageRecord, _Mapping]]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
