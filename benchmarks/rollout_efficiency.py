"""Rollout efficiency: GRPO (fixed group of 8) vs V0.5 + OSLA vs BASIS (k = 1), 3 seeds, equal rollout budgets.

For every seed the three arms train the tiny policy from the same start with the demo's configs
(`configs/policy/{grpo,v05,basis}_tiny.yaml`). GRPO runs `--steps` RL steps; V0.5 + OSLA and BASIS run
until they have consumed as many rollouts as that GRPO run (`model.max_rollouts`), however many steps
that takes, so every arm is compared at equal cost and "rollouts to match" is found wherever it lies
within GRPO's budget. Held-out mean@k (sampled at the training temperature) is validated every
`--val-every` steps (every 2 x `--val-every` for BASIS, whose steps take half GRPO's rollouts, so all
arms validate about every 3,200 rollouts) and at the end. The V0 prior comes from the demo chain: GRPO
checkpoints of seed 0 -> `harvest run` -> `value-prior fit` (reused from `--prior` when that folder
exists).

Per arm and seed it records the final held-out mean@k ("final_mean_at_4": the expected accuracy of one
sample, estimated from 8 per prompt – the same expectation as mean@4), the rollouts consumed, and
"rollouts_to_match_grpo": the rollouts consumed at the first validation where the arm's mean@k
reached the final mean@k of GRPO with the same seed (null if it never did; a budgeted run stops after
the step that crosses GRPO's budget, so it may overshoot by less than one step; GRPO's own row shows
how early GRPO "matches itself" by validation noise alone). Because one validation carries a standard
error of ~0.018, it also records "final_mean_at_4_last3", the mean of three validations at equal cost: the
arm's validations nearest (in rollouts consumed) to the last three validations of GRPO with the same seed
– not simply its own last three, since a budget-stopped run adds a final validation a few steps after a
periodic one, which would narrow and shift its window – and the per-step gradient-norm spread (std and
coefficient of variation over steps).

    .venv/bin/python benchmarks/rollout_efficiency.py [--seeds 0 1 2] [--steps 200]

Writes `benchmarks/results/rollout_efficiency.json`; runs land in MLflow experiment
`rollout-efficiency`. About 10 policy runs of 3-4 minutes each on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basis.demo import prior_stages
from basis.tracking import files_sha256
from benchmarks.results_io import code_fingerprint, git_state, write_results

ARMS = {"grpo": "grpo_tiny.yaml", "v05_osla": "v05_tiny.yaml", "basis_k1": "basis_tiny.yaml"}
VAL_EVERY_FACTOR = {"grpo": 1, "v05_osla": 1, "basis_k1": 2}  # validate about every 3,200 rollouts
EXPERIMENT = "rollout-efficiency"


def run(command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("==>", " ".join(command), flush=True)
    with log.open("w") as out:
        code = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        ).returncode
    if code:
        raise SystemExit(f"failed ({code}): see {log}\n" + log.read_text()[-2000:])


def policy_run(
    arm: str, seed: int, args: argparse.Namespace, prior: Path | None, budget: int | None = None
) -> Path:
    """Train one arm for `args.steps` RL steps, or until it has consumed `budget` rollouts (at most
    4 x `args.steps` steps). A run folder finished earlier is reused only if its record matches this
    run: the same command, the same code (`code_fingerprint` of the packages and configs) and the same
    policy and prior files."""
    run_dir = args.workdir / f"{arm}-seed{seed}"
    max_steps = args.steps if budget is None else 4 * args.steps
    command = [
        sys.executable, "-m", "basis.cli", "fit", f"--config=configs/policy/{ARMS[arm]}",
        f"--model.model_path={args.policy}", f"--model.run_dir={run_dir}", f"--trainer.max_steps={max_steps}",
        f"--model.val_every_n_steps={args.val_every * VAL_EVERY_FACTOR[arm]}", f"--data.val_prompts={args.val_prompts}",
        f"--seed_everything={seed}",  # also the trainer's and the data module's seed
        f"--data.train_path={args.policy / 'data'}", f"--data.val_path={args.policy / 'data'}",
        f"--trainer.logger.init_args.experiment_name={EXPERIMENT}", f"--trainer.logger.init_args.run_name={arm}-seed{seed}",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if prior is not None:
        command.append(f"--model.prior={prior}")
    if budget is not None:
        command.append(f"--model.max_rollouts={budget}")
    inputs = [args.policy] + ([prior] if prior is not None else [])
    identity = {
        "command": command[1:],  # without the interpreter path
        "code": code_fingerprint("basis", "value_prior", "data_pipelines", "configs/policy"),
        "inputs": files_sha256(inputs)[:16],  # tells a rebuilt policy or prior apart
    }
    record = run_dir / "benchmark_command.json"
    # the record is written only once its run has finished (and removed before a rerun starts)
    if record.exists() and _same_run(json.loads(record.read_text()), identity):
        print(f"reusing {run_dir} (finished earlier by the same command, code and inputs)", flush=True)
        return run_dir
    record.unlink(missing_ok=True)  # a run killed midway must not look finished
    run(command, args.workdir / "logs" / f"{arm}-seed{seed}.log")
    commit, dirty = git_state()
    finished = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record.write_text(
        json.dumps({**identity, "git_commit": commit, "git_dirty": dirty, "finished": finished})
    )
    return run_dir


def _same_run(record: Any, identity: dict[str, Any]) -> bool:
    return isinstance(record, dict) and all(record.get(key) == value for key, value in identity.items())


def run_provenance(run_dir: Path) -> dict[str, Any]:
    """When and at which commit a run was made (older records hold the command only)."""
    record = json.loads((run_dir / "benchmark_command.json").read_text())
    keys = ("git_commit", "git_dirty", "finished", "code")
    return {key: record.get(key) for key in keys} if isinstance(record, dict) else {}


def build_prior(grpo_run: Path, args: argparse.Namespace) -> Path:
    """The demo chain's prior (`basis.demo.prior_stages`): harvest the GRPO checkpoints, pretrain V0."""
    for stage in prior_stages(args.policy, grpo_run / "exports", args.workdir / "pairs", args.prior):
        run(stage.command, args.workdir / "logs" / (stage.name.replace(" ", "_") + ".log"))
    return args.prior


