"""Which reward earns the alignment? GRPO under the same budget with different rewards, side by side (issues #12, #17).

Every cell is one in-process alignment run (``mor_server.alignment.pipeline.run_alignment``: reference -> router
calibration -> GRPO -> evaluation on the same held-out test examples) that differs from its neighbours only in the reward:

* ``mor``: the Mixture of Rewards, the learned router over the clients' trained DP reward models (the router's
  default features: the question's answer type, ``AlignmentConfig.router_features``);
* ``mor-ce``: the same router fitted on the likelihood alone (``AlignmentConfig.router_rank_weight=0``: no
  ranking-error term; every ``mor`` cell measured before 2026-12-04 is stored under this name);
* ``mor-iq``: the same with the router on image + question-word features (the default before issue #17's router
  measurement); ``mor-iq-ce`` the same fitted on the likelihood alone (every ``mor-iq`` cell measured before
  2026-12-04 is stored under this name);
* ``uniform``: the same reward models mixed uniformly (no router; only the reward scale is calibrated);
* ``oracle``: one client holding every label of the server's prompts (exact match): the ceiling any reward gives;
* ``client:<name>``: one client's reward model alone;
* ``server``: a reward model the server trains on its own public labelled split (no client at all; the same cnn
  architecture as the colour client, non-private since the data is the server's own): what a server gets without
  a federation;
* ``server-sft``: no GRPO and no reward at all: the same warm-start recipe with SFT-300 instead of SFT-50 on the
  server's public split (the server-labels-only baseline of ``bench_alignment_seeds.py``), on the same test
  items: what the server's own labels give by supervision alone. Its reference column is the SFT-50 reference's
  accuracy when that reference is cached, else blank.

Scenarios: ``honest`` (the demo's three clients: cnn / colour, vit / shape, lora / yes-no; DP-SGD at epsilon 8, trained by
``mor client train`` exactly as ``mor demo`` trains them) and ``adversary`` (plus a fourth client that inverts a label
expert over every question type: an adversarially flipped annotator; the router should learn to ignore it, a uniform
mixture cannot) and ``inflating`` (the same adversary, its scores multiplied by 100: still inside the
federation's declared score bound of 1000, and enough to outweigh the honest clients in a uniform mixture),
``flipped`` (a fourth client that trains the yes/no client's reward model on the same data with every preference
flipped, DP-SGD at epsilon 8 like the others: a noisy client as loud as the honest ones, where the inverted label
expert scores 0 or 1 and gets 0.02-0.05 of a uniform mixture's score), ``noisy-color`` and ``noisy-yesno`` (the
demo's three clients with the colour or the yes/no one noisy: trained on its own data with every preference flipped,
DP-SGD at epsilon 8; no honest client of its type outvotes it, so a uniform mixture follows it on that type) and
``shapes`` (another task family: a fourth client holds the procedural Pillow shapes domain, counting and left/right
relations, ``make_federation_split(n_clients=4, include_shapes_client=True)``; the server's public and unlabeled
splits and the held-out test gain shapes items, and the four reward models are trained on that split).

Warm starts (``--warm-start``, the recipes of ``mor demo --warm-start``, mor_server/alignment/recipes.py): ``sft`` (the
demo's reference: the built-in tiny Llava, 16 image tokens, SFT-50 on the server's public split) and ``synthetic+sft``
(64 image tokens; vision pre-training 600 steps and captioning 1000 steps of synthetic images, then the same SFT-50),
the policy with which a reward can teach colour (docs/alignment.md); ``compact+synthetic+sft`` (the 0.96M policy, the
same stage 1, a type-balanced SFT-50). A plain label is the recipe's own reference, exactly what ``mor demo`` builds;
``--reference-sft``, ``--balanced-sft`` and ``--proportional-sft`` build other references, labelled
``<warm start>#ref<K>[:<LR>][,balanced|,proportional]``. Cells of one seed are paired only when they started from the
same reference (a reference rebuilt on another host can be another checkpoint).

The demo's GRPO settings (400 steps, 8 prompts x 8 completions, lr 3e-4, beta 0.05, typed format rule at weight 4,
answer-softmax shaping). Each finished cell is cached as one JSON file, so an interrupted grid resumes where it stopped
and two invocations with disjoint ``--seeds`` or ``--methods`` can share the work; progress and an estimate of the time left are
printed. Each GRPO cell also records yes/no accuracy on the items whose wording alone gives the answer and on the
others, for the reference and the aligned policy (``yesno_by_wording``: does the policy answer from the image?). Writes ``benchmarks/results/reward_ablation.json`` and a PNG.

    .venv/bin/python benchmarks/bench_reward_ablation.py --warm-start sft synthetic+sft --methods oracle mor uniform
    .venv/bin/python benchmarks/bench_reward_ablation.py --scenario adversary inflating --methods mor uniform
    .venv/bin/python benchmarks/bench_reward_ablation.py --warm-start compact+synthetic+sft --methods server-sft
    .venv/bin/python benchmarks/bench_reward_ablation.py --warm-start compact+synthetic+sft --reference-sft 300 \
        --methods oracle mor                                # GRPO from the server-sft baseline's checkpoint
    .venv/bin/python benchmarks/bench_reward_ablation.py --warm-start compact+synthetic+sft --methods oracle \
        --grpo learning_rate=1e-3                           # other GRPO settings: cells <warm start>~key=value,...
    .venv/bin/python benchmarks/bench_reward_ablation.py --report-only          # the table from the cached cells

The cells recorded in ``--out`` are restored into an empty cache first, so a fresh clone re-reports (and extends) the
committed grid without re-running it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("mor", "mor-ce", "mor-iq", "mor-iq-ce", "uniform", "oracle", "server", "server-sft", "mor+abstain",
           "uniform+abstain")
ABSTAIN_Z = 2.0  # the "+abstain" methods' AlignmentConfig.router_abstain_z (the pipeline's default); the others: None
SERVER_SFT_STEPS = 300  # bench_alignment_seeds.py's --baseline-steps default: 32 epochs of the 300-example split
EVAL_ITEMS = 600  # every cell is evaluated on the first EVAL_ITEMS held-out test items of its split (the demo's eval_size)

from bench_router import NOISY, client_scorers  # noqa: E402  (the router bench's models and scenarios)

from mor_server.alignment.recipes import WARM_STARTS  # noqa: E402
SCENARIOS = ("honest", "adversary", "inflating", "flipped", *NOISY, "shapes")
NO_SERVER_SIDE = ("adversary", "inflating", "flipped", *NOISY)
"""Scenarios that differ from ``honest`` only in the clients: oracle / server / server-sft cells are honest's."""
TYPES = ("color", "shape", "yesno")
SHAPES_TYPES = ("count", "relation")  # the procedural family's question types (scenario shapes)


