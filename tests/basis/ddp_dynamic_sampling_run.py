"""DAPO dynamic sampling under real Lightning DDP on 2 CPU processes (used by tests/basis/test_trainer.py;
Lightning's DDP launcher re-runs this script as rank 1). A test-double verifier makes about half of all
groups informative, so the ranks refill different numbers of rounds and train on different numbers of
micro-batches. Each rank saves its final policy weights and rollout count to `<out>/rank<r>.pt`.

    python tests/basis/ddp_dynamic_sampling_run.py MODEL_PATH TASK_DIR OUT
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import lightning as L
import torch

from basis import rewards
from basis.data import PromptDataModule
from basis.trainer import PolicyTrainer


class CoinVerifier:
    """Test double for a verifier: a response succeeds when its text's CRC is odd."""

    def __call__(self, responses, answers):
        return rewards.VerifyResult([float(zlib.crc32(r.encode()) % 2) for r in responses], 0)


def main(model_path: str, task_dir: str, out: str) -> None:
    rewards.VERIFIERS["coin"] = CoinVerifier
    module = PolicyTrainer(
        model_path,
        advantage="grpo",
        group_size=2,
        verifier="coin",
        dynamic_sampling_rounds=3,
        max_new_tokens=8,
        micro_batch_size=2,
        run_dir=f"{out}/run",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=PromptDataModule(task_dir, val_path=None, prompts_per_step=3))
    state = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    record = {"rl_step": module.rl_step, "rollouts_total": module.rollouts_total, "state": state}
    torch.save(record, Path(out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
