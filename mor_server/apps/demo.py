"""``mor demo``: the main job. A full federated alignment run on the embedded default.

One module although over 400 lines: it is the main job read top to bottom, its config (:class:`DemoConfig`) and
its steps in the order they run; no other command uses them.

1. PKI: a federation CA, the server certificate, one certificate pair per client (reused when present).
2. Reward models: each client trains its own reward model with DP-SGD on its private partition of easy-vqa
   (three architectures, three question-type domains), as a separate ``mor client train`` process; cached.
3. Federation: the server (grpc.aio, mTLS, Prometheus, signed audit log) and three ``mor client join``
   processes over loopback, each with its own privacy ledger and audit log.
4. Alignment: warm-start the tiny Llava policy on the server's public split (the frozen reference), calibrate the
   Mixture-of-Rewards router from a scoring round on the server's public preference pairs, run GRPO whose reward
   is a federated scoring round per generation batch (``secagg`` by default), evaluate before/after.
5. Report: a short table, a JSON report and PNG plots under ``WORKDIR/report``.

Larger runs take a config file (``--config run.json``): every key of :class:`DemoConfig` may be set there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

from mor.cliargs import non_negative_int, output_dir, positive_int
from mor.modes import MODES, PER_CLIENT_MODES, SECAGG_MODES
from ..alignment.recipes import DEFAULT_WARM_START, WARM_START_HELP, WARM_STARTS, recipe_grpo
from privacy import pki

from privacy.fsutil import replace_dir, staging_dir
from .jobcontrol import RunInterrupted as DemoInterrupted  # SIGINT/SIGTERM and the workdir lock: shared with mor align
from .jobcontrol import close_progress_bars, run_job
from .procs import ClientProcess, mor_client_argv, reap_stale, run_child, stop_all

DEFAULT_CLIENTS = (
    {"name": "hospital-color", "arch": "cnn", "partition": "client0"},
    {"name": "bank-shape", "arch": "vit", "partition": "client1"},
    {"name": "lab-yesno", "arch": "lora", "partition": "client2"},
)
#: keys of DemoConfig.alignment (AlignmentConfig fields, plus sft_steps for the warm start's SFTConfig.steps)
ALIGNMENT_OVERRIDES = ("eval_size", "curve_size", "curve_every", "sft_steps", "sft_batches", "router_steps",
                       "router_rank_weight", "router_abstain_z", "heldout_pairs")
#: GRPO settings of the demo (on top of GRPORunConfig's defaults): 400 steps at lr 3e-4 and beta 0.05 (measured
#: over 3 seeds, docs/alignment.md); at lr 1e-3 / beta 0.02 runs of 400 steps collapsed to one answer per type.
#: A checkpoint every 20 steps (two kept): a run that dies loses at most 19 steps (a rerun resumes from the newest).
DEMO_GRPO_DEFAULTS = {"max_steps": 400, "learning_rate": 3e-4, "beta": 0.05, "temperature": 1.0, "save_steps": 20}


def _epsilon(v):
    if isinstance(v, str) and v.strip().lower() in ("inf", "infinity"):
        return math.inf
    return v


def _arch(v: str) -> str:
    from mor_client.rewards.models import ARCHITECTURES

    if v not in ARCHITECTURES:
        raise ValueError(f"must be one of {', '.join(sorted(ARCHITECTURES))}")
    return v


def _client_name(v: str) -> str:
    try:
        pki.check_name(v, "name")
    except pki.PKIError as e:
        raise ValueError(str(e)) from None
    return v


def _partition(v: str) -> str:
    if not (v.startswith("client") and v[len("client"):].isdigit()):
        raise ValueError("must be client0, client1, ... (one partition of the federation split per client)")
    return v


def _workdir(v: str) -> str:
    import argparse as _ap

    try:
        output_dir(v)
    except _ap.ArgumentTypeError as e:
        raise ValueError(str(e)) from None
    return v


_PosInt = Annotated[int, Field(ge=1, strict=True)]
_Real = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class ClientSpec(TypedDict):
    """One client of the demo (``clients`` in the config)."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)  # type: ignore[misc]
    name: Annotated[str, AfterValidator(_client_name)]
    arch: Annotated[str, AfterValidator(_arch)]
    partition: Annotated[str, AfterValidator(_partition)]
    max_pairs: NotRequired[_PosInt]
    epochs: NotRequired[_PosInt]
    batch_size: NotRequired[_PosInt]
    pretrain_epochs: NotRequired[Annotated[int, Field(ge=0, strict=True)]]


