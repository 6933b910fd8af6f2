"""Advantage estimators, the V0.5 prior-fused baseline and the OSLA rollout budget (pure tensor math).

What it is: every estimator maps per-response outcome rewards and group ids to per-response advantages
with one shared signature, `fn(rewards [N], index [N], *, <keyword options>) -> advantages [N]`, and
sits in one plain dict, `ESTIMATORS`; the trainer computes advantages with `compute_advantages(name,
rewards, index, **options)` whatever the name (for BASIS it also calls `basis_baseline` to log the
baseline it used). Formulas follow `../shared/docs/design.md` §4 (V0.5, OSLA, BASIS) and §5 (the verl / TRL /
OpenRLHF conventions for GRPO, Dr. GRPO, RLOO, REINFORCE++).

Rewards are outcome rewards, one scalar per response; a group is all responses sharing an `index`
value (groups need not be contiguous or sorted). V0.5 and BASIS work on the {-1, +1} reward scale and
take the prior `V = 2 * p_V0 - 1` on the same scale.

Where it deviates from, or fills gaps in, the source methods (all documented per function):
- Groups of size 1 follow verl where verl defines them (GRPO / Dr. GRPO / REINFORCE++-baseline: mean 0,
  std 1); RLOO gives 0 (no leave-one-out baseline exists; verl returns r unchanged) and the median
  baseline gives 0 (the median of one reward is itself).
- V0.5 advantage scale: the paper's text is not available; our choice is the Bernoulli std implied by
  the baseline, `s = sqrt(max(eps, 1 - b^2))` (design.md §4).
- `basis` is our reconstruction of arXiv 2605.27293 from its abstract (design.md §4), not the authors'
  code: one logit shift per prompt, fitted leave-one-group-out on a dense grid.
- OSLA: `pad_to` and `min_active_frac` are our choices (the paper leaves them open).

How to run: import and call, e.g.
    `compute_advantages("grpo", torch.tensor([1.0, 0, 0, 0]), torch.zeros(4, dtype=torch.long))`;
tests: `.venv/bin/pytest tests/basis/test_advantages.py`; baseline MSE benchmark:
`.venv/bin/python benchmarks/baseline_mse.py`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "ESTIMATORS",
    "EstimatorSpec",
    "basis",
    "basis_baseline",
    "compute_advantages",
    "dr_grpo",
    "dynamic_sampling_mask",
    "fused_baseline",
    "grpo",
    "k_max_for",
    "mc_grpo",
    "osla_extra_rollouts",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "rloo",
    "v05",
]

Scale = Literal["bernoulli", "group_std", "none"]

WHITEN_EPS = 1e-8  # verl masked_whiten: (x - mean) * rsqrt(var + 1e-8)
PROB_CLAMP = 1e-4  # BASIS: success probabilities are clamped to [1e-4, 1 - 1e-4]
SHIFT_MAX = 20.0  # BASIS grid half-width in logits; moves any clamped prior (|logit| <= 9.2) to either clamp
SHIFT_STEP = 0.05  # BASIS grid step in logits, refined by one parabolic interpolation step


# ---------------------------------------------------------------------------------------------------
# Validation and group helpers
# ---------------------------------------------------------------------------------------------------


def _check_rewards_index(rewards: Tensor, index: Tensor) -> None:
    if rewards.dim() != 1 or index.dim() != 1:
        raise ValueError(
            f"rewards and index must be 1-D [N]; got rewards {tuple(rewards.shape)}, index {tuple(index.shape)}"
        )
    if rewards.shape != index.shape:
        raise ValueError(
            f"rewards and index must have the same shape; got {tuple(rewards.shape)} vs {tuple(index.shape)}"
        )
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: need at least one response")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor; got dtype {rewards.dtype}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"index must be an integer tensor (group id per response); got dtype {index.dtype}")
    _check_finite("rewards", rewards)


def _check_finite(name: str, values: Tensor) -> None:
    bad = ~torch.isfinite(values)  # [N]
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite; found {values[position].item()} at position {position}")


def _check_range(name: str, values: Tensor, low: float, high: float) -> None:
    outside = (values < low) | (values > high)  # [N]
    if bool(outside.any()):
        position = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"{name} must lie in [{low}, {high}]; found {values[position].item()} at position {position}"
        )


def _check_per_response(name: str, values: Tensor, rewards: Tensor) -> None:
    if values.shape != rewards.shape:
        raise ValueError(
            f"{name} must have one entry per response, shape {tuple(rewards.shape)}; got {tuple(values.shape)}"
        )


def _groups(index: Tensor) -> tuple[Tensor, int]:
    """Dense group ids: `inverse [N]` in [0, G) ordered by index value, and the number of groups G."""
    unique, inverse = torch.unique(index, return_inverse=True)  # [G], [N]
    return inverse, int(unique.numel())


def _group_sum(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)  # [G]
    return out.index_add_(0, inverse, values)  # [G]


def _group_stats(rewards: Tensor, inverse: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group size, mean and Bessel-corrected variance (variance 0 for singletons), all `[G]`."""
    size = torch.bincount(inverse, minlength=num_groups).to(rewards.dtype)  # [G]
    mean = _group_sum(rewards, inverse, num_groups) / size  # [G]
    squares = _group_sum((rewards - mean[inverse]) ** 2, inverse, num_groups)  # [G]
    var = squares / (size - 1).clamp(min=1)  # [G]
    return size, mean, var


