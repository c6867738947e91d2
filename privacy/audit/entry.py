"""The audit-entry format: canonical JSON, hashes, signatures and the payload policy. Pure, I/O-free.

One entry is one JSON object on one line of a JSON Lines file::

    {"v": 1, "seq": 7, "time": "2026-11-21T23:40:00.123456Z", "actor": "server", "event": "round",
     "payload": {...}, "payload_digest": "<hex>", "prev": "<hex>", "hash": "<hex>", "sig": "<hex>"}

* ``payload_digest = SHA-256(canonical(payload))`` over the payload *as stored* (after elision, below).
* ``hash = SHA-256("MoR-audit-entry/1\\x00" || canonical(body))`` where body is every field except ``hash``/``sig``;
  ``prev`` is the previous entry's ``hash`` (64 zeros for the genesis entry), so entries form a hash chain.
* ``sig = Ed25519(writer identity key, "MoR-audit-sig/1\\x00" || hash)``.
* canonical(x) = ``json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)``,
  UTF-8 encoded.

Payload policy (what ``AuditLog.append`` stores):

* **Refused** (``SecretPayloadError``): any key, at any depth, that names secret material (see ``SECRET_WORDS``:
  key, secret, seed, mask, share, password, token, private, nonce, ...) unless it is clearly public or a count
  (``public_key``, ``key_id``, ``n_shares``, ``num_masks``, ``*_count``); any string that holds a PEM private key;
  and, when the payload's ``mode`` is ``secagg`` or ``secagg+dp``, any key naming individual scores
  (score, scores, raw_scores, rewards, ...) outside ``aggregate`` (aggregate statistics are allowed).
* **Digested**: ``bytes`` values are stored as ``{"$sha256": hex, "$bytes": n}``, and any value whose canonical
  JSON exceeds ``max_inline`` bytes (default 2048: e.g. per-item score lists in ``plain``/``dp`` mode) is stored the
  same way. ``value_digest(v)`` reproduces the digest, so whoever holds the original can prove it matches.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives import serialization

FORMAT = "mor-audit/1"
VERSION = 1
GENESIS_PREV = "0" * 64
_ENTRY_DOMAIN = b"MoR-audit-entry/1\x00"
_SIG_DOMAIN = b"MoR-audit-sig/1\x00"

#: Event types. The server logs registration/round/refusal/router_calibration/checkpoint_model/config/revocation;
#: a client logs registration/release/refusal/config. genesis, checkpoint and recovery are written by AuditLog itself.
EVENTS = (
    "genesis",             # first entry: format, actor, writer public key
    "registration",        # a client joined: name, certificate identity (subject, serial, fingerprint)
    "revocation",          # a certificate was revoked
    "round",               # server: a scoring round (id, mode, participants, dropouts, digests, aggregate, eps)
    "release",             # client: what it released in a round (round_id, mode, released, eps charged / total)
    "refusal",             # a request refused (budget, isolation, bad weights) with the reason
    "router_calibration",  # router calibrated: data digest, weights digest, eps charged per client
    "checkpoint_model",    # GRPO / policy checkpoint with model hashes
    "config",              # configuration (change)
    "checkpoint",          # signed (count, head, Merkle root) commitment, written periodically and on close
    "recovery",            # written on open after an unclean shutdown or a recovered torn tail
    "note",                # free-form operator annotation
)
_INTERNAL_EVENTS = ("genesis", "checkpoint", "recovery")

SECRET_WORDS = frozenset({
    "key", "keys", "secret", "secrets", "seed", "seeds", "mask", "masks", "share", "shares", "password",
    "passphrase", "passwd", "token", "tokens", "private", "privkey", "sk", "nonce", "credential", "credentials",
})
_PUBLIC_WORDS = frozenset({"public", "pub", "pk", "id", "ids", "n", "num", "count", "counts", "fingerprint"})
SCORE_WORDS = frozenset({"score", "scores", "rewards", "reward"})
_SCORE_OK = frozenset({"aggregate", "n", "num", "count", "mean", "std", "digest", "sha256"})
_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


class AuditError(Exception):
    """Base class of audit-log errors; the message names the file/field and the fix."""


class SecretPayloadError(AuditError, ValueError):
    """A payload would have put secret material (or raw secagg scores) into the log."""


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces, UTF-8, NaN/Infinity refused)."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except ValueError as e:  # NaN / inf
        raise AuditError(f"payload is not canonical JSON ({e}); replace NaN/inf by null or a string") from None
    except TypeError as e:
        raise AuditError(f"payload is not JSON-serialisable ({e}); convert it to dict/list/str/int/float/bool "
                         "or bytes") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def value_digest(value: Any) -> dict:
    """The stored form of a digested value: SHA-256 of raw bytes, or of the canonical JSON of anything else."""
    data = bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else canonical(value)
    return {"$sha256": sha256_hex(data), "$bytes": len(data)}


def _words(key: str) -> list[str]:
    return [w.lower() for w in _SPLIT.split(str(key)) if w]


def _secret_key(key: str) -> bool:
    words = set(_words(key))
    if not words & SECRET_WORDS:
        return False
    return not (words & _PUBLIC_WORDS)


def _score_key(key: str) -> bool:
    words = set(_words(key))
    return bool(words & SCORE_WORDS) and not (words & _SCORE_OK)


def check_payload(payload: Any, *, allowed_keys: frozenset[str] = frozenset(), mode: str | None = None,
                  path: str = "payload", _aggregate: bool = False) -> None:
    """Raise SecretPayloadError if ``payload`` holds secret-looking keys/values (or raw scores in secagg mode)."""
    if isinstance(payload, dict):
        m = payload.get("mode", mode)
        m = m if isinstance(m, str) else mode
        for k, v in payload.items():
            if not isinstance(k, str):
                raise AuditError(f"{path} has a non-string key {k!r}; JSON objects need string keys")
            here = f"{path}.{k}"
            if k not in allowed_keys:
                if _secret_key(k):
                    raise SecretPayloadError(
                        f"{here}: key {k!r} looks like secret material (keys, seeds, masks, shares, tokens never "
                        "enter the audit log); log a public fingerprint instead (e.g. 'public_key', 'key_id') or, "
                        "if it is not secret, pass allowed_keys={%r} to AuditLog" % k)
                if m and m.startswith("secagg") and not _aggregate and _score_key(k):
                    raise SecretPayloadError(
                        f"{here}: raw client scores may not be logged in mode {m!r}; log only the aggregate "
                        "statistics (payload['aggregate']) or the number of released scores")
            check_payload(v, allowed_keys=allowed_keys, mode=m, path=here, _aggregate=_aggregate or k == "aggregate")
    elif isinstance(payload, (list, tuple)):
        for i, v in enumerate(payload):
            check_payload(v, allowed_keys=allowed_keys, mode=mode, path=f"{path}[{i}]", _aggregate=_aggregate)
    elif isinstance(payload, str):
        if _PEM_PRIVATE.search(payload):
            raise SecretPayloadError(f"{path} holds a PEM private key; private keys never enter the audit log")


def store_form(value: Any, max_inline: int) -> Any:
    """Apply the elision rule: bytes and values whose canonical JSON exceeds max_inline become digests."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value_digest(value)
    if isinstance(value, dict):
        out = {k: store_form(v, max_inline) for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        out = [store_form(v, max_inline) for v in value]
    else:
        out = value
    if isinstance(out, (dict, list)) and len(canonical(out)) > max_inline:
        return value_digest(value if not isinstance(value, tuple) else list(value))
    return out


def entry_hash(body: dict) -> str:
    return sha256_hex(_ENTRY_DOMAIN + canonical(body))


def sign_hash(key: Ed25519PrivateKey, h: str) -> str:
    return key.sign(_SIG_DOMAIN + bytes.fromhex(h)).hex()


def check_sig(pub: Ed25519PublicKey, h: str, sig: str) -> bool:
    try:
        pub.verify(bytes.fromhex(sig), _SIG_DOMAIN + bytes.fromhex(h))
        return True
    except (InvalidSignature, ValueError):
        return False


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_key_from_hex(h: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(h))


BODY_FIELDS = ("v", "seq", "time", "actor", "event", "payload", "payload_digest", "prev")
#: every field an entry has: the body (hashed) plus its hash and signature. Nothing else is allowed on a line, so
#: no byte of a valid line is outside what the hash and the signature cover.
ENTRY_FIELDS = (*BODY_FIELDS, "hash", "sig")
_HEX = re.compile(r"^[0-9a-f]+$")


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), type(v).__name__)


