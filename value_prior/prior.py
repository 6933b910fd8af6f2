"""The exported, frozen V0 prior: save, load, predict (the artifact the policy trainer consumes).

An artifact is one folder:

    config.json          format version, adapter shape, label threshold, provenance (run, metrics)
    backbone.json        backbone reference: model name/path, id, hidden size, max tokens
    adapter.safetensors  residual query adapter weights
    head.ckpt            the TabPFN head checkpoint (TabPFNClassifier-loadable)

`ValuePrior.load(path).predict(context_prompts, context_success, query_prompts)` returns float32
`[Q]` success probabilities V0(x) in [0, 1]. Context successes are success rates in [0, 1] (0/1
outcomes work too); the head sees `1[success >= label_threshold]`. Adapter features are cached per
prompt text in memory (the adapter is frozen, so they never change) and backbone hidden states also
on disk when a cache folder is configured, so repeated prompts cost only the head.

Behaviour at the edges (documented fallbacks and errors):
- context larger than `max_context`: a fixed-seed uniform subsample of `max_context` pairs is used, drawn
  from the pairs sorted by (prompt, success) so that it depends on the context as a set, not on the
  order it was given in; if that draw holds one class only while the whole context holds both, one
  drawn pair is swapped for a random pair of the missing class (`value_prior.model.draw_support`), so
  the head sees both classes whenever the context has them;
- single-class context (checked on the pairs given to the head): returns the mean success of the whole
  context for every query and warns (`SingleClassContextWarning`);
- empty context, mismatched lengths, success rates outside [0, 1], empty prompts or prompts that are not
  valid Unicode (a lone surrogate, e.g. from a cut emoji): `ValueError` naming the input;
- a prompt whose adapter features are not finite (NaN or inf): `ValueError` naming the prompt, never a
  silent prediction (TabPFN would impute the NaN);
- artifact with a missing file, a backbone other than the one it was trained on (`backbone_id`
  differs) or whose width differs from the adapter's, or a head checkpoint that is not a TabPFN
  classifier or whose feature count does not fit: `ValueError`.

Results are float32 CPU tensors whatever `torch.set_default_device` says (also the fallback's).

Run: `python -c "from value_prior import ValuePrior; p = ValuePrior.load('artifacts/priors/v0-release-minilm'); print(p.predict(['Q: 1+1='] * 2, [1.0, 0.0], ['Q: 23+45*2=']))"`.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from safetensors.torch import load_file, save
from torch import Tensor

from value_prior.backbone import HFBackbone, TextBackbone, utf8_error
from value_prior.head import HeadCheckpointError, InContextHead, load_head
from value_prior.metrics import brier, expected_calibration_error
from value_prior.model import ResidualQueryAdapter, draw_support, prompt_features

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1
FILES = ("config.json", "backbone.json", "adapter.safetensors", "head.ckpt")


class SingleClassContextWarning(UserWarning):
    """The context had one class only; V0 returned the context mean instead of a head prediction."""


def _check_prompts(name: str, prompts: Sequence[str]) -> None:
    """`ValueError` naming the first prompt that is not a non-empty, UTF-8-encodable string."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{name}[{i}] is {prompt!r}: prompts must be non-empty strings")
        if err := utf8_error(prompt):  # no tokenizer or cache key can encode it
            raise ValueError(
                f"{name}[{i}] = {prompt[:80]!r} is not valid Unicode ({err.reason} at character "
                f"{err.start}): fix the prompt text"
            )


