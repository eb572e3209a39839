"""The node's Ed25519 identity, kept in a key file.

The file holds the private key in libp2p's protobuf encoding (the format other libp2p
implementations use for exported keys). It is created on first run with mode 0600 and
reused afterwards. A file that exists but cannot be read or decoded is an error: it is
never replaced, because a new key would silently change the node's peer ID. A file that
its group or others may access is refused too (with the ``chmod 600`` that fixes it):
whoever can read it can act as this node.
"""

from __future__ import annotations

from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key

from punchgate.keyfiles import ExposedKeyFile, check_private, write_new_private


class IdentityError(Exception):
    """The key file cannot be used."""


def load_or_create_identity(path: Path) -> tuple[KeyPair, bool]:
    """Return the key pair stored at ``path`` and whether it was created just now."""
    try:
        return _load(path), False
    except FileNotFoundError:
        pass
    key_pair = create_new_key_pair()
    _write_new(path, key_pair.private_key.serialize())
    return key_pair, True


def _load(path: Path) -> KeyPair:
    try:
        check_private(path, "identity file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except ExposedKeyFile as exc:
        raise IdentityError(str(exc)) from None
    except OSError as exc:
        raise IdentityError(f"cannot read identity file {path}: {exc.strerror}") from None
    try:
        private_key = deserialize_private_key(data)
    except Exception as exc:  # the decoder raises several unrelated types
        raise IdentityError(
            f"identity file {path} is not a libp2p private key ({type(exc).__name__}); "
            "move it away to create a new identity (the peer ID will change)"
        ) from None
    if private_key.get_type() is not KeyType.Ed25519:
        raise IdentityError(f"identity file {path} holds a {private_key.get_type().name} key, not Ed25519")
    return KeyPair(private_key, private_key.get_public_key())


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path`` with mode 0600, atomically."""
    try:
        write_new_private(path, data)
    except FileExistsError:
        raise IdentityError(f"identity file {path} appeared while creating it; start again") from None
    except OSError as exc:
        raise IdentityError(f"cannot create identity file {path}: {exc.strerror}") from None
