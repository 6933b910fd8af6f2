"""V0's in-context head: a TabPFN classifier, loaded from a checkpoint or prior-fitted here (design.md §3).

The head reads a support table (context prompts' features `X_s`, binary labels
`y_s = 1[success_rate >= 0.5]`) and query features `X_q` in one forward pass and returns logits over
{fail, success} for each query. It is a plain `tabpfn` architecture called directly (no sklearn
ensemble or preprocessing), so it is differentiable in both `X_s` and `X_q` and batched over
episodes.

Pretrained TabPFN weights cannot be downloaded here, so the offline default head is *prior-fitted by
this project* (PFN training, Müller et al. 2022): sample synthetic "capability" tasks, show the head
the support rows, train it to predict the held-out query rows in context. `CapabilityPrior` mirrors
the structure of real query-performance pairs: a prompt latent, a strong shared difficulty direction,
a policy-specific skill direction and ability offset, sparse/irrelevant feature columns, optional
non-linear skill, and 10 Bernoulli rollouts per prompt binarised at 0.5.

Deviations from TabPFN's own training (ours, documented): the query loss is cross-entropy against the
generator's true success probability `p(x)` (lower gradient variance than a sampled label), so the
head's output estimates the *success rate* E[p | x] that the V0.5 baseline consumes, not the
probability of the binarised label; the support size follows a curriculum (small contexts first);
and the architecture's multiclass target densification is switched off
(`use_multiclass_target_encoding = False`, design.md §3) so a single-class support is not silently
relabelled. `TabPFNClassifier(model_path=...)` turns it on again from the config, which changes what
query rows see; switch it off on the fitted classifier's model (`clf.models_[0]`) to get the head's
exact predictions (tested).

Optional input transform (ours, `input_transform="discriminant"`, saved in the checkpoint; off in
the default head, which reads raw features as the paper's does): features are whitened with the
support's statistics and the support's linear discriminant score is appended as one more column.
Reason, measured: the small (2-layer, 64-wide) PFN ranks like Gaussian naive Bayes (held-out AUC 0.797
vs naive Bayes 0.796, LDA 0.835, logistic regression 0.838): it reads each feature group on its own
and misses correlated features. TabPFN's own inference pipeline appends engineered columns (SVD
components) for the same reason; the head still decides in context how far to trust the column.
The shipped discriminant head reaches 0.835, but V0 trained with it was not better on the release
data (value_prior/heads/README.md), so it is an option, not the default.

Checkpoints are saved as `{"state_dict", "config", "architecture_name", "inference_config"}` plus a
`"value_prior_head"` record, which `tabpfn.TabPFNClassifier(model_path=...)` loads. The stored
inference config switches off TabPFN's sklearn-side preprocessing ensemble, because the head was
trained on raw features.

Run: `value-prior prior-fit --max_steps 3000 --out artifacts/heads/my_head.ckpt` (see `PriorFitConfig`
for every flag; `value_prior/heads/README.md` has the commands that made the shipped heads).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

HEAD_KIND = "value_prior_head"
SUPPORTED_ARCHITECTURES = ("tabpfn_v2", "tabpfn_v2_6")
"""TabPFN architectures that pass gradients to their inputs (design.md §3: v3 barely does)."""


class HeadCheckpointError(ValueError):
    """A head checkpoint that is missing, unreadable or not a TabPFN classifier."""


# ----------------------------------------------------------------------------------------------
# The head module
# ----------------------------------------------------------------------------------------------


def build_tabpfn(
    emsize: int = 64, nlayers: int = 2, nhead: int = 4, features_per_group: int = 2, seed: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh TabPFN v2 classifier architecture for 2 classes and its config dict."""
    from tabpfn.architectures import tabpfn_v2

    if emsize % nhead:
        raise ValueError(f"emsize ({emsize}) must be divisible by nhead ({nhead})")
    config = {
        "emsize": emsize,
        "nlayers": nlayers,
        "nhead": nhead,
        "features_per_group": features_per_group,
        "seed": seed,
        "max_num_classes": 2,
    }
    parsed, _ = tabpfn_v2.parse_config(config)
    return tabpfn_v2.get_architecture(parsed), dataclasses.asdict(parsed)


INPUT_TRANSFORMS = ("none", "discriminant")


