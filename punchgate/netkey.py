"""The private-network key: its file format, loading it, and ``punchgate network-key new PATH``.

The file is the one go-libp2p and js-libp2p (``@libp2p/pnet``) read, three lines::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits: the 32-byte key>

(``/base64/`` is read too, as go-libp2p does.) Nodes holding the same key form a private
network: every connection is wrapped in the pnet protector under that key
(``libp2p_fixes/pnet.py``), and a peer without it cannot complete the first handshake.

The key never appears in a log line or an error message: errors say what is wrong with
the file's shape, and nodes identify their key by :func:`fingerprint` (a hash, safe to
print: compare fingerprints to see whether two nodes hold the same key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from punchgate.keyfiles import ExposedKeyFile, check_private, write_new_private

HEADER = "/key/swarm/psk/1.0.0/"
KEY_SIZE = 32
MAX_FILE_SIZE = 4096


class NetworkKeyError(Exception):
    """The network key file cannot be used; ``str()`` is one line, without key material."""


def decode(data: bytes, source: str = "network key") -> bytes:
    """The 32-byte key in a key file's contents."""
    if len(data) > MAX_FILE_SIZE:
        raise NetworkKeyError(f"{source} is larger than {MAX_FILE_SIZE} bytes: not a network key file")
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise NetworkKeyError(f"{source} is not a text file starting with {HEADER}") from None
    lines = [line.strip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    if not lines or lines[0] != HEADER:
        raise NetworkKeyError(f"{source} does not start with the line {HEADER}")
    if len(lines) != 3:
        raise NetworkKeyError(f"{source} must have 3 lines ({HEADER}, /base16/, the key), not {len(lines)}")
    encoding, text = lines[1], lines[2]
    try:
        if encoding == "/base16/":
            key = bytes.fromhex(text) if all(c in "0123456789abcdefABCDEF" for c in text) else b""
        elif encoding == "/base64/":
            key = base64.b64decode(text, validate=True)
        else:
            raise NetworkKeyError(f"{source}: encoding line must be /base16/ (or /base64/)")
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != KEY_SIZE:
        digits = "64 hex digits" if encoding == "/base16/" else "44 base64 characters"
        raise NetworkKeyError(f"{source}: the third line must be {KEY_SIZE} bytes as {digits}")
    return key


def encode(key: bytes) -> bytes:
    if len(key) != KEY_SIZE:
        raise ValueError(f"a network key is {KEY_SIZE} bytes")
    return f"{HEADER}\n/base16/\n{key.hex()}\n".encode()


def fingerprint(key: bytes) -> str:
    """A short, one-way name for the key: equal keys, equal fingerprints."""
    return hashlib.sha256(b"punchgate network key fingerprint\0" + key).hexdigest()[:16]


def load(path: Path) -> bytes:
    """Read the key at ``path``; refuse a file its group or others may access."""
    source = f"network key file {path}"
    try:
        check_private(path, "network key file")
        with path.open("rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except ExposedKeyFile as exc:
        raise NetworkKeyError(str(exc)) from None
    except FileNotFoundError:
        raise NetworkKeyError(
            f"{source} does not exist; make one with: punchgate network-key new {path}"
        ) from None
    except OSError as exc:
        raise NetworkKeyError(f"cannot read {source}: {exc.strerror}") from None
    return decode(data, source)


def create(path: Path) -> bytes:
    """Make a new random key at ``path`` (mode 0600); never overwrite a file."""
    key = secrets.token_bytes(KEY_SIZE)
    try:
        write_new_private(path, encode(key))
    except FileExistsError:
        raise NetworkKeyError(f"{path} already exists; not overwriting it (remove it first to replace the key)") from None
    except OSError as exc:
        raise NetworkKeyError(f"cannot create network key file {path}: {exc.strerror}") from None
    return key


USAGE = "usage: punchgate network-key new PATH"


def main(argv: Sequence[str]) -> int:
    """``punchgate network-key new PATH``: exit 0 (made), 1 (could not), 2 (bad usage)."""
    args = list(argv)
    if args in (["-h"], ["--help"]):
        print(f"{USAGE}\n  write a new random private-network key to PATH (mode 0600); copy that file to"
              " every node of the network and start each with --network-key PATH")
        return 0
    if len(args) != 2 or args[0] != "new" or args[1].startswith("-"):
        print(f"punchgate: error: {USAGE}", file=sys.stderr)
        return 2
    path = Path(args[1])
    try:
        key = create(path)
    except NetworkKeyError as exc:
        print(f"punchgate: error: {exc}", file=sys.stderr)
        return 1
    print(f"network key written to {path} (mode 0600, fingerprint {fingerprint(key)})")
    return 0