@dataclass
class DemoConfig:
    """Settings of ``mor demo``; each may be given in a JSON config file (``--config``).

    Every setting is type- and range-checked (pydantic, from the annotations below) by :meth:`validate` before the
    demo starts any work; an error names the setting, e.g. ``clients[0].arch: must be one of cnn, lora, vit``.
    """

    workdir: Annotated[str, Field(strict=True, min_length=1), AfterValidator(_workdir)] = "runs/demo"
    """Folder for everything the run writes (PKI, models, ledgers, audit logs, checkpoints, report)."""
    seed: Annotated[int, Field(ge=0, strict=True)] = 0
    """Seed of the federation split, model inits, DP noise streams and GRPO sampling."""
    clients: Annotated[list[ClientSpec], Field(min_length=1)] = field(
        default_factory=lambda: [dict(c) for c in DEFAULT_CLIENTS])
    """Clients: name, reward-model arch (cnn, vit, lora), partition (client0, client1, ...), and optionally
    max_pairs / epochs / batch_size overriding the architecture's training preset."""
    epsilon: Annotated[float, BeforeValidator(_epsilon), Field(gt=0, strict=True)] = 8.0
    """Example-level ε of each client's DP-SGD training (one preference pair is the unit); "inf" disables DP."""
    mode: Literal[MODES] = "secagg"
    """Privacy mode of GRPO's scoring rounds: plain, dp (each client noises its own scores), secagg or secagg+dp."""
    calibration_mode: Literal[PER_CLIENT_MODES] = "plain"
    """Mode of the router-calibration round on the server's public pairs: plain or dp (charged to ledgers)."""
    client_budget: Annotated[_Real, Field(gt=0)] = 20.0
    """Client-level ε budget each client's ledger enforces for dp / secagg+dp releases."""
    dp_noise_multiplier: Annotated[_Real, Field(gt=0)] = 1.0
    """Noise multiplier of dp / secagg+dp releases (σ = multiplier × L2 sensitivity)."""
    round_timeout: Annotated[_Real, Field(gt=0)] = 60.0
    """Deadline of one scoring round (seconds)."""
    w_format: Annotated[_Real, Field(ge=0)] = 4.0
    """Weight of the answer-format rule reward in the hybrid reward (w_mix = 1 for the MoR reward): keeps the policy
    answering with one of the task's answers, so it cannot drift to strings no reward model was trained on."""
    w_length: Annotated[_Real, Field(ge=0)] = 0.0
    """Weight of the length rule reward."""
    warm_start: Literal[WARM_STARTS] = DEFAULT_WARM_START
    """Warm-start recipe of the built-in policy (mor_server.alignment.recipes, whose docstring says what each is for):
    ``seeing`` (the default: the compact policy pre-trained on public synthetic VQA, no privacy cost, so the clients'
    colour and shape rewards reach a policy that sees; 150 GRPO steps unless ``grpo.max_steps`` says otherwise) or
    ``sft`` (the tiny image-blind policy, SFT on the server's public split: fast, for smoke tests)."""
    grpo: Annotated[dict[str, Any], Field(strict=True)] = field(default_factory=dict)
    """Overrides of the alignment engine's GRPO settings (e.g. {"max_steps": 200}), applied on top of
    DEMO_GRPO_DEFAULTS; see docs/alignment.md for every field."""
    alignment: dict = field(default_factory=dict)
    """Overrides of the alignment engine's evaluation and warm-start sizes, for quick runs and tests: any of
    eval_size (test examples for before/after accuracy, default 600), curve_size (120; 0: no accuracy curve),
    curve_every (20), sft_steps (warm-start SFT steps on the public split: 50, 0 for compact+synthvqa), sft_batches
    ("balanced" or "proportional": how those steps draw question types; default the recipe's), router_steps (300),
    router_rank_weight (1.0; 0 fits the router on the likelihood alone, docs/alignment.md), router_abstain_z (2.0;
    null: the router never routes a question type to no client, docs/alignment.md) and heldout_pairs
    (held-out pairs per client for the policy's win rates; default all). The best measured pipeline
    is {"sft_steps": 300, "sft_batches": "proportional"} with --warm-start compact+synthetic+sft (README, "Which
    reward earns the alignment")."""
    fresh: Annotated[bool, Field(strict=True)] = False
    """Retrain reward models and the warm start even when cached ones match."""

    @classmethod
    def from_file(cls, path: Path, **overrides) -> "DemoConfig":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"--config {path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--config {path}: not valid JSON ({e})") from None
        except OSError as e:
            raise ValueError(f"--config {path}: cannot be read ({e.strerror or e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--config {path}: expected a JSON object of settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"--config {path}: unknown setting(s) {unknown}; known: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**data)
        try:
            cfg.validate()
        except ValueError as e:
            raise ValueError(f"--config {path}: {e}") from None
        return cfg

    def validate(self) -> None:
        """Check every setting (types, ranges, clients, GRPO overrides, workdir); normalise in place (e.g. epsilon
        "inf" -> math.inf). Raises ValueError naming the first bad setting and what it should be."""
        try:
            checked = TypeAdapter(type(self)).validate_python(
                {f.name: getattr(self, f.name) for f in fields(self)})
        except ValidationError as e:
            raise ValueError(_first_error(e)) from None
        for f in fields(self):
            setattr(self, f.name, getattr(checked, f.name))
        names = [c["name"] for c in self.clients]
        if len(set(names)) != len(names):
            raise ValueError(f"clients: names must be unique, got {names}")
        for i, c in enumerate(self.clients):
            if int(c["partition"][len("client"):]) >= len(self.clients):
                raise ValueError(f"clients[{i}].partition: {c['partition']!r} does not exist in a split over "
                                 f"{len(self.clients)} clients; use client0..client{len(self.clients) - 1}")
        if self.mode in SECAGG_MODES and len(self.clients) < 2:
            raise ValueError(f"mode: {self.mode} needs at least 2 clients (have {len(self.clients)}); add a client "
                             "or use mode plain")
        _check_grpo(self.grpo)


