"""A raw ORP agent for relay tests: mTLS QUIC, hand-built frames, nothing the library adds.

Shared by the relay test modules (spec-driven P2P frames, hostile agents). The clients
speak mTLS QUIC (``connect_quic``) and build and parse frames and protobuf payloads by
hand (8-byte header, hand-rolled varints), so a relay that re-encodes, reorders or drops
bytes shows up as a byte difference. ``running_relay`` starts a real in-process relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import struct
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from devpki import DevPki

from outrelay.relay import Relay, RelayConfig
from outrelay.relay.policy import PolicyService, load_policy_file
from outrelay.transport import QuicTlsConfig, Stream, TransportError, connect_quic
from outrelay.transport.quic import QuicConn

WAIT = 5.0
"""Bound on every single wait for something that must happen."""
QUIET = 0.3
"""How long "nothing arrives" is watched where a PING/PONG barrier is not enough."""

# -- frame types (spec 01, "Frame types") -------------------------------------------------

HELLO = 0x001
HELLO_ACK = 0x002
REGISTER = 0x003
REGISTER_ACK = 0x004
OPEN_STREAM = 0x010
INCOMING_STREAM = 0x011
STREAM_ACCEPT = 0x012
PING = 0x020
PONG = 0x021
OBSERVED_ADDR_QUERY = 0x120
OBSERVED_ADDR_RESP = 0x121
CANDIDATE_OFFER = 0x122
CANDIDATE_ANSWER = 0x123
MIGRATE_TO_P2P = 0x124
STREAM_READY = 0x152

# The relay's extension field on STREAM_READY (ours) and its values: P2PMode + 1.
P2P_MODE_FIELD = 100
MODE_VALUE = {"allowed": 1, "forbidden": 2, "required": 3}


# -- hand-rolled wire encoding ------------------------------------------------------------


def frame(
    ftype: int, payload: bytes = b"", *, version: int = 1, flags: int = 0, reserved: int = 0
) -> bytes:
    """An ORP frame: vvv rr ttttttttttt | flags | length | payload (spec 01)."""
    first = (version << 13) | (reserved << 11) | ftype
    return struct.pack(">HHI", first, flags, len(payload)) + payload


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def pb_int(field_no: int, value: int) -> bytes:
    return varint(field_no << 3) + varint(value)


def pb_bytes(field_no: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return varint((field_no << 3) | 2) + varint(len(data)) + data


def pb_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Decode a protobuf message into ``[(field number, value)]`` in wire order."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0

    def read_varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < len(data):
        key = read_varint()
        wire = key & 7
        if wire == 0:
            out.append((key >> 3, read_varint()))
        elif wire == 2:
            length = read_varint()
            out.append((key >> 3, data[pos : pos + length]))
            pos += length
        else:  # pragma: no cover - nothing the relay sends uses other wire types
            raise AssertionError(f"unexpected wire type {wire} in {data!r}")
    return out


@dataclass(frozen=True)
class RawFrame:
    raw: bytes
    """Header and payload exactly as read."""

    @property
    def version(self) -> int:
        return self.raw[0] >> 5

    @property
    def reserved(self) -> int:
        return (self.raw[0] >> 3) & 3

    @property
    def type(self) -> int:
        return int.from_bytes(self.raw[0:2], "big") & 0x7FF

    @property
    def flags(self) -> int:
        return int.from_bytes(self.raw[2:4], "big")

    @property
    def payload(self) -> bytes:
        return self.raw[8:]

    def fields(self) -> list[tuple[int, int | bytes]]:
        return pb_fields(self.payload)


class Buffered:
    """A data stream read frame by frame, then byte by byte; never loses surplus bytes."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.eof = False

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
            raise EOFError
        self.buf += data

    async def read_exact(self, n: int) -> bytes:
        async with asyncio.timeout(WAIT):
            while len(self.buf) < n:
                await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_frame(self) -> RawFrame:
        header = await self.read_exact(8)
        length = int.from_bytes(header[4:8], "big")
        return RawFrame(header + await self.read_exact(length))

    async def read_frame_unbounded(self) -> RawFrame:
        """For the ctrl reader task: waits as long as the test does (``next_frame`` bounds it)."""
        while len(self.buf) < 8:
            await self._fill()
        length = int.from_bytes(self.buf[4:8], "big")
        while len(self.buf) < 8 + length:
            await self._fill()
        raw = bytes(self.buf[: 8 + length])
        del self.buf[: 8 + length]
        return RawFrame(raw)

    async def wait_eof(self, within: float) -> None:
        """Return at EOF (bytes that arrive first are kept); TimeoutError if none comes."""
        async with asyncio.timeout(within):
            while True:
                try:
                    await self._fill()
                except EOFError:
                    return

    async def assert_open(self, watch: float = QUIET) -> None:
        """No EOF and no error for ``watch`` seconds (data is allowed)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(watch):
                while True:
                    try:
                        await self._fill()
                    except EOFError:
                        raise AssertionError("stream saw EOF") from None


# -- a raw agent ----------------------------------------------------------------------------


class RawAgent:
    """mTLS QUIC + ctrl stream + HELLO, and nothing else the library would add."""

    def __init__(self, conn: QuicConn, ctrl: Stream, uri: str) -> None:
        self.conn = conn
        self.ctrl = ctrl
        self.uri = uri
        self.frames: asyncio.Queue[RawFrame | None] = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read_ctrl())
        self.hello_ack: RawFrame | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        tls: QuicTlsConfig,
        uri: str,
        capabilities: Sequence[str] = (),
        protocol_version: str = "orp/1",
    ) -> RawAgent:
        async with asyncio.timeout(WAIT):
            conn = await connect_quic(host, port, tls)
        ctrl = await conn.open_stream()
        hello = pb_bytes(1, protocol_version) + pb_bytes(2, uri)
        for cap in capabilities:
            hello += pb_bytes(3, cap)
        await ctrl.send_all(frame(HELLO, hello))
        agent = cls(conn, ctrl, uri)
        agent.hello_ack = await agent.next_frame()
        assert agent.hello_ack.type == HELLO_ACK
        return agent

    async def _read_ctrl(self) -> None:
        buf = Buffered(self.ctrl)
        try:
            while True:
                await self.frames.put(await buf.read_frame_unbounded())
        except (EOFError, TransportError):
            await self.frames.put(None)

    async def send(self, data: bytes) -> None:
        await self.ctrl.send_all(data)

    async def next_frame(self, within: float = WAIT) -> RawFrame:
        async with asyncio.timeout(within):
            got = await self.frames.get()
        assert got is not None, "ctrl stream ended"
        return got

    async def ping_pong(self) -> None:
        """PING; the very next ctrl frame must be the PONG (the relay is sequential, §3).

        So nothing was queued on this agent's ctrl before it, and the connection is up.
        """
        await self.send(frame(PING))
        got = await self.next_frame()
        assert got.raw == frame(PONG), f"expected only a PONG, got {got.raw.hex(' ')}"

    async def register(self, service: str) -> None:
        await self.send(frame(REGISTER, pb_bytes(1, service)))
        ack = await self.next_frame()
        assert ack.type == REGISTER_ACK

    def local_port(self) -> int:
        address = self.conn.local_address
        assert address is not None
        return address[1]

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self.conn.close(0, "")
        with contextlib.suppress(TimeoutError, TransportError):
            async with asyncio.timeout(2):
                await self.conn.wait_closed()


# -- PKI, relay, pairs --------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """The session's dev PKI (``tests/devpki.py``) as the relay tests use it."""

    dev: DevPki

    def agent(self, tenant: str = "acme") -> tuple[QuicTlsConfig, str]:
        """A fresh agent identity of ``tenant``: its TLS config and URI."""
        identity = self.dev.issue_agent(tenant=tenant)
        return self.dev.tls(identity), identity.uri


