"""Strict binary messages of the SecAgg+ round: ``to_bytes()`` / ``from_bytes()`` with no slack.

Layout: ``b"MSA1" | kind (u8) | fields...`` in a fixed order; strings u16-length UTF-8, bytes u32-length, lists
and maps u32-count with map keys strictly increasing (canonical: one encoding per message, so signatures and
hashes over bytes are well defined). ``from_bytes`` refuses wrong magic/kind, truncation, trailing bytes, unsorted
or duplicate keys, and out-of-range lengths, with :class:`MessageError`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from .errors import MessageError

MAGIC = b"MSA1"
MAX_LEN = 1 << 28


class _W:
    def __init__(self):
        self.parts = []

    def u8(self, v):
        self.parts.append(struct.pack(">B", v))

    def u32(self, v):
        if not (0 <= v < 2 ** 32):
            raise MessageError(f"integer field out of range: {v}")
        self.parts.append(struct.pack(">I", v))

    def f64(self, v):
        self.parts.append(struct.pack(">d", float(v)))

    def str(self, s):
        b = s.encode("utf-8")
        if len(b) >= 2 ** 16:
            raise MessageError("string field too long")
        self.parts.append(struct.pack(">H", len(b)) + b)

    def bytes(self, b):
        self.u32(len(b))
        self.parts.append(bytes(b))


class _R:
    def __init__(self, data: bytes):
        self.d = memoryview(data)
        self.i = 0

    def take(self, n):
        if n < 0 or self.i + n > len(self.d):
            raise MessageError("truncated message")
        out = self.d[self.i:self.i + n]
        self.i += n
        return out

    def u8(self):
        return self.take(1)[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def f64(self):
        return struct.unpack(">d", self.take(8))[0]

    def str(self):
        n = struct.unpack(">H", self.take(2))[0]
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError("string field is not UTF-8") from None

    def bytes(self):
        n = self.u32()
        if n > MAX_LEN:
            raise MessageError("bytes field too long")
        return bytes(self.take(n))


def _write(w: _W, kind: str, v):
    if kind == "str":
        w.str(v)
    elif kind == "bytes":
        w.bytes(v)
    elif kind == "u32":
        w.u32(v)
    elif kind == "f64":
        w.f64(v)
    elif kind == "strs":
        w.u32(len(v))
        for s in v:
            w.str(s)
    elif kind == "map":  # dict[str, bytes], canonical order
        w.u32(len(v))
        for k in sorted(v):
            w.str(k)
            w.bytes(v[k])
    elif kind == "f64arr":
        a = np.ascontiguousarray(v, dtype=">f8").reshape(-1)
        w.bytes(a.tobytes())
    else:  # pragma: no cover
        raise AssertionError(kind)


def _read(r: _R, kind: str):
    if kind == "str":
        return r.str()
    if kind == "bytes":
        return r.bytes()
    if kind == "u32":
        return r.u32()
    if kind == "f64":
        return r.f64()
    if kind == "strs":
        n = r.u32()
        if n > MAX_LEN:
            raise MessageError("list too long")
        return [r.str() for _ in range(n)]
    if kind == "map":
        n = r.u32()
        out, last = {}, None
        for _ in range(n):
            k = r.str()
            if last is not None and k <= last:
                raise MessageError("map keys not strictly increasing (non-canonical or duplicate)")
            last = k
            out[k] = r.bytes()
        return out
    if kind == "f64arr":
        b = r.bytes()
        if len(b) % 8:
            raise MessageError("float array length not a multiple of 8")
        return np.frombuffer(b, dtype=">f8").astype(np.float64)
    raise AssertionError(kind)  # pragma: no cover


class Message:
    KIND = 0
    SPEC: tuple[tuple[str, str], ...] = ()

    def to_bytes(self) -> bytes:
        w = _W()
        w.parts.append(MAGIC)
        w.u8(self.KIND)
        for name, kind in self.SPEC:
            _write(w, kind, getattr(self, name))
        return b"".join(w.parts)

    @classmethod
    def from_bytes(cls, data: bytes, *, round_id: str | None = None):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MessageError(f"{cls.__name__}: payload must be bytes")
        r = _R(bytes(data))
        if bytes(r.take(4)) != MAGIC:
            raise MessageError(f"{cls.__name__}: bad magic")
        if r.u8() != cls.KIND:
            raise MessageError(f"{cls.__name__}: wrong message kind for this stage")
        vals = {name: _read(r, kind) for name, kind in cls.SPEC}
        if r.i != len(r.d):
            raise MessageError(f"{cls.__name__}: {len(r.d) - r.i} trailing bytes")
        msg = cls(**vals)
        if round_id is not None and getattr(msg, "round_id", round_id) != round_id:
            raise MessageError(f"{cls.__name__}: message for round {msg.round_id!r}, expected {round_id!r} (replay?)")
        return msg


@dataclass
class SetupConfig(Message):
    """Server -> every client (identical bytes): the round's public parameters."""

    KIND = 1
    SPEC = (("round_id", "str"), ("client_ids", "strs"), ("threshold", "u32"), ("degree", "u32"),
            ("max_colluders", "u32"), ("vector_length", "u32"), ("weights", "f64arr"), ("frac_bits", "u32"),
            ("value_range", "f64"), ("mod_bits", "u32"), ("weight_cap", "f64"), ("out_of_range", "str"),
            ("dp_sigma", "f64"), ("dp_min_survivors", "u32"))
    round_id: str
    client_ids: list
    threshold: int
    degree: int
    max_colluders: int         # c: colluding clients per neighbourhood tolerated; clients check 2t > degree+1+c
    vector_length: int
    weights: np.ndarray       # n (scalar weight per client) or n*m (per-item weights), row-major by client_ids
    frac_bits: int
    value_range: float
    mod_bits: int
    weight_cap: float
    out_of_range: str
    dp_sigma: float            # per-client discrete-Gaussian std in integer units (0: no DP)
    dp_min_survivors: int

    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()

    def masked_length(self) -> int:
        """Words in each masked vector: the m weighted scores, plus (plain ``secagg``) one coordinate carrying the
        client's count of clipped scores, so the server learns only the total count; DP modes send no count."""
        return self.vector_length + (0 if self.dp_sigma > 0 else 1)

    def weight_matrix(self) -> np.ndarray:
        n, m = len(self.client_ids), self.vector_length
        w = np.asarray(self.weights, dtype=np.float64)
        if w.size == n:
            return np.repeat(w.reshape(n, 1), m, axis=1)
        if w.size == n * m:
            return w.reshape(n, m)
        raise MessageError(f"weights has {w.size} values; expected {n} or {n}x{m}")


