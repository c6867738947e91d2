"""`dp` mode end to end over gRPC: clipped + noised scores, charged to the client's ledger before they leave,
refused with the remaining budget once the next release would overspend it."""

import asyncio
import math

import grpc
import numpy as np

from mor_client import ClientCredentials, FederationClient, ReleasePolicy
from mor_server.federation.rounds import RoundState
from mor_server.federation.config import ServerConfig
from mor_server.federation.server import FederationServer
from privacy.ledger import PrivacyLedger

from fedutil import LengthScorer, make_items


def test_dp_rounds_charge_ledger_and_refuse_past_budget(pki_dir, png_bytes, tmp_path):
    from privacy.audit import AuditLog, read_entries
    from privacy.pki import load_identity_key

    ledger = PrivacyLedger(tmp_path / "alice.sqlite", client_level_budget=3.0, delta=1e-5)
    audit = AuditLog(tmp_path / "alice-audit.jsonl", signing_key=load_identity_key(pki_dir / "clients/alice/identity.key"),
                     actor="client:alice")
    card = {"architecture": "test-length", "parameter_count": 0, "supported_modes": ["dp"]}

    async def main():
        server = FederationServer(ServerConfig(pki_dir=pki_dir))
        await server.start()
        client = FederationClient(f"localhost:{server.port}", ClientCredentials.from_dir(pki_dir / "clients/alice"),
                                  LengthScorer(), card=card, policy=ReleasePolicy(("dp",), ledger=ledger), audit=audit)
        task = asyncio.create_task(client.run())
        try:
            await server.wait_for_clients(1, timeout=20)
            items = make_items(png_bytes, n=8, k=2)
            outcomes = []
            for _ in range(12):
                outcomes.append(await server.run_round(items, mode="dp", dp_clip=1.0, dp_noise_multiplier=2.0,
                                                       timeout=5))
            return outcomes
        finally:
            await client.stop()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop()

    outcomes = asyncio.run(main())
    done = [o for o in outcomes if o.ok]
    refused = [o for o in outcomes if not o.ok]
    assert done and refused, "some rounds must be released, then the budget must stop them"
    assert all(o.state is RoundState.FAILED and "refused" in o.reason and "budget" in o.reason.lower()
               for o in refused)
    # released values are clipped to [-1, 1] before noise, so they are NOT the raw lengths (4..8) plus small noise
    raw = np.array([len(c) for it in make_items(png_bytes, n=8, k=2) for c in it.candidates], dtype=float)
    got = np.array(done[0].reports["alice"]["scores"])
    assert got.shape == raw.shape and not np.allclose(got, raw, atol=1.0)
    # the ledger never goes past the budget, and it agrees with what the client reported
    eps = ledger.epsilon("client")
    assert eps <= 3.0 + 1e-9
    assert math.isclose(done[-1].reports["alice"]["epsilon"], eps, rel_tol=1e-9)
    assert len(ledger.history("client")) == len(done)
    audit.close()
    events = [e for e in read_entries(tmp_path / "alice-audit.jsonl") if e.event in ("release", "refusal")]
    assert [e.event for e in events].count("release") == len(done)
    assert [e.event for e in events].count("refusal") == len(refused)
    ledger.close()
