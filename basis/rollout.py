"""Rollout engines: the `RolloutEngine` protocol and its in-process Hugging Face sibling.

An engine turns prompt token ids into sampled completions with per-token log-probabilities and
finish reasons (design.md §6). Two siblings implement it:

- `HFEngine` (this module): `transformers` `generate` in the trainer's own process, sharing the
  policy's weights, so `update_weights` has nothing to push.
- `SGLangEngine` (`basis.sglang_engine`): an SGLang server or in-process `sglang.Engine` on GPUs,
  which receives the trainer's weights after every update.

The trainer calls, per step: `generate` -> `release_memory` -> (train) -> `resume_memory` ->
`update_weights(policy)`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters shared by every engine.

    Args:
        max_new_tokens: Longest response in tokens; a response that reaches it without an EOS or a stop
            string finishes with "length".
        temperature: Softmax temperature (> 0). Log-probs are returned under this temperature.
        top_p: Nucleus mass in (0, 1]; 1 disables it.
        top_k: Keep the k most likely tokens; 0 disables it.
        stop: Stop strings; the response is cut right after the first one and finishes with "stop".
        seed: Base seed of this call, for reproducibility. SGLang seeds request i with `seed + i`; the HF
            engine seeds the call, so there a prompt's sample also depends on the call's other prompts
            and on `max_batch_size` (the distribution does not).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if isinstance(self.stop, str):  # iterated, it would stop at any of its characters
            raise ValueError(
                f"stop must be a tuple of strings, got the string {self.stop!r}; write ({self.stop!r},)"
            )
        if not all(isinstance(s, str) and s for s in self.stop):  # "" is in every text: one-token responses
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass(frozen=True)
class Completion:
    """One sampled response.

    token_ids: response tokens, ending with EOS or the tokens of the stop string when finished by one.
    logprobs: the engine's log-probability of each token in `token_ids` (same length): full-vocabulary
        `log_softmax(logits / temperature)`, before top-k / top-p filtering (SGLang's convention).
    text: decoded response (special tokens skipped).
    finish_reason: "stop" (EOS or a stop string, even as the last allowed token) or "length" (hit
        `max_new_tokens` without either).
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer and the harvest pipeline need from a generator."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Sample one completion per prompt (repeat a prompt to sample a group), in order."""
        ...

    def update_weights(self, policy: torch.nn.Module) -> None:
        """Make the engine sample from `policy`'s current weights (LoRA: merged or as an adapter)."""
        ...

    def release_memory(self) -> None:
        """Free accelerator memory (KV cache, weights) while the trainer updates; no-op if colocated-free."""
        ...

    def resume_memory(self) -> None:
        """Re-acquire what `release_memory` freed before the next `update_weights`/`generate`."""
        ...


class HFEngine:
    """In-process sampling with `transformers` `generate` (KV cache, batched, stop strings).

    The engine wraps the trainer's own policy object, so weights are always in sync and
    `update_weights` only checks that it is handed the same module. Log-probs are the full-vocabulary
    `log_softmax(logits / T)` of each sampled token, before top-k / top-p: what SGLang returns and what
    the trainer recomputes, so the truncated importance weights (`tis_cap`) measure the engine/trainer
    mismatch alone, whichever engine sampled (renormalised over the top-k / top-p support, they sat
    systematically below 1 and scaled the loss down).

    Memory note: `generate` keeps the per-step logits `[B, V]` until it returns; `max_batch_size`
    bounds B. For large vocabularies at scale use the SGLang engine.

    Args:
        model: A causal LM (`PreTrainedModel` or a `peft.PeftModel`), used as is (eval mode while sampling).
        tokenizer: Its tokenizer; needs a pad or EOS token.
        max_batch_size: Most sequences sampled in one `generate` call.
        synced_gpus: Keep decoding until every rank is done (needed when parameters are sharded,
            e.g. FSDP: each forward is a collective, and ranks finish their own prompts at different
            lengths). The trainer turns it on under a sharded strategy.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, max_batch_size: int = 256, synced_gpus: bool = False
    ) -> None:
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError(
                "tokenizer has neither a pad nor an EOS token; the HF engine needs one to pad batches"
            )
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.synced_gpus = synced_gpus
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(model, tokenizer)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        completions: list[Completion] = []
        # a seeded call draws from its own stream and leaves the caller's global RNG where it was, on
        # every GPU the model spans (a model split with device_map samples on its last one)
        devices = sorted({p.device.index or 0 for p in self.model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices, enabled=params.seed is not None):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(prompts), self.max_batch_size):
                completions += self._generate_batch(
                    prompts[start : start + self.max_batch_size], params, start
                )
        return completions

    @torch.no_grad()
    def _generate_batch(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, offset: int
    ) -> list[Completion]:
        device = next(self.model.parameters()).device
        input_ids, attention_mask = left_pad(prompts, self.pad_id, device)  # [B, P], [B, P]
        self._check_token_ids(input_ids, offset)
        stopping = (
            StoppingCriteriaList([ResponseStopStrings(self.tokenizer, params.stop, input_ids.shape[1])])
            if params.stop
            else None
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with plain_generation_config(self.model):
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    do_sample=True,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k or None,
                    max_new_tokens=params.max_new_tokens,
                    stopping_criteria=stopping,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_ids,
                    return_dict_in_generate=True,
                    output_logits=True,
                    synced_gpus=self.synced_gpus,
                )
        finally:
            self.model.train(was_training)
        responses = out.sequences[:, input_ids.shape[1] :]  # [B, R]
        logits = (
            torch.stack(out.logits, dim=1).float().div_(params.temperature)
        )  # [B, R, V] before top-k / top-p
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)  # [B, R]
        return [
            self._completion(responses[i].tolist(), logprobs[i].tolist(), params) for i in range(len(prompts))
        ]

    def _check_token_ids(self, input_ids: torch.Tensor, offset: int) -> None:
        """Name a prompt holding ids the model has no embedding for (a tokenizer with added tokens saved
        beside an unresized model), instead of `nn.Embedding`'s bare IndexError."""
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = (input_ids < 0) | (input_ids >= vocab)  # [B, P]; pads are the tokenizer's own ids
        if bad.any():
            row = int(bad.any(dim=1).nonzero()[0])
            ids = input_ids[row][bad[row]].tolist()
            raise ValueError(
                f"prompt {offset + row} holds token id(s) {ids[:5]} outside the model's vocabulary [0, {vocab}): "
                "was the tokenizer extended without resizing the model's embeddings?"
            )

    def _completion(self, ids: list[int], logprobs: list[float], params: SamplingParams) -> Completion:
        """Cut a padded response at its first EOS or stop string and record why it ended. SGLang's
        order (`Req.update_finish_state`): stop string, then EOS, then length, so an EOS or a stop
        string on the last allowed token is "stop"; "length" only when neither ended the response."""
        end = len(ids)
        reason: FinishReason = "length"
        eos_at = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        if eos_at is not None:
            end, reason = eos_at + 1, "stop"
        if params.stop:
            stop_end = _stop_string_end(self.tokenizer, ids[:end], params.stop)
            if stop_end is not None:
                end, reason = stop_end, "stop"
        ids = ids[:end]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(token_ids=ids, logprobs=logprobs[:end], text=text, finish_reason=reason)

    def update_weights(self, policy: torch.nn.Module) -> None:
        if policy is not self.model:
            raise ValueError("HFEngine samples from the trainer's own module; it was handed a different one")

    def release_memory(self) -> None:
        """Nothing to release: the engine owns no memory beyond the shared policy."""

    def resume_memory(self) -> None:
        """Nothing to re-acquire (see `release_memory`)."""


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into `(ids [B, T], attention_mask [B, T])`."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, T]
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


class ResponseStopStrings(StoppingCriteria):
    """Finish a row once its response contains a stop string. transformers' own `stop_strings` also
    match a string that starts in the prompt (a chat prompt ending in "\n" and the stop "\n\n"),
    which SGLang never does. Each step decodes only the response's last tokens: enough for the
    longest stop string when every token decodes to at least one byte (byte-level and byte-fallback
    tokenizers: a CJK character can take three tokens)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int) -> None:
        self.tokenizer, self.stop, self.prompt_width = tokenizer, tuple(stop), prompt_width
        self.window = max(len(s.encode("utf-8")) for s in self.stop) + 1  # tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tail = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.window) :]  # [B, <= window]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)  # [B]


@contextmanager
def plain_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Sample with exactly the engine's settings: `generate` fills every option left unset from the
    model's own generation_config.json (repetition_penalty, min_p, no_repeat_ngram_size, ...), which
    would change the sampling distribution and its log-probs, so an empty config stands in for it
    during the call (and the model's own config is kept for exports)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers
    saved = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = config_eos if isinstance(config_eos, list) else [config_eos]
    ids = [i for i in [*ids, tokenizer.eos_token_id] if i is not None]
    return sorted(set(ids))


def _stop_string_end(tokenizer: Any, ids: list[int], stop: Sequence[str]) -> int | None:
    """Smallest token count whose decoded text contains a stop string, or None."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not any(s in text for s in stop):
        return None
    low, high = 1, len(ids)  # decode(ids[:high]) contains a stop string
    while low < high:
        mid = (low + high) // 2
        if any(s in tokenizer.decode(ids[:mid], skip_special_tokens=True) for s in stop):
            high = mid
        else:
            low = mid + 1
    return high
