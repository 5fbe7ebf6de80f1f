"""Hypothesis strategies for ORP messages and frames, derived from the proto descriptors.

Deriving from the descriptors means a field added to ``proto/orp.proto`` is fuzzed without
touching this file (a new field *type* raises KeyError here, on purpose).
"""

from __future__ import annotations

import itertools
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from outrelay.orp import MESSAGE_TYPES, FrameType, Message

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: st.text(max_size=24),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
}


def messages(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Messages of class ``cls`` with every field drawn at random (zero values included)."""
    kwargs: dict[str, st.SearchStrategy[Any]] = {}
    for field in cls.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            assert isinstance(field.message_type, Descriptor)
            inner = messages(GetMessageClass(field.message_type))
            single: st.SearchStrategy[Any] = st.none() | inner
        else:
            inner = _SCALARS[field.type]
            single = inner
        kwargs[field.name] = st.lists(inner, max_size=3) if field.is_repeated else single
    return st.builds(cls, **kwargs)


EMPTY_TYPES = (FrameType.PING, FrameType.PONG, FrameType.HELLO_ACK, FrameType.STREAM_ACCEPT)

frame_items: st.SearchStrategy[tuple[FrameType, Message | None]] = st.one_of(
    st.sampled_from(sorted(MESSAGE_TYPES)).flatmap(
        lambda t: messages(MESSAGE_TYPES[t]).map(lambda m: (t, m))
    ),
    st.sampled_from(EMPTY_TYPES).map(lambda t: (t, None)),
)
"""``(frame_type, message)`` pairs as passed to ``encode_message``."""


def cut_points(length: int) -> st.SearchStrategy[list[int]]:
    """Sorted, distinct split offsets inside ``0..length``."""
    return st.lists(st.integers(0, length), max_size=12, unique=True).map(sorted)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (which may include 0 and ``len(data)``: empty chunks)."""
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
