"""Second review of `data_pipelines.harvest` / `data_pipelines.pairs`: paths into and around pairs outputs,
parquet string columns stored as dictionaries, and `from-logs` output arguments."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.harvest import main, validate
from data_pipelines.pairs import (
    MANIFEST,
    PAIR_FEATURES,
    PairsError,
    load_pairs,
    load_valid_pairs,
    sha256_file,
)


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


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=PAIR_FEATURES).to_parquet(str(path))


def test_a_legacy_import_loads_through_a_path_with_dotdot_or_a_hidden_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only hidden names *below* the output are a writer's unfinished work; `../` or `~/.cache/` in the
    output's own path hid every shard ("folder has no *.parquet")."""
    legacy = tmp_path / ".cache" / "release-pairs"
    write_parquet(legacy / "context" / "pairs-00000.parquet", ROWS)
    (legacy / MANIFEST).write_text(json.dumps({"source": "/somewhere", "rows": {"context": 3}}))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for path in (legacy, Path("../.cache/release-pairs")):
        assert sorted(load_valid_pairs(path)["prompt_id"]) == ["a", "b", "c"]
        assert validate(str(path)).ok


def test_a_folder_or_file_inside_a_pairs_output_is_read_through_its_manifest(tmp_path: Path) -> None:
    """`out/data/<policy>` of a killed harvest (no manifest) held shards of half a run and was read as
    pairs; inside a finished one only listed, intact shards are read."""
    out = tmp_path / "out"
    (out / "progress").mkdir(parents=True)
    listed = out / "data/p/step_000001/shard-00000.parquet"
    write_parquet(listed, ROWS)
    for path in (out / "data", out / "data/p/step_000001", listed):
        with pytest.raises(PairsError, match=rf"{out}: no {MANIFEST}: an unfinished harvest"):
            load_pairs(path)
        assert not validate(str(path)).ok
    entry = {"path": str(listed.relative_to(out)), "rows": 3, "sha256": sha256_file(listed)}
    (out / MANIFEST).write_text(json.dumps({"kind": "rollouts", "shards": [entry]}))
    stray = out / "data/p/step_000001/shard-00001.parquet"  # not in the manifest: never read
    write_parquet(stray, [pair("z")])
    for path in (out / "data", out / "data/p/step_000001", listed):
        assert sorted(load_valid_pairs(path)["prompt_id"]) == ["a", "b", "c"]
    with pytest.raises(
        PairsError, match=rf"{stray}: lies inside the pairs output {out}, whose {MANIFEST} lists"
    ):
        load_pairs(stray)


def test_a_pairs_folder_beside_a_progress_folder_or_another_tools_manifest_is_read_as_it_is(
    tmp_path: Path,
) -> None:
    """Only a pairs output's own layout makes a path part of it, not any ancestor with `progress/`."""
    project = tmp_path / "myproject"
    (project / "progress").mkdir(parents=True)  # e.g. a notebook's progress logs
    (project / MANIFEST).write_text(json.dumps({"kind": "notes", "shards": []}))  # another tool's
    own = project / "data/pairs/pairs.parquet"
    write_parquet(own, ROWS)
    for path in (project / "data/pairs", own):
        assert sorted(load_valid_pairs(path)["prompt_id"]) == ["a", "b", "c"]


def test_a_string_column_stored_as_a_dictionary_loads(tmp_path: Path) -> None:
    """pandas writes a categorical column as a parquet dictionary of strings: still strings."""
    frame = pd.DataFrame(ROWS)
    frame["policy"] = frame["policy"].astype("category")
    path = tmp_path / "pairs.parquet"
    frame.to_parquet(path)
    assert pa.types.is_dictionary(pq.read_schema(path).field("policy").type)
    loaded = load_valid_pairs(path)
    assert loaded["policy"] == ["p", "p", "p"] and loaded.features == PAIR_FEATURES


def test_from_logs_into_a_file_exits_2_naming_it_and_leaves_it(tmp_path: Path, capsys) -> None:
    records = tmp_path / "run" / "rollouts" / "step_000001-rank0.parquet"
    records.parent.mkdir(parents=True)
    pq.write_table(pa.table({"step": [1], "prompt_id": ["a"], "prompt": ["1+1"], "reward": [1.0]}), records)
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    with pytest.raises(SystemExit) as exit_:
        main(
            ["from-logs", f"--run_dir={tmp_path / 'run'}", "--policy=p", f"--out={out}", "--experiment=null"]
        )
    assert exit_.value.code == 2
    assert f"output folder {out} is a file" in capsys.readouterr().err
    assert out.read_text() == "keep me"
