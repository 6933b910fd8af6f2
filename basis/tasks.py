"""Prompt datasets: the prompt-row contract, dataset loaders, the offline arithmetic task, prompt rendering.

Prompt-row contract (design.md §2, verl-compatible parquet): `prompt_id: str`, `prompt: str` (or a chat
list of `{"role", "content"}` messages), `answer: str` (ground truth), `data_source: str`,
`difficulty: int | None`. Loaders return a `datasets.Dataset` with exactly these columns (the arithmetic
task adds `solution`, its worked solution for the supervised warm start).

Loaders (`load_prompts`):
- Hub presets, by name or hub id: DAPO-Math-17k (`BytedTsinghua-SIA/DAPO-Math-17k`, chat prompt,
  answer `reward_model.ground_truth`, one row per distinct prompt: the hub copy repeats each ~100
  times), GSM8K (`openai/gsm8k`, config `main`, answer after `####`),
  MATH (`DigitalLearningGmbH/MATH-lighteval`, answer = last `\\boxed{}` of the solution, difficulty from
  `level`). The hub name of each preset is a field of `PromptPreset`; pass your own preset to change it.
- Any local parquet/jsonl file (or a folder of `{split}.parquet|jsonl` files) with a `column_map` from
  contract field to source column for the fields whose column is named otherwise (dotted paths reach
  into structs: `reward_model.ground_truth`), or with `preset=` to read a local copy of a preset's schema.

Bad rows raise `ValueError` naming the file, the row and the field.

The arithmetic task (`generate_arithmetic`, `write_arithmetic_task`) is generated deterministically from
a seed: integer expressions over `+ - *` with graded difficulty (operand count, digit count,
operators, parentheses). Every intermediate value stays in `[0, max_value]` so the worked solution never
needs a minus sign. The worked solution applies one operation per step in evaluation order and marks the
final answer: `45*2+23` -> `45*2=90 90+23=113 #### 113`. Our deviation from a one-shot answer task: a
direct answer gives RL little to reinforce (issue 3), steps let rollouts differ and step reliability be
reinforced.

Run: `python -m basis.tasks OUT_DIR SEED [--n_train 8000 ...]` writes the arithmetic task's three splits.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from basis.rewards import last_boxed

PROMPT_COLUMNS: tuple[str, ...] = ("prompt_id", "prompt", "answer", "data_source", "difficulty")
REQUIRED_COLUMNS: tuple[str, ...] = ("prompt", "answer")
ARITHMETIC_SOURCE = "arithmetic"
SPLITS: tuple[str, ...] = ("train", "validation", "test")
FINAL_ANSWER_MARKER = "####"

ChatPrompt = list[dict[str, str]]


# --------------------------------------------------------------------------------------------------
# Prompt-row validation


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _check_prompt(prompt: Any, where: str, field: str = "'prompt'") -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}, field {field}: empty prompt")
        return
    if isinstance(prompt, list):
        if not prompt:
            raise ValueError(f"{where}, field {field}: empty chat list")
        for turn, message in enumerate(prompt):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError(
                    f"{where}, field {field}: message {turn} has no string 'role': {_describe(message)}"
                )
            content = message.get("content")
            if not isinstance(content, str) or not content.strip():
                raise ValueError(f"{where}, field {field}: message {turn} has empty or non-string 'content'")
        return
    raise ValueError(f"{where}, field {field}: expected a string or a chat list, got {_describe(prompt)}")


def check_prompt_row(
    row: Mapping[str, Any], index: int, source: str, columns: Mapping[str, str] | None = None
) -> None:
    """Raise ValueError naming `source`, the row (0-based) and the field if `row` breaks the prompt-row
    contract; `columns` (field -> source column) names the user's column beside a renamed field."""

    def field(name: str) -> str:
        column = (columns or {}).get(name, name)
        return repr(name) if column == name else f"{name!r} (column {column!r})"

    where = f"{source}: row {index}"
    _check_prompt(row.get("prompt"), where, field("prompt"))
    answer = row.get("answer")
    if not isinstance(answer, str):
        raise ValueError(f"{where}, field {field('answer')}: expected a string, got {_describe(answer)}")
    if not answer.strip():
        raise ValueError(f"{where}, field {field('answer')}: empty answer")
    for name in ("prompt_id", "data_source"):
        if name in row and not (isinstance(row[name], str) and row[name].strip()):
            raise ValueError(
                f"{where}, field {name!r}: expected a non-empty string, got {_describe(row[name])}"
            )
    difficulty = row.get("difficulty")
    if difficulty is not None and (isinstance(difficulty, bool) or not isinstance(difficulty, int)):
        raise ValueError(f"{where}, field 'difficulty': expected an int or None, got {_describe(difficulty)}")


