"""Privacy-budget audit report: ε from the real ledger and from the logs agree; any disagreement is an error."""

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from mor_server.apps import audit_cli
from privacy.audit import AuditLog, build_report
from privacy.ledger import BudgetExceeded, PrivacyLedger

KEYS = {name: Ed25519PrivateKey.from_private_bytes(bytes([i + 40]) * 32)
        for i, name in enumerate(("server", "alice", "bob"))}


def _run(tmp_path, *, rounds=4, client_logs=True, lie=None, training=False, server_totals=False):
    """A small federated run: clients charge their ledgers, then log the release; the server logs each round.

    lie=(client, round_index, field, value) makes that client's log entry disagree with what was charged
    (client "server": the server's ε_total for alice). server_totals: the shape the federation server and client
    SDK write (server: responders + epsilon_total per client; client release: epsilon_total, no epsilon_charged).
    """
    budgets = {"alice": None, "bob": 0.7}
    ledgers = {c: PrivacyLedger(tmp_path / f"{c}.ledger.sqlite", client_level_budget=b) for c, b in budgets.items()}
    if training:
        ledgers["alice"].record_training(model_id="rm-alice", noise_multiplier=1.1, sample_rate=0.05, steps=40,
                                         delta=1e-5)
    server = AuditLog(tmp_path / "server.jsonl", signing_key=KEYS["server"], actor="server", checkpoint_every=5)
    logs = {c: AuditLog(tmp_path / f"{c}.jsonl", signing_key=KEYS[c], actor=f"client:{c}" if server_totals else c,
                        checkpoint_every=5)
            for c in budgets if client_logs}
    prev = {c: 0.0 for c in budgets}
    for r in range(rounds):
        rid = f"round-{r}"
        charged = {}
        for c, led in ledgers.items():
            try:
                ch = led.charge_release(round_id=rid, noise_multiplier=40.0, count=16)
            except BudgetExceeded as e:
                if c in logs:
                    logs[c].append("refusal", {"round_id": rid, "reason": "budget", "detail": str(e)[:80]})
                server.append("refusal", {"round_id": rid, "client": c, "reason": "budget"})
                continue
            inc = ch.epsilon_after - prev[c]
            prev[c] = ch.epsilon_after
            charged[c] = inc
            entry = {"round_id": rid, "mode": "dp", "released": 16, "epsilon_charged": inc,
                     "epsilon_total": ch.epsilon_after}
            if server_totals:
                del entry["epsilon_charged"]
            if lie and lie[0] == c and lie[1] == r:
                entry[lie[2]] = lie[3]
            if c in logs:
                logs[c].append("release", entry)
        rnd = {"round_id": rid, "mode": "dp", "participants": sorted(charged), "dropouts": [],
               "task_digest": f"{r:064x}", "weights_digest": f"{r:064x}", "aggregate": {"mean": 0.1, "n": 16},
               "epsilon_charged": charged}
        if server_totals:
            rnd = {**rnd, "participants": sorted(budgets), "responders": sorted(charged),
                   "epsilon_total": {c: prev[c] for c in charged}}
            del rnd["epsilon_charged"]
            if lie and lie[0] == "server" and lie[1] == r:
                rnd["epsilon_total"]["alice"] = lie[3]
        server.append("round", rnd)
    server.close()
    for lg in logs.values():
        lg.close()
    summaries = {c: led.summary() for c, led in ledgers.items()}
    histories = {c: led.history(unit="client") for c, led in ledgers.items()}
    for led in ledgers.values():
        led.close()
    paths = [tmp_path / "server.jsonl"] + [tmp_path / f"{c}.jsonl" for c in logs]
    return paths, {c: tmp_path / f"{c}.ledger.sqlite" for c in budgets}, summaries, histories


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    return d, _run(d, training=True)


def _copy(base, tmp_path):
    import shutil

    d, (logs, ledgers, summaries, histories) = base
    shutil.copytree(d, tmp_path / "run")
    return ([tmp_path / "run" / p.name for p in logs], {c: tmp_path / "run" / p.name for c, p in ledgers.items()},
            summaries, histories)


def _keys():
    return {**{a: k.public_key() for a, k in KEYS.items()},
            **{f"client:{a}": k.public_key() for a, k in KEYS.items() if a != "server"}}


