"""The RLVR policy trainer: a LightningModule for the GRPO family with HF or SGLang rollouts.

One training step (one batch of prompts) is:

    rollout  – the engine samples `group_size` responses per prompt (token ids, behaviour log-probs)
    reward   – the verifier scores them in {0, 1}; advantages see them on the ±1 scale (design.md §4)
    math     – `basis.advantages.compute_advantages(advantage, ...)` (any registry estimator)
    update   – `ppo_epochs` x `mini_batches` optimizer updates of the PPO-clip loss
               (`basis.losses.policy_loss`, clip-higher, dual clip, truncated IS against the engine's
               log-probs, optional KL to the frozen reference), then the engine gets the new weights
    record   – metrics to MLflow at step = RL step, rollout records to parquet, periodic HF exports

Deviations and choices:
- Old log-probs are recomputed by the training model before the update (so the PPO ratio is exact
  under the trainer's numerics); the engine's log-probs only feed the truncated-IS weights and the
  logged mismatch, as in verl.
- Randomness is derived per step from `(seed, rl_step, rank)` instead of carried RNG state, so a run
  resumed from a checkpoint replays exactly what the uninterrupted run would have done.
- Metrics (and the periodic validation) are written to the logger at the end of `training_step`,
  before Lightning saves the step's checkpoint; after a resume, steps already logged are not logged
  again. Validation runs inside the training step for that reason, not in Lightning's val loop
  (which `basis validate` still uses). Exports, and the end of the run (final validation, export and
  their MLflow artifacts) after the step that reaches `trainer.max_steps` or the rollout budget, run
  right after the step (`_AfterStep`, outside the FSDP forward that wraps `training_step`) and before
  Lightning saves its checkpoint: resumed from a checkpoint at `max_steps`, Lightning runs no hook.
- `trainer.max_steps` counts optimizer updates: RL steps x `ppo_epochs` x `mini_batches`.

Run: `basis fit --config configs/policy/grpo_tiny.yaml` (see `basis.cli`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from basis.advantages import (
    ESTIMATORS,
    basis_baseline,
    compute_advantages,
    dynamic_sampling_mask,
    fused_baseline,
    osla_extra_rollouts,
)
from basis.data import PromptRow, ValBatch, global_seed, seed_for
from basis.losses import (
    AGG_MODES,
    aggregate_loss,
    kl_penalty,
    logprob_mismatch,
    policy_loss,
    token_logprobs,
    truncated_is_weights,
)
from basis.metrics import PassAtK
from basis.policy_io import LoraSettings, export_policy, gathered_state_dict, load_policy, saved_dtype
from basis.rewards import binary_rewards, get_verifier, to_pm1
from basis.rollout import Completion, HFEngine, RolloutEngine, SamplingParams
from basis.tasks import prompt_text
from basis.tracking import set_tags
from basis.v05 import (
    OslaSettings,
    PriorCalibrator,
    SuccessPrior,
    SupportBuffer,
    has_both_classes,
    load_prior,
    prior_provenance,
)

log = logging.getLogger(__name__)

# Checkpoints keep PolicyTrainer's hyperparameters, these settings objects among them; allow-listed
# so that `torch.load(weights_only=True)`, how the CLI resumes and validates, can rebuild them.
torch.serialization.add_safe_globals([LoraSettings, OslaSettings])

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


DEFAULT_GROUP_SIZE = {"v05": 4, "basis": 1}  # model.group_size when not set; 8 for every other estimator


def _adamw(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class Rollouts(NamedTuple):
    """The sampled responses of one step, flat over prompts x samples."""

    prompts: list[PromptRow]  # [P]
    prompt_ids: list[list[int]]  # [N] prompt token ids per response
    completions: list[Completion]  # [N]
    index: torch.Tensor  # [N] long, prompt group of each response
    correct: torch.Tensor  # [N] float in {0, 1}
    verifier_failures: int


class PolicyBatch(NamedTuple):
    """Token-level tensors for the update: prompt (left-padded) + response (right-padded)."""

    input_ids: torch.Tensor  # [N, P + R]
    attention_mask: torch.Tensor  # [N, P + R]
    response_mask: torch.Tensor  # [N, R] bool
    rollout_logprobs: torch.Tensor  # [N, R] engine log-probs (0 on padding)
    prompt_width: int  # P


class PolicyTrainer(L.LightningModule):
    """RLVR policy trainer (GRPO family) with any `basis.advantages` estimator.

    Args:
        model_path: Any Hugging Face causal LM folder (or hub id on a machine that has it).
        lora: LoRA settings; None trains all parameters (full fine-tuning).
        advantage: Estimator name in `basis.advantages.ESTIMATORS` (grpo, dr_grpo, rloo, ...).
        advantage_options: Extra keyword options of the estimator (e.g. `{"norm_by_std": false}`).
        group_size: Responses sampled per prompt; for `v05` the k_init every prompt starts at. None: 4
            for `v05` (the paper's k_init), 1 for `basis` (one rollout per prompt), 8 otherwise.
        verifier: Reward function: a name in `basis.rewards.VERIFIERS` ("arithmetic", "math") or your own
            factory as an import path, "package.module:Factory" (`basis.rewards.get_verifier`).
        verifier_options: Keyword arguments of the verifier's constructor, e.g. `{timeout_s: 10.0}` for
            "math" (as `harvest run --verifier_options`).
        ppo_epochs: Passes over each step's responses.
        mini_batches: Optimizer updates per pass (the step's responses are split evenly).
        micro_batch_size: Responses per forward/backward (gradient accumulation inside a mini-batch).
        eps_low: PPO clip range below 1.
        eps_high: PPO clip range above 1 (DAPO clip-higher uses 0.28).
        clip_ratio_c: Dual-clip bound for negative advantages.
        loss_agg: "token-mean", "seq-mean-token-sum" or "seq-mean-token-mean".
        kl_coef: Weight of the KL penalty to the frozen reference policy (0 disables it and the
            reference forward pass).
        kl_estimator: "k1", "k2" or "k3".
        tis_cap: Truncated importance-sampling cap for engine/trainer mismatch; None disables the
            correction (the mismatch is still logged).
        dynamic_sampling_rounds: DAPO dynamic sampling: drop the groups whose rewards are all equal
            (zero advantage under a group baseline) and refill the batch with groups of fresh training
            prompts, up to this many extra generation rounds per step; 0 disables it. A batch still
            short after the last round trains on the groups it has (verl's `max_num_gen_batches`
            raises instead). Dropped rollouts count towards `max_rollouts`.
        temperature: Sampling temperature (also used for the trainer's log-probs).
        top_p: Nucleus sampling mass.
        top_k: Top-k sampling (0 = off).
        max_new_tokens: Longest response.
        stop: Stop strings.
        max_prompt_tokens: Longest allowed prompt (None: the model's context minus `max_new_tokens`);
            a longer training prompt is an error at setup.
        grad_clip: Max global gradient norm.
        optimizer: Optimizer factory (LightningCLI `optimizer:` section); default AdamW lr 1e-5.
        lr_scheduler: Scheduler factory, stepped once per optimizer update; None keeps the lr fixed.
        engine: Rollout engine; None samples in-process with `HFEngine` on the policy itself.
        engine_batch_size: Most sequences per `generate` call of the in-process HF engine.
        prior: Value prior for `v05` / `basis`: an exported prior folder (`value-prior fit` writes
            one), or in Python an object implementing `basis.v05.SuccessPrior` (`predict`, `prepare`).
        osla: OSLA adaptive budget for `v05` (extra rollouts where prior and rollouts disagree);
            None keeps every prompt at `group_size` (= k_init) rollouts.
        support_capacity: Recent (prompt, success) pairs kept as the prior's context (design.md: 512).
        context_size: Pairs sampled from them per prior query (design.md: 256).
        min_context: Pairs (of both outcomes) needed before the prior is used; before that the step
            uses the empirical baseline and logs it.
        prior_calibration: Recalibrate the prior online (Platt scaling on the run's own recent
            outcomes, never the current step's) before fusing it. Our extension, off by default as in
            the paper; it helps when V0 ranks prompts well but is miscalibrated for this policy.
        prior_timeout_s: Longest wait for the prior's answer once the first rollout round is done
            (our choice; the paper has no timeout). Past it the step uses the empirical baseline, and
            later steps do too until the hung query returns; None waits forever. A timeout makes a
            step's baseline depend on wall-clock time, so only runs without one replay exactly.
        heldout_rollouts: Diagnostic only: extra rollouts per prompt, never trained on, that give a
            held-out success estimate to score the squared error of the group mean (every estimator)
            and of the prior-based baseline (with a prior); 0 disables it.
        max_rollouts: Rollout budget: stop after the RL step at which the rollouts consumed (all
            ranks, heldout diagnostics excluded) reach it; `trainer.max_steps` still caps the run.
            Arms that spend different rollouts per step (GRPO, V0.5 + OSLA, BASIS) then compare at
            equal cost. None: no budget.
        val_samples: Samples per validation prompt; pass@k is logged for k = 1..val_samples.
        val_every_n_steps: Validate every N RL steps (0: only the starting and the final policy).
        export_every_n_steps: Export the policy in HF format every N RL steps (0 = only at the end).
        checkpoint_every_n_steps: Lightning checkpoint (`last.ckpt`) every N RL steps.
        run_dir: Folder for checkpoints, exports, rollout records and the MLflow run id.
        seed: Base seed for sampling and mini-batch order (None: the global seed, `basis.data.global_seed`).
        torch_threads: Intra-op threads per process (None leaves torch's default). On 2-core
            machines one thread is much faster next to a busy core.
    """

    def __init__(
        self,
        model_path: str,
        lora: LoraSettings | None = None,
        advantage: str = "grpo",
        advantage_options: dict[str, Any] | None = None,
        group_size: int | None = None,
        verifier: str = "arithmetic",
        verifier_options: dict[str, Any] | None = None,
        ppo_epochs: int = 1,
        mini_batches: int = 1,
        micro_batch_size: int = 64,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        clip_ratio_c: float = 3.0,
        loss_agg: str = "token-mean",
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        tis_cap: float | None = 2.0,
        dynamic_sampling_rounds: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 64,
        stop: list[str] | None = None,
        max_prompt_tokens: int | None = None,
        grad_clip: float = 1.0,
        optimizer: OptimizerFactory = _adamw,
        lr_scheduler: SchedulerFactory | None = None,
        engine: RolloutEngine | None = None,
        engine_batch_size: int = 256,
        prior: str | SuccessPrior | None = None,
        osla: OslaSettings | None = None,
        support_capacity: int = 512,
        context_size: int = 256,
        min_context: int = 32,
        prior_calibration: bool = False,
        prior_timeout_s: float | None = 60.0,
        heldout_rollouts: int = 0,
        max_rollouts: int | None = None,
        val_samples: int = 8,
        val_every_n_steps: int = 0,
        export_every_n_steps: int = 0,
        checkpoint_every_n_steps: int = 1,
        run_dir: str = "runs/policy",
        seed: int | None = None,
        torch_threads: int | None = 1,
    ) -> None:
        super().__init__()
        seed = global_seed(seed)  # resolved before it is saved, as group_size
        if group_size is None:  # resolved before it is saved, so checkpoints and MLflow hold the number
            group_size = DEFAULT_GROUP_SIZE.get(advantage, 8)
        self.save_hyperparameters(ignore=["engine", "optimizer", "lr_scheduler", "prior"])
        _validate_settings(  # first: an unknown estimator is named as such, whatever else is set
            advantage,
            group_size,
            ppo_epochs,
            mini_batches,
            micro_batch_size,
            loss_agg,
            kl_estimator,
            val_samples,
        )
        _validate_prior_settings(advantage, prior, osla, group_size)
        _validate_dynamic_sampling(advantage, dynamic_sampling_rounds, prior)
        if lora is not None and lora.dropout > 0:
            raise ValueError(
                f"model.lora.dropout={lora.dropout}: every policy forward pass runs with dropout off (the PPO "
                "ratio compares one deterministic policy), so it would have no effect; set it to 0"
            )
        if prior_timeout_s is not None and not prior_timeout_s > 0:
            raise ValueError(f"model.prior_timeout_s={prior_timeout_s} must be positive seconds (or null)")
        if max_rollouts is not None and max_rollouts < 1:
            raise ValueError(f"model.max_rollouts={max_rollouts} must be a positive rollout budget (or null)")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.automatic_optimization = False
        stop = stop if isinstance(stop, str) else tuple(stop or ())  # SamplingParams refuses a bare string
        self.sampling = SamplingParams(max_new_tokens, temperature, top_p, top_k, stop)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.policy, self.tokenizer = load_policy(model_path, lora)
        # The frozen reference for a KL penalty under full fine-tuning is the starting checkpoint, built
        # lazily and kept out of the module tree (a dict is not registered): checkpoints need not carry a
        # second copy of the model, and a resumed run rebuilds it from `model_path`. LoRA disables adapters.
        self._frozen: dict[str, torch.nn.Module] = {}
        self.engine: RolloutEngine = (
            engine if engine is not None else HFEngine(self.policy, self.tokenizer, engine_batch_size)
        )
        try:
            self.verifier = get_verifier(verifier, **(verifier_options or {}))
        except TypeError as err:  # an option the verifier's constructor does not take
            raise ValueError(
                f"model.verifier_options={verifier_options} do not fit verifier {verifier!r}: {err}"
            ) from err
        self.prior = load_prior(prior) if prior is not None else None
        # which prior this run used, as loaded: its folder may be overwritten by a later export
        self._prior_provenance = prior_provenance(prior) if isinstance(prior, str) else None
        self.osla = osla
        self.support = SupportBuffer(
            support_capacity, context_size, min_context, getattr(self.prior, "label_threshold", 0.5)
        )
        self.calibrator = PriorCalibrator() if prior_calibration else None
        self.rl_step = 0
        self.rollouts_total = 0
        self._prior_failures = 0
        self._prior_query_seconds: float | None = None  # the last served query's run time
        self._prior_pending: Future | None = None  # the last query, which may still be running
        self._checkpointed = False  # whether this attempt has saved a checkpoint
        self._warned_no_success = False  # whether a step with no successful rollout was reported
        self._finished_step: int | None = None  # the step whose end of run this attempt has done
        self._v05_history: dict[str, list[float]] = {"rollouts_per_prompt": [], "fusion_weight": []}
        self.run_dir = Path(run_dir)
        self.val_pass_at_k = PassAtK(ks=list(range(1, val_samples + 1)))
        self._val_accuracy: list[torch.Tensor] = []
        self._pass_curves: dict[int, dict[int, float]] = {}
        self._prompt_ids_cache: dict[str, list[int]] = {}
        self._bad_steps = 0
        self._last_logged = {series: -1 for series in _SERIES_SENTINEL}  # highest step already in MLflow
        self.last_validation: dict[str, float] = {}
        self.updates_per_step = ppo_epochs * mini_batches

    # ----------------------------------------------------------------- Lightning plumbing

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }

    def configure_callbacks(self) -> list[L.Callback]:
        every = self.hparams.checkpoint_every_n_steps * self.updates_per_step
        return [
            _AfterStep(),
            ModelCheckpoint(
                dirpath=self.run_dir / "checkpoints",
                save_last=True,
                save_top_k=0,
                every_n_train_steps=every,
                enable_version_counter=False,  # last.ckpt is always this run's newest (what resume loads)
            ),
        ]

    def setup(self, stage: str) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:  # fp16 with loss scaling
            raise ValueError(
                f"trainer.precision={self.trainer.precision} (fp16 with a loss scaler) is not supported: the "
                "trainer clips and logs the gradient norm itself, before the scaler would unscale it. "
                "Use bf16-mixed (or 32-true)."
            )
        if isinstance(self.trainer.strategy, FSDPStrategy):
            for setting, name, active in [
                ("model.osla", "OSLA", self.osla is not None),
                ("model.dynamic_sampling_rounds", "dynamic sampling", self.hparams.dynamic_sampling_rounds),
            ]:
                if active:
                    raise ValueError(
                        f"{setting} with an FSDP strategy is not supported: {name} gives ranks different "
                        "numbers of rollout rounds and micro-batches, and every sharded forward pass is a "
                        "collective that all ranks must join. Use trainer.strategy: ddp."
                    )
            if self.hparams.lora is not None:
                raise ValueError(
                    "model.lora with an FSDP strategy is not supported: exports merge the adapter into the "
                    "base weights, which needs the unsharded adapter modules. LoRA's trainable parameters are "
                    "small; use trainer.strategy: ddp."
                )
            if isinstance(self.engine, HFEngine):
                self.engine.synced_gpus = True  # sharded forward passes are collectives: decode in lockstep
        datamodule = self.trainer.datamodule
        # without this, Lightning would say "train_dataloader must be implemented"
        if datamodule is None and stage == "fit":
            raise ValueError(
                "PolicyTrainer draws its prompts from a PromptDataModule: trainer.fit(module, datamodule=...)"
            )
        if datamodule is not None and stage in ("fit", "validate"):
            datamodule.setup(stage)
            if stage == "fit":
                self._check_prompt_lengths(datamodule.train_rows, "training")
                self._check_divisibility(datamodule.prompts_per_step)
            if datamodule.val_rows:  # validating past the context would report a meaningless mean@k
                self._check_prompt_lengths(datamodule.val_rows, "validation")

    def on_fit_start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.global_rank == 0 and self.logger is not None and getattr(self.logger, "run_id", None):
            self._last_logged = {
                series: last_logged_step(self.logger, name) for series, name in _SERIES_SENTINEL.items()
            }
            self.logger.log_hyperparams(
                {"torch_threads": torch.get_num_threads(), "world_size": self.trainer.world_size}
            )
            if self._prior_provenance is not None:  # tags prior_path, prior_sha256, prior_run_id
                provenance = dict(self._prior_provenance)
                self.logger.experiment.log_text(
                    self.logger.run_id, provenance.pop("config"), "prior/config.json"
                )
                set_tags(self.logger.experiment, self.logger.run_id, provenance)

    def on_train_start(self) -> None:
        # Only now is the checkpoint (if any) restored under every strategy (FSDP restores after
        # on_fit_start): outputs of steps after it, or all of an earlier run's, are not this run's.
        logged = self.trainer.strategy.broadcast(self._last_logged["train"], src=0)  # known on rank 0 only
        if self.rl_step == 0 and logged >= 0:  # a logger object reused from Python: every rank stops
            raise ValueError(
                f"the logger's MLflow run {getattr(self.logger, 'run_id', None)} already holds training steps "
                f"1...{logged} of another fit; a fresh fit needs a new MLflowLogger (one logger is one run), a "
                "resumed one its checkpoint (ckpt_path)"
            )
        self.set_aside_later_outputs()
        if self.rl_step > 0:  # resumed: an engine with its own copy (SGLang) still holds model_path's
            self.engine.update_weights(self.policy)
        if self._budget_spent():  # resumed after the last step, e.g. killed in the final validation
            log.warning(
                "resumed at step %d with the rollout budget already spent (%d >= model.max_rollouts=%d): "
                "no step to train; raise model.max_rollouts to train on",
                self.rl_step,
                self.rollouts_total,
                self.hparams.max_rollouts,
            )
            self.trainer.should_stop = True  # no further step; on_train_end validates and exports
            return
        if self.prior is not None and self.trainer.datamodule is not None:
            self.prepare_prior()
        if self.rl_step == 0 and self._has_val_prompts():
            # the starting policy's held-out numbers, logged at step 0, where no rollout is spent yet
            # (with rollouts as the UI's x-axis, a step without the x metric drops out of the plot)
            self.log_metrics({"train/rollouts_total": 0.0}, series="train")
            self.run_validation()

    def prepare_prior(self) -> None:
        """Let the prior embed every prompt this run will query, once, before the first step (its
        per-step cost is then the in-context head alone); the one-time cost is logged."""
        max_steps = self.trainer.max_steps
        last = max_steps // self.updates_per_step if max_steps and max_steps > 0 else 10**9
        if self.hparams.max_rollouts is not None:  # every prompt gets at least group_size rollouts
            per_step = (
                self.trainer.datamodule.prompts_per_step * self.trainer.world_size * self.hparams.group_size
            )
            remaining = self.hparams.max_rollouts - self.rollouts_total
            last = min(last, self.rl_step + math.ceil(remaining / per_step))
        rows = self.trainer.datamodule.rows_for_steps(  # RL step s reads the prompts of data step s - 1
            self.rl_step, last - 1, self.global_rank, self.trainer.world_size
        )
        start = time.perf_counter()
        try:
            self.prior.prepare([prompt_text(r.prompt) for r in rows])
        except Exception as err:  # a failing prior must never take the run down: steps query it anyway
            self._prior_failures += 1
            log.warning(
                "value prior failed to prepare %d prompts (%s); each step queries it as usual", len(rows), err
            )
            return
        seconds = time.perf_counter() - start
        log.info("prior: prepared %d prompts in %.1f s", len(rows), seconds)
        if self.logger is not None and self.global_rank == 0:
            self.logger.log_metrics(
                {"v05/prior_prepare_seconds": seconds, "v05/prior_prepared_prompts": float(len(rows))},
                step=self.rl_step,
            )

    def record_mlflow_run(self) -> None:
        """Write `<run_dir>/mlflow_run_id`, the run `basis fit --ckpt_path last` continues, with each
        checkpoint: the file names the run that `last.ckpt` belongs to, so an attempt that branched off
        and stopped before its first checkpoint leaves both to the run it branched from. At the end it
        is written too unless `last.ckpt` is another attempt's (a run that never checkpoints)."""
        if self.global_rank == 0 and self.logger is not None and getattr(self.logger, "run_id", None):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "mlflow_run_id").write_text(self.logger.run_id)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpointed = True
        self.record_mlflow_run()
        checkpoint["basis_state"] = {
            "format": 1,
            "rl_step": self.rl_step,
            "bad_steps": self._bad_steps,
            "rollouts_total": self.rollouts_total,
            "prior_failures": self._prior_failures,
            "support_buffer": self.support.state_dict(),
            "prior_calibration": None if self.calibrator is None else self.calibrator.state_dict(),
            # what the end-of-run plots draw from (the pass@k curves and the V0.5 histograms)
            "pass_curves": self._pass_curves,
            "v05_history": self._v05_history,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("basis_state")
        if state is None or state.get("format") != 1:
            raise ValueError(
                "checkpoint has no basis_state of format 1; it was not written by this PolicyTrainer version"
            )
        self.rl_step, self._bad_steps = int(state["rl_step"]), int(state["bad_steps"])
        self.rollouts_total = int(state.get("rollouts_total", 0))
        self._prior_failures = int(state.get("prior_failures", 0))
        self._pass_curves = {int(step): dict(curve) for step, curve in state.get("pass_curves", {}).items()}
        self._v05_history.update({k: list(v) for k, v in state.get("v05_history", {}).items()})
        if self.prior is not None:
            self.support.load_state_dict(state.get("support_buffer", {"format": None}))
        if self.calibrator is not None and state.get("prior_calibration") is not None:
            self.calibrator.load_state_dict(state["prior_calibration"])

    def set_aside_later_outputs(self) -> None:
        """Move rollout records and exports of steps after the resumed one (left by the attempt this
        resume abandons, or by an earlier run when a fresh one starts in the same run_dir) into
        `superseded/<time>/` beside them, so that `harvest` never pools them with this attempt's;
        nothing is deleted. A fresh run also sets the earlier run's checkpoints and `mlflow_run_id` aside
        (into `<run_dir>/superseded/`), which it would otherwise overwrite."""

        def later(folder: Path, pattern: str) -> list[Path]:
            steps = ((path, re.match(r"step_(\d+)", path.name)) for path in folder.glob(pattern))
            return [path for path, step in steps if step and int(step[1]) > self.rl_step]

        moved = later(self.run_dir / "rollouts", f"step_*-rank{self.global_rank}.parquet")
        if self.global_rank == 0:
            moved += later(self.run_dir / "exports", "step_*")
            if not self.rl_step:  # and its MLflow run id, which this run's would overwrite
                moved += sorted((self.run_dir / "checkpoints").glob("*.ckpt"))
                moved += [path for path in [self.run_dir / "mlflow_run_id"] if path.is_file()]
        reason = f"resumed-at-step{self.rl_step}" if self.rl_step else "restarted"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in moved:
            aside = path.parent / "superseded" / f"{reason}-{stamp}"
            aside.mkdir(parents=True, exist_ok=True)
            os.replace(path, aside / path.name)
        if moved:
            log.warning(
                "%s: moved %d rollout records, exports or checkpoints of an earlier attempt (steps after %d) "
                "into superseded/%s-%s folders beside them",
                reason,
                len(moved),
                self.rl_step,
                reason,
                stamp,
            )

    # ----------------------------------------------------------------- the RL step

    def training_step(self, prompts: list[PromptRow], batch_idx: int) -> None:
        self.rl_step += 1
        timings: dict[str, float] = {}
        # V0 needs only the prompts and the support buffer, so it runs on a thread of its own while
        # the first round is generated; "prior" times only the wait the rollouts did not hide.
        query = self.submit_prior_query(prompts) if self.prior is not None else None
        rollouts = self.collect_rollouts(prompts, [self.hparams.group_size] * len(prompts), timings)
        generated, trained, sampling_stats = None, None, {}  # dynamic sampling trains on part of `generated`
        if self.hparams.dynamic_sampling_rounds:
            rollouts, generated, trained, sampling_stats = self.dynamic_sampling(rollouts, timings)
        prior_p = None  # [P] V0's success probabilities, or None: the empirical fallback
        if query is not None:
            with _timer(timings, "prior"):
                prior_p = self.prior_answer(query)
        calibrated = (
            prior_p if self.calibrator is None or prior_p is None else self.calibrator(prior_p)
        )  # [P]
        prior = None if calibrated is None else 2.0 * calibrated - 1.0  # [P] on the ±1 scale
        if self.osla is not None and prior is not None:
            rollouts = self.osla_rounds(rollouts, prior, timings)
        advantages = self.advantages(rollouts, prior)  # [N]
        used_baseline = (
            self.basis_baseline_used(rollouts, prior)
            if self.hparams.advantage == "basis" and self.prior is not None
            else None
        )  # [P]
        # the held-out check of this step's baseline samples the policy that produced the rollouts
        heldout = self.heldout_mean_reward(rollouts.prompts) if self.hparams.heldout_rollouts else None
        self.engine.release_memory()
        try:
            with _timer(timings, "update"):
                batch = self.policy_batch(rollouts)
                update_stats = self.update_policy(batch, advantages)
        finally:  # a failed update (out of memory) must not leave a long-lived server without its memory
            with _timer(timings, "weight_sync"):
                self.engine.resume_memory()
        with _timer(timings, "weight_sync"):
            self.engine.update_weights(self.policy)
        generated = rollouts if generated is None else generated  # after OSLA's rounds, which add to rollouts
        local = torch.tensor(
            [len(generated.completions), float(generated.correct.sum())], dtype=torch.float64
        )
        consumed, successes = _sum_over_ranks(local).tolist()  # the same counts on every rank
        self.rollouts_total += int(consumed)
        if not successes:
            self.report_no_success(generated)
        update_stats |= sampling_stats
        self.record_step(
            rollouts, advantages, update_stats, timings, prior, heldout, used_baseline, generated
        )
        self.write_rollout_records(generated, trained)
        if self.prior is not None:
            self.support.add([prompt_text(r.prompt) for r in prompts], success_rates(rollouts).tolist())
        if self.calibrator is not None and prior_p is not None:
            counts = torch.bincount(rollouts.index, minlength=len(prompts))  # [P]
            self.calibrator.update(prior_p, success_rates(rollouts) * counts, counts.float())
        every = self.hparams.val_every_n_steps
        if every and self.rl_step % every == 0 and self._has_val_prompts():
            self.run_validation()
        if self._budget_spent():
            # through Lightning's console logger: the `basis` command configures no other
            rank_zero_info(
                f"rollout budget spent at step {self.rl_step}: {self.rollouts_total} rollouts >= "
                f"model.max_rollouts={self.hparams.max_rollouts}; stopping"
            )
            self.trainer.should_stop = True  # rollouts_total is global, so every rank stops here

    def after_step(self) -> None:
        """The step's export and, after the last step, the end of the run (`_AfterStep`)."""
        if self._periodic_export(self.rl_step):
            self.export(self.run_dir / "exports" / f"step_{self.rl_step:06d}")
        if self._budget_spent() or self._max_steps_reached():  # this step ends the run
            self.finish_run()  # before this step's checkpoint, which a resume would find with nothing to do

    def _max_steps_reached(self) -> bool:
        """Whether this step's updates reach `trainer.max_steps`, after which Lightning stops."""
        max_steps = self.trainer.max_steps
        return max_steps is not None and max_steps >= 0 and self.trainer.global_step >= max_steps

    def _budget_spent(self) -> bool:
        budget = self.hparams.max_rollouts
        return budget is not None and self.rollouts_total >= budget

    def collect_rollouts(
        self,
        prompts: list[PromptRow],
        samples: list[int],
        timings: dict[str, float],
        previous: Rollouts | None = None,
        salt: int = 0,
    ) -> Rollouts:
        """Sample `samples[i]` responses for prompt i, score them, and append them to `previous`."""
        index = torch.repeat_interleave(torch.arange(len(prompts)), torch.as_tensor(samples))  # [n]
        prompt_ids = [self.prompt_token_ids(prompts[i]) for i in index.tolist()]
        with _timer(timings, "rollout"):
            completions = self.engine.generate(prompt_ids, self._sampling_params(salt=salt))
        with _timer(timings, "reward"):
            result = self.verifier([c.text for c in completions], [prompts[i].answer for i in index.tolist()])
        correct = binary_rewards(result.rewards, self.hparams.verifier)  # [n] in {0, 1}
        if previous is None:
            return Rollouts(prompts, prompt_ids, completions, index, correct, result.num_failed)
        return Rollouts(
            prompts,
            previous.prompt_ids + prompt_ids,
            previous.completions + completions,
            torch.cat([previous.index, index]),  # [N + n]
            torch.cat([previous.correct, correct]),  # [N + n]
            previous.verifier_failures + result.num_failed,
        )

    def report_no_success(self, generated: Rollouts) -> None:
        """Warn once per run, at the first step whose rollouts all scored 0 on every rank: a verifier
        that cannot read the policy's answers looks like this."""
        if self._warned_no_success:
            return
        self._warned_no_success = True  # once: a hard task starts this way too
        rank_zero_warn(
            f"step {self.rl_step}: every rollout scored 0 with verifier {self.hparams.verifier!r} (a group "
            "baseline learns nothing from that). If this persists, check that the verifier can read the "
            "policy's answers (math grades the last \\boxed{} or 'Answer:' line); the end of one response: "
            f"{generated.completions[0].text[-160:]!r}"
        )

    def dynamic_sampling(
        self, rollouts: Rollouts, timings: dict[str, float]
    ) -> tuple[Rollouts, Rollouts, torch.Tensor, dict[str, float]]:
        """DAPO dynamic sampling: the step's groups with differing rewards, refilled with groups of fresh
        training prompts (drawn at random, a round of a full batch at a time as in verl) until the batch
        is full or `dynamic_sampling_rounds` rounds are spent, then cut to the batch size.

        Returns the rollouts to train on; every rollout generated (the batch's groups, then each round's)
        with a bool `[G]` marking the groups trained on, for the records; and the step's statistics. With
        no informative group at all the original batch is trained on (zero advantages: no policy-gradient
        step, but every rank still runs its update)."""
        want, size = len(rollouts.prompts), self.hparams.group_size
        generated, rounds = rollouts, 0
        train_rows = self.trainer.datamodule.train_rows
        used = {_row_key(row) for row in rollouts.prompts}  # a prompt is sampled once per step (and rank)
        informative = informative_group_ids(generated)
        while len(informative) < want and rounds < self.hparams.dynamic_sampling_rounds:
            rounds += 1
            rng = np.random.default_rng(
                seed_for(self.hparams.seed, self.rl_step, self.global_rank, 3, rounds)
            )
            order = (train_rows[i] for i in rng.permutation(len(train_rows)))
            fresh = list(itertools.islice((row for row in order if _row_key(row) not in used), want))
            if not fresh:  # every training prompt has been tried this step
                break
            used |= {_row_key(row) for row in fresh}
            fresh_rollouts = self.collect_rollouts(fresh, [size] * len(fresh), timings, salt=100 + rounds)
            generated = concat_groups(generated, fresh_rollouts)
            informative = informative_group_ids(generated)
        kept = informative[:want] or list(range(want))  # none: the batch as sampled
        trained = torch.zeros(len(generated.prompts), dtype=torch.bool)  # [G]
        trained[kept] = True
        stats = {
            "dynamic_sampling_rounds": float(rounds),
            "dynamic_sampling_kept": len(informative[:want]) / want,  # of the batch
            "rollouts_generated": float(len(generated.completions)),
        }
        return select_groups(generated, kept), generated, trained, stats

    def osla_rounds(self, rollouts: Rollouts, prior: torch.Tensor, timings: dict[str, float]) -> Rollouts:
        """OSLA: add rollouts to prompts whose target N* exceeds their count, round by round."""
        osla = self.osla
        for round_no in range(1, osla.max_rounds + 1):
            counts, means = group_counts_means(rollouts)  # [P], [P]
            extra = osla_extra_rollouts(
                counts,
                means,
                prior,
                c=osla.c,
                k_init=self.hparams.group_size,
                pad_to=osla.pad_to,
                min_active_frac=osla.min_active_frac,
            )
            if int(extra.sum()) == 0:
                break
            rollouts = self.collect_rollouts(
                rollouts.prompts, extra.tolist(), timings, rollouts, salt=round_no
            )
        return rollouts

    def submit_prior_query(self, prompts: list[PromptRow]) -> Future | None:
        """Start `query_prior` on a daemon thread (a hung prior must not block the process's exit).
        None while an earlier query is still running: that one may hold the prior, so this step falls
        back to the empirical baseline and counts a failure."""
        if self._prior_pending is not None and not self._prior_pending.done():
            self._prior_failures += 1
            log.warning("step %d: the value prior is still answering an earlier query; using the empirical "
                        "baseline", self.rl_step)  # fmt: skip
            return None
        future: Future = Future()
        threads = torch.get_num_threads()

        def run() -> None:
            torch.set_num_threads(threads)
            try:
                start = time.perf_counter()
                p = self.query_prior(prompts)
                future.set_result((p, time.perf_counter() - start))
            except BaseException as err:  # anything: an unresolved future would hang a step with no timeout
                future.set_exception(err)

        threading.Thread(target=run, name=f"value-prior-step-{self.rl_step}", daemon=True).start()
        self._prior_pending = future
        return future

    def prior_answer(self, query: Future) -> torch.Tensor | None:
        """The submitted query's probabilities `[P]`; None (the empirical fallback) when the prior
        raised, answered out of range, or did not answer within `prior_timeout_s`."""
        try:
            p, seconds = query.result(timeout=self.hparams.prior_timeout_s)
        except FutureTimeout as raised:  # the same class as a TimeoutError the prior raises itself
            timeout = f"no answer within prior_timeout_s={self.hparams.prior_timeout_s}"
            err: BaseException = raised if query.done() else TimeoutError(timeout)
        except BaseException as raised:  # a failing prior must never take the run down
            if isinstance(raised, KeyboardInterrupt):
                raise
            err = raised
        else:
            if p is not None:
                self._prior_query_seconds = seconds
            return p
        self._prior_failures += 1
        log.warning("step %d: value prior failed (%s); using the empirical baseline", self.rl_step, err)
        return None

    def query_prior(self, prompts: list[PromptRow]) -> torch.Tensor | None:
        """V0's success probabilities `[P]`, or None when the support buffer cannot serve a context.
        Raises when the prior fails or answers with anything but P probabilities."""
        if self.prior is None or not self.support.ready():
            return None
        rng = np.random.default_rng(seed_for(self.hparams.seed, self.rl_step, self.global_rank, 2))
        context_prompts, context_success = self.support.sample(rng)
        # the buffer holds both classes, but this draw may not
        if not has_both_classes(context_success, self.support.label_threshold):
            log.info("step %d: the sampled context has one class; using the empirical baseline", self.rl_step)
            return None
        queries = [prompt_text(r.prompt) for r in prompts]
        p = torch.as_tensor(
            self.prior.predict(context_prompts, context_success, queries), dtype=torch.float32
        )
        p = p.flatten()  # [P]
        if p.shape != (len(prompts),) or not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
            raise ValueError(f"prior returned {tuple(p.shape)} values, non-finite or outside [0, 1]")
        return p  # [P]

    def advantages(self, rollouts: Rollouts, prior: torch.Tensor | None) -> torch.Tensor:
        rewards = to_pm1(rollouts.correct)  # [N] on the ±1 scale
        name = self.hparams.advantage
        options = dict(self.hparams.advantage_options or {})
        if "token_counts" in inspect.signature(ESTIMATORS[name].fn).parameters:
            lengths = [len(c.token_ids) for c in rollouts.completions]
            options["token_counts"] = torch.tensor(lengths, dtype=torch.long)  # [N]
        if ESTIMATORS[name].needs_prior:
            if prior is None:  # BASIS keeps its baseline leave-one-out: no group's own mean as prior
                prior = empirical_prior(rewards, rollouts.index, pooled=name == "basis")  # [P]
            options["prior"] = prior[rollouts.index]  # [N]
        return _over_all_ranks(partial(compute_advantages, name), rewards, rollouts.index, options)  # [N]

    def basis_baseline_used(self, rollouts: Rollouts, prior: torch.Tensor | None) -> torch.Tensor:
        """The baseline `[P]` that BASIS's advantages subtracted this step (pooled over ranks as they
        are), for its diagnostics: V0.5's fused baseline at k = 1 is the raw prior, not what BASIS used."""
        rewards = to_pm1(rollouts.correct)  # [N] on the ±1 scale
        if prior is None:
            prior = empirical_prior(rewards, rollouts.index, pooled=True)  # [P]
        used = _over_all_ranks(
            basis_baseline, rewards, rollouts.index, {"prior": prior[rollouts.index]}
        )  # [N]
        num = len(rollouts.prompts)
        return torch.zeros(num).index_reduce_(
            0, rollouts.index, used.float(), "mean", include_self=False
        )  # [P]

    def update_policy(self, batch: PolicyBatch, advantages: torch.Tensor) -> dict[str, float]:
        """PPO-clip updates on one step's responses; returns statistics averaged over micro-batches.

        With a single update per step (`ppo_epochs = mini_batches = 1`) the old log-probs equal the
        current ones, so they are taken (detached) from the loss pass itself instead of a separate
        forward pass over the batch: same numbers, about a quarter less update time.
        """
        hp = self.hparams
        advantages = advantages.to(batch.response_mask.device)  # [N] built from rewards on the CPU
        on_policy = hp.ppo_epochs == 1 and hp.mini_batches == 1
        old_logprobs = None if on_policy else self.sequence_logprobs(batch)[0]  # [N, R]
        ref_logprobs = self.reference_logprobs(batch) if hp.kl_coef > 0 else None  # [N, R]
        stats: dict[str, list[float]] = {}
        generator = torch.Generator().manual_seed(seed_for(hp.seed, self.rl_step, self.global_rank, 1))
        optimizer = self.optimizers()
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(len(advantages), generator=generator)  # [N]
            # exactly `mini_batches` updates whatever N is (OSLA varies it): Lightning's step count stays
            # RL steps x updates_per_step, which checkpoint cadence and max_steps rely on
            for mini in order.tensor_split(hp.mini_batches):
                self._optimizer_update(optimizer, batch, mini, advantages, old_logprobs, ref_logprobs, stats)
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def _optimizer_update(
        self,
        optimizer: Any,
        batch: PolicyBatch,
        mini: torch.Tensor,
        advantages: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None,
        stats: dict[str, list[float]],
    ) -> None:
        """One optimizer update over the responses `mini`, accumulated over micro-batches."""
        hp = self.hparams
        optimizer.zero_grad()
        num_tokens, num_sequences, world = _global_counts(batch.response_mask[mini])
        # DDP all-reduces the gradients in every backward pass, so every rank must run as many, but OSLA
        # gives ranks different numbers of responses (hence micro-batches). The micro-batches therefore
        # accumulate locally, and one zero-loss pass per update all-reduces their sum: the same single
        # collective on every rank, whatever its micro-batch count (zero included).
        strategy = self._trainer.strategy if self._trainer is not None else None
        ddp = isinstance(strategy, DDPStrategy) and _distributed()
        finite = True
        policy_loss_sum, kl_loss_sum = 0.0, 0.0  # micro-batch losses share the mini-batch denominators
        token_sums: dict[str, float] = {}
        counted = 0.0
        local_sync = strategy.block_backward_sync() if ddp else contextlib.nullcontext()  # type: ignore[union-attr]
        with local_sync:
            for micro in self.micro_batches(batch, mini):
                sub = _select(batch, micro)
                mask = sub.response_mask  # [n, R]
                logprobs, entropy = self.sequence_logprobs(
                    sub, with_grad=True, with_entropy=True
                )  # [n, R] x 2
                old = logprobs.detach() if old_logprobs is None else old_logprobs[micro]  # [n, R]
                is_weights = (
                    truncated_is_weights(old, sub.rollout_logprobs, mask, cap=hp.tis_cap)
                    if hp.tis_cap
                    else None
                )
                out = policy_loss(
                    logprobs,
                    old,
                    advantages[micro],
                    mask,
                    eps_low=hp.eps_low,
                    eps_high=hp.eps_high,
                    clip_ratio_c=hp.clip_ratio_c,
                    agg=hp.loss_agg,
                    is_weights=is_weights,
                    num_tokens=num_tokens,
                    num_sequences=num_sequences,
                )
                # this rank's share of the all-rank mean, times the world size that DDP / FSDP divide by
                loss = out.loss * world
                if ref_logprobs is not None:
                    kl = kl_penalty(logprobs, ref_logprobs[micro], hp.kl_estimator)  # [n, R]
                    kl_loss = aggregate_loss(
                        kl, mask, hp.loss_agg, num_tokens=num_tokens, num_sequences=num_sequences
                    )
                    loss = loss + hp.kl_coef * kl_loss * world
                    kl_loss_sum += float(kl_loss.detach()) * world
                if not torch.isfinite(loss):
                    finite = False
                    break
                self.manual_backward(loss)
                policy_loss_sum += float(out.loss.detach()) * world
                tokens = float(mask.sum())  # weights the token means below: per token, not per micro-batch
                for key, value in (
                    ("clip_frac", out.clip_frac),
                    ("clip_frac_low", out.clip_frac_low),
                    ("clip_frac_high", out.clip_frac_high),
                    ("dual_clip_frac", out.dual_clip_frac),
                    ("approx_kl", out.approx_kl),
                    ("entropy", (entropy * mask).sum() / mask.sum().clamp(min=1)),
                    ("logprob_mismatch", logprob_mismatch(old, sub.rollout_logprobs, mask)),
                ):
                    token_sums[key] = token_sums.get(key, 0.0) + float(value) * tokens
                counted += tokens
        if ddp:
            self.manual_backward(_zero_loss(self.policy))  # all-reduces the accumulated gradients
            finite = bool(_reduce_over_ranks(torch.tensor([float(finite)]), "min"))  # skip or step together
        if counted:
            _append(stats, **{key: total / counted for key, total in token_sums.items()})
        grad_norm = self._clip_gradients()
        lr = optimizer.param_groups[0]["lr"]  # the rate this update uses
        skipped = not finite or not torch.isfinite(grad_norm)
        if skipped:
            self._on_non_finite()
            # A counted no-op: parameters without gradients are left alone by torch optimizers (no
            # weight decay, no moment update), and Lightning's step count and the schedule stay aligned.
            optimizer.zero_grad(set_to_none=True)
        else:
            self._bad_steps = 0
            _append(stats, policy_loss=policy_loss_sum, grad_norm=float(grad_norm), lr=lr)
            if ref_logprobs is not None:
                _append(stats, kl=kl_loss_sum)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        _append(stats, skipped_updates=float(skipped))

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the policy's gradient norm to `grad_clip`; returns the norm before clipping. Under FSDP
        each rank holds a shard of every gradient, so the root FSDP module computes the global norm."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy):
            return strategy.model.clip_grad_norm_(self.hparams.grad_clip)  # the root FSDP module
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.nn.utils.clip_grad_norm_(params, self.hparams.grad_clip)

    def _on_non_finite(self) -> None:
        self._bad_steps += 1
        if self._bad_steps >= 3:
            path = self.run_dir / "checkpoints" / f"non-finite-step{self.rl_step}.ckpt"
            self.trainer.save_checkpoint(path)
            raise RuntimeError(
                f"three consecutive updates had a non-finite loss or gradient (last at RL step {self.rl_step}); "
                f"stopped without applying them. State saved to {path}. Lower the learning rate or check rewards/inputs."
            )

    # ----------------------------------------------------------------- tensors

    def prompt_token_ids(self, row: PromptRow) -> list[int]:
        # Keyed by the prompt itself, not its id: split files often number their ids from 0 each, and a
        # validation prompt must never be sampled from the training prompt that shares its id.
        key = row.prompt if isinstance(row.prompt, str) else json.dumps(row.prompt, sort_keys=True)
        ids = self._prompt_ids_cache.get(key)
        if ids is None:
            from basis.tasks import render_prompt

            ids = self.tokenizer(render_prompt(self.tokenizer, row.prompt), add_special_tokens=False)[
                "input_ids"
            ]
            self._prompt_ids_cache[key] = ids
        return ids

    def policy_batch(self, rollouts: Rollouts) -> PolicyBatch:
        from basis.rollout import left_pad

        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        prompt, prompt_mask = left_pad(rollouts.prompt_ids, pad)  # [N, P]
        width = max(1, max(len(c.token_ids) for c in rollouts.completions))
        response = torch.full((len(rollouts.completions), width), pad, dtype=torch.long)  # [N, R]
        response_mask = torch.zeros_like(response, dtype=torch.bool)  # [N, R]
        rollout_logprobs = torch.zeros_like(response, dtype=torch.float32)  # [N, R]
        for row, completion in enumerate(rollouts.completions):
            n = len(completion.token_ids)
            response[row, :n] = torch.as_tensor(completion.token_ids, dtype=torch.long)
            response_mask[row, :n] = True
            rollout_logprobs[row, :n] = torch.as_tensor(completion.logprobs, dtype=torch.float32)
        device = self.device
        return PolicyBatch(
            input_ids=torch.cat([prompt, response], dim=1).to(device),  # [N, P + R]
            attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1).to(device),  # [N, P + R]
            response_mask=response_mask.to(device),
            rollout_logprobs=rollout_logprobs.to(device),
            prompt_width=prompt.shape[1],
        )

    def micro_batches(self, batch: PolicyBatch, rows: torch.Tensor) -> list[torch.Tensor]:
        """`rows` in micro-batches of at most `micro_batch_size`; when there is more than one, rows sorted
        by response length, longest first, so rows of similar length share a forward pass and the padding
        it trims (`sequence_logprobs`) is largest, and the most memory is needed first. Gradients
        accumulate over an update's micro-batches, so the grouping changes nothing but rounding."""
        size = self.hparams.micro_batch_size
        if len(rows) <= size:
            return [rows]
        lengths = batch.response_mask[rows].sum(-1).cpu()  # [n]
        return list(rows[torch.sort(lengths, descending=True, stable=True).indices].split(size))

    def sequence_logprobs(
        self,
        batch: PolicyBatch,
        with_grad: bool = False,
        with_entropy: bool = False,
        model: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs `[N, R]` of the response tokens under `model` (default: the policy) at the sampling
        temperature, 0 on response padding. Dropout is off in every pass, the loss pass included, as in
        the engine that sampled the responses: with dropout in only some passes the PPO ratio is not 1 on
        policy and clips noise.

        Each micro-batch's forward pass is only as wide as its own rows need (`trim_padding`), and the LM
        head runs on the response positions only (`logits_to_keep`, where the model takes it): with a
        150k-token vocabulary the prompt positions' logits would be most of the pass's memory. Log-probs
        and entropy come from `basis.losses.token_logprobs`: two `[n, r, V]` tensors at the peak, not three."""
        model = model or self.policy
        keep = _takes_logits_to_keep(model)
        width = batch.response_mask.shape[1]  # R
        micros = self.micro_batches(batch, torch.arange(batch.input_ids.shape[0]))
        logprobs, entropies = [], []
        was_training = model.training
        model.eval()
        context = torch.enable_grad() if with_grad else torch.no_grad()
        with context:
            for micro in micros:
                sub = trim_padding(_select(batch, micro))
                ids, mask = sub.input_ids, sub.attention_mask  # [n, p + r]
                r = sub.response_mask.shape[1]
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [n, p + r] left padding aware
                extra = {"logits_to_keep": r + 1} if keep else {}
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **extra)
                # the positions that predict the response tokens: the last r + 1 but one, kept or not;
                # a copy of its own, so the model's output is freed now, not after the backward pass
                logits = out.logits[:, -(r + 1) : -1].float().contiguous()  # [n, r, V]
                del out
                if self.hparams.temperature != 1.0:
                    logits = logits / self.hparams.temperature
                targets = ids[:, sub.prompt_width :]  # [n, r]
                picked, entropy = token_logprobs(logits, targets, with_entropy)  # [n, r], [n, r] | None
                del logits  # kept by token_logprobs for the backward pass only
                picked = picked.masked_fill(~sub.response_mask, 0.0)  # [n, r]
                logprobs.append(torch.nn.functional.pad(picked, (0, width - r)))  # [n, R]
                if entropy is not None:
                    entropy = entropy.masked_fill(~sub.response_mask, 0.0)  # [n, r]
                    entropies.append(torch.nn.functional.pad(entropy, (0, width - r)))  # [n, R]
        model.train(was_training)
        restore = torch.argsort(torch.cat(micros)).to(batch.input_ids.device)  # [N] back to batch order
        return (
            torch.cat(logprobs)[restore],
            torch.cat(entropies)[restore] if with_entropy else None,
        )

    def reference_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        if self.hparams.lora is not None:
            with self.policy.disable_adapter():
                return self.sequence_logprobs(batch)[0]
        if "reference" not in self._frozen:
            self._frozen["reference"] = (
                load_policy(self.hparams.model_path, None)[0].to(self.device).eval().requires_grad_(False)
            )
        return self.sequence_logprobs(batch, model=self._frozen["reference"])[0]

    def _sampling_params(self, salt: int) -> SamplingParams:
        from dataclasses import replace

        return replace(self.sampling, seed=seed_for(self.hparams.seed, self.rl_step, self.global_rank, salt))

    # ----------------------------------------------------------------- validation

    def _validated_already(self) -> bool:
        """The trainer validates itself while fitting (every `val_every_n_steps` and at the end);
        Lightning also runs its validation loop when a run stops early (the rollout budget), which
        must not validate a policy a second time."""
        return self.trainer.state.fn == "fit" and self.rl_step in self._pass_curves

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "validate":
            return
        if self.trainer.ckpt_path:  # `validate --ckpt_path`: an engine with its own copy (SGLang)
            self.engine.update_weights(self.policy)  # still holds model_path's weights
        else:  # validating `model_path` itself: an export logs at the RL step it was exported at
            export = Path(self.hparams.model_path) / "basis_export.json"
            self.rl_step = int(json.loads(export.read_text()).get("rl_step", 0)) if export.is_file() else 0
            if self.global_rank == 0 and getattr(self.logger, "run_id", None):
                tags = {"evaluated_model_path": self.hparams.model_path, "evaluated_rl_step": self.rl_step}
                set_tags(self.logger.experiment, self.logger.run_id, tags)

    def validation_step(self, batch: ValBatch, batch_idx: int) -> None:
        if self._validated_already():
            return
        prompts, k = batch.rows, self.hparams.val_samples
        prompt_ids = [self.prompt_token_ids(row) for row in prompts for _ in range(k)]
        params = SamplingParams(
            **{
                **asdict(self.sampling),
                "seed": seed_for(self.hparams.seed, 10_000 + batch_idx, self.global_rank),
            }
        )
        completions = self.engine.generate(prompt_ids, params)
        answers = [row.answer for row in prompts for _ in range(k)]
        rewards = self.verifier([c.text for c in completions], answers).rewards
        correct = binary_rewards(rewards, self.hparams.verifier).view(len(prompts), k)[: batch.real]  # [P, k]
        num_correct = correct.sum(1).long()  # [P]
        self.val_pass_at_k.update(torch.full_like(num_correct, k), num_correct)
        self._val_accuracy.append(correct.mean(1))  # [P] per-prompt mean@k

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # Lightning's check before fitting: its batches validate no step
            self.val_pass_at_k.reset()
            self._val_accuracy = []
            return
        if self._validated_already():
            return
        pass_at = {int(k): float(v) for k, v in self.val_pass_at_k.compute().items()}
        self.val_pass_at_k.reset()
        accuracy = torch.cat(self._val_accuracy).double() if self._val_accuracy else torch.zeros(0).double()
        self._val_accuracy = []
        # ranks hold different numbers of prompts: reduce sums rather than gather the per-prompt values
        totals = torch.stack([accuracy.sum(), (accuracy**2).sum(), torch.tensor(float(accuracy.numel()))])
        total, total_sq, n = _sum_over_ranks(totals).tolist()
        mean = total / max(n, 1.0)
        variance = (total_sq - n * mean**2) / (n - 1) if n > 1 else 0.0  # unbiased, as torch.std
        metrics = {f"val/pass_at_k/{k}": v for k, v in pass_at.items()}
        metrics["val/mean_at_k"] = mean
        metrics["val/mean_at_k_stderr"] = math.sqrt(max(variance, 0.0) / max(n, 1.0))
        metrics["val/prompts"] = n  # over all ranks
        self._pass_curves[self.rl_step] = pass_at
        self.last_validation = {"rl_step": self.rl_step, **metrics}  # `basis validate` prints it
        self.log_metrics(metrics, series="val")

    def _has_val_prompts(self) -> bool:
        datamodule = self.trainer.datamodule
        return datamodule is not None and bool(getattr(datamodule, "val_rows", None))

    def run_validation(self) -> None:
        """Validate now (outside Lightning's validation loop), e.g. the starting policy at step 0."""
        was_training = self.policy.training
        self.policy.eval()
        for batch_idx, prompts in enumerate(self.trainer.datamodule.val_dataloader()):
            self.validation_step(prompts, batch_idx)
        self.on_validation_epoch_end()
        self.policy.train(was_training)
        if self.trainer.state.fn == "fit":
            self.log_v05_histograms()  # so far: a run killed before its end still has them

    def log_v05_histograms(self) -> None:
        """Histograms of V0.5's rollouts per prompt and fusion weights over the run so far (rank 0)."""
        if self.global_rank != 0 or self.logger is None or not getattr(self.logger, "run_id", None):
            return
        for name, values in self._v05_history.items():
            if values:
                figure = histogram_figure(values, name.replace("_", " "))
                self.logger.experiment.log_figure(self.logger.run_id, figure, f"v05_{name}_hist.png")

    def on_train_end(self) -> None:
        if self._checkpointed or not (self.run_dir / "checkpoints" / "last.ckpt").exists():
            self.record_mlflow_run()
        if self._finished_step != self.rl_step:  # stopped otherwise than by its last step (e.g. a resume)
            self.finish_run()

    def finish_run(self) -> None:
        """Validate and export the final policy, and log it and the pass@k curves to MLflow."""
        if self._has_val_prompts() and self.rl_step not in self._pass_curves:
            self.run_validation()  # the final policy's held-out numbers
        if not self._periodic_export(self.rl_step):  # after_step has exported it already
            self.export(self.run_dir / "exports" / f"step_{self.rl_step:06d}")
        if self.global_rank == 0 and self.logger is not None and getattr(self.logger, "run_id", None):
            client, run_id = self.logger.experiment, self.logger.run_id
            client.log_artifacts(run_id, str(self.run_dir / "exports" / f"step_{self.rl_step:06d}"), "policy")
            if self._pass_curves:
                client.log_figure(run_id, pass_at_k_figure(self._pass_curves), "pass_at_k_vs_k.png")
        if not self._has_val_prompts():  # else the last validation (this step's) has logged them
            self.log_v05_histograms()
        self._finished_step = self.rl_step

    # ----------------------------------------------------------------- records, exports, logging

    def record_step(
        self,
        rollouts: Rollouts,
        advantages: torch.Tensor,
        update: dict[str, float],
        timings: dict[str, float],
        prior: torch.Tensor | None,
        heldout: torch.Tensor | None = None,
        used_baseline: torch.Tensor | None = None,
        generated: Rollouts | None = None,
    ) -> None:
        """Log the step's metrics: of the trained `rollouts`, except generation speed and zero-variance
        groups, which describe every rollout `generated` (more than trained under dynamic sampling)."""
        generated = rollouts if generated is None else generated
        lengths = torch.tensor([len(c.token_ids) for c in rollouts.completions], dtype=torch.float32)  # [N]
        generated_tokens = sum(len(c.token_ids) for c in generated.completions)
        truncated = torch.tensor(
            [c.finish_reason == "length" for c in rollouts.completions], dtype=torch.float32
        )  # [N]
        rewards = to_pm1(rollouts.correct)  # [N]
        metrics = {
            "train/reward_mean": float(rewards.mean()),
            "train/reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "train/accuracy": float(rollouts.correct.mean()),
            "train/advantage_mean": float(advantages.mean()),
            "train/advantage_std": float(advantages.std()) if len(advantages) > 1 else 0.0,
            "train/advantage_abs_max": float(advantages.abs().max()),
            "train/response_length": float(lengths.mean()),
            "train/truncation_rate": float(truncated.mean()),
            "train/verifier_failures": float(rollouts.verifier_failures),
            "train/rollouts": float(len(rollouts.completions)),
            "train/tokens_per_s": generated_tokens / max(timings["rollout"], 1e-9),
            **{f"train/{k}": v for k, v in update.items()},
            **{f"time/{k}": v for k, v in timings.items()},
        }
        if self.hparams.group_size > 1:  # a group of one response has no variance to lose
            metrics["train/zero_variance_groups"] = zero_variance_fraction(generated)
        metrics["time/step"] = sum(timings.values())
        metrics["train/rollouts_total"] = float(self.rollouts_total)
        if self.prior is not None:
            metrics.update(self.prior_diagnostics(rollouts, prior, timings, heldout, used_baseline))
        if heldout is not None:  # the group mean's error: GRPO's baseline, V0.5's without the prior
            empirical = group_counts_means(rollouts)[1]  # [P]
            metrics["v05/empirical_sq_error_heldout"] = float(((empirical - heldout) ** 2).mean())
        self.log_metrics(metrics, series="train")
        self.log("reward", metrics["train/reward_mean"], prog_bar=True, logger=False, batch_size=len(rewards))

    def prior_diagnostics(
        self,
        rollouts: Rollouts,
        prior: torch.Tensor | None,
        timings: dict[str, float],
        heldout: torch.Tensor | None = None,
        used_baseline: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """V0.5's own per-step diagnostics: rollouts per prompt, rejections, fusion weights, Brier, and,
        given `heldout` (`[P]` mean ±1 reward of fresh samples from the same policy), the squared error
        of the baseline and of the empirical mean against it. The baseline is V0.5's fused one, or
        `used_baseline` `[P]` where the estimator subtracted another (BASIS); fusion weights and
        rejections describe V0.5's test and are logged for V0.5 only."""
        counts, means = group_counts_means(rollouts)  # [P], [P]
        self._v05_history["rollouts_per_prompt"] += counts.tolist()
        metrics = {
            "v05/prior_used": float(prior is not None),
            "v05/prior_failures": float(self._prior_failures),
            "v05/support_size": float(len(self.support)),
            "v05/rollouts_per_prompt": float(counts.float().mean()),
            "v05/rollouts_per_prompt_max": float(counts.max()),
            # the step's distribution, for a histogram over training (the figure pools every step)
            "v05/rollouts_per_prompt_p50": float(counts.float().quantile(0.5)),
            "v05/rollouts_per_prompt_p90": float(counts.float().quantile(0.9)),
            "v05/rollouts_at_k_init_frac": float((counts == self.hparams.group_size).float().mean()),
            # the step time spent waiting for V0 (its query overlaps the first rollout round) ...
            "v05/prior_time_frac": timings.get("prior", 0.0) / max(sum(timings.values()), 1e-9),
        }
        if self._prior_query_seconds is not None:  # ... and the query's own run time
            metrics["v05/prior_query_seconds"] = self._prior_query_seconds
            self._prior_query_seconds = None
        if prior is None:
            return metrics
        if used_baseline is None:
            baseline, weight = fused_baseline(means, counts, prior)  # [P], [P]
            self._v05_history["fusion_weight"] += weight.tolist()
            metrics["v05/prior_rejected_frac"] = float((weight > 0).float().mean())  # after OSLA's rounds
            # ... and at k_init, the test that decides OSLA's spending (the first round comes first)
            first = len(rollouts.prompts) * self.hparams.group_size
            k0, mean0 = group_counts_means(
                rollouts._replace(index=rollouts.index[:first], correct=rollouts.correct[:first])
            )
            metrics["v05/prior_rejected_frac_k_init"] = float(
                (fused_baseline(mean0, k0, prior)[1] > 0).float().mean()
            )
            metrics["v05/fusion_weight_mean"] = float(weight.mean())
            metrics["v05/fusion_weight_p90"] = float(weight.quantile(0.9))
        else:
            baseline = used_baseline  # [P]
        p, rate = (prior + 1) / 2, (means + 1) / 2  # [P] probability scale
        metrics["v05/prior_brier"] = float(((p - rate) ** 2).mean())
        # ... which includes the rate's own sampling noise, mu(1 - mu) / k: with the same prior BASIS
        # (k = 1) scores far worse than V0.5 (k = 4-16). Less its unbiased estimate, the prior's own error
        # (p - mu)^2, comparable across estimators and steps (prompts with k >= 2; absent for BASIS).
        several = counts >= 2  # [P]
        if several.any():
            noise = rate * (1 - rate) / (counts - 1).clamp(min=1)  # [P]
            metrics["v05/prior_sq_error_debiased"] = float(((p - rate) ** 2 - noise)[several].mean())
        if self.calibrator is not None:
            metrics["v05/calibration_scale"] = self.calibrator.scale
            metrics["v05/calibration_shift"] = self.calibrator.shift
        if heldout is not None:
            metrics["v05/baseline_sq_error_heldout"] = float(((baseline - heldout) ** 2).mean())
        return metrics

    def heldout_mean_reward(self, prompts: list[PromptRow]) -> torch.Tensor:
        """Mean ±1 reward `[P]` of `heldout_rollouts` fresh samples per prompt (never trained on)."""
        k = self.hparams.heldout_rollouts
        heldout = self.collect_rollouts(prompts, [k] * len(prompts), {}, salt=1000)
        return group_counts_means(heldout)[1]  # [P]

    def log_metrics(self, metrics: dict[str, float], series: str) -> None:
        """Average `metrics` over ranks and write them at step = RL step. A step of `series` ("train"
        or "val") that MLflow already holds – a step replayed after a resume – is not written again."""
        if self.trainer.world_size > 1 and _distributed():
            # by name, not by position: ranks can log different keys (a rank whose prior fell back this
            # step has no fusion metrics); each key is averaged over the ranks that logged it
            shards: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shards, metrics)
            names = list(dict.fromkeys(name for shard in shards for name in shard))
            metrics = {
                name: float(np.mean([shard[name] for shard in shards if name in shard])) for name in names
            }
        replayed = self.trainer.state.fn == "fit" and self.rl_step <= self._last_logged[series]
        if self.logger is None or replayed:
            return
        self.logger.log_metrics(metrics, step=self.rl_step)

    def write_rollout_records(self, rollouts: Rollouts, trained: torch.Tensor | None = None) -> None:
        """Every rollout of the step as one parquet file per rank; `trained` `[G]` marks the groups
        trained on (dynamic sampling generates more than it trains on; None: all of them)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [rollouts.prompts[i] for i in rollouts.index.tolist()]
        table = pa.table(
            {
                "step": [self.rl_step] * len(rows),
                "prompt_id": [r.prompt_id for r in rows],
                "prompt": [r.prompt if isinstance(r.prompt, str) else json.dumps(r.prompt) for r in rows],
                "reward": rollouts.correct.tolist(),
                "response_length": [len(c.token_ids) for c in rollouts.completions],
                "finish_reason": [c.finish_reason for c in rollouts.completions],
                "response": [c.text for c in rollouts.completions],
                "trained": [True] * len(rows) if trained is None else trained[rollouts.index].tolist(),
            }
        )
        folder = self.run_dir / "rollouts"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.rl_step:06d}-rank{self.global_rank}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def _periodic_export(self, step: int) -> bool:
        every = self.hparams.export_every_n_steps
        return bool(every) and step % every == 0

    def export(self, out_dir: Path) -> None:
        """Save the policy in HF format (LoRA: merged weights, plus the adapter in `adapter/`), in the
        starting checkpoint's dtype. Every rank calls it: under FSDP they gather the weights together."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        gathered = (
            gathered_state_dict(strategy.model, "policy") if isinstance(strategy, FSDPStrategy) else None
        )
        if self.global_rank != 0:
            return
        export_policy(
            self.policy,
            self.tokenizer,
            out_dir,
            metadata={"rl_step": self.rl_step, "model_path": self.hparams.model_path},
            state_dict=gathered,
            dtype=saved_dtype(self.hparams.model_path),
        )

    # ----------------------------------------------------------------- setup checks

    def _check_prompt_lengths(self, rows: list[PromptRow], split: str) -> None:
        context = getattr(self.policy.config, "max_position_embeddings", None)
        max_new = self.hparams.max_new_tokens
        limit = self.hparams.max_prompt_tokens
        if limit is None:
            limit = context - max_new if context is not None else None
        elif context is not None and limit + max_new > context:
            raise ValueError(
                f"model.max_prompt_tokens ({limit}) + model.max_new_tokens ({max_new}) exceeds the model's "
                f"context of {context} tokens"
            )
        if limit is None:
            return
        longest = max(rows, key=lambda r: len(self.prompt_token_ids(r)))
        length = len(self.prompt_token_ids(longest))
        if length > limit:
            allowed = (
                f"model.max_prompt_tokens={limit}"
                if self.hparams.max_prompt_tokens is not None
                else f"the {limit} that the model's context of {context} leaves after model.max_new_tokens={max_new}"
            )
            raise ValueError(
                f"{split} prompt {longest.prompt_id!r} has {length} tokens, more than {allowed}; "
                "filter long prompts or shorten responses"
            )

    def _check_divisibility(self, prompts_per_step: int) -> None:
        responses = prompts_per_step * self.hparams.group_size
        if responses % self.hparams.mini_batches:
            raise ValueError(
                f"data.prompts_per_step x model.group_size = {responses} responses do not split into "
                f"model.mini_batches={self.hparams.mini_batches} equal mini-batches"
            )


# --------------------------------------------------------------------- module-level helpers


_SERIES_SENTINEL = {"train": "train/reward_mean", "val": "val/mean_at_k"}


def group_counts_means(rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollouts per prompt `[P]` (int64) and mean ±1 reward per prompt `[P]` (0 where none)."""
    num = len(rollouts.prompts)
    counts = torch.bincount(rollouts.index, minlength=num)  # [P]
    sums = torch.zeros(num).index_add_(0, rollouts.index, to_pm1(rollouts.correct))  # [P]
    return counts, sums / counts.clamp(min=1)  # [P], [P]


def success_rates(rollouts: Rollouts) -> torch.Tensor:
    """Fraction of correct responses per prompt `[P]`."""
    return (group_counts_means(rollouts)[1] + 1.0) / 2.0  # [P]


def empirical_prior(rewards: torch.Tensor, index: torch.Tensor, pooled: bool = False) -> torch.Tensor:
    """The fallback "prior" per prompt `[P]` when V0 cannot be used. For V0.5 the group mean (groups of
    2+; else the batch mean): its fused baseline is then the group mean. For BASIS (`pooled`) a constant
    0 (success rate 1/2): the leave-one-group-out logit shift turns any constant into the mean of the
    other groups, and a constant is the same on every data-parallel rank, where a rank's own batch mean
    would carry a prompt's own reward into its baseline once the ranks' batches are pooled."""
    num = int(index.max()) + 1
    counts = torch.bincount(index, minlength=num)  # [P]
    if pooled:
        return torch.zeros(num)  # [P]
    if int(counts.max()) == 1:
        return torch.full((num,), float(rewards.mean()))  # [P]
    return torch.zeros(num).index_add_(0, index, rewards) / counts.clamp(min=1)  # [P]


def histogram_figure(values: list[float], label: str) -> Any:
    from matplotlib.figure import Figure  # not pyplot: figures logged every validation are never kept open

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.hist(values, bins=min(32, max(4, len(set(values)))), color="tab:blue", alpha=0.8)
    ax.set_xlabel(label)
    ax.set_ylabel("prompts")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def zero_variance_fraction(rollouts: Rollouts) -> float:
    """Fraction of prompt groups whose responses all got the same reward."""
    return 1.0 - len(informative_group_ids(rollouts)) / len(torch.unique(rollouts.index))


def _row_key(row: PromptRow) -> tuple[str, str]:
    return row.prompt_id, prompt_text(row.prompt)


def informative_group_ids(rollouts: Rollouts) -> list[int]:
    """The groups of `rollouts` whose rewards differ (DAPO's dynamic-sampling filter), in order."""
    return torch.unique(rollouts.index[dynamic_sampling_mask(rollouts.correct, rollouts.index)]).tolist()


def select_groups(rollouts: Rollouts, groups: Iterable[int]) -> Rollouts:
    """The responses of prompts `groups` (in that order), renumbered 0..len(groups) - 1."""
    groups = list(groups)
    new_id = torch.full((len(rollouts.prompts),), -1, dtype=torch.long)  # [P]
    new_id[torch.as_tensor(groups, dtype=torch.long)] = torch.arange(len(groups))
    index = new_id[rollouts.index]  # [N], -1 for dropped groups
    rows = torch.nonzero(index >= 0).flatten().tolist()
    return Rollouts(
        [rollouts.prompts[g] for g in groups],
        [rollouts.prompt_ids[i] for i in rows],
        [rollouts.completions[i] for i in rows],
        index[rows],
        rollouts.correct[rows],
        rollouts.verifier_failures,
    )


def concat_groups(first: Rollouts, second: Rollouts) -> Rollouts:
    """`first`'s groups followed by `second`'s (renumbered after them)."""
    return Rollouts(
        first.prompts + second.prompts,
        first.prompt_ids + second.prompt_ids,
        first.completions + second.completions,
        torch.cat([first.index, second.index + len(first.prompts)]),  # [N1 + N2]
        torch.cat([first.correct, second.correct]),  # [N1 + N2]
        first.verifier_failures + second.verifier_failures,
    )


def last_logged_step(logger: Any, metric: str) -> int:
    """The highest step of `metric` already in the logger's MLflow run (-1 if none)."""
    history = logger.experiment.get_metric_history(logger.run_id, metric)
    return max((m.step for m in history), default=-1)


def pass_at_k_figure(curves: dict[int, dict[int, float]]) -> Any:
    from matplotlib.figure import Figure  # not pyplot: figures logged every validation are never kept open

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for step, curve in sorted(curves.items()):
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=f"step {step}")
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (validation)")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _validate_prior_settings(advantage: str, prior: Any, osla: OslaSettings | None, group_size: int) -> None:
    needs_prior = advantage in ESTIMATORS and ESTIMATORS[advantage].needs_prior
    if needs_prior and prior is None:
        raise ValueError(
            f"model.advantage={advantage!r} needs a value prior: set model.prior to an exported prior folder"
        )
    if osla is not None and advantage != "v05":
        raise ValueError(f"model.osla is the V0.5 budget; it needs model.advantage='v05', not {advantage!r}")
    if osla is not None and group_size > osla.k_max:
        raise ValueError(
            f"model.group_size={group_size} (k_init) exceeds OSLA's k_max={osla.k_max} for c={osla.c}"
        )


def _validate_dynamic_sampling(advantage: str, rounds: int, prior: Any) -> None:
    if rounds < 0:
        raise ValueError(f"model.dynamic_sampling_rounds must be >= 0 (0 disables it), got {rounds}")
    if rounds and prior is not None:
        raise ValueError(
            "model.dynamic_sampling_rounds with a model.prior is not supported: the prior's support buffer "
            "learns from the step's prompts, which dynamic sampling replaces"
        )
    group_baselines = [
        n for n, spec in ESTIMATORS.items() if spec.min_group_size >= 2 and not spec.needs_prior
    ]
    if rounds and advantage not in group_baselines:
        raise ValueError(
            f"model.dynamic_sampling_rounds={rounds} drops groups whose rewards are all equal, which carry no "
            f"signal only under a group baseline ({', '.join(group_baselines)}); {advantage!r} learns from them"
        )


def _validate_settings(
    advantage: str,
    group_size: int,
    ppo_epochs: int,
    mini_batches: int,
    micro_batch_size: int,
    loss_agg: str,
    kl_estimator: str,
    val_samples: int,
) -> None:
    if advantage not in ESTIMATORS:
        choices = "".join(f"\n  {name}: {spec.description}" for name, spec in sorted(ESTIMATORS.items()))
        raise ValueError(
            f"model.advantage={advantage!r} is not a registered estimator; choose one of:{choices}"
        )
    need = ESTIMATORS[advantage].min_group_size
    if group_size < need:
        raise ValueError(
            f"model.group_size={group_size} is below {need}, the smallest group the {advantage!r} estimator supports"
        )
    for name, value in [
        ("ppo_epochs", ppo_epochs),
        ("mini_batches", mini_batches),
        ("micro_batch_size", micro_batch_size),
        ("val_samples", val_samples),
    ]:
        if value < 1:
            raise ValueError(f"model.{name} must be >= 1, got {value}")
    if loss_agg not in AGG_MODES:
        raise ValueError(f"model.loss_agg={loss_agg!r} must be one of {', '.join(AGG_MODES)}")
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"model.kl_estimator={kl_estimator!r} must be k1, k2 or k3")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` (CPU) summed over all data-parallel ranks (itself when not distributed), on the CPU."""
    return _reduce_over_ranks(values, "sum")


def _reduce_over_ranks(values: torch.Tensor, op: str) -> torch.Tensor:
    """`values` (CPU) reduced with `op` ("sum", "min" or "max") over all data-parallel ranks (itself
    when not distributed), on the CPU."""
    if not _distributed():
        return values
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    reduced = values.to(device)
    torch.distributed.all_reduce(reduced, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return reduced.cpu()


def _zero_loss(policy: torch.nn.Module) -> torch.Tensor:
    """A loss of exactly 0 whose backward pass reaches every trainable parameter (zero gradients), so
    DDP's reducer fires for all of them: the pass that all-reduces gradients accumulated without sync."""
    return torch.stack([(p * 0.0).sum().float() for p in policy.parameters() if p.requires_grad]).sum()


def _over_all_ranks(
    estimate: Callable[..., torch.Tensor], rewards: torch.Tensor, index: torch.Tensor, options: dict[str, Any]
) -> torch.Tensor:
    """`estimate(rewards, index, **options)` `[N]` (advantages, or BASIS's baseline) for this rank's
    responses, computed on the responses of every data-parallel rank: REINFORCE++ whitens over the
    whole batch's tokens and BASIS fits its logit shift on the whole batch, so neither may see one
    rank's shard alone (group-wise estimators give the same numbers either way). Per-response options
    (`[N]` tensors) travel with the rewards."""
    if not _distributed():
        return estimate(rewards, index, **options)
    per_response = {
        k: v for k, v in options.items() if isinstance(v, torch.Tensor) and v.shape == rewards.shape
    }
    local = {"rewards": rewards, "index": index, **per_response}
    shards: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, {k: v.detach().cpu() for k, v in local.items()})
    merged = {k: torch.cat([shard[k] for shard in shards]) for k in local}
    prompts_before = np.cumsum([0] + [int(shard["index"].max()) + 1 for shard in shards[:-1]])  # per rank
    merged["index"] = torch.cat([shard["index"] + int(n) for shard, n in zip(shards, prompts_before)])
    out = estimate(merged.pop("rewards"), merged.pop("index"), **{**options, **merged})
    start = sum(len(shard["rewards"]) for shard in shards[: torch.distributed.get_rank()])
    return out[start : start + len(rewards)].to(rewards.device)  # [N]


def _global_counts(response_mask: torch.Tensor) -> tuple[float, float, int]:
    """Response tokens and sequences of one update summed over all data-parallel ranks, and the
    number of ranks. A rank's token-mean (or sequence-mean) loss uses the all-rank counts, so after
    DDP / FSDP average the gradients they are those of the whole batch's mean, not a mean of per-rank
    means (which weights the tokens of a rank with short responses up)."""
    local = torch.tensor([float(response_mask.sum()), float(response_mask.shape[0])], dtype=torch.float64)
    tokens, sequences = _sum_over_ranks(local).tolist()
    return tokens, sequences, torch.distributed.get_world_size() if _distributed() else 1


def trim_padding(batch: PolicyBatch) -> PolicyBatch:
    """`batch` without the columns that are padding in every row: left of its longest prompt and right of
    its longest response. Positions come from the attention mask and attention is causal, so the kept
    tokens' log-probs are unchanged (up to rounding)."""
    prompt = max(1, int(batch.attention_mask[:, : batch.prompt_width].sum(-1).max()))
    response = max(1, int(batch.response_mask.sum(-1).max()))
    columns = slice(batch.prompt_width - prompt, batch.prompt_width + response)
    return PolicyBatch(
        batch.input_ids[:, columns],
        batch.attention_mask[:, columns],
        batch.response_mask[:, :response],
        batch.rollout_logprobs[:, :response],
        prompt,
    )


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under `model` (a peft wrapper included) can compute only its last logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _select(batch: PolicyBatch, rows: torch.Tensor) -> PolicyBatch:
    return PolicyBatch(
        batch.input_ids[rows],
        batch.attention_mask[rows],
        batch.response_mask[rows],
        batch.rollout_logprobs[rows],
        batch.prompt_width,
    )


def _append(stats: dict[str, list[float]], **values: float) -> None:
    for key, value in values.items():
        stats.setdefault(key, []).append(value)


class _AfterStep(L.Callback):
    """Runs `PolicyTrainer.after_step` (exports, the end of the run) once a step is done, outside
    `training_step`: Lightning's FSDP strategy runs `training_step` inside the root module's forward, where
    FSDP1 refuses to gather the full weights. Lightning orders ModelCheckpoint after every other callback,
    so this still runs before the step's checkpoint is saved."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.after_step()


@contextlib.contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to `timings[name]` (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
