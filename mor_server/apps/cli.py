"""The ``mor`` command (every group: server, client, pki, audit, demo, align) and its alias ``mor-server``.

Thin shells: parse arguments, call library code, print results. Errors a user can fix are printed as one line
naming the argument and the fix (exit code 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from mor.cliargs import (VERBOSE_HELP, ArgumentParser, UsageError, bind_host, client_name, dir_path, existing_dir,
                         existing_file, float_range, host_list, loaded_errors, non_negative_int, output_dir,
                         output_file, port, positive_float, positive_int, register_missing, run_main,
                         verbose_everywhere)
from mor.modes import MODES, SECAGG_MODES
from privacy import pki

#: help of the flag naming the PKI folder (``--pki``; ``--dir`` is its former name, still accepted)
PKI_HELP = "PKI folder made by `mor pki init` (--dir: the same flag's former name)"
#: help of the flag naming the membership authority's folder
MEMBERSHIP_HELP = "membership folder made by `mor pki membership init` (--dir: the same flag's former name)"


def _add_pki(sub) -> None:
    p = sub.add_parser("pki", help="federation CA and certificates")
    ps = p.add_subparsers(dest="pki_cmd", required=True)
    init = ps.add_parser("init", help="create the federation CA and the server certificate")
    init.add_argument("--pki", "--dir", dest="dir", type=output_dir, default="pki", help="PKI folder to create")
    init.add_argument("--hosts", default="localhost,127.0.0.1,::1", type=host_list,
                      help="comma-separated host names/IPs the server certificate is valid for")
    init.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every certificate)")
    init.set_defaults(func=_pki_init)
    iss = ps.add_parser("issue-client", help="issue a client's TLS + identity certificates")
    iss.add_argument("name", type=client_name, help="client name (becomes its identity: the certificate's Common Name)")
    iss.add_argument("--pki", "--dir", dest="dir", type=dir_path, default="pki", help=PKI_HELP)
    iss.add_argument("--days", type=positive_float, default=365, help="validity of the certificates in days")
    iss.add_argument("--out", type=output_dir, default=None, help="output folder (default: PKI/clients/NAME)")
    iss.add_argument("--identity-public-key", type=existing_file, default=None, metavar="FILE",
                     help="certify the institution's own Ed25519 identity key (its identity.csr from `pki membership "
                          "keygen`, or a PEM public key) instead of generating one: no identity.key is written")
    iss.set_defaults(func=_pki_issue)
    rev = ps.add_parser("revoke", help="revoke every certificate issued to a client (a running server picks it up)")
    rev.add_argument("name", type=client_name, help="the client name whose certificates are revoked")
    rev.add_argument("--pki", "--dir", dest="dir", type=dir_path, default="pki", help=PKI_HELP)
    rev.add_argument("--days", type=positive_float, default=pki.CRL_DAYS,
                     help="validity of the re-signed CRL in days (its next_update)")
    rev.set_defaults(func=_pki_revoke)
    crl = ps.add_parser("crl-refresh", help="re-sign the CRL with a new next_update (a server refuses every client "
                                            "once its CRL's next_update has passed)")
    crl.add_argument("--pki", "--dir", dest="dir", type=dir_path, default="pki", help=PKI_HELP)
    crl.add_argument("--days", type=positive_float, default=pki.CRL_DAYS, help="validity of the CRL in days")
    crl.set_defaults(func=_pki_crl_refresh)
    sc = ps.add_parser("sign-csr", help="enrolment by CSR: certify an institution's own TLS and identity keys (from "
                                        "`mor client keygen`); the private keys never travel")
    sc.add_argument("name", type=client_name, help="client name (must be the Common Name of both CSRs)")
    sc.add_argument("--pki", "--dir", dest="dir", type=dir_path, default="pki", help=PKI_HELP)
    sc.add_argument("--csr", type=existing_dir, required=True, metavar="DIR",
                    help="folder holding the institution's tls.csr and identity.csr")
    sc.add_argument("--days", type=positive_float, default=365, help="validity of the certificates in days")
    sc.add_argument("--out", type=output_dir, default=None,
                    help="where tls.crt, identity.crt and ca.crt are written (default: PKI/clients/NAME)")
    sc.set_defaults(func=_pki_sign_csr)
    rn = ps.add_parser("renew", help="issue new certificates for a client's SAME keys (no key moves, nothing "
                                     "else is invalidated)")
    rn.add_argument("name", type=client_name, help="client name")
    rn.add_argument("--pki", "--dir", dest="dir", type=dir_path, default="pki", help=PKI_HELP)
    rn.add_argument("--creds", type=existing_dir, default=None, metavar="DIR",
                    help="folder holding the client's current tls.crt and identity.crt (default: PKI/clients/NAME)")
    rn.add_argument("--days", type=positive_float, default=365, help="validity of the new certificates in days")
    rn.add_argument("--out", type=output_dir, default=None, help="output folder (default: the --creds folder)")
    rn.set_defaults(func=_pki_renew)
    rs = ps.add_parser("renew-server", help="rotate the server's TLS key and certificate (a running server uses "
                                            "them from its next handshake on)")
    rs.add_argument("--pki", "--dir", dest="dir", type=dir_path, default="pki", help=PKI_HELP)
    rs.add_argument("--days", type=positive_float, default=825, help="validity of the new certificate in days")
    rs.add_argument("--hosts", type=host_list, default=None,
                    help="comma-separated host names/IPs (default: those of the current certificate)")
    rs.set_defaults(func=_pki_renew_server)
    _add_membership(ps)


def _pki_init(args) -> int:
    pki.init_ca(args.dir, server_hosts=tuple(h.strip() for h in args.hosts.split(",") if h.strip()), force=args.force)
    print(f"federation CA and server certificate written to {args.dir}/ (keep {args.dir}/ca/ca.key offline)")
    print("PILOT SET-UP: this one CA certifies both the TLS and the SecAgg identities of clients, so whoever holds "
          f"{args.dir}/ca/ca.key (the server operator) can mint sybil clients and defeat secure aggregation's "
          "threshold and isolation checks. For a federation that must hold against the operator, add a membership "
          "authority the operator does not control: `mor pki membership init` (README, 'PKI and access').")
    return 0


def _pki_issue(args) -> int:
    id_pub = None
    if args.identity_public_key is not None:
        from privacy import membership

        id_pub = membership.load_identity_public_key(_read_file(args.identity_public_key, "--identity-public-key"),
                                                     expected_name=args.name)
    out = pki.issue_client(args.dir, args.name, days=args.days, out_dir=args.out, identity_public_key=id_pub)
    if id_pub is None:
        print(f"client {args.name}: credentials in {out}/ (tls.key, tls.crt, identity.key, identity.crt, ca.crt); "
              "hand this folder to the institution over a secure channel")
    else:
        print(f"client {args.name}: credentials in {out}/ (tls.key, tls.crt, identity.crt for the institution's own "
              "identity key, ca.crt); the institution adds them to the folder holding its identity.key")
    return 0


def _read_file(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise UsageError(f"{flag} {path}: no such file") from None


def _pki_revoke(args) -> int:
    serials = pki.revoke(args.dir, args.name, days=args.days)
    print(f"revoked {len(serials)} certificate(s) of {args.name}: " + ", ".join(f"{s:x}" for s in serials)
          + f"; CRL {pki.crl_path(args.dir)} re-signed (a running server ends their sessions within its "
          "crl_check_interval_s, 2 s by default)")
    return 0


def _pki_sign_csr(args) -> int:
    from privacy import membership

    csr_dir = Path(args.csr)
    tls_pub = pki.load_tls_csr(_read_file(csr_dir / "tls.csr", "--csr"), expected_name=args.name,
                               what=str(csr_dir / "tls.csr"))
    id_pub = membership.load_identity_public_key(_read_file(csr_dir / "identity.csr", "--csr"),
                                                 expected_name=args.name, what=str(csr_dir / "identity.csr"))
    out = pki.issue_client(args.dir, args.name, days=args.days, out_dir=args.out, tls_public_key=tls_pub,
                           identity_public_key=id_pub)
    print(f"client {args.name}: tls.crt, identity.crt and ca.crt in {out}/ for the institution's own keys; send "
          "them back (no private key was made or seen here)")
    return 0


def _pki_renew(args) -> int:
    out = pki.renew_client(args.dir, args.name, days=args.days, creds_dir=args.creds, out_dir=args.out)
    print(f"client {args.name}: new tls.crt and identity.crt (same keys) in {out}/; the old ones stay valid until "
          "they expire")
    return 0


def _pki_renew_server(args) -> int:
    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip()) if args.hosts else None
    out = pki.renew_server(args.dir, days=args.days, hosts=hosts)
    print(f"server TLS key and certificate rotated in {out}/ (identity key, CA and client certificates unchanged); "
          "a running mor-server uses them from its next TLS handshake on")
    return 0


def _pki_crl_refresh(args) -> int:
    crl = pki.refresh_crl(args.dir, days=args.days)
    print(f"CRL {pki.crl_path(args.dir)} re-signed: {len(crl.revoked)} revoked certificate(s), valid until "
          f"{crl.next_update:%Y-%m-%d %H:%M}Z")
    return 0


def _add_membership(ps) -> None:
    """``mor pki membership ...``: the membership authority's commands (run by the consortium / enrolment
    office, NOT the server operator) and the institution's ``keygen``."""
    m = ps.add_parser("membership", help="membership CA and signed roster (held by the members, not the operator)")
    ms = m.add_subparsers(dest="membership_cmd", required=True)
    init = ms.add_parser("init", help="authority: create the membership CA (keep DIR/membership-ca.key offline)")
    init.add_argument("--membership", "--dir", dest="dir", type=output_dir, default="membership",
                      help="membership folder to create")
    init.add_argument("--name", default="MoR membership CA", help="the CA certificate's Common Name")
    init.add_argument("--days", type=positive_float, default=3650, help="validity of the membership CA certificate")
    init.add_argument("--force", action="store_true", help="replace an existing membership CA")
    init.set_defaults(func=_membership_init)
    kg = ms.add_parser("keygen", help="institution: make its own identity key and a CSR (the key never leaves)")
    kg.add_argument("name", type=client_name, help="the institution's client name (its TLS certificate's Common Name)")
    kg.add_argument("--out", type=output_dir, required=True, help="folder for identity.key (0600) and identity.csr")
    kg.add_argument("--force", action="store_true", help="replace an existing identity.key")
    kg.set_defaults(func=_membership_keygen)
    en = ms.add_parser("enrol", help="authority: certify a member's identity key (from its CSR or public key)")
    en.add_argument("name", type=client_name, help="member name (must equal its TLS client name)")
    en.add_argument("--membership", "--dir", dest="dir", type=dir_path, default="membership",
                    help=MEMBERSHIP_HELP)
    src = en.add_mutually_exclusive_group(required=True)
    src.add_argument("--identity-public-key", type=existing_file, metavar="FILE",
                     help="the member's identity.csr (from `keygen`) or PEM Ed25519 public key")
    src.add_argument("--issue-key", action="store_true",
                     help="PILOTS ONLY: generate the identity key here too (the authority then has seen it)")
    en.add_argument("--days", type=positive_float, default=365, help="validity of the membership certificate")
    en.add_argument("--out", type=output_dir, default=None, help="output folder (default: DIR/members/NAME)")
    en.set_defaults(func=_membership_enrol)
    rm = ms.add_parser("remove", help="authority: take a member off the next roster")
    rm.add_argument("name", type=client_name, help="member name")
    rm.add_argument("--membership", "--dir", dest="dir", type=dir_path, default="membership",
                    help=MEMBERSHIP_HELP)
    rm.set_defaults(func=_membership_remove)
    ro = ms.add_parser("roster", help="authority: sign the roster of enrolled members (next serial)")
    ro.add_argument("--membership", "--dir", dest="dir", type=dir_path, default="membership",
                    help=MEMBERSHIP_HELP)
    ro.add_argument("--out", type=output_file, default=None, help="roster file (default: DIR/roster.json)")
    ro.add_argument("--days", type=positive_float, default=30, help="validity of the roster (clients refuse it after)")
    ro.add_argument("--federation", default="MoR federation", help="federation name written in the roster")
    ro.set_defaults(func=_membership_roster)
    ve = ms.add_parser("verify", help="anyone: check a roster against a pinned membership CA and list its members")
    ve.add_argument("roster", type=existing_file, help="the signed roster file (roster.json)")
    ve.add_argument("--membership-ca", type=existing_file, required=True, help="the pinned membership-ca.crt")
    ve.set_defaults(func=_membership_verify)


