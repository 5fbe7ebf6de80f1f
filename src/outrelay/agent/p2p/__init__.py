"""P2P promotion (spec 03 §7).

Pure parts, exported here: candidate rules and priorities
(:mod:`.candidates`) and the connectivity-check schedule (:mod:`.checks`).
The asyncio shell, :mod:`.promote`, runs with ``--p2p-listen`` (off by
default); it is imported by the agent directly, not from here, because it
depends on the session, which depends on this package. :mod:`.interfaces`
lists the host's addresses for host candidates; :mod:`.connect` runs the
checks from the shared socket; :mod:`.swap` moves a stream onto a direct
connection and keeps its checkpoints flowing there.
"""

from __future__ import annotations

from outrelay.agent.p2p.candidates import (
    ADVERTISED_PRIORITY as ADVERTISED_PRIORITY,
)
from outrelay.agent.p2p.candidates import (
    SRFLX_PRIORITY as SRFLX_PRIORITY,
)
from outrelay.agent.p2p.candidates import (
    SRFLX_PRIORITY_REC as SRFLX_PRIORITY_REC,
)
from outrelay.agent.p2p.candidates import (
    Candidate as Candidate,
)
from outrelay.agent.p2p.candidates import (
    RequestIds as RequestIds,
)
from outrelay.agent.p2p.candidates import (
    host_candidates as host_candidates,
)
from outrelay.agent.p2p.candidates import (
    host_priority as host_priority,
)
from outrelay.agent.p2p.candidates import (
    local_candidates as local_candidates,
)
from outrelay.agent.p2p.candidates import (
    order_remote as order_remote,
)
from outrelay.agent.p2p.checks import CheckOutcome as CheckOutcome
from outrelay.agent.p2p.checks import CheckPlan as CheckPlan

__all__ = [
    "ADVERTISED_PRIORITY",
    "SRFLX_PRIORITY",
    "SRFLX_PRIORITY_REC",
    "Candidate",
    "CheckOutcome",
    "CheckPlan",
    "RequestIds",
    "host_candidates",
    "host_priority",
    "local_candidates",
    "order_remote",
]