def validate_prompts(dataset: datasets.Dataset, source: str) -> None:
    """Check a dataset against the prompt-row contract.

    Raises:
        ValueError: naming `source` (file or hub name) and the missing column, or the row and field of
            the first bad row (empty prompt, non-string or empty answer, bad id/source/difficulty) or of
            the first duplicated `prompt_id`.
    """
    for name in REQUIRED_COLUMNS:
        if name not in dataset.column_names:
            raise ValueError(
                f"{source}: missing column {name!r} (columns: {dataset.column_names}); "
                f"map yours with column_map={{{name!r}: '<your column>'}}"
            )
    seen: dict[str, int] = {}
    for index, row in enumerate(dataset):
        check_prompt_row(row, index, source)
        prompt_id = row.get("prompt_id")
        if prompt_id is not None:
            if prompt_id in seen:
                raise ValueError(
                    f"{source}: row {index}, field 'prompt_id': {prompt_id!r} repeats row {seen[prompt_id]}"
                )
            seen[prompt_id] = index


def prompt_text(prompt: str | ChatPrompt) -> str:
    """The plain text of a prompt: the string itself, or the chat messages' contents joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(message["content"] for message in prompt)


def render_prompt(tokenizer: Any, prompt: str | ChatPrompt) -> str:
    """Render a prompt for generation with the tokenizer's chat template (plain text if it has none).

    A string prompt becomes one user message; a chat list is rendered as given. The generation prompt
    is appended, so the text ends where the model's response starts.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return prompt_text(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# --------------------------------------------------------------------------------------------------
# Answer extraction for the hub presets


def gsm8k_final_answer(solution: str) -> str:
    """GSM8K ground truth: the text after the last `####`, thousands separators removed."""
    if FINAL_ANSWER_MARKER not in solution:
        raise ValueError(f"no '{FINAL_ANSWER_MARKER}' final answer in GSM8K solution {solution[-60:]!r}")
    return solution.rsplit(FINAL_ANSWER_MARKER, 1)[1].strip().replace(",", "")


def math_level(level: object) -> int | None:
    """MATH difficulty: `"Level 3"` -> 3; `"Level ?"` (present in the data) -> None."""
    if not isinstance(level, str):
        raise ValueError(f"expected a string like 'Level 3', got {_describe(level)}")
    match = re.fullmatch(r"\s*Level\s+(\d+)\s*", level)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------------
# Presets and loaders


@dataclass(frozen=True)
class PromptPreset:
    """How one dataset's schema maps onto the prompt-row contract.

    Args:
        hub_name: Dataset id on the hub.
        hub_config: Dataset config name (`"main"` for GSM8K), or None.
        data_source: Value of the `data_source` column.
        column_map: Contract field -> source column (dotted path into structs). `prompt` and `answer`
            are required; a missing `prompt_id` becomes `{data_source}/{split}/{row}`.
        answer_from: Turns the mapped answer column into the ground truth (e.g. GSM8K's `####`).
        difficulty_from: Turns the mapped difficulty column into an int or None.
        distinct_prompts: Keep only the first row of each distinct prompt text. DAPO-Math-17k's hub copy
            holds its ~17k prompts each ~100 times (1.79M rows, duplicated by accident per its
            maintainers), each copy with its own id: loaded as is, one prompt would be 100 prompts.
    """

    hub_name: str
    data_source: str
    column_map: Mapping[str, str]
    hub_config: str | None = None
    answer_from: Callable[[str], str] | None = None
    difficulty_from: Callable[[Any], int | None] | None = None
    distinct_prompts: bool = False


