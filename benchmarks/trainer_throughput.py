"""Trainer throughput on the tiny policy: step time by phase and generated tokens/s.

Runs a short GRPO training (the demo's settings) through the real `PolicyTrainer` + Lightning
`Trainer`, logging into a temporary MLflow store, then reads the per-step `time/*` metrics back. In the
same run it measures a baseline: plain `model.generate` on the same prompts and batch size, with no
engine, verifier or trainer around it, alternated with the engine's own `generate` on the trained policy
(after one warm-up call each, `--repeats` pairs, medians). The ratio engine tokens/s / raw generate
tokens/s is the cost of our rollout path; the phase shares say where a step's time goes.

    .venv/bin/python benchmarks/trainer_throughput.py [--steps 20] [--policy artifacts/tiny-policy]

Writes `benchmarks/results/trainer_throughput.json`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch

from basis.data import PromptDataModule
from basis.rollout import SamplingParams, left_pad
from basis.tracking import MLflowLogger
from basis.trainer import PolicyTrainer
from benchmarks.results_io import write_results


def engine_tokens_per_s(module: PolicyTrainer, prompt_ids: list[list[int]], max_new_tokens: int) -> float:
    """The trainer's rollout engine on `prompt_ids` (sampling, per-token logprobs, stop handling)."""
    start = time.perf_counter()
    completions = module.engine.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, seed=0))
    return sum(len(c.token_ids) for c in completions) / (time.perf_counter() - start)


def raw_generate_tokens_per_s(
    module: PolicyTrainer, prompt_ids: list[list[int]], max_new_tokens: int
) -> float:
    """Baseline: `generate` alone on the same prompts (sampling, KV cache, no logprobs, no verifier)."""
    pad = module.tokenizer.pad_token_id
    ids, mask = left_pad(prompt_ids, pad)
    torch.manual_seed(0)  # the engine's seed: a fixed draw per run, as the engine's (which forks its RNG)
    start = time.perf_counter()
    with torch.no_grad():
        out = module.policy.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=module.tokenizer.eos_token_id,
        )
    elapsed = time.perf_counter() - start
    generated = out[:, ids.shape[1] :]
    eos = module.tokenizer.eos_token_id
    lengths = [(row == eos).nonzero()[0].item() + 1 if (row == eos).any() else len(row) for row in generated]
    return sum(lengths) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="artifacts/tiny-policy")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="alternated engine / raw generate pairs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = Path(args.policy)
    if not (policy / "config.json").exists():
        sys.exit(f"{policy} is not a built policy; run `make tiny-policy` first")

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        module = PolicyTrainer(
            str(policy),
            group_size=args.group_size,
            max_new_tokens=48,
            micro_batch_size=128,
            run_dir=f"{tmp}/run",
            val_samples=1,
        )
        data = PromptDataModule(str(policy / "data"), prompts_per_step=args.prompts_per_step)
        logger = MLflowLogger(experiment_name="benchmarks", run_name="trainer-throughput")
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=args.steps,
            logger=logger,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=True,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        wall = time.perf_counter() - start
        client = logger.experiment
        steps = {}
        for name in [
            "time/rollout",
            "time/reward",
            "time/update",
            "time/weight_sync",
            "time/step",
            "train/tokens_per_s",
            "train/response_length",
            "train/rollouts",
        ]:
            values = [m.value for m in client.get_metric_history(logger.run_id, name)][
                2:
            ]  # drop warm-up steps
            steps[name] = sum(values) / len(values)
        prompt_ids = [
            module.prompt_token_ids(row)
            for row in data.train_rows[: args.prompts_per_step]
            for _ in range(args.group_size)
        ]
        module.policy.eval()
        engine_tok_s, raw_tok_s = [], []
        for _ in range(args.repeats + 1):  # the first pair warms up and is dropped
            engine_tok_s.append(engine_tokens_per_s(module, prompt_ids, 48))
            raw_tok_s.append(raw_generate_tokens_per_s(module, prompt_ids, 48))
        engine, raw = statistics.median(engine_tok_s[1:]), statistics.median(raw_tok_s[1:])

    step_time = steps["time/step"]
    phases = {phase: steps[f"time/{phase}"] for phase in ["rollout", "reward", "update", "weight_sync"]}
    tokens_per_step = steps["train/response_length"] * steps["train/rollouts"]
    result = {
        "config": {
            "steps": args.steps,
            "prompts_per_step": args.prompts_per_step,
            "group_size": args.group_size,
            "max_new_tokens": 48,
            "torch_threads": torch.get_num_threads(),
        },
        "step_time_s": step_time,
        "phase_time_s": phases,
        "phase_share": {k: v / step_time for k, v in phases.items()},
        "generation_tokens_per_s": steps["train/tokens_per_s"],
        "end_to_end_tokens_per_s": tokens_per_step / step_time,
        "engine_generate_tokens_per_s": engine,
        "baseline_raw_generate_tokens_per_s": raw,
        "engine_vs_raw_generate": engine / raw,
        "engine_and_raw_tokens_per_s_per_repeat": [
            list(pair) for pair in zip(engine_tok_s[1:], raw_tok_s[1:])
        ],
        "wall_s": wall,
    }
    print(
        f"step {step_time * 1000:.0f} ms: "
        + ", ".join(f"{k} {v * 1000:.0f} ms ({v / step_time:.0%})" for k, v in phases.items())
    )
    print(
        f"generation in training {result['generation_tokens_per_s']:.0f} tok/s; engine {engine:.0f} vs raw generate "
        f"{raw:.0f} tok/s (medians of {args.repeats} alternated pairs), ratio {result['engine_vs_raw_generate']:.2f}; "
        f"end to end {result['end_to_end_tokens_per_s']:.0f} tok/s"
    )
    print(f"wrote {write_results('trainer_throughput', result)}")


if __name__ == "__main__":
    main()
