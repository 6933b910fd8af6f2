"""SGLang rollout engine: `SGLangEngine`, the GPU sibling of `basis.rollout.HFEngine`.

The trainer samples with SGLang and trains with its own copy of the policy, so after every optimizer
step the engine must receive the new weights. One class serves two modes, picked by `server_url`:

- **HTTP** (`server_url="http://host:30000"`): a server started with `python -m sglang.launch_server
  --model-path ...` on the *same host* (tensors travel as CUDA IPC handles, see below).
- **In-process** (`server_url=None`): `sglang.Engine(model_path=..., **engine_kwargs)`, imported lazily.
  It spawns scheduler/detokenizer subprocesses, so a script that builds it must do so under
  `if __name__ == "__main__":`.

Per training step the trainer calls `generate` -> `release_memory` -> (optimizer) -> `resume_memory` ->
`update_weights(policy)`; the engine talks to SGLang 0.5.23 (design.md §6) as follows:

- `update_weights`, full fine-tuning or LoRA `lora_sync="merge"` (default): every parameter is mapped to
  its Hugging Face checkpoint name, **strictly** (SGLang skips unknown names silently, so an unmappable,
  duplicated, missing or mis-shaped tensor is an error raised *before* anything is sent), then pushed in
  buckets of `weight_bucket_bytes` inside `begin_weight_update` / `update_weights_from_tensor` x n /
  `end_weight_update`, then `flush_cache`. LoRA layers are merged on the fly, W + scale * B @ A via
  peft's `get_delta_weight`, without touching the training model. A push that fails half-way still
  ends its session (best effort): SGLang answers every later `begin_weight_update` with HTTP 400 while
  a session is open, so one failed push would otherwise block every later sync of a long-lived server.
- `lora_sync="adapter"`: the LoRA tensors are loaded with `load_lora_adapter_from_tensors` under a
  versioned name (`{adapter_name}-{engine}-v{n}`, `engine` a random tag of this `SGLangEngine`: SGLang
  refuses a name it already holds, and a long-lived server keeps the last adapter of an earlier run,
  e.g. the run a resumed one continues), the previous version is unloaded, and `generate` samples with
  the newest one. The server must run with `--enable-lora --max-lora-rank R --lora-target-modules ...`.
- Verification after each push (`verify`): `"logprobs"` (default) prefills a probe sequence (the first
  prompt + response of the last `generate`) in the engine and compares its prompt log-probs with the
  policy's teacher-forced ones (mean |diff| <= `logprob_tolerance`); `"weights"` reads `verify_tensors`
  pushed tensors back with `get_weights_by_name` (adapter mode: the server checks sha256 checksums of the
  adapter tensors). SGLang 0.5.23 implements `get_weights_by_name` only in some model classes
  (`LlamaForCausalLM` and its subclasses among them, NOT Qwen2/Qwen3; the others answer HTTP 400 "Get
  parameter by name failed"), hence the logprob probe as default. Any mismatch, unreadable weight or
  `success=False` raises `WeightSyncError`, which stops the run.

Deviations and facts checked in SGLang 0.5.23's source:

- Log-probs: SGLang returns `log_softmax(logits / T)` over the full vocabulary (`torch.log(probs)` in
  `Sampler.forward`, before top-k/top-p filtering), i.e. the trainer's log-prob at the sampling
  temperature, as `HFEngine` returns them. Two server settings break the contract: the env var
  `SGLANG_RETURN_ORIGINAL_LOGPROB` (log-probs before temperature; checked in-process, must be unset on
  a server) and greedy batches (`top_k=1`: log-probs at temperature 1), so `top_k=1` with
  `temperature != 1` is rejected.
- Seeds: `SamplingParams.seed` becomes `sampling_seed = seed + i` for prompt i; SGLang only honours it
  when the engine runs with `enable_deterministic_inference` (otherwise sampling is unseeded). There an
  unseeded request gets the seed 42, so every repeat of a prompt would sample the same response: with
  `seed=None` the engine draws a random base seed per call instead.
- Stop strings: `no_stop_trim=True`, so `text` ends with the stop string like `HFEngine`'s.
- Names: transformers-5 models whose in-memory layout differs from their checkpoint (fused MoE
  experts) or quantized checkpoints do not map and are refused; dense HF models (Qwen3, Llama) map 1:1.
- Tensors: `update_weights_from_tensor` over HTTP carries `ForkingPickler` pickles (the bytes of
  SGLang's `MultiprocessingSerializer`), base64-encoded, serialized once per tensor-parallel rank
  (`tp_size`), as SGLang's own `Engine._serialize_tensors_per_rank` does: each rank opens only its own
  copy, and the producer-side reference counts of CUDA IPC handles expect one consumer per pickle.
  CUDA tensors become IPC handles, so the server must share the host and the GPUs. CPU tensors are
  refused over HTTP (`require_cuda_tensors`): a CPU tensor pickles as a file-descriptor handle that the
  receiver must fetch back from the trainer process, authenticated with the trainer's multiprocessing
  auth key, which a separately launched server does not have (it fails with `AuthenticationError`);
  SGLang's own HTTP client likewise says the weights must be on GPU. FSDP2 `DTensor` parameters are
  gathered with `full_tensor()` (a collective). One trainer process drives the engine.
- Start-up: the constructor polls `/health` for up to `startup_timeout_s` while the server answers 503
  (SGLang does while it loads the model) or refuses connections (not listening yet).
- Retries: `/generate` and `/get_weights_by_name` are retried `max_retries` times on a timeout or a
  refused connection, then fail loudly; weight-update routes are never retried (a timed-out push may
  have been applied).

Run: `SGLangEngine(model_path, server_url=...)` from the trainer/harvest configs (`engine: sglang`);
tests: `pytest tests/basis/test_sglang_engine.py` (fake server, CPU) and `make test-sglang` (checks every
request against SGLang's own request classes, in `.venv-sglang`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from multiprocessing.reduction import ForkingPickler
from typing import Any, Literal

import requests
import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import AutoConfig
from transformers.utils import cached_file

from basis.policy_io import full_tensor, merged_lora_weight
from basis.rollout import Completion, FinishReason, SamplingParams

logger = logging.getLogger(__name__)

# Path segments that wrappers insert anywhere in a parameter name (FSDP1, activation checkpointing,
# torch.compile, and peft's `base_layer` around a LoRA-wrapped module).
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "base_layer")
# peft's PeftModel prefix in front of the wrapped model's own names.
PEFT_PREFIX = "base_model.model."
# SGLang finish_reason types -> Completion.finish_reason ("abort" and unfinished results are errors).
_SGLANG_FINISH = {"stop": "stop", "length": "length"}
# Used as the probe when `update_weights` runs before any `generate` gave a real sequence.
_FALLBACK_PROBE_LEN = 32
# Longest probe prefilled for the logprob check.
_MAX_PROBE_LEN = 256
# Rows (2-D) or values (1-D) read back per tensor by `get_weights_by_name`.
_READBACK_ROWS = 4
# What SGLang's `/get_weights_by_name` answers (HTTP 400) where the model cannot read a weight back.
_READBACK_FAILED = "Get parameter by name failed"


class SGLangError(RuntimeError):
    """SGLang refused or failed a request; the message names the route and what it answered."""


class WeightSyncError(SGLangError):
    """A weight push was rejected (`success=False`) or the pushed weights did not verify."""


class UnmappedParameterError(ValueError):
    """A policy parameter has no counterpart in the engine's checkpoint (or the reverse)."""


