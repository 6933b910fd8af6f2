"""Tests for basis.sglang_engine.

CPU part (default run): name mapping, the push plan, bucketing, LoRA merge equivalence, request
building, response parsing and the wire format, then `SGLangEngine` end to end against
`FakeSGLangServer` (a FAKE SGLang HTTP server around a real tiny model; see its docstring): the call
order of a training step, verification, retries and error paths, adapter sync. These tests push CPU
tensors, which the engine refuses to send to a real server; the `server` fixture lifts that check
for the fake only (`cpu_tensors_reach_the_in_process_fake`), and one test keeps it on.

GPU part (`@pytest.mark.gpu`, skipped without CUDA and the `sglang` extra): a tiny Llama served by the
real in-process `sglang.Engine`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import pickle
import re
import socket
from pathlib import Path

import pytest
import torch
from fake_sglang_server import FakeSGLangServer  # tests/basis is on sys.path (rootdir-relative imports)
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from basis.rollout import Completion, RolloutEngine, SamplingParams
from basis.sglang_engine import (
    CheckpointLayout,
    SGLangEngine,
    SGLangError,
    UnmappedParameterError,
    WeightSyncError,
    bucket_plan,
    generate_request,
    hf_parameter_name,
    lora_adapter_payload,
    parse_generate_response,
    parse_prompt_logprobs,
    plan_full_push,
    probe_request,
    require_cuda_tensors,
    sampling_params_payload,
    serialize_tensors,
    tensor_checksum,
)
from basis.tiny_policy import build_tokenizer, save_policy

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def layout(tiny_lm_path: str) -> CheckpointLayout:
    return CheckpointLayout.from_pretrained(tiny_lm_path)


@pytest.fixture
def policy(tiny_lm_path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.float32)


@pytest.fixture
def cpu_tensors_reach_the_in_process_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lift the engine's CUDA-only check (`require_cuda_tensors`) for tests against the fake server.

    A real server runs in another process and cannot open a CPU tensor's handle, so the engine
    refuses to send one over HTTP; the fake unpickles in this process, where CPU handles do open, and
    CPU is all these tests have. `test_http_push_of_a_cpu_tensor_names_the_parameter` keeps the check.
    """
    monkeypatch.setattr("basis.sglang_engine.require_cuda_tensors", lambda named: None)


@pytest.fixture
def server(tiny_lm_path: str, cpu_tensors_reach_the_in_process_fake: None):
    with FakeSGLangServer(tiny_lm_path) as fake:
        yield fake


def lora_policy(tiny_lm_path: str, use_rslora: bool = False) -> torch.nn.Module:
    """A real peft LoRA around the tiny Qwen3 with non-zero B (peft initialises B to zero)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, use_rslora=use_rslora)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def perturb(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> None:
    """A big, deterministic weight change (stands in for many optimizer steps)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


class Wrapper(torch.nn.Module):
    """What a LightningModule looks like from the outside: the HF model under an attribute."""

    def __init__(self, **modules: torch.nn.Module) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


# --------------------------------------------------------------------------------------------------
# Checkpoint layout and name mapping
# --------------------------------------------------------------------------------------------------


def test_layout_reads_names_shapes_and_tying_from_safetensors(layout: CheckpointLayout, policy) -> None:
    state = policy.state_dict()
    assert layout.tie_word_embeddings
    assert "lm_head.weight" not in layout.expected
    assert layout.expected == {n for n, _ in policy.named_parameters()}
    for name, shape in layout.shapes.items():
        assert tuple(state[name].shape) == shape
    assert layout.vocab_size == policy.config.vocab_size


def test_layout_rejects_folder_without_safetensors(tmp_path: Path, tiny_lm_path: str) -> None:
    (tmp_path / "config.json").write_text(Path(tiny_lm_path, "config.json").read_text())
    with pytest.raises(ValueError, match=r"no model.safetensors"):
        CheckpointLayout.from_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        ("policy.base_model.model.model.norm.weight", "model.norm.weight"),
        ("policy.model.layers.1.input_layernorm.weight", "model.layers.1.input_layernorm.weight"),
        ("model.model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("module.model.norm.weight", "model.norm.weight"),
        ("_orig_mod.model.norm.weight", "model.norm.weight"),
        (
            "_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.down_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ),
    ],
)
def test_hf_parameter_name_strips_wrappers(layout: CheckpointLayout, raw: str, expected: str) -> None:
    assert hf_parameter_name(raw, layout) == expected