PRESETS: dict[str, PromptPreset] = {
    "dapo-math-17k": PromptPreset(
        hub_name="BytedTsinghua-SIA/DAPO-Math-17k",
        data_source="math_dapo",
        column_map={
            "prompt": "prompt",
            "answer": "reward_model.ground_truth",
            "prompt_id": "extra_info.index",
        },
        distinct_prompts=True,
    ),
    "gsm8k": PromptPreset(
        hub_name="openai/gsm8k",
        hub_config="main",
        data_source="gsm8k",
        column_map={"prompt": "question", "answer": "answer"},
        answer_from=gsm8k_final_answer,
    ),
    "math": PromptPreset(
        hub_name="DigitalLearningGmbH/MATH-lighteval",
        data_source="math",
        column_map={"prompt": "problem", "answer": "solution", "difficulty": "level"},
        answer_from=last_boxed,
        difficulty_from=math_level,
    ),
}

_LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def _find_preset(name: str) -> PromptPreset | None:
    if name.lower() in PRESETS:
        return PRESETS[name.lower()]
    for preset in PRESETS.values():
        if preset.hub_name.lower() == name.lower():
            return preset
    return None


def _local_file(path: Path, split: str) -> Path:
    if path.is_file():
        return path
    candidates = [path / f"{split}{suffix}" for suffix in _LOCAL_BUILDERS]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise ValueError(f"{path}: no {split}.parquet or {split}.jsonl in this folder")
    return found[0]


def _has_no_rows(file: Path) -> bool:
    """Whether a local prompt file holds no rows (an empty or blank jsonl, a parquet of 0 rows)."""
    if file.suffix != ".parquet":
        return not file.read_text(errors="replace").strip()
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(file).num_rows == 0
    except Exception:  # not a parquet file at all: the caller reports the read error
        return False


def _holds_json(feature: Any) -> bool:
    """Whether a column's feature has a `datasets.Json` part: `datasets` found values of several types there."""
    if isinstance(feature, datasets.Json):
        return True
    if isinstance(feature, Mapping):
        return any(_holds_json(part) for part in feature.values())
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return _holds_json(feature.feature)
    return False


def _json_encoded(value: Any, feature: Any) -> Any:
    """`value` with every part under a `datasets.Json` feature as its JSON text, which `datasets` stores as is."""
    if isinstance(feature, datasets.Json):
        return json.dumps(value)
    if isinstance(feature, Mapping) and isinstance(value, Mapping):
        return {key: _json_encoded(value.get(key), part) for key, part in feature.items()}
    if isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(value, list):
        return [_json_encoded(item, feature.feature) for item in value]
    return value


def _reread_mixed_columns(raw: datasets.Dataset, file: Path) -> datasets.Dataset:
    """`raw` with its columns of mixed value types read again from the JSON `file`, each value as written.

    `datasets` reads such a column as JSON and stores each string of it that parses as JSON as that JSON
    value, so the string `"2"` next to the number `4` comes back as the number 2 and a row check would blame
    the row holding the string. Only a file with such a column is read a second time.
    """
    mixed = {name: feature for name, feature in raw.features.items() if _holds_json(feature)}
    if not mixed:
        return raw
    text = file.read_text(encoding="utf-8-sig")  # as `datasets` reads it: a byte-order mark is allowed
    try:
        if text.lstrip().startswith("["):  # a .json file holding one array of rows
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: could not be read as json: {err}") from err
    columns = {
        name: [_json_encoded(row.get(name), feature) for row in records] for name, feature in mixed.items()
    }
    reread = datasets.Dataset.from_dict(columns, features=datasets.Features(mixed))
    kept = raw.remove_columns(list(mixed))
    return datasets.concatenate_datasets([kept, reread], axis=1).select_columns(raw.column_names)


