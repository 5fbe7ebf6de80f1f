"""OutRelay identity URIs: parsing, validation and formatting (spec 01 "Identity URIs").

Every agent and relay is named by one URI, carried as the **first URI SAN** of its certificate
(spec 02 §2.2) and, for agents, repeated in ``Hello.agent_uri``::

    outrelay://<tenant>/agent/<uuid>      an agent of a tenant
    outrelay://<region>/relay/<id>        a relay of a region (inter-relay connections, spec 02 §10)

The *role* is the first path segment. The host part is called the **authority** here: the tenant
of an agent, the region of a relay. The reference keeps both in one ``Tenant`` field.

Rules, checked in this order (the reference parses with Go ``net/url`` and then checks the scheme,
the host and the path; we keep that order and are stricter where noted):

1. **Not empty.**
2. **Scheme** is exactly ``outrelay``, followed by ``//`` and an authority. Go lower-cases the
   scheme while parsing, so the reference also accepts ``OUTRELAY://``; we do not, since a
   certificate minted by either implementation always spells it in lower case.
3. **No query and no fragment** (``?``/``#``). The reference ignores both; an identity has no use
   for them and accepting them would give one identity many spellings.
4. **Authority** is a DNS label: ``^[a-z0-9][a-z0-9-]{0,62}$``: 1 to 63 characters, lower-case
   ASCII letters, digits and ``-``, not starting with ``-``. So no port (``acme:443``), no upper
   case, no IP literal, and no userinfo (``user@acme``; Go would put that aside and accept the
   rest, we reject it).
5. **Path** is exactly two non-empty segments: ``/agent/<uuid>`` or ``/relay/<id>``; a trailing
   slash or an empty segment makes it wrong. Percent-encoding is rejected (Go would decode it
   first; an identity never needs it).
6. **Agent UUID** is in the canonical 8-4-4-4-12 hex form, either case. Go's ``uuid.Parse``
   also takes ``urn:uuid:…``, ``{…}`` and bare 32-hex forms; no reference tool produces them, so
   we reject them. The version and variant bits are not checked (neither are they in Go).
7. **Relay id** follows the same DNS-label rule as the authority.

Round trip: :attr:`AgentIdentity.uri` renders the UUID in lower case. For a URI whose UUID is
written in lower case (all the reference ever mints), ``parse_identity(s).uri == s``. A URI with
upper-case hex parses, but its ``uri`` differs from the input; code that must compare byte for
byte (the relay's HELLO check, spec 02 §2.3) compares the raw strings, not parsed identities.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import ClassVar, Final, Literal, TypeAlias

__all__ = [
    "SCHEME",
    "AgentIdentity",
    "Identity",
    "InvalidIdentity",
    "RelayIdentity",
    "format_agent_uri",
    "format_relay_uri",
    "is_valid_label",
    "parse_agent_uri",
    "parse_identity",
    "tenant_of",
]

SCHEME: Final = "outrelay"
"""The URI scheme of every OutRelay identity (spec 01)."""

_LABEL_MAX: Final = 63
"""Longest tenant, region or relay id: one DNS label (RFC 1035 §2.3.4), so that each can map to
a subdomain, which is the reference's stated reason for the rule."""

_LABEL_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_LABEL_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_UUID_RE: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_PATH_SHAPE: Final = "path must be exactly two segments 'agent/<uuid>' or 'relay/<id>'"


class InvalidIdentity(ValueError):
    """A string is not a valid OutRelay identity URI, or the parts given cannot form one.

    The message names the URI and exactly what is wrong with it, e.g.
    ``identity 'outrelay://Acme/agent/…': tenant 'Acme' must be lower case``.

    Attributes:
        uri: The offending URI (for the constructors, the URI the parts would have formed).
        reason: What is wrong, without the URI.
    """

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"identity {uri!r}: {reason}")
        self.uri = uri
        self.reason = reason


def is_valid_label(value: str) -> bool:
    """Tell whether ``value`` is a valid tenant, region or relay id (spec 01).

    Args:
        value: The candidate label.

    Returns:
        True if it matches ``^[a-z0-9][a-z0-9-]{0,62}$``.
    """
    return _LABEL_RE.fullmatch(value) is not None


