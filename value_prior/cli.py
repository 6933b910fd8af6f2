"""The `value-prior` command: V0 pretraining via LightningCLI, plus `prior-fit` for the head.

- `value-prior fit|validate|test|predict --config configs/value_prior/v0_release_minilm.yaml` runs
  `lightning.pytorch.cli.LightningCLI` over `V0Module` and `PairsDataModule` (their constructor
  signatures are the config; `--print_config` shows the resolved YAML). `fit` early-stops and keeps
  the best checkpoint on the prompt-level hold-out gAUC (`val/gauc`, set in the YAML), then exports
  the frozen prior artifact to `model.export_dir` (see `value_prior.prior.ExportPrior`). `predict`
  writes `predictions.parquet` beside its `--ckpt_path` (else in `trainer.default_root_dir`;
  `value_prior.model.PredictionsWriter`) unless the config names a prediction writer, and prints the path. `seed_everything` also sets
  `model.seed` and `data.seed` (which are not set on their own).
- `value-prior prior-fit [--config prior_fit.yaml] [--max_steps ...]` prior-fits a small TabPFN head
  on synthetic capability tasks (`value_prior.head.PriorFitConfig`); it is dispatched before
  LightningCLI and parsed by jsonargparse from the dataclass.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from basis.data import seed_of
from basis.tracking import input_errors, tag_evaluated_checkpoint


def prior_fit_main(argv: Sequence[str]) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from value_prior.head import PriorFitConfig, prior_fit

    parser = ArgumentParser(
        prog="value-prior prior-fit", description="Prior-fit V0's TabPFN head on synthetic capability tasks."
    )
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(PriorFitConfig, nested_key=None, as_group=False)
    args = parser.parse_args(list(argv))
    args.pop("config", None)
    result = prior_fit(PriorFitConfig(**{k: v for k, v in vars(args).items() if not k.startswith("__")}))
    print({k: round(v, 4) for k, v in result.items()})


RUN_ID_FILE = "mlflow_run_id"
"""Written beside a fit's checkpoints: `fit --ckpt_path ...` continues that MLflow run."""


class LogConfigToMLflow(SaveConfigCallback):
    """Log the resolved YAML config to the MLflow run as `config.yaml` (MLflow runs have no log dir),
    and, for `fit`, record the run's id beside its checkpoints so a resume continues the same run."""

    def save_config(self, trainer, pl_module, stage: str) -> None:  # type: ignore[no-untyped-def]
        from pathlib import Path

        from lightning.pytorch.loggers import MLFlowLogger

        if isinstance(trainer.logger, MLFlowLogger) and trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            trainer.logger.experiment.log_text(trainer.logger.run_id, text, "config.yaml")
            if stage == "fit":
                for callback in trainer.checkpoint_callbacks:
                    if callback.dirpath:
                        Path(callback.dirpath).mkdir(parents=True, exist_ok=True)
                        (Path(callback.dirpath) / RUN_ID_FILE).write_text(trainer.logger.run_id)


class V0CLI(LightningCLI):
    """LightningCLI with the data module's pool/hold-out settings echoed into the exported prior, one seed
    for everything, and `predict` writing its predictions even when no `PredictionsWriter` is configured."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data.label_threshold", "model.label_threshold")
        # One seed, as in `basis fit`: model.seed (adapter init) and data.seed (episodes, eval
        # subsamples) used to stay 0 whatever seed_everything said, so a config's seed changed nothing.
        for target in ("model.seed", "data.seed"):
            parser.link_arguments("seed_everything", target, compute_fn=seed_of)

    def before_instantiate_classes(self) -> None:
        """`fit --ckpt_path ...` continues the MLflow run recorded beside the checkpoints (one run per fit,
        however often it is resumed), unless the config names a run itself."""
        from pathlib import Path

        from jsonargparse import Namespace

        config = self.config.get(self.subcommand) if self.subcommand else None
        if self.subcommand != "fit" or config is None or not config.get("ckpt_path"):
            return
        logger = config.trainer.get("logger")
        if not isinstance(logger, Namespace) or logger.init_args.get("run_id"):
            return
        for callback in config.trainer.get("callbacks") or []:
            dirpath = callback.init_args.get("dirpath") if isinstance(callback, Namespace) else None
            run_file = Path(dirpath) / RUN_ID_FILE if dirpath else None
            if run_file is not None and run_file.is_file():
                logger.init_args.run_id = run_file.read_text().strip()
                return

    def before_predict(self) -> None:
        """Without a configured prediction writer `predict` computed its predictions and dropped them;
        add a `PredictionsWriter` to `predictions.parquet` beside the checkpoint (else in
        `trainer.default_root_dir`; a configured writer wins)."""
        from pathlib import Path

        from lightning.pytorch.callbacks import BasePredictionWriter

        from value_prior.model import PredictionsWriter

        if not any(isinstance(callback, BasePredictionWriter) for callback in self.trainer.callbacks):
            ckpt_path = self.config.get("predict", {}).get("ckpt_path")
            folder = Path(self.trainer.default_root_dir)
            if ckpt_path in ("last", "best"):  # Lightning finds those in its checkpoint callbacks' folder
                dirs = [c.dirpath for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
                folder = Path(dirs[0]) if dirs else folder
            elif ckpt_path:
                folder = Path(ckpt_path).parent
            self.trainer.callbacks.append(PredictionsWriter(str(folder / "predictions.parquet")))

    def after_validate(self) -> None:
        tag_evaluated_checkpoint(self.trainer)

    def after_test(self) -> None:
        tag_evaluated_checkpoint(self.trainer)

    def after_predict(self) -> None:
        from value_prior.model import PredictionsWriter

        tag_evaluated_checkpoint(self.trainer)
        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionsWriter) and self.trainer.is_global_zero:
                print(f"predictions written to {callback.output}")


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    with input_errors("value-prior"):
        if args and args[0] == "prior-fit":
            prior_fit_main(args[1:])
            return
        from value_prior.data import PairsDataModule
        from value_prior.model import V0Module

        V0CLI(
            V0Module,
            PairsDataModule,
            args=None if argv is None else args,
            save_config_callback=LogConfigToMLflow,
            save_config_kwargs={"save_to_log_dir": False},
        )


if __name__ == "__main__":
    main()
