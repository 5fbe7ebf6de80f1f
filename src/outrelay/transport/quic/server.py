"""The aioquic QUIC server: admission in front of every new connection, client-certificate checks.

* **Client certificates.** aioquic's TLS context has a private switch to send
  a CertificateRequest and never verifies a client chain (it even accepts an
  empty Certificate). The server side flips the switch
  (:func:`_aioquic.install_patches`) and verifies the chain itself with
  ``verify_client`` once the handshake completes; a refused client gets
  CONNECTION_CLOSE with application code 0 and the reason as its reason
  phrase (``bad client certificate: ...``). With TLS 1.3 the client has
  finished its handshake by then, so this close, not a handshake failure,
  is what tells it; a reference relay sends an empty reason.
* **Bounded pre-authentication work** (:class:`_GuardedServer`). aioquic's
  server builds a connection for every Initial-shaped datagram of 1200+
  bytes, never validates addresses unless told to, and keeps a connection
  whose handshake never completes for its idle timeout plus a closing
  period. Ours routes datagrams of known connections first (a short header
  costs one slice and one dict lookup), drops what cannot start a handshake
  before parsing it further (short, wrong version, not an Initial), asks
  :class:`outrelay.transport.admission.QuicAdmission` before it allocates
  anything (caps, per-source rate, stateless Retry under pressure or
  always), forgets a connection at once when its first Initial does not
  decrypt, and at the handshake deadline (``HANDSHAKE_TIMEOUT``) frees
  the connection without a closing period.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
)
from aioquic.quic.retry import QuicRetryTokenHandler

from outrelay.transport.addresses import bind_udp, fold_address
from outrelay.transport.admission import QuicAdmission, RetryMode, Verdict
from outrelay.transport.base import BrokenResourceError
from outrelay.transport.quic import _aioquic
from outrelay.transport.quic.client import PacketEndpoint, server_configuration
from outrelay.transport.quic.connection import close_phrase
from outrelay.transport.quic.protocol import AioquicProtocol, QuicConn
from outrelay.transport.tls import FORWARD_ALPN, QuicTlsConfig
from outrelay.transport.udp import BatchDatagramTransport

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "QuicServerHandle",
    "QuicServerStatistics",
    "VerifyClient",
    "accept_quic_on",
    "serve_quic",
    "server_protocol_factory",
]

log = logging.getLogger("outrelay.transport.quic")

VerifyClient = Callable[["x509.Certificate | None", "tuple[x509.Certificate, ...]"], str]


@dataclass(frozen=True)
class QuicServerStatistics:
    """A snapshot of one QUIC listener (trio-style ``statistics()``)."""

    connections: int
    """Connections whose protocol is alive (handshaking or established)."""
    routed_ids: int
    """Connection IDs the listener routes: what it still holds for its connections."""


class QuicServerHandle:
    """A bound QUIC listener; :meth:`close` stops it and every connection."""

    def __init__(self, server: _GuardedServer, protocols: set[AioquicProtocol]) -> None:
        self._server = server
        self._protocols = protocols

    @property
    def admission(self) -> QuicAdmission:
        """Half-open handshakes, Retry state and verdict counts (for logs and tests)."""
        return self._server.admission

    @property
    def address(self) -> tuple[str, int]:
        transport = self._server.transport
        assert transport is not None
        sock = transport.get_extra_info("sockname")
        return fold_address(sock)

    def statistics(self) -> QuicServerStatistics:
        return QuicServerStatistics(
            connections=len(self._protocols), routed_ids=len(self._server.routes)
        )

    def reload_tls(self, tls: QuicTlsConfig) -> None:
        """New handshakes use ``tls`` (certificate reload); open connections keep theirs.

        Raises:
            OSError, ValueError: the files cannot be loaded (the old configuration stays).
        """
        self._server.quic_configuration = server_configuration(tls)

    def close(self) -> None:
        for protocol in list(self._protocols):
            protocol.conn.close(0, "")
        self._server.close()


def server_protocol_factory(
    verify_client: Callable[[x509.Certificate | None, tuple[x509.Certificate, ...]], str],
    on_connection: Callable[[QuicConn], None],
    on_refused: Callable[[tuple[str, int], str], None] | None,
    protocols: set[AioquicProtocol],
) -> Callable[..., AioquicProtocol]:
    """``create_protocol`` for a :class:`_aioquic.ServerBase`: verify the client, then hand it over.

    Every live protocol is kept in ``protocols`` until its connection ends.
    """

    def handshake_done(protocol: AioquicProtocol) -> None:
        conn = protocol.conn
        try:
            conn.identity = verify_client(conn.peer.certificate, conn.peer.chain)
        except Exception as exc:
            reason = str(getattr(exc, "reason", "") or exc)
            if on_refused is not None:
                on_refused(conn.peer.address, reason)
            conn.close(0, close_phrase(f"bad client certificate: {reason}"))
            return
        on_connection(conn)

    def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> AioquicProtocol:
        protocol = AioquicProtocol(quic, stream_handler, on_handshake=handshake_done)
        protocols.add(protocol)
        protocol.conn.add_close_callback(lambda: protocols.discard(protocol))
        return protocol

    return create_protocol


RETRY_CID_LENGTH = 8
"""Bytes of the connection ID a Retry packet hands the client (aioquic's own
choice, and our ``connection_id_length``)."""


class _GuardedServer(_aioquic.ServerBase):
    """aioquic's server with admission in front of every new connection.

    Replaces ``datagram_received`` entirely (see the module docstring); the
    rest (CID bookkeeping callbacks, ``close``) is aioquic's, reached through
    :class:`_aioquic.ServerBase`.
    """

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        create_protocol: Callable[..., AioquicProtocol],
        admission: QuicAdmission,
    ) -> None:
        # retry=False: aioquic's own Retry path would validate a token only
        # while its switch is on; ours validates every token, always.
        super().__init__(configuration=configuration, create_protocol=create_protocol)
        self.admission = admission
        self._tokens = QuicRetryTokenHandler()
        """One key for the listener's lifetime: a client that got a Retry under
        pressure is validated with it even after the pressure has ended."""
        self._cid_length = configuration.connection_id_length
        self._versions = frozenset(configuration.supported_versions)
        self._retrying = False

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not isinstance(data, bytes) or not data:
            return
        protocols = self.routes
        if not data[0] & 0x80:
            # Short header (1-RTT): established connections, the hot path.
            # Our CIDs all have ``connection_id_length`` bytes.
            protocol = protocols.get(data[1 : 1 + self._cid_length])
            if protocol is not None:
                protocol.datagram_received(data, addr)
            return
        if len(data) < 7:
            return
        protocol = protocols.get(data[6 : 6 + data[5]])
        if protocol is not None:  # a long header of a connection we know
            protocol.datagram_received(data, addr)
            return
        if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return  # cannot start a handshake (RFC 9000 §14.1)
        version = int.from_bytes(data[1:5], "big")
        now = self.loop.time()
        source = fold_address(addr)[0]
        if version not in self._versions:
            if version != 0:  # never answer a Version Negotiation packet
                self._version_negotiation(data, addr, source, now)
            return
        try:
            header = _aioquic.parse_header(data, self._cid_length)
        except ValueError:
            return
        if header.packet_type != QuicPacketType.INITIAL:
            return
        if header.token:
            self._validated_initial(header, data, addr, source, now)
            return
        verdict = self.admission.check_new(source, now)
        if verdict is Verdict.ADMIT:
            self._start(header.destination_cid, data, addr, source, validated=False)
        elif verdict is Verdict.RETRY:
            self._send_retry(header, addr, now)
        self._note_pressure(now)

    def _note_pressure(self, now: float) -> None:
        retrying = self.admission.retry_active(now)
        if retrying != self._retrying:
            self._retrying = retrying
            half_open = self.admission.half_open
            log.info(
                "QUIC address validation (Retry) %s",
                "on" if retrying else "off",
                extra={
                    "attrs": {
                        "mode": self.admission.mode.value,
                        "half_open": half_open.total,
                        "unvalidated": self.admission.unvalidated.total,
                        **self.admission.stats,
                    }
                },
            )

    def _validated_initial(
        self, header: Any, data: bytes, addr: Any, source: str, now: float
    ) -> None:
        # Every token is ours (aioquic never sends NEW_TOKEN), so every token
        # is checked, whatever the mode and the pressure right now.
        try:
            original_dcid = self._tokens.validate_token(
                address=addr, destination_cid=header.destination_cid, token=header.token, now=now
            )
        except ValueError:
            # RFC 9000 §8.1.3 says SHOULD close with INVALID_TOKEN; building
            # that close costs Initial key derivation and AEAD for a packet a
            # flood would send by the thousand. Dropping is allowed (SHOULD).
            return
        if self.admission.check_validated(source) is Verdict.ADMIT:
            self._start(
                header.destination_cid,
                data,
                addr,
                source,
                validated=True,
                original_dcid=original_dcid,
            )

    def _send_retry(self, header: Any, addr: Any, now: float) -> None:
        retry_cid = os.urandom(RETRY_CID_LENGTH)
        try:
            token = self._tokens.create_token(
                address=addr,
                original_destination_connection_id=header.destination_cid,
                retry_source_connection_id=retry_cid,
                now=now,
            )
        except ValueError:
            return  # an address the token cannot encode (e.g. a scoped IPv6 literal)
        packet = encode_quic_retry(
            version=header.version,
            source_cid=retry_cid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid,
            retry_token=token,
        )
        self._send(packet, addr)

    def _send(self, packet: bytes, addr: Any) -> None:
        transport = self.transport
        if transport is not None:
            transport.sendto(packet, addr)

    def _version_negotiation(self, data: bytes, addr: Any, source: str, now: float) -> None:
        if not self.admission.allow_reply(source, now):
            return
        try:
            header = _aioquic.parse_header(data, self._cid_length)
        except ValueError:
            return
        packet = encode_quic_version_negotiation(
            source_cid=header.destination_cid,
            destination_cid=header.source_cid,
            supported_versions=list(self._versions),
        )
        self._send(packet, addr)

    def _start(
        self,
        dcid: bytes,
        data: bytes,
        addr: Any,
        source: str,
        *,
        validated: bool,
        original_dcid: bytes | None = None,
    ) -> None:
        """aioquic's connection set-up (``QuicServer.datagram_received``), after our checks."""
        connection = QuicConnection(
            configuration=self.quic_configuration,
            original_destination_connection_id=original_dcid if validated else dcid,
            retry_source_connection_id=dcid if validated else None,
        )
        protocol: AioquicProtocol = self.start_connection(connection, dcid)

        admission = self.admission
        admission.opened(source, validated=validated)
        released = False

        def release(_: object = None) -> None:
            nonlocal released
            if not released:
                released = True
                admission.closed(source, validated=validated)

        # Done when the handshake completes, or fails/expires/is discarded.
        protocol.handshake.add_done_callback(release)
        protocol.datagram_received(data, addr)
        # aioquic moves a server connection out of FIRSTFLIGHT once a packet
        # decrypted; still there, the Initial was
        # garbage with a plausible header: nothing will ever come of it.
        if _aioquic.still_first_flight(connection):
            protocol.discard("first Initial did not decrypt")


