"""V0.5 in the trainer: support buffer, prior fusion, OSLA budgets, fallbacks – real tiny model and MLflow.

The priors here are test doubles standing in for V0 at known extremes (named as such): the untrained
tiny model essentially never answers, so its true success rate is ~0; `ConstantPrior(0.0)` is then a
perfect prior and `ConstantPrior(1.0)` an adversarial one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from basis.data import PromptDataModule, PromptRow
from basis.policy_io import LoraSettings
from basis.tasks import write_arithmetic_task
from basis.tracking import MLflowLogger
from basis.trainer import PolicyTrainer
from basis.v05 import OslaSettings, PriorCalibrator, SupportBuffer, fit_platt, load_prior


class ConstantPrior:
    """Test double for V0: predicts the same success probability for every query."""

    def __init__(self, p: float) -> None:
        self.p = p
        self.calls = 0
        self.queried: list[str] = []

    def predict(self, context_prompts, context_success, query_prompts) -> torch.Tensor:
        self.calls += 1
        assert len(context_prompts) == len(context_success) > 0
        assert {s >= 0.5 for s in context_success} == {True, False}, "V0 needs a two-class context"
        self.queried += list(query_prompts)
        return torch.full((len(query_prompts),), self.p)

    def prepare(self, prompts) -> None:
        self.prepared = list(prompts)


class BrokenPrior:
    """Test double for a prior that fails at run time: raises first, then returns NaN."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, context_prompts, context_success, query_prompts) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("embedding server down")
        return torch.full((len(query_prompts),), float("nan"))

    def prepare(self, prompts) -> None:
        pass


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("arith")
    write_arithmetic_task(out, seed=0, n_train=64, n_val=8, n_test=8)
    return out


def primed(module: PolicyTrainer) -> PolicyTrainer:
    """Give the support buffer a two-class context so the prior is used from the first step."""
    module.support.add([f"Q{i}" for i in range(8)], [1.0, 0.0] * 4)
    return module


def rows(n: int) -> list[PromptRow]:
    return [PromptRow(f"p{i}", f"{i}+{i}=", str(2 * i), "arith", None) for i in range(n)]


def fit(module: PolicyTrainer, task_dir: Path, tmp_path: Path, steps: int, logger=None) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger or False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=PromptDataModule(str(task_dir), prompts_per_step=4))


def module_for(tiny_lm_path: str, tmp_path: Path, **kwargs) -> PolicyTrainer:
    defaults = dict(
        advantage="v05", group_size=4, max_new_tokens=8, run_dir=str(tmp_path), min_context=4, context_size=8
    )
    return PolicyTrainer(tiny_lm_path, **{**defaults, **kwargs})


def history(name: str, run_id: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, name), key=lambda m: m.step)]


def test_support_buffer_fifo_readiness_sampling_and_state() -> None:
    buffer = SupportBuffer(capacity=4, context_size=3, min_context=2)
    buffer.add(["a", "b"], [0.0, 0.0])
    assert not buffer.ready()  # one class only
    buffer.add(["c", "d", "e"], [1.0, 0.2, 0.9])
    assert len(buffer) == 4 and [p for p, _ in buffer.pairs] == ["b", "c", "d", "e"]
    assert buffer.ready()
    prompts, success = buffer.sample(np.random.default_rng(0))
    assert len(prompts) == 3 and len(set(prompts)) == 3
    assert list(zip(prompts, success)) == [pair for pair in buffer.pairs if pair[0] in prompts]  # kept paired
    restored = SupportBuffer(capacity=4, context_size=3, min_context=2)
    restored.load_state_dict(buffer.state_dict())
    assert list(restored.pairs) == list(buffer.pairs)
    with pytest.raises(ValueError, match="format 0"):
        restored.load_state_dict({"format": 0, "prompts": [], "success": []})


