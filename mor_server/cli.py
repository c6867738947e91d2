"""Command lines of the server side: ``mor-server`` (PKI, serving) and ``mor`` (the main job, audits).

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

from privacy import pki


class UsageError(Exception):
    """A user-fixable problem; printed as one line."""


def _add_pki(sub) -> None:
    p = sub.add_parser("pki", help="federation CA and certificates")
    ps = p.add_subparsers(dest="pki_cmd", required=True)
    init = ps.add_parser("init", help="create the federation CA and the server certificate")
    init.add_argument("--dir", type=Path, default=Path("pki"), help="PKI folder (default: ./pki)")
    init.add_argument("--hosts", default="localhost,127.0.0.1,::1",
                      help="comma-separated host names/IPs the server certificate is valid for")
    init.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every certificate)")
    init.set_defaults(func=_pki_init)
    iss = ps.add_parser("issue-client", help="issue a client's TLS + identity certificates")
    iss.add_argument("name", help="client name (becomes its identity: the certificate's Common Name)")
    iss.add_argument("--dir", type=Path, default=Path("pki"))
    iss.add_argument("--days", type=float, default=365)
    iss.add_argument("--out", type=Path, default=None, help="output folder (default: PKI/clients/NAME)")
    iss.set_defaults(func=_pki_issue)
    rev = ps.add_parser("revoke", help="revoke every certificate issued to a client (a running server picks it up)")
    rev.add_argument("name")
    rev.add_argument("--dir", type=Path, default=Path("pki"))
    rev.set_defaults(func=_pki_revoke)


def _pki_init(args) -> int:
    pki.init_ca(args.dir, server_hosts=tuple(h.strip() for h in args.hosts.split(",") if h.strip()), force=args.force)
    print(f"federation CA and server certificate written to {args.dir}/ (keep {args.dir}/ca/ca.key offline)")
    return 0


def _pki_issue(args) -> int:
    out = pki.issue_client(args.dir, args.name, days=args.days, out_dir=args.out)
    print(f"client {args.name}: credentials in {out}/ (tls.key, tls.crt, identity.key, identity.crt, ca.crt); "
          "hand this folder to the institution over a secure channel")
    return 0


def _pki_revoke(args) -> int:
    serials = pki.revoke(args.dir, args.name)
    print(f"revoked {len(serials)} certificate(s) of {args.name}: " + ", ".join(f"{s:x}" for s in serials))
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the federation server")
    p.add_argument("--pki", type=Path, default=Path("pki"), help="PKI folder made by `mor-server pki init`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--insecure", action="store_true",
                   help="DANGER: serve without TLS (identities unauthenticated); local debugging only")
    p.add_argument("--max-message-mb", type=float, default=16.0)
    p.add_argument("--rounds", type=int, default=0,
                   help="after --min-clients join, run this many scoring rounds on public easy-vqa items and print them")
    p.add_argument("--items", type=int, default=64, help="items per scoring task (with --rounds)")
    p.add_argument("--min-clients", type=int, default=1)
    p.add_argument("--timeout", type=float, default=30.0, help="per-round deadline in seconds")
    p.add_argument("--exit-after-rounds", action="store_true", help="stop once --rounds have run")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from .server import FederationServer, ServerConfig

    if args.port < 0 or args.port > 65535:
        raise UsageError(f"--port {args.port} is not a TCP port (0-65535)")
    cfg = ServerConfig(host=args.host, port=args.port, pki_dir=None if args.insecure else args.pki,
                       insecure=args.insecure, metrics_port=args.metrics_port,
                       max_message_bytes=int(args.max_message_mb * (1 << 20)))

    async def main():
        server = FederationServer(cfg)
        port = await server.start()
        print(f"mor-server listening on {args.host}:{port}" + (" (INSECURE)" if args.insecure else " (mTLS)") +
              (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else ""), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            if args.rounds:
                from .public_items import public_scoring_items

                await server.wait_for_clients(args.min_clients, timeout=600)
                items = public_scoring_items(args.items)
                for i in range(args.rounds):
                    out = await server.run_round(items, min_clients=args.min_clients, timeout=args.timeout)
                    print(f"round {out.round_id}: {out.state.value} in {out.latency * 1000:.1f} ms; "
                          f"responders={list(out.responders)} dropped={out.dropped or '{}'}"
                          + (f" reason={out.reason}" if out.reason else ""), flush=True)
                if args.exit_after_rounds:
                    return
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(main())
    return 0


def server_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mor-server", description="MoR federation server")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_pki(sub)
    _add_serve(sub)
    return _dispatch(parser, argv)


def mor_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mor", description="MoR: federated alignment of VLMs by preferences")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    from . import demo

    demo.register(sub)
    try:
        from . import audit_cli
    except ImportError:  # pragma: no cover - the audit CLI ships with privacy.audit
        audit_cli = None
    if audit_cli is not None:
        audit_cli.register(sub)
    return _dispatch(parser, argv)


def _dispatch(parser: argparse.ArgumentParser, argv) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (UsageError, pki.PKIError, ValueError, FileNotFoundError, TimeoutError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(server_main())
