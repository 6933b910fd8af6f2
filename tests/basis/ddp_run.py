"""Policy runs under real Lightning DDP on 2 CPU processes whose ranks disagree (used by
tests/basis/test_v05.py and test_trainer.py through the `ddp_run` fixture; Lightning's DDP launcher
re-runs this script as rank 1). Each rank saves its RL step, the rollouts it consumed by its own count
and in total, and its final policy weights to `<out>/rank<r>.pt`.

Scenarios:
- `v05`: V0.5 + OSLA. Rank 0's prior (a test double) is adversarial, so OSLA adds rollouts there and
  rank 0 runs more micro-batches; rank 1's prior raises, so rank 1 falls back to the empirical baseline
  and logs no fusion metrics.
- `dynamic_sampling`: GRPO with DAPO dynamic sampling; a test-double verifier makes about half of all
  groups informative, so the ranks refill different numbers of rounds.

    python tests/basis/ddp_run.py SCENARIO MODEL_PATH TASK_DIR OUT
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from basis import rewards
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


class CoinVerifier:
    """Test double for a verifier: a response succeeds when its text's CRC is odd."""

    def __call__(self, responses, answers):
        return rewards.VerifyResult([float(zlib.crc32(r.encode()) % 2) for r in responses], 0)


def module_for(scenario: str, model_path: str, out: str) -> PolicyTrainer:
    common = dict(max_new_tokens=8, run_dir=f"{out}/run")
    if scenario == "v05":
        module = PolicyTrainer(
            model_path, advantage="v05", prior=RankPrior(), osla=OslaSettings(), group_size=4,
            micro_batch_size=4, kl_coef=0.1,  # a gradient on every rank, whatever the advantages
            min_context=4, context_size=8, **common,
        )  # fmt: skip
        module.support.add([f"Q{i}" for i in range(8)], [1.0, 0.0] * 4)
        return module
    rewards.VERIFIERS["coin"] = CoinVerifier
    return PolicyTrainer(
        model_path, advantage="grpo", group_size=2, verifier="coin", dynamic_sampling_rounds=3,
        micro_batch_size=2, **common,
    )  # fmt: skip


def main(scenario: str, model_path: str, task_dir: str, out: str) -> None:
    module = module_for(scenario, model_path, out)
    steps, per_step = {"v05": (2, 2), "dynamic_sampling": (3, 3)}[scenario]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=PromptDataModule(task_dir, val_path=None, prompts_per_step=per_step))
    record = {
        "rl_step": module.rl_step,
        "rollouts": sum(module._v05_history["rollouts_per_prompt"]),  # this rank's own (V0.5 only)
        "rollouts_total": module.rollouts_total,
        "state": {k: v.detach().clone() for k, v in module.policy.state_dict().items()},
    }
    torch.save(record, Path(out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:5])