def check_entry_fields(d: Any) -> None:
    """Schema of one entry: exactly ENTRY_FIELDS, each of its type (AuditError naming the field otherwise)."""
    if not isinstance(d, dict):
        raise AuditError(f"an entry must be a JSON object, got {_type_name(d)}")
    unknown = [k for k in d if k not in ENTRY_FIELDS]
    if unknown:
        raise AuditError(f"unknown field(s) {', '.join(repr(k) for k in unknown)}: an entry has exactly "
                         f"{', '.join(ENTRY_FIELDS)}, all covered by its hash and signature; an added field means "
                         "the line was altered")
    missing = [f for f in ENTRY_FIELDS if f not in d]
    if missing:
        raise AuditError(f"entry lacks field(s) {', '.join(missing)}")

    def bad(name: str, want: str):
        v = d[name]
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        raise AuditError(f"field {name!r} must be {want}, got {_type_name(v)} {shown}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(d["v"]) or d["v"] != VERSION:
        bad("v", f"the integer {VERSION} (entry format version)")
    if not is_int(d["seq"]) or d["seq"] < 0:
        bad("seq", "an integer >= 0")
    for name in ("time", "actor"):
        if not isinstance(d[name], str) or not d[name]:
            bad(name, "a non-empty string")
    if not isinstance(d["event"], str) or d["event"] not in EVENTS:
        bad("event", f"one of {', '.join(EVENTS)}")
    if not isinstance(d["payload"], dict):
        bad("payload", "a JSON object")
    for name, n in (("payload_digest", 64), ("prev", 64), ("hash", 64), ("sig", 128)):
        v = d[name]
        if not isinstance(v, str) or len(v) != n or not _HEX.match(v):
            bad(name, f"{n} lowercase hex digits")


def _no_duplicate_keys(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise AuditError(f"duplicate key {k!r} in one JSON object (a parser keeps only one of them, so the line "
                             "could show a verifier something the signature does not cover)")
        seen[k] = v
    return seen


def _no_constant(name: str):
    raise AuditError(f"{name} is not valid JSON (canonical JSON has no NaN/Infinity)")


def parse_line(data: bytes) -> "AuditEntry":
    """Parse one log line into an entry, strictly: valid UTF-8 JSON, no duplicate keys, exactly the entry's fields
    with their types, and byte-for-byte the canonical form its writer signs (raises AuditError saying why)."""
    try:
        d = json.loads(data, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise AuditError(f"not JSON ({e})") from None
    e = AuditEntry.from_dict(d)
    if e.line() != bytes(data):
        raise AuditError("the line is not in canonical JSON form (sorted keys, no spaces, UTF-8): it was "
                         "re-serialised or edited after signing")
    return e


@dataclass(frozen=True)
class AuditEntry:
    """One signed, chained log entry (immutable). ``line()`` is its exact on-disk form (without newline)."""

    seq: int
    time: str
    actor: str
    event: str
    payload: dict
    payload_digest: str
    prev: str
    hash: str
    sig: str
    v: int = VERSION

    def body(self) -> dict:
        return {"v": self.v, "seq": self.seq, "time": self.time, "actor": self.actor, "event": self.event,
                "payload": self.payload, "payload_digest": self.payload_digest, "prev": self.prev}

    def to_dict(self) -> dict:
        return {**self.body(), "hash": self.hash, "sig": self.sig}

    def line(self) -> bytes:
        return canonical(self.to_dict())

    @property
    def round_id(self):
        return self.payload.get("round_id") if isinstance(self.payload, dict) else None

    @classmethod
    def from_dict(cls, d: dict) -> "AuditEntry":
        """An entry from its JSON object; AuditError for an unknown or missing field or one of the wrong type."""
        check_entry_fields(d)
        return cls(seq=d["seq"], time=d["time"], actor=d["actor"], event=d["event"], payload=d["payload"],
                   payload_digest=d["payload_digest"], prev=d["prev"], hash=d["hash"], sig=d["sig"], v=d["v"])


def make_entry(key: Ed25519PrivateKey, *, seq: int, time: str, actor: str, event: str, payload: dict,
               prev: str) -> AuditEntry:
    """Build and sign an entry (payload must already be in stored form)."""
    pd = sha256_hex(canonical(payload))
    body = {"v": VERSION, "seq": seq, "time": time, "actor": actor, "event": event, "payload": payload,
            "payload_digest": pd, "prev": prev}
    h = entry_hash(body)
    return AuditEntry(seq=seq, time=time, actor=actor, event=event, payload=payload, payload_digest=pd, prev=prev,
                      hash=h, sig=sign_hash(key, h))
