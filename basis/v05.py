"""V0.5 pieces the policy trainer composes: the prior protocol, the support buffer, OSLA settings.

design.md §4: the frozen V0 prior predicts each prompt's success rate from a context of the current
policy's recent (prompt, success) pairs. That context is the `SupportBuffer`, a FIFO of the trainer's
own per-prompt outcomes (capacity 512; each prior query samples 256 of them). Until the buffer holds
`min_context` pairs of both classes (the prior's head labels `success >= label_threshold`, 0.5 by
default), or when the prior fails
at run time (exception, non-finite output), the trainer falls back to the empirical baseline for that
step and logs it.

The math of the fused baseline, the OSLA budget and the estimators lives in `basis.advantages`; this
module holds the state around it, loading a prior, and the online Platt recalibration (`fit_platt`,
`PriorCalibrator`, our extension).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from basis.advantages import k_max_for

BUFFER_FORMAT = 1


@runtime_checkable
class SuccessPrior(Protocol):
    """What the trainer needs from a value prior (`value_prior.ValuePrior` implements it)."""

    def predict(
        self, context_prompts: Sequence[str], context_success: Sequence[float], query_prompts: Sequence[str]
    ) -> torch.Tensor:
        """Success probabilities `[Q]` in [0, 1] for `query_prompts`, given the policy's context pairs."""
        ...

    def prepare(self, prompts: Sequence[str]) -> None:
        """Precompute per-prompt work (embeddings) for prompts that will be queried; may do nothing."""
        ...


@dataclass(frozen=True)
class OslaSettings:
    """OSLA adaptive budget (design.md §4); paper values as defaults.

    Args:
        c: Cost per rollout in R(k) = MSE(k) + c k; k_max = floor(1/sqrt(c)) (0.0039 -> 16).
        pad_to: Pad each round's total rollouts to a multiple of this (our choice; paper: a multiple of
            the engine's parallel width). 1 disables padding.
        min_active_frac: Skip a round for the whole batch when fewer than this fraction of prompts still
            need rollouts (our choice; 0 never skips).
        max_rounds: Safety cap on rounds after the initial k_init round.
    """

    c: float = 0.0039
    pad_to: int = 1
    min_active_frac: float = 0.0
    max_rounds: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.c <= 1:
            raise ValueError(f"model.osla.c must lie in (0, 1], got {self.c}")
        if self.pad_to < 1 or self.max_rounds < 1:
            raise ValueError("model.osla.pad_to and model.osla.max_rounds must be >= 1")
        if not 0 <= self.min_active_frac <= 1:
            raise ValueError(f"model.osla.min_active_frac must lie in [0, 1], got {self.min_active_frac}")

    @property
    def k_max(self) -> int:
        return k_max_for(self.c)


def has_both_classes(success: Sequence[float], threshold: float = 0.5) -> bool:
    """True when `success` holds a success (rate >= `threshold`) and a failure: a context the prior's head
    can read."""
    return len({rate >= threshold for rate in success}) == 2


class SupportBuffer:
    """FIFO of the current policy's recent (prompt, success rate) pairs: the prior's context.

    Args:
        capacity: Pairs kept (oldest dropped first).
        context_size: Pairs sampled (without replacement) for one prior query.
        min_context: Pairs needed, with both classes present, before the buffer serves a context.
        label_threshold: Success rate at or above which a pair counts as a success: the prior's own
            (`ValuePrior.label_threshold`), so that "both classes" means what its head will read.
    """

    def __init__(
        self,
        capacity: int = 512,
        context_size: int = 256,
        min_context: int = 32,
        label_threshold: float = 0.5,
    ) -> None:
        if not 1 <= min_context <= context_size <= capacity:
            raise ValueError(
                f"need 1 <= min_context ({min_context}) <= context_size ({context_size}) <= capacity ({capacity})"
            )
        self.capacity, self.context_size, self.min_context = capacity, context_size, min_context
        self.label_threshold = label_threshold
        self.pairs: deque[tuple[str, float]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.pairs)

    def add(self, prompts: Sequence[str], success: Sequence[float]) -> None:
        for prompt, rate in zip(prompts, success, strict=True):
            self.pairs.append((prompt, float(rate)))

    def ready(self) -> bool:
        """True when a context can be served: enough pairs and both labels (success >= label_threshold or not)."""
        rates = [rate for _, rate in self.pairs]
        return len(self.pairs) >= self.min_context and has_both_classes(rates, self.label_threshold)

    def sample(self, rng: np.random.Generator) -> tuple[list[str], list[float]]:
        """A context of `min(context_size, len)` pairs drawn without replacement."""
        take = min(self.context_size, len(self.pairs))
        chosen = rng.choice(len(self.pairs), size=take, replace=False)
        pairs = [self.pairs[i] for i in np.sort(chosen)]
        return [p for p, _ in pairs], [s for _, s in pairs]

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": BUFFER_FORMAT,
            "capacity": self.capacity,
            "prompts": [p for p, _ in self.pairs],
            "success": [s for _, s in self.pairs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != BUFFER_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"support buffer in the checkpoint has format {found!r}; this trainer reads format "
                f"{BUFFER_FORMAT}. Resume with the version that wrote it, or start a new run."
            )
        self.pairs.clear()
        self.add(state["prompts"][-self.capacity :], state["success"][-self.capacity :])


