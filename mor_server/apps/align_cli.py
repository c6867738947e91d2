"""``mor align``: the alignment engine (warm start -> router calibration -> GRPO -> evaluation) on the embedded
easy-vqa task, with rewards from one of three sources:

* ``--serve`` (a deployment's server side): this process runs the federation server (mTLS, audit log, metrics) on
  ``--pki``, waits for ``--min-clients`` institutions running ``mor client join``, and aligns with their rewards
  in ``--mode`` (plain, dp, secagg, secagg+dp);
* ``--models DIR``: trained client reward models (``DIR/<client>/model/card.json``, e.g. ``runs/demo/clients``)
  loaded in-process, no federation;
* neither: label experts in-process (one per question type; the upper bound of what trained reward models give).

A thin shell over :func:`mor_server.alignment.pipeline.run_alignment`; SIGINT/SIGTERM end GRPO's current step with a
checkpoint and a rerun resumes (mor_server/jobcontrol.py), like ``mor demo``.

Under ``accelerate launch`` (DDP or DeepSpeed, one process per GPU) every rank runs this command; only rank 0 runs
the federation server (``--serve``) and scoring rounds, the other ranks train on the rewards it gathers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mor.cliargs import (RawHelpFormatter, UsageError, bind_host, existing_dir, non_negative_float, non_negative_int,
                         output_dir, port, positive_float, positive_int)
from mor.modes import MODES, PER_CLIENT_MODES, SECAGG_MODES

from ..alignment.recipes import DEFAULT_WARM_START, SFT_BATCHES, WARM_START_HELP, WARM_STARTS

#: privacy modes of the federated reward rounds (``--mode``)
ALIGN_MODES = MODES


def device_arg(text: str) -> str:
    """``--device``: cpu, cuda or cuda:N (checked at parse time; whether CUDA is there is checked before work)."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    return text.strip()


def freeze_arg(text: str) -> str:
    """``--freeze``: parts of the policy GRPO leaves untouched (``grpo.FREEZABLE``, comma-separated) or ``none``."""
    if text.strip() == "none":
        return ""
    from ..alignment.grpo import FREEZABLE

    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in FREEZABLE]
    if not parts or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: use none or a comma-separated list of {', '.join(FREEZABLE)}")
    return ",".join(parts)


