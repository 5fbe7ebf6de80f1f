"""``outrelay demo``: a whole OutRelay deployment on loopback, in one command.

It creates a throw-away PKI, starts a relay, a provider agent in front of a
small built-in HTTP backend and a consumer agent -- all on 127.0.0.1 with
free ports, none of them opening an inbound port to the other -- makes one
request through the tunnel, prints what it started and a ``curl`` command to
try, and keeps running until Ctrl-C (or exits after the request with
``--once``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from outrelay.agent.agent import Agent, AgentConfig
from outrelay.agent.session import SessionConfig
from outrelay.observe import LOG_LEVELS, setup_logging
from outrelay.pki import create_ca, issue_agent, issue_relay, write_identity
from outrelay.relay import Relay, RelayConfig
from outrelay.transport import QuicTlsConfig

__all__ = ["add_demo_command", "run_demo"]

SERVICE = "hello"
TENANT = "demo"
REQUEST_TIMEOUT = 15.0


def add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run a relay, a provider and a consumer on loopback and show traffic flowing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--port",
        type=int,
        default=0,
        help="consumer listen port on 127.0.0.1 (default: a free port)",
    )
    p.add_argument(
        "--dir",
        default="",
        help="write the demo PKI here and keep it (default: a temporary directory, removed)",
    )
    p.add_argument("--once", action="store_true", help="make the one request, then stop")
    p.add_argument(
        "--log-level",
        default="warn",
        choices=tuple(LOG_LEVELS),
        help="log level of the embedded relay and agents (default %(default)s)",
    )
    p.set_defaults(func=_run_from_args)


def _run_from_args(args: argparse.Namespace) -> int:
    setup_logging("text", args.log_level)
    try:
        return asyncio.run(run_demo(port=args.port, directory=args.dir, once=args.once))
    except KeyboardInterrupt:  # pragma: no cover - signal before the handler is installed
        return 0


async def _http_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A tiny HTTP/1.0 server: answers every request with a greeting."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            request = await reader.readuntil(b"\r\n\r\n")
        line = request.split(b"\r\n", 1)[0].decode("latin-1")
        now = _dt.datetime.now(_dt.UTC).strftime("%H:%M:%S")
        body = (
            f"hello from the provider's backend, through OutRelay\n"
            f"request: {line}\nserved at {now} UTC\n"
        ).encode()
        head = (
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head + body)
        await writer.drain()
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def _request(port: int) -> str:
    async with asyncio.timeout(REQUEST_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /demo HTTP/1.0\r\nHost: hello\r\n\r\n")
        await writer.drain()
        data = await reader.read()
        writer.close()
    return data.decode("utf-8", "replace")


async def run_demo(
    *, port: int = 0, directory: str = "", once: bool = False, out: TextIO | None = None
) -> int:
    """Start everything, prove a request works, wait for Ctrl-C; returns the exit code."""
    out = out or sys.stdout
    temp = None if directory else tempfile.mkdtemp(prefix="outrelay-demo-")
    pki = Path(directory or temp or ".")
    try:
        files = await asyncio.to_thread(_make_pki, pki)
        provider_uri, consumer_uri = files.provider_uri, files.consumer_uri
        ca_crt, relay_crt, relay_key = files.ca_crt, files.relay_crt, files.relay_key
        prov_crt, prov_key, cons_crt, cons_key = (
            files.prov_crt,
            files.prov_key,
            files.cons_crt,
            files.cons_key,
        )

        backend = await asyncio.start_server(_http_backend, "127.0.0.1", 0)
        backend_port = backend.sockets[0].getsockname()[1]

        relay = Relay(RelayConfig(str(relay_crt), str(relay_key), str(ca_crt), listen_port=0))
        relay_host, relay_port = await relay.start()
        relays = ((relay_host, relay_port),)
        provider = Agent(
            AgentConfig(
                SessionConfig(
                    relays=relays,
                    uri=provider_uri,
                    tls=QuicTlsConfig(str(prov_crt), str(prov_key), str(ca_crt)),
                    services={SERVICE: f"127.0.0.1:{backend_port}"},
                )
            )
        )
        consumer = Agent(
            AgentConfig(
                SessionConfig(
                    relays=relays,
                    uri=consumer_uri,
                    tls=QuicTlsConfig(str(cons_crt), str(cons_key), str(ca_crt)),
                ),
                consumes=[(SERVICE, f"127.0.0.1:{port}")],
            )
        )
        try:
            await provider.start()
            await consumer.start()
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await provider.session.connected.wait()
                await consumer.session.connected.wait()
            local_port = consumer.bound[0][2]
            print(
                _banner(
                    pki,
                    temp is not None,
                    relay_port,
                    backend_port,
                    local_port,
                    provider_uri,
                    consumer_uri,
                ),
                file=out,
            )
            response = await _request(local_port)
            print("One request through the tunnel:\n", file=out)
            print("  " + response.replace("\r\n", "\n").replace("\n", "\n  ").rstrip(), file=out)
            ok = response.startswith("HTTP/1.0 200")
            if not ok:
                print("\nThe request did not succeed; run with --log-level debug.", file=out)
                return 1
            if once:
                return 0
            print(
                f"\nTry it yourself:  curl http://127.0.0.1:{local_port}/\n"
                "Press Ctrl-C to stop everything.",
                file=out,
                flush=True,
            )
            await _wait_for_signal()
            print("\nStopping the consumer, the provider, the relay and the backend.", file=out)
            return 0
        finally:
            await consumer.shutdown()
            await provider.shutdown()
            await relay.stop()
            backend.close()
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


@dataclass(frozen=True)
class _DemoPki:
    ca_crt: Path
    relay_crt: Path
    relay_key: Path
    prov_crt: Path
    prov_key: Path
    cons_crt: Path
    cons_key: Path
    provider_uri: str
    consumer_uri: str


def _make_pki(pki: Path) -> _DemoPki:
    """A CA, a relay and two agents, valid for two days."""
    pki.mkdir(parents=True, exist_ok=True)
    ca = create_ca("OutRelay Demo CA", days=2)
    relay = issue_relay(ca, region="local", relay_id="demo-relay", days=2)
    provider, provider_uri = issue_agent(ca, tenant=TENANT, days=2)
    consumer, consumer_uri = issue_agent(ca, tenant=TENANT, days=2)
    ca_crt, _ = write_identity(pki, "ca", ca, force=True)
    relay_crt, relay_key = write_identity(pki, "relay", relay, force=True)
    prov_crt, prov_key = write_identity(pki, "provider", provider, force=True)
    cons_crt, cons_key = write_identity(pki, "consumer", consumer, force=True)
    return _DemoPki(
        ca_crt,
        relay_crt,
        relay_key,
        prov_crt,
        prov_key,
        cons_crt,
        cons_key,
        provider_uri,
        consumer_uri,
    )


async def _wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _banner(
    pki: Path,
    throwaway: bool,
    relay_port: int,
    backend_port: int,
    local_port: int,
    provider_uri: str,
    consumer_uri: str,
) -> str:
    where = "a temporary directory, removed at exit" if throwaway else "kept"
    return f"""\
