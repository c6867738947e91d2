"""Privacy-budget audit report: per client, ε over time from the ledger and from the audit logs, which must agree.

One module although over 400 lines: its two sources (ledgers and audit logs) are cross-checked entry by entry,
so their readers live with the comparison.

Inputs: audit logs (the server's and any clients'), each verified first, and per-client ledgers
(``privacy.ledger.PrivacyLedger``). Cross-references by ``round_id``:

* client log ``release`` entries (``{"round_id", "mode", "released", "epsilon_charged", "epsilon_total"}``) vs the
  client's ledger: the ledger's ε after that round must equal the logged ``epsilon_total``;
* server log ``round`` entries (``{"round_id", "mode", "participants", "responders", "dropouts",
  "epsilon_charged": {client: ε}, "epsilon_total": {client: ε}}``): ``epsilon_total`` vs the ledger and the client
  log; ``epsilon_charged`` vs the client log's charge and (when no client log is given) vs the increase of the
  client's ledger ε over that round;
* a round in the ledger but in no log (or the reverse) is an error too: a release nobody can account for.

Outputs in ``out_dir``: ``report.json`` (for tools), ``report.md``, ``report.html`` and ``eps_<client>.png`` /
``eps_all.png``. ``report["ok"]`` is False when a log fails verification or any ε disagrees.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from collections import defaultdict
from pathlib import Path

from .entry import AuditError
from .verify import verify_log

__all__ = ["build_report", "ReportError", "ledger_rows"]


class ReportError(AuditError):
    """The report cannot be built from these inputs (the message says which input and why)."""


def _first(row: dict, *names, default=None):
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    return default


def ledger_rows(ledger_path) -> tuple[list[dict], dict]:
    """Read a client's ledger through ``privacy.ledger.PrivacyLedger``: (normalised history rows, summary)."""
    import sqlite3

    try:
        from privacy.ledger import LedgerError, PrivacyLedger
    except ImportError as e:  # the ledger module ships separately
        raise ReportError(f"cannot read ledger {ledger_path}: privacy.ledger is not available ({e})") from None
    p = Path(ledger_path)
    if not p.exists():
        raise FileNotFoundError(f"ledger {p} does not exist")
    try:
        led = PrivacyLedger(p, read_only=True)  # an audit writes nothing into the client's ledger
    except LedgerError as e:
        raise ReportError(f"ledger {p}: {e}") from None
    try:
        hist = list(led.history())
        summary = led.summary()
    except (sqlite3.DatabaseError, LedgerError, ValueError) as e:
        raise ReportError(f"ledger {p} cannot be read ({e}); is it a MoR privacy ledger?") from None
    finally:
        close = getattr(led, "close", None)
        if callable(close):
            close()
    rows = []
    for h in hist:
        h = dict(h)
        t = _first(h, "time", "timestamp", "created")
        if isinstance(t, (int, float)):
            t = _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        rows.append({
            "round_id": _first(h, "round_id", "round"),
            "time": t,
            "kind": _first(h, "kind"),
            "mechanism": _first(h, "mechanism"),
            "unit": _first(h, "unit"),
            "model_id": _first(h, "model_id"),
            "noise_multiplier": _first(h, "noise_multiplier", "sigma"),
            "epsilon_after": _first(h, "epsilon_after", "eps_after", "epsilon_total", "epsilon"),
        })
    return rows, dict(summary) if isinstance(summary, dict) else {"summary": summary}


def _close(a, b, tol) -> bool:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _key(r):
    return json.dumps(r, sort_keys=True) if not isinstance(r, str) else r


