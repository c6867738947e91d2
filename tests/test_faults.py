"""Faults and load: abandoned rounds are really cancelled (never left running beside a retry), a client that will
not read its stream is disconnected with RESOURCE_EXHAUSTED while the others carry on."""

import asyncio
import json
import threading
import time

import grpc
import pytest

from mor.v1 import federation_pb2 as pb
from mor.v1 import federation_pb2_grpc as pb_grpc
from mor_client import ClientCredentials, FederationClient
from mor_client.client import ClientThread
from mor.wire import card_to_pb
from mor_server.alignment.features import FeatureExtractor
from mor_server.federation.backend import FederatedBackend
from mor_server.alignment.rewards import MoRReward
from mor_server.alignment.router import MoRRouter
from mor_server.federation.config import ServerConfig
from mor_server.federation.thread import ServerThread

from fedutil import CARD, LengthScorer, federation, make_items


class BlockingScorer:
    """Never answers until released (a client that holds a task forever)."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def score(self, items):
        self.calls += 1
        self.release.wait(30)
        return [[0.0 for _ in it.candidates] for it in items]


@pytest.fixture()
def blocked_federation(pki_dir, tmp_path):
    srv = ServerThread(ServerConfig(pki_dir=pki_dir, audit_path=tmp_path / "audit.jsonl"))
    srv.start()
    scorer = BlockingScorer()
    clients = [FederationClient(f"localhost:{srv.port}", ClientCredentials.from_dir(pki_dir / "clients" / n), scorer,
                                card=CARD) for n in ("alice", "bob")]
    threads = [ClientThread(c).start() for c in clients]
    srv.wait_for_clients(2, timeout=20)
    opened = []   # number of open rounds right after each round opened (on the server loop)
    add = srv.server.book.add

    def counting_add(rnd):
        out = add(rnd)
        opened.append(len(srv.server.book.open))
        return out
    srv.server.book.add = counting_add
    try:
        yield srv, clients, scorer, opened, tmp_path / "audit.jsonl"
    finally:
        scorer.release.set()
        for t in threads:
            t.stop()
        srv.stop()


def _round_entries(path):
    return [json.loads(line)["payload"] for line in path.read_text().splitlines()
            if json.loads(line)["event"] == "round"]


def test_abandoned_round_is_cancelled_on_the_loop_not_left_running(blocked_federation, png_bytes):
    srv, clients, scorer, opened, audit = blocked_federation
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):   # the caller gives up after 0.5 s although the round's deadline is 20 s
        srv.call(srv.server.run_round(make_items(png_bytes), timeout=20), 0.5)
    assert time.monotonic() - t0 < 3
    assert srv.server.book.open == {}, "the abandoned round must not keep running"
    m = srv.server.metrics
    assert m.value("mor_rounds_cancelled_total", {"mode": "plain"}) == 1
    assert m.value("mor_rounds_failed_total", {"mode": "plain"}) == 1
    (entry,) = _round_entries(audit)
    assert entry["state"] == "failed" and entry["reason"].startswith("cancelled")
    for _ in range(50):   # the clients were told (RoundCancelled) and dropped the task
        if all(c.stats.cancelled == 1 for c in clients):
            break
        time.sleep(0.05)
    assert [c.stats.cancelled for c in clients] == [1, 1]


def test_reward_deadline_cancels_before_retrying_so_rounds_never_overlap(blocked_federation, png_bytes):
    """MoRReward's deadline (0.4 s) is far below the round's (20 s): each attempt is cancelled on the server and
    waited for before the next starts; started == cancelled == attempts, never two rounds open at once."""
    srv, clients, scorer, opened, audit = blocked_federation
    fe = FeatureExtractor()
    backend = FederatedBackend(srv, mix_mode="plain", timeout=20)
    reward = MoRReward(backend, MoRRouter(["alice", "bob"], fe.dim), fe, deadline_s=0.4, retries=2)
    items = make_items(png_bytes, n=2)
    kw = {"example_id": ["a", "a", "b", "b"], "question": [items[0].question] * 2 + [items[1].question] * 2,
          "image_png": [png_bytes] * 4}
    t0 = time.monotonic()
    assert reward(completions=["x", "yy", "x", "yy"], **kw) == [None] * 4
    assert time.monotonic() - t0 < 6
    assert opened == [1, 1, 1], f"rounds overlapped: open rounds after each start = {opened}"
    assert srv.server.book.open == {}
    m = srv.server.metrics
    assert m.value("mor_rounds_started_total", {"mode": "plain"}) == 3 == reward.attempts_failed
    assert m.value("mor_rounds_cancelled_total", {"mode": "plain"}) == 3 == backend.rounds["cancelled"]
    assert [e["reason"][:9] for e in _round_entries(audit)] == ["cancelled"] * 3


def test_client_that_does_not_read_is_disconnected_others_unaffected(pki_dir, png_bytes):
    """A client with a valid certificate floods the server with messages that each earn an Ack and never reads:
    its bounded outbox fills, its session ends with RESOURCE_EXHAUSTED and a reason; alice's rounds carry on."""
    async def main():
        async with federation(pki_dir, names=("alice",), max_outbox=64, send_timeout_s=2.0) as (server, _, _):
            d = pki_dir / "clients" / "dave"
            creds = grpc.ssl_channel_credentials((d / "ca.crt").read_bytes(), (d / "tls.key").read_bytes(),
                                                 (d / "tls.crt").read_bytes())
            # a small receive window, so the server's writes stall quickly (the attacker's choice)
            async with grpc.aio.secure_channel(f"localhost:{server.port}", creds,
                                               options=[("grpc.http2.bdp_probe", 0),
                                                        ("grpc.http2.lookahead_bytes", 1024)]) as ch:
                stub = pb_grpc.FederationStub(ch)
                await stub.Register(pb.RegisterRequest(card=card_to_pb(CARD)))
                bad = pb.ClientMessage(refusal=pb.Refusal(round_id="r-unknown", reason="x" * 200))

                async def flood():
                    yield pb.ClientMessage(hello=pb.Hello())
                    for _ in range(30000):
                        yield bad
                call = stub.Session(flood())
                t0 = time.monotonic()
                while server.metrics.value("mor_sessions_ended_total", {"code": "RESOURCE_EXHAUSTED"}) < 1:
                    assert time.monotonic() - t0 < 15, "a client that does not read must be disconnected"
                    for conn in list(server._conns.values()):
                        assert conn.queue.qsize() <= 64
                    out = await server.run_round(make_items(png_bytes), participants=["alice"], timeout=5)
                    assert out.ok, "other clients must be unaffected"
                assert "dave" not in server.online_clients()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in call:
                        pass
                # the server ended it with RESOURCE_EXHAUSTED (the metric above); the flooding client sees that
                # status, unless its own pending write fails first in gRPC core, which it reports as INTERNAL
                if e.value.code() == grpc.StatusCode.INTERNAL:
                    assert "SendMessage" in (e.value.debug_error_string() or ""), e.value
                else:
                    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "not reading" in e.value.details() or "did not read" in e.value.details()
            assert (await server.run_round(make_items(png_bytes), participants=["alice"], timeout=5)).ok
    asyncio.run(main())


