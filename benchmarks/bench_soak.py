"""Soak benchmark (not a test): many loopback mTLS clients for many rounds mixing plain, dp, secagg and secagg+dp,
with random client kills and restarts, one SIGKILLed client process, one SIGKILLed-and-restarted server.

Reports rounds/s, p50/p95 round latency, failed rounds by cause, server RSS over time, and at the end verifies
every audit log (server and each client, signatures pinned to their CA-issued identity certificates) and cross-checks
the ledgers: no round the server finished is missing from its audit log, every accepted dp / secagg+dp
contribution and every release a client logged is charged in that client's ledger (no under-charge).

Processes: this parent (PKI, orchestration, RSS sampling, verification), one server process (the round driver:
FederationServer in asyncio, audit log with torn-tail recovery), and ``--client-procs`` client processes each
running its share of the clients as asyncio tasks (FederationClient + PrivacyLedger + AuditLog + SecAggSession).

    .venv/bin/python benchmarks/bench_soak.py --clients 200 --rounds 1000     # the full soak
    .venv/bin/python benchmarks/bench_soak.py --quick                         # 20 clients x 40 rounds
Writes benchmarks/results/soak.json (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = (("plain", 0.55), ("dp", 0.25), ("secagg", 0.15), ("secagg+dp", 0.05))


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), ((seed * 37) % 256, (seed * 91) % 256, 80)).save(buf, format="PNG")
    return buf.getvalue()


def _items(i: int, n: int = 4, k: int = 4):
    from mor_client import ScoringItem

    png = _png(i)
    return [ScoringItem(f"r{i}-i{j}", png, f"round {i}: what colour is shape {j}?",
                        tuple(f"answer{c}-{i}-{j}" for c in range(k))) for j in range(n)]


class Scorer:
    def score(self, items):
        return [[(hash(c) % 1000) / 1000.0 for c in it.candidates] for it in items]


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------- server process
async def serve(a) -> None:
    from privacy import pki
    from privacy.audit import AuditLog
    from mor_server.federation.config import AUDIT_MAX_INLINE, ServerConfig
    from mor_server.federation.server import FederationServer

    work = Path(a.workdir)
    audit = AuditLog(work / "server-audit.jsonl", signing_key=pki.load_identity_key(work / "pki/server/identity.key"),
                     actor="server", on_torn="recover", max_inline=AUDIT_MAX_INLINE)
    server = FederationServer(ServerConfig(pki_dir=work / "pki", port=a.port, audit=audit))
    await server.start()
    progress = work / "progress.jsonl"
    done = len(progress.read_text().splitlines()) if progress.exists() else 0
    need = max(2, int(a.clients * a.min_online))
    try:
        await server.wait_for_clients(need, timeout=300)
    except TimeoutError:
        pass
    rng = random.Random(a.seed * 7919 + done)
    names, weights = zip(*MODES)
    with progress.open("a") as out:
        for i in range(done, a.rounds):
            mode = rng.choices(names, weights)[0]
            online = server.online_clients(mode)
            items = _items(i)
            t0 = time.perf_counter()
            if mode == "plain":
                out_ = await server.run_round(items, mode="plain", participants=online,
                                              min_clients=max(1, len(online) // 2), timeout=a.timeout)
            elif mode == "dp":
                chosen = rng.sample(online, min(len(online), a.dp_clients))
                out_ = await server.run_round(items, mode="dp", participants=chosen,
                                              min_clients=max(1, len(chosen) // 2), timeout=a.timeout,
                                              dp_noise_multiplier=5.0)
            else:
                chosen = rng.sample(online, min(len(online), a.secagg_clients))
                out_ = await server.run_secagg_round(items, mode=mode, participants=chosen,
                                                     weights={c: [1.0 / max(1, len(chosen))] * len(items)
                                                              for c in chosen},
                                                     timeout=a.timeout, stage_timeout=a.timeout / 2,
                                                     value_range=4.0, dp_noise_multiplier=5.0)
            lat = time.perf_counter() - t0
            out.write(json.dumps({"i": i, "round_id": out_.round_id, "mode": mode, "ok": out_.ok,
                                  "reason": out_.reason, "latency_s": lat, "participants": len(out_.participants),
                                  "responders": len(out_.responders), "t": time.time()}) + "\n")
            out.flush()
    await server.stop()
    audit.close()


# ---------------------------------------------------------------------------------------------- client processes
async def run_clients(a) -> None:
    from mor_client import ClientCredentials, FederationClient, ReleasePolicy
    from mor_client.secagg_session import SecAggSession
    from privacy.audit import AuditLog
    from privacy.ledger import PrivacyLedger

    work = Path(a.workdir)
    names = a.names.split(",")
    rng = random.Random(hash(a.names) ^ a.seed)
    state = {}
    for n in names:
        creds = ClientCredentials.from_dir(work / "pki" / "clients" / n)
        d = work / "clients" / n
        d.mkdir(parents=True, exist_ok=True)
        ledger = PrivacyLedger(d / "ledger.sqlite", client_level_budget=1e9)
        audit = AuditLog(d / "audit.jsonl", signing_key=creds.identity_key(), actor=f"client:{n}", on_torn="recover")
        state[n] = {"creds": creds, "ledger": ledger, "audit": audit, "client": None, "task": None}

    def start(n):
        s = state[n]
        modes = ("plain", "dp", "secagg", "secagg+dp")
        c = FederationClient(f"localhost:{a.port}", s["creds"], Scorer(),
                             card={"architecture": "soak", "parameter_count": 0, "supported_modes": list(modes)},
                             policy=ReleasePolicy(modes, ledger=s["ledger"]),
                             secagg_handler=SecAggSession(s["creds"], ledger=s["ledger"]), audit=s["audit"],
                             backoff_initial=0.5, backoff_max=4.0)
        s["client"], s["task"] = c, asyncio.create_task(c.run())

    for n in names:
        start(n)
        await asyncio.sleep(0.005)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    kills = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(0.5, 2) * a.kill_every)
        except asyncio.TimeoutError:
            pass
        if stop.is_set() or not a.kill_every:
            continue
        n = rng.choice(names)   # kill: cancel its task abruptly (the stream breaks, no goodbye), restart later
        s = state[n]
        if s["task"] is not None and not s["task"].done():
            s["task"].cancel()
            kills += 1

            async def restart(n=n):
                await asyncio.sleep(rng.uniform(0.5, 3.0))
                if not stop.is_set():
                    start(n)
            asyncio.create_task(restart())
    for s in state.values():
        if s["client"] is not None:
            await s["client"].stop()
    await asyncio.gather(*(s["task"] for s in state.values() if s["task"]), return_exceptions=True)
    for s in state.values():
        s["ledger"].close()
        s["audit"].close()
    (work / f"kills-{os.getpid()}.json").write_text(json.dumps({"in_process_kills": kills}))


# ---------------------------------------------------------------------------------------------- verification
def verify(work: Path, names: list[str]) -> dict:
    from privacy.audit import load_public_key, read_entries, verify_log
    from privacy.ledger import PrivacyLedger

    ca = work / "pki/ca/ca.crt"
    res = {"server_log": None, "client_logs_ok": 0, "client_logs_bad": [], "rounds_in_progress_missing_from_audit": 0}
    sv = verify_log(work / "server-audit.jsonl", load_public_key(work / "pki/server/identity.crt", ca_cert_path=ca),
                    allow_open=True)
    res["server_log"] = {"ok": sv.ok, "entries": sv.n, "reason": sv.reason}
    entries = read_entries(work / "server-audit.jsonl")
    rounds = {e.payload["round_id"]: e.payload for e in entries if e.event == "round" and isinstance(e.payload, dict)
              and "round_id" in e.payload}
    res["round_entries_elided"] = sum(e.event == "round" and not (isinstance(e.payload, dict) and "round_id" in
                                                                  e.payload) for e in entries)
    res["server_recoveries"] = sum(e.event == "recovery" for e in entries)
    progress = [json.loads(line) for line in (work / "progress.jsonl").read_text().splitlines()]
    res["rounds_in_progress_missing_from_audit"] = sum(p["round_id"] not in rounds for p in progress)
    charged: dict[str, set] = {}
    logged: dict[str, set] = {}
    for n in names:
        d = work / "clients" / n
        if not (d / "audit.jsonl").exists():
            continue
        v = verify_log(d / "audit.jsonl", load_public_key(work / "pki/clients" / n / "identity.crt", ca_cert_path=ca),
                       allow_open=True)
        if v.ok:
            res["client_logs_ok"] += 1
        else:
            res["client_logs_bad"].append(f"{n}: {v.reason}")
        with PrivacyLedger(d / "ledger.sqlite") as L:
            charged[n] = {h["round_id"] for h in L.history("client") if h.get("round_id")}
        logged[n] = {e.payload["round_id"] for e in read_entries(d / "audit.jsonl")
                     if e.event == "release" and e.payload.get("mode") in ("dp", "secagg+dp")
                     and (e.payload.get("mode") == "dp" or e.payload.get("masked"))}
    # no under-charge: every contribution the server accepted in a charged mode is in the client's ledger
    accepted = [(rid, c) for rid, p in rounds.items() if p["mode"] in ("dp", "secagg+dp") and p["state"] == "completed"
                for c in p["responders"]]
    res["charged_contributions_accepted"] = len(accepted)
    res["accepted_but_not_charged"] = sum(rid not in charged.get(c, set()) for rid, c in accepted)
    res["releases_logged"] = sum(len(v) for v in logged.values())
    res["logged_but_not_charged"] = sum(len(logged[n] - charged.get(n, set())) for n in logged)
    res["charged_but_not_logged"] = sum(len(charged[n] - logged.get(n, set())) for n in charged)
    res["ledger_charges"] = sum(len(v) for v in charged.values())
    res["ok"] = (sv.ok and not res["client_logs_bad"] and res["rounds_in_progress_missing_from_audit"] == 0
                 and res["accepted_but_not_charged"] == 0 and res["logged_but_not_charged"] == 0)
    return res


def _cause(reason: str) -> str:
    r = reason.lower()
    for key, label in (("cancelled", "cancelled"), ("online", "too few clients online"),
                       ("secure aggregation could not start", "secagg could not start"),
                       ("secure aggregation aborted", "secagg aborted"), ("survivors", "too few secagg survivors"),
                       ("only", "too few reports (dropouts/deadline)")):
        if key in r:
            return label
    return reason[:60] or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="20 clients x 40 rounds")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--dp-clients", type=int, default=12, help="participants of a dp round (sampled)")
    p.add_argument("--secagg-clients", type=int, default=8, help="participants of a secagg round (sampled)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--kill-every", type=float, default=1.0, help="mean seconds between client kills per process")
    p.add_argument("--min-online", type=float, default=0.8, help="fraction online before the first round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(ROOT / "benchmarks/.cache/soak"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/soak.json"))
    p.add_argument("--role", choices=("main", "server", "clients"), default="main", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--names", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.clients, a.rounds = min(a.clients, 20), min(a.rounds, 40)
    if a.role == "server":
        asyncio.run(serve(a))
        return 0
    if a.role == "clients":
        asyncio.run(run_clients(a))
        return 0

    from privacy import pki

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.perf_counter()
    ca = pki.init_ca(work / "pki")
    names = [f"inst{i:03d}" for i in range(a.clients)]
    for n in names:
        pki.issue_client(work / "pki", n, ca=ca)
    print(f"PKI for {a.clients} clients in {time.perf_counter() - t:.1f}s", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        a.port = s.getsockname()[1]
    common = [sys.executable, __file__, "--workdir", str(work), "--port", str(a.port), "--clients", str(a.clients),
              "--rounds", str(a.rounds), "--seed", str(a.seed), "--timeout", str(a.timeout),
              "--dp-clients", str(a.dp_clients), "--secagg-clients", str(a.secagg_clients),
              "--kill-every", str(a.kill_every), "--min-online", str(a.min_online)]
    logs = work / "logs"
    logs.mkdir()

    def spawn(role, tag, extra=()):
        f = open(logs / f"{tag}.log", "ab")
        return subprocess.Popen(common + ["--role", role, *extra], stdout=f, stderr=subprocess.STDOUT)

    server = spawn("server", "server")
    shards = [names[i::a.client_procs] for i in range(a.client_procs)]
    procs = [spawn("clients", f"clients{i}", ["--names", ",".join(sh)]) for i, sh in enumerate(shards)]
    progress = work / "progress.jsonl"
    rss, events = [], []
    server_killed = client_proc_killed = False
    t0 = time.time()

    def done_rounds():
        return len(progress.read_text().splitlines()) if progress.exists() else 0

    while True:
        time.sleep(1.0)
        n = done_rounds()
        m = _rss_mib(server.pid)
        if m is not None:
            rss.append({"t": round(time.time() - t0, 1), "rounds": n, "rss_mib": round(m, 1)})
        if not client_proc_killed and n >= a.rounds // 4:
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            events.append({"t": round(time.time() - t0, 1), "rounds": n, "event": "client process 0 SIGKILLed "
                           f"({len(shards[0])} clients), restarted"})
            procs[0] = spawn("clients", "clients0-restart", ["--names", ",".join(shards[0])])
            client_proc_killed = True
            continue
        if not server_killed and n >= (3 * a.rounds) // 5:
            server.send_signal(signal.SIGKILL)
            server.wait()
            events.append({"t": round(time.time() - t0, 1), "rounds": n, "event": "server SIGKILLed, restarted"})
            server = spawn("server", "server-restart")
            server_killed = True
            continue
        if server.poll() is not None:
            break
        if n and n % max(1, a.rounds // 10) == 0:
            print(f"  {n}/{a.rounds} rounds, server RSS {m:.0f} MiB", flush=True)
    wall = time.time() - t0
    for pr in procs:
        pr.send_signal(signal.SIGTERM)
    for pr in procs:
        try:
            pr.wait(120)
        except subprocess.TimeoutExpired:
            pr.kill()
    prog = [json.loads(line) for line in progress.read_text().splitlines()]
    lat = sorted(p["latency_s"] for p in prog)
    failed = Counter(_cause(p["reason"]) for p in prog if not p["ok"])
    by_mode = {m: {"rounds": sum(p["mode"] == m for p in prog), "failed": sum(p["mode"] == m and not p["ok"]
                                                                            for p in prog)} for m, _ in MODES}
    srv_ev = next((e for e in events if e["event"].startswith("server")), None)
    t_restart = srv_ev["t"] if srv_ev else float("inf")
    warm = a.rounds // 10
    pools = [[r for r in rss if r["t"] < t_restart and r["rounds"] >= warm]]
    if srv_ev:
        pools.append([r for r in rss if r["t"] >= t_restart and r["rounds"] >= srv_ev["rounds"] + warm])
    segments = []   # server RSS per server process, after a warm-up of a tenth of the rounds
    for pool in pools:
        if len(pool) >= 2:
            segments.append({"from_round": pool[0]["rounds"], "to_round": pool[-1]["rounds"],
                             "first_mib": pool[0]["rss_mib"], "last_mib": pool[-1]["rss_mib"],
                             "max_mib": max(r["rss_mib"] for r in pool),
                             "growth_pct": round(100 * (pool[-1]["rss_mib"] - pool[0]["rss_mib"]) / pool[0]["rss_mib"],
                                                 1)})
    steady = [r["rss_mib"] for r in rss if r["rounds"] >= a.rounds // 10]
    kills = sum(json.loads(f.read_text())["in_process_kills"] for f in work.glob("kills-*.json"))
    round_time = sum(lat)
    spans, seg_start, prev_end = [], None, None   # time actually driving rounds (restart downtime excluded)
    for p_ in prog:
        st, en = p_["t"] - p_["latency_s"], p_["t"]
        if seg_start is None or st - prev_end > 5.0:
            if seg_start is not None:
                spans.append(prev_end - seg_start)
            seg_start = st
        prev_end = en
    if seg_start is not None:
        spans.append(prev_end - seg_start)
    driving = sum(spans)
    result = {
        "command": " ".join(["python", "benchmarks/bench_soak.py"] + (argv if argv is not None else sys.argv[1:])),
        "clients": a.clients, "rounds": len(prog), "client_processes": a.client_procs,
        "wall_s": round(wall, 1), "rounds_per_s_wall": round(len(prog) / wall, 2),
        "rounds_per_s": round(len(prog) / driving, 2) if driving else None,
        "driving_s": round(driving, 1),
        "note": "rounds_per_s: rounds over the time the server was driving rounds back to back (start-up, the "
                "wait for clients and the server restart's downtime excluded); rounds_per_s_wall includes them",
        "latency_ms": {"p50": round(1000 * lat[len(lat) // 2], 1), "p95": round(1000 * lat[int(len(lat) * 0.95)], 1),
                       "max": round(1000 * lat[-1], 1)} if lat else {},
        "latency_ms_by_mode": {m: {"p50": round(1000 * statistics.median(v), 1),
                                   "p95": round(1000 * sorted(v)[int(len(v) * 0.95)], 1)}
                               for m in by_mode if (v := [p["latency_s"] for p in prog if p["mode"] == m])},
        "by_mode": by_mode, "failed_by_cause": dict(failed),
        "client_kills_in_process": kills, "events": events,
        "server_rss_mib": {"per_server_process": segments, "max": max(steady) if steady else None,
                           "samples": rss},
        "verification": verify(work, names),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    v = result["verification"]
    print(f"{len(prog)} rounds ({a.clients} clients) in {wall:.0f}s: {result['rounds_per_s']} rounds/s "
          f"({result['rounds_per_s_wall']} wall), "
          f"p50 {result['latency_ms'].get('p50')} ms, p95 {result['latency_ms'].get('p95')} ms; failed by cause "
          f"{dict(failed)}; server RSS per process {[(g['first_mib'], g['last_mib']) for g in segments]} MiB; "
          f"logs verify: server {v['server_log']['ok']}, clients "
          f"{v['client_logs_ok']} ok / {len(v['client_logs_bad'])} bad; accepted but not charged "
          f"{v['accepted_but_not_charged']}; missing from audit {v['rounds_in_progress_missing_from_audit']} "
          f"-> {out}")
    return 0 if v["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
