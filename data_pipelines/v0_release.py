"""Importer of the V0 authors' release format into the pair contract (design.md §2).

Release rows are jsonl `{id, score, type, model, step, dataset}`; prompt text lives in
`prompt_dict.json` under `f"{dataset}_{id}"`. Mapping to pairs: `policy = model`,
`prompt_id = f"{dataset}_{id}"`, `n = 10` rollouts, `successes = round((score + 1) / 2 * 10)`, and
`score` is rewritten as `2 * successes / n - 1` so it matches the successes exactly (release scores
are multiples of 0.2 up to float rounding). A bad row (a prompt id without text, a score that is not
a number, a non-integer step, a null or empty model) is a `PairsError` naming the file, the line
(1-based) and the field. The release has two files: `context.jsonl` (the context pools, 512 pairs per
key) and `train.jsonl` (32 query pairs per key on prompts disjoint from the pools).

Run: `python -m data_pipelines.v0_release ../shared/data/v0-release artifacts/pairs/v0-release`
writes `context/` and `train/` parquet shards, then `manifest.json` last; a failed import leaves the
previous output untouched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import datasets

from data_pipelines.pairs import PAIR_FEATURES, PairsError, raise_on_errors, read_json_object, validate_pairs

RELEASE_ROLLOUTS = 10
"""Rollouts behind every release score (scores are multiples of 0.2)."""
RELEASE_FILES = {"context": "context.jsonl", "train": "train.jsonl"}
RELEASE_FIELDS = ("id", "score", "model", "step", "dataset")
RELEASE_SHARD = "pairs-00000.parquet"
MANIFEST = "manifest.json"


def release_row_to_pair(row: dict, prompts: dict[str, str], where: str) -> dict:
    """Map one release row to a pair; `where` (file and line) names the row in every error."""
    if not isinstance(row, dict):
        raise PairsError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [field for field in RELEASE_FIELDS if field not in row]
    if missing:
        raise PairsError(f"{where}: missing field(s) {missing}")
    model, step, score = row["model"], row["step"], row["score"]
    if not isinstance(model, str) or not model.strip():
        raise PairsError(f"{where} field 'model': must be a non-empty string, got {model!r}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise PairsError(f"{where} field 'step': must be an integer >= 0, got {step!r}")
    if not isinstance(score, (int, float)) or isinstance(score, bool):
        raise PairsError(f"{where} field 'score': must be a number, got {score!r}")
    if not math.isfinite(score) or not -1.0 <= score <= 1.0:
        raise PairsError(f"{where} field 'score': must lie in [-1, 1], got {score!r}")
    prompt_id = f"{row['dataset']}_{row['id']}"
    if prompt_id not in prompts:
        raise PairsError(f"{where}: prompt id {prompt_id!r} has no text in prompt_dict.json")
    successes = round((score + 1) / 2 * RELEASE_ROLLOUTS)
    if abs((2 * successes / RELEASE_ROLLOUTS - 1) - score) > 1e-6:
        raise PairsError(f"{where} field 'score': {score} is not a multiple of 0.2 (10 rollouts)")
    return {
        "policy": model,
        "step": step,
        "prompt_id": prompt_id,
        "prompt": prompts[prompt_id],
        "n": RELEASE_ROLLOUTS,
        "successes": successes,
        "score": 2 * successes / RELEASE_ROLLOUTS - 1,
    }


def read_prompts(folder: str | Path) -> dict[str, str]:
    """The release's `prompt_dict.json`: prompt id -> non-empty text (`PairsError` naming the file)."""
    prompt_file = Path(folder) / "prompt_dict.json"
    if not prompt_file.exists():
        raise PairsError(f"{prompt_file}: missing; {folder} is not a V0 release folder")
    prompts = read_json_object(prompt_file)
    for prompt_id, text in prompts.items():
        if not isinstance(text, str) or not text.strip():
            raise PairsError(f"{prompt_file}: prompt {prompt_id!r} must be a non-empty string, got {text!r}")
    return prompts


def read_v0_release(
    folder: str | Path, split: Literal["context", "train"] = "context", prompts: dict[str, str] | None = None
) -> datasets.Dataset:
    """The release's `split` file as a validated pairs `Dataset`; `prompts` is the folder's
    `read_prompts`, read here when not given (pass it to read both splits with one read).

    Raises:
        PairsError: naming the file, the line (1-based) and the field of the first bad row, or listing
            the pair contract errors of the whole file.
    """
    folder = Path(folder)
    if split not in RELEASE_FILES:
        raise ValueError(f"split must be one of {sorted(RELEASE_FILES)}, got {split!r}")
    prompts = read_prompts(folder) if prompts is None else prompts
    rows_file = folder / RELEASE_FILES[split]
    if not rows_file.exists():
        raise PairsError(f"{rows_file}: missing; {folder} is not a V0 release folder")
    pairs = []
    with rows_file.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{rows_file} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PairsError(f"{where}: not valid JSON ({err})") from err
            pairs.append(release_row_to_pair(row, prompts, where))
    if not pairs:
        raise PairsError(f"{rows_file}: no rows")
    dataset = datasets.Dataset.from_list(pairs, features=PAIR_FEATURES)
    raise_on_errors(validate_pairs(dataset, str(rows_file)), str(rows_file))
    return dataset


def write_release_pairs(folder: str | Path, out: str | Path) -> Path:
    """Import both release files into `out/{context,train}/` parquet, then write `manifest.json` last.

    Both files are read and validated before anything is written, and the new files are written into a
    temporary sibling folder first, then moved into `out` with `os.replace` (the old manifest is removed
    first, the new one moved last). A bad release therefore leaves a previous import in `out` untouched.
    """
    out = Path(out)
    prompts = read_prompts(folder)
    splits = {split: read_v0_release(folder, split, prompts) for split in RELEASE_FILES}  # type: ignore[arg-type]
    manifest = {"source": str(Path(folder).resolve()), "rows": {s: len(d) for s, d in splits.items()}}
    files = [f"{split}/{RELEASE_SHARD}" for split in splits] + [MANIFEST]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        for split, dataset in splits.items():
            (staging / split).mkdir()
            dataset.to_parquet(str(staging / split / RELEASE_SHARD))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (out / MANIFEST).unlink(missing_ok=True)  # no manifest while old and new files mix
        for relative in files:
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, out / relative)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / MANIFEST


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("release", help="V0 release folder (context.jsonl, train.jsonl, prompt_dict.json)")
    parser.add_argument("out", help="output folder for the pairs parquet")
    args = parser.parse_args(argv)
    try:
        print(write_release_pairs(args.release, args.out))
    except PairsError as err:
        raise SystemExit(f"v0_release: error: {err}") from None


if __name__ == "__main__":
    main()
