"""Loading, merging and exporting policies: the Hugging Face side of the trainer.

- `load_policy` loads any HF causal LM folder (or hub id) with its tokenizer, with clear errors for a
  missing path or a model that is not a causal LM, and wraps it with a peft LoRA adapter on request.
- `merged_lora_weight` / `merged_state_dict` give the full HF-named weights of a (LoRA) policy without
  touching the training model; the SGLang engine pushes them, `export_policy` saves them.
- `gathered_state_dict` gathers the full weights of a sharded (FSDP) policy on rank 0, a collective.
- `export_policy` writes an HF folder that `AutoModelForCausalLM.from_pretrained` loads (for LoRA also
  the adapter in `adapter/`), atomically, in the dtype of the starting checkpoint and with tied weights
  stored once: these exports are the checkpoints `harvest run` reads.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch.distributed.tensor import DTensor


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft `LoraConfig`).

    Args:
        r: Adapter rank.
        alpha: Scaling numerator (`lora_alpha`); the update is scaled by alpha / r.
        dropout: Dropout on the adapter input (the policy trainer refuses > 0: its passes run without dropout).
        target_modules: Module names to adapt, or "all-linear".
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, unsharded view of `tensor` (FSDP2 `DTensor`s are gathered, a collective)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def merged_lora_weight(layer: LoraLayer) -> torch.Tensor:
    """`W + sum_a delta_a` for the active, unmerged adapters of one LoRA layer; the layer is not modified.

    `delta_a` is peft's own `get_delta_weight` (scale * B @ A, with fan_in_fan_out and rsLoRA scaling).
    The sum is taken in float32 and cast back to the base weight's dtype.
    """
    base = full_tensor(layer.get_base_layer().weight)  # [out, in]
    if layer.disable_adapters:
        return base
    merged = base.float()  # [out, in]
    for adapter in layer.active_adapters:
        # peft keeps an Embedding layer's adapter in lora_embedding_A, a Linear's in lora_A
        if adapter in layer.merged_adapters or (
            adapter not in layer.lora_A and adapter not in layer.lora_embedding_A
        ):
            continue
        if layer.use_dora.get(adapter, False):
            raise ValueError(f"adapter {adapter!r} uses DoRA; merge-and-push supports plain LoRA only")
        merged = merged + full_tensor(layer.get_delta_weight(adapter)).float()  # [out, in]
    return merged.to(base.dtype)


def load_policy(model_path: str, lora: LoraSettings | None) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer; wrap it with a LoRA adapter if `lora` is given."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(model_path)
    looks_local = path.is_absolute() or model_path.startswith(".") or model_path.count("/") != 1
    if not path.exists() and (looks_local or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise ValueError(f"model.model_path {model_path!r} does not exist (and is not a reachable hub id)")
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"model.model_path {model_path!r} is not a loadable Hugging Face model: {err}"
        ) from err
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    saved_as = [name for name in (config.architectures or []) if name not in causal_classes]
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or saved_as:
        kind = saved_as[0] if saved_as else f"{config.model_type!r} model"
        raise ValueError(f"model.model_path {model_path!r} holds a {kind}, not a causal LM")
    # transformers only logs missing weights and initialises them randomly: a truncated or mismatched
    # checkpoint would load as a partly random policy
    model, loading = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, output_loading_info=True
    )
    if loading["missing_keys"]:
        missing = sorted(loading["missing_keys"])
        raise ValueError(
            f"model.model_path {model_path!r} lacks {len(missing)} weight(s) of its {config.model_type!r} "
            f"model (they would be randomly initialised), e.g. {missing[:3]}"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # without tokenizer files transformers 5 builds an empty tokenizer of the config's model type, which
    # encodes every prompt to no tokens
    if not tokenizer.encode("1 + 1 =", add_special_tokens=False):
        raise ValueError(
            f"model.model_path {model_path!r} has no usable tokenizer ({type(tokenizer).__name__} with "
            f"{len(tokenizer)} token(s) encodes text to nothing): save the tokenizer beside the model"
        )
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    model.train()
    return model, tokenizer


def merged_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named full weights of `policy`, every LoRA layer merged out of place (`merged_lora_weight`):
    merging in place and unmerging again would leave rounding error in the training weights."""
    if not isinstance(policy, PeftModel):
        return {k: full_tensor(v).clone() for k, v in policy.state_dict().items()}
    base = policy.get_base_model()
    merged = {
        f"{name}.base_layer.weight": merged_lora_weight(m)
        for name, m in base.named_modules()
        if isinstance(m, LoraLayer)
    }
    state = {
        key.replace(".base_layer.", "."): merged[key] if key in merged else full_tensor(tensor).clone()
        for key, tensor in base.state_dict().items()
        if ".lora_" not in key
    }
    for name, module in base.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            _unwrap_modules_to_save(state, name, module)
    return state


