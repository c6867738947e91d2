"""End to end through the command lines: pki, serve, three client processes joining over mTLS."""

import os
import subprocess
import sys
from pathlib import Path

from mor_server.apps.procs import ClientProcess, mor_client_argv, stop_all

ROOT = Path(__file__).resolve().parent.parent


def test_cli_serve_and_three_clients(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "mor_server.apps.cli", *a], capture_output=True, text=True,  # noqa: E731
                                    env=env, timeout=120)
    pki = tmp_path / "pki"
    assert run("pki", "init", "--dir", str(pki)).returncode == 0
    for n in ("alice", "bob", "carol"):
        r = run("pki", "issue-client", n, "--dir", str(pki))
        assert r.returncode == 0, r.stderr
    bad = run("pki", "issue-client", "no spaces", "--dir", str(pki))
    assert bad.returncode == 2 and "invalid client name" in bad.stderr and "Traceback" not in bad.stderr

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mor_server.apps.cli", "serve", "--pki", str(pki), "--port",
                               str(port), "--rounds", "2", "--items", "16", "--min-clients", "3",
                               "--exit-after-rounds"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env)
    procs = [ClientProcess(n, mor_client_argv("join", "--server", f"localhost:{port}", "--creds",
                                              str(pki / "clients" / n), "--scorer", "fedutil:LengthScorer"),
                           tmp_path / f"{n}.log", env={"PYTHONPATH": str(ROOT / "tests")}).start()
             for n in ("alice", "bob", "carol")]
    try:
        out, _ = server.communicate(timeout=120)
    finally:
        stop_all(procs)
    assert server.returncode == 0, out
    lines = [l for l in out.splitlines() if l.startswith("round ")]
    assert len(lines) == 2 and all("completed" in l for l in lines), out
    assert "'alice', 'bob', 'carol'" in lines[0]
    for p in procs:
        assert "stopped after" in p.tail(), p.tail()
