"""Tests for basis.tasks: the prompt-row contract, loaders on local files of each preset's schema,
the arithmetic task generator and prompt rendering."""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from basis.tasks import (
    DEFAULT_LEVELS,
    PROMPT_COLUMNS,
    ArithmeticLevel,
    generate_arithmetic,
    gsm8k_final_answer,
    last_boxed,
    load_prompts,
    prompt_text,
    render_prompt,
    validate_prompts,
    write_arithmetic_task,
)
from basis.tiny_policy import build_tokenizer

# ---------------------------------------------------------------------------- local files per schema


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


DAPO_INSTRUCTION = "Solve the following math problem step by step.\n\n"


def dapo_rows() -> list[dict]:
    return [
        {
            "data_source": "math_dapo",
            "prompt": [{"content": DAPO_INSTRUCTION + f"What is {i}+{i}?", "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(2 * i), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"uuid-{i}"},
        }
        for i in range(1, 4)
    ]


def test_a_missing_relative_path_names_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a notebook in another folder, 'artifacts/tiny-policy/data' was reported missing without where
    it had been looked for, and the hint pointed at hub presets."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError, match=rf"'data/prompts' is neither an existing file/folder \(relative to {tmp_path}\)"
    ):
        load_prompts("data/prompts")


def test_dapo_schema_through_preset(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "dapo-math-17k.parquet", dapo_rows())
    ds = load_prompts(str(path), preset="dapo-math-17k")
    assert ds.column_names == list(PROMPT_COLUMNS)
    assert ds["prompt_id"] == ["uuid-1", "uuid-2", "uuid-3"]
    assert ds["answer"] == ["2", "4", "6"]
    assert ds["data_source"] == ["math_dapo"] * 3
    assert ds[0]["prompt"] == [{"role": "user", "content": DAPO_INSTRUCTION + "What is 1+1?"}]
    assert prompt_text(ds[0]["prompt"]).endswith("What is 1+1?")


def test_dapo_preset_keeps_one_row_per_distinct_prompt(tmp_path: Path) -> None:
    """The hub copy repeats each prompt ~100 times, each copy with its own uuid (verl #3065)."""
    copies = [
        dict(row, extra_info={"index": f"uuid-{i}-{copy}"})
        for copy in range(3)
        for i, row in enumerate(dapo_rows())
    ]
    path = write_parquet(tmp_path / "dapo-math-17k.parquet", copies)
    ds = load_prompts(str(path), preset="dapo-math-17k")
    assert ds["prompt_id"] == ["uuid-0-0", "uuid-1-0", "uuid-2-0"]
    assert load_prompts(str(path), preset="dapo-math-17k", limit=2)["prompt_id"] == ["uuid-0-0", "uuid-1-0"]


def test_gsm8k_schema_through_preset(tmp_path: Path) -> None:
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "A farm sells 1200 eggs twice.", "answer": "1200*2=2400\n#### 2,400"},
    ]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    ds = load_prompts(str(path), preset="gsm8k", split="test")
    assert ds["answer"] == ["7", "2400"]
    assert ds["prompt"] == [r["question"] for r in rows]
    assert ds["prompt_id"] == ["gsm8k/test/0", "gsm8k/test/1"]
    assert ds["difficulty"] == [None, None]


def test_math_schema_through_preset(tmp_path: Path) -> None:
    rows = [
        {
            "problem": "Compute $\\frac{1}{4}+\\frac{1}{4}$.",
            "level": "Level 2",
            "type": "Prealgebra",
            "solution": "We add: $\\boxed{3}$ is wrong; the answer is $\\boxed{\\frac{1}{2}}$.",
        },
        {"problem": "Find $x$.", "level": "Level ?", "type": "Algebra", "solution": "So $x=\\boxed{-4}$."},
    ]
    path = write_parquet(tmp_path / "math.parquet", rows)
    ds = load_prompts(str(path), preset="math")
    assert ds["answer"] == ["\\frac{1}{2}", "-4"]
    assert ds["difficulty"] == [2, None]
    assert ds["data_source"] == ["math", "math"]


def test_math_bare_boxed_gold_ends_at_the_math_delimiter(tmp_path: Path) -> None:
    """MATH train/algebra/24014 ends `... our answer is $\\boxed 2$.`: the gold is `2`, not `2$.` (which
    the math verifier then matched to no correct response)."""
    rows = [
        {"problem": "a", "level": "Level 1", "solution": "We find x = 2. So our answer is $\\boxed 2$."},
        {"problem": "b", "level": "Level 1", "solution": "Then $y=\\boxed 9$, done."},
        {"problem": "c", "level": "Level 1", "solution": "So $\\boxed{\\$18.90}$."},
    ]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    assert load_prompts(str(path), preset="math")["answer"] == ["2", "9", "\\$18.90"]


