"""A memory of peers: whom we tunnelled to and which bootstrap peers answered, kept on disk.

Next to the identity file (``<identity>.peers``, mode 0600) a node keeps, for each peer
it opened a tunnel to, the service names and the addresses (direct and circuit) that
worked, and for each bootstrap peer that answered, its addresses; each with when it last
worked. At start these are tried alongside the configured bootstrap peers and the DHT,
so a client finds its provider again when the bootstrap node is gone.

The file is small and bounded (:data:`MAX_PEERS` peers, the most recently useful kept;
:data:`MAX_ADDRS` addresses and :data:`MAX_SERVICES` names each). One that cannot be
read, is not ours (another identity's) or is not this format is set aside (renamed
``.corrupt-<time>``) with a warning and a new one started: never an error at start.

This module has no I/O but reading and writing that one file; parsing and merging are
plain functions (tested with hypothesis).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

FORMAT = "punchgate-peers/1"
MAX_PEERS = 64
MAX_ADDRS = 8
MAX_SERVICES = 16
MAX_FILE = 256 * 1024


class UnusableMemory(Exception):
    """The file cannot be used (with the reason)."""


@dataclass(frozen=True)
class Remembered:
    peer_id: str
    addrs: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    bootstrap: bool = False
    last_ok: float = 0.0  # Unix time


@dataclass(frozen=True)
class Memory:
    owner: str  # our peer ID
    peers: dict[str, Remembered] = field(default_factory=dict)

    def remember(self, peer_id: str, addrs: tuple[str, ...], service: str | None, bootstrap: bool, now: float) -> Memory:
        """A copy that knows ``peer_id`` worked just now (addresses given replace the old ones)."""
        old = self.peers.get(peer_id, Remembered(peer_id))
        services = old.services
        if service is not None:
            services = (service, *(s for s in old.services if s != service))[:MAX_SERVICES]
        own = f"/p2p/{peer_id}"  # addresses are kept without the peer's own /p2p part
        bare = (a.removesuffix(own) for a in addrs)
        entry = replace(
            old,
            addrs=tuple(dict.fromkeys(bare))[:MAX_ADDRS] or old.addrs,
            services=services,
            bootstrap=old.bootstrap or bootstrap,
            last_ok=now,
        )
        peers = {**self.peers, peer_id: entry}
        if len(peers) > MAX_PEERS:  # forget the least recently useful
            keep = sorted(peers.values(), key=lambda r: r.last_ok, reverse=True)[:MAX_PEERS]
            peers = {r.peer_id: r for r in keep}
        return Memory(self.owner, peers)

    def to_json(self) -> str:
        peers = [
            {"peer_id": r.peer_id, "addrs": list(r.addrs), "services": list(r.services),
             "bootstrap": r.bootstrap, "last_ok": round(r.last_ok, 3)}
            for r in sorted(self.peers.values(), key=lambda r: r.last_ok, reverse=True)
        ]
        return json.dumps({"format": FORMAT, "owner": self.owner, "peers": peers}, indent=1) + "\n"


def parse(text: str, owner: str) -> Memory:
    """The memory in ``text``; :class:`UnusableMemory` if it is not one of ``owner``'s."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UnusableMemory(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UnusableMemory(f"not a {FORMAT} file")
    if data.get("owner") != owner:
        raise UnusableMemory(f"it belongs to another identity ({str(data.get('owner'))[:60]!r})")
    peers = data.get("peers")
    if not isinstance(peers, list):
        raise UnusableMemory("no list of peers")
    memory = Memory(owner)
    for item in peers[: MAX_PEERS * 2]:
        entry = _entry(item)
        if entry is None:
            raise UnusableMemory(f"a malformed entry: {str(item)[:80]}")
        if entry.peer_id != owner:
            memory = Memory(owner, {**memory.peers, entry.peer_id: entry})
    return memory


def _entry(item: Any) -> Remembered | None:
    if not isinstance(item, dict):
        return None
    peer_id, addrs, services = item.get("peer_id"), item.get("addrs", []), item.get("services", [])
    bootstrap, last_ok = item.get("bootstrap", False), item.get("last_ok", 0)
    strings = isinstance(addrs, list) and isinstance(services, list) and all(
        isinstance(x, str) and 0 < len(x) <= 512 for x in [*addrs, *services]
    )
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= 128 or not strings:
        return None
    if not isinstance(bootstrap, bool) or not isinstance(last_ok, (int, float)) or isinstance(last_ok, bool):
        return None
    return Remembered(
        peer_id, tuple(addrs)[:MAX_ADDRS], tuple(services)[:MAX_SERVICES], bootstrap, float(last_ok)
    )


def path_for(identity: Path) -> Path:
    return identity.with_name(identity.name + ".peers")


def load(path: Path, owner: str) -> tuple[Memory, str | None]:
    """The memory at ``path`` (empty if there is none), and a warning when a file had to be
    set aside (then renamed ``<path>.corrupt-<time>``)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        return Memory(owner), None
    except OSError as exc:
        return Memory(owner), f"cannot read {path} ({exc.strerror}); starting without a memory of peers"
    try:
        if len(raw) > MAX_FILE:
            raise UnusableMemory(f"larger than {MAX_FILE} bytes")
        return parse(raw.decode("utf-8", errors="strict"), owner), None
    except (UnusableMemory, UnicodeDecodeError) as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        try:
            os.replace(path, aside)
        except OSError as move_error:
            return Memory(owner), f"{path}: {exc}; cannot set it aside ({move_error.strerror}); not using it"
        return Memory(owner), f"{path}: {exc}; set aside as {aside.name}, starting a new one"


def save(path: Path, memory: Memory) -> None:
    """Write ``memory`` to ``path`` atomically, mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(memory.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