async def serve_quic(
    host: str,
    port: int,
    tls: QuicTlsConfig,
    *,
    verify_client: Callable[[x509.Certificate | None, tuple[x509.Certificate, ...]], str],
    on_connection: Callable[[QuicConn], None],
    on_refused: Callable[[tuple[str, int], str], None] | None = None,
    retry: RetryMode = RetryMode.AUTO,
    admission: QuicAdmission | None = None,
) -> QuicServerHandle:
    """Listen for QUIC connections; hand each verified one to ``on_connection``.

    Args:
        verify_client: called with the client's leaf (None if it sent none) and
            chain; returns the identity (first URI SAN) or raises an exception
            whose ``reason`` (or str) is logged. Refused connections are closed
            with application code 0 (spec 02 §2.2) and, ours, the reason as
            the reason phrase: ``bad client certificate: <reason>``.
        on_connection: called synchronously with every accepted connection;
            ``conn.identity`` is set.
        on_refused: called with (peer address, reason) for refused clients.
        retry: when clients must prove their address with a Retry round trip
            first (:class:`RetryMode`; the relay's ``--quic-retry``).
        admission: the admission state (default: a fresh
            :class:`~outrelay.transport.admission.QuicAdmission` with ``retry``
            and the module's caps); tests pass smaller caps.

    Raises:
        OSError: the address could not be bound.
    """
    config = server_configuration(tls)
    protocols: set[AioquicProtocol] = set()
    create_protocol = server_protocol_factory(verify_client, on_connection, on_refused, protocols)
    sock = await bind_udp(host, port)
    try:
        server = _GuardedServer(
            configuration=config,
            create_protocol=create_protocol,
            admission=admission if admission is not None else QuicAdmission(retry),
        )
        BatchDatagramTransport(asyncio.get_running_loop(), sock, server)
    except OSError:
        sock.close()
        raise
    return QuicServerHandle(server, protocols)