# --------------------------------------------------------------------------------------------------
# Checkpoint layout: the names SGLang loads, read from the safetensors headers (no tensor data).
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointLayout:
    """Parameter names and shapes of the checkpoint the engine serves, and its embedding tying.

    `expected` is what a full push must cover: every checkpoint tensor, minus `lm_head.weight` when
    the embeddings are tied (SGLang loads `model.embed_tokens.weight` into both).
    """

    shapes: Mapping[str, tuple[int, ...]]
    tie_word_embeddings: bool
    vocab_size: int
    source: str

    @cached_property
    def expected(self) -> frozenset[str]:
        tied = {"lm_head.weight"} if self.tie_word_embeddings else set()
        return frozenset(self.shapes) - tied

    @classmethod
    def from_pretrained(cls, model_path: str) -> CheckpointLayout:
        """Read `config.json` and the safetensors headers of a local folder or a cached hub id."""
        config = AutoConfig.from_pretrained(model_path).get_text_config()
        index = cached_file(
            model_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False
        )
        if index is not None:
            with open(index) as f:
                shard_names = sorted(set(json.load(f)["weight_map"].values()))
            files = [cached_file(model_path, name) for name in shard_names]
        else:
            single = cached_file(model_path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
            if single is None:
                raise ValueError(
                    f"model_path {model_path!r} has no model.safetensors(.index.json); the SGLang engine maps "
                    "parameter names against the safetensors checkpoint it serves"
                )
            files = [single]
        shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        return cls(
            shapes=shapes,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            vocab_size=int(config.vocab_size),
            source=model_path,
        )


# --------------------------------------------------------------------------------------------------
# Name mapping and the push plan (pure: module in, validated plan out; nothing is sent here).
# --------------------------------------------------------------------------------------------------


def hf_parameter_name(
    raw_name: str, layout: CheckpointLayout, module_prefixes: Sequence[str] = ("policy", "model", "module")
) -> str:
    """Map a trainer-side parameter name to the checkpoint name SGLang loads, or raise.

    Wrapper segments (`_fsdp_wrapped_module`, `_checkpoint_wrapped_module`, `_orig_mod`, `base_layer`)
    are removed anywhere; then, while the name is not a checkpoint name, one leading `base_model.model.`
    (peft) or one leading attribute in `module_prefixes` (a LightningModule's `policy.`, DDP's
    `module.`) is stripped. `model.` is tried last-resort only, because `model.layers...` is itself an
    HF name.
    """
    name = ".".join(part for part in raw_name.split(".") if part not in WRAPPER_SEGMENTS)
    expected = layout.expected
    while name not in expected:
        head = name.split(".", 1)[0]
        if name.startswith(PEFT_PREFIX):
            name = name[len(PEFT_PREFIX) :]
        elif head in module_prefixes and "." in name:
            name = name.split(".", 1)[1]
        else:
            if layout.tie_word_embeddings and name == "lm_head.weight":
                raise UnmappedParameterError(
                    f"parameter {raw_name!r} maps to {name!r}, but the checkpoint at {layout.source} ties "
                    "lm_head to model.embed_tokens (SGLang loads the embedding into both); the policy must "
                    "keep them tied (no separate lm_head, no LoRA on lm_head)"
                )
            raise UnmappedParameterError(
                f"parameter {raw_name!r} of the policy has no counterpart in the checkpoint at "
                f"{layout.source} (last candidate {name!r}; stripped wrapper segments {WRAPPER_SEGMENTS}, "
                f"prefix {PEFT_PREFIX!r} and module prefixes {tuple(module_prefixes)}). SGLang would skip it "
                "silently, so the push is refused"
            )
    return name


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a push: where it goes, where it comes from, and how to materialise it."""

    hf_name: str
    source_name: str
    shape: tuple[int, ...]
    nbytes: int
    load: Callable[[], torch.Tensor]


def plan_full_push(
    policy: torch.nn.Module,
    layout: CheckpointLayout,
    module_prefixes: Sequence[str] = ("policy", "model", "module"),
) -> list[PlannedTensor]:
    """Every tensor SGLang must load to serve `policy`, LoRA layers merged, names and shapes validated.

    Raises `UnmappedParameterError` for a name that does not map, two parameters mapping to one name,
    or checkpoint tensors the policy does not provide; `ValueError` for a shape mismatch (e.g. a shard).
    """
    lora_layers = {name: m for name, m in policy.named_modules() if isinstance(m, LoraLayer)}
    adapter_params = {
        f"{layer_name}.{param_name}"
        for layer_name, layer in lora_layers.items()
        for param_name, _ in layer.named_parameters()
        if not param_name.startswith("base_layer.")
    }
    plan: list[PlannedTensor] = []
    sources: dict[str, str] = {}
    for raw_name, param in policy.named_parameters():
        if raw_name in adapter_params:
            continue  # folded into the base weight of its layer below
        owner, _, leaf = raw_name.rpartition(".")
        lora_owner = owner.removesuffix(".base_layer") if owner.endswith(".base_layer") else None
        if lora_owner in lora_layers and leaf == "weight":
            load = partial(merged_lora_weight, lora_layers[lora_owner])
        else:
            load = partial(full_tensor, param)
        hf_name = hf_parameter_name(raw_name, layout, module_prefixes)
        if (
            load.func is merged_lora_weight
            and layout.tie_word_embeddings
            and hf_name.endswith("embed_tokens.weight")
        ):
            raise UnmappedParameterError(
                f"LoRA on {raw_name!r}: the checkpoint at {layout.source} ties lm_head to the embedding, so "
                "SGLang would load the merged embedding into lm_head too while the policy's lm_head stays "
                "unmerged; leave embed_tokens out of the LoRA target modules"
            )
        if hf_name in sources:
            raise UnmappedParameterError(
                f"parameters {sources[hf_name]!r} and {raw_name!r} both map to {hf_name!r}"
            )
        sources[hf_name] = raw_name
        shape = tuple(param.shape)
        if shape != layout.shapes[hf_name]:
            raise ValueError(
                f"parameter {raw_name!r} has shape {shape} but {hf_name!r} in the checkpoint at {layout.source} "
                f"has {layout.shapes[hf_name]} (a sharded parameter? gather it before update_weights)"
            )
        nbytes = param.numel() * param.element_size()
        plan.append(PlannedTensor(hf_name, raw_name, shape, nbytes, load))
    missing = sorted(layout.expected - sources.keys())
    if missing:
        raise UnmappedParameterError(
            f"the policy provides no parameter for {len(missing)} checkpoint tensors of {layout.source}, e.g. "
            f"{missing[:5]}; they would keep stale weights in the engine"
        )
    return plan


def bucket_plan(plan: Sequence[PlannedTensor], bucket_bytes: int) -> Iterator[list[PlannedTensor]]:
    """Split a plan into consecutive buckets of at most `bucket_bytes` (a larger tensor goes alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[PlannedTensor] = []
    size = 0
    for item in plan:
        if bucket and size + item.nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += item.nbytes
    if bucket:
        yield bucket


def lora_adapter_payload(policy: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The active LoRA adapter as SGLang loads it from disk: peft tensor names and `adapter_config.json`."""
    if not isinstance(policy, PeftModel):
        raise ValueError(
            f"lora_sync='adapter' needs the policy as a peft.PeftModel, got {type(policy).__name__}"
        )
    adapter = policy.active_adapter
    config = policy.peft_config[adapter]
    if str(config.peft_type) not in {"LORA", "PeftType.LORA"}:
        raise ValueError(f"adapter {adapter!r} is {config.peft_type}, not LoRA")
    if getattr(config, "use_dora", False) or getattr(config, "modules_to_save", None):
        raise ValueError(
            f"adapter {adapter!r} uses DoRA or modules_to_save, which SGLang's LoRA loader does not take; "
            "use lora_sync='merge'"
        )
    # SGLang scales every adapter by lora_alpha / r and has no LoRA bias (srt/lora/lora.py), so it would
    # serve these adapters with other weights than the policy's, silently.
    ignored = {
        "use_rslora": getattr(config, "use_rslora", False),
        "rank_pattern": getattr(config, "rank_pattern", None),
        "alpha_pattern": getattr(config, "alpha_pattern", None),
        "lora_bias": getattr(config, "lora_bias", False),
    }
    if any(ignored.values()):
        raise ValueError(
            f"adapter {adapter!r} sets {sorted(k for k, v in ignored.items() if v)}, which SGLang 0.5.23's LoRA "
            "loader ignores (it scales every adapter by lora_alpha / r, without bias), so the engine would "
            "sample another policy; use lora_sync='merge'"
        )
    tensors = {
        name: full_tensor(t) for name, t in get_peft_model_state_dict(policy, adapter_name=adapter).items()
    }
    config_dict = json.loads(json.dumps(config.to_dict(), default=_json_default))
    return tensors, config_dict


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"LoRA config value {value!r} ({type(value).__name__}) is not JSON-serialisable")


# --------------------------------------------------------------------------------------------------
# Wire format (pure): request bodies and response parsing, shared by both transports.
# --------------------------------------------------------------------------------------------------


def serialize_tensors(obj: Any) -> str:
    """`MultiprocessingSerializer.serialize(obj, output_str=True)`: a ForkingPickler pickle, base64.

    The pickle holds handles, not data: a CUDA tensor becomes a CUDA IPC handle (the receiver must
    share this host and GPU), a CPU tensor a file-descriptor handle that only a process holding this
    process's multiprocessing auth key can fetch (see `require_cuda_tensors`). Each call hands the
    tensors over once more, so every receiving process needs a pickle of its own.
    """
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def require_cuda_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise unless every tensor is on a CUDA device, before it is pickled for an HTTP server.

    A separately launched server can open CUDA IPC handles of this host's GPUs, but not a CPU tensor's
    handle: unpickling it connects back to this process and must authenticate with this process's
    multiprocessing auth key, which the server does not have, so the push would fail on the server
    with `AuthenticationError` (SGLang's own HTTP client also says the weights must be on GPU).
    """
    for name, tensor in named:
        if tensor.device.type != "cuda":
            raise ValueError(
                f"cannot push {name!r} to the SGLang server over HTTP: it is on {tensor.device}, and only "
                "CUDA tensors reach a separately launched server (as CUDA IPC handles; opening a CPU "
                "tensor's handle needs this process's multiprocessing auth key, which the server lacks). "
                "Move the policy to a GPU of the server's host"
            )


def tensor_checksum(tensor: torch.Tensor) -> str:
    """sha256 of the raw bytes, computed exactly as SGLang's `load_lora_adapter_from_tensors` check."""
    raw = tensor.detach().cpu().contiguous().flatten().view(torch.uint8)  # [numel * itemsize]
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def sampling_params_payload(params: SamplingParams, seed: int | None = None) -> dict[str, Any]:
    """SGLang `sampling_params` for one request (top_k 0 -> -1; `sampling_seed`, not `seed`)."""
    if params.top_k == 1 and params.temperature != 1.0:
        raise ValueError(
            f"top_k=1 makes SGLang sample greedily and return log-probs at temperature 1, not at "
            f"temperature={params.temperature}; use temperature=1.0 with top_k=1"
        )
    payload: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "no_stop_trim": True,
        "skip_special_tokens": True,
        # SGLang fills unset options from the model's generation_config.json: sample with exactly these
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
    }
    if params.stop:
        payload["stop"] = list(params.stop)
    if seed is not None:
        payload["sampling_seed"] = seed
    return payload


def generate_request(
    prompts: Sequence[Sequence[int]], params: SamplingParams, lora_name: str | None = None
) -> dict[str, Any]:
    """Body of `/generate` (and kwargs of `sglang.Engine.generate`) for a batch of token-id prompts."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    # Deterministic SGLang gives every request without sampling_seed the seed 42 (identical repeats)
    base = params.seed if params.seed is not None else secrets.randbelow(2**31)
    seeds = [base + i for i in range(len(prompts))]
    body: dict[str, Any] = {
        "input_ids": [[int(t) for t in prompt] for prompt in prompts],
        "sampling_params": [sampling_params_payload(params, seed) for seed in seeds],
        "return_logprob": True,
    }
    if lora_name is not None:
        body["lora_path"] = [lora_name] * len(prompts)
    return body


def probe_request(token_ids: Sequence[int], lora_name: str | None = None) -> dict[str, Any]:
    """Body of the prefill-only `/generate` that returns the log-prob of every probe token."""
    body: dict[str, Any] = {
        "input_ids": [int(t) for t in token_ids],
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    if lora_name is not None:
        body["lora_path"] = lora_name
    return body


def parse_completion(item: Mapping[str, Any], index: int) -> Completion:
    """One `/generate` result -> `Completion`; raises `SGLangError` on an abort or a malformed answer."""
    meta = item["meta_info"]
    reason = meta.get("finish_reason")
    if not isinstance(reason, Mapping) or reason.get("type") not in _SGLANG_FINISH:
        detail = reason.get("message") if isinstance(reason, Mapping) else reason
        raise SGLangError(f"/generate did not finish request {index}: finish_reason={reason!r} ({detail})")
    token_ids = [int(t) for t in item["output_ids"]]
    triples = meta["output_token_logprobs"]
    if [int(t[1]) for t in triples] != token_ids:
        raise SGLangError(
            f"/generate request {index}: output_token_logprobs cover tokens {[t[1] for t in triples][:8]}... "
            f"but output_ids are {token_ids[:8]}... ({len(triples)} vs {len(token_ids)})"
        )
    finish: FinishReason = _SGLANG_FINISH[reason["type"]]  # type: ignore[assignment]
    return Completion(
        token_ids=token_ids,
        logprobs=[float(t[0]) for t in triples],
        text=item["text"],
        finish_reason=finish,
    )


def parse_generate_response(answer: Any, n_prompts: int) -> list[Completion]:
    """`/generate` answer for a batch (a list of results, one per prompt, in order)."""
    items = answer if isinstance(answer, list) else [answer]
    if len(items) != n_prompts:
        raise SGLangError(f"/generate returned {len(items)} results for {n_prompts} prompts")
    return [parse_completion(item, i) for i, item in enumerate(items)]


def parse_prompt_logprobs(answer: Any, token_ids: Sequence[int], vocab_size: int) -> list[float]:
    """Log-probs of `token_ids[1:]` from a `probe_request` answer (SGLang gives the first one as null).

    SGLang reports ids >= vocab_size - 1 as 0 in `input_token_logprobs` (its "clip padded hash values"
    step); those positions are accepted as matching.
    """
    item = answer[0] if isinstance(answer, list) else answer
    triples = item["meta_info"]["input_token_logprobs"]
    reported = [int(t[1]) for t in triples]
    aligned = len(reported) == len(token_ids) and all(
        got == want or (got == 0 and want >= vocab_size - 1) for got, want in zip(reported, token_ids)
    )
    if not aligned:
        raise SGLangError(
            f"/generate probe returned input_token_logprobs for tokens {reported[:8]}... ({len(reported)}), "
            f"expected the {len(token_ids)} probe tokens {list(token_ids[:8])}..."
        )
    return [float(t[0]) for t in triples[1:]]


# --------------------------------------------------------------------------------------------------
# Transports: the same calls over HTTP or to an in-process `sglang.Engine`.
# --------------------------------------------------------------------------------------------------


class _HTTPTransport:
    """Calls the routes of `python -m sglang.launch_server` with `requests`."""

    def __init__(
        self,
        server_url: str,
        timeout_s: float,
        max_retries: int,
        retry_backoff_s: float,
        tp_size: int,
        startup_timeout_s: float,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.tp_size = tp_size
        self.startup_timeout_s = startup_timeout_s
        self.session = requests.Session()

    def _request(
        self, method: str, route: str, body: Any = None, *, retry: bool, accept: tuple[int, ...] = (200,)
    ) -> requests.Response:
        """Send one request (retried on a timeout or a refused connection when `retry`); an answer whose
        status is not in `accept` raises `SGLangError`."""
        url = f"{self.server_url}{route}"
        attempts = self.max_retries + 1 if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                response = self.session.request(method, url, json=body, timeout=self.timeout_s)
            except (requests.Timeout, requests.ConnectionError) as err:
                kind = "timed out" if isinstance(err, requests.Timeout) else "could not connect"
                if attempt == attempts:
                    raise SGLangError(
                        f"{method} {route} on {self.server_url} {kind} ({attempts} attempt(s), timeout "
                        f"{self.timeout_s}s): {err}"
                    ) from err
                logger.warning("%s %s %s (attempt %d/%d); retrying", method, route, kind, attempt, attempts)
                time.sleep(self.retry_backoff_s)
                continue
            if response.status_code not in accept:
                raise self._status_error(method, route, response)
            return response
        raise AssertionError("unreachable")

    def _status_error(self, method: str, route: str, response: requests.Response) -> SGLangError:
        return SGLangError(
            f"{method} {route} on {self.server_url} answered HTTP {response.status_code}: {response.text[:500]}"
        )

    def _expect_success(self, route: str, body: Any) -> None:
        try:
            answer = self._request("POST", route, body, retry=False).json()
        except SGLangError as err:
            raise WeightSyncError(str(err)) from err
        if not answer.get("success", False):
            message = answer.get("message") or answer.get("error_message")
            raise WeightSyncError(f"POST {route} returned success=False: {message}")

    def wait_until_healthy(self) -> None:
        """Poll `/health` until it answers 200. SGLang answers 503 while it loads the model and refuses
        connections before it listens, so an engine created right after launching the server waits
        (up to `startup_timeout_s`) instead of failing on its first request."""
        deadline = time.monotonic() + self.startup_timeout_s
        waiting_logged = False
        while True:
            try:
                response = self.session.get(f"{self.server_url}/health", timeout=self.timeout_s)
            except (requests.Timeout, requests.ConnectionError) as err:
                state = f"could not connect ({err})"
            else:
                if response.status_code == 200:
                    return
                if response.status_code != 503:
                    raise self._status_error("GET", "/health", response)
                state = "answered HTTP 503 (the server is still starting)"
            if time.monotonic() >= deadline:
                raise SGLangError(
                    f"SGLang server at {self.server_url} was not ready within startup_timeout_s="
                    f"{self.startup_timeout_s}s: GET /health {state}. Is `python -m sglang.launch_server` "
                    "running on that URL, and did it finish loading the model?"
                )
            if not waiting_logged:
                logger.info(
                    "SGLang server at %s not ready yet: GET /health %s; waiting", self.server_url, state
                )
                waiting_logged = True
            time.sleep(self.retry_backoff_s)

    def generate(self, body: dict[str, Any]) -> Any:
        return self._request("POST", "/generate", body, retry=True).json()

    def begin_weight_update(self) -> None:
        self._expect_success("/begin_weight_update", {})

    def end_weight_update(self) -> None:
        self._expect_success("/end_weight_update", {})

    def update_weights_from_tensor(self, named: list[tuple[str, torch.Tensor]]) -> None:
        require_cuda_tensors(named)
        body = {"serialized_named_tensors": self._per_rank_payloads(named), "flush_cache": False}
        self._expect_success("/update_weights_from_tensor", body)

    def _per_rank_payloads(self, obj: Any) -> list[str]:
        """One serialization per tensor-parallel rank (SGLang's `Engine._serialize_tensors_per_rank`):
        rank r opens only payload r, and each CUDA IPC hand-over is reference-counted on this side for
        exactly one consumer, so one pickle sent to every rank would be opened `tp_size` times."""
        return [serialize_tensors(obj) for _ in range(self.tp_size)]

    def flush_cache(self) -> None:
        self._request("POST", "/flush_cache", retry=False)

    def release_memory(self, tags: list[str] | None) -> None:
        self._request("POST", "/release_memory_occupation", {"tags": tags} if tags else {}, retry=False)

    def resume_memory(self, tags: list[str] | None) -> None:
        self._request("POST", "/resume_memory_occupation", {"tags": tags} if tags else {}, retry=False)

    def get_weights_by_name(self, name: str, truncate_size: int) -> Any:
        """The first rows of `name`, or None where the server cannot read it back, as
        `sglang.Engine.get_weights_by_name` returns; the HTTP route turns that None into HTTP 400
        "Get parameter by name failed"."""
        body = {"name": name, "truncate_size": truncate_size}
        response = self._request("POST", "/get_weights_by_name", body, retry=True, accept=(200, 400))
        if response.status_code == 400:
            if _READBACK_FAILED in response.text:
                return None
            raise self._status_error("POST", "/get_weights_by_name", response)
        return response.json()

    def load_lora_adapter(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        config: dict[str, Any],
        checksums: dict[str, str] | None,
    ) -> None:
        require_cuda_tensors(tensors.items())
        body: dict[str, Any] = {
            "lora_name": name,
            "config_dict": config,
            "serialized_named_tensors": self._per_rank_payloads(tensors),
        }
        if checksums is not None:
            body["expected_checksums"] = checksums
        self._expect_success("/load_lora_adapter_from_tensors", body)

    def unload_lora_adapter(self, name: str) -> None:
        self._expect_success("/unload_lora_adapter", {"lora_name": name})

    def close(self) -> None:
        self.session.close()


class _InProcessTransport:
    """Calls the methods of an in-process `sglang.Engine` (no retries: nothing can time out here)."""

    def __init__(self, model_path: str, tokenizer_path: str | None, engine_kwargs: dict[str, Any]) -> None:
        if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in {"1", "true", "yes"}:
            raise ValueError(
                "SGLANG_RETURN_ORIGINAL_LOGPROB is set: SGLang would return log-probs before temperature "
                "scaling, not comparable to the trainer's; unset it"
            )
        import sglang  # lazy: a GPU-only dependency (the `sglang` extra)

        kwargs = {"model_path": model_path, **engine_kwargs}
        if tokenizer_path is not None:
            kwargs["tokenizer_path"] = tokenizer_path
        self.engine = sglang.Engine(**kwargs)

    @staticmethod
    def _check(route: str, result: Any) -> None:
        if isinstance(result, tuple):
            success, message = result[0], result[1]
        else:
            success = result.success
            message = getattr(result, "message", None) or getattr(result, "error_message", None)
        if not success:
            raise WeightSyncError(f"sglang.Engine.{route} returned success=False: {message}")

    def wait_until_healthy(self) -> None:
        """The engine is up once its constructor returned."""

    def generate(self, body: dict[str, Any]) -> Any:
        return self.engine.generate(**body)

    def begin_weight_update(self) -> None:
        self._check("begin_weight_update", self.engine.begin_weight_update())

    def end_weight_update(self) -> None:
        self._check("end_weight_update", self.engine.end_weight_update())

    def update_weights_from_tensor(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self._check(
            "update_weights_from_tensor", self.engine.update_weights_from_tensor(named, flush_cache=False)
        )

    def flush_cache(self) -> None:
        self._check("flush_cache", self.engine.flush_cache())

    def release_memory(self, tags: list[str] | None) -> None:
        self.engine.release_memory_occupation(tags=tags)

    def resume_memory(self, tags: list[str] | None) -> None:
        self.engine.resume_memory_occupation(tags=tags)

    def get_weights_by_name(self, name: str, truncate_size: int) -> Any:
        return self.engine.get_weights_by_name(name, truncate_size)

    def load_lora_adapter(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        config: dict[str, Any],
        checksums: dict[str, str] | None,
    ) -> None:
        if checksums is not None:
            raise ValueError(
                "sglang.Engine.load_lora_adapter_from_tensors takes no checksums; verify with logprobs"
            )
        self._check(
            "load_lora_adapter_from_tensors",
            self.engine.load_lora_adapter_from_tensors(name, tensors, config),
        )

    def unload_lora_adapter(self, name: str) -> None:
        self._check("unload_lora_adapter", self.engine.unload_lora_adapter(name))

    def close(self) -> None:
        self.engine.shutdown()


# --------------------------------------------------------------------------------------------------
# The engine.
# --------------------------------------------------------------------------------------------------


class SGLangEngine:
    """`RolloutEngine` backed by SGLang 0.5.23, over HTTP or in-process (see the module docstring).

    Args:
        model_path: The checkpoint the engine serves (local folder or hub id). Parameter names and shapes
            are read from its safetensors headers to map the policy's names strictly; an HTTP server
            must have been launched with the same checkpoint.
        tokenizer_path: In-process only: tokenizer folder if it differs from `model_path`.
        server_url: URL of a running `python -m sglang.launch_server` on this host; None starts
            `sglang.Engine` in this process (create it under `if __name__ == "__main__":`).
        lora_sync: For a `peft.PeftModel` policy: "merge" pushes merged full weights (works with any
            server), "adapter" loads the LoRA tensors as a versioned adapter (server needs `--enable-lora`).
        adapter_name: Stem of the versioned adapter names (`{adapter_name}-{engine}-v{n}`, `engine` a
            random tag per `SGLangEngine`, so a restarted run never reuses a name the server still holds).
        weight_bucket_bytes: Most bytes per `update_weights_from_tensor` call (a larger tensor goes alone).
        verify: After each push: "logprobs" (probe prefill vs the policy's teacher-forced log-probs),
            "weights" (`get_weights_by_name` read-back; adapter mode: server-side sha256, HTTP only), "none".
        verify_tensors: How many pushed tensors "weights" reads back (spread over the model, rotating).
        weight_rtol: Relative tolerance of the read-back (bf16 rounding is ~4e-3).
        logprob_tolerance: Largest mean |engine - policy| log-prob over the probe tokens.
        request_timeout_s: HTTP timeout of one request (a whole `/generate` batch), seconds.
        max_retries: Extra attempts of `/generate` and `/get_weights_by_name` after a timeout or a refused
            connection; then the call raises `SGLangError`.
        retry_backoff_s: Pause between those attempts, and between `/health` polls at start-up, seconds.
        startup_timeout_s: HTTP only: how long the constructor waits for `/health` to answer 200 while
            the server answers 503 (SGLang does while it loads the model) or refuses connections, seconds.
        tp_size: HTTP only: the server's tensor-parallel size (the tensors are serialized once per rank).
        module_prefixes: Leading attribute names the caller may wrap the HF model in (stripped from
            parameter names, see `hf_parameter_name`).
        engine_kwargs: In-process only: `sglang.Engine` server arguments, e.g. `{"mem_fraction_static":
            0.5, "enable_memory_saver": True}` (needed by `release_memory`), `{"enable_lora": True,
            "max_lora_rank": 16, "lora_target_modules": [...]}` for adapter sync.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer_path: str | None = None,
        server_url: str | None = None,
        lora_sync: Literal["merge", "adapter"] = "merge",
        adapter_name: str = "policy",
        weight_bucket_bytes: int = 512 * 1024**2,
        verify: Literal["logprobs", "weights", "none"] = "logprobs",
        verify_tensors: int = 4,
        weight_rtol: float = 1e-2,
        logprob_tolerance: float = 0.1,
        request_timeout_s: float = 600.0,
        max_retries: int = 3,
        retry_backoff_s: float = 2.0,
        startup_timeout_s: float = 300.0,
        tp_size: int = 1,
        module_prefixes: Sequence[str] = ("policy", "model", "module"),
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if lora_sync not in ("merge", "adapter"):
            raise ValueError(f"lora_sync must be 'merge' or 'adapter', got {lora_sync!r}")
        if verify not in ("logprobs", "weights", "none"):
            raise ValueError(f"verify must be 'logprobs', 'weights' or 'none', got {verify!r}")
        if weight_bucket_bytes < 1:
            raise ValueError(f"weight_bucket_bytes must be >= 1, got {weight_bucket_bytes}")
        if verify_tensors < 1:
            raise ValueError(f"verify_tensors must be >= 1, got {verify_tensors}")
        if not weight_rtol > 0 or not logprob_tolerance > 0:
            raise ValueError(
                f"tolerances must be > 0, got weight_rtol={weight_rtol}, logprob_tolerance={logprob_tolerance}"
            )
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
        if max_retries < 0 or retry_backoff_s < 0:
            raise ValueError(
                f"max_retries and retry_backoff_s must be >= 0, got {max_retries}, {retry_backoff_s}"
            )
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        if server_url is not None and (engine_kwargs or tokenizer_path is not None):
            raise ValueError(
                "engine_kwargs and tokenizer_path configure the in-process sglang.Engine; with server_url they "
                "belong on the `python -m sglang.launch_server` command line"
            )
        if server_url is None and tp_size != 1:
            raise ValueError(
                "tp_size is for server_url mode; in-process, pass engine_kwargs={'tp_size': ...}"
            )
        if server_url is None and lora_sync == "adapter" and verify == "weights":
            raise ValueError(
                "verify='weights' in adapter mode relies on the server's sha256 check, which only the HTTP "
                "route takes; use verify='logprobs' with the in-process engine"
            )
        self.model_path = model_path
        self.lora_sync = lora_sync
        self.adapter_name = adapter_name
        self._adapter_stem = f"{adapter_name}-{secrets.token_hex(4)}"  # unique per engine, see lora_sync
        self.weight_bucket_bytes = weight_bucket_bytes
        self.verify = verify
        self.verify_tensors = verify_tensors
        self.weight_rtol = weight_rtol
        self.logprob_tolerance = logprob_tolerance
        self.module_prefixes = tuple(module_prefixes)
        self.layout = CheckpointLayout.from_pretrained(model_path)
        self.version = 0  # pushes so far
        self.lora_name: str | None = None  # adapter generate() samples with (adapter mode)
        self._probe: list[int] | None = None  # first prompt + response of the last generate()
        self._pushed: list[PlannedTensor] | None = None  # plan of the last full push
        self._transport: _HTTPTransport | _InProcessTransport
        if server_url is not None:
            self._transport = _HTTPTransport(
                server_url, request_timeout_s, max_retries, retry_backoff_s, tp_size, startup_timeout_s
            )
        else:
            self._transport = _InProcessTransport(model_path, tokenizer_path, dict(engine_kwargs or {}))
        self._transport.wait_until_healthy()

    # -- RolloutEngine ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Sample one completion per prompt; log-probs are full-vocabulary at the sampling temperature."""
        if len(prompts) == 0:
            return []
        body = generate_request(prompts, params, self.lora_name)
        completions = parse_generate_response(self._transport.generate(body), len(prompts))
        self._probe = (list(prompts[0]) + completions[0].token_ids)[:_MAX_PROBE_LEN]
        return completions

    def update_weights(self, policy: torch.nn.Module) -> None:
        """Push `policy`'s current weights (or LoRA adapter) and verify them; raises `WeightSyncError`."""
        if self.lora_sync == "adapter":
            self._push_adapter(policy)
        else:
            self._push_full(policy)
        self.version += 1
        if self.verify == "logprobs":
            self._verify_logprobs(policy)
        elif self.verify == "weights" and self._pushed is not None:
            self._verify_readback(self._pushed)  # adapter mode: the server checked sha256 on load

    def release_memory(self) -> None:
        """Free the engine's GPU memory; needs `enable_memory_saver` on the engine. Merge sync frees
        weights and KV cache (every update re-sends all weights); adapter sync frees only the KV
        cache, because SGLang throws released weights away (unless `enable_weights_cpu_backup`) and
        an adapter update re-sends only the LoRA tensors."""
        self._transport.release_memory(self._memory_tags)

    def resume_memory(self) -> None:
        """Re-allocate what `release_memory` freed, before `update_weights` / `generate`."""
        self._transport.resume_memory(self._memory_tags)

    @property
    def _memory_tags(self) -> list[str] | None:
        return ["kv_cache"] if self.lora_sync == "adapter" else None  # None: all of it

    def close(self) -> None:
        """Close the HTTP session, or shut the in-process engine and its subprocesses down."""
        self._transport.close()

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- weight sync steps -----------------------------------------------------------------------

    def _push_full(self, policy: torch.nn.Module) -> None:
        plan = plan_full_push(policy, self.layout, self.module_prefixes)  # validates before sending
        self._pushed = plan
        self._transport.begin_weight_update()
        try:
            for bucket in bucket_plan(plan, self.weight_bucket_bytes):
                self._transport.update_weights_from_tensor([(item.hf_name, item.load()) for item in bucket])
        except BaseException:
            # SGLang refuses every later begin_weight_update while this session is open, so end it
            # even though the push failed; the push's own error is the one raised.
            self._end_session_after_failure()
            raise
        self._transport.end_weight_update()
        self._transport.flush_cache()

    def _end_session_after_failure(self) -> None:
        """Best effort: a failure to end the session is logged, not raised over the push's error."""
        try:
            self._transport.end_weight_update()
        except Exception as err:
            logger.warning("could not end the weight-update session after a failed push: %s", err)

    def _push_adapter(self, policy: torch.nn.Module) -> None:
        tensors, config = lora_adapter_payload(policy)  # raises unless policy is a PeftModel
        self._pushed = None
        checksums = (
            {name: tensor_checksum(t) for name, t in tensors.items()} if self.verify == "weights" else None
        )
        name = f"{self._adapter_stem}-v{self.version + 1}"
        self._transport.load_lora_adapter(name, tensors, config, checksums)
        previous, self.lora_name = self.lora_name, name
        if previous is not None:
            self._transport.unload_lora_adapter(previous)

    # -- verification ----------------------------------------------------------------------------

    def _verify_readback(self, plan: Sequence[PlannedTensor]) -> None:
        """Read back `verify_tensors` pushed tensors (spread over the plan, shifted every version)."""
        count = min(self.verify_tensors, len(plan))
        picks = sorted({(i * len(plan) // count + self.version) % len(plan) for i in range(count)})
        for index in picks:
            item = plan[index]
            answer = self._transport.get_weights_by_name(item.hf_name, _READBACK_ROWS)
            if answer is None:
                raise WeightSyncError(
                    f"verify='weights' is not supported for this model: the engine could not read "
                    f"{item.hf_name!r} back (HTTP 400 {_READBACK_FAILED!r}; in-process: None). SGLang "
                    "reads weights back only for model classes that implement get_weights_by_name (in "
                    "0.5.23 e.g. LlamaForCausalLM, not Qwen2/Qwen3); use verify='logprobs'"
                )
            want = item.load()[:_READBACK_ROWS].detach().float().cpu()  # [rows, ...]
            got = torch.tensor(answer, dtype=torch.float32)  # [rows, ...]
            if got.shape != want.shape or not torch.allclose(got, want, rtol=self.weight_rtol, atol=1e-5):
                diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
                raise WeightSyncError(
                    f"weight push {self.version} did not take: engine tensor {item.hf_name!r} (from "
                    f"{item.source_name!r}) differs from the policy (shape {tuple(got.shape)} vs "
                    f"{tuple(want.shape)}, max |diff| {diff:.3g}, rtol {self.weight_rtol})"
                )

    @torch.no_grad()
    def _verify_logprobs(self, policy: torch.nn.Module) -> None:
        """Prefill the probe in the engine and compare with the policy's teacher-forced log-probs."""
        probe = self._probe or [1 + i % (self.layout.vocab_size - 1) for i in range(_FALLBACK_PROBE_LEN)]
        answer = self._transport.generate(probe_request(probe, self.lora_name))
        engine_lp = torch.tensor(parse_prompt_logprobs(answer, probe, self.layout.vocab_size))  # [T-1]
        device = next(policy.parameters()).device
        ids = torch.tensor([probe], device=device)  # [1, T]
        was_training = policy.training
        policy.eval()
        try:
            logits = policy(input_ids=ids).logits.float()  # [1, T, V]
        finally:
            policy.train(was_training)
        policy_lp = (
            torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        )  # [T-1]
        gap = (engine_lp - policy_lp.cpu()).abs().mean().item()
        if not gap <= self.logprob_tolerance:
            raise WeightSyncError(
                f"weight push {self.version} did not take: the engine's log-probs of a {len(probe)}-token probe "
                f"differ from the policy's by {gap:.4f} on average (tolerance {self.logprob_tolerance})"
            )