def _token_whiten(values: Tensor, token_counts: Tensor | None) -> Tensor:
    """verl's `masked_whiten` over all valid tokens, computed on `[N]` with length weights.

    Every token of a response carries the response's value, so the token-level masked mean and
    Bessel-corrected masked variance are length-weighted statistics of `values`. `token_counts=None`
    counts every response as one token. Responses with zero tokens get 0 (verl multiplies by the mask).
    """
    if token_counts is None:
        weights = torch.ones_like(values)  # [N]
    else:
        _check_per_response("token_counts", token_counts, values)
        if token_counts.is_floating_point() or token_counts.dtype == torch.bool:
            raise ValueError(f"token_counts must be an integer tensor; got dtype {token_counts.dtype}")
        if bool((token_counts < 0).any()):
            raise ValueError("token_counts must be >= 0 (response lengths in valid tokens)")
        weights = token_counts.to(values.dtype)  # [N]
    total = weights.sum()  # []
    if float(total) < 2:
        raise ValueError(
            f"whitening needs at least 2 valid tokens in the batch (Bessel-corrected variance); got {float(total):g}"
        )
    mean = (weights * values).sum() / total  # []
    var = (weights * (values - mean) ** 2).sum() / (total - 1)  # []
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)  # [N]
    return torch.where(weights > 0, whitened, torch.zeros_like(whitened))  # [N]


