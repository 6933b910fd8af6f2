"""value_prior.metrics against hand-computed values and a loop reference (named apart from tests/basis/test_metrics.py: test folders are not packages, so basenames must be unique)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from value_prior.metrics import (
    auc,
    bootstrap_ci,
    brier,
    expected_calibration_error,
    grouped_auc,
    pair_accuracy,
    paired_bootstrap_diff,
    score_predictions,
)


def test_auc_hand_computed() -> None:
    # positives (y >= 0.5): 0.9, 0.4; negatives: 0.3, 0.6 -> pairs ranked right: (0.9>0.3), (0.9>0.6), (0.4>0.3) = 3/4
    assert auc([0.9, 0.4, 0.3, 0.6], [1.0, 0.5, 0.0, 0.2]) == pytest.approx(0.75)
    assert np.isnan(auc([0.1, 0.2], [1.0, 1.0]))


def test_grouped_auc_weights_by_items_and_skips_single_class() -> None:
    prob = [0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.5, 0.5]
    success = [1, 0, 1, 0, 1, 0, 1, 1]
    groups = ["a"] * 4 + ["b"] * 2 + ["c"] * 2  # a: AUC 1 (4 items), b: AUC 0 (2 items), c: one class
    assert grouped_auc(prob, success, groups) == pytest.approx((1.0 * 4 + 0.0 * 2) / 6)


def test_constant_prediction_per_group_scores_half() -> None:
    rng = np.random.default_rng(0)
    success = rng.random(60)
    groups = np.repeat(["a", "b", "c"], 20)
    prob = np.repeat([0.2, 0.5, 0.9], 20)  # a context mean per pool
    assert grouped_auc(prob, success, list(groups)) == pytest.approx(0.5)


def test_pair_accuracy_matches_loop() -> None:
    rng = np.random.default_rng(1)
    prob = np.round(rng.random(30), 1)  # ties included
    success = np.round(rng.random(30), 1)
    groups = rng.integers(0, 3, 30)
    correct, total = 0.0, 0
    for i, j in itertools.permutations(range(30), 2):
        if groups[i] == groups[j] and success[i] > success[j]:
            total += 1
            correct += 1.0 if prob[i] > prob[j] else 0.5 if prob[i] == prob[j] else 0.0
    assert pair_accuracy(prob, success, list(groups)) == pytest.approx(correct / total)


def test_brier_and_ece_hand_computed() -> None:
    prob = [0.05, 0.15, 0.95, 0.85]
    success = [0.0, 0.5, 1.0, 0.5]
    assert brier(prob, success) == pytest.approx((0.05**2 + 0.35**2 + 0.05**2 + 0.35**2) / 4)
    # bins: 0 -> {0.05}, 1 -> {0.15}, 8 -> {0.85}, 9 -> {0.95}; each gap / 4
    assert expected_calibration_error(prob, success) == pytest.approx((0.05 + 0.35 + 0.35 + 0.05) / 4)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="must be equal 1-D"):
        brier([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="no items"):
        brier([], [])


def test_score_predictions_and_bootstrap() -> None:
    rng = np.random.default_rng(2)
    success = rng.random(200)
    prob = np.clip(success + rng.normal(0, 0.3, 200), 0, 1)
    groups = np.repeat(["a", "b"], 100)
    scores = score_predictions(prob, success, list(groups))
    assert set(scores) == {"gauc", "auc", "pair_acc", "brier", "ece"}

    def fn(p: np.ndarray, s: np.ndarray, g: np.ndarray) -> float:
        return grouped_auc(p, s, list(g))

    lo, hi = bootstrap_ci(fn, prob, success, groups, n_resamples=100)
    assert lo <= scores["gauc"] <= hi
    diff, dlo, dhi = paired_bootstrap_diff(fn, prob, np.full(200, 0.5), success, groups, n_resamples=100)
    assert diff == pytest.approx(scores["gauc"] - 0.5)
    assert dlo <= diff <= dhi and dlo > 0


def test_cluster_bootstrap_treats_a_repeated_prompt_as_one_draw() -> None:
    # 50 prompts, each queried in both pools with the same outcome and score: 100 items, 50 draws
    rng = np.random.default_rng(3)
    success = np.tile(rng.random(50), 2)
    prob = np.tile(np.clip(success[:50] + rng.normal(0, 0.3, 50), 0, 1), 2)
    groups = np.repeat(["a", "b"], 50)
    prompts = [f"q{i}" for i in range(50)] * 2

    def fn(p: np.ndarray, s: np.ndarray, g: np.ndarray) -> float:
        return grouped_auc(p, s, list(g))

    item_lo, item_hi = bootstrap_ci(fn, prob, success, groups, n_resamples=300)
    lo, hi = bootstrap_ci(fn, prob, success, groups, n_resamples=300, clusters=prompts)
    assert lo <= fn(prob, success, groups) <= hi
    assert hi - lo > item_hi - item_lo  # repeated prompts are not independent evidence
    diff, dlo, dhi = paired_bootstrap_diff(
        fn, prob, np.full(100, 0.5), success, groups, n_resamples=300, clusters=prompts
    )
    assert dlo <= diff <= dhi


@pytest.mark.parametrize(
    "metric",
    [
        lambda p, y: auc(p, y),
        lambda p, y: grouped_auc(p, y, ["a"] * len(p)),
        lambda p, y: pair_accuracy(p, y, ["a"] * len(p)),
        brier,
        expected_calibration_error,
    ],
    ids=["auc", "gauc", "pair_acc", "brier", "ece"],
)
def test_non_finite_values_are_refused(metric) -> None:
    # torchmetrics ranks a NaN prediction as the highest score, so this used to give gAUC 1.0
    with pytest.raises(ValueError, match=r"predictions hold 1 non-finite value\(s\) \(first: item 0 = nan\)"):
        metric([np.nan, 0.1, 0.8, 0.2], [1, 0, 1, 0])
    with pytest.raises(ValueError, match="success rates hold 1 non-finite"):
        metric([0.9, 0.1, 0.8, 0.2], [1, 0, np.inf, 0])


def test_per_item_lengths_must_match_the_predictions() -> None:
    # A short `groups` or `clusters` used to make the bootstrap draw from the first items only, silently
    # (a paired point estimate outside its own interval), and pair_accuracy failed with an IndexError.
    rng = np.random.default_rng(4)
    success = rng.random(20)
    prob = rng.random(20)
    groups = np.repeat(["a", "b"], 10)
    prompts = [f"q{i}" for i in range(10)]

    def fn(p: np.ndarray, s: np.ndarray, g: np.ndarray) -> float:
        return brier(p, s)

    with pytest.raises(ValueError, match="15 group ids for 20 predictions"):
        pair_accuracy(prob, success, list(groups[:15]))
    with pytest.raises(ValueError, match="10 group ids for 20 predictions"):
        bootstrap_ci(fn, prob, success, groups[:10], n_resamples=5)
    with pytest.raises(ValueError, match="19 success rates for 20 predictions"):
        bootstrap_ci(fn, prob, success[:19], groups, n_resamples=5)
    with pytest.raises(ValueError, match="10 clusters for 20 predictions"):
        bootstrap_ci(fn, prob, success, groups, n_resamples=5, clusters=prompts)
    with pytest.raises(ValueError, match="10 clusters for 20 predictions"):
        paired_bootstrap_diff(fn, prob, np.full(20, 0.5), success, groups, n_resamples=5, clusters=prompts)
    with pytest.raises(ValueError, match="19 predictions of b for 20 predictions"):
        paired_bootstrap_diff(fn, prob, np.full(19, 0.5), success, groups, n_resamples=5)


@pytest.mark.parametrize("metric", [auc, brier, expected_calibration_error])
def test_values_outside_the_unit_interval_are_refused(metric) -> None:
    # torchmetrics squashed logits by a sigmoid: AUC 0.75 for [40, 39, 38, -3] where sklearn says 0.5
    with pytest.raises(ValueError, match=r"predictions hold 4 value.*outside \[0, 1\]"):
        metric([40.0, 39.0, 38.0, -3.0], [0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"success rates hold 2 value.*item 1 = -1\.0"):
        metric([0.9, 0.1, 0.8, 0.2], [1, -1, 1, -1])
