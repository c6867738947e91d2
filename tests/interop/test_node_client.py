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
from mor_server.server import FederationServer, ServerConfig, dp_score_bound


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