def whiten_by_support(support_x: Tensor, query_x: Tensor, ridge: float = 0.05) -> tuple[Tensor, Tensor]:
    """Decorrelate support and query features with the support rows' mean and covariance.

    Standardise every column by the support's mean and std, then multiply by the inverse Cholesky
    factor of the support's correlation matrix (plus `ridge` on its diagonal), so the support
    features have (nearly) identity covariance. A small TabPFN reads features one group at a time
    and ranks like a naive-Bayes classifier (measured: the same held-out AUC); on whitened features
    that per-feature evidence is what linear discriminant analysis / logistic regression use.
    Differentiable in both inputs (Cholesky and a triangular solve, no eigen-decomposition).

    Args:
        support_x: `[B, N, F]` support features.
        query_x: `[B, M, F]` query features.
        ridge: Added to the correlation matrix's diagonal (keeps it invertible for constant or
            collinear columns and N < F).

    Returns:
        The whitened `(support_x, query_x)`.
    """
    n = support_x.shape[1]
    mean = support_x.mean(1, keepdim=True)  # [B, 1, F]
    std = support_x.std(1, keepdim=True, correction=min(1, n - 1))  # [B, 1, F]
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # a constant column: centre only (TabPFN's rule)
    support = (support_x - mean) / std  # [B, N, F]
    query = (query_x - mean) / std  # [B, M, F]
    eye = torch.eye(support.shape[-1], dtype=support.dtype, device=support.device)
    corr = support.transpose(1, 2) @ support / max(1, n - 1) + ridge * eye  # [B, F, F]
    factor = torch.linalg.cholesky(corr)  # [B, F, F] lower, corr = L L^T
    # x L^{-T}: solve L z^T = x^T, so z has identity covariance on the support.
    support = torch.linalg.solve_triangular(factor, support.transpose(1, 2), upper=False).transpose(1, 2)
    query = torch.linalg.solve_triangular(factor, query.transpose(1, 2), upper=False).transpose(1, 2)
    return support, query


def append_discriminant(support_x: Tensor, query_x: Tensor, support_y: Tensor) -> tuple[Tensor, Tensor]:
    """Append the support's linear discriminant score as one more feature column.

    On whitened features the class-mean difference `d = mean(x | y=1) - mean(x | y=0)` is the
    direction of Fisher's linear discriminant (the total covariance differs from the within-class one
    by a rank-one term along `d`), so `x . d`, scaled to unit std on the support, is the in-context
    LDA score. A single-class support has no discriminant: the column is 0.
    """
    y = support_y.to(support_x.dtype)[..., None]  # [B, N, 1]
    positives, negatives = y.sum(1), (1 - y).sum(1)  # [B, 1]
    mean_success = (support_x * y).sum(1) / positives.clamp(min=1)  # [B, F]
    mean_failure = (support_x * (1 - y)).sum(1) / negatives.clamp(min=1)  # [B, F]
    direction = (mean_success - mean_failure) * ((positives > 0) & (negatives > 0))  # [B, F], 0 if one class
    support_score = support_x @ direction[..., None]  # [B, N, 1]
    scale = support_score.std(1, keepdim=True, correction=0).clamp(min=1e-6)  # [B, 1, 1]
    query_score = query_x @ direction[..., None]  # [B, M, 1]
    return torch.cat([support_x, support_score / scale], -1), torch.cat([query_x, query_score / scale], -1)


