"""``mor client``: join a federation, train a reward model, show its card, print the privacy ledger.

Thin shell over the SDK. Errors a user can fix are printed as one line naming the argument (exit code 2).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import logging
import signal
import sys
from pathlib import Path

from mor.cliargs import (VERBOSE_HELP, ArgumentParser, UsageError, client_name, csv_choices, existing_dir,
                         existing_file, float_range, host_port, loaded_errors, non_negative_float, non_negative_int,
                         open_unit_interval, output_dir, output_file, positive_int, run_main)
from mor.modes import MODES
from privacy.pki import ClientCredentials, PKIError

from .client import ClientError, FederationClient
from .release import ReleasePolicy
from .training import add_join_flags as add_training_flags, trainer_from_args

#: privacy modes a client can accept (``--modes``)
CLIENT_MODES = MODES  # mor.modes: the one list of privacy modes


def load_scorer(model: Path | None, scorer_spec: str | None):
    """A scorer from a trained reward-model folder (--model) or a user's ``module:attr`` (--scorer)."""
    if (model is None) == (scorer_spec is None):
        raise UsageError("give exactly one of --model DIR (a trained reward model) or --scorer module:attr")
    if model is not None:
        from .rewards import RewardModelScorer

        if not (model / "card.json").exists():
            raise UsageError(f"--model {model}: no reward model there (expected a folder made by `mor client train`)")
        return RewardModelScorer.from_dir(model)
    return scorer_from_spec(scorer_spec)


def scorer_from_spec(spec: str):
    """Resolve ``--scorer``: ``package.module:attr`` (imported with the current ``sys.path``, so the package must be
    installed or on PYTHONPATH) or ``path/to/file.py:attr`` (the file is loaded as a module under its own name; its
    folder is not added to ``sys.path``). ``attr`` may name a class (instantiated without arguments), an object with
    ``.score(items)``, or a function ``f(items) -> list[list[float]]`` (wrapped in ``FunctionScorer``)."""
    from mor.types import FunctionScorer

    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"--scorer {spec!r}: use package.module:attribute or path/to/file.py:attribute")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"--scorer {spec!r}: no such file {path}")
            mspec = importlib.util.spec_from_file_location(f"mor_user_scorer_{path.stem}", path)
            mod = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(target)
        obj = getattr(mod, attr)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise UsageError(f"--scorer {spec!r}: {type(e).__name__}: {e}") from None
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as e:
            raise UsageError(f"--scorer {spec!r}: the class must be constructible without arguments ({e})") from None
    if hasattr(obj, "score"):
        return obj
    if callable(obj):
        return FunctionScorer(obj)
    raise UsageError(f"--scorer {spec!r} is a {type(obj).__name__}: give a class, an object with .score(items) or "
                     "a function f(items) -> list[list[float]]")


def _card_for(scorer, args) -> dict:
    card = dict(getattr(scorer, "card", None) or {})
    card.setdefault("architecture", type(scorer).__name__)
    card.setdefault("parameter_count", 0)
    if "training_epsilon" not in card:
        eps = card.get("epsilon")
        card["training_epsilon"] = float("inf") if eps in (None, "inf") else float(eps)
    card.setdefault("training_delta", card.get("delta") or 0.0)
    card["supported_modes"] = list(args.modes)
    return card


def _pin_membership(secagg, args, creds) -> None:
    """Pin the membership CA + signed roster (files in --creds, or --roster): peers outside the roster are refused."""
    from privacy.membership import Membership

    membership = None
    if creds is not None:
        d = Path(args.creds)
        if args.roster is not None:
            membership = Membership.from_files(d / "membership-ca.crt", args.roster, d / "membership.crt")
        else:
            membership = Membership.from_creds_dir(d)
    if membership is not None:
        secagg.use_membership(membership)
        print(f"mor-client: secure aggregation limited to the signed roster (serial {membership.roster.serial}, "
              f"{len(membership.roster.members)} members, valid until {membership.roster.not_after:%Y-%m-%d}Z)",
              flush=True)
    elif args.require_membership:
        raise UsageError("--require-membership: --creds has no membership-ca.crt, roster.json and membership.crt "
                         "(from the membership authority: `mor pki membership enrol` / `roster`)")
    else:
        print("mor-client: WARNING: no membership roster pinned (single-CA pilot): the server operator's CA certifies "
              "peers, so an operator keeping its key can mint sybil clients; see README 'PKI and access'",
              file=sys.stderr, flush=True)


