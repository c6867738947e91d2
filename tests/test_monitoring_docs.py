"""docs/monitoring/: the Grafana dashboard and the alert rules parse, and every metric they query is one the server
exports (a rename that forgets the dashboard or the alerts fails here), with the suffix its type calls for."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mor_server.alignment.grpo import GRPOMetrics
from mor_server.federation.metrics import FederationMetrics

DOCS = Path(__file__).resolve().parents[1] / "docs" / "monitoring"
DASHBOARD = DOCS / "grafana-dashboard.json"
ALERTS = DOCS / "alerts.yml"

NAME = re.compile(r"\b(mor_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b(mor_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
RATE = re.compile(r"\b(rate|irate|increase)\(\s*(mor_[a-z0-9_]+)")


def _families():
    """The exposition of a fresh server registry (FederationMetrics + GRPOMetrics, labels initialised), with the
    certificate gauge set as the server sets it under mTLS; {family name: family}, and {sample name: family}."""
    reg = CollectorRegistry()
    m = FederationMetrics(reg)
    GRPOMetrics(reg)
    m.certificate_expiry.labels(certificate="server_tls").set(1e7)
    fams = list(text_string_to_metric_families(generate_latest(reg).decode()))
    return {f.name: f for f in fams}, {s.name: f for f in fams for s in f.samples}


def _dashboard_exprs(dash):
    out = []

    def walk(panels):
        for p in panels:
            out.extend((f"panel {p['title']!r}", t["expr"]) for t in p.get("targets", ()))
            walk(p.get("panels", ()))

    walk(dash["panels"])
    for v in dash["templating"]["list"]:
        q = v.get("query")
        out.append((f"variable {v['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def _alert_exprs(rules):
    return [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]


def _all_exprs():
    return (_dashboard_exprs(json.loads(DASHBOARD.read_text())) +
            _alert_exprs(yaml.safe_load(ALERTS.read_text())))


def test_dashboard_is_an_importable_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] and dash["title"]
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    ids, titles = [], []
    for p in dash["panels"]:
        ids.append(p["id"])
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        titles.append(p["title"])
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["expr"].strip()
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    assert len(ids) == len(set(ids))
    exprs = " ".join(e for _, e in _dashboard_exprs(dash))
    # what the dashboard is for (issue #16): each of these is charted
    for needed in ("mor_clients_online", "mor_clients_registered", "mor_rounds_completed_total",
                   "mor_rounds_failed_total", "mor_round_latency_seconds_bucket", "mor_client_dropouts_total",
                   "mor_client_refusals_total", "mor_reports_rejected_total", "mor_received_bytes_total",
                   "mor_sent_bytes_total", "mor_crl_usable", "mor_crl_next_update_timestamp_seconds",
                   "mor_certificate_expiry_seconds", "mor_grpo_step", "mor_grpo_reward", "mor_grpo_kl"):
        assert re.search(rf"\b{needed}\b", exprs), needed
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs


def test_alert_rules_are_prometheus_rule_groups():
    rules = yaml.safe_load(ALERTS.read_text())
    names = []
    for g in rules["groups"]:
        assert g["name"] and g["rules"]
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
            assert r["alert"] and isinstance(r["expr"], str) and r["expr"].strip()
            assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
            assert re.fullmatch(r"\d+[smhd]", r.get("for", "0m")), r["alert"]
            assert r["labels"]["severity"] in ("critical", "warning", "info")
            assert r["annotations"]["summary"]
            names.append(r["alert"])
    assert len(names) == len(set(names))
    for needed in ("MorCRLUnusable", "MorCRLNextUpdateSoon", "MorCertificateExpiringSoon", "MorNoClientsOnline",
                   "MorRoundFailureRatioHigh", "MorReportRejectionsSpiking", "MorOutboxOverflows"):
        assert needed in names


def _problems(where, expr, by_sample):
    """What is wrong with one PromQL expression against the exported series (empty: nothing)."""
    out = []
    names = NAME.findall(expr)
    if not names:
        out.append(f"{where}: no mor_ metric in {expr!r}")
    for name in names:
        fam = by_sample.get(name)
        if fam is None:
            out.append(f"{where}: {name} is not exported by the server (renamed?)")
        elif fam.type == "counter" and name != fam.name + "_total":
            out.append(f"{where}: counter {fam.name} is queried as {name}")
        elif fam.type == "histogram" and name not in (fam.name + "_bucket", fam.name + "_sum", fam.name + "_count"):
            out.append(f"{where}: histogram {fam.name} is queried as {name}")
    for func, name in RATE.findall(expr):  # rate()/increase() only over counters and histogram series
        if name in by_sample and by_sample[name].type not in ("counter", "histogram"):
            out.append(f"{where}: {func}() over the gauge {name}")
    if "histogram_quantile" in expr and not ("_bucket" in expr and re.search(r"\ble\b", expr)):
        out.append(f"{where}: histogram_quantile needs a _bucket series aggregated by le")
    for name, matchers in SELECTOR.findall(expr):  # label names exist; literal values are exported values
        fam = by_sample.get(name)
        for label, op, value in MATCHER.findall(matchers) if fam is not None else ():
            if label == "instance":
                continue  # added by the scrape, not by the server
            have = {s.labels.get(label) for s in fam.samples if s.name == name} - {None}
            if not have:
                out.append(f"{where}: {name} has no label {label!r}")
            elif op in ("=", "!=") and value not in have:
                out.append(f"{where}: {name}{{{label}={value!r}}} matches no exported series")
    return out


def test_every_queried_metric_is_exported_with_the_right_suffix():
    _, by_sample = _families()
    exprs = _all_exprs()
    assert len(exprs) > 20
    problems = [p for where, expr in exprs for p in _problems(where, expr, by_sample)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_renames_and_misuse():
    _, by_sample = _families()
    bad = ["rate(mor_bytes_received_total[5m])",  # the name before the rename
           "sum(rate(mor_rounds_started[5m]))",  # a counter without _total
           "histogram_quantile(0.5, sum by (le) (rate(mor_round_latency_seconds[5m])))",  # not _bucket
           "rate(mor_clients_online[5m])",  # rate() over a gauge
           'mor_client_dropouts_total{reason="refused: budget"}',  # not an exported label value
           'mor_reports_rejected_total{status="INTERNAL"}',  # no such label
           "sum(up)"]  # no mor_ metric at all
    for expr in bad:
        assert _problems("t", expr, by_sample), expr
    assert not _problems("t", 'sum by (code) (increase(mor_reports_rejected_total{code="INTERNAL"}[10m]))',
                         by_sample)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (optional check)")
def test_promtool_accepts_the_rules():  # pragma: no cover - only where Prometheus' promtool is installed
    subprocess.run(["promtool", "check", "rules", str(ALERTS)], check=True, timeout=60)
