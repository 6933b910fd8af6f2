"""PolicyTrainer's validation and end-of-run outputs: what is validated, exported and logged, and when,
including after a resume. Real tiny Qwen3, real arithmetic parquet, real sqlite MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import basis.trainer as trainer_module
from basis.data import PromptDataModule
from basis.tasks import write_arithmetic_task
from basis.tracking import MLflowLogger
from basis.trainer import PolicyTrainer


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("arith")
    write_arithmetic_task(out, seed=0, n_train=64, n_val=8, n_test=8)
    return out


class ConstantPrior:
    """Test double for V0: the same success probability for every query."""

    def predict(self, context_prompts, context_success, query_prompts) -> torch.Tensor:
        return torch.full((len(query_prompts),), 0.5)

    def prepare(self, prompts) -> None:
        pass


def make_trainer(run_dir: Path, steps: int, **trainer_kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run_dir,
        **{"logger": False, "num_sanity_val_steps": 0, "limit_val_batches": 0, **trainer_kwargs},
    )


def make_module(model_path: str, run_dir: Path, **kwargs: Any) -> PolicyTrainer:
    defaults = dict(group_size=4, max_new_tokens=12, micro_batch_size=16, run_dir=str(run_dir), val_samples=2)
    return PolicyTrainer(model_path, **{**defaults, **kwargs})


def data(task_dir: Path, **kwargs: Any) -> PromptDataModule:
    return PromptDataModule(str(task_dir), **{"val_path": str(task_dir), "prompts_per_step": 4, **kwargs})


def test_sanity_check_batches_do_not_leak_into_the_first_validation(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    """Lightning's sanity check runs validation batches before fitting; on_validation_epoch_end skipped
    them but kept their samples, so the step-0 validation counted 10 of the 8 prompts."""
    logger = MLflowLogger(experiment_name="sanity")
    trainer = make_trainer(tmp_path, 1, logger=logger, num_sanity_val_steps=1, limit_val_batches=1.0)
    trainer.fit(make_module(tiny_lm_path, tmp_path), datamodule=data(task_dir, val_batch_size=2))
    prompts = logger.experiment.get_metric_history(logger.run_id, "val/prompts")
    assert sorted((m.step, m.value) for m in prompts) == [(0, 8.0), (1, 8.0)]
    mean = {m.step: m.value for m in logger.experiment.get_metric_history(logger.run_id, "val/mean_at_k")}
    pass1 = {m.step: m.value for m in logger.experiment.get_metric_history(logger.run_id, "val/pass_at_k/1")}
    assert mean == pytest.approx(pass1)  # pass@1 is mean@k, over the same prompts


def test_a_budget_stop_between_validations_logs_the_final_histograms(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget spent at step 3 with validations every 2 steps: Lightning's own loop validated step 3,
    which logs no V0.5 histograms, so the run's last ones left out step 3's rollouts."""
    sizes: list[tuple[str, int]] = []
    histogram_figure = trainer_module.histogram_figure
    monkeypatch.setattr(
        trainer_module,
        "histogram_figure",
        lambda values, label: sizes.append((label, len(values))) or histogram_figure(values, label),
    )
    module = make_module(
        tiny_lm_path, tmp_path, advantage="v05", prior=ConstantPrior(), max_rollouts=40, val_every_n_steps=2
    )
    logger = MLflowLogger(experiment_name="budget-histograms")
    make_trainer(tmp_path, 50, logger=logger, limit_val_batches=1.0).fit(module, datamodule=data(task_dir))
    assert module.rl_step == 3
    assert sizes[-1] == ("rollouts per prompt", 3 * 4)  # every step's 4 prompts
    steps = sorted(m.step for m in logger.experiment.get_metric_history(logger.run_id, "val/mean_at_k"))
    assert steps == [0, 2, 3]


def test_a_run_killed_in_its_final_validation_finishes_when_resumed(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    """The final validation and export ran in on_train_end, after Lightning had saved the last step's
    checkpoint; resumed from it, Lightning trains no step and calls no training hook, so the run never
    got its final validation or export."""
    module = make_module(tiny_lm_path, tmp_path)
    run_validation = module.run_validation

    def killed_in_the_final_validation() -> None:
        if module.rl_step == 3:
            raise RuntimeError("killed")
        run_validation()

    module.run_validation = killed_in_the_final_validation
    with pytest.raises(RuntimeError, match="killed"):
        make_trainer(tmp_path, 3).fit(module, datamodule=data(task_dir))
    resumed = make_module(tiny_lm_path, tmp_path)
    make_trainer(tmp_path, 3).fit(
        resumed, datamodule=data(task_dir), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt")
    )
    assert resumed.rl_step == 3
    assert sorted(resumed._pass_curves) == [0, 3]
    assert [p.name for p in (tmp_path / "exports").glob("step_*")] == ["step_000003"]
    # the checkpoint of the final step holds its validation: the end-of-run plot keeps its curve
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert sorted(checkpoint["basis_state"]["pass_curves"]) == [0, 3]


def test_exports_run_after_the_step_and_before_its_checkpoint(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's FSDP runs `training_step` inside the root module's forward, where FSDP1 cannot gather
    full weights, so no export may run inside the step (checked here on CPU by the call stack); each
    must still precede its step's checkpoint."""
    import inspect

    events: list[tuple[str, int]] = []
    export = PolicyTrainer.export

    def spying_export(self: PolicyTrainer, out_dir: Path) -> None:
        assert "training_step" not in {frame.function for frame in inspect.stack()}
        events.append(("export", self.rl_step))
        export(self, out_dir)

    monkeypatch.setattr(PolicyTrainer, "export", spying_export)
    module = make_module(tiny_lm_path, tmp_path, export_every_n_steps=2)
    save = module.on_save_checkpoint
    monkeypatch.setattr(
        module, "on_save_checkpoint", lambda c: (events.append(("ckpt", module.rl_step)), save(c))
    )
    make_trainer(tmp_path, 3).fit(module, datamodule=data(task_dir, val_path=None))
    assert events == [("ckpt", 1), ("export", 2), ("ckpt", 2), ("export", 3), ("ckpt", 3)]
