"""ORP frame codec: the 8-byte header, an encoder and an incremental sans-IO decoder.

Wire format (spec 01, "Frame header"; spec 02 §0), big-endian::

    byte 0-1   vvv rr ttttttttttt   version (3 bits), reserved (2 bits), type (11 bits)
    byte 2-3   flags                uint16, 0 in every frame the reference writes
    byte 4-7   length               uint32, payload length, at most MAX_PAYLOAD
    byte 8...  payload              protobuf message of the frame type (may be empty)

Theory of operation of :class:`FrameDecoder` (the shape of h11's ``ReceiveBuffer`` and
wsproto's ``FrameDecoder``):

* Bytes go in with :meth:`~FrameDecoder.receive_data`, EOF with
  :meth:`~FrameDecoder.receive_eof`; frames come out one at a time from
  :meth:`~FrameDecoder.next_frame`, which returns ``None`` when it needs more data. The
  decoder does no I/O and never raises from ``receive_data`` for peer errors; every peer
  error surfaces from ``next_frame``.
* It never consumes bytes past the frame it returns. The reference reads exactly one frame
  (``io.ReadFull`` of header, then payload) and the bytes that follow belong to the splice
  (spec 02 §0 [REC]). Whatever was fed but not yet returned as a frame is handed on with
  :meth:`~FrameDecoder.trailing_data`.
* The length limit is checked on the header alone, before any payload is buffered, and the
  decoder never pre-allocates the declared length: a peer that declares 16 MiB and sends
  8 bytes costs us 8 bytes.
* Buffering is O(n) overall: the buffer is a ``bytearray`` read through an offset and
  compacted only when the consumed prefix is at least as large as what remains, so each
  compaction copies no more than was consumed since the previous one.
* Once it has raised a :class:`RemoteProtocolError`, the decoder stays failed: every later
  ``next_frame`` re-raises the same error and further data is dropped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, NoReturn

from .errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError, UnexpectedEOF
from .frame_types import FrameType

__all__ = [
    "HEADER_SIZE",
    "MAX_FLAGS",
    "MAX_FRAME_TYPE",
    "MAX_PAYLOAD",
    "MAX_VERSION",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameDecoder",
    "could_start_frame",
    "decode_frame",
    "encode_frame",
]

HEADER_SIZE: Final = 8
"""Size of the fixed frame header in bytes."""

# The reference's limit (lib/orp/frame.go): a declared length above 1<<24 is rejected
# before the payload is read, exactly 1<<24 is accepted (spec 01, spec 02 §0). It bounds
# the memory one frame can make us hold; ORP payloads are small protobuf control messages
# (stream bytes never travel inside frames), so 16 MiB is generous, and matching the
# reference exactly keeps us interoperable in both directions.
MAX_PAYLOAD: Final = 1 << 24
"""Largest payload length accepted or produced (16 MiB, inclusive)."""

PROTOCOL_VERSION: Final = 1
"""The only version the reference writes (spec 01)."""

MAX_VERSION: Final = 0x7
"""Largest value of the 3-bit version field."""

MAX_FRAME_TYPE: Final = 0x7FF
"""Largest value of the 11-bit type field."""

MAX_FLAGS: Final = 0xFFFF
"""Largest value of the 16-bit flags field."""

_HEADER: Final = struct.Struct(">HHI")
_TYPE_MASK: Final = 0x7FF
_VERSION_SHIFT: Final = 13  # version is the top 3 bits of the first 16-bit word
_RESERVED_MASK: Final = 0x1800  # the 2 reserved bits between version and type
_KNOWN_TYPES: Final[dict[int, FrameType]] = {t.value: t for t in FrameType}
_REPR_PAYLOAD_MAX: Final = 64


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded (or to-be-encoded) ORP frame.

    Attributes:
        type: the frame type, a :class:`FrameType` when known, otherwise the raw ``int``
            (unknown types decode fine; the relay ignores them).
        payload: the raw payload bytes (decode them with ``decode_message``).
        version: the 3-bit version field; 1 for every frame the reference writes. The
            decoder does not validate it (spec 02 §0).
        flags: the 16-bit flags field; 0 for every frame the reference writes. Not
            validated by the decoder either.
    """

    type: int
    payload: bytes = b""
    version: int = PROTOCOL_VERSION
    flags: int = 0

    def __repr__(self) -> str:
        kind = self.type.name if isinstance(self.type, FrameType) else f"0x{self.type:03x}"
        if len(self.payload) <= _REPR_PAYLOAD_MAX:
            shown = repr(self.payload)
        else:
            shown = f"<{len(self.payload)} bytes: {self.payload[:32]!r}...>"
        return f"Frame(type={kind}, payload={shown}, version={self.version}, flags={self.flags})"