class InContextHead(nn.Module):
    """A TabPFN classifier used as a batched, differentiable in-context head.

    Args:
        model: The TabPFN architecture (`tabpfn.architectures.*`), with `max_num_classes >= 2`.
        config: Its architecture config dict (stored with the checkpoint).
        architecture_name: `"tabpfn_v2"` or `"tabpfn_v2_6"`.
        info: Free-form provenance (prior-fit settings, metrics) saved with the checkpoint.
        input_transform: `"none"` (raw features, as TabPFN's own checkpoints expect) or
            `"discriminant"`: features are decorrelated with the support rows' own statistics
            (`whiten_by_support`) and the support's linear discriminant score is appended as one
            more column (`append_discriminant`), computed in the forward pass like TabPFN's own
            SVD-feature preprocessing. Part of the head: saved in its checkpoint, so a head is
            always used with the transform it was prior-fitted with.
    """

    def __init__(
        self,
        model: nn.Module,
        config: dict[str, Any],
        architecture_name: str = "tabpfn_v2",
        info: dict[str, Any] | None = None,
        input_transform: str = "none",
    ) -> None:
        super().__init__()
        self.model = model
        # Off so a single-class support is not densified to class 0 (design.md §3 pitfall).
        self.model.use_multiclass_target_encoding = False
        self.config = dict(config)
        self.architecture_name = architecture_name
        self.info = dict(info or {})
        self.input_transform = input_transform  # validated by the property

    @property
    def input_transform(self) -> str:
        return self._input_transform

    @input_transform.setter
    def input_transform(self, value: str) -> None:
        if value not in INPUT_TRANSFORMS:
            raise ValueError(f"unknown input_transform {value!r} (use one of {INPUT_TRANSFORMS})")
        self._input_transform = value

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Logits over {fail, success} for every query row.

        Args:
            support_x: `[B, N, F]` support features (B episodes of N rows).
            support_y: `[B, N]` binary labels (0./1.).
            query_x: `[B, M, F]` query features.

        Returns:
            `[B, M, 2]` logits.
        """
        if self.input_transform == "discriminant":
            support_x, query_x = append_discriminant(*whiten_by_support(support_x, query_x), support_y)
        x = torch.cat([support_x, query_x], dim=1).transpose(0, 1)  # [N+M, B, F]
        y = support_y.transpose(0, 1).to(x.dtype)  # [N, B]
        logits = self.model(x, y)  # [M, B, n_out]
        return logits[..., :2].transpose(0, 1)  # [B, M, 2]

    def success_logit(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """`s = logit_1 - logit_0` per query, `[B, M]` (the pairwise-loss score of design.md §3)."""
        logits = self(support_x, support_y, query_x)  # [B, M, 2]
        return logits[..., 1] - logits[..., 0]  # [B, M]

    def checkpoint(self) -> dict[str, Any]:
        """The dict that `TabPFNClassifier(model_path=...)` and `load_head` read."""
        return {
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "config": self.config,
            "architecture_name": self.architecture_name,
            "inference_config": raw_features_inference_config(),
            HEAD_KIND: {"format": 1, **self.info, "input_transform": self.input_transform},
        }

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint to `path` atomically: a failed or interrupted save keeps the old file.

        Prior-fit saves over its `--out` after every evaluation, so writing in place would turn a full
        disk or a stop mid-write into a truncated file in place of the last good head.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.partial")  # same folder, so the rename is atomic
        try:
            torch.save(self.checkpoint(), partial)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return path


def raw_features_inference_config() -> dict[str, Any]:
    """TabPFN inference config for a head trained on raw features: one estimator, no preprocessing."""
    from tabpfn.constants import ModelVersion
    from tabpfn.inference_config import InferenceConfig

    config = dataclasses.asdict(InferenceConfig.get_default("multiclass", ModelVersion.V2))
    config["PREPROCESS_TRANSFORMS"] = [
        {
            "name": "none",
            "categorical_name": "numeric",
            "append_original": False,
            "max_features_per_estimator": 1_000_000,
            "global_transformer_name": None,
            "max_onehot_cardinality": None,
            "differentiable": False,
        }
    ]
    config.update(
        FEATURE_SHIFT_METHOD=None,
        CLASS_SHIFT_METHOD=None,
        FINGERPRINT_FEATURE=False,
        POLYNOMIAL_FEATURES="no",
        OUTLIER_REMOVAL_STD=None,
        SOFTMAX_TEMPERATURE=1.0,
    )
    return config


def load_head(path: str | Path) -> InContextHead:
    """Load a TabPFN classifier checkpoint (ours or any v2 / v2.6 one) as an `InContextHead`.

    Raises `HeadCheckpointError` naming the path when the file is missing, is not a TabPFN
    checkpoint (e.g. a Lightning checkpoint or a V0 adapter), or holds a regressor.
    """
    from tabpfn.architectures import ARCHITECTURES

    path = Path(path)
    if not path.is_file():
        raise HeadCheckpointError(f"head checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from tabpfn.checkpoint import Checkpoint

            checkpoint = Checkpoint(path).load()
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user error
        raise HeadCheckpointError(
            f"head checkpoint {path}: not a readable torch/safetensors file ({err})"
        ) from err
    if not isinstance(checkpoint, dict) or not {"state_dict", "config"} <= set(checkpoint):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise HeadCheckpointError(
            f"head checkpoint {path}: not a TabPFN checkpoint (needs 'state_dict' and 'config', found {found})"
        )
    name = checkpoint.get("architecture_name", "tabpfn_v2")
    if name not in SUPPORTED_ARCHITECTURES or name not in ARCHITECTURES:
        raise HeadCheckpointError(
            f"head checkpoint {path}: architecture {name!r} is not supported as a differentiable head "
            f"(use one of {SUPPORTED_ARCHITECTURES})"
        )
    raw_config = checkpoint["config"]
    if not isinstance(raw_config, dict) or "max_num_classes" not in raw_config:
        found = sorted(raw_config)[:8] if isinstance(raw_config, dict) else type(raw_config).__name__
        raise HeadCheckpointError(
            f"head checkpoint {path}: its 'config' is not a TabPFN classifier's (no 'max_num_classes', found {found})"
        )
    architecture = ARCHITECTURES[name]
    try:
        config, _ = architecture.parse_config(raw_config)
    except (TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        raise HeadCheckpointError(
            f"head checkpoint {path}: its config is not a valid {name} config ({err})"
        ) from err
    if config.max_num_classes < 2:
        raise HeadCheckpointError(
            f"head checkpoint {path}: a TabPFN regressor (max_num_classes={config.max_num_classes}); "
            "V0 needs a classifier"
        )
    model = architecture.get_architecture(config)
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("criterion.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise HeadCheckpointError(f"head checkpoint {path}: weights do not fit its config ({err})") from err
    info = dict(checkpoint.get(HEAD_KIND, {}))
    transform = info.pop("input_transform", "none")  # TabPFN's own checkpoints: raw features
    try:
        return InContextHead(model.eval(), dataclasses.asdict(config), name, info, input_transform=transform)
    except ValueError as err:
        raise HeadCheckpointError(f"head checkpoint {path}: {err}") from err


# ----------------------------------------------------------------------------------------------
# The synthetic capability prior
# ----------------------------------------------------------------------------------------------


class SyntheticTasks(NamedTuple):
    """A batch of synthetic capability tasks; the first `num_support` rows are the support."""

    x: Tensor  # [B, R, F] prompt features
    label: Tensor  # [B, R] 1[successes / rollouts >= 0.5]
    success_prob: Tensor  # [B, R] true per-rollout success probability p(u) of the prompt's latent u
    num_support: int
    bayes_prob: Tensor | None = None  # [B, R] P(label = 1 | x, task): Bayes-optimal given the features


@dataclasses.dataclass(frozen=True)
class CapabilityPrior:
    """Generator of synthetic policy-on-prompts tasks (design.md §3, PFN prior).

    Per task: prompts carry a latent `u ~ N(0, I_r)` (r <= F) seen through a random linear map and
    column noise as F features, some of them irrelevant; the policy's per-rollout success logit is
    `a + beta * <w, u> (+ gamma * tanh(<v, u>))` with `w` a mix of a difficulty direction and a
    policy-specific skill direction; successes ~ Binomial(rollouts, sigmoid(logit)).

    Args:
        rollouts: Rollouts per prompt (labels are 1[successes / rollouts >= 0.5]).
        ability_std: Std of the policy's ability offset `a` (sets the base success rate).
        signal_range: Log-uniform range of `beta`, the strength of the prompt signal.
        nonlinear_prob: Share of tasks with an extra non-linear skill term.
        irrelevant_max_frac: Up to this share of feature columns carries only noise.
        feature_noise_range: Uniform range of per-column observation-noise std.
    """

    rollouts: int = 10
    ability_std: float = 1.2
    signal_range: tuple[float, float] = (0.3, 4.0)
    nonlinear_prob: float = 0.3
    irrelevant_max_frac: float = 0.5
    feature_noise_range: tuple[float, float] = (0.0, 0.7)

    def sample(
        self,
        batch: int,
        num_rows: int,
        num_features: int,
        num_support: int,
        generator: torch.Generator,
        bayes_samples: int = 0,
    ) -> SyntheticTasks:
        """`batch` tasks of `num_rows` prompts with `num_features` features each.

        With `bayes_samples > 0` the tasks also carry `bayes_prob`, the Bayes-optimal
        `P(label = 1 | x)` of a predictor that knows the task's parameters but, like the head, sees
        only the features: the latent's Gaussian posterior given x is integrated by Monte Carlo
        (its own fixed-seed generator, so the main stream is unchanged).
        """
        B, R, Fe = batch, num_rows, num_features
        g = generator
        rank = torch.randint(1, Fe + 1, (B,), generator=g)  # latent dimension per task
        latent_mask = (torch.arange(Fe)[None, :] < rank[:, None]).float()  # [B, F]
        u = torch.randn(B, R, Fe, generator=g) * latent_mask[:, None, :]  # [B, R, F]
        mixing = torch.randn(B, Fe, Fe, generator=g) / math.sqrt(Fe)  # [B, F, F]
        mixing = (
            mixing + torch.eye(Fe) * torch.rand(B, 1, 1, generator=g) * 2
        )  # keep some axis-aligned signal
        relevant = torch.rand(B, Fe, generator=g) >= torch.rand(B, 1, generator=g) * self.irrelevant_max_frac
        lo, hi = self.feature_noise_range
        noise_std = lo + (hi - lo) * torch.rand(B, 1, Fe, generator=g)  # [B, 1, F]
        x = torch.einsum("brl,blf->brf", u, mixing) * relevant[:, None, :]  # [B, R, F]
        x = (
            x
            + noise_std * torch.randn(B, R, Fe, generator=g)
            + (~relevant[:, None, :]) * torch.randn(B, R, Fe, generator=g)
        )
        # Random per-column scale and shift: the head must standardise for itself.
        x_raw = x
        x = x * torch.exp(torch.randn(B, 1, Fe, generator=g)) + torch.randn(B, 1, Fe, generator=g) * 2

        difficulty = F.normalize(torch.randn(B, Fe, generator=g) * latent_mask, dim=-1)  # [B, F]
        skill = F.normalize(torch.randn(B, Fe, generator=g) * latent_mask, dim=-1)  # [B, F]
        mix = torch.rand(B, 1, generator=g) * 0.6  # policy-specific share of the direction
        direction = F.normalize((1 - mix) * difficulty + mix * skill, dim=-1)  # [B, F]
        log_lo, log_hi = math.log(self.signal_range[0]), math.log(self.signal_range[1])
        beta = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(B, 1, generator=g))  # [B, 1]
        ability = self.ability_std * torch.randn(B, 1, generator=g)  # [B, 1]
        logit = ability + beta * torch.einsum("brf,bf->br", u, direction)  # [B, R]
        nonlinear = (torch.rand(B, 1, generator=g) < self.nonlinear_prob).float()  # [B, 1]
        v = F.normalize(torch.randn(B, Fe, generator=g) * latent_mask, dim=-1)  # [B, F]
        logit = logit + nonlinear * beta * torch.tanh(2 * torch.einsum("brf,bf->br", u, v))  # [B, R]

        p = torch.sigmoid(logit)  # [B, R]
        successes = torch.binomial(torch.full_like(p, float(self.rollouts)), p, generator=g)  # [B, R]
        label = (successes / self.rollouts >= 0.5).float()  # [B, R]
        bayes = None
        if bayes_samples > 0:
            # x_raw = u A + e, u ~ N(0, diag(m)), e ~ N(0, diag(d)); the affine rescaling of x is invertible.
            a = (mixing * relevant[:, None, :]).double()  # [B, L, F]
            d = (noise_std[:, 0, :] ** 2 + (~relevant).float()).double()  # [B, F]
            cov_uu = torch.diag_embed(latent_mask.double())  # [B, L, L]
            cov_xx = a.transpose(1, 2) @ cov_uu @ a + torch.diag_embed(d)  # [B, F, F]
            gain = cov_uu @ a @ torch.linalg.inv(cov_xx)  # [B, L, F]
            mean = torch.einsum("brf,blf->brl", x_raw.double(), gain)  # [B, R, L]
            post_cov = cov_uu - gain @ a.transpose(1, 2) @ cov_uu  # [B, L, L]
            post_cov = (post_cov + post_cov.transpose(1, 2)) / 2
            eigval, eigvec = torch.linalg.eigh(post_cov)  # rounding can leave tiny negative eigenvalues
            root = eigvec * eigval.clamp(min=0).sqrt()[:, None, :]  # [B, L, L], root @ root.T = post_cov
            mc = torch.Generator().manual_seed(12345)
            eps = torch.randn(B, bayes_samples, Fe, generator=mc, dtype=torch.float64)  # [B, S, L]
            u_post = mean[:, :, None, :] + torch.einsum("bsl,bkl->bsk", eps, root)[:, None]  # [B, R, S, L]
            direction64, v64 = direction.double(), v.double()
            logit_post = ability.double()[:, :, None] + beta.double()[:, :, None] * torch.einsum(
                "brsl,bl->brs", u_post, direction64
            )  # [B, R, S]
            logit_post = logit_post + (nonlinear * beta).double()[:, :, None] * torch.tanh(
                2 * torch.einsum("brsl,bl->brs", u_post, v64)
            )  # [B, R, S]
            bayes = label_probability(torch.sigmoid(logit_post), self.rollouts).mean(-1).float()  # [B, R]
        return SyntheticTasks(x=x, label=label, success_prob=p, num_support=num_support, bayes_prob=bayes)


def label_probability(p: Tensor, rollouts: int) -> Tensor:
    """`P(Binomial(rollouts, p) / rollouts >= 0.5)`, elementwise."""
    first = math.ceil(rollouts / 2)
    k = torch.arange(first, rollouts + 1, dtype=p.dtype)  # [K]
    comb = torch.tensor([math.comb(rollouts, j) for j in range(first, rollouts + 1)], dtype=p.dtype)  # [K]
    return (comb * p[..., None] ** k * (1 - p[..., None]) ** (rollouts - k)).sum(-1)


def binary_auc(score: np.ndarray, label: np.ndarray) -> float | None:
    """ROC AUC of one task (None when the labels have one class)."""
    from sklearn.metrics import roc_auc_score

    if label.min() == label.max():
        return None
    return float(roc_auc_score(label, score))


def evaluate_head_on_tasks(head: InContextHead, tasks: SyntheticTasks) -> dict[str, float]:
    """Mean per-task query AUC of the head, of a logistic regression on the same support, and of Bayes.

    `bayes`: ranks queries by `tasks.bayes_prob`, the Bayes-optimal `P(label | x)` given the task
    parameters (sample the tasks with `bayes_samples > 0`); `oracle_latent`: ranks by the true success
    probability of the unobserved latent, an upper bound no predictor from x reaches. Tasks with a
    single-class support or query set are skipped.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    n = tasks.num_support
    with torch.no_grad():
        logits = head.success_logit(tasks.x[:, :n], tasks.label[:, :n], tasks.x[:, n:])  # [B, M]
    scores: dict[str, list[float]] = {"head": [], "logreg": [], "oracle_latent": []}
    if tasks.bayes_prob is not None:
        scores["bayes"] = []
    for b in range(tasks.x.shape[0]):
        support_y = tasks.label[b, :n].numpy()
        query_y = tasks.label[b, n:].numpy()
        if support_y.min() == support_y.max() or query_y.min() == query_y.max():
            continue  # no AUC (or no logistic regression) on a single-class task
        scaler = StandardScaler().fit(tasks.x[b, :n].numpy())
        lr = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(tasks.x[b, :n].numpy()), support_y)
        lr_score = lr.decision_function(scaler.transform(tasks.x[b, n:].numpy()))
        scores["head"].append(binary_auc(logits[b].numpy(), query_y))
        scores["logreg"].append(binary_auc(lr_score, query_y))
        scores["oracle_latent"].append(binary_auc(tasks.success_prob[b, n:].numpy(), query_y))
        if tasks.bayes_prob is not None:
            scores["bayes"].append(binary_auc(tasks.bayes_prob[b, n:].numpy(), query_y))
    return {name: float(np.mean(values)) for name, values in scores.items()} | {"tasks": len(scores["head"])}


