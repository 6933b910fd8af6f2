"""MLflow tracking defaults shared by every command (design.md §7).

The default store is the sqlite database `mlflow/mlflow.db` with artifacts under `mlflow/artifacts`,
both relative to the working directory (the repository root for the Makefile targets). Setting
`MLFLOW_TRACKING_URI` overrides both: another sqlite store keeps its artifacts beside its .db file,
a tracking server decides its own.

Lightning runs log through `MLflowLogger` (Lightning's own `MLFlowLogger` with our defaults); plain scripts
(tiny-policy build, harvest, benchmarks) use `mlflow_run(...)`.

Metric names must avoid `@ ( )`: write `pass_at_k/8`, not `pass@8`.

`environment()` describes what a number was measured on (CPU model and vector extensions, package
versions); the tiny-policy build and every benchmark result record it.

`input_errors(prog)` is how every console command ends on bad input: `prog: error: <message>` and exit
status 2, no traceback (`BASIS_TRACEBACK=1` shows it). A run that fails keeps its message as the MLflow
tag `error`, so a FAILED run in the UI says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import traceback
from argparse import Namespace
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

STORE_DIR = Path("mlflow")
NUMERIC_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "tabpfn",
    "lightning",
    "numpy",
    "scikit-learn",
    "peft",
)
"""Packages whose version can change a seeded result."""


def environment() -> dict[str, Any]:
    """CPU model, the SIMD extensions that pick torch's CPU kernels, Python and package versions.

    A seeded build is byte-identical on one machine and environment (the tiny policy, measured), but
    not across CPUs with different vector units or across package releases; recording both lets a
    moved figure be traced.
    """
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cpu = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines) if v}
    versions: dict[str, str | None] = {}
    for name in NUMERIC_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_model": cpu.get("model name", platform.processor() or platform.machine()),
        "cpu_simd": sorted(f for f in cpu.get("flags", "").split() if f.startswith(("avx", "amx", "fma"))),
        "python": platform.python_version(),
        "packages": versions,
    }


def default_tracking_uri() -> str:
    """The tracking URI: `$MLFLOW_TRACKING_URI` if set, else the local sqlite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    STORE_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(STORE_DIR / 'mlflow.db').resolve()}"


def artifact_location(tracking_uri: str | None = None) -> str | None:
    """Artifact root for new experiments: `artifacts/` beside a local sqlite store.

    That is `mlflow/artifacts` for the default store and `<folder of the .db>/artifacts` for any
    `sqlite:///` URI (MLflow's own default would be `./mlruns` under whatever the working directory
    is, which scattered the artifacts of runs against another store, tests included, into the
    repository). A tracking server or a file store decides its own (`None`).
    """
    uri = tracking_uri or default_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    root = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root.as_uri()


def ui_command() -> str:
    """The command that opens the MLflow UI on the current store (this interpreter's `mlflow`, e.g. `.venv/bin/mlflow`)."""
    script = Path(sys.executable).parent / "mlflow"
    mlflow = str(script) if script.exists() else "mlflow"
    return (
        f"{mlflow} ui --backend-store-uri {default_tracking_uri()} --host 127.0.0.1 --port 5000 --workers 1"
    )


def files_sha256(paths: list[Path]) -> str:
    """sha256 over every file under `paths` (relative names and bytes, in name order): tells a rebuilt
    policy or a re-exported prior in the same folder apart."""
    import hashlib

    digest = hashlib.sha256()
    for root in paths:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def record_environment(client: Any, run_id: str) -> None:
    """Log `environment()` as `environment.json` on a new run, with tags `env.torch`,
    `env.transformers` and `env.cpu_simd`, so a figure that moves between runs of one commit can be
    traced to the machine or the packages."""
    env = environment()
    client.log_dict(run_id, env, "environment.json")
    tags = {f"env.{name}": env["packages"].get(name) for name in ("torch", "transformers")}
    set_tags(client, run_id, {**tags, "env.cpu_simd": " ".join(env["cpu_simd"]) or "none"})


