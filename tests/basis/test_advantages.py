"""Tests for basis.advantages: design.md §5 reference vectors, loop-vs-vectorised, properties, bad input."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from basis.advantages import (
    ESTIMATORS,
    basis,
    basis_baseline,
    compute_advantages,
    dr_grpo,
    dynamic_sampling_mask,
    fused_baseline,
    grpo,
    k_max_for,
    mc_grpo,
    osla_extra_rollouts,
    reinforce_pp,
    reinforce_pp_baseline,
    rloo,
    v05,
)

ONE_GROUP = torch.zeros(4, dtype=torch.long)
R_1000 = torch.tensor([1.0, 0.0, 0.0, 0.0])


def random_batch(seed: int, groups: int = 7, pm_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards and shuffled, non-contiguous group ids with group sizes 1..6."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 7, (groups,), generator=g)
    ids = torch.randperm(1000, generator=g)[:groups] * 3 - 500  # arbitrary, negative, unsorted ids
    index = torch.repeat_interleave(ids, sizes)
    index = index[torch.randperm(index.numel(), generator=g)]
    if pm_one:
        rewards = torch.randint(0, 2, index.shape, generator=g).double() * 2 - 1
    else:
        rewards = torch.randn(index.shape, generator=g, dtype=torch.float64)
    return rewards, index


def loop_by_group(rewards: torch.Tensor, index: torch.Tensor, per_group) -> torch.Tensor:
    """The obvious reference: apply `per_group(r_g, positions)` to each group with a Python loop."""
    out = torch.empty_like(rewards)
    for group in index.unique().tolist():
        positions = (index == group).nonzero().flatten()
        out[positions] = per_group(rewards[positions], positions)
    return out


# --- design.md §5 reference vectors -------------------------------------------------------------------


def test_grpo_reference_vector() -> None:
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5])
    torch.testing.assert_close(grpo(R_1000, ONE_GROUP), expected, atol=1e-5, rtol=0)


def test_dr_grpo_reference_vector() -> None:
    torch.testing.assert_close(dr_grpo(R_1000, ONE_GROUP), torch.tensor([0.75, -0.25, -0.25, -0.25]))
    torch.testing.assert_close(
        grpo(R_1000, ONE_GROUP, norm_by_std=False), torch.tensor([0.75, -0.25, -0.25, -0.25])
    )


def test_rloo_reference_vector() -> None:
    torch.testing.assert_close(rloo(R_1000, ONE_GROUP), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


def test_median_baseline_hand_computed() -> None:
    torch.testing.assert_close(mc_grpo(R_1000, ONE_GROUP), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # Even group: median of [1, 2, 4, 10] is 3; the outlier 10 does not move it.
    rewards = torch.tensor([10.0, 1.0, 4.0, 2.0])
    torch.testing.assert_close(mc_grpo(rewards, ONE_GROUP), torch.tensor([7.0, -2.0, 1.0, -1.0]))


def test_reinforce_pp_baseline_hand_computed() -> None:
    # r - mean = [.75, -.25, -.25, -.25]; mean 0, Bessel var = (0.5625 + 3 * 0.0625) / 3 = 0.25.
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / math.sqrt(0.25 + 1e-8)
    torch.testing.assert_close(reinforce_pp_baseline(R_1000, ONE_GROUP), expected)


def verl_masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's token-level masked_whiten, written out on the [N, L] token matrix."""
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / mask.sum()
    var = var * mask.sum() / (mask.sum() - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


@pytest.mark.parametrize("estimator", [reinforce_pp_baseline, reinforce_pp])
def test_reinforce_pp_equals_token_level_whitening(estimator) -> None:
    rewards, index = random_batch(3)
    lengths = torch.randint(0, 9, rewards.shape, generator=torch.Generator().manual_seed(4))
    mask = (torch.arange(8)[None, :] < lengths[:, None]).double()  # [N, 8]
    centered = grpo(rewards, index, norm_by_std=False) if estimator is reinforce_pp_baseline else rewards
    expected = verl_masked_whiten(centered[:, None].expand(-1, 8), mask)  # [N, 8]
    got = estimator(rewards, index, token_counts=lengths)  # [N]
    torch.testing.assert_close(got[:, None] * mask, expected)
    assert bool((got[lengths == 0] == 0).all())


# --- loop vs vectorised --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_group_estimators_match_python_loop(seed: int) -> None:
    rewards, index = random_batch(seed)

    def grpo_ref(r: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return r / (1 + 1e-6) if r.numel() == 1 else (r - r.mean()) / (r.std() + 1e-6)

    def rloo_ref(r: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        if r.numel() == 1:
            return torch.zeros_like(r)
        return torch.stack([r[i] - torch.cat([r[:i], r[i + 1 :]]).mean() for i in range(r.numel())])

    def median_ref(r: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return r - float(torch.tensor(sorted(r.tolist())).quantile(0.5, interpolation="midpoint"))

    torch.testing.assert_close(grpo(rewards, index), loop_by_group(rewards, index, grpo_ref))
    torch.testing.assert_close(rloo(rewards, index), loop_by_group(rewards, index, rloo_ref))
    torch.testing.assert_close(mc_grpo(rewards, index), loop_by_group(rewards, index, median_ref))
    dr_ref = loop_by_group(rewards, index, lambda r, _: r if r.numel() == 1 else r - r.mean())
    torch.testing.assert_close(dr_grpo(rewards, index), dr_ref)


@pytest.mark.parametrize("scale", ["bernoulli", "group_std", "none"])
@pytest.mark.parametrize("seed", range(3))
def test_v05_matches_python_loop(seed: int, scale: str) -> None:
    rewards, index = random_batch(seed, pm_one=True)
    g = torch.Generator().manual_seed(100 + seed)
    prior_of = {group: float(torch.rand(1, generator=g)) * 2 - 1 for group in index.unique().tolist()}
    prior = torch.tensor([prior_of[i] for i in index.tolist()], dtype=torch.float64)

    def v05_ref(r: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        k, mean, v = r.numel(), float(r.mean()), float(prior[positions[0]])
        delta2 = max(0.0, (mean - v) ** 2 - 1 / k)
        w = delta2 / (delta2 + 1 / k)
        b = w * mean + (1 - w) * v
        if scale == "bernoulli":
            s = math.sqrt(max(1e-2, 1 - b * b))
        elif scale == "group_std":
            s = 1.0 if k == 1 else math.sqrt(max(1e-2, float(r.var())))
        else:
            s = 1.0
        return (r - b) / s

    expected = loop_by_group(rewards, index, v05_ref)
    torch.testing.assert_close(v05(rewards, index, prior=prior, scale=scale), expected)


def basis_shift_reference(y: torch.Tensor, logit0: torch.Tensor, keep: torch.Tensor) -> float:
    """Brute-force least-squares logit shift over the kept responses on a 0.001-step grid."""
    grid = torch.arange(-20.0, 20.0005, 0.001, dtype=torch.float64)
    pred = torch.sigmoid(logit0[keep][None, :] + grid[:, None])
    return float(grid[((y[keep][None, :] - pred) ** 2).sum(dim=1).argmin()])


@pytest.mark.parametrize("seed", range(3))
def test_basis_baseline_matches_brute_force_loop(seed: int) -> None:
    rewards, index = random_batch(seed, groups=9, pm_one=True)
    g = torch.Generator().manual_seed(200 + seed)
    prior_of = {group: float(torch.rand(1, generator=g)) * 1.8 - 0.9 for group in index.unique().tolist()}
    prior = torch.tensor([prior_of[i] for i in index.tolist()], dtype=torch.float64)
    y = (rewards + 1) / 2
    logit0 = torch.logit(((prior + 1) / 2).clamp(1e-4, 1 - 1e-4))

    def basis_ref(_: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        keep = index != index[positions[0]]
        shift = basis_shift_reference(y, logit0, keep)
        return 2 * torch.sigmoid(logit0[positions] + shift).clamp(1e-4, 1 - 1e-4) - 1

    expected = loop_by_group(rewards, index, basis_ref)
    torch.testing.assert_close(basis_baseline(rewards, index, prior), expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(basis(rewards, index, prior=prior), rewards - expected, atol=2e-3, rtol=0)


def test_basis_recovers_a_known_logit_shift() -> None:
    g = torch.Generator().manual_seed(0)
    n = 4000
    p_prior = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    p_true = torch.sigmoid(torch.logit(p_prior) + 1.0)  # the policy is better than the prior says
    rewards = (torch.rand(n, generator=g, dtype=torch.float64) < p_true).double() * 2 - 1
    baseline = basis_baseline(rewards, torch.arange(n), 2 * p_prior - 1)
    torch.testing.assert_close(baseline, 2 * p_true - 1, atol=0.03, rtol=0)


def test_basis_own_reward_does_not_enter_own_baseline() -> None:
    rewards, index = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0]), torch.arange(5)
    prior = torch.tensor([0.2, -0.4, 0.6, 0.0, 0.3])
    flipped = rewards.clone()
    flipped[2] = -1.0
    assert basis_baseline(rewards, index, prior)[2] == basis_baseline(flipped, index, prior)[2]


@pytest.mark.parametrize("outcome", [-1.0, 1.0])
def test_basis_on_a_one_outcome_batch_takes_the_fits_limit(outcome: float) -> None:
    # Every rollout failed (or succeeded): the least-squares shift runs to the grid's end, so every
    # baseline sits at the outcome and no advantage pushes on noise. Clamping the fit's predictions made
    # the objective flat there and float rounding picked b = -0.866 for the prompt V0 rated 0.98.
    p = torch.tensor([0.98] + [0.02] * 15, dtype=torch.float64)
    prior = -outcome * (2 * p - 1)  # group 0's prior bets on the other outcome
    baseline = basis_baseline(torch.full((16,), outcome, dtype=torch.float64), torch.arange(16), prior)
    torch.testing.assert_close(baseline, torch.full((16,), outcome * (1 - 2e-4), dtype=torch.float64))


@pytest.mark.parametrize("p_rest", [0.9995, 1.0])
def test_basis_shift_is_the_argmin_when_the_other_groups_fit_almost_perfectly(p_rest: float) -> None:
    # 15 prompts V0 rated (near-)certain all succeeded; the 16th, rated (near-)hopeless, failed. Its
    # leave-one-out objective is ~1e-25 at the fit's limit under a batch total ~1: computed as
    # total - own, float rounding picked the shift (b = 0.9725 for p = 0.9995, 0.4679 for p = 1).
    rewards = torch.tensor([-1.0] + [1.0] * 15, dtype=torch.float64)
    p = torch.tensor([1 - p_rest] + [p_rest] * 15, dtype=torch.float64)
    y, logit0 = (rewards + 1) / 2, torch.logit(p.clamp(1e-4, 1 - 1e-4))
    shift = basis_shift_reference(y, logit0, torch.arange(16) != 0)
    expected = 2 * torch.sigmoid(logit0[0] + shift).clamp(1e-4, 1 - 1e-4) - 1
    got = basis_baseline(rewards, torch.arange(16), 2 * p - 1)
    assert float(got[0]) == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_basis_baseline_is_odd_under_the_outcome_mirror(seed: int) -> None:
    # (r, V) -> (-r, -V) maps the least-squares objective onto itself with delta -> -delta, so b -> -b.
    # Confident priors that the outcomes confirm: the leave-one-out objectives are tiny (seeds 0 and 2
    # broke the symmetry by 4e-3 and 2e-3 when rounding picked the shift).
    g = torch.Generator().manual_seed(seed)
    p = torch.sigmoid(torch.rand(8, generator=g, dtype=torch.float64) * 8 + 2)  # confident successes
    p[0] = 1 - p[0]  # ... and one confident failure
    rewards = torch.tensor([-1.0] + [1.0] * 7, dtype=torch.float64)
    index, prior = torch.arange(8), 2 * p - 1
    mirrored = basis_baseline(-rewards, index, -prior)
    torch.testing.assert_close(mirrored, -basis_baseline(rewards, index, prior), atol=1e-6, rtol=0)


def test_basis_single_group_uses_the_prior() -> None:
    prior = torch.full((3,), 0.5)
    baseline = basis_baseline(torch.tensor([1.0, 1.0, -1.0]), torch.zeros(3, dtype=torch.long), prior)
    torch.testing.assert_close(baseline, prior)


# --- group-of-size-1 conventions -------------------------------------------------------------------------


def test_singleton_group_conventions() -> None:
    rewards, index = torch.tensor([0.7, -1.0]), torch.tensor([5, 9])
    torch.testing.assert_close(grpo(rewards, index), rewards / (1 + 1e-6))  # verl: mean 0, std 1
    torch.testing.assert_close(dr_grpo(rewards, index), rewards)
    torch.testing.assert_close(rloo(rewards, index), torch.zeros(2))
    torch.testing.assert_close(mc_grpo(rewards, index), torch.zeros(2))
    torch.testing.assert_close(reinforce_pp_baseline(rewards, index), reinforce_pp(rewards, index))
    # v05 with k = 1: |r - V| <= 1 keeps the prior, so b = V.
    prior = torch.tensor([0.5, -0.5])
    torch.testing.assert_close(v05(rewards, index, prior=prior, scale="none"), rewards - prior)
    assert not dynamic_sampling_mask(rewards, index).any()


# --- V0.5 fused baseline -------------------------------------------------------------------------------


def test_fused_baseline_pinned_cases() -> None:
    # V = +1, k = 4: rewards [1,1,1,-1] -> r̄ 0.5, (0.5 - 1)^2 = 1/4 = 1/k -> w 0, b exactly 1.
    # rewards [1,1,-1,-1] -> r̄ 0, delta2 = 1 - 1/4 = 0.75 -> w 0.75, b 0.25.
    baseline, weight = fused_baseline(torch.tensor([0.5, 0.0]), torch.tensor([4, 4]), torch.ones(2))
    assert baseline.tolist() == [1.0, 0.25]
    assert weight.tolist() == [0.0, 0.75]


def test_v05_pinned_advantages() -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    prior = torch.ones(8)
    got = v05(rewards, index, prior=prior, scale="none")
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, -2.0, 0.75, 0.75, -1.25, -1.25]))
    # Bernoulli scale: b = 1 -> s = sqrt(eps) = 0.1; b = 0.25 -> s = sqrt(1 - 1/16).
    s = math.sqrt(1 - 0.0625)
    expected = torch.tensor([0.0, 0.0, 0.0, -20.0, 0.75 / s, 0.75 / s, -1.25 / s, -1.25 / s])
    torch.testing.assert_close(v05(rewards, index, prior=prior), expected)


def test_v05_all_correct_group_keeps_signal_unlike_grpo() -> None:
    rewards, index, prior = torch.ones(4), ONE_GROUP, torch.zeros(4)
    assert bool((grpo(rewards, index) == 0).all())
    # r̄ = 1, V = 0: delta2 = 0.75, w = 0.75, b = 0.75, A = 0.25 / sqrt(1 - 0.5625).
    torch.testing.assert_close(v05(rewards, index, prior=prior), torch.full((4,), 0.25 / math.sqrt(0.4375)))


def exact_fused_expectation(p: float, prior: float, k: int) -> float:
    """E[b] summed exactly over the Binomial(k, p) number of successes."""
    successes = torch.arange(k + 1, dtype=torch.float64)
    probs = torch.tensor([math.comb(k, s) * p**s * (1 - p) ** (k - s) for s in range(k + 1)])
    means = 2 * successes / k - 1
    baseline, _ = fused_baseline(means, torch.full((k + 1,), k), torch.full((k + 1,), prior))
    return float((probs.double() * baseline).sum())


@settings(max_examples=200, deadline=None)
@given(
    p=st.floats(0.0, 1.0),
    prior=st.floats(-1.0, 1.0),
    k=st.integers(4, 16),
)
def test_fused_baseline_bias_is_bounded_for_any_prior(p: float, prior: float, k: int) -> None:
    assert abs(exact_fused_expectation(p, prior, k) - (2 * p - 1)) <= 1 / math.sqrt(k) + 1e-9


def exact_rejection_rate(p: float, prior: float, k: int) -> float:
    """P(w > 0) summed exactly over the Binomial(k, p) number of successes."""
    probs = torch.tensor([math.comb(k, s) * p**s * (1 - p) ** (k - s) for s in range(k + 1)])
    means = 2 * torch.arange(k + 1, dtype=torch.float64) / k - 1
    _, weight = fused_baseline(means, torch.full((k + 1,), k), torch.full((k + 1,), prior))
    return float((probs.double() * (weight > 0).double()).sum())


def test_a_perfect_prior_is_kept_for_certain_only_at_p_0_or_1() -> None:
    # The test has no nominal alpha: with V = mu exactly it rejects when |r̄ - mu| > 1/sqrt(k), i.e.
    # P(|Z| > 1/sqrt(1 - mu^2)) in the limit (0.317 at mu = 0). A deterministic policy never rejects;
    # at k = 4 and p = 1/2 only r̄ = ±1 rejects (2/16), so a perfect prior still gets OSLA rollouts.
    assert exact_rejection_rate(0.0, -1.0, 4) == 0.0 and exact_rejection_rate(1.0, 1.0, 4) == 0.0
    assert exact_rejection_rate(0.5, 0.0, 4) == pytest.approx(2 / 16, abs=1e-12)
    assert exact_rejection_rate(0.5, 0.0, 16) == pytest.approx(0.2101, abs=1e-4)
    assert exact_rejection_rate(0.5, 1.0, 4) == pytest.approx(11 / 16, abs=1e-12)  # adversarial: r̄ <= 0


@settings(max_examples=200, deadline=None)
@given(
    mean=st.floats(-1.0, 1.0),
    prior=st.floats(-1.0, 1.0),
    k=st.integers(1, 64),
)
def test_fused_weight_is_zero_inside_the_test_region(mean: float, prior: float, k: int) -> None:
    baseline, weight = fused_baseline(
        torch.tensor([mean], dtype=torch.float64),
        torch.tensor([k]),
        torch.tensor([prior], dtype=torch.float64),
    )
    if (mean - prior) ** 2 <= 1 / k:
        assert float(weight) == 0.0
        assert float(baseline) == pytest.approx(prior, abs=1e-12)
    else:
        assert 0.0 < float(weight) < 1.0
    assert abs(float(baseline) - mean) <= 1 / math.sqrt(k) + 1e-12


# --- OSLA budget -----------------------------------------------------------------------------------------


def test_k_max_for_paper_default() -> None:
    assert k_max_for(0.0039) == 16
    assert k_max_for(1 / 256) == 16
    assert k_max_for(0.01) == 10


def test_osla_hand_computed_round() -> None:
    counts = torch.tensor([0, 4, 4, 4, 8])
    means = torch.tensor([float("nan"), 0.5, 0.0, -1.0, 0.0])  # NaN ignored where counts == 0
    priors = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.9])
    # p0: top-up to 4. p1: delta2 = 0 -> stop. p2: delta2 .75 -> N* 14.67 -> 15 -> +11.
    # p3: delta2 3.75 -> N* 15.73 -> 16 -> +12. p4: delta2 .81 - .125 = .685 -> N* 14.54 -> 15 -> +7.
    assert osla_extra_rollouts(counts, means, priors).tolist() == [4, 0, 11, 12, 7]
    # pad_to 8: total 34 -> 40; six more go to the largest gap (p0: 16 - 4 = 12 left).
    assert osla_extra_rollouts(counts, means, priors, pad_to=8).tolist() == [10, 0, 11, 12, 7]


