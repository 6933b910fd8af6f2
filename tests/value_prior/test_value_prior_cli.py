"""The `value-prior` command end to end in subprocesses: every shipped YAML parses, a tiny `fit` trains,
logs to a real sqlite MLflow store, exports a loadable prior, and `test` scores the best checkpoint.
The shipped checkpoint callbacks are also run in process (fast) to check what `--ckpt_path last` gets.
(Named apart from tests/basis/test_cli.py: test folders are not packages, so basenames must be unique.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from value_prior.backbone import HFBackbone
from value_prior.data import PairsDataModule
from value_prior.model import V0Module

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "value_prior").glob("*.yaml"))


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "value_prior.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ | (env or {}),
        timeout=timeout,
    )


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_prints(config: Path) -> None:
    done = run_cli("fit", "--config", str(config), "--print_config")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = yaml.safe_load(done.stdout)
    assert printed["model"]["export_dir"] and printed["data"]["pairs"]


def test_release_config_exports_to_the_documented_folder() -> None:
    config = yaml.safe_load((REPO / "configs" / "value_prior" / "v0_release_minilm.yaml").read_text())
    assert config["model"]["export_dir"] == "artifacts/priors/v0-release-minilm"
    assert config["data"]["format"] == "v0-release"


def shipped_checkpoint_callbacks(config: Path, dirpath: Path) -> list[ModelCheckpoint]:
    """The `ModelCheckpoint` callbacks of a shipped YAML, in its order, writing to `dirpath`."""
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    return [
        ModelCheckpoint(**callback["init_args"] | {"dirpath": str(dirpath)})
        for callback in callbacks
        if callback["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_last_checkpoint_holds_the_final_epoch(
    config: Path, tiny_backbone: HFBackbone, shipped_head: str, tiny_pairs_path: str, tmp_path: Path
) -> None:
    """`value-prior fit --ckpt_path last` resumes from last.ckpt, so it must hold the final epoch even when
    val/gauc stopped improving (lr 0 keeps it constant: the best epoch is the first), and `best.ckpt`
    must stay the best one; no stray `last-v1.ckpt`."""
    module = V0Module(backbone=tiny_backbone, head=shipped_head, lr=0.0, warmup_frac=0.0)
    data = PairsDataModule(
        tiny_pairs_path, support_size=16, query_pairs=2, episodes_per_batch=2, batches_per_epoch=1
    )
    checkpoints = tmp_path / "checkpoints"
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=shipped_checkpoint_callbacks(config, checkpoints))  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(checkpoints / "best.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 3)
    assert (best["epoch"], best["global_step"]) == (0, 1)
    assert trainer.checkpoint_callback is not None and trainer.checkpoint_callback.monitor == "val/gauc"


def test_a_resumed_fit_continues_its_mlflow_run(
    tmp_path: Path, tiny_encoder_dir: str, tiny_pairs_path: str, mlflow_store: str
) -> None:
    """`fit --ckpt_path last` used to open a second MLflow run; the run id is kept beside the checkpoints.
    In process (`value_prior.cli.main`), with a tiny encoder and 1 batch per epoch."""
    import mlflow

    from value_prior.cli import main

    config = yaml.safe_load((REPO / "configs" / "value_prior" / "v0_pairs_minilm.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if "dirpath" in callback.get("init_args", {}):
            callback["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    overrides = [
        "--config", str(tmp_path / "tiny.yaml"),
        "--model.backbone.init_args.model", tiny_encoder_dir,
        "--model.backbone.init_args.max_length", "32",
        "--model.backbone.init_args.cache_dir", str(tmp_path / "cache"),
        "--model.export_dir", str(tmp_path / "prior"),
        "--data.pairs", tiny_pairs_path,
        "--data.support_size", "16",
        "--data.query_pairs", "2",
        "--data.batches_per_epoch", "1",
    ]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", *overrides, "--trainer.max_epochs", "1"])
    # the run id used to be written into the checkpoint folder before ModelCheckpoint looked at it
    assert not any("exists and is not empty" in str(w.message) for w in caught)
    main(["fit", *overrides, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    mlflow.set_tracking_uri(mlflow_store)
    (run,) = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("value-prior").experiment_id])
    assert sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/gauc")) == [
        0,
        1,
    ]
    # `predict --ckpt_path last` writes beside the checkpoint it resolves to, not in the working folder
    main(["predict", *overrides, "--ckpt_path", "last", "--trainer.logger", "false"])
    assert (tmp_path / "checkpoints" / "predictions.parquet").is_file()


@pytest.mark.slow  # three CLI subprocesses: about a minute on an idle 2-core machine
def test_tiny_fit_test_and_export(
    tmp_path: Path, tiny_encoder_dir: str, tiny_pairs_path: str, mlflow_store: str
) -> None:
    config = yaml.safe_load((REPO / "configs" / "value_prior" / "v0_pairs_minilm.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if "dirpath" in callback.get("init_args", {}):
            callback["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    export = tmp_path / "prior"
    overrides = [
        "--model.backbone.init_args.model", tiny_encoder_dir,
        "--model.backbone.init_args.max_length", "32",
        "--model.backbone.init_args.cache_dir", str(tmp_path / "cache"),
        "--model.export_dir", str(export),
        "--data.pairs", tiny_pairs_path,
        "--data.support_size", "16",
        "--data.query_pairs", "2",
        "--data.batches_per_epoch", "3",
        "--trainer.max_epochs", "2",
    ]  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": mlflow_store}
    done = run_cli("fit", "--config", str(config_path), *overrides, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (export / "config.json").is_file() and (tmp_path / "checkpoints" / "best.ckpt").is_file()

    check = (
        "from value_prior import ValuePrior; import sys; p = ValuePrior.load(sys.argv[1]); "
        "print(p.num_features, p.predict(['Q: 1+1=', 'Q: 90+50*4='], [1.0, 0.0], ['Q: 2+3*1=']).tolist())"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", check, str(export)], capture_output=True, text=True, cwd=tmp_path
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.startswith("8 [")

    done = run_cli(
        "test",
        "--config",
        str(config_path),
        *overrides,
        "--ckpt_path",
        str(tmp_path / "checkpoints" / "best.ckpt"),
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    predictions = tmp_path / "predictions.parquet"
    writer = [
        "--trainer.callbacks+=value_prior.model.PredictionsWriter",
        f"--trainer.callbacks.output={predictions}",
    ]
    done = run_cli("predict", "--config", str(config_path), *overrides, *writer, "--ckpt_path", str(tmp_path / "checkpoints" / "best.ckpt"), env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    rows = datasets.Dataset.from_parquet(str(predictions))
    assert set(rows.column_names) == {"pool", "prompt_id", "prob", "success"} and len(rows) > 0
    assert all(0 < p < 1 for p in rows["prob"])

    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["value-prior"], order_by=["attributes.start_time ASC"])
    fit_run, test_run = runs.iloc[0], runs.iloc[1]  # (the predict run follows)
    for metric in (
        "val/gauc",
        "val/auc",
        "val/pair_acc",
        "val/brier",
        "val/ece",
        "train/loss",
        "train/loss_pair",
    ):
        assert (
            f"metrics.{metric}" in fit_run.index
            and fit_run[f"metrics.{metric}"] == fit_run[f"metrics.{metric}"]
        )
    assert "metrics.test/gauc" in test_run.index
    assert test_run["tags.ckpt_path"] == str((tmp_path / "checkpoints" / "best.ckpt").resolve())
    assert fit_run["params.lr"] == "0.001" and fit_run["params.support_size"] == "16"
    artifacts = {a.path for a in client.list_artifacts(fit_run.run_id)}
    assert {"config.yaml", "plots", "prior"} <= artifacts
    assert {a.path for a in client.list_artifacts(fit_run.run_id, "prior")} >= {
        "prior/config.json",
        "prior/head.ckpt",
    }
    plots = [a.path for a in client.list_artifacts(fit_run.run_id, "plots/val")]
    assert plots and all(p.endswith(".png") for p in plots)


def tiny_overrides(tmp_path: Path, tiny_encoder_dir: str, tiny_pairs_path: str) -> list[str]:
    """Flags that shrink a shipped config to the tiny encoder and pairs, with no MLflow run."""
    return [
        "--model.backbone.init_args.model", tiny_encoder_dir,
        "--model.backbone.init_args.max_length", "32",
        "--model.backbone.init_args.cache_dir", str(tmp_path / "cache"),
        "--data.pairs", tiny_pairs_path,
        "--data.support_size", "16",
        "--data.query_pairs", "2",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip


def test_predict_writes_its_predictions_by_default(
    tmp_path: Path, tiny_encoder_dir: str, tiny_pairs_path: str, capsys: pytest.CaptureFixture
) -> None:
    """`predict` without a configured writer used to print and write nothing; it now writes
    `<default_root_dir>/predictions.parquet` and prints the path. A configured writer wins. In process."""
    from value_prior.cli import main

    config = ["--config", str(REPO / "configs" / "value_prior" / "v0_pairs_minilm.yaml")]
    overrides = tiny_overrides(tmp_path, tiny_encoder_dir, tiny_pairs_path)
    main(["predict", *config, *overrides])
    default = tmp_path / "run" / "predictions.parquet"
    assert f"predictions written to {default}" in capsys.readouterr().out
    rows = datasets.Dataset.from_parquet(str(default))
    assert set(rows.column_names) == {"pool", "prompt_id", "prob", "success"} and len(rows) > 0

    default.unlink()
    chosen = tmp_path / "chosen.parquet"
    writer = [
        "--trainer.callbacks+=value_prior.model.PredictionsWriter",
        f"--trainer.callbacks.output={chosen}",
    ]
    main(["predict", *config, *overrides, *writer])
    assert f"predictions written to {chosen}" in capsys.readouterr().out
    assert chosen.is_file() and not default.exists()


@pytest.mark.parametrize("config", ["v0_pairs_minilm.yaml", "v0_release_minilm.yaml"])
def test_seed_everything_seeds_the_model_and_the_data(
    config: str, tmp_path: Path, tiny_encoder_dir: str, tiny_pairs_path: str
) -> None:
    """`model.seed` (adapter init) and `data.seed` (episodes, eval subsamples) used to stay at the YAML's
    value (0) whatever `seed_everything` said, as in `basis fit` before."""
    from value_prior.cli import V0CLI

    args = [
        "--config", str(REPO / "configs" / "value_prior" / config),
        *tiny_overrides(tmp_path, tiny_encoder_dir, tiny_pairs_path),
        "--seed_everything=7",
    ]  # fmt: skip
    cli = V0CLI(V0Module, PairsDataModule, run=False, args=args)
    assert cli.model.hparams.seed == 7 and cli.datamodule.seed == 7


def test_seed_everything_seeds_the_modules_from_python_too(
    tiny_backbone: HFBackbone, shipped_head: str, tiny_pairs_path: str
) -> None:
    """From Python, `L.seed_everything(s)` left every module seed at 0: a seed sweep gave copies of one run."""
    L.seed_everything(7)
    module, data = V0Module(backbone=tiny_backbone, head=shipped_head), PairsDataModule(tiny_pairs_path)
    assert module.hparams.seed == 7 and data.hparams.seed == 7
    module, data = (
        V0Module(backbone=tiny_backbone, head=shipped_head, seed=3),
        PairsDataModule(tiny_pairs_path, seed=3),
    )
    assert module.hparams.seed == 3 and data.hparams.seed == 3  # an explicit seed wins


def test_bad_input_ends_with_one_line(
    tmp_path: Path, tiny_encoder_dir: str, tiny_pairs_path: str, capsys: pytest.CaptureFixture
) -> None:
    """A missing pairs path used to end `value-prior fit` in a Lightning traceback. In process."""
    from value_prior.cli import main

    config = ["--config", str(REPO / "configs" / "value_prior" / "v0_pairs_minilm.yaml")]
    overrides = tiny_overrides(tmp_path, tiny_encoder_dir, tiny_pairs_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *config, *overrides, "--data.pairs", str(tmp_path / "missing")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("value-prior: error: ") and str(tmp_path / "missing") in err
    assert "Traceback" not in err


def run_overrides(run: Path, tiny_encoder_dir: str, tiny_pairs_path: str) -> list[str]:
    """The pairs config shrunk to the tiny encoder, with its checkpoints and prior under `run`."""
    config = yaml.safe_load((REPO / "configs" / "value_prior" / "v0_pairs_minilm.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if "dirpath" in callback.get("init_args", {}):
            callback["init_args"]["dirpath"] = str(run / "checkpoints")
    config["trainer"]["logger"]["init_args"]["run_name"] = run.name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return [
        "--config", str(run / "config.yaml"),
        "--model.backbone.init_args.model", tiny_encoder_dir,
        "--model.backbone.init_args.max_length", "32",
        "--model.backbone.init_args.cache_dir", str(run.parent / "cache"),
        "--model.export_dir", str(run / "prior"),
        "--data.pairs", tiny_pairs_path,
        "--data.support_size", "16",
        "--data.query_pairs", "2",
        "--data.batches_per_epoch", "1",
    ]  # fmt: skip


def test_a_checkpoint_restores_weights_never_settings(
    tmp_path: Path,
    tiny_encoder_dir: str,
    tiny_pairs_path: str,
    mlflow_store: str,
    capsys: pytest.CaptureFixture,
) -> None:
    """`fit --ckpt_path <another run's best.ckpt>` merged that run's saved settings over the config and
    the flags: it exported into the other run's export_dir, overwriting its prior, with the other run's
    learning rate. `--ckpt_path best` failed outside `fit`; a prior folder or a head checkpoint ended in
    a traceback. In process."""
    import mlflow

    from value_prior.cli import main

    first = run_overrides(tmp_path / "first", tiny_encoder_dir, tiny_pairs_path)
    main(["fit", *first, "--trainer.max_epochs", "1", "--data.batches_per_epoch", "3"])  # 3 steps
    first_prior = (tmp_path / "first" / "prior" / "adapter.safetensors").read_bytes()
    best = tmp_path / "first" / "checkpoints" / "best.ckpt"
    second = run_overrides(tmp_path / "second", tiny_encoder_dir, tiny_pairs_path)
    resume = ["--trainer.max_epochs", "2", "--data.batches_per_epoch", "3", "--ckpt_path", str(best)]
    main(["fit", *second, *resume, "--model.lr", "0.05"])
    assert (tmp_path / "first" / "prior" / "adapter.safetensors").read_bytes() == first_prior
    exported = json.loads((tmp_path / "second" / "prior" / "config.json").read_text())
    client = mlflow.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("value-prior").experiment_id
    (fit,) = client.search_runs([experiment], "attributes.run_name = 'second'")
    assert fit.data.params["lr"] == "0.05" and fit.data.tags["stage"] == "fit"
    assert exported["info"]["mlflow_run_id"] == fit.info.run_id
    assert {"export/val_brier_head", "export/val_brier_calibrated"} <= set(fit.data.metrics)
    last_val = max(m.step for m in client.get_metric_history(fit.info.run_id, "val/gauc"))
    assert [m.step for m in client.get_metric_history(fit.info.run_id, "export/val_brier_head")] == [last_val]
    assert fit.data.tags["export.checkpoint"] == exported["info"]["best_checkpoint"]
    assert float(fit.data.tags["export.val/gauc"]) == pytest.approx(
        exported["info"]["best_score"]["value"], rel=1e-5
    )
    assert fit.data.params["backbone/init_args/max_length"] == "32"
    assert fit.data.params["trainer/max_epochs"] == "2"  # this fit's, not the checkpoint's run's
    assert not any(key.startswith("_") for key in fit.data.params)

    main(["test", *second, "--ckpt_path", "best"])  # Lightning knows `best` only while fitting
    (test,) = client.search_runs([experiment], "attributes.run_name = 'second-test'")
    assert test.data.tags["stage"] == "test" and "test/gauc" in test.data.metrics
    assert test.data.tags["ckpt_path"] == str((tmp_path / "second" / "checkpoints" / "best.ckpt").resolve())
    main(["predict", *second, "--ckpt_path", "best"])
    (predict,) = client.search_runs([experiment], "attributes.run_name = 'second-predict'")
    assert [a.path for a in client.list_artifacts(predict.info.run_id)] == [
        "config.yaml",
        "environment.json",
        "predictions.parquet",
    ]
    capsys.readouterr()

    wrong = {
        tmp_path / "first" / "prior": "is an exported prior folder, not a training checkpoint",
        tmp_path / "first" / "prior" / "head.ckpt": "is not a Lightning training checkpoint",
        tmp_path / "missing.ckpt": "does not exist",
    }
    for path, message in wrong.items():
        with pytest.raises(SystemExit):
            main(["test", *second, "--ckpt_path", str(path)])
        assert f"value-prior: error: --ckpt_path {path} {message}" in capsys.readouterr().err
    from value_prior.model import DEFAULT_HEAD

    # the head is a path, not a shape: another spelling of the same file was refused as another architecture
    main(["test", *second, "--model.head", DEFAULT_HEAD, "--ckpt_path", str(best)])
    with pytest.raises(SystemExit):
        main(["test", *second, "--model.query_dim", "4", "--ckpt_path", str(best)])
    assert "model.query_dim=8 (config: 4)" in capsys.readouterr().err
    # resumed past this fit's schedule (3 steps done of 2 x 1): it would train at learning rate 0
    with pytest.raises(SystemExit):
        main(["fit", *second, "--trainer.max_epochs", "2", "--ckpt_path", str(best), "--model.export_dir", str(tmp_path / "third")])  # fmt: skip
    assert "past this fit's learning-rate schedule" in capsys.readouterr().err
    assert not (tmp_path / "third").exists()


def test_lightnings_own_mlflow_logger_resumes_with_a_raised_max_epochs(
    tmp_path: Path, tiny_encoder_dir: str, tiny_pairs_path: str, mlflow_store: str
) -> None:
    """The trainer settings logged as parameters made Lightning's own MLFlowLogger (which refuses a changed
    parameter) fail the resume that the learning-rate-schedule error asks for: a raised max_epochs."""
    from value_prior.cli import main

    run = run_overrides(tmp_path / "plain", tiny_encoder_dir, tiny_pairs_path)
    logger = [
        "--trainer.logger.class_path", "lightning.pytorch.loggers.MLFlowLogger",
        "--trainer.logger.init_args.tracking_uri", mlflow_store,
    ]  # fmt: skip
    main(["fit", *run, *logger, "--trainer.max_epochs", "1"])
    main(["fit", *run, *logger, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert torch.load(tmp_path / "plain" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
