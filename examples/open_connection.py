"""Reach a service from Python: ``outrelay.Agent.open_connection``.

Run against the README's "Run it for real" setup (relay on 127.0.0.1:7443, service
"web" exposed by a sidecar in front of ``python3 -m http.server 8080``), with an
identity of its own for this program:

    outrelay pki agent --ca-dir pki --out pki --tenant acme --name app
    python examples/open_connection.py web 'GET / HTTP/1.0\r\n\r\n'

Environment: OUTRELAY_RELAY (default 127.0.0.1:7443), OUTRELAY_CERT / OUTRELAY_KEY /
OUTRELAY_CA (default pki/app.crt, pki/app.key, pki/ca.crt).
Sends MESSAGE, half-closes, prints what comes back. Exit code 1 on a reject.
"""

from __future__ import annotations

import asyncio
import os
import sys

import outrelay


def identity() -> outrelay.Identity:
    return outrelay.Identity.from_files(
        os.environ.get("OUTRELAY_CERT", "pki/app.crt"),
        os.environ.get("OUTRELAY_KEY", "pki/app.key"),
        os.environ.get("OUTRELAY_CA", "pki/ca.crt"),
    )


async def main(service: str, message: bytes) -> int:
    relay = os.environ.get("OUTRELAY_RELAY", "127.0.0.1:7443")
    async with outrelay.Agent(relays=[relay], identity=identity()) as agent:
        try:
            reader, writer = await agent.open_connection(service)
        except outrelay.OpenRejected as exc:
            print(f"rejected: {exc.code} {exc.reason}", file=sys.stderr)
            return 1
        writer.write(message)
        await writer.drain()  # backpressure: waits while the relay path is full
        writer.write_eof()  # half-close: the service reads EOF, can still answer
        reply = await asyncio.wait_for(reader.read(), 30)
        writer.close()  # the application closed the stream
        await writer.wait_closed()
    sys.stdout.write(reply.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    svc = sys.argv[1] if len(sys.argv) > 1 else "web"
    msg = sys.argv[2] if len(sys.argv) > 2 else "GET / HTTP/1.0\\r\\n\\r\\n"
    raise SystemExit(asyncio.run(main(svc, msg.encode().decode("unicode_escape").encode())))
