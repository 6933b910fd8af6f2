"""Tests of the V0 release importer on a tiny release folder and on the real release data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.harvest import main
from data_pipelines.pairs import PAIR_FEATURES, PairsError, load_pairs, load_valid_pairs
from data_pipelines.v0_release import read_v0_release, release_row_to_pair, write_release_pairs

REAL_RELEASE = Path(__file__).resolve().parents[3] / "shared" / "data" / "v0-release"


def make_release(folder: Path, rows: list[dict], prompts: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt_dict.json").write_text(json.dumps(prompts))
    (folder / "context.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = rows[0] | {"id": 4, "type": "train_query"}  # a prompt outside the context, as in the release
    (folder / "train.jsonl").write_text(json.dumps(train) + "\n")
    return folder


ROWS = [
    {"id": 1, "score": 0.6, "type": "context", "model": "M", "step": 16, "dataset": "dapomath"},
    {"id": 2, "score": -1.0, "type": "context", "model": "M", "step": 16, "dataset": "dapomath"},
    {"id": 3, "score": 0.2, "type": "context", "model": "N", "step": 64, "dataset": "dapomath"},
]
NULL = "null (a missing value; pandas writes NaN as null)"
PROMPTS = {"dapomath_1": "one", "dapomath_2": "two", "dapomath_3": "three", "dapomath_4": "four"}


def test_row_mapping() -> None:
    got = release_row_to_pair(ROWS[0], PROMPTS, "x row 0")
    assert got == {
        "policy": "M",
        "step": 16,
        "prompt_id": "dapomath_1",
        "prompt": "one",
        "n": 10,
        "successes": 8,
        "score": pytest.approx(0.6),
    }
    assert release_row_to_pair(ROWS[1], PROMPTS, "x")["successes"] == 0


def test_read_and_write(tmp_path: Path) -> None:
    release = make_release(tmp_path / "rel", ROWS, PROMPTS)
    dataset = read_v0_release(release, "context")
    assert dataset.features == PAIR_FEATURES
    assert dataset["successes"] == [8, 0, 6]
    manifest = write_release_pairs(release, tmp_path / "out")
    assert json.loads(manifest.read_text())["rows"] == {"context": 3, "train": 1}
    assert len(load_valid_pairs(tmp_path / "out" / "context")) == 3


def test_prompt_without_text_names_file_and_row(tmp_path: Path) -> None:
    release = make_release(tmp_path / "rel", ROWS, {"dapomath_1": "one", "dapomath_3": "three"})
    with pytest.raises(PairsError, match=r"context.jsonl line 2: prompt id 'dapomath_2' has no text"):
        read_v0_release(release, "context")


@pytest.mark.parametrize(
    ("row", "text"),
    [
        ({"id": 1, "score": 0.55, "model": "M", "step": 1, "dataset": "dapomath"}, "not a multiple of 0.2"),
        ({"id": 1, "score": 2.0, "model": "M", "step": 1, "dataset": "dapomath"}, "must lie in"),
        ({"id": 1, "model": "M", "step": 1, "dataset": "dapomath"}, "missing field"),
    ],
)
def test_bad_rows(tmp_path: Path, row: dict, text: str) -> None:
    release = make_release(tmp_path / "rel", [ROWS[0], row], PROMPTS)
    with pytest.raises(PairsError, match=text):
        read_v0_release(release, "context")


@pytest.mark.parametrize(
    ("bad", "field", "text"),
    [
        ({"score": None}, "score", f"must be a number, got {NULL}"),
        ({"score": "abc"}, "score", "must be a number, got 'abc'"),
        ({"step": "x"}, "step", "must be an integer >= 0, got 'x'"),
        ({"step": 16.7}, "step", "must be an integer >= 0, got 16.7"),
        ({"model": None}, "model", f"must be a non-empty string, got {NULL}"),
        ({"model": " "}, "model", "must be a non-empty string, got ' '"),
    ],
)
def test_bad_values_name_file_line_and_field(tmp_path: Path, bad: dict, field: str, text: str) -> None:
    release = make_release(tmp_path / "rel", [ROWS[0], ROWS[1] | bad], PROMPTS)
    expected = f"{release / 'context.jsonl'} line 2 field {field!r}: {text}"
    with pytest.raises(PairsError) as error:
        read_v0_release(release, "context")
    assert str(error.value) == expected


def test_import_v0_cli_reports_a_bad_row_without_a_traceback(tmp_path: Path, capsys) -> None:
    from data_pipelines.harvest import main

    release = make_release(tmp_path / "rel", [ROWS[0], ROWS[1] | {"score": None}], PROMPTS)
    with pytest.raises(SystemExit) as exit_:
        main(["import-v0", f"--release={release}", f"--out={tmp_path / 'out'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"harvest: error: {release / 'context.jsonl'} line 2 field 'score'" in err
    assert "Traceback" not in err


def test_failed_import_leaves_the_previous_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    release = make_release(tmp_path / "rel", ROWS, PROMPTS)
    write_release_pairs(release, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # The new context file is good, its train file is not: nothing of the new import may land in `out`.
    make_release(release, [*ROWS, ROWS[0] | {"step": 256}], PROMPTS)
    (release / "train.jsonl").write_text(json.dumps(ROWS[0] | {"score": 0.3}) + "\n")
    with pytest.raises(PairsError, match=r"not a multiple of 0\.2"):
        write_release_pairs(release, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "rel"]  # no staging folder left behind
    # A good import replaces the output as a whole.
    make_release(release, [*ROWS, ROWS[0] | {"step": 256}], PROMPTS)
    manifest = write_release_pairs(release, out)
    assert json.loads(manifest.read_text())["rows"] == {"context": 4, "train": 1}
    assert len(load_valid_pairs(out / "context")) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "rel"]


def test_the_import_manifest_lists_its_files_and_validate_checks_them(tmp_path: Path) -> None:
    from data_pipelines.harvest import validate

    out = tmp_path / "out"
    write_release_pairs(make_release(tmp_path / "rel", ROWS, PROMPTS), out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "v0-release"
    assert [(s["path"], s["rows"]) for s in manifest["shards"]] == [
        ("context/pairs-00000.parquet", 3), ("train/pairs-00000.parquet", 1)
    ]  # fmt: skip
    assert validate(str(out)).ok
    context = out / "context" / "pairs-00000.parquet"
    read_v0_release(tmp_path / "rel", "train").to_parquet(str(context))  # other rows under its name
    report = validate(str(out))
    assert not report.ok and f"{context}: corrupted shard: sha256" in str(report)
    with pytest.raises(PairsError, match="corrupted shard"):
        load_valid_pairs(out)


def test_import_refuses_a_folder_with_files_of_its_own(tmp_path: Path) -> None:
    release = make_release(tmp_path / "rel", ROWS, PROMPTS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PairsError, match=r"holds files \(\['notes.txt'\]\), not a previous import-v0"):
        write_release_pairs(release, out)
    (out / "notes.txt").unlink()
    write_release_pairs(release, out)  # an empty folder is fine
    (out / "context" / "extra.parquet").write_bytes(b"x")
    with pytest.raises(
        PairsError, match=r"files its import manifest does not list \(\['context/extra.parquet'\]\)"
    ):
        write_release_pairs(release, out)
    assert (out / "context" / "extra.parquet").read_bytes() == b"x"


def test_import_replaces_an_import_from_before_manifests_listed_files(tmp_path: Path) -> None:
    release = make_release(tmp_path / "rel", ROWS, PROMPTS)
    out = tmp_path / "out"
    (out / "context").mkdir(parents=True)
    (out / "context" / "pairs-00000.parquet").write_bytes(b"old")
    (out / "manifest.json").write_text(json.dumps({"source": "/old", "rows": {"context": 1}}))
    write_release_pairs(release, out)
    assert json.loads((out / "manifest.json").read_text())["kind"] == "v0-release"
    # replaced as a whole: the new rows load, and nothing of the old import is left beside it
    assert sorted(load_valid_pairs(out / "context")["prompt_id"]) == [
        "dapomath_1",
        "dapomath_2",
        "dapomath_3",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "rel"]


# The import is SIGKILLed in a real subprocess (1) after writing its first file, with no previous output;
# (2) over a previous import, right after its first rename (the previous import moved aside).
KILL_AT = {
    "writing": "datasets.Dataset.to_parquet",
    "swapping": "os.replace",
}


@pytest.mark.parametrize("moment", sorted(KILL_AT))
def test_a_killed_import_is_never_read_and_its_rerun_completes(tmp_path: Path, moment: str) -> None:
    release = make_release(tmp_path / "rel", ROWS, PROMPTS)
    out = tmp_path / "pairs" / "out"
    if moment == "swapping":
        write_release_pairs(make_release(tmp_path / "old", ROWS[:2], PROMPTS), out)
    module, name = KILL_AT[moment].rsplit(".", 1)
    child = (
        "import os, signal, sys, datasets\n"
        "from data_pipelines import harvest, v0_release\n"
        f"real = {module}.{name}\n"
        "def call_then_die(*args, **kwargs):\n"
        "    real(*args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"{module}.{name} = call_then_die\n"
        "harvest.main(['import-v0', '--release=' + sys.argv[1], '--out=' + sys.argv[2]])\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", child, str(release), str(out)], capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with pytest.raises(PairsError, match="no such pairs file or folder"):  # never old and new files mixed
        load_valid_pairs(out)
    with pytest.raises(PairsError, match="folder has no"):  # hidden staging is not read from above
        load_pairs(out.parent)
    if moment == "swapping":  # it died between the two renames of the swap
        assert (out.parent / ".out.import-previous" / "manifest.json").is_file()
        assert (out.parent / ".out.import-staging" / "manifest.json").is_file()

    main(["import-v0", f"--release={release}", f"--out={out}"])  # the same command again
    assert json.loads((out / "manifest.json").read_text())["rows"] == {"context": 3, "train": 1}
    assert len(load_valid_pairs(out)) == 4
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # the killed run's leftovers are gone


def test_not_a_release_folder(tmp_path: Path) -> None:
    with pytest.raises(PairsError, match="not a V0 release folder"):
        read_v0_release(tmp_path, "context")
    with pytest.raises(ValueError, match="split must be one of"):
        read_v0_release(tmp_path, "query")  # type: ignore[arg-type]


@pytest.mark.skipif(not REAL_RELEASE.exists(), reason="V0 release data not present")
def test_real_release() -> None:
    context = read_v0_release(REAL_RELEASE, "context")
    train = read_v0_release(REAL_RELEASE, "train")
    assert len(context) == 3072 and len(train) == 192
    assert set(context["n"]) == {10}
    assert not set(context["prompt_id"]) & set(train["prompt_id"])
