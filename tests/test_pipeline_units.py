"""Issue 16 pipelining: the sans-IO decisions and the pieces the consumer and relay use.

End to end (real processes) in ``tests/e2e/test_pipeline.py``.
"""

from __future__ import annotations

import asyncio

import pytest

from outrelay.agent.dial import accepted_features
from outrelay.agent.resumable import ResumableStream
from outrelay.agent.session import may_pipeline
from outrelay.orp import (
    CAP_INSTANCE,
    CAP_PIPELINE,
    RELAY_CAPABILITIES,
    Frame,
    FrameType,
    HelloAck,
    encode_message,
)
from outrelay.relay.open_flow import AdmitOpen, early_to_provider
from outrelay.relay.policy import RelayMode
from outrelay.resume import retransmit_range
from outrelay.splice import copy_until
from outrelay.transport.memory import memory_stream_pair


def _ack_frame(message: HelloAck | None) -> Frame:
    data = encode_message(FrameType.HELLO_ACK, message)
    return Frame(FrameType.HELLO_ACK, data[8:])


def test_our_relay_echoes_pipeline() -> None:
    assert CAP_PIPELINE in RELAY_CAPABILITIES


def test_reference_relay_empty_hello_ack_means_no_pipelining() -> None:
    accepted = accepted_features(_ack_frame(None))
    assert accepted == frozenset()
    assert not may_pipeline(accepted)


def test_relay_that_echoes_other_features_only_means_no_pipelining() -> None:
    accepted = accepted_features(_ack_frame(HelloAck(accepted_features=[CAP_INSTANCE])))
    assert accepted == {CAP_INSTANCE}
    assert not may_pipeline(accepted)


def test_echoed_pipeline_means_pipelining() -> None:
    ack = HelloAck(accepted_features=[CAP_INSTANCE, CAP_PIPELINE])
    assert may_pipeline(accepted_features(_ack_frame(ack)))


def test_undecodable_hello_ack_means_no_pipelining() -> None:
    assert accepted_features(Frame(FrameType.HELLO_ACK, b"\xff\xff\xff")) == frozenset()


@pytest.mark.parametrize(
    ("mode", "caps", "early"),
    [
        (RelayMode.SPLICE, frozenset({CAP_PIPELINE}), True),
        (RelayMode.SPLICE, frozenset(), False),  # reference provider: bytes after ACCEPT
        (RelayMode.FORWARD, frozenset({CAP_PIPELINE}), False),  # discarded; consumer replays
        (RelayMode.FORWARD, frozenset(), False),
    ],
)
def test_early_bytes_to_provider_only_for_spliced_streams_to_our_agents(
    mode: RelayMode, caps: frozenset[str], early: bool
) -> None:
    decision = AdmitOpen("outrelay://acme/p", relay_mode=mode)
    assert early_to_provider(decision, caps) is early


def test_pipelined_bytes_are_in_the_resume_ring() -> None:
    async def main() -> None:
        inner, _peer = memory_stream_pair()
        stream = ResumableStream(7, inner, on_broken=lambda _: None, sent=b"hello")
        assert stream.positions.sent == 5
        await stream.send_all(b" world")
        # A resume where the peer has seen nothing resends the pipelined bytes too.
        assert retransmit_range(0, stream.ring) == b"hello world"
        assert retransmit_range(5, stream.ring) == b" world"

    asyncio.run(main())


def test_copy_until_copies_until_stopped_and_keeps_every_byte() -> None:
    async def main() -> None:
        app, src = memory_stream_pair()
        dst, far = memory_stream_pair()
        stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        kept = bytearray()
        task = asyncio.create_task(copy_until(src, dst, stop, keep=kept))
        await app.send_all(b"first")
        assert await far.receive_some() == b"first"
        stop.set_result(None)
        assert await task == 5
        await app.send_all(b"later")  # not copied: the splice that takes over reads it
        assert bytes(kept) == b"first"
        assert await src.receive_some() == b"later"

    asyncio.run(main())


def test_copy_until_stops_at_limit_and_at_eof() -> None:
    async def main() -> None:
        app, src = memory_stream_pair()
        dst, far = memory_stream_pair()
        stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await app.send_all(b"0123456789")
        assert await copy_until(src, dst, stop, limit=4) == 4
        assert await far.receive_some() == b"0123"
        await app.send_eof()
        assert await copy_until(src, dst, stop) == 6  # the rest, then EOF ends it
        assert await src.receive_some() == b""  # the EOF is still there for the splice

    asyncio.run(main())
