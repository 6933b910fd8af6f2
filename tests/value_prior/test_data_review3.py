"""Review fixes: release rows named by their jsonl line, pairs in both release files refused before an
import writes anything, and evaluation contexts too small to hold both classes refused up front."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_pipelines.pairs import PairsError
from data_pipelines.v0_release import read_v0_release, write_release_pairs
from value_prior.data import PairsDataModule

PROMPTS = {"dapomath_1": "one", "dapomath_2": "two"}
ROWS = [
    {"id": 1, "score": 0.6, "type": "context", "model": "M", "step": 16, "dataset": "dapomath"},
    {"id": 2, "score": -1.0, "type": "context", "model": "M", "step": 16, "dataset": "dapomath"},
]


def write_release(folder: Path, context: list[dict], train: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "prompt_dict.json").write_text(json.dumps(PROMPTS))
    (folder / "context.jsonl").write_text("".join(json.dumps(r) + "\n" for r in context))
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    return folder


def test_a_duplicated_release_row_is_named_by_its_line(tmp_path: Path) -> None:
    # Validation used to name the 0-based dataset row ("row 2 ... duplicate of row 0") where every other
    # release error names the 1-based line; a blank line moves them further apart.
    release = write_release(tmp_path / "rel", [*ROWS, ROWS[0] | {"score": 0.2}], [])
    (release / "context.jsonl").write_text("\n" + (release / "context.jsonl").read_text())
    with pytest.raises(PairsError, match=r"context.jsonl line 4 field 'prompt_id': duplicate of line 2 "):
        read_v0_release(release, "context")


def test_an_import_refuses_a_pair_in_both_release_files(tmp_path: Path) -> None:
    # Each file alone is valid, but the import output is read as one pairs folder: it used to be written,
    # then refused by `load_valid_pairs` and `harvest validate` as a duplicate pair.
    release = write_release(tmp_path / "rel", ROWS, [ROWS[0] | {"type": "train_query", "score": 0.2}])
    out = tmp_path / "out"
    expected = (
        f"{release / 'train.jsonl'} line 1 field 'prompt_id': duplicate of {release / 'context.jsonl'} line 1"
    )
    with pytest.raises(PairsError, match=re.escape(expected)):
        write_release_pairs(release, out)
    assert not out.exists()


def test_an_eval_context_too_small_for_both_classes_is_refused(tiny_pairs_path: str) -> None:
    # eval_context_size 1 gave single-class validation supports, 0 empty ones (design.md §3).
    for size in (0, 1):
        with pytest.raises(ValueError, match=f"eval_context_size >= 2 required, got {size}"):
            PairsDataModule(tiny_pairs_path, eval_context_size=size)
    PairsDataModule(tiny_pairs_path, eval_context_size=2)


def test_a_score_beyond_float_range_is_a_row_error(tmp_path: Path) -> None:
    # `math.isfinite(10**400)` raised OverflowError, a traceback naming no file, line or field.
    release = write_release(tmp_path / "rel", [ROWS[0], ROWS[1] | {"score": 10**400}], [])
    with pytest.raises(PairsError, match=r"context.jsonl line 2 field 'score': must lie in \[-1, 1\]"):
        read_v0_release(release, "context")
