"""Loopback gRPC with mTLS: rounds, dropouts, min_clients, health, metrics."""

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mor_server.federation.rounds import RoundState
from mor_server.federation.config import ServerConfig
from mor_server.federation.server import FederationServer

from fedutil import LengthScorer, federation, make_items


def test_three_clients_complete_rounds(pki_dir, png_bytes):
    async def main():
        scorers = {"alice": LengthScorer(0), "bob": LengthScorer(10), "carol": LengthScorer(20)}
        async with federation(pki_dir, scorers=scorers, metrics_port=0) as (server, clients, _):
            items = make_items(png_bytes, n=5, k=3)
            for _ in range(3):
                out = await server.run_round(items, timeout=10)
                assert out.ok, out.reason
                assert set(out.responders) == {"alice", "bob", "carol"}
                by = FederationServer.scores_by_client(out, items)
                for name, off in (("alice", 0), ("bob", 10), ("carol", 20)):
                    assert by[name] == [[len(c) + off for c in it.candidates] for it in items]
            assert server.metrics.value("mor_rounds_completed_total", {"mode": "plain"}) == 3
            assert server.metrics.value("mor_clients_online") == 3
            assert server.metrics.value("mor_received_bytes_total") > 0
            body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
            assert "mor_rounds_completed_total" in body and "mor_round_latency_seconds_bucket" in body
            # identities come from certificates
            assert sorted(c.client_id for c in clients) == ["alice", "bob", "carol"]
    asyncio.run(main())


def test_health_and_reflection(pki_dir):
    async def main():
        async with federation(pki_dir, names=()) as (server, _, _):
            creds = grpc.ssl_channel_credentials((pki_dir / "clients/alice/ca.crt").read_bytes(),
                                                 (pki_dir / "clients/alice/tls.key").read_bytes(),
                                                 (pki_dir / "clients/alice/tls.crt").read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{server.port}", creds) as ch:
                resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="mor.v1.Federation"))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
                stub = reflection_pb2_grpc.ServerReflectionStub(ch)

                async def reqs():
                    yield reflection_pb2.ServerReflectionRequest(list_services="")
                async for r in stub.ServerReflectionInfo(reqs()):
                    names = {s.name for s in r.list_services_response.service}
                    assert "mor.v1.Federation" in names
                    break
    asyncio.run(main())


def test_client_killed_mid_round_is_dropped_not_zero(pki_dir, png_bytes):
    async def main():
        scorers = {"carol": LengthScorer(5, delay=3.0)}  # carol is slow: we kill her mid-round
        async with federation(pki_dir, scorers=scorers) as (server, clients, tasks):
            items = make_items(png_bytes)
            rnd = asyncio.create_task(server.run_round(items, min_clients=2, timeout=10))
            await asyncio.sleep(0.5)
            await clients[2].stop()   # carol disconnects mid-round
            out = await rnd
            assert out.ok
            assert set(out.responders) == {"alice", "bob"}
            assert "carol" in out.dropped and "carol" not in out.reports
            assert out.latency < 5, "a disconnect must end the wait, not the deadline"
            assert server.metrics.value("mor_client_dropouts_total", {"reason": "disconnected"}) == 1
    asyncio.run(main())


def test_round_fails_cleanly_below_min_clients(pki_dir, png_bytes):
    async def main():
        scorers = {"bob": LengthScorer(delay=3.0), "carol": LengthScorer(delay=3.0)}
        async with federation(pki_dir, scorers=scorers) as (server, clients, tasks):
            items = make_items(png_bytes)
            rnd = asyncio.create_task(server.run_round(items, min_clients=2, timeout=10))
            await asyncio.sleep(0.5)
            await clients[1].stop()
            await clients[2].stop()
            out = await rnd
            assert out.state is RoundState.FAILED
            assert "only 1 of 3 clients reported" in out.reason and "min_clients=2" in out.reason
            assert server.metrics.value("mor_rounds_failed_total", {"mode": "plain"}) == 1
            # the server keeps working for the remaining client
            out2 = await server.run_round(items, participants=["alice"], timeout=5)
            assert out2.ok
    asyncio.run(main())


