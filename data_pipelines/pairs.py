"""The query-performance pair contract (design.md §2): columns, loading and validation.

A pair says how one policy checkpoint did on one prompt: `policy: str`, `step: int`,
`prompt_id: str`, `prompt: str`, `n: int` rollouts, `successes: int`, `score: float` = mean reward
on the ±1 scale. Success rate `y = successes / n = (score + 1) / 2`. A *context pool* is all pairs
of one `(policy, step)` key. Pairs live in Hugging Face `datasets` form, stored as parquet shards
(a file or a folder of them) or jsonl.

A folder that `harvest` or `import-v0` writes (a *pairs output*: it has `manifest.json`, `data/` or
`progress/`) is read only through its manifest, which the writer puts there last: exactly the files it
lists, each checked against its sha256 and row count. Shards without a manifest are an unfinished (or
killed) run and are never read as pairs. Writers build unfinished work under hidden (`.`) names, which
readers skip.

`load_pairs` checks each file's raw types before any cast (a jsonl `"step": "64"` is an error, not the
integer 64) and raises one `PairsError` naming the file, row (jsonl: line) and field of the first bad
value. `validate_pairs` never raises: it returns every contract problem it finds with its row and field,
so a harvest can be repaired in one pass; `load_valid_pairs` loads, validates and raises one `PairsError`
listing them. Single-class context pools are warnings, not errors: V0 skips them when sampling episodes
(design.md §3), but the data itself is legal.

Run: `harvest validate PATH` prints the problems of a pairs file or folder.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow as pa

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
MANIFEST = "manifest.json"
PROGRESS = "progress"
"""`harvest run` creates `progress/` before its first shard: with it and without a finished manifest, a
folder is an unfinished run."""
LEGACY_IMPORT_KEYS = {"source", "rows"}
"""The whole manifest of an `import-v0` output written before manifests listed their files."""
_STRING_COLUMNS = ("policy", "prompt_id", "prompt")


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


def shown_value(value: Any) -> str:
    """`value` as an error message shows it: `nan`, `inf`, `'x'`, and a null as what it may stand for."""
    return "null (a missing value; pandas writes NaN as null)" if value is None else repr(value)


def success_rate(successes: int, n: int) -> float:
    """Fraction of successful rollouts, `successes / n`."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return successes / n


def pool_key(policy: str, step: int) -> str:
    """Display name of a context pool, e.g. `"Qwen3-4B-Instruct@step64"` (not an MLflow metric name)."""
    return f"{policy}@step{step}"


# --------------------------------------------------------------------------------------------------
# Pairs output folders: the manifest, its checksums, staging


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard as a manifest lists it (path relative to the output folder)."""

    path: str
    rows: int
    sha256: str
    seed: int | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_shard_file(path: Path, sha256: str, rows: int) -> str | None:
    """Why the shard at `path` cannot be trusted (missing, checksum, unreadable, row count), or None."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return "file is missing"
    actual = sha256_file(path)
    if actual != sha256:
        return f"sha256 {actual[:12]}... does not match the recorded {sha256[:12]}..."
    try:
        found = pq.read_metadata(path).num_rows
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError on a damaged footer
        return f"not a readable parquet file ({err})"
    if found != rows:
        return f"holds {found} rows, the record says {rows}"
    return None


class _JsonObjectError(ValueError):
    """A JSON object `json` parses but that is not data: a repeated key or text no UTF-8 file can hold."""


