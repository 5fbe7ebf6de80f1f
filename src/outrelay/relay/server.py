"""Old home of :class:`Relay` and :class:`RelayConfig`, now in :mod:`outrelay.relay.edge`.

Import them from :mod:`outrelay.relay`. This alias stays while ``tests/agent`` (another
package's tests) still imports ``outrelay.relay.server``.
"""

from __future__ import annotations

from outrelay.relay.edge import Relay, RelayConfig

__all__ = ["Relay", "RelayConfig"]