def _unwrap_modules_to_save(state: dict[str, torch.Tensor], name: str, module: torch.nn.Module) -> None:
    """Keep, under the HF name `<name>.<param>`, the copy of a peft `modules_to_save` module that the forward
    uses (peft's names `<name>.modules_to_save.<adapter>.<param>` would load as missing layers, which
    transformers initialises at random with only a warning)."""
    if not isinstance(module, ModulesToSaveWrapper):
        raise ValueError(
            f"{name} is a peft {type(module).__name__} (e.g. trainable_token_indices), which cannot be exported "
            "as HF weights; train those tokens with modules_to_save on the embedding instead"
        )
    active = module.active_adapters[0] if module.active_adapters else None
    use_copy = not module.disable_adapters and active in module.modules_to_save
    kept = f"{name}.modules_to_save.{active}." if use_copy else f"{name}.original_module."
    for key in [k for k in state if k.startswith(f"{name}.")]:
        tensor = state.pop(key)
        if key.startswith(kept):
            state[f"{name}.{key.removeprefix(kept)}"] = tensor


def saved_dtype(model_path: str) -> torch.dtype:
    """The dtype a checkpoint's weights were saved in (its config's `dtype`; float32 if it names none).
    The trainer holds float32 weights whatever it started from and exports in this dtype."""
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(model_path).dtype
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def gathered_state_dict(root: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The unsharded weights of the submodule `root.<prefix>`, gathered with `torch.distributed.checkpoint`'s
    `get_model_state_dict` (FSDP1, FSDP2 and DDP alike, wrapper segments removed from the names).

    A collective: every rank must call it. Rank 0 gets the tensors on CPU, the other ranks an empty dict.
    Not for LoRA policies: the merge needs the adapter's modules, not only its tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(f"{prefix}."): v for k, v in full.items() if k.startswith(f"{prefix}.")}


def share_safetensors(folder: Path, like: Path) -> None:
    """Give every `*.safetensors` under `folder` the mode of `like` (a file written with the umask).
    safetensors' `save_file`, which `save_pretrained` uses, creates its files with mode 0600 whatever
    the umask, so another user (an inference server, a colleague) could not read an export."""
    mode = like.stat().st_mode & 0o777
    for file in folder.rglob("*.safetensors"):
        file.chmod(mode)


def export_policy(
    policy: torch.nn.Module,
    tokenizer: Any,
    out_dir: Path,
    metadata: dict[str, Any] | None = None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an HF-format folder (`AutoModelForCausalLM.from_pretrained` loads it); LoRA adds `adapter/`.

    `state_dict` defaults to `merged_state_dict(policy)` (pass `gathered_state_dict`'s under FSDP);
    floating-point weights are saved in `dtype` (default: as held) and the config says so. Tied weights
    (`lm_head` = `embed_tokens`) are stored once, as `save_pretrained` itself does.

    The folder is written beside `out_dir` and moved into place, and an existing `out_dir` is first
    renamed out of the way (hidden, so no `step_*` pattern picks it up) and deleted only afterwards: a
    crash at any point leaves either the old folder, the new one or none, never a half-deleted one."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash mid-export: start clean
    tmp.mkdir(parents=True)
    base = policy.get_base_model() if isinstance(policy, PeftModel) else policy
    tied = getattr(base, "all_tied_weights_keys", None) or {}  # {copy: source}, empty unless the config ties
    state = merged_state_dict(policy) if state_dict is None else state_dict
    # LoRA on a tied layer (lm_head or embed_tokens) merges into one side only: the pair is no longer
    # tied, so both are stored and the config unties them, or the loader would overwrite one with the other
    untie = any(
        copy_key in state and source in state and not torch.equal(state[copy_key], state[source])
        for copy_key, source in tied.items()
    )
    state = {
        key: tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        for key, tensor in state.items()
        if untie or key not in tied
    }
    base.save_pretrained(tmp, state_dict=state)
    if dtype is not None or untie:  # save_pretrained writes the live model's dtype and tying
        config = copy.deepcopy(base.config)
        if dtype is not None:
            config.dtype = dtype
        if untie:
            config.tie_word_embeddings = False
        config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if isinstance(policy, PeftModel):
        policy.save_pretrained(tmp / "adapter")
    (tmp / "basis_export.json").write_text(json.dumps(metadata or {}, indent=2))
    share_safetensors(tmp, like=tmp / "basis_export.json")
    replaced = out_dir.with_name(f".{out_dir.name}.replaced")
    if replaced.exists():
        shutil.rmtree(replaced)
    if out_dir.exists():
        os.replace(out_dir, replaced)
    os.replace(tmp, out_dir)
    shutil.rmtree(replaced, ignore_errors=True)
    return out_dir
