"""Importer of the V0 authors' release format into the pair contract (design.md §2).

Release rows are jsonl `{id, score, type, model, step, dataset}`; prompt text lives in
`prompt_dict.json` under `f"{dataset}_{id}"`. Mapping to pairs: `policy = model`,
`prompt_id = f"{dataset}_{id}"`, `n = 10` rollouts, `successes = round((score + 1) / 2 * 10)`, and
`score` is rewritten as `2 * successes / n - 1` so it matches the successes exactly (release scores
are multiples of 0.2 up to float rounding). A prompt id without text is an error naming the file and
row. The release has two files: `context.jsonl` (the context pools, 512 pairs per key) and
`train.jsonl` (32 query pairs per key on prompts disjoint from the pools).

Run: `python -m data_pipelines.v0_release ../shared/data/v0-release artifacts/pairs/v0-release`
writes `context/` and `train/` parquet shards, then `manifest.json` last.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import datasets

from data_pipelines.pairs import PAIR_FEATURES, PairsError, raise_on_errors, validate_pairs

RELEASE_ROLLOUTS = 10
"""Rollouts behind every release score (scores are multiples of 0.2)."""
RELEASE_FILES = {"context": "context.jsonl", "train": "train.jsonl"}
RELEASE_FIELDS = ("id", "score", "model", "step", "dataset")


def release_row_to_pair(row: dict, prompts: dict[str, str], where: str) -> dict:
    """Map one release row to a pair; `where` (file:row) names the row in every error."""
    missing = [field for field in RELEASE_FIELDS if field not in row]
    if missing:
        raise PairsError(f"{where}: missing field(s) {missing}")
    prompt_id = f"{row['dataset']}_{row['id']}"
    if prompt_id not in prompts:
        raise PairsError(f"{where}: prompt id {prompt_id!r} has no text in prompt_dict.json")
    score = float(row["score"])
    if not math.isfinite(score) or not -1.0 <= score <= 1.0:
        raise PairsError(f"{where} field 'score': must lie in [-1, 1], got {row['score']!r}")
    successes = round((score + 1) / 2 * RELEASE_ROLLOUTS)
    if abs((2 * successes / RELEASE_ROLLOUTS - 1) - score) > 1e-6:
        raise PairsError(f"{where} field 'score': {score} is not a multiple of 0.2 (10 rollouts)")
    return {
        "policy": str(row["model"]),
        "step": int(row["step"]),
        "prompt_id": prompt_id,
        "prompt": prompts[prompt_id],
        "n": RELEASE_ROLLOUTS,
        "successes": successes,
        "score": 2 * successes / RELEASE_ROLLOUTS - 1,
    }


def read_v0_release(folder: str | Path, split: Literal["context", "train"] = "context") -> datasets.Dataset:
    """The release's `split` file as a validated pairs `Dataset` (raises `PairsError` on bad rows)."""
    folder = Path(folder)
    if split not in RELEASE_FILES:
        raise ValueError(f"split must be one of {sorted(RELEASE_FILES)}, got {split!r}")
    prompt_file, rows_file = folder / "prompt_dict.json", folder / RELEASE_FILES[split]
    for required in (prompt_file, rows_file):
        if not required.exists():
            raise PairsError(f"{required}: missing; {folder} is not a V0 release folder")
    prompts = json.loads(prompt_file.read_text())
    pairs = []
    with rows_file.open() as lines:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            where = f"{rows_file} row {index}"
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
    """Import both release files into `out/{context,train}/` parquet, then write `manifest.json` last."""
    out = Path(out)
    counts = {}
    for split in RELEASE_FILES:
        dataset = read_v0_release(folder, split)  # type: ignore[arg-type]
        (out / split).mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(out / split / "pairs-00000.parquet"))
        counts[split] = len(dataset)
    manifest = out / "manifest.json"
    manifest.write_text(json.dumps({"source": str(Path(folder).resolve()), "rows": counts}, indent=2) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("release", help="V0 release folder (context.jsonl, train.jsonl, prompt_dict.json)")
    parser.add_argument("out", help="output folder for the pairs parquet")
    args = parser.parse_args(argv)
    print(write_release_pairs(args.release, args.out))


if __name__ == "__main__":
    main()
