"""Speed of the exact discrete-Gaussian sampler (privacy.dp.discrete_gaussian, CKS 2020 in integer arithmetic).

    .venv/bin/python benchmarks/bench_dp_sampler.py [--repeats 5]

For sigma in grid units 1e3..1.6e8 (gaussian_release uses sigma/g ~ 2^21 sqrt(m) * noise multiplier; secagg+dp
uses ~1e5..1e7) and m in {64, 1024, 4096} values, the best-of-N CPU time of one vectorised draw. Writes
benchmarks/results/dp_sampler.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from privacy import dp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dp_sampler.json")
    args = ap.parse_args()
    rows = []
    for sigma in (1e3, 1e4, 1e5, 1e6, 1e7, 1.6e8):
        for m in (64, 1024, 4096):
            best = float("inf")
            for _ in range(args.repeats):
                t = time.process_time()
                dp.discrete_gaussian(sigma, m)
                best = min(best, time.process_time() - t)
            rows.append({"sigma": sigma, "m": m, "cpu_ms": round(best * 1000, 2),
                         "samples_per_s": round(m / best)})
            print(f"sigma {sigma:>9.3g}  m {m:>5}: {best * 1000:7.2f} ms  ({m / best:,.0f} samples/s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                    "repeats": args.repeats, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
