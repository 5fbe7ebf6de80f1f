"""What quic/_aioquic.py and quic/_qh3.py rely on still exists in the installed libraries.

Each check names the private attribute or method and the module that uses
it, so that a library upgrade fails here with a clear message instead of
deep inside a connection.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any

import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.stream import QuicStreamSender
from aioquic.tls import Context

from outrelay.transport.quic.client import server_configuration

from .tlspki import Pki


def _params(fn: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _need(obj: object, name: str, where: str) -> Any:
    version = importlib.metadata.version(where.split(":")[0])
    assert hasattr(obj, name), (
        f"{where} {version}: {type(obj).__name__ if not isinstance(obj, type) else obj.__name__}"
        f".{name} is gone; outrelay/transport/quic/_{where.split(':')[0]}.py uses it"
    )
    return getattr(obj, name)


def _need_params(fn: Callable[..., Any], expected: list[str], what: str) -> None:
    assert _params(fn) == expected, (
        f"{what} now takes {_params(fn)}, outrelay/transport/quic/ patches it as {expected}"
    )


def _connection(config: QuicConfiguration) -> QuicConnection:
    dcid = None if config.is_client else b"\x01" * 8
    return QuicConnection(configuration=config, original_destination_connection_id=dcid)


def test_aioquic_connection_privates(pki: Pki) -> None:
    configs = [QuicConfiguration(is_client=True), server_configuration(pki.relay)]
    for config in configs:
        quic = _connection(config)
        for name in (
            "_streams",
            "_is_client",
            "_remote_max_streams_bidi",
            "_local_max_streams_bidi",
            "_local_max_streams_uni",
            "_loss",
            "_network_paths",
            "_state",
            "_host_cids",
            "_on_max_stream_data_delivery",
            "_max_datagram_size",
        ):
            _need(quic, name, "aioquic")
        for limit in (quic._local_max_streams_bidi, quic._local_max_streams_uni):
            _need(limit, "value", "aioquic")
            _need(limit, "sent", "aioquic")
        loss = quic._loss
        for name in ("_rtt_smoothed", "_rtt_initialized", "spaces", "get_probe_timeout"):
            _need(loss, name, "aioquic")
        # set_datagram_size: the pacer and the congestion controller copy the size.
        _need(_need(loss, "_pacer", "aioquic"), "_max_datagram_size", "aioquic")
        _need(_need(loss, "_cc", "aioquic"), "_max_datagram_size", "aioquic")
        for space in loss.spaces:
            _need(space, "ack_eliciting_in_flight", "aioquic")
    _need_params(
        QuicConnection._write_stream_limits,
        ["self", "builder", "space", "stream"],
        "aioquic QuicConnection._write_stream_limits",
    )
    _need_params(
        QuicConnection._initialize, ["self", "peer_cid"], "aioquic QuicConnection._initialize"
    )
    assert QuicConnectionState.FIRSTFLIGHT, "aioquic QuicConnectionState.FIRSTFLIGHT is gone"
    # The TLS context's switch and the fields the peer certificate is read from.
    tls_init = inspect.getsource(Context.__init__)
    for name in ("_request_client_certificate", "_peer_certificate", "_peer_certificate_chain"):
        assert f"self.{name}" in tls_init, f"aioquic tls.Context no longer sets {name}"
    assert "tls" in inspect.getsource(QuicConnection._initialize), "_initialize builds no tls"


def test_aioquic_private_buffer_module() -> None:
    buffer = pytest.importorskip("aioquic._buffer", reason="aioquic._buffer is gone (_aioquic.py)")
    _need(buffer, "Buffer", "aioquic")
    # A C type without an introspectable signature: check the call we make works.
    assert buffer.Buffer(data=b"\x00").pull_uint8() == 0, "aioquic._buffer.Buffer(data=...) changed"


def test_aioquic_stream_sender_privates() -> None:
    sender = QuicStreamSender(stream_id=0, writable=True)
    for name in ("_buffer_start", "_buffer_stop", "_pending", "_pending_eof", "buffer_is_empty"):
        _need(sender, name, "aioquic")
    _need_params(QuicStreamSender.get_frame, ["self", "max_size", "max_offset"], "get_frame")
    _need_params(
        QuicStreamSender.on_data_delivery,
        ["self", "delivery", "start", "stop", "fin"],
        "aioquic QuicStreamSender.on_data_delivery",
    )


def test_aioquic_protocol_and_server_privates() -> None:
    for name in ("_transmit_soon", "connect", "close", "transmit"):
        _need(QuicConnectionProtocol, name, "aioquic")
    init = inspect.getsource(QuicConnectionProtocol.__init__)
    for name in ("_quic", "_loop", "_connected", "_timer", "_connection_terminated_handler",
                 "_connection_id_issued_handler", "_connection_id_retired_handler"):  # fmt: skip
        assert f"self.{name}" in init, f"aioquic QuicConnectionProtocol no longer sets {name}"
    server_init = inspect.getsource(QuicServer.__init__)
    for name in ("_protocols", "_configuration", "_create_protocol", "_stream_handler",
                 "_loop", "_transport"):  # fmt: skip
        assert f"self.{name}" in server_init, f"aioquic QuicServer no longer sets {name}"
    _need_params(QuicServer._connection_id_issued, ["self", "cid", "protocol"], "id issued")
    _need_params(QuicServer._connection_id_retired, ["self", "cid", "protocol"], "id retired")
    _need_params(QuicServer._connection_terminated, ["self", "protocol"], "terminated")


def test_qh3_privates() -> None:
    qh3_connection = pytest.importorskip("qh3.quic.connection")
    from outrelay.transport.quic import _qh3

    qh3_protocol = pytest.importorskip("qh3.asyncio.protocol")
    qh3_configuration = pytest.importorskip("qh3.quic.configuration")
    conn_cls = qh3_connection.QuicConnection
    _need_params(conn_cls._drain_core, ["self"], "qh3 QuicConnection._drain_core")
    quic = conn_cls(configuration=qh3_configuration.QuicConfiguration(is_client=True))
    for name in ("_core", "_handshake_complete", "_remote_addr"):
        _need(quic, name, "qh3")
    for name in ("get_send_buffer_size", "max_concurrent_bidi_streams", "get_peercert",
                 "get_issuercerts"):  # fmt: skip
        _need(conn_cls, name, "qh3")
    # HeldQuicConnection pops while the core is ending: its states' names.
    quic.connect(("127.0.0.1", 4433), 0.0)
    quic.close()
    assert quic._core.state in _qh3.CORE_CLOSING_STATES, quic._core.state
    quic._core.handle_timer(100.0)
    assert quic._core.state in _qh3.CORE_CLOSING_STATES, quic._core.state
    for name in ("_transmit_soon", "_process_events"):
        _need(qh3_protocol.QuicConnectionProtocol, name, "qh3")
    init = inspect.getsource(qh3_protocol.QuicConnectionProtocol.__init__)
    for name in ("_quic", "_loop", "_connected"):
        assert f"self.{name}" in init, f"qh3 QuicConnectionProtocol no longer sets {name}"


def test_qh3_stream_limit_privates(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_qh3.HeldQuicConnection`` raises qh3's 100 peer-opened streams: qh3's
    ``_create_core`` must pass the literal 100 positionally as the core's
    ``local_max_streams_bidi``, and ``_create_tls`` build the TLS bridge whose
    transport parameters we rewrite, both through ``qh3.quic.connection``'s globals."""
    qh3_connection = pytest.importorskip("qh3.quic.connection")
    from qh3._hazmat import Buffer, QuicConnectionCore
    from qh3.quic.configuration import QuicConfiguration as Qh3Configuration
    from qh3.quic.packet import pull_quic_transport_parameters

    from outrelay.transport.quic import _qh3

    conn_cls = qh3_connection.QuicConnection
    _need_params(
        conn_cls._create_core,
        ["self", "remote_addr", "initial_dcid", "now"],
        "qh3 QuicConnection._create_core",
    )
    _need_params(conn_cls._create_tls, ["self", "remote_source_cid"], "qh3 _create_tls")
    assert qh3_connection.QuicConnectionCore is QuicConnectionCore, "qh3 moved its core class"
    _need(qh3_connection, "QuicTlsBridge", "qh3")
    names = [p.strip() for p in QuicConnectionCore.__text_signature__.strip("()").split(",")]
    assert names[_qh3.CORE_LOCAL_MAX_STREAMS_BIDI] == "local_max_streams_bidi", names
    calls: list[tuple[Any, ...]] = []

    def recording_core(*args: Any) -> Any:
        calls.append(args)
        return QuicConnectionCore(*args)

    monkeypatch.setattr(qh3_connection, "QuicConnectionCore", recording_core)
    config = Qh3Configuration(is_client=True, alpn_protocols=["orp/1"])
    conn_cls(configuration=config).connect(("127.0.0.1", 4433), 0.0)
    (args,) = calls
    assert len(args) == len(names)
    assert args[_qh3.CORE_LOCAL_MAX_STREAMS_BIDI] == _qh3.QH3_MAX_STREAMS_BIDI
    # Our subclass: the core gets our limit, the transport parameters announce it.
    calls.clear()
    ours = _qh3.HeldQuicConnection(configuration=config, max_streams_bidi=777)
    ours.connect(("127.0.0.1", 4433), 0.0)
    (args,) = calls
    assert args[_qh3.CORE_LOCAL_MAX_STREAMS_BIDI] == 777
    assert ours._tls is not None
    announced = pull_quic_transport_parameters(
        Buffer(data=ours._tls.serialize_transport_parameters())
    )
    assert announced.initial_max_streams_bidi == 777
    assert announced.initial_max_streams_uni == 103, "only the bidirectional limit changes"
