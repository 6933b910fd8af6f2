"""The query-performance pair contract (design.md §2): columns, loading and validation.

A pair says how one policy checkpoint did on one prompt: `policy: str`, `step: int`,
`prompt_id: str`, `prompt: str`, `n: int` rollouts, `successes: int`, `score: float` = mean reward
on the ±1 scale. Success rate `y = successes / n = (score + 1) / 2`. A *context pool* is all pairs
of one `(policy, step)` key. Pairs live in Hugging Face `datasets` form, stored as parquet shards
(a file or a folder of them) or jsonl.

`validate_pairs` never raises: it returns every problem it finds with its row and field, so a
harvest can be repaired in one pass; `load_valid_pairs` loads, validates and raises one
`PairsError` listing them. Single-class context pools are warnings, not errors: V0 skips them when
sampling episodes (design.md §3), but the data itself is legal.

Run: `python -m data_pipelines.pairs PATH` prints the problems of a pairs file or folder.
"""

from __future__ import annotations

import bisect
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets

PAIR_FEATURES = datasets.Features(
    {
        "policy": datasets.Value("string"),
        "step": datasets.Value("int64"),
        "prompt_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "n": datasets.Value("int64"),
        "successes": datasets.Value("int64"),
        "score": datasets.Value("float64"),
    }
)
"""Column names and dtypes of the pair contract."""

PAIR_COLUMNS: tuple[str, ...] = tuple(PAIR_FEATURES)
SCORE_TOLERANCE = 1e-6
"""Largest allowed |score - (2 * successes / n - 1)|."""
SUCCESS_THRESHOLD = 0.5
"""A pair counts as a success (class 1) when its success rate is >= this (design.md §3 labels)."""


class PairsError(ValueError):
    """Pairs that break the contract; the message lists each problem with source, row and field."""


@dataclass(frozen=True)
class PairProblem:
    """One contract violation: where it is (source, row, field) and what is wrong."""

    source: str
    row: int | None
    field: str | None
    message: str
    severity: Literal["error", "warning"] = "error"
    unit: Literal["row", "line"] = "row"  # "row": 0-based row of the source; "line": 1-based jsonl line

    def __str__(self) -> str:
        where = self.source
        if self.row is not None:
            where += f" {self.unit} {self.row}"
        if self.field is not None:
            where += f" field {self.field!r}"
        return f"{self.severity}: {where}: {self.message}"


