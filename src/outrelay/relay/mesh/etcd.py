"""The relay's shared registry on etcd: the one module that speaks to etcd (issue 18).

:class:`EtcdMesh` implements :class:`~.records.Mesh` over an etcd cluster
(``--registry etcd://host:port[,...]``), through ``aetcd`` (asyncio, gRPC). The library is
untyped and takes one ``host:port``, so it stays inside this module: its ``type: ignore``s,
its exceptions and the endpoint list live here only.

One task runs *sessions* against one endpoint at a time. A session:

1. keeps the relay's lease (TTL ``--registry-lease``): the lease of the previous session is
   kept alive if etcd still has it, else a new one is granted and every key this relay owns
   (its relay record, bindings, halves; :class:`~.cache.Publisher`) is written again;
   on the very first lease the relay record is created with a transaction that fails if the
   id is held: a *live* relay holding it (its record survives the lease TTL + 2 s of
   waiting; a crashed predecessor's does not) makes :meth:`EtcdMesh.start` raise
   :class:`DuplicateRelayId` (the relay exits 1);
2. reads everything under the prefix (one range) into the :class:`~.cache.MeshCache` and
   watches the prefix from that revision + 1, applying events as they come;
3. keeps the lease alive every TTL/3, and drains the bounded, per-key coalesced write queue
   (``publish_*``/``withdraw_*`` only queue; they never block nor raise).

Every etcd call is bounded (``op_timeout``). Any failure (endpoint down, deadline, a member
without a leader, a compacted watch, a lost lease) ends the session: the relay is not ready
(``/readyz`` says ``registry: <error>``), the cache keeps serving (fail-static), and the next
session starts on the next endpoint after a short backoff, re-reading the whole range (a
re-sync, so nothing missed is lost) and re-publishing if the lease is gone.

:meth:`EtcdMesh.aclose` revokes the lease (bounded), so a relay stopped cleanly leaves the
mesh at once; a crashed one leaves within the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import aetcd  # type: ignore[import-untyped]
import aetcd.transactions  # type: ignore[import-untyped]
import aetcd.utils  # type: ignore[import-untyped]

from outrelay.observe import kv
from outrelay.relay.mesh.cache import (
    DEFAULT_PREFIX,
    Changes,
    DuplicateRelayId,
    EventKind,
    KeyLayout,
    MeshCache,
    Publisher,
    RegistryError,
    RegistryUnavailable,
    WatchEvent,
    half_value,
    provider_value,
    relay_value,
)
from outrelay.relay.mesh.records import HalfRecord, ProviderRecord, RelayRecord
from outrelay.relay.policy import PolicyDocument

__all__ = [
    "DEFAULT_LEASE_TTL",
    "DEFAULT_OP_TIMEOUT",
    "DuplicateRelayId",
    "EtcdMesh",
    "EtcdStore",
    "RegistryError",
    "RegistryUnavailable",
]

log = logging.getLogger("outrelay.relay.mesh")

DEFAULT_LEASE_TTL: Final = 5
"""Seconds (``--registry-lease``): a dead relay's rows vanish within it."""
DEFAULT_OP_TIMEOUT: Final = 2.0
"""Bound on each etcd call; a slower endpoint counts as failed (the next one is tried)."""
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 1.0
"""Between failed sessions (every endpoint was just tried): short, to catch up quickly."""
CLOSE_TIMEOUT: Final = 1.0
"""Bound on closing a gRPC channel and on revoking the lease at shutdown."""
_LEASE_LOST_TTL: Final = 0


class _SessionEnd(Exception):
    """Ends a session so that the next one starts (lease lost, queue overflowed)."""


async def _bounded(awaitable: Any, seconds: float) -> Any:
    """``await awaitable`` within ``seconds`` (TimeoutError after). ``asyncio.timeout``, not
    ``wait_for``: on Python 3.11 ``wait_for`` swallows a cancellation that arrives as the
    inner call completes (fast etcd answers do), which would leave a task uncancellable."""
    async with asyncio.timeout(seconds):
        return await awaitable


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _event(kind: str, kv_: Any) -> WatchEvent:
    return WatchEvent(
        EventKind.PUT if kind == "PUT" else EventKind.DELETE,
        bytes(kv_.key),
        bytes(kv_.value),
        int(kv_.mod_revision),
        int(kv_.create_revision),
    )