def _label_problem(what: str, value: str) -> str | None:
    """Explain why ``value`` is not a DNS label, or return None if it is one.

    Args:
        what: How the message names the value: ``tenant``, ``region``, ``host`` or ``relay id``.
        value: The candidate label.

    Returns:
        A reason such as ``tenant 'Acme' must be lower case``, or None when the label is valid.
    """
    if _LABEL_RE.fullmatch(value) is not None:
        return None
    if value == "":
        return f"{what} must not be empty"
    if len(value) > _LABEL_MAX:
        return f"{what} {value!r} is {len(value)} characters long; at most {_LABEL_MAX} are allowed"
    bad = [c for c in value if c not in _LABEL_CHARS]
    if bad and all("A" <= c <= "Z" for c in bad):
        return f"{what} {value!r} must be lower case"
    if bad:
        return (
            f"{what} {value!r} contains {bad[0]!r}; "
            "only lower-case letters a-z, digits and '-' are allowed"
        )
    # Only the first character is left to be wrong: a '-'.
    return f"{what} {value!r} must start with a lower-case letter or a digit, not '-'"


def _check_label(uri: str, what: str, value: str) -> None:
    """Raise :class:`InvalidIdentity` for ``uri`` unless ``value`` is a DNS label."""
    problem = _label_problem(what, value)
    if problem is not None:
        raise InvalidIdentity(uri, problem)


def _parse_uuid(uri: str, text: str) -> uuid.UUID:
    """Parse the agent segment ``text`` of ``uri`` as a canonical 8-4-4-4-12 UUID (either case).

    Raises:
        InvalidIdentity: ``text`` is not in that form.
    """
    if _UUID_RE.fullmatch(text) is None:
        raise InvalidIdentity(
            uri, f"{text!r} is not a valid UUID (expected 8-4-4-4-12 hexadecimal digits)"
        )
    return uuid.UUID(text)


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """An agent: ``outrelay://<tenant>/agent/<uuid>``.

    Constructing one validates it, so every instance renders a valid URI.

    Raises:
        InvalidIdentity: ``tenant`` is not a DNS label (spec 01).
        TypeError: ``agent_id`` is not a :class:`uuid.UUID`.
    """

    tenant: str
    """The tenant: the URI's host, a DNS label."""
    agent_id: uuid.UUID
    """The agent's UUID."""

    role: ClassVar[Literal["agent"]] = "agent"
    """The path's first segment."""

    def __post_init__(self) -> None:
        if not isinstance(self.agent_id, uuid.UUID):
            raise TypeError(f"agent_id must be a uuid.UUID, got {type(self.agent_id).__name__}")
        _check_label(self.uri, "tenant", self.tenant)

    @property
    def authority(self) -> str:
        """The URI's host part; for an agent, its tenant."""
        return self.tenant

    @property
    def uri(self) -> str:
        """The URI, with the UUID in canonical lower-case form."""
        return f"{SCHEME}://{self.tenant}/agent/{self.agent_id}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class RelayIdentity:
    """A relay: ``outrelay://<region>/relay/<id>``.

    Constructing one validates it, so every instance renders a valid URI.

    Raises:
        InvalidIdentity: ``region`` or ``relay_id`` is not a DNS label (spec 01).
    """

    region: str
    """The region: the URI's host, a DNS label."""
    relay_id: str
    """The relay's id, a DNS label."""

    role: ClassVar[Literal["relay"]] = "relay"
    """The path's first segment."""

    def __post_init__(self) -> None:
        _check_label(self.uri, "region", self.region)
        _check_label(self.uri, "relay id", self.relay_id)

    @property
    def authority(self) -> str:
        """The URI's host part; for a relay, its region."""
        return self.region

    @property
    def uri(self) -> str:
        """The URI."""
        return f"{SCHEME}://{self.region}/relay/{self.relay_id}"

    def __str__(self) -> str:
        return self.uri


Identity: TypeAlias = AgentIdentity | RelayIdentity
"""Either kind of identity; tell them apart with ``isinstance`` or ``.role``."""


