"""SecAgg+ over the federation stream: the server learns only the routing-weighted sum, survives dropouts, and
clients refuse isolating weights."""

import asyncio

import numpy as np
import pytest

from mor_client import ClientCredentials, FederationClient, ReleasePolicy
from mor_client.secagg_session import SecAggSession
from mor_server.federation.config import ServerConfig
from mor_server.federation.server import FederationServer

from fedutil import LengthScorer, make_items

NAMES = ("alice", "bob", "carol", "dave")


def _clients(pki_dir, server, scorers, modes=("secagg",), **session_kw):
    out = []
    for n in scorers:
        creds = ClientCredentials.from_dir(pki_dir / "clients" / n)
        card = {"architecture": "test-length", "parameter_count": 0, "supported_modes": list(modes)}
        out.append(FederationClient(f"localhost:{server.port}", creds, scorers[n], card=card,
                                    policy=ReleasePolicy(tuple(modes)),
                                    secagg_handler=SecAggSession(creds, **session_kw)))
    return out


async def _with_federation(pki_dir, scorers, body, session_kw=None, **server_kw):
    server = FederationServer(ServerConfig(pki_dir=pki_dir, **server_kw))
    await server.start()
    clients = _clients(pki_dir, server, scorers, **(session_kw or {}))
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        await server.wait_for_clients(len(clients), timeout=20)
        return await body(server, clients)
    finally:
        for c in clients:
            await c.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop()


def test_server_learns_only_the_weighted_sum(pki_dir, png_bytes, tmp_path):
    scorers = {n: LengthScorer(offset=0.25 * i) for i, n in enumerate(NAMES)}
    items = make_items(png_bytes, n=5, k=3)
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(len(NAMES)), size=len(items)).T   # (clients, items), columns sum to 1
    weights = {n: w[i].tolist() for i, n in enumerate(NAMES)}

    async def body(server, clients):
        return await server.run_secagg_round(items, weights=weights, timeout=15)

    out = asyncio.run(_with_federation(pki_dir, scorers, body, audit_path=tmp_path / "audit.jsonl"))
    assert out.ok, out.reason
    sizes = [len(it.candidates) for it in items]
    expect = sum(np.repeat(w[i], sizes) * np.array([len(c) + 0.25 * i for it in items for c in it.candidates])
                 for i in range(len(NAMES)))
    np.testing.assert_allclose(out.aggregate["sum"], expect, atol=1e-3)
    assert set(out.aggregate) == {"sum", "survivors", "out_of_range"}, "no individual scores reach the server"
    assert out.reports == {}, "a SecAgg+ round has no per-client reports"
    from privacy.audit import read_entries
    text = (tmp_path / "audit.jsonl").read_text()
    rounds = [e for e in read_entries(tmp_path / "audit.jsonl") if e.event == "round"]
    assert rounds[-1].payload["mode"] == "secagg" and len(rounds[-1].payload["weights_digest"]) == 64
    # an individual client's weighted score vector never appears in the server's log
    assert "scores" not in text


def test_dropout_mid_protocol_still_recovers_sum(pki_dir, png_bytes):
    scorers = {n: LengthScorer(offset=i) for i, n in enumerate(NAMES)}
    items = make_items(png_bytes, n=3, k=2)
    weights = {n: [0.25] * len(items) for n in NAMES}

    async def body(server, clients):
        orig = clients[3].secagg_handler.on_stage

        async def die_after_keys(msg, send_q, client=None):   # dave vanishes once keys are shared
            if msg.stage == "collect_masked":
                await clients[3].stop()
                return
            await orig(msg, send_q, client)
        clients[3].secagg_handler.on_stage = die_after_keys
        return await server.run_secagg_round(items, weights=weights, timeout=15, stage_timeout=3)

    out = asyncio.run(_with_federation(pki_dir, scorers, body))
    assert out.ok, out.reason
    assert set(out.responders) == {"alice", "bob", "carol"} and "dave" in out.dropped
    expect = sum(0.25 * np.array([len(c) + i for it in items for c in it.candidates]) for i in range(3))
    np.testing.assert_allclose(out.aggregate["sum"], expect, atol=1e-3)


def test_isolating_weights_are_refused(pki_dir, png_bytes):
    scorers = {n: LengthScorer() for n in NAMES[:3]}
    items = make_items(png_bytes, n=2, k=2)
    # alice alone on item 0 with weight 0.9 > her cap 0.5
    weights = {"alice": [0.9, 0.4], "bob": [0.1, 0.3], "carol": [0.0, 0.3]}

    async def body(server, clients):
        return await server.run_secagg_round(items, weights=weights, timeout=10, stage_timeout=3)

    out = asyncio.run(_with_federation(pki_dir, scorers, body, session_kw={"max_weight": 0.5}))
    assert "alice" in out.dropped and "isolating weights" in out.dropped["alice"]
    assert "alice" not in out.responders


