"""Tests for basis.rewards: the arithmetic and math-verify verifiers, the worker pool's time limit and
crash handling, the registry and the ±1 mapping."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from basis.rewards import (
    VERIFIERS,
    ArithmeticVerifier,
    MathVerifier,
    VerifyResult,
    extract_number,
    get_verifier,
    math_verify_item,
    to_pm1,
)

# A real input that makes sympy hang: verify() tries to evaluate factorial(10**7) (memory stays small).
HANGING_RESPONSE = "\\boxed{(10^{7})!}"


@pytest.fixture(scope="module")
def math_verifier() -> Iterator[MathVerifier]:
    with MathVerifier(timeout_s=1.0, num_workers=2) as verifier:
        yield verifier


def test_extract_number() -> None:
    assert extract_number("45*2=90 90+23=113 #### 113") == 113
    assert extract_number("#### 12 then #### -7") == -7
    assert extract_number("the sum is 5 and 8") == 8  # no marker: last number
    assert extract_number("#### oops 5") is None  # a marker without a number is unparseable
    assert extract_number("no digits") is None


def test_extract_number_reads_the_whole_number() -> None:
    assert extract_number("#### 113.9") == Decimal("113.9")  # not 113
    assert extract_number("#### 1,130") == 1130  # not 1
    assert extract_number("#### 12,345,678 apples") == 12345678
    assert extract_number("so it is 113.9") == Decimal("113.9")  # no marker: the same reading, not 9
    assert extract_number("the answer is 1,130.") == 1130
    assert extract_number("#### 1,13") is None  # a broken thousands group is no number
    assert extract_number("sums: 5,8") == 8  # not a thousands group: two numbers


def test_arithmetic_verifier_scores_and_counts_unparseable() -> None:
    result = ArithmeticVerifier()(
        ["45*2=90 90+23=113 #### 113", "45*2=90 90+23=113 #### 112", "garbage", "#### x", " 7-10=-3 #### -3"],
        ["113", "113", "5", "1", "-3"],
    )
    assert result == VerifyResult([1.0, 0.0, 0.0, 0.0, 1.0], 2)


def test_arithmetic_verifier_compares_whole_numbers_exactly() -> None:
    result = ArithmeticVerifier()(
        ["#### 113.9", "113.9", "#### 1,130", "#### 1,130", "#### 113.0", "90+23=113 so -113"],
        ["113", "113", "1", "1130", "113", "113"],
    )
    assert result == VerifyResult([0.0, 0.0, 0.0, 1.0, 1.0, 0.0], 0)


def test_arithmetic_verifier_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        ArithmeticVerifier()(["1"], ["1", "2"])
    with pytest.raises(ValueError, match=r"answers\[0\] = '1/2' is not an integer"):
        ArithmeticVerifier()(["1"], ["1/2"])


def test_math_verifier_equivalent_forms(math_verifier: MathVerifier) -> None:
    responses = [
        "0.5",
        "The answer is $\\boxed{\\frac{1}{2}}$.",
        "\\boxed{0.5}",
        "so x = \\boxed{\\frac{2}{4}}",
        "The answer is $\\boxed{\\frac{1}{3}}$.",
        "\\boxed{(x-1)(x+1)}",
    ]
    answers = ["\\frac{1}{2}", "0.5", "\\frac{1}{2}", "\\frac{1}{2}", "\\frac{1}{2}", "x^2-1"]
    assert math_verifier(responses, answers) == VerifyResult([1.0, 1.0, 1.0, 1.0, 0.0, 1.0], 0)


def test_math_verifier_garbage_scores_zero_and_is_counted(math_verifier: MathVerifier) -> None:
    result = math_verifier(["@@@ ###", "", "\\boxed{7}"], ["3", "3", "7"])
    assert result == VerifyResult([0.0, 0.0, 1.0], 2)


def test_math_verifier_hanging_input_times_out(math_verifier: MathVerifier) -> None:
    before = math_verifier.failures.timeouts
    start = time.monotonic()
    result = math_verifier([HANGING_RESPONSE, "\\boxed{3}", HANGING_RESPONSE], ["5", "3", "5"])
    elapsed = time.monotonic() - start
    assert result == VerifyResult([0.0, 1.0, 0.0], 2)
    assert math_verifier.failures.timeouts == before + 2
    assert elapsed < 10  # two 1 s limits on two workers, plus replacing the killed workers
    # The pool recovered: the replacement workers answer.
    assert math_verifier(["\\boxed{4}"], ["4"]) == VerifyResult([1.0], 0)


def test_math_verifier_startup_limit_counts_from_each_restart() -> None:
    """Workers replaced after timeouts late in a long call get the full startup limit from their restart;
    the call's elapsed time (here 5 rounds of 0.5 s > the 1.5 s limit) is no startup failure."""
    with MathVerifier(timeout_s=0.5, num_workers=2, startup_timeout_s=1.5) as verifier:
        start = time.monotonic()
        result = verifier([HANGING_RESPONSE] * 10 + ["\\boxed{3}"], ["5"] * 10 + ["3"])
        elapsed = time.monotonic() - start
    assert result == VerifyResult([0.0] * 10 + [1.0], 10)
    assert verifier.failures.timeouts == 10
    assert elapsed < 15


