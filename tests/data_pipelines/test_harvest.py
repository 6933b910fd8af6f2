"""`data_pipelines.harvest`: pure functions, checkpoint resolution, real harvests of tiny untrained
checkpoints (resume after SIGKILL in a real subprocess, corrupted shards, determinism, MLflow), from-logs,
validate and import-v0.

The checkpoints are untrained tiny Qwen3 models exported by the trainer's own `export_policy`. They
answer single-digit prompts correctly a few percent of the time, so pairs have varied success counts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data_pipelines.harvest import (
    MANIFEST,
    CheckpointSpec,
    HarvestError,
    harvest_data_files,
    main,
    metric_name,
    pair_row,
    pairs_from_records,
    resolve_checkpoints,
    run,
    shard_ranges,
    shard_seed,
    step_from_name,
    success_rate,
    validate,
    window_step,
)
from data_pipelines.pairs import PAIR_COLUMNS, PairsError, load_pairs, load_valid_pairs, validate_pairs

REPO = Path(__file__).resolve().parents[2]
RELEASE = REPO.parent / "shared" / "data" / "v0-release"

# Small but real: 2 checkpoints x 24 prompts x 4 rollouts, 6 prompts per shard -> 8 shards.
SMALL = {
    "rollouts_per_prompt": 4,
    "sampling": {"max_new_tokens": 16},
    "prompts_per_shard": 6,
    "batch_size": 64,
    "experiment": None,
    "progress": False,
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two trainer exports of untrained tiny policies (steps 5 and 10) and a digit prompt set."""
    from basis.policy_io import export_policy
    from basis.tiny_policy import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("harvest")
    tokenizer = build_tokenizer()
    for seed, step in ((0, 5), (1, 10)):
        model = build_model(tokenizer, hidden_size=64, num_layers=2, intermediate_size=128, seed=seed)
        export_policy(
            model,
            tokenizer,
            root / "run" / "exports" / f"step_{step:06d}",
            {"rl_step": step, "model_path": "x"},
        )
    (root / "run" / "exports" / "step_000015.tmp").mkdir()  # an export killed mid-write is no checkpoint
    rows = [
        {"prompt_id": f"d{i}", "prompt": f"{i}+0", "answer": str(i % 10), "data_source": "digits"}
        for i in range(24)
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(root / "digits.parquet"))
    return root


def harvest(workdir: Path, out: Path, **overrides) -> object:
    config = {**SMALL, **overrides}
    config["sampling"] = _sampling(config["sampling"])
    return run(
        checkpoints=[str(workdir / "run")], prompts=str(workdir / "digits.parquet"), out=str(out), **config
    )


def _sampling(values: dict):
    from basis.rollout import SamplingParams

    return SamplingParams(**values)


def pair_rows(out: Path) -> list[dict]:
    return pq.read_table(harvest_data_files(out)).to_pylist()


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(Path(f).relative_to(out)): Path(f).read_bytes() for f in harvest_data_files(out)}


@pytest.fixture(scope="module")
def reference(workdir: Path) -> Path:
    """An uninterrupted harvest every other test compares against."""
    out = workdir / "reference"
    harvest(workdir, out)
    return out


# --------------------------------------------------------------------------------------------------
# Pure functions


def test_success_rate_and_pair_row_by_hand() -> None:
    assert success_rate([1, 0, 0, 1, 1]) == pytest.approx(0.6)
    row = pair_row("p", 7, "q1", "1+1", [1.0, 0.0, 0.0, 1.0, 1.0])
    assert row == {"policy": "p", "step": 7, "prompt_id": "q1", "prompt": "1+1", "n": 5, "successes": 3,
                   "score": pytest.approx(0.2)}  # fmt: skip
    assert pair_row("p", 0, "q", "x", [0, 0])["score"] == -1.0
    assert pair_row("p", 0, "q", "x", [1] * 10)["score"] == 1.0
    with pytest.raises(ValueError, match="0 or 1"):
        success_rate([1, 0.5])
    with pytest.raises(ValueError, match="at least one"):
        success_rate([])


def test_shard_seed_is_stable_and_separates_its_inputs() -> None:
    assert shard_seed(0, "grpo-tiny", 100, 0) == shard_seed(0, "grpo-tiny", 100, 0) == 1851814645
    seeds = {shard_seed(s, p, st, i) for s in (0, 1) for p in ("a", "b") for st in (0, 1) for i in (0, 1)}
    assert len(seeds) == 16
    assert all(0 <= s < 2**31 for s in seeds)