def test_local_folder_with_column_map(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "train.jsonl", [{"q": "2+2", "a": "4", "lvl": 1}, {"q": "3*3", "a": "9", "lvl": 2}]
    )
    ds = load_prompts(
        str(tmp_path), split="train", column_map={"prompt": "q", "answer": "a", "difficulty": "lvl"}
    )
    assert ds["prompt"] == ["2+2", "3*3"] and ds["difficulty"] == [1, 2]
    assert ds["data_source"] == ["train", "train"]
    assert ds["prompt_id"] == ["train/train/0", "train/train/1"]


def test_partial_column_map_renames_only_the_fields_it_names(tmp_path: Path) -> None:
    """The `--data.column_map` help example: the fields a map does not name keep their own columns (or
    the preset's)."""
    rows = [{"id": "a", "question": "2+2", "answer": "4", "prompt_id": "q0"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    ds = load_prompts(str(path), column_map={"prompt": "question"})
    assert ds.to_list() == [
        {"prompt_id": "q0", "prompt": "2+2", "answer": "4", "data_source": "qa", "difficulty": None}
    ]
    gsm8k = write_jsonl(tmp_path / "gsm.jsonl", [{"q": "2+2?", "answer": "2+2=4 #### 4"}])
    ds = load_prompts(str(gsm8k), preset="gsm8k", column_map={"prompt": "q"})
    assert ds["prompt"] == ["2+2?"] and ds["answer"] == ["4"]  # the preset's answer column and extractor
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"question": "2+2", "a": "4"}])
    with pytest.raises(ValueError, match=r"renamed\.jsonl: missing column 'answer' for field 'answer'"):
        load_prompts(str(renamed), column_map={"prompt": "question"})
    blank = write_jsonl(
        tmp_path / "blank.jsonl", [{"question": "2+2", "a": "4"}, {"question": "3+3", "a": " "}]
    )
    with pytest.raises(ValueError, match=r"blank\.jsonl: row 1, field 'answer' \(column 'a'\): empty answer"):
        load_prompts(str(blank), column_map={"prompt": "question", "answer": "a"})  # the user's column named
    # None leaves a preset's optional field unread: MATH-500 copies keep `level` as an int
    math500 = write_jsonl(
        tmp_path / "math500.jsonl", [{"problem": "1+1", "solution": "\\boxed{2}", "level": 3}]
    )
    ds = load_prompts(str(math500), preset="math", column_map={"difficulty": None})
    assert ds["answer"] == ["2"] and ds["difficulty"] == [None]


def test_a_jsonl_with_a_byte_order_mark_and_mixed_columns_loads(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    rows = [
        {"prompt": "1+1=", "answer": "2", "difficulty": 1},
        {"prompt": "2+2=", "answer": "4", "difficulty": "hard"},
    ]
    path.write_text("\ufeff" + "\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bom\.jsonl.*row 1.*difficulty"):  # read as written, then named
        load_prompts(str(path))


def test_answer_extractors() -> None:
    assert gsm8k_final_answer("blah #### 1,234 ") == "1234"
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    with pytest.raises(ValueError, match="boxed"):
        last_boxed("no answer here")


# ---------------------------------------------------------------------------- bad input


def test_missing_answer_column_names_file_and_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl.*missing column 'answer'"):
        load_prompts(str(path))


def test_missing_prompt_column_names_file_and_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1", "answer": "2"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl.*missing column 'prompt'"):
        load_prompts(str(path))


def test_empty_prompt_names_file_row_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "1+1", "answer": "2"}, {"prompt": "  ", "answer": "3"}]
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 1, field 'prompt': empty prompt"):
        load_prompts(str(path))


def test_non_string_answer_names_file_row_field(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "bad.parquet", [{"prompt": "1+1", "answer": 2}, {"prompt": "2+2", "answer": 4}]
    )
    with pytest.raises(
        ValueError, match=r"bad\.parquet: row 0, field 'answer': expected a string, got int 2"
    ):
        load_prompts(str(path))


