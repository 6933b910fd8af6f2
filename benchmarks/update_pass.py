"""The trainer's loss pass against the textbook padded pass: time and peak memory.

One PPO update's loss pass (forward with gradients, per-token log-probs and entropy at the sampling
temperature, backward of a token-mean loss) over a batch of ragged responses, done two ways, each in
its own process so that each peak memory is its own:

- padded (the baseline): micro-batches in batch order, each as wide as the whole batch, logits at every
  position, the entropy from a second log-softmax over the whole vocabulary at once (what the trainer
  did before 2026-12-02, and the common recipe);
- trainer: `PolicyTrainer.micro_batches` + `PolicyTrainer.sequence_logprobs`: rows sorted by response
  length, each micro-batch cut to its own width, the LM head on the response positions only
  (`logits_to_keep`), one log-softmax.

Both give the same log-probs (the largest difference is reported). Two models: a random tiny Qwen3 with
Qwen's 151,936-token vocabulary, where the logits are most of the memory, and the offline tiny policy
(the demo's model, 300-odd tokens of vocabulary).

    .venv/bin/python benchmarks/update_pass.py [--responses 32] [--micro-batch-size 8]

Writes `benchmarks/results/update_pass.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from basis.trainer import PolicyBatch, PolicyTrainer, Rollouts, _select
from benchmarks.results_io import write_results

QWEN_VOCAB = 151_936


def ragged_batch(module: PolicyTrainer, responses: int, seed: int) -> PolicyBatch:
    """`responses` rows: prompts of 16-64 tokens, responses log-normal around 64 tokens (4-256), as
    reasoning RL sees them: most short, a few long."""
    from basis.data import PromptRow
    from basis.rollout import Completion

    generator = torch.Generator().manual_seed(seed)
    vocab = module.policy.config.vocab_size
    prompt_lengths = torch.randint(16, 65, (responses,), generator=generator)
    response_lengths = (torch.randn(responses, generator=generator) * 0.8 + 4.16).exp().clamp(4, 256).long()
    prompt_ids = [torch.randint(3, vocab, (int(n),), generator=generator).tolist() for n in prompt_lengths]
    completions = []
    for n in response_lengths.tolist():
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        completions.append(Completion(ids, [0.0] * n, "", "length"))
    prompts = [PromptRow(f"p{i}", "?", "0", "bench", None) for i in range(responses)]
    index = torch.arange(responses)
    return module.policy_batch(Rollouts(prompts, prompt_ids, completions, index, torch.zeros(responses), 0))


def padded_logprobs(module: PolicyTrainer, batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline pass over one micro-batch: full width, logits at every position, entropy apart."""
    mask = batch.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = module.policy(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions).logits
    logits = logits[:, batch.prompt_width - 1 : -1].float() / module.hparams.temperature  # [n, R, V]
    targets = batch.input_ids[:, batch.prompt_width :]
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    log_q = torch.log_softmax(logits.detach(), -1).clamp(min=torch.finfo(logits.dtype).min)
    return logprobs, -(log_q.exp() * log_q).sum(-1)


def loss_pass(module: PolicyTrainer, batch: PolicyBatch, variant: str) -> torch.Tensor:
    """One loss pass with backward, micro-batched as `variant` does; returns the log-probs `[N, R]`."""
    rows = torch.arange(batch.input_ids.shape[0])
    tokens = batch.response_mask.sum()
    out = torch.zeros(batch.response_mask.shape)
    module.policy.zero_grad(set_to_none=True)
    if variant == "padded":
        micros = list(rows.split(module.hparams.micro_batch_size))
    else:
        micros = module.micro_batches(batch, rows)
    for micro in micros:
        sub = _select(batch, micro)
        if variant == "padded":
            logprobs, entropy = padded_logprobs(module, sub)
        else:
            logprobs, entropy = module.sequence_logprobs(sub, with_grad=True, with_entropy=True)
        mask = sub.response_mask
        loss = -(logprobs * mask).sum() / tokens - 1e-3 * (entropy * mask).sum() / tokens
        loss.backward()
        out[micro] = logprobs.detach().masked_fill(~mask, 0.0)
    return out


