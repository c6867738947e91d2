"""mTLS access control: only certificates of this federation's CA, unexpired and unrevoked, get in."""

import asyncio
import datetime as dt

import grpc
import pytest

from mor.v1 import federation_pb2 as pb
from mor.v1 import federation_pb2_grpc as pb_grpc
from mor_client import ClientCredentials, ClientError, FederationClient
from mor_server.federation.config import ServerConfig
from mor_server.federation.server import FederationServer
from privacy import pki

from fedutil import CARD, LengthScorer, federation


async def _try_register(server, creds: grpc.ChannelCredentials):
    async with grpc.aio.secure_channel(f"localhost:{server.port}", creds) as ch:
        return await pb_grpc.FederationStub(ch).Register(pb.RegisterRequest(), timeout=5)


def _client_for(server, creds_dir):
    return FederationClient(f"localhost:{server.port}", ClientCredentials.from_dir(creds_dir), LengthScorer(),
                            card=CARD, max_attempts=1, backoff_initial=0.01)


def test_foreign_ca_and_missing_certificate_are_refused(pki_dir, tmp_path):
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.issue_client(other, "alice")   # same name, wrong CA

    async def main():
        async with federation(pki_dir, names=()) as (server, _, _):
            with pytest.raises(ClientError):
                await _client_for(server, other / "clients" / "alice").run()
            no_cert = grpc.ssl_channel_credentials((pki_dir / "ca/ca.crt").read_bytes())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _try_register(server, no_cert)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(f"localhost:{server.port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await pb_grpc.FederationStub(ch).Register(pb.RegisterRequest(), timeout=5)
            assert server.registry.all() == []
    asyncio.run(main())


def test_expired_certificate_is_refused(pki_dir, tmp_path):
    expired = pki.issue_client(pki_dir, "eve", out_dir=tmp_path / "eve", days=1,
                               not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10))

    async def main():
        async with federation(pki_dir, names=()) as (server, _, _):
            with pytest.raises(ClientError):
                await _client_for(server, expired).run()
            assert server.registry.all() == []
    asyncio.run(main())


def test_revoked_certificate_is_refused_with_reason(tmp_path):
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue_client(d, "mallory")
    pki.issue_client(d, "alice")
    pki.revoke(d, "mallory")

    async def main():
        async with federation(d, names=("alice",)) as (server, _, _):
            with pytest.raises(ClientError, match="revoked"):
                await _client_for(server, d / "clients" / "mallory").run()
            assert server.online_clients() == ["alice"]
    asyncio.run(main())


def test_identity_certificate_must_match_tls_identity(pki_dir):
    async def main():
        async with federation(pki_dir, names=()) as (server, _, _):
            alice = ClientCredentials.from_dir(pki_dir / "clients/alice")
            bob = ClientCredentials.from_dir(pki_dir / "clients/bob")
            creds = grpc.ssl_channel_credentials(alice.ca_pem, alice.tls_key_pem, alice.tls_cert_pem)
            from mor.wire import card_to_pb
            async with grpc.aio.secure_channel(f"localhost:{server.port}", creds) as ch:
                stub = pb_grpc.FederationStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Register(pb.RegisterRequest(card=card_to_pb(CARD),
                                                           identity_certificate=bob.identity_cert_pem))
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "bob" in e.value.details()
                resp = await stub.Register(pb.RegisterRequest(card=card_to_pb(CARD),
                                                              identity_certificate=alice.identity_cert_pem))
                assert resp.client_id == "alice"
                assert server.registry.get("alice").identity_public_key is not None
    asyncio.run(main())


def test_server_refuses_to_start_without_pki(tmp_path):
    async def main():
        with pytest.raises(ValueError, match="pki_dir"):
            await FederationServer(ServerConfig()).start()
        with pytest.raises(pki.PKIError, match="pki init"):
            await FederationServer(ServerConfig(pki_dir=tmp_path)).start()
    asyncio.run(main())