def test_mixed_answer_types_in_jsonl_name_the_row_holding_the_non_string(tmp_path: Path) -> None:
    """`datasets` reads a jsonl column of mixed types as JSON, turning the string "2" into the number 2;
    the error must still blame row 1 (the int), not row 0 (the string), also under a struct."""
    path = write_jsonl(
        tmp_path / "mixed.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": 4}]
    )
    with pytest.raises(
        ValueError, match=r"mixed\.jsonl: row 1, field 'answer': expected a string, got int 4"
    ):
        load_prompts(str(path))
    rows = dapo_rows()
    rows[2]["reward_model"]["ground_truth"] = 6
    path = write_jsonl(tmp_path / "dapo.jsonl", rows)
    with pytest.raises(
        ValueError,
        match=r"dapo\.jsonl: row 2, field 'answer' \(column 'reward_model\.ground_truth'\): expected a string, got int 6",
    ):
        load_prompts(str(path), preset="dapo-math-17k")


def test_mixed_prompt_kinds_name_file_row_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"prompt": "1+1", "answer": "2"}, {"prompt": [{"role": "user", "content": "2+2"}], "answer": "4"}],
    )
    with pytest.raises(
        ValueError, match=r"mixed\.jsonl: row 1, field 'prompt': a chat list where row 0 has a string"
    ):
        load_prompts(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_empty_file_names_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    if suffix == ".jsonl":
        path.write_text("")
    else:
        datasets.Dataset.from_dict({"prompt": [], "answer": []}).to_parquet(str(path))
    with pytest.raises(ValueError, match=rf"empty\{suffix}: no rows"):
        load_prompts(str(path))


def test_gsm8k_answer_without_marker_names_row(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "gsm.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "7"}]
    )
    with pytest.raises(ValueError, match=r"gsm\.jsonl: row 1, field 'answer'"):
        load_prompts(str(path), preset="gsm8k")


def _null_reward_model() -> list[dict]:
    rows = dapo_rows()
    rows[1]["reward_model"] = None
    return rows


@pytest.mark.parametrize(
    ("rows", "preset", "match"),
    [
        (  # a null struct under the column path of the answer
            _null_reward_model,
            "dapo-math-17k",
            r"row 1, field 'answer' \(column 'reward_model\.ground_truth'\): 'reward_model' is null, not a struct",
        ),
        (  # an int where MATH has "Level 3"
            lambda: [
                {"problem": "a", "solution": "\\boxed{1}", "level": "Level 1"},
                {"problem": "b", "solution": "\\boxed{2}", "level": 3},
            ],
            "math",
            r"row 1, field 'difficulty' \(column 'level'\): expected a string like 'Level 3', got int 3",
        ),
    ],
    ids=["null-struct", "int-level"],
)
def test_badly_typed_values_name_file_row_field(tmp_path: Path, rows, preset: str, match: str) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", rows())
    with pytest.raises(ValueError, match=r"prompts\.jsonl: " + match):
        load_prompts(str(path), preset=preset)


def test_whitespace_prompt_id_names_file_row_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "ids.jsonl",
        [
            {"prompt_id": "a", "prompt": "1+1", "answer": "2"},
            {"prompt_id": "  ", "prompt": "2+2", "answer": "4"},
        ],
    )
    with pytest.raises(
        ValueError, match=r"ids\.jsonl: row 1, field 'prompt_id': expected a non-empty string, got str '  '"
    ):
        load_prompts(str(path))


def test_validate_prompts_catches_duplicates_and_missing_columns() -> None:
    ds = datasets.Dataset.from_list([{"prompt_id": "a", "prompt": "x", "answer": "1"}] * 2)
    with pytest.raises(ValueError, match=r"src: row 1, field 'prompt_id'"):
        validate_prompts(ds, "src")
    with pytest.raises(ValueError, match=r"src: missing column 'answer'"):
        validate_prompts(datasets.Dataset.from_list([{"prompt": "x"}]), "src")


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(ValueError, match="neither an existing file"):
        load_prompts("no/such/dataset-anywhere")
    with pytest.raises(ValueError, match="unknown preset"):
        load_prompts("x", preset="nope")


