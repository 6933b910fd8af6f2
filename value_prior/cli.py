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
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from basis.data import seed_of
from basis.tracking import MLflowLogger, input_errors, name_evaluation_run, tag_evaluated_checkpoint


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


log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
"""Written beside a fit's checkpoints: `fit --ckpt_path ...` continues that MLflow run."""


class LogConfigToMLflow(SaveConfigCallback):
    """Log the resolved YAML config to the MLflow run as `config.yaml` (MLflow runs have no log dir),
    and, for `fit`, record the run's id beside its checkpoints so a resume continues the same run."""

    def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        """The run id goes beside the checkpoints once training starts: written at setup, it made
        ModelCheckpoint warn on every fresh fit that its folder "exists and is not empty"."""
        from lightning.pytorch.loggers import MLFlowLogger

        if isinstance(trainer.logger, MLFlowLogger) and trainer.is_global_zero:
            for callback in trainer.checkpoint_callbacks:
                if callback.dirpath:
                    Path(callback.dirpath).mkdir(parents=True, exist_ok=True)
                    (Path(callback.dirpath) / RUN_ID_FILE).write_text(trainer.logger.run_id)

    def save_config(self, trainer, pl_module, stage: str) -> None:  # type: ignore[no-untyped-def]
        from lightning.pytorch.loggers import MLFlowLogger

        if isinstance(trainer.logger, MLFlowLogger) and trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            trainer.logger.experiment.log_text(trainer.logger.run_id, text, "config.yaml")
            trainer.logger.experiment.set_tag(
                trainer.logger.run_id, "stage", str(getattr(stage, "value", stage))
            )
            # what the module's own hyperparameters lack: the backbone (an object) and the trainer settings,
            # through our logger only: Lightning's refuses a value changed on resume (a raised max_epochs)
            config = self.config.as_dict()
            if isinstance(trainer.logger, MLflowLogger):
                trainer.logger.log_hyperparams(
                    {
                        "seed_everything": config.get("seed_everything"),
                        "backbone": config["model"].get("backbone"),
                        "trainer": {
                            k: v for k, v in config["trainer"].items() if k not in ("logger", "callbacks")
                        },
                    }
                )


ARCHITECTURE = ("num_queries", "query_dim", "num_heads", "bottleneck", "pooling")
"""V0Module settings that decide the shapes of a checkpoint's weights (`head` is a path: one file has many
spellings, and the strict weight load checks its shapes)."""


