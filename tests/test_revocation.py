"""Revocation reaches running servers, open sessions, rounds in flight and SecAgg peers; a stale CRL is not trusted.

Everything here runs over real loopback gRPC with mutual TLS on a PKI made by ``pki.init_ca`` (fresh, as
``mor-server pki init`` makes it), except the SecAgg peer check, which is the client's own code path.
"""

import asyncio
import datetime as dt
import logging
import time

import grpc
import pytest

from mor.v1 import federation_pb2 as pb
from mor_client import ClientCredentials, ClientError, FederationClient
from mor_client.secagg_session import SecAggSession
from mor.wire import card_to_pb
from privacy import pki

from fedutil import CARD, LengthScorer, federation, make_items
from test_wire_validation import RawClient

FAST = {"crl_check_interval_s": 0.2}


@pytest.fixture()
def fresh_pki(tmp_path):
    d = tmp_path / "pki"
    pki.init_ca(d)
    for n in ("alice", "bob", "mallory", "dave"):
        pki.issue_client(d, n)
    return d


def _client(d, server, name, **kw):
    return FederationClient(f"localhost:{server.port}", ClientCredentials.from_dir(d / "clients" / name),
                            kw.pop("scorer", LengthScorer()), card=CARD, backoff_initial=0.01, **kw)


def test_fresh_pki_server_finds_the_crl_that_revoke_writes(fresh_pki):
    creds = pki.ServerCredentials.from_dir(fresh_pki)
    assert creds.crl_path is not None and creds.crl_path.exists(), "pki init must leave a CRL the server reads"
    ca = pki.CA.load(fresh_pki).cert
    assert pki.load_crl(creds.crl_path, ca) == {}
    serials = pki.revoke(fresh_pki, "mallory")
    assert pki.ServerCredentials.from_dir(fresh_pki).crl_path == creds.crl_path
    assert set(pki.load_crl(creds.crl_path, ca)) == set(serials)
    crl = pki.read_crl(creds.crl_path, ca)
    assert not crl.stale() and crl.next_update > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=29)


