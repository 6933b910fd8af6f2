"""The `basis` command in real subprocesses: resume after SIGKILL, DDP on 2 CPU processes, config parsing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained policy, a small arithmetic task and a config that trains it for 5 steps."""
    from basis.tasks import write_arithmetic_task
    from basis.tiny_policy import build_model, build_tokenizer, save_policy

    root = tmp_path_factory.mktemp("cli")
    tokenizer = build_tokenizer()
    save_policy(
        build_model(tokenizer, hidden_size=64, num_layers=2, intermediate_size=128, seed=0),
        tokenizer,
        root / "tiny",
    )
    write_arithmetic_task(root / "task", seed=0, n_train=64, n_val=8, n_test=8)
    config = {
        "trainer": {"max_steps": 5, "enable_progress_bar": False},
        "model": {
            "model_path": str(root / "tiny"),
            "advantage": "dr_grpo",
            "group_size": 4,
            "max_new_tokens": 12,
            "val_samples": 2,
            "val_every_n_steps": 2,
            # An untrained model never earns a reward; the k1 KL term moves the weights every step so
            # that later steps' samples depend on the whole training trajectory.
            "kl_coef": 0.5,
            "kl_estimator": "k1",
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
        },
        "data": {
            "train_path": str(root / "task"),
            "val_path": str(root / "task"),
            "prompts_per_step": 4,
            "val_prompts": 8,
        },
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def basis_cmd(workdir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "basis.cli",
        "fit",
        "--config",
        str(workdir / "config.yaml"),
        f"--model.run_dir={run_dir}",
        *extra,
    ]


def env(workdir: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}


def rollout_table(run_dir: Path) -> list[tuple]:
    rows = []
    for path in sorted((run_dir / "rollouts").glob("*.parquet")):
        table = pq.read_table(path).to_pydict()
        rows += list(zip(table["step"], table["prompt_id"], table["reward"], table["response"]))
    return rows


def metric_steps(workdir: Path, run_dir: Path, name: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return sorted(m.step for m in client.get_metric_history(run_id, name))


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(workdir: Path) -> None:
    full, killed = workdir / "full", workdir / "killed"
    subprocess.run(basis_cmd(workdir, full), env=env(workdir), check=True, capture_output=True)

    proc = subprocess.Popen(
        basis_cmd(workdir, killed), env=env(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    step2 = killed / "rollouts" / "step_000002-rank0.parquet"
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not (step2.exists() and last.exists() and last.stat().st_mtime >= step2.stat().st_mtime):
        assert proc.poll() is None and time.time() < deadline, (
            "training ended or stalled before step 2 was checkpointed"
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "exports").exists()  # it really died mid-run
    done = [killed / "rollouts" / f"step_00000{i}-rank0.parquet" for i in (1, 2)]  # both checkpointed
    before = [p.stat().st_mtime_ns for p in done]

    subprocess.run(
        basis_cmd(workdir, killed, "--ckpt_path=last"), env=env(workdir), check=True, capture_output=True
    )
    # it resumed from the checkpoint: the steps it had done were not run again (a restart from step 0
    # would rewrite them, byte-identical on this machine, and pass every check below)
    assert [p.stat().st_mtime_ns for p in done] == before

    assert rollout_table(killed) == rollout_table(full)
    assert len({row[0] for row in rollout_table(full)}) == 5
    assert metric_steps(workdir, killed, "train/reward_mean") == [1, 2, 3, 4, 5]
    assert (
        metric_steps(workdir, killed, "val/mean_at_k")
        == metric_steps(workdir, full, "val/mean_at_k")
        == [0, 2, 4, 5]
    )


def test_validate_changes_no_files_and_a_resume_may_change_flags(workdir: Path) -> None:
    """`validate --ckpt_path last` used to move the run's later exports aside as a resume does, and
    log its numbers into the training run; a resume with a changed flag crashed in MLflow ("Changing
    param values is not allowed") although the README promises it works."""
    run_dir = workdir / "flags"
    first = ("--trainer.max_steps=3", "--model.checkpoint_every_n_steps=2")  # last.ckpt at step 2
    subprocess.run(basis_cmd(workdir, run_dir, *first), env=env(workdir), check=True, capture_output=True)
    client = MlflowClient(env(workdir)["MLFLOW_TRACKING_URI"])
    run_id = (run_dir / "mlflow_run_id").read_text()
    validated = metric_steps(workdir, run_dir, "val/mean_at_k")

    validate = basis_cmd(workdir, run_dir, "--ckpt_path=last", "--trainer.logger.init_args.run_name=check")
    validate[validate.index("fit")] = "validate"
    subprocess.run(validate, env=env(workdir), check=True, capture_output=True)
    assert (run_dir / "exports" / "step_000003" / "model.safetensors").exists()  # not superseded
    assert metric_steps(workdir, run_dir, "val/mean_at_k") == validated  # its numbers went elsewhere
    experiment = client.get_run(run_id).info.experiment_id
    (check,) = client.search_runs([experiment], "attributes.run_name = 'check-validate'")
    assert check.data.tags["stage"] == "validate" and client.get_run(run_id).data.tags["stage"] == "fit"
    assert check.info.run_id != run_id and "val/mean_at_k" in check.data.metrics
    assert check.data.tags["ckpt_path"] == str((run_dir / "checkpoints" / "last.ckpt").resolve())
    # an export is validated as the model it is, at the RL step it was exported at; as a --ckpt_path
    # it is refused before any run is created (it ended in an IsADirectoryError traceback, exit 1)
    export = run_dir / "exports" / "step_000003"
    validate = basis_cmd(
        workdir, run_dir, f"--model.model_path={export}", "--trainer.logger.init_args.run_name=export"
    )
    validate[validate.index("fit")] = "validate"
    printed = subprocess.run(validate, env=env(workdir), check=True, capture_output=True, text=True).stdout
    assert "validation at RL step 3: mean@k " in printed and "pass@2 " in printed
    (exported,) = client.search_runs([experiment], "attributes.run_name = 'export-validate'")
    assert [m.step for m in client.get_metric_history(exported.info.run_id, "val/mean_at_k")] == [3]
    assert exported.data.tags["evaluated_rl_step"] == "3" and exported.data.tags[
        "evaluated_model_path"
    ] == str(export)
    runs_before = len(client.search_runs([experiment]))
    validate = basis_cmd(workdir, run_dir, f"--ckpt_path={export}")
    validate[validate.index("fit")] = "validate"
    refused = subprocess.run(validate, env=env(workdir), capture_output=True, text=True)
    assert refused.returncode == 2 and len(client.search_runs([experiment])) == runs_before
    assert (
        f"is an exported policy (Hugging Face folder), not a training checkpoint; evaluate it with --model.model_path {export}"
        in refused.stderr
    )

    resume = ("--ckpt_path=last", "--trainer.max_steps=4", "--model.max_rollouts=100000")
    done = subprocess.run(
        basis_cmd(workdir, run_dir, *resume), env=env(workdir), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = client.get_run(run_id)
    assert resumed.data.params["max_rollouts"] == "None"  # MLflow keeps the first value ...
    assert resumed.data.tags["changed_on_resume.max_rollouts"] == "None -> 100000"  # ... and the change
    # the settings the module does not save itself are parameters too, from the config
    assert resumed.data.params["data/prompts_per_step"] == "4"
    assert resumed.data.params["model/optimizer/init_args/lr"] == "0.5"
    assert resumed.data.params["seed_everything"] == "0"
    assert resumed.data.tags["changed_on_resume.trainer/max_steps"] == "3 -> 4"
    assert not any("run_id" in tag or "optimizer" in tag for tag in resumed.data.tags)  # nothing else changed
    assert metric_steps(workdir, run_dir, "train/reward_mean") == [1, 2, 3, 4]


def test_resuming_from_an_earlier_checkpoint_branches_into_a_new_run(workdir: Path) -> None:
    """Continuing the run from an earlier checkpoint kept the abandoned attempt's later steps as the
    run's numbers and dropped the new attempt's (MLflow already held those steps)."""
    import shutil

    run_dir = workdir / "branch"
    first = ("--trainer.max_steps=2", "--model.val_every_n_steps=0")
    subprocess.run(basis_cmd(workdir, run_dir, *first), env=env(workdir), check=True, capture_output=True)
    earlier = shutil.copy(run_dir / "checkpoints" / "last.ckpt", workdir / "step2.ckpt")
    original = (run_dir / "mlflow_run_id").read_text()
    more = ("--ckpt_path=last", "--trainer.max_steps=4", "--model.val_every_n_steps=0")
    subprocess.run(basis_cmd(workdir, run_dir, *more), env=env(workdir), check=True, capture_output=True)
    assert (run_dir / "mlflow_run_id").read_text() == original  # last.ckpt continues the run
    branch = (f"--ckpt_path={earlier}", "--trainer.max_steps=3", "--model.temperature=0.5")
    done = subprocess.run(
        basis_cmd(workdir, run_dir, *branch), env=env(workdir), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    branched = (run_dir / "mlflow_run_id").read_text()
    client = MlflowClient(env(workdir)["MLFLOW_TRACKING_URI"])
    assert branched != original and client.get_run(branched).data.tags["resumed_from_run"] == original
    assert client.get_run(branched).data.params["temperature"] == "0.5"
    assert metric_steps(workdir, run_dir, "train/reward_mean") == [3]  # this attempt's step, logged
    assert sorted(m.step for m in client.get_metric_history(original, "train/reward_mean")) == [1, 2, 3, 4]
    # a branch that stops before its first checkpoint leaves last.ckpt and the run id to each other
    idle = (f"--ckpt_path={earlier}", "--trainer.max_steps=2")
    subprocess.run(basis_cmd(workdir, run_dir, *idle), env=env(workdir), check=True, capture_output=True)
    assert (run_dir / "mlflow_run_id").read_text() == branched


def test_a_sharded_last_checkpoint_folder_is_resumed_and_continues_its_run(tmp_path: Path) -> None:
    """FSDP's sharded `last.ckpt` is a folder: `--ckpt_path last` restarted from step 0 and an explicit
    path to it branched into a new MLflow run, both because the check was `is_file()`."""
    from jsonargparse import Namespace

    from basis.cli import PolicyCLI

    (tmp_path / "checkpoints" / "last.ckpt").mkdir(parents=True)
    (tmp_path / "mlflow_run_id").write_text("abc123")
    logger = Namespace(class_path="basis.tracking.MLflowLogger", init_args=Namespace(run_id=None))
    fit = Namespace(ckpt_path="last", weights_only=None, model=Namespace(run_dir=str(tmp_path)),
                    trainer=Namespace(logger=logger))  # fmt: skip
    cli = PolicyCLI.__new__(PolicyCLI)  # the two hooks only read and write the parsed config
    cli.config, cli.subcommand = Namespace(subcommand="fit", fit=fit), "fit"
    cli._parse_ckpt_path()
    assert fit.ckpt_path == str(tmp_path / "checkpoints" / "last.ckpt")
    cli.before_instantiate_classes()
    assert logger.init_args.run_id == "abc123" and not logger.init_args.get("tags")


def test_a_function_setting_is_logged_by_name() -> None:
    """The default optimizer factory was logged as its repr, '<function _adamw at 0x7fd9...>', whose
    address differs in every process: each resume recorded it as changed."""
    from basis.cli import _param
    from basis.trainer import _adamw

    assert _param(_adamw) == "basis.trainer._adamw" and _param({"lr": 0.5}) == {"lr": 0.5}


def test_long_parameters_keep_what_mlflow_can_hold(mlflow_store: str) -> None:
    """Values were cut at 250 characters without a word (Lightning's limit; MLflow holds 6,000)."""
    from basis.tracking import MLflowLogger

    logger = MLflowLogger(experiment_name="long-params")
    logger.log_hyperparams({"checkpoints": "x" * 300, "huge": "y" * 7000})
    params = MlflowClient().get_run(logger.run_id).data.params
    assert params["checkpoints"] == "x" * 300 and params["huge"] == "y" * 6000


def test_a_new_run_records_its_environment(mlflow_store: str, tmp_path: Path) -> None:
    """Only the tiny-policy build and the benchmarks recorded CPU and package versions; a policy, V0
    or harvest run had the commit alone, though figures move across environments."""
    import json

    import torch

    from basis.tracking import MLflowLogger, mlflow_run

    logger = MLflowLogger(experiment_name="environment")
    logger.log_hyperparams({"lr": 0.5})
    with mlflow_run("environment", run_name="harvest-like") as run:
        pass
    client = MlflowClient()
    for run_id in (logger.run_id, run.info.run_id):
        tags = client.get_run(run_id).data.tags
        assert tags["env.torch"] == torch.__version__ and "env.cpu_simd" in tags
        env = json.loads(
            Path(client.download_artifacts(run_id, "environment.json", str(tmp_path))).read_text()
        )
        assert env["packages"]["torch"] == torch.__version__ and env["python"]
    resumed = MLflowLogger(experiment_name="environment", run_id=logger.run_id)
    resumed.log_hyperparams({"lr": 0.5})  # a continued run keeps its first record
    assert [a.path for a in client.list_artifacts(logger.run_id)] == ["environment.json"]


def test_every_change_on_resume_stays_in_its_tag(mlflow_store: str) -> None:
    """A second change used to overwrite the first: after 300 then 2000 only "None -> 2000" remained."""
    from basis.tracking import MLflowLogger

    first = MLflowLogger(experiment_name="resume-tags")
    first.log_hyperparams({"max_rollouts": None, "lr": 0.5})
    for value in (300, 300, 2000):  # one resume per value; the repeated 300 is no change
        MLflowLogger(experiment_name="resume-tags", run_id=first.run_id).log_hyperparams(
            {"max_rollouts": value, "lr": 0.5}
        )
    data = MlflowClient().get_run(first.run_id).data
    assert (
        data.params["max_rollouts"] == "None"
        and data.tags["changed_on_resume.max_rollouts"] == "None -> 300 -> 2000"
    )
    assert not any(tag.endswith(".lr") for tag in data.tags)


def test_seed_everything_seeds_the_trainer_and_the_data(workdir: Path) -> None:
    """`model.seed` and `data.seed` used to stay 0 whatever `seed_everything` said."""
    from basis.cli import PolicyCLI
    from basis.data import PromptDataModule
    from basis.trainer import PolicyTrainer

    args = ["--config", str(workdir / "config.yaml"), "--seed_everything=7", "--trainer.logger=false"]
    cli = PolicyCLI(PolicyTrainer, PromptDataModule, run=False, args=args)
    assert cli.model.hparams.seed == 7 and cli.datamodule.seed == 7
    # no subcommand (run=False) is no evaluation: the run keeps its name (it was named 'x-None')
    args = [
        "--config", str(workdir / "config.yaml"),
        "--trainer.logger.class_path=basis.tracking.MLflowLogger", "--trainer.logger.init_args.run_name=x",
    ]  # fmt: skip
    env_uri = {"MLFLOW_TRACKING_URI": env(workdir)["MLFLOW_TRACKING_URI"]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", env_uri["MLFLOW_TRACKING_URI"])
        cli = PolicyCLI(PolicyTrainer, PromptDataModule, run=False, args=args)
    assert cli.trainer.logger._run_name == "x"


def test_seed_everything_seeds_the_trainer_and_the_data_from_python_too(workdir: Path) -> None:
    """From Python, `L.seed_everything(s)` left the rollout and prompt-order seeds at 0."""
    import lightning as L

    from basis.data import PromptDataModule
    from basis.trainer import PolicyTrainer

    L.seed_everything(7)
    module, data = PolicyTrainer(str(workdir / "tiny")), PromptDataModule(str(workdir / "task"))
    assert module.hparams.seed == 7 and data.seed == 7
    assert PolicyTrainer(str(workdir / "tiny"), seed=3).hparams.seed == 3  # an explicit seed wins


def test_ddp_on_two_cpu_processes_shards_prompts(workdir: Path) -> None:
    run_dir = workdir / "ddp"
    ddp = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=2")
    # 7 validation prompts: rank 0 holds 4, rank 1 holds 3 (padded to 4 and reduced as sums)
    subprocess.run(
        basis_cmd(workdir, run_dir, *ddp, "--data.val_prompts=7"),
        env=env(workdir),
        check=True,
        capture_output=True,
    )
    rank0 = pq.read_table(run_dir / "rollouts" / "step_000001-rank0.parquet").to_pydict()["prompt_id"]
    rank1 = pq.read_table(run_dir / "rollouts" / "step_000001-rank1.parquet").to_pydict()["prompt_id"]
    assert len(set(rank0)) == len(set(rank1)) == 4 and not set(rank0) & set(rank1)
    assert (run_dir / "exports" / "step_000002" / "model.safetensors").exists()
    client = MlflowClient(env(workdir)["MLFLOW_TRACKING_URI"])
    validated = client.get_metric_history((run_dir / "mlflow_run_id").read_text(), "val/prompts")
    assert sorted((m.step, m.value) for m in validated) == [(0, 7.0), (2, 7.0)]

    # `basis validate` runs Lightning's validation loop, whose loader must not be sharded a second
    # time (Lightning's distributed sampler would keep every other of a rank's batches)
    validate = basis_cmd(workdir, run_dir, *ddp[:2], "--data.val_prompts=7", "--data.val_batch_size=2")
    validate[validate.index("fit")] = "validate"
    validate.append("--trainer.logger.init_args.run_name=ddp")  # logged as ddp-validate
    subprocess.run(validate, env=env(workdir), check=True, capture_output=True)
    (run,) = client.search_runs(
        [client.get_run((run_dir / "mlflow_run_id").read_text()).info.experiment_id],
        "attributes.run_name = 'ddp-validate'",
    )
    assert run.data.metrics["val/prompts"] == 7.0


POLICY_CONFIGS = sorted(
    (REPO / "configs" / "policy").glob("*.yaml")
)  # value_prior/ and harvest/ configs: their own tests


@pytest.mark.parametrize("config", POLICY_CONFIGS, ids=lambda c: c.name)
def test_every_policy_config_parses(config: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "basis.cli", "fit", "--config", str(config), "--print_config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model_path:" in result.stdout


def test_runs_against_another_sqlite_store_keep_artifacts_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's default artifact root is `./mlruns` in the working directory; ours is beside the .db."""
    import mlflow

    from basis.tracking import MLflowLogger, artifact_location, mlflow_run

    store, workdir = tmp_path / "store", tmp_path / "cwd"
    store.mkdir()
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with mlflow_run("plain-script") as run:
        mlflow.log_text("hello", "note.txt")
    logger = MLflowLogger(experiment_name="lightning-run", tracking_uri=uri)
    logger.experiment.log_text(logger.run_id, "hello", "note.txt")
    saved = sorted(str(p.relative_to(store)) for p in store.rglob("note.txt"))
    assert len(saved) == 2 and all(p.startswith("artifacts/") for p in saved)
    assert any(run.info.run_id in p for p in saved)
    assert not any(workdir.iterdir())  # no ./mlruns
    assert artifact_location("http://127.0.0.1:5000") is None  # a server decides


def test_an_experiment_with_artifacts_elsewhere_is_named(
    tmp_path: Path, mlflow_store: str, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    from basis.tracking import ensure_experiment

    mlflow.set_tracking_uri(mlflow_store)
    old = mlflow.create_experiment(
        "from-before", artifact_location=(tmp_path / "checkout" / "mlruns").as_uri()
    )
    with caplog.at_level("WARNING", logger="basis.tracking"):
        assert ensure_experiment("from-before") == old
        ensure_experiment("fresh")
    (warning,) = [r for r in caplog.records if r.name == "basis.tracking"]
    assert (
        "'from-before' keeps its artifacts in" in warning.getMessage()
        and "checkout/mlruns" in warning.getMessage()
    )


def test_bad_input_ends_with_one_line_and_the_failed_run_says_why(workdir: Path) -> None:
    """A setup error used to print ~40 lines of jsonargparse/Lightning traceback and leave an MLflow run
    marked FAILED with nothing in it to say why."""
    run_dir = workdir / "bad-input"
    done = subprocess.run(
        basis_cmd(workdir, run_dir, "--data.train_path=/nonexistent/prompts"),
        env=env(workdir),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    message = "'/nonexistent/prompts' is neither an existing file/folder nor a known preset"
    assert f"basis: error: {message}" in done.stderr
    client = MlflowClient(env(workdir)["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("basis-policy").experiment_id
    (failed,) = client.search_runs([experiment], "tags.error LIKE '%/nonexistent/prompts%'")
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"].startswith(f"ValueError: {message}")


def test_only_our_own_checks_end_without_a_traceback(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from basis.rewards import get_verifier
    from basis.tracking import input_errors

    with pytest.raises(SystemExit) as exit_, input_errors("basis"):
        get_verifier("nope")  # our check: the message names the setting
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "basis: error: unknown verifier 'nope'; known: ['arithmetic', 'math'], or your own as "
        "'package.module:Factory'\n"
    )
    with pytest.raises(SystemExit), input_errors("basis"):
        Path("/nonexistent/file").read_text()  # a missing file is bad input wherever it is found missing
    with pytest.raises(ValueError, match="invalid literal"), input_errors("basis"):
        int("x")  # raised outside this project: a bug to trace, not an input to name
    from basis.data import global_seed

    monkeypatch.setenv("PL_GLOBAL_SEED", "abc")
    with pytest.raises(ValueError, match="invalid literal"), input_errors("basis"):
        global_seed(None)  # int("abc") on one of our lines, not a `raise` of ours: keeps its traceback
    monkeypatch.delenv("PL_GLOBAL_SEED")
    monkeypatch.setenv("BASIS_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unknown verifier"), input_errors("basis"):
        get_verifier("nope")


def test_a_failed_script_run_says_why(mlflow_store: str) -> None:
    """Harvest and the tiny-policy build log through `mlflow_run`; a failure left a FAILED run without a why."""
    from basis.tracking import mlflow_run

    with pytest.raises(ValueError), mlflow_run("scripts", run_name="broken"):
        raise ValueError("prompts.parquet row 3 field 'answer': empty")
    (run,) = MlflowClient(mlflow_store).search_runs(
        [MlflowClient(mlflow_store).get_experiment_by_name("scripts").experiment_id]
    )
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "ValueError: prompts.parquet row 3 field 'answer': empty"


def test_a_continued_run_that_finishes_drops_the_earlier_error(mlflow_store: str) -> None:
    """A run interrupted, then resumed to its end, stayed tagged `error: KeyboardInterrupt` though FINISHED."""
    from basis.tracking import MLflowLogger

    first = MLflowLogger(experiment_name="resumed", tracking_uri=mlflow_store)
    first.log_metrics({"train/reward_mean": 0.5}, step=1)  # the run exists
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        first.finalize("failed")
    client = MlflowClient(mlflow_store)
    assert client.get_run(first.run_id).data.tags["error"] == "KeyboardInterrupt: "
    continued = MLflowLogger(experiment_name="resumed", tracking_uri=mlflow_store, run_id=first.run_id)
    continued.log_metrics({"train/reward_mean": 0.75}, step=2)
    continued.finalize("success")
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