@dataclass
class AdvertiseKeys(Message):
    """Client -> server (and forwarded to neighbours): signed ephemeral public keys."""

    KIND = 2
    SPEC = (("round_id", "str"), ("client_id", "str"), ("identity_proof", "bytes"), ("enc_pk", "bytes"),
            ("mask_pk", "bytes"), ("config_digest", "bytes"), ("nonce_commit", "bytes"), ("signature", "bytes"))
    round_id: str
    client_id: str
    identity_proof: bytes
    enc_pk: bytes
    mask_pk: bytes
    config_digest: bytes
    nonce_commit: bytes        # graph.commit_nonce(...) of a 32-byte random nonce revealed at the next stage
    signature: bytes

    def signed_bytes(self) -> bytes:
        return b"|".join([b"mor-secagg/advertise/v2", self.round_id.encode(), self.client_id.encode(), self.enc_pk,
                          self.mask_pk, self.config_digest, self.nonce_commit])


@dataclass
class PeerKeys(Message):
    """Server -> client (stage ``reveal``): the AdvertiseKeys of every client still alive (client_id -> bytes),
    identical for all clients: each verifies them all (identity, signature, config digest) and then reveals its
    nonce; the commitments are fixed before any nonce is known."""

    KIND = 3
    SPEC = (("round_id", "str"), ("adverts", "map"))
    round_id: str
    adverts: dict


@dataclass
class NonceReveal(Message):
    """Client -> server: the nonce committed to in its AdvertiseKeys."""

    KIND = 10
    SPEC = (("round_id", "str"), ("client_id", "str"), ("nonce", "bytes"))
    round_id: str
    client_id: str
    nonce: bytes


@dataclass
class NonceReveals(Message):
    """Server -> client (stage ``share_keys``): every revealed nonce (client_id -> nonce). Each client checks them
    against the signed commitments, and derives the graph seed from all of them (``graph.derive_seed``)."""

    KIND = 11
    SPEC = (("round_id", "str"), ("nonces", "map"))
    round_id: str
    nonces: dict


@dataclass
class EncryptedShares(Message):
    """Client -> server (routing): AES-GCM ciphertexts of Shamir shares, recipient id -> ciphertext; or server ->
    client: sender id -> ciphertext addressed to it."""

    KIND = 4
    SPEC = (("round_id", "str"), ("client_id", "str"), ("shares", "map"))
    round_id: str
    client_id: str
    shares: dict


@dataclass
class MaskedInput(Message):
    KIND = 5
    """Client -> server: the masked words only (``SetupConfig.masked_length()`` of them). Nothing per client in
    clear: the clipped-score count travels as a masked coordinate (plain secagg) or not at all (secagg+dp)."""

    SPEC = (("round_id", "str"), ("client_id", "str"), ("masked", "bytes"))
    round_id: str
    client_id: str
    masked: bytes


@dataclass
class SurvivorSet(Message):
    """Server -> client: U3, the clients whose masked inputs the server has."""

    KIND = 6
    SPEC = (("round_id", "str"), ("survivors", "strs"))
    round_id: str
    survivors: list

    def signed_bytes(self, client_id: str) -> bytes:
        return b"|".join([b"mor-secagg/consistency", self.round_id.encode(), client_id.encode(),
                          b"\x00".join(s.encode() for s in sorted(self.survivors))])


@dataclass
class ConsistencySig(Message):
    KIND = 7
    SPEC = (("round_id", "str"), ("client_id", "str"), ("signature", "bytes"))
    round_id: str
    client_id: str
    signature: bytes


@dataclass
class UnmaskRequest(Message):
    """Server -> client: U3 again and every consistency signature it collected (client_id -> signature)."""

    KIND = 8
    SPEC = (("round_id", "str"), ("survivors", "strs"), ("signatures", "map"))
    round_id: str
    survivors: list
    signatures: dict


@dataclass
class UnmaskShares(Message):
    """Client -> server: shares of b_j for surviving neighbours (``b_shares``) and of mask keys for dropped
    neighbours (``sk_shares``); never both for the same j."""

    KIND = 9
    SPEC = (("round_id", "str"), ("client_id", "str"), ("b_shares", "map"), ("sk_shares", "map"))
    round_id: str
    client_id: str
    b_shares: dict
    sk_shares: dict


