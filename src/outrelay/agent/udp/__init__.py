"""UDP services over relay streams (issue 19 item 2): ``--expose-udp``, ``--consume-udp``.

Sans-IO framing and flow table in :mod:`.core`, asyncio sockets in :mod:`.shell`.
"""

from outrelay.agent.udp.core import (
    CTRL_DATAGRAMS_REACH_ME,
    MAX_DATAGRAM,
    DatagramDeframer,
    FlowTable,
    FramingError,
    control_frame,
    frame_datagram,
)
from outrelay.agent.udp.shell import (
    DATAGRAM_QUEUE,
    FLOW_IDLE,
    MAX_FLOWS,
    DatagramLink,
    DatagramRouter,
    DatagramStream,
    UdpConsumer,
    UdpDrops,
    open_udp_backend,
)

__all__ = [
    "CTRL_DATAGRAMS_REACH_ME",
    "DATAGRAM_QUEUE",
    "FLOW_IDLE",
    "MAX_DATAGRAM",
    "MAX_FLOWS",
    "DatagramDeframer",
    "DatagramLink",
    "DatagramRouter",
    "DatagramStream",
    "FlowTable",
    "FramingError",
    "UdpConsumer",
    "UdpDrops",
    "control_frame",
    "frame_datagram",
    "open_udp_backend",
]
