"""Tests for basis.losses: hand-computed PPO-clip / dual-clip values, a per-token reference loop,
micro-batch accumulation, KL estimators, truncated IS and entropy stability."""

from __future__ import annotations

import math

import pytest
import torch

from basis.losses import (
    AGG_MODES,
    aggregate_loss,
    entropy_from_log_probs,
    entropy_from_logits,
    kl_penalty,
    logprob_mismatch,
    policy_loss,
    token_logprobs,
    truncated_is_weights,
)


def logprobs_with_ratios(ratios: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.full((len(ratios), len(ratios[0])), -1.0, dtype=torch.float64)
    new = (old + torch.tensor(ratios, dtype=torch.float64).log()).requires_grad_()
    return new, old


def test_ppo_clip_hand_computed_positive_advantage() -> None:
    new, old = logprobs_with_ratios([[1.0, 1.5, 0.5]])
    out = policy_loss(new, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool))
    # per token: -1; max(-1.5, -1.2) = -1.2 (clipped high); max(-0.5, -0.8) = -0.5.
    assert out.loss.item() == pytest.approx((-1.0 - 1.2 - 0.5) / 3)
    assert out.clip_frac.item() == pytest.approx(1 / 3)
    assert out.clip_frac_high.item() == pytest.approx(1 / 3)
    assert out.clip_frac_low.item() == 0.0
    assert out.dual_clip_frac.item() == 0.0
    out.loss.backward()
    # d/dlogp of -A rho = -A rho / 3 on unclipped tokens; the clipped token gets no gradient.
    torch.testing.assert_close(new.grad, torch.tensor([[-1 / 3, 0.0, -0.5 / 3]], dtype=torch.float64))


def test_ppo_clip_hand_computed_negative_advantage_with_dual_clip() -> None:
    new, old = logprobs_with_ratios([[1.0, 1.5, 0.5, 4.0]])
    out = policy_loss(new, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 4))
    # 1; max(1.5, 1.2) = 1.5; max(0.5, 0.8) = 0.8 (clipped low); min(max(4, 1.2), 3) = 3 (dual clip).
    assert out.loss.item() == pytest.approx((1.0 + 1.5 + 0.8 + 3.0) / 4)
    assert out.clip_frac.item() == pytest.approx(1 / 4)
    assert out.clip_frac_low.item() == pytest.approx(1 / 4)
    assert out.clip_frac_high.item() == 0.0
    assert out.dual_clip_frac.item() == pytest.approx(1 / 4)
    out.loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[1.0, 1.5, 0.0, 0.0]], dtype=torch.float64) / 4)


def test_dapo_clip_higher_hand_computed() -> None:
    """design.md §5 DAPO clip-higher (eps_low 0.2, eps_high 0.28): asymmetric per sign of A."""
    new, old = logprobs_with_ratios([[1.25, 1.3, 0.75, 0.85], [1.25, 1.3, 0.75, 0.85]])
    adv = torch.tensor([2.0, -2.0], dtype=torch.float64)
    out = policy_loss(new, old, adv, torch.ones(2, 4), eps_low=0.2, eps_high=0.28, agg="seq-mean-token-sum")
    # A = 2: -2.5 (1.25 < 1.28, not clipped), -2.56 (clipped high), -1.5, -1.7 (no low clip for A > 0).
    # A = -2: 2.5, 2.6 (no high clip for A < 0), 1.6 (0.75 clipped low to 0.8), 1.7.
    assert out.loss.item() == pytest.approx(((-2.5 - 2.56 - 1.5 - 1.7) + (2.5 + 2.6 + 1.6 + 1.7)) / 2)
    assert out.clip_frac_high.item() == pytest.approx(1 / 8)
    assert out.clip_frac_low.item() == pytest.approx(1 / 8)
    out.loss.backward()
    expected = torch.tensor([[-2.5, 0.0, -1.5, -1.7], [2.5, 2.6, 0.0, 1.7]], dtype=torch.float64) / 2
    torch.testing.assert_close(new.grad, expected)
    # Symmetric eps 0.2 would clip the first token of the first row: clip-higher is what keeps its gradient.
    symmetric = policy_loss(new, old, adv, torch.ones(2, 4), agg="seq-mean-token-sum")
    assert symmetric.clip_frac_high.item() == pytest.approx(2 / 8)


