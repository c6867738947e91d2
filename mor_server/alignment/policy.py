"""Policy VLMs for alignment: a built-in tiny Llava, SFT warm start, and loading a local HF VLM (+ LoRA).

One module although over 400 lines: the builder, the warm-start stages, tokenisation and decoding all share
one prompt format (the chat template, ``_sft_batch``, ``generation_constraints``), which a split would scatter.

The built-in default is a ``LlavaForConditionalGeneration`` built from a config (tiny SigLIP vision tower +
tiny Llama), a word-level tokenizer over the task vocabulary (``tokenizers`` wrapped in
``PreTrainedTokenizerFast``, ``<image>`` is one token) and a ``LlavaProcessor`` with a chat template, so TRL's
GRPOTrainer can run on it with conversational multimodal prompts. Nothing is ever fetched from a hub.

Examples are duck-typed: anything with ``.image`` (PNG bytes or a PIL image), ``.question`` and ``.answer``
(``mor_client.data.easyvqa.VQAExample`` fits).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
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


#: Built-in policy sizes (issue #13). ``tiny`` is the default TinyLlavaConfig; ``small`` and ``base`` are the 40M and
#: ~400M members of the same family that were run on one H200 in issue #13 (vision hidden x layers, text hidden x
#: layers as named there; heads and MLP widths chosen here). Parameter counts: :func:`preset_parameter_count`.
POLICY_PRESETS: dict[str, TinyLlavaConfig] = {
    "tiny": TinyLlavaConfig(),
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


#: Families :func:`build_tiny_vlm` builds (randomly initialised, from config, nothing downloaded).
TINY_VLM_FAMILIES = ("llava", "idefics3", "qwen2_vl")


def _chat_template(image_placeholder: str) -> str:
    """:data:`CHAT_TEMPLATE` with another image placeholder (what the family's processor expands)."""
    return CHAT_TEMPLATE.replace("{{ '<image> ' }}", "{{ '" + image_placeholder + " ' }}")


def build_tiny_vlm(family: str, words: Sequence[str] | None = None, *, hidden: int = 32, layers: int = 2,
                   heads: int = 2, intermediate: int = 64, image_size: int = 64, seed: int = 0):
    """A tiny, randomly initialised VLM of another family than the built-in Llava, built from its config with a
    local word-level tokenizer and the family's own processor classes (nothing is downloaded): what a pilot's
    model looks like to the bring-your-own path (``AlignmentConfig.policy_path``) once saved with
    :func:`save_policy`. Returns ``(model, processor)``.

    family: 'llava' (:func:`build_tiny_llava`), 'idefics3' (the SmolVLM family: SigLIP-style tower, pixel
    shuffle, Llama text model) or 'qwen2_vl' (Qwen2-VL: windowless ViT with 2x2 patch merging, M-RoPE; its
    processor needs torchvision for its video half).
    """
    words = list(words) if words is not None else easyvqa_vocabulary()
    if family == "llava":
        return build_tiny_llava(words, TinyLlavaConfig(image_size=image_size, patch_size=16, vision_hidden=hidden,
                                                       text_hidden=hidden, vision_layers=layers, text_layers=layers,
                                                       heads=heads, intermediate=intermediate, seed=seed))
    tok = build_tokenizer(words)
    if family == "idefics3":
        from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                                  Idefics3Processor, LlamaConfig)
        from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

        patch, scale = 16, 2
        tok.add_tokens(["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
                       + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)], special_tokens=True)
        ip = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                       max_image_size={"longest_edge": image_size}, do_resize=True)
        n_img = (image_size // patch) ** 2 // scale ** 2
        processor = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=n_img,
                                      chat_template=_chat_template(IMAGE_TOKEN))
        vision = Idefics3VisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=heads, image_size=image_size, patch_size=patch)
        text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        cfg = Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale,
                             image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(cfg)
    elif family == "qwen2_vl":
        from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil,
                                  Qwen2VLProcessor)

        tok.add_tokens(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                       special_tokens=True)
        side = max(56, image_size // 28 * 28)  # 14-pixel patches merged 2x2: multiples of 28
        ip = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side)
        template = _chat_template("<|vision_start|><|image_pad|><|vision_end|>")
        if _has_torchvision():
            from transformers import Qwen2VLVideoProcessor

            processor = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                         chat_template=template)
        else:  # the video half needs torchvision: an image-only processor (what alignment uses)
            processor = _image_only(Qwen2VLProcessor)(image_processor=ip, tokenizer=tok, video_processor=None,
                                                      chat_template=template)
        half = hidden // heads // 2
        section = [half - 2 * (half // 3), half // 3, half // 3]
        cfg = Qwen2VLConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             rope_parameters={"rope_type": "default", "mrope_section": section,
                                              "rope_theta": 10000.0}),
            vision_config=dict(depth=layers, embed_dim=hidden, hidden_size=hidden, num_heads=heads, mlp_ratio=2,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(TINY_VLM_FAMILIES)}")
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    return model, processor


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


@dataclass
class SFTConfig:
    """Supervised warm start of the policy on labelled (image, question, answer) examples."""

    steps: int = 150
    """Optimizer steps (deterministic given the seed; about 15 s on 2 idle CPU cores)."""
    max_seconds: float = 120.0
    """Safety cap on wall-clock time; training stops at whichever of steps / max_seconds comes first."""
    epochs: int = 1000
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    max_examples: int | None = None
    """Use at most this many examples (None: all)."""


def _sft_batch(processor, examples, device, images: ImageCache | None = None):
    """Tokenise a batch: full conversation; labels only on the answer + </s>. ``images``: decoded images reused
    across batches (each image is decoded once per warm start instead of once per batch it appears in); the
    processor encodes the whole batch in one call."""
    tok = processor.tokenizer
    pils = (images or ImageCache()).pils(examples)
    prompts = [processor.apply_chat_template(user_message(e.question), add_generation_prompt=True)
               for e in examples]
    full = [p + " " + str(e.answer).lower() + " " + EOS for p, e in zip(prompts, examples)]
    old = tok.padding_side
    tok.padding_side = "right"
    try:
        enc = processor(images=pils, text=full, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    # all prompts render to the same number of tokens only if questions have equal length: mask per row instead
    asst = tok.convert_tokens_to_ids(ASSISTANT)
    prompt_len = None
    for i in range(labels.shape[0]):
        pos = (enc["input_ids"][i] == asst).nonzero()
        if len(pos):
            cut = int(pos[-1]) + 1
        else:  # no ASSISTANT token (another tokenizer): the first prompt's length, encoded only when needed
            if prompt_len is None:
                old = tok.padding_side
                tok.padding_side = "right"
                try:
                    prompt_len = len(processor(images=pils[:1], text=prompts[:1])["input_ids"][0])
                finally:
                    tok.padding_side = old
            cut = prompt_len
        labels[i, :cut] = -100
    enc["labels"] = labels
    return {k: v.to(device) for k, v in enc.items()}


class SFTEncoded:
    """Every SFT example encoded once, before training: the processor runs over the examples in chunks (images
    decoded once, pixel values computed once per example), and a training batch is then only an index, a pad and a
    stack (:meth:`batch`), identical to what :func:`_sft_batch` gives for the same examples. ``ok`` is False when
    the processor's output is not one row per example (e.g. Qwen2-VL's flattened patches) or a prompt has no
    ``ASSISTANT:`` token: the caller then encodes each batch with :func:`_sft_batch`."""

    def __init__(self, processor, examples: Sequence, images: ImageCache | None = None, chunk: int = 128):
        self.pad_id = processor.tokenizer.pad_token_id
        asst = processor.tokenizer.convert_tokens_to_ids(ASSISTANT)
        self.rows: list[dict] = []
        self.seq_keys: set[str] = set()
        self.ok = self.pad_id is not None
        cache = images if images is not None else ImageCache()
        for b in range(0, len(examples), chunk) if self.ok else ():
            part = list(examples[b: b + chunk])
            enc = _sft_batch(processor, part, torch.device("cpu"), cache)
            ids = enc["input_ids"]
            if any(v.shape[0] != len(part) for v in enc.values()) or \
                    not bool((ids == asst).any(dim=1).all()):
                self.ok = False
                break
            self.seq_keys = {k for k, v in enc.items() if v.dim() == 2 and v.shape == ids.shape}
            lens = enc["attention_mask"].sum(dim=1).tolist()
            for i, n in enumerate(lens):  # right-padded: a row's tokens are its first n
                self.rows.append({k: (v[i, : int(n)] if k in self.seq_keys else v[i]) for k, v in enc.items()})

    def batch(self, idx: Sequence[int], device) -> dict:
        rows = [self.rows[i] for i in idx]
        width = max(len(r["input_ids"]) for r in rows)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": -100}
        out = {}
        for k in rows[0]:
            if k in self.seq_keys:
                out[k] = torch.stack([torch.nn.functional.pad(r[k], (0, width - len(r[k])), value=fill.get(k, 0))
                                      for r in rows])
            else:
                out[k] = torch.stack([r[k] for r in rows])
        return {k: v.to(device) for k, v in out.items()}


def sft_warm_start(model, processor, examples: Sequence, config: SFTConfig | None = None, *, progress: bool = True
                   ) -> dict:
    """Supervised fine-tuning on labelled examples (the server's public split): answers in the right format.

    Returns a summary dict (steps, seconds, final loss). The model is trained in place and left in eval mode.
    """
    import time

    from tqdm.auto import tqdm

    cfg = config or SFTConfig()
    examples = list(examples)
    if not examples:
        raise ValueError("sft_warm_start: examples is empty; pass the server's labelled public split")
    for attr in ("image", "question", "answer"):
        if not hasattr(examples[0], attr):
            raise TypeError(f"sft_warm_start: examples need an .{attr} field (got {type(examples[0]).__name__})")
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    device = model_device(model)
    cache = ImageCache()
    encoded = SFTEncoded(processor, examples, cache)  # every example encoded once (one row per example)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = min(cfg.steps, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    t0, step, loss_v = time.perf_counter(), 0, float("nan")
    bar = tqdm(total=total, desc="SFT warm start", disable=not progress, leave=False)
    done = False
    for _ in range(cfg.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b: b + cfg.batch_size]
            batch = encoded.batch(idx, device) if encoded.ok else \
                _sft_batch(processor, [examples[i] for i in idx], device, cache)
            with autocast_for(device):  # bf16 matmuls on CUDA (fp32 weights and optimizer); fp32 on the CPU
                out = model(**batch)
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            loss_v = out.loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}")
            if step >= cfg.steps or time.perf_counter() - t0 > cfg.max_seconds:
                done = True
                break
        if done:
            break
    bar.close()
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 2), "final_loss": loss_v,
            "examples": len(examples), "device": str(device)}


