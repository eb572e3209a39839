"""Who may open which exposed service: the allowlist, as pure data and decisions (no I/O).

Theory of operation
-------------------
An :class:`AccessPolicy` maps service names to the peers allowed to open them, from
``--allow SERVICE=PEER[,PEER...]`` and from the lines of an ``--allow-file``
(:func:`parse_allow_file`). A peer of ``*`` stands for every peer.

**The default** depends only on whether access control was asked for, never on the
lists' contents:

* no ``--allow`` and no ``--allow-file``: the policy is *open*. Every exposed service
  may be opened by every peer that can reach the node (the runtime logs a warning per
  service at start). This is how punchgate behaved before allowlists existed.
* either given (even an empty file): the policy is *enforcing*. A service may be
  opened only by the peers listed for it (or by every peer if ``*`` is listed); a
  service with no list may be opened by nobody. Deleting a line from the allow file
  therefore never opens a service to the world, it only closes it further.

**What a peer learns** (:func:`decide`). A peer that may open a name gets the service
(accepted) or, if nothing is exposed under that name, ``unknown service 'NAME'``. A
peer that may not open a name gets ``not allowed``, whether or not anything is exposed
under it. So the answer to a request depends only on the policy, the peer, the name
asked for and whether that one name is exposed *to that peer*: a refused peer cannot
tell an existing service from a missing one, and no answer ever depends on which other
services exist. The node's own log keeps the full reason (``detail``).

In the open policy every peer may open every name, so unknown names are reported as
such (nothing is hidden from anyone).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from punchgate.specs import SERVICE_NAME_RE, SpecError, parse_peer_id

ANY_PEER = "*"
NOT_ALLOWED = "not allowed"

# base58btc (the alphabet has no 0, O, I or l); peer IDs are 46-52 characters here
# (Ed25519 "12D3KooW...", RSA/SHA-256 "Qm..."), 128 leaves room and bounds the work.
PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,128}$")
MAX_FILE_BYTES = 1 << 20  # an allow file larger than this is refused (1 MiB)


class AllowError(SpecError):
    """An allow entry or allow file line is malformed; ``str()`` says where and why."""


def parse_service(text: str) -> str:
    if not SERVICE_NAME_RE.match(text):
        raise AllowError(
            f"service name {text!r} must be 1-63 characters of letters, digits, '.', '_' or '-'"
            " and start with a letter or digit"
        )
    return text


def parse_peer(text: str) -> str:
    """A peer ID in base58 (as punchgate logs them), or ``*``."""
    if text == ANY_PEER:
        return text
    if PEER_ID_RE.match(text):
        try:
            return parse_peer_id(text)  # a valid multihash, not just base58 letters
        except SpecError:
            pass
    raise AllowError(f"{text!r} is not a peer ID (base58, like 12D3KooW...) or *")


def parse_allow_spec(text: str) -> tuple[str, frozenset[str]]:
    """``SERVICE=PEER_ID[,PEER_ID...]`` -> (service, peers)."""
    service, sep, peers = text.partition("=")
    if not sep:
        raise AllowError(f"{text!r} has no '=' between service and peer IDs")
    names = [p.strip() for p in peers.split(",")]
    if not any(names):
        raise AllowError(f"{text!r} lists no peer ID")
    if "" in names:
        raise AllowError(f"{text!r} has an empty peer ID between commas")
    return parse_service(service.strip()), frozenset(parse_peer(n) for n in names)


def parse_allow_file(text: str) -> dict[str, frozenset[str]]:
    """The rules in an allow file: one ``SERVICE PEER_ID`` per line, ``#`` starts a
    comment, blank lines are ignored. Raises :class:`AllowError` naming the first bad
    line; nothing is returned half-parsed."""
    if len(text) > MAX_FILE_BYTES:
        raise AllowError(f"the file is larger than {MAX_FILE_BYTES} bytes")
    rules: dict[str, set[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        fields = content.split()
        if len(fields) != 2:
            raise AllowError(f"line {number}: expected 'SERVICE PEER_ID', got {len(fields)} fields")
        try:
            service, peer = parse_service(fields[0]), parse_peer(fields[1])
        except AllowError as exc:
            raise AllowError(f"line {number}: {exc}") from None
        rules.setdefault(service, set()).add(peer)
    return {service: frozenset(peers) for service, peers in rules.items()}


def merge(*rule_sets: Mapping[str, Collection[str]]) -> dict[str, frozenset[str]]:
    """The union of several rule sets, service by service."""
    merged: dict[str, set[str]] = {}
    for rules in rule_sets:
        for service, peers in rules.items():
            merged.setdefault(service, set()).update(peers)
    return {service: frozenset(peers) for service, peers in merged.items()}


@dataclass(frozen=True)
class AccessPolicy:
    """Which peers may open which service; see the module docstring for the default."""

    rules: Mapping[str, frozenset[str]] = field(default_factory=dict)
    enforcing: bool = False

    @classmethod
    def open(cls) -> AccessPolicy:
        return cls({}, enforcing=False)

    @classmethod
    def enforce(cls, *rule_sets: Mapping[str, Collection[str]]) -> AccessPolicy:
        return cls(merge(*rule_sets), enforcing=True)

    def permits(self, peer: str, service: str) -> bool:
        if not self.enforcing:
            return True
        listed = self.rules.get(service, frozenset())
        return peer in listed or ANY_PEER in listed

    def open_to_all(self, exposed: Iterable[str]) -> list[str]:
        """The exposed services every peer may open (the start-up warnings)."""
        return [s for s in exposed if not self.enforcing or ANY_PEER in self.rules.get(s, ())]

    def closed_to_all(self, exposed: Iterable[str]) -> list[str]:
        """The exposed services nobody may open (an enforcing policy with no list for them)."""
        return [s for s in exposed if self.enforcing and not self.rules.get(s)]

    def unexposed(self, exposed: Collection[str]) -> list[str]:
        """Services that have a list but are not exposed here (worth a note, not an error)."""
        return sorted(s for s in self.rules if s not in exposed)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str | None = None  # what the peer is told when refused
    detail: str | None = None  # what our log says (may name things the peer must not learn)


def decide(policy: AccessPolicy, peer: str, service: str, exposed: Collection[str]) -> Decision:
    """May ``peer`` open ``service`` on a node exposing ``exposed``? (See the module docstring.)"""
    if not policy.permits(peer, service):
        detail = f"{service!r} is not exposed" if service not in exposed else f"peer not on the list for {service!r}"
        return Decision(False, NOT_ALLOWED, detail)
    if service not in exposed:
        reason = f"unknown service {service!r}"
        return Decision(False, reason, reason)
    return Decision(True)


@dataclass(frozen=True)
class Change:
    """How one service's list changed between two policies."""

    service: str
    added: tuple[str, ...]
    removed: tuple[str, ...]


def changes(old: AccessPolicy, new: AccessPolicy) -> list[Change]:
    """Per service, the peers added and removed (services whose lists differ only)."""
    result = []
    for service in sorted(set(old.rules) | set(new.rules)):
        before, after = old.rules.get(service, frozenset()), new.rules.get(service, frozenset())
        if before != after:
            result.append(Change(service, tuple(sorted(after - before)), tuple(sorted(before - after))))
    return result