def _join(args) -> int:
    if not args.insecure and args.creds is None:
        raise UsageError("--creds is required (or --insecure for local debugging)")
    modes = tuple(m.strip() for m in args.modes_csv.split(",") if m.strip())
    args.modes = modes
    scorer = load_scorer(args.model, args.scorer)
    creds = None if args.insecure else ClientCredentials.from_dir(args.creds)
    ledger = None
    if args.ledger is not None:
        from privacy.ledger import PrivacyLedger

        ledger = PrivacyLedger(args.ledger, client_level_budget=args.budget, delta=args.delta)
    elif "dp" in modes or "secagg+dp" in modes:
        raise UsageError("--modes includes dp: give --ledger PATH (and --budget EPS) so releases are charged")
    try:
        policy = ReleasePolicy(modes, ledger=ledger, max_weight=args.max_weight,
                               min_contributors=args.min_contributors, min_weight_fraction=args.min_weight_fraction,
                               min_weight_grid_steps=args.min_weight_grid_steps,
                               min_collusion_tolerance=args.min_collusion_tolerance)
    except ValueError as e:
        raise UsageError(f"join: {e}") from None
    audit = None
    if args.audit is not None:
        from privacy.audit import AuditLog

        if creds is None or creds.identity_key_pem is None:
            raise UsageError("--audit needs the identity key in --creds (identity.key) to sign the log")
        # a crash (kill -9) can leave a torn last line: keep it in a side file and record a signed recovery
        # entry (privacy/audit/log.py) rather than refusing to start
        from privacy.audit import AuditError

        try:
            audit = AuditLog(args.audit, signing_key=creds.identity_key(), actor=f"client:{creds.name}",
                             on_torn="recover")
        except AuditError as e:  # e.g. another process holds the log, or the log fails verification
            raise UsageError(f"--audit {args.audit}: {e}") from None
        if audit.recovered is not None:
            print(f"mor-client: audit log {args.audit} recovered after an unclean shutdown: "
                  f"{json.dumps(audit.recovered.payload)}", flush=True)
    secagg = None
    if "secagg" in modes or "secagg+dp" in modes:
        from .secagg_session import SecAggSession

        qa = args.query_audit
        if qa is None and ledger is None and creds is not None:
            qa = Path(args.creds) / "secagg-audit.sqlite"  # no ledger: keep the audit with the credentials
        secagg = SecAggSession(creds, ledger=ledger, query_audit=qa)
        _pin_membership(secagg, args, creds)
    client = FederationClient(args.server, creds, scorer, card=_card_for(scorer, args), policy=policy,
                              insecure_client_id=args.insecure_id if args.insecure else None,
                              max_attempts=args.max_attempts, secagg_handler=secagg, audit=audit,
                              trainer=trainer_from_args(args, ledger),  # issue #12: training rounds
                              on_event=lambda kind, info: print(f"[{kind}] {json.dumps(info)}", flush=True)
                              if args.verbose or kind in ("connected", "rejected") else None)

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(client.stop()))
        await client.run()

    try:
        asyncio.run(main())
    finally:
        if audit is not None:
            audit.close()
        if ledger is not None:
            ledger.close()
    s = client.stats
    print(f"mor-client: stopped after {s.tasks} tasks, {s.reports} reports, {s.refusals} refusals", flush=True)
    return 0


