"""Prometheus label hygiene: every labelled counter/histogram exposes a 0 sample for every known label value from the
start (alerts see 0, not "no data"); values outside the known sets are refused; the dropout reasons the server code
records all map to a named reason (never to "other")."""

import ast
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mor.training import METHODS
from mor.wire import MODE_TO_PB
from mor_server.federation import metrics as M
from mor_server.alignment.grpo import GRPOMetrics

ROOT = Path(__file__).resolve().parents[1]

LABELLED = [  # (family in the exposition, label, known values)
    ("mor_rounds_started", "mode", M.ROUND_MODES),
    ("mor_rounds_completed", "mode", M.ROUND_MODES),
    ("mor_rounds_failed", "mode", M.ROUND_MODES),
    ("mor_rounds_cancelled", "mode", M.ROUND_MODES),
    ("mor_round_latency_seconds", "mode", M.ROUND_MODES),
    ("mor_client_dropouts", "reason", M.DROPOUT_REASONS),
    ("mor_reports_rejected", "code", M.STATUS_CODES),
    ("mor_sessions_ended", "code", M.STATUS_CODES),
    ("mor_reward_rounds", "outcome", M.REWARD_ROUND_OUTCOMES),
]


def _fresh():
    reg = CollectorRegistry()
    return M.FederationMetrics(reg), GRPOMetrics(reg), reg


def _exposition(reg):
    return {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}


def test_fresh_registry_exposes_zero_for_every_known_label_value():
    _, _, reg = _fresh()
    fams = _exposition(reg)
    for family, label, values in LABELLED:
        f = fams[family]
        sample = {"counter": family + "_total", "histogram": family + "_count"}[f.type]
        got = {s.labels[label]: s.value for s in f.samples if s.name == sample}
        assert got == {v: 0.0 for v in values}, family
        if f.type == "histogram":  # every bucket of every mode, so histogram_quantile has its series
            inf = {s.labels[label] for s in f.samples if s.name == family + "_bucket" and s.labels["le"] == "+Inf"}
            assert inf == set(values)
    # the unlabelled counters exist at 0 too, under their conventional names
    for name in ("mor_received_bytes_total", "mor_sent_bytes_total", "mor_client_refusals_total",
                 "mor_outbox_overflows_total", "mor_sessions_revoked_total", "mor_crl_reloads_total"):
        assert reg.get_sample_value(name) == 0.0, name
    for old in ("mor_bytes_received_total", "mor_bytes_sent_total"):
        assert reg.get_sample_value(old) is None


def test_unknown_label_values_are_refused():
    m, g, reg = _fresh()
    for metric, kw in ((m.rounds_started, {"mode": "secagg-dp"}), (m.round_latency, {"mode": "PLAIN"}),
                       (m.reports_rejected, {"code": "OK"}), (m.reports_rejected, {"code": "bogus"}),
                       (m.sessions_ended, {"code": "invalid_argument"}), (m.dropouts, {"reason": "refused: tired"}),
                       (g.rounds, {"outcome": "timeout"})):
        with pytest.raises(M.UnknownLabel, match="mor_server/federation/metrics.py"):
            metric.labels(**kw)
    with pytest.raises(TypeError):
        m.rounds_started.labels(reason="plain")
    m.rounds_started.labels(mode="secagg+dp").inc()
    m.reports_rejected.labels("INVALID_ARGUMENT").inc(2)
    g.round_done(False, 0.0)
    assert m.value("mor_rounds_started_total", {"mode": "secagg+dp"}) == 1
    assert m.value("mor_reports_rejected_total", {"code": "INVALID_ARGUMENT"}) == 2
    assert g.value("mor_reward_rounds_total", {"outcome": "failed"}) == 1
    assert m.total("mor_rounds_started_total") == 1


def test_free_text_dropout_reasons_are_classified():
    m, _, _ = _fresh()
    cases = {"refused: privacy budget spent (eps 3.0)": "refused", "not connected (stage reveal)": "not connected",
             "dropped at stage collect_masked: bad signature": "dropped at stage collect_masked",
             "no report before the deadline (stage setup)": "no report before the deadline",
             "something new": "other"}
    for why, label in cases.items():
        assert M.dropout_reason(why) == label
        m.count_dropout(why)
    for label in cases.values():
        assert m.value("mor_client_dropouts_total", {"reason": label}) == 1


def test_label_sets_match_the_code():
    # modes: the wire protocol's privacy modes and the training methods are exactly the metric's (a new mode is
    # charted from its first round)
    assert set(M.ROUND_MODES) == set(MODE_TO_PB) | {f"train:{m}" for m in METHODS}
    assert set(M.STATUS_CODES) == {c.name for c in grpc.StatusCode} - {"OK"}


def _prefix(node) -> tuple[str, bool] | None:
    """The literal text a reason expression starts with, and whether it is the whole text; None when it starts with
    a variable (a reason passed through, checked where it was written)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value, True
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value, len(node.values) == 1
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):  # f"dropped at stage {s}" + (f": {why}" ...)
        p = _prefix(node.left)
        return None if p is None else (p[0], False)
    return None


def _recorded_reasons():
    """Every dropout reason literal in the server package: rnd.drop(c, R), book.drop_everywhere(c, R),
    self._drop_client(c, R), self._end_session(conn, code, details, R), x.dropped[c] = R, dropped.setdefault(c, R)."""
    found = []
    for path in sorted((ROOT / "mor_server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            expr = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name, args = node.func.attr, node.args
                if name in ("drop", "drop_everywhere", "_drop_client", "setdefault") and len(args) == 2:
                    if name != "setdefault" or (isinstance(node.func.value, (ast.Name, ast.Attribute)) and
                                                ast.unparse(node.func.value).endswith("dropped")):
                        expr = args[1]
                elif name == "_end_session":
                    expr = args[3] if len(args) == 4 else next((k.value for k in node.keywords
                                                                 if k.arg == "drop_reason"), None)
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Subscript):
                if ast.unparse(node.targets[0].value).endswith("dropped"):
                    expr = node.value
            if expr is not None:
                p = _prefix(expr)
                if p is not None:
                    found.append((f"{path.name}:{node.lineno}", *p))
    return found


def test_every_dropout_reason_the_server_records_has_its_own_label():
    found = _recorded_reasons()
    assert len(found) >= 8, found  # the scan sees the server's call sites (it would pass vacuously otherwise)
    for where, text, whole in found:
        if whole or ":" in text or " (" in text:  # the label is fully determined by the literal text
            assert M.dropout_reason(text) != "other", f"{where}: dropout reason {text!r} is not in DROPOUT_REASONS"
        else:  # f"dropped at stage {stage}": some listed reason continues the literal prefix
            assert any(r.startswith(text) and r != text for r in M.DROPOUT_REASONS), \
                f"{where}: no DROPOUT_REASONS entry continues {text!r}"