def test_osla_padding_spreads_by_gap_and_stops_at_k_max() -> None:
    counts, means, priors = torch.tensor([4, 4]), torch.tensor([-1.0, 0.0]), torch.ones(2)
    base = osla_extra_rollouts(counts, means, priors)  # [12, 11]
    assert base.tolist() == [12, 11]
    # total 23 -> pad to 25: p1 has the larger gap (1) ... then both at k_max: pad as far as possible.
    assert osla_extra_rollouts(counts, means, priors, pad_to=5).tolist() == [12, 12]
    assert osla_extra_rollouts(counts, means, priors, pad_to=64).tolist() == [12, 12]


def test_osla_min_active_frac_skips_round_but_never_the_top_up() -> None:
    counts, priors = torch.tensor([4, 4, 4, 4]), torch.ones(4)
    means = torch.tensor([1.0, 1.0, 1.0, -1.0])  # one active prompt of four
    assert osla_extra_rollouts(counts, means, priors, min_active_frac=0.25).tolist() == [0, 0, 0, 12]
    assert osla_extra_rollouts(counts, means, priors, min_active_frac=0.3).tolist() == [0, 0, 0, 0]
    fresh = torch.tensor([0, 4, 4, 4])
    assert osla_extra_rollouts(fresh, means, priors, min_active_frac=0.9).tolist() == [4, 0, 0, 12]


