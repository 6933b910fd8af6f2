"""Episodes for V0 pretraining and the LightningDataModule over any pairs dataset (design.md §2-3).

Pairs are grouped into context pools, one per (policy, step). Prompts are split *by prompt id*
(sha256 of salt + id, so the split is stable across runs and shared by every pool): `train` prompts
feed the training episodes, `val` prompts are the early-stopping hold-out, `test` prompts are the
benchmark's context hold-out. A prompt never crosses splits, so the hold-outs measure unseen prompts
even though other policies' pools share some prompts.

Training episode (design.md §3): one pool with both classes; `2 * query_pairs` query prompts drawn as
`query_pairs` positives (success rate >= 0.5) and as many negatives; `support_size` support pairs
drawn uniformly from the rest of the pool, holding both classes (`draw_support`: a single-class draw
gets one row swapped for a row of the missing class). `episodes_per_batch` episodes are stacked into
one `EpisodeBatch` (they share the support size, so the head runs them as one batch).

Evaluation batches (one per pool): `val` queries against a context of the pool's `train` pairs,
`test` (and `predict`) queries against a context of its `train` + `val` pairs; contexts larger than
`eval_context_size` are subsampled with a fixed seed, keeping both classes (`draw_support`).

Run: `value-prior fit --config configs/value_prior/v0_pairs_minilm.yaml --data.pairs PATH`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import datasets
import lightning as L
import numpy as np
import torch

from basis.data import global_seed
from data_pipelines.pairs import load_valid_pairs, pool_key
from value_prior.model import EpisodeBatch, draw_support

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class PromptSplit:
    """Deterministic prompt-level split: `u = sha256(salt + prompt_id)` in [0, 1) picks test, val, train."""

    val_fraction: float = 0.1
    test_fraction: float = 0.2
    salt: str = "v0-holdout"

    def __post_init__(self) -> None:
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction}) must be >= 0 "
                "and leave some training prompts (sum < 1)"
            )

    def of(self, prompt_id: str) -> Split:
        u = int(hashlib.sha256(f"{self.salt}{prompt_id}".encode()).hexdigest()[:12], 16) / 16**12
        if u < self.test_fraction:
            return "test"
        if u < self.test_fraction + self.val_fraction:
            return "val"
        return "train"


@dataclass
class Pool:
    """All pairs of one (policy, step) key: prompt ids, texts and success rates, aligned."""

    name: str
    prompt_ids: list[str]
    prompts: list[str]
    success: np.ndarray  # [P] success rates

    def subset(self, keep: np.ndarray) -> Pool:
        index = np.flatnonzero(keep)
        return Pool(
            self.name,
            [self.prompt_ids[i] for i in index],
            [self.prompts[i] for i in index],
            self.success[index],
        )

    def labels(self, threshold: float) -> np.ndarray:
        return self.success >= threshold


def pools_from_pairs(dataset: datasets.Dataset) -> dict[str, Pool]:
    """Group a pairs dataset into context pools keyed `"policy@stepN"`, one row per problem: rows of a
    pool that share a prompt text (`same_text_key`, e.g. one DAPO problem under several ids) are merged
    into the first of them, their successes and samples summed. Two rows of one problem would let an
    episode put one in its context and the other among its queries, the query's label in plain sight."""
    columns = dataset.select_columns(["policy", "step", "prompt_id", "prompt", "n", "successes"]).to_dict()
    grouped: dict[str, dict[str, list[int]]] = {}  # pool -> problem key -> rows
    for i, (policy, step, prompt) in enumerate(zip(columns["policy"], columns["step"], columns["prompt"])):
        grouped.setdefault(pool_key(policy, step), {}).setdefault(same_text_key(prompt), []).append(i)
    successes = np.asarray(columns["successes"], dtype=np.float64)
    samples = np.asarray(columns["n"], dtype=np.float64)
    pools = {}
    for name, problems in sorted(grouped.items()):
        first = [rows[0] for rows in problems.values()]
        rate = [successes[rows].sum() / samples[rows].sum() for rows in problems.values()]
        pools[name] = Pool(
            name,
            [columns["prompt_id"][i] for i in first],
            [columns["prompt"][i] for i in first],
            np.array(rate),
        )
    return pools