class EtcdStore:
    """Bounded one-shot etcd calls over an endpoint list (rotating on failure).

    Used by ``outrelay policy`` (and by tests); the relay's long-lived sessions are
    :class:`EtcdMesh`'s.
    """

    def __init__(self, endpoints: Sequence[tuple[str, int]], timeout: float) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self._endpoints = list(endpoints)
        self._timeout = timeout

    async def _call(self, op: Callable[[Any], Any]) -> Any:
        deadline = asyncio.get_running_loop().time() + self._timeout
        errors: list[str] = []
        per_call = max(0.2, self._timeout / len(self._endpoints))
        while True:
            for host, port in self._endpoints:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise RegistryUnavailable(
                        f"etcd unreachable within {self._timeout:g} s: " + "; ".join(errors[-3:])
                    )
                client = aetcd.Client(host, port, timeout=min(per_call, left))
                try:
                    return await _bounded(op(client), min(per_call, left) + 0.5)
                except Exception as exc:
                    errors.append(f"{host}:{port}: {_describe(exc)}")
                finally:
                    with contextlib.suppress(Exception):
                        await _bounded(client.close(), CLOSE_TIMEOUT)

    async def get_prefix(self, prefix: str) -> list[tuple[bytes, bytes]]:
        async def op(client: Any) -> list[tuple[bytes, bytes]]:
            result = await client.get_prefix(prefix.encode())
            return [(bytes(item.key), bytes(item.value)) for item in result]

        out: list[tuple[bytes, bytes]] = await self._call(op)
        return out

    async def put(self, key: str, value: bytes) -> None:
        async def op(client: Any) -> None:
            await client.put(key.encode(), value)

        await self._call(op)

    async def delete(self, key: str) -> bool:
        async def op(client: Any) -> bool:
            result = await client.delete(key.encode())
            return result is not None and bool(getattr(result, "deleted", 1))

        deleted: bool = await self._call(op)
        return deleted


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{name}: {text}" if text else name


