"""The lean SDK: what `pip install mor` pulls, what importing the SDK loads, the README example run verbatim,
``--scorer`` resolution and the scorer's return-shape check."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "trl", "opacus", "peft", "datasets", "accelerate", "matplotlib", "easy_vqa")


def test_importing_the_sdk_and_server_loads_no_training_stack():
    code = ("import sys, mor_client, mor_client.client, mor_client.secagg_session, privacy.pki, privacy.membership, "
            "privacy.audit, mor_server.federation.server\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()


def test_base_install_has_no_torch_ecosystem_and_dev_pulls_every_extra():
    proj = _pyproject()
    base = {_name(r) for r in proj["dependencies"]}
    assert not base & {"torch", "transformers", "trl", "opacus", "peft", "datasets", "accelerate", "easy-vqa",
                       "matplotlib", "grpcio-tools"}, base
    extras = proj["optional-dependencies"]
    assert "torch==2.13.0" in extras["dp"]
    assert any(r.startswith("mor[all") for r in extras["dev"])
    assert any(_name(r) == "grpcio-tools" for r in extras["dev"])
    listed = set(re.findall(r"mor\[([^\]]+)\]", " ".join(extras["all"]))[0].split(","))
    assert listed >= {"dp", "train", "align", "demo"}
    assert "pip install -q -e \".[dev]\"" in (ROOT / "Makefile").read_text()


def test_pins_match_the_generated_stubs():
    """The stubs refuse older runtimes (their headers say which); pyproject must not allow those."""
    from packaging.specifiers import SpecifierSet

    pb2 = (ROOT / "mor/v1/federation_pb2.py").read_text()
    grpc_stub = (ROOT / "mor/v1/federation_pb2_grpc.py").read_text()
    pb_min = re.search(r"Protobuf Python Version: ([\d.]+)", pb2).group(1)
    grpc_min = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub).group(1)
    reqs = {_name(r): r[len(_name(r)):] for r in _pyproject()["dependencies"]}
    major = int(pb_min.split(".")[0])
    for name, minimum, too_old in (("protobuf", pb_min, f"{major}.0.0"), ("grpcio", grpc_min, "1.85.0")):
        spec = SpecifierSet(reqs[name])
        assert minimum in spec and too_old not in spec, (name, reqs[name], minimum)


def _readme_sdk_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Client SDK"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


BLOCKER = f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (simulated base install of mor)", name=name)
sys.meta_path.insert(0, _Block())
"""


def _base_install_env(tmp_path) -> dict:
    """Environment whose Python cannot import the training/alignment/demo stack (as after `pip install mor`)."""
    d = tmp_path / "base-install"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": str(d)}


def test_readme_sdk_example_runs_verbatim_against_a_loopback_server(pki_dir, png_bytes, tmp_path):
    from fedutil import make_items
    from mor_server.federation.config import ServerConfig
    from mor_server.federation.thread import ServerThread

    script = tmp_path / "sdk_example.py"
    script.write_text(_readme_sdk_block())
    with ServerThread(ServerConfig(pki_dir=pki_dir)) as srv:
        env = {**_base_install_env(tmp_path), "MOR_SERVER": f"localhost:{srv.port}",
               "MOR_CREDS": str(pki_dir / "clients" / "carol")}
        proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            srv.wait_for_clients(1, timeout=60)
            items = make_items(png_bytes, n=3, k=2)
            out = srv.run_round(items, timeout=20)
            assert out.ok, out.reason
            assert out.reports["carol"] == [float(len(c)) for it in items for c in it.candidates]
            assert out.aggregate == {}, "a plain round's payloads are per client, in reports"
            time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)  # the script's own handler stops the client cleanly
            log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, log[-3000:]
    assert "event: connected" in log and "connected to localhost" in log, log[-3000:]
    assert "task " in log and "received: plain, 3 items" in log, log[-3000:]