def register(sub) -> None:
    p = sub.add_parser("align", help="align a VLM with GRPO on rewards from a live federation (--serve), trained "
                                     "reward models (--models) or label experts",
                       description=__doc__.rsplit("\n\n", 1)[0].replace("``", "`"), formatter_class=RawHelpFormatter)
    p.add_argument("--workdir", "--work-dir", dest="workdir", type=output_dir, default=Path("runs/align"),
                   help="output folder: reference, router, GRPO checkpoints, report (--work-dir: the same)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the split, policy init and sampling")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="GRPO steps (default: the warm start's, 150 for seeing; 400 for the other recipes and with "
                        "--preset/--policy)")
    p.add_argument("--sft-steps", type=non_negative_int, default=None,
                   help="warm-start SFT steps on the public split (default: the --warm-start recipe's, 50; 0 for "
                        "seeing and the compact+synthvqa recipes; 0: none)")
    p.add_argument("--sft-batches", choices=SFT_BATCHES, default=None,
                   help="how the warm-start steps draw question types: balanced (an equal share each) or "
                        "proportional (as in the public split); default: the --warm-start recipe's")
    p.add_argument("--lr", type=positive_float, default=None, help="GRPO learning rate (default: the engine's)")
    p.add_argument("--beta", type=non_negative_float, default=None, help="KL weight (default: the engine's)")
    p.add_argument("--temperature", type=positive_float, default=None,
                   help="sampling temperature (default 1.0; 1.5 for seeing and the compact+synthvqa recipes)")
    p.add_argument("--freeze", type=freeze_arg, default=None, metavar="PARTS",
                   help="parts of the policy GRPO leaves untouched, comma-separated: vision (vision tower and "
                        "projector), embeddings; 'none' trains every weight (default: the warm start's: vision for "
                        "seeing; none for --preset and --policy)")
    p.add_argument("--top-k", type=positive_int, default=None, help="route each item to its top-k clients only")
    p.add_argument("--warm-start", dest="warm_start", choices=WARM_STARTS, default=None,
                   help=WARM_START_HELP + f" (as mor demo --warm-start; default: {DEFAULT_WARM_START} for the built-in "
                        "policy, none with --preset or --policy)")
    p.add_argument("--routing", choices=("learned", "uniform"), default="learned",
                   help="learned: the Mixture-of-Rewards router; uniform: the ablation without a router (uniform "
                        "weights, only the reward scale calibrated) (default: learned)")
    p.add_argument("--router-features", nargs="+", choices=("type", "image", "question"), default=["type"],
                   help="the router's input features: the question's answer type, pooled image pixels, hashed question "
                        "words (default: type; docs/alignment.md, \"The router's features\")")
    p.add_argument("--router-rank-weight", type=non_negative_float, default=1.0,
                   help="weight of the routed clients' expected ranking error in the router's fit, next to the "
                        "likelihood; 0: the likelihood alone, which leaves a client ranking answers backwards part of "
                        "the score (default: 1.0; docs/alignment.md, \"A router that shuts out a flipped client\")")
    p.add_argument("--router-abstain-z", type=non_negative_float, default=2.0,
                   help="route a question type to no client when the router's mixture does not rank its right answer "
                        "above chance by this many standard errors on the calibration items (default: 2.0)")
    p.add_argument("--no-router-abstain", dest="router_abstain_z", action="store_const", const=None,
                   help="never route a question type to no client")
    p.add_argument("--w-format", type=non_negative_float, default=4.0, help="weight of the typed answer-format rule")
    p.add_argument("--eval-size", type=positive_int, default=600, help="held-out test examples evaluated")
    p.add_argument("--policy", type=existing_dir, default=None, metavar="DIR",
                   help="a local Hugging Face VLM folder to align instead of the built-in tiny Llava (no warm start)")
    p.add_argument("--adapter", type=existing_dir, default=None, metavar="DIR",
                   help="a peft LoRA adapter folder on top of --policy")
    p.add_argument("--preset", choices=("tiny", "small", "base", "byo"), default=None,
                   help="policy size and its GRPO/warm-start defaults: tiny (0.24M, the default), small (40M), base "
                        "(383M), byo (defaults for your own --policy: LoRA r=16, lr 5e-5; the default with "
                        "--policy); small/base/byo defaults are not GPU-validated yet (docs/alignment.md)")
    p.add_argument("--device", type=device_arg, default=None, metavar="DEV",
                   help="force a device for warm start, evaluation and GRPO (cpu, cuda, cuda:1; default: CUDA with "
                        "bf16 when present)")
    p.add_argument("--lora-r", type=non_negative_int, default=None,
                   help="LoRA rank of GRPO through TRL's peft_config (0: full fine-tuning; default: the preset's)")
    p.add_argument("--collapse-every", type=non_negative_int, default=None,
                   help="check the policy's answers on a fixed probe every N GRPO steps and stop when they "
                        "degenerate (empty, or one answer per question type); 0: off (default 20)")
    p.add_argument("--collapse-action", choices=("stop", "rollback"), default="stop",
                   help="on collapse: stop there, or stop and restore the weights of the last good check")
    p.add_argument("--use-vllm", action="store_true",
                   help="generate GRPO's completions with vLLM (TRL use_vllm, colocate mode; needs CUDA and vllm)")
    p.add_argument("--fresh", action="store_true",
                   help="start over even when an interrupted run with the same settings left a checkpoint in "
                        "--workdir (by default such a run resumes from its newest complete checkpoint)")
    src = p.add_argument_group("reward source (default: label experts in-process)")
    one = src.add_mutually_exclusive_group()
    one.add_argument("--serve", action="store_true",
                     help="run the federation server here and align on the rewards of the clients that join")
    one.add_argument("--models", type=existing_dir, default=None, metavar="DIR",
                     help="trained client reward models in-process: DIR/<client>/model/card.json")
    fed = p.add_argument_group("federation (with --serve)")
    fed.add_argument("--pki", type=existing_dir, default=Path("pki"), help="PKI folder made by `mor pki init`")
    fed.add_argument("--host", type=bind_host, default="127.0.0.1", help="address to listen on")
    fed.add_argument("--port", type=port, default=50051, help="TCP port to listen on (0: any free port)")
    fed.add_argument("--metrics-port", type=port, default=None, help="serve Prometheus /metrics on this port")
    fed.add_argument("--min-clients", type=positive_int, default=2, help="clients that must join before alignment")
    fed.add_argument("--quorum", type=positive_int, default=None,
                     help="fewest clients that must answer a reward round (default: --min-clients minus one, at "
                          "least 1; at least 2 in secagg modes)")
    fed.add_argument("--wait-clients", type=positive_float, default=600.0,
                     help="seconds to wait for --min-clients before giving up")
    fed.add_argument("--mode", choices=ALIGN_MODES, default="secagg",
                     help="privacy mode of GRPO's reward rounds")
    fed.add_argument("--calibration-mode", choices=PER_CLIENT_MODES, default="plain",
                     help="mode of the router-calibration round on the public pairs")
    fed.add_argument("--round-timeout", type=positive_float, default=60.0, help="deadline of one reward round (s)")
    fed.add_argument("--dp-noise-multiplier", type=positive_float, default=1.0,
                     help="noise multiplier of dp / secagg+dp releases")
    p.set_defaults(func=_align_cmd)


