"""Fourth review of the pairs readers (`data_pipelines.pairs`, `v0_release`, `harvest`): NaN and null values
named as such, `harvest run --checkpoints GLOB`, no `datasets` progress noise in reports, and bad input
found by fuzzing (huge integers, repeated JSON keys, lone surrogates, non-UTF-8 lines, manifests that
point outside their folder or list a shard twice, symbolic link loops)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.harvest import HarvestError, main, resolve_checkpoints, validate
from data_pipelines.pairs import (
    MANIFEST,
    PAIR_FEATURES,
    PairsError,
    load_pairs,
    load_valid_pairs,
    sha256_file,
)
from data_pipelines.v0_release import read_v0_release, write_release_pairs

NULL = "null (a missing value; pandas writes NaN as null)"


def pair(prompt_id: str, successes: int = 1, n: int = 4) -> dict:
    return {
        "policy": "p",
        "step": 1,
        "prompt_id": prompt_id,
        "prompt": f"Q: {prompt_id}?",
        "n": n,
        "successes": successes,
        "score": 2 * successes / n - 1,
    }


ROWS = [pair("a", 4), pair("b", 0), pair("c", 2)]


def write_jsonl(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def load_error(path: Path) -> str:
    with pytest.raises(PairsError) as error:
        load_valid_pairs(path)
    return str(error.value)


# --------------------------------------------------------------------------------------------------
# NaN, inf and null


@pytest.mark.parametrize(
    ("value", "shown", "via_pandas"),
    [(float("nan"), "nan", NULL), (float("inf"), "inf", "inf"), (None, NULL, NULL)],
)
def test_a_nan_inf_or_null_score_is_named_as_such(
    tmp_path: Path, value: float | None, shown: str, via_pandas: str
) -> None:
    """pandas stores a NaN float as a parquet null (and `to_json` writes it as `null`): the message said
    `got None`; it now says what the value is and where a null may come from."""
    rows = [dict(row) for row in ROWS]
    rows[1]["score"] = value
    rule = "field 'score': must be a finite mean reward in [-1, 1], got"
    pd.DataFrame(rows).to_parquet(tmp_path / "pandas.parquet")  # NaN and None become a null here
    assert f"pandas.parquet row 1 {rule} {via_pandas}" in load_error(tmp_path / "pandas.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arrow.parquet")  # keeps NaN as NaN
    assert f"arrow.parquet row 1 {rule} {shown}" in load_error(tmp_path / "arrow.parquet")
    write_jsonl(tmp_path / "pairs.jsonl", jsonl_text(rows))  # json writes NaN / Infinity literals
    assert f"pairs.jsonl line 2 {rule} {shown}" in load_error(tmp_path / "pairs.jsonl")
    assert f"row 1 {rule} {via_pandas}" in str(validate(str(tmp_path / "pandas.parquet")))


def test_an_integer_column_a_nan_made_float_names_the_nan_row(tmp_path: Path) -> None:
    """pandas turns an int column with a NaN into float64; the error named row 0 (`value 4.0`), not row 2."""
    rows = [dict(row) for row in ROWS]
    rows[2]["successes"] = float("nan")
    pd.DataFrame(rows).to_parquet(tmp_path / "pairs.parquet")
    assert load_error(tmp_path / "pairs.parquet") == (
        f"{tmp_path / 'pairs.parquet'} row 2 field 'successes': column type double, expected int64 "
        f"(value {NULL})"
    )


@pytest.mark.parametrize(("value", "text"), [(None, f"must be a number, got {NULL}"),
                                             (float("nan"), "must lie in [-1, 1], got nan"),
                                             (float("-inf"), "must lie in [-1, 1], got -inf")])  # fmt: skip
def test_a_release_score_of_nan_inf_or_null_is_named_as_such(
    tmp_path: Path, value: float | None, text: str
) -> None:
    release = tmp_path / "rel"
    release.mkdir()
    (release / "prompt_dict.json").write_text(json.dumps({"d_1": "one"}))
    row = {"id": 1, "score": value, "type": "context", "model": "M", "step": 16, "dataset": "d"}
    write_jsonl(release / "context.jsonl", json.dumps(row) + "\n")
    with pytest.raises(PairsError) as error:
        read_v0_release(release, "context")
    assert str(error.value) == f"{release / 'context.jsonl'} line 1 field 'score': {text}"


# --------------------------------------------------------------------------------------------------
# `harvest run --checkpoints GLOB`, `datasets` noise


def test_harvest_run_takes_one_checkpoint_glob_on_the_command_line(tiny_lm_path: str, tmp_path: Path) -> None:
    """The help promises a path or glob; the parser refused a plain string ("Expected a <class 'list'>")."""
    exports = tmp_path / "run" / "exports"
    for step in (5, 10):
        shutil.copytree(tiny_lm_path, exports / f"step_{step:06d}")
    prompts = [
        {"prompt_id": f"d{i}", "prompt": f"{i}+0", "answer": str(i), "data_source": "d"} for i in range(2)
    ]
    datasets.Dataset.from_list(prompts).to_parquet(str(tmp_path / "digits.parquet"))
    common = [f"--prompts={tmp_path / 'digits.parquet'}", "--rollouts_per_prompt=2", "--experiment=null",
              "--progress=false", "--sampling.max_new_tokens=2"]  # fmt: skip
    main(["run", "--checkpoints", str(exports / "step_*"), f"--out={tmp_path / 'glob'}", *common])
    main(["run", "--checkpoints", f"[{exports / 'step_000010'}]", f"--out={tmp_path / 'list'}", *common])
    assert sorted({(row["policy"], row["step"]) for row in load_valid_pairs(tmp_path / "glob")}) == [
        ("step_000005", 5),  # a copied model folder: no basis_export.json, so the folder names the policy
        ("step_000010", 10),
    ]
    assert {row["step"] for row in load_valid_pairs(tmp_path / "list")} == {10}


def test_an_empty_checkpoint_path_is_refused_not_read_as_the_current_folder() -> None:
    for specs in ("", [""], [" "]):
        with pytest.raises(HarvestError, match="is empty"):
            resolve_checkpoints(specs)


def test_reports_carry_no_datasets_progress_bars(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """`load_dataset` drew "Generating train split" on stderr, which lands after a report piped on stdout."""
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(ROWS, features=PAIR_FEATURES).to_parquet(str(path))
    enabled = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    try:
        assert validate(str(path)).ok
        assert datasets.is_progress_bar_enabled()  # the caller's setting is kept
        main(["validate", str(path)])  # exits only on errors
    finally:  # the CLI turns them off for its process
        (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    captured = capfd.readouterr()
    assert "Generating" not in captured.err and "0 error(s)" in captured.out


# --------------------------------------------------------------------------------------------------
# Fuzzed bad input: each names file, row or line, and field


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ('"step": 1', "line 2 field 'step': must fit in int64, got 9223372036854775808"),
        ('"n": 4', "line 2 field 'n': must fit in int64, got 9223372036854775808"),
    ],
)
def test_jsonl_integers_beyond_int64_name_line_and_field(tmp_path: Path, raw: str, where: str) -> None:
    """Was `pairs.jsonl: values do not fit the pair contract's dtypes (Python int too large ...)`."""
    lines = jsonl_text(ROWS).splitlines(keepends=True)
    lines[1] = lines[1].replace(raw, raw.split(":")[0] + ": 9223372036854775808")
    path = write_jsonl(tmp_path / "pairs.jsonl", "".join(lines))
    assert load_error(path) == f"{path} {where}"


def test_a_parquet_uint64_beyond_int64_names_row_and_field(tmp_path: Path) -> None:
    """Was `cannot be loaded as parquet pairs (An error occurred while generating the dataset)`."""
    schema = pa.schema(
        [pa.field(c, pa.uint64() if c == "step" else PAIR_FEATURES[c].pa_type) for c in PAIR_FEATURES]
    )
    rows = [dict(row) for row in ROWS]
    rows[1]["step"] = 2**64 - 1
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "pairs.parquet")
    assert load_error(tmp_path / "pairs.parquet") == (
        f"{tmp_path / 'pairs.parquet'} row 1 field 'step': value 18446744073709551615 does not fit int64"
    )


def test_a_jsonl_object_with_a_key_twice_is_refused(tmp_path: Path) -> None:
    """`json` keeps the last value, so `"successes": 4, "successes": 0` loaded silently as 0."""
    bad = json.dumps(ROWS[0]).replace('"successes": 4', '"successes": 4, "successes": 0')
    path = write_jsonl(tmp_path / "pairs.jsonl", jsonl_text(ROWS[1:]) + bad + "\n")
    assert load_error(path) == f"{path} line 3 field 'successes': appears twice in one object"


def test_a_lone_surrogate_escape_names_line_and_field(tmp_path: Path) -> None:
    """`"\\ud800"` parses, then Arrow raised a bare UnicodeEncodeError (a traceback, no file)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", jsonl_text(ROWS).replace("Q: b?", "Q: \\ud800"))
    assert load_error(path).startswith(f"{path} line 2 field 'prompt': not Unicode text")
    release = tmp_path / "rel"
    release.mkdir()
    (release / "prompt_dict.json").write_text('{"d_1": "o\\ud800"}')
    row = {"id": 1, "score": 0.0, "type": "context", "model": "M", "step": 16, "dataset": "d"}
    write_jsonl(release / "context.jsonl", json.dumps(row) + "\n")
    with pytest.raises(PairsError, match=r"prompt_dict.json: field 'd_1': not Unicode text"):
        read_v0_release(release, "context")


