"""Client-side query auditing for secure aggregation: round ids are never reused, and a plain ``secagg`` sum over
an item this client already helped sum is allowed only with the same cohort and weights.

Why: in plain ``secagg`` the server learns the weighted sum exactly. Two sums over the same item whose cohorts
differ by one client (or whose weights differ) subtract to that client's score. The client therefore remembers,
per item digest (one SHA-256 per scored coordinate, computed by the caller from the item's content, never from
server-chosen ids), the *cohort key* of the sum it contributed to: a hash of the (client id, weight) pairs of
every client with non-zero weight on that coordinate. A later request for the same digest with a different key
is refused (:class:`~privacy.secagg.errors.DifferencingError`); the same key is allowed (it answers nothing new).

Storage: SQLite (like :mod:`privacy.ledger`), on disk beside the ledger, bounded: at most ``max_items`` rows of
item history and ``max_rounds`` round ids; the oldest rows are dropped first (protection for items older than
the window is lost; round ids are random and time-ordered on the server, so reuse beyond the window is not an
attack a server can plan for without keeping the client busy for ``max_rounds`` rounds). Pure: no grpc, no torch.
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Sequence

from .errors import DifferencingError, RoundReplayError

#: default bounds (rows); ~100 bytes a row, so the defaults stay well under 200 MB
DEFAULT_MAX_ITEMS = 1_000_000
DEFAULT_MAX_ROUNDS = 1_000_000


def coordinate_digests(items) -> list[bytes]:
    """One digest per scored coordinate (item-major, candidate order), from content only: image bytes, question,
    candidate text. ``items``: objects with ``image``, ``question``, ``candidates`` (e.g. ``ScoringItem``)."""
    out = []
    for it in items:
        base = hashlib.sha256()
        for part in (bytes(it.image), it.question.encode("utf-8")):
            base.update(struct.pack(">Q", len(part)) + part)
        for cand in it.candidates:
            h = base.copy()
            c = cand.encode("utf-8")
            h.update(b"\x01" + struct.pack(">Q", len(c)) + c)
            out.append(h.digest())
    return out


def cohort_keys(client_ids: Sequence[str], weights, present=None) -> list[bytes]:
    """Per coordinate: SHA-256 of the (client id, weight) pairs with non-zero weight among ``present`` (default:
    all). ``weights``: (n, m) matrix in the order of ``client_ids``."""
    import numpy as np

    w = np.asarray(weights, dtype=np.float64)
    keep = [i for i, c in enumerate(client_ids) if present is None or c in present]
    out = []
    for j in range(w.shape[1]):
        h = hashlib.sha256(b"mor-secagg-cohort\x00")
        for i in keep:
            if w[i, j] > 0:
                b = client_ids[i].encode()
                h.update(struct.pack(">H", len(b)) + b + struct.pack(">d", float(w[i, j])))
        out.append(h.digest())
    return out


class QueryAudit:
    """path: SQLite file (created if missing) or ``":memory:"`` (tests; protects one process only)."""

    def __init__(self, path=":memory:", *, max_items: int = DEFAULT_MAX_ITEMS, max_rounds: int = DEFAULT_MAX_ROUNDS):
        if max_items < 1 or max_rounds < 1:
            raise ValueError("max_items and max_rounds must be >= 1")
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.max_items, self.max_rounds = int(max_items), int(max_rounds)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.executescript("""
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS rounds (seq INTEGER PRIMARY KEY AUTOINCREMENT, round_id TEXT UNIQUE NOT NULL,
                                               at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS items (seq INTEGER PRIMARY KEY AUTOINCREMENT, digest BLOB NOT NULL,
                                              round_id TEXT NOT NULL, cohort BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS items_digest ON items(digest);
            CREATE INDEX IF NOT EXISTS items_round ON items(round_id);
        """)

    # ------------------------------------------------------------------ round ids
    def claim_round(self, round_id: str) -> None:
        """Record ``round_id``; raise :class:`RoundReplayError` if this client has seen it before."""
        with self._lock:
            try:
                self._db.execute("INSERT INTO rounds (round_id, at) VALUES (?, ?)", (round_id, time.time()))
            except sqlite3.IntegrityError:
                raise RoundReplayError(f"round id {round_id!r} was already used with this client (round ids are "
                                       "never reused; refusing a replayed or repeated round)") from None
            self._trim("rounds", self.max_rounds)

    def seen_round(self, round_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM rounds WHERE round_id=?", (round_id,)).fetchone() is not None

    # ------------------------------------------------------------------ differencing
    def conflicts(self, round_id: str, digests: Sequence[bytes], keys: Sequence[bytes]) -> list[tuple[int, str]]:
        """(coordinate index, earlier round id) for every coordinate whose digest was summed in another round with
        a different cohort key."""
        if len(digests) != len(keys):
            raise ValueError(f"{len(digests)} digests but {len(keys)} cohort keys")
        want = {}
        for i, (d, k) in enumerate(zip(digests, keys)):
            want.setdefault(bytes(d), []).append((i, bytes(k)))
        out = []
        ds = list(want)
        with self._lock:
            for s in range(0, len(ds), 500):
                chunk = ds[s:s + 500]
                q = ("SELECT digest, round_id, cohort FROM items WHERE round_id != ? AND digest IN (" +
                     ",".join("?" * len(chunk)) + ")")
                for d, rid, cohort in self._db.execute(q, [round_id, *chunk]):
                    for i, k in want[bytes(d)]:
                        if bytes(cohort) != k:
                            out.append((i, rid))
        return sorted(set(out))

    def check(self, round_id: str, digests: Sequence[bytes], keys: Sequence[bytes]) -> None:
        bad = self.conflicts(round_id, digests, keys)
        if bad:
            i, rid = bad[0]
            raise DifferencingError(f"{len(bad)} scored item(s) (e.g. coordinate {i}) were already summed in round "
                                    f"{rid!r} with a different cohort or different weights; the two sums together "
                                    "would isolate this client's scores (query audit)")

    def record(self, round_id: str, digests: Sequence[bytes], keys: Sequence[bytes]) -> None:
        """Replace this round's rows with (digest, cohort key) pairs (idempotent per round)."""
        rows = sorted({(bytes(d), bytes(k)) for d, k in zip(digests, keys)})
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM items WHERE round_id=?", (round_id,))
                self._db.executemany("INSERT INTO items (digest, round_id, cohort) VALUES (?, ?, ?)",
                                     [(d, round_id, k) for d, k in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._trim("items", self.max_items)

    def check_and_record(self, round_id: str, digests: Sequence[bytes], keys: Sequence[bytes]) -> None:
        self.check(round_id, digests, keys)
        self.record(round_id, digests, keys)

    def _trim(self, table: str, limit: int) -> None:
        # seq grows monotonically, so keeping the rows with the ``limit`` highest seq values bounds the table
        self._db.execute(f"DELETE FROM {table} WHERE seq <= (SELECT MAX(seq) FROM {table}) - ?", (limit,))

    def counts(self) -> dict:
        with self._lock:
            return {t: self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("rounds", "items")}

    def close(self) -> None:
        with self._lock:
            self._db.close()
