"""Every CLI validates its input before any work starts: one line naming the field and the fix, exit code 2, never
a traceback; SIGINT ends with one line and exit code 130; every flag has help text and shows its default.

The CLIs are run in-process through their ``main(argv)`` functions. Where a missing check would let real work
start (training, the demo, a server), that work is replaced by a tripwire so that the test fails fast instead.
"""

from __future__ import annotations

import argparse
import json
import sqlite3

import pytest

from mor_client import cli as client_cli
from mor_server.apps import audit_cli
from mor_server.apps import cli as server_cli


class WorkStarted(BaseException):
    """Raised by a tripwire: the CLI started work that validation should have refused."""


def _trip(*a, **k):
    raise WorkStarted("validation let this run start")


def call(main, argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse exits; accept that too, the exit code is what counts
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_usage_error(result, *needles):
    rc, out, err = result
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in out + err, err
    assert rc == 2, (rc, err)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture()
def bad_ledgers(tmp_path):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(bytes(range(256)) * 12)  # not SQLite at all
    wrong = tmp_path / "wrong.db"  # SQLite, but another application's schema
    db = sqlite3.connect(wrong)
    db.execute("CREATE TABLE entries (id INTEGER, foo TEXT)")
    db.commit()
    db.close()
    return corrupt, wrong


# ----------------------------------------------------------------------------------------------- ledgers


@pytest.mark.parametrize("which", [0, 1])
def test_budget_cli_corrupt_or_foreign_ledger_names_the_file(bad_ledgers, capsys, which):
    path = bad_ledgers[which]
    line = assert_usage_error(call(client_cli.main, ["budget", "--ledger", str(path)], capsys), path.name)
    assert "ledger" in line


@pytest.mark.parametrize("which", [0, 1])
def test_join_with_corrupt_ledger_names_the_file(bad_ledgers, capsys, which):
    path = bad_ledgers[which]
    argv = ["join", "--insecure", "--server", "localhost:9", "--scorer", "fedutil:LengthScorer", "--modes", "plain,dp",
            "--ledger", str(path), "--budget", "3", "--max-attempts", "1"]
    assert_usage_error(call(client_cli.main, argv, capsys), path.name)


@pytest.mark.parametrize("which", [0, 1])
def test_audit_report_with_corrupt_ledger_names_the_file(bad_ledgers, tmp_path, capsys, which):
    path = bad_ledgers[which]
    argv = ["audit", "report", "--ledger", f"alice={path}", "--out", str(tmp_path / "rep"), "--no-plots"]
    assert_usage_error(call(audit_cli.main, argv, capsys), path.name)
    assert_usage_error(call(server_cli.mor_main, argv, capsys), path.name)


def test_a_good_ledger_still_works(tmp_path, capsys):
    from privacy.ledger import PrivacyLedger

    with PrivacyLedger(tmp_path / "ok.db", client_level_budget=2.0) as L:
        L.charge_release(round_id="r1", noise_multiplier=3.0)
    rc, out, err = call(client_cli.main, ["budget", "--ledger", str(tmp_path / "ok.db")], capsys)
    assert rc == 0 and "remaining" in out and not err


# ----------------------------------------------------------------------------------------------- mor-client


@pytest.mark.parametrize("argv,field", [
    (["--budget", "-3"], "--budget"),
    (["--budget", "nan"], "--budget"),
    (["--delta", "2"], "--delta"),
    (["--max-attempts", "0"], "--max-attempts"),
    (["--server", "no-port-here"], "--server"),
    (["--server", "localhost:99999"], "--server"),
    (["--modes", "plain,bogus"], "--modes"),
    (["--model", "/nonexistent/model"], "--model"),
    (["--creds", "/nonexistent/creds"], "--creds"),
])
def test_join_flags_are_validated(monkeypatch, capsys, argv, field):
    from mor_client import client as client_mod

    monkeypatch.setattr(client_mod.FederationClient, "run", _trip)
    base = {"--server": "localhost:9", "--budget": "3", "--max-attempts": "1"}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    full = ["join", "--scorer", "fedutil:LengthScorer"]
    if "--creds" not in base:
        full.append("--insecure")
    if "--model" in base:
        full.remove("--scorer"), full.remove("fedutil:LengthScorer")
    for k, v in base.items():
        full += [k, v]
    assert_usage_error(call(client_cli.main, full, capsys), field)


@pytest.mark.parametrize("argv,field", [
    (["--preview", "-1"], "--preview"),
    (["--count", "0"], "--count"),
    (["--delta", "0"], "--delta"),
])
def test_budget_flags_are_validated(tmp_path, capsys, argv, field):
    from privacy.ledger import PrivacyLedger

    PrivacyLedger(tmp_path / "l.db").close()
    assert_usage_error(call(client_cli.main, ["budget", "--ledger", str(tmp_path / "l.db"), *argv], capsys), field)


def test_budget_ledger_that_is_a_directory(tmp_path, capsys):
    assert_usage_error(call(client_cli.main, ["budget", "--ledger", str(tmp_path)], capsys), "--ledger")


@pytest.mark.parametrize("argv,field", [
    (["--epochs", "-1"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--n-clients", "0"], "--n-clients"),
    (["--flip-fraction", "2"], "--flip-fraction"),
    (["--arch", "nope"], "--arch"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--delta", "1.5"], "--delta"),
    (["--device", "toaster"], "--device"),
    (["--partition", "hospital"], "--partition"),
])
def test_train_flags_are_validated(monkeypatch, tmp_path, capsys, argv, field):
    import mor_client.rewards as rewards

    monkeypatch.setattr(rewards, "train_reward_model", _trip)
    assert_usage_error(call(client_cli.main, ["train", "--out", str(tmp_path / "m"), *argv], capsys), field)


def test_train_can_flip_every_pair(monkeypatch, tmp_path):
    """``--flip-fraction 1`` (an adversarial annotator: every preference inverted; the baselines' ``flipped``
    client) is accepted, and every pair the reward model is trained on is flipped."""
    import mor_client.rewards as rewards

    seen = {}

    def grab(train, heldout, cfg, **kw):
        seen["train"] = train
        raise WorkStarted("training reached")

    monkeypatch.setattr(rewards, "train_reward_model", grab)
    with pytest.raises(WorkStarted):
        client_cli.main(["train", "--out", str(tmp_path / "m"), "--partition", "client2", "--flip-fraction", "1",
                         "--quiet"])
    assert seen["train"] and all(p.flipped for p in seen["train"])


def test_train_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert_usage_error(call(client_cli.main, ["train", "--out", str(f)], capsys), "--out")


def test_corrupt_card_names_its_file(tmp_path, capsys):
    m = tmp_path / "model"
    m.mkdir()
    (m / "card.json").write_text('{"architecture": "cnn", ')
    line = assert_usage_error(call(client_cli.main, ["card", str(m)], capsys), str(m / "card.json"))
    assert "JSON" in line
    (m / "card.json").write_text("[1, 2]")
    assert_usage_error(call(client_cli.main, ["card", str(m)], capsys), str(m / "card.json"))
    argv = ["join", "--insecure", "--server", "localhost:9", "--model", str(m), "--max-attempts", "1"]
    assert_usage_error(call(client_cli.main, argv, capsys), str(m / "card.json"))


# ----------------------------------------------------------------------------------------------- mor-server


@pytest.mark.parametrize("argv,field", [
    (["serve", "--host", "999.1.1.1"], "--host"),
    (["serve", "--host", "bad host!"], "--host"),
    (["serve", "--max-message-mb", "-1"], "--max-message-mb"),
    (["serve", "--max-message-mb", "5000"], "--max-message-mb"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--metrics-port", "-2"], "--metrics-port"),
    (["serve", "--timeout", "0"], "--timeout"),
    (["serve", "--rounds", "-1"], "--rounds"),
    (["serve", "--items", "0"], "--items"),
    (["serve", "--min-clients", "0"], "--min-clients"),
    (["pki", "issue-client", "x", "--days", "-1"], "--days"),
    (["pki", "init", "--hosts", "localhost,999.1.1.1"], "--hosts"),
])
def test_server_flags_are_validated(monkeypatch, tmp_path, capsys, argv, field):
    from mor_server.federation import server as server_mod
    from privacy import pki

    monkeypatch.setattr(server_mod.FederationServer, "start", _trip)
    monkeypatch.setattr(pki, "init_ca", _trip)
    monkeypatch.setattr(pki, "issue_client", _trip)
    argv = [*argv, "--dir", str(tmp_path)] if argv[0] == "pki" else [*argv, "--insecure"]
    assert_usage_error(call(server_cli.server_main, argv, capsys), field)


def test_server_pki_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert_usage_error(call(server_cli.server_main, ["pki", "init", "--dir", str(f)], capsys), "--dir")


# ----------------------------------------------------------------------------------------------- mor audit


@pytest.fixture()
def signed_log(tmp_path, pki_dir):
    from privacy import pki
    from privacy.audit import AuditLog

    alice = pki.ClientCredentials.from_dir(pki_dir / "clients" / "alice")
    p = tmp_path / "alice.jsonl"
    with AuditLog(p, signing_key=alice.identity_key(), actor="alice") as log:
        log.append("release", {"round_id": "r1", "mode": "dp", "released": 4, "epsilon_charged": 0.3,
                               "epsilon_total": 0.3})
    return p


def test_audit_verify_ca_directory(signed_log, pki_dir, capsys):
    cert = pki_dir / "clients" / "alice" / "identity.crt"
    argv = ["audit", "verify", str(signed_log), "--public-key", str(cert), "--ca", str(pki_dir / "ca")]
    assert_usage_error(call(audit_cli.main, argv, capsys), "--ca")
    assert_usage_error(call(server_cli.mor_main, argv, capsys), "--ca")
    ok = ["audit", "verify", str(signed_log), "--public-key", str(cert), "--ca", str(pki_dir / "ca" / "ca.crt")]
    assert call(server_cli.mor_main, ok, capsys)[0] == 0


@pytest.mark.parametrize("extra,field", [
    (["--public-key", "DIR"], "--public-key"),
    (["--trust-embedded-key", "--witness", "x:y"], "--witness"),
    (["--trust-embedded-key", "--witness", "-1:ab"], "--witness"),
    (["--public-key", "GARBAGE", "--ca", "GARBAGE"], "--ca"),
])
def test_audit_verify_flags(signed_log, tmp_path, capsys, extra, field):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem")
    extra = [str(tmp_path) if x == "DIR" else str(garbage) if x == "GARBAGE" else x for x in extra]
    assert_usage_error(call(server_cli.mor_main, ["audit", "verify", str(signed_log), *extra], capsys), field)


def test_audit_verify_log_that_is_a_directory(tmp_path, capsys):
    assert_usage_error(call(server_cli.mor_main, ["audit", "verify", str(tmp_path), "--trust-embedded-key"], capsys),
                       str(tmp_path))


@pytest.mark.parametrize("extra,field", [
    (["--tolerance", "-1"], "--tolerance"),
    (["--ledger", "no-equals-sign"], "--ledger"),
])
def test_audit_report_flags(signed_log, tmp_path, capsys, extra, field):
    argv = ["audit", "report", "--log", str(signed_log), "--trust-embedded-key", "--out", str(tmp_path / "r"),
            "--no-plots", *extra]
    assert_usage_error(call(server_cli.mor_main, argv, capsys), field)


def test_audit_report_out_that_is_a_file(signed_log, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    argv = ["audit", "report", "--log", str(signed_log), "--trust-embedded-key", "--out", str(f), "--no-plots"]
    assert_usage_error(call(server_cli.mor_main, argv, capsys), "--out")


# ----------------------------------------------------------------------------------------------- mor demo


@pytest.fixture()
def no_demo(monkeypatch):
    from mor_server.apps import demo

    monkeypatch.setattr(demo, "run_demo", _trip)
    monkeypatch.setattr(demo, "setup_pki", _trip)
    monkeypatch.setattr(demo, "train_clients", _trip)
    return demo


def _demo(tmp_path, capsys, settings: dict, *flags):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"workdir": str(tmp_path / "w"), **settings}))
    return call(server_cli.mor_main, ["demo", "--config", str(cfg), *flags], capsys)


@pytest.mark.parametrize("settings,field", [
    ({"epsilon": None}, "epsilon"),
    ({"epsilon": "lots"}, "epsilon"),
    ({"epsilon": 0}, "epsilon"),
    ({"clients": "abc"}, "clients"),
    ({"clients": [{"name": "a", "arch": "cnn", "partition": "client0"}, "x"]}, "clients[1]"),
    ({"clients": [{"name": "a", "arch": "nope", "partition": "client0"},
                  {"name": "b", "arch": "cnn", "partition": "client1"}]}, "clients[0].arch"),
    ({"clients": [{"name": "a", "arch": "cnn", "partition": "client7"},
                  {"name": "b", "arch": "cnn", "partition": "client1"}]}, "clients[0].partition"),
    ({"clients": [{"name": "a", "arch": "cnn", "partition": "client0", "epochs": -2},
                  {"name": "b", "arch": "cnn", "partition": "client1"}]}, "clients[0].epochs"),
    ({"clients": [{"name": "a", "arch": "cnn", "partition": "client0", "colour": 1},
                  {"name": "b", "arch": "cnn", "partition": "client1"}]}, "clients[0].colour"),
    ({"client_budget": -5}, "client_budget"),
    ({"dp_noise_multiplier": 0}, "dp_noise_multiplier"),
    ({"round_timeout": -1}, "round_timeout"),
    ({"seed": "abc"}, "seed"),
    ({"seed": -1}, "seed"),
    ({"mode": "nope"}, "mode"),
    ({"w_format": "x"}, "w_format"),
    ({"grpo": "x"}, "grpo"),
    ({"grpo": {"max_steps": -5}}, "grpo.max_steps"),
    ({"grpo": {"learning_rate": "fast"}}, "grpo.learning_rate"),
    ({"grpo": {"no_such_setting": 1}}, "no_such_setting"),
    ({"fresh": "perhaps"}, "fresh"),
])
def test_demo_config_is_validated_before_work(no_demo, tmp_path, capsys, settings, field):
    assert_usage_error(_demo(tmp_path, capsys, settings), field)
    assert not (tmp_path / "w").exists()


def test_demo_workdir_that_is_a_file(no_demo, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for wd in (f, f / "sub"):
        assert_usage_error(_demo(tmp_path, capsys, {"workdir": str(wd)}), "workdir")
        assert_usage_error(call(server_cli.mor_main, ["demo", "--workdir", str(wd)], capsys), "workdir")


@pytest.mark.parametrize("flags,field", [
    (["--steps", "-5"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--seed", "x"], "--seed"),
    (["--config", "DIR"], "--config"),
])
def test_demo_flags_are_validated(no_demo, tmp_path, capsys, flags, field):
    flags = [str(tmp_path) if f == "DIR" else f for f in flags]
    assert_usage_error(call(server_cli.mor_main, ["demo", "--workdir", str(tmp_path / "w"), *flags], capsys), field)


def test_valid_demo_config_reaches_the_run(no_demo, tmp_path, capsys):
    with pytest.raises(WorkStarted):
        _demo(tmp_path, capsys, {"epsilon": "inf", "mode": "plain", "grpo": {"max_steps": 5}}, "--steps", "3")


# ----------------------------------------------------------------------------------------------- SIGINT


def test_keyboard_interrupt_is_one_line_and_130(monkeypatch, tmp_path, capsys, signed_log):
    from privacy import audit, pki
    from privacy.ledger import PrivacyLedger

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    PrivacyLedger(tmp_path / "l.db").close()
    monkeypatch.setattr(PrivacyLedger, "summary", interrupt)
    monkeypatch.setattr(audit, "verify_log", interrupt)
    monkeypatch.setattr(pki, "init_ca", interrupt)
    for main, argv in [(client_cli.main, ["budget", "--ledger", str(tmp_path / "l.db")]),
                       (server_cli.mor_main, ["audit", "verify", str(signed_log), "--trust-embedded-key"]),
                       (audit_cli.main, ["audit", "verify", str(signed_log), "--trust-embedded-key"]),
                       (server_cli.server_main, ["pki", "init", "--dir", str(tmp_path / "pki")])]:
        rc, out, err = call(main, argv, capsys)
        assert rc == 130 and "Traceback" not in err, (argv, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "interrupted" in lines[0], (argv, err)


# ----------------------------------------------------------------------------------------------- help text


def _walk(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _walk(sub, (*path, name))


def _parsers():
    return [("mor-client", client_cli.build_parser()), ("mor-server", server_cli.build_server_parser()),
            ("mor", server_cli.build_mor_parser())]


def test_every_flag_has_help_and_defaults_are_shown():
    missing, no_default = [], []
    for prog, root in _parsers():
        for path, p in _walk(root):
            for a in p._actions:
                if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                where = " ".join((prog, *path, a.option_strings[0] if a.option_strings else a.dest))
                if not (a.help and a.help.strip()):
                    missing.append(where)
            if not isinstance(p.formatter_class, type) or not issubclass(p.formatter_class,
                                                                          argparse.ArgumentDefaultsHelpFormatter):
                no_default.append(" ".join((prog, *path)) + " (formatter)")
    assert not missing, f"flags without help text: {missing}"
    assert not no_default, f"defaults not shown: {no_default}"


def test_help_shows_defaults(capsys):
    rc, out, _ = call(server_cli.server_main, ["serve", "--help"], capsys)
    out = " ".join(out.split())
    assert rc == 0 and "(default: 50051)" in out and "(default: 16.0)" in out and "(default: 0)" in out
    rc, out, _ = call(client_cli.main, ["join", "--help"], capsys)
    out = " ".join(out.split())
    assert rc == 0 and "(default: 1e-05)" in out and "(default: None)" not in out and "(default: False)" not in out


def test_entry_points_catch_ctrl_c_during_start_up(monkeypatch, capsys):
    import importlib

    from mor import entry

    def interrupt(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupt)
    for fn, prog in ((entry.mor, "mor"), (entry.mor_server, "mor-server"), (entry.mor_client, "mor-client")):
        assert fn() == 130
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert lines == [f"{prog}: interrupted"]


def test_real_sigint_ends_with_one_line_and_130(tmp_path, delay=1.5):
    """SIGINT to a real `mor-client train` 1.5 s after its start (importing torch here, or training on a faster
    machine; before mor.entry, an interrupt during the imports printed a traceback): one line, exit 130."""
    import signal
    import subprocess
    import sys
    import time

    code = "import sys; from mor.entry import mor_client; sys.exit(mor_client())"
    # a terminal's Ctrl-C: SIGINT at its default in the child even when this suite runs in the background (a shell
    # starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt)
    p = subprocess.Popen([sys.executable, "-c", code, "train", "--out", str(tmp_path / "m"), "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.strip()][-1:] == ["mor-client: interrupted"], err[-2000:]


def test_mor_without_the_demo_extra(signed_log, tmp_path):
    """A lean install (no pydantic / demo extra): `mor audit verify` works, `mor demo` says which extra to add."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['pydantic'] = None; from mor_server.apps.cli import mor_main; "
            "sys.exit(mor_main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "audit", "verify", str(signed_log), "--trust-embedded-key"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", code, "demo", "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip() == "mor: error: mor demo needs the demo extra (pydantic is not installed): pip install " \
                               "'mor[demo]'"


def test_mor_client_without_the_training_stack(tmp_path):
    """A lean install (no torch/opacus): mor-client --help works; train, card and budget say which extra to add."""
    import subprocess
    import sys

    code = ("import sys; sys.modules.update(torch=None, opacus=None); from mor.entry import mor_client; "
            "sys.exit(mor_client())")
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run = lambda *a: subprocess.run([sys.executable, "-c", code, *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=120, env=env)
    r = run("--help")
    assert r.returncode == 0 and "join" in r.stdout, r.stderr[-2000:]
    db = tmp_path / "l.db"
    db.write_bytes(b"")
    for argv, extra in ((["train", "--out", str(tmp_path / "m")], "train"), (["card", str(tmp_path)], "train"),
                        (["budget", "--ledger", str(db)], "dp")):
        r = run(*argv)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (argv, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pip install 'mor[{extra}]'" in lines[0], (argv, r.stderr)
    r = run("join", "--insecure", "--server", "localhost:9", "--scorer", "fedutil:LengthScorer", "--modes", "dp",
            "--ledger", str(db), "--max-attempts", "1")  # the ledger's accounting needs opacus
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert "opacus is not installed" in lines[0], lines