def test_a_non_utf8_byte_names_its_line(tmp_path: Path) -> None:
    """Was `pairs.jsonl: not a UTF-8 text file (...)`, without the line."""
    text = jsonl_text(ROWS).replace("\n", "\r\n").replace("Q: c?", "Q: \u00e9?")
    path = write_jsonl(tmp_path / "pairs.jsonl", text.encode("latin-1"))
    assert load_error(path).startswith(f"{path} line 3: not UTF-8 text")


def test_a_release_id_or_dataset_that_cannot_name_a_prompt_is_named(tmp_path: Path) -> None:
    """`"id": null` was reported as `prompt id 'd_None' has no text in prompt_dict.json`."""
    release = tmp_path / "rel"
    release.mkdir()
    (release / "prompt_dict.json").write_text(json.dumps({"d_1": "one"}))
    row = {"id": None, "score": 0.0, "type": "context", "model": "M", "step": 2**64, "dataset": "d"}
    for bad, text in (({"step": 16}, f"field 'id': must be a string or an integer, got {NULL}"),
                      ({"id": 1}, "field 'step': must fit in int64, got 18446744073709551616")):  # fmt: skip
        write_jsonl(release / "context.jsonl", json.dumps(row | bad) + "\n")
        with pytest.raises(PairsError) as error:
            read_v0_release(release, "context")
        assert str(error.value) == f"{release / 'context.jsonl'} line 1 {text}"