def _load_raw(
    path_or_hub_name: str,
    split: str,
    preset: PromptPreset | None,
    column_map: Mapping[str, str | None] | None,
) -> tuple[datasets.Dataset, str]:
    path = Path(path_or_hub_name)
    if path.exists():
        file = _local_file(path, split)
        builder = _LOCAL_BUILDERS.get(file.suffix)
        if builder is None:
            raise ValueError(f"{file}: unsupported file type {file.suffix!r}; use .parquet or .jsonl")
        try:
            raw = datasets.load_dataset(builder, data_files=str(file), split="train", keep_in_memory=True)
        except Exception as error:  # datasets wraps Arrow parse errors in its own types
            if _has_no_rows(file):  # datasets' own message names neither the file nor the cause
                raise ValueError(f"{file}: no rows (empty {builder} file)") from None
            raise ValueError(f"{file}: could not be read as {builder}: {error}") from error
        if builder == "json":
            raw = _reread_mixed_columns(raw, file)
        return raw, str(file)
    if preset is not None:
        raw = datasets.load_dataset(preset.hub_name, preset.hub_config, split=split)
        return raw, f"{preset.hub_name}[{split}]"
    if column_map is None:
        # a relative path is looked up from the working directory, which differs between a notebook and a shell
        where = "" if Path(path_or_hub_name).is_absolute() else f" (relative to {Path.cwd()})"
        raise ValueError(
            f"{path_or_hub_name!r} is neither an existing file/folder{where} nor a known preset "
            f"({sorted(PRESETS)}); pass preset= or column_map= to load another hub dataset"
        )
    return datasets.load_dataset(path_or_hub_name, split=split), f"{path_or_hub_name}[{split}]"


def _column_error(where: str, field: str, column: str, message: object) -> ValueError:
    return ValueError(f"{where}, field {field!r} (column {column!r}): {message}")


def _get_path(row: Mapping[str, Any], dotted: str, where: str, field: str) -> Any:
    """The value at the dotted column path; a null (or non-struct) parent on the way is a row error."""
    value: Any = row
    keys = dotted.split(".")
    for depth, key in enumerate(keys):
        if not isinstance(value, Mapping):
            found = "null" if value is None else _describe(value)
            raise _column_error(where, field, dotted, f"{'.'.join(keys[:depth])!r} is {found}, not a struct")
        value = value[key]
    return value


def _converted(convert: Callable[[Any], Any], value: Any, where: str, field: str, column: str) -> Any:
    """`convert(value)`, its ValueError turned into a row error naming file, row, field and column."""
    try:
        return convert(value)
    except ValueError as error:
        raise _column_error(where, field, column, error) from None


def _has_path(features: Mapping[str, Any], dotted: str) -> bool:
    node: Any = features
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def _convert_row(
    raw_row: Mapping[str, Any],
    index: int,
    source: str,
    column_map: Mapping[str, str],
    preset: PromptPreset | None,
    data_source: str,
    split: str,
) -> dict[str, Any]:
    where = f"{source}: row {index}"
    row = {name: _get_path(raw_row, column, where, name) for name, column in column_map.items()}
    check_prompt_row({"prompt": row["prompt"], "answer": row["answer"]}, index, source, column_map)
    if preset is not None and preset.answer_from is not None:
        row["answer"] = _converted(preset.answer_from, row["answer"], where, "answer", column_map["answer"])
    difficulty = row.get("difficulty")
    if preset is not None and preset.difficulty_from is not None and difficulty is not None:
        difficulty = _converted(
            preset.difficulty_from, difficulty, where, "difficulty", column_map["difficulty"]
        )
    prompt = row["prompt"]
    if isinstance(prompt, list):  # keep only role/content of chat messages
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    prompt_id = row.get("prompt_id")
    converted = {
        "prompt_id": f"{data_source}/{split}/{index}" if prompt_id is None else str(prompt_id),
        "prompt": prompt,
        "answer": row["answer"],
        "data_source": row.get("data_source") or data_source,
        "difficulty": difficulty,
    }
    check_prompt_row(converted, index, source)
    return converted


def _first_of_each_prompt(raw: datasets.Dataset, column: str) -> datasets.Dataset:
    """`raw` with only the first row of each distinct prompt text (`column` is a top-level column)."""
    seen: set[str] = set()
    keep = []
    for index, prompt in enumerate(raw[column]):
        key = json.dumps(prompt, sort_keys=True, default=str)  # any value: bad rows are reported later
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return raw if len(keep) == len(raw) else raw.select(keep)