def test_the_buffer_counts_successes_at_the_priors_label_threshold(tiny_lm_path: str, tmp_path: Path) -> None:
    # A prior trained with label_threshold 0.75 reads rates 0.5 and 0.6 as failures: a buffer holding
    # only those cannot serve it a two-class context, whatever the default threshold of 0.5 says.
    prior = ConstantPrior(0.5)
    prior.label_threshold = 0.75
    module = module_for(tiny_lm_path, tmp_path, prior=prior)
    assert module.support.label_threshold == 0.75
    module.support.add([f"q{i}" for i in range(8)], [0.0, 0.5, 0.6, 0.0, 0.5, 0.6, 0.0, 0.5])
    assert not module.support.ready()
    module.support.add(["q8"], [1.0])
    assert module.support.ready()
    assert (
        module_for(tiny_lm_path, tmp_path / "default", prior=ConstantPrior(0.5)).support.label_threshold
        == 0.5
    )


def test_a_context_drawn_with_one_class_at_the_priors_threshold_is_not_served(
    tiny_lm_path: str, tmp_path: Path
) -> None:
    class ThresholdPrior(ConstantPrior):
        label_threshold = 0.75

        def predict(self, context_prompts, context_success, query_prompts) -> torch.Tensor:
            self.contexts.append(list(context_success))
            return torch.full((len(query_prompts),), self.p)

    prior = ThresholdPrior(0.5)
    prior.contexts = []
    module = module_for(tiny_lm_path, tmp_path, prior=prior, min_context=4, context_size=4)
    module.support.add([f"q{i}" for i in range(9)], [1.0] + [0.6] * 8)  # one success at 0.75
    answers = []
    for step in range(20):  # each step draws another context of 4 of the 9 pairs
        module.rl_step = step
        answers.append(module.query_prior(rows(2)))
    assert any(a is None for a in answers) and any(a is not None for a in answers)
    assert all(
        {rate >= 0.75 for rate in c} == {True, False} for c in prior.contexts
    )  # as its head reads them


def test_design_defaults_of_the_support_buffer_and_osla() -> None:
    # design.md §4: a FIFO of capacity 512, 256 pairs per prior query; c = 0.0039 -> k_max 16.
    buffer = SupportBuffer()
    assert (buffer.capacity, buffer.context_size) == (512, 256)
    assert OslaSettings().c == 0.0039 and OslaSettings().k_max == 16


