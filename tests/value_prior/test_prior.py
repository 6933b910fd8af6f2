"""The exported ValuePrior: save -> load, predict contract, fallbacks, errors and caching."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from transformers import BertModel

from value_prior.backbone import HFBackbone
from value_prior.data import PairsDataModule
from value_prior.head import load_head
from value_prior.model import ResidualQueryAdapter, V0Module
from value_prior.prior import (
    ExportPrior,
    SingleClassContextWarning,
    ValuePrior,
    check_export_folder,
    fit_platt_scaling,
    platt_scaling,
)

ADAPTER = {"num_queries": 4, "query_dim": 2, "num_heads": 1, "bottleneck": 16, "dropout": 0.2}
CONTEXT = [f"Q: {a}+{b}*2=" for a, b in [(1, 2), (5, 7), (40, 9), (88, 3), (3, 3), (61, 20), (9, 9), (70, 1)]]
SUCCESS = [1.0, 0.9, 0.2, 0.0, 1.0, 0.1, 0.8, 0.3]
QUERIES = ["Q: 2+2*2=", "Q: 95+17*3=", "Q: 23+45*2=", "Let x + 1/x = 3. Compute x^3 + 1/x^3."]


@pytest.fixture
def prior(request: pytest.FixtureRequest, tiny_backbone: HFBackbone, shipped_head: str) -> ValuePrior:
    """A prior with a random non-trivial adapter; indirect parametrisation picks its pooling."""
    torch.manual_seed(0)
    adapter = ResidualQueryAdapter(
        tiny_backbone.hidden_size, **ADAPTER, pooling=getattr(request, "param", "last")
    )
    torch.nn.init.normal_(adapter.generator_out.weight, std=0.1)  # a non-trivial adapter
    return ValuePrior(tiny_backbone, adapter, load_head(shipped_head), info={"test": True})


def test_predict_contract(prior: ValuePrior) -> None:
    p = prior.predict(CONTEXT, SUCCESS, QUERIES)
    assert p.dtype == torch.float32 and p.shape == (4,)
    assert torch.all((p > 0) & (p < 1))
    assert prior.backbone_name == prior.backbone.backbone_id and prior.num_features == 8
    as_tensor = prior.predict(CONTEXT, torch.tensor(SUCCESS), QUERIES)
    torch.testing.assert_close(p, as_tensor)
    assert prior.predict(CONTEXT, SUCCESS, []).shape == (0,)


@pytest.mark.parametrize("prior", ["last", "mean"], indirect=True)
def test_save_load_gives_identical_predictions(prior: ValuePrior, tmp_path: Path) -> None:
    before = prior.predict(CONTEXT, SUCCESS, QUERIES)
    path = prior.save(tmp_path / "prior")
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter.safetensors",
        "backbone.json",
        "config.json",
        "head.ckpt",
    ]
    loaded = ValuePrior.load(path)
    assert loaded.num_features == prior.num_features and loaded.info == {"test": True}
    assert loaded.adapter.pooling == prior.adapter.pooling
    torch.testing.assert_close(loaded.predict(CONTEXT, SUCCESS, QUERIES), before, rtol=0, atol=0)


def test_calibration_is_monotone_and_saved(prior: ValuePrior, tmp_path: Path) -> None:
    raw = prior.predict(CONTEXT, SUCCESS, QUERIES)
    prior.calibration = (2.0, 0.5)
    calibrated = prior.predict(CONTEXT, SUCCESS, QUERIES)
    torch.testing.assert_close(
        calibrated, torch.sigmoid(2.0 * torch.logit(raw.double()) + 0.5).float(), rtol=1e-4, atol=1e-5
    )
    assert torch.equal(torch.argsort(raw), torch.argsort(calibrated))
    assert ValuePrior.load(prior.save(tmp_path / "calibrated")).calibration == (2.0, 0.5)


def test_outcomes_and_rates_give_the_same_labels(prior: ValuePrior) -> None:
    outcomes = [1.0 if s >= 0.5 else 0.0 for s in SUCCESS]
    torch.testing.assert_close(
        prior.predict(CONTEXT, outcomes, QUERIES), prior.predict(CONTEXT, SUCCESS, QUERIES)
    )


def test_single_class_context_falls_back_to_the_mean(prior: ValuePrior) -> None:
    with pytest.warns(SingleClassContextWarning, match="returning the context mean 0.850"):
        p = prior.predict(CONTEXT[:2], [1.0, 0.7], QUERIES)
    torch.testing.assert_close(p, torch.full((4,), 0.85))


@pytest.mark.parametrize(
    ("context", "success", "queries", "text"),
    [
        ([], [], QUERIES, "context_prompts is empty"),
        (CONTEXT, SUCCESS[:-1], QUERIES, "7 values for 8 context_prompts"),
        (CONTEXT, [*SUCCESS[:-1], 1.5], QUERIES, r"context_success\[7\] = 1.5"),
        (CONTEXT, [*SUCCESS[:-1], float("nan")], QUERIES, r"context_success\[7\] = nan"),
        (CONTEXT, SUCCESS, [*QUERIES, ""], r"query_prompts\[4\] is ''"),
        (CONTEXT, SUCCESS, [*QUERIES, "Q: 1+1= \ud83d"], r"query_prompts\[4\] = .* is not valid Unicode"),
        ([*CONTEXT[:-1], "\udc80"], SUCCESS, QUERIES, r"context_prompts\[7\] = .* is not valid Unicode"),
        (CONTEXT, SUCCESS, "Q: 1+1=", "not one string"),
        (CONTEXT, ["1", "0"] * 4, QUERIES, "context_success must hold numbers .* such as '1'"),
    ],
)
def test_bad_inputs_are_named(prior: ValuePrior, context, success, queries, text: str) -> None:
    with pytest.raises(ValueError, match=text):
        prior.predict(context, success, queries)


def test_prepare_refuses_one_string(prior: ValuePrior) -> None:
    with pytest.raises(ValueError, match="not one string"):  # it embedded each character as a prompt
        prior.prepare("Let x + 1/x = 3. Compute x^3 + 1/x^3.")


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.0, 6.0), (0.0, 10.0), (5.0, 1.0), (-6.0, 1.0)])
def test_platt_scaling_reaches_the_optimum_on_wide_or_shifted_scores(mean: float, std: float) -> None:
    # A fixed LBFGS step overshot to scale < 0 (a flat prior) on wide scores and diverged to scale ~1e12
    # (probabilities of exactly 0 or 1) on shifted ones, although the scores rank at AUC ~0.85.
    from scipy.optimize import minimize

    def cross_entropy(params: np.ndarray) -> float:
        z = params[0] * s + params[1]
        return float(np.mean(np.logaddexp(0, z) - y * z))

    rng = np.random.default_rng(1)
    u = rng.normal(0, 1, 400)
    y = rng.binomial(10, 1 / (1 + np.exp(-u))) / 10
    s = mean + std * (u + rng.normal(0, 0.5, 400))
    scale, bias = platt_scaling(torch.tensor(s, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    best = minimize(cross_entropy, [1.0, 0.0], bounds=[(0, None), (None, None)], method="L-BFGS-B").x
    assert 0 < scale < 10
    assert cross_entropy(np.array([scale, bias])) == pytest.approx(cross_entropy(best), abs=1e-4)


def test_pandas_series_are_read_by_position(prior: ValuePrior) -> None:
    """A Series whose index does not start at 0 (a filtered DataFrame's column) raised KeyError: 0."""
    import pandas as pd

    frame = pd.DataFrame({"prompt": CONTEXT, "success": SUCCESS}, index=range(10, 10 + len(CONTEXT)))
    queries = pd.Series(QUERIES, index=range(5, 5 + len(QUERIES)))
    expected = prior.predict(CONTEXT, SUCCESS, QUERIES)
    torch.testing.assert_close(prior.predict(frame["prompt"], frame["success"], queries), expected)


def test_features_are_cached_per_prompt(prior: ValuePrior, monkeypatch: pytest.MonkeyPatch) -> None:
    prior.predict(CONTEXT, SUCCESS, QUERIES)
    calls = []
    original = prior.adapter.forward
    monkeypatch.setattr(prior.adapter, "forward", lambda *a: calls.append(1) or original(*a))
    prior.predict(CONTEXT, SUCCESS, QUERIES[::-1])
    assert calls == []
    prior.predict(CONTEXT, SUCCESS, ["Q: 11+11*1="])
    assert len(calls) == 1


def test_prepare_fills_the_feature_cache_and_fits_the_trainer_protocol(prior: ValuePrior) -> None:
    from basis.v05 import SuccessPrior

    assert isinstance(prior, SuccessPrior)
    prior.prepare(QUERIES)
    assert set(QUERIES) <= set(prior._features)
    with pytest.raises(ValueError, match=r"prompts\[0\] is None"):
        prior.prepare([None])  # type: ignore[list-item]


def test_chunked_queries_and_large_context(prior: ValuePrior) -> None:
    full = prior.predict(CONTEXT, SUCCESS, QUERIES)
    prior.query_chunk = 3
    torch.testing.assert_close(prior.predict(CONTEXT, SUCCESS, QUERIES), full)
    prior.max_context = 5
    subsampled = prior.predict(CONTEXT, SUCCESS, QUERIES)
    assert subsampled.shape == (4,)


def test_subsampled_context_gives_the_head_both_classes(
    prior: ValuePrior, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A context larger than `max_context` with a single success: wherever that success sits, the
    subsample given to the head keeps it (no silent single-class support, no fallback warning)."""
    supports = []
    original = prior.head.success_logit
    monkeypatch.setattr(prior.head, "success_logit", lambda s, y, q: supports.append(y) or original(s, y, q))
    prior.max_context = 4
    for positive in range(len(CONTEXT)):
        success = [0.0] * len(CONTEXT)
        success[positive] = 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("error", SingleClassContextWarning)
            prior.predict(CONTEXT, success, QUERIES)
    assert [y.shape for y in supports] == [(1, 4)] * len(CONTEXT)
    assert all(y.sum() == 1 for y in supports)
    with pytest.warns(SingleClassContextWarning, match="returning the context mean 0.000"):
        prior.predict(CONTEXT, [0.0] * len(CONTEXT), QUERIES)  # single-class as a whole: the fallback
    with pytest.raises(ValueError, match="max_context must be >= 2"):
        ValuePrior(prior.backbone, prior.adapter, prior.head, max_context=1)


def test_subsampled_context_does_not_depend_on_its_order(prior: ValuePrior) -> None:
    """A context larger than `max_context` is the same context in any order: the subsample is drawn from
    a canonical order, not by position."""
    prior.max_context = 4
    forward = prior.predict(CONTEXT, SUCCESS, QUERIES)
    for order in (list(range(len(CONTEXT)))[::-1], [3, 6, 0, 7, 2, 5, 1, 4]):
        shuffled = prior.predict([CONTEXT[i] for i in order], [SUCCESS[i] for i in order], QUERIES)
        torch.testing.assert_close(shuffled, forward)


def test_results_are_cpu_tensors_whatever_the_default_device(prior: ValuePrior) -> None:
    """`meta` stands in for `torch.set_default_device("cuda")`: the successes, the subsample, the fallback
    and the empty result must not be created on the default device."""
    prior.prepare([*CONTEXT, *QUERIES])
    expected = prior.predict(CONTEXT, SUCCESS, QUERIES)
    prior.max_context = 4
    expected_subsampled = prior.predict(CONTEXT, SUCCESS, QUERIES)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", SingleClassContextWarning)
        subsampled = prior.predict(CONTEXT, SUCCESS, QUERIES)
        fallback = prior.predict(CONTEXT[:2], [1.0, 0.7], QUERIES)
        empty = prior.predict(CONTEXT, SUCCESS, [])
        prior.max_context = 512
        full = prior.predict(CONTEXT, SUCCESS, QUERIES)
    assert {t.device.type for t in (full, subsampled, fallback, empty)} == {"cpu"}
    torch.testing.assert_close(full, expected)
    torch.testing.assert_close(subsampled, expected_subsampled)
    torch.testing.assert_close(fallback, torch.full((4,), 0.85))


def test_saved_artifact_files_follow_the_umask(prior: ValuePrior, tmp_path: Path) -> None:
    """Another user must be able to load an exported prior: no file may be private (safetensors'
    `save_file` creates 0600 files whatever the umask)."""
    umask = os.umask(0o022)
    try:
        path = prior.save(tmp_path / "prior")
    finally:
        os.umask(umask)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    assert modes == dict.fromkeys(modes, 0o644) and len(modes) == 4


def test_failed_re_save_leaves_an_artifact_that_load_rejects(
    prior: ValuePrior, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-saving into an old artifact and failing midway (disk full) must not leave the old config.json
    beside the new weights: `load` would accept the mix silently."""
    path = prior.save(tmp_path / "prior")
    prior.calibration = (3.0, -1.0)

    def disk_full(_path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prior.head, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prior.save(path)
    with pytest.raises(ValueError, match=r"missing \['config.json'\]"):
        ValuePrior.load(path)


def test_broken_artifacts_are_named(prior: ValuePrior, tmp_path: Path, tiny_encoder_dir: str) -> None:
    path = prior.save(tmp_path / "prior")
    (path / "adapter.safetensors").rename(path / "moved")
    with pytest.raises(ValueError, match=r"missing \['adapter.safetensors'\]"):
        ValuePrior.load(path)
    # a file (say a training checkpoint) was reported as missing all four files
    with pytest.raises(ValueError, match=r"prior artifact .*moved is a file: a prior is the folder"):
        ValuePrior.load(path / "moved")
    path = prior.save(tmp_path / "wrong_head")
    torch.save({"epoch": 3, "state_dict": {}}, path / "head.ckpt")
    with pytest.raises(ValueError, match=r"head\.ckpt: not a TabPFN checkpoint"):
        ValuePrior.load(path)
    path = prior.save(tmp_path / "wrong_width")
    reference = json.loads((path / "backbone.json").read_text())
    (path / "backbone.json").write_text(json.dumps(reference | {"hidden_size": 1024}))
    with pytest.raises(ValueError, match="width 1024"):
        ValuePrior.load(path)
    path = prior.save(tmp_path / "wrong_features")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(
        json.dumps(config | {"adapter": config["adapter"] | {"query_dim": 3, "num_heads": 1}})
    )
    with pytest.raises(ValueError, match="adapter weights do not match"):
        ValuePrior.load(path)
    with pytest.raises(ValueError, match="width 32, the adapter expects 384"):
        ValuePrior(prior.backbone, ResidualQueryAdapter(384, **ADAPTER), prior.head)


def test_artifact_refuses_another_backbone_of_the_same_width(
    tiny_encoder_dir: str, shipped_head: str, tmp_path: Path
) -> None:
    """Other weights in the backbone's folder (same width, same path) change every prediction, so the
    artifact must name the backbone it was trained on and refuse the new one."""
    model_dir = tmp_path / "encoder"
    shutil.copytree(tiny_encoder_dir, model_dir)
    backbone = HFBackbone(str(model_dir), max_length=32, cache_dir=None)
    torch.manual_seed(0)
    adapter = ResidualQueryAdapter(backbone.hidden_size, **ADAPTER)
    path = ValuePrior(backbone, adapter, load_head(shipped_head)).save(tmp_path / "prior")
    ValuePrior.load(path).predict(CONTEXT, SUCCESS, QUERIES)  # the same backbone loads
    torch.manual_seed(1)
    BertModel(BertModel.from_pretrained(model_dir).config).save_pretrained(model_dir)  # retrained in place
    new_id = HFBackbone(str(model_dir), cache_dir=None).backbone_id
    assert new_id != backbone.backbone_id
    with pytest.raises(ValueError, match=f"trained on backbone '{backbone.backbone_id}'.*now '{new_id}'"):
        ValuePrior.load(path)


def test_non_finite_features_raise_instead_of_reaching_the_head(prior: ValuePrior) -> None:
    """TabPFN imputes NaN features with column means, so NaN would give a plausible wrong prediction."""
    with torch.no_grad():
        prior.adapter.key_value.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"prompt 'Q: 1\+2\*2=' has non-finite adapter features"):
        prior.predict(CONTEXT, SUCCESS, QUERIES)
    assert not prior._features  # nothing non-finite was cached for later calls


def test_no_warning_for_a_two_class_context(prior: ValuePrior) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", SingleClassContextWarning)
        prior.predict(CONTEXT, SUCCESS, QUERIES)


def tiny_module_and_data(
    backbone: HFBackbone, head: str, pairs: str, export_dir: Path
) -> tuple[V0Module, PairsDataModule]:
    module = V0Module(
        backbone=backbone, head=head, num_queries=4, query_dim=2, num_heads=1, export_dir=str(export_dir)
    )
    data = PairsDataModule(pairs, support_size=16, query_pairs=2, episodes_per_batch=2, batches_per_epoch=1)
    return module, data


def test_export_saves_where_the_calibration_was_fitted(
    tiny_backbone: HFBackbone, shipped_head: str, tiny_pairs_path: str, tmp_path: Path
) -> None:
    module, data = tiny_module_and_data(tiny_backbone, shipped_head, tiny_pairs_path, tmp_path / "prior")
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[ExportPrior()],
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=data)
    config = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert config["info"]["calibration_fitted_on"] == "val"
    assert config["calibration"] != {"scale": 1.0, "bias": 0.0}
    assert ValuePrior.load(tmp_path / "prior").info == config["info"]


def test_export_refuses_a_folder_holding_other_files_before_training(
    prior: ValuePrior, tiny_backbone: HFBackbone, shipped_head: str, tiny_pairs_path: str, tmp_path: Path
) -> None:
    """An export_dir pointing at a dataset folder got the prior's files mixed in among its own."""
    target = tmp_path / "data"
    target.mkdir()
    (target / "train.jsonl").write_text("{}\n")
    module, data = tiny_module_and_data(tiny_backbone, shipped_head, tiny_pairs_path, target)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[ExportPrior()],
                        default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=r"data holds files that are not a prior artifact's \(train.jsonl\)"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0 and [f.name for f in target.iterdir()] == ["train.jsonl"]
    with pytest.raises(ValueError, match="not a prior artifact's"):
        prior.save(target)
    earlier = prior.save(tmp_path / "prior")
    assert check_export_folder(earlier) and not check_export_folder(tmp_path / "new")
    prior.save(earlier)  # an earlier artifact is replaced


def test_platt_scaling_never_reverses_the_ranking(
    tiny_backbone: HFBackbone,
    shipped_head: str,
    tiny_pairs_path: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Validation outcomes that fall as V0's score rises: the unconstrained fit's slope is negative (-3
    here), which would rank the easiest prompts hardest; the fit keeps scale >= 0, so the calibrated prior
    is flat at the mean success rate, and says so. Outcomes that rise with the score are left alone."""
    module, data = tiny_module_and_data(tiny_backbone, shipped_head, tiny_pairs_path, tmp_path / "prior")
    data.setup("fit")
    module.eval()
    with torch.no_grad():
        scores = [module.success_logits(batch) for batch in data.val_dataloader()]  # [B, M] each
    assert torch.cat(scores).std() > 0.1  # the scores spread enough to identify a slope

    def relabelled(scale: float, bias: float) -> list:
        batches = data.val_dataloader()
        return [b._replace(query_success=torch.sigmoid(scale * s + bias)) for b, s in zip(batches, scores)]

    with caplog.at_level("WARNING", logger="value_prior.prior"):
        (scale, bias), metrics = fit_platt_scaling(module, relabelled(-3.0, 0.5))
    mean = torch.cat([b.query_success.flatten() for b in relabelled(-3.0, 0.5)]).mean()
    assert scale == 0.0 and bias == pytest.approx(float(torch.logit(mean)), abs=1e-5)
    assert "no better than chance" in caplog.text
    assert metrics["export/val_brier_calibrated"] < metrics["export/val_brier_head"]  # the mean is better
    (scale, bias), metrics = fit_platt_scaling(module, relabelled(3.0, 0.5))
    assert (scale, bias) == pytest.approx((3.0, 0.5), abs=1e-2)
    # outcomes drawn as sigmoid(3 s + 0.5): the scaling recovers them, the raw head (scale 1, bias 0) does not
    assert metrics["export/val_brier_calibrated"] < 1e-4 < metrics["export/val_brier_head"]
    assert metrics["export/val_ece_calibrated"] < metrics["export/val_ece_head"]


@pytest.mark.gpu
def test_platt_scaling_runs_the_validation_batches_on_the_module_device(
    tiny_backbone: HFBackbone, shipped_head: str, tiny_pairs_path: str, tmp_path: Path
) -> None:
    module, data = tiny_module_and_data(tiny_backbone, shipped_head, tiny_pairs_path, tmp_path / "prior")
    data.setup("fit")
    (scale, bias), _ = fit_platt_scaling(module.to("cuda"), data.val_dataloader())  # batches come on the CPU
    assert math.isfinite(scale) and math.isfinite(bias)


def test_a_policy_run_records_which_prior_it_used(
    prior: ValuePrior, tiny_lm_path: str, tmp_path: Path, mlflow_store: str
) -> None:
    """Policy runs named their prior by folder only, which a later export overwrites: the run keeps the
    folder's hash, the exporting run and the prior's config as it was loaded."""
    from mlflow import MlflowClient

    from basis.data import PromptDataModule
    from basis.tasks import write_arithmetic_task
    from basis.tracking import MLflowLogger
    from basis.trainer import PolicyTrainer

    prior.info = {"mlflow_run_id": "abc123"}
    path = prior.save(tmp_path / "prior")
    write_arithmetic_task(tmp_path / "task", seed=0, n_train=16, n_val=4, n_test=4)
    module = PolicyTrainer(
        tiny_lm_path,
        advantage="v05",
        prior=str(path),
        group_size=4,
        max_new_tokens=4,
        run_dir=str(tmp_path / "run"),
    )
    logger = MLflowLogger(experiment_name="prior-provenance")
    trainer = L.Trainer(max_steps=1, logger=logger, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(
        module, datamodule=PromptDataModule(str(tmp_path / "task"), val_path=None, prompts_per_step=2)
    )
    client = MlflowClient()
    tags = client.get_run(logger.run_id).data.tags
    assert tags["prior_run_id"] == "abc123" and tags["prior_path"] == str(path.resolve())
    assert len(tags["prior_sha256"]) == 64
    config = Path(client.download_artifacts(logger.run_id, "prior/config.json", str(tmp_path / "dl")))
    assert json.loads(config.read_text()) == json.loads((path / "config.json").read_text())
    prior.calibration = (2.0, 0.5)  # another export into the same folder: another hash
    from basis.v05 import prior_provenance

    assert prior_provenance(str(prior.save(path)))["prior_sha256"] != tags["prior_sha256"]