def _frame_type(code: int) -> int:
    """Return ``FrameType(code)`` if known, else ``code`` itself."""
    return _KNOWN_TYPES.get(code, code)


def encode_frame(
    frame_type: int,
    payload: bytes | bytearray | memoryview = b"",
    *,
    version: int = PROTOCOL_VERSION,
    flags: int = 0,
) -> bytes:
    """Serialise one frame: the 8-byte header followed by ``payload``.

    The two reserved header bits are always written as 0 (spec 01).

    Args:
        frame_type: the 11-bit frame type (a :class:`FrameType` or any ``int`` in range).
        payload: the already-serialised payload (use ``encode_message`` for protobuf).
        version: the 3-bit version; the reference writes 1.
        flags: the 16-bit flags; the reference writes 0.

    Returns:
        The complete frame, ready to write to a stream.

    Raises:
        LocalProtocolError: ``version`` is outside 0..7, ``frame_type`` outside 0..0x7FF,
            ``flags`` outside 0..0xFFFF, or the payload is longer than ``MAX_PAYLOAD``.
    """
    if not 0 <= version <= MAX_VERSION:
        raise LocalProtocolError(f"frame version {version} does not fit in 3 bits (0..7)")
    if not 0 <= frame_type <= MAX_FRAME_TYPE:
        raise LocalProtocolError(f"frame type {frame_type:#x} does not fit in 11 bits")
    if not 0 <= flags <= MAX_FLAGS:
        raise LocalProtocolError(f"frame flags {flags:#x} do not fit in 16 bits")
    length = len(payload)
    if length > MAX_PAYLOAD:
        raise LocalProtocolError(
            f"frame payload of {length} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD} bytes)"
        )
    header = _HEADER.pack((version << _VERSION_SHIFT) | int(frame_type), flags, length)
    return header + payload


def _parse_header(data: bytes | bytearray, offset: int) -> tuple[int, int, int, int]:
    """Parse the header at ``offset``; return ``(type, version, flags, length)``.

    Raises:
        FrameTooLarge: the declared length exceeds ``MAX_PAYLOAD``.
    """
    first, flags, length = _HEADER.unpack_from(data, offset)
    frame_type = first & _TYPE_MASK  # the 2 reserved bits are ignored
    if length > MAX_PAYLOAD:
        raise FrameTooLarge(
            f"frame {frame_type:#05x} declares a payload of {length} bytes, "
            f"above MAX_PAYLOAD ({MAX_PAYLOAD})",
            length=length,
        )
    return frame_type, first >> _VERSION_SHIFT, flags, length


def could_start_frame(
    data: bytes | bytearray, frame_type: int, *, version: int = PROTOCOL_VERSION
) -> bool:
    """Can ``data`` begin a frame of ``frame_type`` and ``version``?

    Only the first header word is looked at (version and type; the reserved bits are
    ignored, as the decoder ignores them): one byte gives the version and the type's high
    3 bits, two bytes the whole type. Empty ``data`` can begin anything.
    """
    word = (version << _VERSION_SHIFT) | (frame_type & _TYPE_MASK)
    if len(data) >= 2:
        first = (data[0] << 8) | data[1]
        return first >> _VERSION_SHIFT == version and first & _TYPE_MASK == frame_type
    if len(data) == 1:
        mask = (0xFFFF & ~_RESERVED_MASK) >> 8
        return data[0] & mask == (word >> 8) & mask
    return True


def decode_frame(data: bytes | bytearray | memoryview) -> tuple[Frame, bytes]:
    """Decode exactly one complete frame from the start of ``data``.

    Convenience for callers that already hold whole frames (tests, datagrams). Streams
    should use :class:`FrameDecoder`.

    Args:
        data: bytes starting with a frame header.

    Returns:
        ``(frame, rest)``: the frame and every byte after it, untouched.

    Raises:
        UnexpectedEOF: ``data`` ends inside the header or payload (or is empty).
        FrameTooLarge: the header declares more than ``MAX_PAYLOAD`` bytes.
    """
    buf = bytes(data)
    if len(buf) < HEADER_SIZE:
        raise UnexpectedEOF(f"need {HEADER_SIZE} header bytes, have {len(buf)}")
    frame_type, version, flags, length = _parse_header(buf, 0)
    end = HEADER_SIZE + length
    if len(buf) < end:
        raise UnexpectedEOF(f"frame declares {length} payload bytes, have {len(buf) - HEADER_SIZE}")
    frame = Frame(_frame_type(frame_type), buf[HEADER_SIZE:end], version, flags)
    return frame, buf[end:]