def scenario_split(scenario: str, seed: int, synthetic_prompt_images: int = 0):
    """The federation split of a scenario: the demo's three clients, or four with a shapes client; plus
    ``synthetic_prompt_images`` public synthetic images in the server's prompt pool (``--synthetic-prompts``)."""
    from mor_client.data.partition import make_federation_split

    if scenario == "shapes":
        return make_federation_split(seed=seed, n_clients=4, include_shapes_client=True,
                                     synthetic_prompt_images=synthetic_prompt_images)
    return make_federation_split(seed=seed, n_clients=3, synthetic_prompt_images=synthetic_prompt_images)


def split_label(label: str) -> tuple[str, int]:
    """``(warm-start label, synthetic prompt images)`` of a cell's policy label
    ``<warm start>[@sp<N>][#ref<K>][~<GRPO overrides>]``."""
    base, _, pool = label.split("~")[0].split("#ref")[0].partition("@sp")
    return base, int(pool or 0)


def parts(value: str) -> str:
    """A ``freeze`` value of ``--grpo``: parts joined by ``+`` (``embeddings+vision``; a comma separates overrides)."""
    from mor_server.alignment.grpo import GRPORunConfig

    if "," in value:
        raise ValueError(value)
    GRPORunConfig(freeze=value).frozen_parts()  # ValueError for an unknown part
    return value


parts.kind = "list of embeddings, vision joined by +, or empty"


GRPO_OVERRIDABLE = {"learning_rate": float, "beta": float, "temperature": float, "prompts_per_step": int,
                    "num_generations": int, "scale_rewards": str, "loss_type": str, "epsilon": float,
                    "max_steps": int, "freeze": parts, "lr_schedule": str, "warmup_steps": int}


def parse_grpo_overrides(items: list[str]) -> dict:
    """``--grpo key=value ...`` -> GRPORunConfig overrides (checked here: a bad one fails before any training)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in GRPO_OVERRIDABLE:
            raise SystemExit(f"--grpo: {item!r} is not key=value with key one of {', '.join(GRPO_OVERRIDABLE)}")
        try:
            out[key] = GRPO_OVERRIDABLE[key](value)
        except ValueError:
            kind = getattr(GRPO_OVERRIDABLE[key], "kind", GRPO_OVERRIDABLE[key].__name__)
            raise SystemExit(f"--grpo {key}: {value!r} is not a {kind}") from None
    return out


def grpo_overrides(label: str) -> dict:
    """The GRPO overrides a cell's policy label carries after ``~`` (``key=value,...``; none: the demo's settings)."""
    _, _, tail = label.partition("~")
    return parse_grpo_overrides(tail.split(",")) if tail else {}


def recipe_steps(label: str) -> int:
    """GRPO steps of a cell: its label's ``max_steps`` override, else its recipe's own budget (``Recipe.grpo``), else the
    demo's 400."""
    from mor_server.alignment.recipes import recipe_grpo
    from mor_server.apps.demo import DEMO_GRPO_DEFAULTS

    return grpo_overrides(label).get("max_steps") or recipe_grpo(_recipe_name(label)).get(
        "max_steps", DEMO_GRPO_DEFAULTS["max_steps"])


def _recipe_name(label: str) -> str:
    """The recipe of a policy label (``<recipe>[/varied][@spN][#ref...][~...]``)."""
    return split_label(label)[0].partition("/")[0]


def _sft_spec(spec: str, recipe_name: str) -> "SFTConfig":  # noqa: F821
    """SFTConfig of a reference spec ``K[:LR][,balanced|,proportional]`` (the text after ``#ref`` in a label) of a
    recipe; without a batch option the recipe's own (``recipes.recipe_sft``: type-balanced for the compact recipe).
    The one parser of that form, for labels and for ``--reference-sft``."""
    from dataclasses import replace

    from mor_server.alignment.recipes import recipe_sft

    k, _, batches = spec.partition(",")
    steps, _, lr = k.partition(":")
    sft = recipe_sft(recipe_name, int(steps), batches or None)  # ValueError for another batch option
    return replace(sft, max_seconds=3600, **({"learning_rate": float(lr)} if lr else {}))


