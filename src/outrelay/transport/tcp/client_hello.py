"""The ALPN list of a TLS ClientHello, read before OpenSSL sees it (sans-IO).

The TCP server reads the ClientHello first: a client offering ALPN without
``orp/1`` gets a ``no_application_protocol`` alert, one offering no ALPN is
accepted (spec 02 §9.1, as Go's crypto/tls does). :func:`client_hello_alpn`
takes the bytes received so far and does no I/O.
"""

from __future__ import annotations

__all__ = ["IncompleteClientHello", "client_hello_alpn"]


class IncompleteClientHello(Exception):
    """More bytes are needed to see the whole ClientHello."""


def client_hello_alpn(data: bytes | bytearray) -> list[bytes] | None:
    """Return the ALPN protocols a TLS ClientHello offers (``None``: no ALPN extension).

    ``data`` is what the client sent first: TLS records carrying the
    ClientHello, possibly split across several records.

    Raises:
        IncompleteClientHello: ``data`` stops before the end of the ClientHello.
        ValueError: this is not a TLS ClientHello.
    """
    handshake = bytearray()
    pos = 0
    while True:
        if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
            break
        if pos + 5 > len(data):
            raise IncompleteClientHello
        if data[pos] != 22:  # handshake record
            raise ValueError(f"TLS record type {data[pos]}, not handshake")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        fragment = data[pos + 5 : pos + 5 + length]
        handshake += fragment
        pos += 5 + length
        if len(fragment) < length and len(handshake) < 4:
            raise IncompleteClientHello
        if len(fragment) < length:
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if len(handshake) < needed:
                raise IncompleteClientHello
    if handshake[0] != 1:
        raise ValueError(f"handshake message type {handshake[0]}, not ClientHello")
    body = memoryview(handshake)[4 : 4 + int.from_bytes(handshake[1:4], "big")]
    reader = _Reader(body)
    reader.skip(2 + 32)  # legacy_version, random
    reader.skip(reader.uint(1))  # legacy_session_id
    reader.skip(reader.uint(2))  # cipher_suites
    reader.skip(reader.uint(1))  # legacy_compression_methods
    if reader.at_end():
        return None
    extensions = _Reader(reader.take(reader.uint(2)))
    while not extensions.at_end():
        ext_type = extensions.uint(2)
        ext = extensions.take(extensions.uint(2))
        if ext_type == 16:  # application_layer_protocol_negotiation
            names = _Reader(_Reader(ext).take_prefixed(2))
            protocols = []
            while not names.at_end():
                protocols.append(bytes(names.take(names.uint(1))))
            return protocols
    return None


class _Reader:
    def __init__(self, data: memoryview | bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def take(self, n: int) -> memoryview:
        if self._pos + n > len(self._data):
            raise ValueError("truncated ClientHello")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def take_prefixed(self, size: int) -> memoryview:
        return self.take(self.uint(size))

    def skip(self, n: int) -> None:
        self.take(n)

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def at_end(self) -> bool:
        return self._pos >= len(self._data)
