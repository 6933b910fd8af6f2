"""A V0.5 + OSLA run under real Lightning DDP on 2 CPU processes whose ranks disagree (used by
tests/basis/test_v05.py; Lightning's DDP launcher re-runs this script as rank 1).

Rank 0's prior (a test double) is adversarial, so OSLA adds rollouts there and rank 0 runs more
micro-batches; rank 1's prior raises, so rank 1 falls back to the empirical baseline and logs no
fusion metrics. Each rank saves its final policy weights to `<out>/rank<r>.pt`.

    python tests/basis/ddp_v05_run.py MODEL_PATH TASK_DIR OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from basis.data import PromptDataModule
from basis.trainer import PolicyTrainer
from basis.v05 import OslaSettings


class RankPrior:
    """Test double for V0: success probability 0.999 on rank 0 (the untrained model never succeeds),
    an exception on rank 1."""

    def predict(self, context_prompts, context_success, query_prompts) -> torch.Tensor:
        if dist.get_rank() == 1:
            raise RuntimeError("prior down on rank 1")
        return torch.full((len(query_prompts),), 0.999)

    def prepare(self, prompts) -> None:
        pass


def main(model_path: str, task_dir: str, out: str) -> None:
    module = PolicyTrainer(
        model_path,
        advantage="v05",
        prior=RankPrior(),
        osla=OslaSettings(),
        group_size=4,
        max_new_tokens=8,
        micro_batch_size=4,
        kl_coef=0.1,  # a gradient on every rank, whatever the advantages
        run_dir=f"{out}/run",
        min_context=4,
        context_size=8,
    )
    module.support.add([f"Q{i}" for i in range(8)], [1.0, 0.0] * 4)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=PromptDataModule(task_dir, val_path=None, prompts_per_step=2))
    rollouts = sum(module._v05_history["rollouts_per_prompt"])  # this rank's own
    state = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    record = {"rl_step": module.rl_step, "rollouts": rollouts, "state": state}
    torch.save(record, Path(out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