def load_prompts(
    path_or_hub_name: str,
    *,
    split: str = "train",
    column_map: Mapping[str, str | None] | None = None,
    preset: str | PromptPreset | None = None,
    data_source: str | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """Load prompts into the prompt-row contract.

    Args:
        path_or_hub_name: A local `.parquet` / `.jsonl` file, a folder with `{split}.parquet|jsonl`, a
            preset name (`dapo-math-17k`, `gsm8k`, `math`), a preset's hub id, or any hub dataset id
            together with `column_map`.
        split: Split to load (hub split name, or the file stem inside a folder).
        column_map: Contract field -> source column (dotted for struct fields), for the fields whose
            column differs: every field it does not name keeps the preset's column, else its own name
            (`{"prompt": "question"}` reads `question` as the prompt and `answer` as the answer); `None`
            leaves an optional field unread (`{"difficulty": None}` with a preset whose column differs).
        preset: A preset name or `PromptPreset` whose schema the source has (needed for a local copy of
            a hub dataset; inferred from `path_or_hub_name` when it names one).
        data_source: `data_source` value when the source has none; default the preset's, else the
            file stem.
        limit: Keep only the first `limit` rows (of distinct prompts, for a preset that keeps those).

    Returns:
        A `datasets.Dataset` with columns `PROMPT_COLUMNS`, validated.

    Raises:
        ValueError: naming the file (or hub name), row and field of bad input.
    """
    if isinstance(preset, str) and preset.lower() not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    resolved = PRESETS[preset.lower()] if isinstance(preset, str) else preset
    if resolved is None and not Path(path_or_hub_name).exists():
        resolved = _find_preset(path_or_hub_name)
    raw, source = _load_raw(path_or_hub_name, split, resolved, column_map)
    # Identity on the contract: required fields always (so a missing one is reported), optional ones
    # when present. A given map renames only the fields it names: the others keep their columns.
    identity = {c: c for c in PROMPT_COLUMNS if c in REQUIRED_COLUMNS or c in raw.column_names}
    merged = {**(resolved.column_map if resolved else identity), **(column_map or {})}
    column_map = {name: column for name, column in merged.items() if column is not None}  # None: not read
    for name in REQUIRED_COLUMNS:
        if name not in column_map:
            raise ValueError(
                f"{source}: column_map has no entry for required field {name!r}: {dict(column_map)}"
            )
    for name, column in column_map.items():
        if name not in PROMPT_COLUMNS:
            raise ValueError(f"{source}: column_map key {name!r} is not a contract field {PROMPT_COLUMNS}")
        if not _has_path(raw.features, column):
            raise ValueError(
                f"{source}: missing column {column!r} for field {name!r} (columns: {raw.column_names}); "
                f"map yours with column_map={{{name!r}: '<your column>'}} (data.column_map in a policy "
                "config, prompt_column_map in a harvest)"
            )
    if resolved is not None and resolved.distinct_prompts and column_map["prompt"] in raw.column_names:
        raw = _first_of_each_prompt(raw, column_map["prompt"])
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    if data_source is None:
        data_source = resolved.data_source if resolved else Path(source).stem
    rows = [
        _convert_row(raw_row, index, source, column_map, resolved, data_source, split)
        for index, raw_row in enumerate(raw)
    ]
    kinds = [isinstance(row["prompt"], str) for row in rows]  # one Arrow column holds one kind
    if not all(kind == kinds[0] for kind in kinds):
        index = kinds.index(not kinds[0])
        names = {True: "a string", False: "a chat list"}
        raise ValueError(
            f"{source}: row {index}, field 'prompt': {names[kinds[index]]} where row 0 has "
            f"{names[kinds[0]]}; one source holds prompts of one kind"
        )
    dataset = (
        datasets.Dataset.from_list(rows)
        if rows
        else datasets.Dataset.from_dict({c: [] for c in PROMPT_COLUMNS})
    )
    validate_prompts(dataset, source)
    return dataset


# --------------------------------------------------------------------------------------------------
# The arithmetic task


@dataclass(frozen=True)
class ArithmeticLevel:
    """One difficulty level of the arithmetic task.

    Args:
        num_operands: Operands per expression (>= 2); one worked step per operator.
        max_digits: Operands have 1..max_digits digits (uniform over digit count, then value).
        operators: Operators drawn from, a subset of `+-*`.
        parentheses: Random tree shapes; every expression of the level has at least one pair of
            parentheses (e.g. `(17-9)*(4+6)`). Otherwise flat expressions under operator precedence.
        min_multiplications: Require at least this many `*` operators.
        max_value: Bound on every intermediate and final value (all values stay in [0, max_value]).
        max_multiplier_digits: Every multiplication has a factor with at most this many digits.
        max_later_digits: Operands after the first (leftmost) have 1..max_later_digits digits; None
            means `max_digits`. `a±b` with a short `b` is one carry away from a table fact.
    """

    num_operands: int
    max_digits: int
    operators: str = "+-"
    parentheses: bool = False
    min_multiplications: int = 0
    max_value: int = 999
    max_multiplier_digits: int = 1
    max_later_digits: int | None = None

    def __post_init__(self) -> None:
        if self.num_operands < 2:
            raise ValueError(f"num_operands must be >= 2, got {self.num_operands}")
        if self.max_digits < 1 or (self.max_later_digits is not None and self.max_later_digits < 1):
            raise ValueError(
                f"max_digits and max_later_digits must be >= 1, got {self.max_digits}, {self.max_later_digits}"
            )
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"operators must be a non-empty subset of '+-*', got {self.operators!r}")
        if self.min_multiplications > 0 and "*" not in self.operators:
            raise ValueError("min_multiplications > 0 needs '*' in operators")
        if self.min_multiplications > self.num_operands - 1:
            raise ValueError(f"min_multiplications ({self.min_multiplications}) exceeds the operator count")