def _check(args) -> None:
    """Cross-flag checks (one line naming the flag), before any work starts."""
    if args.adapter is not None and args.policy is None:
        raise UsageError("--adapter needs --policy DIR (the base model the adapter belongs to)")
    if args.preset == "byo" and args.policy is None:
        raise UsageError("--preset byo needs --policy DIR (it sets the defaults for a model of your own)")
    if args.preset in ("tiny", "small", "base") and args.policy is not None:
        raise UsageError(f"--preset {args.preset} is a built-in policy size; with --policy DIR use --preset byo "
                         "(or leave --preset out)")
    if args.warm_start is not None and (args.policy is not None or args.preset is not None):
        raise UsageError(f"--warm-start {args.warm_start} is a recipe of the built-in policy (the default); "
                         "leave out --preset and --policy, or leave out --warm-start")
    if args.device is not None and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    if args.use_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UsageError("--use-vllm: the vllm package is not installed (pip install vllm, on a CUDA machine)")
    if args.models is not None:
        dirs = sorted(d for d in Path(args.models).glob("*/model") if (d / "card.json").is_file())
        if not dirs:
            raise UsageError(f"--models {args.models}: no <client>/model/card.json below it; train models with "
                             "`mor client train` or run `mor demo` first")
    if args.serve:
        quorum = _quorum(args)
        if args.mode in SECAGG_MODES and (args.min_clients < 2 or quorum < 2):
            raise UsageError(f"--mode {args.mode} needs --min-clients and --quorum of 2 or more (a sum over one "
                             "client is its score)")
        if quorum > args.min_clients:
            raise UsageError(f"--quorum {quorum} is larger than --min-clients {args.min_clients}")
        for name in ("server/ca.crt", "server/server.crt", "server/server.key", "server/identity.key"):
            if not (Path(args.pki) / name).is_file():
                raise UsageError(f"--pki {args.pki}: no {name}; create the PKI with `mor pki init --pki DIR`")


def _quorum(args) -> int:
    if args.quorum is not None:
        return args.quorum
    floor = 2 if args.mode in SECAGG_MODES else 1
    return max(floor, args.min_clients - 1)