@pytest.mark.parametrize(
    "raw",
    ["model.layers.0.mlp.extra.weight", "trainer.model.norm.weight", "model.layers.7.mlp.up_proj.weight"],
)
def test_hf_parameter_name_refuses_unknown_names(layout: CheckpointLayout, raw: str) -> None:
    with pytest.raises(UnmappedParameterError, match=raw.replace(".", r"\.")):
        hf_parameter_name(raw, layout)


def test_hf_parameter_name_refuses_separate_lm_head_of_tied_checkpoint(layout: CheckpointLayout) -> None:
    with pytest.raises(UnmappedParameterError, match="ties lm_head"):
        hf_parameter_name("base_model.model.lm_head.base_layer.weight", layout)


def test_module_prefixes_are_configurable(layout: CheckpointLayout) -> None:
    with pytest.raises(UnmappedParameterError):
        hf_parameter_name("actor.model.norm.weight", layout)
    assert hf_parameter_name("actor.model.norm.weight", layout, ("actor",)) == "model.norm.weight"


# --------------------------------------------------------------------------------------------------
# Push plan, bucketing, LoRA merge
# --------------------------------------------------------------------------------------------------


def test_plan_covers_checkpoint_through_a_lightning_style_wrapper(layout: CheckpointLayout, policy) -> None:
    plan = plan_full_push(Wrapper(policy=policy), layout)
    assert {item.hf_name for item in plan} == layout.expected
    state = policy.state_dict()
    for item in plan:
        assert item.shape == layout.shapes[item.hf_name]
        assert torch.equal(item.load(), state[item.hf_name])
        assert item.nbytes == state[item.hf_name].numel() * 4


def test_plan_refuses_duplicates_missing_and_shape_mismatches(tiny_lm_path: str, layout, policy) -> None:
    with pytest.raises(UnmappedParameterError, match="both map to"):
        plan_full_push(Wrapper(policy=policy, model=copy.deepcopy(policy)), layout)

    one_layer = {**policy.config.to_dict(), "num_hidden_layers": 1, "layer_types": ["full_attention"]}
    shallow = Qwen3ForCausalLM(Qwen3Config(**one_layer))
    with pytest.raises(UnmappedParameterError, match=r"no parameter for \d+ checkpoint tensors"):
        plan_full_push(shallow, layout)

    wide = Qwen3ForCausalLM(Qwen3Config(**{**policy.config.to_dict(), "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*has shape"):
        plan_full_push(wide, layout)

    untied = Qwen3ForCausalLM(Qwen3Config(**{**policy.config.to_dict(), "tie_word_embeddings": False}))
    with pytest.raises(UnmappedParameterError, match="ties lm_head"):
        plan_full_push(untied, layout)


def test_plan_refuses_lora_on_the_embedding_of_a_tied_checkpoint(tiny_lm_path: str, layout) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(UnmappedParameterError, match="ties lm_head to the embedding"):
        plan_full_push(model, layout)


def test_bucketing_keeps_order_and_bounds_size(layout: CheckpointLayout, policy) -> None:
    plan = plan_full_push(policy, layout)
    largest = max(item.nbytes for item in plan)
    bucket_bytes = largest // 2  # forces the largest tensors into buckets of their own
    buckets = list(bucket_plan(plan, bucket_bytes))
    assert [item for bucket in buckets for item in bucket] == plan
    for bucket in buckets:
        assert len(bucket) == 1 or sum(item.nbytes for item in bucket) <= bucket_bytes
    assert len(list(bucket_plan(plan, 10**12))) == 1
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(bucket_plan(plan, 0))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_lora_push_equals_peft_model(tiny_lm_path: str, layout, use_rslora: bool) -> None:
    model = lora_policy(tiny_lm_path, use_rslora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = plan_full_push(model, layout)
    assert {item.hf_name for item in plan} == layout.expected

    merged = AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.float32).eval()
    missing, unexpected = merged.load_state_dict({item.hf_name: item.load() for item in plan}, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    ids = torch.randint(0, layout.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))  # [2, 12]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    # The training model is untouched: no adapter merged, no weight changed.
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_lora_adapter_payload_matches_peft_checkpoint_format(tiny_lm_path: str, policy) -> None:
    tensors, config = lora_adapter_payload(lora_policy(tiny_lm_path))
    assert all(n.startswith("base_model.model.model.layers.") for n in tensors)
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in tensors)
    assert len(tensors) == 2 * len(LORA_TARGETS) * 2  # A and B per target per layer
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    with pytest.raises(ValueError, match="PeftModel"):
        lora_adapter_payload(policy)


# --------------------------------------------------------------------------------------------------
# Wire format: requests and responses
# --------------------------------------------------------------------------------------------------


def test_generate_request_fields_and_seeds() -> None:
    params = SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=0, stop=("####",), seed=11)
    body = generate_request([[1, 2], [3]], params, lora_name="policy-v2")
    assert body["input_ids"] == [[1, 2], [3]]
    assert body["return_logprob"] is True
    assert body["lora_path"] == ["policy-v2", "policy-v2"]
    first, second = body["sampling_params"]
    assert first == {
        "max_new_tokens": 5,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "no_stop_trim": True,
        "skip_special_tokens": True,
        "min_p": 0.0,  # sent explicitly: SGLang would take unset ones from generation_config.json
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "stop": ["####"],
        "sampling_seed": 11,
    }
    assert second["sampling_seed"] == 12
    unseeded = generate_request([[1]], SamplingParams(top_k=20))
    assert "lora_path" not in unseeded
    assert unseeded["sampling_params"][0]["top_k"] == 20


