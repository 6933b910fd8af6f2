"""Tests for basis.metrics: pass@k pins from design.md §5, the textbook numpy formula, and torchmetrics
accumulation over batches (and over a simulated second process via state merging)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from basis.metrics import MeanAtK, PassAtK, mean_at_k, pass_at_k


def chen_reference(n: int, c: int, k: int) -> float:
    """The numpy estimator from Chen et al. (2021), verbatim in spirit."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def test_pass_at_k_pinned_values() -> None:
    assert pass_at_k(4, 1, 2).item() == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(1024, 3, 256).item() == pytest.approx(0.578538, abs=1e-6)
    assert pass_at_k(10, 0, 3).item() == 0.0
    assert pass_at_k(10, 8, 3).item() == 1.0  # n - c = 2 < k
    assert pass_at_k(5, 5, 5).item() == 1.0


def test_pass_at_k_vectorised_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    n = torch.randint(8, 300, (200,), generator=g)
    c = (torch.rand(200, generator=g) * (n + 1)).long().clamp(max=n)
    for k in (1, 2, 5, 8):
        expected = torch.tensor(
            [chen_reference(a, b, k) for a, b in zip(n.tolist(), c.tolist())], dtype=torch.float64
        )
        torch.testing.assert_close(pass_at_k(n, c, k), expected, atol=1e-12, rtol=0)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_pass_at_k_equals_binomial_ratio(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 400))
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k).item() == pytest.approx(expected, abs=1e-10)


def test_pass_at_1_is_mean_at_k() -> None:
    n, c = torch.tensor([4, 10, 16]), torch.tensor([1, 0, 9])
    torch.testing.assert_close(pass_at_k(n, c, 1), mean_at_k(n, c))
    torch.testing.assert_close(mean_at_k(n, c), torch.tensor([0.25, 0.0, 9 / 16], dtype=torch.float64))


def test_pass_at_k_is_stable_for_large_n() -> None:
    value = pass_at_k(100_000, 1, 50_000).item()
    assert value == pytest.approx(0.5, abs=1e-9)
    assert pass_at_k(100_000, 100, 10).item() == pytest.approx(chen_reference(100_000, 100, 10), abs=1e-12)


def test_pass_at_k_bad_input() -> None:
    with pytest.raises(ValueError, match="k must be <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 2)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, -1, 2)
    with pytest.raises(ValueError, match=r"n .* must be >= 1"):
        mean_at_k(0, 0)
    with pytest.raises(ValueError, match="n must be an integer count"):
        pass_at_k(torch.tensor([4.0]), 1, 2)
    with pytest.raises(ValueError, match="must broadcast"):
        pass_at_k(torch.tensor([4, 4]), torch.tensor([1, 1, 1]), 2)


def random_counts(seed: int, prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(16, 33, (prompts,), generator=g)
    c = (torch.rand(prompts, generator=g) * (n + 1)).long().clamp(max=n)
    return n, c


def test_pass_at_k_metric_accumulates_like_one_shot() -> None:
    n, c = random_counts(0, 90)
    metric = PassAtK([1, 4, 16])
    for rows in torch.arange(90).split(25):
        metric.update(n[rows], c[rows])
    result = metric.compute()
    assert sorted(result) == [1, 4, 16]
    for k, value in result.items():
        torch.testing.assert_close(value, pass_at_k(n, c, k).mean())


def test_metrics_merge_across_processes() -> None:
    """Two metric replicas (two ranks) merged with their sum reductions equal one metric on all data."""
    n, c = random_counts(1, 40)
    rank0, rank1 = PassAtK([2, 8]), PassAtK([2, 8])
    rank0.update(n[:15], c[:15])
    rank1.update(n[15:], c[15:])
    rank0.merge_state(rank1)
    one_shot = PassAtK([2, 8])
    one_shot.update(n, c)
    for k in (2, 8):
        torch.testing.assert_close(rank0.compute()[k], one_shot.compute()[k])
    mean0, mean1 = MeanAtK(), MeanAtK()
    mean0.update(n[:15], c[:15])
    mean1.update(n[15:], c[15:])
    mean0.merge_state(mean1)
    torch.testing.assert_close(mean0.compute(), mean_at_k(n, c).mean())


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_mean_at_k_metric_accumulates_and_resets() -> None:
    n, c = random_counts(2, 30)
    metric = MeanAtK()
    metric.update(n[:10], c[:10])
    metric.update(n[10:], c[10:])
    torch.testing.assert_close(metric.compute(), mean_at_k(n, c).mean())
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_states_stay_float64_when_the_module_is_cast_to_bf16() -> None:
    """Lightning's `bf16-true` casts the whole LightningModule with `module.to(dtype)`; torchmetrics does
    not guard that path, and bf16 sums gave pass@1 0.515625 for an exact 0.511875 on these 1,000 prompts."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    holder = torch.nn.Module()
    holder.pass_at_k, holder.mean_at_k = PassAtK([1, 4]), MeanAtK()
    holder = HalfPrecision("bf16-true").convert_module(holder)
    g = torch.Generator().manual_seed(0)
    n, c = torch.full((1000,), 16), torch.randint(0, 17, (1000,), generator=g)
    for rows in torch.arange(1000).split(8):
        holder.pass_at_k.update(n[rows], c[rows])
        holder.mean_at_k.update(n[rows], c[rows])
    result = holder.pass_at_k.compute()
    for k in (1, 4):
        torch.testing.assert_close(result[k], pass_at_k(n, c, k).mean(), atol=1e-12, rtol=0)
    torch.testing.assert_close(holder.mean_at_k.compute(), mean_at_k(n, c).mean(), atol=1e-12, rtol=0)
    holder.pass_at_k.reset()
    assert holder.pass_at_k.pass_sum.dtype == holder.pass_at_k.prompts.dtype == torch.float64
    assert PassAtK([1]).set_dtype(torch.float32).pass_sum.dtype == torch.float32  # explicit request kept


def test_metric_bad_input() -> None:
    with pytest.raises(ValueError, match="ks must be a non-empty sequence"):
        PassAtK([])
    with pytest.raises(ValueError, match="ks must be a non-empty sequence"):
        PassAtK([2, 2])
    with pytest.raises(ValueError, match="same shape"):
        PassAtK([1]).update(torch.tensor([4, 4]), torch.tensor([1]))
    with pytest.raises(ValueError, match="k must be <= n"):
        PassAtK([8]).update(torch.tensor([4]), torch.tensor([1]))
