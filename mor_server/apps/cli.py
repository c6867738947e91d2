"""The ``mor`` command (every group: server, client, pki, audit, demo, align) and its alias ``mor-server``.

The server group (``serve``) is here; each other group's commands are in their own module (``pki_cli``,
``align_cli``, ``demo``, ``audit_cli``; the client's in :mod:`mor_client.cli`).

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

from mor.cliargs import (VERBOSE_HELP, ArgumentParser, UsageError, bind_host, existing_dir, float_range, loaded_errors,
                         non_negative_int, port, positive_float, positive_int, register_missing, run_main,
                         verbose_everywhere)
from mor.modes import MODES, SECAGG_MODES
from privacy import pki

from .pki_cli import add_pki_commands

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
    """``serve`` and the ``pki`` group: ``mor-server`` and ``mor server`` share them."""
    _add_serve(sub)
    add_pki_commands(sub)


def build_server_parser() -> argparse.ArgumentParser:
    """``mor-server``: the same commands as ``mor server``."""
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
    add_pki_commands(sub)
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