def test_unseeded_requests_get_distinct_seeds() -> None:
    # Deterministic SGLang seeds a request without sampling_seed with 42 (SamplingBatchInfo), so an
    # unseeded group of one prompt would be one response repeated: the engine draws a base seed.
    first = [
        sp["sampling_seed"] for sp in generate_request([[1, 2]] * 4, SamplingParams())["sampling_params"]
    ]
    second = [
        sp["sampling_seed"] for sp in generate_request([[1, 2]] * 4, SamplingParams())["sampling_params"]
    ]
    assert first == list(range(first[0], first[0] + 4)) and 0 <= first[0] < 2**31
    assert first != second  # a fresh base per call


def test_request_building_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_request([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="top_k=1"):
        sampling_params_payload(SamplingParams(top_k=1, temperature=0.5))
    assert sampling_params_payload(SamplingParams(top_k=1, temperature=1.0))["top_k"] == 1


def test_probe_request_asks_for_prompt_logprobs() -> None:
    assert probe_request([5, 6, 7]) == {
        "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    assert probe_request([5], "a-v1")["lora_path"] == "a-v1"


def sglang_result(ids: list[int], logprobs: list[float], finish: dict, text: str = "x") -> dict:
    """A `/generate` result as SGLang 0.5.23's TokenizerManager builds it (return_text_in_logprobs off)."""
    triples = [[lp, t, None] for lp, t in zip(logprobs, ids, strict=True)]
    meta = {"id": "r", "finish_reason": finish, "prompt_tokens": 3, "output_token_logprobs": triples}
    return {"text": text, "output_ids": ids, "meta_info": meta}


def test_parse_generate_response_maps_finish_reasons() -> None:
    answer = [
        sglang_result([4, 2], [-0.5, -0.1], {"type": "stop", "matched": 2}, "ab"),
        sglang_result([4, 5, 6], [-1.0, -2.0, -3.0], {"type": "length", "length": 3}),
        sglang_result([7], [-0.2], {"type": "stop", "matched": "####"}),
    ]
    completions = parse_generate_response(answer, 3)
    assert completions[0] == Completion(
        token_ids=[4, 2], logprobs=[-0.5, -0.1], text="ab", finish_reason="stop"
    )
    assert [c.finish_reason for c in completions] == ["stop", "length", "stop"]
    assert completions[1].logprobs == [-1.0, -2.0, -3.0]


def test_parse_generate_response_rejects_aborts_and_malformed_answers() -> None:
    abort = {"type": "abort", "message": "out of memory", "status_code": 500, "err_type": None}
    with pytest.raises(SGLangError, match="out of memory"):
        parse_generate_response([sglang_result([1], [-1.0], abort)], 1)
    with pytest.raises(SGLangError, match="2 results for 3 prompts"):
        parse_generate_response([sglang_result([1], [-1.0], {"type": "length", "length": 1})] * 2, 3)
    bad = sglang_result([1, 2], [-1.0, -1.0], {"type": "length", "length": 2})
    bad["meta_info"]["output_token_logprobs"] = [[-1.0, 1, None]]
    with pytest.raises(SGLangError, match="output_token_logprobs"):
        parse_generate_response([bad], 1)
    with pytest.raises(SGLangError, match="did not finish"):
        parse_generate_response([sglang_result([1], [-1.0], None)], 1)


def test_parse_prompt_logprobs_drops_the_first_null() -> None:
    answer = {"meta_info": {"input_token_logprobs": [[None, 5, None], [-1.5, 6, None], [-0.5, 7, None]]}}
    assert parse_prompt_logprobs(answer, [5, 6, 7], vocab_size=100) == [-1.5, -0.5]
    with pytest.raises(SGLangError, match="probe"):
        parse_prompt_logprobs(answer, [5, 6], vocab_size=100)
    # SGLang reports ids >= vocab_size - 1 as 0.
    clipped = {"meta_info": {"input_token_logprobs": [[None, 5, None], [-1.5, 0, None]]}}
    assert parse_prompt_logprobs(clipped, [5, 99], vocab_size=100) == [-1.5]
    with pytest.raises(SGLangError, match="probe"):
        parse_prompt_logprobs(clipped, [5, 98], vocab_size=100)


def test_serialized_tensors_round_trip_and_checksum() -> None:
    named = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.arange(5, dtype=torch.bfloat16))]
    decoded = pickle.loads(base64.b64decode(serialize_tensors(named), validate=True))
    assert [n for n, _ in decoded] == ["a.weight", "b.bias"]
    for (_, want), (_, got) in zip(named, decoded, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    tensor = named[1][1]
    assert tensor_checksum(tensor) == hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# SGLangEngine against the fake server
# --------------------------------------------------------------------------------------------------


def engine_for(server: FakeSGLangServer, tiny_lm_path: str, **kwargs) -> SGLangEngine:
    defaults = {"request_timeout_s": 5.0, "retry_backoff_s": 0.0, "weight_bucket_bytes": 64 * 1024}
    return SGLangEngine(tiny_lm_path, server_url=server.url, **{**defaults, **kwargs})


def test_engine_satisfies_protocol_and_samples(server, tiny_lm_path: str, policy) -> None:
    engine = engine_for(server, tiny_lm_path)
    assert isinstance(engine, RolloutEngine)
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3)
    completions = engine.generate([[5, 6, 7], [8, 9]], params)
    assert len(completions) == 2
    for completion in completions:
        assert 1 <= len(completion.token_ids) <= 6
        assert len(completion.logprobs) == len(completion.token_ids)
        assert completion.finish_reason in ("stop", "length")
    # Same seeds, same samples (the fake honours sampling_seed like deterministic SGLang).
    assert engine.generate([[5, 6, 7], [8, 9]], params) == completions
    assert engine.generate([], params) == []
    # The returned log-probs are the policy's at the sampling temperature, token by token.
    prompt, completion = [5, 6, 7], completions[0]
    ids = torch.tensor([prompt + completion.token_ids])  # [1, T]
    with torch.no_grad():
        logits = policy(input_ids=ids).logits[0, len(prompt) - 1 : -1] / 0.8  # [R, V]
    want = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)  # [R]
    torch.testing.assert_close(torch.tensor(completion.logprobs), want, atol=1e-5, rtol=0)


