"""Key agreement (X25519), key derivation (HKDF-SHA256), share encryption (AES-256-GCM), identity signatures."""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ProtocolViolation

_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


def new_x25519() -> tuple[X25519PrivateKey, bytes, bytes]:
    """(private key, raw 32-byte private bytes, raw 32-byte public bytes)."""
    sk = X25519PrivateKey.generate()
    raw = sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return sk, raw, sk.public_key().public_bytes(**_RAW)


def x25519_from_raw(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def ed25519_raw_public(pk: Ed25519PublicKey) -> bytes:
    return pk.public_bytes(**_RAW)


def derive(sk: X25519PrivateKey, peer_pk: bytes, *, round_id: str, purpose: bytes, a: str, b: str) -> bytes:
    """32-byte key = HKDF-SHA256(X25519(sk, peer), salt=H(round), info=purpose|sorted(a, b))."""
    try:
        shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    except ValueError as e:
        raise ProtocolViolation(f"invalid X25519 public key from peer: {e}") from None
    lo, hi = sorted((a, b))
    info = b"mor-secagg/" + purpose + b"\x00" + lo.encode() + b"\x00" + hi.encode()
    salt = hashlib.sha256(b"mor-secagg-round\x00" + round_id.encode()).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(shared)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < 28:
        raise ProtocolViolation("encrypted share too short")
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except InvalidTag:
        raise ProtocolViolation("encrypted share failed authentication (tampered or misaddressed)") from None


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def verify(pk: Ed25519PublicKey, sig: bytes, data: bytes, what: str) -> None:
    try:
        pk.verify(sig, data)
    except InvalidSignature:
        raise ProtocolViolation(f"bad signature on {what}") from None