def _positive_days(days: float) -> float:
    if not (days > 0 and days != float("inf")):
        raise UsageError(f"--days must be a positive number of days, got {days}")
    return days


def _membership_init(args) -> int:
    from privacy import membership

    auth = membership.init_authority(args.dir, name=args.name, days=_positive_days(args.days), force=args.force)
    print(f"membership CA written to {args.dir}/ (membership-ca.crt: give it to every member out of band, and "
          f"check its SHA-256 {membership.cert_fingerprint(auth.cert)[:16]}... with them; keep "
          f"{args.dir}/membership-ca.key offline and away from the server operator)")
    return 0


def _membership_keygen(args) -> int:
    from privacy import membership

    key, csr = membership.new_identity(args.name, args.out, force=args.force)
    print(f"identity key {key} (keep it: it never leaves this institution) and request {csr}: send {csr.name} to "
          "the membership authority (`pki membership enrol`) and to the server operator (`pki issue-client "
          "--identity-public-key`)")
    return 0


def _membership_enrol(args) -> int:
    from privacy import membership

    pub = None if args.issue_key else _read_file(args.identity_public_key, "--identity-public-key")
    out = membership.enrol(args.dir, args.name, pub, days=_positive_days(args.days), out_dir=args.out)
    extra = " and identity.key (PILOT: generated by the authority)" if args.issue_key else ""
    print(f"member {args.name}: membership.crt and membership-ca.crt{extra} in {out}/; sign a new roster "
          f"(`mor pki membership roster --membership {args.dir}`) so that peers accept it")
    return 0


