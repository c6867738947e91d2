"""Built-in tiny Llava policy: word-level tokenizer + chat template, SFT warm start, save/load, local HF dir
with a peft LoRA adapter."""

import pytest
import torch

from mor_client.data.easyvqa import ANSWERS, load_easyvqa
from mor_server.alignment.policy import (IMAGE_TOKEN, TinyLlavaConfig, build_tiny_llava, generate_answers,
                                         load_policy, normalize_answer, save_policy, user_message)
from mor_server.alignment.warmstart import SFTConfig, _sft_batch, sft_warm_start

SMALL = TinyLlavaConfig(image_size=32, patch_size=16, vision_hidden=32, text_hidden=32, intermediate=64, heads=2)


@pytest.fixture(scope="module")
def data():
    train = load_easyvqa("train")
    return train[:256], load_easyvqa("test")[:48]


def test_tokenizer_and_chat_template():
    model, processor = build_tiny_llava(config=SMALL)
    tok = processor.tokenizer
    text = processor.apply_chat_template(user_message("what color is the shape?"), add_generation_prompt=True)
    assert text == "<s>USER: <image> what color is the shape? ASSISTANT:"
    assert tok.tokenize(text) == ["<s>", "USER:", IMAGE_TOKEN, "what", "color", "is", "the", "shape", "?",
                                  "ASSISTANT:"]
    assert all(tok.convert_tokens_to_ids(a) != tok.unk_token_id for a in ANSWERS)
    # the processor expands <image> to one token per patch, which the model consumes
    from PIL import Image

    enc = processor(images=[Image.new("RGB", (64, 64), "red")], text=[text], return_tensors="pt")
    n_img = int((enc["input_ids"] == tok.convert_tokens_to_ids(IMAGE_TOKEN)).sum())
    assert n_img == (SMALL.image_size // SMALL.patch_size) ** 2
    out = model(**enc)
    assert out.logits.shape[-1] == len(tok)


def test_sft_learns_the_answer_format_and_save_load_roundtrip(data, tmp_path):
    train, test = data
    model, processor = build_tiny_llava(config=SMALL)
    batch = _sft_batch(processor, train[:32], torch.device("cpu"))
    # labels cover exactly the answer word and </s>
    assert int((batch["labels"] != -100).sum()) == 2 * 32
    with torch.no_grad():
        before = model(**batch).loss.item()
    info = sft_warm_start(model, processor, train, SFTConfig(steps=40, batch_size=32, seed=0), progress=False)
    assert info["steps"] == 40
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < 0.5 * before
    answers = generate_answers(model, processor, test)
    in_vocab = sum(normalize_answer(a) in ANSWERS for a in answers) / len(answers)
    assert in_vocab > 0.9, answers[:10]
    d = save_policy(model, processor, tmp_path / "p")
    loaded, proc2 = load_policy(d)
    assert generate_answers(loaded, proc2, test) == answers
    with pytest.raises(ValueError, match="examples is empty"):
        sft_warm_start(model, processor, [], progress=False)


def test_load_local_dir_with_lora_adapter(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, processor = build_tiny_llava(config=SMALL)
    base = save_policy(model, processor, tmp_path / "base")
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    loaded, _ = load_policy(base, adapter=tmp_path / "adapter")
    assert isinstance(loaded, PeftModel)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora" in n)
    enc = processor(images=[__import__("PIL.Image").Image.new("RGB", (32, 32), "blue")],
                    text=[processor.apply_chat_template(user_message("what shape is it?"), add_generation_prompt=True)],
                    return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, lora(**enc).logits)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_policy(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_policy(base, adapter=tmp_path)


def test_evaluation_decodes_like_grpo_sampling_never_an_image_token(data):
    """TRL suppresses the image token when it samples GRPO completions, so GRPO never pushes that token's
    probability down; evaluation must decode under the same rule or it measures another policy (one whose greedy
    answer can be an image placeholder, i.e. an empty string)."""
    from mor_server.alignment.policy import generation_constraints, to_pil

    model, processor = build_tiny_llava(config=SMALL)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert generation_constraints(model) == {"suppress_tokens": [image_id]}
    examples = data[1][:6]

    red = processor.tokenizer.convert_tokens_to_ids("red")

    def favour_image_token(module, args, out):  # the drift GRPO cannot see: the image token outscores everything
        out = out.clone()
        out[..., image_id] += 100.0
        out[..., red] += 50.0  # and "red" is the best real answer
        return out

    hook = model.lm_head.register_forward_hook(favour_image_token)
    try:
        answers = generate_answers(model, processor, examples, max_new_tokens=1)
        enc = processor(images=[to_pil(examples[0].image)],
                        text=[processor.apply_chat_template(user_message(examples[0].question),
                                                            add_generation_prompt=True)], return_tensors="pt")
        raw = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    finally:
        hook.remove()
    assert int(raw[0, -1]) == image_id  # unconstrained decoding would answer with the image token
    assert answers == ["red"] * len(examples)  # ours never does: it answers with the best real token


def test_warm_start_cache_is_keyed_by_the_data_not_its_size(data, tmp_path):
    """Two public splits of the same size (another seed's) must not share a cached reference."""
    from mor_server.alignment.warmstart import examples_digest, warm_start_cached

    train, _ = data
    a, b = train[:16], train[16:32]
    assert examples_digest(a) != examples_digest(b) and examples_digest(a) == examples_digest(list(a))
    sft = SFTConfig(steps=1, batch_size=8)
    _, _, first = warm_start_cached(tmp_path / "ref", a, tiny=SMALL, sft=sft, progress=False)
    _, _, again = warm_start_cached(tmp_path / "ref", a, tiny=SMALL, sft=sft, progress=False)
    _, _, other = warm_start_cached(tmp_path / "ref", b, tiny=SMALL, sft=sft, progress=False)
    assert first["cached"] is False and again["cached"] is True
    assert other["cached"] is False  # same size, different examples: trained again, not reused
