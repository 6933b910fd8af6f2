"""Baseline MSE benchmark: how well each estimator's baseline tracks a prompt's true mean reward.

What it measures: prompts with known success rates p ~ Beta(0.5, 0.5) (U-shaped, like RLVR pass rates),
true mean reward mu = 2p - 1 on the ±1 scale, and a prior V whose error is controlled per scenario:
- `calibrated`:  V = clip(mu + N(0, 0.05^2))
- `noisy`:       V = clip(mu + N(0, 0.3^2))
- `adversarial`: V = -sign(mu), the wrong extreme
For every estimator we draw ±1 rewards, take the baseline the estimator subtracts and report its MSE
against mu (over prompts and repeats) and the mean rollouts spent per prompt:
- `grpo_k4/8/16`: group mean of k rollouts (the Dr. GRPO baseline, `r - dr_grpo(r)`)
- `v05_k4`: V0.5 fused baseline at k = 4 (`r - v05(r, scale="none")`)
- `v05_osla`: k_init 4, then `osla_extra_rollouts` rounds until no prompt asks for more; fused
  baseline at the final k (`fused_baseline`)
- `basis_k1`: one rollout per prompt, batches of 64 prompts, our BASIS reconstruction
  (`r - basis(r, scale="none")`)
- `reinforce_pp_k1`: one rollout per prompt, batch mean of 64 (`r - dr_grpo(r)` with one group)
It also prints, per scenario, the largest |E[b] - mu| of `v05_k4` and `v05_osla` against the bound
1/sqrt(k) (design.md §4; proven for a fixed k, so for OSLA we compare with 1/sqrt(k_init)), and the
exact MSE of grpo_k*, v05_k4 and v05_osla: expectations summed over the binomial distribution of
successes (for OSLA over every reachable (k, successes) path), so only the prompt sample is random.
These exact figures check the simulated ones.

Everything goes through the library functions in `basis.advantages`; nothing is re-implemented.

Run: `.venv/bin/python benchmarks/baseline_mse.py` (or `make bench`); about 10 s on one CPU thread.
Writes `benchmarks/results/baseline_mse.json` shaped
`{scenario: {label: {"mse": float, "rollouts": float, ...}}, "meta": {...}}`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Run as a script (`python benchmarks/baseline_mse.py`), the repository root is not on sys.path and the
# `benchmarks` package is not installed; add the root so `benchmarks.results_io` imports either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basis.advantages import compute_advantages, fused_baseline, osla_extra_rollouts
from benchmarks.results_io import write_results

SEED = 0
PROMPTS = 2048  # a multiple of BATCH
REPEATS = 32
BATCH = 64  # prompts per batch for the single-rollout estimators
K_INIT = 4
K_MAX_GROUP = 16
PRIOR_NOISE = {"calibrated": 0.05, "noisy": 0.3}


def draw_rewards(p: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """±1 rewards `[R, P, k]` for success rates `p [R, P]`."""
    uniform = torch.rand(*p.shape, k, generator=generator, dtype=torch.float64)  # [R, P, k]
    return torch.where(uniform < p[..., None], 1.0, -1.0)  # [R, P, k]


def group_baseline(name: str, rewards: Tensor, **options: Any) -> Tensor:
    """Baseline `r - A` implied by an unscaled estimator, one group per row; `[M, k] -> [M]`."""
    m, k = rewards.shape
    index = torch.arange(m).repeat_interleave(k)  # [M * k]
    flat = rewards.reshape(-1)  # [M * k]
    expanded = {  # per-prompt tensor options (the prior) follow the responses; scalars pass through
        key: value.repeat_interleave(k) if isinstance(value, Tensor) else value
        for key, value in options.items()
    }
    advantages = compute_advantages(name, flat, index, **expanded)  # [M * k]
    return (flat - advantages).reshape(m, k)[:, 0]  # [M]; constant within a group


def batch_baseline(name: str, rewards: Tensor, one_group: bool, **options: Any) -> Tensor:
    """Baseline `r - A` of a single-rollout estimator over batches of BATCH prompts; `[M] -> [M]`."""
    out = torch.empty_like(rewards)  # [M]
    for start in range(0, rewards.numel(), BATCH):
        r = rewards[start : start + BATCH]  # [B]
        index = torch.zeros_like(r, dtype=torch.long) if one_group else torch.arange(r.numel())  # [B]
        sliced = {
            key: value[start : start + BATCH] if isinstance(value, Tensor) else value
            for key, value in options.items()
        }
        out[start : start + BATCH] = r - compute_advantages(name, r, index, **sliced)  # [B]
    return out  # [M]


def osla_baseline(p: Tensor, prior: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """Run OSLA rounds until no prompt asks for more; return (fused baseline [M], final k [M], rounds)."""
    counts = torch.zeros_like(p, dtype=torch.long)  # [M]
    reward_sum = torch.zeros_like(p)  # [M]
    rounds = 0
    while True:
        means = torch.where(counts > 0, reward_sum / counts.clamp(min=1), 0.0)  # [M]
        extra = osla_extra_rollouts(counts, means, prior, k_init=K_INIT)  # [M]
        if not bool(extra.any()):
            break
        successes = torch.binomial(extra.to(p.dtype), p, generator=generator)  # [M]
        reward_sum += 2 * successes - extra  # [M]
        counts += extra  # [M]
        rounds += 1
    baseline, _ = fused_baseline(reward_sum / counts, counts, prior)  # [M]
    return baseline, counts, rounds


def exact_v05_k(p: Tensor, prior: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Fused baseline at fixed k, exactly over Binomial(k, p) successes: (E[b] - mu [P], E[(b - mu)^2] [P])."""
    mu = 2 * p - 1  # [P]
    mean_b, mean_sq = torch.zeros_like(p), torch.zeros_like(p)  # [P], [P]
    for s in range(k + 1):
        weight = math.comb(k, s) * p**s * (1 - p) ** (k - s)  # [P]
        baseline, _ = fused_baseline(torch.full_like(p, 2 * s / k - 1), torch.full_like(p, k), prior)  # [P]
        mean_b += weight * baseline  # [P]
        mean_sq += weight * (baseline - mu) ** 2  # [P]
    return mean_b - mu, mean_sq


