"""Tests for basis.tiny_policy: tokenizer/model builders, saving through the real `Auto*` loaders."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from basis.tiny_policy import (
    EOS_TOKEN,
    PAD_TOKEN,
    build_model,
    build_tokenizer,
    num_parameters,
    save_policy,
    tokenize_chat,
)


def test_tokenizer_one_token_per_digit_and_specials() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("1234567890", add_special_tokens=False)["input_ids"]
    assert len(ids) == 10
    assert [tokenizer.decode([i]) for i in ids] == list("1234567890")
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    # Byte-level: any text round-trips, including characters absent from the corpus.
    text = "Ωμέγα → ∑ 42 \\frac{1}{2}"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_renders_task_prompt_format() -> None:
    tokenizer = build_tokenizer()
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "8+73"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "Q: 8+73\nA:"
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "8+73"}, {"role": "assistant", "content": "81"}], tokenize=False
    )
    assert full == f"Q: 8+73\nA: 81{EOS_TOKEN}\n"


def test_tokenizer_rejects_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(vocab_size=100)


def test_build_model_is_seeded_and_validates_shape() -> None:
    tokenizer = build_tokenizer()
    a, b = build_model(tokenizer, seed=3), build_model(tokenizer, seed=3)
    c = build_model(tokenizer, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert a.config.vocab_size == len(tokenizer)
    assert 2e5 < num_parameters(a) < 1e6
    with pytest.raises(ValueError, match="divisible"):
        build_model(tokenizer, hidden_size=130, num_heads=4)


def test_fixture_builds_fast(tmp_path) -> None:
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    save_policy(build_model(tokenizer), tokenizer, tmp_path)
    assert time.perf_counter() - start < 5.0


def test_saved_policy_loads_through_auto_and_samples(tiny_lm_path: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    assert model.config.model_type == "qwen3"
    prompt_ids = tokenize_chat(tokenizer, ["8+73", "(17-9)*(4+6)"])
    batch = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")  # left padding
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 8  # [B, T + new]
