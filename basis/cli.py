"""`basis` command: LightningCLI over `PolicyTrainer` + `PromptDataModule`.

    basis fit --config configs/policy/grpo_tiny.yaml
    basis fit --config configs/policy/grpo_tiny.yaml --ckpt_path last      # resume a killed run
    basis validate --config configs/policy/grpo_tiny.yaml --ckpt_path last
    basis fit --config configs/policy/grpo_tiny.yaml --print_config

Defaults added here: MLflow logging into the local store (`basis.tracking.MLflowLogger`), no
sanity-check validation (the trainer validates the starting policy itself), and checkpoints loaded
with `weights_only=True`. When resuming (`fit --ckpt_path`), the MLflow run recorded in
`<run_dir>/mlflow_run_id` is continued from its `last.ckpt`, so a resumed run stays one MLflow run;
resuming from any other checkpoint branches off into a new run tagged `resumed_from_run`, so the
earlier attempt's later steps never mask this one's. `validate` logs into a run of its own, so its
numbers never land between the training run's. `seed_everything` seeds everything: the trainer's and
the data module's `seed` follow it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from basis.data import PromptDataModule, seed_of
from basis.tracking import input_errors, name_evaluation_run, tag_evaluated_checkpoint
from basis.trainer import PolicyTrainer

log = logging.getLogger(__name__)


# Model arguments the module does not save as hyperparameters (objects, not settings); logged from the config.
UNSAVED_MODEL_ARGS = ("optimizer", "lr_scheduler", "prior", "engine")


class MLflowConfigCallback(SaveConfigCallback):
    """Store the resolved config as `config.yaml` in the MLflow run (no file next to the logger), and
    as parameters everything the module's own hyperparameters lack: the data module's and trainer's
    settings, seed_everything, and the optimizer, scheduler, prior and engine (`data/prompts_per_step`,
    `model/optimizer/init_args/lr`, `trainer/max_steps`, ...), so runs compare on them in the UI."""

    def save_config(self, trainer, pl_module, stage: str) -> None:  # type: ignore[no-untyped-def]
        logger = trainer.logger
        if trainer.is_global_zero and logger is not None and getattr(logger, "run_id", None):
            text = self.parser.dump(self.config, skip_none=False)
            logger.experiment.log_text(logger.run_id, text, "config.yaml")
            logger.experiment.set_tag(logger.run_id, "stage", str(getattr(stage, "value", stage)))
            config = self.config.as_dict()
            params = {key: config[key] for key in ("seed_everything", "data", "trainer") if key in config}
            params["trainer"] = {
                k: v for k, v in params.get("trainer", {}).items() if k != "logger"
            }  # run id
            params["model"] = {key: _param(config["model"].get(key)) for key in UNSAVED_MODEL_ARGS}
            logger.log_hyperparams(params)


class PolicyCLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path last` means `<run_dir>/checkpoints/last.ckpt`, and the config decides the settings.

        Lightning's own step looks "last" up among the checkpoint callbacks it knows before the module
        exists; PolicyTrainer adds its own, so it found none, warned and started again from step 0. It
        also overwrote the parsed model settings with the checkpoint's hyperparameters, so flags given
        on resume were ignored. Here the checkpoint restores weights and trainer state only."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        if config is None or not config.get("ckpt_path"):
            return
        if config.ckpt_path != "last":
            return check_training_checkpoint(config.ckpt_path)
        last = Path(config.model.run_dir) / "checkpoints" / "last.ckpt"
        if not last.exists():  # a file, or a folder (a sharded FSDP checkpoint)
            log.warning("--ckpt_path last: %s does not exist, so the run starts from step 0", last)
        config.ckpt_path = str(last) if last.exists() else None

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        # One seed: model.seed (rollouts, OSLA, context draws) and data.seed (prompt order) used to stay
        # 0 whatever seed_everything said, so a config's seed changed nothing.
        for target in ("model.seed", "data.seed"):
            parser.link_arguments("seed_everything", target, compute_fn=seed_of)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        logger = config.trainer.get("logger")
        name_evaluation_run(logger, self.subcommand)
        if not config.get("ckpt_path"):
            return
        if config.get("weights_only") is None:
            config.weights_only = True  # checkpoints hold tensors and plain values only
        if self.subcommand != "fit":  # validate logs into a run of its own
            return
        run_file = Path(config.model.run_dir) / "mlflow_run_id"
        if not isinstance(logger, Namespace) or not run_file.exists() or logger.init_args.get("run_id"):
            return
        earlier_run = run_file.read_text().strip()
        last = Path(config.model.run_dir) / "checkpoints" / "last.ckpt"
        if last.exists() and Path(config.ckpt_path).resolve() == last.resolve():
            logger.init_args.run_id = earlier_run  # continue the same MLflow run
            return
        # Another checkpoint branches off: the earlier run keeps its steps after it (their files are set
        # aside as superseded), and this attempt gets a run of its own that says where it came from.
        logger.init_args.tags = {
            **(logger.init_args.get("tags") or {}),
            "resumed_from_run": earlier_run,
            "resumed_from_checkpoint": str(config.ckpt_path),
        }
        log.warning(
            "--ckpt_path %s is not %s: this attempt logs into a new MLflow run (tag resumed_from_run=%s)",
            config.ckpt_path,
            last,
            earlier_run,
        )

    def after_validate(self) -> None:
        tag_evaluated_checkpoint(self.trainer)
        metrics = self.model.last_validation
        if metrics and self.trainer.is_global_zero:  # the numbers, not only a progress bar
            pass_at = ", ".join(
                f"pass@{key.rsplit('/', 1)[1]} {value:.3f}"
                for key, value in metrics.items()
                if key.startswith("val/pass_at_k/")
            )
            print(
                f"validation at RL step {metrics['rl_step']}: mean@k {metrics['val/mean_at_k']:.3f} "
                f"± {metrics['val/mean_at_k_stderr']:.3f} over {metrics['val/prompts']:.0f} prompts; {pass_at}"
            )


def check_training_checkpoint(ckpt_path: str) -> None:
    """Refuse, before any run is created, a `--ckpt_path` that is missing or is an exported policy."""
    path = Path(ckpt_path)
    if ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry"):
        return  # Lightning's own names
    if not path.exists():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist")
    if path.is_dir() and (path / "config.json").is_file():
        raise ValueError(
            f"--ckpt_path {ckpt_path} is an exported policy (Hugging Face folder), not a training checkpoint; "
            f"evaluate it with --model.model_path {ckpt_path}"
        )


def _param(value: object) -> object:
    """A config value as a parameter: a function (the default optimizer factory) by its qualified name,
    not its repr, whose address changes between processes (a resume would record it as changed)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    return value


def main(args: list[str] | None = None) -> None:
    with input_errors("basis"):
        _cli(args)


def _cli(args: list[str] | None) -> None:
    PolicyCLI(
        PolicyTrainer,
        PromptDataModule,
        save_config_callback=MLflowConfigCallback,
        save_config_kwargs={"save_to_log_dir": False},
        trainer_defaults={
            "logger": {
                "class_path": "basis.tracking.MLflowLogger",
                "init_args": {"experiment_name": "basis-policy"},
            },
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
        },
        seed_everything_default=0,
        auto_configure_optimizers=False,  # the optimizer is PolicyTrainer's own `optimizer` argument
        parser_kwargs={"default_env": False},
        args=args,
    )


if __name__ == "__main__":
    main()