# Levels, by what the tiny policy finds hard (measured after its warm start): number of steps,
# multiplication, parentheses (choosing what to compute first) and multi-digit operands. Steps of the
# 1-digit levels are small table facts (results <= 99), so a held-out prompt is a new composition of
# steps seen in training. Level 1 has 1,899 distinct prompts; the others have tens of thousands.
DEFAULT_LEVELS: dict[int, ArithmeticLevel] = {
    1: ArithmeticLevel(num_operands=3, max_digits=1, operators="+-", max_value=99),  # 7+8-3
    2: ArithmeticLevel(
        num_operands=3, max_digits=1, operators="+-*", min_multiplications=1, max_value=99
    ),  # 8*5-2
    3: ArithmeticLevel(  # (4+5)*(3+2)
        num_operands=4, max_digits=1, operators="+-*", parentheses=True, min_multiplications=1, max_value=99
    ),
    4: ArithmeticLevel(  # 45+(3+8)*7
        num_operands=4,
        max_digits=2,
        max_later_digits=1,
        operators="+-*",
        parentheses=True,
        min_multiplications=1,
        max_value=999,
    ),
    5: ArithmeticLevel(  # 6*(9-3+5)+9
        num_operands=5, max_digits=1, operators="+-*", parentheses=True, min_multiplications=1, max_value=99
    ),
}

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}

# Column types of the arithmetic task's rows (what `Dataset.from_list` infers from a non-empty split).
ARITHMETIC_FEATURES = datasets.Features(
    {
        **{name: datasets.Value("string") for name in ("prompt_id", "prompt", "answer", "data_source")},
        "difficulty": datasets.Value("int64"),
        "solution": datasets.Value("string"),
    }
)


@dataclass(frozen=True)
class _Node:
    """Expression tree: a leaf holds `value`; an inner node holds `op`, `left`, `right` and `value`."""

    value: int
    op: str | None = None
    left: _Node | None = None
    right: _Node | None = None

    def render(self) -> str:
        """The expression with minimal parentheses (left-to-right evaluation at equal precedence)."""
        if self.op is None:
            return str(self.value)
        assert self.left is not None and self.right is not None
        left, right = self.left.render(), self.right.render()
        if self.left.op is not None and _PRECEDENCE[self.left.op] < _PRECEDENCE[self.op]:
            left = f"({left})"
        if self.right.op is not None and _PRECEDENCE[self.right.op] <= _PRECEDENCE[self.op]:
            right = f"({right})"
        return f"{left}{self.op}{right}"

    def steps(self) -> list[str]:
        """One `a op b=c` step per operator, in evaluation order (left subtree, right subtree, node)."""
        if self.op is None:
            return []
        assert self.left is not None and self.right is not None
        step = f"{self.left.value}{self.op}{self.right.value}={self.value}"
        return [*self.left.steps(), *self.right.steps(), step]