def test_window_step_labels_windows_by_their_last_step() -> None:
    assert [window_step(s, 50, 200) for s in (1, 50, 51, 100, 200)] == [50, 50, 100, 100, 200]
    assert window_step(172, 50, 173) == 173  # a partial last window takes the run's last step
    with pytest.raises(ValueError, match="window"):
        window_step(1, 0, 10)
    with pytest.raises(ValueError, match="last_step"):
        window_step(11, 5, 10)


def test_step_from_name_and_shard_ranges_and_metric_names() -> None:
    assert step_from_name("step_000050") == 50
    assert step_from_name("checkpoint-200") == 200
    assert step_from_name("step_000050.tmp") is None
    assert step_from_name("tiny-policy") is None
    assert shard_ranges(13, 5) == [range(0, 5), range(5, 10), range(10, 13)]
    assert metric_name("mean_success/Qwen3@4B (x)") == "mean_success/Qwen3_4B _x_"


# --------------------------------------------------------------------------------------------------
# Checkpoints


def test_export_folder_run_folder_and_glob_resolve_to_tagged_checkpoints(workdir: Path) -> None:
    exports = workdir / "run" / "exports"  # also holds a half-written `step_000015.tmp`, which is skipped
    for spec in (str(exports), str(workdir / "run"), str(exports / "step_*")):
        resolved = resolve_checkpoints([spec])
        assert [(c.policy, c.step) for c in resolved] == [("run", 5), ("run", 10)]
    explicit = resolve_checkpoints([CheckpointSpec(str(exports / "step_000010"), policy="grpo", step=99)])
    assert [(c.policy, c.step) for c in explicit] == [("grpo", 99)]


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["{root}/nowhere"], "nowhere' does not exist"),
        (["{root}/run/exports/zz_*"], "matches no folder"),
        (["{root}/run", "{root}/run/exports/step_000005"], "are both run@step5"),
        ([CheckpointSpec("{root}/run", step=3)], "step can only tag one"),
        (["{root}/digits.parquet"], "is a file"),
        ([], "empty"),
    ],
)
def test_bad_checkpoint_specs_name_the_path(workdir: Path, specs: list, message: str) -> None:
    specs = [
        CheckpointSpec(s.path.format(root=workdir), s.policy, s.step)
        if isinstance(s, CheckpointSpec)
        else s.format(root=workdir)
        for s in specs
    ]
    with pytest.raises(HarvestError, match=message):
        resolve_checkpoints(specs)


def test_model_folder_without_a_step_asks_for_one(tiny_lm_path: str) -> None:
    with pytest.raises(HarvestError, match="cannot tell its step"):
        resolve_checkpoints([tiny_lm_path])
    assert resolve_checkpoints([CheckpointSpec(tiny_lm_path, policy="base", step=0)])[0].step == 0


@pytest.mark.parametrize("damage", ["truncated config.json", "truncated weights", "no weights"])
def test_unloadable_checkpoint_fails_before_any_rollout(workdir: Path, tmp_path: Path, damage: str) -> None:
    broken = tmp_path / "step_000020"
    shutil.copytree(workdir / "run" / "exports" / "step_000005", broken)
    (broken / "basis_export.json").unlink()
    if damage == "truncated config.json":
        (broken / "config.json").write_text('{"model_type": "qwen3"')
    elif damage == "truncated weights":
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (broken / "model.safetensors").unlink()
    out = tmp_path / "out"
    with pytest.raises(HarvestError, match=f"checkpoint '{broken}'.*not loadable"):
        run(checkpoints=[str(workdir / "run"), str(broken)], prompts=str(workdir / "digits.parquet"),
            out=str(out), **{**SMALL, "sampling": _sampling(SMALL["sampling"])})  # fmt: skip
    assert not out.exists()  # nothing was sampled or written


def test_prompt_dataset_without_answers_names_file_and_column(workdir: Path, tmp_path: Path) -> None:
    file = tmp_path / "no_answers.parquet"
    datasets.Dataset.from_list([{"prompt_id": "a", "prompt": "1+1"}]).to_parquet(str(file))
    with pytest.raises(ValueError, match=rf"{file}.*missing column 'answer'"):
        run(checkpoints=[str(workdir / "run")], prompts=str(file), out=str(tmp_path / "out"),
            **{**SMALL, "sampling": _sampling(SMALL["sampling"])})  # fmt: skip


def test_answers_the_verifier_cannot_read_fail_before_any_rollout(workdir: Path, tmp_path: Path) -> None:
    file = tmp_path / "words.parquet"
    datasets.Dataset.from_list([{"prompt_id": "a", "prompt": "one", "answer": "one"}]).to_parquet(str(file))
    with pytest.raises(HarvestError, match="verifier rejects an answer"):
        run(checkpoints=[str(workdir / "run")], prompts=str(file), out=str(tmp_path / "out"),
            **{**SMALL, "sampling": _sampling(SMALL["sampling"])})  # fmt: skip


