"""Tamper-evident audit logs and privacy-budget audit reports.

* ``AuditLog``: append-only JSON Lines log, SHA-256 hash chain, Ed25519 signatures, periodic signed checkpoints
  carrying an RFC 9162 Merkle root (inclusion proofs), crash-safe appends (fsync before return).
* ``verify_log``: third-party verifier naming the first bad entry for modification, deletion, insertion,
  reordering or truncation.
* ``build_report``: per-client privacy-budget audit (ε over time from the ledger and from the logs, which must
  agree), as JSON, Markdown, HTML and PNG plots.

See docs/audit.md for the format and the payload policy.
"""

from .entry import EVENTS, AuditEntry, AuditError, SecretPayloadError, canonical, value_digest
from .log import AuditLog, LogCorruptError, TornTailError, read_entries
from .merkle import verify_inclusion
from .verify import VerifyResult, load_public_key, verify_log


def __getattr__(name):  # build_report pulls in matplotlib: import it lazily
    if name in ("build_report", "ReportError"):
        from . import report

        return getattr(report, name)
    raise AttributeError(name)


__all__ = ["AuditLog", "AuditEntry", "AuditError", "SecretPayloadError", "TornTailError", "LogCorruptError",
           "EVENTS", "verify_log", "VerifyResult", "load_public_key", "build_report", "ReportError",
           "read_entries", "canonical", "value_digest", "verify_inclusion"]