def test_perfect_prior_spends_k_init_and_adversarial_prior_spends_more_within_bound(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    runs = {}
    for label, p in [("perfect", 0.0), ("adversarial", 1.0)]:
        prior = ConstantPrior(p)
        module = primed(
            module_for(tiny_lm_path, tmp_path / label, prior=prior, osla=OslaSettings(), heldout_rollouts=16)
        )
        logger = MLflowLogger(experiment_name="v05-test", run_name=label)
        fit(module, task_dir, tmp_path / label, steps=2, logger=logger)
        assert prior.calls == 2
        assert len(prior.prepared) == 8  # the prompts of steps 1-2, embedded before the first step
        assert set(prior.queried) == set(prior.prepared)
        runs[label] = logger.run_id

    perfect, adversarial = runs["perfect"], runs["adversarial"]
    assert history("v05/rollouts_per_prompt", perfect) == [4.0, 4.0]
    assert history("v05/prior_rejected_frac", perfect) == [0.0, 0.0]
    assert history("train/rollouts", perfect) == [16.0, 16.0]

    spent = history("v05/rollouts_per_prompt", adversarial)
    assert all(k == 16.0 for k in spent)  # rejected at k=4, then OSLA's N* -> k_max = 16
    assert history("v05/prior_rejected_frac", adversarial) == [1.0, 1.0]
    assert history("v05/prior_rejected_frac_k_init", adversarial) == [1.0, 1.0]
    assert history("v05/prior_rejected_frac_k_init", perfect) == [0.0, 0.0]
    assert history("v05/rollouts_at_k_init_frac", perfect) == [1.0, 1.0]  # per step, not only pooled
    assert history("v05/rollouts_per_prompt_p90", adversarial) == [16.0, 16.0]
    assert history("train/rollouts_total", adversarial) == [64.0, 128.0]
    # The untrained policy always fails, so r̄ = held-out mean = -1 and |b - r̄| <= 1/sqrt(k) = 1/4 holds
    # pointwise (design.md §4). For a stochastic policy only the bias |E b - mu| is bounded: the MSE of b
    # can exceed 1/k (k = 16: up to 0.096), and the held-out mean adds its own variance.
    errors = history("v05/baseline_sq_error_heldout", adversarial)
    assert len(errors) == 2 and all(error <= 1 / 16 for error in errors)  # logged every step, within bound
    assert history("v05/prior_sq_error_debiased", perfect) == [0.0, 0.0]  # every rate is 0: no noise term
    assert all(error > 0.85 for error in history("v05/prior_sq_error_debiased", adversarial))  # (1 - ~0)^2


def test_the_debiased_prior_error_removes_the_rates_sampling_noise(tiny_lm_path: str, tmp_path: Path) -> None:
    """Brier against a k-rollout success rate adds mu(1 - mu) / k to the prior's own error, so the same
    prior scored far worse in BASIS (k = 1) than in V0.5 (k = 4-16); the debiased error does not."""
    from basis.trainer import Rollouts

    module = module_for(tiny_lm_path, tmp_path, prior=ConstantPrior(0.5))
    prompts, generator = 20_000, torch.Generator().manual_seed(0)
    for k in (2, 4, 16):
        correct = torch.bernoulli(torch.full((prompts * k,), 0.3), generator=generator)
        index = torch.arange(prompts).repeat_interleave(k)
        rollouts = Rollouts(rows(prompts), [], [], index, correct, 0)
        prior = torch.zeros(prompts)  # p = 0.5 on the ±1 scale
        metrics = module.prior_diagnostics(rollouts, prior, {}, used_baseline=torch.zeros(prompts))
        assert metrics["v05/prior_brier"] == pytest.approx(0.2**2 + 0.21 / k, abs=0.004)
        assert metrics["v05/prior_sq_error_debiased"] == pytest.approx(0.2**2, abs=0.004)


def test_without_a_prior_heldout_rollouts_score_the_group_mean(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    """GRPO ignored `heldout_rollouts`, so the reference arm had no baseline error to compare."""
    module = module_for(tiny_lm_path, tmp_path, advantage="grpo", heldout_rollouts=4)
    logger = MLflowLogger(experiment_name="v05-test", run_name="grpo-heldout")
    fit(module, task_dir, tmp_path, steps=2, logger=logger)
    errors = history("v05/empirical_sq_error_heldout", logger.run_id)
    assert len(errors) == 2 and all(0.0 <= error < 0.25 for error in errors)  # an untrained policy: ~all fail
    assert not history("v05/baseline_sq_error_heldout", logger.run_id)


def test_a_rollout_budget_bounds_the_prompts_the_prior_prepares(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    prior = ConstantPrior(0.0)  # every response fails, so no prompt leaves k_init = 4: 16 per step
    module = primed(module_for(tiny_lm_path, tmp_path, prior=prior, osla=OslaSettings(), max_rollouts=20))
    fit(module, task_dir, tmp_path, steps=50)
    assert (module.rl_step, module.rollouts_total) == (2, 32)
    assert len(prior.prepared) == 8  # steps 1-2 can spend the budget; not the 50 steps max_steps allows


def test_a_lora_v05_osla_run_resumes_from_a_weights_only_checkpoint(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    # the CLI resumes with weights_only=True; the settings objects in the hyperparameters must load
    settings = dict(prior=ConstantPrior(0.0), osla=OslaSettings(), lora=LoraSettings(r=2, alpha=4))
    fit(primed(module_for(tiny_lm_path, tmp_path, **settings)), task_dir, tmp_path, steps=1)
    resumed = module_for(tiny_lm_path, tmp_path, **settings)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(
        resumed,
        datamodule=PromptDataModule(str(task_dir), prompts_per_step=4),
        ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"),
        weights_only=True,
    )
    assert resumed.rl_step == 2 and len(resumed.support) == 16  # step 1's pairs came back with it


def test_held_out_check_samples_the_policy_that_made_the_rollouts(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    module = primed(module_for(tiny_lm_path, tmp_path, prior=ConstantPrior(0.0), heldout_rollouts=4))
    events: list[str] = []
    heldout, update_weights = module.heldout_mean_reward, module.engine.update_weights
    module.heldout_mean_reward = lambda prompts: events.append("heldout") or heldout(prompts)
    module.engine.update_weights = lambda policy: events.append("update") or update_weights(policy)
    fit(module, task_dir, tmp_path, steps=2)
    assert events == ["heldout", "update"] * 2


class OverlapProbePrior(ConstantPrior):
    """Test double for V0 that answers only once the step's first rollouts have started: a step that
    queried the prior before generating would wait here until the timeout and fall back."""

    def __init__(self, p: float, generating: threading.Event) -> None:
        super().__init__(p)
        self.generating = generating

    def predict(self, context_prompts, context_success, query_prompts) -> torch.Tensor:
        if not self.generating.wait(timeout=20):
            raise TimeoutError("the prior was queried before the rollouts started")
        self.generating.clear()
        return super().predict(context_prompts, context_success, query_prompts)


def test_the_prior_query_overlaps_the_first_rollout_round(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    generating = threading.Event()
    prior = OverlapProbePrior(0.0, generating)
    module = primed(module_for(tiny_lm_path, tmp_path, prior=prior, osla=OslaSettings()))
    generate = module.engine.generate
    module.engine.generate = lambda *args: generating.set() or generate(*args)
    logger = MLflowLogger(experiment_name="v05-test")
    fit(module, task_dir, tmp_path, steps=2, logger=logger)
    assert prior.calls == 2
    assert history("v05/prior_used", logger.run_id) == [1.0, 1.0]
    assert history("v05/prior_failures", logger.run_id) == [0.0, 0.0]
    assert len(history("v05/prior_query_seconds", logger.run_id)) == 2
    logged = {f.path for f in MlflowClient().list_artifacts(logger.run_id)}
    assert {"v05_rollouts_per_prompt_hist.png", "v05_fusion_weight_hist.png"} <= logged


def test_a_one_class_draw_from_a_two_class_buffer_falls_back(tiny_lm_path: str, tmp_path: Path) -> None:
    prior = ConstantPrior(0.5)  # asserts that every context it is given has both classes
    module = module_for(tiny_lm_path, tmp_path, prior=prior, context_size=16, support_capacity=64)
    module.support.add([f"Q{i}" for i in range(64)], [1.0] + [0.0] * 63)
    assert module.support.ready()
    served = []
    for step in range(1, 21):
        module.rl_step = step
        served.append(module.query_prior(rows(4)) is not None)
    assert prior.calls == sum(served) and 0 < sum(served) < 20  # P(draw holds the success) = 1/4


def test_without_context_the_step_falls_back_and_logs_it(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    prior = ConstantPrior(0.5)
    module = module_for(tiny_lm_path, tmp_path, prior=prior, osla=OslaSettings())
    logger = MLflowLogger(experiment_name="v05-test")
    fit(module, task_dir, tmp_path, steps=2, logger=logger)
    assert prior.calls == 0  # an untrained model only ever fails: a one-class buffer never serves
    assert history("v05/prior_used", logger.run_id) == [0.0, 0.0]
    assert history("v05/support_size", logger.run_id) == [0.0, 4.0]
    assert len(module.support) == 8


def test_a_failing_prior_falls_back_for_that_step(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    prior = BrokenPrior()
    module = primed(module_for(tiny_lm_path, tmp_path, prior=prior, osla=OslaSettings()))
    logger = MLflowLogger(experiment_name="v05-test")
    fit(module, task_dir, tmp_path, steps=2, logger=logger)
    assert prior.calls == 2
    assert history("v05/prior_failures", logger.run_id) == [1.0, 2.0]
    assert history("v05/prior_used", logger.run_id) == [0.0, 0.0]
    spread = history("train/advantage_std", logger.run_id)
    assert len(spread) == 2 and all(np.isfinite(spread))  # logged each step, not poisoned by the NaN prior


class HangingPrior(ConstantPrior):
    """Test double for a prior that hangs: its first query blocks until `release` is set."""

    def __init__(self, p: float, release: threading.Event) -> None:
        super().__init__(p)
        self.release = release

    def predict(self, context_prompts, context_success, query_prompts) -> torch.Tensor:
        if self.calls == 0:
            self.release.wait(timeout=60)
        return super().predict(context_prompts, context_success, query_prompts)


def test_a_hung_prior_falls_back_until_it_answers_again(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    release = threading.Event()
    prior = HangingPrior(0.0, release)
    module = primed(module_for(tiny_lm_path, tmp_path, prior=prior, osla=OslaSettings(), prior_timeout_s=0.2))
    generate = module.engine.generate

    def generate_then_release(*args):
        if module.rl_step == 2 and not release.is_set():  # step 2 found step 1's query still running
            release.set()
            module._prior_pending.result(timeout=60)
        return generate(*args)

    module.engine.generate = generate_then_release
    logger = MLflowLogger(experiment_name="v05-test")
    fit(module, task_dir, tmp_path, steps=3, logger=logger)
    assert history("v05/prior_used", logger.run_id) == [0.0, 0.0, 1.0]
    assert history("v05/prior_failures", logger.run_id) == [1.0, 2.0, 2.0]
    assert prior.calls == 2  # step 2 did not queue a second query behind the hung one


@pytest.mark.parametrize(("advantage", "k"), [("v05", 4), ("basis", 1), ("grpo", 8)])
def test_group_size_defaults_to_each_estimators_k(
    tiny_lm_path: str, tmp_path: Path, advantage: str, k: int
) -> None:
    module = module_for(
        tiny_lm_path, tmp_path, advantage=advantage, group_size=None, prior=ConstantPrior(0.5)
    )
    assert (
        module.hparams.group_size == module.hparams_initial.group_size == k
    )  # what MLflow and checkpoints get


def test_a_prior_timeout_must_be_positive(tiny_lm_path: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prior_timeout_s=0"):
        module_for(tiny_lm_path, tmp_path, prior=ConstantPrior(0.5), prior_timeout_s=0)


def test_basis_single_rollout_estimator_runs_with_the_prior(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    prior = ConstantPrior(0.3)
    module = primed(module_for(tiny_lm_path, tmp_path, advantage="basis", group_size=1, prior=prior))
    logger = MLflowLogger(experiment_name="v05-test")
    fit(module, task_dir, tmp_path, steps=2, logger=logger)
    assert history("train/rollouts", logger.run_id) == [4.0, 4.0]
    assert history("v05/prior_used", logger.run_id) == [1.0, 1.0]
    assert history("train/zero_variance_groups", logger.run_id) == []  # always 1 for groups of one


def test_basis_diagnostics_score_the_baseline_basis_used(tiny_lm_path: str, tmp_path: Path) -> None:
    """At k = 1 V0.5's fused baseline is the raw prior; BASIS subtracts its shifted prior instead."""
    from basis.rollout import Completion
    from basis.trainer import Rollouts

    module = module_for(tiny_lm_path, tmp_path, advantage="basis", group_size=1, prior=ConstantPrior(0.5))
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0])
    rollouts = Rollouts(rows(4), [], [Completion([5], [0.0], "", "stop")] * 4, torch.arange(4), correct, 0)
    prior, heldout = torch.tensor([0.6, -0.6, 0.2, -0.2]), torch.tensor([0.5, -0.5, 0.1, -0.1])
    used = module.basis_baseline_used(rollouts, prior)  # [P]
    torch.testing.assert_close(used, 2 * correct - 1 - module.advantages(rollouts, prior))  # scale "none"
    diag = module.prior_diagnostics(rollouts, prior, {"prior": 0.0, "rollout": 1.0}, heldout, used)
    assert diag["v05/baseline_sq_error_heldout"] == pytest.approx(float(((used - heldout) ** 2).mean()))
    assert not any(key.startswith(("v05/fusion", "v05/prior_rejected")) for key in diag)  # V0.5's test only


def test_a_prior_that_fails_to_prepare_does_not_stop_the_run(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    class FailsToPrepare(ConstantPrior):
        def prepare(self, prompts) -> None:
            raise ValueError("features are not finite")

    prior = FailsToPrepare(0.0)
    module = primed(module_for(tiny_lm_path, tmp_path, prior=prior))
    fit(module, task_dir, tmp_path, steps=2)
    assert module.rl_step == 2 and prior.calls == 2 and module._prior_failures == 1


def test_basis_fallback_keeps_each_groups_own_rewards_out_of_its_baseline(
    tiny_lm_path: str, tmp_path: Path
) -> None:
    from basis.trainer import Rollouts

    module = module_for(tiny_lm_path, tmp_path, advantage="basis", group_size=2, prior=ConstantPrior(0.5))
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    baselines = []
    for own in ([1.0, 1.0], [0.0, 0.0]):  # group 0's rewards change, the others' do not
        correct = torch.tensor([*own, 0.0, 1.0, 0.0, 0.0])
        rewards = 2 * correct - 1
        advantages = module.advantages(Rollouts(rows(3), [], [], index, correct, 0), prior=None)
        baselines.append(rewards - advantages)  # scale "none": A = r - b
    assert torch.allclose(baselines[0][:2], baselines[1][:2], atol=1e-3)  # up to the shift search
    # ... and is the other groups' mean reward (success rate 1/4 -> -0.5 on the ±1 scale)
    assert torch.allclose(baselines[0][:2], torch.tensor([-0.5, -0.5]), atol=1e-3)


def test_ddp_ranks_that_disagree_still_train_in_step(
    tiny_lm_path: str, task_dir: Path, ddp_run: Callable[..., list[dict]]
) -> None:
    """Real Lightning DDP on 2 CPU processes (tests/basis/ddp_run.py v05): OSLA gives rank 0 more
    rollouts, hence more micro-batches, and rank 1's prior fails, so it logs fewer metrics. Each used to
    break DDP's collectives (gloo: "Received data size doesn't match expected size")."""
    ranks = ddp_run("v05", tiny_lm_path, task_dir)
    assert [r["rl_step"] for r in ranks] == [2, 2]
    assert ranks[0]["rollouts"] > ranks[1]["rollouts"] == 2 * 2 * 4  # OSLA spent more on rank 0 only
    start = AutoModelForCausalLM.from_pretrained(tiny_lm_path).state_dict()
    for name, weight in ranks[0]["state"].items():
        assert torch.equal(weight, ranks[1]["state"][name]), name  # the gradients were all-reduced
    assert any(not torch.equal(w, start[n]) for n, w in ranks[0]["state"].items())  # and applied


def test_prior_settings_are_checked_before_training(tiny_lm_path: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a value prior"):
        module_for(tiny_lm_path, tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        module_for(tiny_lm_path, tmp_path, prior=str(tmp_path / "no-prior"))
    with pytest.raises(ValueError, match=r"model\.osla is the V0\.5 budget"):
        module_for(tiny_lm_path, tmp_path, advantage="grpo", prior=None, osla=OslaSettings())


def test_checkpoint_carries_the_support_buffer_and_rejects_old_formats(
    tiny_lm_path: str, tmp_path: Path
) -> None:
    module = primed(module_for(tiny_lm_path, tmp_path, prior=ConstantPrior(0.5)))
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    fresh = module_for(tiny_lm_path, tmp_path, prior=ConstantPrior(0.5))
    fresh.on_load_checkpoint(checkpoint)
    assert list(fresh.support.pairs) == list(module.support.pairs)
    checkpoint["basis_state"]["support_buffer"] = {"format": 0}
    with pytest.raises(ValueError, match="support buffer in the checkpoint has format 0"):
        fresh.on_load_checkpoint(checkpoint)


def test_platt_fit_recovers_a_known_miscalibration() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4000) * 1.5
    trials = torch.full((4000,), 4.0)
    successes = torch.binomial(trials, torch.sigmoid(0.5 * logits - 0.7))
    scale, shift = fit_platt(logits, successes, trials)
    assert abs(scale - 0.5) < 0.05 and abs(shift + 0.7) < 0.07


def test_calibrator_is_the_identity_until_it_has_data_then_learns_from_past_steps() -> None:
    calibrator = PriorCalibrator(window=256, min_prompts=64)
    p = torch.tensor([0.2, 0.5, 0.9])
    assert torch.allclose(calibrator(p), p)
    # V0 says 0.9 where the policy succeeds half the time: after seeing that, 0.9 maps near 0.5.
    for _ in range(8):
        calibrator.update(torch.full((16,), 0.9), torch.full((16,), 2.0), torch.full((16,), 4.0))
    assert abs(float(calibrator(torch.tensor([0.9]))) - 0.5) < 0.05
    restored = PriorCalibrator(window=256, min_prompts=64)
    restored.load_state_dict(calibrator.state_dict())
    assert torch.allclose(restored(p), calibrator(p))


def test_calibrator_on_a_one_class_window_never_reverses_the_prior() -> None:
    # An optimistic V0 (p in [0.6, 0.95]) and a policy that failed all 4 rollouts of 512 prompts: the
    # unconstrained MAP had slope a = -2.1, mapping a prompt V0 rated p = 0.05 to 0.91.
    p_hist = torch.rand(512, generator=torch.Generator().manual_seed(0)) * 0.35 + 0.6
    calibrator = PriorCalibrator(window=512, min_prompts=64)
    calibrator.update(p_hist, torch.zeros(512), torch.full((512,), 4.0))
    assert calibrator.scale >= 0.0
    query = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.9])
    out = calibrator(query)
    assert bool((out <= query).all()) and bool((out[1:] >= out[:-1]).all())
    # ... and it is the constrained MAP: a = 0 with d/db = 0 and d/da >= 0 (KKT on the boundary)
    x = torch.logit(p_hist.double())
    fitted = torch.sigmoid(calibrator.scale * x + calibrator.shift) * 4.0
    assert abs(float(fitted.sum()) + calibrator.shift) < 1e-8  # sum n p - k + ridge * b = 0
    assert float((x * fitted).sum()) + (calibrator.scale - 1) >= 0


def test_load_prior_names_every_method_a_prior_needs() -> None:
    class OnlyPredict:
        def predict(self, context_prompts, context_success, query_prompts) -> torch.Tensor:
            return torch.full((len(query_prompts),), 0.5)

    with pytest.raises(ValueError, match=r"predict\(\.\.\.\) and prepare\(\.\.\.\)"):
        load_prior(OnlyPredict())


def test_trainer_recalibrates_the_prior_and_logs_it(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    module = primed(
        module_for(
            tiny_lm_path, tmp_path, prior=ConstantPrior(0.9), osla=OslaSettings(), prior_calibration=True
        )
    )
    module.calibrator.min_prompts = 4
    logger = MLflowLogger(experiment_name="v05-test")
    fit(module, task_dir, tmp_path, steps=3, logger=logger)
    shifts = history("v05/calibration_shift", logger.run_id)
    assert shifts[0] == 0.0 > shifts[1] > shifts[2]  # the identity, then pulled down by past failures
    assert float(module.calibrator(torch.tensor([0.9]))) < 0.5  # V0 said 0.9; the policy always fails