def reference_token_loss(
    logp: float, old: float, adv: float, eps_low: float, eps_high: float, c: float
) -> float:
    """verl's compute_policy_loss for one token, written with Python floats."""
    ratio = math.exp(max(-20.0, min(20.0, logp - old)))
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - eps_low), 1 + eps_high))
    return min(loss, -adv * c) if adv < 0 else loss


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_matches_per_token_reference(agg: str) -> None:
    g = torch.Generator().manual_seed(0)
    b, length = 5, 7
    old = -torch.rand(b, length, generator=g, dtype=torch.float64) * 3
    new = old + torch.randn(b, length, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, length, generator=g) < 0.7
    mask[0] = False  # a sequence without valid tokens
    per_token = torch.tensor(
        [
            [
                reference_token_loss(new[i, t].item(), old[i, t].item(), adv[i].item(), 0.2, 0.28, 3.0)
                for t in range(length)
            ]
            for i in range(b)
        ],
        dtype=torch.float64,
    )
    m = mask.double()
    if agg == "token-mean":
        expected = (per_token * m).sum() / m.sum()
    elif agg == "seq-mean-token-sum":
        expected = (per_token * m).sum(-1).mean()
    else:
        expected = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    out = policy_loss(new, old, adv, mask, eps_high=0.28, agg=agg)
    torch.testing.assert_close(out.loss, expected)
    # Token-level advantages equal to the broadcast per-sequence ones give the same loss.
    out_tokens = policy_loss(new, old, adv[:, None].expand(b, length), mask, eps_high=0.28, agg=agg)
    torch.testing.assert_close(out_tokens.loss, out.loss)
    # Importance weights multiply the per-token loss.
    weights = torch.rand(b, length, generator=g, dtype=torch.float64)
    weighted = policy_loss(new, old, adv, mask, eps_high=0.28, agg=agg, is_weights=weights)
    torch.testing.assert_close(weighted.loss, aggregate_loss(per_token * weights, mask, agg))


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_sum_to_the_mini_batch_loss_and_gradient(agg: str) -> None:
    g = torch.Generator().manual_seed(1)
    b, length = 6, 5
    old = -torch.rand(b, length, generator=g, dtype=torch.float64)
    base = old + torch.randn(b, length, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, length, generator=g) < 0.6
    whole = base.clone().requires_grad_()
    policy_loss(whole, old, adv, mask, agg=agg).loss.backward()

    split = base.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for rows in torch.arange(b).split(2):
        out = policy_loss(
            split[rows], old[rows], adv[rows], mask[rows], agg=agg,
            num_tokens=float(mask.sum()), num_sequences=float(b),
        )  # fmt: skip
        out.loss.backward()
        total += out.loss.detach()
    full = policy_loss(base, old, adv, mask, agg=agg).loss
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(split.grad, whole.grad)


def test_aggregate_loss_hand_computed() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate_loss(loss, mask, "token-mean", num_tokens=7.0).item() == pytest.approx(1.0)
    assert aggregate_loss(loss, torch.zeros(2, 3), "token-mean").item() == 0.0


def test_kl_penalty_estimators() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    d = logp - ref
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * d**2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.exp(-d) + d - 1)
    assert bool((kl_penalty(logp, ref, "k3") >= 0).all())
    # Far apart: k3 is clamped to 10 (verl's low_var_kl) instead of exp(50).
    assert kl_penalty(torch.tensor([[-60.0]]), torch.tensor([[-10.0]]), "k3").item() == 10.0


def test_k3_is_unbiased_for_the_kl() -> None:
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(6, generator=g), torch.randn(6, generator=g)
    p, log_p, log_q = p_logits.softmax(0), p_logits.log_softmax(0), q_logits.log_softmax(0)
    exact = float((p * (log_p - log_q)).sum())
    expected_k3 = float((p * kl_penalty(log_p[None], log_q[None], "k3")[0]).sum())  # E_p[k3]
    assert expected_k3 == pytest.approx(exact, abs=1e-6)


def test_k3_clamp_binds_only_far_from_the_reference_and_stops_the_gradient() -> None:
    # k3 = x - log x - 1 with x = q / p reaches 10 at x ~ 13.61 (and x ~ 1.67e-5): verl's clamp.
    ref = torch.zeros(1, 4, dtype=torch.float64)
    logp = (-torch.tensor([[13.5, 13.7, 1.6e-5, 2.0]], dtype=torch.float64).log()).requires_grad_()
    k3 = kl_penalty(logp, ref, "k3")
    assert k3[0, 0].item() < 10.0 and k3[0, 1].item() == 10.0 and k3[0, 2].item() == 10.0
    k3.sum().backward()
    # d k3 / d logp = 1 - q / p inside the clamp, 0 where it binds.
    torch.testing.assert_close(logp.grad, torch.tensor([[1 - 13.5, 0.0, 0.0, 1 - 2.0]], dtype=torch.float64))


def test_truncated_is_weights_and_mismatch() -> None:
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    rollout = torch.tensor([[-1.0, -2.0, -0.5, -500.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    weights = truncated_is_weights(old, rollout, mask)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0, math.exp(-0.5), 0.0]]))
    assert bool(torch.isfinite(truncated_is_weights(old, rollout, torch.ones(1, 4))).all())
    assert truncated_is_weights(old, rollout, mask, cap=1.2)[0, 1].item() == pytest.approx(1.2)
    assert logprob_mismatch(old, rollout, mask).item() == pytest.approx((0 + 1.0 + 0.5) / 3)
    requires = old.clone().requires_grad_()
    assert not truncated_is_weights(requires, rollout, mask).requires_grad


