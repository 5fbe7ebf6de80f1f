from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("protocol_version", "agent_uri", "capabilities", "outrelay_instance")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_URI_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    OUTRELAY_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: str
    agent_uri: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    outrelay_instance: str
    def __init__(self, protocol_version: _Optional[str] = ..., agent_uri: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., outrelay_instance: _Optional[str] = ...) -> None: ...

class HelloAck(_message.Message):
    __slots__ = ("session_id", "server_time_unix_ms", "accepted_features")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    server_time_unix_ms: int
    accepted_features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., server_time_unix_ms: _Optional[int] = ..., accepted_features: _Optional[_Iterable[str]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("service_name", "local_addr")
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDR_FIELD_NUMBER: _ClassVar[int]
    service_name: str
    local_addr: str
    def __init__(self, service_name: _Optional[str] = ..., local_addr: _Optional[str] = ...) -> None: ...

class RegisterAck(_message.Message):
    __slots__ = ("service_id",)
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    service_id: str
    def __init__(self, service_id: _Optional[str] = ...) -> None: ...

class OpenStream(_message.Message):
    __slots__ = ("target_service", "method", "stream_id")
    TARGET_SERVICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    target_service: str
    method: str
    stream_id: int
    def __init__(self, target_service: _Optional[str] = ..., method: _Optional[str] = ..., stream_id: _Optional[int] = ...) -> None: ...

class IncomingStream(_message.Message):
    __slots__ = ("target_service", "method", "source_agent_uri", "stream_id", "outrelay_spliced", "outrelay_p2p_mode", "outrelay_provider_uri")
    TARGET_SERVICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_AGENT_URI_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    OUTRELAY_SPLICED_FIELD_NUMBER: _ClassVar[int]
    OUTRELAY_P2P_MODE_FIELD_NUMBER: _ClassVar[int]
    OUTRELAY_PROVIDER_URI_FIELD_NUMBER: _ClassVar[int]
    target_service: str
    method: str
    source_agent_uri: str
    stream_id: int
    outrelay_spliced: bool
    outrelay_p2p_mode: int
    outrelay_provider_uri: str
    def __init__(self, target_service: _Optional[str] = ..., method: _Optional[str] = ..., source_agent_uri: _Optional[str] = ..., stream_id: _Optional[int] = ..., outrelay_spliced: _Optional[bool] = ..., outrelay_p2p_mode: _Optional[int] = ..., outrelay_provider_uri: _Optional[str] = ...) -> None: ...

class StreamAccept(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamReject(_message.Message):
    __slots__ = ("code", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class StreamCheckpoint(_message.Message):
    __slots__ = ("stream_id", "my_position", "peer_ack_position")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MY_POSITION_FIELD_NUMBER: _ClassVar[int]
    PEER_ACK_POSITION_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    my_position: int
    peer_ack_position: int
    def __init__(self, stream_id: _Optional[int] = ..., my_position: _Optional[int] = ..., peer_ack_position: _Optional[int] = ...) -> None: ...

class StreamResume(_message.Message):
    __slots__ = ("stream_id", "my_position", "peer_ack_position", "outrelay_peer_uri")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MY_POSITION_FIELD_NUMBER: _ClassVar[int]
    PEER_ACK_POSITION_FIELD_NUMBER: _ClassVar[int]
    OUTRELAY_PEER_URI_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    my_position: int
    peer_ack_position: int
    outrelay_peer_uri: str
    def __init__(self, stream_id: _Optional[int] = ..., my_position: _Optional[int] = ..., peer_ack_position: _Optional[int] = ..., outrelay_peer_uri: _Optional[str] = ...) -> None: ...

class ObservedAddrQuery(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    def __init__(self, request_id: _Optional[int] = ...) -> None: ...

class ObservedAddrResp(_message.Message):
    __slots__ = ("request_id", "ip", "port")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    ip: str
    port: int
    def __init__(self, request_id: _Optional[int] = ..., ip: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("kind", "ip", "port", "priority")
    KIND_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    kind: str
    ip: str
    port: int
    priority: int
    def __init__(self, kind: _Optional[str] = ..., ip: _Optional[str] = ..., port: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class CandidateOffer(_message.Message):
    __slots__ = ("stream_id", "candidates")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, stream_id: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class CandidateAnswer(_message.Message):
    __slots__ = ("stream_id", "candidates")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, stream_id: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class MigrateToP2P(_message.Message):
    __slots__ = ("stream_id", "my_position", "peer_ack_position", "selected")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MY_POSITION_FIELD_NUMBER: _ClassVar[int]
    PEER_ACK_POSITION_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    my_position: int
    peer_ack_position: int
    selected: Candidate
    def __init__(self, stream_id: _Optional[int] = ..., my_position: _Optional[int] = ..., peer_ack_position: _Optional[int] = ..., selected: _Optional[_Union[Candidate, _Mapping]] = ...) -> None: ...

class MigrateToRelay(_message.Message):
    __slots__ = ("stream_id", "my_position", "peer_ack_position", "reason")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MY_POSITION_FIELD_NUMBER: _ClassVar[int]
    PEER_ACK_POSITION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    my_position: int
    peer_ack_position: int
    reason: str
    def __init__(self, stream_id: _Optional[int] = ..., my_position: _Optional[int] = ..., peer_ack_position: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AllocGranted(_message.Message):
    __slots__ = ("stream_id", "my_allocation", "peer_allocation", "forward_endpoint")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MY_ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    PEER_ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    my_allocation: int
    peer_allocation: int
    forward_endpoint: str
    def __init__(self, stream_id: _Optional[int] = ..., my_allocation: _Optional[int] = ..., peer_allocation: _Optional[int] = ..., forward_endpoint: _Optional[str] = ...) -> None: ...

class StreamReady(_message.Message):
    __slots__ = ("stream_id", "outrelay_p2p_mode", "outrelay_peer_uri")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    OUTRELAY_P2P_MODE_FIELD_NUMBER: _ClassVar[int]
    OUTRELAY_PEER_URI_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    outrelay_p2p_mode: int
    outrelay_peer_uri: str
    def __init__(self, stream_id: _Optional[int] = ..., outrelay_p2p_mode: _Optional[int] = ..., outrelay_peer_uri: _Optional[str] = ...) -> None: ...

class PeerResume(_message.Message):
    __slots__ = ("resume", "agent_uri", "migrate")
    RESUME_FIELD_NUMBER: _ClassVar[int]
    AGENT_URI_FIELD_NUMBER: _ClassVar[int]
    MIGRATE_FIELD_NUMBER: _ClassVar[int]
    resume: StreamResume
    agent_uri: str
    migrate: bool
    def __init__(self, resume: _Optional[_Union[StreamResume, _Mapping]] = ..., agent_uri: _Optional[str] = ..., migrate: _Optional[bool] = ...) -> None: ...
