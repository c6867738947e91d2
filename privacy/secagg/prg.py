"""Mask expansion: AES-256-CTR keyed with the whole 32-byte derived key, read as unsigned words (vectorised)."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

NONCE_SELF = b"S" + b"\x00" * 15
NONCE_PAIR = b"P" + b"\x00" * 15


def expand(key: bytes, n: int, dtype, nonce: bytes = NONCE_PAIR) -> np.ndarray:
    """``n`` uniformly random words of ``dtype`` (uint32/uint64) from AES-256-CTR(key, nonce)."""
    if len(key) != 32:
        raise ValueError("PRG keys are 32 bytes")
    dt = np.dtype(dtype)
    enc = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    return np.frombuffer(enc.update(bytes(n * dt.itemsize)) + enc.finalize(), dtype=dt)
