"""Contract checks of `basis.sglang_engine` against the real SGLang 0.5.23 (`make test-sglang`, CPU).

SGLang cannot serve a model without CUDA, so its `TokenizerManager` (the front of the GPU scheduler) is
replaced by `RecordingTokenizerManager`. Everything in front of it is SGLang's own code, served by
uvicorn: the FastAPI app of `sglang.srt.entrypoints.http_server` with its routes, the pydantic parsing
of every body into SGLang's request classes (`GenerateReqInput`, `UpdateWeightsFromTensorReqInput`, ...),
the `/generate` JSON contract gate, and the response serialisation. The recorder then checks what
arrived with SGLang's own code: `MultiprocessingSerializer.deserialize` (its restricted unpickler) for
tensors, one serialization per TP rank, `SamplingParams(...).verify` for sampling parameters,
`TpModelWorker`'s sha256 check and `LoRAConfig.from_dict` for adapters, and that no body carries a
field SGLang would silently ignore. `SGLangEngine` runs unchanged against it over HTTP, so these are
the exact requests it sends, except that its CUDA-only check for pushed tensors is lifted: the
recorder unpickles in this process, where CPU tensors' handles open (a real server's would not).
"""

from __future__ import annotations

import dataclasses
import inspect
import socket
import threading
import time
import types
from typing import Any

import msgspec
import pytest
import sglang
import torch
import uvicorn
from peft import LoraConfig, get_peft_model
from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX
from sglang.srt.entrypoints import http_server
from sglang.srt.layers.utils import get_layer_id
from sglang.srt.lora.lora_config import LoRAConfig
from sglang.srt.lora.lora_registry import LoRARef
from sglang.srt.managers import io_struct
from sglang.srt.managers.schedule_batch import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_MATCHED_STR,
    FINISH_MATCHED_TOKEN,
)
from sglang.srt.managers.tokenizer_manager import ServerStatus, TokenizerManager
from sglang.srt.managers.tp_worker import TpModelWorker
from sglang.srt.runtime_context import get_parallel
from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import MultiprocessingSerializer
from sglang.srt.utils.common import normalize_serialized_named_tensor_payloads
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from basis.rollout import SamplingParams
from basis.sglang_engine import (
    SGLangEngine,
    SGLangError,
    WeightSyncError,
    generate_request,
    parse_completion,
    plan_full_push,
    probe_request,
    sampling_params_payload,
    serialize_tensors,
)

GENERATE_FIELDS = {f.name for f in dataclasses.fields(io_struct.GenerateReqInput)}
SAMPLING_FIELDS = {f.name for f in msgspec.structs.fields(SGLangSamplingParams)}


def struct_fields(cls: type) -> set[str]:
    return {f.name for f in msgspec.structs.fields(cls)}


