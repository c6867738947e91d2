"""The parameter-sharing baselines (FLORA fedit/stack/ffa, Fed-CMP) as real federations, method x privacy x seed.

Each cell runs a server and three clients over loopback gRPC with mTLS in this process: every client is a
``FederationClient`` with a ``PolicyTrainer`` on its own private partition of the federation split (the same
split, warm start (``--warm-start``) and held-out test examples as ``mor demo --seed S``), optionally under Opacus
DP-SGD at epsilon 8 for the whole run charged to its own ledger; the server runs R training rounds with
``mor_server.baselines.federated`` and evaluates the merged policy. Every finished cell is cached as one JSON file
(``--cache``), so an interrupted grid resumes where it stopped; progress and an estimate of the time left are
printed. Writes a table (stdout), ``benchmarks/results/baselines[_quick].json`` and a PNG.

Scenarios (``--scenario``, issue #12 section 5): ``honest`` (the demo's three clients, one easy-vqa question type
each), ``adversary`` (plus a fourth client whose preferences are adversarially inverted: a balanced sample of the
honest clients' training pairs, ``--max-pairs`` in all, with chosen and rejected swapped; it trains and is averaged
like the others) and ``shapes`` (a fourth client holds the procedural shapes family; the split, the warm start and
the held-out test are those of ``make_federation_split(n_clients=4, include_shapes_client=True)``).

The Mixture-of-Rewards side of the comparison (``--methods mor uniform oracle server``) runs through
``bench_reward_ablation.py``'s cells (the same split, the same warm start, the recipe's own GRPO budget as in the
demo, in process; cached in its own cache), so one invocation prints MoR and the baselines side by side, per scenario.

Warm start (``--warm-start``, a recipe of ``mor demo --warm-start``): ``sft`` (the default, the committed table: the
tiny Llava with SFT-50 on the server's public split, 400 GRPO steps) or any other recipe, e.g. ``seeing``, the demo's
default (150 GRPO steps): every cell, MoR's and the baselines', then starts from bench_reward_ablation.py's reference
of that recipe in ``--reward-cache`` (one checkpoint per seed for both families).

    .venv/bin/python benchmarks/bench_baselines.py --quick            # CI-sized smoke grid (1 seed, small)
    .venv/bin/python benchmarks/bench_baselines.py --seeds 0 1 2      # the grid (hours on 2 CPU cores)
    .venv/bin/python benchmarks/bench_baselines.py --scenario honest adversary shapes \\
        --methods mor uniform oracle server fedit stack ffa fedcmp   # everything, side by side
    .venv/bin/python benchmarks/bench_baselines.py --warm-start seeing --privacy 8 \\
        --reward-cache benchmarks/.cache/reward_ablation_seeing --out benchmarks/results/baselines_seeing.json \\
        --methods mor uniform oracle fedit stack ffa fedcmp        # the same on the demo's default policy
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_reward_ablation (the Mixture-of-Rewards cells)

from mor_server.alignment.recipes import WARM_STARTS  # noqa: E402

METHODS = ("fedit", "stack", "ffa", "fedcmp")
REWARD_METHODS = ("mor", "uniform", "oracle", "server")  # bench_reward_ablation.py's cells (the same warm start)
SCENARIOS = ("honest", "adversary", "shapes")


def adversary_examples(split, seed: int, n: int) -> list:
    """The adversarial fourth client's examples: ``n`` pairs drawn evenly from the honest clients' training pairs,
    chosen and rejected swapped (it fine-tunes towards wrong answers of every question type)."""
    import random

    from mor_client.baselines import SFTExample

    rng = random.Random(f"{seed}:adversary")
    names = sorted(split.clients)
    out = []
    for k, name in enumerate(names):
        pairs = list(split.clients[name].train)
        take = n // len(names) + (1 if k < n % len(names) else 0)
        out += [SFTExample(p.example.image, p.example.question, p.rejected, p.chosen)
                for p in rng.sample(pairs, min(take, len(pairs)))]
    rng.shuffle(out)
    return out


def client_examples(scenario: str, split, seed: int, max_pairs: int) -> dict:
    """Each client's private training examples in a scenario (name -> examples)."""
    from mor_client.baselines import examples_from_pairs

    out = {name: examples_from_pairs(c.train) for name, c in sorted(split.clients.items())}
    if scenario == "adversary":
        out["adversary"] = adversary_examples(split, seed, max_pairs)
    return out


