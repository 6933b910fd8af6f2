"""Policy exports: the starting checkpoint's dtype, tied weights stored once, and sharded (FSDP) weights
gathered from every rank. Real tiny Qwen3 through the Auto* loaders, real 2-process gloo groups."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from basis.policy_io import LoraSettings, export_policy, load_policy, merged_lora_weight, saved_dtype


def saved_tensors(folder: Path) -> dict[str, str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {key: f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def test_export_keeps_the_starting_dtype_and_stores_tied_weights_once(
    tiny_lm_path: str, tmp_path: Path
) -> None:
    start = tmp_path / "bf16-start"  # a starting checkpoint saved in bf16, as Qwen3's are
    AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.bfloat16).save_pretrained(start)
    load_policy(tiny_lm_path, None)[1].save_pretrained(start)
    policy, tokenizer = load_policy(str(start), None)  # held in float32, as the trainer holds it
    assert policy.dtype == torch.float32
    assert saved_dtype(str(start)) == torch.bfloat16 and saved_dtype(tiny_lm_path) == torch.float32

    out = export_policy(policy, tokenizer, tmp_path / "step_000001", dtype=saved_dtype(str(start)))
    dtypes = saved_tensors(out)
    assert "lm_head.weight" not in dtypes and "model.embed_tokens.weight" in dtypes  # tied: stored once
    assert set(dtypes.values()) == {"BF16"}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for name, tensor in policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name

    as_held = saved_tensors(export_policy(policy, tokenizer, tmp_path / "step_000002"))
    assert "lm_head.weight" not in as_held and set(as_held.values()) == {"F32"}


def test_a_checkpoint_missing_weights_is_refused(tiny_lm_path: str, tmp_path: Path) -> None:
    """transformers would initialise the missing layer randomly and only log it."""
    folder = Path(shutil.copytree(tiny_lm_path, tmp_path / "truncated"))
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1." not in k}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks \d+ weight\(s\).*model\.layers\.1\."):
        load_policy(str(folder), None)


def test_a_checkpoint_without_tokenizer_is_refused(tiny_lm_path: str, tmp_path: Path) -> None:
    """Without tokenizer files transformers 5 builds an empty tokenizer that encodes everything to []."""
    folder = Path(shutil.copytree(tiny_lm_path, tmp_path / "no-tokenizer"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no usable tokenizer"):
        load_policy(str(folder), None)


def trained_lora_policy(model_path: str, target_modules: list[str]) -> tuple[torch.nn.Module, object]:
    """A LoRA policy whose adapters are non-zero (a stand-in for training: peft zero-inits one side)."""
    torch.manual_seed(0)
    policy, tokenizer = load_policy(model_path, LoraSettings(r=4, alpha=8, target_modules=target_modules))
    for name, param in policy.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.05)
    return policy.eval(), tokenizer


def test_merged_lora_weight_includes_embedding_adapters(tiny_lm_path: str) -> None:
    """peft keeps an Embedding layer's adapter in `lora_embedding_A/B`, not `lora_A/B`."""
    policy, _ = trained_lora_policy(tiny_lm_path, ["embed_tokens"])
    layer = policy.get_base_model().model.embed_tokens
    want = layer.get_base_layer().weight + layer.get_delta_weight("default")  # [V, D]
    assert layer.get_delta_weight("default").abs().max() > 0
    torch.testing.assert_close(merged_lora_weight(layer), want)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
@pytest.mark.parametrize("tied_layer", ["lm_head", "embed_tokens"])
def test_lora_on_a_tied_layer_exports_the_in_memory_policy(
    tiny_lm_path: str, tmp_path: Path, tied_layer: str
) -> None:
    """The tiny policy ties lm_head to embed_tokens; a LoRA on either one unties them, so the export must
    store both (and say so in its config) for `AutoModelForCausalLM` to load the trained policy."""
    policy, tokenizer = trained_lora_policy(tiny_lm_path, ["q_proj", tied_layer])
    out = export_policy(policy, tokenizer, tmp_path / "step_000001")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])  # [1, T]
    with torch.no_grad():
        want = policy(input_ids=ids).logits  # [1, T, V]
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits  # [1, T, V]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= saved_tensors(out).keys()


def _sharded_export(rank: int, world: int, model_path: str, run_dir: str, rendezvous: str) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import fully_shard

    from basis.trainer import PolicyTrainer

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        module = PolicyTrainer(model_path, group_size=2, run_dir=run_dir)
        for layer in module.policy.model.layers:
            fully_shard(layer)
        strategy = FSDPStrategy()
        strategy.model = fully_shard(module)  # the root, as Lightning's strategy wraps the LightningModule
        layer_params = [p for p in module.policy.model.layers[0].parameters() if p.numel() > 1]
        assert all(p.to_local().numel() < p.numel() for p in layer_params)  # really sharded
        module._trainer = SimpleNamespace(strategy=strategy, global_rank=rank)
        module.export(Path(run_dir) / "exports" / "step_000001")  # every rank gathers, rank 0 writes
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("adapters_on", [True, False])
def test_modules_to_save_export_the_copy_the_policy_uses(
    tiny_lm_path: str, tmp_path: Path, adapters_on: bool
) -> None:
    # A peft `modules_to_save` copy (here the final norm) used to be exported under peft's names, so the
    # export loaded with that layer missing, initialised at random (logits off by ~0.5, one warning).
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    policy = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"], task_type="CAUSAL_LM"
        ),
    )
    with torch.no_grad():
        for param in policy.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with policy.disable_adapter() if not adapters_on else contextlib.nullcontext():
        want = policy.eval()(input_ids=ids).logits
        out = export_policy(policy, load_policy(tiny_lm_path, None)[1], tmp_path / "step_000001")
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, want, atol=1e-4, rtol=0)


def test_sharded_policy_exports_its_full_weights_from_rank_zero(tiny_lm_path: str, tmp_path: Path) -> None:
    """Real FSDP2 sharding (`fully_shard`) over 2 gloo processes. Lightning's FSDP strategy refuses CPU, so
    its place is taken by a stand-in holding the sharded root (the trainer reads `strategy.model`)."""
    args = (2, tiny_lm_path, str(tmp_path / "run"), str(tmp_path / "rdzv"))
    mp.spawn(_sharded_export, args=args, nprocs=2, join=True)
    out = tmp_path / "run" / "exports" / "step_000001"
    reference = AutoModelForCausalLM.from_pretrained(tiny_lm_path).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name
    assert "lm_head.weight" not in saved_tensors(out)


def test_exported_weights_are_as_readable_as_the_rest_of_the_export(
    tiny_lm_path: str, tmp_path: Path
) -> None:
    """safetensors' save_file creates model.safetensors with mode 0600 whatever the umask."""
    policy, tokenizer = trained_lora_policy(tiny_lm_path, ["q_proj"])
    out = export_policy(policy, tokenizer, tmp_path / "step_000001")
    config_mode = (out / "config.json").stat().st_mode & 0o777
    weights = sorted(out.rglob("*.safetensors"))
    assert [p.relative_to(out).as_posix() for p in weights] == [
        "adapter/adapter_model.safetensors",
        "model.safetensors",
    ]
    assert {p.stat().st_mode & 0o777 for p in weights} == {config_mode}
