"""libp2p's TLS 1.3 identity: a self-signed certificate that carries the host key.

The libp2p TLS handshake (specs ``tls/tls.md``) authenticates a peer without a
certificate authority. Each side presents one self-signed X.509 certificate, made with
a fresh key that has nothing to do with its host key, and proves its host identity in
an extension of that certificate (OID 1.3.6.1.4.1.53594.1.1):

    SignedKey ::= SEQUENCE { publicKey OCTET STRING, signature OCTET STRING }

``publicKey`` is the host's public key in libp2p's protobuf encoding (the same bytes
that give its peer ID); ``signature`` is the host key's signature over
``b"libp2p-tls-handshake:"`` followed by the certificate's SubjectPublicKeyInfo (DER).
TLS itself proves that the peer holds the certificate's key (CertificateVerify), the
extension proves that the host key vouched for that certificate key: together, that the
peer is the host the peer ID names.

:func:`peer_id_of` checks what the spec requires of a received certificate: valid now,
self-signed with a hash of at least 256 bits, no critical extension it does not know,
exactly one libp2p extension whose signature verifies. It returns the peer ID or raises
:class:`CertificateError` with the reason.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from libp2p.crypto.keys import PrivateKey
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID

EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.53594.1.1")
SIGNING_PREFIX = b"libp2p-tls-handshake:"
ALPN = "libp2p"
VALIDITY = datetime.timedelta(days=36500)  # the spec asks only that it be valid when received
CLOCK_SKEW = datetime.timedelta(days=1)  # peers whose clocks are a little behind still accept it
_OCTET_STRING = 0x04
_SEQUENCE = 0x30
_WEAK_HASHES = (hashes.MD5, hashes.SHA1, hashes.SHA224)


class CertificateError(Exception):
    """A peer's certificate does not prove a libp2p identity."""


def make_certificate(host_key: PrivateKey) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh P-256 key and a self-signed certificate in which ``host_key`` vouches for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    signature = host_key.sign(SIGNING_PREFIX + spki)
    extension = _der(_SEQUENCE, _der(_OCTET_STRING, host_key.get_public_key().serialize()) + _der(_OCTET_STRING, signature))
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([])  # the spec names nothing: identity is in the extension
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.UnrecognizedExtension(EXTENSION_OID, extension), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def peer_id_of(certificate: x509.Certificate, now: datetime.datetime | None = None) -> ID:
    """The peer ID ``certificate`` proves, or :class:`CertificateError`."""
    now = now or datetime.datetime.now(datetime.UTC)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise CertificateError("certificate is not valid now")
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, _WEAK_HASHES):
        raise CertificateError("certificate signed with a weak or no hash")
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(f"certificate is not self-signed: {exc or type(exc).__name__}") from None
    found = [e for e in certificate.extensions if e.oid == EXTENSION_OID]
    if len(found) != 1:
        raise CertificateError(f"certificate has {len(found)} libp2p extensions, not 1")
    unknown = [e.oid.dotted_string for e in certificate.extensions if e.critical and e.oid != EXTENSION_OID]
    if unknown:
        raise CertificateError(f"certificate has unknown critical extensions {unknown}")
    value = found[0].value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    try:
        body, rest = _undo(_SEQUENCE, raw)
        public_bytes, after_key = _undo(_OCTET_STRING, body)
        signature, after_signature = _undo(_OCTET_STRING, after_key)
    except ValueError as exc:
        raise CertificateError(f"libp2p extension is not a SignedKey: {exc}") from None
    if rest or after_signature:
        raise CertificateError("libp2p extension has trailing bytes")
    try:
        host_key = deserialize_public_key(public_bytes)
    except Exception as exc:  # unknown key type, bad protobuf: the library raises several kinds
        raise CertificateError(f"libp2p extension holds no usable public key: {exc}") from None
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    try:
        valid = host_key.verify(SIGNING_PREFIX + spki, signature)
    except Exception:  # malformed signatures make some key types raise instead of answering False
        valid = False
    if not valid:
        raise CertificateError("the host key's signature over the certificate key does not verify")
    return ID.from_pubkey(host_key)


def _der(tag: int, content: bytes) -> bytes:
    """One DER element: tag, definite length, content."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def _undo(tag: int, data: bytes) -> tuple[bytes, bytes]:
    """(content, what follows) of the DER element at the start of ``data``, which must have ``tag``."""
    if len(data) < 2 or data[0] != tag:
        raise ValueError(f"expected tag 0x{tag:02x}")
    first = data[1]
    if first < 0x80:
        start, size = 2, first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or len(data) < 2 + count:
            raise ValueError("bad length")
        start, size = 2 + count, int.from_bytes(data[2 : 2 + count], "big")
    if len(data) < start + size:
        raise ValueError("truncated")
    return data[start : start + size], data[start + size :]