def test_eos_on_the_last_allowed_token_finishes_with_stop(server, tiny_lm_path: str) -> None:
    # SGLang checks stop strings, then EOS, then the length (Req.update_finish_state), as HFEngine does.
    (eos,) = server.eos_ids

    def favour_eos(module: torch.nn.Module, inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., eos] += 30.0
        return logits

    server.model.get_output_embeddings().register_forward_hook(favour_eos)
    engine = engine_for(server, tiny_lm_path, verify="none")
    (completion,) = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=1, seed=0))
    assert completion.token_ids == [eos] and completion.finish_reason == "stop"


@pytest.mark.parametrize("verify", ["logprobs", "weights"])
def test_training_step_call_order_and_sync(server, tiny_lm_path: str, policy, verify: str) -> None:
    engine = engine_for(server, tiny_lm_path, verify=verify)
    params = SamplingParams(max_new_tokens=4, seed=0)
    prompts = [[5, 6, 7], [8, 9, 10]]
    server.calls.clear()

    completions = engine.generate(prompts, params)
    engine.release_memory()
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)  # one real optimizer step
    ids = torch.tensor([prompts[0] + completions[0].token_ids])  # [1, T]
    policy(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    engine.resume_memory()
    engine.update_weights(policy)
    engine.generate(prompts, params)

    n_buckets = len(list(bucket_plan(plan_full_push(policy, engine.layout), engine.weight_bucket_bytes)))
    assert n_buckets > 1
    verify_calls = ["/generate"] if verify == "logprobs" else ["/get_weights_by_name"] * engine.verify_tensors
    assert server.calls == [
        "/generate",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/begin_weight_update",
        *["/update_weights_from_tensor"] * n_buckets,
        "/end_weight_update",
        "/flush_cache",
        *verify_calls,
        "/generate",
    ]
    served = dict(server.model.named_parameters())
    for name, param in policy.named_parameters():
        assert torch.equal(served[name], param), name
    assert sorted(server.loaded_names) == sorted(engine.layout.expected)


@pytest.mark.parametrize("verify", ["logprobs", "weights"])
def test_push_that_does_not_take_stops_the_run(server, tiny_lm_path: str, policy, verify: str) -> None:
    engine = engine_for(server, tiny_lm_path, verify=verify)
    engine.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=8, seed=0))
    perturb(policy)
    server.drop_updates = True  # the server claims success but keeps its old weights
    with pytest.raises(WeightSyncError, match="did not take"):
        engine.update_weights(policy)


