"""The embedded service registry: which agent provides which service (spec 02 §4, §10.3).

The reference relay keeps no service table of its own: REGISTER, Resolve and DeregisterAgent
are gRPC calls to the controller (spec 02 §4, §10.3). The Python relay embeds the part of the
controller it needs (DESIGN.md "embedded control plane"): this in-memory table, with the
reference controller's semantics:

* **RegisterService** upserts on ``(tenant, service_name)``: re-registering returns the same
  ``service_id`` ``"<tenant>/<service_name>"`` and rebinds agent, relay and local address; if
  another agent registers the same name it **takes over** the name (last writer wins).

  [REC] (ours) **Every live provider is kept.** The reference keeps one row per name, so the
  agent that lost the name to a taker is forgotten: when the taker disconnects the name is gone
  (404) although the first provider is still connected. We keep, per ``(tenant,
  service_name)``, a stack of bindings, one per agent, in registration order. The newest
  serves, so resolution is unchanged (last writer wins); an agent that registers the name again
  moves to the top (it wrote last) with its new ``local_addr``. When the newest provider goes
  away, the next most recent live one serves again: no 404 while any provider of the name is
  connected. Who may join a stack at all is the relay's policy ("provide" rules, checked before
  :meth:`ServiceRegistry.register`); this module knows nothing of policy.
* Every field must be non-empty, or the registration is rejected (the relay then sends no
  REGISTER_ACK, spec 02 §4 step 5, §18.1 item 4). Exception: ``local_addr`` may be empty; an
  agent replaying its registrations after a reconnect may not know it, and the reference
  relay's own registry test registers with an empty one.
* **Resolve** returns the newest binding for ``(tenant, service_name)`` (optionally the newest
  whose agent the caller says is live), or nothing. The relay compares its ``relay_id`` with its
  own to decide whether the provider is local (spec 02 §6.1 step 3a).
* **DeregisterAgent** deletes every row of ``(tenant, agent_uri, relay_id)``: the agent leaves
  every stack it is in, wherever it sits; the others keep their order.

The stale-connection hazard (spec 02 §4, §15 item 2) is the caller's to avoid: on disconnect
the relay calls :meth:`ServiceRegistry.deregister_agent` only if its agent map still points at
the connection that is going away.

Sans-IO: no I/O, no clock, no tasks; the caller serialises access (one event loop).
"""

from __future__ import annotations

from collections.abc import Callable
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

    __slots__ = ("_relay_id", "_stacks")

    def __init__(self, relay_id: str) -> None:
        self._relay_id = relay_id
        # (tenant, service_name) -> its providers, oldest first: the last one serves. A name
        # whose last provider leaves is deleted, so no stack is ever empty. The dict keeps the
        # order in which names were first registered (while they stay registered).
        self._stacks: dict[tuple[str, str], list[ServiceBinding]] = {}

    @property
    def relay_id(self) -> str:
        """This relay's id."""
        return self._relay_id

    @staticmethod
    def validate(tenant: str, service_name: str, agent_uri: str) -> None:
        """Check a registration's required fields without registering anything.

        The relay calls this before evaluating policy, so that a malformed REGISTER is refused
        for what it is, not audited as a policy decision.

        Raises:
            RegistrationRejected: ``tenant``, ``service_name`` or ``agent_uri`` is empty.
        """
        for field, value in (
            ("tenant", tenant),
            ("service_name", service_name),
            ("agent_uri", agent_uri),
        ):
            if not value:
                raise RegistrationRejected(field)

    def register(self, tenant: str, service_name: str, agent_uri: str, local_addr: str) -> str:
        """Make ``agent_uri`` the newest provider of ``service_name`` in ``tenant`` (upsert).

        An agent already in the name's stack is moved to the top with its new ``local_addr``;
        the other providers keep their order underneath.

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
        self.validate(tenant, service_name, agent_uri)
        binding = ServiceBinding(tenant, service_name, agent_uri, self._relay_id, local_addr)
        stack = self._stacks.setdefault((tenant, service_name), [])
        stack[:] = [b for b in stack if b.agent_uri != agent_uri]
        stack.append(binding)
        return binding.service_id

    def resolve(
        self, tenant: str, service_name: str, is_live: Callable[[str], bool] | None = None
    ) -> ServiceBinding | None:
        """The binding that serves ``service_name`` in ``tenant``, or ``None`` (the relay then
        answers ``STREAM_REJECT{404, "service not found"}``, spec 02 §6.1 step 3b).

        Args:
            tenant: The consumer's tenant.
            service_name: ``OpenStream.target_service``.
            is_live: If given, only bindings whose ``agent_uri`` it accepts are considered (the
                relay passes "has a connection in the agent map"), so a provider whose
                teardown has not run yet never hides an older live one.

        Returns:
            The most recently registered (live) provider's binding.
        """
        for binding in reversed(self._stacks.get((tenant, service_name), ())):
            if is_live is None or is_live(binding.agent_uri):
                return binding
        return None

    def providers(self, tenant: str, service_name: str) -> tuple[ServiceBinding, ...]:
        """Every provider of ``service_name`` in ``tenant``, oldest first (the last serves)."""
        return tuple(self._stacks.get((tenant, service_name), ()))

    def deregister_agent(self, tenant: str, agent_uri: str) -> list[str]:
        """Remove every service of ``agent_uri`` (in ``tenant``) bound to this relay.

        The agent leaves every stack it is in, on top or not; where it served, the next most
        recent provider serves now. Called when the agent's connection ends (spec 02 §2.4
        step 3), subject to the stale-connection check of §15 item 2.

        Returns:
            The names the agent provided (and no longer does), in the order the names were
            first registered.
        """
        gone: list[str] = []
        for key, stack in list(self._stacks.items()):
            kept = [
                b
                for b in stack
                if not (
                    b.tenant == tenant and b.agent_uri == agent_uri and b.relay_id == self._relay_id
                )
            ]
            if len(kept) == len(stack):
                continue
            gone.append(key[1])
            if kept:
                stack[:] = kept
            else:
                del self._stacks[key]
        return gone

    def services(self) -> list[ServiceBinding]:
        """Every binding: names in first-registration order, each name's providers oldest
        first (for introspection and the admin API)."""
        return [binding for stack in self._stacks.values() for binding in stack]

    def __len__(self) -> int:
        """The number of registered names (a name counts once, however many providers)."""
        return len(self._stacks)
