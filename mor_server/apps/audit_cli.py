"""``mor audit verify`` and ``mor audit report``: thin shells over ``privacy.audit``.

Exit codes: 0 all checks passed; 1 a log failed verification or the report found an ε mismatch; 2 a usage error
(one line on stderr naming the flag); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mor.cliargs import ArgumentParser, existing_file, loaded_errors, non_negative_float, output_dir, run_main

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _witness(text: str) -> tuple[int, str]:
    """``SEQ:HASH``: an entry's sequence number and its 64-hex-digit hash."""
    s, sep, h = text.partition(":")
    h = h.strip().lower()
    if not sep or not s.strip().isdigit() or not _HEX64.match(h):
        raise argparse.ArgumentTypeError(f"expected SEQ:HASH (a sequence number >= 0 and the entry's 64-hex-digit "
                                         f"hash, e.g. 16:3fa2...), got {text!r}")
    return int(s), h


def _pem_certificate(text: str) -> Path:
    """An existing file holding a PEM X.509 certificate (the federation CA's ca.crt)."""
    from cryptography import x509

    p = existing_file(text)
    try:
        x509.load_pem_x509_certificate(p.read_bytes())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a PEM certificate; give the federation CA's ca.crt "
                                         "(e.g. pki/ca/ca.crt)") from None
    return p


def _ledger_pair(text: str) -> tuple[str, Path]:
    """``CLIENT=PATH`` of an existing ledger file."""
    k, sep, p = text.partition("=")
    if not sep or not k or not p:
        raise argparse.ArgumentTypeError(f"expected CLIENT=PATH (e.g. alice=runs/demo/clients/alice/ledger.sqlite), "
                                         f"got {text!r}")
    return k, existing_file(p)


def _key_spec(text: str) -> tuple[str | None, Path]:
    """``[ACTOR=]PEM``: a key file, optionally for the log written by ACTOR."""
    actor, sep, p = text.partition("=")
    if not sep:
        actor, p = None, text
    if sep and (not actor or not p):
        raise argparse.ArgumentTypeError(f"expected [ACTOR=]PEM (e.g. server=pki/server/identity.crt), got {text!r}")
    return actor, existing_file(p)


def register(subparsers) -> None:
    """Add the ``audit`` command group (``verify``, ``report``) to an argparse subparsers object."""
    p = subparsers.add_parser("audit", help="verify audit logs and build privacy-budget audit reports")
    sub = p.add_subparsers(dest="audit_cmd", required=True)

    v = sub.add_parser("verify", help="check a log's hash chain, signatures and checkpoints",
                       description="Check hash chain, Ed25519 signatures, checkpoints and Merkle roots; name the "
                                   "first bad entry. Pin the writer's key with --public-key (its identity.crt, "
                                   "checked against the federation CA with --ca).")
    v.add_argument("logs", nargs="+", type=existing_file, metavar="LOG", help="audit log file(s) (JSON Lines)")
    _key_args(v)
    v.add_argument("--allow-open", action="store_true",
                   help="accept a log without a final checkpoint (a writer still running, or one that crashed)")
    v.add_argument("--witness", metavar="SEQ:HASH", default=None, type=_witness,
                   help="an entry hash recorded elsewhere; the log must contain it at SEQ (detects truncation of "
                        "an open log)")
    v.add_argument("--json", action="store_true", help="print results as JSON")
    v.set_defaults(func=_verify)

    r = sub.add_parser("report", help="privacy-budget audit: ε per client from ledgers and logs",
                       description="Build report.json, report.md, report.html and PNG plots; exit 1 if a log fails "
                                   "verification or the ledger and the logs disagree on ε.")
    r.add_argument("--log", dest="logs", action="extend", nargs="+", type=existing_file, default=[], metavar="LOG",
                   help="an audit log (server's or a client's); repeat")
    r.add_argument("--ledger", dest="ledgers", action="extend", nargs="+", default=[], metavar="CLIENT=PATH",
                   type=_ledger_pair, help="a client's privacy ledger (SQLite); repeat")
    r.add_argument("--out", type=output_dir, required=True, help="output folder")
    r.add_argument("--public-key", dest="keys", action="append", default=[], metavar="[ACTOR=]PEM", type=_key_spec,
                   help="pinned key (public key PEM or identity certificate) for the log written by ACTOR "
                        "(the log's actor: 'server' or a client name); repeat")
    r.add_argument("--ca", type=_pem_certificate, default=None,
                   help="federation CA certificate to check identity certificates")
    r.add_argument("--trust-embedded-key", action="store_true",
                   help="check logs without a --public-key against the key in their genesis entry (weak)")
    r.add_argument("--allow-open", action="store_true", help="accept logs without a final checkpoint")
    r.add_argument("--tolerance", type=non_negative_float, default=1e-6, help="relative tolerance for ε equality")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots (faster; no matplotlib)")
    r.set_defaults(func=_report)