class FrameDecoder:
    """Incremental, sans-IO decoder for a stream of ORP frames.

    Typical loop::

        decoder = FrameDecoder()
        while (frame := decoder.next_frame()) is None and not decoder.at_eof:
            data = await stream.receive_some(65536)   # b"" on EOF
            if data:
                decoder.receive_data(data)
            else:
                decoder.receive_eof()
        rest = decoder.trailing_data()                  # first bytes of the splice

    Any exception other than :class:`RemoteProtocolError` (or :class:`LocalProtocolError`
    for API misuse) escaping this class is a bug.
    """

    __slots__ = ("_buf", "_eof", "_error", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the bytes not yet returned as a frame
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Number of bytes received but not yet returned in a frame."""
        return len(self._buf) - self._pos

    @property
    def at_eof(self) -> bool:
        """``True`` once EOF was received at a frame boundary and every frame was returned."""
        return self._eof and self._error is None and len(self._buf) == self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes read from the stream.

        Never raises for peer errors; call :meth:`next_frame` until it returns ``None``.
        An empty ``data`` is a no-op (EOF is :meth:`receive_eof`). Data fed to a decoder
        that has failed is dropped.

        Args:
            data: the bytes, as read.

        Raises:
            LocalProtocolError: called after :meth:`receive_eof`.
        """
        if self._eof:
            raise LocalProtocolError("receive_data() called after receive_eof()")
        if self._error is None and data:
            self._buf += data

    def receive_eof(self) -> None:
        """Record that the peer closed its sending side. Idempotent.

        Call :meth:`next_frame` afterwards: it drains any complete frames, then returns
        ``None`` with :attr:`at_eof` set, or raises :class:`UnexpectedEOF` if the stream
        ended inside a frame.
        """
        self._eof = True

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or ``None`` if more data is needed.

        Consumes exactly the bytes of the returned frame; later bytes stay buffered.

        Returns:
            The frame, or ``None``: more data is needed, or (when :attr:`at_eof` is
            ``True``) the stream ended cleanly at a frame boundary.

        Raises:
            FrameTooLarge: the next header declares more than ``MAX_PAYLOAD`` bytes. Raised
                as soon as the 8 header bytes are buffered.
            UnexpectedEOF: EOF was received inside a header or a payload.

        Once this raised, every later call re-raises the same error.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < HEADER_SIZE:
            if self._eof and available:
                self._fail(UnexpectedEOF(f"EOF inside a frame header ({available} of 8 bytes)"))
            return None
        try:
            frame_type, version, flags, length = _parse_header(buf, pos)
        except RemoteProtocolError as exc:
            self._fail(exc)
        start = pos + HEADER_SIZE
        end = start + length
        if len(buf) < end:
            if self._eof:
                self._fail(
                    UnexpectedEOF(
                        f"EOF inside the payload of frame {frame_type:#05x} "
                        f"({len(buf) - start} of {length} bytes)"
                    )
                )
            return None
        if length:
            view = memoryview(buf)
            try:
                payload = view[start:end].tobytes()
            finally:
                view.release()
        else:
            payload = b""
        self._consume(end)
        return Frame(_frame_type(frame_type), payload, version, flags)

    def trailing_data(self) -> bytes:
        """Return, and forget, every byte buffered after the last returned frame.

        Use it when the framed part of a stream is over (for example after OPEN_STREAM or
        STREAM_ACCEPT) to hand the surplus to the splice (spec 02 §0 [REC]). After this
        call :attr:`buffered` is 0.

        Returns:
            The buffered bytes, possibly empty.
        """
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def _consume(self, end: int) -> None:
        """Advance past a returned frame, compacting the buffer when it pays off."""
        buf = self._buf
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end >= len(buf) - end:
            # The consumed prefix is at least as long as the rest: copying the rest costs
            # no more than what was consumed since the last compaction (O(n) overall).
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end

    def _fail(self, error: RemoteProtocolError) -> NoReturn:
        """Enter the failed state, drop the buffer and raise ``error``."""
        self._error = error
        self._buf.clear()
        self._pos = 0
        raise error
