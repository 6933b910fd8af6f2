"""`make demo --quick`: the whole chain in real subprocesses (minutes; builds the tiny policy if missing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    for stale in ("pairs/progress/from-an-earlier-demo.json", "prior/from-an-earlier-demo.txt"):
        (tmp_path / "demo" / stale).parent.mkdir(parents=True)  # a rerun used to fail in harvest:
        (tmp_path / "demo" / stale).write_text("{}")  # "already holds ... harvested with other settings"
    result = subprocess.run(
        [sys.executable, "-m", "basis.demo", "--quick", f"--workdir={tmp_path / 'demo'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.loads((tmp_path / "demo" / "comparison.json").read_text())
    assert set(table) == {"grpo", "v05_osla", "basis_k1"}
    assert table["basis_k1"]["rollouts"] < table["grpo"]["rollouts"]
    assert (tmp_path / "demo" / "prior" / "config.json").exists()
    assert not list((tmp_path / "demo").rglob("from-an-earlier-demo*"))  # rebuilt, not mixed
    assert (
        "mlflow ui --backend-store-uri" in result.stdout and "experiment 'basis-demo-quick'" in result.stdout
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("basis-demo-quick").experiment_id
    (summary,) = client.search_runs([experiment], "attributes.run_name = 'comparison'")
    assert {summary.data.tags[f"run_id.{arm}"] for arm in table} == {row["run_id"] for row in table.values()}


def test_the_quick_demo_has_its_own_default_work_folder() -> None:
    from basis.demo import stages, workdir_for

    quick, full = workdir_for(quick=True), workdir_for(quick=False)
    assert quick != full and workdir_for(True, "/tmp/x") == Path("/tmp/x")
    outputs = [
        {c for stage in stages(w, q) for c in stage.command if str(w) in c}
        for w, q in ((quick, True), (full, False))
    ]
    assert outputs[0] and outputs[1] and not outputs[0] & outputs[1]