class V0CLI(LightningCLI):
    """LightningCLI with the data module's pool/hold-out settings echoed into the exported prior, one seed
    for everything, checkpoints that restore weights but never settings, and `predict` writing its
    predictions even when no `PredictionsWriter` is configured."""

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path` restores weights and trainer state; the config and the flags decide every setting.

        Lightning's own step merged the checkpoint's saved hyperparameters over the config and the flags,
        so `fit --ckpt_path <another run's checkpoint>` exported into that run's `export_dir`, overwriting
        its prior, and trained with its learning rate whatever the flags said. Here `best` and `last`
        name `best.ckpt` / `last.ckpt` in the configured checkpoint folder for every subcommand (Lightning
        knows `best` only while fitting), and anything but a V0 training checkpoint whose architecture
        matches the config is refused, saying what it is."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        if config is None or not config.get("ckpt_path"):
            return
        path = Path(config.ckpt_path)
        if config.ckpt_path in ("best", "last"):
            dirs = [
                Path(callback.init_args.dirpath)
                for callback in config.trainer.get("callbacks") or []
                if isinstance(callback, Namespace)
                and callback.class_path.endswith("ModelCheckpoint")
                and callback.init_args.get("dirpath")
            ]
            found = [
                d / f"{config.ckpt_path}.ckpt" for d in dirs if (d / f"{config.ckpt_path}.ckpt").is_file()
            ]
            if not found and subcommand == "fit" and config.ckpt_path == "last":
                log.warning("--ckpt_path last: no last.ckpt in %s, so the fit starts from epoch 0", dirs)
                config.ckpt_path = None
                return
            if not found:
                raise ValueError(
                    f"--ckpt_path {config.ckpt_path}: no {config.ckpt_path}.ckpt in the configured checkpoint "
                    f"folder(s) {[str(d) for d in dirs]}; pass the checkpoint's path"
                )
            path = found[0]
            config.ckpt_path = str(path)
        check_training_checkpoint(path, {key: config.model.get(key) for key in ARCHITECTURE})

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data.label_threshold", "model.label_threshold")
        # One seed, as in `basis fit`: model.seed (adapter init) and data.seed (episodes, eval
        # subsamples) used to stay 0 whatever seed_everything said, so a config's seed changed nothing.
        for target in ("model.seed", "data.seed"):
            parser.link_arguments("seed_everything", target, compute_fn=seed_of)

    def before_instantiate_classes(self) -> None:
        """`fit --ckpt_path ...` continues the MLflow run recorded beside the checkpoints (one run per fit,
        however often it is resumed), unless the config names a run itself; `validate`, `test` and
        `predict` runs are named `<run name>-<subcommand>`, not like the fit they evaluate."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        logger = config.trainer.get("logger") if config is not None else None
        name_evaluation_run(logger, self.subcommand)
        if self.subcommand != "fit" or not isinstance(logger, Namespace) or logger.init_args.get("run_id"):
            return
        if not config.get("ckpt_path"):
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
        from lightning.pytorch.callbacks import BasePredictionWriter

        from value_prior.model import PredictionsWriter

        if not any(isinstance(callback, BasePredictionWriter) for callback in self.trainer.callbacks):
            ckpt_path = self.config.get("predict", {}).get("ckpt_path")  # best/last resolved to a file
            folder = Path(ckpt_path).parent if ckpt_path else Path(self.trainer.default_root_dir)
            self.trainer.callbacks.append(PredictionsWriter(str(folder / "predictions.parquet")))

    def after_validate(self) -> None:
        tag_evaluated_checkpoint(self.trainer)

    def after_test(self) -> None:
        tag_evaluated_checkpoint(self.trainer)

    def after_predict(self) -> None:
        from value_prior.model import PredictionsWriter

        tag_evaluated_checkpoint(self.trainer)
        logger = self.trainer.logger
        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionsWriter) and self.trainer.is_global_zero:
                print(f"predictions written to {callback.output}")
                if getattr(logger, "run_id", None) and Path(callback.output).is_file():
                    logger.experiment.log_artifact(logger.run_id, callback.output)


def check_training_checkpoint(path: Path, architecture: dict[str, object]) -> None:
    """Refuse, saying what it is, a `--ckpt_path` that is not a `value-prior fit` checkpoint whose
    architecture settings (`ARCHITECTURE`) equal the config's."""
    import torch

    from value_prior.prior import FILES

    if path.is_dir():
        if all((path / name).is_file() for name in FILES):
            raise ValueError(
                f"--ckpt_path {path} is an exported prior folder, not a training checkpoint; score it from "
                "Python with value_prior.ValuePrior.load(path).predict(...), or pass the run's best.ckpt"
            )
        raise ValueError(f"--ckpt_path {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise ValueError(f"--ckpt_path {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"--ckpt_path {path} is not a readable torch checkpoint: {err}") from None
    saved = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if "pytorch-lightning_version" not in checkpoint or not isinstance(saved, dict):
        raise ValueError(
            f"--ckpt_path {path} is not a Lightning training checkpoint (a head checkpoint goes to "
            "model.head, an exported prior is a folder); pass the best.ckpt or last.ckpt of a value-prior fit"
        )
    if not set(architecture) <= set(saved):
        raise ValueError(
            f"--ckpt_path {path} was not written by value-prior fit (its settings are {sorted(saved)[:6]}...)"
        )
    differ = {key: (saved[key], value) for key, value in architecture.items() if saved[key] != value}
    if differ:
        raise ValueError(
            f"--ckpt_path {path} was trained with other architecture settings than the config's, so its "
            "weights cannot load: "
            + ", ".join(f"model.{key}={was!r} (config: {now!r})" for key, (was, now) in differ.items())
        )


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
            parser_kwargs={
                "description": "Pretrain, evaluate and export the V0 value prior. "
                "`value-prior prior-fit --help`: prior-fit its TabPFN head on synthetic tasks."
            },
            save_config_kwargs={"save_to_log_dir": False},
        )


if __name__ == "__main__":
    main()