def _check_prior(prior: Tensor, rewards: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """Validate a per-response prior on the ±1 scale, constant within each group; return it per group."""
    _check_per_response("prior", prior, rewards)
    if not prior.is_floating_point():
        raise ValueError(f"prior must be a floating tensor on the ±1 scale; got dtype {prior.dtype}")
    _check_finite("prior", prior)
    _check_range("prior", prior, -1.0, 1.0)
    prior = prior.to(rewards.dtype)  # [N]
    high = torch.full((num_groups,), -math.inf, dtype=prior.dtype, device=prior.device)  # [G]
    high = high.scatter_reduce(0, inverse, prior, reduce="amax")  # [G]
    low = torch.full((num_groups,), math.inf, dtype=prior.dtype, device=prior.device)  # [G]
    low = low.scatter_reduce(0, inverse, prior, reduce="amin")  # [G]
    varies = high != low  # [G]
    if bool(varies.any()):
        group = int(varies.nonzero()[0, 0])
        position = int((inverse == group).nonzero()[0, 0])
        raise ValueError(
            "prior must be constant within a group (one prior per prompt); the group of response "
            f"{position} has values between {low[group].item()} and {high[group].item()}"
        )
    return high  # [G]


def _scale(scale: str, baseline: Tensor, var: Tensor, size: Tensor, eps: float) -> Tensor:  # all [G] -> [G]
    if eps <= 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    if scale == "bernoulli":
        return torch.sqrt((1 - baseline**2).clamp(min=eps))  # [G]
    if scale == "group_std":
        var = torch.where(size > 1, var, torch.ones_like(var))  # [G]; singleton: std 1 (verl GRPO)
        return torch.sqrt(var.clamp(min=eps))  # [G]
    if scale == "none":
        return torch.ones_like(baseline)  # [G]
    raise ValueError(f"scale must be one of 'bernoulli', 'group_std', 'none'; got {scale!r}")


# ---------------------------------------------------------------------------------------------------
# V0.5 fused baseline and OSLA budget (design.md §4)
# ---------------------------------------------------------------------------------------------------


def fused_baseline(reward_mean: Tensor, k: Tensor, prior: Tensor) -> tuple[Tensor, Tensor]:
    """V0.5 prior-fused baseline, elementwise on `[P]` prompts (design.md §4).

    `sigma2 = 1/k`, `delta2 = max(0, (r̄ - V)^2 - 1/k)`, `w = delta2 / (delta2 + sigma2)`,
    `b = w r̄ + (1 - w) V`. The truncation is a test: when `(r̄ - V)^2 <= 1/k` the prior is used alone
    (w = 0). Always `|b - r̄| <= 1/sqrt(k)`, hence `|E[b] - mu| <= 1/sqrt(k)` for any prior.

    Args:
        reward_mean: Mean reward r̄ of each prompt's rollouts on the ±1 scale, `[P]`.
        k: Number of rollouts behind each mean (>= 1; design.md requires k >= 4 for training), `[P]`.
        prior: Prior V on the ±1 scale, `[P]`.

    Returns:
        `(baseline [P], weight on the empirical mean [P])`, in `reward_mean`'s dtype.
    """
    if reward_mean.shape != k.shape or reward_mean.shape != prior.shape:
        raise ValueError(
            "reward_mean, k and prior must have the same shape; got "
            f"{tuple(reward_mean.shape)}, {tuple(k.shape)}, {tuple(prior.shape)}"
        )
    if reward_mean.numel() == 0:
        raise ValueError("reward_mean is empty: need at least one prompt")
    if not reward_mean.is_floating_point():
        raise ValueError(f"reward_mean must be a floating tensor; got dtype {reward_mean.dtype}")
    for name, values in (("reward_mean", reward_mean), ("k", k), ("prior", prior)):
        _check_finite(name, values.flatten())
    _check_range("reward_mean", reward_mean.flatten(), -1.0, 1.0)
    _check_range("prior", prior.flatten(), -1.0, 1.0)
    if bool((k < 1).any()):
        raise ValueError(f"k must be >= 1 rollout per prompt; got min {k.min().item()}")
    k = k.to(reward_mean.dtype)  # [P]
    prior = prior.to(reward_mean.dtype)  # [P]
    sigma2 = 1.0 / k  # [P]
    delta2 = ((reward_mean - prior) ** 2 - sigma2).clamp(min=0.0)  # [P]
    weight = delta2 / (delta2 + sigma2)  # [P]
    baseline = weight * reward_mean + (1 - weight) * prior  # [P]
    return baseline, weight


def k_max_for(c: float) -> int:
    """OSLA's largest useful group size `floor(1/sqrt(c))`; c = 0.0039 -> 16 (design.md §4)."""
    if not 0 < c <= 1:
        raise ValueError(f"c (cost per rollout) must lie in (0, 1]; got {c}")
    return math.floor(1.0 / math.sqrt(c) + 1e-9)  # tolerance: c = 1/256 must give exactly 16


def osla_extra_rollouts(
    counts: Tensor,
    reward_means: Tensor,
    priors: Tensor,
    *,
    c: float = 0.0039,
    k_init: int = 4,
    pad_to: int = 1,
    min_active_frac: float = 0.0,
) -> Tensor:
    """How many more rollouts each prompt needs this round under the OSLA budget (design.md §4).

    Paper defaults: k_init = 4, c = 0.0039 -> k_max = floor(1/sqrt(c)) = 16. Per prompt with k rollouts:
    - k < k_init: top up to k_init (`k_init - k` more); the fused baseline needs k >= 4.
    - otherwise `delta2 = max(0, (r̄ - V)^2 - 1/k)`; delta2 == 0 -> stop (the prior passes the test);
      else `N* = k_max - 1/delta2`, `target = min(ceil(N*), k_max)`, extra = `max(0, target - k)`.
    A round jumps every active prompt to its current target; the caller samples, re-estimates r̄ and
    calls again until the result is all zeros.

    Our choices (the paper leaves them open):
    - `pad_to`: the round's total is padded up to a multiple of `pad_to` (paper: a multiple of the
      engine's parallel width) by adding one rollout at a time to the active prompt with the largest
      remaining gap `k_max - (k + extra)` (ties: lower position), never past k_max; if that cannot
      reach a multiple, it pads as far as it can. A round with no active prompt is not padded.
    - `min_active_frac`: if fewer than this fraction of prompts would get extra rollouts, the round is
      skipped (all zeros). A round that tops some prompt up to k_init is never skipped.

    Args:
        counts: Rollouts drawn so far per prompt, integer `[P]`, >= 0.
        reward_means: Mean ±1 reward per prompt `[P]`; ignored (may be NaN) where counts == 0.
        priors: Prior V per prompt on the ±1 scale `[P]`.
        c: Cost per rollout in the risk R(k) = MSE(k) + c k; sets k_max = floor(1/sqrt(c)).
        k_init: Rollouts every prompt gets before the prior test (paper: 4).
        pad_to: Pad the round's total rollouts to a multiple of this (1 = no padding).
        min_active_frac: Skip the round when fewer than this fraction of prompts are active.

    Returns:
        Extra rollouts per prompt for this round, int64 `[P]`.
    """
    if counts.dim() != 1 or counts.shape != reward_means.shape or counts.shape != priors.shape:
        raise ValueError(
            "counts, reward_means and priors must be 1-D with the same shape; got "
            f"{tuple(counts.shape)}, {tuple(reward_means.shape)}, {tuple(priors.shape)}"
        )
    if counts.numel() == 0:
        raise ValueError("counts is empty: need at least one prompt")
    if counts.is_floating_point() or counts.dtype == torch.bool:
        raise ValueError(f"counts must be an integer tensor; got dtype {counts.dtype}")
    if bool((counts < 0).any()):
        raise ValueError(f"counts must be >= 0; got min {counts.min().item()}")
    k_max = k_max_for(c)
    if not 1 <= k_init <= k_max:
        raise ValueError(f"k_init must lie in [1, k_max_for(c) = {k_max}]; got k_init={k_init}, c={c}")
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1; got {pad_to}")
    if not 0.0 <= min_active_frac <= 1.0:
        raise ValueError(f"min_active_frac must lie in [0, 1]; got {min_active_frac}")
    sampled = counts > 0  # [P]
    _check_finite("reward_means", reward_means[sampled])
    _check_range("reward_means", reward_means[sampled], -1.0, 1.0)
    _check_finite("priors", priors)
    _check_range("priors", priors, -1.0, 1.0)

    counts = counts.to(torch.int64)  # [P]
    k = counts.to(torch.float64).clamp(min=1)  # [P]
    mean = torch.where(sampled, reward_means.to(torch.float64), 0.0)  # [P]
    delta2 = ((mean - priors.to(torch.float64)) ** 2 - 1.0 / k).clamp(min=0.0)  # [P]
    n_star = k_max - 1.0 / delta2  # [P]; -inf where delta2 == 0
    target = torch.where(delta2 > 0, torch.ceil(n_star).clamp(max=k_max), 0.0)  # [P]
    extra = (target.to(torch.int64) - counts).clamp(min=0)  # [P]
    below_init = counts < k_init  # [P]
    extra = torch.where(below_init, k_init - counts, extra)  # [P]

    active = extra > 0  # [P]
    if not bool(below_init.any()) and float(active.double().mean()) < min_active_frac:
        return torch.zeros_like(extra)  # [P]
    return _pad_round(extra, counts, active, k_max, pad_to)  # [P]


def _pad_round(extra: Tensor, counts: Tensor, active: Tensor, k_max: int, pad_to: int) -> Tensor:
    """Add rollouts to active prompts, largest remaining gap first, until the total divides pad_to."""
    missing = -int(extra.sum()) % pad_to
    if missing == 0 or not bool(active.any()):
        return extra  # [P]
    extra = extra.clone()  # [P]
    room = torch.where(active, (k_max - counts - extra).clamp(min=0), 0)  # [P]
    for _ in range(missing):
        position = int(room.argmax())
        if int(room[position]) == 0:
            break  # every active prompt is at k_max: pad as far as possible
        extra[position] += 1
        room[position] -= 1
    return extra  # [P]


# ---------------------------------------------------------------------------------------------------
# Estimators: fn(rewards [N], index [N], *, options) -> advantages [N]
# ---------------------------------------------------------------------------------------------------


def grpo(rewards: Tensor, index: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO (verl): `(r - mean_g) / (std_g + eps)`, std Bessel-corrected; r=[1,0,0,0] -> [1.5,-.5,-.5,-.5].

    Group of size 1 (verl's convention): mean 0, std 1, so the advantage is `r / (1 + eps)`.
    `norm_by_std=False` gives Dr. GRPO (`r - mean_g`).
    """
    _check_rewards_index(rewards, index)
    inverse, num_groups = _groups(index)  # [N]
    size, mean, var = _group_stats(rewards, inverse, num_groups)  # [G] each
    singleton = size == 1  # [G]
    mean = torch.where(singleton, torch.zeros_like(mean), mean)  # [G]
    centered = rewards - mean[inverse]  # [N]
    if not norm_by_std:
        return centered  # [N]
    std = torch.where(singleton, torch.ones_like(var), var.sqrt())  # [G]
    return centered / (std[inverse] + eps)  # [N]


def dr_grpo(rewards: Tensor, index: Tensor) -> Tensor:
    """Dr. GRPO: `r - mean_g` (no std normalisation); r=[1,0,0,0] -> [.75,-.25,-.25,-.25].

    Group of size 1 (verl's convention): mean 0, so the advantage is r.
    """
    return grpo(rewards, index, norm_by_std=False)  # [N]


def rloo(rewards: Tensor, index: Tensor) -> Tensor:
    """RLOO: `r_i - mean_{j != i} r_j = (n r_i - sum_g) / (n - 1)`; r=[1,0,0,0] -> [1,-1/3,-1/3,-1/3].

    Group of size 1 (our choice): advantage 0, since no leave-one-out baseline exists (verl returns r);
    the registry declares min_group_size 2.
    """
    _check_rewards_index(rewards, index)
    inverse, num_groups = _groups(index)  # [N]
    size = torch.bincount(inverse, minlength=num_groups).to(rewards.dtype)[inverse]  # [N]
    total = _group_sum(rewards, inverse, num_groups)[inverse]  # [N]
    loo = (size * rewards - total) / (size - 1).clamp(min=1)  # [N]
    return torch.where(size > 1, loo, torch.zeros_like(loo))  # [N]


def mc_grpo(rewards: Tensor, index: Tensor) -> Tensor:
    """Median baseline: `r - median_g`; the median of an even-sized group averages its two middle values.

    Robust to one outlier reward in the group. Group of size 1: the median is the reward itself, so the
    advantage is 0 (min_group_size 2).
    """
    _check_rewards_index(rewards, index)
    inverse, num_groups = _groups(index)  # [N]
    by_reward = torch.argsort(rewards, stable=True)  # [N]
    order = by_reward[torch.argsort(inverse[by_reward], stable=True)]  # [N]; by group, then reward
    ordered = rewards[order]  # [N]
    size = torch.bincount(inverse, minlength=num_groups)  # [G]
    start = torch.cumsum(size, 0) - size  # [G]
    median = (ordered[start + (size - 1) // 2] + ordered[start + size // 2]) / 2  # [G]
    return rewards - median[inverse]  # [N]


def reinforce_pp_baseline(rewards: Tensor, index: Tensor, *, token_counts: Tensor | None = None) -> Tensor:
    """REINFORCE++-baseline (verl): `r - mean_g`, then whitened over all valid tokens of the batch.

    Whitening is verl's `masked_whiten` (masked mean, Bessel-corrected masked variance,
    `(x - mean) * rsqrt(var + 1e-8)`). Each response's tokens share its value, so it is computed on `[N]`
    weighted by `token_counts` (response lengths, integer `[N]`; None: one token per response); responses
    with no tokens get 0. Group of size 1 (verl): mean 0, i.e. the raw reward enters the whitening.
    """
    _check_rewards_index(rewards, index)
    centered = grpo(rewards, index, norm_by_std=False)  # [N]
    return _token_whiten(centered, token_counts)  # [N]


def reinforce_pp(rewards: Tensor, index: Tensor, *, token_counts: Tensor | None = None) -> Tensor:
    """REINFORCE++ (no group baseline): the raw outcome reward whitened over the batch's valid tokens.

    With an outcome reward at the last token and gamma 1, verl's discounted return equals r on every
    token, so this is the same length-weighted whitening as `reinforce_pp_baseline` applied to r.
    `index` is validated but unused; any group size works.
    """
    _check_rewards_index(rewards, index)
    return _token_whiten(rewards, token_counts)  # [N]


def v05(
    rewards: Tensor, index: Tensor, *, prior: Tensor, scale: Scale = "bernoulli", eps: float = 1e-2
) -> Tensor:
    """V0.5: advantage `(r - b) / s` with the prior-fused baseline b of each group (design.md §4).

    `b = fused_baseline(mean_g, size_g, V_g)`. Unlike GRPO, all-correct / all-wrong groups keep non-zero
    advantages when b != ±1.

    Args:
        rewards: ±1 outcome rewards `[N]` (values in [-1, 1]).
        index: Group (prompt) id per response, integer `[N]`.
        prior: Prior V on the ±1 scale per response `[N]`, constant within a group.
        scale: `"bernoulli"` (default, our choice because the paper's text is not available):
            `s = sqrt(max(eps, 1 - b^2))`, the Bernoulli std implied by b; `"group_std"`:
            `s = sqrt(max(eps, var_g))` with Bessel-corrected var_g (size-1 groups: s = 1);
            `"none"`: s = 1.
        eps: Variance floor of the scale; the default 1e-2 keeps s >= 0.1, so |A| <= 20.

    Group of size 1: the fused baseline with k = 1 (its test threshold 1/k = 1 keeps the prior unless
    |r - V| > 1); the registry declares min_group_size 4 because k < 4 rejects correct priors.
    """
    _check_rewards_index(rewards, index)
    _check_range("rewards", rewards, -1.0, 1.0)
    inverse, num_groups = _groups(index)  # [N]
    prior_g = _check_prior(prior, rewards, inverse, num_groups)  # [G]
    size, mean, var = _group_stats(rewards, inverse, num_groups)  # [G] each
    baseline, _ = fused_baseline(mean.clamp(-1.0, 1.0), size, prior_g)  # [G]
    s = _scale(scale, baseline, var, size, eps)  # [G]
    return (rewards - baseline[inverse]) / s[inverse]  # [N]


def basis_baseline(rewards: Tensor, index: Tensor, prior: Tensor) -> Tensor:
    """Single-rollout batchwise baseline, our reconstruction of arXiv 2605.27293 from its abstract.

    Success probabilities: `y = (r + 1)/2`, `v0 = clamp((V + 1)/2, 1e-4, 1 - 1e-4)`. For each group g,
    one logit shift is fitted on the OTHER groups (every response sharing g's index is left out, so a
    prompt's own rewards never enter its baseline):
    `delta_(-g) = argmin_delta sum_{j not in g} (y_j - sigmoid(logit(v0_j) + delta))^2`,
    minimised on a dense grid (|delta| <= 20, step 0.05) refined by one parabolic interpolation step,
    vectorised over groups as `[T, G]` sums of the other groups (prefix + suffix sums over groups), in float64.
    `b_i = 2 clamp(sigmoid(logit(v0_i) + delta_(-g(i))), 1e-4, 1 - 1e-4) - 1` (±1 scale).

    When the batch is a single group there is nothing to leave in: delta = 0 (the prior alone).

    Args:
        rewards: Outcome rewards on the ±1 scale `[N]`.
        index: Group (prompt) id per response, integer `[N]`.
        prior: Prior V on the ±1 scale per response `[N]`, constant within a group.

    Returns:
        Baseline per response on the ±1 scale `[N]`, in `rewards`' dtype.
    """
    _check_rewards_index(rewards, index)
    _check_range("rewards", rewards, -1.0, 1.0)
    inverse, num_groups = _groups(index)  # [N]
    _check_prior(prior, rewards, inverse, num_groups)
    y = (rewards.to(torch.float64) + 1) / 2  # [N]
    v0 = ((prior.to(torch.float64) + 1) / 2).clamp(PROB_CLAMP, 1 - PROB_CLAMP)  # [N]
    logit0 = torch.logit(v0)  # [N]
    if num_groups == 1:
        shift = torch.zeros(1, dtype=torch.float64, device=rewards.device)  # [G]
    else:
        shift = _loo_logit_shift(y, logit0, inverse, num_groups)  # [G]
    p = torch.sigmoid(logit0 + shift[inverse]).clamp(PROB_CLAMP, 1 - PROB_CLAMP)  # [N]
    return (2 * p - 1).to(rewards.dtype)  # [N]


def _loo_logit_shift(y: Tensor, logit0: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """Leave-one-group-out least-squares logit shift per group on a dense grid, `[G]` (float64)."""
    steps = round(2 * SHIFT_MAX / SHIFT_STEP) + 1
    grid = torch.linspace(-SHIFT_MAX, SHIFT_MAX, steps, dtype=torch.float64, device=y.device)  # [T]
    # Unclamped: clamping here made the objective flat once every other prediction hit a clamp (a batch
    # that failed everywhere), and float rounding then picked the shift; the limit (b -> -1) is the fit.
    pred = torch.sigmoid(logit0[None, :] + grid[:, None])  # [T, N]
    sq = (y[None, :] - pred) ** 2  # [T, N]
    own = torch.zeros(steps, num_groups, dtype=torch.float64, device=y.device)  # [T, G]
    own.index_add_(1, inverse, sq)  # [T, G]
    # The other groups' sum as sums of non-negative terms (groups before g + groups after g), not as
    # total - own: that cancels when the others fit almost perfectly (a one-outcome rest of the batch
    # with confident priors: objective ~1e-25 under a total ~1), and float rounding then picked the shift.
    zero = torch.zeros(steps, 1, dtype=torch.float64, device=y.device)  # [T, 1]
    before = torch.cat([zero, own.cumsum(dim=1)[:, :-1]], dim=1)  # [T, G]; groups h < g
    after = torch.cat([zero, own.flip(1).cumsum(dim=1)[:, :-1]], dim=1).flip(1)  # [T, G]; groups h > g
    loo = before + after  # [T, G]
    best = loo.argmin(dim=0)  # [G]
    # Parabolic refinement through the best grid point and its neighbours (interior points only).
    inner = best.clamp(1, steps - 2)  # [G]
    columns = torch.arange(num_groups, device=y.device)  # [G]
    f_left, f_mid, f_right = (loo[inner + d, columns] for d in (-1, 0, 1))  # [G] each
    curvature = f_left - 2 * f_mid + f_right  # [G]
    offset = 0.5 * (f_left - f_right) / torch.where(curvature > 0, curvature, 1.0)  # [G]
    refine = (best == inner) & (curvature > 0)  # [G]
    offset = torch.where(refine, offset.clamp(-0.5, 0.5), 0.0)  # [G]; in grid steps
    return grid[best] + offset * SHIFT_STEP  # [G]


def basis(
    rewards: Tensor, index: Tensor, *, prior: Tensor, scale: Scale = "none", eps: float = 1e-2
) -> Tensor:
    """BASIS-style single-rollout advantage `(r - b) / s` (our reconstruction of arXiv 2605.27293).

    b is `basis_baseline` (one leave-one-group-out logit shift of the prior per batch); `scale` and `eps`
    as in `v05` (default "none": A = r - b). Works with one rollout per prompt (min_group_size 1); a
    size-1 group's "group_std" scale is 1.
    """
    baseline = basis_baseline(rewards, index, prior)  # [N]
    inverse, num_groups = _groups(index)  # [N]
    size, _, var = _group_stats(rewards, inverse, num_groups)  # [G] each
    baseline_g = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)  # [G]
    baseline_g = baseline_g.scatter(0, inverse, baseline)  # [G]; constant within a group
    s = _scale(scale, baseline_g, var, size, eps)  # [G]
    return (rewards - baseline) / s[inverse]  # [N]


def dynamic_sampling_mask(rewards: Tensor, index: Tensor) -> Tensor:
    """DAPO dynamic-sampling filter: True for responses whose group has non-zero reward std, bool `[N]`.

    Groups whose rewards are all equal (all correct, all wrong, or a single response) carry no GRPO
    signal; DAPO drops them and refills the batch.
    """
    _check_rewards_index(rewards, index)
    inverse, num_groups = _groups(index)  # [N]
    high = torch.full((num_groups,), -math.inf, dtype=rewards.dtype, device=rewards.device)  # [G]
    high = high.scatter_reduce(0, inverse, rewards, reduce="amax")  # [G]
    low = torch.full((num_groups,), math.inf, dtype=rewards.dtype, device=rewards.device)  # [G]
    low = low.scatter_reduce(0, inverse, rewards, reduce="amin")  # [G]
    return (high > low)[inverse]  # [N]


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EstimatorSpec:
    """One registered advantage estimator.

    Attributes:
        fn: `fn(rewards [N], index [N], *, <keyword options with defaults>) -> advantages [N]`.
        min_group_size: Smallest rollouts per prompt the estimator is meant for; the trainer rejects
            configs with a smaller group before training.
        needs_prior: Whether the estimator requires the `prior` option (V0 prior on the ±1 scale).
        description: One line for `--help` and logs.
    """

    fn: Callable[..., Tensor]
    min_group_size: int
    needs_prior: bool
    description: str


ESTIMATORS: dict[str, EstimatorSpec] = {
    "grpo": EstimatorSpec(grpo, 2, False, "GRPO: (r - mean_g) / (std_g + eps), Bessel std (verl)"),
    "dr_grpo": EstimatorSpec(dr_grpo, 2, False, "Dr. GRPO: r - mean_g"),
    "rloo": EstimatorSpec(rloo, 2, False, "RLOO: r_i - mean of the other responses of the group"),
    "mc_grpo": EstimatorSpec(mc_grpo, 2, False, "Median baseline: r - median_g"),
    "reinforce_pp_baseline": EstimatorSpec(
        reinforce_pp_baseline, 2, False, "REINFORCE++-baseline: r - mean_g, whitened over batch tokens"
    ),
    "reinforce_pp": EstimatorSpec(reinforce_pp, 1, False, "REINFORCE++: r whitened over batch tokens"),
    "v05": EstimatorSpec(v05, 4, True, "V0.5: (r - fused prior/group baseline) / Bernoulli std"),
    "basis": EstimatorSpec(
        basis, 1, True, "BASIS (our reconstruction): r - prior with a leave-one-out batch logit shift"
    ),
}


def compute_advantages(name: str, rewards: Tensor, index: Tensor, **options: object) -> Tensor:
    """Per-response advantages `[N]` from the estimator registered as `name` in `ESTIMATORS`.

    Args:
        name: Registry key, e.g. "grpo", "v05".
        rewards: Outcome reward per response, float `[N]`.
        index: Group (prompt) id per response, integer `[N]`; groups need not be contiguous or sorted.
        **options: The estimator's keyword options (e.g. `prior=`, `scale=`, `token_counts=`).
    """
    spec = ESTIMATORS.get(name)
    if spec is None:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {', '.join(sorted(ESTIMATORS))}")
    accepted = [
        p.name
        for p in inspect.signature(spec.fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for estimator {name!r}; "
            f"it accepts: {', '.join(accepted) or 'no options'}"
        )
    missing = [
        p.name
        for p in inspect.signature(spec.fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.default is inspect.Parameter.empty
        and p.name not in options
    ]
    if missing:
        raise ValueError(f"estimator {name!r} requires option(s): {', '.join(missing)}")
    return spec.fn(rewards, index, **options)
