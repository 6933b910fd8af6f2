"""PolicyTrainer: real tiny Qwen3 through the Auto* loaders, real arithmetic parquet, real sqlite MLflow."""

from __future__ import annotations

import json
import shutil
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from transformers import AutoModelForCausalLM, AutoTokenizer

from basis.data import PromptDataModule, PromptRow, step_prompt_indices
from basis.policy_io import LoraSettings
from basis.tasks import write_arithmetic_task
from basis.trainer import PolicyTrainer
from basis.v05 import OslaSettings


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("arith")
    write_arithmetic_task(out, seed=0, n_train=64, n_val=8, n_test=8)
    return out


def make_trainer(run_dir: Path, steps: int, **trainer_kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=run_dir,
        **{"limit_val_batches": 0, "logger": False, **trainer_kwargs},
    )


def make_module(model_path: str, run_dir: Path, **kwargs) -> PolicyTrainer:
    defaults = dict(group_size=4, max_new_tokens=12, micro_batch_size=16, run_dir=str(run_dir), val_samples=2)
    return PolicyTrainer(model_path, **{**defaults, **kwargs})


def data(task_dir: Path, **kwargs) -> PromptDataModule:
    return PromptDataModule(str(task_dir), **{"val_path": None, "prompts_per_step": 4, **kwargs})


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# An untrained model never answers arithmetic, so every reward is -1 and every advantage 0. These
# tests therefore get their gradient from the k1 KL term (d logp - logq has a non-zero gradient even
# at d = 0) and check movement, not learning; learning is measured by the demo and the benchmarks.


def test_full_finetune_changes_every_trainable_parameter(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tiny_lm_path, tmp_path, advantage="reinforce_pp", kl_coef=0.1, kl_estimator="k1")
    module.optimizer_factory = lambda params: torch.optim.SGD(params, lr=1.0)
    before = snapshot(module.policy)
    make_trainer(tmp_path, steps=2).fit(module, datamodule=data(task_dir))
    after = snapshot(module.policy)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []
    records = sorted((tmp_path / "rollouts").glob("*.parquet"))
    assert [p.name for p in records] == ["step_000001-rank0.parquet", "step_000002-rank0.parquet"]


def test_lora_changes_only_adapter_and_merged_export_matches(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    module = make_module(
        tiny_lm_path,
        tmp_path,
        lora=LoraSettings(r=4, alpha=8),
        advantage="reinforce_pp",
        kl_coef=0.1,
        kl_estimator="k1",
    )
    module.optimizer_factory = lambda params: torch.optim.SGD(params, lr=1.0)
    before = snapshot(module.policy)
    make_trainer(tmp_path, steps=2).fit(module, datamodule=data(task_dir))
    after = snapshot(module.policy)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("lora_" in name for name in changed)
    lora_b = {name for name in before if "lora_B" in name}
    assert lora_b <= changed

    export = tmp_path / "exports" / "step_000002"
    assert (export / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(export).eval()
    module.policy.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, module.policy(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert json.loads((export / "basis_export.json").read_text())["rl_step"] == 2


def test_step_prompts_are_a_function_of_step_and_rank() -> None:
    a = step_prompt_indices(100, step=7, per_step=4, seed=3, rank=0, world_size=2)
    b = step_prompt_indices(100, step=7, per_step=4, seed=3, rank=1, world_size=2)
    assert len(set(a) | set(b)) == 8
    assert (a == step_prompt_indices(100, 7, 4, 3, 0, 2)).all()
    # ... and of the step: the 12 steps of an epoch (100 // (4 x 2)) draw 96 distinct prompts
    epoch = [step_prompt_indices(100, s, 4, 3, r, 2) for s in range(12) for r in (0, 1)]
    assert len({int(i) for indices in epoch for i in indices}) == 96


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"advantage": "grpo", "group_size": 1}, "group_size=1"),
        ({"advantage": "nope"}, "model.advantage='nope'"),
        ({"advantage": "v5", "osla": OslaSettings()}, "model.advantage='v5' is not a registered estimator"),
        ({"loss_agg": "sum"}, "model.loss_agg"),
        ({"micro_batch_size": 0}, "model.micro_batch_size"),
        (
            {"verifier": "math", "verifier_options": {"timeout": 3}},
            "model.verifier_options={'timeout': 3} do not fit verifier 'math': unknown option(s) timeout; "
            "it takes: timeout_s, num_workers",
        ),
        (
            {"verifier_options": {"timeout": 3}},
            "do not fit verifier 'arithmetic': unknown option(s) timeout; it takes: none",
        ),
        ({"stop": "</answer>"}, "stop must be a tuple of strings, got the string '</answer>'"),
    ],
)
def test_bad_settings_fail_before_training(
    tiny_lm_path: str, tmp_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_module(tiny_lm_path, tmp_path, **kwargs)


def test_verifier_options_reach_the_verifier(tiny_lm_path: str, tmp_path: Path) -> None:
    module = make_module(
        tiny_lm_path, tmp_path, verifier="math", verifier_options={"timeout_s": 2.5, "num_workers": 1}
    )
    try:
        assert (module.verifier.timeout_s, module.verifier.num_workers) == (2.5, 1)
        assert module.hparams.verifier_options == {"timeout_s": 2.5, "num_workers": 1}
    finally:
        module.verifier.close()


def test_bad_model_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        make_module(str(tmp_path / "missing"), tmp_path)
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a causal LM"):
        make_module(str(tmp_path / "bert"), tmp_path)


def test_batch_shape_and_prompt_length_checks(tiny_lm_path: str, task_dir: Path, tmp_path: Path) -> None:
    module = make_module(tiny_lm_path, tmp_path, mini_batches=3)
    with pytest.raises(ValueError, match="mini_batches=3"):
        make_trainer(tmp_path, steps=1).fit(module, datamodule=data(task_dir))
    module = make_module(tiny_lm_path, tmp_path, max_prompt_tokens=3)
    with pytest.raises(ValueError, match="max_prompt_tokens=3"):
        make_trainer(tmp_path, steps=1).fit(module, datamodule=data(task_dir))
    module = make_module(tiny_lm_path, tmp_path)  # on CPU, Lightning turns precision="16-mixed" into bf16
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"precision=16-mixed .* is not supported"):
        make_trainer(tmp_path, steps=1, plugins=[fp16]).fit(module, datamodule=data(task_dir))