def build_report(*, logs, ledgers: dict | None = None, out_dir, public_keys: dict | None = None,
                 allow_open: bool = False, tolerance: float = 1e-6, plots: bool = True) -> dict:
    """Build the privacy-budget audit and write report.json / report.md / report.html / PNG plots into out_dir.

    Args:
        logs: audit-log paths (server and/or clients); each is verified with ``verify_log``.
        ledgers: ``{client_id: ledger_path}`` (SQLite files of ``privacy.ledger.PrivacyLedger``).
        out_dir: output folder (created).
        public_keys: ``{log path or actor: Ed25519PublicKey}`` pinned keys; a log without one is checked against
            its embedded genesis key and marked ``key_pinned: false`` in the report.
        allow_open: accept logs without a final checkpoint (a run still in progress).
        tolerance: relative tolerance for ε equality (values are floats written by the same code).
        plots: write PNG plots (matplotlib, Agg backend).

    Returns the report dict (also in report.json); ``report["ok"]`` is False on any error.
    """
    logs = [Path(p) for p in (logs or [])]
    ledgers = {str(k): Path(v) for k, v in (ledgers or {}).items()}
    if not logs and not ledgers:
        raise ReportError("nothing to report: pass at least one audit log (--log) or ledger (--ledger CLIENT=PATH)")
    public_keys = public_keys or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    warnings: list[str] = []
    log_info = []
    server_rounds: dict = {}                       # round_id -> payload (+ _time, _log)
    client_releases: dict = defaultdict(dict)      # client -> round_id -> payload
    client_logs: set = set()
    refusals: dict = defaultdict(list)
    for p in logs:
        key = public_keys.get(str(p))
        res = verify_log(p, key, allow_open=allow_open)
        if key is None and res.actor in public_keys:
            res = verify_log(p, public_keys[res.actor], allow_open=allow_open)
        log_info.append({"path": str(p), **{k: v for k, v in res.to_dict().items() if k != "path"}})
        if not res.ok:
            errors.append(f"log {p} fails verification at seq {res.first_bad_seq}: {res.reason}")
        if not res.key_pinned:
            warnings.append(f"log {p}: signatures checked against the key embedded in the log, not a pinned key")
        actor = res.actor
        is_server = actor == "server" or (actor or "").startswith("server:")
        if actor and actor.startswith("client:"):  # the client SDK writes actor "client:NAME"
            actor = actor[len("client:"):]
        if not is_server and actor is not None:
            client_logs.add(actor)
        for e in res.entries:
            pl = e.payload if isinstance(e.payload, dict) else {}
            if e.event == "refusal":
                who = str(actor if not is_server else pl.get("client", pl.get("client_id", "?")))
                rid = pl.get("round_id")
                same = [f for f in refusals[who] if rid is not None and f.get("round_id") == rid]
                if same:  # the client's and the server's record of one refusal
                    same[0]["logs"].append(str(p))
                    continue
                refusals[who].append({"time": e.time, "seq": e.seq, "logs": [str(p)],
                                      **{k: v for k, v in pl.items() if k in ("round_id", "reason", "mode")}})
            elif is_server and e.event in ("round", "router_calibration") and "round_id" in pl:
                server_rounds[_key(pl["round_id"])] = {**pl, "_time": e.time, "_event": e.event, "_log": str(p)}
            elif not is_server and (e.event == "release" or (e.event == "round" and "released" in pl)) \
                    and "round_id" in pl:
                client_releases[actor][_key(pl["round_id"])] = {**pl, "_time": e.time, "_seq": e.seq}

    clients = set(ledgers) | client_logs | set(refusals) - {"?"}
    for r in server_rounds.values():
        tot = r.get("epsilon_total") if isinstance(r.get("epsilon_total"), dict) else {}
        for c in list(r.get("participants") or []) + list((r.get("epsilon_charged") or {}).keys()) + list(tot):
            clients.add(str(c))
        d = r.get("dropouts") or []
        for c in (d.keys() if isinstance(d, dict) else d):
            clients.add(str(c))

    per_client = {}
    for c in sorted(clients):
        rows, summary = ([], None)
        if c in ledgers:
            rows, summary = ledger_rows(ledgers[c])
        rel = client_releases.get(c, {})
        timeline = []
        led_by_round = {}
        prev_eps = 0.0
        # example-level rows (DP-SGD training, unit pair/annotator) are reported, never compared with releases:
        # the two units are different guarantees and are never added together
        example_level = [r for r in rows if r["round_id"] is None and r["unit"] != "client"]
        for r in rows:
            if r in example_level:
                continue
            eps = r["epsilon_after"]
            inc = None if eps is None else float(eps) - prev_eps
            if eps is not None:
                prev_eps = float(eps)
            if r["round_id"] is None:
                continue
            led_by_round[_key(r["round_id"])] = {**r, "increment": inc}
        client_rows = [r for r in rows if r not in example_level]
        rounds_part, modes = [], defaultdict(int)
        for rid, sr in server_rounds.items():
            parts = [str(x) for x in (sr.get("responders") if sr.get("responders") is not None
                                      else sr.get("participants")) or []]
            if c in parts:
                rounds_part.append(sr["round_id"])
                modes[str(sr.get("mode"))] += 1
        for rid, cr in rel.items():
            if rid not in server_rounds:
                modes[str(cr.get("mode"))] += 1
        all_rounds = list(dict.fromkeys(list(led_by_round) + list(rel) +
                                        [k for k, sr in server_rounds.items()
                                         if c in {str(x) for x in (sr.get("epsilon_charged") or {})}
                                         or (isinstance(sr.get("epsilon_total"), dict)
                                             and c in {str(x) for x in sr["epsilon_total"]})]))
        for rid in all_rounds:
            led, cr, sr = led_by_round.get(rid), rel.get(rid), server_rounds.get(rid)
            srv_charge = (sr.get("epsilon_charged") or {}).get(c) if sr else None
            srv_total = sr.get("epsilon_total") if sr else None
            srv_total = srv_total.get(c) if isinstance(srv_total, dict) else None
            row = {"round_id": (led or cr or sr)["round_id"], "time": (cr or {}).get("_time") or (led or {}).get("time")
                   or (sr or {}).get("_time"), "mode": (cr or sr or {}).get("mode"),
                   "eps_ledger": led["epsilon_after"] if led else None,
                   "eps_log": cr.get("epsilon_total") if cr else None,
                   "charged_client_log": cr.get("epsilon_charged") if cr else None,
                   "eps_server_log": srv_total,
                   "charged_server_log": srv_charge, "charged_ledger": led["increment"] if led else None,
                   "released": cr.get("released") if cr else None, "problems": []}
            if c in ledgers:
                if led is None and ((cr and (float(cr.get("epsilon_charged") or 0) > 0
                                             or cr.get("epsilon_total") is not None)) or
                                    (srv_charge is not None and float(srv_charge) > 0) or srv_total is not None):
                    row["problems"].append("logged as charged but absent from the ledger")
                if led is not None and cr is None and srv_charge is None and srv_total is None:
                    row["problems"].append("charged in the ledger but recorded in no audit log")
                if led is not None and cr is not None and not _close(led["epsilon_after"], cr.get("epsilon_total"),
                                                                     tolerance):
                    row["problems"].append(f"ledger ε {led['epsilon_after']} != client log ε_total "
                                           f"{cr.get('epsilon_total')}")
                if led is not None and cr is None and srv_charge is not None and \
                        not _close(led["increment"], srv_charge, tolerance):
                    row["problems"].append(f"ledger ε increase {led['increment']} != server-logged charge {srv_charge}")
            if led is not None and srv_total is not None and not _close(led["epsilon_after"], srv_total, tolerance):
                row["problems"].append(f"ledger ε {led['epsilon_after']} != server-logged ε_total {srv_total}")
            if cr is not None and srv_total is not None and cr.get("epsilon_total") is not None and \
                    not _close(cr.get("epsilon_total"), srv_total, tolerance):
                row["problems"].append(f"client-logged ε_total {cr.get('epsilon_total')} != server-logged "
                                       f"ε_total {srv_total}")
            if cr is not None and srv_charge is not None and cr.get("epsilon_charged") is not None and \
                    not _close(cr.get("epsilon_charged"), srv_charge, tolerance):
                row["problems"].append(f"client-logged charge {cr.get('epsilon_charged')} != server-logged charge "
                                       f"{srv_charge}")
            if cr is not None and sr is None and server_rounds:
                warnings.append(f"client {c}: round {row['round_id']} released per its log but absent from the "
                                "server logs given")
            if cr is not None and sr is not None and c not in {str(x) for x in sr.get("participants") or []}:
                warnings.append(f"client {c}: released in round {row['round_id']} but the server lists it as "
                                "not participating (dropout?)")
            for pr in row["problems"]:
                errors.append(f"client {c}, round {row['round_id']}: {pr}")
            timeline.append(row)
        final_ledger = client_rows[-1]["epsilon_after"] if client_rows else (0.0 if c in ledgers else None)
        logged_totals = [cr.get("epsilon_total") for cr in rel.values() if cr.get("epsilon_total") is not None]
        s_client = (summary or {}).get("client") if isinstance(summary, dict) else None
        if isinstance(s_client, dict) and s_client.get("epsilon") is not None and final_ledger is not None and \
                not _close(s_client["epsilon"], final_ledger, tolerance):
            errors.append(f"client {c}: ledger summary ε {s_client['epsilon']} != ε after its last release "
                          f"{final_ledger}")
        if c in ledgers and logged_totals and not _close(logged_totals[-1], final_ledger, tolerance):
            errors.append(f"client {c}: final ε in its audit log {logged_totals[-1]} != final ledger ε {final_ledger}")
        per_client[c] = {
            "ledger": str(ledgers[c]) if c in ledgers else None, "ledger_summary": summary,
            "has_client_log": c in client_logs, "epsilon_final_ledger": final_ledger,
            "epsilon_final_log": logged_totals[-1] if logged_totals else None,
            "rounds_participated": rounds_part, "n_rounds_participated": len(rounds_part),
            "n_releases_logged": len(rel), "modes": dict(modes), "refusals": refusals.get(c, []),
            "timeline": timeline,
            "example_level": [{k: r[k] for k in ("time", "unit", "mechanism", "model_id", "noise_multiplier",
                                                 "epsilon_after")} for r in example_level],
        }
        if c not in ledgers and (rel or any(r["charged_server_log"] for r in timeline)):
            warnings.append(f"client {c}: no ledger given, ε checked only between logs")

    report = {"ok": not errors, "errors": errors, "warnings": warnings, "logs": log_info,
              "rounds_in_server_logs": len(server_rounds), "clients": per_client, "tolerance": tolerance}
    if plots:
        report["plots"] = _plots(per_client, out)
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=2, sort_keys=True, default=str) + "\n")
    md = _markdown(report)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(_html(report))
    return report


