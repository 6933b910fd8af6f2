"""Verifiers: score responses against ground-truth answers with rewards in {0, 1}.

- `ArithmeticVerifier`: exact match for the arithmetic task. The response's answer is the number right
  after the last `####` marker if there is one, else the last number in the response. A number is read
  whole, thousands commas and decimals included (`1,130` is 1130, `113.9` is 113.9, never 113), and
  compared exactly with the integer answer (`113.0` counts as 113).
- `MathVerifier`: LaTeX / expression equivalence with `math-verify` (`parse` + `verify`), e.g.
  `\\frac{1}{2}` == `0.5` == `\\boxed{\\frac{1}{2}}`. A response's answer is what its last marker holds:
  a `\\boxed{...}` (or `\\boxed 5`) or the rest of an `Answer:` line (DAPO's prompt format), whichever
  comes last; without a marker only an anchored phrase ("the final answer is $4$") or a response that is
  nothing but a number counts, never the last number of a (truncated) derivation. See `final_answer`.
  math-verify's own timeouts use `signal.alarm`, which fails outside the main thread, so they are
  disabled and every item runs in a pool of worker processes (forkserver) with a wall-clock limit
  instead: a worker that overruns is killed and replaced.
  Nothing is ever `eval`-ed.

A response that cannot be parsed, times out, or crashes its worker scores 0 and is counted in
`VerifyResult.num_failed`; a verifier never raises because of a response. `to_pm1` maps {0, 1} rewards
to the {-1, +1} scale of design.md §4 (r -> 2r - 1).

Run: `python -m basis.rewards math '\\boxed{0.5}' '\\frac{1}{2}'` prints the result for one pair.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

if TYPE_CHECKING:
    import torch

# A whole number: optional minus, digits with optional thousands commas, optional decimals. It may not
# start inside or end inside a longer run of digits (`1,13` and `1.2.3` are not numbers; `113.` is 113).
_NUMBER = r"-?(?<![\d.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![.,]?\d)"
NUMBER = re.compile(_NUMBER)
FINAL_ANSWER = re.compile(rf"####\s*({_NUMBER})")


# A boxed answer: `\\boxed{` (content up to the balancing brace), `\\boxed $-2$` (the math span) or
# `\\boxed 5` (content up to the next space or the closing `$` of its math: MATH writes `our answer is
# $\\boxed 2$.`).
BOXED = re.compile(
    r"\\(?:boxed|fbox)(?:\s*\{|\s+(?:\$(?P<span>[^$]*)\$|(?P<bare>(?:\\\$|[^\s{$])(?:\\\$|[^\s$])*)))"
)
# DAPO's final line, `Answer: ...`: at the start of a line (markdown `**`, `#`, `>` allowed; "Final answer:"
# too), its value on the same line or the next. Mid-sentence ("the answer: it is right") is prose.
ANSWER_LINE = re.compile(
    r"^[ \t]*[*#_>]*[ \t]*(?:final[ \t]+)?answer[ \t]*:[*_]*[ \t]*\n?[ \t]*(?P<rest>[^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)
# Inline math on an answer line: `$...$`, `\(...\)`, `\[...\]`.
MATH_SPAN = re.compile(r"\$(?P<dollar>[^$]+)\$|\\\((?P<paren>.+?)\\\)|\\\[(?P<bracket>.+?)\\\]")
# A word of prose (2+ letters, no LaTeX backslash) ends the answer on an answer line: "5 dollars", "5 (since".
PROSE_WORD = re.compile(r"^[(\[{,.;:]*[A-Za-z]{2,}[)\]},.;:!?]*$")
# A LaTeX space (`\\,` `\\;` `\\!` `\\ `) between a digit and exactly three digits separates thousands (`1\\,000`).
LATEX_THOUSANDS_SPACE = re.compile(r"(?<=\d)\\[,;! ](?=\d{3}(?!\d))")
# Only anchored answers ("the final answer is", "answer:", \\boxed{}): math-verify's fallback reads the last
# number anywhere, which would pay a truncated derivation ("2+2 = 4 and then") for a number on the way.
ANCHORED_ONLY = [
    LatexExtractionConfig(try_extract_without_anchor=False),
    ExprExtractionConfig(try_extract_without_anchor=False),
]


def last_boxed(text: str) -> str:
    """Content of the last boxed answer in `text`: `\\boxed{...}` (or `\\fbox{...}`) with balanced braces,
    `\\boxed $...$` (the math span), or `\\boxed 5` up to the next space or unescaped `$`, without a
    closing `.,;:`. The last one to start wins, so a bare `\\boxed 5` written after a braced answer (a
    correction) is the answer. An empty one (`\\boxed ...`) is a `ValueError`, like a missing one."""
    found = list(BOXED.finditer(text))
    if not found:
        raise ValueError(f"no \\boxed{{}} answer in {text[-60:]!r}")
    last = found[-1]
    if last["span"] is not None or last["bare"] is not None:
        # a bare answer drops a closing `.,;:` (`\\boxed 9.` is 9)
        answer = last["span"] if last["span"] is not None else last["bare"].rstrip(".,;:")
        if not answer.strip():
            raise ValueError(f"empty \\boxed answer in {text[last.start() :][:60]!r}")
        return answer.strip()
    start = last.end()
    depth = 1
    for pos in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            return text[start:pos].strip()
    raise ValueError(f"unbalanced braces in \\boxed{{}} answer {text[start - 7 :][:60]!r}")


def answer_line_value(rest: str) -> str | None:
    """The answer an `Answer:` line states, or None if it states none in math: its first inline math span
    (`Answer: $5$. Check: ...`), else its leading run of math tokens up to the first word of prose
    (`5 (since 2+3=5)` -> `5`, `5 dollars` -> `5`, `2\\sqrt{3}` whole, `(B)` whole). math-verify would
    read prose as a product of symbols, and its own "answer:" pattern keeps only a leading number."""
    span = MATH_SPAN.search(rest)
    if span:
        return next(group for group in span.groups() if group is not None).strip()
    tokens = []
    for token in rest.replace("**", " ").split():
        if PROSE_WORD.match(token) and "\\" not in token:
            break
        tokens.append(token)
    value = re.sub(r"[\s.,;:]+$", "", " ".join(tokens))
    return value or None


def final_answer(response: str) -> str | None:
    """The LaTeX of the response's final answer, or None if the response marks none.

    The answer is what the last marker holds, `\\boxed{}` or an `Answer:` line starting a line, since a
    model corrects itself by writing a new one; an `Answer:` line that states no value in math ("Answer:
    see above", or cut off) leaves the word to the last `\\boxed{}`. Surrounding markdown bold and a
    closing full stop are dropped (math-verify cannot parse `4.` or `**4**` in a box). A response that is
    nothing but a number has no marker but is unambiguously its answer.

    Raises:
        ValueError: The last marker is a `\\boxed{` that is never closed (a truncated response); an earlier
            complete answer must not be graded in its place.
    """
    boxed = list(BOXED.finditer(response))
    lines = [
        (m.start(), value) for m in ANSWER_LINE.finditer(response) if (value := answer_line_value(m["rest"]))
    ]
    if lines and (not boxed or lines[-1][0] > boxed[-1].start()):
        answer = lines[-1][1]
    elif boxed:
        answer = last_boxed(response)
    elif NUMBER.fullmatch(response.strip()):
        answer = response
    else:
        return None
    return re.sub(r"^[\s*]+|[\s*.]+$", "", answer)


class VerifyResult(NamedTuple):
    """Rewards of one batch: `rewards[i]` in {0.0, 1.0}; `num_failed` counts timeouts and unparseable
    (or crashed) items, all of which scored 0."""

    rewards: list[float]
    num_failed: int


class Verifier(Protocol):
    """Scores `responses[i]` against `answers[i]`."""

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> VerifyResult: ...


def _check_lengths(responses: Sequence[str], answers: Sequence[str]) -> None:
    if len(responses) != len(answers):
        raise ValueError(f"responses ({len(responses)}) and answers ({len(answers)}) differ in length")


def extract_number(response: str) -> Decimal | None:
    """The marked final answer (`#### 1,130` -> 1130) if a marker is present, else the last number in the
    response; None if there is none (or a marker is not followed by a number)."""
    found = FINAL_ANSWER.findall(response) if "####" in response else NUMBER.findall(response)
    return Decimal(found[-1].replace(",", "")) if found else None


class ArithmeticVerifier:
    """Exact-match verifier for the arithmetic task's integer answers (in-process: it only runs a regex)."""

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> VerifyResult:
        _check_lengths(responses, answers)
        rewards: list[float] = []
        failed = 0
        for index, (response, answer) in enumerate(zip(responses, answers)):
            if not re.fullmatch(r"\s*-?\d+\s*", answer):
                raise ValueError(f"answers[{index}] = {answer!r} is not an integer; use the math verifier")
            predicted = extract_number(response)
            failed += predicted is None
            rewards.append(float(predicted == int(answer)))  # Decimal == int compares exactly
        return VerifyResult(rewards, failed)


# --------------------------------------------------------------------------------------------------
# math-verify in worker processes

_READY = "ready"


def math_verify_item(response: str, answer: str) -> tuple[float, bool]:
    """(reward, failed) for one pair, with math-verify's own timeouts disabled (the pool enforces them).

    The gold answer is parsed as `\\boxed{answer}`, and so is the response's `final_answer` (its last
    marked answer, as DAPO and verl grade: math-verify would read several `\\boxed{}` as one set, so a
    corrected answer would match nothing). A response without a marker is searched only for anchored
    phrases ("the final answer is $4$"). Both sides first get a Unicode minus (U+2212) turned into `-`
    (math-verify reads `Answer: \u2212 5` as 5) and LaTeX thousands spaces dropped (it reads `1\\,000`
    as 1*0). An unparseable gold or response scores 0, failed.
    """
    answer, response = (
        LATEX_THOUSANDS_SPACE.sub("", text.replace("\u2212", "-")) for text in (answer, response)
    )
    gold = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)  # type: ignore[arg-type]
    try:
        final = final_answer(response)
    except ValueError:  # the last \boxed{ is never closed
        return 0.0, True
    marked = response if final is None else f"\\boxed{{{final}}}"
    predicted = parse(marked, extraction_config=ANCHORED_ONLY, parsing_timeout=None)  # type: ignore[arg-type]
    if not gold or not predicted:
        return 0.0, True
    return float(verify(gold, predicted, timeout_seconds=None)), False


