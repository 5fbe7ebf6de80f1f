"""A blocking script: ``outrelay.sync.open_connection`` returns a plain socket.

No asyncio needed. Against the README's "Run it for real" setup (relay on
127.0.0.1:7443, service "web" in front of ``python3 -m http.server 8080``):

    outrelay pki agent --ca-dir pki --out pki --tenant acme --name app
    python examples/sync_client.py web

Environment as in open_connection.py. Sends MESSAGE (default an HTTP GET),
half-closes and prints the reply.
"""

from __future__ import annotations

import os
import socket
import sys

import outrelay
import outrelay.sync


def main(service: str, message: bytes) -> int:
    identity = outrelay.Identity.from_files(
        os.environ.get("OUTRELAY_CERT", "pki/app.crt"),
        os.environ.get("OUTRELAY_KEY", "pki/app.key"),
        os.environ.get("OUTRELAY_CA", "pki/ca.crt"),
    )
    relay = os.environ.get("OUTRELAY_RELAY", "127.0.0.1:7443")
    try:
        sock = outrelay.sync.open_connection(service, relays=[relay], identity=identity)
    except outrelay.OpenRejected as exc:
        print(f"rejected: {exc.code} {exc.reason}", file=sys.stderr)
        return 1
    with sock:  # closing the socket ends the stream and the private agent
        sock.settimeout(30)
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        reply = bytearray()
        while chunk := sock.recv(65536):
            reply += chunk
    sys.stdout.write(reply.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    svc = sys.argv[1] if len(sys.argv) > 1 else "web"
    msg = sys.argv[2].encode() if len(sys.argv) > 2 else b"GET / HTTP/1.0\r\n\r\n"
    raise SystemExit(main(svc, msg))