def _jsonable(x):
    """Strict JSON: inf/nan (e.g. example-level ε of a model trained without DP) become strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _series(cl: dict):
    xs, led, lg = [], [], []
    for i, r in enumerate([r for r in cl["timeline"] if r.get("round_id") is not None]):
        xs.append(i + 1)
        led.append(r.get("eps_ledger"))
        lg.append(r.get("eps_log"))
    return xs, led, lg


def _plots(per_client: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    files = []
    fig_all, ax_all = plt.subplots(figsize=(7, 4))
    for c, cl in per_client.items():
        xs, led, lg = _series(cl)
        if not xs:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for a, lbl in ((ax, ""), (ax_all, f"{c} ")):
            if any(v is not None for v in led):
                a.plot([x for x, v in zip(xs, led) if v is not None], [v for v in led if v is not None], "-",
                       label=f"{lbl}ledger")
            if any(v is not None for v in lg):
                a.plot([x for x, v in zip(xs, lg) if v is not None], [v for v in lg if v is not None], "o",
                       mfc="none", label=f"{lbl}audit log")
        ax.set_title(f"client {c}: cumulative ε (client level)")
        ax.set_xlabel("release (round order)")
        ax.set_ylabel("ε")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        name = f"eps_{''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in c)}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)
    ax_all.set_title("cumulative ε per client")
    ax_all.set_xlabel("release (round order)")
    ax_all.set_ylabel("ε")
    ax_all.grid(alpha=0.3)
    if files:
        ax_all.legend(fontsize=7)
    fig_all.tight_layout()
    fig_all.savefig(out / "eps_all.png", dpi=100)
    plt.close(fig_all)
    return ["eps_all.png", *files]


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _markdown(rep: dict) -> str:
    L = ["# Privacy-budget audit", "", f"**Result: {'PASS' if rep['ok'] else 'FAIL'}** "
         f"({len(rep['errors'])} error(s), {len(rep['warnings'])} warning(s))", ""]
    if rep["errors"]:
        L += ["## Errors", ""] + [f"- {e}" for e in rep["errors"]] + [""]
    if rep["warnings"]:
        L += ["## Warnings", ""] + [f"- {w}" for w in rep["warnings"]] + [""]
    L += ["## Logs", "", "| log | actor | entries | verified | sealed | key pinned | note |", "|---|---|---|---|---|---|---|"]
    for lg in rep["logs"]:
        L.append(f"| {lg['path']} | {lg['actor']} | {lg['n']} | {'yes' if lg['ok'] else 'NO'} | "
                 f"{'yes' if lg['sealed'] else 'no'} | {'yes' if lg['key_pinned'] else 'no'} | {lg['reason']} |")
    L += ["", "## Clients", "", "| client | final ε (ledger) | final ε (log) | rounds | releases logged | modes | "
          "refusals |", "|---|---|---|---|---|---|---|"]
    for c, cl in rep["clients"].items():
        modes = ", ".join(f"{m}: {n}" for m, n in cl["modes"].items()) or "-"
        L.append(f"| {c} | {_fmt(cl['epsilon_final_ledger'])} | {_fmt(cl['epsilon_final_log'])} | "
                 f"{cl['n_rounds_participated']} | {cl['n_releases_logged']} | {modes} | {len(cl['refusals'])} |")
    if "eps_all.png" in rep.get("plots", []):
        L += ["", "![cumulative ε per client](eps_all.png)"]
    for c, cl in rep["clients"].items():
        L += ["", f"### {c}", ""]
        if f"eps_{c}.png" in rep.get("plots", []):
            L += [f"![ε of {c}](eps_{c}.png)", ""]
        L += ["| round | time | mode | ε ledger | ε client log | ε server log | charged (client log) | "
              "charged (server log) | charged (ledger Δ) | problems |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in cl["timeline"]:
            L.append(f"| {r['round_id']} | {_fmt(r['time'])} | {_fmt(r['mode'])} | {_fmt(r['eps_ledger'])} | "
                     f"{_fmt(r['eps_log'])} | {_fmt(r['eps_server_log'])} | {_fmt(r['charged_client_log'])} | {_fmt(r['charged_server_log'])} | "
                     f"{_fmt(r['charged_ledger'])} | {'; '.join(r['problems'])} |")
        if cl["example_level"]:
            L += ["", "Example-level (DP-SGD training; a separate guarantee, never added to the client level):", "",
                  "| time | unit | mechanism | model | noise multiplier | ε after |", "|---|---|---|---|---|---|"]
            L += [f"| {_fmt(r['time'])} | {r['unit']} | {r['mechanism']} | {_fmt(r['model_id'])} | "
                  f"{_fmt(r['noise_multiplier'])} | {_fmt(r['epsilon_after'])} |" for r in cl["example_level"]]
        if cl["refusals"]:
            L += ["", "Refusals:", ""] + [f"- {f.get('time')}: round {f.get('round_id', '-')}: {f.get('reason', '')}"
                                           for f in cl["refusals"]]
    return "\n".join(L) + "\n"


def _html(rep: dict) -> str:
    """A self-contained HTML rendering of the Markdown tables (no external assets except the PNGs beside it)."""
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Privacy-budget audit</title><style>"
           "body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #bbb;padding:2px 6px}.fail{color:#b00}.pass{color:#070}</style></head><body>"]
    in_table = False
    for line in _markdown(rep).splitlines():
        if line.startswith("|"):
            cells = [html.escape(x.strip()) for x in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{x}</th>" for x in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f"<p><img src='{html.escape(src[:-1])}' alt='{html.escape(alt)}'></p>")
        elif line.startswith("#"):
            lvl = len(line) - len(line.lstrip("#"))
            out.append(f"<h{lvl}>{html.escape(line.lstrip('#').strip())}</h{lvl}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.startswith("**Result"):
            cls = "pass" if rep["ok"] else "fail"
            out.append(f"<p class='{cls}'><b>{html.escape(line.replace('**', ''))}</b></p>")
        elif line:
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