def _config(args, resume_key: str):
    import easy_vqa

    from ..alignment.grpo import GRPORunConfig
    from ..alignment.guard import CollapseGuardConfig
    from ..alignment.pipeline import AlignmentConfig
    from ..alignment.recipes import recipe_grpo, recipe_sft, warm_start_recipe

    grpo = {k: v for k, v in dict(max_steps=args.steps, learning_rate=args.lr, beta=args.beta,
                                  temperature=args.temperature, lora_r=args.lora_r,
                                  freeze=args.freeze).items() if v is not None}
    if args.use_vllm:
        grpo["use_vllm"] = True
    guard = CollapseGuardConfig(action=args.collapse_action,
                                **({} if args.collapse_every is None else {"every": args.collapse_every}))
    common = dict(work_dir=str(args.workdir), seed=args.seed, eval_size=args.eval_size,
                  resume=False if args.fresh else "auto", resume_key=resume_key, top_k=args.top_k,
                  routing=args.routing, router_features=tuple(args.router_features),
                  router_rank_weight=args.router_rank_weight, router_abstain_z=args.router_abstain_z,
                  w_format=args.w_format, answer_vocabulary=list(easy_vqa.get_answers()),
                  deadline_s=args.round_timeout * 2, device=args.device, collapse_guard=guard,
                  policy_path=None if args.policy is None else str(args.policy),
                  adapter_path=None if args.adapter is None else str(args.adapter))
    preset = args.preset or ("byo" if args.policy is not None else None)
    if preset is not None:
        sft = {} if args.sft_steps is None else {"steps": args.sft_steps}
        if args.sft_batches is not None:
            sft["balance_types"] = args.sft_batches == "balanced"
        return AlignmentConfig.from_preset(preset, grpo=grpo, sft=sft, **common)
    warm = args.warm_start or DEFAULT_WARM_START
    grpo = {**recipe_grpo(warm), **grpo}  # the recipe's GRPO settings, unless a flag sets them
    extra = {"sft": recipe_sft(warm, args.sft_steps, args.sft_batches)}
    extra["tiny"], extra["pretrain"] = warm_start_recipe(warm, seed=args.seed)
    return AlignmentConfig(grpo=GRPORunConfig(**grpo), **common, **extra)


