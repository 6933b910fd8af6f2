"""Policy-gradient losses, KL penalties and rollout/trainer mismatch corrections (pure tensor math).

What it is: the token-level pieces of the policy update, as functions of `[B, L]` tensors (B responses,
L response tokens, `response_mask` marking valid tokens). Conventions follow verl's `core_algos.py` as
summarised in `../shared/docs/design.md` §5:
- PPO-clip per token `max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))` with verl's dual clip for
  A < 0 at `clip_ratio_c` (3.0); DAPO's clip-higher is `eps_high = 0.28`.
- Aggregation `token-mean` (DAPO), `seq-mean-token-sum` (Dr. GRPO), `seq-mean-token-mean` (GRPO);
  explicit `num_tokens` / `num_sequences` denominators make micro-batch losses sum to the mini-batch
  loss (gradient accumulation without re-weighting).
- KL to the reference with d = logp - logq: k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 (verl's
  `low_var_kl`, clamped to [-10, 10]).
- Engine/trainer log-prob mismatch: truncated importance sampling `min(exp(old - rollout), cap)`.

Deviations from verl: an empty mask gives a zero loss instead of dividing by 1e-8-padded zero, and the
clip fractions are split into low / high / dual sides for logging.

How to run: import and call, e.g. `policy_loss(logp, old_logp, advantages, mask).loss.backward()`;
tests: `.venv/bin/pytest tests/basis/test_losses.py`.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

__all__ = [
    "AGG_MODES",
    "PolicyLossOutput",
    "aggregate_loss",
    "entropy_from_log_probs",
    "entropy_from_logits",
    "kl_penalty",
    "logprob_mismatch",
    "policy_loss",
    "token_logprobs",
    "truncated_is_weights",
]

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
AGG_MODES: tuple[str, ...] = get_args(AggMode)
LOG_RATIO_CLAMP = 20.0  # verl clamps log-ratios to [-20, 20] before exp
K3_CLAMP = 10.0  # verl's low_var_kl clamps k3 to [-10, 10]


class PolicyLossOutput(NamedTuple):
    """Result of `policy_loss`; every field is a scalar tensor, all but `loss` detached."""

    loss: Tensor  # [] aggregated clipped surrogate (with grad)
    clip_frac: Tensor  # [] fraction of valid tokens where the PPO clip is active
    clip_frac_low: Tensor  # [] ... clipped at 1 - eps_low (A < 0, rho too small)
    clip_frac_high: Tensor  # [] ... clipped at 1 + eps_high (A > 0, rho too large)
    dual_clip_frac: Tensor  # [] fraction of valid tokens bounded by the dual clip (A < 0)
    approx_kl: Tensor  # [] mean (old_logp - logp) over valid tokens (verl's ppo_kl)


def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    """Validate a `[B, L]` mask of bools or 0/1 values shaped like `like`; return it as floats."""
    if mask.shape != like.shape:
        raise ValueError(
            f"response_mask must have the shape of the log-probs {tuple(like.shape)}; got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("response_mask must be bool or contain only 0 and 1")
    return mask.to(like.dtype if like.is_floating_point() else torch.float32)  # [B, L]


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.dim() != 2:
        raise ValueError(f"{name_a} must be [B, L]; got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got {tuple(a.shape)} vs {tuple(b.shape)}"
        )


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid tokens; 0 for an empty mask."""
    return (values * mask).sum() / mask.sum().clamp(min=1)  # []


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> Tensor:
    """Reduce a per-token loss `[B, L]` to a scalar (verl's `agg_loss` modes).

    - `token-mean`: `sum(loss * mask) / num_tokens` (default: valid tokens in this batch).
    - `seq-mean-token-sum`: per-sequence token sums, `/ num_sequences` (default: B).
    - `seq-mean-token-mean`: per-sequence token means (0 for a sequence without valid tokens),
      `/ num_sequences` (default: B).

    Pass the mini-batch's `num_tokens` / `num_sequences` when the mini-batch is split into
    micro-batches: the micro-batch losses then sum to the mini-batch loss. An empty mask gives 0.
    """
    mask_f = _float_mask(mask, loss_mat)  # [B, L]
    for name, value in (("num_tokens", num_tokens), ("num_sequences", num_sequences)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 when given; got {value}")
    masked = loss_mat * mask_f  # [B, L]
    if mode == "token-mean":
        denominator = mask_f.sum().clamp(min=1) if num_tokens is None else num_tokens
        return masked.sum() / denominator  # []
    sequences = loss_mat.shape[0] if num_sequences is None else num_sequences
    if mode == "seq-mean-token-sum":
        return masked.sum(dim=-1).sum() / sequences  # []
    if mode == "seq-mean-token-mean":
        per_sequence = masked.sum(dim=-1) / mask_f.sum(dim=-1).clamp(min=1)  # [B]
        return per_sequence.sum() / sequences  # []
    raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}; got {mode!r}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    agg: AggMode = "token-mean",
    is_weights: Tensor | None = None,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> PolicyLossOutput:
    """PPO-clip surrogate with verl's dual clip, optional truncated-IS weights and loss aggregation.

    Per token, with `rho = exp(logp - old_logp)` (log-ratio clamped to [-20, 20] like verl):
    `l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))`, and for A < 0 additionally
    `l = min(l, -A clip_ratio_c)` (dual clip). `is_weights` (e.g. `truncated_is_weights`) multiply
    the per-token loss as constants. Then `aggregate_loss(l, mask, agg, num_tokens, num_sequences)`.

    Args:
        logprobs: Current policy log-probs of the sampled tokens `[B, L]` (with grad).
        old_logprobs: Log-probs of the policy that produced the batch `[B, L]`.
        advantages: Per-response `[B]` or per-token `[B, L]` advantages.
        response_mask: Valid response tokens `[B, L]`, bool or 0/1.
        eps_low: Lower clip range (rho >= 1 - eps_low), in [0, 1).
        eps_high: Upper clip range (rho <= 1 + eps_high), >= 0; DAPO clip-higher uses 0.28.
        clip_ratio_c: Dual-clip bound for A < 0 (verl requires > 1).
        agg: One of `AGG_MODES`.
        is_weights: Optional per-token importance weights `[B, L]` (no grad flows through them).
        num_tokens: Token denominator override for `token-mean` (see `aggregate_loss`).
        num_sequences: Sequence denominator override for the `seq-mean-*` modes.
    """
    _check_pair("logprobs", logprobs, "old_logprobs", old_logprobs)
    mask = _float_mask(response_mask, logprobs)  # [B, L]
    if not 0 <= eps_low < 1:
        raise ValueError(f"eps_low must lie in [0, 1); got {eps_low}")
    if eps_high < 0:
        raise ValueError(f"eps_high must be >= 0; got {eps_high}")
    if clip_ratio_c <= 1:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip bound); got {clip_ratio_c}")
    if advantages.shape == logprobs.shape[:1]:
        advantages = advantages.unsqueeze(-1)  # [B, 1]
    elif advantages.shape != logprobs.shape:
        raise ValueError(
            f"advantages must be [B] or [B, L] with B, L = {tuple(logprobs.shape)}; got {tuple(advantages.shape)}"
        )
    advantages = advantages.detach().to(logprobs.dtype)  # [B, 1] or [B, L]

    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, L]
    ratio = torch.exp(log_ratio)  # [B, L]
    unclipped = -advantages * ratio  # [B, L]
    clipped = -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)  # [B, L]
    ppo = torch.maximum(unclipped, clipped)  # [B, L]
    dual_bound = -advantages * clip_ratio_c  # [B, 1] or [B, L]
    negative = (advantages < 0).expand_as(ppo)  # [B, L]
    per_token = torch.where(negative, torch.minimum(ppo, dual_bound), ppo)  # [B, L]
    if is_weights is not None:
        if is_weights.shape != logprobs.shape:
            raise ValueError(
                f"is_weights must have the shape of the log-probs {tuple(logprobs.shape)}; "
                f"got {tuple(is_weights.shape)}"
            )
        per_token = per_token * is_weights.detach()  # [B, L]
    loss = aggregate_loss(per_token, mask, agg, num_tokens=num_tokens, num_sequences=num_sequences)  # []

    with torch.no_grad():
        clip_active = (clipped > unclipped).to(mask.dtype)  # [B, L]
        low = (ratio < 1 - eps_low).to(mask.dtype)  # [B, L]
        dual = (negative & (ppo > dual_bound)).to(mask.dtype)  # [B, L]
        return PolicyLossOutput(
            loss=loss,
            clip_frac=_masked_mean(clip_active, mask),
            clip_frac_low=_masked_mean(clip_active * low, mask),
            clip_frac_high=_masked_mean(clip_active * (1 - low), mask),
            dual_clip_frac=_masked_mean(dual, mask),
            approx_kl=_masked_mean(-log_ratio, mask),
        )


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate to the reference policy, `[B, L]` (unmasked), with d = logp - logq.

    `k1 = d`; `k2 = d^2 / 2`; `k3 = exp(-d) + d - 1` (Schulman's unbiased, low-variance estimator, verl's
    `low_var_kl`: d clamped to [-20, 20] before exp, the result clamped to [-10, 10]). The clamp makes k3
    biased low where it binds (q / p > ~13.6 or < ~1.7e-5), like verl: a bounded penalty by choice.
    """
    _check_pair("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    d = logprobs - ref_logprobs  # [B, L]
    if kind == "k1":
        return d  # [B, L]
    if kind == "k2":
        return 0.5 * d**2  # [B, L]
    if kind == "k3":
        d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, L]
        return (torch.exp(-d) + d - 1).clamp(-K3_CLAMP, K3_CLAMP)  # [B, L]
    raise ValueError(f"kind must be one of 'k1', 'k2', 'k3'; got {kind!r}")


def truncated_is_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float = 2.0
) -> Tensor:
    """Truncated importance weights `min(exp(old - rollout), cap)` per token, 0 outside the mask, `[B, L]`.

    Corrects for the rollout engine's log-probs differing from the trainer's (design.md §5). Computed
    as `exp(min(old - rollout, log cap))` so it cannot overflow; the result carries no gradient.
    """
    _check_pair("old_logprobs", old_logprobs, "rollout_logprobs", rollout_logprobs)
    mask_f = _float_mask(mask, old_logprobs)  # [B, L]
    if not cap > 0:
        raise ValueError(f"cap must be > 0; got {cap}")
    log_ratio = (old_logprobs - rollout_logprobs).detach().clamp(max=math.log(cap))  # [B, L]
    return torch.exp(log_ratio) * mask_f  # [B, L]


def logprob_mismatch(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Mean |old - rollout| log-prob over valid tokens, a detached scalar for logging (0 if none valid)."""
    _check_pair("old_logprobs", old_logprobs, "rollout_logprobs", rollout_logprobs)
    mask_f = _float_mask(mask, old_logprobs)  # [B, L]
    return _masked_mean((old_logprobs - rollout_logprobs).detach().abs(), mask_f)  # []


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last axis, `[B, L, V] -> [B, L]`, stable for large or -inf logits.

    `H = -sum p log p` with `log p = log_softmax(logits)`; like `torch.distributions.Categorical`, log p
    is clamped to the dtype's most negative finite value so -inf logits (masked vocabulary entries)
    contribute 0 instead of `0 * -inf = nan`, in the value and in the gradient.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) axis; got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point; got dtype {logits.dtype}")
    return entropy_from_log_probs(torch.log_softmax(logits, dim=-1))