def _membership_remove(args) -> int:
    from privacy import membership

    membership.remove(args.dir, args.name)
    print(f"member {args.name} removed: it is left off the next roster; sign and distribute one now "
          f"(`mor pki membership roster --membership {args.dir}`)")
    return 0


def _membership_roster(args) -> int:
    from privacy import membership

    out = args.out or args.dir / "roster.json"
    doc = membership.write_roster(args.dir, out, days=_positive_days(args.days), federation=args.federation)
    body = doc["roster"]
    print(f"roster serial {body['serial']} with {len(body['members'])} member(s) "
          f"({', '.join(m['name'] for m in body['members'])}) signed, valid until {body['not_after']}: {out}; "
          "give it to every member (clients refuse peers not on it, and refuse it once it expires)")
    return 0


def _membership_verify(args) -> int:
    from cryptography import x509

    from privacy import membership

    try:
        ca = x509.load_pem_x509_certificate(_read_file(args.membership_ca, "--membership-ca"))
    except ValueError as e:
        raise UsageError(f"--membership-ca {args.membership_ca}: not a PEM certificate ({e})") from None
    roster = membership.verify_roster(_read_file(args.roster, "roster"), ca)
    print(membership.describe(roster))
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the federation server")
    p.add_argument("--pki", type=existing_dir, default=Path("pki"), help="PKI folder made by `mor pki init`")
    p.add_argument("--host", type=bind_host, default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port, default=50051, help="TCP port to listen on (0: any free port)")
    p.add_argument("--metrics-port", type=port, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--health-port", type=port, default=None,
                   help="also serve grpc.health.v1 (only) in PLAINTEXT on this port, for load balancers and "
                        "Kubernetes probes without a client certificate (default: off)")
    p.add_argument("--max-abs-score", type=float_range(0, lo_open=True), default=1000.0,
                   help="declared range of plain-mode scores (ScoringTask.score_bound): a report with |score| above "
                        "it is rejected with INVALID_ARGUMENT")
    p.add_argument("--min-protocol-revision", type=positive_int, default=1,
                   help="oldest mor.v1 protocol revision accepted at hello (docs/protocol.md, Versioning); older "
                        "clients get FAILED_PRECONDITION")
    p.add_argument("--insecure", action="store_true",
                   help="DANGER: serve without TLS (identities unauthenticated); local debugging only")
    p.add_argument("--max-message-mb", type=float_range(0, 2047, lo_open=True), default=16.0,
                   help="largest gRPC message accepted or sent, in MiB (gRPC's limit is 2 GiB)")
    p.add_argument("--rounds", type=non_negative_int, default=0,
                   help="after --min-clients join, run this many scoring rounds on public easy-vqa items and print "
                        "them")
    p.add_argument("--mode", choices=SERVE_MODES, default="plain",
                   help="privacy mode of the --rounds rounds (secagg, secagg+dp: equal weights, only the sum is seen)")
    p.add_argument("--items", type=positive_int, default=64, help="items per scoring task (with --rounds)")
    p.add_argument("--min-clients", type=positive_int, default=1,
                   help="clients that must join (and answer) before a round (with --rounds)")
    p.add_argument("--wait-clients", type=positive_float, default=600.0,
                   help="seconds to wait for --min-clients before giving up (with --rounds)")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="per-round deadline in seconds")
    p.add_argument("--exit-after-rounds", action="store_true", help="stop once --rounds have run")
    p.set_defaults(func=_serve)