def current_rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    module = PolicyTrainer(
        args.model, micro_batch_size=args.micro_batch_size, run_dir=f"{args.out}.run", temperature=1.0
    )
    module.policy.eval()
    batch = ragged_batch(module, args.responses, seed=0)
    before = current_rss_mb()
    times = []
    for _ in range(args.repeats + 1):  # the first pass warms up and is dropped
        start = time.perf_counter()
        logprobs = loss_pass(module, batch, args.worker)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    torch.save(logprobs, f"{args.out}.pt")
    lengths = batch.response_mask.sum(-1)
    Path(f"{args.out}.json").write_text(
        json.dumps(
            {
                "seconds": statistics.median(times[1:]),
                "peak_extra_rss_mb": peak - before,
                "vocab_size": module.policy.config.vocab_size,
                "batch_width": batch.input_ids.shape[1],
                "response_tokens": int(lengths.sum()),
                "response_length_min_median_max": [
                    int(lengths.min()),
                    float(lengths.median()),
                    int(lengths.max()),
                ],
            }
        )
    )


def qwen_vocab_model(folder: Path) -> Path:
    """A random 2-layer Qwen3 with Qwen's vocabulary and the offline tokenizer (ids past it are unused)."""
    from basis.tiny_policy import build_model, build_tokenizer, save_policy

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=128, num_layers=2, intermediate_size=256, seed=0)
    model.resize_token_embeddings(QWEN_VOCAB)
    return save_policy(model, tokenizer, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="artifacts/tiny-policy")
    parser.add_argument("--responses", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["padded", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not (Path(args.policy) / "config.json").exists():
        sys.exit(f"{args.policy} is not a built policy; run `make tiny-policy` first")

    result: dict = {
        "config": {
            "responses": args.responses,
            "micro_batch_size": args.micro_batch_size,
            "repeats": args.repeats,
            "torch_threads": 1,
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = {"qwen_vocab": qwen_vocab_model(Path(tmp) / "qwen-vocab"), "tiny_policy": Path(args.policy)}
        for name, model in models.items():
            figures, logprobs = {}, {}
            for variant in ("padded", "trainer"):
                out = f"{tmp}/{name}-{variant}"
                sizes = ["--responses", str(args.responses), "--micro-batch-size", str(args.micro_batch_size)]
                worker_args = ["--worker", variant, "--model", str(model), "--out", out, *sizes]
                subprocess.run(
                    [sys.executable, __file__, *worker_args, "--repeats", str(args.repeats)], check=True
                )
                figures[variant] = json.loads(Path(f"{out}.json").read_text())
                logprobs[variant] = torch.load(f"{out}.pt", weights_only=True)
            padded, ours = figures["padded"], figures["trainer"]
            result[name] = {
                "padded": padded,
                "trainer": ours,
                "time_ratio": ours["seconds"] / padded["seconds"],
                "peak_memory_ratio": ours["peak_extra_rss_mb"] / padded["peak_extra_rss_mb"],
                "max_abs_logprob_diff": float((logprobs["trainer"] - logprobs["padded"]).abs().max()),
            }
            print(
                f"{name} (vocabulary {padded['vocab_size']:,}): padded {padded['seconds']:.2f} s, "
                f"{padded['peak_extra_rss_mb']:.0f} MB peak; trainer {ours['seconds']:.2f} s, "
                f"{ours['peak_extra_rss_mb']:.0f} MB peak; time x{result[name]['time_ratio']:.2f}, "
                f"memory x{result[name]['peak_memory_ratio']:.2f}; "
                f"largest log-prob difference {result[name]['max_abs_logprob_diff']:.1e}"
            )
    write_results("update_pass", result)


if __name__ == "__main__":
    main()
