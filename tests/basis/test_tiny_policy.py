"""Tests for basis.tiny_policy: tokenizer/model builders, saving through the real `Auto*` loaders."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from basis.tasks import generate_arithmetic, load_prompts, render_prompt
from basis.tiny_policy import (
    EOS_TOKEN,
    PAD_TOKEN,
    SFTConfig,
    build_model,
    build_tokenizer,
    collate_sft,
    generate_responses,
    main,
    num_parameters,
    save_policy,
    sft_examples,
    tokenize_chat,
    train_sft,
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
    differ = [
        n for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()) if not torch.equal(p, q)
    ]
    assert not differ, f"same seed, different weights: {differ}"
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
    # The weights loaded are the ones built: the `tiny_lm_path` recipe (conftest.py) rebuilt in memory.
    built = build_model(build_tokenizer(), hidden_size=64, num_layers=2, intermediate_size=128, seed=0)
    loaded = model.state_dict()
    assert loaded.keys() == built.state_dict().keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in built.state_dict().items())
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    prompt_ids = tokenize_chat(tokenizer, ["8+73", "(17-9)*(4+6)"])
    batch = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")  # left padding
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 8  # [B, T + new]
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])  # continues the prompts


# ---------------------------------------------------------------------------- warm start and command


def test_sft_batch_masks_prompt_and_padding() -> None:
    tokenizer = build_tokenizer()
    rows = [{"prompt": "8+73", "solution": "8+73=81 #### 81"}, {"prompt": "2+3", "solution": "2+3=5 #### 5"}]
    examples = sft_examples(tokenizer, rows)
    assert tokenizer.decode(examples[0][0] + examples[0][1]) == f"Q: 8+73\nA: 8+73=81 #### 81{EOS_TOKEN}"
    batch = collate_sft(examples, tokenizer.pad_token_id)
    prompt_len, response_len = len(examples[1][0]), len(examples[1][1])
    assert batch.labels[1, :prompt_len].eq(-100).all()  # no loss on the prompt
    assert batch.labels[1, prompt_len : prompt_len + response_len].tolist() == examples[1][1]
    assert batch.labels[1, prompt_len + response_len :].eq(-100).all()  # nor on padding
    assert batch.attention_mask.sum(dim=1).tolist() == [len(p) + len(r) for p, r in examples]


def test_train_sft_is_seeded_and_lowers_the_loss() -> None:
    rows = generate_arithmetic(seed=0, n_train=64, n_val=0, n_test=0)["train"]
    config = SFTConfig(steps=12, batch_size=16, lr=3e-3, warmup_steps=2, log_every=4, eval_every=100)
    runs = []
    for _ in range(2):
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, hidden_size=32, num_layers=1, intermediate_size=64, seed=1)
        runs.append(train_sft(model, tokenizer, rows, config, seed=5))
    assert runs[0] == runs[1]  # reproducible from the seed
    assert sum(runs[0][-3:]) / 3 < sum(runs[0][:3]) / 3


def test_train_sft_stops_at_the_target_validation_accuracy() -> None:
    rows = generate_arithmetic(seed=0, n_train=32, n_val=0, n_test=0)["train"]
    config = SFTConfig(steps=20, batch_size=8, warmup_steps=1, eval_every=4, target_val_acc=0.5)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, num_layers=1, intermediate_size=64)
    accuracies = iter([0.1, 0.3, 0.6, 0.9])
    evaluated: list[int] = []

    def on_eval(step: int) -> float:
        evaluated.append(step)
        return next(accuracies)

    losses = train_sft(model, tokenizer, rows, config, seed=0, on_eval=on_eval)
    assert evaluated == [4, 8, 12] and len(losses) == 12


def test_shipped_config_parses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "configs/tiny_policy.yaml", "--print_config"])
    assert exit_info.value.code == 0
    assert "target_val_acc: 0.5" in capsys.readouterr().out


@pytest.fixture(scope="module")
def built_policy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """A policy built by the real command with a tiny budget (config file + CLI override), logged to a
    temporary sqlite MLflow store."""
    tmp = tmp_path_factory.mktemp("tiny_policy")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = tmp / "config.yaml"
    config.write_text(
        "n_train: 100\nn_val: 20\nn_test: 20\nmodel: {hidden_size: 32, num_layers: 1, intermediate_size: 64}\n"
        "sft: {steps: 6, batch_size: 8, warmup_steps: 1, log_every: 2, eval_every: 3, eval_prompts: 5, target_val_acc: null}\n"
        "evaluation: {num_samples: 4, mean_k: 2, max_new_tokens: 12}\n"
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        main(["--config", str(config), "--out_dir", str(tmp / "policy"), "--seed", "3"])
    return tmp / "policy", json.loads((tmp / "policy" / "eval.json").read_text()), uri


def test_command_writes_policy_data_and_eval(built_policy: tuple[Path, dict, str]) -> None:
    out, result, _ = built_policy
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "eval.json"} <= {
        p.name for p in out.iterdir()
    }
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test.parquet",
        "train.parquet",
        "validation.parquet",
    ]
    assert 0.0 <= result["overall"] <= 1.0
    assert set(result["by_difficulty"]) == {"1", "2", "3", "4", "5"}
    assert result["num_prompts"] == len(load_prompts(str(out / "data"), split="test")) == 20  # n_test
    sampled = result["sampled"]
    assert (sampled["k"], sampled["n"]) == (2, 4)
    assert set(sampled["mean_at_k"]) == set(sampled["pass_at_n"]) == set(result["by_difficulty"])
    for level, mean in sampled["mean_at_k"].items():
        assert 0.0 <= mean <= sampled["pass_at_n"][level] <= 1.0
    assert result["seed"] == 3
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert result["num_parameters"] == sum(p.numel() for p in saved.parameters())  # tied weights once
    environment = result["environment"]  # what a moved figure is traced to
    assert environment["packages"]["torch"] == torch.__version__ and environment["cpu_model"]


def test_same_seed_rebuilds_byte_identical_policy(
    built_policy: tuple[Path, dict, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, result, _ = built_policy
    config = out.parent / "config.yaml"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    main(["--config", str(config), "--out_dir", str(tmp_path / "again"), "--seed", "3"])
    for name in ("model.safetensors", "tokenizer.json", "data/train.parquet", "data/test.parquet"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["overall"] == result["overall"] and again["sampled"] == result["sampled"]


def test_command_logs_to_mlflow(built_policy: tuple[Path, dict, str]) -> None:
    import mlflow

    _, result, uri = built_policy
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny-policy")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["seed"] == "3"
    assert len(client.get_metric_history(run.info.run_id, "sft/loss")) == 3  # steps 2, 4, 6
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/greedy_acc")] == [3, 6]
    assert run.data.metrics["test/greedy_acc"] == pytest.approx(result["overall"])
    assert "test/pass_at_k/4" in run.data.metrics and "test/mean_at_k/2/level_1" in run.data.metrics


def test_built_policy_loads_through_auto_and_samples(built_policy: tuple[Path, dict, str]) -> None:
    out, result, _ = built_policy
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert render_prompt(tokenizer, "45*2+23") == "Q: 45*2+23\nA:"
    test_rows = load_prompts(str(out / "data"), split="test")
    responses = generate_responses(
        model, tokenizer, test_rows["prompt"][:4], num_samples=3, temperature=1.0, max_new_tokens=12
    )
    assert [len(r) for r in responses] == [3, 3, 3, 3]
    assert all(isinstance(text, str) for group in responses for text in group)
    # The loaded policy is the one the command evaluated: its greedy answers reproduce eval.json's.
    examples = result["greedy_examples"]
    greedy = generate_responses(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens=12)
    assert len(examples) == 10 and [g for (g,) in greedy] == [e["response"] for e in examples]


@pytest.mark.slow
def test_full_build_meets_the_accuracy_band(tmp_path: Path, mlflow_store: str) -> None:
    """`configs/tiny_policy.yaml` end to end (about 2-4 minutes on 2 cores): greedy held-out accuracy
    within 15-60 %, decreasing with difficulty, and sampling leaves RL headroom."""
    main(["--config", "configs/tiny_policy.yaml", "--out_dir", str(tmp_path / "policy")])
    result = json.loads((tmp_path / "policy" / "eval.json").read_text())
    assert 0.15 <= result["overall"] <= 0.60
    by_level = [result["by_difficulty"][str(level)] for level in range(1, 6)]
    assert by_level[0] > by_level[2] > by_level[4]
    sampled = result["sampled"]
    assert sampled["overall_mean"] < result["overall"] - 0.05  # sampling is clearly worse than greedy
    assert sampled["overall_pass"] > sampled["overall_mean"] + 0.2  # and pass@16 clearly above mean@4
