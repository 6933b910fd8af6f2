"""The evidence-producing scripts on synthetic inputs (seconds, no training): the rollout-efficiency
figures, the code fingerprint that decides whether a finished benchmark run is reused, and how the demo
keeps its comparison when its last step fails."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of scripts, not an installed package


def _run(val: dict[int, float], rollouts_per_step: float) -> dict:
    """A `read_run` record: validations at `val` steps and a fixed number of rollouts per step."""
    last = max(val)
    return {
        "val": sorted(val.items()),
        "rollouts_at": {step: step * rollouts_per_step for step in range(1, last + 1)},
    }


def test_last3_compares_arms_at_grpo_validation_rollouts() -> None:
    from benchmarks.rollout_efficiency import last3_at_equal_cost

    # GRPO validates every 25 steps of 128 rollouts: its last three at 19,200 / 22,400 / 25,600.
    grpo = _run({0: 0.33, 150: 0.40, 175: 0.42, 200: 0.44}, 128)
    # A budgeted arm (112 rollouts per step) validates every 25 steps and once more where its budget
    # ran out (step 229): its own last three (200, 225, 229) span only 22,400-25,648.
    arm = _run({0: 0.33, 150: 0.30, 175: 0.40, 200: 0.50, 225: 0.60, 229: 0.70}, 112)
    assert last3_at_equal_cost(grpo, grpo) == pytest.approx((0.40 + 0.42 + 0.44) / 3)
    # nearest to 19,200 / 22,400 / 25,600: steps 175 (19,600), 200 (22,400), 229 (25,648)
    assert last3_at_equal_cost(arm, grpo) == pytest.approx((0.40 + 0.50 + 0.70) / 3)
    # an arm validated too rarely to give three distinct points counts each one once: step 180
    # (20,160 rollouts) is the nearest to both 19,200 and 22,400
    sparse = _run({0: 0.33, 180: 0.40, 229: 0.70}, 112)
    assert last3_at_equal_cost(sparse, grpo) == pytest.approx((0.40 + 0.70) / 2)


def _results_io_at(root: Path) -> ModuleType:
    """`benchmarks/results_io.py` copied into `root`, so its fingerprint hashes `root`'s folders."""
    (root / "benchmarks").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "results_io.py", root / "benchmarks" / "results_io.py")
    spec = importlib.util.spec_from_file_location("results_io_copy", root / "benchmarks" / "results_io.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_code_fingerprint_sees_an_edit_to_a_module_not_yet_added_to_git(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    results_io = _results_io_at(tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "trainer.py").write_text("from pkg.new_estimator import scale\n")
    (tmp_path / ".gitignore").write_text("__pycache__/\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "start")
    (tmp_path / "pkg" / "new_estimator.py").write_text("scale = 1.0\n")  # imported, not yet added
    before = results_io.code_fingerprint("pkg")
    (tmp_path / "pkg" / "new_estimator.py").write_text("scale = 2.0\n")
    edited = results_io.code_fingerprint("pkg")
    assert edited != before  # a run made with scale = 1.0 must not be reused
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "trainer.cpython-311.pyc").write_bytes(b"\0")
    assert results_io.code_fingerprint("pkg") == edited  # git-ignored files are not code


def test_code_fingerprint_outside_git_ignores_the_bytecode_runs_write(tmp_path: Path) -> None:
    results_io = _results_io_at(tmp_path)  # tmp_path is no git checkout
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "trainer.py").write_text("x = 1\n")
    before = results_io.code_fingerprint("pkg")
    (tmp_path / "pkg" / "__pycache__").mkdir()  # what a policy run's `import pkg.trainer` leaves
    (tmp_path / "pkg" / "__pycache__" / "trainer.cpython-311.pyc").write_bytes(b"\0bytecode")
    assert results_io.code_fingerprint("pkg") == before
    (tmp_path / "pkg" / "trainer.py").write_text("x = 2\n")
    assert results_io.code_fingerprint("pkg") != before


def test_demo_keeps_its_comparison_when_the_mlflow_summary_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import basis.demo as demo

    table = {
        arm: {
            "run_id": arm,
            "mean_at_k": 0.4,
            "mean_at_k_stderr": 0.02,
            "start_mean_at_k": 0.3,
            "pass_at_k": {1: 0.4, 2: 0.5},
            "rollouts": 100.0,
            "curve": [(0.0, 0.3), (100.0, 0.4)],
        }
        for arm in demo.ARMS
    }

    def unwritable_store(table: dict, timings: dict, experiment: str) -> None:
        raise PermissionError("mlflow/artifacts is not writable")

    monkeypatch.setattr(demo, "stages", lambda workdir, quick: [])  # every policy run has finished
    monkeypatch.setattr(demo, "comparison", lambda runs: table)
    monkeypatch.setattr(demo, "log_summary", unwritable_store)
    workdir = tmp_path / "demo"
    workdir.mkdir()
    with pytest.raises(SystemExit, match=r"MLflow summary.*not writable"):
        demo.main([f"--workdir={workdir}"])
    kept = json.loads((workdir / "comparison.json").read_text())
    assert set(kept) == set(demo.ARMS) and kept["grpo"]["rollouts"] == 100.0


def test_demo_names_the_comparison_step_when_a_run_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import basis.demo as demo

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(demo, "stages", lambda workdir, quick: [])
    workdir = tmp_path / "demo"
    (workdir / "runs").mkdir(parents=True)  # no run wrote its mlflow_run_id
    with pytest.raises(SystemExit, match="stage 'comparison' failed"):
        demo.main([f"--workdir={workdir}"])