class RecordingTokenizerManager:
    """Stand-in for SGLang's TokenizerManager behind SGLang's real HTTP app; records and checks requests.

    Generation answers are shaped with SGLang's own pieces (finish-reason classes,
    `TokenizerManager.detokenize_logprob_tokens`); prompt log-probs come from `reference`, a real model.
    """

    is_generation = True
    gracefully_exit = False

    def __init__(self, reference: torch.nn.Module, vocab_size: int) -> None:
        self.reference = reference
        self.vocab_size = vocab_size
        self.server_status = ServerStatus.Up
        self.last_receive_tstamp = 0.0
        self.calls: list[tuple[str, Any]] = []
        self.violations: list[str] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}
        self.session_open = False
        self.tp_size = 1  # tensor payloads expected per request, one per TP rank
        self.readback_supported = True  # False: answer get_weights_by_name as for SGLang's Qwen3 (None)

    async def _record(self, route: str, obj: Any, request: Any) -> None:
        """Record a parsed request and flag raw JSON keys that SGLang's class does not have."""
        self.calls.append((route, obj))
        if request is None:
            return
        body = await request.json()
        known = GENERATE_FIELDS if isinstance(obj, io_struct.GenerateReqInput) else struct_fields(type(obj))
        unknown = set(body) - known if isinstance(body, dict) else set()
        if unknown:
            self.violations.append(f"{route}: fields {sorted(unknown)} are not in {type(obj).__name__}")

    def _tensors(self, payloads: list[Any]) -> Any:
        """What SGLang's TP workers do with the payloads: rank r opens only payload r
        (`TpModelWorker.deserialize_own_rank`); returns rank 0's tensors. Flags a payload count other
        than `tp_size` and one serialization repeated across ranks: SGLang serializes once per rank
        (`Engine._serialize_tensors_per_rank`), and a CPU tensor's pickle differs every time it is made."""
        per_rank = normalize_serialized_named_tensor_payloads(payloads)
        if len(per_rank) != self.tp_size:
            self.violations.append(f"{len(per_rank)} tensor payloads for tp_size={self.tp_size}")
        if len(set(per_rank)) != len(per_rank):
            self.violations.append("one tensor serialization is repeated across the TP ranks")
        opened = [MultiprocessingSerializer.deserialize(payload) for payload in dict.fromkeys(per_rank)]
        return opened[0]

    # -- generation --------------------------------------------------------------------------------

    async def generate_request(self, obj: io_struct.GenerateReqInput, request: Any = None):
        if isinstance(obj.rid, str) and obj.rid.startswith(HEALTH_CHECK_RID_PREFIX):
            self.last_receive_tstamp = time.time()
            yield {}
            return
        await self._record("generate", obj, request)
        params = obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params]
        for sp in params:
            if set(sp) - SAMPLING_FIELDS:
                self.violations.append(
                    f"generate: sampling fields {sorted(set(sp) - SAMPLING_FIELDS)} unknown"
                )
            SGLangSamplingParams(**sp).verify(self.vocab_size)
        obj.normalize_batch_and_arguments()
        batch = not obj.is_single
        prompts = obj.input_ids if batch else [obj.input_ids]
        results = [self._result(prompt, obj.logprob_start_len) for prompt in prompts]
        yield results if batch else results[0]

    @torch.no_grad()
    def _result(self, prompt: list[int], logprob_start_len: Any) -> dict[str, Any]:
        output = [prompt[-1], prompt[0]]
        triples = TokenizerManager.detokenize_logprob_tokens(None, [-0.25, -0.5], output, False)
        meta = {
            "id": "contract",
            "finish_reason": FINISH_LENGTH(len(output)).to_json(),
            "prompt_tokens": len(prompt),
            "output_token_logprobs": triples,
        }
        start = logprob_start_len[0] if isinstance(logprob_start_len, list) else logprob_start_len
        if start == 0:
            logits = self.reference(input_ids=torch.tensor([prompt])).logits[0, :-1].float()  # [P-1, V]
            picked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1)
            meta["input_token_logprobs"] = TokenizerManager.detokenize_logprob_tokens(
                None, [None, *picked.tolist()], prompt, False
            )
        return {"text": "xy", "output_ids": output, "meta_info": meta}

    # -- weights -----------------------------------------------------------------------------------

    async def begin_weight_update(self, obj: Any, request: Any = None) -> tuple[bool, str]:
        await self._record("begin_weight_update", obj, request)
        if self.session_open:  # as SGLang's WeightUpdater; the route answers HTTP 400
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session_open = True
        return True, "Success"

    async def update_weights_from_tensor(self, obj: Any, request: Any = None) -> tuple[bool, str]:
        await self._record("update_weights_from_tensor", obj, request)
        if not self.session_open:
            return False, "update_weights_from_tensor must run between begin/end"
        for name, tensor in self._tensors(obj.serialized_named_tensors):
            self.weights[name] = tensor.clone()
        return True, "Success"

    async def end_weight_update(self, obj: Any, request: Any = None) -> tuple[bool, str]:
        await self._record("end_weight_update", obj, request)
        if not self.session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session_open = False
        return True, "Success"

    async def flush_cache(self, timeout_s: float | None = None) -> io_struct.FlushCacheReqOutput:
        self.calls.append(("flush_cache", timeout_s))
        return io_struct.FlushCacheReqOutput(success=True)

    async def get_weights_by_name(self, obj: Any, request: Any = None) -> list | None:
        await self._record("get_weights_by_name", obj, request)
        if not self.readback_supported:
            return None  # SGLang's model runner for a model class without get_weights_by_name
        return self.weights[obj.name].float()[: obj.truncate_size].tolist()  # as LlamaForCausalLM does

    async def release_memory_occupation(self, obj: Any, request: Any = None) -> None:
        await self._record("release_memory_occupation", obj, request)

    async def resume_memory_occupation(self, obj: Any, request: Any = None) -> None:
        await self._record("resume_memory_occupation", obj, request)

    # -- LoRA --------------------------------------------------------------------------------------

    async def load_lora_adapter_from_tensors(
        self, obj: Any, request: Any = None
    ) -> io_struct.LoRAUpdateOutput:
        await self._record("load_lora_adapter_from_tensors", obj, request)
        obj.lora_id = LoRARef(
            lora_name=obj.lora_name, lora_path="__tensor__", pinned=obj.pinned
        ).lora_id  # as TokenizerManager
        loaded: dict[str, Any] = {}

        def model_runner_load(ref: Any, tensors: dict, config_dict: dict, added_tokens: Any) -> Any:
            LoRAConfig.from_dict(config_dict, added_tokens, base_vocab_size=self.vocab_size)
            for name in tensors:
                if get_layer_id(name) is None:
                    raise ValueError(f"adapter tensor {name!r} has no layer id")
            loaded.update(tensors)
            return io_struct.LoRAUpdateOutput(success=True)

        worker = types.SimpleNamespace(
            deserialize_own_rank=self._tensors,
            model_runner=types.SimpleNamespace(load_lora_adapter_from_tensors=model_runner_load),
        )
        try:  # SGLang's own TpModelWorker code: sha256 check of expected_checksums, then load (as rank 0)
            with get_parallel().override(tp_rank=0):
                result = TpModelWorker.load_lora_adapter_from_tensors(worker, obj)
        except RuntimeError as err:
            return io_struct.LoRAUpdateOutput(success=False, error_message=str(err))
        self.adapters[obj.lora_name] = loaded
        return result

    async def unload_lora_adapter(self, obj: Any, request: Any = None) -> io_struct.LoRAUpdateOutput:
        await self._record("unload_lora_adapter", obj, request)
        if self.adapters.pop(obj.lora_name, None) is None:
            return io_struct.LoRAUpdateOutput(success=False, error_message=f"{obj.lora_name} not loaded")
        return io_struct.LoRAUpdateOutput(success=True)


