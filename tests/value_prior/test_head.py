"""The in-context head: TabPFN checkpoint save/load, TabPFNClassifier compatibility, bad checkpoints,
the synthetic capability prior and a short prior-fit through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from value_prior.head import (
    CapabilityPrior,
    HeadCheckpointError,
    InContextHead,
    SyntheticTaskStream,
    append_discriminant,
    build_tabpfn,
    evaluate_head_on_tasks,
    load_head,
    whiten_by_support,
)


@pytest.fixture
def tiny_head(tmp_path: Path) -> Path:
    model, config = build_tabpfn(emsize=16, nlayers=1, nhead=2)
    return InContextHead(model, config).save(tmp_path / "tiny.ckpt")


def tasks(batch: int = 4, support: int = 48, query: int = 16, features: int = 6, seed: int = 0):
    return CapabilityPrior().sample(
        batch, support + query, features, support, torch.Generator().manual_seed(seed)
    )


def test_save_load_roundtrip_gives_identical_logits(shipped_head: str, tmp_path: Path) -> None:
    head = load_head(shipped_head)
    copy = load_head(head.save(tmp_path / "copy.ckpt"))
    t = tasks()
    n = t.num_support
    with torch.no_grad():
        a = head(t.x[:, :n], t.label[:, :n], t.x[:, n:])
        b = copy(t.x[:, :n], t.label[:, :n], t.x[:, n:])
    assert a.shape == (4, 16, 2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shipped_head_is_small_and_documented(shipped_head: str) -> None:
    assert Path(shipped_head).stat().st_size < 5 * 2**20
    info = torch.load(shipped_head, weights_only=True)["value_prior_head"]
    assert info["prior_fit"]["seed"] == 0 and load_head(shipped_head).input_transform == "none"
    # The second shipped head continues the default one with the discriminant transform (README).
    discriminant = Path(shipped_head).with_name("capability_v2_small_discriminant.ckpt")
    assert discriminant.stat().st_size < 5 * 2**20
    head = load_head(discriminant)
    assert head.input_transform == "discriminant" and head.info["continued_from"]["prior_fit"]["seed"] == 0
    assert head.info["eval"]["head"] > info["eval"]["head"] + 0.03  # held-out synthetic AUC 0.83 vs 0.78
    readme = (Path(shipped_head).parent / "README.md").read_text()
    assert "value-prior prior-fit" in readme


def test_tabpfn_classifier_loads_our_checkpoint(shipped_head: str) -> None:
    from tabpfn import TabPFNClassifier

    t = tasks(batch=1, support=64, query=8)
    x_train, y_train = t.x[0, :64].numpy(), t.label[0, :64].numpy().astype(int)
    classifier = TabPFNClassifier(
        model_path=shipped_head, device="cpu", n_estimators=1, inference_precision=torch.float32
    )
    classifier.fit(x_train, y_train)
    classifier.models_[0].use_multiclass_target_encoding = False  # as the head was trained (README)
    proba = classifier.predict_proba(t.x[0, 64:].numpy())
    assert proba.shape == (8, 2)
    head = load_head(shipped_head)
    with torch.no_grad():
        logits = head(
            torch.as_tensor(x_train)[None], torch.as_tensor(y_train, dtype=torch.float32)[None], t.x[:, 64:]
        )
    np.testing.assert_allclose(proba, logits[0].softmax(-1).numpy(), atol=1e-5)


def test_single_class_support_is_not_relabelled(shipped_head: str) -> None:
    head = load_head(shipped_head)
    assert head.model.use_multiclass_target_encoding is False
    t = tasks(batch=1)
    x = t.x[:, :48]
    with torch.no_grad():
        all_success = torch.sigmoid(head.success_logit(x, torch.ones(1, 48), t.x[:, 48:])).mean()
        all_failure = torch.sigmoid(head.success_logit(x, torch.zeros(1, 48), t.x[:, 48:])).mean()
    assert all_success > 0.5 > all_failure


def test_gradients_reach_both_support_and_query_features(shipped_head: str) -> None:
    head = load_head(shipped_head).requires_grad_(False)
    t = tasks(batch=2)
    support = t.x[:, :48].clone().requires_grad_(True)
    query = t.x[:, 48:].clone().requires_grad_(True)
    head.success_logit(support, t.label[:, :48], query).sum().backward()
    assert support.grad.abs().sum() > 0 and query.grad.abs().sum() > 0
    assert all(p.grad is None for p in head.parameters())


def test_whitening_decorrelates_the_support_and_keeps_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=g) + torch.eye(6) * 2
    scale = torch.tensor([1e-3, 1.0, 10.0, 1e3, 5.0, 0.2])
    raw = torch.randn(2, 300, 6, generator=g) @ mixing * scale + 7.0  # correlated, badly scaled, shifted
    support = raw[:, :256].clone().requires_grad_(True)
    query = raw[:, 256:].clone().requires_grad_(True)
    white_support, white_query = whiten_by_support(support, query, ridge=0.0)
    centred = white_support - white_support.mean(1, keepdim=True)
    covariance = centred.transpose(1, 2) @ centred / 255
    torch.testing.assert_close(covariance, torch.eye(6).expand(2, 6, 6), atol=1e-3, rtol=0)
    assert white_query.shape == (2, 44, 6) and torch.isfinite(white_query).all()
    (white_support.sum() + white_query.square().sum()).backward()
    assert torch.isfinite(support.grad).all() and query.grad.abs().sum() > 0
    # A constant column or a single support row still gives finite features (the ridge keeps it invertible).
    constant = torch.cat([raw[:, :, :5], torch.ones(2, 300, 1)], dim=-1)
    assert all(torch.isfinite(t).all() for t in whiten_by_support(constant[:, :256], constant[:, 256:]))
    # ... and a query that leaves a constant support column is centred, not divided by ~0
    constant[:, 256:, 5] = 3.0
    _, off_query = whiten_by_support(constant[:, :256], constant[:, 256:])
    assert off_query.abs().max() < 100
    assert all(torch.isfinite(t).all() for t in whiten_by_support(raw[:, :1], raw[:, 256:]))


def test_discriminant_column_is_fishers_linear_discriminant() -> None:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    t = tasks(batch=3, support=200, query=40, features=5)
    n = t.num_support
    support, query = whiten_by_support(t.x[:, :n].double(), t.x[:, n:].double(), ridge=0.0)
    support_out, query_out = append_discriminant(support, query, t.label[:, :n])
    assert support_out.shape == (3, 200, 6) and query_out.shape == (3, 40, 6)
    torch.testing.assert_close(support_out[..., :5], support)  # the features themselves are kept
    assert support_out[..., 5].std(1, correction=0) == pytest.approx(1.0)
    for b in range(3):
        lda = LinearDiscriminantAnalysis().fit(t.x[b, :n].double().numpy(), t.label[b, :n].numpy())
        reference = lda.decision_function(t.x[b, n:].double().numpy())
        assert (
            np.corrcoef(reference, query_out[b, :, 5].numpy())[0, 1] > 0.9999
        )  # same score up to an affine map
    # A single-class support has no discriminant: the column is zero, not NaN.
    single, single_query = append_discriminant(support, query, torch.ones(3, n))
    assert torch.count_nonzero(single[..., 5]) == 0 and torch.count_nonzero(single_query[..., 5]) == 0


def test_input_transform_is_saved_with_the_head(tmp_path: Path) -> None:
    model, config = build_tabpfn(emsize=16, nlayers=1, nhead=2)
    head = InContextHead(model, config, input_transform="discriminant")
    loaded = load_head(head.save(tmp_path / "white.ckpt"))
    assert loaded.input_transform == "discriminant" and "input_transform" not in loaded.info
    t = tasks()
    n = t.num_support
    with torch.no_grad():
        torch.testing.assert_close(
            head(t.x[:, :n], t.label[:, :n], t.x[:, n:]), loaded(t.x[:, :n], t.label[:, :n], t.x[:, n:])
        )
    with pytest.raises(ValueError, match="input_transform"):
        InContextHead(model, config, input_transform="pca")
    checkpoint = torch.load(tmp_path / "white.ckpt", weights_only=True)
    checkpoint["value_prior_head"]["input_transform"] = "pca"
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(HeadCheckpointError, match=r"bad\.ckpt: unknown input_transform 'pca'"):
        load_head(tmp_path / "bad.ckpt")


def test_bad_checkpoints_are_named(tmp_path: Path, tiny_head: Path) -> None:
    with pytest.raises(HeadCheckpointError, match="no such file"):
        load_head(tmp_path / "nope.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(HeadCheckpointError, match=r"garbage\.ckpt: not a readable"):
        load_head(garbage)
    lightning_like = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 1, "state_dict": {}, "hyper_parameters": {}}, lightning_like)
    with pytest.raises(HeadCheckpointError, match=r"lightning\.ckpt: not a TabPFN checkpoint"):
        load_head(lightning_like)
    checkpoint = torch.load(tiny_head, weights_only=True)
    regressor = tmp_path / "regressor.ckpt"
    torch.save(
        checkpoint | {"config": checkpoint["config"] | {"max_num_classes": -1, "num_buckets": 100}}, regressor
    )
    with pytest.raises(HeadCheckpointError, match="regressor"):
        load_head(regressor)
    v3 = tmp_path / "v3.ckpt"
    torch.save(checkpoint | {"architecture_name": "tabpfn_v3"}, v3)
    with pytest.raises(HeadCheckpointError, match="'tabpfn_v3' is not supported"):
        load_head(v3)
    # Another model's {"state_dict", "config"} is not a "regressor", and a config that does not parse
    # is refused with the file's name rather than a bare pydantic / attribute error.
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"linear.weight": torch.zeros(2, 2)}, "config": {"hidden_size": 128}}, other)
    with pytest.raises(HeadCheckpointError, match=r"other\.ckpt: its 'config' is not a TabPFN classifier's"):
        load_head(other)
    invalid = tmp_path / "invalid.ckpt"
    torch.save(checkpoint | {"config": checkpoint["config"] | {"features_per_group": 3}}, invalid)
    with pytest.raises(
        HeadCheckpointError, match=r"invalid\.ckpt: its config is not a valid tabpfn_v2 config"
    ):
        load_head(invalid)
    torch.save(checkpoint | {"config": "tabpfn_v2"}, invalid)
    with pytest.raises(HeadCheckpointError, match=r"invalid\.ckpt: its 'config' is not"):
        load_head(invalid)


def test_a_failed_save_keeps_the_previous_head(tiny_head: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    head = load_head(tiny_head)

    def full_disk(checkpoint: dict, f: str | Path) -> None:
        Path(f).write_bytes(b"partial")  # what a write cut short leaves behind
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        head.save(tiny_head)
    monkeypatch.undo()
    assert load_head(tiny_head).config == head.config  # the earlier head is intact
    assert sorted(p.name for p in tiny_head.parent.iterdir()) == [tiny_head.name]  # no partial file left


def test_capability_prior_shapes_and_bayes() -> None:
    t = CapabilityPrior().sample(32, 192, 8, 128, torch.Generator().manual_seed(0), bayes_samples=64)
    plain = CapabilityPrior().sample(32, 192, 8, 128, torch.Generator().manual_seed(0))
    assert torch.equal(t.x, plain.x) and torch.equal(t.label, plain.label)  # Bayes uses its own generator
    assert t.x.shape == (32, 192, 8) and t.label.shape == (32, 192) and t.num_support == 128
    assert set(t.label.unique().tolist()) <= {0.0, 1.0}
    assert plain.bayes_prob is None and t.bayes_prob.shape == (32, 192)
    model, config = build_tabpfn(emsize=16, nlayers=1, nhead=2)
    result = evaluate_head_on_tasks(InContextHead(model, config), t)
    # Knowing the latent beats knowing the task given x, which beats a fitted logistic regression.
    assert result["oracle_latent"] > result["bayes"] > result["logreg"] > 0.6
    assert result["head"] == pytest.approx(0.5)  # a fresh head has zero-initialised outputs: ignores X


def test_label_probability_matches_binomial_tail() -> None:
    from math import comb

    from value_prior.head import label_probability

    p = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)
    expected = [sum(comb(10, k) * q**k * (1 - q) ** (10 - k) for k in range(5, 11)) for q in p.tolist()]
    torch.testing.assert_close(label_probability(p, 10), torch.tensor(expected, dtype=torch.float64))


def test_task_stream_continues_across_epochs() -> None:
    stream = SyntheticTaskStream(
        CapabilityPrior(), (4, 6), (8, 64), curriculum_steps=10, num_query=4, tasks_per_step=2, seed=0
    )
    first = next(iter(stream))
    second = next(iter(stream))  # a new iterator (next epoch) must not replay the first batch
    assert stream.batches_drawn == 2
    assert not (first.x.shape == second.x.shape and torch.equal(first.x, second.x))
    assert stream.support_ceiling(0) == 32 and stream.support_ceiling(10) == 64
    with pytest.raises(ValueError, match="support_range"):
        SyntheticTaskStream(CapabilityPrior(), (4, 6), (1, 64), 10, 4, 2, 0)


def test_prior_fit_refuses_settings_that_would_train_or_evaluate_nothing(tmp_path: Path) -> None:
    out = tmp_path / "head.ckpt"
    done = subprocess.run(
        [sys.executable, "-m", "value_prior.cli", "prior-fit", "--out", str(out), "--eval_every", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "--eval_every must be >= 1, got 0" in done.stderr
    assert not out.exists()  # nothing written over


def test_prior_fit_cli_writes_a_loadable_head(tmp_path: Path, mlflow_store: str) -> None:
    out = tmp_path / "head.ckpt"
    cmd = [sys.executable, "-m", "value_prior.cli", "prior-fit", "--out", str(out), "--emsize", "16", "--nlayers", "1",
           "--nhead", "2", "--max_steps", "6", "--eval_every", "3", "--tasks_per_step", "2", "--support_max", "64",
           "--eval_tasks", "8", "--eval_support", "32", "--num_query", "8", "--warmup_steps", "2"]  # fmt: skip
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=os.environ | {"MLFLOW_TRACKING_URI": mlflow_store},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    head = load_head(out)
    assert head.info["prior_fit"]["max_steps"] == 6
    assert set(head.info["eval"]) >= {"head", "logreg", "bayes"}
    # A second stage continues from the first and records its lineage.
    stage2 = tmp_path / "stage2.ckpt"
    cmd2 = [sys.executable, "-m", "value_prior.cli", "prior-fit", "--init_from", str(out), "--out", str(stage2),
            "--max_steps", "2", "--eval_every", "2", "--tasks_per_step", "2", "--support_max", "64",
            "--eval_tasks", "4", "--eval_support", "32", "--num_query", "8", "--warmup_steps", "1", "--seed", "1"]  # fmt: skip
    done = subprocess.run(
        cmd2,
        capture_output=True,
        text=True,
        env=os.environ | {"MLFLOW_TRACKING_URI": mlflow_store},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_head(stage2).info["continued_from"]["prior_fit"]["max_steps"] == 6

    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    run = mlflow.search_runs(experiment_names=["value-prior-head"]).iloc[0]
    assert "metrics.prior_fit/eval_auc_head" in run.index