@dataclass
class Harness:
    pki: Pki
    relay: Relay
    host: str
    port: int
    agents: list[RawAgent] = field(default_factory=list)

    async def agent(
        self,
        capabilities: Sequence[str] = (),
        *,
        tenant: str = "acme",
        host: str | None = None,
        protocol_version: str = "orp/1",
    ) -> RawAgent:
        tls, uri = self.pki.agent(tenant)
        agent = await RawAgent.connect(
            host or self.host, self.port, tls, uri, capabilities, protocol_version
        )
        self.agents.append(agent)
        return agent


def policy_rules(caller_mode: str = "allowed", callee_mode: str = "allowed") -> list[dict]:
    """Caller side (consumer -> service) and callee side (provider -> consumer URI), §6.2."""
    return [
        {
            "id": "caller",
            "caller": "outrelay://acme/*",
            "target": "svc-*",
            "decision": "allow",
            "p2p_mode": caller_mode,
        },
        {
            "id": "callee",
            "caller": "outrelay://acme/*",
            "target": "outrelay://acme/*",
            "decision": "allow",
            "p2p_mode": callee_mode,
        },
    ]


@contextlib.asynccontextmanager
async def running_relay(
    pki: Pki,
    rules: list[dict] | None = None,
    *,
    listen_host: str = "127.0.0.1",
    required_timeout: float | None = None,
) -> AsyncIterator[Harness]:
    policy = None
    if rules is not None:
        path = pki.dev.dir / f"policy-{uuid.uuid4().hex}.json"
        path.write_text(json.dumps({"rules": rules}))
        policy = PolicyService()
        policy.load_rules(load_policy_file(str(path)))
    tls = pki.dev.relay_tls()
    config = RelayConfig(
        tls.cert_file, tls.key_file, tls.ca_file, listen_host=listen_host, listen_port=0
    )
    config.policy = policy
    if required_timeout is not None:
        config.required_promotion_timeout = required_timeout
    relay = Relay(config)
    host, port = await relay.start()
    harness = Harness(pki, relay, "127.0.0.1" if listen_host in ("::", "0.0.0.0") else host, port)
    try:
        yield harness
    finally:
        for agent in harness.agents:
            await agent.close()
        await relay.stop()