def set_tags(client: Any, run_id: str, tags: dict[str, Any]) -> None:
    """Set `tags` (values as strings) on a run in one request."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def ensure_experiment(name: str) -> str:
    """Create `name` (with our artifact location) if missing and return its id."""
    import mlflow

    mlflow.set_tracking_uri(default_tracking_uri())
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        return mlflow.create_experiment(name, artifact_location=artifact_location())
    root = artifact_location()
    if root is not None and not experiment.artifact_location.startswith(root):
        log.warning(
            "MLflow experiment %r keeps its artifacts in %s, not under this store's %s (it was created "
            "elsewhere or by an older version): its runs' artifacts go there",
            name,
            experiment.artifact_location,
            root,
        )
    return experiment.experiment_id


class MLflowLogger(MLFlowLogger):
    """Lightning's `MLFlowLogger` with this project's store as the default.

    Use it in YAML as `trainer.logger: {class_path: basis.tracking.MLflowLogger, init_args:
    {experiment_name: ...}}`. Only the defaults differ: the tracking URI comes from
    `default_tracking_uri()` when not given, and new experiments put artifacts beside a sqlite store
    (`artifact_location`).

    Args:
        experiment_name: MLflow experiment to log into (created if missing).
        run_name: Display name of the run.
        tracking_uri: Override of the store; default `$MLFLOW_TRACKING_URI` or `sqlite:///mlflow/mlflow.db`.
        run_id: Continue this existing run (used when resuming) instead of starting a new one.
        log_model: Lightning's checkpoint logging (`False`, `True` or `"all"`).
        tags: Run tags.
    """

    def __init__(
        self,
        experiment_name: str = "basis",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        log_model: bool | str = False,
        tags: dict[str, Any] | None = None,
    ) -> None:
        if tracking_uri is None:
            tracking_uri = default_tracking_uri()
            ensure_experiment(experiment_name)  # so a new experiment gets our artifact root
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            run_id=run_id,
            log_model=log_model,
            tags=tags,
            artifact_location=artifact_location(tracking_uri),
        )

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        """Lightning's, except on a run that already holds parameters (a resumed run continues its
        MLflow run): MLflow refuses to change a logged value, so only parameters the run lacks are
        written, and each changed one is kept as tag `changed_on_resume.<name>` ("first -> ... -> now") with a
        warning, so a flag given on resume (say a larger `max_rollouts`) neither crashes nor goes unseen."""
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        run = self.experiment.get_run(self.run_id).data
        existing, tags = run.params, run.tags  # empty for a new run
        if not existing:
            record_environment(self.experiment, self.run_id)
        flat = {
            key: str(value)
            for key, value in _flatten_dict(_convert_params(params)).items()
            if not key.startswith("_")  # LightningCLI's `_instantiator` / `_class_path` bookkeeping
        }
        for key, value in flat.items():
            if len(value) > MAX_PARAM_VAL_LENGTH:  # MLflow's limit (Lightning cuts at 250, silently)
                log.warning(
                    "parameter %s is %d characters; MLflow keeps the first %d",
                    key,
                    len(value),
                    MAX_PARAM_VAL_LENGTH,
                )
                flat[key] = value[:MAX_PARAM_VAL_LENGTH]
        new = {key: value for key, value in flat.items() if key not in existing}
        for key, value in flat.items():
            history = tags.get(f"changed_on_resume.{key}", existing.get(key))  # "a -> b" after a change
            if key in existing and history.rsplit(" -> ", 1)[-1] != value:
                log.warning(
                    "continued MLflow run %s: %s was %r, now %r", self.run_id, key, existing[key], value
                )
                chain = f"{history} -> {value}"
                if len(chain) > 5000:  # MLflow caps tag values; keep the latest changes
                    chain = "... -> " + chain[-4990:]
                self.experiment.set_tag(self.run_id, f"changed_on_resume.{key}", chain)
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in new.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit; Lightning's call cuts at 250
            self.experiment.log_batch(run_id=self.run_id, params=items[start : start + 100], synchronous=True)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Lightning's, plus the exception as tag `error` on a failed run (Lightning calls this from inside
        its `except` block, so the error in flight is the one that ended the run); a continued run that
        finishes drops the `error` of the attempt before it."""
        error = sys.exc_info()[1]
        if status == "failed" and error is not None and self._initialized:
            self.experiment.set_tag(self.run_id, "error", error_tag(error))
        elif (
            status == "success"
            and self._initialized
            and "error" in self.experiment.get_run(self.run_id).data.tags
        ):
            self.experiment.delete_tag(self.run_id, "error")
        super().finalize(status)


def error_tag(error: BaseException) -> str:
    """The MLflow tag `error` of a run that `error` ended (MLflow caps tag values)."""
    return f"{type(error).__name__}: {error}"[:5000]


def name_evaluation_run(logger: Any, subcommand: str | None) -> None:
    """Name a `validate` / `test` / `predict` run `<run name>-<subcommand>`, apart from the fit it
    evaluates. `logger` is the CLI config's logger entry; one that continues a given run is left alone."""
    import jsonargparse

    if subcommand in (None, "fit") or not isinstance(logger, jsonargparse.Namespace):
        return
    if logger.init_args.get("run_name") and not logger.init_args.get("run_id"):
        logger.init_args.run_name = f"{logger.init_args.run_name}-{subcommand}"


def tag_evaluated_checkpoint(trainer: Any) -> None:
    """Tag a `validate`/`test`/`predict` run with the checkpoint it evaluated (`ckpt_path`, resolved:
    `--ckpt_path best` names the file), so its numbers say which weights they belong to."""
    logger = trainer.logger
    if trainer.is_global_zero and trainer.ckpt_path and getattr(logger, "run_id", None):
        logger.experiment.set_tag(logger.run_id, "ckpt_path", str(Path(trainer.ckpt_path).resolve()))


PACKAGE_ROOTS = tuple(
    os.path.join(os.path.realpath(Path(__file__).parents[1] / name), "")
    for name in ("basis", "value_prior", "data_pipelines")
)


@contextlib.contextmanager
def input_errors(prog: str) -> Iterator[None]:
    """End a console command on bad input with `prog: error: <message>` and exit status 2.

    Bad input is a `ValueError` raised by a `raise` statement of this project's own checks (which name the
    file, row or setting) or a missing file. A `ValueError` of a builtin called on one of our lines
    (`int("x")`) or from inside a library is a bug to trace and keeps its traceback, as does everything
    with `BASIS_TRACEBACK=1` set.
    """
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        frames = traceback.extract_tb(err.__traceback__)
        last = frames[-1] if frames else None
        ours = (  # our own `raise`, not int("x") or a failed unpacking on one of our lines
            last is not None
            and os.path.realpath(last.filename).startswith(PACKAGE_ROOTS)
            and (last.line or "").lstrip().startswith("raise")
        )
        if os.environ.get("BASIS_TRACEBACK") or not (ours or isinstance(err, FileNotFoundError)):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def mlflow_run(experiment_name: str, run_name: str | None = None, **tags: str) -> Iterator[Any]:
    """Open an MLflow run in our store for code that is not a LightningModule; an exception ends it
    FAILED with the message as tag `error`, as `MLflowLogger` does."""
    import mlflow

    experiment_id = ensure_experiment(experiment_name)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags or None) as run:
        record_environment(mlflow.MlflowClient(), run.info.run_id)
        try:
            yield run
        except Exception as error:
            mlflow.set_tag("error", error_tag(error))
            raise