def success_rate(successes: int, n: int) -> float:
    """Fraction of successful rollouts, `successes / n`."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return successes / n


def pool_key(policy: str, step: int) -> str:
    """Display name of a context pool, e.g. `"Qwen3-4B-Instruct@step64"` (not an MLflow metric name)."""
    return f"{policy}@step{step}"


def _data_files(path: Path) -> tuple[str, list[str]]:
    if path.is_dir():
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        jsonl = sorted(str(p) for p in path.rglob("*.jsonl"))
        if parquet and jsonl:
            raise PairsError(f"{path}: holds both parquet and jsonl files; keep one format per folder")
        if parquet:
            return "parquet", parquet
        if jsonl:
            return "json", jsonl
        raise PairsError(f"{path}: folder has no *.parquet or *.jsonl pair files")
    if path.suffix == ".parquet":
        return "parquet", [str(path)]
    if path.suffix in (".jsonl", ".json"):
        return "json", [str(path)]
    raise PairsError(f"{path}: unknown pairs format (expected .parquet, .jsonl or a folder of them)")


def load_pairs(path: str | Path) -> datasets.Dataset:
    """Load pairs from a parquet file, a jsonl file, or a folder of parquet / jsonl shards.

    Columns are cast to `PAIR_FEATURES` when all contract columns are present; otherwise the raw
    columns are returned so `validate_pairs` can name what is missing.
    """
    path = Path(path)
    if not path.exists():
        raise PairsError(f"{path}: no such pairs file or folder")
    builder, files = _data_files(path)
    dataset = datasets.load_dataset(builder, data_files=files, split="train")
    if set(PAIR_COLUMNS) <= set(dataset.column_names):
        try:
            dataset = dataset.select_columns(list(PAIR_COLUMNS)).cast(PAIR_FEATURES)
        except (ValueError, TypeError) as err:  # e.g. a string in an int column
            raise PairsError(f"{path}: columns do not cast to the pair contract: {err}") from err
    return dataset


def read_json_object(path: Path, error: type[ValueError] = PairsError) -> dict[str, Any]:
    """The JSON object in `path` (a manifest, export metadata, a prompt dictionary); `error` naming
    `path` when the file is not valid JSON or holds something else."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class RowLocator:
    """Where a row of a loaded pairs dataset lives: `(file, row, "row")` (0-based) in a parquet file,
    `(file, line, "line")` (1-based, blank lines counted) in a jsonl file. Rows of a folder are
    numbered per shard, not across the folder; a dataset without files keeps `(source, row, "row")`."""

    def __init__(self, source: str, files: Sequence[str] = ()) -> None:
        import pyarrow.parquet as pq

        self.source, self.files = source, list(files)
        self.starts: list[int] = []  # the first dataset row of each file
        self.lines: list[list[int] | None] = []  # jsonl: the line number of each record
        total = 0
        for file in self.files:
            if file.endswith(".jsonl"):
                with open(file) as handle:
                    lines = [number for number, text in enumerate(handle, start=1) if text.strip()]
                self.lines.append(lines)
                count = len(lines)
            else:
                self.lines.append(None)
                count = pq.read_metadata(file).num_rows if file.endswith(".parquet") else 0
            self.starts.append(total)
            total += count

    @classmethod
    def for_path(cls, path: str | Path) -> RowLocator:
        return cls(str(path), _data_files(Path(path))[1])

    def __call__(self, index: int) -> tuple[str, int, Literal["row", "line"]]:
        if not self.files:
            return self.source, index, "row"
        k = bisect.bisect_right(self.starts, index) - 1
        local, lines = index - self.starts[k], self.lines[k]
        return (self.files[k], local, "row") if lines is None else (self.files[k], lines[local], "line")

    def describe(self, index: int, seen_from: int) -> str:
        """`row 3` / `line 4` for a row in the same file as row `seen_from`, else prefixed by its file."""
        file, number, unit = self(index)
        return f"{unit} {number}" if file == self(seen_from)[0] else f"{file} {unit} {number}"

    def problem(self, index: int, field: str | None, message: str) -> PairProblem:
        file, number, unit = self(index)
        return PairProblem(file, number, field, message, unit=unit)


def _schema_problems(dataset: datasets.Dataset, source: str) -> list[PairProblem]:
    problems = []
    for column in PAIR_COLUMNS:
        if column not in dataset.column_names:
            problems.append(PairProblem(source, None, column, "required column is missing"))
            continue
        expected = PAIR_FEATURES[column].dtype
        actual = getattr(dataset.features[column], "dtype", str(dataset.features[column]))
        compatible = actual == expected or (expected == "float64" and actual in ("float32", "int64"))
        if not compatible:
            problems.append(PairProblem(source, None, column, f"dtype {actual}, expected {expected}"))
    return problems


def _row_problems(row: dict, index: int, at: RowLocator) -> list[PairProblem]:
    problems = []
    for column in ("policy", "prompt_id", "prompt"):
        if not isinstance(row[column], str) or not row[column].strip():
            problems.append(at.problem(index, column, f"must be a non-empty string, got {row[column]!r}"))
    n, successes, score, step = row["n"], row["successes"], row["score"], row["step"]
    if step is None or step < 0:
        problems.append(at.problem(index, "step", f"must be >= 0, got {step}"))
    if n is None or n <= 0:
        problems.append(at.problem(index, "n", f"must be >= 1 rollout, got {n}"))
        return problems
    if successes is None or not 0 <= successes <= n:
        problems.append(at.problem(index, "successes", f"must lie in [0, n={n}], got {successes}"))
        return problems
    if score is None or not math.isfinite(score) or not -1.0 <= score <= 1.0:
        problems.append(at.problem(index, "score", f"must be a finite mean reward in [-1, 1], got {score}"))
    elif abs(score - (2 * successes / n - 1)) > SCORE_TOLERANCE:
        problems.append(
            at.problem(
                index,
                "score",
                f"{score} disagrees with successes/n = {successes}/{n} (expected {2 * successes / n - 1:.6f})",
            )
        )
    return problems