def _combine(op: str, left: _Node, right: _Node, level: ArithmeticLevel) -> _Node | None:
    """The node `left op right`, or None if it breaks the level's value or short-factor bounds."""
    # A product needs a short factor (a learnable step) and no factor 0 or 1 (a step that teaches nothing).
    if op == "*" and (
        min(left.value, right.value) >= 10**level.max_multiplier_digits or min(left.value, right.value) < 2
    ):
        return None
    value = (
        left.value + right.value
        if op == "+"
        else left.value - right.value
        if op == "-"
        else left.value * right.value
    )
    return _Node(value, op, left, right) if 0 <= value <= level.max_value else None


def _random_operand(rng: random.Random, max_digits: int) -> _Node:
    digits = rng.randint(1, max_digits)
    return _Node(rng.randint(10 ** (digits - 1), 10**digits - 1))  # never 0: `x+0` steps teach nothing


def _later_digits(level: ArithmeticLevel) -> int:
    return level.max_digits if level.max_later_digits is None else level.max_later_digits


def _random_shaped_tree(
    rng: random.Random, level: ArithmeticLevel, num_operands: int, leftmost: bool = True
) -> _Node | None:
    """A tree of random shape (parenthesised levels), or None if a bound broke."""
    if num_operands == 1:
        return _random_operand(rng, level.max_digits if leftmost else _later_digits(level))
    n_left = rng.randint(1, num_operands - 1)
    left = _random_shaped_tree(rng, level, n_left, leftmost)
    right = _random_shaped_tree(rng, level, num_operands - n_left, leftmost=False)
    if left is None or right is None:
        return None
    return _combine(rng.choice(level.operators), left, right, level)


def _random_flat_tree(rng: random.Random, level: ArithmeticLevel) -> _Node | None:
    """A flat expression `a op b op c ...` parsed with precedence (`*` first, then left to right)."""
    operands = [_random_operand(rng, level.max_digits)]
    operands += [_random_operand(rng, _later_digits(level)) for _ in range(level.num_operands - 1)]
    operators = [rng.choice(level.operators) for _ in range(level.num_operands - 1)]
    # Fold runs of `*` first, then `+ -` left to right: the tree a precedence parser would build.
    terms: list[_Node] = [operands[0]]
    additive: list[str] = []
    for op, operand in zip(operators, operands[1:]):
        if op == "*":
            product = _combine("*", terms[-1], operand, level)
            if product is None:
                return None
            terms[-1] = product
        else:
            terms.append(operand)
            additive.append(op)
    node: _Node | None = terms[0]
    for op, term in zip(additive, terms[1:]):
        node = _combine(op, node, term, level) if node is not None else None
    return node


def arithmetic_problem(rng: random.Random, level: ArithmeticLevel) -> tuple[str, str, str]:
    """Draw one problem of `level` by rejection: (expression, answer, worked solution)."""
    while True:
        node = (
            _random_shaped_tree(rng, level, level.num_operands)
            if level.parentheses
            else _random_flat_tree(rng, level)
        )
        if node is None:
            continue
        expression = node.render()
        if level.parentheses and "(" not in expression:
            continue
        if expression.count("*") < level.min_multiplications:
            continue
        answer = str(node.value)
        return expression, answer, f"{' '.join(node.steps())} {FINAL_ANSWER_MARKER} {answer}"


def _level_counts(total: int, levels: Sequence[int]) -> dict[int, int]:
    base, extra = divmod(total, len(levels))
    return {level: base + (i < extra) for i, level in enumerate(levels)}