class ValuePrior:
    """A frozen V0: backbone + adapter + in-context head, with per-prompt feature caching.

    Args:
        backbone: Text backbone (its `hidden_size` must match the adapter).
        adapter: Trained residual query adapter (its `config` is saved with the artifact).
        head: In-context TabPFN head.
        label_threshold: Context success rates at or above this are labelled successes.
        max_context: Most context pairs given to the head (>= 2; larger contexts are subsampled uniformly
            with a fixed seed, keeping both classes when the context has both).
        query_chunk: Queries per head call (query rows are independent given the support).
        calibration: `(scale, bias)` of the output `sigmoid(scale * s + bias)` on the head score `s`
            (Platt scaling fitted on the hold-out at export; `(1, 0)` is the raw head). Monotone (the fit
            keeps `scale >= 0`), so it never changes a ranking (AUC, gAUC); `scale = 0` makes it flat.
        info: Provenance saved with the artifact (training run, metrics, data split).
        device: `"cpu"` or a CUDA device.
    """

    def __init__(
        self,
        backbone: TextBackbone,
        adapter: ResidualQueryAdapter,
        head: InContextHead,
        label_threshold: float = 0.5,
        max_context: int = 512,
        query_chunk: int = 1024,
        calibration: tuple[float, float] = (1.0, 0.0),
        info: dict[str, Any] | None = None,
        device: str = "cpu",
    ) -> None:
        if adapter.key_value.in_features != backbone.hidden_size:
            raise ValueError(
                f"backbone {backbone.backbone_id!r} has width {backbone.hidden_size}, "
                f"the adapter expects {adapter.key_value.in_features}"
            )
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2 (the head needs both classes), got {max_context}")
        self.backbone = backbone
        self.adapter = adapter.to(device).eval().requires_grad_(False)
        self.head = head.to(device).eval().requires_grad_(False)
        self.label_threshold = label_threshold
        self.max_context = max_context
        self.query_chunk = query_chunk
        self.calibration = (float(calibration[0]), float(calibration[1]))
        self.info = dict(info or {})
        self.device = device
        self._features: dict[str, Tensor] = {}

    @property
    def backbone_name(self) -> str:
        return self.backbone.backbone_id

    @property
    def num_features(self) -> int:
        return self.adapter.num_features

    # -- features --------------------------------------------------------------------------

    @torch.no_grad()
    def features(self, prompts: Sequence[str]) -> Tensor:
        """Adapter features `[len(prompts), F]`, computed once per distinct prompt text.

        Non-finite features raise here: TabPFN would impute a NaN column with its mean and return a
        plausible but wrong prediction, with no sign that anything went wrong.
        """
        missing = list(dict.fromkeys(p for p in prompts if p not in self._features))
        if missing:
            for prompt, z in zip(missing, prompt_features(self.adapter, self.backbone, missing)):
                if not torch.isfinite(z).all():  # z: [F]
                    raise ValueError(
                        f"prompt {prompt[:80]!r} has non-finite adapter features: the adapter weights or "
                        f"the backbone {self.backbone.backbone_id!r} are broken (NaN or inf)"
                    )
                self._features[prompt] = z
        return torch.stack([self._features[p] for p in prompts])  # [n, F]

    def prepare(self, prompts: Sequence[str]) -> None:
        """Compute and cache the features of `prompts` now (e.g. every prompt a training run will
        query), so later `predict` calls pay only for the head."""
        if isinstance(prompts, str):
            raise ValueError("prepare takes a sequence of prompts, not one string")
        _check_prompts("prompts", prompts)
        if prompts:
            self.features(list(dict.fromkeys(prompts)))

    # -- prediction ------------------------------------------------------------------------

    def _check_inputs(
        self,
        context_prompts: Sequence[str],
        context_success: Sequence[float] | Tensor,
        query_prompts: Sequence[str],
    ) -> tuple[list[str], Tensor, list[str]]:
        """The prompts as lists and the success rates as a float32 tensor, once every input is checked."""
        if isinstance(context_prompts, str) or isinstance(query_prompts, str):
            raise ValueError("context_prompts and query_prompts must be sequences of strings, not one string")
        # by position: a pandas Series with another index would be read by label (KeyError: 0)
        context_prompts, query_prompts = list(context_prompts), list(query_prompts)
        if len(context_prompts) == 0:
            raise ValueError("context_prompts is empty: V0 needs at least one (prompt, success) context pair")
        if not isinstance(context_success, Tensor):
            values = np.asarray(context_success)
            if values.dtype.kind not in "biuf":  # np.asarray(..., float) would read "1" and "0" as numbers
                raise ValueError(
                    f"context_success must hold numbers (success rates in [0, 1]); got {values.dtype} values "
                    f"such as {values.flat[0].item()!r}"
                )
            context_success = torch.from_numpy(values.astype(np.float64))
        success = torch.as_tensor(
            context_success.detach().cpu(),
            dtype=torch.float32,
            device="cpu",  # not the default device: the checks, labels and fallback below run here
        ).flatten()
        if success.numel() != len(context_prompts):
            raise ValueError(
                f"context_success has {success.numel()} values for {len(context_prompts)} context_prompts"
            )
        bad = torch.nonzero(~((success >= 0) & (success <= 1))).flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"context_success[{i}] = {float(success[i])} is not a success rate in [0, 1]")
        _check_prompts("context_prompts", context_prompts)
        _check_prompts("query_prompts", query_prompts)
        return context_prompts, success, query_prompts

    @torch.no_grad()
    def predict(
        self,
        context_prompts: Sequence[str],
        context_success: Sequence[float] | Tensor,
        query_prompts: Sequence[str],
    ) -> Tensor:
        """V0(x): float32 `[Q]` success probabilities of `query_prompts` given the policy's context."""
        context_prompts, success, query_prompts = self._check_inputs(
            context_prompts, context_success, query_prompts
        )
        if len(query_prompts) == 0:
            return torch.zeros(0, dtype=torch.float32, device="cpu")
        labels = success >= self.label_threshold  # [N]
        index = np.arange(len(context_prompts))
        if len(index) > self.max_context:
            # Draw from the pairs in a canonical order: the same context in another order gives the same V0.
            rates = success.tolist()
            order = np.array(sorted(index, key=lambda i: (context_prompts[i], rates[i])))  # [N]
            drawn = draw_support(np.random.default_rng(0), labels.numpy()[order], self.max_context)
            index = np.sort(order[drawn])
            labels = labels[torch.from_numpy(index)]  # [max_context]
        if labels.min() == labels.max():  # the support the head would see has one class
            mean = float(success.mean())
            warnings.warn(
                f"single-class context ({len(success)} pairs, all {'successes' if labels[0] else 'failures'}): "
                f"returning the context mean {mean:.3f} for every query",
                SingleClassContextWarning,
                stacklevel=2,
            )
            return torch.full((len(query_prompts),), mean, dtype=torch.float32, device="cpu")
        support_z = self.features([context_prompts[i] for i in index])[None]  # [1, N, F]
        support_y = labels.float().to(self.device)[None]  # [1, N]
        probs = []
        for start in range(0, len(query_prompts), self.query_chunk):
            query_z = self.features(query_prompts[start : start + self.query_chunk])[None]  # [1, M, F]
            s = self.head.success_logit(support_z, support_y, query_z)[0]  # [M]
            probs.append(torch.sigmoid(self.calibration[0] * s + self.calibration[1]))
        return torch.cat(probs).float().cpu()  # [Q]

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the artifact folder (config, backbone reference, adapter weights, head checkpoint): a new
        or empty folder, or an earlier artifact, which is replaced (`check_export_folder`)."""
        path = Path(path)
        check_export_folder(path)
        path.mkdir(parents=True, exist_ok=True)
        # config.json marks a complete artifact: remove an old one first, so that a re-save that fails
        # midway leaves a folder `load` reports incomplete, not old config + new weights.
        (path / "config.json").unlink(missing_ok=True)
        backbone = {
            "model": getattr(self.backbone, "model_name", self.backbone.backbone_id),
            "backbone_id": self.backbone.backbone_id,
            "hidden_size": self.backbone.hidden_size,
            "max_length": getattr(self.backbone, "max_length", None),
        }
        config = {
            "format": ARTIFACT_FORMAT,
            "adapter": self.adapter.config,
            "num_features": self.num_features,
            "label_threshold": self.label_threshold,
            "max_context": self.max_context,
            "calibration": {"scale": self.calibration[0], "bias": self.calibration[1]},
            "info": self.info,
        }
        (path / "backbone.json").write_text(json.dumps(backbone, indent=2) + "\n")
        # `save` + `write_bytes`, not `save_file`: safetensors' `save_file` creates the file with mode 0600
        # whatever the umask, so another user could not load the artifact.
        (path / "adapter.safetensors").write_bytes(
            save({k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()})
        )
        self.head.save(path / "head.ckpt")
        (path / "config.json").write_text(
            json.dumps(config, indent=2, default=str) + "\n"
        )  # last: marks a complete artifact
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", cache_dir: str | None = None) -> ValuePrior:
        """Load an artifact folder written by `save` (or by `value-prior fit`).

        Args:
            path: The artifact folder.
            device: Where the adapter and head run.
            cache_dir: On-disk hidden-state cache for the backbone (`None`: memory only).
        """
        path = Path(path)
        if not path.is_dir():
            what = "a file" if path.is_file() else "missing"
            raise ValueError(
                f"prior artifact {path} is {what}: a prior is the folder `value-prior fit` exports "
                f"(model.export_dir), holding {list(FILES)}"
            )
        missing = [name for name in FILES if not (path / name).is_file()]
        if missing:
            raise ValueError(f"prior artifact {path}: missing {missing} (expected {list(FILES)})")
        config = json.loads((path / "config.json").read_text())
        if config.get("format") != ARTIFACT_FORMAT:
            raise ValueError(
                f"prior artifact {path}: format {config.get('format')!r}, this code reads {ARTIFACT_FORMAT}"
            )
        reference = json.loads((path / "backbone.json").read_text())
        backbone = HFBackbone(
            reference["model"], max_length=reference["max_length"] or 256, cache_dir=cache_dir, device=device
        )
        if backbone.hidden_size != reference["hidden_size"]:
            raise ValueError(
                f"prior artifact {path}: backbone {reference['model']!r} now has width {backbone.hidden_size}, "
                f"the artifact was trained on width {reference['hidden_size']}"
            )
        # The adapter was trained on one model's hidden states; another model of the same width (other
        # weights, a retrained folder, a new package version) loads fine but predicts something else.
        if backbone.backbone_id != reference["backbone_id"]:
            raise ValueError(
                f"prior artifact {path}: trained on backbone {reference['backbone_id']!r}, but "
                f"{reference['model']!r} is now {backbone.backbone_id!r}; re-export the prior with this "
                "backbone or restore the original model files"
            )
        adapter = ResidualQueryAdapter(reference["hidden_size"], **config["adapter"])
        try:
            adapter.load_state_dict(load_file(str(path / "adapter.safetensors")))
        except RuntimeError as err:
            raise ValueError(
                f"prior artifact {path}: adapter weights do not match config.json ({err})"
            ) from err
        if adapter.num_features != config["num_features"]:
            raise ValueError(
                f"prior artifact {path}: adapter emits {adapter.num_features} features, config says {config['num_features']}"
            )
        try:
            head = load_head(path / "head.ckpt")
        except HeadCheckpointError as err:
            raise ValueError(str(err)) from err
        return cls(
            backbone,
            adapter,
            head,
            label_threshold=config["label_threshold"],
            max_context=config["max_context"],
            calibration=(config["calibration"]["scale"], config["calibration"]["bias"]),
            info=config.get("info", {}),
            device=device,
        )


def check_export_folder(path: str | Path) -> bool:
    """Whether `path` holds an earlier prior artifact (which a save replaces); False for a new or empty one.

    Raises:
        ValueError: `path` is a file, or a folder holding anything a prior artifact does not (a dataset,
            another model): a save would mix its files in among them.
    """
    path = Path(path)
    if not path.exists():
        return False
    if not path.is_dir():
        raise ValueError(f"prior export folder {path} is a file; choose a folder")
    foreign = sorted(
        entry.name
        for entry in path.iterdir()
        if entry.name not in FILES and entry.name != "head.ckpt.partial"  # a killed head save
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"prior export folder {path} holds files that are not a prior artifact's ({shown}); "
            "choose a new or empty folder, or one an earlier fit exported to"
        )
    return any(path.iterdir())


class ExportPrior(L.Callback):
    """At the end of `fit`, restore the best checkpoint's weights and export the frozen prior.

    The artifact goes to the module's `export_dir` and is logged to MLflow (artifact path `prior`)
    when the trainer logs to MLflow. With `calibrate`, a Platt scaling `sigmoid(a * s + b)` of the head
    score is fitted on the validation queries (held-out prompts, the same batches as `val/gauc`) and
    stored with the artifact: the frozen head's probabilities are otherwise as (mis)calibrated as the
    head happens to be on real features.

    Args:
        max_context: Most context pairs the exported prior gives its head.
        calibrate: Fit and store the Platt scaling (ranking metrics are unaffected).
    """

    def __init__(self, max_context: int = 512, calibrate: bool = True) -> None:
        super().__init__()
        self.max_context = max_context
        self.calibrate = calibrate

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        export_dir = pl_module.hparams.get("export_dir")
        if stage == "fit" and export_dir and check_export_folder(export_dir):  # refuses a foreign folder
            rank_zero_warn(f"{export_dir} holds an earlier prior; this fit replaces it when it ends")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        export_dir = pl_module.hparams.get("export_dir")
        if not export_dir:
            return
        callback = best_checkpoint_callback(trainer)
        best = callback.best_model_path if callback else ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            pl_module.load_state_dict(state)
            log.info("export: restored best checkpoint %s", best)
        best_score = getattr(callback, "best_model_score", None)
        info: dict[str, Any] = {
            "best_checkpoint": best,
            "best_score": {"monitor": getattr(callback, "monitor", None), "value": float(best_score)}
            if best_score is not None
            else None,
            "last_epoch_val_metrics": {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
            },
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "mlflow_run_id": getattr(trainer.logger, "run_id", None),  # the fit that exported it
        }
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "split"):
            info["data"] = {
                "pairs": str(datamodule.pairs),
                "format": datamodule.format,
                "val_fraction": datamodule.split.val_fraction,
                "test_fraction": datamodule.split.test_fraction,
                "split_salt": datamodule.split.salt,
            }
        calibration, calibration_metrics = (1.0, 0.0), {}
        if self.calibrate and datamodule is not None:
            calibration, calibration_metrics = fit_platt_scaling(pl_module, datamodule.val_dataloader())
            info["calibration_fitted_on"] = "val"
            info["calibration_val_metrics"] = calibration_metrics
        prior = prior_from_module(pl_module, self.max_context, calibration=calibration, info=info)
        path = prior.save(export_dir)
        log.info("exported V0 prior to %s", path)
        from lightning.pytorch.loggers import MLFlowLogger

        if isinstance(trainer.logger, MLFlowLogger):
            client, run_id = trainer.logger.experiment, trainer.logger.run_id
            client.log_artifacts(run_id, str(path), artifact_path="prior")
            # at the step Lightning logged the last validation at (the step before global_step), so
            # export/val_* line up with val/* on a step axis
            trainer.logger.log_metrics(calibration_metrics, step=max(trainer.global_step - 1, 0))
            client.set_tag(run_id, "export.checkpoint", best or "last weights")  # which weights it exported
            if best_score is not None:
                client.set_tag(run_id, f"export.{callback.monitor}", f"{float(best_score):.6g}")


def best_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that tracks the best epoch: the first one with a `monitor`.

    The configs also carry an unmonitored callback that only keeps `last.ckpt` for resuming; its
    `best_model_path` is the newest epoch, so `trainer.checkpoint_callback` (simply the first callback)
    would export the last weights instead of the best if the YAML listed it first.
    """
    monitored = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor]
    return monitored[0] if monitored else trainer.checkpoint_callback