# ---------------------------------------------------------------------------- arithmetic task

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def reference_value(expression: str) -> int:
    """Independent evaluator of `+ - *` integer expressions over the Python AST (no eval)."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return node.value

    return walk(ast.parse(expression, mode="eval").body)


def test_arithmetic_is_deterministic_and_disjoint() -> None:
    a = generate_arithmetic(seed=7, n_train=300, n_val=50, n_test=50)
    b = generate_arithmetic(seed=7, n_train=300, n_val=50, n_test=50)
    c = generate_arithmetic(seed=8, n_train=300, n_val=50, n_test=50)
    assert a == b and a != c
    prompts = {split: {row["prompt"] for row in rows} for split, rows in a.items()}
    assert sum(len(p) for p in prompts.values()) == 400  # no duplicates within or across splits
    assert not (prompts["train"] & prompts["test"]) and not (prompts["validation"] & prompts["test"])
    # Held-out prompts do not depend on the train size.
    assert generate_arithmetic(seed=7, n_train=10, n_val=50, n_test=50)["test"] == a["test"]


def test_arithmetic_rows_are_correct_and_graded() -> None:
    splits = generate_arithmetic(seed=0, n_train=500, n_val=0, n_test=0)
    rows = splits["train"]
    assert {row["difficulty"] for row in rows} == set(DEFAULT_LEVELS)
    for row in rows:
        level = DEFAULT_LEVELS[row["difficulty"]]
        assert row["answer"] == str(reference_value(row["prompt"]))
        steps, final = row["solution"].split(" #### ")
        assert final == row["answer"]
        steps = steps.split(" ")
        assert len(steps) == level.num_operands - 1  # one step per operator
        for step in steps:
            a, op, b, value = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)", step).groups()
            assert reference_value(f"{a}{op}{b}") == int(value) <= level.max_value
        assert steps[-1].endswith(f"={row['answer']}")
        assert ("(" in row["prompt"]) == level.parentheses
        assert row["prompt"].count("*") >= level.min_multiplications


def test_arithmetic_level_validation_and_exhaustion() -> None:
    with pytest.raises(ValueError, match="num_operands"):
        ArithmeticLevel(num_operands=1, max_digits=1)
    with pytest.raises(ValueError, match="operators"):
        ArithmeticLevel(num_operands=2, max_digits=1, operators="/")
    tiny = {1: ArithmeticLevel(num_operands=2, max_digits=1, operators="+")}  # 81 distinct prompts
    with pytest.raises(ValueError, match="level 1 produced only"):
        generate_arithmetic(seed=0, n_train=100, n_val=0, n_test=0, levels=tiny)


def test_write_arithmetic_task_round_trips_through_load_prompts(tmp_path: Path) -> None:
    paths = write_arithmetic_task(tmp_path, seed=1, n_train=40, n_val=10, n_test=10)
    assert sorted(p.name for p in paths.values()) == ["test.parquet", "train.parquet", "validation.parquet"]
    test = load_prompts(str(tmp_path), split="test")
    assert len(test) == 10 and set(test["data_source"]) == {"arithmetic"}
    assert all(isinstance(d, int) for d in test["difficulty"])
    assert "solution" in datasets.Dataset.from_parquet(str(paths["train"])).column_names


def test_write_arithmetic_task_never_replaces_other_files(tmp_path: Path) -> None:
    """`python -m basis.tasks OUT SEED` used to overwrite whatever `OUT/train.parquet` held."""
    paths = write_arithmetic_task(tmp_path, seed=1, n_train=20, n_val=5, n_test=5)
    before = {split: path.read_bytes() for split, path in paths.items()}
    assert write_arithmetic_task(tmp_path, seed=1, n_train=20, n_val=5, n_test=5) == paths  # same task
    # the same rows written otherwise (another compression, another pyarrow's footer) are the same task
    pq.write_table(pq.read_table(paths["train"]), paths["train"], compression="gzip")
    before["train"] = paths["train"].read_bytes()
    assert write_arithmetic_task(tmp_path, seed=1, n_train=20, n_val=5, n_test=5) == paths
    with pytest.raises(ValueError, match=r"train\.parquet exists and differs .*seed=2.*nothing was written"):
        write_arithmetic_task(tmp_path, seed=2, n_train=20, n_val=5, n_test=5)
    assert {split: path.read_bytes() for split, path in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "test.parquet",
        "train.parquet",
        "validation.parquet",
    ]


def test_write_arithmetic_task_with_an_empty_split(tmp_path: Path) -> None:
    """`python -m basis.tasks OUT SEED --n_val 0` used to fail: an empty split was written without columns."""
    paths = write_arithmetic_task(tmp_path, seed=1, n_train=20, n_val=0, n_test=5)
    empty = pq.read_table(paths["validation"])  # datasets cannot read a parquet of 0 rows
    assert empty.num_rows == 0 and empty.schema == pq.read_table(paths["train"]).schema
    with pytest.raises(ValueError, match=r"validation\.parquet: no rows"):
        load_prompts(str(tmp_path), split="validation")


# ---------------------------------------------------------------------------- rendering


def test_render_prompt_with_and_without_chat_template() -> None:
    tokenizer = build_tokenizer()
    assert render_prompt(tokenizer, "8+73") == "Q: 8+73\nA:"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "8+73"}]
    assert render_prompt(tokenizer, chat) == "Be brief.\nQ: 8+73\nA:"
    tokenizer.chat_template = None
    assert render_prompt(tokenizer, "8+73") == "8+73"
    assert render_prompt(tokenizer, chat) == "Be brief.\n8+73"
