"""Private networks: the pnet protector as the spec and go/js-libp2p have it, on every connection.

Defects (py-libp2p 0.8.1, ``libp2p/security/pnet/psk_conn.py`` and its callers in
``libp2p/network/swarm.py``):

* ``PskConn`` sends an **8-byte** nonce and encrypts with plain **Salsa20**. The spec
  (libp2p/specs ``pnet/Private-Networks-PSK-V1.md``), go-libp2p and js-libp2p's
  ``@libp2p/pnet`` send a **24-byte** nonce and use **XSalsa20**: a py-libp2p node
  with a key cannot talk to any other implementation holding the same key.
* Its first read takes the nonce with one ``read(8)``, which may return fewer bytes.
* It subclasses ``RawConnection`` without initialising it (no ``stream``,
  ``is_initiator``, connection type or addresses), so code that inspects raw
  connections fails or, worse, looks through it.
* The swarm wraps connections in it on three paths (``dial_addr`` ~1138,
  ``dial_addr_as_responder`` ~1458, ``upgrade_inbound_raw_conn`` ~2101) but not in
  ``upgrade_outbound_raw_conn``: a relayed connection we dial is unprotected while the
  other end (inbound) expects protection, so no relayed connection ever works.

Adjustment: the library's ``psk`` stays unset; :func:`protect_host` wraps the host's
security upgrader instead, the one step every non-QUIC connection passes through in
both directions (dialled, accepted, hole-punched, relayed), so each one is wrapped in
a :class:`PnetConnection` before the first byte of multistream-select. QUIC connections
never pass there (they arrive already secured and multiplexed): a node with a key must
not use QUIC, and ``runtime/host.py`` turns it off.

:class:`PnetConnection` is the protector: each side sends a fresh random 24-byte nonce
in its first write, then everything it writes is XORed with the XSalsa20 keystream
under (key, its nonce); the reader takes the peer's nonce (however it is split across
reads) and decrypts likewise. It is not a ``RawConnection`` and has no ``stream``
attribute, so ``transports/noise.py`` never mistakes it for a plain TCP connection
whose socket it could use directly: every byte goes through :meth:`write` and
:meth:`read`.

XSalsa20 = Salsa20 (pycryptodome, in C) keyed with HSalsa20(key, nonce[:16]) and the
nonce's last 8 bytes; HSalsa20 (:func:`hsalsa20`) runs once per connection direction,
in Python.

Speed: over plain TCP the protector reads into the caller's buffer and decrypts there
(:meth:`PnetConnection.recv_into`, used by ``NoiseSession``) and encrypts into a reused
buffer that goes to the trio socket in one ``send_all``, with the error mapping of
``TrioTCPStream``; other connections (relayed ones) go through their own read/write.
The cipher itself (~0.9 GB/s per core here) is most of the remaining cost: measured with
``scripts/bench_stream.py --private`` (README, "Access control").
"""

from __future__ import annotations

import os
import struct
from typing import Any

import trio
from Crypto.Cipher import Salsa20
from libp2p.abc import IHost, IRawConnection
from libp2p.connection_types import ConnectionType
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from multiaddr import Multiaddr

NONCE_SIZE = 24
KEY_SIZE = 32
_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_MASK = 0xFFFFFFFF


def _rotl(value: int, shift: int) -> int:
    return ((value << shift) & _MASK) | (value >> (32 - shift))


def hsalsa20(key: bytes, nonce16: bytes) -> bytes:
    """The HSalsa20 core: a 32-byte subkey from a 32-byte key and a 16-byte input."""
    if len(key) != KEY_SIZE or len(nonce16) != 16:
        raise ValueError("HSalsa20 takes a 32-byte key and 16 bytes of nonce")
    k = struct.unpack("<8I", key)
    n = struct.unpack("<4I", nonce16)
    x = [_SIGMA[0], k[0], k[1], k[2], k[3], _SIGMA[1], n[0], n[1],
         n[2], n[3], _SIGMA[2], k[4], k[5], k[6], k[7], _SIGMA[3]]  # fmt: skip

    def quarter(a: int, b: int, c: int, d: int) -> None:
        x[b] ^= _rotl((x[a] + x[d]) & _MASK, 7)
        x[c] ^= _rotl((x[b] + x[a]) & _MASK, 9)
        x[d] ^= _rotl((x[c] + x[b]) & _MASK, 13)
        x[a] ^= _rotl((x[d] + x[c]) & _MASK, 18)

    for _ in range(10):  # 20 rounds: column round, then row round
        quarter(0, 4, 8, 12)
        quarter(5, 9, 13, 1)
        quarter(10, 14, 2, 6)
        quarter(15, 3, 7, 11)
        quarter(0, 1, 2, 3)
        quarter(5, 6, 7, 4)
        quarter(10, 11, 8, 9)
        quarter(15, 12, 13, 14)
    return struct.pack("<8I", x[0], x[5], x[10], x[15], x[6], x[7], x[8], x[9])