def _loc(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _first_error(e: ValidationError) -> str:
    """One line from pydantic's errors: the setting's path, what is wrong, what was given."""
    err = e.errors()[0]
    where = _loc(err["loc"]) or "config"
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return f"{where}: unknown setting; a client takes {', '.join(ClientSpec.__annotations__)}"
    if kind == "missing":
        return f"{where} is missing"
    if kind == "too_short":
        return f"{where}: needs at least {err.get('ctx', {}).get('min_length', 1)} item(s), got {err.get('input')!r}"
    msg = msg.removeprefix("Value error, ").replace("Input should be", "must be")
    msg = msg[0].lower() + msg[1:] if msg else msg
    more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
    return f"{where}: {msg}, got {err.get('input')!r}{more}"


def _check_grpo(grpo: dict) -> None:
    """``grpo`` overrides: known GRPORunConfig fields of the right types and ranges (checked before any work)."""
    from ..alignment.grpo import GRPORunConfig

    known = {f.name for f in fields(GRPORunConfig)}
    unknown = sorted(set(grpo) - known)
    if unknown:
        raise ValueError(f"grpo: unknown setting(s) {unknown}; known: {sorted(known)}")
    import typing

    hints = typing.get_type_hints(GRPORunConfig)
    for k, v in grpo.items():
        try:
            TypeAdapter(hints[k]).validate_python(v, strict=True)
        except ValidationError as e:
            raise ValueError(f"grpo.{k}: " + _first_error(e).split(": ", 1)[-1]) from None
    try:
        GRPORunConfig(**{**DEMO_GRPO_DEFAULTS, **grpo}).validate()
    except ValueError as e:
        raise ValueError(str(e).replace("GRPORunConfig.", "grpo.").replace("GRPORunConfig:", "grpo:")) from None


def alignment_overrides(cfg: DemoConfig) -> dict:
    """``cfg.alignment`` checked: known keys only, each a whole number (>= 1 for router_steps and curve_every; 0 allowed
    for sft_steps: no SFT on the public split), sft_batches one of ``recipes.SFT_BATCHES``, router_rank_weight a
    finite number >= 0, router_abstain_z one or null."""
    extra = cfg.alignment if cfg.alignment is not None else {}
    if not isinstance(extra, dict):
        raise ValueError(f"alignment must be a JSON object of settings {list(ALIGNMENT_OVERRIDES)}, got {extra!r}")
    bad = sorted(set(extra) - set(ALIGNMENT_OVERRIDES))
    if bad:
        raise ValueError(f"alignment: unknown setting(s) {bad}; known: {list(ALIGNMENT_OVERRIDES)}")
    for k, v in extra.items():
        if k == "sft_batches":  # recipes.recipe_sft's own check, named by its field here
            from ..alignment.recipes import recipe_sft

            try:
                recipe_sft(cfg.warm_start, batches=v)
            except ValueError as e:
                raise ValueError(f"alignment.{e}") from None
            continue
        if k == "router_rank_weight":  # the router's own check, named by its field here
            from ..alignment.router import check_rank_weight

            check_rank_weight(v, "alignment.router_rank_weight")
            continue
        if k == "router_abstain_z":
            from ..alignment.router import check_abstain_z

            check_abstain_z(v, "alignment.router_abstain_z")
            continue
        low = 0 if k in ("eval_size", "curve_size", "heldout_pairs", "sft_steps") else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"alignment.{k} must be a whole number >= {low}, got {v!r}")
    return dict(extra)