def _worker_loop(connection: Connection) -> None:
    """Worker process: answer `(index, response, answer)` requests with `(index, reward, failed)`."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silence the "timeout disabled" warning
    connection.send(_READY)
    while True:
        request = connection.recv()
        if request is None:
            return
        index, response, answer = request
        try:
            reward, failed = math_verify_item(response, answer)
        except Exception:  # a crash inside sympy/latex2sympy scores 0 and is counted
            reward, failed = 0.0, True
        connection.send((index, reward, failed))


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process of the chosen context
    connection: Connection
    started: float  # time.monotonic() of the (re)start; startup_timeout_s counts from here
    ready: bool = False
    job: tuple[int, float] | None = None  # (item index, start time)


@dataclass
class FailureCounts:
    """Cumulative failures of one `MathVerifier` (timed-out, unparseable and crashed items, all scored 0),
    and restarts of workers that died while idle."""

    timeouts: int = 0
    unparseable: int = 0
    crashed: int = 0
    restarts: int = 0  # workers found dead while idle and replaced; their next item was scored as usual


def _stop_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.connection.close()
    workers.clear()


class MathVerifier:
    """`math-verify` equivalence checking in a pool of worker processes with a per-item wall-clock limit.

    Args:
        timeout_s: Wall-clock limit per item; a worker past it is killed, replaced and the item scores 0.
        num_workers: Worker processes (started on first use, reused across calls).
        start_method: `forkserver` (default; workers fork from a server that preloaded math-verify, so
            replacing a killed worker is fast) or `spawn`.
        startup_timeout_s: Longest wait for a (re)started worker to become ready before giving up, counted
            from each worker's own start.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        start_method: str = "forkserver",
        startup_timeout_s: float = 120.0,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"start_method must be 'forkserver' or 'spawn' (fork is unsafe with torch), got {start_method!r}"
            )
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self.startup_timeout_s = startup_timeout_s
        self.failures = FailureCounts()
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._context.set_forkserver_preload(["basis.rewards"])
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    def _start_worker(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_worker_loop, args=(child,), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent, started=time.monotonic())

    def _replace(self, worker: _Worker) -> None:
        _stop_workers([worker])
        self._workers[self._workers.index(worker)] = self._start_worker()

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        _stop_workers(self._workers)

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> VerifyResult:
        _check_lengths(responses, answers)
        while len(self._workers) < self.num_workers:
            self._workers.append(self._start_worker())
        rewards = [0.0] * len(responses)
        failed = [False] * len(responses)
        pending = deque(range(len(responses)))
        while pending or any(w.job for w in self._workers):
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.ready and worker.job is None and pending:
                    index = pending.popleft()
                    try:
                        worker.connection.send((index, responses[index], answers[index]))
                    except OSError:  # died while idle (killed from outside): retry the item elsewhere
                        pending.appendleft(index)
                        self.failures.restarts += 1
                        self._replace(worker)
                        continue
                    worker.job = (index, now)
            busy = [w for w in self._workers if w.job]
            # Stuck only if every worker is still starting, each for longer than the startup limit: the
            # limit is per (re)start, since workers replaced after timeouts start afresh late in a call.
            stuck = not busy and all(
                not w.ready and now - w.started > self.startup_timeout_s for w in self._workers
            )
            if stuck:
                raise RuntimeError(f"no math-verify worker became ready within {self.startup_timeout_s} s")
            deadline = min((w.job[1] + self.timeout_s for w in busy if w.job), default=now + 1.0)
            for connection in wait([w.connection for w in self._workers], timeout=max(0.0, deadline - now)):
                worker = next(w for w in self._workers if w.connection is connection)
                self._receive(worker, rewards, failed)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.job and now - worker.job[1] > self.timeout_s:
                    failed[worker.job[0]] = True
                    self.failures.timeouts += 1
                    self._replace(worker)
        return VerifyResult(rewards, sum(failed))

    def _receive(self, worker: _Worker, rewards: list[float], failed: list[bool]) -> None:
        try:
            message = worker.connection.recv()
        except (EOFError, OSError):  # the worker died (segfault, OOM kill): its item scores 0
            if not worker.ready:
                worker.process.join(timeout=5)
                raise RuntimeError(
                    f"a math-verify worker exited during startup (exit code {worker.process.exitcode}); "
                    "a script that uses MathVerifier must guard its entry point with "
                    "`if __name__ == '__main__':` (workers re-import the main module)"
                ) from None
            if worker.job:
                failed[worker.job[0]] = True
                self.failures.crashed += 1
            self._replace(worker)
            return
        if message == _READY:
            worker.ready = True
            return
        index, reward, item_failed = message
        rewards[index] = reward
        failed[index] = item_failed
        self.failures.unparseable += item_failed
        worker.job = None