def test_osla_loop_terminates_with_stop_or_k_max() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.rand(500, generator=g, dtype=torch.float64)
    priors = (2 * p - 1 + torch.randn(500, generator=g, dtype=torch.float64) * 0.5).clamp(-1, 1)
    counts, sums = torch.zeros(500, dtype=torch.long), torch.zeros(500, dtype=torch.float64)
    for _ in range(20):
        means = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
        extra = osla_extra_rollouts(counts, means, priors, pad_to=8)
        if not extra.any():
            break
        successes = torch.binomial(extra.double(), p, generator=g)
        sums += 2 * successes - extra
        counts += extra
    else:
        pytest.fail("OSLA did not stop within 20 rounds")
    assert int(counts.min()) >= 4 and int(counts.max()) <= 16


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 20), st.integers(0, 20), st.floats(-1.0, 1.0)), min_size=1, max_size=12
    ),
    pad_to=st.integers(1, 16),
    c=st.sampled_from([0.0039, 0.01, 0.02, 0.05]),
)
def test_osla_never_exceeds_k_max_and_stops_when_delta2_is_zero(data, pad_to: int, c: float) -> None:
    k_max = k_max_for(c)
    counts = torch.tensor([min(k, 20) for k, _, _ in data])
    successes = torch.tensor([min(s, k) for (k, s, _) in data])
    means = torch.where(counts > 0, 2 * successes.double() / counts.clamp(min=1) - 1, 0.0)
    priors = torch.tensor([v for _, _, v in data], dtype=torch.float64)
    extra = osla_extra_rollouts(counts, means, priors, c=c, pad_to=pad_to)
    assert bool((extra >= 0).all())
    assert bool((counts + extra <= torch.clamp(counts, min=k_max)).all())
    unpadded = osla_extra_rollouts(counts, means, priors, c=c)
    delta2 = ((means - priors) ** 2 - 1 / counts.clamp(min=1)).clamp(min=0)
    settled = (counts >= 4) & (delta2 == 0)
    assert bool((unpadded[settled] == 0).all())
    assert bool((extra[unpadded == 0] == 0).all())  # padding only tops up active prompts


