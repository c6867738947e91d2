"""Named warm-start recipes of the built-in policy: what ``mor demo --warm-start`` and
``benchmarks/bench_reward_ablation.py --warm-start`` select (one home for both).

* ``sft``: the built-in tiny Llava (16 image tokens), SFT on the server's public split. Cheap, but the policy
  stays image-blind: under GRPO every colour and shape question collapses to one answer, whatever the reward
  (issue #17, docs/alignment.md).
* ``synthetic+sft``: 64 image tokens and the public stage 1 before the same SFT: the vision tower pre-trained on
  synthetic images drawn by the project's renderer (600 steps), then captioning of those images (1000 steps); no
  private data and no privacy cost. With it a reward can teach colour and shape (docs/alignment.md,
  "Which reward earns the alignment").
* ``compact+synthetic+sft``: the same stage 1 on the ``compact`` policy preset (0.96M parameters, 64 image tokens),
  then a **type-balanced** SFT-50 (``SFTConfig.balance_types``: every batch an equal share of colour, shape and
  yes/no questions): with an oracle reward GRPO teaches colour, shape and yes/no on seeds where the tiny policy
  learns nothing (issue #17, docs/alignment.md), at 2-3x the tiny policy's GRPO time on a CPU. The proportional
  SFT-50 it used before (72% of the public split is yes/no) left colour and shape questions answered "yes" on both
  seeds it was rebuilt on (0 and 2; docs/alignment.md, "The reference is fragile"). The curriculum recipe below keeps
  proportional batches.
* ``compact+curriculum+sft``: the ``compact`` width with a third vision layer (the family measured under full
  supervision), the same stage 1, then the public yes/no curriculum (``YESNO_CURRICULUM``, 4,400 supervised steps on
  prior-balanced synthetic presence questions) before the same SFT: the reference compares the colour or shape a
  yes/no question names with the image instead of answering from the wording (docs/alignment.md, "Why yes/no stops
  at the wording prior"). Measured worse, not recommended: the SFT after it erases the comparison and colour and
  shape questions are answered "yes" or "no", so oracle GRPO reached 54.2% (3 seeds) against 74.1% from
  ``compact+synthetic+sft``'s former proportional references and 63.0% from its type-balanced ones (other builds:
  docs/alignment.md, "A warm start that ends with the curriculum"). Kept to reproduce that measurement. Stage 1 takes about 25 minutes of one CPU core.
* ``compact+synthvqa``: the same family (``compact`` with a third vision layer), vision pre-training (600 steps),
  then 2,000 supervised steps on public synthetic VQA (``vqa`` curriculum phase: colour, shape and yes/no questions
  drawn by the project's renderer in easy-vqa's templates, every yes/no question prior-balanced so that its wording
  says nothing), and **no SFT on the server's split** by default (``Recipe.sft_steps``); GRPO at temperature
  1.5 (``Recipe.grpo``). The reference answers colour and shape from the image (94-98% / 91-92% on the held-out
  easy-vqa test, seeds 0-2) and every yes/no question with one word (49-52%): what a reward then has to teach is
  yes/no. Oracle GRPO reached 86.0 / 61.2 / 82.2% on seeds 0 / 1 / 2, MoR 86.5 / 62.5 / 81.2%, the uniform mixture
  69.2% in the mean, and the server's labels alone (SFT-300 at lr 3e-4 from the same stage 1) 76.4% (docs/alignment.md,
  "A reference that sees"). No private data, no privacy cost; stage 1 takes about 20-25 minutes of one CPU core.
* ``compact+synthvqa+negation``: ``compact+synthvqa`` plus 300 more steps of the same synthetic VQA with a readout of
  negation (curriculum phase ``negation``: a throwaway linear head reads from the state that predicts the answer
  whether a yes/no question is negated, and a penalty keeps the answers from shifting with it). The reference is as
  blind to yes/no as ``compact+synthvqa``'s (60.8 / 62.3 / 61.5%, "no" to every yes/no question), but "not" now
  reaches the answer position, so GRPO learns easy-vqa's wording prior within 100 steps instead of 300-700 or never:
  oracle 86.8 / 85.8 / 84.8% (85.8), MoR 86.3 / 86.5 / 84.0% (85.6) on seeds 0 / 1 / 2 (docs/alignment.md, "Carrying
  negation to the answer"). Continues a cached ``compact+synthvqa`` stage 1 when there is one (about 4 min more).
* ``seeing`` (the default of ``mor demo`` and ``mor align``): ``compact+synthvqa+negation`` on the demo's budget,
  1,000 synthetic VQA steps instead of 2,000 and 150 GRPO steps instead of 400, so that a run from scratch fits the
  demo's 10 minutes on 2 CPU cores; every curriculum phase decays its learning rate along a cosine
  (``PretrainConfig.curriculum_schedule``) and GRPO leaves the vision tower and projector frozen
  (``GRPORunConfig.freeze``). In process, oracle GRPO reached 88.0 / 87.0 / 85.5% on seeds 0 / 1 / 2 (86.8), MoR
  86.4% (docs/alignment.md, "Keeping what the reference sees"; the real ``mor demo``: README, "Measured: the main
  job").
* ``seeing-v1``: the default until 2026-12-06 (constant-rate phases, every weight trained by GRPO), kept to reproduce
  its figures: the real ``mor demo`` took 500-525 s from scratch and reached 87.0 / 84.3 / 83.3% (84.9); in process
  the oracle reached 87.0 / 84.8 / 84.3% (docs/alignment.md, "The default on the demo's budget").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from mor_client.data.synthetic import YESNO_CURRICULUM


@dataclass(frozen=True)
class Recipe:
    """Everything a named warm start sets, in one record: the policy it builds, its public stage 1, the reference's
    SFT on the server's split and the GRPO settings it runs with unless the run sets them."""

    summary: str
    """One clause for ``--warm-start``'s help."""
    preset: str = "tiny"
    """``policy.policy_preset`` the policy starts from."""
    policy: Mapping = field(default_factory=dict)
    """``TinyLlavaConfig`` fields changed from the preset (e.g. ``patch_size=8``: 64 image tokens)."""
    pretrain: Mapping | None = None
    """``PretrainConfig`` fields of stage 1 (None: no stage 1); the run's seed is added."""
    sft_steps: int = 50
    """Reference SFT steps on the server's public split."""
    balanced_sft: bool = False
    """Type-balanced SFT batches (``SFTConfig.balance_types``) instead of proportional ones."""
    grpo: Mapping = field(default_factory=dict)
    """GRPO settings on top of the demo's defaults (a run's own settings override them)."""


