"""Harvest query-performance pairs (design.md §2) from policy checkpoints, rollout logs or the V0 release.

A pair says how one policy checkpoint did on one prompt: `n` sampled rollouts, `successes` of them
verified correct, `score = 2 * successes / n - 1`. The V0 value prior is pretrained on such pairs, one
context pool per (policy, step). Four subcommands of the `harvest` console script:

- `harvest run --config configs/harvest/tiny.yaml` samples `rollouts_per_prompt` responses per
  (checkpoint, prompt) with a rollout engine (`basis.rollout.HFEngine` in process, or
  `basis.sglang_engine.SGLangEngine` on a GPU), scores them with a verifier (`basis.rewards`) and writes
  the pairs as parquet shards `out/data/<policy>/step_<step>/shard-XXXXX.parquet`, then `out/manifest.json`
  LAST (shard paths, row counts, sha256, config, versions). `datasets.load_dataset("parquet",
  data_files=harvest_data_files(out))` and `data_pipelines.pairs.load_pairs(out)` read the result.
- `harvest from-logs --run_dir runs/x --policy NAME --out OUT --window 50` turns a training run's
  rollout records (`<run_dir>/rollouts/step_*-rank*.parquet`) into pairs without new rollouts: records
  of steps 1-50 become the pairs of step 50, 51-100 of step 100, ... (the last window is labelled with the
  run's last step). The output is built in a hidden sibling folder and moved to `out` in one rename,
  so a killed call leaves nothing at `out`, and rerunning the same command completes it.
- `harvest import-v0 --release ../shared/data/v0-release --out OUT` imports the V0 authors' release
  (`data_pipelines.v0_release`, staged the same way; it replaces only a previous import).
- `harvest validate PATH` checks any pairs dataset (schema, ranges, n vs successes, duplicates,
  single-class pools via `data_pipelines.pairs.validate_pairs`; for a harvest folder also the manifest's
  checksums) and exits non-zero on errors.

Interrupt and rerun (`run`): every shard is written to a temporary file and renamed into place
(`os.replace`), then a small checksum record `out/progress/.../shard-XXXXX.json` is written the same way:
sha256, rows, and a fingerprint of everything that decides the shard's rows (sampling and engine
settings, checkpoint key and folder, shard seed, a hash of its prompt ids, texts and answers, prompt
column map, verifier and its options). A rerun whose fingerprint differs is refused, and so is an `out`
that is neither missing, empty nor such a run's output (another tool's files stay untouched). A rerun skips
shards whose record and file agree, and redoes – after reporting it by path – a shard whose file is
missing, unreadable or fails its checksum, that has no record (killed between the two renames), or
whose record is of an older format (its fingerprint cannot vouch for the shard). The manifest is
deleted when work remains and written only once every shard is verified, so a folder with a manifest
is a complete harvest. Shard sampling seeds derive from
`(seed, policy, step, shard index)`, so a resumed run and an uninterrupted one produce byte-identical pair
rows (same machine, engine batch size and library versions).

Choices the source method leaves open (V0 release: 10 rollouts per pair, GRPO checkpoints):
- Every checkpoint is loaded once before any rollout, so a missing or unloadable one fails the run
  before any compute is spent (this costs one extra load per checkpoint).
- Chat prompts are stored in the pair's `prompt` column as their plain text (message contents joined by
  newlines, `basis.tasks.prompt_text`), because the pair contract's prompt is a string.
- `from-logs` pools the rollouts of one prompt over every step of its window (the policy changed inside
  the window; a smaller window trades rollouts per pair for fidelity to one policy).

Run: `harvest run --config configs/harvest/tiny.yaml`, `harvest validate OUT`, `harvest --help`.
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import datasets

from basis.rollout import RolloutEngine, SamplingParams
from data_pipelines.pairs import (
    MANIFEST,
    PAIR_COLUMNS,
    PAIR_FEATURES,
    PROGRESS,
    PairProblem,
    PairsError,
    ShardRecord,
    check_shard_file,
    is_legacy_import,
    is_pairs_output,
    load_and_validate,
    manifest_files,
    manifest_shards,
    pool_key,
    read_json_object,
    sha256_file,
    shown_value,
    staging_folder,
)

MANIFEST_FORMAT = 1
RECORD_FORMAT = 3
"""Format of the per-shard checksum records; 2 added prompt texts, answers, checkpoint path, column map and
verifier / engine options to the fingerprint, 3 a hash of the checkpoint's files. A shard whose record
has another format is harvested again."""
DATA_DIR = "data"
RUN_ENTRIES = frozenset({DATA_DIR, PROGRESS, MANIFEST, f".{MANIFEST}.tmp"})
"""What `run` writes at the top of its output folder (`.manifest.json.tmp`: a manifest being written)."""
ROLLOUT_RECORD_COLUMNS: tuple[str, ...] = ("step", "prompt_id", "prompt", "reward")
_STEP_IN_NAME = re.compile(r"(?:step|checkpoint)[_\-=]?(\d+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")
DEFAULT_SAMPLING = SamplingParams()  # frozen, so a safe shared default


class HarvestError(ValueError):
    """Bad harvest input (checkpoint, prompts, rollout records, output folder); the message names it."""


# --------------------------------------------------------------------------------------------------
# Pure functions


def success_rate(outcomes: Sequence[float]) -> float:
    """Fraction of successful rollouts among `outcomes` (each 0 or 1)."""
    if not outcomes:
        raise ValueError("success_rate needs at least one outcome")
    bad = [o for o in outcomes if o not in (0, 1)]
    if bad:
        raise ValueError(f"outcomes must be 0 or 1, got {bad[:3]}")
    return sum(outcomes) / len(outcomes)


def pair_row(
    policy: str, step: int, prompt_id: str, prompt: str, outcomes: Sequence[float]
) -> dict[str, Any]:
    """One pair of the contract from a prompt's rollout outcomes: `n`, `successes`, `score = 2y - 1`."""
    rate = success_rate(outcomes)
    successes = int(sum(outcomes))
    return {
        "policy": policy,
        "step": int(step),
        "prompt_id": prompt_id,
        "prompt": prompt,
        "n": len(outcomes),
        "successes": successes,
        "score": 2.0 * rate - 1.0,
    }