def new_sid() -> int:
    return secrets.randbits(64) | 1


@dataclass
class Pair:
    sid: int
    c: Buffered
    p: Buffered
    c_ready: RawFrame
    p_ready: RawFrame
    opened_at: float

    async def exchange(self, tag: bytes) -> None:
        """Bytes flow consumer -> provider and provider -> consumer."""
        up, down = b"c2p:" + tag, b"p2c:" + tag
        await self.c.stream.send_all(up)
        assert await self.p.read_exact(len(up)) == up
        await self.p.stream.send_all(down)
        assert await self.c.read_exact(len(down)) == down


async def open_pair(
    consumer: RawAgent,
    provider: RawAgent,
    service: str,
    sid: int,
    *,
    accept_delay: float = 0.0,
) -> Pair:
    """OPEN_STREAM -> INCOMING_STREAM -> STREAM_ACCEPT -> STREAM_READY on both ctrls (§6)."""
    c_stream = await consumer.conn.open_stream()
    opened_at = asyncio.get_running_loop().time()
    await c_stream.send_all(frame(OPEN_STREAM, pb_bytes(1, service) + pb_int(3, sid)))
    async with asyncio.timeout(WAIT):
        p_stream = await provider.conn.accept_stream()
    p = Buffered(p_stream)
    incoming = await p.read_frame()
    assert incoming.type == INCOMING_STREAM
    assert dict(incoming.fields()).get(4, 0) == sid
    if accept_delay:
        await asyncio.sleep(accept_delay)
    await p_stream.send_all(frame(STREAM_ACCEPT))
    c_ready = await consumer.next_frame()
    p_ready = await provider.next_frame()
    assert c_ready.type == STREAM_READY and p_ready.type == STREAM_READY
    return Pair(sid, Buffered(c_stream), p, c_ready, p_ready, opened_at)


async def live_pair(
    h: Harness, service: str = "svc-p2p", caps: tuple[Sequence[str], Sequence[str]] = ((), ())
) -> tuple[RawAgent, RawAgent, Pair]:
    consumer = await h.agent(caps[0])
    provider = await h.agent(caps[1])
    await provider.register(service)
    pair = await open_pair(consumer, provider, service, new_sid())
    return consumer, provider, pair
