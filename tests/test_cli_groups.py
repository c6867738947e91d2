"""One `mor` command with groups (server, client, pki, audit, demo, align); `mor-server` / `mor-client` as aliases;
consistent flag names; `-v` after the sub-command; SIGTERM honoured while a server waits for clients."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mor_client import cli as client_cli
from mor_server.apps import cli as server_cli
from mor_server.apps.procs import ClientProcess, mor_client_argv, stop_all

ROOT = Path(__file__).resolve().parent.parent
MOR = [sys.executable, "-m", "mor.entry"]  # the `mor` console script, without needing it on PATH
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def _options(p: argparse.ArgumentParser) -> dict:
    return {a.dest: (tuple(a.option_strings), a.default, a.help) for a in p._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))}


def _sub(p: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return p


def test_mor_has_every_group_and_the_old_commands_are_aliases():
    mor = server_cli.build_mor_parser()
    groups = set(next(a for a in mor._actions if isinstance(a, argparse._SubParsersAction)).choices)
    assert {"server", "client", "pki", "audit", "demo", "align"} <= groups
    old_server, old_client = server_cli.build_server_parser(), client_cli.build_parser()
    for path in (("serve",), ("pki", "init"), ("pki", "issue-client"), ("pki", "sign-csr"), ("pki", "renew"),
                 ("pki", "membership", "roster")):
        assert _options(_sub(mor, "server", *path)) == _options(_sub(old_server, *path)), path
    for path in (("pki", "revoke"), ("pki", "membership", "enrol")):
        assert _options(_sub(mor, *path)) == _options(_sub(old_server, *path)), path
    for cmd in ("join", "keygen", "train", "card", "budget"):
        assert _options(_sub(mor, "client", cmd)) == _options(_sub(old_client, cmd)), cmd


def test_folder_flags_are_consistent():
    """The PKI folder is --pki wherever a command reads or writes it (--dir still accepted), the membership
    authority's folder --membership, a run's folder --workdir (--work-dir accepted)."""
    mor = server_cli.build_mor_parser()
    for path in (("pki", "init"), ("pki", "issue-client"), ("pki", "revoke"), ("pki", "crl-refresh"),
                 ("pki", "sign-csr"), ("pki", "renew"), ("pki", "renew-server"), ("server", "serve"),
                 ("align",)):
        assert "--pki" in [s for a in _sub(mor, *path)._actions for s in a.option_strings], path
    for path in (("pki", "membership", "init"), ("pki", "membership", "enrol"), ("pki", "membership", "roster")):
        assert "--membership" in [s for a in _sub(mor, *path)._actions for s in a.option_strings], path
    for path in (("demo",), ("align",)):
        assert "--workdir" in [s for a in _sub(mor, *path)._actions for s in a.option_strings], path
    a = mor.parse_args(["pki", "revoke", "alice", "--dir", "old"])
    b = mor.parse_args(["pki", "revoke", "alice", "--pki", "old"])
    assert a.dir == b.dir == Path("old")


def test_verbose_is_accepted_after_the_subcommand(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.db").write_bytes(b"")
    mor = server_cli.build_mor_parser()
    assert mor.parse_args(["client", "budget", "--ledger", "x.db", "-v"]).verbose is True
    assert mor.parse_args(["-v", "client", "budget", "--ledger", "x.db"]).verbose is True  # not reset by the sub
    assert mor.parse_args(["client", "budget", "--ledger", "x.db"]).verbose is False
    assert mor.parse_args(["pki", "membership", "roster", "--verbose"]).verbose is True
    assert client_cli.build_parser().parse_args(["join", "--server", "h:1", "-v"]).verbose is True
    assert server_cli.build_server_parser().parse_args(["serve", "-v"]).verbose is True


def test_mor_pki_and_client_commands_run(tmp_path, capsys):
    pki = tmp_path / "pki"
    assert server_cli.mor_main(["pki", "init", "--pki", str(pki)]) == 0
    assert server_cli.mor_main(["server", "pki", "issue-client", "alice", "--pki", str(pki)]) == 0
    assert server_cli.server_main(["pki", "issue-client", "bob", "--dir", str(pki)]) == 0  # the old spelling
    assert (pki / "clients" / "alice" / "tls.crt").is_file() and (pki / "clients" / "bob" / "tls.crt").is_file()
    assert server_cli.mor_main(["client", "keygen", "--out", str(tmp_path / "inst"), "--name", "carol"]) == 0
    assert (tmp_path / "inst" / "tls.csr").is_file()
    capsys.readouterr()
    # a client error through `mor client` is one line naming the flag, like through mor-client
    rc = server_cli.mor_main(["client", "join", "--server", "localhost:9", "--scorer", "fedutil:LengthScorer"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--creds" in err[0], err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 60.0) -> list[str]:
    seen, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} not printed; got {seen}")


@pytest.mark.parametrize("argv", [
    ["server", "serve", "--insecure", "--rounds", "1", "--min-clients", "2"],  # waiting for clients (was ignored)
    ["server", "serve", "--insecure"],  # idle serving
])
def test_sigterm_stops_serve_at_every_stage(argv):
    port = _free_port()
    p = subprocess.Popen([*MOR, *argv, "--port", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_line(p, "listening on")
        time.sleep(0.5)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    lines = [ln for ln in err.splitlines() if ln.strip() and "INSECURE MODE" not in ln]  # --insecure's warning
    assert "Traceback" not in err and len(lines) == 1 and "SIGTERM" in lines[0], err
    assert took < 15, took
    assert p.returncode == (128 + signal.SIGTERM if "--rounds" in argv else 0), (p.returncode, err)


def test_serve_rounds_in_secagg_mode(tmp_path):
    """`mor server serve --mode secagg --rounds N`: equal weights, the server sees only the sum."""
    pki = tmp_path / "pki"
    names = ("alice", "bob", "carol")
    assert server_cli.mor_main(["pki", "init", "--pki", str(pki)]) == 0
    for n in names:
        assert server_cli.mor_main(["pki", "issue-client", n, "--pki", str(pki)]) == 0
    port = _free_port()
    server = subprocess.Popen([*MOR, "server", "serve", "--pki", str(pki), "--port", str(port),
                               "--rounds", "2", "--items", "8", "--min-clients", "3", "--mode", "secagg",
                               "--exit-after-rounds"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=ENV)
    procs = [ClientProcess(n, mor_client_argv("join", "--server", f"localhost:{port}", "--creds",
                                              str(pki / "clients" / n), "--scorer", "fedutil:LengthScorer",
                                              "--modes", "secagg"),
                           tmp_path / f"{n}.log", env={"PYTHONPATH": str(ROOT / "tests")}).start() for n in names]
    try:
        out, _ = server.communicate(timeout=180)
    finally:
        stop_all(procs)
    assert server.returncode == 0, out
    rounds = [ln for ln in out.splitlines() if ln.startswith("round ")]
    assert len(rounds) == 2 and all("completed" in ln for ln in rounds), out
    assert "clients online (secagg): alice, bob, carol" in out, out


def test_serve_secagg_needs_two_clients(capsys):
    rc = server_cli.mor_main(["server", "serve", "--insecure", "--rounds", "1", "--mode", "secagg",
                              "--min-clients", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--min-clients" in err[0], err


def test_align_flags_are_checked_before_work(tmp_path, capsys):
    cases = [(["align", "--adapter", str(tmp_path)], "--adapter"),
             (["align", "--models", str(tmp_path)], "--models"),
             (["align", "--serve", "--pki", str(tmp_path)], "--pki"),
             (["align", "--serve", "--mode", "secagg", "--min-clients", "1", "--pki", str(tmp_path)], "--mode"),
             (["align", "--serve", "--models", str(tmp_path)], "--models"),
             (["align", "--steps", "0"], "--steps"),
             (["align", "--warm-start", "synthetic+sft", "--preset", "small"], "--warm-start"),
             (["align", "--routing", "mixture"], "--routing"),
             (["align", "--sft-batches", "shuffled"], "--sft-batches"),
             (["align", "--router-rank-weight", "-1"], "--router-rank-weight"),
             (["align", "--freeze", "head"], "--freeze")]
    for argv, field in cases:
        rc = server_cli.mor_main([*argv, "--workdir", str(tmp_path / "w")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and field in err[0] and "Traceback" not in err[0], (argv, err)


def test_align_routing_and_warm_start_reach_the_engine(tmp_path):
    """`mor align --routing uniform` runs the reward ablation without a router and `--warm-start synthetic+sft` the
    seeing policy's public stage 1: both must reach the AlignmentConfig the engine runs, seeded with the run."""
    from mor_server.apps.align_cli import _config

    parser = server_cli.build_mor_parser()
    args = parser.parse_args(["align", "--routing", "uniform", "--warm-start", "synthetic+sft", "--seed", "3",
                              "--workdir", str(tmp_path)])
    cfg = _config(args, "k")
    assert cfg.routing == "uniform" and cfg.router_rank_weight == 1.0
    assert _config(parser.parse_args(["align", "--router-rank-weight", "0", "--workdir", str(tmp_path)]),
                   "k").router_rank_weight == 0.0  # the likelihood-only router of the ablation
    assert cfg.router_abstain_z == 2.0 and _config(parser.parse_args(
        ["align", "--no-router-abstain", "--workdir", str(tmp_path)]), "k").router_abstain_z is None
    assert _config(parser.parse_args(["align", "--router-abstain-z", "3", "--workdir", str(tmp_path)]),
                   "k").router_abstain_z == 3.0
    assert cfg.tiny.patch_size == 8 and cfg.tiny.seed == 3
    assert cfg.pretrain is not None and cfg.pretrain.vision_steps > 0 and cfg.pretrain.caption_steps > 0
    assert cfg.pretrain.seed == 3
    plain = _config(parser.parse_args(["align", "--warm-start", "sft", "--workdir", str(tmp_path)]), "k")
    assert plain.routing == "learned" and plain.pretrain is None and plain.tiny.patch_size == 16
    # no --warm-start: the policy that sees (recipes.DEFAULT_WARM_START), its short stage 1 and 150 GRPO steps
    default = _config(parser.parse_args(["align", "--workdir", str(tmp_path)]), "k")
    assert default.pretrain.yesno_curriculum == "vqa=1000,negation=300" and default.sft.steps == 0
    assert (default.tiny.patch_size, default.tiny.vision_layers, default.grpo.max_steps) == (8, 3, 150)
    assert default.grpo.freeze == "vision" and default.pretrain.curriculum_schedule == "cosine"
    for flag, frozen in (("none", ""), ("embeddings,vision", "embeddings,vision")):
        assert _config(parser.parse_args(["align", "--freeze", flag, "--workdir", str(tmp_path)]),
                       "k").grpo.freeze == frozen
    assert _config(parser.parse_args(["align", "--steps", "40", "--workdir", str(tmp_path)]), "k").grpo.max_steps == 40
    compact = _config(parser.parse_args(["align", "--warm-start", "compact+synthetic+sft", "--seed", "2",
                                         "--workdir", str(tmp_path)]), "k")
    assert (compact.tiny.text_hidden, compact.tiny.text_layers, compact.tiny.patch_size, compact.tiny.seed) == (128, 3, 8, 2)
    assert compact.pretrain is not None and compact.pretrain.caption_steps > 0 and compact.pretrain.seed == 2
    # the compact recipe's reference SFT is type-balanced (the proportional one answered colour and shape "yes")
    assert compact.sft.balance_types and compact.sft.steps == 50 and not plain.sft.balance_types
    sft300 = _config(parser.parse_args(["align", "--warm-start", "compact+synthetic+sft", "--sft-steps", "300",
                                        "--workdir", str(tmp_path)]), "k")
    assert sft300.sft.balance_types and sft300.sft.steps == 300
    # the best measured pipeline: the server's labels for 300 proportional steps, then MoR
    best = _config(parser.parse_args(["align", "--warm-start", "compact+synthetic+sft", "--sft-steps", "300",
                                      "--sft-batches", "proportional", "--workdir", str(tmp_path)]), "k")
    assert not best.sft.balance_types and best.sft.steps == 300
    byo = _config(parser.parse_args(["align", "--preset", "small", "--sft-batches", "balanced",
                                     "--workdir", str(tmp_path)]), "k")
    assert byo.sft.balance_types
    # compact+synthvqa: public synthetic VQA in stage 1, no SFT on the public split, GRPO at temperature 1.5 unless
    # --temperature says otherwise
    vqa = _config(parser.parse_args(["align", "--warm-start", "compact+synthvqa", "--workdir", str(tmp_path)]), "k")
    assert vqa.sft.steps == 0 and vqa.pretrain.yesno_curriculum == "vqa=2000" and vqa.grpo.temperature == 1.5
    assert plain.grpo.temperature == compact.grpo.temperature == 1.0
    hot = _config(parser.parse_args(["align", "--warm-start", "compact+synthvqa", "--temperature", "1.1",
                                     "--sft-steps", "20", "--workdir", str(tmp_path)]), "k")
    assert hot.grpo.temperature == 1.1 and hot.sft.steps == 20