# --- dynamic sampling ----------------------------------------------------------------------------------


def test_dynamic_sampling_mask() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    index = torch.tensor([3, 3, 7, 7, 9, 9, 11])
    assert dynamic_sampling_mask(rewards, index).tolist() == [False, False, True, True, False, False, False]


# --- registry and dispatch ----------------------------------------------------------------------------


def test_registry_entries_share_one_signature() -> None:
    for name, spec in ESTIMATORS.items():
        params = list(inspect.signature(spec.fn).parameters.values())
        assert [p.name for p in params[:2]] == ["rewards", "index"], name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:]), name
        needs_prior = any(p.name == "prior" for p in params[2:])
        assert needs_prior == spec.needs_prior, name
        assert spec.min_group_size >= 1 and spec.description
    assert ESTIMATORS["v05"].min_group_size == 4
    assert ESTIMATORS["basis"].min_group_size == 1
    assert ESTIMATORS["rloo"].min_group_size == 2


# Each name's function, imported directly: comparing with `ESTIMATORS[name].fn` would pass a registry
# that maps a name to another estimator.
ESTIMATOR_FUNCTIONS = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "mc_grpo": mc_grpo,
    "reinforce_pp_baseline": reinforce_pp_baseline,
    "reinforce_pp": reinforce_pp,
    "v05": v05,
    "basis": basis,
}


