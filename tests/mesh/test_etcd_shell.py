"""EtcdMesh's session logic against a fake etcd client: the failure paths made deterministic.

The real-etcd tests (test_etcd_mesh.py) cover the happy path and outages; here a fake
client (aetcd's ``Client`` methods the shell uses, over an in-memory revisioned store)
injects the failures that are hard to provoke with a real cluster: a compacted revision at
watch creation, a watch that dies mid-stream, a failing write, a lease that etcd no longer
knows.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aetcd.exceptions  # type: ignore[import-untyped]

from mesh.support import wait_until
from outrelay.relay.mesh.cache import KeyLayout, half_value
from outrelay.relay.mesh.etcd import EtcdMesh


@dataclass
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0


@dataclass
class Event:
    kind: str
    kv: KV


class FakeEtcd:
    """A single in-memory etcd with leases, revisions and prefix watches."""

    def __init__(self) -> None:
        self.data: dict[bytes, KV] = {}
        self.revision = 1
        self.leases: set[int] = set()
        self.next_lease = 100
        self.watchers: list[FakeWatch] = []
        self.history: list[Event] = []
        self.fail_watch_create: list[BaseException] = []
        self.fail_put: list[BaseException] = []
        self.clients = 0

    def _emit(self, event: Event) -> None:
        self.history.append(event)
        for w in self.watchers:
            if event.kv.key.startswith(w.prefix):
                w.queue.put_nowait(event)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        if lease and lease not in self.leases:
            raise aetcd.exceptions.ClientError("requested lease not found")
        self.revision += 1
        old = self.data.get(key)
        kv = KV(key, value, self.revision, old.create_revision if old else self.revision, lease)
        self.data[key] = kv
        self._emit(Event("PUT", kv))

    def delete(self, key: bytes) -> bool:
        if key not in self.data:
            return False
        self.revision += 1
        old = self.data.pop(key)
        self._emit(Event("DELETE", KV(key, b"", self.revision, old.create_revision)))
        return True

    def expire(self, lease: int) -> None:
        self.leases.discard(lease)
        for key in [k for k, v in self.data.items() if v.lease == lease]:
            self.delete(key)

    def client(self, host: str, port: int, timeout: float) -> FakeClient:
        self.clients += 1
        return FakeClient(self)


class FakeWatch:
    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()

    def __aiter__(self) -> FakeWatch:
        return self

    async def __anext__(self) -> Event:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def cancel(self) -> None:
        self.queue.put_nowait(None)


@dataclass
class Header:
    revision: int


@dataclass
class Range:
    header: Header
    kvs: list[KV]


@dataclass
class Lease:
    id: int


@dataclass
class KeepAlive:
    TTL: int


class FakeClient:
    def __init__(self, etcd: FakeEtcd) -> None:
        self.etcd = etcd

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def lease(self, ttl: int) -> Lease:
        self.etcd.next_lease += 1
        self.etcd.leases.add(self.etcd.next_lease)
        return Lease(self.etcd.next_lease)

    async def refresh_lease(self, lease: int) -> KeepAlive:
        return KeepAlive(5 if lease in self.etcd.leases else 0)

    async def revoke_lease(self, lease: int) -> None:
        self.etcd.expire(lease)

    async def transaction(self, compare: list[Any], success: list[Any], failure: list[Any]) -> Any:
        key = compare[0].key
        if key in self.etcd.data:
            return False, []
        op = success[0]
        self.etcd.put(op.key, op.value, op.lease)
        return True, []

    async def get(self, key: bytes) -> KV | None:
        return self.etcd.data.get(key)

    async def get_prefix(self, prefix: bytes) -> Range:
        kvs = [v for k, v in sorted(self.etcd.data.items()) if k.startswith(prefix)]
        return Range(Header(self.etcd.revision), kvs)

    async def watch(self, prefix: bytes, range_end: bytes, start_revision: int) -> FakeWatch:
        if self.etcd.fail_watch_create:
            raise self.etcd.fail_watch_create.pop(0)
        watch = FakeWatch(prefix)
        for event in self.etcd.history:
            if event.kv.mod_revision >= start_revision and event.kv.key.startswith(prefix):
                watch.queue.put_nowait(event)
        self.etcd.watchers.append(watch)
        return watch

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        if self.etcd.fail_put:
            raise self.etcd.fail_put.pop(0)
        self.etcd.put(key, value, lease)

    async def delete(self, key: bytes) -> None:
        self.etcd.delete(key)


L = KeyLayout()


async def start(etcd: FakeEtcd, relay_id: str = "r1", ttl: int = 2) -> EtcdMesh:
    mesh = EtcdMesh(
        [("a", 1), ("b", 2)],
        relay_id=relay_id,
        region="eu",
        advertise="x:1",
        lease_ttl=ttl,
        client_factory=etcd.client,
    )
    await mesh.start(5)
    return mesh


async def test_compacted_revision_at_watch_creation_resyncs() -> None:
    etcd = FakeEtcd()
    etcd.fail_watch_create.append(aetcd.exceptions.RevisionCompactedError(5))
    mesh = await start(etcd)
    try:
        assert mesh.sessions == 2 and mesh.ready
        etcd.put(L.half(9, "r2").encode(), half_value(9, "r2", "u", ""))
        await wait_until(lambda: bool(mesh.halves(9)), 2, "watch works after the re-sync")
    finally:
        await mesh.aclose()


async def test_watch_dying_midstream_resyncs_and_misses_nothing() -> None:
    etcd = FakeEtcd()
    mesh = await start(etcd)
    seen: list[int] = []
    mesh.on_half(lambda h: seen.append(h.stream_id))
    try:
        watch = etcd.watchers[-1]
        etcd.watchers.remove(watch)  # events from now on are lost to this watch ...
        etcd.put(L.half(1, "r2").encode(), half_value(1, "r2", "u", ""))
        watch.queue.put_nowait(aetcd.exceptions.RevisionCompactedError(3))  # ... then it dies
        await wait_until(lambda: mesh.sessions == 2 and mesh.ready, 3, "re-synced")
        assert [h.stream_id for h in mesh.halves(1)] == [1]  # from the new range read
        assert seen == [1]  # and announced
    finally:
        await mesh.aclose()


async def test_failed_write_is_retried_in_the_next_session() -> None:
    etcd = FakeEtcd()
    mesh = await start(etcd)
    try:
        etcd.fail_put.append(aetcd.exceptions.ConnectionFailedError("boom"))
        mesh.publish_binding("acme", "echo", "outrelay://acme/agent/a", "")
        key = L.service("acme", "echo", "r1", "outrelay://acme/agent/a").encode()
        await wait_until(lambda: key in etcd.data, 3, "binding written after the retry")
        assert mesh.sessions >= 2
        assert mesh.pending_writes == 0
    finally:
        await mesh.aclose()


async def test_expired_lease_gets_a_new_one_and_everything_republished() -> None:
    etcd = FakeEtcd()
    mesh = await start(etcd)
    try:
        mesh.publish_binding("acme", "echo", "outrelay://acme/agent/a", "")
        mesh.publish_half(4, "outrelay://acme/agent/a", "")
        key = L.service("acme", "echo", "r1", "outrelay://acme/agent/a").encode()
        await wait_until(lambda: key in etcd.data, 2, "written")
        old = mesh._lease_id
        assert old is not None
        etcd.expire(old)  # etcd forgot the lease (the relay was away longer than the TTL)
        assert L.relay("r1").encode() not in etcd.data
        await wait_until(lambda: L.relay("r1").encode() in etcd.data, 3, "relay re-published")
        await wait_until(lambda: key in etcd.data, 1, "binding re-published")
        assert L.half(4, "r1").encode() in etcd.data
        assert mesh._lease_id != old
        assert all(v.lease == mesh._lease_id for v in etcd.data.values())
    finally:
        await mesh.aclose()


async def test_withdrawals_and_close_revokes() -> None:
    etcd = FakeEtcd()
    mesh = await start(etcd)
    mesh.publish_binding("acme", "echo", "outrelay://acme/agent/a", "")
    mesh.publish_binding("acme", "web", "outrelay://acme/agent/a", "")
    mesh.publish_half(4, "outrelay://acme/agent/a", "")
    await wait_until(lambda: len(etcd.data) == 4, 2, "written")
    mesh.withdraw_agent("acme", "outrelay://acme/agent/a")
    mesh.withdraw_half(4)
    await wait_until(lambda: len(etcd.data) == 1, 2, "withdrawn")
    await mesh.aclose()
    assert etcd.data == {} and not mesh.ready
    assert mesh.not_ready_reasons() == ["registry: closed"]