OutRelay demo -- everything on 127.0.0.1; only the relay listens for agents.

  PKI        {pki} ({where})
  relay      udp 127.0.0.1:{relay_port}  (mTLS QUIC, ALPN orp/1)
  backend    tcp 127.0.0.1:{backend_port}  (built-in HTTP server)
  provider   {provider_uri}
             dials the relay, exposes service "{SERVICE}" -> 127.0.0.1:{backend_port}
  consumer   {consumer_uri}
             dials the relay, listens on 127.0.0.1:{local_port} for "{SERVICE}"

  app -> 127.0.0.1:{local_port} -> consumer ==QUIC==> relay <==QUIC== provider -> backend

The same with separate processes (after this demo stops; keep the PKI with --dir):
  outrelay-relay --listen 127.0.0.1:{relay_port} --cert {pki}/relay.crt --key {pki}/relay.key \\
      --ca {pki}/ca.crt
  outrelay-agent --relay 127.0.0.1:{relay_port} --uri {provider_uri} \\
      --cert {pki}/provider.crt --key {pki}/provider.key --ca {pki}/ca.crt \\
      --expose {SERVICE}=127.0.0.1:{backend_port}
  outrelay-agent --relay 127.0.0.1:{relay_port} --uri {consumer_uri} \\
      --cert {pki}/consumer.crt --key {pki}/consumer.key --ca {pki}/ca.crt \\
      --consume {SERVICE}@127.0.0.1:{local_port}
"""