#: privacy modes of `serve --rounds` (mor.modes: the one list)
SERVE_MODES = MODES


async def _serve_rounds(server, args) -> None:
    """The ``--rounds`` job: wait for the clients, run the rounds, print one line each."""
    from ..federation.public_items import public_scoring_items

    online = await server.wait_for_clients(args.min_clients, timeout=args.wait_clients, mode=args.mode)
    print(f"clients online ({args.mode}): {', '.join(online)}", flush=True)
    items = public_scoring_items(args.items)
    for _ in range(args.rounds):
        if args.mode in SECAGG_MODES:
            live = list(online)
            weights = {c: [1.0 / len(live)] * len(items) for c in live}
            out = await server.run_secagg_round(items, weights=weights, mode=args.mode, participants=live,
                                                min_clients=args.min_clients, timeout=args.timeout)
        else:
            out = await server.run_round(items, mode=args.mode, min_clients=args.min_clients, timeout=args.timeout)
        print(f"round {out.round_id}: {out.state.value} in {out.latency * 1000:.1f} ms; "
              f"responders={list(out.responders)} dropped={out.dropped or '{}'}"
              + (f" reason={out.reason}" if out.reason else ""), flush=True)


def _serve(args) -> int:
    """Serve until SIGINT/SIGTERM. Both are honoured at every stage: while waiting for clients, during a round (the
    round is cancelled: clients get RoundCancelled) and while idle; the server then stops gracefully (exit code 0
    when idle, 128 + the signal when --rounds had not all run)."""
    from ..federation.config import ServerConfig
    from ..federation.server import FederationServer

    if args.port < 0 or args.port > 65535:
        raise UsageError(f"--port {args.port} is not a TCP port (0-65535)")
    if args.rounds and args.mode in SECAGG_MODES and args.min_clients < 2:
        raise UsageError(f"--mode {args.mode} needs --min-clients 2 or more (a sum over one client is its score)")
    cfg = ServerConfig(host=args.host, port=args.port, pki_dir=None if args.insecure else args.pki,
                       insecure=args.insecure, metrics_port=args.metrics_port, health_port=args.health_port,
                       max_abs_score=args.max_abs_score, min_protocol_revision=args.min_protocol_revision,
                       max_message_bytes=int(args.max_message_mb * (1 << 20)))

    async def main() -> int:
        server = FederationServer(cfg)
        try:
            port = await server.start()
        except RuntimeError as e:  # grpc: "Failed to bind to address ..."
            if "bind" not in str(e).lower():
                raise
            raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there (not an address of this "
                             "machine, or the port is taken); pick another --host/--port") from None
        print(f"mor-server listening on {args.host}:{port}" + (" (INSECURE)" if args.insecure else " (mTLS)") +
              (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else "") +
              (f", plaintext health on :{server.health_port}" if server.health_port else ""), flush=True)
        stop = asyncio.Event()
        got: list[int] = []
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda s=sig: (got.append(s), stop.set()))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            if args.rounds:
                job = asyncio.ensure_future(_serve_rounds(server, args))
                await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not job.done():  # a signal came first: cancel the wait or the round in flight
                    job.cancel()
                    await asyncio.gather(job, return_exceptions=True)
                    print(f"mor-server: {signal.Signals(got[0]).name}: stopped before --rounds {args.rounds} had "
                          "run", file=sys.stderr, flush=True)
                    return 128 + got[0]
                job.result()  # a TimeoutError waiting for clients: one line, exit code 2
                if args.exit_after_rounds:
                    return 0
            await stopper
            print(f"mor-server: {signal.Signals(got[0]).name}: stopping", file=sys.stderr, flush=True)
            return 0
        finally:
            stopper.cancel()
            await server.stop()

    return asyncio.run(main())


