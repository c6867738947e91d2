"""The client's privacy ledger (SQLite, WAL): every mechanism ever applied, composed on demand.

One module although over 400 lines: one SQLite schema and the composition rules over it; a split would put
the schema in two places.

Two units, never added together
-------------------------------
* ``pair`` (or ``annotator``) - **example level**. Charged by DP-SGD training (:meth:`PrivacyLedger.record_training`):
  epsilon for one preference pair of the training data. Every score the trained model later computes is
  post-processing of that model and costs nothing more *at this level*; releases are never charged here. A model
  trained without DP has example-level epsilon = inf.
* ``client`` - **client level**. Charged by every score release (:meth:`PrivacyLedger.charge_release`): epsilon for
  the institution's whole preference profile (its model's outputs as a whole), composed over rounds. This is the
  unit the budget enforces.

Like Opacus' accountants, the ledger stores the *history* of mechanisms (noise multiplier, sample rate, steps) and
composes it when asked: in RDP (Opacus' analysis) and, where tighter, exactly (Gaussian DP for Gaussian releases,
PRV for DP-SGD). Reported figures are the smaller of the valid bounds. An epsilon recorded without a history
(``epsilon_given``: a model card's figure at its own delta) is composed by basic composition, which adds the
epsilons AND the deltas; an example-level unit is reported at the history's delta plus those deltas.

Crash safety and replays
------------------------
A charge is one ``BEGIN IMMEDIATE`` transaction (read history, compose, check budget, insert, commit) with
``synchronous=FULL``: it is durable before :meth:`charge_release` returns, i.e. before the caller sends any score.
A crash after the charge and before the send over-counts; nothing can under-count. A round id is charged at most
once: **a replayed or retried round id is refused** with :class:`RoundReplayed` (a subclass of
:class:`BudgetExceeded`), because answering it again would draw fresh noise and leak twice.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import accounting as acc

EXAMPLE_UNITS = ("pair", "annotator")
CLIENT_UNITS = ("client",)
RELEASE_MECHANISMS = ("gaussian", "secagg+dp")

UNIT_DESCRIPTIONS = {
    "pair": "example level: one training preference pair (DP-SGD); scores are post-processing, free here",
    "annotator": "example level: all pairs of one annotator (DP-SGD); scores are post-processing, free here",
    "client": "client level: the institution's whole preference profile (all its released scores)",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,              -- 'training' | 'release'
    unit TEXT NOT NULL,
    round_id TEXT UNIQUE,            -- releases only; one charge per round id
    model_id TEXT,
    mechanism TEXT NOT NULL,         -- 'dpsgd' | 'gaussian' | 'secagg+dp' | 'external'
    noise_multiplier REAL NOT NULL,  -- std / L2 sensitivity (effective, for secagg+dp)
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,          -- DP-SGD steps or number of releases
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    epsilon_given REAL,              -- externally computed epsilon (no history) at this row's delta; basic composition
    rho REAL,                        -- zCDP rho for secagg+dp (RDP curve alpha*rho)
    epsilon_after REAL NOT NULL,     -- composed epsilon of the unit right after this entry
    meta TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class LedgerError(Exception):
    """A ledger call with bad arguments (the message names the argument and the fix)."""


class BudgetExceeded(Exception):
    """A release refused because it would push the client-level epsilon past the budget. Nothing was written."""

    def __init__(self, message: str, *, remaining_epsilon: float, requested_epsilon: float):
        super().__init__(message)
        self.remaining_epsilon = remaining_epsilon
        self.requested_epsilon = requested_epsilon


class RoundReplayed(BudgetExceeded):
    """A release for a round id that was already charged: refused (fresh noise for the same round would leak twice)."""


@dataclass(frozen=True)
class Charge:
    """A committed client-level charge."""

    round_id: str
    unit: str
    mechanism: str
    noise_multiplier: float
    count: int
    epsilon_after: float
    delta: float
    budget: float | None
    remaining_epsilon: float
    created: float

    @property
    def epsilon(self) -> float:
        return self.epsilon_after

    def to_dict(self) -> dict:
        return asdict(self)


class PrivacyLedger:
    """Per-client privacy ledger stored in one SQLite file.

    path: the SQLite file (created if missing). client_level_budget: epsilon budget for unit ``client`` (None =
    record only, never refuse; a budget given once is stored and used when reopened without one). delta: the delta
    at which client-level epsilon is reported and enforced.
    """

    def __init__(self, path, *, client_level_budget: float | None = None, delta: float | None = None,
                 read_only: bool = False):
        if client_level_budget is not None and not (client_level_budget >= 0 and not math.isnan(client_level_budget)):
            raise LedgerError(f"client_level_budget must be a non-negative number, got {client_level_budget!r}")
        if delta is not None and not (0 < delta < 1):
            raise LedgerError(f"delta must be in (0, 1), got {delta!r}")
        self.path = Path(path)
        self.read_only = bool(read_only)
        if self.path.is_dir():
            raise LedgerError(f"{self.path} is a directory; give the ledger's SQLite file")
        if self.read_only:
            self._open_read_only(client_level_budget, delta)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LedgerError(f"{self.path}: cannot create its folder ({e})") from None
        self._db = None
        try:  # a corrupt file or another application's database: one LedgerError naming the file
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._check_schema()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._load_settings(client_level_budget, delta)
            with self._tx():
                self._db.execute("INSERT OR REPLACE INTO config VALUES ('budget', ?)", (json.dumps(self.budget),))
                self._db.execute("INSERT OR REPLACE INTO config VALUES ('delta', ?)", (json.dumps(self.delta),))
        except (sqlite3.DatabaseError, ValueError, LedgerError) as e:
            if self._db is not None:
                self._db.close()
            if isinstance(e, LedgerError):
                raise
            raise LedgerError(f"{self.path} is not a readable MoR privacy ledger ({e}); check the path, or restore "
                              "the file from a backup (a new, empty ledger would forget the epsilon already spent)"
                              ) from None

    def _load_settings(self, client_level_budget, delta) -> None:
        """budget and delta: as given, else as stored in the ledger (a budget given once is kept), else none / 1e-5."""
        stored = dict(self._db.execute("SELECT key, value FROM config").fetchall())
        self.budget = client_level_budget if client_level_budget is not None else (
            json.loads(stored["budget"]) if "budget" in stored else None)
        self.delta = float(delta if delta is not None else json.loads(stored.get("delta", "1e-05")))

    def _open_read_only(self, client_level_budget, delta) -> None:
        """Open for auditing: nothing is written (not even the WAL pragma or the stored budget/delta); budget and
        delta default to the ledger's own stored values; a charge raises LedgerError."""
        from urllib.parse import quote

        if not self.path.is_file():
            raise LedgerError(f"{self.path}: no such ledger file")
        self._db = None
        uri = f"file:{quote(str(self.path.resolve()))}"
        try:
            try:  # mode=ro reads a live WAL ledger; immutable=1 a copy on read-only media (no -shm can be made)
                self._db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=30.0, isolation_level=None,
                                           check_same_thread=False)
                self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError:
                if self._db is not None:
                    self._db.close()
                self._db = sqlite3.connect(uri + "?immutable=1", uri=True, isolation_level=None,
                                           check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._check_schema()
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not set(self._COLUMNS) <= tables:
                raise LedgerError(f"{self.path} holds no MoR privacy ledger tables (an empty file?); check the path")
            self._load_settings(client_level_budget, delta)
        except (sqlite3.DatabaseError, ValueError, LedgerError) as e:
            if self._db is not None:
                self._db.close()
            if isinstance(e, LedgerError):
                raise
            raise LedgerError(f"{self.path} is not a readable MoR privacy ledger ({e}); check the path") from None

    #: columns a ledger's tables must have (older or foreign files are refused on open, not mid-query)
    _COLUMNS = {"config": frozenset({"key", "value"}),
                "entries": frozenset({"id", "kind", "unit", "round_id", "model_id", "mechanism", "noise_multiplier",
                                      "sample_rate", "steps", "delta", "accountant", "epsilon_given", "rho",
                                      "epsilon_after", "meta", "created"})}

    def _check_schema(self) -> None:
        """Refuse a damaged SQLite file or another application's database before touching it."""
        row = self._db.execute("PRAGMA quick_check").fetchone()  # DatabaseError if not SQLite at all
        if row is None or row[0] != "ok":
            raise LedgerError(f"{self.path}: SQLite integrity check failed ({row[0] if row else 'no answer'}); the "
                              "ledger is damaged: restore it from a backup")
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables.discard("sqlite_sequence")
        if tables and not tables & set(self._COLUMNS):
            raise LedgerError(f"{self.path} is another application's SQLite database (tables: "
                              f"{', '.join(sorted(tables))}), not a MoR privacy ledger; check the path")
        for t in sorted(tables & set(self._COLUMNS)):
            cols = {r[1] for r in self._db.execute(f"PRAGMA table_info({t})")}
            missing = self._COLUMNS[t] - cols
            if missing:
                raise LedgerError(f"{self.path}: table {t!r} lacks column(s) {', '.join(sorted(missing))}: not a MoR "
                                  "privacy ledger (or one of an incompatible version); check the path")

    # ------------------------------------------------------------------ plumbing
    class _Tx:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, et, ev, tb):
            self.db.execute("COMMIT" if et is None else "ROLLBACK")
            return False

    def _tx(self):
        if self.read_only:
            raise LedgerError(f"{self.path} was opened read-only (for auditing); open it without read_only=True "
                              "to record or charge")
        return self._Tx(self._db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def _rows(self, unit: str | None = None) -> list[sqlite3.Row]:
        if unit is None:
            return self._db.execute("SELECT * FROM entries ORDER BY id").fetchall()
        return self._db.execute("SELECT * FROM entries WHERE unit = ? ORDER BY id", (unit,)).fetchall()

    # ------------------------------------------------------------------ composition
    @staticmethod
    def _natural_delta(rows, default: float) -> float:
        """The delta an example-level unit is reported at: the largest delta of its DP-SGD history (``default`` if it
        has none) plus the deltas of its external (epsilon-given) entries, which basic composition adds."""
        hist = [r["delta"] for r in rows if r["epsilon_given"] is None]
        given = [r["delta"] for r in rows if r["epsilon_given"] is not None]
        if not given:
            return max(hist) if hist else default
        return (max(hist) if hist else 0.0) + sum(given)

    @staticmethod
    def _compose(rows, delta: float) -> tuple[float, str]:
        """(epsilon, accountant description) for the rows of ONE unit, valid at total ``delta``.

        Entries with a history (DP-SGD steps, Gaussian releases, zCDP rho) are composed in RDP / exactly. An entry
        whose epsilon was given directly (``epsilon_given``, at its own delta) is composed by basic composition:
        epsilons add AND deltas add, so the history is composed at ``delta - sum(external deltas)``; when that is
        not positive no finite epsilon holds at ``delta`` and the result is inf."""
        if not rows:
            return 0.0, "none"
        given = 0.0
        given_delta = 0.0
        hist = []  # (nm, q, steps)
        rhos = 0.0
        gaussian_only = True
        want_prv = False
        for r in rows:
            if r["epsilon_given"] is not None:
                given += r["epsilon_given"]
                given_delta += r["delta"]
                gaussian_only = False
                continue
            if r["mechanism"] == "secagg+dp":
                rhos += r["rho"]
                gaussian_only = False
                continue
            hist.append((r["noise_multiplier"], r["sample_rate"], r["steps"]))
            if r["sample_rate"] < 1.0:
                gaussian_only = False
            if r["accountant"] == "prv":
                want_prv = True
        if math.isinf(given) or any(nm <= 0 for nm, _, s in hist if s > 0):
            return math.inf, "non-DP"
        if given_delta > 0:
            history_delta = delta - given_delta
            has_history = rhos > 0 or any(s > 0 for _, _, s in hist)
            if given_delta > delta * (1 + 1e-9) or (has_history and history_delta <= 0):
                return math.inf, f"external(basic): its deltas sum to {given_delta:g} >= delta {delta:g}"
            if not has_history:
                return float(given), "external(basic: epsilons and deltas summed)"
            delta = history_delta
        total = sum((acc.rdp_curve(nm, q, s) for nm, q, s in hist), acc.zcdp_curve(rhos))
        eps_rdp = acc.rdp_to_epsilon(total, delta)[0]
        best, how = eps_rdp, "rdp"
        if hist and gaussian_only:
            eps_gdp = acc.gdp_epsilon(acc.gdp_mu([h[0] for h in hist], [h[2] for h in hist]), delta)
            if eps_gdp <= best:
                best, how = eps_gdp, "gdp-exact"
        elif hist and want_prv and rhos == 0:
            eps_prv = acc.prv_epsilon(hist, delta)
            if eps_prv < best:
                best, how = eps_prv, "prv"
        if given_delta > 0:
            best, how = best + given, how + "+external(basic: epsilons and deltas summed)"
        return float(best), how

    def _unit_delta(self, unit: str, rows) -> float:
        return self.delta if unit in CLIENT_UNITS else self._natural_delta(rows, self.delta)

    def epsilon(self, unit: str, delta: float | None = None) -> float:
        """Composed epsilon of one unit at total ``delta`` (default: the ledger's delta for unit ``client``; for an
        example-level unit the delta :meth:`summary` reports). Units are never added together."""
        self._check_unit(unit)
        rows = self._rows(unit)
        return self._compose(rows, self._unit_delta(unit, rows) if delta is None else delta)[0]

    @staticmethod
    def _check_unit(unit: str) -> None:
        if unit not in EXAMPLE_UNITS + CLIENT_UNITS:
            raise LedgerError(f"unit must be one of {EXAMPLE_UNITS + CLIENT_UNITS}, got {unit!r}")

    # ------------------------------------------------------------------ example level
    def record_training(self, *, model_id: str, noise_multiplier: float, sample_rate: float, steps: int,
                        delta: float, unit: str = "pair", accountant: str = "prv",
                        epsilon: float | None = None) -> None:
        """Record DP-SGD training of ``model_id`` at example level (unit ``pair`` or ``annotator``).

        noise_multiplier 0 (or ``epsilon=inf``) records non-DP training: example-level epsilon becomes inf.
        ``epsilon`` given without a usable history is stored as an external (epsilon, delta) figure, composed by basic
        composition: epsilons add and deltas add.
        """
        if unit not in EXAMPLE_UNITS:
            raise LedgerError(f"record_training: unit must be one of {EXAMPLE_UNITS} (example level), got {unit!r}")
        if accountant not in ("prv", "rdp"):
            raise LedgerError(f"record_training: accountant must be 'prv' or 'rdp', got {accountant!r}")
        if not (0 < sample_rate <= 1):
            raise LedgerError(f"record_training: sample_rate must be in (0, 1], got {sample_rate!r}")
        if int(steps) != steps or steps < 0:
            raise LedgerError(f"record_training: steps must be a non-negative integer, got {steps!r}")
        if not (noise_multiplier >= 0):
            raise LedgerError(f"record_training: noise_multiplier must be >= 0, got {noise_multiplier!r}")
        eps_given = None
        if noise_multiplier == 0 or (epsilon is not None and math.isinf(epsilon)):
            eps_given = math.inf
        elif epsilon is not None and steps == 0:
            eps_given = float(epsilon)
        with self._tx() as db:
            rows = db.execute("SELECT * FROM entries WHERE unit = ? ORDER BY id", (unit,)).fetchall()
            new = dict(kind="training", unit=unit, round_id=None, model_id=model_id, mechanism="dpsgd",
                       noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate), steps=int(steps),
                       delta=float(delta), accountant=accountant, epsilon_given=eps_given, rho=None,
                       meta=json.dumps({"reported_epsilon": epsilon}), created=time.time())
            all_rows = list(rows) + [new]
            eps_after = self._compose(all_rows, self._natural_delta(all_rows, float(delta)))[0]
            db.execute("INSERT INTO entries (kind, unit, round_id, model_id, mechanism, noise_multiplier, "
                       "sample_rate, steps, delta, accountant, epsilon_given, rho, epsilon_after, meta, created) "
                       "VALUES (:kind, :unit, :round_id, :model_id, :mechanism, :noise_multiplier, :sample_rate, "
                       ":steps, :delta, :accountant, :epsilon_given, :rho, :eps_after, :meta, :created)",
                       {**new, "eps_after": eps_after})

    # ------------------------------------------------------------------ client level
    def _release_row(self, *, round_id, noise_multiplier, count, mechanism, unit, meta, rho=None) -> dict:
        if unit not in CLIENT_UNITS:
            raise LedgerError(f"charge_release: unit must be 'client' (releases are charged at client level; "
                              f"example-level units are for training only), got {unit!r}")
        if mechanism not in RELEASE_MECHANISMS:
            raise LedgerError(f"charge_release: mechanism must be one of {RELEASE_MECHANISMS}, got {mechanism!r}")
        if int(count) != count or count < 1:
            raise LedgerError(f"charge_release: count must be a positive integer, got {count!r}")
        if mechanism == "gaussian" and not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise LedgerError(f"charge_release: noise_multiplier must be positive and finite, got {noise_multiplier!r}")
        if mechanism == "secagg+dp":
            if rho is None:
                raise LedgerError("charge_release: mechanism 'secagg+dp' needs meta['rho'] (zCDP rho of the sum, "
                                  "from privacy.accounting.ddg_rho)")
            rho = float(rho) * int(count)
            noise_multiplier = 1.0 / math.sqrt(2 * rho) if rho > 0 else math.inf
        return dict(kind="release", unit=unit, round_id=round_id, model_id=None, mechanism=mechanism,
                    noise_multiplier=float(noise_multiplier), sample_rate=1.0, steps=int(count), delta=self.delta,
                    accountant="gdp-exact", epsilon_given=None, rho=rho,
                    meta=json.dumps(meta or {}, sort_keys=True, default=str), created=time.time())

    def preview(self, *, noise_multiplier: float, count: int = 1, mechanism: str = "gaussian",
                unit: str = "client", meta: dict | None = None) -> tuple[float, float]:
        """(epsilon after such a release, remaining budget after it) without charging anything."""
        meta = dict(meta or {})
        new = self._release_row(round_id=None, noise_multiplier=noise_multiplier, count=count, mechanism=mechanism,
                                unit=unit, meta=meta, rho=meta.get("rho"))
        eps_after = self._compose(list(self._rows(unit)) + [new], self.delta)[0]
        remaining = math.inf if self.budget is None else self.budget - eps_after
        return eps_after, remaining

    def charge_release(self, *, round_id: str, noise_multiplier: float, count: int = 1, mechanism: str = "gaussian",
                       unit: str = "client", meta: dict | None = None) -> Charge:
        """Charge ``count`` releases of round ``round_id`` at client level, or refuse.

        Raises :class:`BudgetExceeded` (nothing written) if the composed epsilon would pass the budget, and
        :class:`RoundReplayed` if ``round_id`` was already charged. For ``mechanism='secagg+dp'`` pass
        ``meta={'rho': ...}`` (zCDP of the distributed sum; ``noise_multiplier`` is then ignored).
        The charge is committed (fsync'd) before this returns.
        """
        if not isinstance(round_id, str) or not round_id:
            raise LedgerError(f"charge_release: round_id must be a non-empty string, got {round_id!r}")
        meta = dict(meta or {})
        new = self._release_row(round_id=round_id, noise_multiplier=noise_multiplier, count=count,
                                mechanism=mechanism, unit=unit, meta=meta, rho=meta.get("rho"))
        with self._tx() as db:
            rows = db.execute("SELECT * FROM entries WHERE unit = ? ORDER BY id", (unit,)).fetchall()
            current = self._compose(rows, self.delta)[0]
            left_now = math.inf if self.budget is None else self.budget - current
            if any(r["round_id"] == round_id for r in rows):
                raise RoundReplayed(f"round {round_id!r} was already charged to this client's ledger; a replayed or "
                                    f"retried round is refused (remaining client-level epsilon {left_now:.4g})",
                                    remaining_epsilon=left_now, requested_epsilon=0.0)
            eps_after = self._compose(list(rows) + [new], self.delta)[0]
            if self.budget is not None and eps_after > self.budget + 1e-12:
                raise BudgetExceeded(
                    f"release refused: client-level epsilon would reach {eps_after:.4g} > budget {self.budget:.4g} "
                    f"(delta={self.delta:g}); remaining epsilon {max(left_now, 0.0):.4g}, this release needs "
                    f"{eps_after - current:.4g} more", remaining_epsilon=max(left_now, 0.0),
                    requested_epsilon=eps_after - current)
            db.execute("INSERT INTO entries (kind, unit, round_id, model_id, mechanism, noise_multiplier, "
                       "sample_rate, steps, delta, accountant, epsilon_given, rho, epsilon_after, meta, created) "
                       "VALUES (:kind, :unit, :round_id, :model_id, :mechanism, :noise_multiplier, :sample_rate, "
                       ":steps, :delta, :accountant, :epsilon_given, :rho, :eps_after, :meta, :created)",
                       {**new, "eps_after": eps_after})
        remaining = math.inf if self.budget is None else self.budget - eps_after
        return Charge(round_id=round_id, unit=unit, mechanism=mechanism, noise_multiplier=new["noise_multiplier"],
                      count=int(count), epsilon_after=eps_after, delta=self.delta, budget=self.budget,
                      remaining_epsilon=remaining, created=new["created"])

    def charged(self, round_id: str) -> bool:
        """Whether ``round_id`` has been charged."""
        return self._db.execute("SELECT 1 FROM entries WHERE round_id = ?", (round_id,)).fetchone() is not None

    # ------------------------------------------------------------------ reports
    def history(self, unit: str | None = None) -> list[dict]:
        """Every entry (oldest first): kind, unit, round_id, model_id, mechanism, noise_multiplier, sample_rate,
        steps, delta, accountant, epsilon_after, time (unix seconds), meta (dict)."""
        if unit is not None:
            self._check_unit(unit)
        out = []
        for r in self._rows(unit):
            d = dict(r)
            d["meta"] = json.loads(d["meta"])
            d["time"] = d.pop("created")
            out.append(d)
        return out

    def summary(self) -> dict:
        """Per unit present in the ledger (``client`` always): epsilon, delta, budget, remaining, n entries,
        accountant, and what the unit protects."""
        units = [r[0] for r in self._db.execute("SELECT DISTINCT unit FROM entries").fetchall()]
        out = {}
        for unit in sorted(set(units) | {"client"}):
            rows = self._rows(unit)
            delta = self._unit_delta(unit, rows)
            eps, how = self._compose(rows, delta)
            budget = self.budget if unit in CLIENT_UNITS else None
            out[unit] = {
                "level": "client" if unit in CLIENT_UNITS else "example",
                "protects": UNIT_DESCRIPTIONS[unit],
                "epsilon": eps, "delta": delta, "budget": budget,
                "remaining": (None if budget is None else budget - eps),
                "n_releases" if unit in CLIENT_UNITS else "n_trainings": len(rows),
                "accountant": how,
            }
        return out
