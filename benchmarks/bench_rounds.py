#!/usr/bin/env python3
"""Scoring-round throughput on loopback with mTLS: one server, N clients, M real easy-vqa items per task.

The clients' scorer costs nothing (it returns one value per candidate), so the figure is the federation's own cost:
TLS, protobuf, asyncio, orchestration. Writes benchmarks/results/rounds.json.

    .venv/bin/python benchmarks/bench_rounds.py [--clients 3] [--items 64] [--rounds 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from easy_vqa import get_answers, get_train_image_paths, get_train_questions

from mor_client import ClientCredentials, FederationClient, ScoringItem
from mor_server.federation.config import ServerConfig
from mor_server.federation.server import FederationServer
from privacy import pki


class ConstantCostScorer:
    def score(self, items):
        return [[0.0] * len(it.candidates) for it in items]


def easyvqa_items(n: int) -> list[ScoringItem]:
    qs, answers, image_ids = get_train_questions()
    paths = get_train_image_paths()
    cands = tuple(get_answers()[:4])
    return [ScoringItem(f"q{i}", Path(paths[image_ids[i]]).read_bytes(), qs[i], cands) for i in range(n)]


async def run(n_clients: int, n_items: int, n_rounds: int, workdir: Path) -> dict:
    pki.init_ca(workdir)
    names = [f"client{i}" for i in range(n_clients)]
    for n in names:
        pki.issue_client(workdir, n)
    server = FederationServer(ServerConfig(pki_dir=workdir))
    await server.start()
    card = {"architecture": "constant", "parameter_count": 0, "supported_modes": ["plain"]}
    clients = [FederationClient(f"localhost:{server.port}", ClientCredentials.from_dir(workdir / "clients" / n),
                                ConstantCostScorer(), card=card) for n in names]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    await server.wait_for_clients(n_clients, timeout=30)
    items = easyvqa_items(n_items)
    for _ in range(3):  # warm-up
        await server.run_round(items, timeout=30)
    lat = []
    b0_in, b0_out = server.metrics.value("mor_received_bytes_total"), server.metrics.value("mor_sent_bytes_total")
    t0 = time.perf_counter()
    for _ in range(n_rounds):
        out = await server.run_round(items, timeout=30)
        assert out.ok, out.reason
        lat.append(out.latency)
    wall = time.perf_counter() - t0
    b_in = server.metrics.value("mor_received_bytes_total") - b0_in
    b_out = server.metrics.value("mor_sent_bytes_total") - b0_out
    for c in clients:
        await c.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.stop()
    lat.sort()
    return {"clients": n_clients, "items_per_task": n_items, "rounds": n_rounds,
            "rounds_per_second": n_rounds / wall, "latency_ms_p50": 1000 * statistics.median(lat),
            "latency_ms_p95": 1000 * lat[int(0.95 * (len(lat) - 1))],
            "bytes_sent_per_round": b_out / n_rounds, "bytes_received_per_round": b_in / n_rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rounds.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = asyncio.run(run(args.clients, args.items, args.rounds, Path(d)))
    print(json.dumps(res, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
