"""The agent (sidecar): session with the relay, consumer and provider roles."""

from __future__ import annotations
