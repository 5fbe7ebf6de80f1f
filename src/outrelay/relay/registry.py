"""The embedded service registry: which agent provides which service (spec 02 §4, §10.3).

The reference relay keeps no service table of its own: REGISTER, Resolve and DeregisterAgent
are gRPC calls to the controller (spec 02 §4, §10.3). The Python relay embeds the part of the
controller it needs (DESIGN.md "embedded control plane"): this in-memory table, with the
reference controller's semantics:

* **RegisterService** upserts on ``(tenant, service_name)``: re-registering returns the same
  ``service_id`` ``"<tenant>/<service_name>"`` and rebinds agent, relay and local address; if
  another agent registers the same name it **takes over** the name (last writer wins).
* Every field must be non-empty, or the registration is rejected (the relay then sends no
  REGISTER_ACK, spec 02 §4 step 5, §18.1 item 4). Exception: ``local_addr`` may be empty; an
  agent replaying its registrations after a reconnect may not know it, and the reference
  relay's own registry test registers with an empty one.
* **Resolve** returns the one binding for ``(tenant, service_name)``, or nothing. The relay
  compares its ``relay_id`` with its own to decide whether the provider is local (spec 02 §6.1
  step 3a).
* **DeregisterAgent** deletes every row of ``(tenant, agent_uri, relay_id)``.

The stale-connection hazard (spec 02 §4, §15 item 2) is the caller's to avoid: on disconnect
the relay calls :meth:`ServiceRegistry.deregister_agent` only if its agent map still points at
the connection that is going away.

Sans-IO: no I/O, no clock, no tasks; the caller serialises access (one event loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["RegistrationRejected", "ServiceBinding", "ServiceRegistry", "service_id"]

_SERVICE_ID_SEPARATOR: Final = "/"


def service_id(tenant: str, service_name: str) -> str:
    """The id the reference controller returns for a registration: ``"<tenant>/<name>"``, e.g.
    ``acme/svc-echo`` (spec 02 §4 step 4). It is echoed in REGISTER_ACK."""
    return f"{tenant}{_SERVICE_ID_SEPARATOR}{service_name}"


class RegistrationRejected(ValueError):
    """A registration was refused because a required field is empty (spec 02 §4 step 5).

    The relay logs a warning and sends **no** REGISTER_ACK.

    Attributes:
        field: The empty field's name (``"tenant"``, ``"service_name"`` or ``"agent_uri"``).
    """

    def __init__(self, field: str) -> None:
        super().__init__(f"registration rejected: {field} must not be empty")
        self.field = field


@dataclass(frozen=True, slots=True)
class ServiceBinding:
    """Which agent provides a service, and where (one registry row)."""

    tenant: str
    """The provider's tenant (from its URI); services are per tenant."""
    service_name: str
    """The name consumers put in ``OPEN_STREAM.target_service``."""
    agent_uri: str
    """The provider agent's URI; the relay looks it up in its agent map."""
    relay_id: str
    """The relay the provider is connected to (``--relay-id``); locality is string equality."""
    local_addr: str
    """The provider's backend address, as it reported it in REGISTER (may be empty)."""

    @property
    def service_id(self) -> str:
        """``"<tenant>/<service_name>"``."""
        return service_id(self.tenant, self.service_name)


class ServiceRegistry:
    """The in-memory service table of one relay (see the module docstring).

    Args:
        relay_id: This relay's id (``--relay-id``); every binding made here carries it.
    """

    __slots__ = ("_relay_id", "_rows")

    def __init__(self, relay_id: str) -> None:
        self._relay_id = relay_id
        self._rows: dict[tuple[str, str], ServiceBinding] = {}

    @property
    def relay_id(self) -> str:
        """This relay's id."""
        return self._relay_id

    def register(self, tenant: str, service_name: str, agent_uri: str, local_addr: str) -> str:
        """Bind ``service_name`` of ``tenant`` to ``agent_uri`` on this relay (upsert).

        Args:
            tenant: The registering agent's tenant, parsed from its URI.
            service_name: ``Register.service_name``.
            agent_uri: The registering agent's URI.
            local_addr: ``Register.local_addr``; may be empty.

        Returns:
            The service id ``"<tenant>/<service_name>"`` to send in REGISTER_ACK.

        Raises:
            RegistrationRejected: ``tenant``, ``service_name`` or ``agent_uri`` is empty. The
                relay must then send nothing (spec 02 §4 step 5).
        """
        for field, value in (
            ("tenant", tenant),
            ("service_name", service_name),
            ("agent_uri", agent_uri),
        ):
            if not value:
                raise RegistrationRejected(field)
        binding = ServiceBinding(tenant, service_name, agent_uri, self._relay_id, local_addr)
        self._rows[(tenant, service_name)] = binding
        return binding.service_id

    def resolve(self, tenant: str, service_name: str) -> ServiceBinding | None:
        """The binding of ``service_name`` in ``tenant``, or ``None`` (the relay answers
        ``STREAM_REJECT{404, "service not found"}``, spec 02 §6.1 step 3b)."""
        return self._rows.get((tenant, service_name))

    def deregister_agent(self, tenant: str, agent_uri: str) -> list[str]:
        """Remove every service of ``agent_uri`` (in ``tenant``) bound to this relay.

        Called when the agent's connection ends (spec 02 §2.4 step 3), subject to the
        stale-connection check of §15 item 2.

        Returns:
            The names of the services removed, in registration order.
        """
        gone = [
            key
            for key, b in self._rows.items()
            if b.tenant == tenant and b.agent_uri == agent_uri and b.relay_id == self._relay_id
        ]
        for key in gone:
            del self._rows[key]
        return [name for _tenant, name in gone]

    def services(self) -> list[ServiceBinding]:
        """Every binding, in first-registration order (for introspection and the admin API)."""
        return list(self._rows.values())

    def __len__(self) -> int:
        return len(self._rows)
