"""Policy VLMs for alignment: the built-in tiny Llava and its size presets, devices, loading a local HF VLM (+ LoRA),
saving, and decoding. The warm start is in :mod:`.warmstart`, the other families' builders in :mod:`.families`.

The built-in default is a ``LlavaForConditionalGeneration`` built from a config (tiny SigLIP vision tower +
tiny Llama), a word-level tokenizer over the task vocabulary (``tokenizers`` wrapped in
``PreTrainedTokenizerFast``, ``<image>`` is one token) and a ``LlavaProcessor`` with a chat template, so TRL's
GRPOTrainer can run on it with conversational multimodal prompts. Nothing is ever fetched from a hub.

Examples are duck-typed: anything with ``.image`` (PNG bytes or a PIL image), ``.question`` and ``.answer``
(``mor_client.data.easyvqa.VQAExample`` fits).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

IMAGE_TOKEN = "<image>"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
USER, ASSISTANT = "USER:", "ASSISTANT:"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE_TOKEN, USER, ASSISTANT]

#: Chat template of the built-in policy: ``<s>USER: <image> question ASSISTANT: answer </s>``.
CHAT_TEMPLATE = (
    "{{ '<s>' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image> ' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' </s> ' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_WORD_RE = re.compile(r"[a-z0-9]+|[?.,!]")


def normalize_answer(text: str) -> str:
    """Lower-case, keep the first word of a completion (``"yes </s>" -> "yes"``); used by exact match."""
    words = _WORD_RE.findall(str(text).lower())
    words = [w for w in words if w not in {"?", ".", ",", "!", "s"}]
    return words[0] if words else ""


def exact_match(completion: str, answer: str) -> bool:
    """Strict exact match: the completion, lower-cased and without punctuation, is exactly the answer word(s).
    A rambling completion ("yes no blue") does not match, even if its first word is right."""
    words = [w for w in _WORD_RE.findall(str(completion).lower()) if w not in {"?", ".", ",", "!"}]
    return bool(words) and words == [w for w in _WORD_RE.findall(str(answer).lower()) if w not in {"?", ".", ",", "!"}]


def task_words(texts: Iterable[str]) -> list[str]:
    """Sorted word vocabulary of some texts (lower-cased words and punctuation)."""
    out: set[str] = set()
    for t in texts:
        out.update(_WORD_RE.findall(str(t).lower()))
    return sorted(out)


def easyvqa_vocabulary() -> list[str]:
    """Every word of easy-vqa's questions and answers (read from the installed ``easy_vqa`` package)."""
    import easy_vqa

    q_train, a_train, _ = easy_vqa.get_train_questions()
    q_test, a_test, _ = easy_vqa.get_test_questions()
    return task_words(list(q_train) + list(q_test) + list(easy_vqa.get_answers()))


@dataclass
class TinyLlavaConfig:
    """Size of the built-in tiny Llava policy (about 0.3M parameters with the defaults)."""

    image_size: int = 64
    """Images are resized to image_size x image_size."""
    patch_size: int = 16
    """Vision patch size; the image becomes (image_size / patch_size)^2 image tokens."""
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 4
    intermediate: int = 128
    max_positions: int = 128
    seed: int = 0
    """Seed of the random initialisation."""


#: Built-in policy sizes (issue #13). ``tiny`` is the default TinyLlavaConfig (0.24M parameters); ``compact`` (0.96M: 64 image
#: tokens, twice the width, a third text layer) is the smallest with which an oracle reward taught every question type
#: on the seeds where ``tiny`` learns nothing (issue #17, docs/alignment.md); ``small`` and ``base`` are the 40M and
#: ~400M members of the same family that were run on one H200 in issue #13 (vision hidden x layers, text hidden x
#: layers as named there; heads and MLP widths chosen here). Parameter counts: :func:`preset_parameter_count`.
POLICY_PRESETS: dict[str, TinyLlavaConfig] = {
    "tiny": TinyLlavaConfig(),
    "compact": TinyLlavaConfig(patch_size=8, vision_hidden=128, text_hidden=128, text_layers=3, intermediate=256),
    "small": TinyLlavaConfig(image_size=64, patch_size=8, vision_hidden=384, vision_layers=6, text_hidden=512,
                             text_layers=8, heads=8, intermediate=1536, max_positions=128),
    "base": TinyLlavaConfig(image_size=64, patch_size=8, vision_hidden=768, vision_layers=12, text_hidden=1024,
                            text_layers=16, heads=16, intermediate=4096, max_positions=128),
}


