"""Generated protobuf modules for ``proto/orp.proto`` (private; import from :mod:`outrelay.orp`).

``orp_pb2.py`` and ``orp_pb2.pyi`` are written by ``scripts/gen_proto.py``; do not edit them by
hand. ``tests/test_proto_fresh.py`` fails when they are stale.
"""