_STAGE1 = {"vision_steps": 600, "caption_steps": 1000}
_SYNTHVQA = Recipe(
    "compact+synthvqa (the compact family supervised on public synthetic VQA, no SFT on the public split: sees "
    "colour and shape, yes/no left to the reward; about 25 min more on a CPU)",
    preset="compact", policy={"vision_layers": 3},
    pretrain={"vision_steps": 600, "yesno_curriculum": "vqa=2000", "max_seconds": 7200},
    sft_steps=0, grpo={"temperature": 1.5})

RECIPES: Mapping[str, Recipe] = MappingProxyType({
    "sft": Recipe("sft (the tiny policy, SFT-50 on the public split: fast, but blind to colour and shape)"),
    "synthetic+sft": Recipe("synthetic+sft (64 image tokens; vision pre-training and captioning of synthetic images "
                            "first)", policy={"patch_size": 8}, pretrain=_STAGE1),
    "compact+synthetic+sft": Recipe(
        "compact+synthetic+sft (the same on the 0.96M compact policy with a type-balanced SFT: the one that learns "
        "colour and shape, 20-30 min a run on 2 CPU cores)", preset="compact", pretrain=_STAGE1, balanced_sft=True),
    "compact+curriculum+sft": Recipe(
        "compact+curriculum+sft (plus a yes/no curriculum; measured worse, kept to reproduce docs/alignment.md)",
        preset="compact", policy={"vision_layers": 3},
        pretrain={**_STAGE1, "yesno_curriculum": YESNO_CURRICULUM, "max_seconds": 7200}),
    # compact+synthvqa's reference answers every yes/no question of a seed mostly with one word; at temperature 1.0
    # oracle GRPO on seed 2 did not move yes/no off it in 400 steps (65.0%), at 1.5 it reached 84.7%
    # (docs/alignment.md, "A reference that sees")
    "compact+synthvqa": _SYNTHVQA,
    # the same with the negation readout phase after it: its stage 1 continues a cached compact+synthvqa one
    "compact+synthvqa+negation": replace(
        _SYNTHVQA, summary="compact+synthvqa+negation (the same plus a readout of negation at the answer: GRPO teaches "
                           "yes/no within 100 steps: the oracle reward reached 85.8 on average over 3 seeds, MoR 85.6)",
        pretrain={**_SYNTHVQA.pretrain, "yesno_curriculum": "vqa=2000,negation=300"}),
    # the same family and phases on a budget that fits the demo's 10 minutes from scratch on 2 CPU cores: half the
    # synthetic VQA (colour and shape are seen after 500-1000 steps, benchmarks/diag_stage1_budget.py) and 150 GRPO
    # steps (the yes/no wording prior is learned within 100 with the negation readout); each curriculum phase decays
    # its learning rate along a cosine (the reference's shape: 94.6% on seeds 1 and 2, against 82.6 / 83.7% at a
    # constant rate) and GRPO leaves the vision tower and projector as the warm start trained them (with them
    # trained, oracle GRPO lost 10-18 points of shape within 25 steps; docs/alignment.md, "Keeping what the
    # reference sees")
    "seeing": replace(
        _SYNTHVQA, summary="seeing (the default: compact+synthvqa+negation on the demo's budget, synthetic VQA 1,000 "
                           "steps instead of 2,000 with cosine-decayed phases, 150 GRPO steps with the vision tower "
                           "frozen; a policy that sees colour and shape)",
        pretrain={**_SYNTHVQA.pretrain, "yesno_curriculum": "vqa=1000,negation=300", "curriculum_schedule": "cosine"},
        grpo={**_SYNTHVQA.grpo, "max_steps": 150, "freeze": "vision"}),
    # the default until 2026-12-06, kept to reproduce its figures: constant-rate phases, every weight trained by GRPO
    "seeing-v1": replace(
        _SYNTHVQA, summary="seeing-v1 (the former default: seeing with constant-rate phases and the vision tower "
                           "trained by GRPO; kept to reproduce its figures)",
        pretrain={**_SYNTHVQA.pretrain, "yesno_curriculum": "vqa=1000,negation=300"},
        grpo={**_SYNTHVQA.grpo, "max_steps": 150}),
})
"""The named warm starts (one record each; the module's docstring says what each is for)."""

