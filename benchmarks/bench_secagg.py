"""SecAgg+ benchmark: one round for n in {10, 50, 100, 200}, m in {64, 4096}, 0% / 10% dropouts; client and
server time, bytes per client; Flower's SecAgg+ side by side (same n, m, dropouts, degree, threshold); and the
utility of `secagg+dp` against local `dp` at the same epsilon.

    python benchmarks/bench_secagg.py                 # full grid, writes benchmarks/results/secagg.json
    python benchmarks/bench_secagg.py --quick         # n in {10, 50}, m = 64

Flower is never installed into the project's .venv. The script looks for ``.venv-bench/bin/python`` with ``flwr``
and, if missing, creates it (``python -m venv .venv-bench && .venv-bench/bin/pip install flwr``) unless
``--no-install`` is given; without it the Flower columns are left empty. Dropouts are applied after the key
sharing stage (clients that never send their masked input), the case that costs the server mask recovery.
Client and server ratios (Flower / ours) are printed and written separately (``speedup_client``,
``speedup_server``); ``--ns`` / ``--ms`` pick a smaller grid.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"

# ----------------------------------------------------------------------------------------------------------------
# Flower worker (runs inside .venv-bench; must not import the project)
# ----------------------------------------------------------------------------------------------------------------
FLOWER_WORKER = r'''
import json, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])
from flwr.common.secure_aggregation.crypto.shamir import create_shares, combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key, encrypt, decrypt
from flwr.supercore.primitives.asymmetric import (generate_key_pairs, bytes_to_private_key, bytes_to_public_key,
    private_key_to_bytes, public_key_to_bytes)
from flwr.common.secure_aggregation.secaggplus_utils import (pseudo_rand_gen, share_keys_plaintext_concat,
    share_keys_plaintext_separate)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (factor_combine, parameters_addition,
    parameters_mod, parameters_multiply, parameters_subtraction)
from flwr.common.secure_aggregation.quantization import quantize, dequantize
import os

def run(n, m, drop_frac, degree, t, seed=0):
    rng = np.random.default_rng(seed)
    ids = list(range(1, n + 1))
    # same circulant neighbourhood size as ours (Flower's workflow samples num_shares-1 neighbours)
    h = degree // 2
    nbrs = {i: [ids[(i - 1 + d) % n] for d in range(-h, h + 1) if d != 0] if degree < n - 1 else [j for j in ids if j != i] for i in ids}
    clip, qrange, mod = 1.0, 1 << 22, 1 << 32
    ct = {i: 0.0 for i in ids}
    st = 0.0
    nbytes = {i: 0 for i in ids}
    state = {}
    # stage 1: setup (key pairs)
    for i in ids:
        t0 = time.perf_counter()
        sk1, pk1 = generate_key_pairs(); sk2, pk2 = generate_key_pairs()
        state[i] = dict(sk1=private_key_to_bytes(sk1), pk1=public_key_to_bytes(pk1), sk2=private_key_to_bytes(sk2),
                        pk2=public_key_to_bytes(pk2), ss2={})
        ct[i] += time.perf_counter() - t0
        nbytes[i] += len(state[i]["pk1"]) + len(state[i]["pk2"])
    # stage 2: share keys
    inbox = {i: {} for i in ids}
    for i in ids:
        t0 = time.perf_counter()
        s = state[i]
        s["rd_seed"] = os.urandom(32)
        holders = [i] + nbrs[i]
        b_shares = create_shares(s["rd_seed"], t, len(holders))
        sk_shares = create_shares(s["sk1"], t, len(holders))
        for idx, j in enumerate(holders):
            nbytes[i] += len(state[j]["pk1"]) + len(state[j]["pk2"])
            if j == i:
                s.setdefault("got", {})[i] = (b_shares[idx], sk_shares[idx]); continue
            key = generate_shared_key(bytes_to_private_key(s["sk2"]), bytes_to_public_key(state[j]["pk2"]))
            s["ss2"][j] = key
            c = encrypt(key, share_keys_plaintext_concat(i, j, b_shares[idx], sk_shares[idx]))
            inbox[j][i] = c; nbytes[i] += len(c)
        ct[i] += time.perf_counter() - t0
    ndrop = int(round(drop_frac * n))
    dropped = set(rng.choice(ids, ndrop, replace=False).tolist()) if ndrop else set()
    alive = [i for i in ids if i not in dropped]
    # stage 3: collect masked vectors
    masked = {}
    for i in alive:
        t0 = time.perf_counter()
        s = state[i]
        for frm, c in inbox[i].items():
            key = s["ss2"][frm]
            _, _, bsh, sksh = share_keys_plaintext_separate(decrypt(key, c))
            s["got"][frm] = (bsh, sksh); nbytes[i] += len(c)
        x = [rng.uniform(-1, 1, m)]
        x = parameters_multiply(x, 1.0)
        q = factor_combine(1, quantize(x, clip, qrange))
        masked_v = parameters_addition(q, pseudo_rand_gen(s["rd_seed"], mod, [a.shape for a in q]))
        for j in nbrs[i]:
            shared = generate_shared_key(bytes_to_private_key(s["sk1"]), bytes_to_public_key(state[j]["pk1"]))
            pm = pseudo_rand_gen(shared, mod, [a.shape for a in q])
            masked_v = parameters_addition(masked_v, pm) if i > j else parameters_subtraction(masked_v, pm)
        masked_v = parameters_mod(masked_v, mod)
        masked[i] = masked_v
        ct[i] += time.perf_counter() - t0
        nbytes[i] += sum(a.nbytes for a in masked_v)
    # stage 4: unmask (clients reveal shares)
    rev = {}
    for i in alive:
        t0 = time.perf_counter()
        s = state[i]
        out = {}
        for j, (bsh, sksh) in s["got"].items():
            out[j] = bsh if j in alive else sksh
        rev[i] = out
        ct[i] += time.perf_counter() - t0
        nbytes[i] += sum(len(v) for v in out.values())
    # server
    t0 = time.perf_counter()
    agg = None
    for i in alive:
        agg = masked[i] if agg is None else parameters_addition(agg, masked[i])
    collected = {}
    for i in alive:
        for j, sh in rev[i].items():
            collected.setdefault(j, []).append(sh)
    for j, shares in collected.items():
        secret = combine_shares(shares[:t])
        if j in alive:
            agg = parameters_subtraction(agg, pseudo_rand_gen(secret, mod, [a.shape for a in agg]))
        else:
            sk = bytes_to_private_key(secret)
            for k in nbrs[j]:
                if k in alive:
                    shared = generate_shared_key(sk, bytes_to_public_key(state[k]["pk1"]))
                    pm = pseudo_rand_gen(shared, mod, [a.shape for a in agg])
                    agg = parameters_subtraction(agg, pm) if k > j else parameters_addition(agg, pm)
    agg = parameters_mod(agg, mod)
    st = time.perf_counter() - t0
    return dict(client_s=float(np.mean([ct[i] for i in alive])), server_s=st,
                bytes_per_client=float(np.mean([nbytes[i] for i in ids])))

print(json.dumps([run(**c) for c in cfg]))
'''


def ensure_flower(allow_install: bool) -> str | None:
    py = BENCH_VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import flwr"], capture_output=True).returncode == 0:
        return str(py)
    if not allow_install:
        return None
    print("creating .venv-bench with flwr (benchmark only) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "flwr"], capture_output=True, text=True)
    return str(py) if r.returncode == 0 else None


def flower_version(py: str) -> str:
    return subprocess.run([py, "-c", "import flwr; print(flwr.__version__)"], capture_output=True,
                          text=True).stdout.strip()


def run_flower(py: str, configs: list[dict]) -> list[dict]:
    r = subprocess.run([py, "-c", FLOWER_WORKER, json.dumps(configs)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_ours(n: int, m: int, drop: float, seed: int = 0) -> dict:
    import numpy as np

    from privacy.secagg import SecAggServer, run_secagg_round

    rng = np.random.default_rng(seed)
    ids = [f"c{i:03d}" for i in range(n)]
    inputs = {c: rng.uniform(-1, 1, m) for c in ids}
    srv = SecAggServer(f"bench-{n}-{m}", ids, vector_length=m)
    ndrop = int(round(drop * n))
    dropped = list(rng.choice(ids, ndrop, replace=False)) if ndrop else []
    res, st = run_secagg_round(inputs, round_id=f"bench-{n}-{m}", server=srv,
                               dropouts={"collect_masked": dropped} if dropped else None)
    assert res.ok, res.reason
    exp = sum(inputs[c] for c in res.survivors)
    err = float(np.abs(res.total - exp).max())
    alive = [c for c in ids if c not in dropped]
    return dict(client_s=float(np.mean([st.client_s[c] for c in alive])), server_s=st.server_s,
                bytes_per_client=st.bytes_per_client, degree=srv.degree, threshold=srv.threshold,
                mod_bits=srv.cfg.mod_bits, max_abs_error=err)


def utility(n_clients=10, m=64, epsilon=1.0, delta=1e-5, reps=20, seed=0) -> dict:
    """RMSE of the routed mixture sum_k w_k s_k under local `dp` and under `secagg+dp`, same epsilon, one round."""
    import numpy as np
    from scipy import optimize

    from privacy import accounting, dp
    from privacy.ledger import PrivacyLedger  # noqa: F401
    from privacy.secagg import ddp, run_secagg_round

    rng = np.random.default_rng(seed)
    C, frac = 1.0, 10
    w = np.full(n_clients, 1.0 / n_clients)
    wcap = float(w.max())
    min_surv = n_clients
    z_local = dp.noise_multiplier_for_epsilon(epsilon, delta)

    def eps_for(z):
        s = ddp.calibrate_sigma(z, value_range=C, weight_cap=wcap, frac_bits=frac, m=m, min_survivors=min_surv)
        return accounting.zcdp_epsilon(ddp.rho(s, value_range=C, weight_cap=wcap, frac_bits=frac, m=m,
                                               survivors=min_surv), delta)

    z_dist = optimize.brentq(lambda z: eps_for(z) - epsilon, 0.05, 100.0)
    sigma_int = ddp.calibrate_sigma(z_dist, value_range=C, weight_cap=wcap, frac_bits=frac, m=m,
                                    min_survivors=min_surv)
    err_local, err_dist = [], []
    import tempfile

    for r in range(reps):
        scores = {f"c{k:02d}": rng.uniform(-C, C, m) for k in range(n_clients)}
        truth = sum(w[k] * scores[c] for k, c in enumerate(sorted(scores)))
        local = sum(w[k] * dp.gaussian_release(scores[c], clip=C, noise_multiplier=z_local, rng=rng)
                    for k, c in enumerate(sorted(scores)))
        err_local.append(np.sqrt(np.mean((local - truth) ** 2)))
        with tempfile.TemporaryDirectory() as d:
            from privacy.ledger import PrivacyLedger as PL

            ck = {c: {"ledger": PL(Path(d) / f"{c}.db"), "rng": rng, "max_weight": 1.0} for c in scores}
            res, st = run_secagg_round(scores, round_id=f"u{r}", weights=w, weight_cap=wcap, value_range=C,
                                       frac_bits=frac, dp_sigma=sigma_int, dp_min_survivors=min_surv,
                                       client_kwargs=ck)
            for v in ck.values():
                v["ledger"].close()
        assert res.ok, (res.reason, st.client_errors)
        err_dist.append(np.sqrt(np.mean((res.total - truth) ** 2)))
    return dict(n_clients=n_clients, m=m, epsilon=epsilon, delta=delta, clip=C,
                local_dp_noise_multiplier=z_local, secagg_dp_noise_multiplier=z_dist,
                rmse_local_dp=float(np.mean(err_local)), rmse_secagg_dp=float(np.mean(err_dist)),
                rmse_ratio=float(np.mean(err_local) / np.mean(err_dist)), score_range=[-C, C])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ns", default=None, help="comma-separated n values (default 10,50,100,200; --quick: 10,50)")
    ap.add_argument("--ms", default=None, help="comma-separated m values (default 64,4096; --quick: 64)")
    ap.add_argument("--no-install", action="store_true", help="do not create .venv-bench for Flower")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "secagg.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tqdm import tqdm

    ns, ms = ([10, 50], [64]) if args.quick else ([10, 50, 100, 200], [64, 4096])
    if args.ns:
        ns = [int(x) for x in args.ns.split(",")]
    if args.ms:
        ms = [int(x) for x in args.ms.split(",")]
    grid = [(n, m, d) for n in ns for m in ms for d in (0.0, 0.1)]
    py = ensure_flower(not args.no_install)
    rows = []
    for n, m, d in tqdm(grid, desc="secagg+ rounds"):
        ours = run_ours(n, m, d)
        row = dict(n=n, m=m, dropout=d, ours=ours)
        if py:
            fl = run_flower(py, [dict(n=n, m=m, drop_frac=d, degree=ours["degree"], t=ours["threshold"])])[0]
            row["flower"] = fl
            row["speedup_round"] = (fl["client_s"] + fl["server_s"]) / (ours["client_s"] + ours["server_s"])
            row["speedup_client"] = fl["client_s"] / ours["client_s"]
            row["speedup_server"] = fl["server_s"] / ours["server_s"]
        rows.append(row)
        o = ours
        msg = (f"n={n:4d} m={m:5d} drop={d:.0%}: ours client {o['client_s'] * 1e3:7.1f} ms server "
               f"{o['server_s'] * 1e3:7.1f} ms {o['bytes_per_client'] / 1024:7.1f} KiB/client")
        if py:
            msg += (f" | flower client {row['flower']['client_s'] * 1e3:7.1f} ms server "
                    f"{row['flower']['server_s'] * 1e3:7.1f} ms | Flower/ours: client x{row['speedup_client']:.1f}, "
                    f"server x{row['speedup_server']:.1f}")
        tqdm.write(msg)
    if py:  # the two ratios separately: almost all of the round speed-up is on the server side
        print("\n| n | m | dropout | t | ours client / server ms | Flower client / server ms | client ratio | "
              "server ratio |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            o, f = r["ours"], r["flower"]
            print(f"| {r['n']} | {r['m']} | {r['dropout']:.0%} | {o['threshold']} | {o['client_s'] * 1e3:.1f} / "
                  f"{o['server_s'] * 1e3:.1f} | {f['client_s'] * 1e3:.1f} / {f['server_s'] * 1e3:.1f} | "
                  f"x{r['speedup_client']:.2f} | x{r['speedup_server']:.1f} |")
    util = utility()
    print(f"utility at eps={util['epsilon']}: RMSE local dp {util['rmse_local_dp']:.3f} vs secagg+dp "
          f"{util['rmse_secagg_dp']:.3f} (x{util['rmse_ratio']:.1f})")
    out = dict(command="python benchmarks/bench_secagg.py " + " ".join(sys.argv[1:]),
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()),
               flower_version=flower_version(py) if py else None,
               notes=("time per round, client = mean over surviving clients of their own compute, server = "
                      "its compute; speedup_client = Flower client / ours client, speedup_server = Flower server / "
                      "ours server (reported separately: most of the round speedup is server side), "
                      "'round' speedup compares client+server; dropouts after key sharing; Flower "
                      "run with its own SecAgg+ primitives (flwr.common.secure_aggregation) on the same degree "
                      "and threshold, no network in either"),
               rows=rows, utility=util, when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
