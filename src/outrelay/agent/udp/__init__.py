"""UDP services over relay streams (issue 19 item 2): ``--expose-udp``, ``--consume-udp``.

Sans-IO framing and flow table in :mod:`.core`, asyncio sockets in :mod:`.shell`.
"""

from outrelay.agent.udp.core import (
    MAX_DATAGRAM,
    DatagramDeframer,
    FlowTable,
    FramingError,
    frame_datagram,
)
from outrelay.agent.udp.shell import (
    DATAGRAM_QUEUE,
    FLOW_IDLE,
    MAX_FLOWS,
    DatagramStream,
    UdpConsumer,
    UdpDrops,
    open_udp_backend,
)

__all__ = [
    "DATAGRAM_QUEUE",
    "FLOW_IDLE",
    "MAX_DATAGRAM",
    "MAX_FLOWS",
    "DatagramDeframer",
    "DatagramStream",
    "FlowTable",
    "FramingError",
    "UdpConsumer",
    "UdpDrops",
    "frame_datagram",
    "open_udp_backend",
]