def entropy_from_log_probs(log_p: Tensor, chunk_elements: int = 2**24) -> Tensor:
    """Entropy `[B, L]` of normalised log-probabilities `[B, L, V]`; `entropy_from_logits` after the
    log-softmax, for a caller that has computed it already (the trainer's loss pass).

    Computed over about `chunk_elements` entries at a time, so its temporaries stay small next to a
    `[B, L, V]` input with a 150k-token vocabulary (three full-size copies otherwise)."""
    vocab = log_p.shape[-1]
    flat = log_p.reshape(-1, vocab)  # [B * L, V]
    pieces = []
    for chunk in torch.split(flat, max(1, chunk_elements // vocab)):
        chunk = chunk.clamp(min=torch.finfo(chunk.dtype).min)  # [c, V]
        pieces.append(-(chunk.exp() * chunk).sum(dim=-1))  # [c]
    return torch.cat(pieces).reshape(log_p.shape[:-1]) if pieces else flat.new_zeros(log_p.shape[:-1])


def token_logprobs(
    logits: Tensor, targets: Tensor, with_entropy: bool = False, chunk_elements: int = 2**24
) -> tuple[Tensor, Tensor | None]:
    """`log_softmax(logits).gather(targets)` `[B, L]` (with gradient) and, if asked, the entropy
    `[B, L]` (without), from logits `[B, L, V]` and target ids `[B, L]`.

    The same numbers as the two-line recipe, in less memory: positions go through the softmax about
    `chunk_elements` entries at a time, and the backward pass recomputes each chunk's softmax, so only
    the logits and their gradient are ever full-size. The recipe keeps a full-size log-softmax for the
    backward pass and its gather scatters into another full-size tensor: three where this needs two,
    each `[B, L, V]` (1.2 GB for 8 x 256 positions at a 150k-token vocabulary)."""
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} plus a vocabulary axis"
        )
    rows = max(1, chunk_elements // max(1, logits.shape[-1]))
    logprobs, entropy = _TokenLogProbs.apply(logits, targets, rows, with_entropy)  # type: ignore[no-untyped-call]
    return logprobs, entropy if with_entropy else None


class _TokenLogProbs(torch.autograd.Function):
    """`token_logprobs`' chunked forward and backward; d logp_t / d logits = onehot(t) - softmax."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, targets: Tensor, rows: int, with_entropy: bool
    ) -> tuple[Tensor, Tensor]:
        flat, index = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)  # [N, V], [N, 1]
        picked = flat.new_empty(flat.shape[0])  # [N]
        entropy = flat.new_zeros(flat.shape[0] if with_entropy else 0)  # [N] or empty
        for start in range(0, flat.shape[0], rows):
            log_p = torch.log_softmax(flat[start : start + rows], dim=-1)  # [c, V]
            picked[start : start + rows] = log_p.gather(-1, index[start : start + rows]).squeeze(-1)
            if with_entropy:
                entropy[start : start + rows] = entropy_from_log_probs(log_p)
        ctx.save_for_backward(logits, targets)
        ctx.rows = rows
        entropy = entropy.view(targets.shape) if with_entropy else entropy
        ctx.mark_non_differentiable(entropy)  # a diagnostic: no gradient flows through it
        return picked.view(targets.shape), entropy

    @staticmethod
    def backward(ctx: Any, grad_picked: Tensor, _grad_entropy: Tensor) -> tuple[Tensor, None, None, None]:
        logits, targets = ctx.saved_tensors
        flat, index = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)  # [N, V], [N, 1]
        grad = grad_picked.reshape(-1, 1).to(flat.dtype)  # [N, 1]
        grad_logits = torch.empty_like(flat)  # [N, V]
        rows = ctx.rows
        for start in range(0, flat.shape[0], rows):
            chunk = slice(start, start + rows)
            log_p = torch.log_softmax(flat[chunk], dim=-1)  # [c, V], recomputed
            onehot = torch.zeros_like(log_p).scatter_(-1, index[chunk], grad[chunk])  # [c, V] g at the target
            # g onehot - softmax g, by autograd's own log-softmax backward kernel: bit for bit the
            # gradient of the two-line recipe, so a run's trajectory does not depend on the chunking
            grad_logits[chunk] = torch._log_softmax_backward_data(onehot, log_p, -1, flat.dtype)
        return grad_logits.view(logits.shape), None, None, None
