"""Shared test configuration: CPU-only by default, offline, one torch thread.

Fixtures that need the tiny model/tokenizer live next to the tests that use them and build real
artifacts through the real `Auto*` loaders.
"""

from __future__ import annotations

import os

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