def add_server_commands(sub) -> None:
    """``serve`` and the ``pki`` group: ``mor server`` and ``mor server`` share them."""
    _add_serve(sub)
    _add_pki(sub)


def build_server_parser() -> argparse.ArgumentParser:
    """``mor server``: the same commands as ``mor server``."""
    parser = ArgumentParser(prog="mor-server", description="MoR federation server; the same commands as `mor server`")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    add_server_commands(parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND"))
    return verbose_everywhere(parser)


def server_main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 2 a usage error (one line on stderr naming the flag), 130 interrupted (Ctrl-C)."""
    return _dispatch("mor-server", build_server_parser, argv)


def mor_main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 1 an audit failed, 2 a usage error (one line naming the flag), 130 interrupted."""
    return _dispatch("mor", build_mor_parser, argv)


def build_mor_parser() -> argparse.ArgumentParser:
    """``mor``: every command of the product in groups. ``mor server`` and ``mor client`` remain as aliases of
    ``mor server`` and ``mor client``."""
    from mor_client import cli as client_cli

    parser = ArgumentParser(prog="mor", description="MoR: federated alignment of VLMs by preferences. Start with "
                                                    "`mor demo`; see README for the deployment commands")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    try:
        from . import demo
    except ImportError as e:  # a lean install (no `demo` extra): `mor audit` still works, `mor demo` says what to add
        register_missing(sub, "demo", "run the full federated alignment demo", e, "demo",
                         flags=("--config", "--workdir", "--mode", "--seed", "--steps", "--fresh"))
    else:
        demo.register(sub)
    from . import align_cli

    align_cli.register(sub)
    srv = sub.add_parser("server", help="the federation server: serve, pki (alias: mor-server)")
    add_server_commands(srv.add_subparsers(dest="server_cmd", required=True, metavar="COMMAND"))
    cli = sub.add_parser("client", help="an institution's client: keygen, train, card, join, budget (alias: "
                                        "mor-client)")
    client_cli.add_commands(cli.add_subparsers(dest="client_cmd", required=True, metavar="COMMAND"))
    _add_pki(sub)
    try:
        from . import audit_cli
    except ImportError:  # pragma: no cover - the audit CLI ships with privacy.audit
        audit_cli = None
    if audit_cli is not None:
        audit_cli.register(sub)
    return verbose_everywhere(parser)


def _dispatch(prog: str, build, argv) -> int:
    """Parse and run; expected errors end as one line with exit code 2, Ctrl-C as one line with 130."""

    def parse():
        args = build().parse_args(argv)
        if getattr(args, "cmd", None) == "client":  # exit with an orchestrator that started us (no-op when unset)
            from mor_client.parentwatch import watch_parent

            watch_parent()
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return args

    return run_main(prog, parse, expected=_expected_errors)


def _expected_errors() -> tuple:
    return (UsageError, pki.PKIError, *loaded_errors("privacy.audit.entry:AuditError", "privacy.ledger:LedgerError",
                                                     "mor_client.client:ClientError"))


if __name__ == "__main__":
    sys.exit(server_main())
