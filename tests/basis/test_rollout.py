"""HFEngine: stop strings, the model's generation_config and finish reasons – real tiny Qwen3 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from basis.rollout import HFEngine, ResponseStopStrings, SamplingParams


def load(path: str | Path) -> tuple[torch.nn.Module, object]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(
        path
    )


def favour(model: torch.nn.Module, token: int, boost: float = 30.0) -> None:
    """Make `token` the likely next token everywhere: add `boost` to its logit (a forward hook on the
    output layer, so the model's own forward and `generate` both see it)."""

    def hook(module: torch.nn.Module, inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., token] += boost
        return logits

    model.get_output_embeddings().register_forward_hook(hook)


def test_a_stop_string_must_lie_inside_the_response(tiny_lm_path: str) -> None:
    model, tokenizer = load(tiny_lm_path)
    (newline,) = tokenizer.encode("\n", add_special_tokens=False)
    favour(model, newline, boost=6.0)
    assert tokenizer.pad_token_id not in [tokenizer.eos_token_id, newline]
    prompt = tokenizer.encode("Q: 2+2?\nA:\n", add_special_tokens=False)  # ends with half the stop string
    completions = HFEngine(model, tokenizer).generate(
        [prompt] * 6, SamplingParams(max_new_tokens=8, stop=("\n\n",), seed=0)
    )
    for completion in completions:
        assert tokenizer.pad_token_id not in completion.token_ids  # no padding passed off as a response
        if completion.finish_reason == "stop":
            assert "\n\n" in completion.text or completion.token_ids[-1] == tokenizer.eos_token_id
    assert any("\n\n" in c.text for c in completions)


def test_the_models_generation_config_does_not_change_sampling(tiny_lm_path: str, tmp_path: Path) -> None:
    model, tokenizer = load(tiny_lm_path)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "generation_config.json").read_text())
    config.update(
        temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3, min_p=0.97, no_repeat_ngram_size=1
    )
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    model, tokenizer = load(tmp_path)
    prompt = [5, 6, 7, 5, 6, 7]
    (completion,) = HFEngine(model, tokenizer).generate([prompt], SamplingParams(max_new_tokens=12, seed=0))
    ids = torch.tensor([prompt + completion.token_ids])  # [1, T]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # [R, V] at temperature 1, no filters
    want = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)  # [R]
    torch.testing.assert_close(torch.tensor(completion.logprobs), want, atol=1e-5, rtol=0)
    assert model.generation_config.repetition_penalty == 1.3  # kept for exports


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 5, 1.0), (1.3, 0, 0.6)])
def test_logprobs_are_full_vocabulary_at_the_temperature(
    tiny_lm_path: str, temperature: float, top_k: int, top_p: float
) -> None:
    """Before top-k / top-p, as SGLang returns them and the trainer recomputes them."""
    model, tokenizer = load(tiny_lm_path)
    prompt = [5, 6, 7, 5, 6, 7]
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    (completion,) = HFEngine(model, tokenizer).generate([prompt], params)
    ids = torch.tensor([prompt + completion.token_ids])  # [1, T]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature  # [R, V]
    want = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)  # [R]
    torch.testing.assert_close(torch.tensor(completion.logprobs), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_new_tokens", [1, 4])
def test_eos_as_the_last_allowed_token_finishes_with_stop(tiny_lm_path: str, max_new_tokens: int) -> None:
    model, tokenizer = load(tiny_lm_path)
    favour(model, tokenizer.eos_token_id)
    (completion,) = HFEngine(model, tokenizer).generate([[5, 6, 7]], SamplingParams(max_new_tokens, seed=0))
    assert completion.token_ids == [tokenizer.eos_token_id]
    assert completion.finish_reason == "stop"  # as SGLang: EOS is checked before the length


def test_a_response_cut_by_max_new_tokens_finishes_with_length(tiny_lm_path: str) -> None:
    model, tokenizer = load(tiny_lm_path)
    favour(model, 5)  # a token that is neither EOS nor padding
    (completion,) = HFEngine(model, tokenizer).generate([[5, 6, 7]], SamplingParams(3, seed=0))
    assert completion.token_ids == [5, 5, 5]
    assert completion.finish_reason == "length"


@pytest.mark.parametrize("stop", ["</answer>", ("",), ("ok", 3)])
def test_stop_must_be_a_tuple_of_non_empty_strings(stop: object) -> None:
    # a bare string used to stop at any of its characters, and "" after every first token
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=stop)  # type: ignore[arg-type]


def test_prompt_ids_outside_the_vocabulary_are_named(tiny_lm_path: str) -> None:
    model, tokenizer = load(tiny_lm_path)
    vocab = model.get_input_embeddings().num_embeddings
    engine = HFEngine(model, tokenizer, max_batch_size=2)
    with pytest.raises(ValueError, match=rf"prompt 3 holds token id\(s\) \[{vocab}\]"):
        engine.generate([[5], [6], [7, 8], [9, vocab]], SamplingParams(max_new_tokens=2, seed=0))


def test_a_multibyte_stop_string_ends_generation_early(tiny_lm_path: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    stop = tokenizer.encode("日", add_special_tokens=False)
    assert len(stop) == 3  # one character, three byte tokens
    prompt = [5, 6, 7]
    tail = torch.tensor([prompt + tokenizer.encode("ab", add_special_tokens=False) + stop])
    assert ResponseStopStrings(tokenizer, ("日",), len(prompt))(tail, None).tolist() == [True]


def test_a_seeded_call_leaves_the_callers_random_stream_alone(tiny_lm_path: str) -> None:
    model, tokenizer = load(tiny_lm_path)
    engine, params = HFEngine(model, tokenizer), SamplingParams(max_new_tokens=4, seed=123)
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    first = engine.generate([[5, 6, 7]] * 2, params)
    assert torch.equal(torch.rand(3), want)
    assert [c.token_ids for c in engine.generate([[5, 6, 7]] * 2, params)] == [c.token_ids for c in first]
