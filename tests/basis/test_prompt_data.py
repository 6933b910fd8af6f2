"""Tests for basis.data: the policy trainer's prompt DataModule (named apart from tests/value_prior/test_data.py: test folders are not packages, so basenames must be unique)."""

from __future__ import annotations

from pathlib import Path

from basis.data import PromptDataModule
from basis.tasks import write_arithmetic_task


def test_validation_subset_does_not_follow_the_training_seed(tmp_path: Path) -> None:
    """`seed_everything` sets `data.seed`; the held-out subset must not move with it, so that runs with
    different training seeds are measured on the same prompts."""
    write_arithmetic_task(tmp_path, seed=0, n_train=40, n_val=60, n_test=5)
    subsets = []
    for seed in (0, 1, 2):
        data = PromptDataModule(
            str(tmp_path), val_path=str(tmp_path), prompts_per_step=4, val_prompts=20, seed=seed
        )
        data.setup("fit")
        subsets.append([row.prompt_id for row in data.val_rows])
    assert len(subsets[0]) == 20 and subsets[0] == subsets[1] == subsets[2]
    other = PromptDataModule(
        str(tmp_path), val_path=str(tmp_path), prompts_per_step=4, val_prompts=20, val_seed=1
    )
    other.setup("fit")
    assert [row.prompt_id for row in other.val_rows] != subsets[0]
