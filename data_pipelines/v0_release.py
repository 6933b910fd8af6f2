"""Importer of the V0 authors' release format into the pair contract (design.md §2).

Release rows are jsonl `{id, score, type, model, step, dataset}`; prompt text lives in
`prompt_dict.json` under `f"{dataset}_{id}"`. Mapping to pairs: `policy = model`,
`prompt_id = f"{dataset}_{id}"`, `n = 10` rollouts, `successes = round((score + 1) / 2 * 10)`, and
`score` is rewritten as `2 * successes / n - 1` so it matches the successes exactly (release scores
are multiples of 0.2 up to float rounding). A bad row (a prompt id without text, a score that is not
a number, a non-integer step, a null or empty model, an id or dataset that is neither a string nor an
integer, a (model, step, prompt id) already in this file or the other one) is a `PairsError` naming the
file, the line (1-based) and the field. The release has two files: `context.jsonl` (the context pools,
512 pairs per key) and `train.jsonl` (32 query pairs per key on prompts disjoint from the pools).

Run: `harvest import-v0 --release ../shared/data/v0-release --out artifacts/pairs/v0-release` (which
then validates the result) writes `context/` and `train/` parquet shards and `manifest.json` (listing both with rows and sha256, so
`harvest validate` and `pairs.load_pairs` check them) into a hidden staging folder, then moves it to the
output folder. A failed or killed import leaves the previous output untouched (a kill in the final swap
leaves no output, and rerunning the same command completes it). The output folder must be new, empty or
a previous import: anything else (a harvest, stray files) is refused rather than mixed or overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import datasets

from data_pipelines.pairs import (
    MANIFEST,
    PAIR_FEATURES,
    PairsError,
    RowLocator,
    ShardRecord,
    is_legacy_import,
    json_lines,
    manifest_shards,
    raise_on_errors,
    read_json_object,
    sha256_file,
    shown_value,
    staging_folder,
    validate_pairs,
)

RELEASE_ROLLOUTS = 10
"""Rollouts behind every release score (scores are multiples of 0.2)."""
RELEASE_FILES = {"context": "context.jsonl", "train": "train.jsonl"}
RELEASE_FIELDS = ("id", "score", "model", "step", "dataset")
RELEASE_SHARD = "pairs-00000.parquet"
IMPORT_KIND = "v0-release"
"""The manifest `kind` of an import, the only thing an import may replace."""


def release_row_to_pair(row: dict, prompts: dict[str, str], where: str) -> dict:
    """Map one release row to a pair; `where` (file and line) names the row in every error."""
    if not isinstance(row, dict):
        raise PairsError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [field for field in RELEASE_FIELDS if field not in row]
    if missing:
        raise PairsError(f"{where}: missing field(s) {missing}")
    model, step, score = row["model"], row["step"], row["score"]
    if not isinstance(model, str) or not model.strip():
        raise PairsError(f"{where} field 'model': must be a non-empty string, got {shown_value(model)}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise PairsError(f"{where} field 'step': must be an integer >= 0, got {shown_value(step)}")
    if step >= 2**63:
        raise PairsError(f"{where} field 'step': must fit in int64, got {step}")
    if not isinstance(score, (int, float)) or isinstance(score, bool):
        raise PairsError(f"{where} field 'score': must be a number, got {shown_value(score)}")
    for field, value in (("dataset", row["dataset"]), ("id", row["id"])):
        if not isinstance(value, (str, int)) or isinstance(value, bool):  # they name the prompt
            raise PairsError(
                f"{where} field {field!r}: must be a string or an integer, got {shown_value(value)}"
            )
    if not -1.0 <= score <= 1.0:  # also refuses nan and inf, and never converts a huge int to float
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
    pairs = [release_row_to_pair(row, prompts, where) for where, row in json_lines(rows_file)]
    if not pairs:
        raise PairsError(f"{rows_file}: no rows")
    dataset = datasets.Dataset.from_list(pairs, features=PAIR_FEATURES)
    locate = RowLocator(str(rows_file), [str(rows_file)])  # duplicates named by line, like the errors above
    raise_on_errors(validate_pairs(dataset, str(rows_file), locate), str(rows_file))
    return dataset


def check_import_folder(out: Path) -> None:
    """Refuse an `out` that holds anything but a previous import, which a new import replaces whole.

    Raises:
        PairsError: naming `out` when it is a file, holds another writer's output (a harvest's manifest
            and shards would be mixed with the release), or files its import manifest does not list.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise PairsError(f"output folder {out} is a file")
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir())
    if not found:
        return
    manifest_path = out / MANIFEST
    manifest = read_json_object(manifest_path) if manifest_path.is_file() else {}
    if is_legacy_import(manifest):  # an import from before manifests listed files: replaced whole
        strays = [path for path in found if path != MANIFEST and not path.startswith(("context/", "train/"))]
        if strays:
            raise PairsError(
                f"output folder {out} holds files a previous import did not write ({strays[:3]}); move them "
                "out first (or choose a new folder)"
            )
        return
    if manifest.get("kind") != IMPORT_KIND:
        what = f"a {manifest.get('kind')!r} pairs output" if manifest else f"files ({found[:3]})"
        raise PairsError(
            f"output folder {out} holds {what}, not a previous import-v0; choose a new folder "
            "(or delete this one)"
        )
    listed = {MANIFEST} | {shard.path for shard in manifest_shards(manifest, manifest_path)}
    strays = [path for path in found if path not in listed]
    if strays:
        raise PairsError(
            f"output folder {out} holds files its import manifest does not list ({strays[:3]}); an import "
            "replaces the folder whole, so move them out first (or choose a new folder)"
        )


def write_release_pairs(folder: str | Path, out: str | Path) -> Path:
    """Import both release files into `out/{context,train}/` parquet with `out/manifest.json`.

    Both files are read and validated before anything is written; everything is written into a hidden
    staging folder next to `out` (`pairs.staging_folder`) and moved into place last: with a rename onto a
    missing or empty `out`, or by moving a previous import aside, renaming, then deleting the old one. A
    bad release therefore leaves a previous import untouched, and no reader ever sees old and new files
    mixed or an import without its manifest.
    """
    out = Path(out)
    check_import_folder(out)
    prompts = read_prompts(folder)
    splits = {split: read_v0_release(folder, split, prompts) for split in RELEASE_FILES}  # type: ignore[arg-type]
    # `out` is read back as one pairs folder, so a pair in both files would be a duplicate there.
    files = [str(Path(folder) / name) for name in RELEASE_FILES.values()]
    both = datasets.concatenate_datasets(list(splits.values()))
    raise_on_errors(validate_pairs(both, str(folder), RowLocator(str(folder), files)), str(folder))
    with staging_folder(out, "import") as staging:
        shards = []
        for split, dataset in splits.items():
            relative = f"{split}/{RELEASE_SHARD}"
            (staging / split).mkdir()
            dataset.to_parquet(str(staging / relative))
            shards.append(ShardRecord(relative, len(dataset), sha256_file(staging / relative)))
        manifest = {
            "kind": IMPORT_KIND,
            "source": str(Path(folder).resolve()),
            "rows": {split: len(dataset) for split, dataset in splits.items()},
            "shards": [asdict(shard) for shard in shards],
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists() and any(out.iterdir()):  # a previous import (check_import_folder)
            previous = out.parent / f".{out.name}.import-previous"  # cleared by the next run if killed here
            os.replace(out, previous)
            os.replace(staging, out)
            shutil.rmtree(previous)
        else:
            os.replace(staging, out)
    return out / MANIFEST
