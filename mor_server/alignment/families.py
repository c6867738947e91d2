"""Small, randomly initialised VLMs of the families pilots bring (issue #13), built from config: the bring-your-own
path (``AlignmentConfig.policy_path``, ``mor align --policy``) is tested on them end to end. Nothing is downloaded;
the tokenizer is the built-in word-level one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .policy import (CHAT_TEMPLATE, IMAGE_TOKEN, TinyLlavaConfig, _has_torchvision, _image_only, build_tiny_llava,
                     build_tokenizer, easyvqa_vocabulary)


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
