"""FAKE SGLang HTTP server for CPU tests of `basis.sglang_engine` (SGLang itself needs CUDA).

`FakeSGLangServer` is a test double, not SGLang: a `ThreadingHTTPServer` in a background thread that
serves the routes `SGLangEngine` calls with the request and answer shapes of SGLang 0.5.23's
`http_server.py` (checked against its source; `make test-sglang` checks the requests against SGLang's
own classes). Behind the routes sits a real tiny Hugging Face model, so pushed weights really change
what it samples, and it reproduces the SGLang behaviours the engine must cope with:

- `/update_weights_from_tensor` outside `begin_weight_update`/`end_weight_update` answers
  `success=False`, and so does a second `begin_weight_update` while a session is open (SGLang's
  `WeightUpdater`); unknown tensor names are skipped silently (SGLang's `load_weights` pitfall).
- Tensor routes take one payload per tensor-parallel rank (`tp_size`), each a serialization of its own
  (SGLang's `_serialize_tensors_per_rank`); every rank's payload is opened once, as each TP worker
  opens only its own (`TpModelWorker.deserialize_own_rank`).
- `/generate` returns `log(softmax(logits / T))` over the full vocabulary (greedy: temperature 1),
  finish reasons as `{"type": "stop"|"length"|"abort", ...}` checked in SGLang's order (stop string,
  then EOS, then length), and `[logprob, token_id, null]` triples.
- `/load_lora_adapter_from_tensors` checks `expected_checksums` like SGLang's `TpModelWorker` and
  scales the adapter by `lora_alpha / r` like SGLang's `LoRAAdapter` (no rsLoRA, no patterns).

The fake unpickles in the test's own process, so it can open CPU tensors' handles, which a real,
separately launched server cannot (see `basis.sglang_engine.require_cuda_tensors`).

Fault injection for the error-path tests: `fail_routes` (HTTP 500), `fail_nth` (HTTP 500 on the n-th
call of a route: a push that breaks mid-way), `reject_routes` (HTTP 400 with `success=False`),
`starting_health_checks` (`/health` answers 503 that often first, as SGLang does while it loads the
model), `generate_delays` (sleep before answering, to trigger client timeouts), `drop_updates` (claim
success but load nothing), `corrupt_adapters` (flip one adapter tensor on load), `readback_unsupported`
(`/get_weights_by_name` fails as for a model class without `get_weights_by_name`, e.g. SGLang's
Qwen3 - which the fake's tiny model is, though it reads back by default).
Every request's route is appended to `calls`, so a test can assert the call order of a training step.

Like a real server it shares no state with the test process: unseeded sampling draws from the
server's own generator, not torch's global one, and closing the server waits for requests still in
flight (a timed-out `/generate` keeps running after its client gave up). Before, such a request
sampled from the global generator while later tests ran and made a seeded model build in another
test file come out different.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import pickle
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

_SAMPLING_EPS = 1e-6  # SGLang: temperature below this means greedy (top_k=1, temperature 1)


class FakeSGLangServer:
    """FAKE SGLang server around a real tiny causal LM; use as a context manager (`with ... as server`).

    Args:
        model_path: Folder of the tiny model and tokenizer (`save_pretrained` output).
        tp_size: Number of per-rank tensor payloads the tensor routes expect (each a serialization
            of its own).
    """

    def __init__(self, model_path: str, tp_size: int = 1) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.tp_size = tp_size
        self.calls: list[str] = []
        self.session_open = False
        self.released = False
        self.released_tags: list[list[str]] = []
        self.adapters: dict[str, torch.nn.Module] = {}
        self.fail_routes: dict[str, int] = {}
        self.fail_nth: dict[str, int] = {}
        self.reject_routes: dict[str, int] = {}
        self.starting_health_checks = 0
        self.generate_delays: list[float] = []
        self.drop_updates = False
        self.corrupt_adapters = False
        self.readback_unsupported = False
        self.loaded_names: list[str] = []
        self._lock = threading.Lock()
        self._rng = torch.Generator().manual_seed(0)  # unseeded requests; never the global generator
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeSGLangServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = False  # so server_close() joins requests still in flight
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    # -- routes ----------------------------------------------------------------------------------

    def handle(self, method: str, route: str, body: Any) -> tuple[int, Any]:
        """(status, JSON answer) for one request; `None` answers are sent as JSON null."""
        self.calls.append(route)
        if self.fail_routes.get(route, 0) > 0:
            self.fail_routes[route] -= 1
            return 500, {"error": {"message": f"fake internal error on {route}"}}
        if self.fail_nth.get(route) == self.calls.count(route):
            return 500, {
                "error": {"message": f"fake internal error on call {self.fail_nth[route]} of {route}"}
            }
        if self.reject_routes.get(route, 0) > 0:
            self.reject_routes[route] -= 1
            return 400, {
                "success": False,
                "message": f"fake rejection of {route}",
                "error_message": "rejected",
            }
        handlers = {
            "/health": self._health,
            "/generate": self._generate,
            "/begin_weight_update": self._begin,
            "/end_weight_update": self._end,
            "/update_weights_from_tensor": self._update_weights,
            "/flush_cache": self._flush,
            "/get_weights_by_name": self._get_weights,
            "/release_memory_occupation": self._release,
            "/resume_memory_occupation": self._resume,
            "/load_lora_adapter_from_tensors": self._load_lora,
            "/unload_lora_adapter": self._unload_lora,
        }
        if route not in handlers:
            return 404, {"detail": "Not Found"}
        try:
            return handlers[route](body)
        except _BadTensorPayload as err:
            return 400, {"success": False, "message": str(err)}

    def _health(self, body: Any) -> tuple[int, Any]:
        if self.starting_health_checks > 0:  # SGLang: ServerStatus.Starting -> 503, no body
            self.starting_health_checks -= 1
            return 503, None
        return 200, None

    def _begin(self, body: Any) -> tuple[int, Any]:
        if self.session_open:  # SGLang's WeightUpdater.begin_weight_update, answered with HTTP 400
            message = "a weight-update session is already open; call end_weight_update() first"
            return 400, {"success": False, "message": message}
        self.session_open = True
        return 200, {"success": True, "message": "Success"}

    def _end(self, body: Any) -> tuple[int, Any]:
        if not self.session_open:
            message = "no weight-update session is open; call begin_weight_update() first"
            return 400, {"success": False, "message": message}
        self.session_open = False
        return 200, {"success": True, "message": "Success"}

    def _payload(self, body: dict[str, Any]) -> Any:
        """Open every rank's payload once, as each TP worker opens its own, and return rank 0's tensors.

        SGLang needs one serialization per rank: a CUDA IPC hand-over is reference-counted for one
        consumer. A CPU tensor's pickle carries a fresh file-descriptor handle every time it is
        serialized, so a pickle reused for several ranks shows up here as repeated bytes.
        """
        payloads = body["serialized_named_tensors"]
        if len(payloads) != self.tp_size:
            raise _BadTensorPayload(f"expected {self.tp_size} per-rank payloads, got {len(payloads)}")
        if len(set(payloads)) != len(payloads):
            raise _BadTensorPayload(
                f"the {len(payloads)} per-rank payloads repeat one serialization; each rank needs its own"
            )
        # Test double: unpickles the engine's own payload (SGLang uses a restricted SafeUnpickler).
        ranks = [pickle.loads(base64.b64decode(payload, validate=True)) for payload in payloads]
        for rank, tensors in enumerate(ranks[1:], start=1):
            if not _same_named_tensors(tensors, ranks[0]):
                raise _BadTensorPayload(f"rank {rank}'s payload holds other tensors than rank 0's")
        return ranks[0]

    def _update_weights(self, body: dict[str, Any]) -> tuple[int, Any]:
        if not self.session_open:
            message = (
                "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
            )
            return 400, {"success": False, "message": message}
        if self.released:
            return 400, {"success": False, "message": "weights are released; resume memory first"}
        named = self._payload(body)
        params = dict(self.model.named_parameters())
        with self._lock, torch.no_grad():
            for name, tensor in named:
                self.loaded_names.append(name)
                if self.drop_updates or name not in params:
                    continue  # SGLang logs "Parameter ... not found" and skips: the pitfall
                params[name].copy_(tensor)
        return 200, {"success": True, "message": "Success"}

    def _flush(self, body: Any) -> tuple[int, Any]:
        return 200, "Cache flushed.\n"

    def _get_weights(self, body: dict[str, Any]) -> tuple[int, Any]:
        params = dict(self.model.named_parameters())
        if self.readback_unsupported or body["name"] not in params:
            return 400, {"error": {"message": "Get parameter by name failed"}}
        return 200, params[body["name"]].detach().float()[: body.get("truncate_size", 100)].tolist()

    def _release(self, body: Any) -> tuple[int, Any]:
        self.released = True
        tags = (body or {}).get("tags") or ["weights", "kv_cache"]  # SGLang: no tags = all memory
        self.released_tags.append(sorted(tags))
        if "weights" in tags:  # without --enable-weights-cpu-backup their contents are thrown away
            with torch.no_grad():
                for param in self.model.parameters():
                    param.normal_(generator=self._rng)
        return 200, None

    def _resume(self, body: Any) -> tuple[int, Any]:
        self.released = False
        return 200, None

    def _load_lora(self, body: dict[str, Any]) -> tuple[int, Any]:
        name = body["lora_name"]
        if name in self.adapters:
            return 400, {"success": False, "error_message": f"adapter {name!r} is already loaded"}
        tensors: dict[str, torch.Tensor] = self._payload(body)
        if self.corrupt_adapters:
            first = next(iter(tensors))
            tensors[first] = tensors[first] + 1.0
        expected = body.get("expected_checksums")
        if expected is not None:
            got = {
                n: hashlib.sha256(
                    t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
                ).hexdigest()
                for n, t in tensors.items()
            }
            bad = sorted(n for n in expected if got.get(n) != expected[n]) + sorted(set(got) - set(expected))
            if bad:
                return 400, {
                    "success": False,
                    "error_message": f"[LORA-CHECK] adapter sync MISMATCH: {bad[:5]}",
                }
        self.adapters[name] = self._merged_copy(tensors, body["config_dict"])
        return 200, {"success": True, "error_message": None, "loaded_adapters": {n: n for n in self.adapters}}

    def _unload_lora(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.adapters.pop(body["lora_name"], None) is None:
            return 400, {"success": False, "error_message": f"adapter {body['lora_name']!r} is not loaded"}
        return 200, {"success": True, "error_message": None, "loaded_adapters": {n: n for n in self.adapters}}

    def _merged_copy(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.nn.Module:
        """The base model with W += scale * B @ A for every adapted module (peft names).

        scale = lora_alpha / r whatever the config says about rsLoRA, as SGLang 0.5.23's `LoRAAdapter`
        (`srt/lora/lora.py`: `self.scaling = self.config.lora_alpha / self.config.r`).
        """
        scale = config["lora_alpha"] / config["r"]
        model = copy.deepcopy(self.model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, lora_a in tensors.items():
                if ".lora_A." not in name:
                    continue
                module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
                lora_b = tensors[name.replace(".lora_A.", ".lora_B.")]
                params[f"{module}.weight"] += scale * lora_b.float() @ lora_a.float()  # [out, in]
        return model

    def _generate(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.generate_delays:
            time.sleep(self.generate_delays.pop(0))
        if self.released:
            return 400, {"error": {"message": "memory is released; resume_memory_occupation first"}}
        batch = isinstance(body["input_ids"][0], list)
        prompts = body["input_ids"] if batch else [body["input_ids"]]
        params = body.get("sampling_params") or {}
        params = params if isinstance(params, list) else [params] * len(prompts)
        loras = body.get("lora_path")
        loras = loras if isinstance(loras, list) else [loras] * len(prompts)
        for lora in loras:
            if lora is not None and lora not in self.adapters:
                return 400, {"error": {"message": f"LoRA adapter {lora!r} is not loaded"}}
        results = [
            self._sample(
                prompt, sp, self.adapters[lora] if lora else self.model, body.get("logprob_start_len")
            )
            for prompt, sp, lora in zip(prompts, params, loras, strict=True)
        ]
        return 200, results if batch else results[0]

    @torch.no_grad()
    def _sample(
        self, prompt: list[int], sp: dict[str, Any], model: torch.nn.Module, logprob_start_len: int | None
    ) -> dict[str, Any]:
        temperature, top_k, top_p = sp.get("temperature", 1.0), sp.get("top_k", -1), sp.get("top_p", 1.0)
        if temperature < _SAMPLING_EPS:
            temperature, top_k = 1.0, 1
        generator = torch.Generator().manual_seed(sp["sampling_seed"]) if "sampling_seed" in sp else self._rng
        stops = sp.get("stop") or []
        ids, output, logprobs = list(prompt), [], []
        finish: dict[str, Any] = {"type": "length", "length": sp.get("max_new_tokens", 128)}
        with self._lock:
            prompt_logits = model(torch.tensor([prompt])).logits[0].float()  # [P, V]
            for _ in range(sp.get("max_new_tokens", 128)):
                logits = model(torch.tensor([ids])).logits[0, -1].float()  # [V]
                token_logprobs = torch.log_softmax(logits / temperature, dim=-1)  # [V]
                token = self._pick(token_logprobs, top_k, top_p, generator)
                output.append(token)
                logprobs.append(token_logprobs[token].item())
                ids.append(token)
                # SGLang's order (Req.update_finish_state): stop string, then EOS, then length, so an
                # EOS as the last allowed token finishes with "stop".
                text = self.tokenizer.decode(output, skip_special_tokens=True) if stops else ""
                matched = next((s for s in stops if s in text), None)
                if matched is not None:
                    finish = {"type": "stop", "matched": matched}
                    break
                if token in self.eos_ids:
                    finish = {"type": "stop", "matched": token}
                    break
                if len(output) >= sp.get("max_new_tokens", 128):
                    break  # finish stays "length"
        text = self.tokenizer.decode(output, skip_special_tokens=sp.get("skip_special_tokens", True))
        if isinstance(finish.get("matched"), str) and not sp.get("no_stop_trim", False):
            text = text[: text.find(finish["matched"])]
        meta: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "finish_reason": finish,
            "prompt_tokens": len(prompt),
            "completion_tokens": len(output),
            "weight_version": "default",
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, output, strict=True)],
        }
        if logprob_start_len == 0:
            prompt_lp = torch.log_softmax(prompt_logits[:-1], dim=-1)  # [P-1, V]
            picked = prompt_lp.gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1).tolist()  # [P-1]
            meta["input_token_logprobs"] = [[None, prompt[0], None]] + [
                [lp, t, None] for lp, t in zip(picked, prompt[1:], strict=True)
            ]
        return {"text": text, "output_ids": output, "meta_info": meta}

    @staticmethod
    def _pick(logprobs: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator) -> int:
        if top_k == 1:
            return int(logprobs.argmax())
        probs = logprobs.exp()  # [V]
        if top_k > 1:
            kth = probs.topk(min(top_k, probs.numel())).values[-1]
            probs = torch.where(probs >= kth, probs, 0.0)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < top_p * probs.sum()
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))


class _BadTensorPayload(ValueError):
    """A tensor route's `serialized_named_tensors` do not match what SGLang's TP workers expect."""


def _same_named_tensors(a: Any, b: Any) -> bool:
    """Whether two unpickled payloads (name -> tensor dicts or (name, tensor) lists) hold equal tensors."""
    pairs_a = list(a.items()) if isinstance(a, dict) else list(a)
    pairs_b = list(b.items()) if isinstance(b, dict) else list(b)
    return [n for n, _ in pairs_a] == [n for n, _ in pairs_b] and all(
        torch.equal(x, y) for (_, x), (_, y) in zip(pairs_a, pairs_b, strict=True)
    )


def _handler_for(server: FakeSGLangServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            route = self.path.split("?", 1)[0]
            status, answer = server.handle(method, route, body)
            data = json.dumps(answer).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and went away

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

    return Handler
