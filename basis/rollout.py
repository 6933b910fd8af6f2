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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters shared by every engine.

    Args:
        max_new_tokens: Longest response in tokens; a response that reaches it finishes with "length".
        temperature: Softmax temperature (> 0). Log-probs are returned under this temperature.
        top_p: Nucleus mass in (0, 1]; 1 disables it.
        top_k: Keep the k most likely tokens; 0 disables it.
        stop: Stop strings; the response is cut right after the first one and finishes with "stop".
        seed: Base seed of this call; engines derive per-request seeds from it for reproducibility.
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


@dataclass(frozen=True)
class Completion:
    """One sampled response.

    token_ids: response tokens, ending with EOS or the tokens of the stop string when finished by one.
    logprobs: the engine's log-probability of each token in `token_ids` (same length), under the
        sampling temperature.
    text: decoded response (special tokens skipped).
    finish_reason: "stop" (EOS or a stop string) or "length" (hit `max_new_tokens`).
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