def validate_pairs(
    dataset: datasets.Dataset, source: str, locate: RowLocator | None = None
) -> list[PairProblem]:
    """Every contract problem of `dataset` (errors and warnings), each naming source, row and field.
    With `locate` (`RowLocator.for_path(path)` for a dataset from `load_pairs(path)`), a row problem
    names the shard file and its row (parquet) or line (jsonl) instead of the dataset-wide row.

    Checks: schema (columns, dtypes), value ranges, `0 <= successes <= n`, score consistency with
    `successes / n`, duplicate `(policy, step, prompt_id)` rows, one prompt id with two texts, and
    (warning) single-class context pools.
    """
    problems = _schema_problems(dataset, source)
    if problems:
        return problems  # row checks need every column with its contract dtype
    at = locate or RowLocator(source)
    first_row: dict[tuple[str, int, str], int] = {}
    text_of: dict[str, tuple[str, int]] = {}
    classes: dict[tuple[str, int], Counter] = defaultdict(Counter)
    for index, row in enumerate(dataset.select_columns(list(PAIR_COLUMNS))):
        row_problems = _row_problems(row, index, at)
        problems.extend(row_problems)
        if row_problems:
            continue
        key = (row["policy"], row["step"], row["prompt_id"])
        if key in first_row:
            problems.append(
                at.problem(
                    index,
                    "prompt_id",
                    f"duplicate of {at.describe(first_row[key], index)} for pool {key[:2]}",
                )
            )
        else:
            first_row[key] = index
        seen = text_of.setdefault(row["prompt_id"], (row["prompt"], index))
        if seen[0] != row["prompt"]:
            problems.append(
                at.problem(
                    index,
                    "prompt",
                    f"prompt id {row['prompt_id']!r} has another text in {at.describe(seen[1], index)}",
                )
            )
        label = success_rate(row["successes"], row["n"]) >= SUCCESS_THRESHOLD
        classes[(row["policy"], row["step"])][label] += 1
    for (policy, step), counts in classes.items():
        if len(counts) == 1:
            only = "successes" if True in counts else "failures"
            problems.append(
                PairProblem(
                    source,
                    None,
                    None,
                    f"context pool {pool_key(policy, step)} has only {only} ({sum(counts.values())} pairs); "
                    "V0 skips it as an episode key",
                    severity="warning",
                )
            )
    return problems


def load_and_validate(path: str | Path) -> tuple[datasets.Dataset, list[PairProblem]]:
    """`load_pairs(path)` and its contract problems, each row problem located in its shard or line."""
    dataset = load_pairs(path)
    return dataset, validate_pairs(dataset, str(path), RowLocator.for_path(path))


def load_valid_pairs(path: str | Path) -> datasets.Dataset:
    """`load_and_validate`; raises `PairsError` listing the errors (warnings pass)."""
    dataset, problems = load_and_validate(path)
    raise_on_errors(problems, str(path))
    return dataset


def raise_on_errors(problems: Sequence[PairProblem], source: str, limit: int = 20) -> None:
    """Raise `PairsError` with the first `limit` errors, if any."""
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        shown = "\n  ".join(str(p) for p in errors[:limit])
        more = f"\n  ... and {len(errors) - limit} more" if len(errors) > limit else ""
        raise PairsError(f"{source}: {len(errors)} pair contract error(s):\n  {shown}{more}")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the problems of each pairs path; exit status 1 if any has errors."""
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m data_pipelines.pairs PATH [PATH ...]", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        problems = load_and_validate(path)[1]
        for problem in problems:
            print(problem)
        if any(p.severity == "error" for p in problems):
            status = 1
        print(
            f"{path}: {sum(p.severity == 'error' for p in problems)} error(s), "
            f"{sum(p.severity == 'warning' for p in problems)} warning(s)"
        )
    return status


if __name__ == "__main__":
    raise SystemExit(main())