def reference_sft(label: str) -> "SFTConfig":  # noqa: F821  (imported inside: torch loads lazily)
    """The reference's SFT of a policy label: the recipe's own (SFT-50, or ``recipes.Recipe.sft_steps``; exactly what
    the demo builds), or SFT-K for
    ``...#ref<K>[:<LR>][,balanced|,proportional]`` (``--reference-sft``, ``--balanced-sft``, ``--proportional-sft``),
    built with the settings of the ``server-sft`` baseline so that ``#ref300`` aligns from that very checkpoint."""
    from mor_server.alignment.recipes import recipe_sft

    _, _, spec = label.split("~")[0].partition("#ref")
    return _sft_spec(spec, _recipe_name(label)) if spec else recipe_sft(_recipe_name(label))


def parse_reference_sft(text: str, recipe_name: str, batches: str = "") -> str:
    """``--reference-sft K[:LR]`` (and ``--balanced-sft`` / ``--proportional-sft``: ``batches``) of a recipe -> the
    label suffix (``""`` for the recipe's own SFT, which is what ``mor demo`` builds; ``text`` None: that one)."""
    from mor_server.alignment.recipes import recipe_sft
    from mor_server.alignment.warmstart import SFTConfig

    recipes_own = recipe_sft(recipe_name)
    if text is None:
        text = str(recipes_own.steps)
    try:
        sft = _sft_spec(text + (f",{batches}" if batches else ""), recipe_name)
    except ValueError:
        raise SystemExit(f"--reference-sft: {text!r} is not K or K:LR (steps, then an optional learning rate)") from None
    if sft.steps < 0 or not math.isfinite(sft.learning_rate) or sft.learning_rate <= 0:
        raise SystemExit(f"--reference-sft must be >= 0 steps at a positive learning rate, got {text!r}")
    lr = "" if sft.learning_rate == SFTConfig.learning_rate else f":{sft.learning_rate:g}"
    own = sft.balance_types == recipes_own.balance_types  # the recipe's own batches: no option in the label
    opt = "" if own else (",balanced" if sft.balance_types else ",proportional")
    if sft.steps == recipes_own.steps and not lr and not opt:
        return ""
    return f"#ref{sft.steps}{lr}{opt}"


def reference_dir(label: str, seed: int, cache: Path, tag: str = "") -> Path:
    """Where the reference of a policy label and seed is cached (``server-sft`` cells share the SFT-K folders)."""
    from mor_server.alignment.recipes import recipe_sft
    from mor_server.alignment.warmstart import SFTConfig

    name = split_label(label)[0].replace("+", "_").replace("/", "_")
    sft = reference_sft(label)
    variant = "" if sft.learning_rate == SFTConfig.learning_rate else f"-lr{sft.learning_rate:g}"
    recipes_own = recipe_sft(_recipe_name(label))
    if sft.balance_types != recipes_own.balance_types:
        variant += "-balanced" if sft.balance_types else "-proportional"
    if sft.steps == recipes_own.steps and not variant:
        return cache / "references" / f"{name}-seed{seed}{tag}"
    return cache / "baselines" / f"{name}-sft{sft.steps}{variant}-seed{seed}{tag}"


def stage1_candidates(seed: int, cache: Path, tag: str = "") -> list[Path]:
    """Every recipe's own reference folder of a seed: a reference that ran no SFT step is a stage-1 checkpoint
    another label of the same recipe (or a recipe whose curriculum continues it) starts from
    (``warm_start_cached(stage1_from=...)`` checks which one fits; about 25 min a seed saved on 2 cores)."""
    from mor_server.alignment.recipes import WARM_STARTS

    return [reference_dir(name, seed, cache, tag) for name in WARM_STARTS]


