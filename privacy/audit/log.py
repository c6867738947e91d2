"""The append-only audit-log writer (JSON Lines, hash-chained, Ed25519-signed, periodic signed checkpoints).

Durability: ``append`` writes the whole line with one ``write`` on an ``O_APPEND`` descriptor and ``fsync``s it
before returning, so an action recorded by an entry can be acknowledged only once the entry is on disk. A crash
mid-write leaves a *torn* last line (no trailing newline, or unparsable); the next ``AuditLog`` open detects it and
either raises ``TornTailError`` (default) or, with ``on_torn="recover"``, moves the torn bytes to a side file
``<log>.torn-<offset>`` and records a signed ``recovery`` entry with their offset, length and SHA-256: never
silently dropped. A log left without a final checkpoint (crash, kill) gets a ``recovery`` entry on reopen too.

One writer per file: the file is locked (``flock``) while an ``AuditLog`` holds it.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import merkle
from .entry import (EVENTS, FORMAT, GENESIS_PREV, AuditEntry, AuditError, _INTERNAL_EVENTS, canonical, check_payload,
                    check_sig, entry_hash, make_entry, parse_line, public_key_from_hex, public_key_hex, sha256_hex,
                    store_form)

__all__ = ["AuditLog", "TornTailError", "LogCorruptError", "RawLine", "read_raw_lines", "read_entries"]


class TornTailError(AuditError):
    """The log ends with an incomplete entry (a crash mid-write)."""

    def __init__(self, msg: str, *, offset: int, data: bytes, last_seq: int | None):
        super().__init__(msg)
        self.offset, self.data, self.last_seq = offset, data, last_seq


class LogCorruptError(AuditError):
    """The existing log fails verification; the writer refuses to extend it."""


@dataclass(frozen=True)
class RawLine:
    """One line of a log file: 1-based line number, byte offset, bytes (without newline), complete flag."""

    lineno: int
    offset: int
    data: bytes
    complete: bool


def read_raw_lines(path: str | Path) -> list[RawLine]:
    """Split a log file into lines; the last one is ``complete=False`` if it lacks its newline."""
    raw = Path(path).read_bytes()
    out, off, n = [], 0, 1
    while off < len(raw):
        nl = raw.find(b"\n", off)
        if nl < 0:
            out.append(RawLine(n, off, raw[off:], False))
            break
        out.append(RawLine(n, off, raw[off:nl], True))
        off, n = nl + 1, n + 1
    return out


def read_entries(path: str | Path) -> list[AuditEntry]:
    """Parse every complete line of a log (no verification: use ``verify_log`` for that)."""
    entries = []
    for rl in read_raw_lines(path):
        if not rl.complete:
            break
        try:
            entries.append(parse_line(rl.data))
        except AuditError as e:
            raise AuditError(f"{path}: line {rl.lineno} is not an audit entry ({e}); run `mor audit verify`") from None
    return entries


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path.parent or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    """Append-only, hash-chained, Ed25519-signed audit log in a JSON Lines file.

    Args:
        path: the log file; created (with a signed genesis entry holding the writer's public key) if missing.
        signing_key: the writer's Ed25519 identity key (a client's ``identity.key``; the server's own key).
        actor: who writes ("server" or the client's certificate name); fixed for the file's lifetime.
        checkpoint_every: write a signed checkpoint (count, head hash, RFC 9162 Merkle root) after this many entries.
        on_torn: "raise" (default): a torn last line raises TornTailError; "recover": move it aside and record it.
        max_inline: payload values whose canonical JSON is larger are stored as SHA-256 digests.
        allowed_keys: payload keys exempt from the secret-key check (for keys that look secret but are not).

    On open the existing file is checked: the whole hash chain, every signature since the last checkpoint, and that
    the genesis key is ``signing_key``'s; a failure raises LogCorruptError (the writer never extends a bad log).
    """

    def __init__(self, path, *, signing_key: Ed25519PrivateKey, actor: str, checkpoint_every: int = 16,
                 on_torn: str = "raise", max_inline: int = 2048, allowed_keys=()):
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError("signing_key must be an Ed25519PrivateKey (load it with pki.ClientCredentials"
                            ".identity_key() or cryptography's load_pem_private_key)")
        if not isinstance(actor, str) or not actor:
            raise ValueError("actor must be a non-empty string (the writer's identity name, e.g. 'server')")
        if int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if on_torn not in ("raise", "recover"):
            raise ValueError(f"on_torn must be 'raise' or 'recover', got {on_torn!r}")
        self.path = Path(path)
        self.actor = actor
        self.checkpoint_every = int(checkpoint_every)
        self.max_inline = int(max_inline)
        self.allowed_keys = frozenset(allowed_keys)
        self._key = signing_key
        self._pub_hex = public_key_hex(signing_key.public_key())
        self._lock = threading.RLock()
        self._tree = merkle.CompactTree()
        self._leaves: list[bytes] = []
        self._seq = 0
        self._head = GENESIS_PREV
        self._since_ckpt = 0
        self._closed = False
        self._broken: str | None = None
        self.recovered: AuditEntry | None = None  # the recovery entry written on open, if any

        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise AuditError(f"{self.path} is already open for writing by another AuditLog (one writer per log)") \
                from None
        try:
            if created or os.fstat(self._fd).st_size == 0:
                if created:
                    _fsync_dir(self.path)
                self._write(self._make("genesis", {"format": FORMAT, "actor": actor, "public_key": self._pub_hex,
                                                   "signature": "Ed25519", "hash": "SHA-256",
                                                   "merkle": "RFC9162-SHA256"}))
            else:
                self._open_existing(on_torn)
        except BaseException:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            raise

    # ------------------------------------------------------------------ opening
    def _open_existing(self, on_torn: str) -> None:
        lines = read_raw_lines(self.path)
        torn = None
        if lines and not lines[-1].complete:
            torn = lines.pop()
        entries: list[AuditEntry] = []
        for rl in lines:
            try:
                entries.append(parse_line(rl.data))
            except AuditError as e:
                raise LogCorruptError(f"{self.path}: line {rl.lineno} (seq {rl.lineno - 1}) is not a valid audit "
                                      f"entry ({e}); run `mor audit verify {self.path}` and start a new log file"
                                      ) from None
        if not entries:
            raise LogCorruptError(f"{self.path}: no complete entry (not even the genesis entry); move the file "
                                  "aside and start a new log")
        g = entries[0]
        if g.event != "genesis" or g.payload.get("public_key") != self._pub_hex:
            raise LogCorruptError(f"{self.path} was not started with this signing key (genesis key differs); "
                                  "use the writer's own identity key or a new log file")
        if g.actor != self.actor:
            raise LogCorruptError(f"{self.path} belongs to actor {g.actor!r}, not {self.actor!r}")
        pub = self._key.public_key()
        last_ckpt = max((i for i, e in enumerate(entries) if e.event == "checkpoint"), default=0)
        for i, e in enumerate(entries):
            ok = (e.seq == i and e.prev == self._head and e.payload_digest == sha256_hex(canonical(e.payload))
                  and entry_hash(e.body()) == e.hash and e.actor == self.actor)
            if ok and (i >= last_ckpt or i == 0):
                ok = check_sig(pub, e.hash, e.sig)
            if ok and e.event == "checkpoint":
                ok = (e.payload.get("count") == i and e.payload.get("head") == e.prev
                      and e.payload.get("root") == self._tree.root().hex())
            if not ok:
                raise LogCorruptError(f"{self.path}: entry seq {i} (line {i + 1}) fails verification; the log was "
                                      f"modified. Run `mor audit verify {self.path}` and start a new log file")
            self._account(e)
        unclean = entries[-1].event != "checkpoint" or not entries[-1].payload.get("final")
        rec: dict = {}
        if torn is not None:
            msg = (f"{self.path}: the last line (offset {torn.offset}, {len(torn.data)} bytes after seq "
                   f"{entries[-1].seq}) is torn: a crash interrupted a write")
            if on_torn == "raise":
                raise TornTailError(msg + "; reopen with on_torn='recover' to move it aside and record a recovery "
                                    "entry", offset=torn.offset, data=torn.data, last_seq=entries[-1].seq)
            side = self.path.with_name(f"{self.path.name}.torn-{torn.offset}")
            with open(side, "wb") as f:
                f.write(torn.data)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(side)
            os.ftruncate(self._fd, torn.offset)
            os.fsync(self._fd)
            rec.update(torn_offset=torn.offset, torn_bytes=len(torn.data), torn_sha256=sha256_hex(torn.data),
                       torn_saved_to=side.name)
        if unclean or torn is not None:
            rec.update(reason="unclean_shutdown" if torn is None else "torn_tail", last_seq=entries[-1].seq,
                       unsealed_entries=self._since_ckpt if unclean else 0)
        if rec:
            self.recovered = self._append_internal("recovery", rec)

    # ------------------------------------------------------------------ writing
    def _account(self, e: AuditEntry) -> None:
        h = bytes.fromhex(e.hash)
        self._leaves.append(merkle.leaf_hash(h))
        self._tree.append(self._leaves[-1])
        self._head = e.hash
        self._seq = e.seq + 1
        self._since_ckpt = 0 if e.event in ("checkpoint", "genesis") else self._since_ckpt + 1

    def _make(self, event: str, payload: dict) -> AuditEntry:
        return make_entry(self._key, seq=self._seq, time=_now(), actor=self.actor, event=event, payload=payload,
                          prev=self._head)

    def _write(self, e: AuditEntry) -> None:
        data = e.line() + b"\n"
        try:
            n = os.write(self._fd, data)
            if n != len(data):
                raise OSError(f"short write ({n} of {len(data)} bytes)")
            os.fsync(self._fd)
        except OSError as err:
            self._broken = f"write of seq {e.seq} failed: {err}"
            raise AuditError(f"{self.path}: {self._broken}; the log is now read-only for this process. Free disk "
                             "space and reopen it (the torn tail will be detected)") from err
        self._account(e)

    def _append_internal(self, event: str, payload: dict) -> AuditEntry:
        with self._lock:
            if self._closed:
                raise AuditError(f"{self.path}: the log is closed")
            if self._broken:
                raise AuditError(f"{self.path}: {self._broken}; reopen the log")
            e = self._make(event, payload)
            self._write(e)
            return e

    def append(self, event: str, payload: dict) -> AuditEntry:
        """Sign and durably append one entry (write + fsync before returning); may add a checkpoint after it.

        Raises ValueError for an unknown event, SecretPayloadError if the payload looks like it holds secrets (or
        raw scores in a secagg mode), AuditError if the log is closed or a write failed.
        """
        if event not in EVENTS or event in _INTERNAL_EVENTS:
            raise ValueError(f"unknown audit event {event!r}; use one of "
                             f"{', '.join(e for e in EVENTS if e not in _INTERNAL_EVENTS)}")
        if not isinstance(payload, dict):
            raise ValueError(f"payload of a {event!r} entry must be a dict, got {type(payload).__name__}")
        check_payload(payload, allowed_keys=self.allowed_keys)
        stored = store_form(payload, self.max_inline)
        with self._lock:
            e = self._append_internal(event, stored)
            if self._since_ckpt >= self.checkpoint_every:
                self.checkpoint()
            return e

    def checkpoint(self, *, final: bool = False) -> AuditEntry:
        """Append a signed checkpoint: count of entries before it, head hash, RFC 9162 Merkle root over them."""
        with self._lock:
            return self._append_internal("checkpoint", {"count": self._seq, "head": self._head,
                                                        "root": self._tree.root().hex(), "final": bool(final)})

    def close(self) -> None:
        """Write a final checkpoint (seals the log: a later truncation is detected) and release the file."""
        with self._lock:
            if self._closed:
                return
            try:
                if not self._broken:
                    self.checkpoint(final=True)
            finally:
                self._closed = True
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ queries
    @property
    def size(self) -> int:
        """Number of entries written so far (the next sequence number)."""
        return self._seq

    @property
    def head(self) -> str:
        """Hash of the last entry."""
        return self._head

    @property
    def public_key_hex(self) -> str:
        return self._pub_hex

    def root(self, tree_size: int | None = None) -> str:
        """RFC 9162 Merkle root (hex) over the first tree_size entries (default: all)."""
        n = self._seq if tree_size is None else tree_size
        return (self._tree.root() if n == self._seq else merkle.root_from_leaves(self._leaves[:n])).hex()

    def inclusion_proof(self, seq: int, tree_size: int) -> list[str]:
        """Audit path (hex) proving entry ``seq`` is in the tree of the first tree_size entries."""
        return [h.hex() for h in merkle.inclusion_proof(self._leaves, seq, tree_size)]


def genesis_public_key(entry: AuditEntry):
    """The Ed25519 public key a genesis entry embeds (trust it only if you pinned it elsewhere)."""
    return public_key_from_hex(entry.payload["public_key"])