def read_run(run_dir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from basis.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri())
    run_id = (run_dir / "mlflow_run_id").read_text().strip()

    def series(name: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))

    rollouts = dict(series("train/rollouts_total"))
    grad = [v for _, v in series("train/grad_norm")]
    step_seconds = sum(v for _, v in series("time/step"))
    prior_wait = series("time/prior")  # the step time spent waiting for V0
    prior_query = series("v05/prior_query_seconds")  # V0's own run time, overlapped with rollouts
    return {
        "prior_time_frac": sum(v for _, v in prior_wait) / step_seconds if prior_query else None,
        "prior_query_frac": sum(v for _, v in prior_query) / step_seconds if prior_query else None,
        "val": sorted(dict(series("val/mean_at_k")).items()),  # one point per step
        "rollouts_at": rollouts,
        "rollouts": max(rollouts.values()),
        "grad_norm_std": statistics.pstdev(grad),
        "grad_norm_cv": statistics.pstdev(grad) / statistics.mean(grad),
        "provenance": run_provenance(run_dir),
    }


def last3_at_equal_cost(run: dict, grpo: dict) -> float:
    """Mean held-out mean@k of `run`'s validations nearest, in rollouts consumed, to the last three
    validations of `grpo` (the GRPO run of the same seed; for GRPO itself, its last three). Each
    validation counts once, even when it is the nearest to two of GRPO's."""
    targets = [grpo["rollouts_at"].get(step, 0.0) for step, _ in grpo["val"][-3:]]
    points = [(run["rollouts_at"].get(step, 0.0), step, value) for step, value in run["val"]]
    chosen = {min(points, key=lambda p: (abs(p[0] - target), -p[0]))[1:] for target in targets}
    return statistics.mean(value for _, value in chosen)