def write_output(folder: Path, shards: list[dict] | None = None) -> Path:
    shard = folder / "context" / "pairs-00000.parquet"
    shard.parent.mkdir(parents=True)
    datasets.Dataset.from_list(ROWS, features=PAIR_FEATURES).to_parquet(str(shard))
    record = {"path": "context/pairs-00000.parquet", "rows": 3, "sha256": sha256_file(shard)}
    (folder / MANIFEST).write_text(json.dumps({"kind": "v0-release", "shards": shards or [record]}))
    return folder


def test_a_manifest_naming_files_outside_its_folder_or_one_file_twice_is_refused(tmp_path: Path) -> None:
    """Both loaded: a file beside the output (which copying the folder loses), or every row as a duplicate
    of itself ("row 0 ... duplicate of row 0")."""
    outside = tmp_path / "outside.parquet"
    datasets.Dataset.from_list(ROWS, features=PAIR_FEATURES).to_parquet(str(outside))
    record = {"rows": 3, "sha256": sha256_file(outside)}
    for name, path in (("up", "../outside.parquet"), ("absolute", str(outside))):
        out = write_output(tmp_path / name, [record | {"path": path}])
        assert (
            load_error(out)
            == f"{out / MANIFEST}: shards[0] path {path!r} must lie inside the manifest's folder"
        )
        assert "must lie inside" in str(validate(str(out)))
    out = write_output(tmp_path / "twice")
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps(manifest | {"shards": manifest["shards"] * 2}))
    assert load_error(out) == f"{out / MANIFEST}: shards[1] lists 'context/pairs-00000.parquet' again"


def test_a_manifest_that_is_not_utf8_is_a_pairs_error(tmp_path: Path) -> None:
    """Was a bare UnicodeDecodeError (no file named), from `load_pairs` and from `harvest validate`."""
    out = write_output(tmp_path / "out")
    (out / MANIFEST).write_bytes(b'{"kind": "v0-release\xe9", "shards": []}')
    assert load_error(out).startswith(f"{out / MANIFEST}: not UTF-8 text")
    assert "not UTF-8 text" in str(validate(str(out)))


def test_a_symbolic_link_loop_is_named(tmp_path: Path) -> None:
    """It was followed 40 levels deep, reporting every row 40 times as a duplicate of itself."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    datasets.Dataset.from_list(ROWS, features=PAIR_FEATURES).to_parquet(str(folder / "a.parquet"))
    os.symlink(folder, folder / "again")
    with pytest.raises(PairsError, match=r"again: a symbolic link to .*, which holds it \(a loop\)"):
        load_pairs(folder)


def test_an_import_still_reads_back(tmp_path: Path) -> None:
    """The stricter manifest and JSON checks accept what the writers write."""
    release = tmp_path / "rel"
    release.mkdir()
    (release / "prompt_dict.json").write_text(json.dumps({"d_1": "one", "d_2": "two"}))
    rows = [{"id": i, "score": s, "type": "context", "model": "M", "step": 16, "dataset": "d"}
            for i, s in ((1, 0.6), (2, -1.0))]  # fmt: skip
    write_jsonl(release / "context.jsonl", jsonl_text(rows))
    write_jsonl(release / "train.jsonl", json.dumps(rows[0] | {"model": "N"}) + "\n")
    write_release_pairs(release, tmp_path / "out")
    assert len(load_valid_pairs(tmp_path / "out")) == 3
