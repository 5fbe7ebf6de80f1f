"""Offer a service from Python: ``outrelay.Agent.serve`` with a per-stream handler.

Run against the README's "Run it for real" setup (relay on 127.0.0.1:7443), with an
identity of its own for this program:

    outrelay pki agent --ca-dir pki --out pki --tenant acme --name app
    python examples/serve.py upper &
    outrelay-agent --relay 127.0.0.1:7443 --uri "$(uri 1)" \\
      --cert pki/agent-b.crt --key pki/agent-b.key --ca pki/ca.crt --consume upper@127.0.0.1:18081 &
    sleep 2; echo hello | nc -N 127.0.0.1 18081     # prints HELLO

The handler reads until the consumer half-closes and answers in upper case.
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


async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()  # until the consumer's EOF
    writer.write(data.upper())
    await writer.drain()
    # returning closes the stream (the consumer reads EOF)


async def main(service: str) -> None:
    relay = os.environ.get("OUTRELAY_RELAY", "127.0.0.1:7443")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with outrelay.Agent(relays=[relay], identity=identity()) as agent:
        await agent.serve(service, upper)
        print(f"serving {service!r} as {agent.uri}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "upper"))
