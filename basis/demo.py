"""`make demo`: the whole chain on this machine, from nothing to a rollout-efficiency comparison.

    1. build the tiny policy (`tiny-policy`), unless it exists
    2. GRPO with a fixed group (`basis fit`), exporting checkpoints – also the GRPO arm of step 5
    3. harvest query-performance pairs from those checkpoints (`harvest run`)
    4. pretrain the V0 prior on the pairs (`value-prior fit`) and export it
    5. V0.5 + OSLA and BASIS at k = 1 (`basis fit`), from the same starting policy, prior from step 4
    6. print held-out mean@k and pass@k against rollouts consumed, log a comparison plot, and print
       the command that opens the MLflow UI (experiment `basis-demo`)

Every stage is the same console command a user runs, in a subprocess, with the configs under
`configs/`. `--quick` shrinks every stage after the tiny policy (minutes in all) for tests; its
outputs go to their own work folder (`runs/demo-quick`) and its runs to their own MLflow experiment
(`basis-demo-quick`), so they never mix with the full demo's. (Its V0 training checkpoints, not the
prior, go to the config's folder `artifacts/checkpoints/v0-pairs-minilm`, which every V0 fit from
that config shares.)
Every run rebuilds the chain: an earlier demo's pairs and prior are removed first (harvest would refuse
to add this run's checkpoints to pairs harvested from other ones), and its policy runs' outputs are set
aside by the trainer. Our choice: step 2's GRPO run doubles as the GRPO arm of the comparison (same config, same starting
policy, same validation protocol) instead of training GRPO twice.

    python -m basis.demo              # ~10 minutes on 2 CPU cores with the tiny policy built, +2 to build it
    python -m basis.demo --quick --workdir /tmp/demo
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from basis.tracking import default_tracking_uri, ensure_experiment, ui_command

EXPERIMENT = "basis-demo"  # `--quick` logs into "basis-demo-quick", apart from the full demo's runs


def experiment_for(quick: bool) -> str:
    return f"{EXPERIMENT}-quick" if quick else EXPERIMENT


ARMS = ("grpo", "v05_osla", "basis_k1")


@dataclass(frozen=True)
class Stage:
    name: str
    command: list[str]


def stages(workdir: Path, quick: bool) -> list[Stage]:
    """The demo's commands. `workdir` holds runs, pairs and the prior; the tiny policy is
    `artifacts/tiny-policy` (built first if missing) in both variants: V0 needs a policy that solves
    some prompts, and a seconds-scale warm start does not."""
    py = [sys.executable, "-m"]
    policy = Path("artifacts/tiny-policy")
    runs, pairs, prior = workdir / "runs", workdir / "pairs", workdir / "prior"
    data = [f"--data.train_path={policy / 'data'}", f"--data.val_path={policy / 'data'}"]
    small = (
        [
            "--trainer.max_steps=4",
            "--model.val_every_n_steps=2",
            "--data.val_prompts=8",
            "--model.export_every_n_steps=2",
            "--model.min_context=8",
        ]
        if quick
        else []
    )

    def policy_run(arm: str, config: str, *extra: str) -> Stage:
        args = [
            f"--config=configs/policy/{config}",
            f"--model.model_path={policy}",
            f"--model.run_dir={runs / arm}",
            f"--trainer.logger.init_args.experiment_name={experiment_for(quick)}",
            f"--trainer.logger.init_args.run_name={arm}",
        ]
        return Stage(f"{arm} policy run", [*py, "basis.cli", "fit", *args, *data, *small, *extra])

    out: list[Stage] = []
    if not (policy / "eval.json").exists():
        tiny = [*py, "basis.tiny_policy", "--config=configs/tiny_policy.yaml", f"--out_dir={policy}"]
        out.append(Stage("tiny policy", tiny))
    out.append(policy_run("grpo", "grpo_tiny.yaml"))
    out += prior_stages(policy, runs / "grpo" / "exports", pairs, prior, quick)
    out.append(policy_run("v05_osla", "v05_tiny.yaml", f"--model.prior={prior}"))
    out.append(policy_run("basis_k1", "basis_tiny.yaml", f"--model.prior={prior}"))
    return out


def prior_stages(policy: Path, exports: Path, pairs: Path, prior: Path, quick: bool = False) -> list[Stage]:
    """Harvest `policy` (step 0) and the GRPO run's `exports` into `pairs`, pretrain V0 on them and
    export it to `prior` (also the rollout-efficiency benchmark's prior)."""
    py = [sys.executable, "-m"]
    checkpoints = f"[{{path: {policy}, policy: grpo, step: 0}}, {{path: {exports}, policy: grpo}}]"
    harvest = [*py, "data_pipelines.harvest", "run", "--config=configs/harvest/tiny.yaml",
               f"--prompts={policy / 'data'}", f"--out={pairs}", f"--checkpoints={checkpoints}"]  # fmt: skip
    # All 500 held-out prompts, not the config's 200: in 60-step V0.5 probes the prior fitted on 500
    # was rejected on 31 % of prompts instead of 37 % (6.6 rollouts per prompt instead of 7.4), for
    # about 30 s more harvesting.
    harvest += ["--num_prompts=64", "--rollouts_per_prompt=4"] if quick else ["--num_prompts=500"]
    v0 = [*py, "value_prior.cli", "fit", "--config=configs/value_prior/v0_pairs_minilm.yaml",
          f"--data.pairs={pairs}", f"--model.export_dir={prior}"]  # fmt: skip
    if quick:  # losses logged at each of its two steps (the config logs every 5th)
        v0 += ["--trainer.max_epochs=1", "--data.batches_per_epoch=2", "--trainer.log_every_n_steps=1"]
    return [Stage("harvest pairs", harvest), Stage("V0 pretraining", v0)]


def run_stage(stage: Stage, log_dir: Path) -> float:
    """Run one stage, streaming its output to a log file; fail loudly with the log's tail."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / (stage.name.replace(" ", "_") + ".log")
    print(f"==> {stage.name}: {' '.join(stage.command)}", flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        result = subprocess.run(
            stage.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"stage '{stage.name}' failed (exit {result.returncode}); log {log_path}:\n{tail}")
    print(f"    done in {elapsed:.0f} s (log {log_path})", flush=True)
    return elapsed


def comparison(runs: Path) -> dict[str, dict[str, float | list[float]]]:
    """Per arm: final held-out mean@k, pass@k, rollouts consumed, and the mean@k-vs-rollouts curve."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_tracking_uri())
    table: dict[str, dict] = {}
    for arm in ARMS:
        run_id = (runs / arm / "mlflow_run_id").read_text().strip()
        metrics = client.get_run(run_id).data.metrics
        rollouts = {m.step: m.value for m in client.get_metric_history(run_id, "train/rollouts_total")}
        curve = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/mean_at_k"))
        pass_keys = sorted(int(k.rsplit("/", 1)[1]) for k in metrics if k.startswith("val/pass_at_k/"))
        table[arm] = {
            "run_id": run_id,
            "mean_at_k": metrics["val/mean_at_k"],
            "mean_at_k_stderr": metrics["val/mean_at_k_stderr"],
            "start_mean_at_k": curve[0][1],
            "pass_at_k": {k: metrics[f"val/pass_at_k/{k}"] for k in pass_keys},
            "rollouts": max(rollouts.values()),
            "curve": [(rollouts.get(step, 0.0), value) for step, value in curve],
        }
    return table


def print_table(table: dict[str, dict]) -> None:
    ks = sorted(next(iter(table.values()))["pass_at_k"])
    shown = [k for k in ks if k in (1, 2, 4, 8, 16) or k == ks[-1]]
    header = f"{'run':<10} {'rollouts':>9} {'mean@k start':>13} {'mean@k final':>13} " + " ".join(
        f"{'pass@' + str(k):>8}" for k in shown
    )
    print("\n" + header + "\n" + "-" * len(header))
    for arm, row in table.items():
        passes = " ".join(f"{row['pass_at_k'][k]:>8.3f}" for k in shown)
        final = f"{row['mean_at_k']:.3f}±{row['mean_at_k_stderr']:.3f}"
        print(f"{arm:<10} {row['rollouts']:>9.0f} {row['start_mean_at_k']:>13.3f} {final:>13} {passes}")
    print(
        "(mean@k = expected accuracy of one sample at the training temperature; ± one standard error over prompts)"
    )


def log_summary(table: dict[str, dict], timings: dict[str, float], experiment: str) -> None:
    """A summary run in the demo experiment with the mean@k-vs-rollouts plot and the table as JSON,
    tagged `run_id.<arm>` with the runs it compares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, row in table.items():
        xs, ys = zip(*row["curve"])
        ax.plot(xs, ys, marker="o", label=arm)
    ax.set_xlabel("rollouts consumed")
    ax.set_ylabel("held-out mean@k")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    experiment_id = ensure_experiment(experiment)
    tags = {f"run_id.{arm}": row["run_id"] for arm, row in table.items()}
    with mlflow.start_run(experiment_id=experiment_id, run_name="comparison", tags=tags):
        mlflow.log_figure(fig, "mean_at_k_vs_rollouts.png")
        mlflow.log_dict(
            {arm: {k: v for k, v in row.items() if k != "curve"} for arm, row in table.items()},
            "comparison.json",
        )
        mlflow.log_metrics({f"stage_seconds/{name.replace(' ', '_')}": t for name, t in timings.items()})


def workdir_for(quick: bool, workdir: str | None = None) -> Path:
    """The demo's work folder: the quick variant's default is its own, so its small runs and pairs
    never end up in a full demo's harvest (which would refuse or pool them)."""
    return Path(workdir or ("runs/demo-quick" if quick else "runs/demo"))


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        description="Run the whole chain: tiny policy, GRPO, harvest, V0, V0.5 + OSLA, BASIS."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Minutes-scale variant for tests (every stage after the tiny policy shrunk).",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="Folder for runs, pairs and the prior (default runs/demo, or runs/demo-quick with --quick).",
    )
    args = parser.parse_args(argv)
    workdir = workdir_for(args.quick, args.workdir)
    for derived in (workdir / "pairs", workdir / "prior"):
        if derived.exists():  # an earlier demo's, from other checkpoints: this run rebuilds them
            print(f"removing {derived} (rebuilt below from this run's checkpoints)", flush=True)
            shutil.rmtree(derived)
    start = time.perf_counter()
    timings = {stage.name: run_stage(stage, workdir / "logs") for stage in stages(workdir, args.quick)}
    try:
        table = comparison(workdir / "runs")
    except Exception as err:  # the policy runs finished; their MLflow records could not be read back
        raise SystemExit(
            f"stage 'comparison' failed reading the runs under {workdir / 'runs'}: {err!r}"
        ) from err
    (workdir / "comparison.json").write_text(json.dumps(table, indent=2))  # before anything else can fail
    print_table(table)
    try:
        log_summary(table, timings, experiment_for(args.quick))
    except Exception as err:
        raise SystemExit(
            f"stage 'MLflow summary' failed: {err!r}; the comparison is kept in {workdir / 'comparison.json'}"
        ) from err
    print(
        f"\nTotal {time.perf_counter() - start:.0f} s. Stage times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    )
    print(
        f"\nMLflow UI (experiment '{experiment_for(args.quick)}'; select the runs and Compare):\n    {ui_command()}\n"
        "then open http://127.0.0.1:5000"
    )


if __name__ == "__main__":
    main()
