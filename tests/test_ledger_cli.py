"""``mor-client budget`` prints each figure with its unit, the remaining budget, previews and refusals."""

import argparse
import json

from mor_client import budget_cli
from privacy.ledger import PrivacyLedger


def _parse(argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    budget_cli.register(sub)
    return p.parse_args(["budget", *argv])


def test_budget_cli_prints_units_and_refusal_preview(tmp_path, capsys):
    db = tmp_path / "l.db"
    L = PrivacyLedger(db, client_level_budget=2.0)
    L.record_training(model_id="rm", noise_multiplier=1.0, sample_rate=0.02, steps=200, delta=1e-5)
    L.charge_release(round_id="round-1", noise_multiplier=3.0)
    L.close()
    args = _parse(["--ledger", str(db), "--history", "--preview", "1.0"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "(unit: client)" in out and "(unit: pair)" in out and "never added" in out
    assert "remaining" in out and "round-1" in out and "WOULD BE REFUSED" in out
    args = _parse(["--ledger", str(db), "--json"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["client"]["budget"] == 2.0 and data["summary"]["client"]["n_releases"] == 1


def test_budget_cli_missing_ledger_is_a_one_line_error(tmp_path, capsys):
    from mor_client.cli import main

    assert main(["budget", "--ledger", str(tmp_path / "nope.db")]) == 2
    err = capsys.readouterr().err
    assert "--ledger" in err and "nope.db: no such file" in err and len(err.strip().splitlines()) == 1


def test_auditing_a_read_only_ledger_copy_changes_nothing(tmp_path):
    """A privacy officer audits a copy they may not write: `mor-client budget` and the audit report open it read-only,
    report at the ledger's own stored delta, and leave the file byte-identical."""
    import hashlib
    import os
    import stat

    import pytest

    from privacy.ledger import LedgerError

    path = tmp_path / "copy" / "ledger.sqlite"
    with PrivacyLedger(path, client_level_budget=5.0, delta=1e-6) as L:
        L.charge_release(round_id="r1", noise_multiplier=4.0)
        eps = L.epsilon("client")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    os.chmod(path, stat.S_IRUSR)
    os.chmod(path.parent, stat.S_IRUSR | stat.S_IXUSR)
    try:
        args = _parse(["--ledger", str(path), "--json"])
        assert args.func(args) == 0
        with PrivacyLedger(path, read_only=True) as R:
            assert R.delta == 1e-6 and R.budget == 5.0 and R.epsilon("client") == eps
            with pytest.raises(LedgerError, match="read-only"):
                R.charge_release(round_id="r2", noise_multiplier=4.0)
    finally:
        os.chmod(path.parent, stat.S_IRWXU)
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