def generate_arithmetic(
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    levels: Mapping[int, ArithmeticLevel] | None = None,
    max_attempts_per_row: int = 200,
) -> dict[str, list[dict[str, Any]]]:
    """Generate the arithmetic task's splits deterministically from `seed`.

    Each split has (nearly) equal counts per level and no prompt appears twice in or across splits.
    The test split is drawn first, then validation, then train, each level from its own seeded stream,
    so held-out prompts do not change when `n_train` changes.

    Returns:
        `{"train" | "validation" | "test": [row, ...]}`, rows in the prompt-row contract plus `solution`.

    Raises:
        ValueError: if a level cannot produce enough distinct prompts (its expression space is too small).
    """
    levels = dict(DEFAULT_LEVELS if levels is None else levels)
    if not levels:
        raise ValueError("levels must not be empty")
    for name, count in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    seen: set[str] = set()
    rngs = {level: random.Random(f"arithmetic/{seed}/{level}") for level in levels}
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, total in (("test", n_test), ("validation", n_val), ("train", n_train)):
        rows: list[dict[str, Any]] = []
        for level, count in _level_counts(total, sorted(levels)).items():
            made = attempts = 0
            while made < count:
                attempts += 1
                if attempts > max_attempts_per_row * count:
                    raise ValueError(
                        f"level {level} produced only {made} distinct prompts of {count} for split {split!r}; "
                        "widen it (more digits/operands) or ask for fewer rows"
                    )
                expression, answer, solution = arithmetic_problem(rngs[level], levels[level])
                if expression in seen:
                    continue
                seen.add(expression)
                made += 1
                rows.append(
                    {
                        "prompt_id": f"arithmetic-{hashlib.sha1(expression.encode()).hexdigest()[:12]}",
                        "prompt": expression,
                        "answer": answer,
                        "data_source": ARITHMETIC_SOURCE,
                        "difficulty": level,
                        "solution": solution,
                    }
                )
        # Interleave levels so any prefix of a split is balanced (stable for a fixed seed).
        random.Random(f"arithmetic/{seed}/{split}/order").shuffle(rows)
        splits[split] = rows
    return {split: splits[split] for split in SPLITS}


def write_arithmetic_task(
    out_dir: str | Path,
    seed: int,
    n_train: int = 8000,
    n_val: int = 500,
    n_test: int = 500,
    levels: Mapping[int, ArithmeticLevel] | None = None,
) -> dict[str, Path]:
    """Generate the arithmetic task and write `train.parquet`, `validation.parquet`, `test.parquet`.

    Returns the path of each split's file. Writing the same task again is a no-op; a folder that holds
    other files of those names (another seed, or someone's own dataset) is refused before anything is
    replaced.
    """
    out_dir = Path(out_dir)
    tasks: dict[str, datasets.Dataset] = {}
    for split, rows in generate_arithmetic(seed, n_train, n_val, n_test, levels).items():
        # An empty split keeps the columns (from_list([]) has none and fails validation as "missing").
        tasks[split] = (
            datasets.Dataset.from_list(rows)
            if rows
            else datasets.Dataset.from_dict(
                {name: [] for name in ARITHMETIC_FEATURES}, features=ARITHMETIC_FEATURES
            )
        )
        validate_prompts(tasks[split], f"arithmetic[{split}]")
    paths = {split: out_dir / f"{split}.parquet" for split in tasks}
    for split, path in paths.items():
        if path.exists() and not _holds(path, tasks[split]):
            raise ValueError(
                f"{path} exists and differs from this task (seed={seed}, n_train={n_train}, "
                f"n_val={n_val}, n_test={n_test}); nothing was written: remove it or choose another folder"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, path in paths.items():
        if not path.exists():  # else it holds this very table already
            tasks[split].to_parquet(str(path))
    return paths


def _holds(path: Path, dataset: datasets.Dataset) -> bool:
    """Whether a parquet file holds `dataset`'s table (compared as tables: its footer also names the
    writer's pyarrow version)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).equals(dataset.data.table)
    except Exception:  # not parquet we can read: not this task
        return False


def main() -> None:
    """`python -m basis.tasks OUT_DIR SEED [--n_train 8000 ...]`: write the arithmetic task."""
    from jsonargparse import auto_cli

    from basis.tracking import input_errors

    with input_errors("basis.tasks"):
        paths = auto_cli(write_arithmetic_task)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