def test_a_prompt_past_the_context_fails_before_any_rollout(workdir: Path, tmp_path: Path) -> None:
    """Its rollouts would run past the context and be recorded as genuine failures (n=4, successes=0)."""
    file = tmp_path / "long.parquet"
    rows = [
        {"prompt_id": "short", "prompt": "1+1", "answer": "2"},
        {"prompt_id": "long", "prompt": "1+" * 200 + "1", "answer": "201"},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(file))
    with pytest.raises(
        HarvestError, match=r"prompt 'long' has \d+ tokens, more than the \d+ that the context of checkpoint"
    ):
        run(checkpoints=[str(workdir / "run")], prompts=str(file), out=str(tmp_path / "out"),
            **{**SMALL, "sampling": _sampling(SMALL["sampling"])})  # fmt: skip
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Harvest runs


def test_a_partial_credit_verifier_is_refused(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verifier returning 0.3 was recorded as int(sum) successes beside a score from the mean: a pair
    that contradicted itself (or, at 0.5, a silently rounded success count)."""
    from basis.rewards import VERIFIERS, ArithmeticVerifier, VerifyResult

    class PartialCredit(ArithmeticVerifier):
        def __call__(self, responses, answers):  # type: ignore[no-untyped-def]
            return VerifyResult([0.3] * len(responses), 0)

    monkeypatch.setitem(VERIFIERS, "partial", PartialCredit)
    with pytest.raises(ValueError, match=r"verifier 'PartialCredit' returned reward 0.3 for rollout 0"):
        harvest(workdir, tmp_path / "out", verifier="partial")


def test_harvest_writes_the_pair_contract_manifest_and_mlflow_run(
    workdir: Path, reference: Path, tmp_path: Path, mlflow_store: str
) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "logged"
    summary = harvest(workdir, out, experiment="harvest-test")
    # Loadable by datasets and by the value prior's loader, with no contract errors.
    loaded = datasets.load_dataset("parquet", data_files=harvest_data_files(out), split="train")
    assert tuple(loaded.column_names) == PAIR_COLUMNS and len(loaded) == 48
    pairs = load_pairs(out)
    assert [p for p in validate_pairs(pairs, str(out)) if p.severity == "error"] == []
    assert set(pairs["n"]) == {4}
    assert len(set(pairs["successes"])) > 1  # varied outcomes, not a degenerate all-zero harvest
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "rollouts" and manifest["rows"] == 48 and len(manifest["shards"]) == 8
    assert manifest["shards"][0]["path"] == "data/run/step_000005/shard-00000.parquet"
    assert manifest["config"]["rollouts_per_prompt"] == 4 and "torch" in manifest["versions"]
    # Per-checkpoint means agree with the rows.
    assert [(c.policy, c.step) for c in summary.checkpoints] == [("run", 5), ("run", 10)]
    for checkpoint in summary.checkpoints:
        rows = [r for r in loaded if r["step"] == checkpoint.step]
        assert checkpoint.mean_success == pytest.approx(
            sum(r["successes"] / r["n"] for r in rows) / len(rows)
        )
    assert pair_rows(out) == pair_rows(reference)  # MLflow on or off, same pairs
    client = MlflowClient(mlflow_store)
    mlflow_run = client.get_run(summary.mlflow_run_id)
    assert mlflow_run.data.params["rollouts_per_prompt"] == "4"
    assert mlflow_run.data.params["num_checkpoints"] == "2"
    assert mlflow_run.data.params["prompt_split"] == "train"  # which split was harvested
    assert mlflow_run.data.params["prompt_column_map"] == "null"
    assert mlflow_run.data.metrics["pairs"] == 48 and mlflow_run.data.metrics["rollouts"] == 192
    assert mlflow_run.data.metrics["pairs_per_minute"] > 0 and mlflow_run.data.metrics["tokens_per_s"] > 0
    history = client.get_metric_history(summary.mlflow_run_id, "mean_success/run")
    assert sorted(m.step for m in history) == [5, 10]
    artifacts = {a.path for a in client.list_artifacts(summary.mlflow_run_id)}
    assert {"success_rate_histogram.png", "manifest.json", "per_checkpoint.json"} <= artifacts


def test_same_seed_same_pairs_other_seed_other_pairs(workdir: Path, reference: Path, tmp_path: Path) -> None:
    harvest(workdir, tmp_path / "again")
    assert shard_bytes(tmp_path / "again") == shard_bytes(reference)  # byte-identical shards
    harvest(workdir, tmp_path / "seed1", seed=1)
    assert pair_rows(tmp_path / "seed1") != pair_rows(reference)


def test_corrupted_and_unrecorded_shards_are_reported_and_redone(
    workdir: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "damaged"
    harvest(workdir, out)
    corrupted = out / "data/run/step_000005/shard-00001.parquet"
    corrupted.write_bytes(corrupted.read_bytes()[:-40])  # a torn write
    (out / "progress/run/step_000010/shard-00002.json").unlink()  # killed between shard and record

    report = validate(str(out))
    assert not report.ok
    assert any(str(corrupted) in str(p) and "corrupted shard" in str(p) for p in report.errors)

    capsys.readouterr()
    summary = harvest(workdir, out)
    err = capsys.readouterr().err
    assert f"redoing shard {corrupted}: sha256" in err
    assert "shard-00002.parquet: shard without a checksum record" in err
    assert summary.skipped_shards == 6 and len(summary.redone_shards) == 2 and summary.new_pairs == 12
    assert shard_bytes(out) == shard_bytes(reference)
    assert validate(str(out)).ok


def test_rerun_with_other_settings_into_the_same_folder_is_refused(
    workdir: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "settings"
    harvest(workdir, out)
    with pytest.raises(HarvestError, match=r"other settings.*rollouts_per_prompt: recorded 4, now 5"):
        harvest(workdir, out, rollouts_per_prompt=5)
    with pytest.raises(HarvestError, match="shards that are not part of this harvest"):
        harvest(workdir, out, prompts_per_shard=12)


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "found",
    ["notes.txt", "data/readme.txt", "data/train-00000-of-00001.parquet"],
    ids=["file", "data", "parquet"],
)
def test_a_folder_the_harvest_did_not_write_is_refused_and_left_as_it_was(
    workdir: Path, tmp_path: Path, found: str
) -> None:
    """As `from-logs`, `run` writes into no other tool's folder, and says so (not "a different harvest")."""
    out = tmp_path / "mine"
    (out / found).parent.mkdir(parents=True)
    shutil.copy(workdir / "digits.parquet", out / found)
    with pytest.raises(
        HarvestError,
        match=rf"output folder {out} is not empty and not a harvest run's output \(it holds \['{found}'\]",
    ):
        harvest(workdir, out)
    assert files_in(out) == {found: (workdir / "digits.parquet").read_bytes()}
    assert sorted(p.name for p in out.iterdir()) == [found.split("/")[0]]  # no progress/ either


def test_an_empty_folder_is_harvested_and_a_harvest_with_foreign_files_is_refused(
    workdir: Path, reference: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    harvest_from(
        empty, [str(workdir / "run" / "exports" / "step_000005")], workdir / "digits.parquet", num_prompts=6
    )
    assert len(load_valid_pairs(empty)) == 6
    out = tmp_path / "resumable"
    shutil.copytree(reference, out)
    (out / "progress" / "run" / "step_000010" / "shard-00003.json").unlink()  # interrupted before a record
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        HarvestError, match=rf"{out} holds a harvest run and entries it did not write \(\['notes.txt'\]\)"
    ):
        harvest(workdir, out)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    summary = harvest(workdir, out)  # its own interrupted output still resumes
    assert summary.skipped_shards == 7 and len(summary.redone_shards) == 1
    assert shard_bytes(out) == shard_bytes(reference)


def harvest_from(out: Path, checkpoints: list, prompts: Path, **overrides) -> object:
    """`run` with SMALL settings on any checkpoints and prompt file."""
    config = {**SMALL, **overrides}
    config["sampling"] = _sampling(config["sampling"])
    return run(checkpoints=checkpoints, prompts=str(prompts), out=str(out), **config)


def test_rerun_with_other_prompts_checkpoint_or_column_map_is_refused(
    workdir: Path, reference: Path, tmp_path: Path
) -> None:
    """Every input that decides a shard's rows is in its fingerprint, not only the prompt ids and settings."""
    out = tmp_path / "inputs"
    shutil.copytree(reference, out)
    checkpoints = [str(workdir / "run")]
    rows = datasets.load_dataset(
        "parquet", data_files=str(workdir / "digits.parquet"), split="train"
    ).to_list()
    other_answer = write_prompts(tmp_path / "answer.parquet", rows, 3, answer="7")
    other_text = write_prompts(tmp_path / "text.parquet", rows, 3, prompt="3+1")
    for prompts in (other_answer, other_text):  # same prompt ids, other content
        with pytest.raises(HarvestError, match=r"other settings \(prompts_sha256: recorded '[0-9a-f]+', now"):
            harvest_from(out, checkpoints, prompts)
    moved = tmp_path / "moved" / "run"
    shutil.copytree(workdir / "run", moved)  # same policy name and steps, other checkpoint folder
    with pytest.raises(HarvestError, match=rf"other settings \(checkpoint: recorded '{workdir}/run/exports/"):
        harvest_from(out, [str(moved)], workdir / "digits.parquet")
    column_map = {"prompt": "prompt", "answer": "answer", "prompt_id": "prompt_id"}
    with pytest.raises(HarvestError, match=r"other settings \(prompt_column_map: recorded None, now \{"):
        harvest_from(out, checkpoints, workdir / "digits.parquet", prompt_column_map=column_map)
    assert shard_bytes(out) == shard_bytes(reference)  # nothing was overwritten
    summary = harvest_from(out, checkpoints, workdir / "digits.parquet")  # same inputs: all kept
    assert summary.skipped_shards == 8 and summary.new_pairs == 0


def write_prompts(path: Path, rows: list[dict], index: int, **changes: str) -> Path:
    """The prompt rows with row `index` changed, as a parquet file."""
    datasets.Dataset.from_list(
        [row | changes if i == index else row for i, row in enumerate(rows)]
    ).to_parquet(str(path))
    return path


def test_rerun_with_other_verifier_options_is_refused(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "math"
    checkpoints = [str(workdir / "run" / "exports" / "step_000005")]
    prompts = workdir / "digits.parquet"
    math_verifier = {"verifier": "math", "num_prompts": 6}
    harvest_from(out, checkpoints, prompts, **math_verifier)
    with pytest.raises(HarvestError, match=r"verifier_options: recorded \{\}, now \{'timeout_s': 2.0\}"):
        harvest_from(out, checkpoints, prompts, **math_verifier, verifier_options={"timeout_s": 2.0})
    with pytest.raises(HarvestError, match=r"verifier_options \{'timeout': 2.0\} do not fit verifier 'math'"):
        harvest_from(tmp_path / "x", checkpoints, prompts, **math_verifier, verifier_options={"timeout": 2.0})


def test_shard_with_a_checksum_record_of_an_older_format_is_redone(
    workdir: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A record written before the fingerprint covered prompt texts, answers and the checkpoint path
    cannot vouch for its shard: the shard is harvested again, and reported."""
    out = tmp_path / "old"
    shutil.copytree(reference, out)
    record_file = out / "progress/run/step_000005/shard-00001.json"
    record = json.loads(record_file.read_text())
    new_keys = {"checkpoint", "checkpoint_sha256", "prompts_sha256", "engine_kwargs", "prompt_column_map",
                "verifier_options"}  # fmt: skip
    fingerprint = {key: value for key, value in record["fingerprint"].items() if key not in new_keys}
    ids = "\n".join(f"d{i}" for i in range(6, 12))  # the shard's prompts, hashed as format 1 did
    fingerprint["prompt_ids_sha256"] = hashlib.sha256(ids.encode()).hexdigest()
    old_record = {"sha256": record["sha256"], "rows": record["rows"], "fingerprint": fingerprint}
    record_file.write_text(json.dumps(old_record))
    capsys.readouterr()
    summary = harvest(workdir, out)
    assert f"checksum record {record_file} has format 1, not 3" in capsys.readouterr().err
    assert summary.skipped_shards == 7 and len(summary.redone_shards) == 1
    assert shard_bytes(out) == shard_bytes(reference)
    assert json.loads(record_file.read_text())["format"] == 3


def test_a_checkpoint_retrained_in_place_is_refused_and_a_rewritten_identical_one_kept(
    workdir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "w"
    shutil.copytree(workdir / "run", copy / "run")
    shutil.copy(workdir / "digits.parquet", copy / "digits.parquet")
    harvest(copy, tmp_path / "out")
    exports = copy / "run" / "exports"
    weights = exports / "step_000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # saved again, same weights: the shards still hold
    assert harvest(copy, tmp_path / "out").skipped_shards == 8
    shutil.copy(exports / "step_000010" / "model.safetensors", weights)  # other weights, same folder
    with pytest.raises(HarvestError, match=r"harvested with other settings \(checkpoint_sha256"):
        harvest(copy, tmp_path / "out")


def test_damaged_manifest_is_named_by_path(workdir: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "manifest"
    shutil.copytree(reference, out)
    manifest = out / MANIFEST
    manifest.write_text('{"kind": "rollouts", "shards": [')  # a torn write
    with pytest.raises(HarvestError, match=rf"{manifest}: not valid JSON"):
        harvest_data_files(out)
    with pytest.raises(HarvestError, match=rf"{manifest}: not valid JSON"):
        harvest(workdir, out)
    report = validate(str(out))
    assert not report.ok and f"unusable manifest: {manifest}: not valid JSON" in str(report)
    entries = json.loads((reference / MANIFEST).read_text())
    del entries["shards"][2]["sha256"]
    manifest.write_text(json.dumps(entries))
    report = validate(str(out))
    assert not report.ok and f"{manifest}: shards[2] needs a string 'path', an int 'rows'" in str(report)
    with pytest.raises(HarvestError, match=r"shards\[2\] needs"):
        harvest_data_files(out)


def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(workdir: Path, reference: Path) -> None:
    out = workdir / "killed"
    config = {
        "checkpoints": [str(workdir / "run")],
        "prompts": str(workdir / "digits.parquet"),
        "out": str(out),
        **SMALL,
        "prompts_per_shard": 6,
    }
    (workdir / "killed.yaml").write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        "-m",
        "data_pipelines.harvest",
        "run",
        "--config",
        str(workdir / "killed.yaml"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / "progress" / "run" / "step_000005"
    deadline = time.time() + 180
    while not (records.is_dir() and len(list(records.glob("*.json"))) >= 2):
        assert proc.poll() is None, f"harvest ended before it could be killed: {proc.stderr.read().decode()}"
        assert time.time() < deadline, "harvest stalled"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists()  # it really died midway
    done = len(list((out / "progress").rglob("*.json")))
    assert 2 <= done < 8
    # V0 pretraining's loader and `validate` refuse the finished shards of an unfinished harvest.
    with pytest.raises(PairsError, match=rf"{out}: .*unfinished harvest, rerun the same command to resume"):
        load_valid_pairs(out)
    assert not validate(str(out)).ok

    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert f"resumed: {done} shards verified and kept" in result.stdout
    assert shard_bytes(out) == shard_bytes(reference)
    rows = pair_rows(out)
    keys = [(r["policy"], r["step"], r["prompt_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 48  # no duplicate, no missing (checkpoint, prompt) pair
    assert len(load_valid_pairs(out)) == 48


def test_sglang_engine_harvests_through_its_http_protocol(workdir: Path, tmp_path: Path) -> None:
    """Wiring of `engine: sglang` against the FAKE SGLang server of tests/basis (real tiny model behind it)."""
    spec = importlib.util.spec_from_file_location(
        "fake_sglang_server", REPO / "tests/basis/fake_sglang_server.py"
    )
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    checkpoint = workdir / "run" / "exports" / "step_000005"
    with fake.FakeSGLangServer(str(checkpoint)) as server:
        config = {**SMALL, "sampling": _sampling(SMALL["sampling"])}
        summary = run(checkpoints=[str(checkpoint)], prompts=str(workdir / "digits.parquet"),
                      out=str(tmp_path / "sglang"), engine="sglang",
                      engine_options={"server_url": server.url, "request_timeout_s": 30.0}, **config)  # fmt: skip
        assert "/generate" in server.calls
    assert summary.pairs == 24 and summary.rollouts == 96
    assert validate(str(tmp_path / "sglang")).ok
    with pytest.raises(HarvestError, match="server_url serves one checkpoint"):
        run(checkpoints=[str(workdir / "run")], prompts=str(workdir / "digits.parquet"), out=str(tmp_path / "x"),
            engine="sglang", engine_options={"server_url": "http://127.0.0.1:1"}, **config)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# from-logs


def write_records(folder: Path, step: int, rows: list[tuple[str, str, float]]) -> Path:
    """A rollout record file exactly as `basis.trainer.PolicyTrainer.write_rollout_records` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}-rank0.parquet"
    table = pa.table({
        "step": [step] * len(rows),
        "prompt_id": [r[0] for r in rows],
        "prompt": [r[1] for r in rows],
        "reward": [r[2] for r in rows],
        "response_length": [5] * len(rows),
        "finish_reason": ["stop"] * len(rows),
        "response": ["#### 1"] * len(rows),
    })  # fmt: skip
    pq.write_table(table, path)
    return path


def test_from_logs_pools_records_by_step_window(tmp_path: Path, mlflow_store: str) -> None:
    chat = json.dumps([{"role": "user", "content": "2+2"}])
    rollouts = tmp_path / "run" / "rollouts"
    write_records(rollouts, 1, [("a", "1+1", 1.0), ("a", "1+1", 0.0), ("b", chat, 0.0)])
    write_records(rollouts, 2, [("a", "1+1", 1.0), ("b", chat, 1.0)])
    write_records(rollouts, 3, [("a", "1+1", 0.0), ("a", "1+1", 0.0)])
    out = tmp_path / "pairs"
    code = None
    try:
        main(["from-logs", f"--run_dir={tmp_path / 'run'}", "--policy=grpo", f"--out={out}", "--window=2"])
    except SystemExit as exit_:
        code = exit_.code
    assert code is None
    rows = pq.read_table(harvest_data_files(out)).to_pylist()
    assert [(r["step"], r["prompt_id"], r["n"], r["successes"]) for r in rows] == [
        (2, "a", 3, 2), (2, "b", 2, 1), (3, "a", 2, 0)
    ]  # fmt: skip
    assert rows[1]["prompt"] == "2+2"  # chat records keep their text
    assert rows[0]["score"] == pytest.approx(2 * 2 / 3 - 1)
    manifest = json.loads((out / MANIFEST).read_text())
    assert (
        manifest["kind"] == "from-logs"
        and manifest["config"]["window"] == 2
        and len(manifest["sources"]) == 3
    )
    assert validate(str(out)).ok


def test_from_logs_bad_records_name_file_row_and_field(tmp_path: Path) -> None:
    good = tmp_path / "good"
    write_records(good, 1, [("a", "1+1", 1.0)])
    bad_reward = tmp_path / "bad_reward"
    file = write_records(bad_reward, 1, [("a", "1+1", 1.0), ("b", "2+2", 0.5)])
    with pytest.raises(HarvestError, match=rf"{file}: row 1, field 'reward'"):
        run_from_logs(bad_reward, tmp_path / "o1")
    no_reward = tmp_path / "no_reward" / "step_000001-rank0.parquet"
    no_reward.parent.mkdir()
    pq.write_table(pa.table({"step": [1], "prompt_id": ["a"], "prompt": ["x"]}), no_reward)
    with pytest.raises(HarvestError, match=rf"{no_reward}: missing column\(s\) \['reward'\]"):
        run_from_logs(no_reward.parent, tmp_path / "o2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(HarvestError, match="not empty"):
        run_from_logs(good, tmp_path / "full")
    with pytest.raises(HarvestError, match="another text"):
        pairs_from_records([(1, "a", "1+1", 1.0, "f", 0), (2, "a", "1+2", 1.0, "g", 3)], "p", 2)


def test_from_logs_over_record_files_without_rows_names_the_folder(tmp_path: Path) -> None:
    rollouts = tmp_path / "run" / "rollouts"
    write_records(rollouts, 1, [])
    write_records(rollouts, 2, [])
    with pytest.raises(HarvestError, match=rf"^{rollouts}: its 2 rollout record file\(s\) hold no rows$"):
        run_from_logs(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_from_logs_killed_midway_leaves_no_output_and_its_rerun_completes(tmp_path: Path) -> None:
    """A real SIGKILL after 2 of 3 shards: nothing at `out` reads as pairs, and the same command reruns."""
    rollouts = tmp_path / "run" / "rollouts"
    for step in (1, 2, 3):
        write_records(rollouts, step, [("a", "1+1", 1.0), ("b", "2+2", float(step % 2))])
    out = tmp_path / "pairs" / "out"
    command = ["from-logs", f"--run_dir={tmp_path / 'run'}", "--policy=grpo", f"--out={out}", "--window=1",
               "--experiment=null"]  # fmt: skip
    child = (
        "import os, signal, sys\n"
        "import data_pipelines.harvest as harvest\n"
        "write, written = harvest.write_pairs_shard, []\n"
        "def write_then_die(path, rows):\n"
        "    written.append(write(path, rows))\n"
        "    if len(written) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return written[-1]\n"
        "harvest.write_pairs_shard = write_then_die\n"
        "harvest.main(sys.argv[1:])\n"
    )
    killed = subprocess.run([sys.executable, "-c", child, *command], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    assert not validate(str(out)).ok
    with pytest.raises(PairsError, match="no such pairs file or folder"):
        load_valid_pairs(out)
    with pytest.raises(PairsError, match="folder has no"):  # the hidden staging folder is not pairs
        load_pairs(out.parent)

    main(command)  # the same command again
    rows = pq.read_table(harvest_data_files(out)).to_pylist()
    assert [(r["step"], r["prompt_id"]) for r in rows] == [(s, p) for s in (1, 2, 3) for p in ("a", "b")]
    assert validate(str(out)).ok
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # the killed run's staging is gone


def run_from_logs(run_dir: Path, out: Path):
    from data_pipelines.harvest import from_logs

    return from_logs(run_dir=str(run_dir), policy="p", out=str(out), window=2, experiment=None)


# --------------------------------------------------------------------------------------------------
# validate and import-v0


def test_validate_cli_reports_problems_by_row_and_exits_nonzero(tmp_path: Path, capsys) -> None:
    rows = [
        {"policy": "p", "step": 1, "prompt_id": "a", "prompt": "x", "n": 10, "successes": 7, "score": 0.4},
        {"policy": "p", "step": 1, "prompt_id": "b", "prompt": "y", "n": 10, "successes": 12, "score": 1.4},
        {"policy": "p", "step": 1, "prompt_id": "a", "prompt": "x", "n": 10, "successes": 2, "score": -0.6},
        {"policy": "p", "step": 1, "prompt_id": "c", "prompt": "z", "n": 10, "successes": 3, "score": 0.0},
    ]
    bad = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(bad))
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(bad)])
    assert exit_.value.code == 1
    report = capsys.readouterr().out
    assert "row 1 field 'successes'" in report
    assert "row 2 field 'prompt_id': duplicate of row 0" in report
    assert "row 3 field 'score'" in report
    assert "FAILED: 3 error(s)" in report

    good = tmp_path / "good.parquet"
    datasets.Dataset.from_list([rows[0], rows[2] | {"prompt_id": "d", "prompt": "w"}]).to_parquet(str(good))
    main(["validate", str(good)])  # no SystemExit: exit status 0
    report = capsys.readouterr().out
    assert "OK: 0 error(s)" in report and "p          " in report


def test_validate_flags_an_unfinished_harvest(workdir: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "unfinished"
    harvest(workdir, out)
    (out / MANIFEST).unlink()
    report = validate(str(out))
    assert not report.ok and "unfinished harvest" in str(report)


@pytest.mark.skipif(not RELEASE.is_dir(), reason="V0 release data not present")
def test_import_v0_release_into_the_contract(tmp_path: Path, capsys) -> None:
    main(["import-v0", f"--release={RELEASE}", f"--out={tmp_path / 'v0'}"])
    report = capsys.readouterr().out
    assert "3264 pairs in 6 context pool(s)" in report and "OK: 0 error(s)" in report
    assert len(load_pairs(tmp_path / "v0")) == 3264


def test_import_v0_refuses_an_output_folder_holding_a_harvest(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Pointed at a finished harvest by mistake, import-v0 must neither unlink its manifest nor mix files."""
    out = tmp_path / "harvest"
    shutil.copytree(reference, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    release = tmp_path / "release"
    release.mkdir()
    (release / "prompt_dict.json").write_text(json.dumps({"d_1": "one"}))
    row = {"id": 1, "score": 0.6, "type": "context", "model": "M", "step": 16, "dataset": "d"}
    (release / "context.jsonl").write_text(json.dumps(row) + "\n")
    (release / "train.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["import-v0", f"--release={release}", f"--out={out}"])
    assert exit_.value.code == 2
    assert (
        f"output folder {out} holds a 'rollouts' pairs output, not a previous import-v0"
        in capsys.readouterr().err
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["harvest", "release"]  # no staging left either
    assert len(load_valid_pairs(out)) == 48


def test_bad_input_exits_2_with_the_message(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "run",
                f"--checkpoints+={tmp_path / 'missing'}",
                f"--prompts={tmp_path}",
                f"--out={tmp_path / 'o'}",
            ]
        )
    assert exit_.value.code == 2
    assert f"checkpoint path '{tmp_path / 'missing'}' does not exist" in capsys.readouterr().err


def test_tiny_config_parses_into_the_run_signature() -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(run)
    config = parser.instantiate(parser.parse_args(["--config", str(REPO / "configs/harvest/tiny.yaml")]))
    assert [(c.policy, c.step) for c in config.checkpoints] == [("grpo-tiny", 0), ("grpo-tiny", None),
                                                               ("grpo-tiny", None)]  # fmt: skip
    assert config.num_prompts == 200 and config.rollouts_per_prompt == 10
    assert config.sampling.max_new_tokens == 48 and config.sampling.seed is None


def test_verifier_timeouts_are_counted_and_warned_about(workdir: Path, tmp_path: Path) -> None:
    """Items the math verifier gives up on score 0 like wrong answers; the harvest says how many there were."""
    checkpoints = [str(workdir / "run" / "exports" / "step_000005")]
    options = {"verifier": "math", "num_prompts": 2, "verifier_options": {"timeout_s": 1e-4}}
    with pytest.warns(
        UserWarning, match=r"verifier: \d+ of 8 new rollouts timed out or crashed and scored 0"
    ):
        summary = harvest_from(tmp_path / "math", checkpoints, workdir / "digits.parquet", **options)
    assert 0 < summary.verifier_timeouts <= summary.rollouts == 8
    assert "timed out or crashed" in str(summary)
    patient = harvest_from(
        tmp_path / "patient", checkpoints, workdir / "digits.parquet", verifier="math", num_prompts=2
    )
    assert patient.verifier_timeouts == 0 and "timed out" not in str(patient)