# ----------------------------------------------------------------------------------------------
# Prior-fit (PFN training) as a LightningModule
# ----------------------------------------------------------------------------------------------


class PriorFitModule(L.LightningModule):
    """Prior-fits an `InContextHead` on synthetic tasks (PFN training); evaluates on fixed held-out tasks.

    Args:
        head: The head to train (a fresh `build_tabpfn` or a checkpoint to continue).
        eval_tasks: Fixed held-out tasks, scored against logistic regression and Bayes-optimal.
        lr: Peak AdamW learning rate (cosine decay after `warmup_steps`).
        warmup_steps: Linear warm-up steps.
        max_steps: Total steps (for the schedule).
        save_to: Save the head here after every evaluation, so a stopped run leaves its latest head.
    """

    def __init__(
        self,
        head: InContextHead,
        eval_tasks: SyntheticTasks,
        lr: float = 1e-3,
        warmup_steps: int = 100,
        max_steps: int = 3000,
        save_to: str | None = None,
    ) -> None:
        super().__init__()
        self.head = head
        self.head.model.train()
        self.eval_tasks = eval_tasks
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.save_to = save_to
        self.last_eval: dict[str, float] = {}

    def training_step(self, tasks: SyntheticTasks, batch_idx: int) -> Tensor:
        n = tasks.num_support
        logits = self.head(tasks.x[:, :n], tasks.label[:, :n], tasks.x[:, n:])  # [B, M, 2]
        log_prob = logits.log_softmax(-1)  # [B, M, 2]
        target = tasks.success_prob[:, n:]  # [B, M] Rao-Blackwellised soft target
        loss = -(target * log_prob[..., 1] + (1 - target) * log_prob[..., 0]).mean()
        self.log("prior_fit/loss", loss, prog_bar=True)
        self.log("prior_fit/num_support", float(n))
        return loss

    def on_train_epoch_end(self) -> None:
        self.head.model.eval()
        self.last_eval = evaluate_head_on_tasks(self.head, self.eval_tasks)
        self.head.model.train()
        for name in ("head", "logreg", "bayes", "oracle_latent"):
            if name in self.last_eval:
                self.log(f"prior_fit/eval_auc_{name}", self.last_eval[name])
        if "bayes" in self.last_eval:
            self.log("prior_fit/eval_gap_to_bayes", self.last_eval["bayes"] - self.last_eval["head"])
        log.info(
            "prior-fit step %d: held-out AUC %s",
            self.global_step,
            {k: round(v, 4) for k, v in self.last_eval.items()},
        )
        if self.save_to is not None:
            self.head.info.update(eval=self.last_eval, step=self.global_step)
            self.head.save(self.save_to)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=0.0)

        def schedule(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SyntheticTaskStream(torch.utils.data.IterableDataset):
    """Endless stream of `CapabilityPrior` batches with a support-size curriculum.

    Batch `i` draws its feature count uniformly from `features_range` and its support size
    log-uniformly from `[support_range[0], ceiling(i)]`, where the ceiling grows log-linearly from
    `4 * support_range[0]` to `support_range[1]` over `curriculum_steps` batches (small contexts first).
    The random stream and the batch counter live on the object, so a new `iter()` (Lightning starts
    one per epoch) continues the stream instead of replaying it. Single-process only.
    """

    def __init__(
        self,
        prior: CapabilityPrior,
        features_range: tuple[int, int],
        support_range: tuple[int, int],
        curriculum_steps: int,
        num_query: int,
        tasks_per_step: int,
        seed: int,
    ) -> None:
        super().__init__()
        if features_range[0] < 1 or features_range[0] > features_range[1]:
            raise ValueError(f"features_range must be 1 <= lo <= hi, got {features_range}")
        if support_range[0] < 2 or support_range[0] > support_range[1]:
            raise ValueError(f"support_range must be 2 <= lo <= hi, got {support_range}")
        self.prior = prior
        self.features_range = features_range
        self.support_range = support_range
        self.curriculum_steps = curriculum_steps
        self.num_query = num_query
        self.tasks_per_step = tasks_per_step
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def support_ceiling(self, index: int) -> int:
        lo, hi = self.support_range
        start = min(hi, lo * 4)
        frac = 1.0 if self.curriculum_steps <= 0 else min(1.0, index / self.curriculum_steps)
        return round(math.exp(math.log(start) + frac * (math.log(hi) - math.log(start))))

    def __iter__(self) -> Iterator[SyntheticTasks]:
        g = self.generator
        lo = self.support_range[0]
        while True:
            ceiling = self.support_ceiling(self.batches_drawn)
            u = torch.rand(1, generator=g).item()
            num_support = int(math.exp(math.log(lo) + u * (math.log(ceiling) - math.log(lo))))
            num_features = int(
                torch.randint(self.features_range[0], self.features_range[1] + 1, (1,), generator=g)
            )
            self.batches_drawn += 1
            yield self.prior.sample(
                self.tasks_per_step, num_support + self.num_query, num_features, num_support, g
            )


@dataclasses.dataclass
class PriorFitConfig:
    """Settings of `value-prior prior-fit` (every field is a CLI flag / YAML key).

    Args:
        out: Where to write the head checkpoint (TabPFN classifier format).
        emsize: TabPFN embedding width.
        nlayers: TabPFN layers.
        nhead: Attention heads.
        features_per_group: TabPFN feature grouping (1 or 2).
        init_from: Continue from this head checkpoint instead of a fresh architecture.
        input_transform: `"none"` (raw features) or `"discriminant"` (whitened features plus the
            support's linear discriminant score, see `InContextHead`); a continued head takes this
            setting.
        max_steps: Training steps.
        eval_every: Steps between held-out evaluations (one Lightning "epoch").
        tasks_per_step: Synthetic tasks per step.
        num_query: Query rows per task.
        features_min: Fewest feature columns per task.
        features_max: Most feature columns per task.
        support_min: Smallest support size.
        support_max: Largest support size.
        curriculum_steps: Steps over which the support ceiling grows to `support_max` (0: none).
        lr: Peak learning rate.
        warmup_steps: Warm-up steps.
        eval_features: Feature columns of the held-out evaluation tasks.
        eval_support: Support rows of the held-out evaluation tasks.
        eval_tasks: Held-out evaluation tasks.
        seed: Seed of weights, training tasks and evaluation tasks.
        threads: torch intra-op threads (1 on a shared CPU).
        experiment_name: MLflow experiment.
    """

    out: str = "artifacts/heads/capability_v2_small.ckpt"
    emsize: int = 64
    nlayers: int = 2
    nhead: int = 4
    features_per_group: int = 2
    init_from: str | None = None
    input_transform: str = "none"
    max_steps: int = 3000
    eval_every: int = 500
    tasks_per_step: int = 16
    num_query: int = 64
    features_min: int = 4
    features_max: int = 16
    support_min: int = 32
    support_max: int = 512
    curriculum_steps: int = 2000
    lr: float = 3e-3
    warmup_steps: int = 100
    eval_features: int = 8
    eval_support: int = 256
    eval_tasks: int = 128
    seed: int = 0
    threads: int = 1
    experiment_name: str = "value-prior-head"

    def __post_init__(self) -> None:
        for name in ("max_steps", "eval_every", "tasks_per_step", "num_query", "eval_features",
                     "eval_support", "eval_tasks", "threads"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def prior_fit(config: PriorFitConfig) -> dict[str, float]:
    """Prior-fit a TabPFN head on synthetic capability tasks, save it, and return its held-out AUCs."""
    from basis.tracking import MLflowLogger

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    earlier: dict[str, Any] = {}
    if config.init_from:
        head = load_head(config.init_from)
        earlier = {"continued_from": head.info}  # lineage: the earlier stage's config and evaluation
    else:
        model, arch_config = build_tabpfn(
            config.emsize, config.nlayers, config.nhead, config.features_per_group, seed=config.seed
        )
        head = InContextHead(model, arch_config)
    head.input_transform = config.input_transform  # a continued head takes the configured transform
    head.info = {"prior_fit": dataclasses.asdict(config), **earlier}
    prior = CapabilityPrior()
    eval_tasks = prior.sample(
        config.eval_tasks,
        config.eval_support + config.num_query,
        config.eval_features,
        config.eval_support,
        torch.Generator().manual_seed(config.seed + 1),  # disjoint from the training stream
        bayes_samples=256,
    )
    stream = SyntheticTaskStream(
        prior,
        features_range=(config.features_min, config.features_max),
        support_range=(config.support_min, config.support_max),
        curriculum_steps=config.curriculum_steps,
        num_query=config.num_query,
        tasks_per_step=config.tasks_per_step,
        seed=config.seed,
    )
    module = PriorFitModule(
        head,
        eval_tasks,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        max_steps=config.max_steps,
        save_to=config.out,
    )
    logger = MLflowLogger(experiment_name=config.experiment_name, run_name=Path(config.out).stem)
    logger.log_hyperparams(dataclasses.asdict(config))
    trainer = L.Trainer(
        max_steps=config.max_steps,
        limit_train_batches=config.eval_every,
        max_epochs=-1,
        logger=logger,
        gradient_clip_val=1.0,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        accelerator="cpu",
    )
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(stream, batch_size=None))
    module.head.model.eval()
    final = evaluate_head_on_tasks(module.head, eval_tasks)
    wall = time.perf_counter() - started
    head.info = {
        "prior_fit": dataclasses.asdict(config),
        "eval": final,
        "wall_seconds": round(wall, 1),
        **earlier,
    }
    path = head.save(config.out)
    logger.experiment.log_artifact(logger.run_id, str(path))
    log.info(
        "prior-fit: %s (head AUC %.3f, logreg %.3f, bayes %.3f) in %.0f s",
        path,
        final["head"],
        final["logreg"],
        final["bayes"],
        wall,
    )
    return final | {"wall_seconds": wall}
