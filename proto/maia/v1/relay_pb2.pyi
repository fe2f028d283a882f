from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RelayFrame(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[RelayEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[RelayEvent, _Mapping]]] = ...) -> None: ...

class RelayEvent(_message.Message):
    __slots__ = ("call", "open", "message", "end", "status", "taken", "ping", "pong")
    CALL_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TAKEN_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    call: int
    open: RelayOpen
    message: bytes
    end: RelayEnd
    status: RelayStatus
    taken: int
    ping: int
    pong: int
    def __init__(self, call: _Optional[int] = ..., open: _Optional[_Union[RelayOpen, _Mapping]] = ..., message: _Optional[bytes] = ..., end: _Optional[_Union[RelayEnd, _Mapping]] = ..., status: _Optional[_Union[RelayStatus, _Mapping]] = ..., taken: _Optional[int] = ..., ping: _Optional[int] = ..., pong: _Optional[int] = ...) -> None: ...

class RelayMetadatum(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class RelayOpen(_message.Message):
    __slots__ = ("method", "metadata", "peer", "timeout_s")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    method: str
    metadata: _containers.RepeatedCompositeFieldContainer[RelayMetadatum]
    peer: str
    timeout_s: float
    def __init__(self, method: _Optional[str] = ..., metadata: _Optional[_Iterable[_Union[RelayMetadatum, _Mapping]]] = ..., peer: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class RelayEnd(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class RelayStatus(_message.Message):
    __slots__ = ("code", "details", "trailing_metadata")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    TRAILING_METADATA_FIELD_NUMBER: _ClassVar[int]
    code: int
    details: str
    trailing_metadata: _containers.RepeatedCompositeFieldContainer[RelayMetadatum]
    def __init__(self, code: _Optional[int] = ..., details: _Optional[str] = ..., trailing_metadata: _Optional[_Iterable[_Union[RelayMetadatum, _Mapping]]] = ...) -> None: ...