@dataclass
class PretrainConfig:
    """Stage 1 of the built-in policy's public warm start (issue #17): before the SFT on the server's public VQA
    examples, learn to *see* from synthetic images drawn by the project's own renderer (no privacy cost).

    * ``vision_steps``: the vision tower alone learns to classify each synthetic image's colour and shape from every
      patch token (and their mean), through two linear heads that are thrown away afterwards;
    * ``caption_steps``: the whole policy learns to caption synthetic images ("a red circle", "the circle is red";
      :mod:`mor_client.data.synthetic_captions`): grounded colour and shape words, but no VQA question -> answer
      mapping (the prompt is never a question).

    Both 0: no stage 1 (the warm start is the public SFT alone)."""

    vision_steps: int = 0
    """Vision-tower classification steps (batch 64)."""
    caption_steps: int = 0
    """Captioning steps of the whole policy (batch ``batch_size``)."""
    match_steps: int = 0
    """Image-text matching steps after the captions (BLIP-style ITM: does "red shape" / "circle" / "red circle"
    describe the image?), read from the language model's last hidden state by a throwaway linear head. Each
    matching step also takes a captioning batch when ``caption_steps`` > 0 (without it, matching alone made the
    policy forget its captions: 92.5% -> 6.5% held-out, docs/alignment.md)."""
    images: int = 2000
    """Synthetic images drawn for stage 1 (both parts use the same images)."""
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0
    """Seed of the synthetic images and of the batch order (follows the run's seed in the demo)."""
    max_seconds: float = 1800.0
    """Safety cap on each part's wall-clock time."""

    def enabled(self) -> bool:
        return self.vision_steps > 0 or self.caption_steps > 0 or self.match_steps > 0