def reference_folder(cache: Path, seed: int, scenario: str = "honest", warm_start: str = "sft") -> Path:
    """Where a seed's reference accuracy (and, for ``sft``, the reference itself) is cached: the adversary adds no
    server data, so it shares the honest scenario's."""
    return cache / f"{'' if warm_start == 'sft' else warm_start.replace('+', '_') + '-'}seed{seed}" \
        f"{'-shapes' if scenario == 'shapes' else ''}"


def reference_checkpoint(cache: Path, seed: int, scenario: str = "honest", warm_start: str = "sft",
                         reward_cache: Path | None = None) -> Path:
    """The folder of the checkpoint every cell of a seed starts from: ``sft``'s in this bench's cache, any other
    recipe's in bench_reward_ablation.py's ``reward_cache``."""
    if warm_start == "sft":
        return reference_folder(cache, seed, scenario, warm_start) / "reference"
    from bench_reward_ablation import reference_dir

    return reference_dir(warm_start, seed, reward_cache, "-shapes" if scenario == "shapes" else "")


def _reference(seed: int, cache: Path, eval_size: int, scenario: str = "honest", warm_start: str = "sft",
               reward_cache: Path | None = None):
    """The warm start of ``mor demo --seed S --warm-start W`` of a scenario's split, its held-out test examples and
    its accuracy (cached). ``sft`` (tiny Llava, SFT-50 on the server's public split) is cached here, as this bench
    always did; any other recipe is bench_reward_ablation.py's reference in ``reward_cache`` (the very checkpoint
    the Mixture-of-Rewards cells start from)."""
    from bench_reward_ablation import from_other_build, reference_digest, reference_model, scenario_split

    from mor_server.alignment.pipeline import heldout_test
    from mor_server.alignment.evaluate import accuracy
    from mor_server.alignment.policy import TinyLlavaConfig
    from mor_server.alignment.warmstart import SFTConfig, warm_start_cached

    split = scenario_split(scenario, seed)
    test = heldout_test(split)[:eval_size]
    cache = reference_folder(cache, seed, scenario, warm_start)
    if warm_start == "sft":
        checkpoint = cache / "reference"
        model, proc, _ = warm_start_cached(checkpoint, split.server_public,
                                           tiny=TinyLlavaConfig(seed=seed), sft=SFTConfig(steps=50, seed=seed),
                                           progress=False)
    else:
        model, proc, checkpoint = reference_model(warm_start, seed, split, reward_cache,
                                                  tag="-shapes" if scenario == "shapes" else "")
    cache.mkdir(parents=True, exist_ok=True)
    model.to("cpu").eval()
    f = cache / f"reference_accuracy_{eval_size}.json"
    acc = json.loads(f.read_text()) if f.is_file() else None
    if acc is None or from_other_build(acc, checkpoint):
        acc = accuracy(model, proc, test)
        acc = {k: acc[k] for k in ("overall", "by_domain", "n")}
        acc["reference_sha256"] = reference_digest(checkpoint)
        f.write_text(json.dumps(acc))
    return split, test, model, proc, acc