def rollouts_to_reach(run: dict, target: float) -> float | None:
    for step, value in run["val"]:
        if step > 0 and value >= target:
            return run["rollouts_at"][step]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--val-prompts", type=int, default=500)
    parser.add_argument("--policy", type=Path, default=Path("artifacts/tiny-policy"))
    parser.add_argument("--prior", type=Path, default=Path("artifacts/priors/rollout-efficiency"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/rollout-efficiency"))
    args = parser.parse_args()
    if not (args.policy / "eval.json").exists():
        sys.exit(f"{args.policy} is missing: run `make tiny-policy` first")

    runs: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    for seed in args.seeds:
        runs["grpo"][seed] = read_run(policy_run("grpo", seed, args, None))
        if not (args.prior / "config.json").exists():
            build_prior(args.workdir / f"grpo-seed{seed}", args)
        budget = int(runs["grpo"][seed]["rollouts"])
        for arm in ("v05_osla", "basis_k1"):
            runs[arm][seed] = read_run(policy_run(arm, seed, args, args.prior, budget))

    result: dict[str, dict] = {}
    for arm, by_seed in runs.items():
        result[arm] = {
            "final_mean_at_4": [by_seed[s]["val"][-1][1] for s in args.seeds],
            # The last validation alone carries one standard error of ~0.018 here; the mean of three
            # (at GRPO's last three validations' rollouts, 19,200-25,600 by default) is the steadier
            # figure to compare arms by.
            "final_mean_at_4_last3": [last3_at_equal_cost(by_seed[s], runs["grpo"][s]) for s in args.seeds],
            "rollouts": [by_seed[s]["rollouts"] for s in args.seeds],
            "steps": [max(by_seed[s]["rollouts_at"]) for s in args.seeds],
            "rollouts_to_match_grpo": [
                rollouts_to_reach(by_seed[s], runs["grpo"][s]["val"][-1][1]) for s in args.seeds
            ],
            "start_mean_at_4": [by_seed[s]["val"][0][1] for s in args.seeds],
            "grad_norm_std": [by_seed[s]["grad_norm_std"] for s in args.seeds],
            "grad_norm_cv": [by_seed[s]["grad_norm_cv"] for s in args.seeds],
            # Issue target: the prior costs at most 5 % of step time. `prior_time_frac` is the step
            # time spent waiting for it; `prior_query_frac` what its queries would cost unhidden.
            "prior_time_frac": [by_seed[s]["prior_time_frac"] for s in args.seeds],
            "prior_query_frac": [by_seed[s]["prior_query_frac"] for s in args.seeds],
            # which code made each run (a run is reused while its command, code and inputs match)
            "provenance": [by_seed[s]["provenance"] for s in args.seeds],
        }
    grpo_rollouts = result["grpo"]["rollouts"]
    for arm, row in result.items():
        fractions = [
            m / g if m is not None else None for m, g in zip(row["rollouts_to_match_grpo"], grpo_rollouts)
        ]
        row["fraction_of_grpo_rollouts_to_match"] = fractions
        shown = ", ".join("never" if f is None else f"{f:.0%}" for f in fractions)
        finals = row["final_mean_at_4"]
        print(f"{arm:<9} final mean@4 {statistics.mean(finals):.3f} (seeds {', '.join(f'{v:.3f}' for v in finals)}; "
              f"last-3 mean {statistics.mean(row['final_mean_at_4_last3']):.3f}); "
              f"rollouts {statistics.mean(row['rollouts']):.0f}; to match GRPO: {shown}; "
              f"grad-norm CV {statistics.mean(row['grad_norm_cv']):.3f}"
              + (f"; prior {statistics.mean(row['prior_time_frac']):.2%} of step time (its queries "
                 f"{statistics.mean(row['prior_query_frac']):.2%}, overlapped with rollouts)"
                 if row["prior_time_frac"][0] is not None else ""))  # fmt: skip
    result["config"] = {"seeds": args.seeds, "steps": args.steps, "val_every": args.val_every, "val_prompts": args.val_prompts,
                        "val_samples": 8, "prior": str(args.prior),
                        "budget": "v05_osla and basis_k1 train until they have consumed the GRPO run's rollouts"}  # fmt: skip
    print(f"wrote {write_results('rollout_efficiency', result)}")


if __name__ == "__main__":
    main()