# --------------------------------------------------------------------------------------------------
# Registry and reward scale

VERIFIERS: dict[str, Callable[..., Verifier]] = {
    "arithmetic": ArithmeticVerifier,
    "math": MathVerifier,
}


def get_verifier(name: str, **kwargs: Any) -> Verifier:
    """Build the verifier registered as `name` (`arithmetic`, `math`), or your own given as an import path
    `"package.module:Factory"` (from the CLIs too), with constructor `kwargs`. A factory is a class or
    function returning a `Verifier`: `verifier(responses, answers) -> VerifyResult` with rewards 0 or 1."""
    factory = VERIFIERS.get(name) or _imported_factory(name)
    taken = _named_options(factory) if kwargs else None
    unknown = sorted(set(kwargs) - set(kwargs if taken is None else taken))
    if unknown:  # name the options it takes
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)}; it takes: {', '.join(taken or ()) or 'none'}"
        )
    return factory(**kwargs)


def _named_options(factory: Callable[..., Verifier]) -> list[str] | None:
    """The keyword options `factory` takes, or None when it takes any (`**kwargs`) or has no
    inspectable signature (a C type): then the call itself says what is wrong."""
    import inspect

    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    return None if any(p.kind is p.VAR_KEYWORD for p in parameters.values()) else list(parameters)