def policy_preset(name: str, *, seed: int = 0) -> TinyLlavaConfig:
    """The TinyLlavaConfig of a built-in preset ('tiny', 'small', 'base'), with ``seed``."""
    from dataclasses import replace

    if name not in POLICY_PRESETS:
        raise ValueError(f"unknown policy preset {name!r}; choose one of {', '.join(POLICY_PRESETS)}")
    return replace(POLICY_PRESETS[name], seed=seed)


def preset_parameter_count(name_or_config: str | TinyLlavaConfig, words: Sequence[str] | None = None) -> int:
    """Parameters of a built-in policy size, counted on the meta device (no memory, no initialisation)."""
    cfg = policy_preset(name_or_config) if isinstance(name_or_config, str) else name_or_config
    model, _ = build_tiny_llava(words, cfg, device="meta")
    return sum(p.numel() for p in model.parameters())


def policy_vocabulary(examples: Sequence = ()) -> list[str]:
    """The built-in policy's word vocabulary for a task: easy-vqa's words, then, appended (so easy-vqa data keeps the
    same vocabulary and token ids), the procedural shapes family's words when ``examples`` hold any of its items
    (all of them: a public split may lack some answer, e.g. "four") and any other word of ``examples``' questions
    and answers."""
    from mor_client.data.shapes import shapes_vocabulary

    base = easyvqa_vocabulary()
    texts = [t for e in examples for t in (getattr(e, "question", ""), getattr(e, "answer", ""))]
    extra = task_words(texts)
    if any(getattr(e, "domain", None) == "shapes" for e in examples):
        extra = sorted(set(extra) | set(shapes_vocabulary()))
    have = set(base)
    return base + [w for w in extra if w not in have]