def test_every_estimator_function_is_registered() -> None:
    assert sorted(ESTIMATOR_FUNCTIONS) == sorted(ESTIMATORS)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_compute_advantages_dispatches_every_estimator(name: str) -> None:
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    options = {"prior": torch.tensor([0.2] * 4 + [-0.3] * 4)} if ESTIMATORS[name].needs_prior else {}
    got = compute_advantages(name, rewards, index, **options)
    torch.testing.assert_close(got, ESTIMATOR_FUNCTIONS[name](rewards, index, **options))
    assert got.shape == rewards.shape and bool(torch.isfinite(got).all())


def test_compute_advantages_rejects_unknown_name_and_options() -> None:
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*grpo"):
        compute_advantages("ppo", R_1000, ONE_GROUP)
    with pytest.raises(ValueError, match=r"unknown option.*temperature.*'grpo'"):
        compute_advantages("grpo", R_1000, ONE_GROUP, temperature=1.0)
    with pytest.raises(ValueError, match=r"requires option.*prior"):
        compute_advantages("v05", R_1000, ONE_GROUP)


# --- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rewards", "index", "match"),
    [
        (torch.ones(3), torch.zeros(4, dtype=torch.long), "same shape"),
        (torch.ones(0), torch.zeros(0, dtype=torch.long), "empty"),
        (torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.long), "finite.*position 1"),
        (torch.tensor([1.0, float("inf")]), torch.zeros(2, dtype=torch.long), "finite"),
        (torch.ones(2), torch.zeros(2), "index must be an integer"),
        (torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.long), "1-D"),
        (torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), "floating"),
    ],
)
@pytest.mark.parametrize("name", ["grpo", "rloo", "mc_grpo", "reinforce_pp"])
def test_bad_rewards_or_index_raise(name: str, rewards, index, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_advantages(name, rewards, index)


@pytest.mark.parametrize("estimator", [v05, basis])
def test_prior_estimators_reject_bad_prior_and_rewards(estimator) -> None:
    index = torch.tensor([0, 0, 1, 1])
    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"prior must lie in \[-1.0, 1.0\].*position 2"):
        estimator(rewards, index, prior=torch.tensor([0.0, 0.0, 1.5, 1.5]))
    with pytest.raises(ValueError, match=r"prior must be constant within a group.*response 2"):
        estimator(rewards, index, prior=torch.tensor([0.0, 0.0, 0.1, 0.2]))
    with pytest.raises(ValueError, match="prior must have one entry per response"):
        estimator(rewards, index, prior=torch.zeros(3))
    with pytest.raises(ValueError, match="prior must be finite"):
        estimator(rewards, index, prior=torch.tensor([float("nan")] * 4))
    with pytest.raises(ValueError, match=r"rewards must lie in \[-1.0, 1.0\].*position 1"):
        estimator(torch.tensor([1.0, 2.0, 1.0, 1.0]), index, prior=torch.zeros(4))
    with pytest.raises(ValueError, match="scale must be one of"):
        estimator(rewards, index, prior=torch.zeros(4), scale="tanh")
    with pytest.raises(ValueError, match="eps must be > 0"):
        estimator(rewards, index, prior=torch.zeros(4), scale="bernoulli", eps=0.0)


