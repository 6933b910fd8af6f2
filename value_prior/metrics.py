"""Evaluation metrics of V0 and its baselines (design.md §3): AUC, gAUC, pair accuracy, Brier, ECE.

All metrics score a predicted success probability `p` (V0's output: the expected success rate of
the policy on the prompt) against the observed success rate `y = successes / n`:

- AUC: ROC AUC of `p` against the binary label `1[y >= 0.5]` over all items (torchmetrics).
- gAUC: AUC within each context pool (policy, step), averaged with weights = items per pool; pools
  whose queries have one class are skipped. Shared prompt difficulty cannot inflate it across pools,
  and a constant per-pool prediction (the context mean) scores exactly 0.5.
- Pair accuracy: within each pool, the share of prompt pairs with different success rates that `p`
  orders correctly (ties in `p` count one half). Unlike gAUC it uses the graded success rates.
- Brier: mean `(p - y)^2` against the graded success rate (torchmetrics MSE).
- ECE: `sum_b |B_b|/N * |mean(p in b) - mean(y in b)|` over `n_bins` equal-width bins of `p`.
  torchmetrics' calibration error needs 0/1 targets; success rates are graded, so it is computed here.

Every metric raises `ValueError` on a non-finite prediction or success rate (a NaN prediction would
otherwise rank as a perfect one in the AUCs).

`bootstrap_ci` gives percentile intervals by resampling query items (or whole prompts, when one
prompt is queried in several pools); `paired_bootstrap_diff` gives the interval of a difference
between two predictors on the same items (much tighter than comparing two separate intervals).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.classification import binary_auroc

SUCCESS_THRESHOLD = 0.5


def _as_tensor(values: Sequence[float] | np.ndarray | Tensor) -> Tensor:
    return torch.as_tensor(
        np.asarray(values, dtype=np.float64) if not isinstance(values, Tensor) else values
    ).double()


def _groups_as_ids(groups: Sequence[object] | np.ndarray | Tensor) -> np.ndarray:
    _, ids = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return ids


def _check_length(name: str, values: Sized, n: int) -> None:
    """Refuse per-item values (groups, clusters, success rates) that do not match the `n` predictions:
    the bootstrap would otherwise draw from a prefix of the items and report its interval silently."""
    if len(values) != n:
        raise ValueError(f"{len(values)} {name} for {n} predictions")


def _check(prob: Tensor, success: Tensor) -> None:
    """Reject inputs no metric can score honestly.

    Values outside [0, 1] and non-finite values are refused rather than scored: `binary_auroc` ranks a NaN prediction as if it
    were a perfect one (a NaN-only model scores AUC 1.0), and a NaN in the ECE or Brier sums would pass
    through as a NaN metric that early stopping and checkpointing then compare against.
    """
    if prob.shape != success.shape or prob.ndim != 1:
        raise ValueError(
            f"predictions {tuple(prob.shape)} and success rates {tuple(success.shape)} must be equal 1-D"
        )
    if prob.numel() == 0:
        raise ValueError("no items to score")
    for name, values in (("predictions", prob), ("success rates", success)):
        bad = torch.nonzero(~torch.isfinite(values)).flatten()  # [n_bad]
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"{name} hold {bad.numel()} non-finite value(s) (first: item {i} = {float(values[i])}): "
                "metrics need finite values; check the model or the data that produced them"
            )
        outside = torch.nonzero((values < 0) | (values > 1)).flatten()  # [n_out]
        if outside.numel():  # a logit or a ±1 score: torchmetrics would squash logits by a sigmoid, silently
            i = int(outside[0])
            raise ValueError(
                f"{name} hold {outside.numel()} value(s) outside [0, 1] (first: item {i} = {float(values[i])}): "
                "metrics score probabilities and success rates, not logits or ±1 rewards"
            )


def auc(prob: Sequence[float] | Tensor, success: Sequence[float] | Tensor) -> float:
    """ROC AUC of `prob` against `1[success >= 0.5]` (NaN when one class)."""
    p, y = _as_tensor(prob), _as_tensor(success)
    _check(p, y)
    label = (y >= SUCCESS_THRESHOLD).long()
    if label.min() == label.max():
        return float("nan")
    return float(binary_auroc(p, label))


def grouped_auc(
    prob: Sequence[float] | Tensor, success: Sequence[float] | Tensor, groups: Sequence[object]
) -> float:
    """Item-weighted mean of the per-pool AUC (pools with one class skipped; NaN if none left)."""
    p, y = _as_tensor(prob), _as_tensor(success)
    _check(p, y)
    ids = _groups_as_ids(groups)
    _check_length("group ids", ids, len(p))
    total, weighted = 0, 0.0
    for group in np.unique(ids):
        mask = torch.as_tensor(ids == group)
        value = auc(p[mask], y[mask])
        if not np.isnan(value):
            weighted += value * int(mask.sum())
            total += int(mask.sum())
    return weighted / total if total else float("nan")


def pair_accuracy(
    prob: Sequence[float] | Tensor, success: Sequence[float] | Tensor, groups: Sequence[object]
) -> float:
    """Share of within-pool pairs with different success rates that `prob` orders correctly."""
    p, y = _as_tensor(prob), _as_tensor(success)
    _check(p, y)
    ids = torch.as_tensor(_groups_as_ids(groups))
    _check_length("group ids", ids, len(p))
    correct, pairs = 0.0, 0
    for group in torch.unique(ids):  # one pool at a time: memory grows with the pool, not with N
        gp, gy = p[ids == group], y[ids == group]  # [n], [n]
        better = gy[:, None] > gy[None, :]  # [n, n] item i truly better than j
        diff = (gp[:, None] - gp[None, :])[better]  # [pairs]
        correct += float((diff > 0).double().sum() + 0.5 * (diff == 0).double().sum())
        pairs += int(better.sum())
    return correct / pairs if pairs else float("nan")


def brier(prob: Sequence[float] | Tensor, success: Sequence[float] | Tensor) -> float:
    """Mean squared error between the predicted and the observed success rate."""
    p, y = _as_tensor(prob), _as_tensor(success)
    _check(p, y)
    return float(mean_squared_error(p, y))


def expected_calibration_error(
    prob: Sequence[float] | Tensor, success: Sequence[float] | Tensor, n_bins: int = 10
) -> float:
    """ECE over `n_bins` equal-width probability bins against graded success rates."""
    p, y = _as_tensor(prob), _as_tensor(success)
    _check(p, y)
    count, mean_p, mean_y = reliability_bins(p.cpu().numpy(), y.cpu().numpy(), n_bins)  # [n_bins] each
    return float(((count / len(p)) * np.abs(mean_p - mean_y)).sum())


def reliability_bins(
    prob: np.ndarray, success: np.ndarray, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width probability bin: the count, mean prediction and mean success rate (each
    `[n_bins]`, 0 in an empty bin): the reliability diagram, and ECE's terms."""
    bins = np.clip((np.asarray(prob) * n_bins).astype(int), 0, n_bins - 1)  # [N]
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)  # [n_bins]
    mean_p = np.bincount(bins, weights=prob, minlength=n_bins) / np.maximum(count, 1)  # [n_bins]
    mean_y = np.bincount(bins, weights=success, minlength=n_bins) / np.maximum(count, 1)  # [n_bins]
    return count, mean_p, mean_y


