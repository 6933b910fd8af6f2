"""Harvest throughput (issue 6): 3 checkpoints x 200 prompts x 10 rollouts with the HF engine on CPU.

Runs `data_pipelines.harvest.run` with `configs/harvest/tiny.yaml` (the tiny-policy GRPO run's starting
policy and two exports) into a fresh temporary folder, then – with `--repeat true` – a second time into
another folder and checks that the shards are byte-identical (same seed, same pairs). Reports pairs per
minute, response tokens per second, wall time against the 5-minute target, the per-checkpoint mean
success rates and the machine load (1-minute load average before and after) to
`benchmarks/results/harvest_throughput.json`.

Needs the checkpoints of the config: `make tiny-policy && basis fit --config configs/policy/grpo_tiny.yaml`.

Run: `python benchmarks/harvest_throughput.py [--harvest_config configs/harvest/tiny.yaml] [--repeat false]`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run as a script the repository root is not on sys.path; add it so `benchmarks.results_io` imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 300.0


def harvest_kwargs(config: str, out: str) -> dict[str, Any]:
    """The `run` arguments of a harvest config (parsed like `harvest run --config`), with `out` replaced."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from data_pipelines.harvest import run

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(run)
    namespace = parser.instantiate(parser.parse_args(["--config", config, f"--out={out}"]))
    return {key: namespace[key] for key in namespace.keys() if "." not in key and key != "config"}  # noqa: SIM118


def shard_bytes(out: str) -> dict[str, bytes]:
    from data_pipelines.harvest import harvest_data_files

    return {str(Path(f).relative_to(out)): Path(f).read_bytes() for f in harvest_data_files(out)}


def main(harvest_config: str = "configs/harvest/tiny.yaml", repeat: bool = True) -> dict[str, Any]:
    """Time the harvest of `harvest_config` (and repeat it to check determinism); write the results JSON.

    Args:
        harvest_config: Harvest config (checkpoints, prompts, rollouts, sampling).
        repeat: Harvest a second time into another folder and compare the shards byte for byte.
    """
    from benchmarks.results_io import write_results
    from data_pipelines.harvest import run

    config_file = str(Path(harvest_config).resolve())
    os.chdir(REPO)  # the config's paths are relative to the repository root
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="harvest-bench-") as tmp:
        first = run(
            **harvest_kwargs(config_file, f"{tmp}/first") | {"experiment": "harvest-bench", "progress": True}
        )
        print(first)
        identical = None
        if repeat:
            second = run(
                **harvest_kwargs(config_file, f"{tmp}/second") | {"experiment": None, "progress": False}
            )
            identical = shard_bytes(f"{tmp}/first") == shard_bytes(f"{tmp}/second")
            print(f"repeat: {second.seconds:.1f} s, shards byte-identical: {identical}")
    load_after = os.getloadavg()[0]
    kwargs = harvest_kwargs(config_file, "unused")
    payload = {
        "config": harvest_config,
        "checkpoints": len(first.checkpoints),
        "prompts": kwargs["num_prompts"],
        "rollouts_per_prompt": kwargs["rollouts_per_prompt"],
        "max_new_tokens": kwargs["sampling"].max_new_tokens,
        "batch_size": kwargs["batch_size"],
        "pairs": first.pairs,
        "rollouts": first.rollouts,
        "seconds": round(first.seconds, 1),
        "target_seconds": TARGET_SECONDS,
        "within_target": first.seconds <= TARGET_SECONDS,
        "pairs_per_minute": round(first.pairs_per_minute, 1),
        "tokens_per_s": round(first.tokens_per_s, 1),
        "mean_success": {f"{c.policy}@step{c.step}": round(c.mean_success, 4) for c in first.checkpoints},
        "repeat_seconds": round(second.seconds, 1) if repeat else None,
        "same_seed_same_pairs": identical,
        "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
    }
    path = write_results("harvest_throughput", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main)
