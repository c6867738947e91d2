"""``mor pki``: the federation's certificates (init, issue, revoke, renew, CRL) and its membership authority
(``mor pki membership``). Thin shells over :mod:`privacy.pki` and :mod:`privacy.membership`; errors a user can fix
are one line naming the flag (exit code 2)."""

from __future__ import annotations

from pathlib import Path

from mor.cliargs import (UsageError, client_name, dir_path, existing_dir, existing_file, host_list, output_dir,
                         output_file, positive_float)
from privacy import pki

#: help of the flag naming the PKI folder (``--pki``; ``--dir`` is its former name, still accepted)
PKI_HELP = "PKI folder made by `mor pki init` (--dir: the same flag's former name)"
#: help of the flag naming the membership authority's folder
MEMBERSHIP_HELP = "membership folder made by `mor pki membership init` (--dir: the same flag's former name)"


def add_pki_commands(sub) -> None:
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