def test_silent_client_times_out_as_dropout(pki_dir, png_bytes):
    async def main():
        scorers = {"carol": LengthScorer(delay=4.0)}
        async with federation(pki_dir, scorers=scorers) as (server, _, _):
            out = await server.run_round(make_items(png_bytes), min_clients=2, timeout=1.0)
            assert out.ok and set(out.responders) == {"alice", "bob"}
            assert out.dropped["carol"] in ("no report before the deadline",) or out.dropped["carol"].startswith("refused")
            assert out.latency < 3.5
    asyncio.run(main())


def test_rounds_and_registrations_are_audited(pki_dir, png_bytes, tmp_path):
    from privacy.audit import read_entries, verify_log
    from privacy.pki import load_identity_key

    log_path = tmp_path / "server-audit.jsonl"

    async def main():
        async with federation(pki_dir, names=("alice", "bob"), audit_path=log_path) as (server, _, _):
            items = make_items(png_bytes)
            assert (await server.run_round(items, timeout=5)).ok
            assert (await server.run_round(items, participants=["alice"], timeout=5)).ok
    asyncio.run(main())
    pub = load_identity_key(pki_dir / "server" / "identity.key").public_key()
    res = verify_log(log_path, pub)
    assert res.ok, res
    events = [e.event for e in read_entries(log_path)]
    assert events.count("registration") == 2 and events.count("round") == 2
    rounds = [e for e in read_entries(log_path) if e.event == "round"]
    assert rounds[0].payload["participants"] == ["alice", "bob"] and len(rounds[0].payload["task_digest"]) == 64
    assert rounds[1].payload["participants"] == ["alice"] and rounds[1].payload["state"] == "completed"
    regs = [e for e in read_entries(log_path) if e.event == "registration"]
    assert regs[0].payload["card"]["training_epsilon"] == "inf" and regs[0].payload["certificate"]["serial"]


def test_client_reconnects_after_server_restart(pki_dir, png_bytes):
    from fedutil import client as make_client

    async def main():
        server = FederationServer(ServerConfig(pki_dir=pki_dir))
        port = await server.start()
        c = make_client(pki_dir, "alice", server, backoff_initial=0.05, backoff_max=0.5)
        task = asyncio.create_task(c.run())
        try:
            await server.wait_for_clients(1, timeout=20)
            await server.stop()
            server2 = FederationServer(ServerConfig(pki_dir=pki_dir, port=port))
            await server2.start()
            try:
                await server2.wait_for_clients(1, timeout=20)
                out = await server2.run_round(make_items(png_bytes), timeout=5)
                assert out.ok and out.responders == ("alice",)
                assert c.stats.sessions == 2 and c.stats.reconnects >= 1
            finally:
                await c.stop()
                await asyncio.gather(task, return_exceptions=True)
                await server2.stop()
        finally:
            await server.stop()
    asyncio.run(main())


def test_insecure_mode_is_explicit_and_loud(pki_dir, png_bytes, caplog):
    from mor_client import FederationClient

    async def main():
        server = FederationServer(ServerConfig(insecure=True))
        await server.start()
        c = FederationClient(f"127.0.0.1:{server.port}", None, LengthScorer(), card={
            "architecture": "x", "parameter_count": 0, "supported_modes": ["plain"]}, insecure_client_id="debug-1")
        task = asyncio.create_task(c.run())
        try:
            assert await server.wait_for_clients(1, timeout=20) == ["debug-1"]
            assert (await server.run_round(make_items(png_bytes), timeout=5)).ok
        finally:
            await c.stop()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop()
    with caplog.at_level("WARNING"):
        asyncio.run(main())
    assert any("INSECURE" in r.getMessage() for r in caplog.records if r.name == "mor.server")
    assert any("INSECURE" in r.getMessage() for r in caplog.records if r.name == "mor.client")
    with pytest.raises(ValueError, match="credentials are required"):
        FederationClient("x:1", None, LengthScorer(), card={})