async def _federated_run(data: dict, test, model, proc, method: str, epsilon: float, seed: int, args) -> dict:
    """One baseline cell: a server and one client per entry of ``data`` (name -> private examples) over loopback
    gRPC with mTLS."""
    from mor_client import ClientCredentials, FederationClient, ReleasePolicy
    from mor_client.baselines import PolicyTrainer
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
        CLIENTS = list(data)
        for c in CLIENTS:
            pki.issue_client(tmp / "pki", c)
        server = FederationServer(ServerConfig(pki_dir=tmp / "pki", audit_path=tmp / "audit.jsonl",
                                               metrics_port=None))
        await server.start()
        ledgers, clients = {}, []
        for c in CLIENTS:
            ledgers[c] = PrivacyLedger(tmp / f"{c}.sqlite")
            trainer = PolicyTrainer(model, proc, data[c], ledger=ledgers[c],
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


def _cell_key(method, eps, seed, args, scenario: str = "honest") -> str:
    ws = args.warm_start  # the sft cells keep the keys they were recorded under
    h = hashlib.sha256(json.dumps({"m": method, "e": eps, "s": seed, "r": args.rounds, "lr": args.lr,
                                   "b": args.batch_size, "ep": args.local_epochs, "d": args.delta,
                                   "c": args.max_grad_norm, "p": args.max_pairs, "n": args.eval_size,
                                   "sa": bool(args.secagg), "v": 1,
                                   **({"o": args.objective, "beta": args.dpo_beta} if args.objective != "sft" else {}),
                                   **({"sc": scenario} if scenario != "honest" else {}),
                                   **({"ws": ws} if ws != "sft" else {})},
                                  sort_keys=True).encode()).hexdigest()[:12]
    sc = "" if scenario == "honest" else f"{scenario}-"
    w = "" if ws == "sft" else f"{ws.replace('+', '_')}-"
    return f"{w}{sc}{method}-{'inf' if math.isinf(eps) else f'eps{eps:g}'}-seed{seed}-{h}"


def _fmt(vals) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{100 * vals[0]:.1f}"
    return f"{100 * statistics.mean(vals):.1f} ± {100 * statistics.stdev(vals):.1f}"


def reward_label(warm_start: str, steps: int | None) -> str:
    """bench_reward_ablation.py's policy label of the Mixture-of-Rewards cells: the warm start, with
    ``~max_steps=N`` when ``--grpo-steps`` is not the recipe's own budget (as that bench's ``--steps`` labels it)."""
    from bench_reward_ablation import recipe_steps

    return warm_start if steps in (None, recipe_steps(warm_start)) else f"{warm_start}~max_steps={steps}"


def _reward_cell(scenario: str, method: str, seed: int, cache: Path, label: str, cells: Path) -> dict:
    """A Mixture-of-Rewards cell (bench_reward_ablation.py's cell of policy label ``label``; its reward models and
    references in ``cache``), run or read from ``cells``, in the baselines' row format. A cached cell that started
    from another build of the reference than the one in ``cache`` (another host's kernels) is measured again, so
    that it pairs with the baselines' cells, which start from the reference in ``cache``."""
    from bench_reward_ablation import cell_name, other_reference, recipe_steps, run_cell

    steps = recipe_steps(label)
    f = cells / f"{cell_name(label, scenario, method, seed)}.json"
    c = json.loads(f.read_text()) if f.is_file() else None
    if c is None or other_reference(c, cache):
        c = run_cell(label, scenario, method, seed, cache, steps)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(c, indent=1, default=str))
        tmp.replace(f)
    sees = {"oracle": "nothing from clients (an exact-match label oracle: the ceiling)",
            "server": "nothing from clients (its own public split only)"}.get(
        method, "each client's scores (plain; under secagg only their routed sum)")
    return {"scenario": scenario, "method": method, "epsilon_target": None, "seed": seed, "secagg": False,
            "accuracy": c["after"]["overall"], "reference": c["before"]["overall"],
            "by_domain": c["after"]["by_domain"],
            "collapsed": [t for t, d in c["after"].get("diversity", {}).items() if d.get("collapsed")],
            "epsilon_per_client": ({} if method in ("oracle", "server") else "8 (DP-SGD training of each reward model)"),
            "client_sends_per_round": ("-" if method in ("oracle", "server") else
                                       "one score per completion (64 a round)"),
            "server_sees": sees, "rounds": c["rounds"], "wall_s": c["seconds"], "grpo_steps": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke grid: seed 0, 2 rounds, 64 pairs per client, 120 test examples, 4 GRPO steps")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + REWARD_METHODS,
                    help="baselines (fedit stack ffa fedcmp) and Mixture-of-Rewards cells (mor uniform oracle server)")
    ap.add_argument("--scenario", nargs="+", default=["honest"], choices=SCENARIOS)
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
    ap.add_argument("--reward-cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "reward_ablation",
                    help="bench_reward_ablation.py's cache (the Mixture-of-Rewards cells)")
    ap.add_argument("--grpo-steps", type=int, default=None,
                    help="GRPO steps of the Mixture-of-Rewards cells (default: the warm start's own, as in the demo: "
                         "150 for seeing, 400 for the others)")
    ap.add_argument("--warm-start", default="sft", choices=WARM_STARTS,
                    help="the policy every cell starts from (mor demo --warm-start): sft (default; the committed "
                         "table), or e.g. seeing, the demo's default, whose reference is bench_reward_ablation.py's "
                         "in --reward-cache")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.max_pairs, args.eval_size, args.grpo_steps = [0], 2, 64, 120, 4
    if args.grpo_steps is not None and args.grpo_steps < 1:
        raise SystemExit(f"--grpo-steps must be >= 1, got {args.grpo_steps}")
    reward_policy = reward_label(args.warm_start, args.grpo_steps)
    from bench_reward_ablation import from_other_build, other_reference, recipe_steps
    args.grpo_steps = recipe_steps(reward_policy)
    # the quick cells (other GRPO steps) never mix with the full ones; reward models and references are shared
    reward_cells = args.cache / "reward_quick_cells" if args.quick else args.reward_cache / "cells"
    out_path = args.out or ROOT / "benchmarks" / "results" / ("baselines_quick.json" if args.quick else
                                                              "baselines.json")
    import torch

    torch.set_num_threads(2)
    args.cache.mkdir(parents=True, exist_ok=True)
    cells = [(sc, m, None if m in REWARD_METHODS else (math.inf if p == "inf" else float(p)), s)
             for sc in args.scenario for s in args.seeds for m in args.methods
             for p in (["-"] if m in REWARD_METHODS else args.privacy)
             if not (m in ("oracle", "server") and sc == "adversary")]  # no client in them: as in honest

    def cached(sc, m, e, s) -> Path | None:
        if m in REWARD_METHODS:
            from bench_reward_ablation import cell_name
            f = reward_cells / f"{cell_name(reward_policy, sc, m, s)}.json"
        else:
            f = args.cache / "cells" / f"{_cell_key(m, e, s, args, sc)}.json"
        return f

    results, refs, t_start, done_new = [], {}, time.perf_counter(), 0
    for i, (sc, method, eps, seed) in enumerate(cells):
        label = f"[{i + 1}/{len(cells)}] {sc} {method}" + ("" if eps is None else f" eps={eps:g}") + f" seed={seed}"
        f = cached(sc, method, eps, seed)
        was_cached = f.is_file()
        if was_cached:  # recorded from another build of the reference: run again
            rec = json.loads(f.read_text())
            was_cached = not (other_reference(rec, args.reward_cache) if method in REWARD_METHODS else
                              from_other_build(rec, reference_checkpoint(args.cache, seed, sc, args.warm_start,
                                                                         args.reward_cache)))
        t0 = time.perf_counter()
        if method in REWARD_METHODS:
            if not was_cached:
                print(f"{label}: running ({args.grpo_steps} GRPO steps)", flush=True)
            cell = _reward_cell(sc, method, seed, args.reward_cache, reward_policy, reward_cells)
        elif was_cached:
            cell = json.loads(f.read_text())
        else:
            if (sc, seed) not in refs:
                refs[(sc, seed)] = _reference(seed, args.cache, args.eval_size, sc, args.warm_start,
                                              args.reward_cache)
            split, test, model, proc, ref_acc_now = refs[(sc, seed)]
            data = client_examples(sc, split, seed, args.max_pairs)
            cell = asyncio.run(_federated_run(data, test, model, proc, method, eps, seed, args))
            cell["reference_sha256"] = ref_acc_now.get("reference_sha256")  # the checkpoint it started from
            cell["scenario"] = sc
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps(cell, indent=1, default=str))
            tmp.replace(f)
        cell.setdefault("scenario", "honest")
        results.append(cell)
        if was_cached:
            print(f"{label}: cached ({100 * cell['accuracy']:.1f}%)", flush=True)
            continue
        done_new += 1
        per = (time.perf_counter() - t_start) / done_new
        left = sum(1 for c in cells[i + 1:] if not cached(*c).is_file())
        print(f"{label}: {100 * cell['accuracy']:.1f}% in {time.perf_counter() - t0:.0f} s; "
              f"about {per * left / 60:.1f} min left", flush=True)
    ref_acc = {}
    for sc in args.scenario:
        for s in args.seeds:
            fr = reference_folder(args.cache, s, sc, args.warm_start) / f"reference_accuracy_{args.eval_size}.json"
            if not fr.is_file() or from_other_build(json.loads(fr.read_text()), reference_checkpoint(
                    args.cache, s, sc, args.warm_start, args.reward_cache)):  # measured once here (or again)
                _reference(s, args.cache, args.eval_size, sc, args.warm_start, args.reward_cache)
            if fr.is_file():
                ref_acc[f"{sc}/{s}"] = json.loads(fr.read_text())
    print(f"\nheld-out test accuracy (%), seeds {args.seeds}, mean ± std over seeds; baselines: {args.rounds} rounds, "
          f"{args.max_pairs} pairs/client, {args.eval_size} test examples, objective {args.objective}, lr {args.lr:g}; "
          f"Mixture-of-Rewards cells: {args.grpo_steps} GRPO steps, 600 test examples")
    rows = []
    for sc in args.scenario:
        domains = sorted({d for c in results if c["scenario"] == sc for d in c["by_domain"]},
                         key=lambda d: (d not in ("color", "shape", "yesno"), d))
        print(f"\nscenario {sc}")
        print(f"{'method':<8} {'epsilon':>8} {'overall':>14} " + "".join(f"{d:>13}" for d in domains)
              + f" {'client sends / round':>24} {'eps/client':>10} {'wall s':>7}  server sees")
        refs_sc = [v for k, v in ref_acc.items() if k.startswith(f"{sc}/")]
        if refs_sc:
            print(f"{'ref':<8} {'-':>8} {_fmt([x['overall'] for x in refs_sc]):>14} "
                  + "".join(f"{_fmt([x['by_domain'][d] for x in refs_sc if d in x['by_domain']]):>13}" for d in domains)
                  + f" {'-':>24} {'-':>10} {'-':>7}  ({args.warm_start} warm start)")
        for method in args.methods:
            for p in (["-"] if method in REWARD_METHODS else args.privacy):
                eps = None if p == "-" else (math.inf if p == "inf" else float(p))
                cs = [c for c in results if c["scenario"] == sc and c["method"] == method
                      and (eps is None or c["epsilon_target"] == eps)]
                if not cs:
                    continue
                sends = (cs[0].get("client_sends_per_round") or
                         f"{cs[0]['update_bytes_per_client_per_round']} B update")
                row = {"scenario": sc, "method": method, "epsilon": p, "seeds": [c["seed"] for c in cs],
                       "accuracy": [c["accuracy"] for c in cs],
                       "by_domain": {d: [c["by_domain"][d] for c in cs] if all(d in c["by_domain"] for c in cs)
                                     else [] for d in domains},
                       "collapsed": [c.get("collapsed", []) for c in cs],
                       "epsilon_per_client": [c["epsilon_per_client"] for c in cs],
                       "client_sends_per_round": sends, "server_sees": cs[0]["server_sees"],
                       "wall_s": [c["wall_s"] for c in cs]}
                rows.append(row)
                see = cs[0]["server_sees"]
                see = "sum only" if "SecAgg" in see else ("each update" if "update" in see else see)
                eps_spent = [max(e.values()) for e in row["epsilon_per_client"] if isinstance(e, dict) and e]
                eps_txt = ("8 (train)" if isinstance(row["epsilon_per_client"][0], str) else
                           "-" if not eps_spent else "inf" if math.isinf(max(eps_spent)) else f"{max(eps_spent):.2f}")
                print(f"{method:<8} {p:>8} {_fmt(row['accuracy']):>14} "
                      + "".join(f"{_fmt(row['by_domain'][d]):>13}" for d in domains)
                      + f" {sends:>24} {eps_txt:>10} {statistics.mean(row['wall_s']):>7.0f}  {see}")
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

        fig, axes = plt.subplots(1, len(args.scenario), figsize=(5 + 2.5 * len(args.scenario), 3.8), squeeze=False)
        for ax, sc in zip(axes[0], args.scenario):
            rs = [r for r in rows if r["scenario"] == sc]
            labels = [r["method"] + ("" if r["epsilon"] == "-" else
                                     f"\n{'no DP' if r['epsilon'] == 'inf' else 'eps ' + r['epsilon']}") for r in rs]
            means = [100 * statistics.mean(r["accuracy"]) for r in rs]
            errs = [100 * statistics.stdev(r["accuracy"]) if len(r["accuracy"]) > 1 else 0 for r in rs]
            ax.bar(range(len(rs)), means, yerr=errs,
                   color=["tab:orange" if r["method"] in REWARD_METHODS else "tab:blue" for r in rs])
            refs_sc = [v for k, v in ref_acc.items() if k.startswith(f"{sc}/")]
            if refs_sc:
                ax.axhline(100 * statistics.mean(x["overall"] for x in refs_sc), color="gray", ls="--",
                           label=f"reference ({args.warm_start})")
                ax.legend(fontsize=7)
            ax.set_xticks(range(len(rs)), labels, fontsize=6)
            ax.set_ylabel("held-out accuracy (%)")
            ax.set_title(f"scenario {sc}")
        fig.suptitle("Mixture of Rewards (orange) and parameter-sharing baselines (blue)", fontsize=9)
        fig.tight_layout()
        png = out_path.with_suffix(".png")
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")
    except Exception as e:  # plotting is a convenience
        print(f"(no plot: {type(e).__name__}: {e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