SCORER_FILE = '''
class LenScorer:
    def score(self, items):
        return [[float(len(c)) for c in it.candidates] for it in items]

def len_fn(items):
    return [[float(len(c)) for c in it.candidates] for it in items]

def flat_fn(items):
    return [1.0 for it in items for c in it.candidates]

NOT_A_SCORER = 3
'''


def test_scorer_spec_accepts_file_and_module_class_function_and_explains_errors(tmp_path, png_bytes, monkeypatch):
    from fedutil import make_items
    from mor_client.cli import UsageError, scorer_from_spec

    f = tmp_path / "my_scorers.py"
    f.write_text(SCORER_FILE)
    items = make_items(png_bytes, n=2, k=3)
    want = [[float(len(c)) for c in it.candidates] for it in items]
    assert scorer_from_spec(f"{f}:LenScorer").score(items) == want          # a class: instantiated
    assert scorer_from_spec(f"{f}:len_fn").score(items) == want             # a function: wrapped, not called
    monkeypatch.syspath_prepend(str(tmp_path))
    assert scorer_from_spec("my_scorers:len_fn").score(items) == want       # package.module:attr
    for spec, msg in ((f"{f}:missing", "AttributeError"), (f"{tmp_path}/nope.py:x", "no such file"),
                      ("no_such_module_xyz:f", "ModuleNotFoundError"), (f"{f}:NOT_A_SCORER", "give a class"),
                      ("justaname", "package.module:attribute")):
        with pytest.raises(UsageError, match=msg):
            scorer_from_spec(spec)


def test_a_wrong_return_shape_is_refused_with_the_expected_shape(tmp_path, png_bytes):
    from fedutil import CARD, make_items
    from mor_client import FederationClient, FunctionScorer
    from mor_client.release import Release
    from mor.types import ScoreShapeError, check_score_shape

    items = make_items(png_bytes, n=2, k=2)
    with pytest.raises(ScoreShapeError, match=r"a flat list of 4 numbers; expected list\[list\[float\]\] of shape "
                                              r"\[2, 2\] \(one list per item, one score per candidate\)"):
        check_score_shape([1.0, 2.0, 3.0, 4.0], items)
    with pytest.raises(ScoreShapeError, match=r"shape \[2, 1\]"):
        check_score_shape([[1.0, 2.0], [3.0]], items)
    with pytest.raises(ScoreShapeError, match="non-number"):
        check_score_shape([[1.0, "x"], [3.0, 4.0]], items)
    assert check_score_shape(((1, 2), (3, 4)), items) == [[1.0, 2.0], [3.0, 4.0]]

    c = FederationClient("localhost:1", None, FunctionScorer(lambda its: [1.0] * 4), card=CARD,
                         insecure_client_id="x")
    rel = asyncio.run(c.score_items("r1", items, 5.0))
    assert isinstance(rel, Release) and rel.kind == "refuse"
    assert "expected list[list[float]] of shape [2, 2]" in rel.reason


def test_sdk_warns_when_its_certificate_is_about_to_expire(tmp_path, caplog):
    from fedutil import CARD, LengthScorer
    from mor_client import ClientCredentials, FederationClient
    from privacy import pki

    pki.init_ca(tmp_path / "pki")
    short = pki.issue_client(tmp_path / "pki", "soon", days=5)
    events = []
    c = FederationClient("localhost:1", ClientCredentials.from_dir(short), LengthScorer(), card=CARD,
                         on_event=lambda k, i: events.append(k))
    with caplog.at_level("WARNING", logger="mor.client"):
        left = c.check_certificate_expiry()
    assert 4 * 86400 < left < 5 * 86400
    assert events == ["certificate_expiring"] and "expires in 5.0 days" in caplog.text
    long = pki.issue_client(tmp_path / "pki", "later", days=365)
    c = FederationClient("localhost:1", ClientCredentials.from_dir(long), LengthScorer(), card=CARD,
                         on_event=lambda k, i: events.append(k))
    c.check_certificate_expiry()
    assert events == ["certificate_expiring"]


