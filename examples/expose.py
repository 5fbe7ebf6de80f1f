"""Bridge a local TCP backend from Python: ``outrelay.Agent.expose``.

What ``outrelay-agent --expose SERVICE=HOST:PORT`` does, inside a program. Against
the README's "Run it for real" setup (relay on 127.0.0.1:7443), with an identity of
its own for this program:

    outrelay pki agent --ca-dir pki --out pki --tenant acme --name app
    python3 -m http.server 8081 --bind 127.0.0.1 &
    python examples/expose.py web2 127.0.0.1:8081 &
    outrelay-agent --relay 127.0.0.1:7443 --uri "$(uri 1)" \\
      --cert pki/agent-b.crt --key pki/agent-b.key --ca pki/ca.crt --consume web2@127.0.0.1:18082 &
    sleep 2; curl http://127.0.0.1:18082/

Environment as in open_connection.py. Stops on Ctrl-C (SIGINT) or SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import outrelay


def identity() -> outrelay.Identity:
    return outrelay.Identity.from_files(
        os.environ.get("OUTRELAY_CERT", "pki/app.crt"),
        os.environ.get("OUTRELAY_KEY", "pki/app.key"),
        os.environ.get("OUTRELAY_CA", "pki/ca.crt"),
    )


async def main(service: str, target: str) -> None:
    relay = os.environ.get("OUTRELAY_RELAY", "127.0.0.1:7443")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with outrelay.Agent(relays=[relay], identity=identity()) as agent:
        await agent.expose(service, target)
        print(f"exposing {service!r} -> {target} as {agent.uri}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: expose.py SERVICE HOST:PORT")
    asyncio.run(main(sys.argv[1], sys.argv[2]))
