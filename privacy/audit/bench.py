"""Measure the audit log: append throughput (each append fsync'd), verification speed, bytes per entry.

    python -m privacy.audit.bench --entries 2000 [--dir /tmp/audit-bench]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=2000)
    ap.add_argument("--checkpoint-every", type=int, default=16)
    ap.add_argument("--dir", type=Path, default=None, help="folder for the log (default: a temporary folder)")
    args = ap.parse_args(argv)
    from privacy.audit import AuditLog, verify_log

    d = args.dir or Path(tempfile.mkdtemp(prefix="audit-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    p = d / "bench.jsonl"
    if p.exists():
        p.unlink()
    key = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
    payload = lambda i: {"round_id": f"r{i}", "mode": "secagg", "participants": ["alice", "bob", "carol"],  # noqa
                         "dropouts": [], "task_digest": f"{i:064x}", "weights_digest": f"{i:064x}",
                         "aggregate": {"mean": 0.25, "std": 0.1, "n": 64},
                         "epsilon_charged": {"alice": 0.0, "bob": 0.0, "carol": 0.0}}
    t0 = time.perf_counter()
    with AuditLog(p, signing_key=key, actor="server", checkpoint_every=args.checkpoint_every) as log:
        for i in range(args.entries):
            log.append("round", payload(i))
    t_append = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = verify_log(p, key.public_key())
    t_verify = time.perf_counter() - t0
    assert res.ok, res.reason
    out = {"entries": args.entries, "total_lines": res.n, "checkpoints": res.checkpoints,
           "append_per_s": round(args.entries / t_append, 1),
           "append_ms_mean": round(1000 * t_append / args.entries, 3),
           "verify_entries_per_s": round(res.n / t_verify, 1), "bytes_per_line": round(p.stat().st_size / res.n, 1),
           "file": str(p)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
