"""The parameter-sharing baselines (FLORA fedit/stack/ffa, Fed-CMP) as real federations, method x privacy x seed.

Each cell runs a server and three clients over loopback gRPC with mTLS in this process: every client is a
``FederationClient`` with a ``PolicyTrainer`` on its own private partition of the federation split (the same
split, warm-started tiny Llava and held-out test examples as ``mor demo --seed S``), optionally under Opacus
DP-SGD at epsilon 8 for the whole run charged to its own ledger; the server runs R training rounds with
``mor_server.baselines.federated`` and evaluates the merged policy. Every finished cell is cached as one JSON file
(``--cache``), so an interrupted grid resumes where it stopped; progress and an estimate of the time left are
printed. Writes a table (stdout), ``benchmarks/results/baselines[_quick].json`` and a PNG.

This is sections 1-3 of issue #12 measured; the reward-mixing ablations and scenarios B/C (sections 4-5) are not
part of it yet.

    .venv/bin/python benchmarks/bench_baselines.py --quick            # CI-sized smoke grid (1 seed, small)
    .venv/bin/python benchmarks/bench_baselines.py --seeds 0 1 2      # the grid (hours on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("fedit", "stack", "ffa", "fedcmp")
CLIENTS = ("client0", "client1", "client2")


def _reference(seed: int, cache: Path, eval_size: int):
    """The warm start of ``mor demo --seed S`` (tiny Llava, SFT-50 on the server's public split), its held-out
    test examples and its accuracy (cached)."""
    from mor_client.data import make_federation_split
    from mor_server.alignment.pipeline import heldout_test
    from mor_server.alignment.evaluate import accuracy
    from mor_server.alignment.policy import TinyLlavaConfig
    from mor_server.alignment.warmstart import SFTConfig, warm_start_cached

    split = make_federation_split(seed=seed, n_clients=3)
    test = heldout_test(split)[:eval_size]
    model, proc, _ = warm_start_cached(cache / f"seed{seed}" / "reference", split.server_public,
                                       tiny=TinyLlavaConfig(seed=seed), sft=SFTConfig(steps=50, seed=seed),
                                       progress=False)
    model.to("cpu").eval()
    f = cache / f"seed{seed}" / f"reference_accuracy_{eval_size}.json"
    if f.is_file():
        acc = json.loads(f.read_text())
    else:
        acc = accuracy(model, proc, test)
        acc = {k: acc[k] for k in ("overall", "by_domain", "n")}
        f.write_text(json.dumps(acc))
    return split, test, model, proc, acc


async def _federated_run(split, test, model, proc, method: str, epsilon: float, seed: int, args) -> dict:
    from mor_client import ClientCredentials, FederationClient, ReleasePolicy
    from mor_client.baselines import PolicyTrainer, examples_from_pairs
    from mor_client.secagg_session import SecAggSession
    from mor_server.baselines.federated import BaselineConfig, run_baseline
    from mor_server.federation.config import ServerConfig
    from mor_server.federation.server import FederationServer
    from privacy import pki
    from privacy.ledger import PrivacyLedger

    secagg = args.secagg and method in ("fedit", "ffa")
    with tempfile.TemporaryDirectory(prefix="bench-baselines-") as tmp:
        tmp = Path(tmp)
        pki.init_ca(tmp / "pki")
        for c in CLIENTS:
            pki.issue_client(tmp / "pki", c)
        server = FederationServer(ServerConfig(pki_dir=tmp / "pki", audit_path=tmp / "audit.jsonl",
                                               metrics_port=None))
        await server.start()
        ledgers, clients = {}, []
        for c in CLIENTS:
            ledgers[c] = PrivacyLedger(tmp / f"{c}.sqlite")
            trainer = PolicyTrainer(model, proc, examples_from_pairs(split.clients[c].train), ledger=ledgers[c],
                                    max_examples=args.max_pairs, model_id=f"{method}-{c}", device=args.device)
            creds = ClientCredentials.from_dir(tmp / "pki" / "clients" / c)
            modes = ("plain", "secagg") if secagg else ("plain",)
            clients.append(FederationClient(
                f"localhost:{server.port}", creds, _NoScore(), card={"architecture": "baseline-client",
                                                                     "supported_modes": list(modes)},
                policy=ReleasePolicy(modes), trainer=trainer,
                secagg_handler=SecAggSession(creds) if secagg else None))
        tasks = [asyncio.create_task(c.run()) for c in clients]
        try:
            hp = {"learning_rate": args.lr, "batch_size": args.batch_size, "local_epochs": args.local_epochs,
                  "epsilon": epsilon, "delta": args.delta, "max_grad_norm": args.max_grad_norm,
                  "objective": args.objective, "dpo_beta": args.dpo_beta}
            cfg = BaselineConfig(method, rounds=args.rounds, hparams=hp, timeout=args.round_timeout, seed=seed,
                                 secagg=secagg)
            t0 = time.perf_counter()
            out = await run_baseline(server, model, proc, cfg, test, wait_clients=len(CLIENTS))
            wall = time.perf_counter() - t0
            metrics = {"bytes_received": server.metrics.value("mor_received_bytes_total")
                       or server.metrics.value("mor_bytes_received_total"),
                       "bytes_sent": server.metrics.value("mor_sent_bytes_total")
                       or server.metrics.value("mor_bytes_sent_total")}
        finally:
            for c in clients:
                await c.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.stop()
            eps = {c: ledgers[c].epsilon("pair") for c in CLIENTS}
            for led in ledgers.values():
                led.close()
    acc = out["accuracy"]
    return {"method": method, "epsilon_target": epsilon, "seed": seed, "secagg": secagg,
            "objective": args.objective, "learning_rate": args.lr,
            "accuracy": acc["overall"], "by_domain": acc["by_domain"], "collapsed": acc.get("collapsed", []),
            "rounds": out["rounds"], "completed": out["completed"], "failed": out["failed"],
            "epsilon_per_client": eps, "update_bytes_per_client_per_round": out["update_bytes_per_client_per_round"],
            "broadcast_bytes_per_round": out["broadcast_bytes_per_round"], "server_metrics": metrics,
            "server_sees": out["server_sees"], "train_wall_s": out["train_seconds"], "wall_s": wall}


class _NoScore:
    def score(self, items):
        raise RuntimeError("a baseline client has no reward model")


def _cell_key(method, eps, seed, args) -> str:
    h = hashlib.sha256(json.dumps({"m": method, "e": eps, "s": seed, "r": args.rounds, "lr": args.lr,
                                   "b": args.batch_size, "ep": args.local_epochs, "d": args.delta,
                                   "c": args.max_grad_norm, "p": args.max_pairs, "n": args.eval_size,
                                   "sa": bool(args.secagg), "v": 1,
                                   **({"o": args.objective, "beta": args.dpo_beta} if args.objective != "sft" else {})},
                                  sort_keys=True).encode()).hexdigest()[:12]
    return f"{method}-{'inf' if math.isinf(eps) else f'eps{eps:g}'}-seed{seed}-{h}"


def _fmt(vals) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{100 * vals[0]:.1f}"
    return f"{100 * statistics.mean(vals):.1f} ± {100 * statistics.stdev(vals):.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke grid: seed 0, 2 rounds, 64 pairs per client, 120 test examples")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--privacy", nargs="+", default=["inf", "8"], help="run-level epsilon per client; inf: no DP")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--objective", choices=("sft", "dpo"), default="sft",
                    help="clients' local objective: SFT on the chosen answers, or DPO on the pairs")
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--max-pairs", type=int, default=1000, help="training pairs per client (a data-independent cap)")
    ap.add_argument("--eval-size", type=int, default=600)
    ap.add_argument("--round-timeout", type=float, default=1800.0)
    ap.add_argument("--secagg", action="store_true", help="fedit and ffa under SecAgg+ over the parameter vector")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "baselines")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.max_pairs, args.eval_size = [0], 2, 64, 120
    out_path = args.out or ROOT / "benchmarks" / "results" / ("baselines_quick.json" if args.quick else
                                                              "baselines.json")
    import torch

    torch.set_num_threads(2)
    args.cache.mkdir(parents=True, exist_ok=True)
    cells = [(m, math.inf if p == "inf" else float(p), s) for s in args.seeds for p in args.privacy
             for m in args.methods]
    results, refs, t_start, done_new = [], {}, time.perf_counter(), 0
    for i, (method, eps, seed) in enumerate(cells):
        f = args.cache / "cells" / f"{_cell_key(method, eps, seed, args)}.json"
        if f.is_file():
            results.append(json.loads(f.read_text()))
            print(f"[{i + 1}/{len(cells)}] {method} eps={eps:g} seed={seed}: cached "
                  f"({100 * results[-1]['accuracy']:.1f}%)", flush=True)
            continue
        if seed not in refs:
            refs[seed] = _reference(seed, args.cache, args.eval_size)
        split, test, model, proc, _ = refs[seed]
        t0 = time.perf_counter()
        cell = asyncio.run(_federated_run(split, test, model, proc, method, eps, seed, args))
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(cell, indent=1, default=str))
        tmp.replace(f)
        results.append(cell)
        done_new += 1
        per = (time.perf_counter() - t_start) / done_new
        left = sum(1 for (m, e, s) in cells[i + 1:]
                   if not (args.cache / "cells" / f"{_cell_key(m, e, s, args)}.json").is_file())
        print(f"[{i + 1}/{len(cells)}] {method} eps={eps:g} seed={seed}: {100 * cell['accuracy']:.1f}% "
              f"({cell['completed']}/{cell['rounds']} rounds, eps/client "
              f"{max(cell['epsilon_per_client'].values()):.2f}) in {time.perf_counter() - t0:.0f} s; "
              f"about {per * left / 60:.1f} min left", flush=True)
    ref_acc = {}
    for s in args.seeds:
        fr = args.cache / f"seed{s}" / f"reference_accuracy_{args.eval_size}.json"
        if fr.is_file():
            ref_acc[s] = json.loads(fr.read_text())
    print(f"\nheld-out easy-vqa test accuracy (%), {len(args.seeds)} seed(s), {args.rounds} rounds, "
          f"{args.max_pairs} pairs/client, {args.eval_size} test examples, objective {args.objective}, lr {args.lr:g}; "
          "mean ± std over seeds")
    print(f"{'method':<8} {'epsilon':>8} {'overall':>14} {'colour':>8} {'shape':>8} {'yes/no':>8} "
          f"{'bytes/client/round':>19} {'server sees':<12}")
    if ref_acc:
        r = list(ref_acc.values())
        print(f"{'ref':<8} {'-':>8} {_fmt([x['overall'] for x in r]):>14} "
              f"{_fmt([x['by_domain'].get('color', 0) for x in r]):>8} {_fmt([x['by_domain'].get('shape', 0) for x in r]):>8} "
              f"{_fmt([x['by_domain'].get('yesno', 0) for x in r]):>8} {'-':>19} (SFT-50 warm start)")
    rows = []
    for method in args.methods:
        for p in args.privacy:
            eps = math.inf if p == "inf" else float(p)
            cs = [c for c in results if c["method"] == method and c["epsilon_target"] == eps]
            if not cs:
                continue
            row = {"method": method, "epsilon": p, "seeds": [c["seed"] for c in cs],
                   "accuracy": [c["accuracy"] for c in cs],
                   "by_domain": {d: [c["by_domain"].get(d, 0.0) for c in cs] for d in ("color", "shape", "yesno")},
                   "epsilon_per_client": [c["epsilon_per_client"] for c in cs],
                   "update_bytes_per_client_per_round": cs[0]["update_bytes_per_client_per_round"],
                   "server_sees": cs[0]["server_sees"], "wall_s": [c["wall_s"] for c in cs]}
            rows.append(row)
            print(f"{method:<8} {p:>8} {_fmt(row['accuracy']):>14} {_fmt(row['by_domain']['color']):>8} "
                  f"{_fmt(row['by_domain']['shape']):>8} {_fmt(row['by_domain']['yesno']):>8} "
                  f"{row['update_bytes_per_client_per_round']:>19} "
                  f"{'sum only' if 'SecAgg' in row['server_sees'] else 'each update'}")
    report = {"command": " ".join(["benchmarks/bench_baselines.py", *(argv or sys.argv[1:])]),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "reference": ref_acc, "rows": rows, "cells": results}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {out_path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['method']}\n{'no DP' if r['epsilon'] == 'inf' else 'eps ' + r['epsilon']}" for r in rows]
        means = [100 * statistics.mean(r["accuracy"]) for r in rows]
        errs = [100 * statistics.stdev(r["accuracy"]) if len(r["accuracy"]) > 1 else 0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=errs, color="tab:blue")
        if ref_acc:
            ax.axhline(100 * statistics.mean(x["overall"] for x in ref_acc.values()), color="gray", ls="--",
                       label="reference (SFT-50)")
            ax.legend()
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title("parameter-sharing baselines over the federation")
        fig.tight_layout()
        png = out_path.with_suffix(".png")
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")
    except Exception as e:  # plotting is a convenience
        print(f"(no plot: {type(e).__name__}: {e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