def score_predictions(
    prob: Sequence[float] | Tensor, success: Sequence[float] | Tensor, groups: Sequence[object]
) -> dict[str, float]:
    """All five metrics: `{"gauc", "auc", "pair_acc", "brier", "ece"}`."""
    return {
        "gauc": grouped_auc(prob, success, groups),
        "auc": auc(prob, success),
        "pair_acc": pair_accuracy(prob, success, groups),
        "brier": brier(prob, success),
        "ece": expected_calibration_error(prob, success),
    }


MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


class _Resampler:
    """Bootstrap index draws: items within each pool, or, given `clusters` (e.g. prompt ids), whole
    clusters with all their items. The same prompt queried in several pools is not independent
    evidence, so the cluster draw gives honest (wider) intervals when prompts repeat across pools."""

    def __init__(self, groups: np.ndarray, clusters: Sequence[object] | None, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        labels = groups if clusters is None else np.asarray([str(c) for c in clusters])
        self.members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
        self.by_cluster = clusters is not None

    def draw(self) -> np.ndarray:
        if self.by_cluster:
            chosen = self.rng.integers(len(self.members), size=len(self.members))
            return np.concatenate([self.members[i] for i in chosen])
        return np.concatenate([self.rng.choice(m, size=len(m), replace=True) for m in self.members])


def bootstrap_ci(
    metric: MetricFn,
    prob: np.ndarray,
    success: np.ndarray,
    groups: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    clusters: Sequence[object] | None = None,
) -> tuple[float, float]:
    """Percentile interval of `metric(prob, success, groups)` over item resamples (within each pool),
    or over resamples of whole `clusters` when given."""
    prob, success, groups = np.asarray(prob), np.asarray(success), np.asarray([str(g) for g in groups])
    for name, values in (("success rates", success), ("group ids", groups), ("clusters", clusters)):
        if values is not None:
            _check_length(name, values, len(prob))
    resampler = _Resampler(groups, clusters, seed)
    values = []
    for _ in range(n_resamples):
        index = resampler.draw()
        values.append(metric(prob[index], success[index], groups[index]))
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_bootstrap_diff(
    metric: MetricFn,
    prob_a: np.ndarray,
    prob_b: np.ndarray,
    success: np.ndarray,
    groups: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    clusters: Sequence[object] | None = None,
) -> tuple[float, float, float]:
    """`(diff, lo, hi)`: metric(a) - metric(b) on the same items, with a paired percentile interval
    (resampling items within pools, or whole `clusters` when given)."""
    prob_a, prob_b, success = np.asarray(prob_a), np.asarray(prob_b), np.asarray(success)
    groups = np.asarray([str(g) for g in groups])
    for name, values in (
        ("predictions of b", prob_b),
        ("success rates", success),
        ("group ids", groups),
        ("clusters", clusters),
    ):
        if values is not None:
            _check_length(name, values, len(prob_a))
    resampler = _Resampler(groups, clusters, seed)
    diffs = []
    for _ in range(n_resamples):
        index = resampler.draw()
        diffs.append(
            metric(prob_a[index], success[index], groups[index])
            - metric(prob_b[index], success[index], groups[index])
        )
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(diffs, [tail, 100 - tail])
    point = metric(prob_a, success, groups) - metric(prob_b, success, groups)
    return float(point), float(lo), float(hi)
