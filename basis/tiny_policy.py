"""The offline tiny policy: a byte-level tokenizer and a small Qwen3 causal LM built on this machine.

Nothing can be downloaded here, so the project builds its own policy: `build_tokenizer` trains a
byte-level BPE tokenizer with `tokenizers` (one token per digit, a small vocabulary, EOS and PAD, and a
Jinja chat template that renders the arithmetic task's prompt format), `build_model` creates a randomly
initialised `Qwen3ForCausalLM` from a `Qwen3Config`, and `save_policy` writes both with
`save_pretrained`, so `AutoModelForCausalLM` / `AutoTokenizer` load the folder like any hub model.

Chat format (our choice, kept short because the RL trainer samples thousands of responses on CPU):
a user turn renders as `Q: {content}\n`, the generation prompt is `A:`, and an assistant turn is
` {content}<|endoftext|>`. So `Q: 45*2+23\nA:` is answered by ` 45*2=90 90+23=113 #### 113`.

`build_tiny_policy` (the `tiny-policy` command) writes the arithmetic task (`basis.tasks`), trains the
tokenizer on it, builds a 0.43M-parameter model (hidden 128, 2 layers), and warm-starts it with
supervised cross-entropy on the worked solutions (loss on response tokens only). The warm start is
deliberately *stopped early*, once greedy validation accuracy reaches `target_val_acc` (50 %), so the
policy is neither hopeless nor perfect and sampling at temperature 1 is still much worse than greedy:
that gap (and pass@16 above mean@4) is what RL can reinforce. Seeds differ a lot in when the
arithmetic "clicks" (measured: 400 steps for seed 0, > 700 for seed 2), hence a target rather than a
fixed step count. Then it evaluates the held-out test split (greedy exact match overall and per level,
sampled mean@4 and pass@16 per level) and writes `eval.json`. Everything is seeded; losses, validation
accuracy and test metrics go to MLflow.

Run: `make tiny-policy` or `python -m basis.tiny_policy --config configs/tiny_policy.yaml`
(`--help` lists every setting; `--sft.target_val_acc null` trains the full step budget).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from basis.metrics import mean_at_k, pass_at_k
from basis.policy_io import share_safetensors
from basis.rewards import ArithmeticVerifier
from basis.tasks import ArithmeticLevel, write_arithmetic_task

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
USER_PREFIX = "Q: "
GENERATION_PROMPT = "A:"

# Jinja template: `Q: {user}\n` per user turn, `A: {assistant}<eos>\n` per assistant turn, and `A:` as
# the generation prompt. A system message is written as a plain first line.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}" + USER_PREFIX + "{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    + GENERATION_PROMPT
    + " {{ message['content'] + eos_token + '\\n' }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + GENERATION_PROMPT + "{%- endif -%}"
)

# Fallback training text for the tokenizer when no corpus is given (the untrained test fixture): the
# task's prompt/response format plus a little prose, so common merges exist. Any byte still encodes.
DEFAULT_CORPUS: tuple[str, ...] = (
    "Q: 8+73\nA: 81",
    "Q: 45*2+23\nA: 45*2=90 90+23=113 #### 113",
    "Q: (17-9)*(4+6)\nA: 17-9=8 4+6=10 8*10=80 #### 80",
    "Q: 96-3*12-40\nA: 3*12=36 96-36=60 60-40=20 #### 20",
    "Q: What is the value of $\\frac{1}{2} + \\frac{1}{3}$?\nA: The answer is $\\boxed{\\frac{5}{6}}$.",
    "The quick brown fox jumps over the lazy dog. Let x be a real number such that x^2 = 4.",
)


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 320, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with one token per digit.

    Args:
        corpus: Training texts; default `DEFAULT_CORPUS`. Every byte is in the base alphabet, so any
            text encodes whatever the corpus was.
        vocab_size: Target vocabulary size including the 256 byte tokens and 2 special tokens.
        min_frequency: Minimum pair count for a BPE merge.

    Returns:
        A `PreTrainedTokenizerFast` with EOS `<|endoftext|>`, PAD `<|pad|>`, left padding (decoder-only
        generation) and the chat template `CHAT_TEMPLATE`.
    """
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + 2:
        raise ValueError(
            f"vocab_size must be >= {len(byte_alphabet) + 2} (bytes + EOS + PAD), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    # Digits are split before byte-level splitting, so no merge can ever join two digits.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(DEFAULT_CORPUS if corpus is None else corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 causal LM sized for `tokenizer`, seeded.

    Args:
        tokenizer: Supplies the vocabulary size and the EOS/PAD ids.
        hidden_size: Model width; must be divisible by `num_heads`.
        num_layers: Transformer blocks.
        num_heads: Query heads (head_dim = hidden_size / num_heads).
        num_kv_heads: Key/value heads (grouped-query attention); must divide `num_heads`.
        intermediate_size: Width of the SwiGLU MLP.
        max_position_embeddings: Longest prompt + response in tokens.
        seed: Seed of the weight initialisation.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.eos_token_id
    return model


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_policy(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Write model, generation config, tokenizer and chat template to `path` with `save_pretrained`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    share_safetensors(path, like=path / "config.json")
    return path


def tokenize_chat(tokenizer: PreTrainedTokenizerFast, questions: Sequence[str]) -> list[list[int]]:
    """Token ids of each question rendered with the chat template and the generation prompt."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


# --------------------------------------------------------------------------------------------------
# Supervised warm start


@dataclass(frozen=True)
class ModelConfig:
    """Tokenizer and model shape.

    Args:
        vocab_size: BPE vocabulary target (bytes + merges + EOS/PAD).
        hidden_size: Model width.
        num_layers: Transformer blocks.
        num_heads: Query heads.
        num_kv_heads: Key/value heads.
        intermediate_size: MLP width.
    """

    vocab_size: int = 320
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384


@dataclass(frozen=True)
class SFTConfig:
    """Supervised warm start on the worked solutions (loss on response tokens only).

    Args:
        steps: Optimizer steps (fixed, not a time budget, so the build is reproducible from the seed).
        batch_size: Sequences per step.
        lr: Peak AdamW learning rate (linear warmup, cosine decay to 10 %).
        warmup_steps: Linear warmup steps.
        weight_decay: AdamW weight decay on matrices (not on norms).
        grad_clip: Gradient-norm clip.
        log_every: Steps between logged losses.
        eval_every: Steps between validation accuracies (greedy, `eval_prompts` validation prompts).
        eval_prompts: Validation prompts scored at each `eval_every`.
        target_val_acc: Stop once the validation accuracy reaches this (None: run all `steps`). Seeds
            differ a lot in when the arithmetic "clicks"; the target keeps fast seeds from
            overshooting into a policy RL cannot improve.
    """

    steps: int = 700
    batch_size: int = 64
    lr: float = 1.5e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 50
    eval_prompts: int = 200
    target_val_acc: float | None = 0.5

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.target_val_acc is not None and not 0 < self.target_val_acc <= 1:
            raise ValueError(f"target_val_acc must be in (0, 1] or None, got {self.target_val_acc}")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: greedy exact match, then sampled mean@k and pass@n per level.

    Args:
        num_samples: Samples per prompt at `temperature` (pass@num_samples; mean accuracy = c / n);
            0 evaluates greedy only.
        mean_k: The k reported as mean@k (its expectation is the per-sample accuracy, estimated c / n).
        temperature: Sampling temperature.
        max_new_tokens: Longest response.
        batch_size: Sequences per `generate` call.
    """

    num_samples: int = 16
    mean_k: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 512

    def __post_init__(self) -> None:
        if self.num_samples and not 1 <= self.mean_k <= self.num_samples:
            raise ValueError(f"need 1 <= mean_k <= num_samples, got {self.mean_k}, {self.num_samples}")


class SFTBatch(NamedTuple):
    """Right-padded training batch."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], -100 on prompt and padding


def sft_examples(
    tokenizer: PreTrainedTokenizerFast, rows: Sequence[dict]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per row: the prompt through the chat template, the response
    ` {solution}` exactly as the policy must generate it after the generation prompt."""
    prompts = tokenize_chat(tokenizer, [row["prompt"] for row in rows])
    responses = tokenizer([" " + row["solution"] for row in rows], add_special_tokens=False)["input_ids"]
    return [(p, [*r, tokenizer.eos_token_id]) for p, r in zip(prompts, responses)]


def collate_sft(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> SFTBatch:
    """Right-pad prompt+response sequences; labels only on response tokens."""
    width = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    labels = torch.full((len(examples), width), -100, dtype=torch.long)  # [B, T]
    for row, (prompt, response) in enumerate(examples):
        ids = torch.tensor(prompt + response)  # [L]
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, len(prompt) : len(ids)] = ids[len(prompt) :]
    return SFTBatch(input_ids, attention_mask, labels)


def _lr_lambda(config: SFTConfig) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


def shuffled_batches(num_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of example indices, a fresh permutation per epoch (a short tail is dropped).

    Batches mix levels on purpose: batches sorted by length (one level each) would save the ~25 %
    of compute spent on padding, but measured here they slowed learning per step several-fold.
    """
    if num_examples < batch_size:
        raise ValueError(f"need at least batch_size ({batch_size}) training rows, got {num_examples}")
    while True:
        order = torch.randperm(num_examples, generator=generator).tolist()  # [N]
        yield from (order[b : b + batch_size] for b in range(0, num_examples - batch_size + 1, batch_size))


def train_sft(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    train_rows: Sequence[dict],
    config: SFTConfig,
    seed: int,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_eval: Callable[[int], float] | None = None,
) -> list[float]:
    """Supervised warm start: cross-entropy on the worked solutions, AdamW + warmup/cosine, seeded.

    `on_log(step, metrics)` receives the mean loss every `log_every` steps. `on_eval(step)` is called
    every `eval_every` steps and returns the validation accuracy; training stops early once it reaches
    `config.target_val_acc` (the warm start should leave the policy neither hopeless nor perfect).
    Returns the per-step losses (shorter than `config.steps` after an early stop).
    """
    examples = sft_examples(tokenizer, train_rows)
    generator = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    batches = shuffled_batches(len(examples), config.batch_size, generator)
    losses: list[float] = []
    model.train()
    progress = tqdm(range(1, config.steps + 1), desc="sft", unit="step")
    for step in progress:
        batch = collate_sft([examples[i] for i in next(batches)], tokenizer.pad_token_id)
        loss = model(**batch._asdict()).loss  # mean over response tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % config.log_every == 0:
            recent = sum(losses[-config.log_every :]) / config.log_every
            progress.set_postfix(loss=f"{recent:.3f}")
            if on_log is not None:
                on_log(step, {"sft/loss": recent, "sft/lr": scheduler.get_last_lr()[0]})
        if on_eval is not None and step % config.eval_every == 0 and step < config.steps:
            accuracy = on_eval(step)
            model.train()
            if config.target_val_acc is not None and accuracy >= config.target_val_acc:
                progress.write(
                    f"sft: validation accuracy {accuracy:.3f} >= target {config.target_val_acc} at step {step}"
                )
                break
    progress.close()
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    *,
    num_samples: int = 1,
    temperature: float | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 512,
) -> list[list[str]]:
    """Responses per prompt: greedy when `temperature` is None, else `num_samples` samples at it."""
    prompt_ids = tokenize_chat(tokenizer, prompts)
    per_call = max(1, batch_size // num_samples)
    model.eval()
    out: list[list[str]] = []
    for start in range(0, len(prompt_ids), per_call):
        chunk = prompt_ids[start : start + per_call]
        batch = tokenizer.pad({"input_ids": chunk}, return_tensors="pt", padding_side="left")
        sampled = {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": None}
        generated = model.generate(
            **batch,  # input_ids, attention_mask: [b, P]
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **(sampled if temperature is not None else {"do_sample": False}),
        )  # [b * num_samples, P + R]
        texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        out += [texts[i : i + num_samples] for i in range(0, len(texts), num_samples)]
    return out


def evaluate_policy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict],
    config: EvalConfig,
    seed: int = 0,
) -> dict[str, Any]:
    """Greedy exact-match accuracy (overall and per difficulty) and, if `config.num_samples` > 0,
    sampled mean@k and pass@n per difficulty (design.md §5 estimators), on rows with integer answers
    and a `difficulty` (the arithmetic task), scored by `ArithmeticVerifier`.

    mean@k is reported as c / n over all `num_samples` samples: the same expectation as the mean of k
    samples, with less variance.

    Returns `{"overall", "by_difficulty", "sampled": {"mean_at_k", "pass_at_n", "k", "n", "temperature",
    "overall_mean", "overall_pass", "by_difficulty": {level: {"mean", "pass"}}}, "num_prompts",
    "greedy_examples"}` – JSON-ready, levels as strings.
    """
    verifier = ArithmeticVerifier()
    prompts = [row["prompt"] for row in rows]
    answers = [row["answer"] for row in rows]
    levels = [int(row["difficulty"]) for row in rows]
    greedy = [
        r[0]
        for r in generate_responses(
            model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size
        )
    ]
    greedy_correct = torch.tensor(verifier(greedy, answers).rewards, dtype=torch.float64)  # [P]
    result: dict[str, Any] = {
        "overall": greedy_correct.mean().item(),
        "by_difficulty": _by_level(greedy_correct, levels),
        "num_prompts": len(rows),
        "greedy_examples": [
            {"prompt": p, "answer": a, "response": g}
            for p, a, g in list(zip(prompts, answers, greedy))[:: max(1, len(rows) // 10)]
        ],
    }
    if config.num_samples > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            samples = generate_responses(
                model,
                tokenizer,
                prompts,
                num_samples=config.num_samples,
                temperature=config.temperature,
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
            )
        flat = verifier(
            [s for group in samples for s in group], [a for a in answers for _ in range(config.num_samples)]
        )
        correct = torch.tensor(flat.rewards).view(len(rows), config.num_samples).sum(dim=1).long()  # [P]
        mean = mean_at_k(config.num_samples, correct)  # [P]
        passed = pass_at_k(config.num_samples, correct, config.num_samples)  # [P]
        result["sampled"] = {
            "k": config.mean_k,
            "n": config.num_samples,
            "temperature": config.temperature,
            "overall_mean": mean.mean().item(),
            "overall_pass": passed.mean().item(),
            "mean_at_k": _by_level(mean, levels),
            "pass_at_n": _by_level(passed, levels),
        }
    return result


def _by_level(values: torch.Tensor, levels: Sequence[int]) -> dict[str, float]:
    level_t = torch.tensor(levels)  # [P]
    return {str(level): values[level_t == level].mean().item() for level in sorted(set(levels))}


# --------------------------------------------------------------------------------------------------
# The `tiny-policy` command

# Frozen, so safe as shared defaults.
DEFAULT_MODEL = ModelConfig()
DEFAULT_SFT = SFTConfig()
DEFAULT_EVAL = EvalConfig()


def build_tiny_policy(
    out_dir: str = "artifacts/tiny-policy",
    seed: int = 0,
    n_train: int = 8000,
    n_val: int = 500,
    n_test: int = 500,
    levels: dict[int, ArithmeticLevel] | None = None,
    model: ModelConfig = DEFAULT_MODEL,
    sft: SFTConfig = DEFAULT_SFT,
    evaluation: EvalConfig = DEFAULT_EVAL,
    num_threads: int = 1,
    experiment_name: str = "tiny-policy",
) -> dict[str, Any]:
    """Build the offline tiny policy: task data, tokenizer, Qwen3 model, supervised warm start, evaluation.

    Writes to `out_dir`: the model, tokenizer and chat template (`save_pretrained`), the task splits
    under `data/` and the held-out evaluation `eval.json`. Logs params, the loss curve and accuracies to
    MLflow (`basis.tracking.mlflow_run`).

    Args:
        out_dir: Output folder (loadable with `AutoModelForCausalLM` / `AutoTokenizer`).
        seed: Seeds the task, the tokenizer corpus order, the weights, the batch order and sampling.
        n_train: Train prompts (all levels, balanced).
        n_val: Validation prompts.
        n_test: Held-out test prompts (eval.json is computed on them).
        levels: Difficulty levels of the arithmetic task; default `basis.tasks.DEFAULT_LEVELS`.
        model: Tokenizer and model shape.
        sft: Supervised warm-start settings.
        evaluation: Held-out evaluation settings.
        num_threads: torch intra-op threads (1 is fastest next to other jobs on a 2-core machine).
        experiment_name: MLflow experiment.

    Returns:
        The evaluation dict written to `eval.json`.
    """
    from basis.tracking import environment, mlflow_run

    start = time.perf_counter()
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    out = Path(out_dir)
    paths = write_arithmetic_task(out / "data", seed, n_train, n_val, n_test, levels)
    splits = {split: datasets.Dataset.from_parquet(str(path)).to_list() for split, path in paths.items()}
    corpus = [
        f"{USER_PREFIX}{row['prompt']}\n{GENERATION_PROMPT} {row['solution']}" for row in splits["train"]
    ]
    tokenizer = build_tokenizer(corpus, vocab_size=model.vocab_size)
    policy = build_model(
        tokenizer,
        hidden_size=model.hidden_size,
        num_layers=model.num_layers,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        intermediate_size=model.intermediate_size,
        seed=seed,
    )
    import mlflow

    with mlflow_run(experiment_name, run_name=f"tiny-policy-seed{seed}"):
        mlflow.log_params(
            {
                "seed": seed,
                "n_train": n_train,
                "num_parameters": num_parameters(policy),
                **{f"model.{k}": v for k, v in asdict(model).items()},
                **{f"sft.{k}": v for k, v in asdict(sft).items()},
                **{f"eval.{k}": v for k, v in asdict(evaluation).items()},
            }
        )
        val_rows = splits["validation"][: sft.eval_prompts]
        quick = EvalConfig(
            num_samples=0, max_new_tokens=evaluation.max_new_tokens, batch_size=evaluation.batch_size
        )

        def log_validation(step: int) -> float:
            val = evaluate_policy(policy, tokenizer, val_rows, quick)
            mlflow.log_metric("val/greedy_acc", val["overall"], step=step)
            return val["overall"]

        losses = train_sft(
            policy,
            tokenizer,
            splits["train"],
            sft,
            seed,
            on_log=lambda step, metrics: mlflow.log_metrics(metrics, step=step),
            on_eval=log_validation,
        )
        if len(losses) == sft.steps:  # ran to the end: validate the final policy too
            log_validation(sft.steps)
        train_s = time.perf_counter() - start
        save_policy(policy, tokenizer, out)
        result = evaluate_policy(policy, tokenizer, splits["test"], evaluation, seed=seed)
        result.update(
            num_parameters=num_parameters(policy),
            seed=seed,
            sft_steps=len(losses),
            build_seconds=round(time.perf_counter() - start, 1),
            train_seconds=round(train_s, 1),
            environment=environment(),
        )
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        metrics = {"test/greedy_acc": result["overall"]}
        metrics |= {f"test/greedy_acc/level_{k}": v for k, v in result["by_difficulty"].items()}
        if "sampled" in result:
            sampled = result["sampled"]
            metrics[f"test/mean_at_k/{sampled['k']}"] = sampled["overall_mean"]
            metrics[f"test/pass_at_k/{sampled['n']}"] = sampled["overall_pass"]
            metrics |= {
                f"test/mean_at_k/{sampled['k']}/level_{k}": v for k, v in sampled["mean_at_k"].items()
            }
            metrics |= {
                f"test/pass_at_k/{sampled['n']}/level_{k}": v for k, v in sampled["pass_at_n"].items()
            }
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(out / "eval.json"))
    print(format_eval_table(result))
    return result


def format_eval_table(result: Mapping[str, Any]) -> str:
    """The per-difficulty table (greedy, sampled mean@k, pass@n) as text."""
    sampled = result.get("sampled")
    header = "level  greedy" + (f"  mean@{sampled['k']}  pass@{sampled['n']}" if sampled else "")
    lines = [header]
    for level, greedy in result["by_difficulty"].items():
        line = f"{level:>5}  {greedy:6.3f}"
        if sampled:
            line += f"  {sampled['mean_at_k'][level]:6.3f}  {sampled['pass_at_n'][level]:7.3f}"
        lines.append(line)
    total = f"{'all':>5}  {result['overall']:6.3f}"
    if sampled:
        total += f"  {sampled['overall_mean']:6.3f}  {sampled['overall_pass']:7.3f}"
    return "\n".join([*lines, total])


def main(args: list[str] | None = None) -> None:
    """`tiny-policy --config configs/tiny_policy.yaml` (or `python -m basis.tiny_policy ...`)."""
    from jsonargparse import auto_cli

    from basis.tracking import input_errors

    with input_errors("tiny-policy"):
        auto_cli(build_tiny_policy, args=args)


if __name__ == "__main__":
    main()
