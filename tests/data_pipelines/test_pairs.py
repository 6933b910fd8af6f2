"""Tests of the pair contract: loading (parquet file, folder, jsonl, pairs output folders read through their
manifest), raw type checks before any cast, and row/field-level validation."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from data_pipelines.pairs import (
    MANIFEST,
    PAIR_COLUMNS,
    PAIR_FEATURES,
    PairsError,
    RowLocator,
    load_pairs,
    load_valid_pairs,
    sha256_file,
    success_rate,
    validate_pairs,
)


def pair(
    policy: str = "p", step: int = 1, prompt_id: str = "a", successes: int = 3, n: int = 4, **kw
) -> dict:
    row = {
        "policy": policy,
        "step": step,
        "prompt_id": prompt_id,
        "prompt": f"Q: {prompt_id}?",
        "n": n,
        "successes": successes,
        "score": 2 * successes / n - 1 if n else 0.0,
    }
    return row | kw


def as_dataset(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows, features=PAIR_FEATURES)


GOOD = [pair(prompt_id="a", successes=4), pair(prompt_id="b", successes=0), pair(prompt_id="c", successes=2)]


def test_success_rate_and_columns() -> None:
    assert success_rate(3, 4) == 0.75
    assert PAIR_COLUMNS == ("policy", "step", "prompt_id", "prompt", "n", "successes", "score")
    with pytest.raises(ValueError, match="n must be positive"):
        success_rate(1, 0)


def test_valid_pairs_have_no_problems() -> None:
    assert validate_pairs(as_dataset(GOOD), "mem") == []


@pytest.mark.parametrize("fmt", ["parquet", "folder", "jsonl"])
def test_load_pairs_formats(tmp_path: Path, fmt: str) -> None:
    dataset = as_dataset(GOOD)
    if fmt == "parquet":
        path = tmp_path / "pairs.parquet"
        dataset.to_parquet(str(path))
    elif fmt == "folder":
        path = tmp_path / "shards"
        (path / "p" / "step_1").mkdir(parents=True)
        as_dataset(GOOD[:2]).to_parquet(str(path / "p" / "step_1" / "shard-00000.parquet"))
        as_dataset(GOOD[2:]).to_parquet(str(path / "p" / "step_1" / "shard-00001.parquet"))
    else:
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    loaded = load_valid_pairs(path)
    assert loaded.features == PAIR_FEATURES
    assert sorted(loaded["prompt_id"]) == ["a", "b", "c"]


def test_load_pairs_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(PairsError, match="no such pairs file"):
        load_pairs(tmp_path / "missing.parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(PairsError, match="unknown pairs format"):
        load_pairs(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairsError, match=r"no \*.parquet or \*.jsonl"):
        load_pairs(tmp_path / "empty")


def test_missing_column_is_named() -> None:
    rows = [{k: v for k, v in r.items() if k != "successes"} for r in GOOD]
    problems = validate_pairs(datasets.Dataset.from_list(rows), "mem")
    assert [(p.field, p.row) for p in problems] == [("successes", None)]
    assert "required column is missing" in str(problems[0])


def test_wrong_dtype_is_named() -> None:
    rows = [r | {"step": str(r["step"])} for r in GOOD]
    problems = validate_pairs(datasets.Dataset.from_list(rows), "mem")
    assert [(p.field, p.row, p.severity) for p in problems] == [("step", None, "error")]  # one per column
    assert str(problems[0]) == "error: mem field 'step': dtype string, expected int64"


@pytest.mark.parametrize(
    ("row", "field", "text"),
    [
        (pair(n=0, successes=0, score=0.0), "n", "must be >= 1"),
        (pair(successes=5, n=4, score=1.0), "successes", "[0, n=4]"),
        (pair(successes=3, n=4, score=0.9), "score", "disagrees with successes/n"),
        (pair(score=1.5), "score", "[-1, 1]"),
        (pair(step=-1), "step", ">= 0"),
        (pair(prompt=""), "prompt", "non-empty string"),
        (pair(policy=" "), "policy", "non-empty string"),
    ],
)
def test_row_problems_name_row_and_field(row: dict, field: str, text: str) -> None:
    problems = [p for p in validate_pairs(as_dataset([*GOOD, row]), "pairs.parquet") if p.severity == "error"]
    assert len(problems) == 1
    assert problems[0].row == 3 and problems[0].field == field
    assert text in problems[0].message
    assert str(problems[0]).startswith(f"error: pairs.parquet row 3 field {field!r}")


def test_duplicates_and_text_conflicts() -> None:
    rows = [*GOOD, pair(prompt_id="a", successes=1), pair(policy="q", prompt_id="b", prompt="another text")]
    problems = validate_pairs(as_dataset(rows), "mem")
    duplicate = next(p for p in problems if "duplicate" in p.message)
    assert duplicate.row == 3 and "row 0" in duplicate.message
    conflict = next(p for p in problems if "another text" in p.message)
    assert conflict.row == 4 and conflict.field == "prompt"


def test_single_class_pool_is_a_warning() -> None:
    rows = [*GOOD, pair(policy="q", prompt_id="a", successes=4), pair(policy="q", prompt_id="b", successes=3)]
    problems = validate_pairs(as_dataset(rows), "mem")
    assert [p.severity for p in problems] == ["warning"]
    assert "q@step1 has only successes" in problems[0].message


def test_load_valid_pairs_raises_listing_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    rows = [*GOOD, pair(prompt_id="d", successes=9, n=4, score=1.0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        PairsError, match=r"1 pair contract error\(s\):\n  error: .*bad.jsonl line 4 field 'successes'"
    ):
        load_valid_pairs(path)


def test_problems_name_the_shard_and_its_row_or_the_jsonl_line(tmp_path: Path) -> None:
    folder = tmp_path / "pairs"
    for name, rows in [
        ("a", GOOD),
        ("b", [pair(prompt_id="d", successes=1), pair(prompt_id="a", successes=1)]),
    ]:
        (folder / name).mkdir(parents=True)
        as_dataset(rows).to_parquet(str(folder / name / "shard-0.parquet"))
    problems = validate_pairs(load_pairs(folder), str(folder), RowLocator.for_path(folder))
    duplicate = next(p for p in problems if "duplicate" in p.message)
    assert str(duplicate).startswith(f"error: {folder / 'b' / 'shard-0.parquet'} row 1 field 'prompt_id'")
    assert f"duplicate of {folder / 'a' / 'shard-0.parquet'} row 0" in duplicate.message

    jsonl = tmp_path / "pairs.jsonl"  # blank lines count: the line is where an editor shows the record
    jsonl.write_text(json.dumps(GOOD[0]) + "\n\n" + json.dumps(pair(prompt_id="z", successes=9)) + "\n")
    problems = validate_pairs(load_pairs(jsonl), str(jsonl), RowLocator.for_path(jsonl))
    error = next(p for p in problems if p.severity == "error")
    assert str(error).startswith(f"error: {jsonl} line 3 field 'successes'")


# --------------------------------------------------------------------------------------------------
# Pairs output folders are read only through a finished manifest


def write_output(folder: Path, shards: dict[str, list[dict]], listed: list[str] | None = None) -> None:
    """A pairs output as `harvest` writes it: `progress/`, parquet shards under `data/`, then (unless
    `listed` is None) `manifest.json` listing the shards in `listed` with their rows and sha256."""
    (folder / "progress").mkdir(parents=True, exist_ok=True)
    for relative, rows in shards.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        as_dataset(rows).to_parquet(str(folder / relative))
    if listed is not None:
        entries = [{"path": p, "rows": len(shards[p]), "sha256": sha256_file(folder / p)} for p in listed]
        (folder / MANIFEST).write_text(json.dumps({"kind": "rollouts", "shards": entries}))


SHARDS = {
    "data/p/step_000001/shard-00000.parquet": GOOD[:2],
    "data/p/step_000001/shard-00001.parquet": GOOD[2:],
}


def test_shards_without_a_manifest_are_an_unfinished_harvest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output(out, SHARDS)  # killed before its manifest
    with pytest.raises(PairsError, match=rf"{out}: .*unfinished harvest, rerun the same command to resume"):
        load_valid_pairs(out)
    progress_only = tmp_path / "progress_only"  # killed before its first shard
    (progress_only / "progress").mkdir(parents=True)
    with pytest.raises(PairsError, match="unfinished harvest"):
        load_pairs(progress_only)
    # Nor is an unfinished output read as part of a plain folder above it.
    as_dataset(GOOD).to_parquet(str(tmp_path / "loose.parquet"))
    with pytest.raises(PairsError, match=rf"{out}: .*unfinished harvest"):
        load_pairs(tmp_path)


def test_folders_other_tools_wrote_are_read_file_by_file(tmp_path: Path) -> None:
    """A Hugging Face dataset layout (`data/train-*.parquet`) or another tool's `manifest.json` is not a
    harvest output: only `progress/` or one of our manifests makes a folder one."""
    hf = tmp_path / "hf"
    (hf / "data").mkdir(parents=True)
    as_dataset(GOOD).to_parquet(str(hf / "data" / "train-00000-of-00001.parquet"))
    (hf / MANIFEST).write_text(json.dumps({"name": "someone else's"}))
    assert sorted(load_valid_pairs(hf)["prompt_id"]) == ["a", "b", "c"]


def test_a_finished_output_reads_exactly_its_listed_and_intact_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output(out, SHARDS, listed=list(SHARDS))
    assert sorted(load_valid_pairs(out)["prompt_id"]) == ["a", "b", "c"]
    stray = out / "data/p/step_000002/shard-00000.parquet"  # not in the manifest: never read
    stray.parent.mkdir()
    as_dataset([pair(prompt_id="z")]).to_parquet(str(stray))
    assert sorted(load_valid_pairs(out)["prompt_id"]) == ["a", "b", "c"]
    shard = out / "data/p/step_000001/shard-00001.parquet"
    as_dataset([pair(prompt_id="c", successes=1)]).to_parquet(str(shard))  # changed after the manifest
    with pytest.raises(PairsError, match=rf"{shard}: corrupted shard of {out / MANIFEST}: sha256"):
        load_pairs(out)
    shard.unlink()
    with pytest.raises(PairsError, match=rf"{shard}: corrupted shard .*file is missing"):
        load_pairs(out)


def test_hidden_staging_folders_are_never_read(tmp_path: Path) -> None:
    """Writers build outputs under hidden names; a killed one must not add rows to a folder above it."""
    (tmp_path / ".out.import-staging" / "context").mkdir(parents=True)
    as_dataset([pair(prompt_id="z")]).to_parquet(str(tmp_path / ".out.import-staging/context/x.parquet"))
    as_dataset(GOOD).to_parquet(str(tmp_path / "pairs.parquet"))
    assert sorted(load_valid_pairs(tmp_path)["prompt_id"]) == ["a", "b", "c"]


# --------------------------------------------------------------------------------------------------
# Raw types are checked before any cast


def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ([json.dumps(GOOD[0]), json.dumps(GOOD[1] | {"step": "64"})], "{path} line 2 field 'step': must be an integer, got '64'"),
        ([json.dumps(GOOD[0] | {"score": "1.0"})], "{path} line 1 field 'score': must be a number, got '1.0'"),
        ([json.dumps(GOOD[0]), "", json.dumps(GOOD[1] | {"step": "abc"})], "{path} line 3 field 'step': must be an integer, got 'abc'"),
        ([json.dumps(GOOD[0] | {"successes": True, "n": 1, "score": 1.0})], "{path} line 1 field 'successes': must be an integer, got True"),
        ([json.dumps(GOOD[0] | {"n": 4.5})], "{path} line 1 field 'n': must be an integer, got 4.5"),
        ([json.dumps(GOOD[0] | {"prompt": ["chat"]})], "{path} line 1 field 'prompt': must be a string, got ['chat']"),
        ([json.dumps(GOOD[0]), '{"policy": "p", "step": 1,'], "{path} line 2: not valid JSON"),
        ([json.dumps([1, 2])], "{path} line 1: expected a JSON object, got list"),
        ([json.dumps({k: v for k, v in GOOD[0].items() if k != "n"})], "{path} line 1: missing field(s) ['n']"),
        ([], "{path}: no rows"),
        (["", "  "], "{path}: no rows"),
    ],
)  # fmt: skip
def test_jsonl_values_of_another_type_name_file_line_and_field(
    tmp_path: Path, lines: list[str], error: str
) -> None:
    """Types are checked as parsed: a string `step` or `score` was cast silently, a bad line named nowhere."""
    path = jsonl(tmp_path / "pairs.jsonl", lines)
    with pytest.raises(PairsError) as raised:
        load_valid_pairs(path)
    assert str(raised.value).startswith(error.format(path=path))


def test_parquet_columns_of_another_type_name_file_row_and_field(tmp_path: Path) -> None:
    """A string column is an error before any cast; an empty or 0-byte file says so; narrower numbers widen."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list([r | {"step": str(r["step"])} for r in GOOD]).to_parquet(str(path))
    with pytest.raises(
        PairsError, match=rf"^{path} row 0 field 'step': column type string, expected int64 \(value '1'\)"
    ):
        load_valid_pairs(path)
    pq.write_table(PAIR_FEATURES.arrow_schema.empty_table(), path)
    with pytest.raises(PairsError, match=rf"^{path}: no rows$"):
        load_pairs(path)
    path.write_bytes(b"")
    with pytest.raises(PairsError, match=rf"^{path}: not a readable parquet file"):
        load_pairs(path)
    # Narrower numeric types widen to the contract's without loss.
    columns = {c: [r[c] for r in GOOD] for c in PAIR_COLUMNS}
    types = {"step": pa.int32(), "n": pa.int16(), "successes": pa.int32(), "score": pa.float32()}
    pq.write_table(pa.table({c: pa.array(v, types.get(c, pa.string())) for c, v in columns.items()}), path)
    loaded = load_valid_pairs(path)
    assert loaded.features == PAIR_FEATURES and loaded["successes"] == [4, 0, 2]
