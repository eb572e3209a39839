"""The Noise session of a TCP (or relayed) connection: large reads, zero-copy frames, batched writes.

Defects (py-libp2p 0.8.1), all per-message Python and trio overhead, not crypto:

- ``libp2p/io/msgio.py`` ``BaseMsgReadWriter.read_msg`` (used by
  ``libp2p/security/noise/io.py`` ``BaseNoiseMsgReadWriter.read_msg``): every Noise
  message costs two ``read_exactly`` calls (2-byte length, then body), i.e. two
  socket reads, two TCP-stream lock round trips and a bytearray-to-bytes copy.
- ``libp2p/security/secure_session.py`` ``SecureSession.read``: each decrypted
  message is copied again through a ``BytesIO``, a ``bytearray`` and ``bytes``.
- ``libp2p/security/noise/io.py`` ``write_msg``: one socket write (and TCP lock)
  per 64 KiB Noise message.

:class:`NoiseSession` (a ``SecureSession``) takes over once the handshake is done
(``libp2p/security/noise/patterns.py`` builds it by the module-global name
``SecureSession``, ~278 and ~365). It ``recv_into``s a persistent buffer as much as
the socket has, decrypts each message straight from a memoryview of that buffer, keeps
the plaintexts in a deque with an offset, and hands the Yamux reader zero-copy views of
bytes that sit inside one plaintext (:meth:`NoiseSession.read_exact`).
:meth:`NoiseSession.write_many` encrypts a batch of plaintexts in place, one Noise
message each, and sends them with one write. Encryption and decryption use the
handshake's own cipher states, which own the nonces; the wire format is unchanged.

Only one task writes (the package's rule 3): during muxer negotiation the task that
negotiates, afterwards the Yamux sender, so no lock guards the nonce order. On plain
TCP the trio socket under ``RawConnection`` -> ``TrioTCPStream`` is used directly
(mapping errors as ``TrioTCPStream.read``/``write`` do, without its per-call lock); a
relayed connection's raw connection (a stream through the relay) through its own
``read`` and ``write``.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.security.noise import patterns as noise_patterns
from libp2p.security.secure_session import SecureSession
from noise.constants import MAX_NONCE
from noise.exceptions import NoiseInvalidMessage, NoiseMaxNonceError

from punchgate.transports import NOISE_PLAINTEXT, WRITE_BATCH

LIBRARY_SESSION = noise_patterns.SecureSession  # what the handshake builds as shipped

_LENGTH = struct.Struct("!H")
_MAX_MESSAGE = 0xFFFF
_TAG = 16  # Poly1305
RECV_SIZE = 256 * 1024
# Room for one big recv after compaction plus one whole message that straddles it.
BUFFER_SIZE = RECV_SIZE + _LENGTH.size + _MAX_MESSAGE
SEND_BUFFER_SIZE = WRITE_BATCH * (_LENGTH.size + _MAX_MESSAGE)  # one batch of full messages


def _trio_socket_stream(raw: Any) -> trio.SocketStream | None:
    """The trio socket stream under a plain TCP raw connection, else None."""
    if isinstance(raw, RawConnection) and isinstance(raw.stream, TrioTCPStream):
        stream = raw.stream.stream
        if isinstance(stream, trio.SocketStream):
            return stream
    return None


class NoiseSession(SecureSession):
    """``SecureSession`` with a buffered, batched Noise transport read/write path."""

    def __init__(self, *, conn: Any, **kwargs: Any) -> None:
        super().__init__(conn=conn, **kwargs)
        protocol = conn.noise_state.noise_protocol
        self._encryptor = protocol.cipher_state_encrypt
        self._decryptor = protocol.cipher_state_decrypt
        self._raw = conn.read_writer.read_write_closer
        self._socket_stream = _trio_socket_stream(self._raw)
        self._socket = None if self._socket_stream is None else self._socket_stream.socket
        self._rbuf = bytearray(BUFFER_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0  # unread ciphertext is _rbuf[_rstart:_rend]
        self._rend = 0
        self._plain: deque[memoryview] = deque()  # decrypted, not yet consumed
        self._plain_offset = 0  # consumed bytes of _plain[0]
        self._plain_size = 0  # unconsumed bytes in _plain
        self._wview = memoryview(bytearray(SEND_BUFFER_SIZE))
        self._scratch = memoryview(bytearray(NOISE_PLAINTEXT))
        # cryptography >= 45 can encrypt into our buffer; older versions allocate.
        self._aead_into = getattr(self._encryptor.cipher.cipher, "encrypt_into", None)

    def get_local_address(self) -> tuple[str, int] | None:
        """Our end of the TCP connection under this session (None on a relayed one)."""
        if self._socket is None:
            return None
        return tuple(self._socket.getsockname()[:2])

    # -- receiving -----------------------------------------------------------

    async def _recv_into(self, view: memoryview) -> int:
        if self._socket is None:
            recv_into = getattr(self._raw, "recv_into", None)  # the pnet protector has one
            if recv_into is not None:
                return await recv_into(view)
            data = await self._raw.read(len(view))
            view[: len(data)] = data
            return len(data)
        try:
            return await self._socket.recv_into(view)
        except trio.ClosedResourceError:
            return 0  # closed locally: EOF, as TrioTCPStream.read reports it
        except OSError as error:
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error

    async def _fill(self, need: int) -> None:  # type: ignore[override]  # ours reads; the library's parses
        """Make at least ``need`` unread ciphertext bytes available in the buffer."""
        while self._rend - self._rstart < need:
            if self._rstart == self._rend:
                self._rstart = self._rend = 0
            elif BUFFER_SIZE - self._rend < _LENGTH.size + _MAX_MESSAGE:
                unread = self._rend - self._rstart
                self._rview[:unread] = self._rview[self._rstart : self._rend]
                self._rstart, self._rend = 0, unread
            got = await self._recv_into(self._rview[self._rend :])
            if got == 0:
                raise IncompleteReadError(
                    "Connection closed during read operation",
                    expected_bytes=need,
                    received_bytes=self._rend - self._rstart,
                )
            self._rend += got

    async def _pull_message(self) -> None:
        """Read, decrypt and queue one Noise message."""
        await self._fill(_LENGTH.size)
        (length,) = _LENGTH.unpack_from(self._rbuf, self._rstart)
        await self._fill(_LENGTH.size + length)
        start = self._rstart + _LENGTH.size
        ciphertext = self._rview[start : start + length]
        try:
            plaintext = self._decryptor.decrypt_with_ad(None, ciphertext)
        except InvalidTag as error:
            raise NoiseInvalidMessage("Failed authentication of message") from error
        finally:
            ciphertext.release()
        self._rstart = start + length
        if plaintext:
            self._plain.append(memoryview(plaintext))
            self._plain_size += len(plaintext)

    def _consume(self, n: int) -> memoryview | bytes:
        """Take ``n`` buffered plaintext bytes; a view when they sit in one message."""
        first = self._plain[0]
        offset = self._plain_offset
        if len(first) - offset >= n:
            piece: memoryview | bytes = first[offset : offset + n]
            self._advance(n)
            return piece
        out = bytearray()
        while len(out) < n:
            first = self._plain[0]
            take = min(len(first) - self._plain_offset, n - len(out))
            out += first[self._plain_offset : self._plain_offset + take]
            self._advance(take)
        return bytes(out)

    def _advance(self, n: int) -> None:
        self._plain_offset += n
        self._plain_size -= n
        if self._plain_offset == len(self._plain[0]):
            self._plain.popleft()
            self._plain_offset = 0

    def plaintext_buffered(self) -> int:
        """Decrypted bytes that a read can return without waiting."""
        return self._plain_size

    async def read_exact(self, n: int) -> memoryview | bytes:
        """Exactly ``n`` bytes (a zero-copy view when possible); raise if the peer closed."""
        while self._plain_size < n:
            await self._pull_message()
        return self._consume(n) if n else b""

    async def read(self, n: int | None = None) -> bytes:
        """``SecureSession.read`` semantics: ``n`` bytes (fewer only at EOF), or
        with ``n=None`` what one message holds."""
        if n == 0:
            return b""
        try:
            if n is None:
                while not self._plain_size:
                    await self._pull_message()
                return bytes(self._consume(len(self._plain[0]) - self._plain_offset))
            while self._plain_size < n:
                await self._pull_message()
        except IncompleteReadError as error:
            if n is None or not self._plain_size:
                raise ConnectionClosedError("Connection closed") from error
            n = self._plain_size  # partial data before the close, as SecureSession does
        return bytes(self._consume(n))

    # -- sending -------------------------------------------------------------

    async def write_many(self, messages: Iterable[Sequence[bytes | memoryview]]) -> None:
        """Send each message, given as the buffers that make up its plaintext (at most
        ``NOISE_PLAINTEXT`` bytes in all), as one Noise message; the whole batch goes out
        in one write (more when it exceeds one batch of full messages)."""
        out = self._wview
        used = 0
        for parts in messages:
            size = sum(len(part) for part in parts)
            if not size:
                continue  # an empty message reads as EOF to SecureSession
            if used + _LENGTH.size + size + _TAG > len(out):
                await self._send(out[:used])
                used = 0
            if len(parts) == 1:
                plaintext = parts[0]
            else:  # gather header + payload without allocating
                offset = 0
                for part in parts:
                    self._scratch[offset : offset + len(part)] = part
                    offset += len(part)
                plaintext = self._scratch[:size]
            _LENGTH.pack_into(out, used, size + _TAG)
            used += _LENGTH.size
            self._seal_into(plaintext, out[used : used + size + _TAG])
            used += size + _TAG
        if used:
            await self._send(out[:used])

    async def _send(self, data: memoryview) -> None:
        """Write ciphertext to the raw connection; on plain TCP straight to the socket
        (a broken connection raises ``ConnectionClosedError``, a locally closed one
        returns quietly, as ``TrioTCPStream.write`` does)."""
        if self._socket_stream is None:
            await self._raw.write(data)
            return
        try:
            await self._socket_stream.send_all(data)
        except trio.BrokenResourceError as error:
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error
        except trio.ClosedResourceError:
            return

    def _seal_into(self, plaintext: bytes | memoryview, out: memoryview) -> None:
        """Encrypt one transport message into ``out`` with the session's cipher state."""
        state = self._encryptor
        if self._aead_into is None:
            out[:] = state.encrypt_with_ad(None, bytes(plaintext))
            return
        if state.n == MAX_NONCE:
            raise NoiseMaxNonceError("Nonce has depleted!")
        self._aead_into(state.cipher.format_nonce(state.n), plaintext, None, out)
        state.n += 1

    async def write(self, data: bytes) -> None:
        view = memoryview(data).cast("B")
        await self.write_many(
            (view[offset : offset + NOISE_PLAINTEXT],) for offset in range(0, len(view), NOISE_PLAINTEXT)
        )
