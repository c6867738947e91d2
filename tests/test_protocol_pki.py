"""Key custody end to end: keygen on the institution's side -> sign-csr by the operator -> join -> a round; renewal
for the same keys; server certificate rotation picked up by a running server; expiry in metrics."""

import asyncio
import shutil
import socket
import ssl
import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mor_client import ClientCredentials, FederationClient
from mor_client.cli import main as client_main
from mor_server.apps.cli import server_main
from mor_server.federation.config import ServerConfig
from mor_server.federation.server import FederationServer
from privacy import pki

from fedutil import CARD, LengthScorer, make_items


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def _spki(cert):
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _peer_serial(port, creds):
    ctx = ssl.create_default_context(cafile=str(creds / "ca.crt"))
    ctx.load_cert_chain(str(creds / "tls.crt"), str(creds / "tls.key"))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("localhost", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_csr_enrolment_join_round_renew_and_server_rotation(tmp_path, png_bytes, capsys):
    fed = tmp_path / "pki"
    assert server_main(["pki", "init", "--dir", str(fed)]) == 0
    inst = tmp_path / "eve-creds"
    assert client_main(["keygen", "--out", str(inst), "--name", "eve"]) == 0
    assert {p.name for p in inst.iterdir()} == {"tls.key", "tls.csr", "identity.key", "identity.csr"}
    for k in ("tls.key", "identity.key"):
        assert stat.S_IMODE((inst / k).stat().st_mode) == 0o600
    assert client_main(["keygen", "--out", str(inst), "--name", "eve"]) == 2  # never silently replaced

    csrs = tmp_path / "sent-to-operator"  # only the CSRs travel
    csrs.mkdir()
    for f in ("tls.csr", "identity.csr"):
        shutil.copy(inst / f, csrs / f)
    assert server_main(["pki", "sign-csr", "mallory", "--dir", str(fed), "--csr", str(csrs)]) == 2  # name mismatch
    back = tmp_path / "returned"
    assert server_main(["pki", "sign-csr", "eve", "--dir", str(fed), "--csr", str(csrs), "--out", str(back)]) == 0
    assert {p.name for p in back.iterdir()} == {"tls.crt", "identity.crt", "ca.crt"}  # no private key anywhere
    assert not list(fed.rglob("*.key")) or all("eve" not in str(p) for p in fed.rglob("*.key"))
    for f in back.iterdir():
        shutil.copy(f, inst / f.name)
    tls_key = serialization.load_pem_private_key((inst / "tls.key").read_bytes(), None)
    assert _spki(_cert(inst / "tls.crt")) == tls_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    async def session_and_round(server):
        c = FederationClient(f"localhost:{server.port}", ClientCredentials.from_dir(inst), LengthScorer(), card=CARD)
        t = asyncio.create_task(c.run())
        try:
            # this client's own session first: the previous call's session may still be counted online until the
            # server has processed its end, and a round sent to it would find eve "not connected"
            await asyncio.wait_for(c.connected.wait(), 20)
            await server.wait_for_clients(1, timeout=20)
            items = make_items(png_bytes, n=2, k=2)
            out = await server.run_round(items, timeout=10)
            assert out.ok and out.responders == ("eve",), out.reason
            return c
        finally:
            await c.stop()
            await asyncio.gather(t, return_exceptions=True)

    async def main():
        server = FederationServer(ServerConfig(pki_dir=fed))
        await server.start()
        try:
            c = await session_and_round(server)
            assert c.client_id == "eve"

            # renewal: new certificates for the same keys, the CA and everyone else untouched
            old = _cert(inst / "tls.crt")
            assert server_main(["pki", "renew", "eve", "--dir", str(fed), "--creds", str(inst)]) == 0
            new = _cert(inst / "tls.crt")
            assert new.serial_number != old.serial_number and _spki(new) == _spki(old)
            assert (inst / "tls.key").read_bytes() == tls_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            await session_and_round(server)

            # server certificate rotation, picked up by the running server at the next handshake
            before = _peer_serial(server.port, inst)
            assert before == _cert(fed / "server" / "server.crt").serial_number
            assert server_main(["pki", "renew-server", "--dir", str(fed)]) == 0
            rotated = _cert(fed / "server" / "server.crt").serial_number
            assert rotated != before
            assert _peer_serial(server.port, inst) == rotated
            await session_and_round(server)

            text = server.metrics.registry.get_sample_value
            assert text("mor_certificate_expiry_seconds", {"certificate": "server_tls"}) > 800 * 86400
            assert text("mor_certificate_expiry_seconds", {"certificate": "client:eve"}) > 300 * 86400
        finally:
            await server.stop()
    asyncio.run(main())


def test_expiry_warning_in_logs_and_metrics(tmp_path, caplog):
    fed = tmp_path / "pki"
    pki.init_ca(fed)
    pki.renew_server(fed, days=10)

    async def main():
        server = FederationServer(ServerConfig(pki_dir=fed))
        await server.start()
        try:
            left = server.metrics.registry.get_sample_value("mor_certificate_expiry_seconds",
                                                            {"certificate": "server_tls"})
            assert 9 * 86400 < left < 10 * 86400
        finally:
            await server.stop()
    with caplog.at_level("WARNING", logger="mor.server"):
        asyncio.run(main())
    assert any("server_tls certificate expires in 10.0 days" in r.getMessage() and "renew-server" in r.getMessage()
               for r in caplog.records)