def build_tokenizer(words: Sequence[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` plus the special tokens (``<image>`` is one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(pattern="?", behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[IMAGE_TOKEN, USER, ASSISTANT], padding_side="left",
    )
    fast.model_input_names = ["input_ids", "attention_mask"]
    return fast


def build_tiny_llava(words: Sequence[str] | None = None, config: TinyLlavaConfig | None = None, *,
                     device: str | torch.device | None = None):
    """Build the built-in policy from scratch: returns ``(model, processor)``.

    words: the task vocabulary (default: every word of easy-vqa's questions and answers).
    device: where the weights are created (default: the CPU; "meta": shapes only, e.g. to count parameters).
    """
    import contextlib

    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              SiglipImageProcessorPil, SiglipVisionConfig)

    cfg = config or TinyLlavaConfig()
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"TinyLlavaConfig.image_size ({cfg.image_size}) must be a multiple of patch_size "
                         f"({cfg.patch_size})")
    tokenizer = build_tokenizer(list(words) if words is not None else easyvqa_vocabulary())
    image_processor = SiglipImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                               vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=0)
    n_img = (cfg.image_size // cfg.patch_size) ** 2
    vision = SiglipVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.intermediate,
                                num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.heads,
                                image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.heads, max_position_embeddings=cfg.max_positions,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    llava_cfg = LlavaConfig(vision_config=vision, text_config=text,
                            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=n_img,
                            vision_feature_select_strategy="full", vision_feature_layer=-1)
    llava_cfg.pad_token_id = tokenizer.pad_token_id
    llava_cfg.eos_token_id = tokenizer.eos_token_id
    llava_cfg.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(cfg.seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = LlavaForConditionalGeneration(llava_cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def _image_only(processor_class):
    """``processor_class`` without its video processor (None): transformers' video processors need torchvision,
    and image-text alignment never feeds a video. Keeps the class name, so a saved folder still names the real
    class and loads as such wherever torchvision is installed."""

    class ImageOnly(processor_class):
        video_processor = None

        @classmethod
        def get_attributes(cls):
            return [a for a in processor_class.get_attributes() if a != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


def _load_processor(path: Path):
    """``AutoProcessor`` from a local folder; when that fails only because the processor's video half needs
    torchvision (Qwen2-VL-style processors on a CPU-only install), the same processor without it."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except (ImportError, OSError) as e:  # no torchvision, or a folder saved image-only (no video config)
        if _has_torchvision() or not any(w in str(e).lower() for w in ("torchvision", "video")):
            raise
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer

        meta = json.loads((path / "processor_config.json").read_text())
        cls = getattr(transformers, str(meta.get("processor_class", "")), None)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        template = path / "chat_template.jinja"
        extra = {k: v for k, v in meta.items() if k not in ("processor_class", "image_processor", "video_processor")
                 and not isinstance(v, dict)}
        return _image_only(cls)(image_processor=AutoImageProcessor.from_pretrained(path, local_files_only=True),
                                tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True),
                                video_processor=None,
                                chat_template=template.read_text() if template.is_file() else None, **extra)


def pick_device(device: str | torch.device | None = None) -> tuple[torch.device, torch.dtype]:
    """Where the policy runs and its compute dtype: CUDA with bf16 when present, CPU with fp32 otherwise.

    device: force a device ("cpu", "cuda", "cuda:1"); its dtype follows the same rule (bf16 on CUDA)."""
    if device is not None:
        dev = torch.device(device)
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def model_device(model) -> torch.device:
    """The device of a model's (first) parameters."""
    return next(model.parameters()).device


def autocast_for(device: torch.device | str):
    """bf16 autocast on CUDA (fp32 master weights, bf16 matmuls), nothing on the CPU (results stay exactly those
    of fp32): the one mixed-precision rule of the warm start and the evaluation."""
    import contextlib

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ImageCache:
    """Decoded images keyed by the identity of their source (PNG bytes or PIL image): every image is decoded once
    per cache, however many batches, answers or epochs it appears in. Keys hold a reference to the source, so an
    id is never reused while cached."""

    def __init__(self):
        self._pil: dict[int, tuple[Any, Any]] = {}

    def pil(self, image):
        hit = self._pil.get(id(image))
        if hit is None or hit[0] is not image:
            hit = (image, to_pil(image))
            self._pil[id(image)] = hit
        return hit[1]

    def pils(self, examples) -> list:
        return [self.pil(e.image) for e in examples]


def load_policy(path: str | Path, *, adapter: str | Path | None = None, device: str | torch.device | None = None):
    """Load a local Hugging Face VLM directory (``AutoModelForImageTextToText`` + ``AutoProcessor``).

    adapter: optional local peft LoRA adapter directory applied on top (kept trainable).
    Nothing is fetched from a hub (``local_files_only=True``). Returns ``(model, processor)``.
    """
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"policy path {str(path)!r} is not a Hugging Face model directory (no config.json); "
                                f"pass a local directory saved with save_pretrained, or use the built-in tiny policy")
    dev, dtype = pick_device(device)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
    processor = _load_processor(path)
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {str(adapter)!r} has no adapter_config.json; pass a peft adapter "
                                    f"directory saved with save_pretrained")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    return model.to(dev), processor


def save_policy(model, processor, path: str | Path) -> Path:
    """Save model + processor to a directory (TRL loads the GRPO reference from there)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def to_pil(image: Any):
    """PNG/JPEG bytes or a PIL image -> RGB PIL image."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if hasattr(image, "convert"):
        return image.convert("RGB")
    raise TypeError(f"image must be PNG/JPEG bytes or a PIL image, got {type(image).__name__}")


def user_message(question: str) -> list[dict]:
    """The conversational prompt of one VQA item (the image is supplied separately, TRL style)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def generation_constraints(model) -> dict:
    """Decoding constraints shared with GRPO's sampling: TRL suppresses the image token when it generates for a
    VLM (a sampled image token would have no image features), so GRPO never sees, and never pushes down, that
    token's probability. Evaluating the policy without the same constraint measures a different policy (one that
    can answer with an image placeholder); this keeps evaluation and training on the same decoding rule."""
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(model.config, "image_token_index", None)
    return {"suppress_tokens": [int(image_token)]} if image_token is not None else {}


@torch.no_grad()
def generate_answers(model, processor, items: Sequence, *, batch_size: int = 64, max_new_tokens: int = 3,
                     do_sample: bool = False, images: ImageCache | None = None) -> list[str]:
    """Greedy (or sampled) answers for items with ``.image`` and ``.question``; returns decoded strings.

    Runs on the model's device (bf16 autocast on CUDA); each chunk's images are encoded in one processor call.
    images: an :class:`ImageCache` shared with other passes over the same items (each image decoded once)."""
    device = model_device(model)
    cache = images if images is not None else ImageCache()
    tok = processor.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    model.eval()
    try:
        for b in range(0, len(items), batch_size):
            chunk = items[b: b + batch_size]
            prompts = [processor.apply_chat_template(user_message(e.question), add_generation_prompt=True)
                       for e in chunk]
            enc = processor(images=cache.pils(chunk), text=prompts, return_tensors="pt", padding=True).to(device)
            with autocast_for(device):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                     **generation_constraints(model))
            new = gen[:, enc["input_ids"].shape[1]:]
            out.extend(s.strip() for s in tok.batch_decode(new, skip_special_tokens=True))
    finally:
        tok.padding_side = old
    return out
