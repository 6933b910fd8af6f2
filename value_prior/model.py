"""V0 model: residual query adapter + in-context TabPFN head, and its pretraining LightningModule.

Model (design.md §3, from the authors' code github Now-Join-Us/V0):

    g  = H[:, -1]                                   # last token of the left-padded sequence (pooling="mean": token mean)
    dQ = W2(Dropout(GELU(LN(W1 g))))                # W1: D->bottleneck, W2: ->K*d, W2 zero-init
    Q  = Q_static + dQ.view(B, K, d)                # Q_static learnable, randn init
    KV = Linear(D->d)(H)
    Z  = MHA(query=LN_q(Q), key=LN_kv(KV), value=KV, key_padding_mask=~mask)
    z  = Z.flatten(1)                               # [B, K*d] features of one prompt

Support rows are `z(context prompts)` with labels `1[success_rate >= 0.5]`, query rows are
`z(target prompts)`; the head returns logits over {fail, success} and `V0(x) = softmax[:, 1]`. The
head is frozen by default; gradients reach the adapter through it, from both support and query
features. Loss `L = w_pair * L_pair + w_ce * L_ce` (0.25 / 0.75): `L_pair = -mean log sigmoid(s+ -
s-)` over (positive, negative) query pairs of one episode with `s = logit_1 - logit_0`, `L_ce` the
cross-entropy against the soft success rate. AdamW (no decay on biases, LayerNorms, `Q_static`),
cosine schedule with linear warm-up, gradient clipping in the Trainer.

Deviations (ours, configurable; each off with its weight at 0):
- The CPU default emits K*d = 8 features instead of the paper's 168 x 6 = 1,008, because TabPFN's
  cost is linear in feature columns and the prediction latency target is 100 ms; the paper shape is
  `configs/value_prior/v0_release_qwen3_paper_gpu.yaml`.
- `aux_weight`: a linear probe on the adapter features is trained with a within-episode ranking
  loss on the support rows. Through the frozen head alone the adapter learned prompt difficulty
  slowly and stayed below a global logistic regression; the probe gives it a direct signal.
- `shuffle_weight`: the queries are also scored against the support with shuffled success rates and
  pushed toward the context mean. Without it the adapter learned features that the frozen head
  ranks by difficulty *whatever the labels say* (measured: label-shuffled context scored the same
  gAUC as the true one), i.e. a prior that ignores its context. `val/gauc_shuffled_context` and
  `val/context_gain_gauc` track this every epoch.

Run: `value-prior fit --config configs/value_prior/v0_release_minilm.yaml`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from basis.data import global_seed
from value_prior.backbone import HFBackbone, TextBackbone
from value_prior.head import load_head
from value_prior.metrics import grouped_auc, reliability_bins, score_predictions

log = logging.getLogger(__name__)

DEFAULT_HEAD = str(Path(__file__).resolve().parent / "heads" / "capability_v2_small.ckpt")
"""The shipped prior-fitted head (see value_prior/heads/README.md for the command that made it)."""


# ----------------------------------------------------------------------------------------------
# Adapter
# ----------------------------------------------------------------------------------------------


def pad_left(hidden_states: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack `[T_i, D]` sequences into `[B, T_max, D]` with left padding and a `[B, T_max]` token mask."""
    longest = max(h.shape[0] for h in hidden_states)
    batch = hidden_states[0].new_zeros(len(hidden_states), longest, hidden_states[0].shape[1])  # [B, T, D]
    mask = torch.zeros(len(hidden_states), longest, dtype=torch.bool, device=batch.device)  # [B, T]
    for i, h in enumerate(hidden_states):
        batch[i, longest - h.shape[0] :] = h
        mask[i, longest - h.shape[0] :] = True
    return batch, mask


