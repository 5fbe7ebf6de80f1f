"""The admin endpoint: a tiny HTTP/1.1 server for probes and metrics (``--admin-listen``).

Probes and scrapers send one short GET and read the answer; nothing more is
needed, so no web framework. :func:`parse_request_head` is the sans-IO part
(bytes in, method and path or an error out); :class:`AdminServer` is the thin
asyncio shell. A hostile client cannot grow or hang it: the request head is
bounded (:data:`MAX_HEAD`), it must arrive within :data:`READ_TIMEOUT`, one
request per connection (``Connection: close``), and only GET and HEAD are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from outrelay.observe.logging import kv

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_HEAD",
    "READ_TIMEOUT",
    "AdminServer",
    "BadRequest",
    "Response",
    "Route",
    "parse_request_head",
]

log = logging.getLogger("outrelay.admin")

MAX_HEAD = 8192
"""Bytes of request line plus headers we accept; more is a 431 and a close."""
READ_TIMEOUT = 5.0
"""Seconds a client has to send its whole request head (the reference's debug server: 5 s)."""
MAX_CONNECTIONS = 32
"""Admin connections served at once; more are closed at once. Probes and scrapers need a
few; the cap keeps a flood from taking file descriptors the data path needs."""

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class BadRequest(Exception):
    """The request head is not one we can answer; ``status`` says which error."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Response]
"""Builds the answer for one path, at request time (it reads live state)."""


def parse_request_head(head: bytes) -> tuple[str, str]:
    """The method and path of a request head (request line and headers, without the body).

    Raises:
        BadRequest: not an HTTP/1.x request line.
    """
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(400, "malformed request line")
    try:
        method = parts[0].decode("ascii")
        target = parts[1].decode("ascii")
    except UnicodeDecodeError as exc:
        raise BadRequest(400, "request line is not ASCII") from exc
    if not method.isalpha() or not target.startswith("/"):
        raise BadRequest(400, "malformed request line")
    return method, target.split("?", 1)[0]


def render(response: Response, *, head_only: bool) -> bytes:
    """The bytes of ``response`` (HTTP/1.1, one request per connection)."""
    reason = _REASONS.get(response.status, "")
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    if response.status == 405:
        lines.append("Allow: GET, HEAD")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + response.body


class AdminServer:
    """Serves ``routes`` (path -> builder) on one TCP address; GET and HEAD only."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self._open = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind and serve. Raises OSError when the address cannot be bound."""
        self._server = await asyncio.start_server(self._serve, host or None, port, limit=MAX_HEAD)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            self._server = None

    def answer(self, method: str, path: str) -> Response:
        route = self.routes.get(path)
        if route is None:
            return Response(404, b"not found\n")
        if method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n")
        try:
            return route()
        except Exception:
            log.exception("admin: route failed", extra=kv(path=path))
            return Response(500, b"internal error\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._open += 1
        try:
            await self._answer(reader, writer)
        finally:
            self._open -= 1

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
                method, path = parse_request_head(head)
                response = self.answer(method, path)
            except TimeoutError:
                response = Response(408, b"request head too slow\n")
            except asyncio.LimitOverrunError:
                response = Response(431, b"request head too large\n")
            except asyncio.IncompleteReadError:
                return  # the client went away before a whole head
            except BadRequest as exc:
                response = Response(exc.status, f"{exc}\n".encode())
            writer.write(render(response, head_only=method == "HEAD"))
            async with asyncio.timeout(READ_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