def pretrain_vision_tower(model, processor, examples: Sequence, labels: Sequence[tuple[int, int]], *, steps: int,
                          n_colors: int, n_shapes: int, seed: int = 0, learning_rate: float = 3e-3,
                          batch_size: int = 64, max_seconds: float = 1800.0) -> dict:
    """Every patch token of the vision tower (and their mean) classifies the image's colour and shape.

    labels: ``(colour index, shape index)`` per example. Returns the last batch's colour/shape accuracy."""
    import time

    device = next(model.parameters()).device
    pix = processor.image_processor([to_pil(e.image) for e in examples], return_tensors="pt")["pixel_values"]
    pix = pix.to(device=device, dtype=next(model.parameters()).dtype)
    yc = torch.tensor([c for c, _ in labels], device=device)
    ys = torch.tensor([s for _, s in labels], device=device)
    tower = model.model.vision_tower
    hidden = model.config.vision_config.hidden_size
    torch.manual_seed(seed)
    hc, hs = torch.nn.Linear(hidden, n_colors).to(device), torch.nn.Linear(hidden, n_shapes).to(device)
    opt = torch.optim.AdamW([*tower.parameters(), *hc.parameters(), *hs.parameters()], lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    ce = torch.nn.functional.cross_entropy
    acc_c = acc_s = float("nan")
    t0, done = time.perf_counter(), 0
    tower.train()
    for _ in range(steps):
        idx = torch.randint(0, len(examples), (batch_size,), generator=gen).to(device)
        h = tower(pixel_values=pix[idx]).last_hidden_state
        t = h.shape[1]
        pc, ps = hc(h.mean(1)), hs(h.mean(1))
        loss = (ce(hc(h).flatten(0, 1), yc[idx].repeat_interleave(t)) + ce(hs(h).flatten(0, 1),
                ys[idx].repeat_interleave(t)) + ce(pc, yc[idx]) + ce(ps, ys[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
        acc_c = float((pc.argmax(1) == yc[idx]).float().mean())
        acc_s = float((ps.argmax(1) == ys[idx]).float().mean())
        if time.perf_counter() - t0 > max_seconds:
            break
    model.eval()
    return {"steps": done, "seconds": round(time.perf_counter() - t0, 2), "last_batch_colour_acc": acc_c,
            "last_batch_shape_acc": acc_s}


def pretrain_policy(model, processor, config: PretrainConfig, *, progress: bool = True) -> dict:
    """Stage 1 of the warm start (see :class:`PretrainConfig`), in place. Returns a summary dict."""
    from mor_client.data.easyvqa import COLORS, SHAPE_NAMES
    from mor_client.data.synthetic import synthetic_attributes
    from mor_client.data.synthetic_captions import make_caption_examples

    for name in ("vision_steps", "caption_steps", "match_steps", "images"):
        if getattr(config, name) < 0:
            raise ValueError(f"PretrainConfig.{name} must be >= 0, got {getattr(config, name)}")
    out: dict = {"images": config.images}
    if not config.enabled():
        return out
    if config.images < 1:
        raise ValueError("PretrainConfig.images must be >= 1 when vision_steps, caption_steps or match_steps > 0")
    data_seed = 10_000 + config.seed  # a stream of its own (the reward models' synthetic data use small seeds)
    captions = make_caption_examples(config.images, seed=data_seed)
    if config.vision_steps:
        labels = []
        for i in range(config.images):
            shape, color = synthetic_attributes(data_seed, i)
            labels.append((COLORS.index(color), SHAPE_NAMES.index(shape)))
        out["vision"] = pretrain_vision_tower(model, processor, captions, labels, steps=config.vision_steps,
                                              n_colors=len(COLORS), n_shapes=len(SHAPE_NAMES), seed=config.seed,
                                              learning_rate=config.learning_rate, max_seconds=config.max_seconds)
    if config.caption_steps:
        out["captions"] = sft_warm_start(model, processor, captions, SFTConfig(
            steps=config.caption_steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
            seed=config.seed, max_seconds=config.max_seconds), progress=progress)
    if config.match_steps:
        out["matching"] = pretrain_matching(model, processor, captions, seed=data_seed, steps=config.match_steps,
                                            with_captions=config.caption_steps > 0,
                                            batch_size=config.batch_size, learning_rate=config.learning_rate,
                                            train_seed=config.seed, max_seconds=config.max_seconds)
    return out


def pretrain_matching(model, processor, images: Sequence, *, seed: int, steps: int, batch_size: int = 32,
                      learning_rate: float = 3e-3, train_seed: int = 0, max_seconds: float = 1800.0,
                      with_captions: bool = False) -> dict:
    """BLIP-style image-text matching on synthetic images: the prompt ``<image> {phrase}`` (no question), a
    throwaway linear head on the language model's last hidden state at the generation position predicts whether
    the phrase describes the image (:func:`mor_client.data.synthetic_captions.matching_text`; image ``k`` of
    ``images`` is synthetic image ``k`` of ``seed``). ``with_captions``: every step also trains on a batch of
    ``images`` as captioning examples (their ``question``/``answer``), so matching does not erase the captions.
    Returns the last batch's matching accuracy."""
    import time

    from mor_client.data.synthetic_captions import matching_text

    device = next(model.parameters()).device
    tok = processor.tokenizer
    torch.manual_seed(train_seed)
    head = torch.nn.Linear(model.config.text_config.hidden_size, 1).to(device)
    opt = torch.optim.AdamW([*[p for p in model.parameters() if p.requires_grad], *head.parameters()],
                            lr=learning_rate)
    rng = random.Random(train_seed)
    pil = {}
    model.train()
    t0, done, acc = time.perf_counter(), 0, float("nan")
    old = tok.padding_side
    tok.padding_side = "left"  # the generation position is the last one of every row
    try:
        for step in range(steps):
            idx = [rng.randrange(len(images)) for _ in range(batch_size)]
            pairs = [matching_text(seed, k, step) for k in idx]
            prompts = [processor.apply_chat_template(user_message(t), add_generation_prompt=True) for t, _ in pairs]
            for k in idx:
                if k not in pil:
                    pil[k] = to_pil(images[k].image)
            enc = processor(images=[pil[k] for k in idx], text=prompts, return_tensors="pt", padding=True).to(device)
            h = model(**enc, output_hidden_states=True).hidden_states[-1][:, -1, :]
            y = torch.tensor([float(m) for _, m in pairs], device=device)
            logit = head(h.float()).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
            if with_captions:
                tok.padding_side = old
                cap = _sft_batch(processor, [images[rng.randrange(len(images))] for _ in range(batch_size)], device)
                tok.padding_side = "left"
                loss = loss + model(**cap).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            done += 1
            acc = float(((logit > 0).float() == y).float().mean())
            if time.perf_counter() - t0 > max_seconds:
                break
    finally:
        tok.padding_side = old
    model.eval()
    return {"steps": done, "seconds": round(time.perf_counter() - t0, 2), "last_batch_accuracy": acc}


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


WARM_START_CODE_VERSION = "3"
"""Part of the warm-start cache key: bump it whenever the policy builder, tokenizer or SFT code changes what a
cached reference would contain, so no stale checkpoint is reused."""


def examples_digest(examples: Sequence) -> str:
    """SHA-256 over every example's question, answer and image pixels (order-sensitive): what a cache of a model
    trained on ``examples`` is keyed by, so another seed's split with the same size never matches."""
    h = hashlib.sha256()
    for e in examples:
        img = to_pil(e.image)
        for part in (str(e.question).encode(), b"\0", str(e.answer).encode(), b"\0",
                     f"{img.size[0]}x{img.size[1]}".encode(), img.tobytes()):
            h.update(part)
    return h.hexdigest()


def warm_start_cached(cache_dir: str | Path, examples: Sequence, *, tiny: TinyLlavaConfig | None = None,
                      sft: SFTConfig | None = None, pretrain: PretrainConfig | None = None,
                      progress: bool = True, device: str | torch.device | None = None):
    """Build + (stage 1: ``pretrain`` on synthetic images, optional) + SFT the tiny policy, or reuse the checkpoint
    cached in ``cache_dir`` when its settings match (configs of every stage, data digest and code version).

    device: where the policy is built, warm-started and returned (default :func:`pick_device`: CUDA when present,
    with bf16 autocast; fp32 weights are trained and saved). The device is not part of the cache key.
    Returns ``(model, processor, info)``; the directory holds the frozen reference checkpoint.
    """
    dev = pick_device(device)[0]
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    cache_dir = Path(cache_dir)
    key = {"tiny": asdict(tiny or TinyLlavaConfig()), "sft": asdict(sft or SFTConfig()), "n": len(examples),
           "data_sha256": examples_digest(examples), "code": WARM_START_CODE_VERSION,
           "pretrain": asdict(pretrain) if pretrain is not None and pretrain.enabled() else None}
    meta = cache_dir / "warm_start.json"
    try:
        cached = json.loads(meta.read_text()) if meta.is_file() else None
    except (OSError, ValueError):
        cached = None
    if isinstance(cached, dict) and cached.get("key") == key:
        model = LlavaForConditionalGeneration.from_pretrained(cache_dir, local_files_only=True)
        processor = LlavaProcessor.from_pretrained(cache_dir, local_files_only=True)
        model.to(dev).eval()  # evaluation before GRPO runs where the policy will train
        return model, processor, {**cached.get("info", {}), "cached": True}
    model, processor = build_tiny_llava(config=tiny)
    model.to(dev)  # the warm start trains on the GPU when there is one (fp32 weights; saved as such)
    pre = pretrain_policy(model, processor, pretrain, progress=progress) if pretrain is not None else None
    info = sft_warm_start(model, processor, examples, sft, progress=progress)
    if pre is not None and pretrain.enabled():
        info = {**info, "pretrain": pre}
    # built in a staging folder and swapped in whole, warm_start.json (the cache's completion marker) written last
    # inside it: a run killed while saving leaves the old cache or none, never a half-written one that is trusted
    from privacy.fsutil import replace_dir, staging_dir

    staged = staging_dir(cache_dir)
    save_policy(model, processor, staged)
    (staged / "warm_start.json").write_text(json.dumps({"key": key, "info": info}, indent=1))
    replace_dir(staged, cache_dir)
    return model, processor, {**info, "cached": False}
