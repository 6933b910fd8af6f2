"""Prompt data for the policy trainer: a LightningDataModule whose data position is the RL step.

Each training batch is the list of prompts for one RL step. The prompts of step `s` on rank `r` are a
pure function of `(seed, s, r, world_size)`: every epoch over the training prompts is a fresh
seeded permutation, cut into consecutive per-step slices, and each rank takes its own share of the
slice. The loader starts at the module's `rl_step`, which Lightning restores from the checkpoint
before it asks for the loader, so a resumed run continues with exactly the prompts the
uninterrupted run would have seen – no sampler state to save.

Validation prompts are a fixed, seeded subset of the validation split, sharded across ranks. Its seed is
`val_seed`, not `seed` (which `seed_everything` sets): runs with different training seeds are measured on
the same held-out prompts.

Run it through the trainer's CLI: `basis fit --config configs/policy/grpo_tiny.yaml`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, IterableDataset


class PromptRow(NamedTuple):
    """One prompt of the prompt-row contract (design.md §2)."""

    prompt_id: str
    prompt: str | list[dict[str, str]]  # plain text or a chat message list
    answer: str
    data_source: str
    difficulty: int | None


class ValBatch(NamedTuple):
    """A validation batch: `rows`, of which the first `real` count; the rest pad a rank whose shard is short."""

    rows: list[PromptRow]
    real: int


def rows_from_dataset(dataset: Any) -> list[PromptRow]:
    """Convert a `datasets.Dataset` in the prompt-row contract into `PromptRow`s."""
    difficulty = dataset["difficulty"] if "difficulty" in dataset.column_names else [None] * len(dataset)
    return [
        PromptRow(str(pid), prompt, str(answer), str(source), None if d is None else int(d))
        for pid, prompt, answer, source, d in zip(
            dataset["prompt_id"], dataset["prompt"], dataset["answer"], dataset["data_source"], difficulty
        )
    ]


def step_prompt_indices(
    num_prompts: int, step: int, per_step: int, seed: int, rank: int, world_size: int
) -> np.ndarray:
    """Indices of the prompts for RL step `step` on `rank` (see module docstring)."""
    global_per_step = per_step * world_size
    steps_per_epoch = max(1, num_prompts // global_per_step)
    epoch, offset = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
    start = offset * global_per_step + rank * per_step
    return order[np.arange(start, start + per_step) % num_prompts]


class StepPrompts(IterableDataset):
    """Yields the prompt list of every RL step from `start_step` on (an endless stream)."""

    def __init__(
        self, rows: list[PromptRow], per_step: int, seed: int, start_step: int, rank: int, world_size: int
    ):
        self.rows, self.per_step, self.seed = rows, per_step, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size

    def __iter__(self) -> Iterator[list[PromptRow]]:
        step = self.start_step
        while True:
            indices = step_prompt_indices(
                len(self.rows), step, self.per_step, self.seed, self.rank, self.world_size
            )
            yield [self.rows[i] for i in indices]
            step += 1


class RankBatches(IterableDataset):
    """A rank's validation batches, already sharded: an iterable, so that Lightning's distributed
    sampler (which it puts on map-style datasets under DDP) does not shard them a second time."""

    def __init__(self, batches: list[ValBatch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[ValBatch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _keep_rows(batch: list[PromptRow]) -> list[PromptRow]:
    return batch


class PromptDataModule(L.LightningDataModule):
    """Training and validation prompts for `PolicyTrainer`.

    Args:
        train_path: Prompt dataset for training: a local parquet/jsonl file or folder, or a hub preset
            name understood by `basis.tasks.load_prompts`.
        val_path: Held-out prompts for validation (mean@k / pass@k). None disables validation.
        train_split: Split to read from `train_path` when it is a hub dataset or a multi-split folder.
        val_split: Split to read from `val_path`.
        column_map: Maps contract columns to the source's columns, e.g. `{"prompt": "question"}`; the
            columns it does not name keep their contract names.
        prompts_per_step: Prompts per RL step on each rank (the global batch is this times the ranks).
        val_prompts: Validation prompts used (a fixed seeded subset; 0 means all).
        val_batch_size: Validation prompts per validation batch.
        seed: Seed of the training prompt order (None: `global_seed`).
        val_seed: Seed of the validation subset; kept apart from `seed` (set by `seed_everything`) so
            that every training seed is measured on the same held-out prompts.
    """

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        column_map: dict[str, str | None] | None = None,
        prompts_per_step: int = 16,
        val_prompts: int = 256,
        val_batch_size: int = 64,
        seed: int | None = None,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        if prompts_per_step < 1:
            raise ValueError(f"data.prompts_per_step must be >= 1, got {prompts_per_step}")
        if val_prompts < 0 or val_batch_size < 1:
            raise ValueError("data.val_prompts must be >= 0 and data.val_batch_size >= 1")
        self.train_path, self.val_path = train_path, val_path
        self.train_split, self.val_split = train_split, val_split
        self.column_map = column_map
        self.prompts_per_step = prompts_per_step
        self.val_prompts, self.val_batch_size = val_prompts, val_batch_size
        self.seed, self.val_seed = global_seed(seed), val_seed
        self.train_rows: list[PromptRow] = []
        self.val_rows: list[PromptRow] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows:
            return
        from basis.tasks import load_prompts

        self.train_rows = rows_from_dataset(
            load_prompts(self.train_path, split=self.train_split, column_map=self.column_map)
        )
        trainer = getattr(self, "trainer", None)
        world_size = trainer.world_size if trainer is not None else 1
        if len(self.train_rows) < self.prompts_per_step * world_size:  # else ranks share prompts in a step
            raise ValueError(
                f"data.prompts_per_step={self.prompts_per_step} x {world_size} data-parallel rank(s) exceeds "
                f"the {len(self.train_rows)} prompts in {self.train_path}"
            )
        if self.val_path:
            rows = rows_from_dataset(
                load_prompts(self.val_path, split=self.val_split, column_map=self.column_map)
            )
            if self.val_prompts and self.val_prompts < len(rows):
                keep = np.sort(
                    np.random.default_rng(self.val_seed).choice(len(rows), self.val_prompts, replace=False)
                )
                rows = [rows[i] for i in keep]
            self.val_rows = rows

    def rows_for_steps(self, first: int, last: int, rank: int, world_size: int) -> list[PromptRow]:
        """The distinct training prompts that data steps `first..last` (inclusive, 0-based: RL step s
        reads data step s - 1) give to `rank`."""
        if last - first + 1 >= len(self.train_rows):
            return list(self.train_rows)
        seen = {int(i) for step in range(first, last + 1)
                for i in step_prompt_indices(len(self.train_rows), step, self.prompts_per_step, self.seed, rank, world_size)}  # fmt: skip
        return [self.train_rows[i] for i in sorted(seen)]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.lightning_module.rl_step if trainer is not None else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream = StepPrompts(self.train_rows, self.prompts_per_step, self.seed, start, rank, world)
        return DataLoader(stream, batch_size=None, collate_fn=_keep_rows)

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        shard = self.val_rows[rank::world]
        # Every rank runs the same number of equally sized batches (sharded decoding runs in lockstep):
        # a short shard is padded with copies of a prompt that validation generates for but ignores.
        per_rank = -(-len(self.val_rows) // world)
        padded = shard + self.val_rows[:1] * (per_rank - len(shard))
        size = self.val_batch_size
        batches = [
            ValBatch(padded[i : i + size], max(0, min(size, len(shard) - i)))
            for i in range(0, per_rank, size)
        ]
        return DataLoader(RankBatches(batches), batch_size=None, collate_fn=_keep_rows)


def seed_for(*parts: int) -> int:
    """A 31-bit seed derived from integers (base seed, step, rank, ...), stable across runs."""
    return int(np.random.default_rng(list(parts)).integers(2**31 - 1))


def global_seed(seed: int | None) -> int:
    """`seed`, or for None the global seed `lightning.seed_everything` exported (PL_GLOBAL_SEED), else 0.

    The modules' seeds default to it, so that from Python `L.seed_everything(s)` seeds their rollouts,
    prompt order and episodes as the CLIs' `seed_everything` does (it used to change nothing there)."""
    return int(seed) if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))


def seed_of(seed_everything: bool | int | None) -> int:
    """The integer seed a CLI's `seed_everything` stands for (`true`: the one Lightning draws and exports
    as PL_GLOBAL_SEED; `false`/null: 0, the seeds' default). Both CLIs link it to `model.seed` and
    `data.seed`."""
    if isinstance(seed_everything, bool) or seed_everything is None:
        if seed_everything:
            from lightning.fabric.utilities.seed import seed_everything as draw

            return draw(workers=True)
        return 0
    return int(seed_everything)
