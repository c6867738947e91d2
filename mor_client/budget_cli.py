"""``mor client budget``: print the privacy ledger for a privacy officer, every figure with its unit.

    mor-client budget --ledger ledger.db                 # summary per unit
    mor-client budget --ledger ledger.db --history       # + every training and release
    mor-client budget --ledger ledger.db --preview 3.0   # what one more release at noise multiplier 3.0 costs
    mor-client budget --ledger ledger.db --json          # machine-readable
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from mor.cliargs import RawHelpFormatter, existing_file, open_unit_interval, positive_float, positive_int


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _run(args) -> int:
    try:
        from privacy.ledger import LedgerError, PrivacyLedger
    except ImportError as e:  # the ledger's accounting needs the dp extra (opacus)
        pkg = (e.name or str(e)).split(".")[0]
        print(f"mor-client budget: error: the privacy ledger needs the dp extra ({pkg} is not installed): "
              "pip install 'mor[dp]'", file=sys.stderr)
        return 2

    path = Path(args.ledger)
    if not path.exists():
        print(f"mor-client budget: error: --ledger {path}: no such ledger file", file=sys.stderr)
        return 2
    try:
        L = PrivacyLedger(path, delta=args.delta, read_only=True)  # auditing writes nothing, --delta included
    except LedgerError as e:
        print(f"mor-client budget: error: --ledger: {e}", file=sys.stderr)
        return 2
    try:
        summary = L.summary()
        preview = None
        if args.preview is not None:
            try:
                eps_after, remaining = L.preview(noise_multiplier=args.preview, count=args.count)
            except LedgerError as e:
                print(f"mor-client budget: error: --preview: {e}", file=sys.stderr)
                return 2
            preview = {"noise_multiplier": args.preview, "count": args.count, "epsilon_after": eps_after,
                       "remaining_after": remaining, "allowed": remaining >= 0}
        hist = L.history() if args.history else None
        if args.json:
            print(json.dumps({"ledger": str(path), "summary": summary, "preview": preview, "history": hist},
                             indent=2, default=str))
            return 0
        print(f"Privacy ledger {path}")
        print("Units are separate guarantees and are never added together.")
        for unit, s in summary.items():
            print(f"\n[{unit}] {s['protects']}")
            print(f"  epsilon = {_fmt(s['epsilon'])} (unit: {unit}) at delta = {s['delta']:g}  "
                  f"[accountant: {s['accountant']}]")
            if s["level"] == "client":
                print(f"  budget  = {_fmt(s['budget'])}   remaining = {_fmt(s['remaining'])}   "
                      f"releases = {s['n_releases']}")
            else:
                print(f"  trainings recorded = {s['n_trainings']}  (scores computed later cost nothing here)")
        if preview:
            verdict = "ALLOWED" if preview["allowed"] else "WOULD BE REFUSED"
            print(f"\nPreview: {args.count} release(s) at noise multiplier {args.preview}: client-level epsilon "
                  f"-> {_fmt(preview['epsilon_after'])}, remaining {_fmt(preview['remaining_after'])}: {verdict}")
        if hist:
            print("\nHistory (oldest first):")
            print(f"  {'time (UTC)':19}  {'unit':9} {'kind':8} {'round / model':24} {'mechanism':10} "
                  f"{'noise mult':>10} {'q':>7} {'steps':>6} {'eps after':>9}")
            for h in hist:
                t = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h["time"]))
                who = h["round_id"] or h["model_id"] or ""
                print(f"  {t:19}  {h['unit']:9} {h['kind']:8} {who[:24]:24} {h['mechanism']:10} "
                      f"{_fmt(h['noise_multiplier']):>10} {_fmt(h['sample_rate']):>7} {h['steps']:>6} "
                      f"{_fmt(h['epsilon_after']):>9}")
        return 0
    finally:
        L.close()


def register(subparsers) -> None:
    """Add the ``budget`` subcommand to ``mor client``'s subparsers."""
    p = subparsers.add_parser("budget", help="print the privacy ledger (epsilon per unit, budget, history)",
                              formatter_class=RawHelpFormatter, description=__doc__)
    p.add_argument("--ledger", required=True, type=existing_file, help="the client's privacy ledger (SQLite file)")
    p.add_argument("--history", action="store_true", help="also list every training and release")
    p.add_argument("--preview", type=positive_float, default=None, metavar="NOISE_MULT",
                   help="show what a release at this noise multiplier would cost and whether it is allowed")
    p.add_argument("--count", type=positive_int, default=1, help="number of releases for --preview")
    p.add_argument("--delta", type=open_unit_interval, default=None,
                   help="report client-level epsilon at this delta (default: the ledger's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)