class EtcdMesh:
    """The :class:`~.records.Mesh` of a relay on etcd (module docstring).

    Args:
        endpoints: etcd client endpoints (``--registry``), tried in turn.
        relay_id: This relay's id (unique among live relays).
        region: This relay's region (``--region``).
        advertise: ``host:port`` peer relays dial (``--advertise``).
        prefix: Key prefix (``--registry-prefix``).
        lease_ttl: Seconds (``--registry-lease``).
        op_timeout: Bound on each etcd call.
        clock: Unix ms, for ``registered_ms``.
        client_factory: ``(host, port, timeout) -> client`` with aetcd's ``Client`` methods
            (tests put a fake etcd here); default ``aetcd.Client``.
    """

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        relay_id: str,
        region: str,
        advertise: str,
        prefix: str = DEFAULT_PREFIX,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        clock: Callable[[], int] = _wall_ms,
        client_factory: Callable[[str, int, float], Any] | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        if lease_ttl < 2:
            raise ValueError("registry lease must be at least 2 s")
        self.relay_id = relay_id
        self.region = region
        self.endpoint = advertise
        self.layout = KeyLayout(prefix)
        self.cache = MeshCache(self.layout, relay_id, region)
        self.publisher = Publisher()
        self._endpoints = list(endpoints)
        self._index = 0
        self._ttl = lease_ttl
        self._op_timeout = op_timeout
        self._clock = clock
        self._new_client: Callable[[str, int, float], Any] = client_factory or (
            lambda host, port, timeout: aetcd.Client(host, port, timeout=timeout)
        )
        self._lease_id: int | None = None
        self._claimed = False
        """The relay record was created once (the duplicate-id check passed)."""
        self._own_bindings: dict[tuple[str, str], set[str]] = {}
        self._half_callbacks: list[Callable[[HalfRecord], None]] = []
        self._policy_callbacks: list[Callable[[dict[str, PolicyDocument]], None]] = []
        self._wake = asyncio.Event()
        self._synced = False
        self._reason = "registry: connecting"
        self._fatal: RegistryError | None = None
        self._first_sync = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None
        self.sessions = 0
        """Sessions started (1 + reconnects); for tests and logs."""
        self.publisher.put(
            self.layout.relay(relay_id), relay_value(RelayRecord(relay_id, region, advertise))
        )

    # -- Mesh: reads ---------------------------------------------------------------------

    def remote_providers(self, tenant: str, service_name: str) -> list[ProviderRecord]:
        return self.cache.remote_providers(tenant, service_name)

    def relay(self, relay_id: str) -> RelayRecord | None:
        return self.cache.relay(relay_id)

    def halves(self, stream_id: int) -> list[HalfRecord]:
        """Every relay's half for ``stream_id`` as etcd has them (so their revisions are
        known); this relay's only while it still means to hold it."""
        own = self.layout.half(stream_id, self.relay_id)
        return [
            h
            for h in self.cache.halves(stream_id)
            if h.relay_id != self.relay_id or own in self.publisher.desired
        ]

    # -- Mesh: writes (queue only) -------------------------------------------------------

    def publish_binding(
        self, tenant: str, service_name: str, agent_uri: str, local_addr: str
    ) -> None:
        key = self.layout.service(tenant, service_name, self.relay_id, agent_uri)
        record = ProviderRecord(
            tenant, service_name, agent_uri, self.relay_id, self.region, local_addr, self._clock()
        )
        self.publisher.put(key, provider_value(record))
        self._own_bindings.setdefault((tenant, agent_uri), set()).add(key)
        self._wake.set()

    def withdraw_agent(self, tenant: str, agent_uri: str) -> None:
        for key in self._own_bindings.pop((tenant, agent_uri), set()):
            self.publisher.delete(key)
        self._wake.set()

    def publish_half(self, stream_id: int, agent_uri: str, expected_peer: str) -> None:
        key = self.layout.half(stream_id, self.relay_id)
        self.publisher.put(key, half_value(stream_id, self.relay_id, agent_uri, expected_peer))
        self._wake.set()

    def withdraw_half(self, stream_id: int) -> None:
        self.publisher.delete(self.layout.half(stream_id, self.relay_id))
        self._wake.set()

    def on_half(self, callback: Callable[[HalfRecord], None]) -> None:
        self._half_callbacks.append(callback)

    def on_policy(self, callback: Callable[[dict[str, PolicyDocument]], None]) -> None:
        """callback(documents by tenant) after every change of the policy rules (and once
        after the first sync)."""
        self._policy_callbacks.append(callback)

    # -- readiness -----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._synced

    def not_ready_reasons(self) -> list[str]:
        return [] if self._synced else [self._reason]

    @property
    def pending_writes(self) -> int:
        return self.publisher.pending

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, within: float) -> None:
        """Join the mesh: the first session's lease, relay record and cache sync.

        Raises:
            DuplicateRelayId: Another live relay holds this relay id.
            RegistryUnavailable: Not synced within ``within`` seconds.
        """
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registry")
        try:
            await _bounded(self._first_sync.wait(), within)
        except TimeoutError:
            await self.aclose(revoke=False)
            raise RegistryUnavailable(
                f"etcd not reachable within {within:g} s ({self._reason})"
            ) from None
        if self._fatal is not None:
            await self.aclose(revoke=False)
            raise self._fatal

    async def aclose(self, *, revoke: bool = True) -> None:
        """Stop the sessions; revoke the lease (bounded) so this relay's rows go at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._synced = False
        self._reason = "registry: closed"
        lease, self._lease_id = self._lease_id, None
        if revoke and lease is not None:
            host, port = self._endpoints[self._index]
            client = self._new_client(host, port, CLOSE_TIMEOUT)
            try:
                await _bounded(client.revoke_lease(lease), CLOSE_TIMEOUT)
            except Exception as exc:
                log.info("registry: lease not revoked at close", extra=kv(err=_describe(exc)))
            finally:
                with contextlib.suppress(Exception):
                    await _bounded(client.close(), CLOSE_TIMEOUT)

    # -- sessions ------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            host, port = self._endpoints[self._index]
            self.sessions += 1
            client = self._new_client(host, port, self._op_timeout)
            self._client = client
            try:
                await self._session(client)
            except asyncio.CancelledError:
                raise
            except RegistryError as exc:
                self._fatal = exc
                self._first_sync.set()
                return
            except Exception as exc:  # every failure ends the session, never the relay
                failure: BaseException = exc
                while isinstance(failure, BaseExceptionGroup):
                    failure = failure.exceptions[0]
                was_synced = self._synced
                self._synced = False
                self._reason = f"registry: {host}:{port}: {_describe(failure)}"
                if was_synced:
                    backoff = BACKOFF_MIN
                    log.warning(
                        "registry: session lost; serving from the cache",
                        extra=kv(endpoint=f"{host}:{port}", err=_describe(failure)),
                    )
            finally:
                self._client = None
                with contextlib.suppress(Exception):
                    await _bounded(client.close(), CLOSE_TIMEOUT)
            self._index = (self._index + 1) % len(self._endpoints)
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _session(self, client: Any) -> None:
        await client.connect()
        await self._ensure_lease(client)
        snapshot = await self._call(client.get_prefix(self.layout.prefix.encode()))
        revision = int(snapshot.header.revision)
        items = [
            WatchEvent(
                EventKind.PUT,
                bytes(x.key),
                bytes(x.value),
                int(x.mod_revision),
                int(x.create_revision),
            )
            for x in snapshot.kvs
        ]
        changes = self.cache.load_snapshot(items, revision)
        prefix = self.layout.prefix.encode()
        watch = await self._call(
            client.watch(
                prefix, range_end=aetcd.utils.prefix_range_end(prefix), start_revision=revision + 1
            )
        )
        first = not self._first_sync.is_set()
        self._synced = True
        self._reason = ""
        log.info(
            "registry: synced",
            extra=kv(revision=revision, keys=len(items), lease=f"{self._lease_id:x}"),
        )
        self._notify(changes, force_policy=first)
        self._first_sync.set()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._watch(watch))
                group.create_task(self._keepalive(client))
                group.create_task(self._writer(client))
        finally:
            with contextlib.suppress(Exception):
                await _bounded(watch.cancel(), CLOSE_TIMEOUT)

    async def _call(self, awaitable: Any) -> Any:
        """One etcd call, bounded (the client's gRPC deadline is the same; this also bounds
        what the library does around it)."""
        return await _bounded(awaitable, self._op_timeout + 0.5)

    async def _ensure_lease(self, client: Any) -> None:
        if self.publisher.overflowed and self._lease_id is not None:
            log.warning("registry: write queue overflowed; new lease, re-publishing everything")
            with contextlib.suppress(Exception):
                await self._call(client.revoke_lease(self._lease_id))
            self._lease_id = None
        if self._lease_id is not None:
            reply = await self._call(client.refresh_lease(self._lease_id))
            if reply is None or int(reply.TTL) <= _LEASE_LOST_TTL:
                log.warning("registry: lease expired; re-publishing this relay's rows")
                self._lease_id = None
        if self._lease_id is not None:
            return
        lease = await self._call(client.lease(self._ttl))
        lease_id = int(lease.id)
        if not self._claimed:
            await self._claim(client, lease_id)
        self._lease_id = lease_id
        self.publisher.republish_all()
        self._wake.set()

    async def _claim(self, client: Any, lease_id: int) -> None:
        """Create this relay's record unless a live relay holds the id (module docstring)."""
        key = self.layout.relay(self.relay_id).encode()
        value = relay_value(RelayRecord(self.relay_id, self.region, self.endpoint))
        deadline = asyncio.get_running_loop().time() + self._ttl + 2
        while True:
            ok, _ = await self._call(
                client.transaction(
                    compare=[aetcd.transactions.Create(key) == 0],
                    success=[aetcd.transactions.Put(key, value, lease_id)],
                    failure=[],
                )
            )
            if ok:
                self._claimed = True
                return
            if asyncio.get_running_loop().time() > deadline:
                held = await self._call(client.get(key))
                holder = bytes(held.value).decode(errors="replace") if held else "?"
                raise DuplicateRelayId(
                    f"relay id {self.relay_id!r} is held by a live relay ({holder}); "
                    "give every relay of the mesh its own --relay-id"
                )
            await asyncio.sleep(0.25)

    async def _watch(self, watch: Any) -> None:
        async for event in watch:
            changes = self.cache.apply([_event(str(event.kind), event.kv)])
            self._notify(changes)
        raise ConnectionError("watch ended")

    async def _keepalive(self, client: Any) -> None:
        interval = self._ttl / 3
        while True:
            await asyncio.sleep(interval)
            reply = await self._call(client.refresh_lease(self._lease_id))
            if reply is None or int(reply.TTL) <= _LEASE_LOST_TTL:
                raise _SessionEnd("lease lost")

    async def _writer(self, client: Any) -> None:
        while True:
            if self.publisher.overflowed:
                raise _SessionEnd("write queue overflowed")
            write = self.publisher.next_write()
            if write is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            key, value = write
            if value is None:
                await self._call(client.delete(key.encode()))
            else:
                await self._call(client.put(key.encode(), value, lease=self._lease_id))
            self.publisher.written(key, value)

    def _notify(self, changes: Changes, *, force_policy: bool = False) -> None:
        for record in changes.halves_put:
            for callback in list(self._half_callbacks):
                try:
                    callback(record)
                except Exception:
                    log.exception("registry: on_half callback failed")
        if changes.policy_changed or force_policy:
            documents = self.cache.policy_documents()
            for policy_callback in list(self._policy_callbacks):
                try:
                    policy_callback(documents)
                except Exception:
                    log.exception("registry: policy callback failed")