def _align_cmd(args: argparse.Namespace) -> int:
    from .jobcontrol import RunInterrupted, close_progress_bars, run_job

    _check(args)
    work = Path(args.workdir)
    try:
        if _rank() == 0:
            report = run_job(work, "mor align", lambda stop, sigs: _run(args, work, stop, sigs))
        else:  # under accelerate launch / torchrun rank 0 holds the folder's lock for the whole job
            report = _rank_job(args, work)
    except RunInterrupted as e:
        close_progress_bars()
        print(f"mor align: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    _print(report)
    return 0


def _rank_job(args, work: Path) -> dict:
    """What :func:`mor_server.jobcontrol.run_job` does, without the workdir lock (rank 0 holds it): SIGINT/SIGTERM
    end GRPO's current step, and a GRPO stopped that way becomes RunInterrupted."""
    import signal

    from ..alignment.grpo import GracefulStop, GRPOInterrupted
    from .jobcontrol import RunInterrupted, Signals

    stop = GracefulStop()
    with Signals(stop, "mor align") as sigs:
        try:
            return _run(args, work, stop, sigs)
        except GRPOInterrupted as e:
            raise RunInterrupted(sigs.signum or signal.SIGTERM, e.checkpoint, e.step) from None


def _rank() -> int:
    """This process's rank under ``accelerate launch`` / torchrun (0 without them)."""
    import os

    return int(os.environ.get("RANK", "0"))


class RankBackend:
    """The reward backend of a rank other than 0 under ``accelerate launch --serve``: the federation server runs on
    rank 0 only, and MoRReward gathers every rank's completions to it, so nothing here is ever asked to score."""

    def client_ids(self) -> list[str]:
        return []

    def client_scores(self, items, *, purpose="calibration"):
        raise RuntimeError("only rank 0 runs scoring rounds (the federation server lives there)")

    def mixed_scores(self, items, weights):
        raise RuntimeError("only rank 0 runs scoring rounds (the federation server lives there)")


def _run(args, work: Path, stop, sigs) -> dict:
    from mor_client.data.partition import make_federation_split

    from ..alignment.pipeline import heldout_test, run_alignment

    split = make_federation_split(seed=args.seed)
    data = dict(public=split.server_public, unlabeled=split.server_unlabeled, test=heldout_test(split))
    if not args.serve:
        from ..alignment.inprocess import InProcessBackend, LabelExpertScorer

        if args.models is not None:
            from mor_client.rewards.scorer import RewardModelScorer

            dirs = sorted(d for d in Path(args.models).glob("*/model") if (d / "card.json").is_file())
            backend = InProcessBackend({d.parent.name: RewardModelScorer.from_dir(d) for d in dirs})
            key = [[d.parent.name, json.loads((d / "card.json").read_text()).get("weights_sha256")] for d in dirs]
        else:
            known = list(split.server_public) + list(split.server_unlabeled)
            backend = InProcessBackend({f"expert_{d}": LabelExpertScorer(known, [d])
                                        for d in ("color", "shape", "yesno")})
            key = "label-experts"
        cfg = _config(args, json.dumps({"rewards": key, "policy": str(args.policy)}, sort_keys=True))
        return run_alignment(backend, **data, config=cfg, stop=stop)
    if _rank() != 0:
        print(f"mor align: rank {_rank()}: training on the rewards gathered by rank 0 (its server)", flush=True)
        key = json.dumps({"mode": args.mode, "policy": str(args.policy)}, sort_keys=True)
        return run_alignment(RankBackend(), **data, config=_config(args, key), stop=stop)
    return _run_federated(args, work, stop, sigs, data)


def _run_federated(args, work: Path, stop, sigs, data) -> dict:
    from privacy import pki
    from privacy.audit import AuditError, AuditLog

    from ..alignment.pipeline import run_alignment
    from ..federation.backend import FederatedBackend
    from ..federation.config import ServerConfig
    from ..federation.thread import ServerThread

    try:
        audit = AuditLog(work / "server-audit.jsonl", actor="server", on_torn="recover",
                         signing_key=pki.load_identity_key(Path(args.pki) / "server" / "identity.key"))
    except AuditError as e:
        raise UsageError(f"server audit log {work / 'server-audit.jsonl'}: {e}") from None
    server = ServerThread(ServerConfig(host=args.host, port=args.port, pki_dir=Path(args.pki),
                                       metrics_port=args.metrics_port, audit=audit))
    try:
        try:
            port_ = server.start()
        except RuntimeError as e:
            if "bind" not in str(e).lower():
                raise
            raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there; pick another "
                             "--host/--port") from None
        print(f"mor align: server on {args.host}:{port_} (mTLS)"
              + (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else "")
              + f"; waiting up to {args.wait_clients:.0f} s for {args.min_clients} client(s) accepting "
                f"{args.mode}", flush=True)
        online = server.wait_for_clients(args.min_clients, timeout=args.wait_clients, mode=args.mode)
        print(f"mor align: clients online: {', '.join(online)}", flush=True)
        backend = FederatedBackend(server, calibration_mode=args.calibration_mode, mix_mode=args.mode,
                                   timeout=args.round_timeout, min_clients=_quorum(args),
                                   dp_noise_multiplier=args.dp_noise_multiplier)
        key = json.dumps({"mode": args.mode, "calibration_mode": args.calibration_mode,
                          "dp_noise_multiplier": args.dp_noise_multiplier, "clients": sorted(online),
                          "policy": str(args.policy)}, sort_keys=True)
        report = run_alignment(backend, **data, config=_config(args, key),
                               registry=server.metrics.registry, stop=stop)
        report["federation"] = {"clients": list(online), "mode": args.mode, "rounds": dict(backend.rounds)}
        return report
    finally:
        if sigs.signum is not None:
            sigs.quiet()
            print("mor align: stopping the server", file=sys.stderr, flush=True)
        server.stop()
        audit.close()


def _print(rep: dict) -> None:
    from ..alignment.evaluate import format_accuracy_table

    b, f = rep["accuracy_before"], rep["accuracy_after"]
    print(f"accuracy {b['overall']:.3f} -> {f['overall']:.3f}  " + "  ".join(
        f"{d}: {b['by_domain'][d]:.3f} -> {f['by_domain'].get(d, 0):.3f}" for d in b["by_domain"]))
    if f.get("diversity"):
        print(format_accuracy_table(f))
    from ..alignment.calibration import summary_lines

    for line in summary_lines(rep.get("router") or {}):
        print(line)
    print(f"KL to reference {rep['kl_to_reference']:.3f}; rounds {json.dumps(rep['rounds'])}; "
          f"GRPO {rep['grpo']['seconds']:.0f}s; report {rep['report_path']}")