def test_a_validation_prompt_past_the_context_fails_before_training(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt_id": "long", "prompt": "1+" * 200 + "1=", "answer": "201"}) + "\n")
    for stage in ("fit", "validate"):
        module = make_module(tiny_lm_path, tmp_path, max_prompt_tokens=40)
        with pytest.raises(ValueError, match=r"validation prompt 'long' has \d+ tokens, more than model"):
            getattr(make_trainer(tmp_path, steps=1), stage)(
                module, datamodule=data(task_dir, val_path=str(val))
            )


def test_a_validation_prompt_sharing_a_training_prompts_id_is_read_as_itself(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    """Split files often number ids from 0 each: prompt tokens were cached by id, so validation sampled
    (and length-checked) the training prompt of the same id."""
    import datasets

    train = datasets.load_dataset("parquet", data_files=str(task_dir / "train.parquet"), split="train")
    shared_id = str(train[0]["prompt_id"])
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt_id": shared_id, "prompt": "1+" * 200 + "1=", "answer": "201"}) + "\n")
    module = make_module(tiny_lm_path, tmp_path, max_prompt_tokens=40)
    with pytest.raises(ValueError, match=rf"validation prompt '{shared_id}' has \d+ tokens, more than model"):
        make_trainer(tmp_path, steps=1).fit(module, datamodule=data(task_dir, val_path=str(val)))
    rows = [PromptRow(shared_id, prompt, "2", "arithmetic", None) for prompt in ("1+1=", "3+4=")]
    first, second = (module.prompt_token_ids(row) for row in rows)
    assert first != second and second == module.prompt_token_ids(rows[1])


def test_non_finite_updates_are_skipped_then_stop_with_checkpoint(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    # GRPO with eps=0 divides by a zero group std when every response fails: NaN advantages, NaN loss.
    module = make_module(tiny_lm_path, tmp_path, advantage="grpo", advantage_options={"eps": 0.0})
    before = snapshot(module.policy)
    with pytest.raises(RuntimeError, match="three consecutive updates"):
        make_trainer(tmp_path, steps=10).fit(module, datamodule=data(task_dir))
    assert module.rl_step == 3
    assert module.trainer.global_step == 2  # skipped updates still count: checkpoint cadence holds
    assert all(torch.equal(before[name], p) for name, p in module.policy.named_parameters())
    assert list((tmp_path / "checkpoints").glob("non-finite-step3.ckpt"))


def test_a_rollout_budget_stops_the_run_after_the_step_that_spends_it(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 4 prompts x 4 rollouts = 16 per step: a budget of 40 is spent by step 3, long before max_steps
    module = make_module(tiny_lm_path, tmp_path, max_rollouts=40, export_every_n_steps=1, val_every_n_steps=3)
    validations: list[int] = []  # the RL step of every validation that logged its figures
    log_metrics = module.log_metrics
    module.log_metrics = lambda metrics, series: (
        (series == "val" and validations.append(module.rl_step)) or log_metrics(metrics, series)
    )
    exported: list[str] = []
    export = module.export
    module.export = lambda out_dir: exported.append(out_dir.name) or export(out_dir)
    trainer = make_trainer(tmp_path, steps=50, limit_val_batches=1.0)  # Lightning's own loop may run
    trainer.fit(module, datamodule=data(task_dir, val_path=str(task_dir)))
    assert (module.rl_step, module.rollouts_total) == (3, 48)
    # the start and step 3 once each: the loop Lightning runs on an early stop skips a validated step
    assert validations == [0, 3]
    assert exported == ["step_000001", "step_000002", "step_000003"]  # the end does not export step 3 again
    # resuming the finished run (e.g. killed during its final validation) trains no further step
    resumed = make_module(tiny_lm_path, tmp_path, max_rollouts=40, export_every_n_steps=1)
    make_trainer(tmp_path, steps=50).fit(
        resumed, datamodule=data(task_dir), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt")
    )
    assert (resumed.rl_step, resumed.rollouts_total) == (3, 48)
    assert (
        "resumed at step 3 with the rollout budget already spent (48 >= model.max_rollouts=40)" in caplog.text
    )
    assert list(resumed._pass_curves) == [0, 3]  # the end-of-run pass@k plot keeps the earlier curves
    assert module.trainer.global_step == 3
    assert sorted(p.name for p in (tmp_path / "exports").glob("step_*")) == [
        f"step_00000{i}" for i in (1, 2, 3)
    ]
    with pytest.raises(ValueError, match="max_rollouts=0 must be a positive rollout budget"):
        make_module(tiny_lm_path, tmp_path, max_rollouts=0)


def test_replacing_an_export_never_leaves_a_half_deleted_folder(
    tiny_lm_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import basis.policy_io as policy_io

    policy, tokenizer = policy_io.load_policy(tiny_lm_path, None)
    out = tmp_path / "exports" / "step_000001"
    policy_io.export_policy(policy, tokenizer, out, {"attempt": 1})
    complete = sorted(p.name for p in out.iterdir())

    def killed_while_deleting(path: Path, *args: Any, **kwargs: Any) -> None:
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()  # one file gone, then dead
        raise KeyboardInterrupt

    monkeypatch.setattr(policy_io.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        policy_io.export_policy(policy, tokenizer, out, {"attempt": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == complete  # whole: the new export
    assert json.loads((out / "basis_export.json").read_text()) == {"attempt": 2}
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == ["step_000001"]

    stale = tmp_path / "exports" / "step_000002.tmp"  # left by a crash mid-write
    stale.mkdir()
    (stale / "leftover.bin").write_text("x")
    policy_io.export_policy(policy, tokenizer, stale.with_suffix(""))
    assert not (tmp_path / "exports" / "step_000002" / "leftover.bin").exists()


@pytest.mark.gpu
def test_training_steps_run_on_a_gpu(tiny_lm_path: str, task_dir: Path, tmp_path: Path) -> None:
    """Rewards and advantages are computed on the CPU; the update must move them to the policy's device
    (it did not, and every GPU run failed on its first update). Skipped without CUDA."""
    module = make_module(tiny_lm_path, tmp_path, kl_coef=0.1, mini_batches=2)
    before = snapshot(module.policy)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data(task_dir))
    assert module.rl_step == 2 and module.policy.device.type == "cuda"
    assert any(not torch.equal(p.cpu(), before[n]) for n, p in module.policy.named_parameters())


def test_full_finetune_with_kl_resumes_and_keeps_the_reference_out_of_checkpoints(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tiny_lm_path, tmp_path, kl_coef=0.1, checkpoint_every_n_steps=1)
    make_trainer(tmp_path, steps=2).fit(module, datamodule=data(task_dir))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(k.startswith("policy.") for k in checkpoint["state_dict"])
    resumed = make_module(tiny_lm_path, tmp_path, kl_coef=0.1, checkpoint_every_n_steps=1)
    make_trainer(tmp_path, steps=3).fit(
        resumed, datamodule=data(task_dir), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt")
    )
    assert resumed.rl_step == 3


def test_resuming_from_an_earlier_step_sets_aside_the_abandoned_steps_outputs(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    settings = dict(checkpoint_every_n_steps=1, export_every_n_steps=1)
    make_trainer(tmp_path, steps=2).fit(
        make_module(tiny_lm_path, tmp_path, **settings), datamodule=data(task_dir)
    )
    early = tmp_path / "step2.ckpt"
    shutil.copy(tmp_path / "checkpoints" / "last.ckpt", early)
    make_trainer(tmp_path, steps=4).fit(  # the attempt that will be abandoned: steps 3 and 4
        make_module(tiny_lm_path, tmp_path, **settings),
        datamodule=data(task_dir),
        ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"),
    )
    make_trainer(tmp_path, steps=3).fit(
        make_module(tiny_lm_path, tmp_path, **settings), datamodule=data(task_dir), ckpt_path=str(early)
    )
    records = sorted(p.name for p in (tmp_path / "rollouts").glob("*.parquet"))
    assert records == [f"step_00000{i}-rank0.parquet" for i in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "exports").glob("step_*")) == [
        f"step_00000{i}" for i in (1, 2, 3)
    ]
    (records_aside,) = (tmp_path / "rollouts" / "superseded").iterdir()
    assert sorted(p.name for p in records_aside.iterdir()) == [f"step_00000{i}-rank0.parquet" for i in (3, 4)]
    (exports_aside,) = (tmp_path / "exports" / "superseded").iterdir()
    assert sorted(p.name for p in exports_aside.iterdir()) == ["step_000003", "step_000004"]

    # a fresh run (no checkpoint) in the same run_dir sets every earlier output aside as well, its MLflow
    # run id included (the new run's overwrote it, so the earlier run could not be continued)
    (tmp_path / "mlflow_run_id").write_text("earlier-run")
    make_trainer(tmp_path, steps=1).fit(
        make_module(tiny_lm_path, tmp_path, **settings), datamodule=data(task_dir)
    )
    assert sorted(p.name for p in (tmp_path / "rollouts").glob("*.parquet")) == ["step_000001-rank0.parquet"]
    assert sorted(p.name for p in (tmp_path / "exports").glob("step_*")) == ["step_000001"]
    restarted = [
        p for p in (tmp_path / "exports" / "superseded").iterdir() if p.name.startswith("restarted-")
    ]
    assert sorted(p.name for p in restarted[0].iterdir()) == ["step_000001", "step_000002", "step_000003"]
    (checkpoints_aside,) = (tmp_path / "checkpoints" / "superseded").iterdir()  # the step-3 attempt's
    earlier = torch.load(checkpoints_aside / "last.ckpt", weights_only=True)
    assert earlier["basis_state"]["rl_step"] == 3
    (run_aside,) = (tmp_path / "superseded").iterdir()
    assert (
        run_aside / "mlflow_run_id"
    ).read_text() == "earlier-run" and run_aside.name == checkpoints_aside.name
    assert (
        torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["basis_state"]["rl_step"] == 1
    )


def record_engine_calls(module: PolicyTrainer) -> list[str]:
    """The names of the module's engine calls (`generate`, `update_weights`), in order, as they happen."""
    calls: list[str] = []
    generate, update_weights = module.engine.generate, module.engine.update_weights
    module.engine.generate = lambda *args: calls.append("generate") or generate(*args)
    module.engine.update_weights = lambda policy: calls.append("update_weights") or update_weights(policy)
    return calls


def test_a_resumed_run_syncs_the_engine_before_its_first_rollout(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    make_trainer(tmp_path, steps=1).fit(make_module(tiny_lm_path, tmp_path), datamodule=data(task_dir))
    resumed = make_module(tiny_lm_path, tmp_path)
    calls = record_engine_calls(resumed)
    make_trainer(tmp_path, steps=2).fit(
        resumed, datamodule=data(task_dir), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt")
    )
    # an engine with its own weights (SGLang) would otherwise sample the resumed step from model_path
    assert calls == ["update_weights", "generate", "update_weights"]


def test_a_reused_logger_or_a_missing_datamodule_is_refused(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    """One MLflowLogger object passed to a second fit (another module and run_dir) merged it into the first
    run: its metrics were dropped as already logged and its params recorded as changes on resume. A fit
    without a datamodule ended in Lightning's "train_dataloader must be implemented"."""
    from basis.tracking import MLflowLogger

    logger = MLflowLogger(experiment_name="reused", tracking_uri=mlflow_store)
    make_trainer(tmp_path / "a", steps=1, logger=logger).fit(
        make_module(tiny_lm_path, tmp_path / "a"), datamodule=data(task_dir)
    )
    with pytest.raises(ValueError, match="draws its prompts from a PromptDataModule"):
        make_trainer(tmp_path / "b", steps=1).fit(make_module(tiny_lm_path, tmp_path / "b"))  # no datamodule
    with pytest.raises(ValueError, match=f"MLflow run {logger.run_id} already holds training steps 1...1"):
        make_trainer(tmp_path / "b", steps=1, logger=logger).fit(
            make_module(tiny_lm_path, tmp_path / "b"), datamodule=data(task_dir)
        )
    assert not (tmp_path / "b" / "rollouts").exists()


def test_a_verifier_reward_other_than_0_or_1_is_refused(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    """A partial-credit verifier's 0.5 was trained on as given (rewards 2r - 1) and truncated in pass@k."""
    from basis.rewards import VerifyResult

    module = make_module(tiny_lm_path, tmp_path)
    module.verifier = lambda responses, answers: VerifyResult([0.5] * len(responses), 0)
    with pytest.raises(
        ValueError, match=r"verifier 'arithmetic' returned reward 0.5 for rollout 0: rewards must"
    ):
        make_trainer(tmp_path, steps=1).fit(module, datamodule=data(task_dir))


def test_validating_a_checkpoint_syncs_the_engine_first(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    """`basis validate --ckpt_path X` scored model_path's weights with an engine that holds its own copy
    (SGLang): only training synced it."""
    make_trainer(tmp_path, steps=1).fit(make_module(tiny_lm_path, tmp_path), datamodule=data(task_dir))
    checked = make_module(tiny_lm_path, tmp_path)
    calls = record_engine_calls(checked)
    make_trainer(tmp_path, steps=1, limit_val_batches=1).validate(
        checked,
        datamodule=data(task_dir, val_path=str(task_dir), val_prompts=4),
        ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"),
    )
    assert calls[0] == "update_weights" and calls.count("update_weights") == 1 and "generate" in calls


def test_a_failed_update_gives_the_engine_its_memory_back(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    """An update that raised (out of memory) left a long-lived SGLang server with its memory released."""
    module = make_module(tiny_lm_path, tmp_path)
    calls: list[str] = []
    module.engine.release_memory = lambda: calls.append("release")
    module.engine.resume_memory = lambda: calls.append("resume")

    def out_of_memory(*args: object) -> None:
        raise RuntimeError("CUDA out of memory")

    module.update_policy = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        make_trainer(tmp_path, steps=1).fit(module, datamodule=data(task_dir))
    assert calls == ["release", "resume"]


def one_step_batch(module: PolicyTrainer):  # type: ignore[no-untyped-def]
    """Eight sampled responses to four prompts, as the trainer's update sees them."""
    from basis.data import PromptRow
    from basis.rollout import SamplingParams
    from basis.trainer import Rollouts

    prompts = [PromptRow(f"p{i}", f"{i}+{3 * i}=", str(4 * i), "arith", None) for i in range(1, 5)]
    index = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    prompt_ids = [module.prompt_token_ids(prompts[i]) for i in index.tolist()]
    completions = module.engine.generate(prompt_ids, SamplingParams(12, 1.0, 1.0, 0, (), seed=1))
    correct = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0])
    return module.policy_batch(Rollouts(prompts, prompt_ids, completions, index, correct, 0))


def test_logged_policy_loss_does_not_depend_on_micro_batching(tiny_lm_path: str, tmp_path: Path) -> None:
    stats = {}
    for micro in (8, 2):
        module = make_module(tiny_lm_path, tmp_path, micro_batch_size=micro, kl_coef=0.1)
        optimizer = torch.optim.SGD([p for p in module.policy.parameters() if p.requires_grad], lr=0.0)
        module.optimizers, module.lr_schedulers = (lambda o=optimizer: o), (lambda: None)  # no Trainer
        module.manual_backward = lambda loss: loss.backward()
        stats[micro] = module.update_policy(one_step_batch(module), torch.linspace(-0.5, 1.5, 8))
    for name in ("policy_loss", "kl", "grad_norm"):
        assert stats[2][name] == pytest.approx(stats[8][name], rel=1e-4, abs=1e-6), name


def _uneven_update_grads(module: PolicyTrainer, rows: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of one update on `rows` of a batch whose first four responses are long and last four
    short (1-3 tokens), with an SGD step of size 0 and no clipping."""
    from basis.trainer import _select

    without_trainer(module)
    module.update_policy(_select(uneven_batch(module), rows), torch.linspace(-0.5, 1.5, 8)[rows])
    return [p.grad.clone() for p in module.policy.parameters() if p.requires_grad]


def without_trainer(module: PolicyTrainer) -> None:
    """Let `update_policy` run outside a Trainer: SGD with step size 0, plain backward."""
    optimizer = torch.optim.SGD([p for p in module.policy.parameters() if p.requires_grad], lr=0.0)
    module.optimizers, module.lr_schedulers = (lambda o=optimizer: o), (lambda: None)
    module.manual_backward = lambda loss: loss.backward()


def uneven_batch(module: PolicyTrainer):  # type: ignore[no-untyped-def]
    """`one_step_batch` with its first four responses long (12 tokens) and the last four 1-3 tokens."""
    batch = one_step_batch(module)
    mask = batch.response_mask.clone()
    for row, length in enumerate([12, 12, 12, 12, 1, 3, 2, 1]):
        mask[row, mask[row].nonzero().flatten()[length:]] = False
    return batch._replace(response_mask=mask)


def test_logged_token_statistics_are_per_token_whatever_the_micro_batches(
    tiny_lm_path: str, tmp_path: Path
) -> None:
    stats = {}
    for micro in (8, 3):
        module = make_module(tiny_lm_path, tmp_path, micro_batch_size=micro)
        without_trainer(module)
        batch = uneven_batch(module)
        shift = torch.tensor([0.1] * 4 + [1.0] * 4)[:, None]  # engine log-probs off by a per-row amount
        batch = batch._replace(rollout_logprobs=batch.rollout_logprobs - shift)
        stats[micro] = module.update_policy(batch, torch.linspace(-0.5, 1.5, 8))
    assert stats[8]["logprob_mismatch"] == pytest.approx((48 * 0.1 + 7 * 1.0) / 55, rel=1e-3)
    for name in ("entropy", "approx_kl", "clip_frac", "logprob_mismatch", "policy_loss"):
        assert stats[3][name] == pytest.approx(stats[8][name], rel=1e-4, abs=1e-6), name


def on_two_ranks(target: Any, *args: Any) -> None:
    """Run `target(rank, *args)` on each rank of a real 2-process gloo group (torch.multiprocessing)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_gloo_rank, args=(port, target, *args), nprocs=2)


def _gloo_rank(rank: int, port: int, target: Any, *args: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        target(rank, *args)
    finally:
        dist.destroy_process_group()


def _data_parallel_rank(rank: int, model_path: str, run_dir: str, loss_agg: str) -> None:
    """5 and 3 of the 8 responses per rank (OSLA makes rank batches uneven), gradients averaged as
    DDP does."""
    import torch.distributed as dist

    module = make_module(model_path, Path(run_dir), grad_clip=1e9, loss_agg=loss_agg, kl_coef=0.1)
    grads = _uneven_update_grads(module, torch.arange(8)[:5] if rank == 0 else torch.arange(8)[5:])
    for grad in grads:
        dist.all_reduce(grad)
        grad /= 2
    if rank == 0:
        torch.save(grads, Path(run_dir) / "ddp_grads.pt")


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum"])
def test_data_parallel_update_has_the_whole_batch_gradient(
    tiny_lm_path: str, tmp_path: Path, loss_agg: str
) -> None:
    whole = _uneven_update_grads(
        make_module(tiny_lm_path, tmp_path, grad_clip=1e9, loss_agg=loss_agg, kl_coef=0.1), torch.arange(8)
    )
    on_two_ranks(_data_parallel_rank, tiny_lm_path, str(tmp_path), loss_agg)
    averaged = torch.load(tmp_path / "ddp_grads.pt", weights_only=True)
    for got, want in zip(averaged, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


class UnusedPrior:
    """Test double for V0 where a prior must be configured but the test hands the step its values."""

    def predict(self, context_prompts, context_success, query_prompts) -> torch.Tensor:
        raise AssertionError("not queried in this test")

    def prepare(self, prompts) -> None:
        pass


def _pooled_module(model_path: str, run_dir: Path, advantage: str) -> PolicyTrainer:
    prior = UnusedPrior() if advantage == "basis" else None
    return make_module(model_path, run_dir, advantage=advantage, group_size=2, prior=prior)


def _pooled_advantages(module: PolicyTrainer, groups: list[int], with_prior: bool = True) -> torch.Tensor:
    """Advantages of the responses of prompt `groups` out of 4 prompts x 2 responses of uneven
    lengths, with a per-prompt prior (used by estimators that take one) or without (the fallback)."""
    from basis.data import PromptRow
    from basis.rollout import Completion
    from basis.trainer import Rollouts

    lengths, correct = [12, 3, 7, 1, 12, 5, 9, 2], [1.0, 0, 1, 1, 0, 0, 1, 1]
    rows = [i for g in groups for i in (2 * g, 2 * g + 1)]
    prompts = [PromptRow(f"p{g}", f"{g}+{g}=", str(2 * g), "arith", None) for g in groups]
    completions = [Completion([5] * lengths[i], [0.0] * lengths[i], "", "stop") for i in rows]
    index = torch.tensor([k for k in range(len(groups)) for _ in range(2)])
    rollouts = Rollouts(prompts, [], completions, index, torch.tensor([correct[i] for i in rows]), 0)
    prior = torch.tensor([0.2, -0.4, 0.6, -0.8])[groups]
    return module.advantages(rollouts, prior if with_prior else None)


def _pooled_rank(rank: int, model_path: str, run_dir: str, advantage: str, with_prior: bool) -> None:
    import torch.distributed as dist

    local = _pooled_advantages(
        _pooled_module(model_path, Path(run_dir), advantage), [0, 1, 2] if rank == 0 else [3], with_prior
    )
    shards: list = [None, None]
    dist.all_gather_object(shards, local)
    if rank == 0:
        torch.save(torch.cat(shards), Path(run_dir) / "pooled.pt")


@pytest.mark.parametrize(
    ("advantage", "with_prior"), [("reinforce_pp", True), ("basis", True), ("basis", False)]
)
def test_batch_wide_advantages_pool_every_ranks_responses(
    tiny_lm_path: str, tmp_path: Path, advantage: str, with_prior: bool
) -> None:
    """Without a prior, BASIS's fallback used each rank's own batch mean, which put a lone prompt's
    own reward into its baseline once the ranks were pooled."""
    whole = _pooled_advantages(_pooled_module(tiny_lm_path, tmp_path, advantage), [0, 1, 2, 3], with_prior)
    on_two_ranks(_pooled_rank, tiny_lm_path, str(tmp_path), advantage, with_prior)
    torch.testing.assert_close(torch.load(tmp_path / "pooled.pt", weights_only=True), whole)


def test_every_policy_pass_runs_without_dropout(tiny_lm_path: str, tmp_path: Path) -> None:
    """With dropout in the loss pass only, the first on-policy update's ratio was not 1 and clipped noise."""
    noisy_start = tmp_path / "attention-dropout"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    model.config.attention_dropout = 0.5
    model.save_pretrained(noisy_start)
    AutoTokenizer.from_pretrained(tiny_lm_path).save_pretrained(noisy_start)
    module = make_module(str(noisy_start), tmp_path, ppo_epochs=1, mini_batches=2)
    batch = one_step_batch(module)
    module.policy.train()
    old = module.sequence_logprobs(batch)[0]
    loss_pass = module.sequence_logprobs(batch, with_grad=True)[0]
    assert torch.equal(loss_pass.detach(), old)  # ratio exactly 1 on policy
    assert module.policy.training  # the training mode is restored
    torch.manual_seed(0)
    mask = batch.attention_mask
    train_mode = module.policy(input_ids=batch.input_ids, attention_mask=mask).logits
    eval_mode = module.policy.eval()(input_ids=batch.input_ids, attention_mask=mask).logits
    assert not torch.equal(train_mode, eval_mode)  # the dropout is real

    with pytest.raises(
        ValueError, match=r"model\.lora\.dropout=0\.1: every policy forward pass runs with dropout off"
    ):
        make_module(tiny_lm_path, tmp_path, lora=LoraSettings(dropout=0.1))


def test_a_step_needs_distinct_prompts_for_every_rank(task_dir: Path) -> None:
    """64 prompts, 40 per rank: one rank is fine, two would share prompts within each step."""
    from types import SimpleNamespace

    PromptDataModule(str(task_dir), val_path=None, prompts_per_step=40).setup("fit")
    datamodule = PromptDataModule(str(task_dir), val_path=None, prompts_per_step=40)
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=2)
    with pytest.raises(
        ValueError, match=r"prompts_per_step=40 x 2 data-parallel rank\(s\) exceeds the 64 prompts"
    ):
        datamodule.setup("fit")


def test_validation_shards_are_equal_on_every_rank_and_cover_each_prompt_once(task_dir: Path) -> None:
    from types import SimpleNamespace

    datamodule = PromptDataModule(
        str(task_dir), val_path=str(task_dir), val_split="validation", val_batch_size=2
    )
    datamodule.setup("fit")
    assert len(datamodule.val_rows) == 8
    real, shapes = [], set()
    for rank in range(3):
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=3)
        batches = list(datamodule.val_dataloader())
        shapes.add(tuple(len(b.rows) for b in batches))
        real += [row.prompt_id for b in batches for row in b.rows[: b.real]]
    assert len(shapes) == 1  # 3 prompts per rank, padded where a rank holds 2
    assert sorted(real) == sorted(row.prompt_id for row in datamodule.val_rows)


def test_gradient_clipping_under_fsdp_asks_the_root_module_for_the_global_norm(
    tiny_lm_path: str, tmp_path: Path
) -> None:
    """Lightning refuses FSDP on CPU, so the FSDP root here is a test double that records the call
    (`FullyShardedDataParallel.clip_grad_norm_` all-reduces the shard norms; torch's would not)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    class FsdpRootDouble:
        def __init__(self) -> None:
            self.max_norms: list[float] = []

        def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
            self.max_norms.append(max_norm)
            return torch.tensor(2.5)

    module = make_module(tiny_lm_path, tmp_path, grad_clip=0.7)
    strategy, root = FSDPStrategy(), FsdpRootDouble()
    strategy.model = root
    module._trainer = SimpleNamespace(strategy=strategy)
    assert float(module._clip_gradients()) == 2.5 and root.max_norms == [0.7]
    module._trainer = None
    assert float(module._clip_gradients()) == 0.0  # no gradients yet: torch's own clipping

    lora = make_module(tiny_lm_path, tmp_path, lora=LoraSettings(r=4))
    lora._trainer = SimpleNamespace(strategy=FSDPStrategy(), precision_plugin=None, datamodule=None)
    with pytest.raises(ValueError, match=r"model\.lora with an FSDP strategy is not supported"):
        lora.setup("fit")  # the merged export needs the unsharded adapter modules
    refill = make_module(tiny_lm_path, tmp_path, dynamic_sampling_rounds=2)
    refill._trainer = SimpleNamespace(strategy=FSDPStrategy(), precision_plugin=None, datamodule=None)
    with pytest.raises(ValueError, match=r"model\.dynamic_sampling_rounds with an FSDP strategy"):
        refill.setup("fit")  # ranks would run different numbers of generation rounds


class CoinVerifier:
    """Test double for a verifier: a response succeeds when its text's CRC is odd, so about half of all
    groups of two mix outcomes (the untrained tiny model never answers arithmetic)."""

    def __call__(self, responses, answers):
        from basis.rewards import VerifyResult

        return VerifyResult([float(zlib.crc32(r.encode()) % 2) for r in responses], 0)


def test_dapo_dynamic_sampling_trains_only_mixed_groups_and_counts_every_rollout(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import inspect

    import pyarrow.parquet as pq

    # the verifier as a user's own module, given by import path as a CLI config would
    (tmp_path / "coin_rewards.py").write_text("import zlib\n\n\n" + inspect.getsource(CoinVerifier))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = make_module(
        tiny_lm_path, tmp_path, group_size=2, verifier="coin_rewards:CoinVerifier", dynamic_sampling_rounds=6
    )
    logged: list[dict[str, float]] = []
    monkeypatch.setattr(module, "log_metrics", lambda metrics, series: logged.append(metrics))
    make_trainer(tmp_path, steps=3).fit(module, datamodule=data(task_dir))
    generated = 0
    for step, metrics in enumerate(logged, start=1):
        records = pq.read_table(tmp_path / "rollouts" / f"step_{step:06d}-rank0.parquet").to_pandas()
        assert (
            len(records)
            == metrics["train/rollouts_generated"]
            == 8 * (1 + metrics["train/dynamic_sampling_rounds"])
        )
        assert records["prompt_id"].nunique() == len(records) // 2  # no prompt sampled twice in a step
        groups = records[records["trained"]].groupby("prompt_id")["reward"]
        assert records["trained"].sum() == metrics["train/rollouts"] == 2 * groups.ngroups
        assert (groups.nunique() == 2).all()  # every trained group mixes outcomes
        assert metrics["train/dynamic_sampling_kept"] == groups.ngroups / 4 == 1.0  # refilled to the batch
        generated_tokens = metrics["train/tokens_per_s"] * metrics["time/rollout"]
        assert generated_tokens == pytest.approx(
            records["response_length"].sum()
        )  # all generated, not trained
        all_groups = records.groupby("prompt_id")["reward"]
        assert metrics["train/zero_variance_groups"] == pytest.approx((all_groups.nunique() == 1).mean())
        generated += metrics["train/rollouts_generated"]
    assert any(m["train/dynamic_sampling_rounds"] > 0 for m in logged)
    assert any(m["train/zero_variance_groups"] > 0 for m in logged)  # of all generated groups
    assert module.rollouts_total == generated  # the dropped rollouts are paid for too


def test_dynamic_sampling_without_any_mixed_group_trains_on_the_batch(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = make_module(tiny_lm_path, tmp_path, dynamic_sampling_rounds=2)  # every arithmetic answer fails
    logged: list[dict[str, float]] = []
    monkeypatch.setattr(module, "log_metrics", lambda metrics, series: logged.append(metrics))
    make_trainer(tmp_path, steps=1).fit(module, datamodule=data(task_dir))
    (metrics,) = logged
    assert metrics["train/dynamic_sampling_rounds"] == 2 and metrics["train/dynamic_sampling_kept"] == 0
    assert metrics["train/rollouts"] == 16 and module.rollouts_total == 48
    import pyarrow.parquet as pq

    records = pq.read_table(tmp_path / "rollouts" / "step_000001-rank0.parquet").to_pandas()
    assert len(records) == 48 and records["trained"].sum() == 16  # all recorded: harvest sees 0/1 groups


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dynamic_sampling_rounds": -1}, "must be >= 0"),
        ({"advantage": "reinforce_pp", "dynamic_sampling_rounds": 2}, "'reinforce_pp' learns from them"),
        ({"prior": "any", "dynamic_sampling_rounds": 2}, "with a model.prior is not supported"),
    ],
)
def test_dynamic_sampling_settings(tiny_lm_path: str, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_module(tiny_lm_path, tmp_path, **kwargs)


def test_a_step_without_any_success_is_reported_once(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path
) -> None:
    # the untrained model never answers arithmetic: a run that can learn nothing used to finish silently
    module = make_module(tiny_lm_path, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, steps=2).fit(module, datamodule=data(task_dir))
    reports = [str(w.message) for w in caught if "scored 0 with verifier" in str(w.message)]
    assert len(reports) == 1 and reports[0].startswith(
        "step 1: every rollout scored 0 with verifier 'arithmetic'"
    )


def test_ddp_ranks_that_refill_differently_still_train_in_step(
    tiny_lm_path: str, task_dir: Path, tmp_path: Path, ddp_run: Callable[..., list[dict]]
) -> None:
    """Real Lightning DDP on 2 CPU processes (tests/basis/ddp_run.py dynamic_sampling): each rank
    refills its own groups, so ranks generate and train on different numbers of responses."""
    import pyarrow.parquet as pq

    ranks = ddp_run("dynamic_sampling", tiny_lm_path, task_dir)
    assert [r["rl_step"] for r in ranks] == [3, 3]
    records = [
        pq.read_table(p).to_pandas() for p in sorted((tmp_path / "run" / "rollouts").glob("*.parquet"))
    ]
    assert len(records) == 6 and ranks[0]["rollouts_total"] == ranks[1]["rollouts_total"] == sum(
        map(len, records)
    )
    assert len({len(r) for r in records}) > 1  # the ranks' steps generated different numbers of rollouts
    for name, weight in ranks[0]["state"].items():
        assert torch.equal(weight, ranks[1]["state"][name]), name  # the gradients were all-reduced


def ragged_batch(module: PolicyTrainer):  # type: ignore[no-untyped-def]
    """Seven responses of 1-11 tokens to prompts of 3-13 tokens, as `policy_batch` pads them."""
    from basis.rollout import Completion
    from basis.trainer import Rollouts

    generator = torch.Generator().manual_seed(0)
    vocab = len(module.tokenizer)
    prompt_ids = [
        torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (3, 13, 7, 5, 9, 4, 11)
    ]
    completions = [
        Completion(ids, [-1.0] * len(ids), "", "stop")
        for ids in (
            torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (11, 2, 7, 1, 4, 9, 5)
        )
    ]
    prompts = [PromptRow(f"p{i}", "?", "0", "arith", None) for i in range(7)]
    return module.policy_batch(Rollouts(prompts, prompt_ids, completions, torch.arange(7), torch.zeros(7), 0))


def padded_pass(model: torch.nn.Module, batch: Any, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one forward pass over the whole padded batch, logits at every position."""
    from basis.losses import entropy_from_logits

    mask = batch.attention_mask
    with torch.no_grad():
        logits = model.eval()(
            input_ids=batch.input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    logits = logits[:, batch.prompt_width - 1 : -1].float() / temperature  # [N, R, V]
    targets = batch.input_ids[:, batch.prompt_width :, None]
    return torch.log_softmax(logits, -1).gather(-1, targets).squeeze(-1), entropy_from_logits(logits)


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4)])
def test_trimmed_length_sorted_passes_match_one_padded_pass(
    tiny_lm_path: str, tmp_path: Path, lora: LoraSettings | None
) -> None:
    """Micro-batches of rows sorted by length, each cut to its own width, with the LM head on the
    response positions only: the log-probs and entropies of one padded pass, 0 on padding."""
    module = make_module(tiny_lm_path, tmp_path, micro_batch_size=3, temperature=0.7, lora=lora)
    batch = ragged_batch(module)
    kept: list[int] = []
    hook = module.policy.register_forward_hook(lambda _m, _a, out: kept.append(out.logits.shape[1]))
    logprobs, entropy = module.sequence_logprobs(batch, with_entropy=True)
    hook.remove()
    assert kept == [11 + 1, 5 + 1, 1 + 1]  # response widths 11/9/7, 5/4/2, 1 (+1) in length order
    expected_logprobs, expected_entropy = padded_pass(module.policy, batch, 0.7)
    mask = batch.response_mask
    torch.testing.assert_close(logprobs[mask], expected_logprobs[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[mask], expected_entropy[mask], rtol=1e-5, atol=1e-5)
    assert not logprobs[~mask].any() and not entropy[~mask].any()


def test_a_model_without_logits_to_keep_gets_the_same_log_probs(tiny_lm_path: str, tmp_path: Path) -> None:
    """A causal LM whose forward takes no `logits_to_keep` (older or custom code) computes every
    position's logits; the response positions are picked from them."""
    from basis.trainer import _takes_logits_to_keep

    class EveryLogit(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids):  # type: ignore[no-untyped-def]
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    module = make_module(tiny_lm_path, tmp_path, micro_batch_size=3)
    batch = ragged_batch(module)
    assert _takes_logits_to_keep(module.policy) and not _takes_logits_to_keep(EveryLogit(module.policy))
    torch.testing.assert_close(
        module.sequence_logprobs(batch, model=EveryLogit(module.policy))[0],
        module.sequence_logprobs(batch)[0],
    )


def test_micro_batches_group_rows_by_response_length(tiny_lm_path: str, tmp_path: Path) -> None:
    module = make_module(tiny_lm_path, tmp_path, micro_batch_size=3)
    batch = ragged_batch(module)
    rows = torch.tensor([6, 0, 3, 1, 5])  # response lengths 5, 11, 1, 2, 9
    assert [m.tolist() for m in module.micro_batches(batch, rows)] == [[0, 5, 6], [1, 3]]
    module.hparams.micro_batch_size = 5  # one micro-batch: the rows as given
    assert [m.tolist() for m in module.micro_batches(batch, rows)] == [rows.tolist()]