def exact_osla(p: Tensor, prior: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """OSLA + fused baseline, exactly over every reachable (k, successes) path of each prompt.

    Each prompt's process is a Markov chain on (k, s): `osla_extra_rollouts` (pad_to 1, so prompts are
    independent) maps a state to its extra rollouts e; e == 0 stops with the fused baseline, otherwise
    s gains Binomial(e, p). Returns (E[b] - mu [P], E[(b - mu)^2] [P], E[k] [P]).
    """
    prompts, size = p.numel(), K_MAX_GROUP + 1
    mu = 2 * p - 1  # [P]
    mass = torch.zeros(prompts, size, size, dtype=p.dtype)  # [P, k, s] probability of a live state
    mass[:, 0, 0] = 1.0
    mean_b, mean_sq, mean_k = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)  # [P] each
    while bool((mass > 0).any()):
        prompt, k, s = (mass > 0).nonzero().unbind(1)  # [M] each
        weight = mass[prompt, k, s]  # [M]
        means = torch.where(k > 0, 2 * s / k.clamp(min=1) - 1, 0.0).to(p.dtype)  # [M]
        extra = osla_extra_rollouts(k, means, prior[prompt], k_init=K_INIT)  # [M]
        stop = extra == 0  # [M]
        if bool(stop.any()):
            baseline, _ = fused_baseline(means[stop], k[stop], prior[prompt[stop]])  # [M_stop]
            w_stop, p_stop = weight[stop], prompt[stop]  # [M_stop]
            mean_b.index_add_(0, p_stop, w_stop * baseline)  # [P]
            mean_sq.index_add_(0, p_stop, w_stop * (baseline - mu[p_stop]) ** 2)  # [P]
            mean_k.index_add_(0, p_stop, w_stop * k[stop].to(p.dtype))  # [P]
        mass = torch.zeros_like(mass)  # [P, k, s]
        go = ~stop  # [M]
        for e in extra[go].unique().tolist():
            rows = go & (extra == e)  # [M]
            q = p[prompt[rows]]  # [M_e]
            for j in range(e + 1):
                prob = math.comb(e, j) * q**j * (1 - q) ** (e - j)  # [M_e]
                mass.index_put_(
                    (prompt[rows], k[rows] + e, s[rows] + j), weight[rows] * prob, accumulate=True
                )
    return mean_b - mu, mean_sq, mean_k


def make_prior(scenario: str, mu: Tensor, generator: torch.Generator) -> Tensor:
    if scenario == "adversarial":
        return torch.where(mu >= 0, -1.0, 1.0).to(mu.dtype)  # [P]
    noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype) * PRIOR_NOISE[scenario]  # [P]
    return (mu + noise).clamp(-1.0, 1.0)  # [P]