def test_greedy_output_changes_after_a_push(server, tiny_lm_path: str, policy) -> None:
    engine = engine_for(server, tiny_lm_path, verify="none")
    greedy = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1)
    prompts = [[5, 6, 7], [11, 12], [20, 21, 22, 23]]
    before = engine.generate(prompts, greedy)
    perturb(policy)
    engine.update_weights(policy)
    after = engine.generate(prompts, greedy)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]


def test_unmappable_policy_is_refused_before_anything_is_sent(server, tiny_lm_path: str, policy) -> None:
    engine = engine_for(server, tiny_lm_path)
    policy.model.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    server.calls.clear()
    with pytest.raises(UnmappedParameterError, match=r"'model\.extra_scale'"):
        engine.update_weights(policy)
    assert server.calls == []


def test_server_down_names_the_url(tiny_lm_path: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(SGLangError, match=rf"server at {re.escape(url)} was not ready .*could not connect"):
        SGLangEngine(tiny_lm_path, server_url=url, startup_timeout_s=0.2, retry_backoff_s=0.05)


def test_engine_waits_while_the_server_starts(server, tiny_lm_path: str) -> None:
    server.calls.clear()
    server.starting_health_checks = 3  # SGLang answers /health with 503 while it loads the model
    engine_for(server, tiny_lm_path)
    assert server.calls == ["/health"] * 4
    server.starting_health_checks = 10**6
    with pytest.raises(SGLangError, match=rf"server at {re.escape(server.url)} was not ready .*HTTP 503"):
        engine_for(server, tiny_lm_path, startup_timeout_s=0.2, retry_backoff_s=0.05)


def test_error_answers_and_success_false_name_the_route(server, tiny_lm_path: str, policy) -> None:
    engine = engine_for(server, tiny_lm_path, verify="none")
    server.fail_routes["/generate"] = 1
    with pytest.raises(SGLangError, match=r"POST /generate .* answered HTTP 500: .*fake internal error"):
        engine.generate([[5, 6]], SamplingParams(max_new_tokens=2))
    server.reject_routes["/update_weights_from_tensor"] = 1
    with pytest.raises(WeightSyncError, match=r"/update_weights_from_tensor .*fake rejection"):
        engine.update_weights(policy)
    server.fail_routes["/release_memory_occupation"] = 1
    with pytest.raises(SGLangError, match="/release_memory_occupation"):
        engine.release_memory()


def test_a_push_that_fails_midway_still_ends_the_session(server, tiny_lm_path: str, policy) -> None:
    # SGLang refuses begin_weight_update while a session is open: one failed push left open would
    # make every later push of a long-lived server fail.
    engine = engine_for(server, tiny_lm_path, verify="none")
    server.calls.clear()
    server.fail_nth["/update_weights_from_tensor"] = 2  # the second bucket breaks
    with pytest.raises(WeightSyncError, match=r"/update_weights_from_tensor .*HTTP 500"):
        engine.update_weights(policy)
    assert server.calls == [
        "/begin_weight_update",
        *["/update_weights_from_tensor"] * 2,
        "/end_weight_update",
    ]
    assert not server.session_open
    perturb(policy)
    engine.update_weights(policy)
    served = dict(server.model.named_parameters())
    for name, param in policy.named_parameters():
        assert torch.equal(served[name], param), name
    # When ending the session fails too, the push's own error is the one raised.
    server.fail_routes["/update_weights_from_tensor"] = 1
    server.fail_routes["/end_weight_update"] = 1
    with pytest.raises(WeightSyncError, match=r"POST /update_weights_from_tensor .*HTTP 500"):
        engine.update_weights(policy)


def test_verify_weights_on_a_model_without_readback_says_use_logprobs(
    server, tiny_lm_path: str, policy
) -> None:
    engine = engine_for(server, tiny_lm_path, verify="weights")
    server.readback_unsupported = True  # SGLang's Qwen3: 400 "Get parameter by name failed"
    with pytest.raises(WeightSyncError, match=r"verify='weights' is not supported .*use verify='logprobs'"):
        engine.update_weights(policy)


def test_tensors_are_serialized_once_per_tp_rank(
    tiny_lm_path: str, policy, cpu_tensors_reach_the_in_process_fake: None
) -> None:
    with FakeSGLangServer(tiny_lm_path, tp_size=2) as fake:
        # The fake opens every rank's payload once and refuses one pickle repeated across ranks.
        payload = serialize_tensors([("model.norm.weight", torch.ones(32))])
        fake.session_open = True
        status, answer = fake.handle(
            "POST", "/update_weights_from_tensor", {"serialized_named_tensors": [payload, payload]}
        )
        assert status == 400 and "repeat one serialization" in answer["message"]
        fake.session_open = False

        perturb(policy)
        engine_for(fake, tiny_lm_path, tp_size=2, verify="none").update_weights(policy)
        served = dict(fake.model.named_parameters())
        for name, param in policy.named_parameters():
            assert torch.equal(served[name], param), name
        adapter = engine_for(fake, tiny_lm_path, tp_size=2, lora_sync="adapter", verify="weights")
        adapter.update_weights(lora_policy(tiny_lm_path))  # "weights": the fake's sha256 check
        assert set(fake.adapters) == {adapter.lora_name} and adapter.lora_name.endswith("-v1")


def test_http_push_of_a_cpu_tensor_names_the_parameter(tiny_lm_path: str, policy) -> None:
    with pytest.raises(ValueError, match=r"cannot push 'model\.norm\.weight' .*over HTTP: it is on cpu"):
        require_cuda_tensors([("model.norm.weight", torch.ones(2))])
    with FakeSGLangServer(tiny_lm_path) as fake:  # the CUDA-only check stays on here
        engine = engine_for(fake, tiny_lm_path, verify="none")
        fake.calls.clear()
        with pytest.raises(ValueError, match=r"cannot push 'model\.[\w.]+' .*over HTTP: it is on cpu"):
            engine.update_weights(policy)
        assert fake.calls == ["/begin_weight_update", "/end_weight_update"]  # no tensor sent
        adapter = engine_for(fake, tiny_lm_path, lora_sync="adapter", verify="none")
        with pytest.raises(ValueError, match=r"cannot push 'base_model\.model\.[\w.]+' .*it is on cpu"):
            adapter.update_weights(lora_policy(tiny_lm_path))
        assert not fake.adapters


def test_timed_out_generate_is_retried_then_fails_loudly(server, tiny_lm_path: str) -> None:
    engine = engine_for(server, tiny_lm_path, request_timeout_s=0.3, max_retries=2)
    server.calls.clear()
    server.generate_delays = [1.0]  # the first attempt times out, the second answers
    assert len(engine.generate([[5, 6]], SamplingParams(max_new_tokens=2))) == 1
    assert server.calls == ["/generate", "/generate"]
    server.generate_delays = [1.0, 1.0, 1.0]
    with pytest.raises(SGLangError, match=r"POST /generate .* timed out \(3 attempt\(s\)"):
        engine.generate([[5, 6]], SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("verify", ["weights", "logprobs"])
def test_adapter_sync_loads_versioned_adapters(server, tiny_lm_path: str, verify: str) -> None:
    model = lora_policy(tiny_lm_path)
    engine = engine_for(server, tiny_lm_path, lora_sync="adapter", verify=verify)
    params = SamplingParams(max_new_tokens=4, seed=0)
    engine.generate([[5, 6, 7]], params)
    server.calls.clear()
    engine.update_weights(model)
    first = engine.lora_name
    assert re.fullmatch(r"policy-[0-9a-f]{8}-v1", first) and set(server.adapters) == {first}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.mul_(2.0)
    engine.update_weights(model)
    engine.generate([[5, 6, 7]], params)
    assert engine.lora_name == first.replace("-v1", "-v2") and set(server.adapters) == {engine.lora_name}
    verify_calls = ["/generate"] if verify == "logprobs" else []
    assert server.calls == [
        "/load_lora_adapter_from_tensors",
        *verify_calls,
        "/load_lora_adapter_from_tensors",
        "/unload_lora_adapter",
        *verify_calls,
        "/generate",
    ]


@pytest.mark.parametrize("lora_sync", ["merge", "adapter"])
def test_released_memory_keeps_what_the_next_sync_does_not_resend(
    server, tiny_lm_path: str, lora_sync: str
) -> None:
    # The fake throws released weights away, as SGLang does without --enable-weights-cpu-backup.
    model = lora_policy(tiny_lm_path)
    engine = engine_for(server, tiny_lm_path, lora_sync=lora_sync, verify="logprobs")
    params = SamplingParams(max_new_tokens=4, seed=0)
    engine.generate([[5, 6, 7]], params)
    engine.release_memory()
    engine.resume_memory()
    engine.update_weights(model)  # the logprob probe raises WeightSyncError on a damaged base
    engine.generate([[5, 6, 7]], params)
    assert server.released_tags == [["kv_cache"] if lora_sync == "adapter" else ["kv_cache", "weights"]]


def test_a_second_engine_on_the_same_server_uses_new_adapter_names(server, tiny_lm_path: str) -> None:
    # A long-lived server keeps the last adapter of a stopped run, and SGLang refuses to load a name it
    # holds: a resumed run whose names restarted at v1 died at the push that reached that version.
    model = lora_policy(tiny_lm_path)
    stopped = engine_for(server, tiny_lm_path, lora_sync="adapter", verify="none")
    stopped.update_weights(model)
    stopped.update_weights(model)
    resumed = engine_for(server, tiny_lm_path, lora_sync="adapter", verify="none")
    for _ in range(3):
        resumed.update_weights(model)
    assert set(server.adapters) == {stopped.lora_name, resumed.lora_name}
    assert resumed.lora_name.endswith("-v3") and resumed.lora_name != stopped.lora_name


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {"use_rslora": True},
        {"alpha_pattern": {"q_proj": 16}},
        {"rank_pattern": {"q_proj": 2}},
        {"lora_bias": True},
    ],
    ids=["use_rslora", "alpha_pattern", "rank_pattern", "lora_bias"],
)
def test_adapter_sync_refuses_what_sglang_scales_otherwise(
    server, tiny_lm_path: str, lora_kwargs: dict
) -> None:
    # SGLang 0.5.23 scales every adapter by lora_alpha / r without bias (srt/lora/lora.py); an rsLoRA
    # adapter pushed as is served another policy while the logprob probe still passed.
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora_kwargs)
    )
    engine = engine_for(server, tiny_lm_path, lora_sync="adapter")
    server.calls.clear()
    with pytest.raises(ValueError, match=rf"{next(iter(lora_kwargs))}.*ignores .*lora_sync='merge'"):
        engine.update_weights(model)
    assert server.calls == [] and engine.lora_name is None
    if "lora_bias" not in lora_kwargs:  # peft's get_delta_weight scales these right when merging
        engine_for(server, tiny_lm_path, verify="logprobs").update_weights(model)