def test_sigterm_while_align_waits_for_clients(tmp_path):
    pki = tmp_path / "pki"
    assert server_cli.mor_main(["pki", "init", "--pki", str(pki)]) == 0
    p = subprocess.Popen([*MOR, "align", "--serve", "--pki", str(pki), "--port",
                          str(_free_port()), "--workdir", str(tmp_path / "w"), "--mode", "plain"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_line(p, "waiting up to")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert lines[-1].startswith("mor align: interrupted by SIGTERM"), err


@pytest.mark.slow
def test_align_serve_with_two_clients(tmp_path):
    """The deployment's server side: `mor align --serve` aligns on the rewards of clients that joined."""
    pki = tmp_path / "pki"
    assert server_cli.mor_main(["pki", "init", "--pki", str(pki)]) == 0
    for n in ("alice", "bob"):
        assert server_cli.mor_main(["pki", "issue-client", n, "--pki", str(pki)]) == 0
    port = _free_port()
    work = tmp_path / "w"
    p = subprocess.Popen([*MOR, "align", "--serve", "--pki", str(pki), "--port",
                          str(port), "--workdir", str(work), "--mode", "plain", "--min-clients", "2", "--steps", "2",
                          "--warm-start", "sft", "--sft-steps", "2", "--eval-size", "16",
                          "--w-format", "0",  # 0: every completion scored
                          # the toy LengthScorer ranks answers at chance, so the router would (rightly) abstain on
                          # every type and run no GRPO round; this test is about the rounds
                          "--no-router-abstain"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    procs = [ClientProcess(n, mor_client_argv("join", "--server", f"localhost:{port}", "--creds",
                                              str(pki / "clients" / n), "--scorer", "fedutil:LengthScorer"),
                           tmp_path / f"{n}.log", env={"PYTHONPATH": str(ROOT / "tests")}).start()
             for n in ("alice", "bob")]
    try:
        out, _ = p.communicate(timeout=280)
    finally:
        stop_all(procs)
    assert p.returncode == 0, out[-3000:]
    assert "clients online: alice, bob" in out and "accuracy " in out, out[-3000:]
    import json

    rep = json.loads((work / "report" / "report.json").read_text())
    # the calibration round and GRPO's reward round(s) (one per generation batch) came from the two clients
    assert rep["rounds"]["ok"] >= 2 and rep["rounds"]["unscored_completions"] == 0, rep["rounds"]
    # the rounds are in the server's signed audit log, which verifies
    assert server_cli.mor_main(["audit", "verify", str(work / "server-audit.jsonl"), "--trust-embedded-key"]) == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_in_dp_mode(tmp_path):
    """`mor demo --mode dp`: every GRPO reward round is a dp round; each client noises its own scores and charges
    its ledger (a Gaussian release per round), and the run completes."""
    import json
    import sqlite3

    work = tmp_path / "demo"
    cfg = {"seed": 0, "calibration_mode": "plain", "w_format": 0.0, "client_budget": 1000, "dp_noise_multiplier": 4.0,
           "warm_start": "sft",
           "clients": [{"name": "a-color", "arch": "cnn", "partition": "client0", "max_pairs": 48, "epochs": 1,
                        "pretrain_epochs": 0},
                       {"name": "b-shape", "arch": "cnn", "partition": "client1", "max_pairs": 48, "epochs": 1,
                        "pretrain_epochs": 0}],
           "grpo": {"max_steps": 2, "prompts_per_step": 2, "num_generations": 2},
           # 48 pairs, one epoch: clients that rank at chance, which the router would (rightly) abstain on, leaving
           # no GRPO round; this test is about the dp rounds
           "alignment": {"eval_size": 12, "curve_size": 0, "sft_steps": 2, "router_steps": 20, "heldout_pairs": 0,
                         "router_abstain_z": None}}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    r = subprocess.run([*MOR, "demo", "--config", str(tmp_path / "run.json"), "--mode", "dp", "--workdir", str(work)],
                       capture_output=True, text=True, timeout=580,
                       env={**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads((work / "report" / "demo.json").read_text())
    assert report["config"]["mode"] == "dp" and report["federation"]["rounds_completed"] >= 2
    for name in ("a-color", "b-shape"):
        with sqlite3.connect(work / "clients" / name / "ledger.sqlite") as db:
            rows = list(db.execute("SELECT round_id, mechanism FROM entries WHERE kind = 'release'"))
        rounds = [r[0] for r in rows]
        # one Gaussian release per GRPO reward round (dp mode: the client noised its own scores), no round twice
        assert len(rounds) >= 1 and len(set(rounds)) == len(rounds), (name, rows)
        assert {r[1] for r in rows} == {"gaussian"}, (name, rows)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_second_demo_in_the_same_workdir_is_not_refused_by_the_clients_query_audit(tmp_path):
    """A completed `mor demo` rerun in its work dir starts GRPO over with the cached reward models and reference, so
    the clients are asked to sum the same items again. They allow that only with bit-identical weights (anything
    else could difference out one client's score). The router used to be fitted with its clients in the order their
    reports arrived, and on the rerun every secagg round was refused (12 of 13 failed here before the fix)."""
    import json

    cfg = {"seed": 0, "mode": "secagg", "warm_start": "sft", "w_format": 0.0,
           "clients": [{"name": n, "arch": "cnn", "partition": f"client{i}", "max_pairs": 48, "epochs": 1,
                        "pretrain_epochs": 0} for i, n in enumerate(("a-color", "b-shape", "c-yesno"))],
           "grpo": {"max_steps": 6, "save_steps": 2, "prompts_per_step": 2, "num_generations": 2},
           # toy clients rank at chance; without this the router abstains on every type and no round is repeated
           "alignment": {"eval_size": 12, "curve_size": 0, "sft_steps": 2, "router_steps": 20, "heldout_pairs": 0,
                         "router_abstain_z": None}}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    work = tmp_path / "demo"
    reports = []
    for _ in range(2):
        r = subprocess.run([*MOR, "demo", "--config", str(tmp_path / "run.json"), "--workdir", str(work)],
                           capture_output=True, text=True, timeout=280,
                           env={**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        reports.append(json.loads((work / "report" / "demo.json").read_text()))
    first, second = (rep["federation"] for rep in reports)
    assert first["rounds_failed"] == 0 and first["rounds_completed"] >= 7, first
    assert second["rounds_failed"] == 0 and second["rounds_completed"] == first["rounds_completed"], second
    assert reports[1]["alignment"]["accuracy_after"] == reports[0]["alignment"]["accuracy_after"]


#: value-taking flags that are free text by design (anything is a valid value)
FREE_TEXT = {"--scorer",  # resolved and checked by scorer_from_spec (tests/test_sdk.py)
             "--federation", "--model-id",  # labels written into a roster / the ledger
             "--name"}  # only in `pki membership init`: the membership CA's display name


def test_every_value_flag_is_validated():
    """Every flag or argument taking a value has a type or a choices list that argparse checks before any work
    starts (free-text flags are listed above); a client name is checked against the PKI's rule at parse time."""
    mor = server_cli.build_mor_parser()
    unchecked = []

    def walk(p, path=()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, (*path, name))
            elif a.nargs != 0 and a.type is None and a.choices is None and not isinstance(a, argparse._HelpAction):
                flag = a.option_strings[0] if a.option_strings else a.dest
                if flag not in FREE_TEXT or (flag == "--name" and path[-2:] != ("membership", "init")):
                    unchecked.append(" ".join((*path, flag)))

    walk(mor)
    assert not unchecked, f"flags taking a value with no validation: {unchecked}"
    with pytest.raises(SystemExit):
        mor.parse_args(["pki", "issue-client", "no spaces"])
    with pytest.raises(SystemExit):
        mor.parse_args(["client", "keygen", "--out", "x", "--name", "-bad/"])


def test_training_rounds_need_a_client_side_epsilon_ceiling(tmp_path, capsys):
    """Fail closed: a client that opts into the baselines' training rounds must say how much example-level epsilon
    they may spend; without it the server's announcement (or a non-private round) would be the only limit."""
    policy = tmp_path / "policy"
    policy.mkdir()
    argv = ["client", "join", "--insecure", "--server", "localhost:9", "--scorer", "mor_client.training:NoScorer",
            "--train-policy", str(policy), "--max-attempts", "1"]
    rc = server_cli.mor_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--train-max-epsilon" in err[0], err
    ns = server_cli.build_mor_parser().parse_args([*argv, "--train-max-epsilon", "inf"])
    assert ns.train_max_epsilon == float("inf")