@pytest.fixture(scope="module")
def tiny_lm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Qwen3 (tied embeddings) saved with `save_pretrained`; shadows the root fixture, whose
    builder pulls in project dependencies this environment does not install."""
    config = Qwen3Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_qwen3")
    Qwen3ForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def policy(tiny_lm_path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.float32).eval()


@pytest.fixture
def sglang_app(policy: torch.nn.Module, monkeypatch: pytest.MonkeyPatch):
    """SGLang's real HTTP app on a free port, in front of a RecordingTokenizerManager.

    `/health` answers from the server status only (SGLang's env switch): its default one-token generation
    reads the scheduler's published runtime config, which only exists when a GPU scheduler started.
    """
    monkeypatch.setenv("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "false")
    monkeypatch.setattr("basis.sglang_engine.require_cuda_tensors", lambda named: None)  # CPU-only here
    manager = RecordingTokenizerManager(policy, policy.config.vocab_size)
    http_server.set_global_state(http_server._GlobalState(manager, None, {}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(http_server.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", manager
    server.should_exit = True
    thread.join(timeout=10)


def engine(url: str, path: str, **kwargs: Any) -> SGLangEngine:
    return SGLangEngine(path, server_url=url, request_timeout_s=60, weight_bucket_bytes=64 * 1024, **kwargs)


def test_full_step_requests_parse_into_sglang_classes(sglang_app, tiny_lm_path: str, policy) -> None:
    url, manager = sglang_app
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    sync = engine(url, tiny_lm_path, verify="weights")
    completions = sync.generate(
        [[5, 6, 7], [8, 9]],
        SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9, stop=("##",), seed=1),
    )
    assert [c.finish_reason for c in completions] == ["length", "length"]
    assert completions[0].token_ids == [7, 5] and completions[0].logprobs == [-0.25, -0.5]
    sync.release_memory()
    sync.resume_memory()
    sync.update_weights(model)

    routes = [route for route, _ in manager.calls]
    n_updates = routes.count("update_weights_from_tensor")
    assert n_updates > 1
    assert routes == [
        "generate",
        "release_memory_occupation",
        "resume_memory_occupation",
        "begin_weight_update",
        *["update_weights_from_tensor"] * n_updates,
        "end_weight_update",
        "flush_cache",
        *["get_weights_by_name"] * sync.verify_tensors,
    ]
    assert manager.violations == []
    classes = {route: type(obj) for route, obj in manager.calls if route != "flush_cache"}
    assert classes["generate"] is io_struct.GenerateReqInput
    assert classes["update_weights_from_tensor"] is io_struct.UpdateWeightsFromTensorReqInput
    assert classes["begin_weight_update"] is io_struct.BeginWeightUpdateReqInput
    assert classes["get_weights_by_name"] is io_struct.GetWeightsByNameReqInput
    assert classes["release_memory_occupation"] is io_struct.ReleaseMemoryOccupationReqInput
    updates = [obj for route, obj in manager.calls if route == "update_weights_from_tensor"]
    assert all(obj.flush_cache is False and obj.load_format is None for obj in updates)
    # SGLang's unpickler gave back exactly the merged weights, under checkpoint names.
    plan = plan_full_push(model, sync.layout)
    assert set(manager.weights) == {item.hf_name for item in plan}
    for item in plan:
        torch.testing.assert_close(manager.weights[item.hf_name], item.load(), atol=0, rtol=0)


def test_logprob_probe_round_trips_through_sglang(sglang_app, tiny_lm_path: str, policy) -> None:
    url, manager = sglang_app
    sync = engine(url, tiny_lm_path, verify="logprobs")
    sync.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=2))
    sync.update_weights(policy)  # the recorder answers the probe with `policy`'s own log-probs
    probe = [obj for route, obj in manager.calls if route == "generate"][-1]
    assert probe.logprob_start_len == 0 and probe.return_logprob is True
    assert manager.violations == []


def test_adapter_sync_through_sglang(sglang_app, tiny_lm_path: str) -> None:
    url, manager = sglang_app
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    sync = engine(url, tiny_lm_path, lora_sync="adapter", verify="weights")
    sync.update_weights(model)
    sync.update_weights(model)
    sync.generate([[5, 6]], SamplingParams(max_new_tokens=2))
    assert set(manager.adapters) == {sync.lora_name} and sync.lora_name.endswith("-v2")
    loads = [obj for route, obj in manager.calls if route == "load_lora_adapter_from_tensors"]
    assert [obj.lora_name for obj in loads] == [sync.lora_name.replace("-v2", "-v1"), sync.lora_name]
    assert all(
        isinstance(obj, io_struct.LoadLoRAAdapterFromTensorsReqInput) and obj.expected_checksums
        for obj in loads
    )
    generate = [obj for route, obj in manager.calls if route == "generate"][-1]
    assert generate.lora_path == [sync.lora_name]
    assert manager.violations == []


def test_one_serialization_per_tp_rank(sglang_app, tiny_lm_path: str, policy) -> None:
    url, manager = sglang_app
    manager.tp_size = 2
    engine(url, tiny_lm_path, tp_size=2, verify="none").update_weights(policy)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
    )
    adapter = engine(url, tiny_lm_path, tp_size=2, lora_sync="adapter", verify="weights")
    adapter.update_weights(model)
    assert set(manager.adapters) == {adapter.lora_name} and adapter.lora_name.endswith("-v1")
    assert manager.violations == []


def test_readback_sglang_cannot_do_asks_for_logprobs(sglang_app, tiny_lm_path: str, policy) -> None:
    url, manager = sglang_app
    manager.readback_supported = False  # SGLang's route answers 400 "Get parameter by name failed"
    with pytest.raises(WeightSyncError, match=r"verify='weights' is not supported .*verify='logprobs'"):
        engine(url, tiny_lm_path, verify="weights").update_weights(policy)


def test_failed_push_ends_the_session_sglang_keeps(sglang_app, tiny_lm_path: str, policy) -> None:
    url, manager = sglang_app
    sync = engine(url, tiny_lm_path, verify="none")
    original = manager.update_weights_from_tensor

    async def fail_second_bucket(obj: Any, request: Any = None) -> tuple[bool, str]:
        if [route for route, _ in manager.calls].count("update_weights_from_tensor") == 1:
            await manager._record("update_weights_from_tensor", obj, request)
            return False, "fake failure of the second bucket"
        return await original(obj, request)

    manager.update_weights_from_tensor = fail_second_bucket
    with pytest.raises(WeightSyncError, match="second bucket"):
        sync.update_weights(policy)
    assert not manager.session_open
    manager.update_weights_from_tensor = original
    sync.update_weights(policy)  # SGLang's begin_weight_update would answer 400 to an open session
    assert manager.violations == []


def test_checksum_mismatch_is_caught_by_sglang_code(sglang_app, tiny_lm_path: str, monkeypatch) -> None:
    url, _ = sglang_app
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
    )
    monkeypatch.setattr("basis.sglang_engine.tensor_checksum", lambda tensor: "0" * 64)
    with pytest.raises(WeightSyncError, match="LORA-CHECK"):
        engine(url, tiny_lm_path, lora_sync="adapter", verify="weights").update_weights(model)


def test_sglang_error_answers_reach_the_caller(sglang_app, tiny_lm_path: str) -> None:
    url, _ = sglang_app
    sync = engine(url, tiny_lm_path, verify="none")
    bad = generate_request([[1, 2]], SamplingParams())
    bad["sampling_params"][0]["max_new_tokens"] = "many"  # rejected by SGLang's contract gate
    with pytest.raises(SGLangError, match=r"POST /generate .* answered HTTP 4\d\d"):
        sync._transport.generate(bad)


def test_sampling_payloads_verify_with_sglang_sampling_params() -> None:
    for params in [
        SamplingParams(),
        SamplingParams(
            max_new_tokens=3, temperature=0.6, top_p=0.95, top_k=50, stop=("####", "\n\n"), seed=7
        ),
        SamplingParams(temperature=1.0, top_k=1),
    ]:
        payload = sampling_params_payload(params, params.seed)
        assert set(payload) <= SAMPLING_FIELDS
        sp = SGLangSamplingParams(**payload)
        sp.verify(vocab_size=1000)
        assert sp.temperature == params.temperature and sp.top_p == params.top_p
        assert (sp.top_k == 1 << 30) if params.top_k == 0 else (sp.top_k == params.top_k)
        assert sp.sampling_seed == params.seed and sp.no_stop_trim is True
    body = probe_request([1, 2, 3])
    assert set(body) <= GENERATE_FIELDS and set(body["sampling_params"]) <= SAMPLING_FIELDS
    SGLangSamplingParams(**body["sampling_params"]).verify(vocab_size=1000)


def test_finish_reasons_built_by_sglang_parse() -> None:
    def item(reason: Any) -> dict:
        triples = TokenizerManager.detokenize_logprob_tokens(None, [-0.1], [4], False)
        return {
            "text": "a",
            "output_ids": [4],
            "meta_info": {"finish_reason": reason, "output_token_logprobs": triples},
        }

    assert parse_completion(item(FINISH_MATCHED_TOKEN(4).to_json()), 0).finish_reason == "stop"
    assert parse_completion(item(FINISH_MATCHED_STR("##").to_json()), 0).finish_reason == "stop"
    assert parse_completion(item(FINISH_LENGTH(1).to_json()), 0).finish_reason == "length"
    with pytest.raises(SGLangError, match="out of memory"):
        parse_completion(item(FINISH_ABORT("out of memory").to_json()), 0)


def test_serializer_matches_multiprocessing_serializer() -> None:
    named = [("model.norm.weight", torch.randn(8)), ("lm_head.weight", torch.randn(4, 8).to(torch.bfloat16))]
    ours = MultiprocessingSerializer.deserialize(serialize_tensors(named))
    theirs = MultiprocessingSerializer.deserialize(
        MultiprocessingSerializer.serialize(named, output_str=True)
    )
    for (name, want), (our_name, got), (_, ref) in zip(named, ours, theirs, strict=True):
        assert our_name == name and got.dtype == want.dtype == ref.dtype
        assert torch.equal(got, want) and torch.equal(ref, want)


def test_in_process_calls_bind_to_sglang_engine_methods() -> None:
    """`_InProcessTransport` calls these `sglang.Engine` methods with these arguments."""
    body = generate_request([[1, 2]], SamplingParams(seed=1), lora_name="policy-v1")
    calls = {
        "generate": ((), body),
        "update_weights_from_tensor": (([("w", torch.zeros(1))],), {"flush_cache": False}),
        "begin_weight_update": ((), {}),
        "end_weight_update": ((), {}),
        "flush_cache": ((), {}),
        "release_memory_occupation": ((), {}),
        "resume_memory_occupation": ((), {}),
        "get_weights_by_name": (("model.norm.weight", 4), {}),
        "load_lora_adapter_from_tensors": (("policy-v1", {}, {}), {}),
        "unload_lora_adapter": (("policy-v1",), {}),
        "shutdown": ((), {}),
    }
    for method, (args, kwargs) in calls.items():
        inspect.signature(getattr(sglang.Engine, method)).bind(None, *args, **kwargs)
    assert set(probe_request([1, 2])) <= set(inspect.signature(sglang.Engine.generate).parameters)


def test_documented_server_arguments_exist() -> None:
    fields = struct_fields(ServerArgs)
    for name in [
        "model_path",
        "tokenizer_path",
        "tp_size",
        "dtype",
        "mem_fraction_static",
        "enable_memory_saver",
        "enable_deterministic_inference",
        "enable_lora",
        "max_lora_rank",
        "lora_target_modules",
    ]:
        assert name in fields, name