@torch.no_grad()
def fit_platt_scaling(
    module: L.LightningModule, batches: Any
) -> tuple[tuple[float, float], dict[str, float]]:
    """`platt_scaling` of the module's head scores on `batches` against their query success rates, and
    the Brier score and ECE on those queries before and after it (`export/val_brier_head`,
    `export/val_brier_calibrated`, ...): `value-prior test` and `predict` score the checkpoint's head,
    the exported prior applies the scaling.

    `batches` come straight from a dataloader (on the CPU), outside the Trainer's device transfer, so
    they are moved to the module's device here.
    """
    batches = [move_data_to_device(batch, module.device) for batch in batches]
    was_training = module.training
    module.eval()
    scores = torch.cat([module.success_logits(batch).flatten() for batch in batches]).cpu()  # [Q]
    success = torch.cat([batch.query_success.flatten() for batch in batches]).cpu()  # [Q]
    module.train(was_training)
    scale, bias = platt_scaling(scores, success)
    log.info(
        "export: Platt scaling on %d validation queries: scale %.3f, bias %.3f", len(scores), scale, bias
    )
    head, calibrated = torch.sigmoid(scores), torch.sigmoid(scale * scores + bias)  # [Q], [Q]
    metrics = {
        f"export/val_{name}_{which}": float(metric(prob, success))
        for name, metric in (("brier", brier), ("ece", expected_calibration_error))
        for which, prob in (("head", head), ("calibrated", calibrated))
    }
    return (scale, bias), metrics