def _imported_factory(path: str) -> Callable[..., Verifier]:
    """The callable `path` = "package.module:attribute" names, imported; a clear error otherwise."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"unknown verifier {path!r}; known: {sorted(VERIFIERS)}, or your own as 'package.module:Factory'"
        )
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"verifier {path!r}: cannot import module {module_name!r} ({err})") from err
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"verifier {path!r}: module {module_name!r} has no callable {attribute!r}")
    return factory


def binary_rewards(rewards: Sequence[float], verifier: str) -> torch.Tensor:
    """A verifier's rewards as float32 `[n]`, refused unless each is 0 or 1: the estimators' ±1 rewards,
    pass@k, the V0.5 support buffer and harvested pairs all count successes (design.md §4). A partial-credit
    verifier returning 0.5 (or 3.0) used to be trained on as given and truncated in pass@k."""
    import torch  # here, not at module level: see to_pm1

    correct = torch.as_tensor(rewards, dtype=torch.float32)  # [n]
    bad = torch.nonzero((correct != 0) & (correct != 1)).flatten()  # NaN included
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"verifier {verifier!r} returned reward {float(correct[i]):g} for rollout {i}: rewards must be 0 or 1 "
            "(a verifiable success or failure)"
        )
    return correct


def to_pm1(rewards: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Map {0, 1} rewards to {-1, +1} (design.md §4): r -> 2r - 1. Values in [0, 1] map linearly."""
    # Imported here, not at module level: the forkserver preloads this module for every math-verify
    # worker, and torch would add seconds to each worker start.
    import torch

    r = torch.as_tensor(rewards, dtype=torch.float32)  # [N]
    if r.numel() and (r.min() < 0 or r.max() > 1):
        raise ValueError(f"rewards must lie in [0, 1], got min {r.min().item()} max {r.max().item()}")
    return 2 * r - 1  # [N]


def main() -> None:
    """`python -m basis.rewards VERIFIER RESPONSE ANSWER`: score one pair."""
    import sys

    if len(sys.argv) != 4:
        raise SystemExit("usage: python -m basis.rewards {arithmetic,math} RESPONSE ANSWER")
    verifier = get_verifier(sys.argv[1])
    print(verifier([sys.argv[2]], [sys.argv[3]]))
    if isinstance(verifier, MathVerifier):
        verifier.close()


if __name__ == "__main__":
    main()