def assign_splits(pools: dict[str, Pool], split: PromptSplit) -> dict[str, Split]:
    """The split of every prompt id in `pools`. Ids that share a prompt text (`same_text_key`:
    DAPO-Math-17k repeats each problem under many ids; the V0 release holds spacing and delimiter
    variants) all take the split of the smallest of them, so no problem is on both sides of a split;
    without shared texts this is `split.of(prompt_id)`."""
    key_of = {
        pid: same_text_key(text)
        for pool in pools.values()
        for pid, text in zip(pool.prompt_ids, pool.prompts)
    }
    first: dict[str, str] = {}  # text key -> its smallest id
    for pid, key in key_of.items():
        first[key] = min(first.get(key, pid), pid)
    return {pid: split.of(first[key]) for pid, key in key_of.items()}


_MATH_DELIMITERS = re.compile(r"\$|\\[()\[\]]")  # $ \( \) \[ \]


def same_text_key(text: str) -> str:
    """A prompt's text up to Unicode compatibility forms (full-width punctuation), case, whitespace and
    math delimiters (`$...$` vs `\\(...\\)`): prompts with the same key are the same problem. The V0
    release holds such variants of one problem under different ids (`$S = \\{1, 2` / `$S=\\{1,2`);
    operators and punctuation are kept, so `2+3` and `2-3` stay apart."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(_MATH_DELIMITERS.sub("", text).split())


def split_pools(pools: dict[str, Pool], split: PromptSplit, parts: tuple[Split, ...]) -> dict[str, Pool]:
    """The pairs of each pool whose prompt falls in one of `parts` (`assign_splits`)."""
    part = assign_splits(pools, split)
    return {
        name: pool.subset(np.array([part[pid] in parts for pid in pool.prompt_ids], dtype=bool))
        for name, pool in pools.items()
    }


def make_batch(
    episodes: list[tuple[str, Pool, np.ndarray, np.ndarray]],
) -> EpisodeBatch:
    """Stack episodes `(pool name, pool, support rows, query rows)` into one `EpisodeBatch`."""
    texts: dict[str, int] = {}
    support_index, query_index, support_success, query_success, query_ids = [], [], [], [], []
    for _, pool, support, query in episodes:
        support_index.append([texts.setdefault(pool.prompts[i], len(texts)) for i in support])
        query_index.append([texts.setdefault(pool.prompts[i], len(texts)) for i in query])
        support_success.append(pool.success[support])
        query_success.append(pool.success[query])
        query_ids.append([pool.prompt_ids[i] for i in query])
    return EpisodeBatch(
        prompts=list(texts),
        support_index=torch.tensor(support_index, dtype=torch.long),
        support_success=torch.tensor(np.stack(support_success), dtype=torch.float32),
        query_index=torch.tensor(query_index, dtype=torch.long),
        query_success=torch.tensor(np.stack(query_success), dtype=torch.float32),
        query_ids=query_ids,
        pools=[name for name, *_ in episodes],
    )


class EpisodeStream(torch.utils.data.IterableDataset):
    """Training episodes sampled from pools (design.md §3). The random stream persists across epochs.

    Args:
        pools: Training pools (pools with one class or too few pairs are skipped).
        support_size: Support pairs per episode (fewer if a pool is smaller).
        query_pairs: (positive, negative) query pairs per episode.
        episodes_per_batch: Episodes stacked into one batch.
        batches_per_epoch: Batches per Lightning epoch.
        label_threshold: Success rate at or above which a pair is positive.
        seed: Seed of the episode stream.
    """

    def __init__(
        self,
        pools: dict[str, Pool],
        support_size: int,
        query_pairs: int,
        episodes_per_batch: int,
        batches_per_epoch: int,
        label_threshold: float,
        seed: int,
    ) -> None:
        super().__init__()
        self.support_size = support_size
        self.query_pairs = query_pairs
        self.episodes_per_batch = episodes_per_batch
        self.batches_per_epoch = batches_per_epoch
        self.label_threshold = label_threshold
        self.pools = {}
        for name, pool in pools.items():
            labels = pool.labels(label_threshold)
            positives, negatives = int(labels.sum()), int((~labels).sum())
            if min(positives, negatives) < query_pairs + 1:
                log.warning(
                    "pool %s skipped as an episode key: %d positives / %d negatives, need > %d of each",
                    name, positives, negatives, query_pairs,
                )  # fmt: skip
                continue
            self.pools[name] = pool
        if not self.pools:
            raise ValueError(
                f"no training pool has more than {query_pairs} positive and negative pairs "
                f"(threshold {label_threshold}); cannot build episodes"
            )
        self.names = sorted(self.pools)
        self.rng = np.random.default_rng(seed)

    def sample_episode(self, name: str, support_size: int) -> tuple[str, Pool, np.ndarray, np.ndarray]:
        pool = self.pools[name]
        labels = pool.labels(self.label_threshold)
        positives = self.rng.choice(np.flatnonzero(labels), self.query_pairs, replace=False)
        negatives = self.rng.choice(np.flatnonzero(~labels), self.query_pairs, replace=False)
        query = np.concatenate([positives, negatives])
        rest = np.setdiff1d(np.arange(len(pool.success)), query)
        # The pool check in __init__ leaves at least one pair of each class in `rest`; `pools_from_pairs`
        # keeps one row per problem, so no support row is a query's problem under another id.
        support = rest[draw_support(self.rng, labels[rest], min(support_size, len(rest)))]
        return name, pool, support, query

    def __iter__(self) -> Iterator[EpisodeBatch]:
        for _ in range(self.batches_per_epoch):
            names = self.rng.choice(self.names, self.episodes_per_batch, replace=True)
            # Episodes of one batch share the support size: the smallest pool sets it.
            size = min(
                [self.support_size] + [len(self.pools[n].success) - 2 * self.query_pairs for n in names]
            )
            yield make_batch([self.sample_episode(str(n), size) for n in names])

    def __len__(self) -> int:
        return self.batches_per_epoch


def eval_batches(
    context: dict[str, Pool], queries: dict[str, Pool], context_size: int, label_threshold: float, seed: int
) -> list[EpisodeBatch]:
    """One batch per pool: all its query pairs against (a fixed subsample of) its context pairs."""
    batches = []
    rng = np.random.default_rng(seed)
    for name in sorted(queries):
        pool_context, pool_queries = context.get(name), queries[name]
        if len(pool_queries.success) == 0:
            continue
        if pool_context is None or len(pool_context.success) == 0:
            log.warning(
                "pool %s: no context pairs; its %d queries are not evaluated", name, len(pool_queries.success)
            )
            continue
        if len(np.unique(pool_context.labels(label_threshold))) < 2:
            log.warning("pool %s: single-class context; its queries are not evaluated by V0", name)
            continue
        size = len(pool_context.success)
        support = np.sort(draw_support(rng, pool_context.labels(label_threshold), min(context_size, size)))
        # Context and queries come from different pools objects: merge them into one for indexing.
        merged = Pool(
            name,
            pool_context.prompt_ids + pool_queries.prompt_ids,
            pool_context.prompts + pool_queries.prompts,
            np.concatenate([pool_context.success, pool_queries.success]),
        )
        batches.append(make_batch([(name, merged, support, np.arange(size, len(merged.success)))]))
    return batches


class PairsDataModule(L.LightningDataModule):
    """Query-performance pairs -> V0 training episodes and prompt-level hold-out evaluation.

    Args:
        pairs: A pairs dataset in the design.md §2 contract (parquet file/folder or jsonl), or, with
            `format: v0-release`, the V0 release folder (its `context.jsonl` pools are used).
        format: `"pairs"` or `"v0-release"`.
        val_fraction: Share of prompt ids held out for early stopping (`val/gauc`).
        test_fraction: Share of prompt ids held out for `test` / `predict` and the benchmark.
        split_salt: Salt of the prompt-id hash that assigns splits.
        support_size: Support pairs per training episode (design.md §3: 256).
        query_pairs: (positive, negative) query pairs per training episode (design.md §3: 4).
        episodes_per_batch: Episodes per optimisation step.
        batches_per_epoch: Steps per epoch (validation runs after each).
        eval_context_size: Most context pairs per pool at evaluation.
        label_threshold: Success rate at or above which a pair is a success.
        seed: Seed of the episode stream and evaluation subsamples (None: the global seed,
            `basis.data.global_seed`).
    """

    def __init__(
        self,
        pairs: str,
        format: Literal["pairs", "v0-release"] = "pairs",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_salt: str = "v0-holdout",
        support_size: int = 256,
        query_pairs: int = 4,
        episodes_per_batch: int = 4,
        batches_per_epoch: int = 100,
        eval_context_size: int = 512,
        label_threshold: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        seed = global_seed(seed)  # resolved before it is saved
        self.save_hyperparameters()
        if support_size < 2 or query_pairs < 1 or episodes_per_batch < 1 or batches_per_epoch < 1:
            raise ValueError(
                "support_size >= 2, query_pairs >= 1, episodes_per_batch >= 1 and batches_per_epoch >= 1 "
                f"required, got {support_size}, {query_pairs}, {episodes_per_batch}, {batches_per_epoch}"
            )
        if eval_context_size < 2:  # a smaller context cannot hold both classes (design.md §3)
            raise ValueError(f"eval_context_size >= 2 required, got {eval_context_size}")
        self.pairs = pairs
        self.format = format
        self.split = PromptSplit(val_fraction, test_fraction, split_salt)
        self.support_size = support_size
        self.query_pairs = query_pairs
        self.episodes_per_batch = episodes_per_batch
        self.batches_per_epoch = batches_per_epoch
        self.eval_context_size = eval_context_size
        self.label_threshold = label_threshold
        self.seed = seed
        self.pools: dict[str, Pool] | None = None
        self._train_stream: EpisodeStream | None = None
        self._restored_rng: dict[str, Any] | None = None  # from a checkpoint, for the stream to come

    def load_dataset(self) -> datasets.Dataset:
        if self.format == "v0-release":
            from data_pipelines.v0_release import read_v0_release

            return read_v0_release(self.pairs, "context")
        if self.format == "pairs":
            return load_valid_pairs(self.pairs)
        raise ValueError(f"data.format must be 'pairs' or 'v0-release', got {self.format!r}")

    def setup(self, stage: str | None = None) -> None:
        if self.pools is None:
            self.pools = pools_from_pairs(self.load_dataset())
            counts = {s: 0 for s in ("train", "val", "test")}
            part = assign_splits(self.pools, self.split)
            for pool in self.pools.values():
                for pid in pool.prompt_ids:
                    counts[part[pid]] += 1
            log.info("%d pools from %s; pairs per split: %s", len(self.pools), self.pairs, counts)

    def parts(self, *names: Split) -> dict[str, Pool]:
        assert self.pools is not None, "call setup() first"
        return split_pools(self.pools, self.split, names)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        if self._train_stream is None:
            self._train_stream = EpisodeStream(
                self.parts("train"),
                self.support_size,
                self.query_pairs,
                self.episodes_per_batch,
                self.batches_per_epoch,
                self.label_threshold,
                self.seed,
            )
            if self._restored_rng is not None:
                self._train_stream.rng.bit_generator.state = self._restored_rng
        return torch.utils.data.DataLoader(self._train_stream, batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        """The episode generator's state (plain ints), so that a resumed fit draws the episodes an
        uninterrupted one would have, instead of replaying the first epoch's."""
        return (
            {} if self._train_stream is None else {"episode_rng": self._train_stream.rng.bit_generator.state}
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_rng = state_dict.get("episode_rng")
        if self._restored_rng is not None and self._train_stream is not None:
            self._train_stream.rng.bit_generator.state = self._restored_rng

    def _eval_loader(self, context: tuple[Split, ...], queries: Split) -> torch.utils.data.DataLoader:
        batches = eval_batches(
            self.parts(*context),
            self.parts(queries),
            self.eval_context_size,
            self.label_threshold,
            self.seed + 1,
        )
        return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval_loader(("train",), "val")

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval_loader(("train", "val"), "test")

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self.test_dataloader()