def parse_identity(uri: str) -> AgentIdentity | RelayIdentity:
    """Parse an identity URI of either role, applying the rules in the module docstring.

    Args:
        uri: The URI, e.g. a certificate's first URI SAN or ``Hello.agent_uri``.

    Returns:
        An :class:`AgentIdentity` for ``…/agent/<uuid>``, a :class:`RelayIdentity` for
        ``…/relay/<id>``.

    Raises:
        InvalidIdentity: The URI breaks a rule; the message says which.
    """
    if uri == "":
        raise InvalidIdentity(uri, "is empty")

    scheme, colon, rest = uri.partition(":")
    if not colon or scheme == "" or "/" in scheme:
        raise InvalidIdentity(uri, f"has no scheme; it must start with '{SCHEME}://'")
    if scheme != SCHEME:
        raise InvalidIdentity(uri, f"scheme must be {SCHEME!r}, got {scheme!r}")
    if not rest.startswith("//"):
        raise InvalidIdentity(uri, f"must start with '{SCHEME}://' (an authority is required)")
    rest = rest[2:]

    if "?" in rest:
        raise InvalidIdentity(uri, f"has a query {rest[rest.index('?') :]!r}; none is allowed")
    if "#" in rest:
        raise InvalidIdentity(uri, f"has a fragment {rest[rest.index('#') :]!r}; none is allowed")

    authority, slash, path = rest.partition("/")
    segments = path.split("/") if slash else []
    role = segments[0] if segments else ""
    what = {"agent": "tenant", "relay": "region"}.get(role, "host")

    if "@" in authority:
        raise InvalidIdentity(uri, f"has userinfo {authority[: authority.rindex('@')]!r}")
    if "[" in authority or "]" in authority:
        raise InvalidIdentity(uri, f"{what} {authority!r} is an IP literal, not a DNS label")
    if ":" in authority:
        raise InvalidIdentity(uri, f"has a port: {authority!r}; the {what} must be a bare label")
    _check_label(uri, what, authority)

    if "%" in path:
        raise InvalidIdentity(uri, "path must not be percent-encoded")
    if len(segments) != 2 or "" in segments:
        if path.endswith("/") and path != "":
            hint = " (trailing slash)"
        elif "" in segments[:-1]:
            hint = " (empty segment)"
        else:
            hint = ""
        raise InvalidIdentity(uri, f"{_PATH_SHAPE}, got {path!r}{hint}")

    value = segments[1]
    if role == "agent":
        return AgentIdentity(authority, _parse_uuid(uri, value))
    if role == "relay":
        _check_label(uri, "relay id", value)
        return RelayIdentity(authority, value)
    raise InvalidIdentity(uri, f"role {role!r} must be 'agent' or 'relay'")


def parse_agent_uri(uri: str) -> AgentIdentity:
    """Parse an identity URI that must name an agent (``--uri``, ``Hello.agent_uri``).

    Args:
        uri: The URI.

    Returns:
        The agent identity.

    Raises:
        InvalidIdentity: The URI is invalid, or it is a valid relay URI. (The reference agent
            accepts a relay URI for ``--uri``, spec 03 §1.3; the relay would then refuse it.)
    """
    identity = parse_identity(uri)
    if isinstance(identity, RelayIdentity):
        raise InvalidIdentity(uri, "names a relay ('relay/<id>'); an agent URI is required")
    return identity


def format_agent_uri(tenant: str, agent_id: uuid.UUID | str) -> str:
    """Build ``outrelay://<tenant>/agent/<uuid>``.

    Args:
        tenant: The tenant, a DNS label.
        agent_id: The UUID, or its canonical 8-4-4-4-12 text in either case.

    Returns:
        The URI, with the UUID in lower case.

    Raises:
        InvalidIdentity: ``tenant`` or ``agent_id`` is invalid.
    """
    if isinstance(agent_id, str):
        agent_id = _parse_uuid(f"{SCHEME}://{tenant}/agent/{agent_id}", agent_id)
    return AgentIdentity(tenant, agent_id).uri


def format_relay_uri(region: str, relay_id: str) -> str:
    """Build ``outrelay://<region>/relay/<id>``.

    Args:
        region: The region, a DNS label.
        relay_id: The relay id, a DNS label.

    Returns:
        The URI.

    Raises:
        InvalidIdentity: ``region`` or ``relay_id`` is invalid.
    """
    return RelayIdentity(region, relay_id).uri


def tenant_of(uri: str) -> str:
    """Return the authority (host part) of an identity URI: the tenant of an agent.

    For a relay URI this is its region, as in the reference, whose parsed name keeps the region
    in its ``Tenant`` field. The relay derives a caller's tenant this way (spec 02 §4, §6.1).

    Args:
        uri: The URI.

    Returns:
        The tenant (or region).

    Raises:
        InvalidIdentity: The URI is invalid.
    """
    return parse_identity(uri).authority