def test_cancelled_secagg_dp_round_is_never_charged(pki_dir, png_bytes, tmp_path):
    """secagg+dp: the caller abandons the round while it waits for a slow client at its first stage. The round is
    cancelled on the server, every client drops it, and no ledger is charged, even after the slow client answers:
    rounds started 2, cancelled 2, charged 0 (before the fix the abandoned rounds ran on and charged everyone)."""
    from mor_client import ReleasePolicy
    from mor_client.secagg_session import SecAggSession
    from privacy.ledger import PrivacyLedger

    names = ("alice", "bob", "carol")
    modes = ("secagg", "secagg+dp")
    srv = ServerThread(ServerConfig(pki_dir=pki_dir))
    srv.start()
    ledgers = {n: PrivacyLedger(tmp_path / f"{n}.sqlite", client_level_budget=1e6) for n in names}
    clients, threads = [], []
    for n in names:
        creds = ClientCredentials.from_dir(pki_dir / "clients" / n)
        clients.append(FederationClient(
            f"localhost:{srv.port}", creds, LengthScorer(delay=1.0 if n == "carol" else 0.0),
            card={**CARD, "supported_modes": list(modes)}, policy=ReleasePolicy(modes, ledger=ledgers[n]),
            secagg_handler=SecAggSession(creds, ledger=ledgers[n])))
        threads.append(ClientThread(clients[-1]).start())
    try:
        srv.wait_for_clients(3, timeout=20)
        items = make_items(png_bytes, n=2)
        for _ in range(2):
            with pytest.raises(TimeoutError):
                srv.call(srv.server.run_secagg_round(items, mode="secagg+dp", weights={n: [1 / 3] * 2 for n in names},
                                                     timeout=20, dp_noise_multiplier=1.0, value_range=8.0), 0.5)
        time.sleep(2.0)   # long enough for the slow client to answer: nothing may move on
        m = srv.server.metrics
        assert m.value("mor_rounds_started_total", {"mode": "secagg+dp"}) == 2
        assert m.value("mor_rounds_cancelled_total", {"mode": "secagg+dp"}) == 2
        assert srv.server.book.open == {}
        assert {n: len(L.history("client")) for n, L in ledgers.items()} == {n: 0 for n in names}
        assert all(c.secagg_handler._rounds == {} for c in clients)
        # the federation still works: a round that is not abandoned completes and is charged once per client
        out = srv.run_secagg_round(items, mode="secagg+dp", weights={n: [1 / 3] * 2 for n in names}, timeout=20,
                                   dp_noise_multiplier=1.0, value_range=8.0)
        assert out.ok, out.reason
        assert {n: len(L.history("client")) for n, L in ledgers.items()} == {n: 1 for n in names}
    finally:
        for t in threads:
            t.stop()
        srv.stop()
        for L in ledgers.values():
            L.close()