def test_entropy_from_logits_is_exact_and_stable() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g, dtype=torch.float64)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    torch.testing.assert_close(entropy_from_logits(torch.zeros(1, 1, 8)), torch.full((1, 1), math.log(8)))
    huge = torch.tensor([[[1e4, 0.0, -1e4]]])
    assert entropy_from_logits(huge).item() == pytest.approx(0.0, abs=1e-6)
    masked = torch.tensor([[[0.0, 0.0, -float("inf"), -float("inf")]]], requires_grad=True)
    value = entropy_from_logits(masked)
    assert value.item() == pytest.approx(math.log(2))
    value.sum().backward()
    assert bool(torch.isfinite(masked.grad).all())


@pytest.mark.parametrize("chunk_elements", [11, 40, 2**24])
def test_token_logprobs_are_the_recipes_numbers_bit_for_bit(chunk_elements: int) -> None:
    """Chunks of one position, of three and a half, and all at once: log-probs and gradients equal to
    `log_softmax(logits).gather(targets)`'s exactly, so chunking never moves a training run."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=generator) * 4).requires_grad_()
    targets = torch.randint(0, 11, (3, 5), generator=generator)
    weights = torch.randn(3, 5, generator=generator)
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    picked, entropy = token_logprobs(logits, targets, with_entropy=True, chunk_elements=chunk_elements)
    (grad,) = torch.autograd.grad((picked * weights).sum(), logits)
    assert torch.equal(picked, expected) and torch.equal(grad, expected_grad)
    assert entropy is not None and not entropy.requires_grad
    torch.testing.assert_close(entropy, entropy_from_logits(logits.detach()))
    assert token_logprobs(logits, targets)[1] is None
    with pytest.raises(
        ValueError, match=r"logits \(3, 5, 11\) must be targets \(3, 4\) plus a vocabulary axis"
    ):
        token_logprobs(logits, targets[:, :4])


def test_entropy_in_chunks_is_the_entropy() -> None:
    """A chunk of one position (11 entries) or of three and a half: the value and gradient of one piece."""
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_p = torch.log_softmax(logits, -1).requires_grad_()
    whole = entropy_from_log_probs(log_p)
    (grad,) = torch.autograd.grad(whole.sum(), log_p)
    for chunk_elements in (11, 40):
        pieces = entropy_from_log_probs(log_p, chunk_elements=chunk_elements)
        torch.testing.assert_close(pieces, whole)
        torch.testing.assert_close(torch.autograd.grad(pieces.sum(), log_p)[0], grad)
    assert entropy_from_log_probs(torch.zeros(0, 3, 11)).shape == (0, 3)


# --- bad input -------------------------------------------------------------------------------------------


def test_policy_loss_bad_input() -> None:
    lp, mask, adv = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="logprobs and old_logprobs must have the same shape"):
        policy_loss(lp, torch.zeros(2, 4), adv, mask)
    with pytest.raises(ValueError, match=r"logprobs must be \[B, L\]"):
        policy_loss(torch.zeros(6), torch.zeros(6), adv, torch.ones(6))
    with pytest.raises(ValueError, match="response_mask must have the shape"):
        policy_loss(lp, lp, adv, torch.ones(2, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):
        policy_loss(lp, lp, adv, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, L\]"):
        policy_loss(lp, lp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="eps_low must lie in"):
        policy_loss(lp, lp, adv, mask, eps_low=1.0)
    with pytest.raises(ValueError, match="eps_high must be >= 0"):
        policy_loss(lp, lp, adv, mask, eps_high=-0.1)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        policy_loss(lp, lp, adv, mask, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="agg must be one of"):
        policy_loss(lp, lp, adv, mask, agg="sum")
    with pytest.raises(ValueError, match="num_tokens must be > 0"):
        policy_loss(lp, lp, adv, mask, num_tokens=0.0)
    with pytest.raises(ValueError, match="is_weights must have the shape"):
        policy_loss(lp, lp, adv, mask, is_weights=torch.ones(2))


def test_other_bad_input() -> None:
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kind must be one of"):
        kl_penalty(lp, lp, "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_penalty(lp, torch.zeros(3, 2), "k1")
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(lp, lp, torch.ones(2, 3), cap=0.0)
    with pytest.raises(ValueError, match="response_mask must have the shape"):
        logprob_mismatch(lp, lp, torch.ones(3))
    with pytest.raises(ValueError, match="non-empty last"):
        entropy_from_logits(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="floating point"):
        entropy_from_logits(torch.zeros(2, 3, dtype=torch.long))