def test_report_eps_equals_ledger_and_writes_all_formats(base_run, tmp_path):
    logs, ledgers, summaries, histories = _copy(base_run, tmp_path)
    rep = build_report(logs=logs, ledgers=ledgers, out_dir=tmp_path / "out", public_keys=_keys())
    assert rep["ok"], rep["errors"]
    for c in ("alice", "bob"):
        cl = rep["clients"][c]
        assert cl["epsilon_final_ledger"] == pytest.approx(summaries[c]["client"]["epsilon"], rel=1e-12)
        assert cl["epsilon_final_log"] == pytest.approx(summaries[c]["client"]["epsilon"], rel=1e-12)
        assert [r["eps_ledger"] for r in cl["timeline"]] == [h["epsilon_after"] for h in histories[c]]
        assert [r["eps_log"] for r in cl["timeline"]] == [h["epsilon_after"] for h in histories[c]]
        assert all(r["charged_server_log"] == pytest.approx(r["charged_client_log"]) for r in cl["timeline"])
    # bob's budget of 0.7 refused some rounds: those are refusals, not participation
    bob = rep["clients"]["bob"]
    assert 0 < bob["n_rounds_participated"] < 4 and len(bob["refusals"]) == 4 - bob["n_rounds_participated"]
    assert bob["epsilon_final_ledger"] <= 0.7
    assert rep["clients"]["alice"]["n_rounds_participated"] == 4 and rep["clients"]["alice"]["modes"] == {"dp": 4}
    assert rep["clients"]["alice"]["example_level"][0]["mechanism"] == "dpsgd"
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["ok"] is True
    md = (out / "report.md").read_text()
    assert "PASS" in md and "round-3" in md and "alice" in md
    assert "<table>" in (out / "report.html").read_text()
    for png in rep["plots"]:
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 100


@pytest.mark.parametrize("lie", [("alice", 2, "epsilon_total", 0.01), ("bob", 0, "epsilon_charged", 0.0)])
def test_log_ledger_disagreement_is_an_error(tmp_path, lie):
    logs, ledgers, _, _ = _run(tmp_path, lie=lie)
    rep = build_report(logs=logs, ledgers=ledgers, out_dir=tmp_path / "out", public_keys=_keys(), plots=False)
    assert not rep["ok"]
    assert any(f"client {lie[0]}, round round-{lie[1]}" in e for e in rep["errors"]), rep["errors"]
    assert "FAIL" in (tmp_path / "out" / "report.md").read_text()


def test_unlogged_ledger_charge_and_server_only_logs(tmp_path):
    logs, ledgers, _, _ = _run(tmp_path, client_logs=False)
    rep = build_report(logs=logs, ledgers=ledgers, out_dir=tmp_path / "a", public_keys=_keys(), plots=False)
    assert rep["ok"], rep["errors"]  # ledger ε increases equal the server-logged charges
    with PrivacyLedger(ledgers["alice"]) as led:  # a release nobody logged
        led.charge_release(round_id="hidden", noise_multiplier=40.0, count=16)
    rep = build_report(logs=logs, ledgers=ledgers, out_dir=tmp_path / "b", public_keys=_keys(), plots=False)
    assert not rep["ok"] and any("hidden" in e and "no audit log" in e for e in rep["errors"]), rep["errors"]


def test_report_cli_exit_codes_and_tampered_log(base_run, tmp_path, capsys):
    logs, ledgers, _, _ = _copy(base_run, tmp_path)
    pems = []
    for a, k in KEYS.items():
        p = tmp_path / f"{a}.pub.pem"
        p.write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
        pems += ["--public-key", f"{a}={p}"]
    argv = ["audit", "report", "--no-plots", "--out", str(tmp_path / "out")] + [x for p in logs for x in ("--log", str(p))] + \
        [x for c, p in ledgers.items() for x in ("--ledger", f"{c}={p}")]
    assert audit_cli.main(argv + pems) == 0
    assert "PASS" in capsys.readouterr().out
    assert audit_cli.main(argv) == 2  # no pinned key and no --trust-embedded-key
    assert "--public-key" in capsys.readouterr().err
    assert audit_cli.main(argv + ["--trust-embedded-key", "--ledger", "carol"]) == 2
    # tamper with the server's log: drop one round entry
    lines = logs[0].read_bytes().splitlines(keepends=True)
    logs[0].write_bytes(b"".join(lines[:3] + lines[4:]))
    assert audit_cli.main(argv + pems) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "fails verification at seq 3" in out


@pytest.mark.parametrize("client_logs", [True, False])
def test_server_epsilon_totals_and_responders(tmp_path, client_logs):
    logs, ledgers, summaries, _ = _run(tmp_path, server_totals=True, client_logs=client_logs)
    rep = build_report(logs=logs, ledgers=ledgers, out_dir=tmp_path / "a", public_keys=_keys(), plots=False)
    assert rep["ok"], rep["errors"]
    bob = rep["clients"]["bob"]  # invited to every round, answered only until its budget ran out
    assert bob["n_rounds_participated"] == sum(r["eps_server_log"] is not None for r in bob["timeline"]) < 4
    assert rep["clients"]["alice"]["timeline"][-1]["eps_server_log"] == \
        pytest.approx(summaries["alice"]["client"]["epsilon"], rel=1e-12)
    logs, ledgers, _, _ = _run(tmp_path / "lie", server_totals=True, client_logs=client_logs,
                               lie=("server", 1, "epsilon_total", 0.001))
    rep = build_report(logs=logs, ledgers=ledgers, out_dir=tmp_path / "b", public_keys=_keys(), plots=False)
    assert not rep["ok"] and any("round-1" in e and "server-logged ε_total" in e for e in rep["errors"])
