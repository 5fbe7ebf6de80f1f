"""A blocking helper for scripts: one OutRelay stream as a plain socket.

For programs without an event loop. The agent runs on a private asyncio loop in a
daemon thread; :func:`open_connection` returns a blocking :class:`socket.socket`
connected (through a private ``socketpair``) to a stream to the service. Example::

    import outrelay.sync

    identity = outrelay.Identity.from_files("agent.crt", "agent.key", "ca.crt")
    with outrelay.sync.open_connection("echo", relays=["127.0.0.1:7443"],
                                       identity=identity) as sock:
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        print(sock.recv(100))

Closing the socket ends the stream; the agent (one per call) stops once the stream
ended. For many streams, use :class:`SyncAgent` and its ``open_connection``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from outrelay.api import CONNECT_TIMEOUT, Agent, AgentClosed, Identity

__all__ = ["SyncAgent", "open_connection"]

T = TypeVar("T")

CALL_MARGIN = 30.0
"""Bound on a blocking call beyond the API's own timeouts (a stuck loop raises)."""


class SyncAgent:
    """An :class:`outrelay.Agent` on a background thread, driven by blocking calls.

    Use as ``with SyncAgent(relays=[...], identity=...) as agent:``; the arguments are
    :class:`outrelay.Agent`'s. Errors are the API's (:class:`outrelay.OpenRejected`, ...).
    """

    def __init__(self, relays: Sequence[str], identity: Identity, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="outrelay-sync", daemon=True
        )
        self._thread.start()
        self._agent = Agent(relays, identity, **options)
        self._timeout = float(options.get("connect_timeout", CONNECT_TIMEOUT)) + CALL_MARGIN
        try:
            self._call(self._agent.start())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Any) -> Any:
        if self._loop.is_closed():
            coro.close()
            raise AgentClosed("agent is closed")
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=self._timeout)

    def open_connection(self, service: str) -> socket.socket:
        """A blocking socket carrying a new stream to ``service``.

        Raises:
            outrelay.OpenRejected: the open was refused (``.code``, ``.reason``).
            outrelay.OpenFailed: no relay link.
        """
        sock: socket.socket = self._call(self._agent.open_socket(service))
        sock.setblocking(True)
        return sock

    def close(self) -> None:
        """Close the agent (its streams end) and stop the background loop."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._agent.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> SyncAgent:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _OwnedSocket(socket.socket):
    """A socket that closes its private :class:`SyncAgent` when closed."""

    _owner: SyncAgent | None = None

    def close(self) -> None:
        super().close()
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.close()


def open_connection(
    service: str, *, relays: Sequence[str], identity: Identity, **options: Any
) -> socket.socket:
    """One blocking stream to ``service`` through a private agent (closed with the socket).

    Raises as :meth:`SyncAgent.open_connection`, or :class:`outrelay.RelayUnreachable`.
    """
    agent = SyncAgent(relays, identity, **options)
    try:
        sock = agent.open_connection(service)
    except BaseException:
        agent.close()
        raise
    owned = _OwnedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    owned._owner = agent
    return owned