def test_secagg_dp_charges_every_ledger_and_sum_carries_calibrated_noise(pki_dir, png_bytes, tmp_path):
    from privacy.ledger import PrivacyLedger

    names = NAMES[:3]
    scorers = {n: LengthScorer(offset=0.0) for n in names}
    items = make_items(png_bytes, n=4, k=2)
    weights = {n: [1 / 3] * len(items) for n in names}
    ledgers = {n: PrivacyLedger(tmp_path / f"{n}.sqlite", client_level_budget=10_000.0) for n in names}

    async def body(server, clients):
        for c in clients:
            c.secagg_handler.ledger = ledgers[c.client_id]
        return [await server.run_secagg_round(items, weights=weights, mode="secagg+dp", timeout=15,
                                              dp_noise_multiplier=0.05, value_range=8.0) for _ in range(2)]

    outs = asyncio.run(_with_federation(pki_dir, scorers, body, session_kw={"modes": ("secagg", "secagg+dp")}))
    assert all(o.ok for o in outs), [(o.reason, o.dropped) for o in outs]
    exact = np.array([len(c) for it in items for c in it.candidates], dtype=float)
    noisy = np.array(outs[0].aggregate["sum"])
    assert not np.allclose(noisy, exact, atol=1e-6), "secagg+dp must add noise"
    # noise std of the sum = 0.05 * L2 sensitivity (w_cap * 2C * sqrt(m)) = 0.05 * 2 * 8 * sqrt(8) ~ 2.3
    assert np.abs(noisy - exact).max() < 6 * 0.05 * 2 * 8 * np.sqrt(len(exact))
    for n, L in ledgers.items():
        hist = L.history("client")
        assert len(hist) == 2 and all(h["mechanism"] == "secagg+dp" for h in hist)
        assert L.epsilon("client") > 0
        L.close()


def test_client_policy_reaches_the_secagg_session(pki_dir, png_bytes):
    """ReleasePolicy's secagg knobs reach the state machine: a client that requires c >= 3 refuses a round that
    tolerates the default c = 1 (the server cannot lower what the client requires)."""
    scorers = {n: LengthScorer() for n in NAMES}
    items = make_items(png_bytes, n=2, k=2)
    weights = {n: [0.25] * len(items) for n in NAMES}

    async def body(server, clients):
        clients[0].policy = ReleasePolicy(("secagg",), min_collusion_tolerance=3)
        return await server.run_secagg_round(items, weights=weights, timeout=30, stage_timeout=10)

    out = asyncio.run(_with_federation(pki_dir, scorers, body))
    assert "alice" in out.dropped and "min_collusion_tolerance" in out.dropped["alice"]


def test_differencing_is_refused_over_the_wire(pki_dir, png_bytes):
    """The session's query audit: the same items again with one client fewer is refused by every client (the
    round-id guard is tested on the state machines: this server never reuses an id)."""
    scorers = {n: LengthScorer(offset=i) for i, n in enumerate(NAMES)}
    items = make_items(png_bytes, n=2, k=2)
    weights = {n: [0.25] * len(items) for n in NAMES}

    async def body(server, clients):
        first = await server.run_secagg_round(items, weights=weights, timeout=30, stage_timeout=10)
        same = await server.run_secagg_round(items, weights=weights, timeout=30, stage_timeout=10)
        fewer = await server.run_secagg_round(items, weights={n: weights[n] for n in NAMES[:3]},
                                              participants=NAMES[:3], timeout=30, stage_timeout=10)
        return first, same, fewer

    first, same, fewer = asyncio.run(_with_federation(pki_dir, scorers, body))
    assert first.ok, first.reason
    assert same.ok, same.reason  # the same question to the same cohort answers nothing new
    assert not fewer.ok and all("query audit" in why for why in fewer.dropped.values())


def test_join_exposes_the_secagg_refusal_knobs():
    from mor_client.cli import build_parser

    a = build_parser().parse_args(["join", "--server", "x:1", "--min-weight-fraction", "0.2",
                                   "--min-weight-grid-steps", "32", "--min-collusion-tolerance", "2",
                                   "--min-contributors", "3", "--max-weight", "0.5", "--query-audit", "q.sqlite"])
    assert (a.min_weight_fraction, a.min_weight_grid_steps, a.min_collusion_tolerance, a.min_contributors,
            a.max_weight, str(a.query_audit)) == (0.2, 32.0, 2, 3, 0.5, "q.sqlite")


def test_out_of_range_refusal_carries_no_score(pki_dir, png_bytes):
    """Under out_of_range='error' a client refuses; its refusal (which reaches the server) names no value."""
    scorers = {n: LengthScorer(offset=100.25 if n == "alice" else 0.0) for n in NAMES}
    items = make_items(png_bytes, n=2, k=2)
    weights = {n: [0.25] * len(items) for n in NAMES}

    async def body(server, clients):
        return await server.run_secagg_round(items, weights=weights, timeout=30, stage_timeout=10,
                                             out_of_range="error")

    out = asyncio.run(_with_federation(pki_dir, scorers, body))
    why = out.dropped["alice"]
    assert "value_range" in why and "100" not in why and "e.g." not in why