async def accept_quic_on(
    endpoint: PacketEndpoint,
    tls: QuicTlsConfig,
    *,
    alpn: str = FORWARD_ALPN,
    verify_client: Callable[[x509.Certificate | None, tuple[x509.Certificate, ...]], str],
    accept_timeout: float,
    idle_timeout: float,
    keepalive_interval: float,
    silence_timeout: float,
) -> QuicConn:
    """Accept one QUIC connection over ``endpoint`` (QUIC server, client cert required).

    Later connection attempts on the endpoint are refused (closed at once).

    Raises:
        BrokenResourceError: no verified connection within ``accept_timeout``.
    """
    config = server_configuration(tls, alpn, idle_timeout)  # ``verify_client`` checks the chain
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[QuicConn] = loop.create_future()
    refusals: list[str] = []

    def handshake_done(protocol: AioquicProtocol) -> None:
        conn = protocol.conn
        try:
            conn.identity = verify_client(conn.peer.certificate, conn.peer.chain)
        except Exception as exc:
            refusals.append(str(getattr(exc, "reason", "") or exc))
            conn.close(0, "")
            return
        if accepted.done():
            conn.close(0, "")
            return
        accepted.set_result(conn)

    def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> AioquicProtocol:
        protocol = AioquicProtocol(
            quic,
            stream_handler,
            on_handshake=handshake_done,
            keepalive_interval=keepalive_interval,
            silence_timeout=silence_timeout,
            handshake_timeout=accept_timeout,
        )
        protocol.conn.announce_streams()
        return protocol

    server = _aioquic.ServerBase(configuration=config, create_protocol=create_protocol)
    server.connection_made(endpoint.attach(server))
    try:
        async with asyncio.timeout(accept_timeout):
            return await asyncio.shield(accepted)
    except TimeoutError as exc:
        for protocol in set(server.routes.values()):
            if isinstance(protocol, AioquicProtocol):
                protocol.conn.close(0, "")
        why = f" (refused: {refusals[-1]})" if refusals else ""
        raise BrokenResourceError(
            f"no QUIC connection over the forward plane within {accept_timeout:g}s{why}"
        ) from exc
    finally:
        if not accepted.done():
            accepted.cancel()