def _json_object(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads`' `object_pairs_hook`: the object, refusing what `json` passes silently: a repeated key
    (its last value would win) and a string with a lone surrogate escape (`"\\ud800"`; Arrow cannot
    store it)."""
    record: dict[str, Any] = {}
    for key, value in items:
        if key in record:
            raise _JsonObjectError(f"field {key!r}: appears twice in one object")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise _JsonObjectError(f"field {key!r}: not Unicode text ({err.reason}: {value!r})") from err
        record[key] = value
    return record


def read_json_object(path: Path, error: type[ValueError] = PairsError) -> dict[str, Any]:
    """The JSON object in `path` (a manifest, export metadata, a prompt dictionary); `error` naming
    `path` when the file is not valid JSON or holds something else."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_json_object)
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err})") from err
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from err
    except _JsonObjectError as err:
        raise error(f"{path}: {err}") from err
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def manifest_shards(
    manifest: dict[str, Any], path: Path, error: type[ValueError] = PairsError
) -> list[ShardRecord]:
    """The shards a manifest lists; `error` naming `path` and the entry when one is malformed, lies
    outside the manifest's folder (an absolute path or `..`) or repeats an earlier one."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise error(
            f"{path}: 'shards' must be a list of the output's files, got {type(shards).__name__} (a manifest "
            "without one cannot vouch for any file; write the output again into a new folder)"
        )
    records = []
    for index, entry in enumerate(shards):
        valid = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("rows"), int)
            and isinstance(entry.get("sha256"), str)
        )
        if not valid:
            raise error(
                f"{path}: shards[{index}] needs a string 'path', an int 'rows' and a string 'sha256', "
                f"got {str(entry)[:200]}"
            )
        relative = Path(entry["path"])
        if relative.is_absolute() or ".." in relative.parts:
            raise error(
                f"{path}: shards[{index}] path {entry['path']!r} must lie inside the manifest's folder"
            )
        if any(record.path == entry["path"] for record in records):
            raise error(f"{path}: shards[{index}] lists {entry['path']!r} again")
        records.append(ShardRecord(entry["path"], entry["rows"], entry["sha256"], entry.get("seed")))
    return records


def is_pairs_output(folder: Path) -> bool:
    """Whether `folder` is (or was begun as) a `harvest` / `import-v0` output, read only via its manifest:
    it has `progress/` (a harvest run, finished or not) or a manifest our writers wrote (one with a
    `kind` or `shards`, or a legacy import's). Any other folder, e.g. a Hugging Face dataset's `data/`
    layout or another tool's `manifest.json`, is read file by file."""
    if (folder / PROGRESS).is_dir():
        return True
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return True  # damaged: `manifest_files` says so
    return isinstance(data, dict) and ("kind" in data or "shards" in data or set(data) == LEGACY_IMPORT_KEYS)


def is_legacy_import(manifest: dict[str, Any]) -> bool:
    """An `import-v0` manifest from before imports listed their files (written last, so complete)."""
    return set(manifest) == LEGACY_IMPORT_KEYS


def manifest_files(
    folder: str | Path, error: type[ValueError] = PairsError, within: Path | None = None
) -> list[Path]:
    """The files a finished pairs output lists in its manifest, in order, each checked against the
    sha256 and row count recorded there; with `within` (a path under `folder`), only those under it.

    Raises:
        `error`: when `folder` has no manifest (an unfinished run: shards may be missing or half a pool),
            the manifest is damaged or lists nothing, or a listed file changed since it was written.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise error(f"{folder}: no {MANIFEST}: an unfinished harvest, rerun the same command to resume")
    manifest = read_json_object(manifest_path, error)
    if is_legacy_import(manifest):  # its files are the parquet shards under it, as it was read then
        return sorted(  # hidden names below `folder` only: the folder's own path may hold `..` or `.x`
            p
            for p in (within or folder).rglob("*.parquet")
            if not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
    shards = manifest_shards(manifest, manifest_path, error)
    if not shards:
        raise error(f"{manifest_path}: lists no shards")
    if within is not None:
        shards = [shard for shard in shards if (folder / shard.path).is_relative_to(within)]
    for shard in shards:
        problem = check_shard_file(folder / shard.path, shard.sha256, shard.rows)
        if problem is not None:
            raise error(f"{folder / shard.path}: corrupted shard of {manifest_path}: {problem}")
    return [folder / shard.path for shard in shards]


def _folder_files(folder: Path) -> list[Path]:
    """Pair files in `folder` and below, a pairs output by its manifest; hidden names are skipped."""
    if is_pairs_output(folder):
        return manifest_files(folder)
    files: list[Path] = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):  # a writer's unfinished work (staging folders, temporary files)
            continue
        if child.is_dir():
            if child.is_symlink() and folder.resolve().is_relative_to(child.resolve()):
                raise PairsError(f"{child}: a symbolic link to {child.resolve()}, which holds it (a loop)")
            files += _folder_files(child)
        elif child.suffix in (".parquet", ".jsonl"):
            files.append(child)
    return files


def _enclosing_output(path: Path) -> Path | None:
    """The pairs output that resolved `path` lies inside (not `path` itself), or None: an ancestor up to
    the writers' depth (`data/<policy>/step_<n>/shard-*.parquet`) that is a pairs output, with `path`
    in its layout: under `data/` (harvest) or `context/` / `train/` (import), and, for a harvest not
    yet finished, with shards of its own naming (`data/<policy>/step_*/shard-*.parquet`). A folder of
    one's own that merely sits beside a `progress/` folder or another tool's manifest is read file by
    file."""
    for folder in path.parents[:4]:
        top = path.relative_to(folder).parts[0]
        if top not in ("data", "context", "train") or not is_pairs_output(folder):
            continue
        if (folder / MANIFEST).is_file():
            if _lists_files_under(folder / MANIFEST, top):
                return folder
        elif next(folder.glob("data/*/step_*/shard-*.parquet"), None) is not None:
            return folder
    return None


def _lists_files_under(manifest_path: Path, top: str) -> bool:
    """Whether our manifest at `manifest_path` lists files under its folder's `top` (a damaged one: True,
    so that reading it names the damage)."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return True
    if is_legacy_import(manifest):  # lists no files: every parquet shard under it is one
        return True
    shards = manifest.get("shards")
    return isinstance(shards, list) and any(
        isinstance(entry, dict) and str(entry.get("path", "")).split("/")[0] == top for entry in shards
    )


def pair_files(path: str | Path) -> list[Path]:
    """The files a pairs path stands for: a `.parquet` / `.jsonl` (JSON lines, also as `.json`) file;
    a pairs output folder's manifest-listed files; or the pair files of any other folder and its
    sub-folders (pairs outputs among them by their manifests). A file or folder inside a pairs output
    (`out/data/<policy>`, `out/context`) stands for the files under it that the output's manifest lists.

    Raises:
        PairsError: no such path, an unknown format, an unfinished or damaged pairs output (also when
            `path` lies inside one), a folder without pair files or with both parquet and jsonl files.
    """
    path = Path(path)
    if not path.exists():
        raise PairsError(f"{path}: no such pairs file or folder")
    output = _enclosing_output(path.resolve())
    if output is not None:  # shards of an unfinished run, or unlisted, are never pairs
        files = manifest_files(output, within=path.resolve())
        if not files:
            raise PairsError(
                f"{path}: lies inside the pairs output {output}, whose {MANIFEST} lists no file here"
            )
        return files
    if not path.is_dir():
        if path.suffix not in (".parquet", ".jsonl", ".json"):
            raise PairsError(f"{path}: unknown pairs format (expected .parquet, .jsonl or a folder of them)")
        return [path]
    files = _folder_files(path)
    if not files:
        raise PairsError(f"{path}: folder has no *.parquet or *.jsonl pair files")
    if len({file.suffix == ".parquet" for file in files}) > 1:
        raise PairsError(f"{path}: holds both parquet and jsonl files; keep one format per folder")
    return files


@contextmanager
def staging_folder(out: Path, writer: str) -> Iterator[Path]:
    """A new, empty hidden sibling of `out`, `.{out.name}.{writer}-staging`, to build a pairs output in;
    the writer moves it to `out` (one `os.replace`) only once the output is complete.

    Readers skip hidden names, so a half-built output is never read as pairs, and a killed writer leaves
    `out` as it was. What a killed run of the same writer left (`.{out.name}.{writer}-*`) is removed
    first, so rerunning the same command just works; this assumes one writer per output folder at a time.
    The folder is removed on leaving (after a successful move it no longer exists).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.{writer}-"
    for stale in out.parent.iterdir():
        if stale.name.startswith(prefix) and stale.is_dir():
            shutil.rmtree(stale)
    staging = out.parent / f"{prefix}staging"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Loading: raw types are checked per file, before any cast


def _value_problem(column: str, value: Any) -> str | None:
    """Why a parsed JSON `value` cannot be `column` of a pair, or None. Null passes: the row checks of
    `validate_pairs` name it with the value rule it breaks."""
    if value is None:
        return None
    if column in _STRING_COLUMNS:
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if column == "score":
        number = isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON true is a Python int
        if number and isinstance(value, int) and abs(value) > 2**53:  # beyond what float64 holds exactly
            return f"must be a mean reward in [-1, 1], got {value}"
        return None if number else f"must be a number, got {value!r}"
    integer = isinstance(value, int) and not isinstance(value, bool)
    if integer and not -(2**63) <= value < 2**63:
        return f"must fit in int64, got {value}"
    return None if integer else f"must be an integer, got {value!r}"


def _type_fits(column: str, arrow_type: pa.DataType) -> bool:
    """Whether a parquet column of `arrow_type` holds `column` values without reinterpretation."""
    if pa.types.is_dictionary(arrow_type):  # e.g. a pandas categorical: judged by the values it holds
        arrow_type = arrow_type.value_type
    if column in _STRING_COLUMNS:
        fits = pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    elif column == "score":
        fits = pa.types.is_floating(arrow_type) or pa.types.is_integer(arrow_type)
    else:
        fits = pa.types.is_integer(arrow_type)
    return bool(fits or pa.types.is_null(arrow_type))  # an all-null column: the row checks name each row


def _check_parquet(file: Path) -> None:
    """Raise `PairsError` naming `file` when it is unreadable, has no rows, lacks a contract column or
    stores one with another type (naming the first non-null row of that column)."""
    import pyarrow.parquet as pq

    try:
        schema, rows = pq.read_schema(file), pq.read_metadata(file).num_rows
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError on damaged files
        raise PairsError(f"{file}: not a readable parquet file ({err})") from err
    if rows == 0:
        raise PairsError(f"{file}: no rows")
    missing = [column for column in PAIR_COLUMNS if column not in schema.names]
    if missing:
        raise PairsError(
            f"{file}: missing column(s) {missing} of the pair contract (columns: {schema.names})"
        )
    for column in PAIR_COLUMNS:
        arrow_type = schema.field(column).type
        if not _type_fits(column, arrow_type):
            values = pq.read_table(file, columns=[column]).column(column).to_pylist()
            row = next((i for i, value in enumerate(values) if value is not None), 0)
            if pa.types.is_floating(arrow_type):  # pandas stores integers beside a null or NaN as floats
                row = next((i for i, v in enumerate(values) if v is None or not float(v).is_integer()), row)
            raise PairsError(
                f"{file} row {row} field {column!r}: column type {arrow_type}, expected "
                f"{PAIR_FEATURES[column].dtype} (value {shown_value(values[row])})"
            )
        # What the cast to the contract cannot hold: uint64 above int64, an integer score beyond 2**53.
        if pa.types.is_uint64(arrow_type) or (column == "score" and pa.types.is_integer(arrow_type)):
            limit = 2**53 if column == "score" else 2**63 - 1
            values = pq.read_table(file, columns=[column]).column(column).to_pylist()
            row = next(
                (i for i, value in enumerate(values) if value is not None and abs(value) > limit), None
            )
            if row is not None:
                raise PairsError(
                    f"{file} row {row} field {column!r}: value {values[row]} does not fit "
                    f"{PAIR_FEATURES[column].dtype}"
                )


def json_lines(file: Path) -> Iterator[tuple[str, Any]]:
    """`(where, value)` for every non-blank line of a JSON-lines file, `where` naming the file and line.

    Raises:
        PairsError: naming the file and line that is not UTF-8 or not valid JSON, or (and the field) holds
            one object with a key twice or a string with a lone surrogate escape.
    """
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:  # numbered as `open` numbers lines (`\r\n`, `\r` or `\n` ends one)
        before = data[: err.start].decode("utf-8")
        line = before.replace("\r\n", "\n").replace("\r", "\n").count("\n") + 1
        raise PairsError(f"{file} line {line}: not UTF-8 text ({err})") from err
    for number, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        where = f"{file} line {number}"
        try:
            yield where, json.loads(line, object_pairs_hook=_json_object)
        except json.JSONDecodeError as err:
            raise PairsError(f"{where}: not valid JSON ({err})") from err
        except _JsonObjectError as err:
            raise PairsError(f"{where} {err}") from err


def _read_jsonl(file: Path) -> list[dict[str, Any]]:
    """The contract fields of every record of a JSON-lines pairs file, each value's type checked as
    parsed. Arrow's type inference would turn `"step": "64"` into 64 and lose where a bad value was."""
    rows = []
    for where, record in json_lines(file):
        if not isinstance(record, dict):
            raise PairsError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [column for column in PAIR_COLUMNS if column not in record]
        if missing:
            raise PairsError(f"{where}: missing field(s) {missing} of the pair contract")
        for column in PAIR_COLUMNS:
            problem = _value_problem(column, record[column])
            if problem is not None:
                raise PairsError(f"{where} field {column!r}: {problem}")
        rows.append({column: record[column] for column in PAIR_COLUMNS})
    if not rows:
        raise PairsError(f"{file}: no rows")
    return rows


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Without `datasets`' progress bars and info logs ("Generating train split"), which would land in
    the middle of a report; the caller's settings are restored after."""
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _load_files(path: Path, files: Sequence[Path]) -> datasets.Dataset:
    if files[0].suffix == ".parquet":
        for file in files:
            _check_parquet(file)
        data_files = [str(file) for file in files]
        try:  # types are checked, so casting to the contract only widens (int32 -> int64, float32 -> float64)
            with _quiet_datasets():
                return datasets.load_dataset(
                    "parquet",
                    data_files=data_files,
                    columns=list(PAIR_COLUMNS),
                    features=PAIR_FEATURES,
                    split="train",
                )
        except Exception as err:  # datasets wraps reader errors in DatasetGenerationError and others
            raise PairsError(f"{path}: cannot be loaded as parquet pairs ({err})") from err
    rows = [row for file in files for row in _read_jsonl(file)]
    try:
        return datasets.Dataset.from_list(rows, features=PAIR_FEATURES)
    except (pa.ArrowException, OverflowError) as err:  # e.g. an integer beyond int64
        raise PairsError(f"{path}: values do not fit the pair contract's dtypes ({err})") from err


def load_pairs(path: str | Path) -> datasets.Dataset:
    """Load pairs with the contract's columns and dtypes (`PAIR_FEATURES`) from a parquet or jsonl file,
    a folder of them, or a pairs output folder (the files its manifest lists; see `pair_files`).

    Raises:
        PairsError: naming the file (and row or jsonl line, and field) of the first thing that keeps it
            from being pairs: an unreadable or empty file, a missing column, a value of another type.
            Value rules (ranges, duplicates) are `validate_pairs`'s.
    """
    path = Path(path)
    return _load_files(path, pair_files(path))


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
            if not file.endswith(".parquet"):  # JSON lines
                with open(file, encoding="utf-8") as handle:
                    lines = [number for number, text in enumerate(handle, start=1) if text.strip()]
                self.lines.append(lines)
                count = len(lines)
            else:
                self.lines.append(None)
                count = pq.read_metadata(file).num_rows
            self.starts.append(total)
            total += count

    @classmethod
    def for_path(cls, path: str | Path) -> RowLocator:
        return cls(str(path), [str(file) for file in pair_files(path)])

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
            problems.append(
                at.problem(index, column, f"must be a non-empty string, got {shown_value(row[column])}")
            )
    n, successes, score, step = row["n"], row["successes"], row["score"], row["step"]
    if step is None or step < 0:
        problems.append(at.problem(index, "step", f"must be >= 0, got {shown_value(step)}"))
    if n is None or n <= 0:
        problems.append(at.problem(index, "n", f"must be >= 1 rollout, got {shown_value(n)}"))
        return problems
    if successes is None or not 0 <= successes <= n:
        problems.append(
            at.problem(index, "successes", f"must lie in [0, n={n}], got {shown_value(successes)}")
        )
        return problems
    if score is None or not math.isfinite(score) or not -1.0 <= score <= 1.0:
        problems.append(
            at.problem(index, "score", f"must be a finite mean reward in [-1, 1], got {shown_value(score)}")
        )
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
    files = pair_files(path)  # once: for a pairs output this verifies every checksum
    dataset = _load_files(Path(path), files)
    return dataset, validate_pairs(dataset, str(path), RowLocator(str(path), [str(file) for file in files]))


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