class ResidualQueryAdapter(nn.Module):
    """The residual (dynamic) query adapter of V0: K learned queries, shifted per prompt, attend over H.

    Args:
        hidden_size: Backbone width D.
        num_queries: K, learned queries (paper 168).
        query_dim: d, width of each query and of the key/value projection (paper 6).
        num_heads: Attention heads (must divide `query_dim`; paper 3).
        bottleneck: Width of the query generator (paper 128).
        dropout: Dropout in the query generator (paper 0.2).
        pooling: What the query generator reads: `"last"`, the last real token (paper; right for
            decoder backbones), or `"mean"`, the mean over real tokens (ours; the pooling sentence
            encoders such as MiniLM are trained for).
    """

    def __init__(
        self,
        hidden_size: int,
        num_queries: int = 168,
        query_dim: int = 6,
        num_heads: int = 3,
        bottleneck: int = 128,
        dropout: float = 0.2,
        pooling: str = "last",
    ) -> None:
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        if query_dim % num_heads:
            raise ValueError(f"query_dim ({query_dim}) must be divisible by num_heads ({num_heads})")
        # The constructor arguments except `hidden_size`: what an exported prior stores to rebuild it.
        self.config = {"num_queries": num_queries, "query_dim": query_dim, "num_heads": num_heads,
                       "bottleneck": bottleneck, "dropout": dropout, "pooling": pooling}  # fmt: skip
        self.num_queries = num_queries
        self.query_dim = query_dim
        self.pooling = pooling
        self.generator_in = nn.Linear(hidden_size, bottleneck)
        self.generator_norm = nn.LayerNorm(bottleneck)
        self.generator_drop = nn.Dropout(dropout)
        self.generator_out = nn.Linear(bottleneck, num_queries * query_dim)
        nn.init.zeros_(self.generator_out.weight)  # start at the static queries
        nn.init.zeros_(self.generator_out.bias)
        self.static_queries = nn.Parameter(torch.randn(num_queries, query_dim))
        self.key_value = nn.Linear(hidden_size, query_dim)
        self.query_norm = nn.LayerNorm(query_dim)
        self.key_norm = nn.LayerNorm(query_dim)
        self.attention = nn.MultiheadAttention(query_dim, num_heads, batch_first=True)

    @property
    def num_features(self) -> int:
        return self.num_queries * self.query_dim

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Features `[B, K*d]` from left-padded hidden states `[B, T, D]` and token mask `[B, T]`."""
        if self.pooling == "last":
            pooled = hidden[:, -1]  # [B, D] last real token (left padding)
        else:
            weights = mask.to(hidden.dtype)[..., None]  # [B, T, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, D]
        shift = self.generator_out(
            self.generator_drop(F.gelu(self.generator_norm(self.generator_in(pooled))))
        )  # [B, K*d]
        queries = self.static_queries + shift.view(-1, self.num_queries, self.query_dim)  # [B, K, d]
        kv = self.key_value(hidden)  # [B, T, d]
        z, _ = self.attention(
            self.query_norm(queries), self.key_norm(kv), kv, key_padding_mask=~mask, need_weights=False
        )  # [B, K, d]
        return z.flatten(1)  # [B, K*d]


def prompt_features(
    adapter: ResidualQueryAdapter, backbone: TextBackbone, prompts: Sequence[str], chunk_size: int = 128
) -> Tensor:
    """Adapter features `[len(prompts), K*d]`, padding each length-sorted chunk only to its own longest prompt.

    The float32 hidden states are cast to the adapter's dtype (a `bf16-true` / `16-true` run casts the
    module, never the backbone), and the chunks are put back in prompt order by indexing their
    concatenation, which keeps the dtype the adapter returns (bfloat16 / float16 under a `*-mixed`
    autocast; a preallocated float32 buffer would refuse it).
    """
    weight = next(adapter.parameters())
    if not prompts:
        return torch.empty(0, adapter.num_features, device=weight.device, dtype=weight.dtype)  # [0, F]
    hidden = backbone.hidden_states(prompts)
    order = sorted(range(len(prompts)), key=lambda i: hidden[i].shape[0])
    chunks = []
    for start in range(0, len(order), chunk_size):
        index = order[start : start + chunk_size]
        states = [hidden[i].to(weight.device, weight.dtype) for i in index]  # C x [T_i, D]
        batch, mask = pad_left(states)  # [C, T, D], [C, T]
        chunks.append(adapter(batch, mask))  # [C, F]
    position = torch.argsort(torch.tensor(order, device=weight.device))  # [U] row of prompt u in the chunks
    return torch.cat(chunks)[position]  # [U, F]


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


class EpisodeBatch(NamedTuple):
    """Episodes of one step. Rows index into `prompts` (the unique texts of the batch)."""

    prompts: list[str]  # U unique prompt texts
    support_index: Tensor  # [B, N] long
    support_success: Tensor  # [B, N] success rates in [0, 1]
    query_index: Tensor  # [B, M] long
    query_success: Tensor  # [B, M] success rates in [0, 1]
    query_ids: list[list[str]]  # B x M prompt ids (for predictions)
    pools: list[str]  # B context-pool names


def success_labels(success: Tensor, threshold: float = 0.5) -> Tensor:
    """Binary head labels `1[success_rate >= threshold]` as floats."""
    return (success >= threshold).to(success.dtype)


def draw_support(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Indices of `size` of the rows `labels` (`[N]` bool) drawn uniformly without replacement, holding
    both classes whenever `labels` does and `size >= 2`.

    The head needs both classes in its support (design.md §3 skips single-class supports). A uniform
    draw that misses a class gets one of its rows, picked at random, swapped for a random row of the
    missing class. Every draw that already holds both classes is the plain uniform draw, so this changes
    nothing unless the uniform draw would have been single-class, and it never loops.
    """
    index = rng.choice(len(labels), size, replace=False)  # [size]
    drawn = labels[index]  # [size]
    if size < 2 or drawn.min() != drawn.max() or labels.min() == labels.max():
        return index
    index[rng.integers(size)] = rng.choice(np.flatnonzero(labels != drawn[0]))
    return index


