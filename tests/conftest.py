"""Shared test configuration: CPU-only by default, offline, one torch thread.

Fixtures that need the tiny model/tokenizer live next to the tests that use them and build real
artifacts through the real `Auto*` loaders.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Modules' seeds default to the global one (PL_GLOBAL_SEED); an earlier test's seed_everything must
    not change a later test's runs."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def ddp_run(tmp_path: Path) -> Callable[[str, str, Path], list[dict]]:
    """`ddp_run(scenario, model_path, task_dir)`: a policy run of tests/basis/ddp_run.py under real
    Lightning DDP on 2 CPU processes (gloo); returns the two ranks' records (see that script)."""

    def run(scenario: str, model_path: str, task_dir: Path) -> list[dict]:
        script = Path(__file__).parent / "basis" / "ddp_run.py"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, str(script), scenario, model_path, str(task_dir), str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]

    return run


@pytest.fixture
def mlflow_store(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real, empty sqlite MLflow store for one test; returns its tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An UNTRAINED tiny Qwen3 causal LM + byte-level tokenizer (with chat template), saved with
    `save_pretrained` to a temporary folder that `AutoModelForCausalLM` / `AutoTokenizer` load."""
    from basis.tiny_policy import build_model, build_tokenizer, save_policy

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=64, num_layers=2, intermediate_size=128, seed=0)
    return str(save_policy(model, tokenizer, tmp_path_factory.mktemp("tiny_lm")))