def test_revocation_ends_open_sessions_and_drops_the_client_from_the_round(fresh_pki, png_bytes):
    """mallory is online and in a round when the CA revokes it: its session ends with PERMISSION_DENIED within
    the CRL check interval, the round completes without it (a dropout, not a zero), it cannot come back."""
    async def main():
        async with federation(fresh_pki, names=("alice", "mallory"),
                              scorers={"mallory": LengthScorer(delay=4.0)}, **FAST) as (server, clients, tasks):
            raw = RawClient(fresh_pki, "dave", server.port)
            await raw.open()
            await server.wait_for_clients(3)
            rnd = asyncio.create_task(server.run_round(make_items(png_bytes), participants=["alice", "mallory"],
                                                       min_clients=1, timeout=20))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            pki.revoke(fresh_pki, "mallory")
            pki.revoke(fresh_pki, "dave")
            out = await asyncio.wait_for(rnd, 5)
            took = time.monotonic() - t0
            assert out.ok and out.responders == ("alice",)
            assert "revoked" in out.dropped["mallory"]
            assert took < 2.0, f"revocation took {took:.2f}s to reach the round (check interval 0.2 s)"
            with pytest.raises(ClientError, match="revoked"):
                await asyncio.wait_for(tasks[1], 5)
            with pytest.raises(grpc.aio.AioRpcError) as e:   # the raw session ends with a status and a reason
                await raw.next("ack", timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in e.value.details()
            await raw.close()
            assert server.online_clients() == ["alice"]
            assert server.metrics.value("mor_sessions_revoked_total") == 2
            with pytest.raises(ClientError, match="revoked"):        # and it cannot reconnect
                await _client(fresh_pki, server, "mallory", max_attempts=1).run()
            assert (await server.run_round(make_items(png_bytes), timeout=5)).responders == ("alice",)
    asyncio.run(main())


def test_stale_crl_fails_closed_until_refreshed(fresh_pki, caplog):
    """A CRL whose next_update passed is not trusted: open sessions end (UNAVAILABLE), new RPCs are refused with
    the reason, a log line and a metric say so; `pki crl-refresh` (refresh_crl) lets clients back in."""
    caplog.set_level(logging.WARNING, logger="mor.server")

    async def register(server):
        d = fresh_pki / "clients" / "bob"
        creds = grpc.ssl_channel_credentials((d / "ca.crt").read_bytes(), (d / "tls.key").read_bytes(),
                                             (d / "tls.crt").read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{server.port}", creds) as ch:
            from mor.v1 import federation_pb2_grpc as pb_grpc
            return await pb_grpc.FederationStub(ch).Register(pb.RegisterRequest(card=card_to_pb(CARD)), timeout=5)

    async def main():
        async with federation(fresh_pki, names=("alice",), **FAST) as (server, clients, tasks):
            assert server.metrics.value("mor_crl_usable") == 1
            ca = pki.CA.load(fresh_pki)
            past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
            pki.write_crl(fresh_pki, ca, {}, now=past, days=1)      # signed, but next_update passed 2 days ago
            for _ in range(50):
                if not server.online_clients():
                    break
                await asyncio.sleep(0.1)
            assert server.online_clients() == [], "an open session must end when the CRL goes stale"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await register(server)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "stale" in e.value.details()
            assert "crl-refresh" in e.value.details()
            assert server.metrics.value("mor_crl_usable") == 0
            assert sum("refusing every client" in r.getMessage() for r in caplog.records) == 1
            pki.refresh_crl(fresh_pki)
            await asyncio.sleep(0.5)
            assert (await register(server)).client_id == "bob"
            await server.wait_for_clients(1, timeout=10)   # alice's SDK reconnects on its own
            assert server.metrics.value("mor_crl_usable") == 1
    asyncio.run(main())


def test_forged_or_missing_crl_refuses_clients(fresh_pki, tmp_path):
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.crl_path(fresh_pki).write_bytes(pki.crl_path(other).read_bytes())   # signed by another CA

    async def main():
        async with federation(fresh_pki, names=(), **FAST) as (server, _, _):
            with pytest.raises(ClientError, match="1 attempts"):
                await _client(fresh_pki, server, "alice", max_attempts=1).run()
            assert server.registry.all() == []
            pki.crl_path(fresh_pki).unlink()
            with pytest.raises(ClientError):
                await _client(fresh_pki, server, "alice", max_attempts=1).run()
            pki.refresh_crl(fresh_pki)
            await asyncio.sleep(0.4)
            c = _client(fresh_pki, server, "alice")
            t = asyncio.create_task(c.run())
            await server.wait_for_clients(1, timeout=10)
            await c.stop()
            await t
    asyncio.run(main())


def test_secagg_peers_are_checked_against_the_crl(fresh_pki, tmp_path):
    """The identity certificates peers present during SecAgg are checked against the newest fresh CA-signed CRL
    the client has seen (shipped by the server with every secagg task); a forged or stale CRL is refused, an older
    one cannot roll a revocation back, and a task with no CRL at all is refused."""
    alice = ClientCredentials.from_dir(fresh_pki / "clients" / "alice")
    mallory_id = (fresh_pki / "clients" / "mallory" / "identity.crt").read_bytes()
    bob_id = (fresh_pki / "clients" / "bob" / "identity.crt").read_bytes()
    sess = SecAggSession(alice)
    before = pki.crl_path(fresh_pki).read_bytes()
    sess.accept_crl(before)
    sess.verify_peer("mallory", mallory_id)          # not revoked yet
    time.sleep(1.1)                                   # CRL times have one-second resolution
    pki.revoke(fresh_pki, "mallory")
    sess.accept_crl(pki.crl_path(fresh_pki).read_bytes())
    with pytest.raises(pki.PKIError, match="revoked"):
        sess.verify_peer("mallory", mallory_id)
    sess.verify_peer("bob", bob_id)
    sess.accept_crl(before)                           # a replayed older CRL does not un-revoke mallory
    with pytest.raises(pki.PKIError, match="revoked"):
        sess.verify_peer("mallory", mallory_id)
    other = tmp_path / "other"
    pki.init_ca(other)
    with pytest.raises(pki.PKIError, match="does not verify"):
        sess.accept_crl(pki.crl_path(other).read_bytes())
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    pki.write_crl(fresh_pki, pki.CA.load(fresh_pki), {}, now=past, days=1)
    with pytest.raises(pki.PKIError, match="stale"):
        sess.accept_crl(pki.crl_path(fresh_pki).read_bytes())

    # over the stream: a secagg task without a CRL is refused with the reason
    sent = []

    class Q:
        def put_nowait(self, m):
            sent.append(m)

    class FakeClient:
        client_id = "alice"
        audit = None
        policy = type("P", (), {"supported_modes": ("secagg",)})()

        def audit_release(self, *a, **k):
            pass

        def release_message(self, round_id, rel):
            return pb.ClientMessage(refusal=pb.Refusal(round_id=round_id, reason=rel.reason))

    task = pb.ScoringTask(round_id="r1", mode=pb.PRIVACY_MODE_SECAGG,
                          secagg=pb.SecAggMessage(round_id="r1", stage="setup", payload=b""))
    asyncio.run(SecAggSession(alice).on_task(task, [], FakeClient(), Q()))
    assert sent and "no CRL" in sent[0].refusal.reason


def test_cli_revoke_and_crl_refresh(fresh_pki, capsys):
    from mor_server.apps.cli import server_main

    ca = pki.CA.load(fresh_pki).cert
    assert server_main(["pki", "revoke", "mallory", "--dir", str(fresh_pki)]) == 0
    assert "re-signed" in capsys.readouterr().out
    assert len(pki.read_crl(pki.crl_path(fresh_pki), ca).revoked) == 2
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    pki.write_crl(fresh_pki, pki.CA.load(fresh_pki), pki.load_crl(pki.crl_path(fresh_pki), ca), now=past, days=1)
    assert pki.read_crl(pki.crl_path(fresh_pki), ca).stale()
    assert server_main(["pki", "crl-refresh", "--dir", str(fresh_pki), "--days", "7"]) == 0
    crl = pki.read_crl(pki.crl_path(fresh_pki), ca)
    assert not crl.stale() and len(crl.revoked) == 2, "a refresh keeps every revocation"
    assert dt.timedelta(days=6.9) < crl.next_update - dt.datetime.now(dt.timezone.utc) < dt.timedelta(days=7.1)
    assert server_main(["pki", "crl-refresh", "--dir", str(fresh_pki), "--days", "0"]) == 2