def test_token_counts_validation() -> None:
    with pytest.raises(ValueError, match="token_counts must have one entry per response"):
        reinforce_pp(R_1000, ONE_GROUP, token_counts=torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="token_counts must be an integer"):
        reinforce_pp(R_1000, ONE_GROUP, token_counts=torch.ones(4))
    with pytest.raises(ValueError, match="token_counts must be >= 0"):
        reinforce_pp(R_1000, ONE_GROUP, token_counts=torch.tensor([1, -1, 1, 1]))
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        reinforce_pp(R_1000, ONE_GROUP, token_counts=torch.tensor([1, 0, 0, 0]))


def test_fused_baseline_bad_input() -> None:
    ones = torch.ones(2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        fused_baseline(ones * 0.5, torch.tensor([4, 0]), ones)
    with pytest.raises(ValueError, match="same shape"):
        fused_baseline(ones, torch.tensor([4]), ones)
    with pytest.raises(ValueError, match=r"prior must lie in \[-1.0, 1.0\]"):
        fused_baseline(ones * 0.5, torch.tensor([4, 4]), torch.tensor([1.0, -1.1]))
    with pytest.raises(ValueError, match=r"reward_mean must lie in \[-1.0, 1.0\]"):
        fused_baseline(torch.tensor([0.5, 1.5]), torch.tensor([4, 4]), ones)
    with pytest.raises(ValueError, match="reward_mean must be finite"):
        fused_baseline(torch.tensor([0.5, float("nan")]), torch.tensor([4, 4]), ones)
    with pytest.raises(ValueError, match="empty"):
        fused_baseline(torch.ones(0), torch.ones(0), torch.ones(0))


def test_osla_bad_input() -> None:
    counts, means, priors = torch.tensor([4, 4]), torch.zeros(2), torch.zeros(2)
    with pytest.raises(ValueError, match="same shape"):
        osla_extra_rollouts(counts, torch.zeros(3), priors)
    with pytest.raises(ValueError, match="empty"):
        osla_extra_rollouts(torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="counts must be an integer"):
        osla_extra_rollouts(counts.float(), means, priors)
    with pytest.raises(ValueError, match="counts must be >= 0"):
        osla_extra_rollouts(torch.tensor([4, -1]), means, priors)
    with pytest.raises(ValueError, match="reward_means must be finite"):
        osla_extra_rollouts(counts, torch.tensor([0.0, float("nan")]), priors)
    with pytest.raises(ValueError, match=r"priors must lie in \[-1.0, 1.0\]"):
        osla_extra_rollouts(counts, means, torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match=r"c \(cost per rollout\) must lie in"):
        osla_extra_rollouts(counts, means, priors, c=0.0)
    with pytest.raises(ValueError, match="k_init must lie in"):
        osla_extra_rollouts(counts, means, priors, k_init=17)
    with pytest.raises(ValueError, match="pad_to must be >= 1"):
        osla_extra_rollouts(counts, means, priors, pad_to=0)
    with pytest.raises(ValueError, match="min_active_frac must lie in"):
        osla_extra_rollouts(counts, means, priors, min_active_frac=1.5)
