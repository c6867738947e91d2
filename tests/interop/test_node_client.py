"""Interop: a Node.js client written only from the proto and docs/protocol.md (tests/interop/client.js) completes a
plain and a dp round beside a Python SDK client, against the real Python server over loopback mTLS.
Skipped (with the reason) when node/npm are missing or the npm registry does not answer."""

import asyncio
import json
import math
import subprocess
import threading

import pytest

from npmenv import HERE, node_modules

from fedutil import LengthScorer, client, make_items
from mor_client import ReleasePolicy
from mor_server.federation.config import ServerConfig, dp_score_bound
from mor_server.federation.server import FederationServer


@pytest.fixture(scope="module")
def node_ready():
    nm, why = node_modules()
    if nm is None:
        pytest.skip(f"Node interop skipped: {why}")
    return nm


class NodeClient:
    def __init__(self, port, creds, offset, modes):
        self.proc = subprocess.Popen(["node", str(HERE / "client.js"), "--server", f"localhost:{port}", "--creds",
                                      str(creds), "--offset", str(offset), "--modes", modes],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def kinds(self, event):
        return [e for e in self.events if e["event"] == event]

    def stop(self):
        self.proc.terminate()
        try:
            rc = self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._t.join(5)
        return rc


def test_node_client_completes_plain_and_dp_rounds_beside_a_python_client(node_ready, pki_dir, png_bytes, tmp_path):
    from privacy.ledger import PrivacyLedger

    async def main():
        server = FederationServer(ServerConfig(pki_dir=pki_dir))
        await server.start()
        ledger = PrivacyLedger(tmp_path / "alice.sqlite", client_level_budget=50.0)
        py = client(pki_dir, "alice", server, LengthScorer(offset=0.0),
                    card={"architecture": "py-length", "parameter_count": 0, "supported_modes": ["plain", "dp"]},
                    policy=ReleasePolicy(("plain", "dp"), ledger=ledger))
        py_task = asyncio.create_task(py.run())
        node = NodeClient(server.port, pki_dir / "clients" / "dave", 100, "plain,dp")
        try:
            await server.wait_for_clients(2, timeout=30)
            items = make_items(png_bytes, n=3, k=2)
            want = [float(len(c)) for it in items for c in it.candidates]

            plain = await server.run_round(items, mode="plain", timeout=15)
            assert plain.ok and set(plain.responders) == {"alice", "dave"}, plain.reason
            assert plain.reports["alice"] == want
            assert plain.reports["dave"] == [w + 100 for w in want]

            dp = await server.run_round(items, mode="dp", timeout=15, dp_clip=2.0, dp_noise_multiplier=1.0)
            assert dp.ok and set(dp.responders) == {"alice", "dave"}, dp.reason
            bound = dp_score_bound(2.0, 1.0, len(want))
            for c in ("alice", "dave"):
                assert len(dp.reports[c]["scores"]) == len(want)
                assert all(abs(s) <= bound for s in dp.reports[c]["scores"])
                assert math.isfinite(dp.reports[c]["epsilon"]) and dp.reports[c]["epsilon"] > 0
        finally:
            rc = await asyncio.to_thread(node.stop)  # the server needs this loop to end the stream
            await py.stop()
            await asyncio.gather(py_task, return_exceptions=True)
            await server.stop()
        err = node.proc.stderr.read()
        assert rc == 0, (rc, node.events[-5:], err[-2000:])
        assert node.kinds("welcome")[0]["client_id"] == "dave" and node.kinds("welcome")[0]["revision"] == 2
        assert node.kinds("heartbeat"), "the server echoes a Heartbeat"
        assert [t["mode"] for t in node.kinds("task")] == ["plain", "dp"]
        assert node.kinds("task")[0]["score_bound"] == 1000
        acks = node.kinds("ack")
        assert len(acks) == 2 and all(a["code"] == 0 for a in acks), acks
    asyncio.run(main())


def test_node_secagg_codec_and_primitives_reproduce_the_vectors(node_ready):
    """tests/interop/secagg.js (written from docs/protocol.md §6) reproduces tests/vectors/secagg_v1.json."""
    r = subprocess.run(["node", str(HERE / "vectors_check.js")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout) == {"messages": 12, "graph": 8, "primitives": 6}


def test_two_node_clients_and_a_python_client_complete_a_secagg_round(node_ready, pki_dir, png_bytes):
    """SecAgg+ implemented outside Python: two Node clients and one Python SDK client, 3 survivors, exact sum."""
    import numpy as np

    from mor_client import ClientCredentials, FederationClient
    from mor_client.secagg_session import SecAggSession

    async def main():
        server = FederationServer(ServerConfig(pki_dir=pki_dir))
        await server.start()
        creds = ClientCredentials.from_dir(pki_dir / "clients" / "alice")
        py = FederationClient(f"localhost:{server.port}", creds, LengthScorer(offset=0.0),
                              card={"architecture": "py-length", "parameter_count": 0, "supported_modes": ["secagg"]},
                              policy=ReleasePolicy(("secagg",)), secagg_handler=SecAggSession(creds))
        py_task = asyncio.create_task(py.run())
        nodes = [NodeClient(server.port, pki_dir / "clients" / n, off, "secagg")
                 for n, off in (("carol", 1), ("dave", 2))]
        try:
            await server.wait_for_clients(3, timeout=30)
            items = make_items(png_bytes, n=2, k=2)
            w = {"alice": [0.5, 0.2], "carol": [0.25, 0.4], "dave": [0.25, 0.4]}
            out = await server.run_secagg_round(items, weights=w, timeout=15, stage_timeout=5)
        finally:
            rcs = [await asyncio.to_thread(n.stop) for n in nodes]
            await py.stop()
            await asyncio.gather(py_task, return_exceptions=True)
            await server.stop()
        assert out.ok, (out.reason, [n.events[-4:] for n in nodes])
        sizes = [len(it.candidates) for it in items]
        base = np.array([len(c) for it in items for c in it.candidates], dtype=float)
        expect = sum(np.repeat(np.array(w[c]), sizes) * (base + off) for c, off in (("alice", 0), ("carol", 1),
                                                                                    ("dave", 2)))
        np.testing.assert_allclose(out.aggregate["sum"], expect, atol=1e-3)
        assert sorted(out.aggregate["survivors"]) == ["alice", "carol", "dave"]
        assert rcs == [0, 0], [n.proc.stderr.read()[-1000:] for n in nodes]
        for n in nodes:
            assert [e["stage"] for e in n.kinds("secagg")] == ["setup", "reveal", "share_keys", "collect_masked",
                                                                "consistency", "unmask"], n.events
    asyncio.run(main())