def server_model(seed: int, split, work: Path):
    """The server-only reward model: the cnn architecture trained on the server's public split's pairs (8 wrong
    answers per example; one image in ten held out), non-private (the server's own data); cached in ``work``."""
    import random

    from mor_client.data.pairs import make_pairs
    from mor_client.rewards import demo_config, save_model_dir, train_reward_model
    from mor_client.rewards.scorer import RewardModelScorer

    if not (work / "card.json").is_file():
        t0 = time.perf_counter()
        pairs = make_pairs(split.server_public, seed=seed, rejected_per_example=8)
        imgs = sorted({p.example.image_id for p in pairs})
        random.Random(seed).shuffle(imgs)
        ho = set(imgs[: max(1, len(imgs) // 10)])
        res = train_reward_model([p for p in pairs if p.example.image_id not in ho],
                                 [p for p in pairs if p.example.image_id in ho],
                                 demo_config("cnn", epsilon=None, pretrain_epochs=0, epochs=30, seed=seed,
                                             progress=False), domain="server: its public labelled split")
        save_model_dir(work, res.model, res.vocab, res.card)
        print(f"  trained the server-only reward model (seed {seed}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return RewardModelScorer.from_dir(work)


def cell_test(split) -> list:
    """The held-out test items every cell of a split is evaluated on (GRPO cells and server-sft alike)."""
    from mor_server.alignment.pipeline import heldout_test

    return list(heldout_test(split))[:EVAL_ITEMS]


def rank_weight_of(method: str) -> float:
    """The router's ``rank_weight`` (AlignmentConfig.router_rank_weight) of a learned-router method: 0 for the
    likelihood-only ``-ce`` variants, 1 (the default) otherwise."""
    return 0.0 if method.endswith("-ce") else 1.0


ROUTED = ("mor", "mor-ce", "mor-iq", "mor-iq-ce", "mor+abstain")


def stale(cell: dict) -> str | None:
    """Why a recorded cell cannot be compared with the others (None: it can): evaluated on another number of test
    items than :data:`EVAL_ITEMS` (the server-sft cells recorded before the fix were scored on the whole held-out
    test, 7,500+ items, while the GRPO cells used the first 600); or a learned-router cell whose router was fitted
    with another ``rank_weight`` than its method's (a cell recorded before the ranking-error term carries none: 0)."""
    n = (cell.get("after") or {}).get("n")
    if n is not None and n != EVAL_ITEMS:
        return f"evaluated on {n} test items, not the first {EVAL_ITEMS}"
    if cell.get("method") in ROUTED:
        got = (cell.get("router") or {}).get("rank_weight") or 0.0
        if got != rank_weight_of(cell["method"]):
            return (f"fitted with router rank_weight {got:g}, not {rank_weight_of(cell['method']):g} (a cell measured "
                    f"before the ranking-error term belongs to {cell['method']}-ce)")
    return None


def cell_name(policy: str, scenario: str, method: str, seed: int) -> str:
    """The file name of a cell (and of its run folder): the warm start, scenario, reward and seed."""
    return f"{policy.replace('+', '_').replace('/', '_').replace('@', '_').replace('#', '_')}-{scenario}-{method.replace(':', '_')}-seed{seed}"


def recipe(label: str, seed: int):
    """``(TinyLlavaConfig, PretrainConfig | None)`` of a warm-start label: a recipe of mor/alignment/recipes.py, or
    ``<recipe>/varied`` for its stage 1 with ``caption_prompts="varied"`` (``--caption-prompts varied``)."""
    from dataclasses import replace

    from mor_server.alignment.recipes import warm_start_recipe

    name, _, prompts = split_label(label)[0].partition("/")
    tiny, pre = warm_start_recipe(name, seed=seed)
    if prompts:
        if pre is None:
            raise SystemExit(f"--caption-prompts {prompts}: the {name} warm start has no stage 1 to caption in")
        pre = replace(pre, caption_prompts=prompts)
    return tiny, pre


def reference_model(policy: str, seed: int, split, cache: Path, tag: str = ""):
    """``(model, processor, folder)`` of the cell's reference, built once per (policy, seed, split: ``tag``) and
    copied into each cell (warm_start_cached's key); bench_baselines.py starts its parameter-sharing cells from it."""
    from dataclasses import replace

    from mor_server.alignment.warmstart import warm_start_cached

    tiny, pre = recipe(policy, seed)
    d = reference_dir(policy, seed, cache, tag)  # the prompt pool does not change the reference
    t0 = time.perf_counter()
    model, proc, info = warm_start_cached(d, split.server_public, tiny=tiny,
                                          sft=replace(reference_sft(policy), seed=seed), pretrain=pre, progress=False,
                                          stage1_from=[c for c in stage1_candidates(seed, cache, tag) if c != d])
    if not info.get("cached"):
        print(f"  built the {split_label(policy)[0]} reference of seed {seed} in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return model, proc, d


def reference(policy: str, seed: int, split, cache: Path, tag: str = "") -> Path:
    """The folder of the cell's reference (:func:`reference_model`)."""
    return reference_model(policy, seed, split, cache, tag)[2]


def scorers_for(scenario: str, method: str, seed: int, split, cache: Path) -> dict:
    from mor_server.alignment.inprocess import LabelExpertScorer

    known = list(split.server_public) + list(split.server_unlabeled)
    types = list(TYPES) + (list(SHAPES_TYPES) if scenario == "shapes" else [])
    tag = "-shapes" if scenario == "shapes" else ""
    if method == "oracle":
        return {"oracle": LabelExpertScorer(known, types)}
    if method == "server":
        return {"server": server_model(seed, split, cache / "reward_models" / f"seed{seed}{tag}" / "server")}
    scorers = client_scorers(seed, scenario, cache / "reward_models", known)
    if method.startswith("client:"):
        name = method.split(":", 1)[1]
        if name not in scorers:
            raise SystemExit(f"--methods: unknown client {name!r}; the clients are {', '.join(scorers)}")
        return {name: scorers[name]}
    return scorers


def run_cell(policy: str, scenario: str, method: str, seed: int, cache: Path, steps: int, *, curve_every: int = 100,
             curve_size: int | None = None) -> dict:
    """One cell; its accuracy curve every ``curve_every`` GRPO steps on the first ``curve_size`` test items (None: the
    pipeline's default, 120)."""
    from easy_vqa import get_answers

    from mor_client.data.shapes import SHAPES_ANSWERS
    from mor_server.alignment.pipeline import AlignmentConfig, run_alignment
    from mor_server.apps.demo import DEMO_GRPO_DEFAULTS
    from mor_server.alignment.grpo import GRPORunConfig
    from mor_server.alignment.guard import CollapseGuardConfig
    from mor_server.alignment.inprocess import InProcessBackend
    from mor_server.alignment.recipes import recipe_grpo

    split = scenario_split(scenario, seed, split_label(policy)[1])
    if method == "server-sft":
        return server_sft_cell(policy, scenario, seed, split, cache)
    ref = reference(policy, seed, split, cache, tag="-shapes" if scenario == "shapes" else "")
    scorers = scorers_for(scenario, method, seed, split, cache)
    work = cache / "runs" / cell_name(policy, scenario, method, seed)
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(ref, work / "reference")
    tiny, pre = recipe(policy, seed)
    cfg = AlignmentConfig(work_dir=str(work), tiny=tiny, sft=reference_sft(policy), pretrain=pre,
                          grpo=GRPORunConfig(**{**DEMO_GRPO_DEFAULTS, **recipe_grpo(_recipe_name(policy)),
                                                "max_steps": steps, "save_steps": 0, **grpo_overrides(policy)}),
                          seed=seed, w_format=4.0,
                          answer_vocabulary=list(get_answers()) + (list(SHAPES_ANSWERS) if scenario == "shapes" else []),
                          routing="uniform" if method.startswith("uniform") else "learned",
                          router_rank_weight=rank_weight_of(method),
                          # the router's abstention (a type no routed client ranks above chance gets no client's
                          # reward) only in the "+abstain" methods: mor and uniform stay what they were measured as
                          router_abstain_z=ABSTAIN_Z if method.endswith("+abstain") else None,
                          **({"router_features": ("image", "question")} if method.startswith("mor-iq") else {}),
                          eval_size=EVAL_ITEMS, curve_every=curve_every, resume=False, progress=False,
                          **({} if curve_size is None else {"curve_size": curve_size}),
                          # every cell runs its whole GRPO budget: the collapse guard (on in the demo) would end
                          # some runs early and the rewards would no longer be compared at the same budget
                          collapse_guard=CollapseGuardConfig(every=0))
    test = cell_test(split)
    t0 = time.perf_counter()
    rep = run_alignment(InProcessBackend(scorers), public=split.server_public, unlabeled=split.server_unlabeled,
                        test=test, config=cfg)
    seconds = time.perf_counter() - t0
    from diag_policy_vision import yesno_by_prior

    from mor_server.alignment.policy import load_policy
    from mor_server.alignment.warmstart import host_fingerprint

    ref_model, ref_proc = load_policy(ref)
    yesno_split = {"before": yesno_by_prior(ref_model, ref_proc, test),
                   "after": yesno_by_prior(rep["model"], rep["processor"], test)}
    cal = rep["router"]
    out = {"policy": policy, "scenario": scenario, "method": method, "seed": seed, "seconds": seconds,
           "grpo_seconds": rep["timings"]["grpo_s"], "before": rep["accuracy_before"], "after": rep["accuracy_after"],
           "kl_to_reference": rep["kl_to_reference"], "rounds": rep["rounds"],
           "router": {"alpha": cal.get("alpha"), "routing": cal.get("routing"),
                      "rank_weight": cal.get("rank_weight"),
                      "mean_weight": {c: v.get("mean_weight") for c, v in cal.get("clients", {}).items()},
                      "weights_by_domain": cal.get("weights_by_domain"),
                      "effective_by_domain": cal.get("effective_by_domain"),
                      "abstain_z": cal.get("abstain_z"), "trust": cal.get("trust"),
                      "heldout": {k: (v["accuracy"] if isinstance(v, dict) and "accuracy" in v else None)
                                  for k, v in cal.get("heldout", {}).items()}},
           "routing_by_domain_grpo": rep["routing_by_domain_grpo"], "accuracy_curve": rep["accuracy_curve"],
           # yes/no accuracy where the question's wording alone gives the answer and where only the image does
           "yesno_by_wording": yesno_split,
           # where it ran: another host's kernels can train another reference from the same settings
           "host": host_fingerprint(), "reference_host": json.loads((ref / "warm_start.json").read_text())
           .get("info", {}).get("host"), "reference_sha256": reference_digest(ref)}
    shutil.rmtree(work / "grpo", ignore_errors=True)  # checkpoints are not needed once evaluated
    return out


def server_sft_cell(policy: str, scenario: str, seed: int, split, cache: Path) -> dict:
    """The server-labels-only baseline as a cell: the policy's warm-start recipe with SFT-300 on the server's public
    split (``bench_alignment_seeds.baseline``'s settings; the learning rate of ``--reference-sft K:LR`` when the label
    names one), evaluated on the cell's held-out test."""
    from dataclasses import replace

    from mor_server.alignment.evaluate import accuracy
    from mor_server.alignment.warmstart import SFTConfig, warm_start_cached

    tag = "-shapes" if scenario == "shapes" else ""
    test = cell_test(split)
    base = split_label(policy)[0]
    tiny, pre = recipe(base, seed)
    t0 = time.perf_counter()
    # a recipe whose own reference runs no SFT step (compact+synthvqa) has stage 1's checkpoint there: the SFT-300
    # starts from it instead of pre-training again (about 25 min a seed on 2 cores)
    stage1 = stage1_candidates(seed, cache, tag)

    def load(label: str):  # the checkpoint reference() builds for a label (same folder and cache key)
        return warm_start_cached(reference_dir(label, seed, cache, tag), split.server_public, tiny=tiny, pretrain=pre,
                                 sft=replace(reference_sft(label), seed=seed), progress=False, stage1_from=stage1)

    _, _, spec = policy.split("~")[0].partition("#ref")
    # the server's labels at their best: proportional batches unless the label names its batching (measured for
    # compact+synthetic+sft: type-balanced SFT-300 62.8%, proportional 73.6%, docs/alignment.md)
    batches = spec.partition(",")[2] or "proportional"
    # and at the label's learning rate when it names one (``--reference-sft K:LR``): the recipe's 3e-3 can cost the
    # vision stage 1 taught (compact+synthvqa, docs/alignment.md)
    lr = reference_sft(policy).learning_rate
    lr_spec = "" if lr == SFTConfig.learning_rate else f":{lr:g}"
    model, processor, info = load(f"{base}#ref{SERVER_SFT_STEPS}{lr_spec},{batches}")
    after = accuracy(model, processor, test)
    before = None
    # "before" is the label's own reference, the one its GRPO cells start from (so that the cells pair)
    if (reference_dir(policy, seed, cache, tag) / "warm_start.json").is_file():  # only when built: not needed here
        ref, ref_proc, _ = load(policy)
        before = accuracy(ref, ref_proc, test)
    return {"policy": policy, "scenario": scenario, "method": "server-sft", "seed": seed,
            "seconds": time.perf_counter() - t0, "grpo_seconds": 0.0, "sft_steps": info.get("steps"),
            "before": before, "after": after}


def from_other_build(record: dict, checkpoint: Path) -> bool:
    """Whether a cached record (a cell, a reference's accuracy) names another reference digest than the checkpoint
    now in ``checkpoint`` (a rebuilt recipe, another host's kernels): then it is measured again. A record without a
    digest, and a checkpoint not built yet, are trusted."""
    want = record.get("reference_sha256")
    have = reference_digest(checkpoint) if want else None
    return have is not None and have != want


def other_reference(cell: dict, cache: Path) -> bool:
    """Whether a cached GRPO cell started from another checkpoint than the reference now in ``cache`` for its label
    and seed (cells recorded before 2026-12-03's fourth session carry no digest and are trusted)."""
    if not cell.get("reference_sha256"):
        return False
    tag = "-shapes" if cell.get("scenario") == "shapes" else ""
    return from_other_build(cell, reference_dir(cell["policy"], cell["seed"], cache, tag))


def restore_cells(out: Path, cells_dir: Path) -> int:
    """Write the cells recorded in a results file (``--out``) that the cache lacks back into it, so a fresh clone
    can re-report, and extend, the committed grid without re-running it. Returns how many were restored; a
    :func:`stale` cell is not restored (it is measured again when its cell is run)."""
    try:
        recorded = json.loads(out.read_text()).get("cells", [])
    except (OSError, ValueError):
        return 0
    n = 0
    for c in recorded:
        try:
            f = cells_dir / f"{cell_name(c['policy'], c['scenario'], c['method'], c['seed'])}.json"
        except (KeyError, TypeError):
            continue
        if not f.is_file() and not stale(c):
            f.write_text(json.dumps(c, indent=1, default=str))
            n += 1
    return n


def reference_digest(folder: Path) -> str | None:
    """SHA-256 of a reference checkpoint's weights (None while it is not built): a GRPO cell records the one it
    started from, and is measured again when the reference in the cache is another (a rebuilt recipe, another
    host's build)."""
    import hashlib

    f = folder / "model.safetensors"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def same_reference(a: dict, b: dict) -> bool:
    """Whether two cells of a seed started GRPO from the same reference checkpoint, as far as the records show: the
    same accuracy before GRPO, overall and per type. A reference rebuilt on another host can differ (other CPU
    kernels train other weights), and a paired difference across two builds would credit the reward with it. A
    ``server-sft`` cell without a reference record (its label's reference was not built) pairs with any cell; a GRPO
    cell without one pairs with none."""
    ra, rb = a.get("before"), b.get("before")
    if not ra and not rb:
        return True
    if not ra or not rb:
        return (a if not ra else b).get("method") == "server-sft"
    return ra.get("overall") == rb.get("overall") and ra.get("by_domain") == rb.get("by_domain")


def fmt(v: list[float]) -> str:
    return f"{statistics.mean(v):5.1f} ({max(v) - min(v):4.1f})" if v else "    -     "


def report(cells: list[dict], out: Path) -> dict:
    from mor_server.alignment.evaluate import is_collapsed

    groups: dict[tuple, list[dict]] = {}
    for c in list(cells):
        why = stale(c)
        if why:  # not in the table, the pairs or the written record: its cell has to be run again
            print(f"not compared: {cell_name(c['policy'], c['scenario'], c['method'], c['seed'])} was {why}; "
                  "run its cell again")
            cells.remove(c)
            continue
        groups.setdefault((c["policy"], c["scenario"], c["method"]), []).append(c)
    print("\nheld-out test accuracy %, mean (spread max-min) over seeds; per type: mean accuracy / distinct answers "
          "per seed (more than the type's answers: wrong-type answers), cN: N runs collapsed to one answer")
    head = f"{'warm start':<22}{'scenario':<10}{'reward':<22}{'seeds':<8}{'reference':>13}{'aligned':>13}" + \
        "".join(f"{t:>20}" for t in TYPES + SHAPES_TYPES)
    print(head)
    summary = {}
    for (pol, sc, m), cs in sorted(groups.items()):
        cs = sorted(cs, key=lambda c: c["seed"])
        before = [100 * c["before"]["overall"] for c in cs if c.get("before")]
        after = [100 * c["after"]["overall"] for c in cs]
        per = {}
        line = f"{pol:<22}{sc:<10}{m:<22}{','.join(str(c['seed']) for c in cs):<8}{fmt(before):>13}{fmt(after):>13}"
        for t in TYPES + SHAPES_TYPES:
            if not all(t in c["after"]["by_domain"] for c in cs):  # a type this scenario's test does not have
                line += f"{'-':>20}"
                continue
            acc = [100 * c["after"]["by_domain"].get(t, 0.0) for c in cs]
            div = [c["after"].get("diversity", {}).get(t, {}) for c in cs]
            distinct = [d.get("distinct_answers") for d in div]
            # the evaluation's current rule on the stored records (cells measured before it flagged yes/no too)
            collapsed = sum(is_collapsed(d.get("top_answer_share", 0.0), d.get("majority_rate", 1.0),
                                         d.get("gold_distinct", 0)) for d in div)
            majority = [100 * d.get("majority_rate", 0.0) for d in div]
            per[t] = {"accuracy": acc, "distinct_answers": distinct, "collapsed_runs": collapsed,
                      "majority_rate": majority}
            cell = f"{statistics.mean(acc):.1f} / {'/'.join(str(x) for x in distinct)}" + (f" c{collapsed}" if collapsed else "")
            line += f"{cell:>20}"
        print(line)
        summary[f"{pol}/{sc}/{m}"] = {"seeds": [c["seed"] for c in cs], "reference": before, "aligned": after,
                                       "aligned_mean": statistics.mean(after), "by_type": per,
                                       "grpo_seconds": [c["grpo_seconds"] for c in cs]}
    # paired differences that the issues ask about
    pairs = [("mor", "uniform"), ("mor", "oracle"), ("mor", "mor-ce"), ("mor-ce", "uniform"), ("mor", "mor-iq"),
             ("mor-ce", "mor-iq-ce"), ("mor", "server-sft"), ("mor+abstain", "uniform"), ("mor+abstain", "mor"),
             ("uniform+abstain", "uniform"), ("mor+abstain", "uniform+abstain")]
    for pol in sorted({c["policy"] for c in cells}):
        for sc in SCENARIOS:
            for a, b in pairs:
                ga, gb = groups.get((pol, sc, a), []), groups.get((pol, sc, b), [])
                common = []
                for s in sorted({c["seed"] for c in ga} & {c["seed"] for c in gb}):
                    ca, cb = (next(c for c in g if c["seed"] == s) for g in (ga, gb))
                    if same_reference(ca, cb):
                        common.append(s)
                    else:  # another build of the reference (another host): the difference is not the reward's
                        print(f"not paired: {pol} {sc} seed {s}: {a} and {b} started from different references "
                              f"({100 * ca['before']['overall']:.1f}% and {100 * cb['before']['overall']:.1f}%); "
                              "run both cells from one build")
                if not common:
                    continue
                d = [100 * (next(c for c in ga if c["seed"] == s)["after"]["overall"]
                            - next(c for c in gb if c["seed"] == s)["after"]["overall"]) for s in common]
                summary[f"{pol}/{sc}/{a}-minus-{b}"] = {"seeds": common, "points": d, "mean": statistics.mean(d)}
                print(f"{pol} {sc}: {a} - {b} = {statistics.mean(d):+.1f} points (per seed "
                      f"{', '.join(f'{x:+.1f}' for x in d)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "cells": cells}, indent=1, default=str))
    print(f"written: {out}")
    try:
        plot(summary, out.with_suffix(".png"))
    except Exception as e:  # the PNG is a convenience; the JSON is the record
        print(f"(no PNG: {e})")
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, v) for k, v in summary.items() if "aligned" in v]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar(xs, [statistics.mean(v["aligned"]) for _, v in rows],
           yerr=[[statistics.mean(v["aligned"]) - min(v["aligned"]) for _, v in rows],
                 [max(v["aligned"]) - statistics.mean(v["aligned"]) for _, v in rows]], capsize=3, label="aligned")
    ax.scatter(xs, [statistics.mean(v["reference"]) if v["reference"] else float("nan") for _, v in rows], color="k", marker="_", s=200,
               label="reference", zorder=3)
    ax.set_xticks(list(xs), [k.replace("/", "\n") for k, _ in rows], fontsize=7)
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warm-start", dest="policy", choices=WARM_STARTS, nargs="+", default=["sft", "synthetic+sft"],
                    help="warm-start recipes of the policy (mor demo --warm-start)")
    ap.add_argument("--caption-prompts", choices=("fixed", "varied"), default="fixed",
                    help="stage 1's caption prompts (PretrainConfig.caption_prompts) for warm starts that have one; "
                         "varied cells are labelled <warm start>/varied")
    ap.add_argument("--synthetic-prompts", type=int, default=0, metavar="N",
                    help="add N public synthetic images (3 questions each) to the server's GRPO prompt pool "
                         "(make_federation_split(synthetic_prompt_images=N)); cells are labelled <warm start>@spN")
    ap.add_argument("--reference-sft", default=None, metavar="K[:LR]",
                    help="SFT steps (and learning rate, default 3e-3) of the reference GRPO starts from (default the "
                         "recipe's own, as the demo builds it: 50, 0 for compact+synthvqa); K=300 aligns from the "
                         "server-sft baseline's own checkpoint; cells are labelled <warm start>#ref<K>[:<LR>]")
    batches = ap.add_mutually_exclusive_group()
    batches.add_argument("--balanced-sft", dest="sft_batches", action="store_const", const="balanced", default="",
                         help="the reference's SFT draws each batch with an equal share of every question type "
                              "(SFTConfig.balance_types; the compact recipe's own); where the recipe's SFT is "
                              "proportional, cells are labelled <warm start>#ref<K>[:<LR>],balanced")
    batches.add_argument("--proportional-sft", dest="sft_batches", action="store_const", const="proportional",
                         help="the reference's SFT draws batches in proportion to the question types (72%% yes/no); "
                              "where the recipe's SFT is balanced, cells are labelled "
                              "<warm start>#ref<K>[:<LR>],proportional")
    ap.add_argument("--grpo", nargs="+", default=[], metavar="KEY=VALUE",
                    help="GRPO settings other than the demo's (" + ", ".join(GRPO_OVERRIDABLE) + "); cells are "
                         "labelled <warm start>~key=value,...")
    ap.add_argument("--scenario", choices=SCENARIOS, nargs="+", default=["honest"])
    ap.add_argument("--methods", nargs="+", default=["oracle", "mor", "uniform"],
                    help="mor, mor-ce (router fitted on the likelihood alone), mor-iq (router on image + question words), "
                         "mor-iq-ce, uniform, oracle, server, server-sft "
                         "(SFT-300 on the server's labels, no GRPO; at the LR of --reference-sft K:LR), client:<name> (hospital-color, bank-shape, lab-yesno; "
                         "studio-shapes in the shapes scenario), mor+abstain / uniform+abstain (mor / uniform with the "
                         "pipeline's default router_abstain_z 2.0: a question type no routed client ranks above chance "
                         "gets no client's reward; mor and uniform run without it)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None,
                    help="GRPO steps (default: the warm start's own, as in the demo: 150 for seeing, 400 for the "
                         "others); cells of another budget are labelled <warm start>~max_steps=N")
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "reward_ablation")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reward_ablation.json")
    ap.add_argument("--report-only", action="store_true", help="only print the table of the cached cells")
    ap.add_argument("--prepare-only", action="store_true",
                    help="only train the reward models and build the references of the selected seeds / policies")
    a = ap.parse_args()
    for m in a.methods:
        if m not in METHODS and not m.startswith("client:"):
            raise SystemExit(f"--methods: unknown reward {m!r}; use {', '.join(METHODS)} or client:<name>")
    overrides = parse_grpo_overrides(a.grpo)
    if a.steps is not None and a.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {a.steps}")
    cells_dir = a.cache / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    restored = restore_cells(a.out, cells_dir)
    if restored:
        print(f"restored {restored} cells recorded in {a.out} into {cells_dir}")
    if not a.report_only:
        if a.caption_prompts != "fixed":
            a.policy = [f"{p}/{a.caption_prompts}" for p in a.policy]
        if a.synthetic_prompts < 0:
            raise SystemExit(f"--synthetic-prompts must be >= 0, got {a.synthetic_prompts}")
        if a.synthetic_prompts:
            a.policy = [f"{p}@sp{a.synthetic_prompts}" for p in a.policy]
        a.policy = [p + parse_reference_sft(a.reference_sft, _recipe_name(p), a.sft_batches) for p in a.policy]
        labelled = []
        for p in a.policy:  # another budget than the recipe's own is another cell, never the recipe's one
            own = {**overrides, **({"max_steps": a.steps} if a.steps not in (None, recipe_steps(p)) else {})}
            labelled.append(f"{p}~" + ",".join(f"{k}={v}" for k, v in own.items()) if own else p)
        a.policy = labelled
        todo = [(p, s, m, seed) for seed in a.seeds for p in a.policy for s in a.scenario for m in a.methods
                if not (m in ("oracle", "server", "server-sft") and s in NO_SERVER_SIDE)]  # no client in them
        if a.prepare_only:
            for seed in a.seeds:
                for s in a.scenario:
                    split = scenario_split(s, seed, a.synthetic_prompts)
                    for m in a.methods:
                        if m not in ("oracle", "server-sft"):
                            scorers_for(s, m, seed, split, a.cache)
                    for p in a.policy:
                        reference(p, seed, split, a.cache, tag="-shapes" if s == "shapes" else "")
            return 0
        def measured(cell: tuple) -> bool:  # cached and comparable (a stale cell is run again)
            f = cells_dir / f"{cell_name(*cell)}.json"
            return f.is_file() and not stale(json.loads(f.read_text())) and \
                not other_reference(json.loads(f.read_text()), a.cache)

        done_s: list[float] = []
        for i, (p, s, m, seed) in enumerate(todo):
            f = cells_dir / f"{cell_name(p, s, m, seed)}.json"
            if measured((p, s, m, seed)):
                continue
            left = sum(1 for c in todo[i:] if not measured(c))
            eta = f", about {statistics.mean(done_s) * left / 60:.0f} min left" if done_s else ""
            print(f"[{i + 1}/{len(todo)}] {p} {s} {m} seed {seed}{eta}", flush=True)
            t0 = time.perf_counter()
            cell = run_cell(p, s, m, seed, a.cache, recipe_steps(p))
            done_s.append(time.perf_counter() - t0)
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps(cell, indent=1, default=str))
            tmp.replace(f)
            ref = f"{100 * cell['before']['overall']:.1f}%" if cell.get("before") else "(not built)"
            print(f"    reference {ref} -> {100 * cell['after']['overall']:.1f}%  "
                  + "  ".join(f"{t} {100 * v:.0f}" for t, v in cell["after"]["by_domain"].items())
                  + f"  ({cell['seconds']:.0f} s)", flush=True)
            for when, by in cell.get("yesno_by_wording", {}).items():
                print(f"    yes/no {when}: " + ", ".join(f"{g} {100 * v['accuracy']:.1f}% of {v['n']}"
                                                         for g, v in by.items()), flush=True)
    cells = [json.loads(f.read_text()) for f in sorted(cells_dir.glob("*.json"))]
    if not cells:
        print("no cached cells yet")
        return 1
    report(cells, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