def shard_seed(seed: int, policy: str, step: int, shard_index: int) -> int:
    """A 31-bit sampling seed of one shard, a stable hash of `(seed, policy, step, shard_index)`."""
    digest = hashlib.sha256(f"{seed}\x1f{policy}\x1f{step}\x1f{shard_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def shard_ranges(num_prompts: int, prompts_per_shard: int) -> list[range]:
    """Consecutive prompt index ranges of at most `prompts_per_shard` prompts."""
    if prompts_per_shard < 1:
        raise ValueError(f"prompts_per_shard must be >= 1, got {prompts_per_shard}")
    return [
        range(start, min(start + prompts_per_shard, num_prompts))
        for start in range(0, num_prompts, prompts_per_shard)
    ]


def window_step(step: int, window: int, last_step: int) -> int:
    """The step that labels `step`'s window: steps 1..w -> w, w+1..2w -> 2w, capped at `last_step`."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 1 <= step <= last_step:
        raise ValueError(f"step must lie in [1, last_step={last_step}], got {step}")
    return min(math.ceil(step / window) * window, last_step)


def step_from_name(name: str) -> int | None:
    """The step in a checkpoint folder name (`step_000050`, `step50`, `checkpoint-200`), or None."""
    match = _STEP_IN_NAME.search(name)
    return int(match.group(1)) if match else None


def path_slug(text: str) -> str:
    """`text` as one safe path component (letters, digits, `._-`; anything else becomes `_`)."""
    slug = re.sub(r"[^A-Za-z0-9._\-]", "_", text).strip(".")
    return slug or "_"


def metric_name(text: str) -> str:
    """`text` with characters MLflow rejects in metric names (`@ ( )` among them) replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", text)


# --------------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class CheckpointSpec:
    """Checkpoints to harvest, as written in the config.

    Args:
        path: A Hugging Face model folder, a glob of them (`runs/x/exports/step_*`), a training run's
            export folder (`runs/x/exports`: every `step_*` in it) or the run folder itself.
        policy: Policy name of the pairs. Default: the run folder's name for trainer exports
            (`runs/grpo-tiny/exports/step_000050` -> `grpo-tiny`), else the model folder's name.
        step: Training step of the pairs. Default: `rl_step` of the export's `basis_export.json`, else
            the number in the folder name (`step_000050`, `checkpoint-200`). Only for a single folder.
    """

    path: str
    policy: str | None = None
    step: int | None = None


@dataclass(frozen=True)
class Checkpoint:
    """One resolved checkpoint: its folder and the (policy, step) key its pairs get."""

    path: Path
    policy: str
    step: int


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _step_folders(folder: Path) -> list[Path]:
    """Model sub-folders named like steps (half-written `*.tmp` exports are ignored), by step."""
    found = [p for p in folder.iterdir() if p.is_dir() and step_from_name(p.name) is not None]
    return sorted(found, key=lambda p: step_from_name(p.name) or 0)


def _expand(spec: CheckpointSpec) -> list[Path]:
    if not spec.path.strip():  # `Path("")` is the current folder
        raise HarvestError(f"checkpoint path {spec.path!r} is empty")
    if _GLOB_CHARS.search(spec.path):
        matches = sorted(Path(p) for p in glob.glob(spec.path))
        folders = [p for p in matches if p.is_dir() and not p.name.endswith(".tmp")]
        if not folders:
            raise HarvestError(f"checkpoint pattern {spec.path!r} matches no folder")
        return sorted(folders, key=lambda p: (str(p.parent), step_from_name(p.name) or 0, p.name))
    path = Path(spec.path)
    if not path.exists():
        raise HarvestError(f"checkpoint path {spec.path!r} does not exist")
    if not path.is_dir():
        raise HarvestError(f"checkpoint path {spec.path!r} is a file; give the model folder")
    if _is_model_folder(path):
        return [path]
    exports = path / "exports" if (path / "exports").is_dir() else path
    folders = _step_folders(exports)
    if not folders:
        raise HarvestError(
            f"checkpoint path {spec.path!r} is neither a model folder (no config.json) nor an export folder "
            "(no step_* folders inside)"
        )
    return folders


def _export_metadata(path: Path) -> dict[str, Any]:
    meta = path / "basis_export.json"
    return read_json_object(meta, HarvestError) if meta.is_file() else {}


def _tag(path: Path, spec: CheckpointSpec, several: bool) -> Checkpoint:
    meta = _export_metadata(path)
    if spec.step is not None:
        if several:
            raise HarvestError(f"checkpoint {spec.path!r} matches several folders; step can only tag one")
        step = spec.step
    elif "rl_step" in meta:
        step = meta["rl_step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise HarvestError(f"{path / 'basis_export.json'}: rl_step must be an int, got {step!r}")
    else:
        parsed = step_from_name(path.name)
        if parsed is None:
            raise HarvestError(
                f"checkpoint {str(path)!r}: cannot tell its step (no basis_export.json, no step in the folder "
                f"name); give it as {{path: {str(path)!r}, step: N}}"
            )
        step = parsed
    if step < 0:
        raise HarvestError(f"checkpoint {str(path)!r}: step must be >= 0, got {step}")
    if spec.policy is not None:
        policy = spec.policy
    elif meta and path.parent.name == "exports":
        policy = path.parent.parent.name
    else:
        policy = path.name
    if not policy.strip():
        raise HarvestError(f"checkpoint {str(path)!r}: empty policy name")
    return Checkpoint(path=path, policy=policy, step=int(step))


def resolve_checkpoints(specs: Sequence[CheckpointSpec | str] | str) -> list[Checkpoint]:
    """Expand paths, globs and export folders into tagged checkpoints, in config order; a lone path or
    glob (`runs/x/exports/step_*`) stands for a list of one.

    Raises:
        HarvestError: naming the path that is missing, matches nothing, has no step, or whose
            (policy, step) key repeats another checkpoint's.
    """
    if isinstance(specs, str):  # iterating it would give its characters
        specs = [specs]
    if not specs:
        raise HarvestError("checkpoints: the list is empty")
    resolved: list[Checkpoint] = []
    for spec in specs:
        spec = CheckpointSpec(path=spec) if isinstance(spec, str) else spec
        folders = _expand(spec)
        resolved += [_tag(folder, spec, several=len(folders) > 1) for folder in folders]
    seen: dict[tuple[str, int], Path] = {}
    slugs: dict[str, str] = {}
    for checkpoint in resolved:
        key = (checkpoint.policy, checkpoint.step)
        if key in seen:
            raise HarvestError(
                f"checkpoints {str(seen[key])!r} and {str(checkpoint.path)!r} are both "
                f"{pool_key(*key)}; tag them with different policy names or steps"
            )
        seen[key] = checkpoint.path
        slug = path_slug(checkpoint.policy)
        if slugs.setdefault(slug, checkpoint.policy) != checkpoint.policy:
            raise HarvestError(
                f"policy names {slugs[slug]!r} and {checkpoint.policy!r} map to the same folder name {slug!r}"
            )
    return resolved


def load_checkpoint(checkpoint: Checkpoint) -> tuple[Any, Any]:
    """Load a checkpoint's model and tokenizer with `basis.policy_io.load_policy`, in eval mode.

    Raises:
        HarvestError: naming the checkpoint when it is not a loadable causal LM (any loader error).
    """
    from basis.policy_io import load_policy

    try:
        model, tokenizer = load_policy(str(checkpoint.path), None)
    except Exception as err:  # config, weights and tokenizer loaders raise many types
        raise HarvestError(
            f"checkpoint {str(checkpoint.path)!r} ({pool_key(checkpoint.policy, checkpoint.step)}) is not "
            f"loadable: {err}"
        ) from err
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise HarvestError(
            f"checkpoint {str(checkpoint.path)!r}: tokenizer has neither a pad nor an EOS token"
        )
    model.eval()
    return model, tokenizer


def _check_prompt_lengths(
    checkpoint: Checkpoint, model: Any, tokenizer: Any, prompt_rows: Sequence[Any], max_new_tokens: int
) -> None:
    """Refuse a prompt that leaves the checkpoint's context no room for `max_new_tokens`, as the trainer
    does: its rollouts would run past the context and be recorded as genuine failures. The context is the
    HF config's `max_position_embeddings` (a model without one is not checked)."""
    from basis.tasks import render_prompt

    context = getattr(model.config, "max_position_embeddings", None)
    if context is None:
        return
    limit = context - max_new_tokens
    texts = [render_prompt(tokenizer, row.prompt) for row in prompt_rows]
    for row, ids in zip(prompt_rows, tokenizer(texts, add_special_tokens=False)["input_ids"]):
        if (length := len(ids)) > limit:
            raise HarvestError(
                f"prompt {row.prompt_id!r} has {length} tokens, more than the {limit} that the context of "
                f"checkpoint {str(checkpoint.path)!r} ({context}) leaves after sampling.max_new_tokens="
                f"{max_new_tokens}; filter long prompts or lower max_new_tokens"
            )


# --------------------------------------------------------------------------------------------------
# Shards: atomic writes, checksum records, verification


def _write_atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_pairs_shard(path: Path, rows: list[dict[str, Any]]) -> str:
    """Write pair rows to `path` as parquet via a temporary file and `os.replace`; return its sha256."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # not *.parquet, so no reader ever picks it up
    table = datasets.Dataset.from_list(rows, features=PAIR_FEATURES).data.table  # keeps the features metadata
    with tmp.open("wb") as handle:
        pq.write_table(table, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


@dataclass(frozen=True)
class ShardPlan:
    """One shard to produce: the prompts `prompt_range` of `checkpoint`, sampled with `seed`."""

    checkpoint: Checkpoint
    index: int
    prompt_range: range
    seed: int
    fingerprint: dict[str, Any]

    @property
    def relative_path(self) -> str:
        c = self.checkpoint
        return f"{DATA_DIR}/{path_slug(c.policy)}/step_{c.step:06d}/shard-{self.index:05d}.parquet"

    def record_path(self, out: Path) -> Path:
        return out / PROGRESS / Path(self.relative_path).relative_to(DATA_DIR).with_suffix(".json")


def _fingerprint_mismatch(recorded: dict[str, Any], expected: dict[str, Any]) -> str | None:
    for key in sorted(set(recorded) | set(expected)):
        if recorded.get(key) != expected.get(key):
            return f"{key}: recorded {recorded.get(key)!r}, now {expected.get(key)!r}"
    return None


def shard_status(out: Path, plan: ShardPlan) -> tuple[ShardRecord | None, str | None]:
    """`(record, None)` for a verified finished shard, `(None, reason)` for one to redo, `(None, None)`
    for one never started.

    Raises:
        HarvestError: when the shard was produced with other settings (another harvest in `out`).
    """
    data, record_file = out / plan.relative_path, plan.record_path(out)
    if not record_file.is_file():
        return None, ("shard without a checksum record (the run was killed while writing it)"
                      if data.exists() else None)  # fmt: skip
    try:
        record = json.loads(record_file.read_text())
        sha256, rows, fingerprint = record["sha256"], record["rows"], record["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return None, f"checksum record {record_file} is unreadable ({err!r})"
    found_format = record.get("format", 1)  # format 1 records had no "format" field
    if found_format != RECORD_FORMAT:  # its fingerprint cannot vouch for the shard: harvest it afresh
        return None, (
            f"checksum record {record_file} has format {found_format}, not {RECORD_FORMAT} (whose fingerprint "
            "also covers prompt texts, answers, checkpoint path and contents, and verifier options)"
        )
    mismatch = _fingerprint_mismatch(fingerprint, plan.fingerprint)
    if mismatch is not None:
        raise HarvestError(
            f"{out} already holds {data} harvested with other settings ({mismatch}); "
            "use a new output folder or delete this one"
        )
    problem = check_shard_file(data, sha256, rows)
    if problem is not None:
        return None, problem
    return ShardRecord(plan.relative_path, rows, sha256, plan.seed), None


def _write_record(out: Path, plan: ShardPlan, record: ShardRecord) -> None:
    payload = {
        "format": RECORD_FORMAT,
        "sha256": record.sha256,
        "rows": record.rows,
        "fingerprint": plan.fingerprint,
    }
    _write_atomic_bytes(plan.record_path(out), (json.dumps(payload, indent=1) + "\n").encode())


def read_shards(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The `policy, step, n, successes` columns of finished shards as rows (for summaries)."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in paths:
        rows += pq.read_table(path, columns=["policy", "step", "n", "successes"]).to_pylist()
    return rows


def harvest_data_files(out: str | Path) -> list[str]:
    """The shard files a finished harvest's manifest lists, in order (for `datasets.load_dataset`), each
    checked against its recorded sha256 and row count (`data_pipelines.pairs.manifest_files`).

    Raises:
        HarvestError: when `out` has no manifest (the harvest is not finished), it lists no shards, or a
            shard changed since.
    """
    return [str(path) for path in manifest_files(out, HarvestError)]


# --------------------------------------------------------------------------------------------------
# Manifest and summaries


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("basis-rl", "torch", "transformers", "datasets", "pyarrow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class CheckpointSummary:
    """Per-checkpoint result: pairs and mean success rate (mean of successes / n)."""

    policy: str
    step: int
    path: str
    pairs: int
    mean_success: float


def checkpoint_summaries(
    rows: Iterable[dict[str, Any]], paths: dict[tuple[str, int], str]
) -> list[CheckpointSummary]:
    """Mean success rate and pair count per (policy, step) key, in the order of `paths`."""
    rates: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        rates[(row["policy"], row["step"])].append(row["successes"] / row["n"])
    return [
        CheckpointSummary(policy, step, path, len(rates[(policy, step)]),
                          sum(rates[(policy, step)]) / max(len(rates[(policy, step)]), 1))
        for (policy, step), path in paths.items()
    ]  # fmt: skip


def manifest_payload(
    kind: Literal["rollouts", "from-logs"],
    rows: int,
    shards: Sequence[ShardRecord],
    summaries: Sequence[CheckpointSummary],
    config: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of a finished pairs dataset: shards with rows and sha256, per-pool means, config, versions."""
    return {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "columns": list(PAIR_COLUMNS),
        "rows": rows,
        "shards": [asdict(shard) for shard in shards],
        "checkpoints": [asdict(summary) for summary in summaries],
        "config": config,
        "versions": _versions(),
    }


def write_manifest(out: Path, payload: dict[str, Any]) -> Path:
    """Write `out/manifest.json` atomically (the last file a harvest writes)."""
    path = out / MANIFEST
    _write_atomic_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
    return path


def success_histogram(rows: Iterable[dict[str, Any]], rollouts_per_prompt: int | None = None) -> Any:
    """Matplotlib figure: the per-prompt success rates of each (policy, step) pool, one panel per pool.

    Args:
        rows: Pairs (at least `policy, step, n, successes`).
        rollouts_per_prompt: `n` of every pair, for one bin per possible rate; None takes the pairs'
            common `n`, or 10 bins when it varies.
    """
    from matplotlib.figure import Figure

    rates: dict[str, list[float]] = defaultdict(list)
    sizes = set()
    for row in rows:
        rates[pool_key(row["policy"], row["step"])].append(row["successes"] / row["n"])
        sizes.add(row["n"])
    if rollouts_per_prompt is None:
        rollouts_per_prompt = sizes.pop() if len(sizes) == 1 else 10
    labels = list(rates)
    cols = min(4, max(len(labels), 1))
    nrows = max(math.ceil(len(labels) / cols), 1)
    fig = Figure(figsize=(3.2 * cols, 2.6 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
    n = rollouts_per_prompt
    edges = [(k - 0.5) / n for k in range(n + 2)]  # one bin per possible successes / n value
    for ax, label in zip(axes.flat, labels):
        values = rates[label]
        ax.hist(values, bins=edges, color="tab:blue", edgecolor="white")
        ax.set_title(f"{label}\nmean {sum(values) / len(values):.3f}, {len(values)} prompts", fontsize=8)
        ax.set_xlabel("success rate")
    for ax in list(axes.flat)[len(labels) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("prompts")
    fig.tight_layout()
    return fig


def _log_to_mlflow(
    experiment: str,
    run_name: str | None,
    params: dict[str, Any],
    metrics: dict[str, float],
    summaries: Sequence[CheckpointSummary],
    rows: Sequence[dict[str, Any]],
    rollouts_per_prompt: int | None,
    manifest: Path,
) -> str:
    """One MLflow run with params, metrics, per-checkpoint mean success (a series over step per policy),
    the success-rate histogram PNG and the manifest; returns the run id."""
    import mlflow

    from basis.tracking import mlflow_run

    with mlflow_run(experiment, run_name=run_name) as run:
        mlflow.log_params({key: str(value)[:5000] for key, value in params.items()})  # MLflow caps values
        mlflow.log_metrics(metrics)
        for summary in summaries:
            name = metric_name(f"mean_success/{summary.policy}")
            mlflow.log_metric(name, summary.mean_success, step=summary.step)
        mlflow.log_figure(success_histogram(rows, rollouts_per_prompt), "success_rate_histogram.png")
        mlflow.log_dict([asdict(s) for s in summaries], "per_checkpoint.json")
        mlflow.log_artifact(str(manifest))
        return run.info.run_id


# --------------------------------------------------------------------------------------------------
# `harvest run`


@dataclass
class HarvestSummary:
    """What a `run` / `from_logs` call produced."""

    out: str
    manifest: str
    pairs: int
    new_pairs: int = 0
    rollouts: int = 0
    seconds: float = 0.0
    pairs_per_minute: float = 0.0
    tokens_per_s: float = 0.0
    checkpoints: list[CheckpointSummary] = field(default_factory=list)
    skipped_shards: int = 0
    redone_shards: list[str] = field(default_factory=list)
    verifier_timeouts: int = 0
    mlflow_run_id: str | None = None

    def __str__(self) -> str:
        lines = [f"{self.out}: {self.pairs} pairs ({self.new_pairs} new, {self.rollouts} rollouts) in "
                 f"{self.seconds:.1f} s: {self.pairs_per_minute:.0f} pairs/min, {self.tokens_per_s:.0f} tokens/s"]  # fmt: skip
        if self.skipped_shards or self.redone_shards:
            lines.append(
                f"resumed: {self.skipped_shards} shards verified and kept, {len(self.redone_shards)} redone"
            )
        if self.verifier_timeouts:
            lines.append(_timeouts_message(self.verifier_timeouts, self.rollouts))
        lines.append(f"{'policy':<24} {'step':>7} {'pairs':>6} {'mean success':>12}")
        lines += [
            f"{c.policy:<24} {c.step:>7} {c.pairs:>6} {c.mean_success:>12.3f}" for c in self.checkpoints
        ]
        lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


def _prompt_rows(prompts: str, split: str, column_map: dict[str, str] | None, limit: int | None) -> list[Any]:
    from basis.data import rows_from_dataset
    from basis.tasks import load_prompts

    dataset = load_prompts(prompts, split=split, column_map=column_map, limit=limit)
    if len(dataset) == 0:
        raise HarvestError(f"prompts {prompts!r} (split {split!r}): no prompt rows")
    return rows_from_dataset(dataset)


def _check_run_arguments(
    rollouts_per_prompt: int,
    num_prompts: int | None,
    sampling: SamplingParams,
    batch_size: int,
    engine: str,
    engine_options: dict[str, Any] | None,
) -> None:
    if rollouts_per_prompt < 1:
        raise HarvestError(f"rollouts_per_prompt must be >= 1, got {rollouts_per_prompt}")
    if num_prompts is not None and num_prompts < 1:
        raise HarvestError(f"num_prompts must be >= 1 or None, got {num_prompts}")
    if sampling.seed is not None:
        raise HarvestError("sampling.seed must stay unset: shard seeds derive from `seed`")
    if batch_size < 1:
        raise HarvestError(f"batch_size must be >= 1, got {batch_size}")
    if engine not in ("hf", "sglang"):
        raise HarvestError(f"engine must be 'hf' or 'sglang', got {engine!r}")
    if engine == "hf" and engine_options:
        raise HarvestError(f"engine_options {sorted(engine_options)} apply to engine 'sglang' only")


def _check_answers(verifier: Any, rows: Sequence[Any], prompts: str) -> None:
    """Run the verifier once on empty responses so answers it cannot read fail before any rollout."""
    try:
        verifier([""] * len(rows), [row.answer for row in rows])
    except ValueError as err:
        raise HarvestError(f"prompts {prompts!r}: the verifier rejects an answer: {err}") from err


def _plan(
    checkpoints: Sequence[Checkpoint],
    prompt_rows: Sequence[Any],
    prompts_per_shard: int,
    seed: int,
    settings: dict[str, Any],
) -> list[ShardPlan]:
    """One plan per (checkpoint, shard), each with the fingerprint of everything that decides its rows:
    `settings`, the checkpoint (key, folder and a hash of its files), the shard seed, and a hash of its
    prompts (ids, texts, answers)."""
    ranges = shard_ranges(len(prompt_rows), prompts_per_shard)
    prompt_hashes = [_prompts_sha256([prompt_rows[i] for i in prompt_range]) for prompt_range in ranges]
    weights = {checkpoint.path: _folder_sha256(checkpoint.path) for checkpoint in checkpoints}
    plans = []
    for checkpoint in checkpoints:
        for index, prompt_range in enumerate(ranges):
            sseed = shard_seed(seed, checkpoint.policy, checkpoint.step, index)
            fingerprint = {
                **settings,
                "policy": checkpoint.policy,
                "step": checkpoint.step,
                "checkpoint": str(checkpoint.path.resolve()),
                "checkpoint_sha256": weights[checkpoint.path],  # the same folder retrained differently
                "shard": index,
                "seed": sseed,
                "prompts_sha256": prompt_hashes[index],
            }
            plans.append(ShardPlan(checkpoint, index, prompt_range, sseed, fingerprint))
    return plans


def _folder_sha256(folder: Path) -> str:
    """sha256 over the relative names and contents of every file under a checkpoint folder (one read
    of the weights per harvest, seconds for a multi-gigabyte model: small next to harvesting it)."""
    digest = hashlib.sha256()
    for file in sorted(f for f in Path(folder).rglob("*") if f.is_file()):
        digest.update(f"\x1f{file.relative_to(folder)}\x1f".encode())
        with file.open("rb") as content:
            while chunk := content.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _prompts_sha256(rows: Sequence[Any]) -> str:
    """sha256 of the prompt ids, prompts (string or chat list) and answers of `rows`, in order."""
    content = [[row.prompt_id, row.prompt, row.answer] for row in rows]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def _check_output_folder(out: Path, plans: Sequence[ShardPlan]) -> None:
    """Refuse an `out` that `run` would mix its files into: it may be missing, empty, or a harvest run's
    own output (finished or interrupted: `progress/` or a rollouts manifest) of these `plans`.

    Raises:
        HarvestError: naming `out` and a few of the entries `run` did not write (another tool's files),
            another writer's pairs output, or shards of a harvest with other checkpoints or shard sizes.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise HarvestError(f"output folder {out} is a file; choose a folder")
    manifest = out / MANIFEST
    kind = read_json_object(manifest, HarvestError).get("kind") if manifest.is_file() else None
    if kind not in (None, "rollouts"):
        raise HarvestError(f"{out} holds a {kind!r} pairs dataset, not a rollout harvest; use a new folder")
    if kind == "rollouts" or (out / PROGRESS).is_dir():  # a run's output (`progress/` comes before any shard)
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES)
        if foreign:
            raise HarvestError(
                f"output folder {out} holds a harvest run and entries it did not write ({foreign[:3]}); move "
                "them out (or choose a new folder)"
            )
    else:  # name a few of its files (or empty folders) without listing a large tree
        leaves = (p for p in out.rglob("*") if not p.is_dir() or not any(p.iterdir()))
        found = sorted(str(p.relative_to(out)) for p in itertools.islice(leaves, 3))
        if found:
            raise HarvestError(
                f"output folder {out} is not empty and not a harvest run's output (it holds {found}, no "
                f"{PROGRESS}/); choose a new folder (or delete this one): `run` resumes only its own output"
            )
    planned = {plan.relative_path for plan in plans}
    strays = sorted(
        str(p.relative_to(out)) for p in (out / DATA_DIR).rglob("*.parquet") if str(p.relative_to(out)) not in planned
    ) if (out / DATA_DIR).is_dir() else []  # fmt: skip
    if strays:
        raise HarvestError(
            f"{out} holds shards that are not part of this harvest ({strays[:3]}...); a different harvest wrote "
            "there – use a new output folder or delete this one"
        )


def _load_for_engine(engine: str, checkpoint: Checkpoint) -> tuple[Any, Any]:
    """(model, tokenizer) for the HF engine; (None, tokenizer) for SGLang, which loads the weights itself."""
    if engine == "hf":
        return load_checkpoint(checkpoint)
    from transformers import AutoTokenizer

    return None, AutoTokenizer.from_pretrained(str(checkpoint.path))


def _make_engine(
    engine: str, options: dict[str, Any], checkpoint: Checkpoint, model: Any, tokenizer: Any, batch_size: int
) -> RolloutEngine:
    if engine == "hf":
        from basis.rollout import HFEngine

        return HFEngine(model, tokenizer, max_batch_size=batch_size)
    from basis.sglang_engine import SGLangEngine

    return SGLangEngine(str(checkpoint.path), **options)


@dataclass
class ShardWork:
    """Outcome of producing a harvest's shards: every finished shard (plan order) and what this call did."""

    records: list[ShardRecord] = field(default_factory=list)
    skipped: int = 0
    redone: list[str] = field(default_factory=list)
    new_pairs: int = 0
    rollouts: int = 0
    tokens: int = 0
    generate_seconds: float = 0.0
    verifier_timeouts: int = 0


def _verifier_timeouts(verifier: Any) -> int:
    """Items the verifier gave up on so far (timed out or crashed), all scored 0; 0 for in-process ones."""
    failures = getattr(verifier, "failures", None)  # MathVerifier's cumulative counts
    return 0 if failures is None else failures.timeouts + failures.crashed


def _timeouts_message(timeouts: int, rollouts: int) -> str:
    return (
        f"verifier: {timeouts} of {rollouts} new rollouts timed out or crashed and scored 0, so their "
        "pairs undercount successes; if more than a handful timed out, raise verifier_options.timeout_s "
        "in a new --out folder"
    )


def _produce_shards(
    out: Path,
    plans: Sequence[ShardPlan],
    prompt_rows: Sequence[Any],
    verifier: Any,
    engine: str,
    options: dict[str, Any],
    batch_size: int,
    rollouts_per_prompt: int,
    sampling: SamplingParams,
    progress: bool,
) -> ShardWork:
    """Verify finished shards, report and redo bad ones, produce the missing ones (checkpoint by checkpoint)."""
    from tqdm.auto import tqdm

    from basis.tasks import render_prompt

    statuses = [shard_status(out, plan) for plan in plans]  # raises before any work on a settings mismatch
    work = ShardWork()
    timeouts_before = _verifier_timeouts(verifier)
    finished = {
        plan.relative_path: record for plan, (record, _) in zip(plans, statuses) if record is not None
    }
    work.skipped = len(finished)
    for plan, (_, reason) in zip(plans, statuses):
        if reason is not None:
            print(f"harvest: redoing shard {out / plan.relative_path}: {reason}", file=sys.stderr)
            work.redone.append(str(out / plan.relative_path))
    pending: dict[Checkpoint, list[ShardPlan]] = defaultdict(list)
    for plan in plans:
        if plan.relative_path not in finished:
            pending[plan.checkpoint].append(plan)
    if pending:
        (out / MANIFEST).unlink(missing_ok=True)  # no manifest while the harvest is incomplete
    bar = tqdm(
        total=sum(len(p.prompt_range) for p in plans),
        initial=sum(len(p.prompt_range) for p in plans if p.relative_path in finished),
        unit="pair",
        desc="harvest",
        disable=not progress,
    )
    for checkpoint, group in pending.items():
        bar.set_postfix_str(pool_key(checkpoint.policy, checkpoint.step))
        model, tokenizer = _load_for_engine(engine, checkpoint)
        rollout_engine = _make_engine(engine, options, checkpoint, model, tokenizer, batch_size)
        try:
            needed = {prompt_rows[i].prompt_id: prompt_rows[i] for plan in group for i in plan.prompt_range}
            prompt_ids = {
                pid: tokenizer(render_prompt(tokenizer, row.prompt), add_special_tokens=False)["input_ids"]
                for pid, row in needed.items()
            }
            for plan in group:
                begin = time.perf_counter()
                rows, tokens = _generate_shard(
                    rollout_engine, verifier, plan, prompt_rows, prompt_ids, rollouts_per_prompt, sampling
                )
                work.generate_seconds += time.perf_counter() - begin
                plan.record_path(out).unlink(missing_ok=True)  # a stale record must never vouch for new bytes
                sha256 = write_pairs_shard(out / plan.relative_path, rows)
                record = ShardRecord(plan.relative_path, len(rows), sha256, plan.seed)
                _write_record(out, plan, record)
                finished[plan.relative_path] = record
                work.new_pairs += len(rows)
                work.rollouts += len(rows) * rollouts_per_prompt
                work.tokens += tokens
                bar.update(len(rows))
        finally:
            if engine == "sglang":
                rollout_engine.close()  # type: ignore[attr-defined]  # SGLangEngine owns server processes
    bar.close()
    work.records = [finished[plan.relative_path] for plan in plans]
    work.verifier_timeouts = _verifier_timeouts(verifier) - timeouts_before
    if work.verifier_timeouts:
        warnings.warn(_timeouts_message(work.verifier_timeouts, work.rollouts), stacklevel=2)
    return work


def _generate_shard(
    engine: RolloutEngine,
    verifier: Any,
    plan: ShardPlan,
    prompt_rows: Sequence[Any],
    prompt_ids: dict[str, list[int]],
    rollouts_per_prompt: int,
    sampling: SamplingParams,
) -> tuple[list[dict[str, Any]], int]:
    """Sample, verify and aggregate one shard; returns its pair rows and the response tokens sampled."""
    from basis.rewards import binary_rewards  # math-verify and sympy: only where rollouts are scored
    from basis.tasks import prompt_text

    rows = [prompt_rows[i] for i in plan.prompt_range]
    requests = [prompt_ids[row.prompt_id] for row in rows for _ in range(rollouts_per_prompt)]
    completions = engine.generate(requests, replace(sampling, seed=plan.seed))
    answers = [row.answer for row in rows for _ in range(rollouts_per_prompt)]
    rewards = binary_rewards(  # len = prompts x rollouts; a success is 0 or 1
        verifier([c.text for c in completions], answers).rewards,
        getattr(verifier, "__name__", type(verifier).__name__),
    ).tolist()
    checkpoint = plan.checkpoint
    pairs = [
        pair_row(checkpoint.policy, checkpoint.step, row.prompt_id, prompt_text(row.prompt),
                 rewards[i * rollouts_per_prompt : (i + 1) * rollouts_per_prompt])
        for i, row in enumerate(rows)
    ]  # fmt: skip
    return pairs, sum(len(c.token_ids) for c in completions)


def run(
    *,
    checkpoints: list[CheckpointSpec | str] | str,
    prompts: str,
    out: str,
    prompt_split: str = "train",
    prompt_column_map: dict[str, str] | None = None,
    num_prompts: int | None = None,
    rollouts_per_prompt: int = 10,
    sampling: SamplingParams = DEFAULT_SAMPLING,
    engine: Literal["hf", "sglang"] = "hf",
    engine_options: dict[str, Any] | None = None,
    batch_size: int = 256,
    prompts_per_shard: int = 50,
    verifier: str = "arithmetic",
    verifier_options: dict[str, Any] | None = None,
    seed: int = 0,
    experiment: str | None = "harvest",
    run_name: str | None = None,
    progress: bool = True,
    torch_threads: int | None = 1,
) -> HarvestSummary:
    """Harvest query-performance pairs: `rollouts_per_prompt` rollouts per (checkpoint, prompt).

    Args:
        checkpoints: Policy checkpoints (`CheckpointSpec` or a plain path / glob / export folder), each
            tagged with a policy name and step; one path or glob may stand alone
            (`--checkpoints 'runs/x/exports/step_*'`).
        prompts: Prompt dataset in the prompt-row contract (design.md §2): a parquet/jsonl file, a folder
            with `{split}.parquet`, or a `basis.tasks` preset name. It must have answers.
        out: Output folder (shards under `data/`, checksum records under `progress/`, `manifest.json`).
        prompt_split: Split of `prompts` to read.
        prompt_column_map: Contract field -> source column, for datasets with other column names.
        num_prompts: Use only the first `num_prompts` prompts (None: all).
        rollouts_per_prompt: Rollouts `n` per pair (V0 release: 10).
        sampling: Sampling parameters (leave `seed` unset: shard seeds derive from `seed`).
        engine: "hf" (`basis.rollout.HFEngine`, in process, CPU or GPU) or "sglang"
            (`basis.sglang_engine.SGLangEngine` started per checkpoint; GPU, and seeded only when the
            engine runs with `enable_deterministic_inference`).
        engine_options: Keyword arguments of `SGLangEngine` besides `model_path` (e.g. `engine_kwargs`);
            `server_url` needs a single checkpoint, the one the server serves.
        batch_size: Sequences per `generate` call of the HF engine (rollouts of many prompts together).
        prompts_per_shard: Prompts per parquet shard, the unit of resumption.
        verifier: Verifier name in `basis.rewards.VERIFIERS` ("arithmetic", "math") or an import path
            "package.module:Factory" of your own (`basis.rewards.get_verifier`).
        verifier_options: Keyword arguments of the verifier's constructor (e.g. `{timeout_s: 10.0}` for
            "math"); they can change scores, so a resumed harvest must use the same ones.
        seed: Base seed; shard seeds derive from (seed, policy, step, shard index).
        experiment: MLflow experiment to log into; None disables MLflow logging.
        run_name: MLflow run name (default: the output folder's name).
        progress: Show a tqdm progress bar (pairs).
        torch_threads: torch intra-op threads (None keeps torch's default; 1 is fastest on a busy 2-core
            machine).

    Returns:
        A `HarvestSummary` (pairs, throughput, per-checkpoint mean success, resumed/redone shards).

    Raises:
        HarvestError: bad checkpoints, prompts without answers, an output folder holding another
            harvest or anything but this harvest's (resumable) output; `ValueError` from
            `basis.tasks.load_prompts` for bad prompt rows.
    """
    start = time.perf_counter()
    _check_run_arguments(rollouts_per_prompt, num_prompts, sampling, batch_size, engine, engine_options)
    options = dict(engine_options or {})
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    from basis.rewards import MathVerifier, get_verifier

    out_dir = Path(out)
    resolved = resolve_checkpoints(checkpoints)
    if engine == "sglang" and options.get("server_url") and len(resolved) > 1:
        raise HarvestError(
            f"engine_options.server_url serves one checkpoint, but {len(resolved)} are listed; drop server_url "
            "to start an in-process engine per checkpoint"
        )
    prompt_rows = _prompt_rows(prompts, prompt_split, prompt_column_map, num_prompts)
    verifier_options = dict(verifier_options or {})
    settings = {  # everything that decides a shard's rows, recorded with each shard (besides _plan's)
        "rollouts_per_prompt": rollouts_per_prompt,
        "sampling": asdict(sampling) | {"stop": list(sampling.stop)},
        "engine": engine,
        "batch_size": batch_size if engine == "hf" else None,
        # The sglang.Engine arguments change samples; server_url, timeouts and retries do not.
        "engine_kwargs": options.get("engine_kwargs"),
        "prompt_column_map": prompt_column_map,
        "verifier": verifier,
        "verifier_options": verifier_options,
    }
    plans = _plan(resolved, prompt_rows, prompts_per_shard, seed, settings)
    try:
        score = get_verifier(verifier, **verifier_options)
    except TypeError as err:  # an option the verifier's constructor does not take
        raise HarvestError(
            f"verifier_options {verifier_options} do not fit verifier {verifier!r}: {err}"
        ) from err
    try:
        _check_answers(score, prompt_rows, prompts)
        for checkpoint in resolved:  # every checkpoint must load and hold every prompt before any rollout
            model, tokenizer = load_checkpoint(checkpoint)
            _check_prompt_lengths(checkpoint, model, tokenizer, prompt_rows, sampling.max_new_tokens)
            del model
        _check_output_folder(out_dir, plans)
        # before the first shard: readers then treat the folder as an unfinished harvest until the manifest
        (out_dir / PROGRESS).mkdir(parents=True, exist_ok=True)
        work = _produce_shards(
            out_dir,
            plans,
            prompt_rows,
            score,
            engine,
            options,
            batch_size,
            rollouts_per_prompt,
            sampling,
            progress,
        )
    finally:
        if isinstance(score, MathVerifier):
            score.close()
    pairs = read_shards([out_dir / r.path for r in work.records])
    summaries = checkpoint_summaries(pairs, {(c.policy, c.step): str(c.path) for c in resolved})
    seconds = time.perf_counter() - start
    config = {
        "checkpoints": [{"path": str(c.path), "policy": c.policy, "step": c.step} for c in resolved],
        "prompts": prompts,
        "prompt_split": prompt_split,
        "num_prompts": len(prompt_rows),
        "prompts_per_shard": prompts_per_shard,
        "seed": seed,
        "engine_options": options,
        **settings,
    }
    manifest = write_manifest(
        out_dir, manifest_payload("rollouts", len(pairs), work.records, summaries, config)
    )
    summary = HarvestSummary(
        out=str(out_dir),
        manifest=str(manifest),
        pairs=len(pairs),
        new_pairs=work.new_pairs,
        rollouts=work.rollouts,
        seconds=seconds,
        pairs_per_minute=60.0 * work.new_pairs / seconds,
        tokens_per_s=work.tokens / work.generate_seconds if work.generate_seconds else 0.0,
        checkpoints=summaries,
        skipped_shards=work.skipped,
        redone_shards=work.redone,
        verifier_timeouts=work.verifier_timeouts,
    )
    if experiment is not None:
        summary.mlflow_run_id = _log_to_mlflow(
            experiment,
            run_name or out_dir.name,
            {
                "checkpoints": json.dumps(config["checkpoints"]),
                "num_checkpoints": len(resolved),
                "prompts": prompts,
                "prompt_split": prompt_split,
                "prompt_column_map": json.dumps(prompt_column_map),
                "num_prompts": len(prompt_rows),
                "prompts_per_shard": prompts_per_shard,
                "rollouts_per_prompt": rollouts_per_prompt,
                **{f"sampling.{k}": v for k, v in asdict(sampling).items() if k != "seed"},
                "engine": engine,
                "batch_size": batch_size,
                "verifier": verifier,
                "seed": seed,
                "out": str(out_dir),
            },
            {
                "pairs": float(len(pairs)),
                "new_pairs": float(work.new_pairs),
                "rollouts": float(work.rollouts),
                "pairs_per_minute": summary.pairs_per_minute,
                "tokens_per_s": summary.tokens_per_s,
                "seconds": seconds,
                "shards_skipped": float(summary.skipped_shards),
                "shards_redone": float(len(work.redone)),
                "verifier_timeouts": float(work.verifier_timeouts),
            },
            summaries,
            pairs,
            rollouts_per_prompt,
            manifest,
        )
    return summary


# --------------------------------------------------------------------------------------------------
# `harvest from-logs`


def _record_prompt_text(prompt: str) -> str:
    """The trainer stores chat prompts as JSON message lists; pairs keep their plain text."""
    from basis.tasks import prompt_text

    if prompt.startswith("["):
        try:
            messages = json.loads(prompt)
        except json.JSONDecodeError:
            return prompt
        if (isinstance(messages, list) and messages
                and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):  # fmt: skip
            return prompt_text(messages)
    return prompt


def read_rollout_records(folder: Path) -> list[tuple[int, str, str, float, str, int]]:
    """`(step, prompt_id, prompt, reward, file, row)` of every record in a folder of trainer rollout files.

    Raises:
        HarvestError: naming the file (and row, field) of an unreadable file, a missing column, a step
            below 1, an empty prompt id, or a reward other than 0/1; naming `folder` when its files hold
            no rows at all.
    """
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise HarvestError(f"{folder}: no rollout record files (*.parquet); expected <run_dir>/rollouts/")
    records = []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError on damaged files
            raise HarvestError(f"{file}: not a readable parquet file ({err})") from err
        missing = [c for c in ROLLOUT_RECORD_COLUMNS if c not in table.column_names]
        if missing:
            raise HarvestError(
                f"{file}: missing column(s) {missing} of the rollout records (columns: {table.column_names})"
            )
        columns = table.select(list(ROLLOUT_RECORD_COLUMNS)).to_pydict()
        for row, (step, prompt_id, prompt, reward) in enumerate(
            zip(*(columns[c] for c in ROLLOUT_RECORD_COLUMNS))
        ):
            where = f"{file}: row {row}"
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                raise HarvestError(f"{where}, field 'step': expected an int >= 1, got {step!r}")
            if not isinstance(prompt_id, str) or not prompt_id:
                raise HarvestError(
                    f"{where}, field 'prompt_id': expected a non-empty string, got {prompt_id!r}"
                )
            if not isinstance(prompt, str) or not prompt.strip():
                raise HarvestError(f"{where}, field 'prompt': expected a non-empty string, got {prompt!r}")
            if reward not in (0, 1):
                raise HarvestError(
                    f"{where}, field 'reward': expected 0 or 1 (a verifier reward), got {shown_value(reward)}"
                )
            records.append((step, prompt_id, prompt, float(reward), str(file), row))
    if not records:
        raise HarvestError(f"{folder}: its {len(files)} rollout record file(s) hold no rows")
    return records


def pairs_from_records(
    records: Sequence[tuple[int, str, str, float, str, int]], policy: str, window: int
) -> list[dict[str, Any]]:
    """Group rollout records by (window step, prompt id) into pairs, sorted by (step, prompt id).

    Raises:
        HarvestError: when one prompt id carries two different prompt texts (naming both rows).
        ValueError: when `records` is empty.
    """
    if not records:
        raise ValueError("pairs_from_records needs at least one record")
    last_step = max(record[0] for record in records)
    outcomes: dict[tuple[int, str], list[float]] = defaultdict(list)
    texts: dict[str, tuple[str, str, int]] = {}
    for step, prompt_id, prompt, reward, file, row in records:
        text, first_file, first_row = texts.setdefault(prompt_id, (prompt, file, row))
        if text != prompt:
            raise HarvestError(
                f"{file}: row {row}, field 'prompt': prompt id {prompt_id!r} has another text in {first_file} row {first_row}"
            )
        outcomes[(window_step(step, window, last_step), prompt_id)].append(reward)
    return [
        pair_row(policy, step, prompt_id, _record_prompt_text(texts[prompt_id][0]), values)
        for (step, prompt_id), values in sorted(outcomes.items())
    ]


def _require_empty(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise HarvestError(f"output folder {out} is a file; choose a folder")
    if out.exists() and any(out.iterdir()):
        raise HarvestError(f"output folder {out} is not empty; choose a new folder (or delete this one)")


def from_logs(
    *,
    run_dir: str,
    policy: str,
    out: str,
    window: int = 50,
    experiment: str | None = "harvest",
    run_name: str | None = None,
) -> HarvestSummary:
    """Turn a training run's rollout records into pairs, one context pool per step window; no new rollouts.

    Args:
        run_dir: The trainer's run folder (its `rollouts/` is read) or a folder of rollout record files
            (`step, prompt_id, prompt, reward` columns, as `basis.trainer` writes them).
        policy: Policy name of the pairs.
        out: Output folder (must be new or empty): shards under `data/`, then `manifest.json`, all written
            into a hidden sibling folder first and moved to `out` at the end (`pairs.staging_folder`), so
            a killed call leaves `out` as it was and its rerun starts afresh.
        window: Steps per pool: records of steps 1..window become step `window`'s pairs, and so on; the
            last window is labelled with the run's last step.
        experiment: MLflow experiment; None disables logging.
        run_name: MLflow run name (default `from-logs-<policy>`).

    Returns:
        A `HarvestSummary` with per-pool pair counts and mean success.

    Raises:
        HarvestError: bad records (file, row, field), an empty policy name, a non-empty output folder.
    """
    start = time.perf_counter()
    if not policy.strip():
        raise HarvestError("policy: empty name")
    source = Path(run_dir)
    folder = source / "rollouts" if (source / "rollouts").is_dir() else source
    if not folder.is_dir():
        raise HarvestError(f"run_dir {run_dir!r} does not exist or is not a folder")
    out_dir = Path(out)
    _require_empty(out_dir)
    records = read_rollout_records(folder)
    pairs = pairs_from_records(records, policy, window)
    by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for pair in pairs:
        by_step[pair["step"]].append(pair)
    summaries = checkpoint_summaries(pairs, {(policy, step): str(folder) for step in sorted(by_step)})
    files = sorted({record[4] for record in records})
    config = {"run_dir": str(source), "policy": policy, "window": window}
    with staging_folder(out_dir, "from-logs") as staging:
        shards = []
        for step, rows in sorted(by_step.items()):
            relative = f"{DATA_DIR}/{path_slug(policy)}/step_{step:06d}/shard-00000.parquet"
            shards.append(ShardRecord(relative, len(rows), write_pairs_shard(staging / relative, rows), None))
        payload = manifest_payload("from-logs", len(pairs), shards, summaries, config)
        payload["sources"] = [{"path": f, "sha256": sha256_file(Path(f))} for f in files]
        write_manifest(staging, payload)
        os.replace(staging, out_dir)  # one rename: `out` goes from missing or empty to complete
    manifest = out_dir / MANIFEST
    seconds = time.perf_counter() - start
    summary = HarvestSummary(
        out=str(out_dir), manifest=str(manifest), pairs=len(pairs), new_pairs=len(pairs), rollouts=len(records),
        seconds=seconds, pairs_per_minute=60.0 * len(pairs) / seconds, checkpoints=summaries,
    )  # fmt: skip
    if experiment is not None:
        summary.mlflow_run_id = _log_to_mlflow(
            experiment,
            run_name or f"from-logs-{policy}",
            {"source": "from-logs", "run_dir": str(source), "policy": policy, "window": window,
             "record_files": len(files)},
            {"pairs": float(len(pairs)), "rollouts": float(len(records)), "seconds": seconds},
            summaries,
            pairs,
            None,
            manifest,
        )  # fmt: skip
    return summary


# --------------------------------------------------------------------------------------------------
# `harvest validate` and `harvest import-v0`


@dataclass(frozen=True)
class PoolStats:
    """One context pool of a pairs dataset, for the validation report."""

    policy: str
    step: int
    pairs: int
    mean_success: float
    min_n: int
    max_n: int
    positives: int  # pairs with success rate >= 0.5


@dataclass
class ValidationReport:
    """`validate`'s findings: rows, per-pool statistics and every problem (errors and warnings)."""

    source: str
    rows: int = 0
    pools: list[PoolStats] = field(default_factory=list)
    problems: list[PairProblem] = field(default_factory=list)
    max_problems: int = 50

    @property
    def errors(self) -> list[PairProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.rows} pairs in {len(self.pools)} context pool(s)"]
        if self.pools:
            lines.append(
                f"  {'policy':<32} {'step':>7} {'pairs':>6} {'mean success':>12} {'n':>7} {'y>=0.5':>7}"
            )
            for pool in self.pools:
                n = str(pool.min_n) if pool.min_n == pool.max_n else f"{pool.min_n}-{pool.max_n}"
                lines.append(f"  {pool.policy:<32} {pool.step:>7} {pool.pairs:>6} {pool.mean_success:>12.3f} "
                             f"{n:>7} {pool.positives:>7}")  # fmt: skip
        for severity in ("error", "warning"):
            found = [p for p in self.problems if p.severity == severity]
            if found:
                lines.append(f"{severity}s ({len(found)}):")
                lines += [f"  {p}" for p in found[: self.max_problems]]
                if len(found) > self.max_problems:
                    lines.append(f"  ... and {len(found) - self.max_problems} more")
        warnings = len(self.problems) - len(self.errors)
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {len(self.errors)} error(s), {warnings} warning(s)")
        return "\n".join(lines)


def _manifest_problems(folder: Path) -> list[PairProblem]:
    """Completeness and checksum problems of a pairs output folder (`harvest run`, `from-logs`,
    `import-v0`) against its manifest, all of them; none for a plain folder of pair files."""
    if not is_pairs_output(folder):
        return []
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        unfinished = f"no {MANIFEST}: an unfinished harvest, rerun the same command to resume"
        return [PairProblem(str(folder), None, None, unfinished)]
    try:
        manifest = read_json_object(manifest_path, HarvestError)
        if is_legacy_import(manifest):  # read by listing its files, as it was written: nothing to check
            return []
        shards = manifest_shards(manifest, manifest_path, HarvestError)
    except HarvestError as err:
        return [PairProblem(str(folder), None, None, f"unusable manifest: {err}")]
    problems = []
    for shard in shards:
        problem = check_shard_file(folder / shard.path, shard.sha256, shard.rows)
        if problem is not None:
            problems.append(PairProblem(str(folder / shard.path), None, None, f"corrupted shard: {problem}"))
    listed = {shard.path for shard in shards}
    for path in sorted(folder.rglob("*.parquet")):
        relative = path.relative_to(folder)
        if str(relative) not in listed and not any(part.startswith(".") for part in relative.parts):
            problems.append(PairProblem(str(path), None, None, f"shard is not listed in {MANIFEST}"))
    return problems


def _pool_stats(dataset: datasets.Dataset) -> list[PoolStats]:
    groups: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    for row in dataset.select_columns(["policy", "step", "n", "successes"]):
        if isinstance(row["n"], int) and row["n"] > 0 and isinstance(row["successes"], int):
            groups[(row["policy"], row["step"])].append((row["n"], row["successes"]))
    return [
        PoolStats(policy, step, len(items), sum(s / n for n, s in items) / len(items),
                  min(n for n, _ in items), max(n for n, _ in items), sum(s / n >= 0.5 for n, s in items))
        for (policy, step), items in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0))
    ]  # fmt: skip


def validate(path: str, max_problems: int = 50) -> ValidationReport:
    """Check a pairs dataset (parquet/jsonl file or folder; a harvest folder also against its manifest).

    Args:
        path: Pairs file or folder.
        max_problems: Problems of each severity printed in the report.

    Returns:
        A `ValidationReport`; `report.ok` is False when any error was found (the CLI then exits 1).
    """
    source = Path(path)
    report = ValidationReport(source=str(source), max_problems=max_problems)
    if not source.exists():
        report.problems.append(PairProblem(str(source), None, None, "no such file or folder"))
        return report
    if source.is_dir():
        report.problems += _manifest_problems(source)
        if report.problems:  # its rows cannot be trusted (or read) until the output is whole again
            return report
    try:
        dataset, problems = load_and_validate(source)
    except PairsError as err:  # naming the file (and row, field) that is not pairs
        report.problems.append(PairProblem(str(source), None, None, f"cannot be read as pairs: {err}"))
        return report
    report.rows = len(dataset)
    report.problems += problems
    report.pools = _pool_stats(dataset)
    return report


def import_v0(*, release: str, out: str) -> ValidationReport:
    """Import the V0 authors' release (design.md §2) into the pair contract, then validate the result.

    Args:
        release: Release folder with `context.jsonl`, `train.jsonl` and `prompt_dict.json`.
        out: Output folder: `context/` and `train/` parquet, then `manifest.json`
            (`data_pipelines.v0_release.write_release_pairs`).
    """
    from data_pipelines.v0_release import write_release_pairs

    write_release_pairs(release, out)
    return validate(out)


# --------------------------------------------------------------------------------------------------
# Console script


def main(args: Sequence[str] | None = None) -> None:
    """`harvest {run,from-logs,import-v0,validate}`; bad input exits 2 with the message, failed validation 1."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    from jsonargparse import CLI

    from basis.tracking import input_errors

    datasets.disable_progress_bars()  # the harvest shows one bar of its own
    transformers.utils.logging.disable_progress_bar()

    commands = {"run": run, "from-logs": from_logs, "import-v0": import_v0, "validate": validate}
    with input_errors("harvest"):
        result = CLI(commands, args=None if args is None else list(args))
    print(result)
    if isinstance(result, ValidationReport) and not result.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