WARM_STARTS = tuple(RECIPES)
DEFAULT_WARM_START = "seeing"
"""The warm start of ``mor demo`` and ``mor align`` when none is named."""
WARM_START_HELP = ("warm-start recipe of the built-in policy: "
                   + ", ".join(r.summary for r in RECIPES.values()))


def _recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"warm start must be one of {', '.join(WARM_STARTS)}, got {name!r}") from None


def warm_start_recipe(name: str, *, seed: int = 0):
    """``(TinyLlavaConfig, PretrainConfig or None)`` of a named recipe, seeded with the run's seed. (The policy module
    is imported here, not at the top: the command line reads WARM_STARTS without loading torch.)"""

    from .policy import policy_preset
    from .warmstart import PretrainConfig

    r = _recipe(name)
    tiny = replace(policy_preset(r.preset, seed=seed), **r.policy)
    return tiny, (PretrainConfig(**r.pretrain, seed=seed) if r.pretrain is not None else None)


def recipe_grpo(name: str) -> dict:
    """The GRPO settings of a named recipe (:attr:`Recipe.grpo`; empty: the demo's defaults)."""
    return dict(_recipe(name).grpo)


SFT_BATCHES = ("balanced", "proportional")
"""How the reference's SFT draws its batches: an equal share of each question type, or in proportion to the public
split (72% yes/no on easy-vqa)."""


def recipe_sft(name: str, steps: int | None = None, batches: str | None = None):
    """The ``SFTConfig`` of a named recipe's reference: its :attr:`Recipe.sft_steps` (or ``steps``), type-balanced
    when :attr:`Recipe.balanced_sft` unless ``batches`` (one of :data:`SFT_BATCHES`) says otherwise. The run's seed
    is applied by the pipeline (``AlignmentConfig.seed``)."""
    from .warmstart import SFTConfig

    r = _recipe(name)
    if batches is not None and batches not in SFT_BATCHES:
        raise ValueError(f"sft_batches must be one of {', '.join(SFT_BATCHES)}, got {batches!r}")
    balanced = r.balanced_sft if batches is None else batches == "balanced"
    return SFTConfig(steps=r.sft_steps if steps is None else steps, balance_types=balanced)