def load_prior(prior: str | SuccessPrior) -> SuccessPrior:
    """A prior object as is, or an exported prior artifact folder loaded with `ValuePrior.load`."""
    if not isinstance(prior, str):
        if not isinstance(prior, SuccessPrior):
            raise ValueError(
                "model.prior must be a path or an object with predict(...) and prepare(...) "
                f"(basis.v05.SuccessPrior); got {type(prior).__name__}"
            )
        return prior
    from pathlib import Path

    if not Path(prior).exists():
        raise ValueError(f"model.prior {prior!r} does not exist; export one with `value-prior fit`")
    from value_prior import ValuePrior

    return ValuePrior.load(prior)


def prior_provenance(path: str) -> dict[str, str]:
    """What identifies an exported prior folder as loaded: its resolved path, a sha256 over its files
    (a later export into the same folder changes it) and the `value-prior fit` run that exported it."""
    import json
    from pathlib import Path

    from basis.tracking import files_sha256

    folder = Path(path).resolve()
    config = (folder / "config.json").read_text()
    run_id = (json.loads(config).get("info") or {}).get("mlflow_run_id")
    return {
        "prior_path": str(folder),
        "prior_sha256": files_sha256([folder]),
        "prior_run_id": str(run_id),
        "config": config,
    }


def fit_platt(
    logits: torch.Tensor, successes: torch.Tensor, trials: torch.Tensor, ridge: float = 1.0, iters: int = 50
) -> tuple[float, float]:
    """Platt scaling `p' = sigmoid(a * logit + b)`: the MAP fit of `successes` out of `trials` (all `[M]`)
    under a binomial likelihood and a Gaussian prior of precision `ridge` around the identity
    (a, b) = (1, 0), by damped Newton steps, constrained to a >= 0. The prior keeps the fit sane when
    outcomes are one-sided (all failures would otherwise send b to -inf). The constraint keeps the map
    monotone: a one-class window whose logits lie on one side of 0 (an optimistic V0, a policy that
    fails everything) barely identifies the slope, and its unconstrained MAP can have a < 0, which maps
    the prompts V0 rates hardest to near-certain success. The objective is convex, so when the
    unconstrained optimum has a < 0 the constrained one lies on a = 0: the shift alone is refitted."""
    x = logits.double()  # [M]
    k, n = successes.double(), trials.double()  # [M], [M]
    design = torch.stack([x, torch.ones_like(x)], dim=1)  # [M, 2]
    identity = torch.tensor([1.0, 0.0], dtype=torch.float64)  # [2]
    theta = _platt_newton(design, k, n, identity, ridge, iters)  # (a, b)
    if float(theta[0]) >= 0:
        return float(theta[0]), float(theta[1])
    # a = 0: a * logit drops out and the prior's (a - 1)^2 term is a constant
    shift = _platt_newton(design[:, 1:], k, n, identity[1:], ridge, iters)  # [1]
    return 0.0, float(shift[0])


def _platt_newton(
    design: torch.Tensor, k: torch.Tensor, n: torch.Tensor, identity: torch.Tensor, ridge: float, iters: int
) -> torch.Tensor:
    """Damped Newton MAP of `sigmoid(design @ theta)` (`design` `[M, D]`) with prior N(identity, 1/ridge)."""
    theta = identity.clone()  # [D]
    eye = torch.eye(design.shape[1], dtype=torch.float64)  # [D, D]
    for _ in range(iters):
        p = torch.sigmoid(design @ theta)  # [M]
        grad = design.T @ (n * p - k) + ridge * (theta - identity)  # [D]
        hess = design.T @ (design * (n * p * (1 - p)).unsqueeze(1)) + ridge * eye  # [D, D]
        step = torch.linalg.solve(hess, grad).clamp(-1.0, 1.0)  # [D], damped
        theta = theta - step
        if float(step.abs().max()) < 1e-8:
            break
    return theta  # [D]


class PriorCalibrator:
    """Online Platt recalibration of the prior against the policy's own recent outcomes.

    Our extension (not in the V0.5 paper, off by default): V0 reads the policy's context but may still
    be miscalibrated for it, and the fused baseline's hypothesis test compares the prior to rollout
    means in absolute terms, so a miscalibrated prior is rejected (and OSLA samples) needlessly. The
    calibrator refits `(a, b)` on the previous `window` prompts' (prior logit, successes, rollouts)
    before each step; a step's own rollouts never enter its calibration, so the test and its
    1/sqrt(k) bias bound are unchanged.

    Args:
        window: Recent prompts the fit uses.
        min_prompts: Prompts needed before the calibration departs from the identity.
    """

    def __init__(self, window: int = 512, min_prompts: int = 64) -> None:
        self.window, self.min_prompts = window, min_prompts
        self.history: deque[tuple[float, float, float]] = deque(maxlen=window)
        self.scale, self.shift = 1.0, 0.0

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        """Recalibrated success probabilities `[P]` for raw prior probabilities `p` `[P]`."""
        logit = torch.logit(p.double().clamp(1e-4, 1 - 1e-4))  # [P]
        return torch.sigmoid(self.scale * logit + self.shift).to(p.dtype)  # [P]

    def update(self, p: torch.Tensor, successes: torch.Tensor, trials: torch.Tensor) -> None:
        """Record this step's raw prior `p` `[P]` with its realised successes out of `trials`, and refit."""
        logit = torch.logit(p.double().clamp(1e-4, 1 - 1e-4))  # [P]
        self.history.extend(zip(logit.tolist(), successes.double().tolist(), trials.double().tolist()))
        if len(self.history) >= self.min_prompts:
            x, k, n = (torch.tensor(column) for column in zip(*self.history))
            self.scale, self.shift = fit_platt(x, k, n)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "scale": self.scale, "shift": self.shift}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque((tuple(row) for row in state["history"]), maxlen=self.window)
        self.scale, self.shift = float(state["scale"]), float(state["shift"])