def _say(step: int, total: int, msg: str) -> None:
    print(f"[{step}/{total}] {msg}", flush=True)


def _model_key(cfg: DemoConfig, c: dict) -> str:
    from mor_client.rewards.config import DEMO_PRESETS

    blob = json.dumps({**{k: v for k, v in c.items() if k != "name"}, "epsilon": str(cfg.epsilon),
                       "seed": cfg.seed, "n": len(cfg.clients), "preset": DEMO_PRESETS.get(c.get("arch"), {}),
                       "v": 2}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_clients(cfg: DemoConfig, work: Path) -> dict[str, dict]:
    """Each client trains its reward model in its own process (cached by settings); returns the cards."""
    cards = {}
    for c in cfg.clients:
        cdir = work / "clients" / c["name"]
        model = cdir / "model"
        key = _model_key(cfg, c)
        stamp = model / ".demo-key"
        if not cfg.fresh and stamp.exists() and stamp.read_text() == key and (model / "card.json").exists():
            print(f"    {c['name']}: reusing cached {c['arch']} reward model ({model})", flush=True)
        else:
            print(f"    {c['name']}: training a {c['arch']} reward model on {c['partition']} with DP-SGD "
                  f"(ε={cfg.epsilon})", flush=True)
            # trained into a staging folder, stamped, then swapped in whole: a run killed mid-training (or
            # mid-save) never leaves a half-written model that the cache would trust
            staged = staging_dir(model)
            argv = mor_client_argv("train", "--arch", c["arch"], "--partition", c["partition"],
                                   "--n-clients", str(len(cfg.clients)), "--epsilon", str(cfg.epsilon),
                                   "--data-seed", str(cfg.seed), "--seed", str(cfg.seed), "--out", str(staged),
                                   "--ledger", str(cdir / "ledger.sqlite"), "--model-id", f"{c['name']}-{key}")
            for opt in ("max_pairs", "epochs", "batch_size", "pretrain_epochs"):
                if c.get(opt) is not None:
                    argv += [f"--{opt.replace('_', '-')}", str(c[opt])]
            t0 = time.perf_counter()
            rc = run_child(argv, pidfile=_pid_dir(work) / f"{c['name']}-train.pid.json", role="train")
            if rc != 0:
                shutil.rmtree(staged, ignore_errors=True)
                raise RuntimeError(f"training the reward model of {c['name']} failed (exit {rc}); "
                                   f"command: {' '.join(argv)}")
            (staged / ".demo-key").write_text(key)
            replace_dir(staged, model)
            print(f"    {c['name']}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        from mor_client.rewards.store import read_card

        cards[c["name"]] = read_card(model)  # a corrupt card.json: a ValueError naming the file
    return cards


def setup_pki(cfg: DemoConfig, work: Path) -> Path:
    d = work / "pki"
    if not (d / "ca" / "ca.key").exists():
        pki.init_ca(d)
    for c in cfg.clients:
        if not (d / "clients" / c["name"] / "tls.crt").exists():
            pki.issue_client(d, c["name"])
    pki.refresh_crl(d)  # the demo is its own CA: a reused PKI's CRL must not have gone stale (the server refuses then)
    return d


def start_clients(cfg: DemoConfig, work: Path, port: int, pki_dir: Path) -> list[ClientProcess]:
    modes = ",".join(MODES)
    procs = []
    for c in cfg.clients:
        cdir = work / "clients" / c["name"]
        argv = mor_client_argv("join", "--server", f"localhost:{port}", "--creds", str(pki_dir / "clients" / c["name"]),
                               "--model", str(cdir / "model"), "--modes", modes, "--ledger", str(cdir / "ledger.sqlite"),
                               "--budget", str(cfg.client_budget), "--audit", str(cdir / "audit.jsonl"))
        procs.append(ClientProcess(c["name"], argv, cdir / "join.log",
                                   pidfile=_pid_dir(work) / f"{c['name']}-join.pid.json").start())
    return procs


def _pid_dir(work: Path) -> Path:
    """Pidfiles of the demo's child processes while they run (``mor demo`` reaps leftovers of a killed run)."""
    return work / "pids"


def align(cfg: DemoConfig, work: Path, backend, server, *, cards: dict | None = None, stop=None) -> dict:
    """Run the alignment engine over the federated backend on the embedded easy-vqa default."""
    from mor_client.data.partition import make_federation_split
    from privacy.ledger import PrivacyLedger

    from ..alignment.pipeline import AlignmentConfig, heldout_test, run_alignment
    from ..alignment.grpo import GRPORunConfig

    split = make_federation_split(seed=cfg.seed, n_clients=len(cfg.clients))
    heldout = {c["name"]: split.clients[c["partition"]].heldout for c in cfg.clients
               if c["partition"] in split.clients}
    known = {f for f in GRPORunConfig.__dataclass_fields__}
    unknown = sorted(set(cfg.grpo) - known)
    if unknown:
        raise ValueError(f"grpo: unknown setting(s) {unknown}; known: {sorted(known)}")
    import easy_vqa

    from ..alignment.recipes import recipe_sft, warm_start_recipe

    extra = alignment_overrides(cfg)
    if "heldout_pairs" in extra:
        n = extra.pop("heldout_pairs")
        heldout = {c: list(p)[:n] for c, p in heldout.items()}
    extra["sft"] = recipe_sft(cfg.warm_start, extra.pop("sft_steps", None), extra.pop("sft_batches", None))
    extra["tiny"], extra["pretrain"] = warm_start_recipe(cfg.warm_start, seed=cfg.seed)
    acfg = AlignmentConfig(**extra, work_dir=str(work / "alignment"),
                           grpo=GRPORunConfig(**{**DEMO_GRPO_DEFAULTS, **recipe_grpo(cfg.warm_start), **cfg.grpo}),
                           seed=cfg.seed, answer_vocabulary=list(easy_vqa.get_answers()),
                           deadline_s=cfg.round_timeout * 2, w_format=cfg.w_format, w_length=cfg.w_length,
                           resume=False if cfg.fresh else "auto",
                           resume_key=json.dumps({"mode": cfg.mode, "calibration_mode": cfg.calibration_mode,
                                                  "dp_noise_multiplier": cfg.dp_noise_multiplier,
                                                  "models": {n: c.get("weights_sha256")
                                                             for n, c in sorted((cards or {}).items())}},
                                                 sort_keys=True))

    def client_epsilon() -> dict[str, float]:
        out = {}
        for c in cfg.clients:
            with PrivacyLedger(work / "clients" / c["name"] / "ledger.sqlite") as L:
                out[c["name"]] = L.epsilon("client")
        return out

    res = run_alignment(backend, public=split.server_public, unlabeled=split.server_unlabeled,
                        test=heldout_test(split), heldout_pairs=heldout, config=acfg,
                        registry=server.metrics.registry, epsilon=client_epsilon, stop=stop)
    res.pop("model", None)
    res.pop("processor", None)
    return res


def run_demo(cfg: DemoConfig) -> dict:
    """The whole demo. SIGINT/SIGTERM stop it cleanly (DemoInterrupted); a rerun after a crash or a stop resumes:
    cached reward models and warm start, the calibrated router, GRPO from its newest complete checkpoint."""
    cfg.validate()
    alignment_overrides(cfg)
    work = Path(cfg.workdir)
    return run_job(work, "mor demo", lambda stop, sigs: _run_demo_locked(cfg, work, stop, sigs))


def _run_demo_locked(cfg: DemoConfig, work: Path, stop, sigs) -> dict:
    from privacy.audit import AuditError, AuditLog

    from ..federation.backend import DEFAULT_VALUE_RANGE, FederatedBackend
    from ..federation.config import ServerConfig
    from ..federation.thread import ServerThread

    reaped = reap_stale(_pid_dir(work))
    if reaped:
        print(f"    stopped {len(reaped)} process(es) left by an earlier run that died: "
              + ", ".join(f"{Path(r['pidfile']).name.removesuffix('.pid.json')} (pid {r['pid']})" for r in reaped),
              flush=True)
    total = 5
    t_start = time.perf_counter()
    _say(1, total, f"PKI: federation CA and {len(cfg.clients)} client certificates in {work / 'pki'}")
    pki_dir = setup_pki(cfg, work)
    _say(2, total, "reward models: each client trains its own, privately (DP-SGD)")
    cards = train_clients(cfg, work)
    _say(3, total, "federation: server (mTLS, audit log, metrics) and client processes over loopback")
    # a killed run can leave a torn last line: moved aside and recorded in a signed recovery entry (privacy.audit)
    try:
        audit = AuditLog(work / "server-audit.jsonl", actor="server", on_torn="recover",
                         signing_key=pki.load_identity_key(pki_dir / "server" / "identity.key"))
    except AuditError as e:
        raise ValueError(f"server audit log: {e}") from None
    if audit.recovered is not None:
        print(f"    server audit log recovered after an unclean shutdown: {json.dumps(audit.recovered.payload)}",
              flush=True)
    server = ServerThread(ServerConfig(pki_dir=pki_dir, metrics_port=0, audit=audit))
    procs: list[ClientProcess] = []
    try:
        port = server.start()
        procs = start_clients(cfg, work, port, pki_dir)
        try:
            online = server.wait_for_clients(len(cfg.clients), timeout=120)
        except TimeoutError as e:
            logs = "\n".join(f"--- {p.name} ---\n{p.tail(15)}" for p in procs)
            raise RuntimeError(f"{e}\nclient logs:\n{logs}") from None
        print(f"    server on localhost:{port}, metrics on :{server.metrics_port}/metrics; "
              f"clients online: {', '.join(online)}", flush=True)
        backend = FederatedBackend(server, calibration_mode=cfg.calibration_mode, mix_mode=cfg.mode,
                                   timeout=cfg.round_timeout, min_clients=max(1, len(cfg.clients) - 1),
                                   dp_noise_multiplier=cfg.dp_noise_multiplier)
        _say(4, total, "alignment: warm start -> router calibration -> GRPO with federated rewards -> evaluation")
        result = align(cfg, work, backend, server, cards=cards, stop=stop)  # a signal: run_job reports the checkpoint
        m = server.metrics
        fed = {"rounds_completed": int(m.total("mor_rounds_completed_total")),
               "rounds_failed": int(m.total("mor_rounds_failed_total")),
               "dropouts": int(m.total("mor_client_dropouts_total")),
               "backend": dict(backend.rounds)}
        if cfg.mode in SECAGG_MODES:  # the score range the clients encoded in (secagg: set by the calibration)
            fed["secagg_value_range"] = backend.secagg_options.get("value_range", DEFAULT_VALUE_RANGE)
    finally:
        if sigs.signum is not None:
            sigs.quiet()
            print("mor demo: stopping the clients and the server", file=sys.stderr, flush=True)
        stop_all(procs)
        server.stop()
        audit.close()
    _say(5, total, "report")
    resumed = (result.get("grpo") or {}).get("resumed_from")
    if resumed:  # the server's counters restarted with this run; ledgers and audit logs span every attempt
        fed["scope"] = (f"this run only (it resumed GRPO from {Path(resumed).name}); the ledgers, the audit logs and "
                        "alignment.rounds cover the interrupted runs too")
    warning = rounds_warning(fed, work)
    if warning:
        fed["warning"] = warning
    report = {"config": asdict(cfg), "cards": cards, "federation": fed, "alignment": result,
              "clients": _client_privacy(cfg, work), "seconds": time.perf_counter() - t_start,
              "reaped_stale_processes": [{k: r[k] for k in ("pid", "role", "pidfile")} for r in reaped]}
    out = work / "report"
    out.mkdir(parents=True, exist_ok=True)
    # atomically (a kill while writing leaves the previous report, not half of one)
    from privacy.fsutil import atomic_write_text

    atomic_write_text(out / "demo.json", json.dumps(report, indent=2, default=str))
    print_summary(report, out)
    return report


def rounds_warning(fed: dict, work: Path) -> str | None:
    """One line for the report when most federated rounds failed (None otherwise): the aligned policy then learned
    from the format rule, not from the clients, and the report's accuracy must not be read as MoR's."""
    done, failed = int(fed.get("rounds_completed", 0)), int(fed.get("rounds_failed", 0))
    if failed == 0 or 2 * failed <= done + failed:
        return None
    return (f"{failed} of {done + failed} federated rounds failed, so GRPO learned mostly from the format rule, not "
            f"from the clients' rewards. Each client's audit log says why ({work / 'clients'}/<name>/audit.jsonl, "
            "'refusal' events): a spent privacy budget (raise client_budget or dp_noise_multiplier), or the query "
            "audit refusing items this work dir's clients already summed with other weights (use a new --workdir)")


def _client_privacy(cfg: DemoConfig, work: Path) -> dict:
    from privacy.ledger import PrivacyLedger

    out = {}
    for c in cfg.clients:
        path = work / "clients" / c["name"] / "ledger.sqlite"
        with PrivacyLedger(path) as L:
            s = L.summary()
        out[c["name"]] = s
    return out


def _fmt_eps(x) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "inf" if math.isinf(x) else f"{x:.2f}"


def print_summary(report: dict, out: Path) -> None:
    al = report["alignment"]
    print("\n== MoR demo: results ==")
    before, after = al["accuracy_before"], al["accuracy_after"]
    rows = [("overall", before["overall"], after["overall"])] + [
        (f"  {d}", b, after["by_domain"].get(d, float("nan"))) for d, b in sorted(before["by_domain"].items())]
    print(f"{'easy-vqa test accuracy':<24}{'reference':>10}{'aligned':>10}{'change':>9}")
    for k, b, a in rows:
        print(f"{k:<24}{100 * b:>9.1f}%{100 * a:>9.1f}%{100 * (a - b):>+8.1f}")
    if after.get("diversity"):
        from ..alignment.evaluate import format_accuracy_table
        print("aligned policy's answers per domain (accuracy next to what always giving the commonest answer scores):")
        print(format_accuracy_table(after))
    print(f"KL(aligned || reference): {al['kl_to_reference']:.4f}")
    from ..alignment.calibration import summary_lines

    for line in summary_lines(al.get("router") or {}):
        print(line)
    print(f"\n{'client':<18}{'arch':<7}{'heldout acc':>12}{'ε example (pair)':>18}{'ε client':>10}")
    for name, card in report["cards"].items():
        priv = report["clients"].get(name, {})
        units = priv.get("units", priv)
        eps_pair = (units.get("pair") or {}).get("epsilon", card.get("epsilon"))
        eps_client = (units.get("client") or {}).get("epsilon", 0.0)
        win = al.get("win_rate_after", {}).get(name)
        print(f"{name:<18}{card.get('architecture', '?'):<7}{card.get('heldout_pairwise_accuracy', float('nan')):>12.3f}"
              f"{_fmt_eps(eps_pair):>18}{_fmt_eps(eps_client):>10}"
              + (f"   policy win rate on its held-out pairs {win:.2f}" if isinstance(win, float) else ""))
    f = report["federation"]
    print(f"\nfederated rounds: {f['rounds_completed']} completed, {f['rounds_failed']} failed, "
          f"{f['dropouts']} dropouts; mode {report['config']['mode']}; total {report['seconds']:.0f} s")
    if f.get("warning"):
        print(f"WARNING: {f['warning']}")
    g = al.get("grpo", {})
    if g.get("resumed_from"):
        print(f"GRPO resumed from {Path(g['resumed_from']).name} of an interrupted run; finished at step "
              f"{g.get('global_step')}")
    print(f"report: {out / 'demo.json'} (alignment details: {al.get('report_path')})")
    if al.get("plots"):
        print("plots: " + ", ".join(al["plots"]))


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the full federated alignment demo on the embedded default (easy-vqa)")
    from mor.cliargs import existing_file

    p.add_argument("--config", type=existing_file,
                   help="JSON file with DemoConfig settings (README, 'mor demo'; docstrings in mor_server/apps/demo.py)")
    p.add_argument("--workdir", type=output_dir, help="output folder (default: runs/demo)")
    p.add_argument("--mode", choices=MODES, help="privacy mode of GRPO's scoring rounds (default: secagg)")
    p.add_argument("--seed", type=non_negative_int, help="seed of the split, inits, DP noise and sampling (default: 0)")
    p.add_argument("--steps", type=positive_int,
                   help="GRPO steps (overrides grpo.max_steps; default: the warm start's, 150 for seeing, 400 for the "
                        "others)")
    p.add_argument("--warm-start", dest="warm_start", choices=WARM_STARTS,
                   help=WARM_START_HELP + f" (default: {DEFAULT_WARM_START})")
    p.add_argument("--fresh", action="store_true", default=None, help="retrain cached reward models and warm start")
    p.set_defaults(func=_demo_cmd)


def _demo_cmd(args: argparse.Namespace) -> int:
    over = dict(workdir=None if args.workdir is None else str(args.workdir), mode=args.mode, seed=args.seed,
                fresh=args.fresh, warm_start=args.warm_start)
    cfg = DemoConfig.from_file(args.config, **over) if args.config else DemoConfig(
        **{k: v for k, v in over.items() if v is not None})
    if args.steps is not None:
        cfg.grpo = {**cfg.grpo, "max_steps": args.steps}
    cfg.validate()  # everything checked before any work starts (run_demo checks again: it is also a library call)
    try:
        run_demo(cfg)
    except DemoInterrupted as e:
        close_progress_bars()  # before the message, so no bar is redrawn after it at exit
        print(f"mor demo: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    return 0