def platt_scaling(scores: Tensor, success: Tensor) -> tuple[float, float]:
    """`(scale, bias)` minimising the cross-entropy of `sigmoid(scale * s + bias)` against success rates
    (`scores`, `success` `[Q]`), constrained to `scale >= 0` so the calibration never reverses a ranking.

    Unregularised, unlike the trainer's `basis.v05.fit_platt`, but the objective is convex all the same:
    when the unconstrained optimum has `scale < 0`, the constrained one lies on `scale = 0`, where the
    bias alone has the closed form `logit(mean success)`.
    """
    scores, success = scores.double(), success.double()
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    # A line search: a fixed step diverges (scale ~1e10) or overshoots to scale < 0 on wide or shifted scores.
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                params[0] * scores + params[1], success
            )
            loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    scale, bias = params.detach().tolist()
    if scale >= 0:
        return scale, bias
    mean = success.double().mean()  # the flat prediction that minimises the cross-entropy
    log.warning(
        "export: V0 ranks the %d validation queries no better than chance (unconstrained Platt scale "
        "%.3f < 0): scale set to 0, so the calibrated prior is flat at %.3f",
        len(scores),
        scale,
        float(mean),
    )
    return 0.0, float(torch.logit(mean, eps=1e-6))  # eps: finite for one-class outcomes


def prior_from_module(
    module: Any,
    max_context: int = 512,
    *,
    calibration: tuple[float, float] = (1.0, 0.0),
    info: dict[str, Any] | None = None,
) -> ValuePrior:
    """A `ValuePrior` sharing (copies of) a `V0Module`'s backbone, adapter and head."""
    import copy

    return ValuePrior(
        module.backbone,
        copy.deepcopy(module.adapter).cpu(),
        copy.deepcopy(module.head).cpu(),
        label_threshold=module.hparams.label_threshold,
        max_context=max_context,
        calibration=calibration,
        info={"head_source": str(module.head_path), **(info or {})},
    )
