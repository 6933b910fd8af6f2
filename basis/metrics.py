"""Evaluation metrics for verifiable-reward sampling: unbiased pass@k and mean@k.

What it is: `pass_at_k(n, c, k)` is Chen et al.'s (2021, "Evaluating Large Language Models Trained on
Code") unbiased estimator `1 - prod_{i=n-c+1}^{n} (1 - k/i)` (1 when n - c < k), vectorised over
prompts; `mean_at_k(n, c) = c / n` (design.md §5). `PassAtK` and `MeanAtK` are torchmetrics `Metric`s
whose states are float64 sums (`dist_reduce_fx="sum"`), so they accumulate over batches and across
processes; they stay float64 when the owning module is cast (Lightning's `bf16-true` / `16-true`).

Deviation from the reference numpy code: instead of a per-prompt loop over `np.prod`, the product is
taken in log space from one float64 cumulative sum of `log1p(-k/i)` shared by all prompts, which is
exact to float64 rounding and stable for large n. Metric names for MLflow must avoid `@`: log as
`pass_at_k/8`, not `pass@8` (design.md §7).

How to run: `pass_at_k(torch.tensor([4]), torch.tensor([1]), 2)` -> 0.5; tests:
`.venv/bin/pytest tests/basis/test_metrics.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric

__all__ = ["MeanAtK", "PassAtK", "mean_at_k", "pass_at_k"]


def _as_counts(n: Tensor | int, c: Tensor | int) -> tuple[Tensor, Tensor]:
    """Validate sample / correct counts; return them as broadcast int64 tensors of the same shape."""
    n_t = torch.as_tensor(n)
    c_t = torch.as_tensor(c)
    for name, value in (("n", n_t), ("c", c_t)):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer count; got dtype {value.dtype}")
    try:
        zeros = torch.zeros_like(n_t, dtype=torch.int64) + torch.zeros_like(c_t, dtype=torch.int64)  # [P]
    except RuntimeError as error:
        raise ValueError(
            f"n and c must broadcast together; got shapes {tuple(n_t.shape)} and {tuple(c_t.shape)}"
        ) from error
    n_t = n_t.to(torch.int64) + zeros  # [P]
    c_t = c_t.to(torch.int64) + zeros  # [P]
    if n_t.numel() and bool((n_t < 1).any()):
        raise ValueError(f"n (samples per prompt) must be >= 1; got min {n_t.min().item()}")
    if n_t.numel() and bool(((c_t < 0) | (c_t > n_t)).any()):
        raise ValueError("c (correct samples) must satisfy 0 <= c <= n for every prompt")
    return n_t, c_t


def pass_at_k(n: Tensor | int, c: Tensor | int, k: int) -> Tensor:
    """Unbiased pass@k per prompt (Chen et al.): `1 - prod_{i=n-c+1}^{n} (1 - k/i)`, 1 if n - c < k.

    Args:
        n: Samples per prompt (>= k), int or integer tensor `[P]`.
        c: Correct samples per prompt (0 <= c <= n), broadcastable with n.
        k: The k in pass@k (>= 1).

    Returns:
        float64 tensor with the broadcast shape of n and c. Pinned: (4, 1, 2) -> 0.5,
        (1024, 3, 256) -> 0.578538.
    """
    n_t, c_t = _as_counts(n, c)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if n_t.numel() == 0:
        return torch.zeros(n_t.shape, dtype=torch.float64, device=n_t.device)
    if bool((n_t < k).any()):
        raise ValueError(f"k must be <= n for every prompt (cannot pick {k} of n={n_t.min().item()} samples)")
    # log prod_{i=a+1}^{b} (1 - k/i) = S[b] - S[a] with S[m] = sum_{i=k+1}^{m} log1p(-k/i) (S[m] = 0 for
    # m <= k). Only needed when n - c >= k, where every factor has i > k and is positive.
    top = int(n_t.max())
    i = torch.arange(top + 1, dtype=torch.float64, device=n_t.device)  # [top + 1]
    terms = torch.where(i > k, torch.log1p(-k / i.clamp(min=1)), 0.0)  # [top + 1]
    cumulative = torch.cumsum(terms, dim=0)  # [top + 1]
    log_fail = cumulative[n_t] - cumulative[n_t - c_t]  # [P]
    passed = torch.where(n_t - c_t < k, 1.0, -torch.expm1(log_fail))  # [P]
    return torch.where(c_t == 0, 0.0, passed)  # [P]; exact 0 (not -0.0) without a correct sample


def mean_at_k(n: Tensor | int, c: Tensor | int) -> Tensor:
    """mean@k per prompt: the fraction of correct samples `c / n` (float64, broadcast shape of n, c)."""
    n_t, c_t = _as_counts(n, c)
    return c_t.to(torch.float64) / n_t.to(torch.float64)  # [P]


def _apply_keeping_float64(
    metric: Metric, fn: Callable[..., Any], exclude_state: Sequence[str] = ()
) -> Module:
    """`Metric._apply` (device moves and casts), then the tensor states and their reset defaults back to
    float64: both metrics' `_apply`.

    torchmetrics means states to change dtype only through `Metric.set_dtype`, but its guard catches
    `.half()` / `.bfloat16()` / `.float()` / `.double()`, not `module.to(dtype)`, which Lightning's
    `bf16-true` / `16-true` precision applies to the whole LightningModule: bf16 sums of pass@k over
    1,000 prompts are off by ~5e-3 and counts above 256 round.
    """
    Metric._apply(metric, fn, exclude_state)
    # torchmetrics internals, checked against torchmetrics 1.9: `_dtype_convert` marks an explicit
    # `set_dtype`, `_defaults` holds the reset values
    if not metric._dtype_convert:
        for name, default in metric._defaults.items():
            if isinstance(default, Tensor):
                metric._defaults[name] = default.to(torch.float64)  # device kept
                setattr(metric, name, getattr(metric, name).to(torch.float64))
    return metric


def _check_update(num_samples: Tensor, num_correct: Tensor) -> None:
    if num_samples.dim() != 1 or num_samples.shape != num_correct.shape:
        raise ValueError(
            "num_samples and num_correct must be 1-D [P] with the same shape; got "
            f"{tuple(num_samples.shape)} and {tuple(num_correct.shape)}"
        )


class PassAtK(Metric):
    """Mean unbiased pass@k over prompts for several k, accumulated over batches and processes.

    `update(num_samples [P], num_correct [P])`; `compute()` -> `{k: mean pass@k}` (float64 scalars).
    States: per-k sums of pass@k and the prompt count, all summed across processes.

    Args:
        ks: The k values to report (each >= 1, distinct); every prompt needs at least max(ks) samples.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    pass_sum: Tensor
    prompts: Tensor

    def __init__(self, ks: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(ks) == 0 or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError(f"ks must be a non-empty sequence of distinct integers >= 1; got {list(ks)}")
        self.ks = tuple(int(k) for k in ks)
        self.add_state(
            "pass_sum", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("prompts", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    _apply = _apply_keeping_float64

    def update(self, num_samples: Tensor, num_correct: Tensor) -> None:
        _check_update(num_samples, num_correct)
        values = torch.stack([pass_at_k(num_samples, num_correct, k) for k in self.ks])  # [K, P]
        self.pass_sum += values.sum(dim=1).to(self.pass_sum.device)  # [K]
        self.prompts += num_samples.numel()

    def compute(self) -> dict[int, Tensor]:
        if float(self.prompts) == 0:
            raise ValueError("PassAtK.compute() called before any update with at least one prompt")
        means = self.pass_sum / self.prompts  # [K]
        return {k: means[position] for position, k in enumerate(self.ks)}


class MeanAtK(Metric):
    """Mean over prompts of mean@k = c / n, accumulated over batches and processes.

    `update(num_samples [P], num_correct [P])`; `compute()` -> scalar (float64).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    mean_sum: Tensor
    prompts: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("mean_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    _apply = _apply_keeping_float64

    def update(self, num_samples: Tensor, num_correct: Tensor) -> None:
        _check_update(num_samples, num_correct)
        self.mean_sum += mean_at_k(num_samples, num_correct).sum().to(self.mean_sum.device)  # []
        self.prompts += num_samples.numel()

    def compute(self) -> Tensor:
        if float(self.prompts) == 0:
            raise ValueError("MeanAtK.compute() called before any update with at least one prompt")
        return self.mean_sum / self.prompts  # []