def test_adapter_checksum_mismatch_stops_the_run(server, tiny_lm_path: str) -> None:
    engine = engine_for(server, tiny_lm_path, lora_sync="adapter", verify="weights")
    server.corrupt_adapters = True
    with pytest.raises(WeightSyncError, match=r"load_lora_adapter_from_tensors.*LORA-CHECK"):
        engine.update_weights(lora_policy(tiny_lm_path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lora_sync": "both"}, "lora_sync"),
        ({"verify": "maybe"}, "verify"),
        ({"weight_bucket_bytes": 0}, "weight_bucket_bytes"),
        ({"max_retries": -1}, "max_retries"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"startup_timeout_s": 0}, "startup_timeout_s"),
        ({"server_url": "http://x", "engine_kwargs": {"tp_size": 2}}, "engine_kwargs"),
        ({"tp_size": 2}, "tp_size"),
        ({"lora_sync": "adapter", "verify": "weights"}, "sha256"),
    ],
)
def test_constructor_rejects_bad_config(tiny_lm_path: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SGLangEngine(tiny_lm_path, **kwargs)


# --------------------------------------------------------------------------------------------------
# GPU: the real sglang.Engine (skipped without CUDA and the `sglang` extra)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama (SGLang implements get_weights_by_name for Llama, not Qwen3), bf16, saved locally."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    return str(save_policy(model, tokenizer, tmp_path_factory.mktemp("tiny_llama")))


def gpu_engine(path: str, **engine_kwargs) -> SGLangEngine:
    pytest.importorskip("sglang")
    kwargs = {"mem_fraction_static": 0.3, "dtype": "bfloat16", "enable_memory_saver": True, **engine_kwargs}
    return SGLangEngine(path, verify="weights", engine_kwargs=kwargs)


def cuda_policy(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()


@pytest.mark.gpu
def test_gpu_engine_boots_and_logprobs_match_hf(tiny_llama_path: str) -> None:
    with gpu_engine(tiny_llama_path) as engine:
        policy = cuda_policy(tiny_llama_path)
        prompts = [[5, 6, 7, 8], [9, 10, 11]]
        completions = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.7))
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = torch.tensor([prompt + completion.token_ids], device="cuda")  # [1, T]
            with torch.no_grad():
                logits = policy(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / 0.7  # [R, V]
            want = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)  # [R]
            got = torch.tensor(completion.logprobs, device="cuda")  # [R]
            assert (got - want).abs().mean().item() < 0.05  # bf16 tolerance