def xsalsa20(key: bytes, nonce: bytes) -> Any:
    """A streaming XSalsa20 cipher (``encrypt``/``decrypt`` continue the keystream)."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError("XSalsa20 takes a 24-byte nonce")
    return Salsa20.new(key=hsalsa20(key, nonce[:16]), nonce=nonce[16:])


def _plain_tcp(conn: IRawConnection) -> trio.SocketStream | None:
    """The trio socket stream under exactly a plain TCP raw connection, else None."""
    if type(conn) is RawConnection and isinstance(conn.stream, TrioTCPStream):
        stream = conn.stream.stream
        if isinstance(stream, trio.SocketStream):
            return stream
    return None


class PnetConnection(IRawConnection):
    """A raw connection whose bytes are XSalsa20-encrypted under the network key."""

    def __init__(self, conn: IRawConnection, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("a network key is 32 bytes")
        self._conn = conn
        self._key = key
        self.is_initiator = conn.is_initiator
        self._sender: Any = None
        self._receiver: Any = None
        self._peer_nonce = b""
        self._socket_stream = _plain_tcp(conn)
        self._out = bytearray()  # ciphertext scratch for the plain-TCP write path

    async def write(self, data: bytes | memoryview) -> None:
        prefix = b""
        if self._sender is None:
            prefix = os.urandom(NONCE_SIZE)
            self._sender = xsalsa20(self._key, prefix)
        if self._socket_stream is None:
            await self._conn.write(prefix + self._sender.encrypt(data))
            return
        size = len(prefix) + len(data)
        if len(self._out) < size:
            self._out = bytearray(size)
        out = memoryview(self._out)[:size]
        out[: len(prefix)] = prefix
        self._sender.encrypt(data, output=out[len(prefix) :])
        try:
            await self._socket_stream.send_all(out)
        except trio.BrokenResourceError as error:
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error
        except trio.ClosedResourceError:
            return  # closed locally, as TrioTCPStream.write reports it

    async def _take_nonce(self) -> bool:
        """Read the peer's nonce if not done yet; False at EOF before it was whole."""
        while self._receiver is None:
            chunk = await self._conn.read(NONCE_SIZE - len(self._peer_nonce))
            if not chunk:
                return False
            self._peer_nonce += chunk
            if len(self._peer_nonce) == NONCE_SIZE:
                self._receiver = xsalsa20(self._key, self._peer_nonce)
        return True

    async def read(self, n: int | None = None) -> bytes:
        """Up to ``n`` decrypted bytes; ``b""`` at EOF (also before a whole nonce came)."""
        if not await self._take_nonce():
            return b""
        data = await self._conn.read(n)
        if not data:
            return b""
        return self._receiver.decrypt(data)

    async def recv_into(self, view: memoryview) -> int:
        """Read and decrypt into ``view``: the count of bytes, 0 at EOF."""
        if self._socket_stream is None or not await self._take_nonce():
            data = await self.read(len(view))
            view[: len(data)] = data
            return len(data)
        try:
            got = await self._socket_stream.socket.recv_into(view)
        except trio.ClosedResourceError:
            return 0  # closed locally: EOF, as TrioTCPStream.read reports it
        except OSError as error:
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error
        if got:
            chunk = view[:got]
            self._receiver.decrypt(chunk, output=chunk)
        return got

    async def close(self) -> None:
        await self._conn.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._conn.get_remote_address()

    def get_transport_addresses(self) -> list[Multiaddr]:
        return self._conn.get_transport_addresses()

    def get_connection_type(self) -> ConnectionType:
        return self._conn.get_connection_type()


def protect_host(host: IHost, key: bytes) -> None:
    """Wrap every connection ``host`` secures from now on (either direction) in the
    pnet protector under ``key``."""
    if len(key) != KEY_SIZE:
        raise ValueError("a network key is 32 bytes")
    upgrader = host.get_network().upgrader  # type: ignore[attr-defined]
    if getattr(upgrader, "_pnet_protected", False):
        raise RuntimeError("this host is protected already")
    secure = upgrader.upgrade_security

    async def upgrade_security(raw_conn: IRawConnection, is_initiator: bool, peer_id: Any = None) -> Any:
        return await secure(PnetConnection(raw_conn, key), is_initiator, peer_id)

    upgrader.upgrade_security = upgrade_security
    upgrader._pnet_protected = True