def test_join_with_a_scorer_file_in_a_base_install(pki_dir, png_bytes, tmp_path):
    """`mor-client join --scorer path/to/file.py:Class` works without torch & co. and answers a round."""
    from fedutil import make_items
    from mor_server.federation.config import ServerConfig
    from mor_server.federation.thread import ServerThread

    f = tmp_path / "my_scorers.py"
    f.write_text(SCORER_FILE)
    with ServerThread(ServerConfig(pki_dir=pki_dir)) as srv:
        proc = subprocess.Popen([sys.executable, "-m", "mor_client.cli", "-v", "join", "--server",
                                 f"localhost:{srv.port}", "--creds", str(pki_dir / "clients" / "bob"),
                                 "--scorer", f"{f}:LenScorer"], env=_base_install_env(tmp_path), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            srv.wait_for_clients(1, timeout=60)
            items = make_items(png_bytes, n=2, k=3)
            out = srv.run_round(items, timeout=20)
            assert out.ok, out.reason
            assert out.reports["bob"] == [float(len(c)) for it in items for c in it.candidates]
        finally:
            proc.send_signal(signal.SIGTERM)
            log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, log[-3000:]
    assert "simulated base install" not in log, log[-3000:]


def test_secagg_clients_in_a_base_install_complete_a_round(pki_dir, png_bytes, tmp_path):
    """Plain secagg needs no privacy ledger: `mor-client join --modes secagg` must start without opacus/torch."""
    import numpy as np

    from fedutil import make_items
    from mor_server.federation.config import ServerConfig
    from mor_server.federation.thread import ServerThread

    f = tmp_path / "my_scorers.py"
    f.write_text(SCORER_FILE)
    names = ("alice", "bob", "carol")
    with ServerThread(ServerConfig(pki_dir=pki_dir)) as srv:
        procs = [subprocess.Popen([sys.executable, "-m", "mor_client.cli", "-v", "join", "--server",
                                   f"localhost:{srv.port}",
                                   "--creds", str(pki_dir / "clients" / n), "--scorer", f"{f}:LenScorer",
                                   "--modes", "secagg", "--query-audit", str(tmp_path / f"{n}.qa.sqlite")],
                                  env=_base_install_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for n in names]
        try:
            try:
                srv.wait_for_clients(3, timeout=60)
            except Exception:
                for p in procs:
                    p.terminate()
                raise AssertionError([p.communicate(timeout=30)[0][-1500:] for p in procs]) from None
            items = make_items(png_bytes, n=2, k=2)
            w = {n: [1.0 / 3] * len(items) for n in names}
            out = srv.run_secagg_round(items, weights=w, timeout=20)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            logs = [p.communicate(timeout=30)[0] for p in procs]
    assert out.ok, (out.reason, [lg[-1500:] for lg in logs])
    expect = [float(len(c)) for it in items for c in it.candidates]
    np.testing.assert_allclose(out.aggregate["sum"], expect, atol=1e-3)
    assert all(p.returncode == 0 for p in procs), [lg[-1500:] for lg in logs]


def test_dp_in_a_base_install_ends_in_one_line_naming_the_missing_package(pki_dir, tmp_path):
    f = tmp_path / "my_scorers.py"
    f.write_text(SCORER_FILE)
    r = subprocess.run([sys.executable, "-c", "import sys; from mor.entry import mor_client; sys.exit(mor_client())",
                        "join", "--server", "localhost:1", "--creds",
                        str(pki_dir / "clients" / "bob"), "--scorer", f"{f}:LenScorer", "--modes", "dp", "--ledger",
                        str(tmp_path / "l.sqlite")], env=_base_install_env(tmp_path), cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "opacus is not installed" in r.stderr and "pip install 'mor[" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