def test_math_verifier_survives_a_killed_worker(math_verifier: MathVerifier) -> None:
    math_verifier(["1"], ["1"])  # workers started
    crashed = math_verifier.failures.crashed
    math_verifier._workers[0].process.kill()
    math_verifier._workers[0].process.join()
    assert math_verifier(["\\boxed{2}", "\\boxed{3}", "9"], ["2", "3", "9"]) == VerifyResult(
        [1.0, 1.0, 1.0], 0
    )
    assert math_verifier.failures.crashed == crashed  # no item scored 0 (harvest reports crashed ones)


def test_math_verifier_validates_arguments() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)
    with pytest.raises(ValueError, match="start_method"):
        MathVerifier(start_method="fork")


def test_your_own_verifier_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "from basis.rewards import VerifyResult\n"
        "class Exact:\n"
        "    def __init__(self, strip=True):\n"
        "        self.strip = strip\n"
        "    def __call__(self, responses, answers):\n"
        "        clean = (lambda t: t.strip()) if self.strip else (lambda t: t)\n"
        "        return VerifyResult([float(clean(r) == a) for r, a in zip(responses, answers)], 0)\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    verifier = get_verifier("my_rewards:Exact", strip=False)
    assert verifier([" 4", "4"], ["4", "4"]).rewards == [0.0, 1.0]
    with pytest.raises(TypeError, match=r"unknown option\(s\) strict; it takes: strip"):
        get_verifier("my_rewards:Exact", strict=True)
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        get_verifier("no_such_module:Exact")
    with pytest.raises(ValueError, match="has no callable 'NOT_CALLABLE'"):
        get_verifier("my_rewards:NOT_CALLABLE")