def _key_args(p) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--public-key", type=existing_file, metavar="PEM",
                   help="the writer's Ed25519 public key: a public-key PEM or its identity certificate (pinned key)")
    g.add_argument("--trust-embedded-key", action="store_true",
                   help="use the key in the log's genesis entry: proves only self-consistency, since anyone can "
                        "rewrite a whole log under a fresh key")
    p.add_argument("--ca", type=_pem_certificate, default=None,
                   help="federation CA certificate: --public-key must then be an identity certificate it issued")


def _verify(args) -> int:
    from privacy.audit import AuditError

    try:
        return _verify_impl(args)
    except AuditError as e:  # one line for the user, no traceback
        raise ValueError(str(e)) from None


def _verify_impl(args) -> int:
    from privacy.audit import verify_log

    if args.ca and not args.public_key:
        raise ValueError("--ca needs --public-key IDENTITY.crt (the certificate to check against the CA)")
    key = _load_key(args.public_key, args.ca) if args.public_key else None
    witness = args.witness
    bad = 0
    results = []
    for log in args.logs:
        res = verify_log(log, key, allow_open=args.allow_open, witness=witness)
        results.append(res.to_dict())
        bad += not res.ok
        if not args.json:
            if res.ok:
                print(f"{log}: OK: {res.n} entries, actor {res.actor!r}, {res.checkpoints} checkpoint(s), "
                      f"{'sealed' if res.sealed else 'OPEN'}, head {res.head[:16]}, "
                      f"{'pinned key' if res.key_pinned else 'EMBEDDED key (not pinned)'}")
            else:
                print(f"{log}: FAILED at seq {res.first_bad_seq}: {res.reason}")
    if args.json:
        json.dump(results if len(results) > 1 else results[0], sys.stdout, indent=2)
        print()
    return 1 if bad else 0


def _load_key(path, ca):
    """The pinned key from --public-key (checked against --ca); errors name the flag."""
    from privacy.audit import AuditError, load_public_key
    from privacy.pki import PKIError

    try:
        return load_public_key(path, ca_cert_path=ca)
    except (ValueError, AuditError, PKIError) as e:
        raise ValueError(f"--public-key {path}: {e}") from None


def _report(args) -> int:
    from privacy.audit import AuditError

    try:
        return _report_impl(args)
    except AuditError as e:
        raise ValueError(str(e)) from None


def _report_impl(args) -> int:
    from privacy.audit import build_report

    keys = {}
    for actor, path in args.keys:
        k = _load_key(path, args.ca)
        if actor is None:
            if len(args.logs) != 1:
                raise ValueError("--public-key without ACTOR= is only allowed with a single --log; write "
                                 "--public-key server=server_pub.pem")
            keys[str(args.logs[0])] = k
        else:
            keys[actor] = k
    if not args.trust_embedded_key:
        from privacy.audit.log import read_entries

        for log in args.logs:
            if str(log) in keys:
                continue
            try:
                actor = read_entries(log)[0].actor if log.exists() else None
            except Exception:  # a broken log: let the report's verification say why
                actor = None
            if actor is not None and actor not in keys:
                raise ValueError(f"no --public-key for log {log} (actor {actor!r}); pass --public-key "
                                 f"{actor}=KEY.pem or --trust-embedded-key")
    ledgers = {}
    for client, path in args.ledgers:
        if client in ledgers:
            raise ValueError(f"--ledger {client}=...: given twice; one ledger per client")
        ledgers[client] = str(path)
    rep = build_report(logs=args.logs, ledgers=ledgers, out_dir=args.out, public_keys=keys,
                       allow_open=args.allow_open, tolerance=args.tolerance, plots=not args.no_plots)
    print(f"privacy-budget audit: {'PASS' if rep['ok'] else 'FAIL'} ({len(rep['clients'])} client(s), "
          f"{rep['rounds_in_server_logs']} server round(s)); report in {args.out}/report.md")
    for e in rep["errors"]:
        print(f"  error: {e}")
    for w in rep["warnings"]:
        print(f"  warning: {w}")
    return 0 if rep["ok"] else 1


def main(argv=None) -> int:  # standalone entry for tests / `python -m mor_server.apps.audit_cli`
    def parse():
        parser = ArgumentParser(prog="mor")
        sub = parser.add_subparsers(dest="cmd", required=True)
        register(sub)
        return parser.parse_args(argv)

    return run_main("mor", parse, expected=lambda: loaded_errors("privacy.audit.entry:AuditError",
                                                                  "privacy.pki:PKIError"))


if __name__ == "__main__":
    sys.exit(main())