@pytest.mark.gpu
def test_gpu_pushed_weights_read_back_and_change_greedy_output(tiny_llama_path: str) -> None:
    with gpu_engine(tiny_llama_path) as engine:
        policy = cuda_policy(tiny_llama_path)
        greedy = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1)
        prompts = [[5, 6, 7, 8], [9, 10, 11]]
        before = engine.generate(prompts, greedy)
        perturb(policy, scale=0.05)
        engine.release_memory()
        engine.resume_memory()
        engine.update_weights(policy)  # verify="weights": get_weights_by_name read-back
        after = engine.generate(prompts, greedy)
        assert [c.token_ids for c in after] != [c.token_ids for c in before]


@pytest.mark.gpu
def test_gpu_lora_load_unload_reload(tiny_llama_path: str) -> None:
    pytest.importorskip("sglang")
    lora = {"enable_lora": True, "max_lora_rank": 8, "lora_target_modules": ["q_proj", "v_proj"]}
    engine = SGLangEngine(
        tiny_llama_path,
        lora_sync="adapter",
        verify="logprobs",
        engine_kwargs={"mem_fraction_static": 0.3, "dtype": "bfloat16", **lora},
    )
    with engine:
        base = cuda_policy(tiny_llama_path)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1)
        engine.generate([[5, 6, 7]], params)
        for version in (1, 2, 3):
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.add_(0.05 * torch.randn_like(param))
            engine.update_weights(model)  # load v{n}, unload v{n-1}, logprob probe
            assert engine.lora_name.endswith(f"-v{version}")
            assert len(engine.generate([[5, 6, 7]], params)[0].token_ids) >= 1