def test_registry_and_pm1() -> None:
    assert set(VERIFIERS) == {"arithmetic", "math"}
    assert isinstance(get_verifier("arithmetic"), ArithmeticVerifier)
    with pytest.raises(ValueError, match="unknown verifier"):
        get_verifier("code")
    assert torch.equal(to_pm1([0.0, 1.0, 1.0]), torch.tensor([-1.0, 1.0, 1.0]))
    assert torch.equal(to_pm1(torch.tensor([[1.0, 0.0]])), torch.tensor([[1.0, -1.0]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_pm1([2.0])


def test_math_verifier_grades_the_last_boxed_answer(math_verifier) -> None:
    corrected = "so \\boxed{5}. Wait, 3 + 4 is not 5: \\boxed{7}"
    assert math_verifier([corrected, corrected], ["7", "5"]) == VerifyResult([1.0, 0.0], 0)


DAPO_FORMAT_CORRECTED = "so \\boxed{5} in part one...\nAnswer: 7"
BARE_BOX_CORRECTED = "\\boxed{3}. Wait, mistake. The answer is \\boxed 5"


@pytest.mark.parametrize(
    ("response", "gold", "reward"),
    [
        # An `Answer:` line is read whole, not just its leading number.
        pytest.param("Answer: 2\\sqrt{3}", "2", 0.0, id="answer-line-sqrt-not-its-coefficient"),
        pytest.param("Answer: 3\\pi", "3", 0.0, id="answer-line-pi-not-its-coefficient"),
        pytest.param("Answer: 2^{10}", "2", 0.0, id="answer-line-power-not-its-base"),
        pytest.param("Answer: 5\\sqrt{2}/2", "5", 0.0, id="answer-line-fraction-not-its-coefficient"),
        pytest.param("Answer: 2\\sqrt{3}", "2\\sqrt3", 1.0, id="answer-line-sqrt"),
        pytest.param("Answer: 2^{10}", "1024", 1.0, id="answer-line-power"),
        pytest.param("Answer: \\dfrac{7}{2}", "\\frac72", 1.0, id="answer-line-dfrac"),
        pytest.param("Answer: \\pi/2", "\\frac{\\pi}{2}", 1.0, id="answer-line-pi-over-2"),
        # Without a marker, the last number of a truncated derivation is no answer.
        pytest.param("We compute 2+2 = 4 and then", "4", 0.0, id="no-marker-last-number"),
        # A Unicode minus is a minus.
        pytest.param("Answer: \u2212 5", "5", 0.0, id="unicode-minus-spaced"),
        pytest.param("Answer: \u22125", "-5", 1.0, id="unicode-minus"),
        # A bare `\boxed 5` after a braced box is the corrected answer.
        pytest.param(BARE_BOX_CORRECTED, "5", 1.0, id="bare-box-after-braced-box"),
        pytest.param(BARE_BOX_CORRECTED, "3", 0.0, id="braced-box-before-bare-box"),
        # A bare box ends at its closing `$` and drops a closing comma or full stop (MATH's own golds).
        pytest.param("Then $y=\\boxed 9$, done.", "9", 1.0, id="bare-box-in-math-then-comma"),
        pytest.param("So our answer is $\\boxed 2$.", "2", 1.0, id="bare-box-in-math-then-stop"),
        pytest.param("So our answer is $\\boxed 2$.", "3", 0.0, id="bare-box-in-math-wrong"),
        pytest.param("\\boxed{5}. Wait, I erred: \\boxed $-2$", "-2", 1.0, id="bare-box-then-math-span"),
        pytest.param("\\boxed{5}. Wait, I erred: \\boxed $-2$", "5", 0.0, id="math-span-box-corrects"),
        pytest.param("So \\boxed ...", "5", 0.0, id="empty-bare-box"),
        # A LaTeX space between digit groups separates thousands.
        pytest.param("\\boxed{1\\,000}", "1000", 1.0, id="thin-space-thousands"),
        pytest.param("\\boxed{1\\,000}", "0", 0.0, id="thin-space-is-no-product"),
        pytest.param("\\boxed{1\\,000\\,000}", "1000000", 1.0, id="thin-space-millions"),
        # The last marker wins, whether `\boxed{}` or `Answer:`.
        pytest.param(DAPO_FORMAT_CORRECTED, "7", 1.0, id="answer-line-after-box"),
        pytest.param(DAPO_FORMAT_CORRECTED, "5", 0.0, id="box-before-answer-line"),
    ],
)
def test_math_verify_grades_the_final_marked_answer(response: str, gold: str, reward: float) -> None:
    """Regression cases from review: each scored the other way before the fix."""
    assert math_verify_item(response, gold)[0] == reward


@pytest.mark.parametrize(
    ("response", "gold", "reward"),
    [
        ("Answer: 4", "4", 1.0),
        ("\\boxed{4}", "4", 1.0),
        ("The final answer is $4$.", "4", 1.0),  # an anchored phrase without `Answer:` or a box
        ("**Answer:** 4.", "4", 1.0),  # markdown and a full stop around the answer
        ("Answer:\n$$\\frac{1}{2}$$", "0.5", 1.0),  # the answer on the line after the marker
        ("0.5", "\\frac{1}{2}", 1.0),  # a response that is nothing but a number
        ("First \\boxed{5}. Recompute: \\boxed{\\frac{7}{", "5", 0.0),  # truncated in the final box
        # Second review of the `Answer:` rule: each scored 0 with "answer:" matched anywhere and its whole
        # line graded. Mid-sentence "answer:" is prose; an answer line without a value in math defers
        # to the box; prose after the value is not part of it.
        ("So x = \\boxed{12}. I double-checked the answer: it is right.", "12", 1.0),
        ("\\boxed{7} is the answer: I am confident", "7", 1.0),
        ("\\boxed{5}\nAnswer: see above", "5", 1.0),
        ("We must give the answer: how many?\nThe final answer is $5$.", "5", 1.0),
        ("\\boxed{5}.\n\nAnswer:", "5", 1.0),
        ("Answer: 5 (since 2+3=5)", "5", 1.0),
        ("Answer: $5$. Check: 2+3=5", "5", 1.0),
        ("Answer: 5; verified", "5", 1.0),
        ("Answer: 5 dollars (approximately)", "5", 1.0),
        ("Answer: The answer is 5", "5", 1.0),
        ("**Final Answer:** 12", "12", 1.0),
        ("Answer: (B)", "B", 1.0),
    ],
)
def test_math_verify_still_reads_anchored_answers(response: str, gold: str, reward: float) -> None:
    assert math_verify_item(response, gold)[0] == reward