def run_scenario(
    scenario: str, p_prompt: Tensor, generator: torch.Generator
) -> tuple[dict[str, dict[str, float]], str]:
    mu_prompt = 2 * p_prompt - 1  # [P]
    prior_prompt = make_prior(scenario, mu_prompt, generator)  # [P]
    p = p_prompt.expand(REPEATS, PROMPTS)  # [R, P]
    mu = mu_prompt.expand(REPEATS, PROMPTS).reshape(-1)  # [M = R * P]
    prior = prior_prompt.expand(REPEATS, PROMPTS).reshape(-1)  # [M]
    rewards = draw_rewards(p, K_MAX_GROUP, generator).reshape(-1, K_MAX_GROUP)  # [M, 16]

    baselines: dict[str, tuple[Tensor, float]] = {}
    for k in (4, 8, 16):
        baselines[f"grpo_k{k}"] = (group_baseline("dr_grpo", rewards[:, :k]), float(k))
    baselines["v05_k4"] = (group_baseline("v05", rewards[:, :4], prior=prior, scale="none"), 4.0)
    osla, counts, rounds = osla_baseline(p.reshape(-1), prior, generator)  # [M], [M]
    baselines["v05_osla"] = (osla, float(counts.double().mean()))
    single = rewards[:, 0]  # [M]; one rollout per prompt
    baselines["basis_k1"] = (batch_baseline("basis", single, one_group=False, prior=prior, scale="none"), 1.0)
    baselines["reinforce_pp_k1"] = (batch_baseline("dr_grpo", single, one_group=True), 1.0)

    results: dict[str, dict[str, float]] = {
        label: {"mse": float(((b - mu) ** 2).mean()), "rollouts": rollouts}
        for label, (b, rollouts) in baselines.items()
    }
    # Exact expectations over the reward draws (only the prompt sample remains random).
    for k in (4, 8, 16):
        results[f"grpo_k{k}"]["mse_exact"] = float(((1 - mu_prompt**2) / k).mean())
    bias_k4, sq_k4 = exact_v05_k(p_prompt, prior_prompt, 4)  # [P], [P]
    results["v05_k4"].update(mse_exact=float(sq_k4.mean()), max_abs_bias=float(bias_k4.abs().max()))
    results["v05_k4"]["bias_bound"] = 1 / math.sqrt(4)
    bias_osla, sq_osla, k_osla = exact_osla(p_prompt, prior_prompt)  # [P] each
    results["v05_osla"].update(
        mse_exact=float(sq_osla.mean()),
        rollouts_exact=float(k_osla.mean()),
        max_abs_bias=float(bias_osla.abs().max()),
        bias_bound=1 / math.sqrt(K_INIT),
    )
    note = (
        f"  max |E[b] - mu| (exact): v05_k4 {float(bias_k4.abs().max()):.4f} vs bound 1/sqrt(4) = 0.5000; "
        f"v05_osla {float(bias_osla.abs().max()):.4f} (k = {int(counts.min())}..{int(counts.max())}, "
        f"{rounds} rounds) vs 1/sqrt(k_init) = 0.5000\n"
        f"  exact MSE: grpo_k16 {results['grpo_k16']['mse_exact']:.5f}, v05_k4 {float(sq_k4.mean()):.5f}, "
        f"v05_osla {float(sq_osla.mean()):.5f} at {float(k_osla.mean()):.2f} rollouts"
    )
    return results, note


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)  # Beta sampling uses the global generator
    generator = torch.Generator().manual_seed(SEED)
    # The same prompts in every scenario; only the prior (and the reward draws) change.
    p_prompt = torch.distributions.Beta(0.5, 0.5).sample((PROMPTS,)).to(torch.float64)  # [P]
    started = time.perf_counter()
    payload: dict[str, Any] = {}
    notes = []
    for scenario in ("calibrated", "noisy", "adversarial"):
        payload[scenario], note = run_scenario(scenario, p_prompt, generator)
        notes.append(f"{scenario}:\n{note}")
    labels = list(payload["calibrated"])
    print(f"Baseline MSE vs true mean reward ({PROMPTS} prompts x {REPEATS} repeats, seed {SEED})")
    header = f"{'estimator':<16}" + "".join(f"{s + ' mse':>17}" for s in payload) + f"{'rollouts':>10}"
    print(header)
    print("-" * len(header))
    for label in labels:
        cells = "".join(f"{payload[s][label]['mse']:>17.5f}" for s in payload)
        rollouts = "/".join(f"{payload[s][label]['rollouts']:.2f}" for s in payload)
        if len({payload[s][label]["rollouts"] for s in payload}) == 1:
            rollouts = f"{payload['calibrated'][label]['rollouts']:.0f}"
        print(f"{label:<16}{cells}  {rollouts:>8}")
    print("(v05_osla rollouts listed per scenario: calibrated/noisy/adversarial)")
    print("\n".join(notes))
    path = write_results("baseline_mse", payload)
    print(f"wrote {path} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