def pairwise_ranking_loss(score: Tensor, success: Tensor, threshold: float = 0.5) -> Tensor:
    """Mean `-log sigmoid(score_i - score_j)` over rows of one episode with `y_i >= threshold > y_j`.

    Args:
        score: `[B, R]` scores; success: `[B, R]` success rates. Episodes without such a pair add nothing.
    """
    label = success_labels(success, threshold)  # [B, R]
    ordered = (label[:, :, None] > label[:, None, :]).to(score.dtype)  # [B, R, R]
    margin = score[:, :, None] - score[:, None, :]  # [B, R, R]
    return (-F.logsigmoid(margin) * ordered).sum() / ordered.sum().clamp(min=1)


def v0_loss(
    success_logit: Tensor,
    query_success: Tensor,
    pair_weight: float = 0.25,
    ce_weight: float = 0.75,
    threshold: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """`(loss, L_pair, L_ce)` of design.md §3 for one batch of episodes.

    Args:
        success_logit: `[B, M]` head scores `s = logit_1 - logit_0`.
        query_success: `[B, M]` observed success rates (soft CE targets).
        threshold: The label threshold the episodes were sampled with (`label_threshold`).

    `L_pair` averages `-log sigmoid(s_i - s_j)` over all query pairs of an episode with
    `y_i >= threshold > y_j` (the sampler draws M/2 positives and M/2 negatives, so these include the
    design's 4 (pos, neg) pairs); episodes without such a pair contribute nothing.
    """
    ce = F.binary_cross_entropy_with_logits(success_logit, query_success)
    pair = pairwise_ranking_loss(success_logit, query_success, threshold)
    return pair_weight * pair + ce_weight * ce, pair, ce


# ----------------------------------------------------------------------------------------------
# LightningModule
# ----------------------------------------------------------------------------------------------


class V0Module(L.LightningModule):
    """Pretrains V0's adapter on query-performance episodes through a frozen in-context head.

    Args:
        backbone: Frozen text encoder with its hidden-state cache (e.g. `value_prior.backbone.HFBackbone`).
        head: TabPFN classifier checkpoint path; `"default"` is the shipped prior-fitted head.
        freeze_head: Keep the head frozen (design.md §3). `False` fine-tunes it with `head_lr`.
        head_lr: Learning rate of the head when it is not frozen.
        num_queries: Adapter queries K.
        query_dim: Adapter query width d (features = K * d).
        num_heads: Adapter attention heads.
        bottleneck: Adapter query-generator width.
        dropout: Adapter query-generator dropout.
        pooling: Adapter query-generator input, `"last"` token (paper) or `"mean"` over tokens.
        pair_weight: Weight of the pairwise ranking loss.
        ce_weight: Weight of the soft cross-entropy loss.
        aux_weight: Weight of the auxiliary ranking loss of a linear probe on the adapter features over
            each episode's support rows (ours, not in the paper; 0 turns it off). It gives the adapter a
            direct signal for prompt difficulty, which the head then has to read from the context; the
            probe is used in training only and is not exported.
        shuffle_weight: Weight of the context-reading loss (ours): the same queries are scored against the
            episode's support with its success rates shuffled, and those scores are trained toward the
            context mean (the right answer when the labels carry no information). Without it the adapter
            can learn features that the frozen head ranks the same way whatever the labels say, i.e. a
            prior that ignores its context (0 turns it off).
        feature_noise: Std of Gaussian noise added to the adapter features during training, relative to
            each feature's std over the episode's rows (ours, a regulariser: the adapter otherwise
            memorises the training prompts within a few hundred steps; 0 turns it off).
        lr: Peak AdamW learning rate of the adapter.
        weight_decay: AdamW weight decay (not applied to biases, LayerNorms or the static queries).
        warmup_frac: Share of the total steps spent in linear warm-up before the cosine decay.
        label_threshold: Success rate at or above which a context pair is labelled a success.
        export_dir: Where `fit` exports the frozen prior artifact (`None`: no export).
        seed: Seed of the adapter initialisation (None: the global seed, `basis.data.global_seed`).
    """

    def __init__(
        self,
        backbone: TextBackbone | None = None,
        head: str = "default",
        freeze_head: bool = True,
        head_lr: float = 1e-5,
        num_queries: int = 4,
        query_dim: int = 2,
        num_heads: int = 1,
        bottleneck: int = 128,
        dropout: float = 0.2,
        pooling: str = "last",
        pair_weight: float = 0.25,
        ce_weight: float = 0.75,
        aux_weight: float = 0.0,
        shuffle_weight: float = 0.0,
        feature_noise: float = 0.0,
        lr: float = 2e-4,
        weight_decay: float = 0.01,
        warmup_frac: float = 0.05,
        label_threshold: float = 0.5,
        export_dir: str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if pair_weight < 0 or ce_weight < 0 or pair_weight + ce_weight == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got pair={pair_weight}, ce={ce_weight}"
            )
        if aux_weight < 0 or shuffle_weight < 0:
            raise ValueError(
                f"aux_weight and shuffle_weight must be >= 0, got {aux_weight}, {shuffle_weight}"
            )
        if not 0 <= warmup_frac < 1:
            raise ValueError(f"warmup_frac must lie in [0, 1), got {warmup_frac}")
        seed = global_seed(seed)  # resolved before it is saved
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone if backbone is not None else HFBackbone()
        self.head_path = DEFAULT_HEAD if head == "default" else head
        torch.manual_seed(seed)
        self.adapter = ResidualQueryAdapter(
            self.backbone.hidden_size, num_queries, query_dim, num_heads, bottleneck, dropout, pooling
        )
        self.difficulty_probe = nn.Linear(self.adapter.num_features, 1)  # training-only (aux_weight > 0)
        self.head = load_head(self.head_path)
        self.freeze_head = freeze_head
        self.head.requires_grad_(not freeze_head)
        self._eval_records: list[tuple[str, str, float, float, float]] = []

    @property
    def num_features(self) -> int:
        return self.adapter.num_features

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        if world > 1:  # a clear error rather than per-rank metrics and repeated episodes
            raise ValueError(
                f"value-prior runs on one device (trainer.devices=1, one node); got {world} processes: "
                "its episode stream is not split across ranks and its gAUC / Brier / ECE are computed "
                "on each rank's own queries, so checkpoint selection and logged figures would be wrong"
            )

    def on_train_start(self) -> None:
        # A resumed checkpoint past this fit's schedule (another run's, trained for more steps) would
        # train at learning rate 0 and still export a "new" prior.
        total = int(self.trainer.estimated_stepping_batches)
        if self.trainer.global_step >= total:
            raise ValueError(
                f"the checkpoint resumed is at step {self.trainer.global_step}, past this fit's learning-rate "
                f"schedule of {total} steps (trainer.max_epochs x data.batches_per_epoch), which ends at "
                "learning rate 0: raise trainer.max_epochs to train on. --ckpt_path resumes a fit; it "
                "does not start a fine-tune"
            )

    def train(self, mode: bool = True) -> V0Module:
        super().train(mode)
        if self.freeze_head:
            self.head.eval()  # frozen head: no dropout or other train-mode behaviour
        return self

    # -- forward ---------------------------------------------------------------------------

    def episode_features(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Adapter features of the batch's support `[B, N, F]` and query `[B, M, F]` rows."""
        z = prompt_features(self.adapter, self.backbone, batch.prompts)  # [U, F]
        return z[batch.support_index], z[batch.query_index]  # [B, N, F], [B, M, F]

    def success_logits(self, batch: EpisodeBatch) -> Tensor:
        """Head scores `s` `[B, M]` for the batch's queries."""
        return self._head_scores(batch, *self.episode_features(batch))

    def _head_scores(
        self, batch: EpisodeBatch, support_z: Tensor, query_z: Tensor, support_success: Tensor | None = None
    ) -> Tensor:
        success = batch.support_success if support_success is None else support_success  # [B, N]
        support_y = success_labels(success, self.hparams.label_threshold)  # [B, N]
        return self.head.success_logit(support_z, support_y, query_z)  # [B, M]

    def shuffled_context_loss(self, batch: EpisodeBatch, support_z: Tensor, query_z: Tensor) -> Tensor:
        """Cross-entropy of the scores under label-shuffled support against the context mean."""
        order = torch.argsort(
            torch.rand(batch.support_success.shape, device=support_z.device), dim=1
        )  # [B, N]
        shuffled = torch.gather(batch.support_success, 1, order)  # [B, N]
        s = self._head_scores(batch, support_z, query_z, shuffled)  # [B, M]
        target = batch.support_success.mean(dim=1, keepdim=True).expand_as(s)  # [B, M]
        return F.binary_cross_entropy_with_logits(s, target)

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        support_z, query_z = self.episode_features(batch)  # [B, N, F], [B, M, F]
        if self.hparams.feature_noise > 0:
            scale = self.hparams.feature_noise * support_z.detach().std(dim=1, keepdim=True)  # [B, 1, F]
            support_z = support_z + scale * torch.randn_like(support_z)  # [B, N, F]
            query_z = query_z + scale * torch.randn_like(query_z)  # [B, M, F]
        s = self._head_scores(batch, support_z, query_z)  # [B, M]
        loss, pair, ce = v0_loss(
            s,
            batch.query_success,
            self.hparams.pair_weight,
            self.hparams.ce_weight,
            self.hparams.label_threshold,
        )
        size = len(batch.pools)
        if self.hparams.aux_weight > 0:
            probe = self.difficulty_probe(support_z).squeeze(-1)  # [B, N]
            aux = pairwise_ranking_loss(probe, batch.support_success, self.hparams.label_threshold)
            loss = loss + self.hparams.aux_weight * aux
            self.log("train/loss_aux", aux, batch_size=size)
        if self.hparams.shuffle_weight > 0:
            shuffled = self.shuffled_context_loss(batch, support_z, query_z)
            loss = loss + self.hparams.shuffle_weight * shuffled
            self.log("train/loss_shuffled_context", shuffled, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/loss_pair", pair, batch_size=size)
        self.log("train/loss_ce", ce, batch_size=size)
        return loss

    # -- evaluation --------------------------------------------------------------------------

    def _collect(self, batch: EpisodeBatch, batch_idx: int) -> None:
        """Score the queries with the true context and with a label-shuffled copy of it (diagnostic)."""
        support_z, query_z = self.episode_features(batch)  # [B, N, F], [B, M, F]
        prob = torch.sigmoid(self._head_scores(batch, support_z, query_z))  # [B, M]
        g = torch.Generator().manual_seed(batch_idx)
        order = torch.argsort(torch.rand(batch.support_success.shape, generator=g), dim=1).to(
            support_z.device
        )
        shuffled = torch.gather(batch.support_success, 1, order)  # [B, N]
        prob_shuffled = torch.sigmoid(self._head_scores(batch, support_z, query_z, shuffled))  # [B, M]
        for b, pool in enumerate(batch.pools):
            rows = zip(
                batch.query_ids[b],
                prob[b].tolist(),
                prob_shuffled[b].tolist(),
                batch.query_success[b].tolist(),
            )
            for prompt_id, p, p_shuffled, y in rows:
                self._eval_records.append((pool, prompt_id, p, p_shuffled, y))

    def validation_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._collect(batch, batch_idx)

    def test_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._collect(batch, batch_idx)

    def predict_step(self, batch: EpisodeBatch, batch_idx: int) -> list[dict[str, Any]]:
        prob = torch.sigmoid(self.success_logits(batch))  # [B, M]
        return [
            {"pool": pool, "prompt_id": pid, "prob": p, "success": y}
            for b, pool in enumerate(batch.pools)
            for pid, p, y in zip(batch.query_ids[b], prob[b].tolist(), batch.query_success[b].tolist())
        ]

    def on_validation_epoch_start(self) -> None:
        self._eval_records = []

    def on_test_epoch_start(self) -> None:
        self._eval_records = []

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        if not self._eval_records:
            return
        pools, _, prob, prob_shuffled, success = zip(*self._eval_records)
        metrics = score_predictions(list(prob), list(success), list(pools))
        # Context use: the same queries with the context's success rates shuffled (design.md §3 pitfall).
        metrics["gauc_shuffled_context"] = grouped_auc(list(prob_shuffled), list(success), list(pools))
        metrics["context_gain_gauc"] = metrics["gauc"] - metrics["gauc_shuffled_context"]
        for name, value in metrics.items():
            if not math.isnan(value):
                self.log(f"{stage}/{name}", value, prog_bar=name == "gauc")
        log.info("%s epoch %d: %s", stage, self.current_epoch, {k: round(v, 4) for k, v in metrics.items()})
        if not self.trainer.sanity_checking:
            log_eval_plots(self.logger, stage, self.current_epoch, np.array(prob), np.array(success))

    # -- optimisation ------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        trainable = [
            *self.adapter.named_parameters(),
            *self.difficulty_probe.named_parameters(prefix="probe"),
        ]
        for name, param in trainable:
            is_norm_or_bias = param.ndim < 2 or "norm" in name or name == "static_queries"
            (no_decay if is_norm_or_bias else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if not self.freeze_head:
            groups.append(
                {"params": list(self.head.parameters()), "weight_decay": 0.0, "lr": self.hparams.head_lr}
            )
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.hparams.warmup_frac * total))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def log_eval_plots(logger: Any, stage: str, epoch: int, prob: np.ndarray, success: np.ndarray) -> None:
    """Log a reliability diagram and a score histogram (PNG) to MLflow, when the logger is MLflow."""
    from lightning.pytorch.loggers import MLFlowLogger
    from matplotlib.figure import Figure  # not pyplot: no global backend, no figure left open

    if not isinstance(logger, MLFlowLogger):
        return
    count, mean_p, mean_y = reliability_bins(prob, success)  # [10] each
    filled = count > 0
    fig = Figure(figsize=(9, 4))
    ax_rel, ax_hist = fig.subplots(1, 2)
    ax_rel.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax_rel.plot(mean_p[filled], mean_y[filled], "o-", label="V0")
    ax_rel.set(
        xlabel="predicted success probability", ylabel="observed success rate", title=f"{stage} reliability"
    )
    ax_rel.legend()
    ax_hist.hist(
        [prob[success >= 0.5], prob[success < 0.5]],
        bins=20,
        range=(0, 1),
        label=["success >= 0.5", "success < 0.5"],
    )
    ax_hist.set(xlabel="predicted success probability", ylabel="queries", title=f"{stage} score histogram")
    ax_hist.legend()
    fig.tight_layout()
    artifact = f"plots/{stage}/{stage}_calibration_epoch{epoch:03d}.png"
    logger.experiment.log_figure(logger.run_id, fig, artifact, save_kwargs={"dpi": 80})


class PredictionsWriter(L.pytorch.callbacks.BasePredictionWriter):
    """Write `value-prior predict` outputs (pool, prompt_id, prob, success) as one parquet file.

    `value-prior predict --config CFG --ckpt_path BEST` adds one writing `predictions.parquet` beside
    BEST; for another file, configure it:
    `--trainer.callbacks+=value_prior.model.PredictionsWriter --trainer.callbacks.output F.parquet`.

    Args:
        output: Parquet file to write.
    """

    def __init__(self, output: str = "artifacts/value_prior_predictions.parquet") -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        import datasets

        rows = [row for batch in predictions for row in batch]
        Path(self.output).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(self.output)
        log.info("wrote %d predictions to %s", len(rows), self.output)