def _keygen(args) -> int:
    from privacy import membership
    from privacy.pki import new_tls_key_and_csr

    tls_key, tls_csr = new_tls_key_and_csr(args.name, args.out, force=args.force)
    id_key, id_csr = membership.new_identity(args.name, args.out, force=args.force)
    print(f"{args.name}: private keys {tls_key} and {id_key} (mode 0600: keep them here); send {tls_csr} and "
          f"{id_csr} to the federation operator (`mor pki sign-csr {args.name} --csr DIR`) and put the "
          f"tls.crt, identity.crt and ca.crt you get back into {args.out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``mor client``: the same commands as ``mor client``."""
    from mor.cliargs import verbose_everywhere

    parser = ArgumentParser(prog="mor-client", description="MoR federation client (institution side); the same "
                                                           "commands as `mor client`")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    add_commands(parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND"))
    return verbose_everywhere(parser)


def add_commands(sub) -> None:
    """The client's commands (join, keygen, train, card, budget) on a sub-parser action: ``mor client`` and
    ``mor client`` share them."""
    j = sub.add_parser("join", help="connect to the federation and answer scoring tasks until stopped")
    j.add_argument("--server", required=True, type=host_port, help="host:port of the federation server")
    j.add_argument("--creds", type=existing_dir, help="credentials folder from `mor pki issue-client NAME`")
    j.add_argument("--model", type=existing_dir, help="reward-model folder made by `mor client train`")
    j.add_argument("--scorer", help="your own scorer: package.module:attr or path/to/file.py:attr, naming a class, an "
                                    "object with .score(items) or a function f(items); it must return one list "
                                    "of floats per item, one per candidate (list[list[float]])")
    j.add_argument("--modes", dest="modes_csv", default="plain", type=csv_choices(CLIENT_MODES),
                   help="comma-separated privacy modes this client accepts: plain,dp,secagg,secagg+dp")
    j.add_argument("--ledger", type=output_file, help="privacy ledger (SQLite) charged for dp releases")
    j.add_argument("--budget", type=non_negative_float, default=None,
                   help="client-level epsilon budget enforced by the ledger (default: the one stored in it)")
    j.add_argument("--delta", type=open_unit_interval, default=1e-5, help="delta of the client-level guarantee")
    j.add_argument("--audit", type=output_file, help="write this client's signed audit log (releases, refusals) here")
    g = j.add_argument_group("secure aggregation (secagg, secagg+dp): what this client refuses")
    g.add_argument("--max-weight", type=float_range(0, lo_open=True), default=1.0,
                   help="largest routing weight accepted on any item")
    g.add_argument("--min-contributors", type=positive_int, default=2,
                   help="fewest effective contributors (this client included) on every item it contributes to")
    g.add_argument("--min-weight-fraction", type=float_range(0, 1), default=0.1,
                   help="a peer counts as a contributor only with weight >= this fraction of ours on the item")
    g.add_argument("--min-weight-grid-steps", type=non_negative_float, default=16.0,
                   help="... and >= this many fixed-point steps (2^-frac_bits each)")
    g.add_argument("--min-collusion-tolerance", type=non_negative_int, default=1,
                   help="refuse rounds that tolerate fewer colluding clients per neighbourhood than this")
    g.add_argument("--query-audit", type=output_file, default=None,
                   help="SQLite file remembering round ids and what was summed (default: beside --ledger, else "
                        "in --creds)")
    g.add_argument("--roster", type=existing_file, default=None,
                   help="signed membership roster (default: roster.json in --creds); with membership-ca.crt and "
                        "membership.crt in --creds, peers not on the roster are refused")
    g.add_argument("--require-membership", action="store_true",
                   help="refuse to start without a pinned membership CA and roster (no single-CA pilot mode)")
    j.add_argument("--max-attempts", type=positive_int, default=None,
                   help="give up after this many failed connections (default: retry forever)")
    j.add_argument("--insecure", action="store_true", help="DANGER: no TLS (server must run --insecure)")
    j.add_argument("--insecure-id", default="insecure-client", type=client_name,
                   help="client name claimed with --insecure")
    add_training_flags(j)  # issue #12: --train-policy, --train-partition, ... (mor_client/training.py)
    j.set_defaults(func=_join)
    k = sub.add_parser("keygen", help="enrolment by CSR: make this institution's TLS key and identity key with their "
                                      "CSRs (the keys never leave DIR; send only the .csr files to the operator)")
    k.add_argument("--out", type=output_dir, required=True, metavar="DIR",
                   help="credentials folder to create: tls.key, tls.csr, identity.key, identity.csr")
    k.add_argument("--name", required=True, type=client_name,
                   help="the institution's client name (the certificates' Common Name)")
    k.add_argument("--force", action="store_true", help="replace existing keys (certificates for them stop matching)")
    k.set_defaults(func=_keygen)
    for modname in ("train_cli", "budget_cli"):
        try:
            mod = importlib.import_module(f"mor_client.{modname}")
        except ImportError:  # pragma: no cover - ships with the reward-model / privacy packages
            continue
        mod.register(sub)


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 2 a usage error (one line on stderr naming the flag), 130 interrupted (Ctrl-C)."""
    from .parentwatch import watch_parent

    # first of all (before the slow imports of the subcommands): exit with the orchestrator that started us
    # (MOR_PARENT_PID, set by `mor demo`; a no-op when unset)
    watch_parent()
    def parse():
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return args

    return run_main("mor-client", parse, expected=expected_errors)


def expected_errors() -> tuple:
    """The client commands' user-error classes (printed as one line, exit code 2)."""
    return (UsageError, PKIError, ClientError,
            *loaded_errors("privacy.ledger:LedgerError", "privacy.audit.entry:AuditError"))


if __name__ == "__main__":
    sys.exit(main())
