"""V0 quality on the V0 release data, side by side with baselines on the same backbone (issue 5).

Splits (both from `../shared/data/v0-release`):
- `context_holdout`: the prompt-level test split of the context pools that V0 never trained or
  early-stopped on (the split recorded in the prior artifact); each pool's context is its remaining
  (train + val) pairs. This is the split the issue judges on.
- `train_queries`: the release's `train.jsonl` queries, less the few whose problem a context pool also
  holds in another spelling (`same_text_key`); context is the whole pool. Only ~30 queries per pool,
  so its intervals are wide.
- `harvested_pairs` (when `--harvested_prior` exists, as after `benchmarks/rollout_efficiency.py`):
  the same methods on the prompt-level test split of the pairs harvested from the tiny policy's GRPO
  checkpoints, with the prior fitted on them (the prior V0.5 uses in that benchmark). Its pools are
  checkpoints of one policy, so its "other policy" context is another checkpoint.

Methods, all on the prior's backbone (MiniLM, mean-pooled and L2-normalised for the baselines):
`v0` (the exported prior), `knn` (mean success of the k nearest context prompts, k chosen per pool by
leave-one-out over {8, 16, 32, 64}), `logreg` (per-context logistic regression on the success rates),
`global_logreg` (one logistic regression on every pool's context pairs: shared prompt difficulty),
`context_mean`, the same kNN and logistic regressions fitted on the pass/fail labels V0 reads
(`*_passfail`: success >= 0.5, where the others use the graded success rates, more information
than V0 gets), and one diagnostic, `head_given_global_logit`: the prior's head reading a single
feature column, the global logistic regression's logit, from the same context (in-sample on the
context prompts, as V0's adapter features are). It measures what the in-context step alone costs: how
much ranking the head loses re-learning a good score from one policy's few hundred binary labels.
Metrics: gAUC, AUC, Brier, ECE, pair accuracy (value_prior.metrics), with 95 %
bootstrap intervals for gAUC and paired intervals for V0 minus each baseline, resampling prompts
(a prompt queried in several pools is one draw with all its items), not items.

Context ablation (same queries): the true context, another policy's context (the other model at the
same step), and the true context with its success rates shuffled (5 shuffles, averaged). The
other-policy swap is also run for the context-reading baselines (`logreg`, `knn`): if they rank a
policy's prompts as well from another policy's context, the data holds no policy-specific ranking
for any context reader to find. The ablation's direct test of reading the context (`across_pools`):
on a prompt queried in several pools, rank the pools that solve it above those that do not (gAUC
grouped by prompt), which no context-free score can do (`global_logreg` ties them: 0.5).

Also: predict latency with 256 context pairs + 256 queries (features cached, and backbone states
only), and the AUC on held-out synthetic tasks of the prior's head and of every head shipped in
`value_prior/heads/`, vs a logistic regression on the same support vs Bayes-optimal.

Run: `python benchmarks/value_prior_quality.py [--prior artifacts/priors/v0-release-minilm]`; if the
prior is missing it is trained first with `value-prior fit --config
configs/value_prior/v0_release_minilm.yaml`. Writes `benchmarks/results/value_prior_quality.json`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
from data_pipelines.v0_release import read_prompts, read_v0_release  # noqa: E402
from value_prior import ValuePrior  # noqa: E402
from value_prior.data import Pool, PromptSplit, pools_from_pairs, same_text_key, split_pools  # noqa: E402
from value_prior.head import InContextHead, load_head  # noqa: E402
from value_prior.metrics import (  # noqa: E402
    auc,
    bootstrap_ci,
    brier,
    grouped_auc,
    paired_bootstrap_diff,
    score_predictions,
)

RELEASE = REPO.parent / "shared" / "data" / "v0-release"
DEFAULT_PRIOR = REPO / "artifacts" / "priors" / "v0-release-minilm"
DEFAULT_CONFIG = REPO / "configs" / "value_prior" / "v0_release_minilm.yaml"
HARVESTED_PRIOR = REPO / "artifacts" / "priors" / "rollout-efficiency"
CACHE_DIR = REPO / ".cache" / "value_prior" / "hidden_states"
SHIPPED_HEADS = REPO / "value_prior" / "heads"
KNN_CHOICES = (8, 16, 32, 64)
METHODS = (
    "v0",
    "knn",
    "logreg",
    "global_logreg",
    "context_mean",
    "head_given_global_logit",
    # the baselines with V0's label information: pass/fail (success >= 0.5) instead of success rates
    "knn_passfail",
    "logreg_passfail",
    "global_logreg_passfail",
)


def pooled_embeddings(prior: ValuePrior, prompts: list[str]) -> dict[str, np.ndarray]:
    """Mean-pooled, L2-normalised backbone embeddings (the baselines' features)."""
    hidden = prior.backbone.hidden_states(prompts)
    pooled = torch.nn.functional.normalize(torch.stack([h.mean(0) for h in hidden]), dim=-1).numpy()
    return dict(zip(prompts, pooled))


def fit_soft_logreg(x: np.ndarray, success: np.ndarray, c: float = 1.0):  # type: ignore[no-untyped-def]
    """Logistic regression on success rates: each row twice, weighted by y and 1 - y."""
    from sklearn.linear_model import LogisticRegression

    xx = np.concatenate([x, x])
    yy = np.concatenate([np.ones(len(x)), np.zeros(len(x))])
    ww = np.concatenate([success, 1 - success])
    return LogisticRegression(C=c, max_iter=2000).fit(xx, yy, sample_weight=ww)


def knn_predict(context_x: np.ndarray, context_y: np.ndarray, query_x: np.ndarray) -> np.ndarray:
    """Mean success of the k nearest context prompts; k picked by leave-one-out on the context."""
    sim_context = context_x @ context_x.T
    np.fill_diagonal(sim_context, -np.inf)
    order = np.argsort(-sim_context, axis=1)
    labels = context_y >= 0.5
    best_k, best = KNN_CHOICES[0], -1.0
    for k in KNN_CHOICES:
        loo = context_y[order[:, :k]].mean(1)
        if labels.min() != labels.max():
            from sklearn.metrics import roc_auc_score

            score = roc_auc_score(labels, loo)
            if score > best:
                best_k, best = k, score
    nearest = np.argsort(-(query_x @ context_x.T), axis=1)[:, :best_k]
    return context_y[nearest].mean(1)


def head_given_feature(
    prior: ValuePrior, context_feature: np.ndarray, context_success: np.ndarray, query_feature: np.ndarray
) -> np.ndarray:
    """The prior's head reading one feature column; a single-class context gives the context mean."""
    labels = context_success >= prior.label_threshold
    if labels.min() == labels.max():
        return np.full(len(query_feature), context_success.mean())

    def rows(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32)[None, :, None]  # [1, n, 1]

    with torch.no_grad():
        s = prior.head.success_logit(
            rows(context_feature), torch.as_tensor(labels[None], dtype=torch.float32), rows(query_feature)
        )
    return torch.sigmoid(s[0]).numpy()


def other_policy(name: str, names: list[str]) -> str:
    """The pool of the other model at the same step (falls back to any other pool)."""
    policy, step = name.rsplit("@", 1)
    for candidate in names:
        other_policy_name, other_step = candidate.rsplit("@", 1)
        if other_step == step and other_policy_name != policy:
            return candidate
    return next(n for n in names if n != name)


def evaluate_split(
    prior: ValuePrior,
    context: dict[str, Pool],
    queries: dict[str, Pool],
    embed: dict[str, np.ndarray],
    seed: int,
) -> tuple[dict, dict]:
    """Scores of every method and the context ablation on one split."""
    names = sorted(n for n in queries if len(queries[n].success) and n in context)
    context_x = {n: np.stack([embed[p] for p in context[n].prompts]) for n in names}
    # Each pool's own model serves its own queries and, in the ablation, another pool's.
    context_lr = {n: fit_soft_logreg(context_x[n], context[n].success) for n in names}
    global_lr = fit_soft_logreg(
        np.concatenate([context_x[n] for n in names]), np.concatenate([context[n].success for n in names])
    )
    # The same two regressions fitted on the pass/fail labels V0 reads (success >= 0.5), not the rates
    passfail = {n: (context[n].success >= prior.label_threshold).astype(float) for n in names}
    context_lr_passfail = {n: fit_soft_logreg(context_x[n], passfail[n]) for n in names}
    global_lr_passfail = fit_soft_logreg(
        np.concatenate([context_x[n] for n in names]), np.concatenate([passfail[n] for n in names])
    )
    preds: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    ablation: dict[str, list[np.ndarray]] = {
        "true_context": [],
        "other_policy_context": [],
        "shuffled_context": [],
    }
    baselines_other: dict[str, list[np.ndarray]] = {"logreg": [], "knn": []}
    success, groups, prompts = [], [], []
    rng = np.random.default_rng(seed)
    for name in names:
        ctx, qry = context[name], queries[name]
        cx = context_x[name]
        qx = np.stack([embed[p] for p in qry.prompts])
        query_logit = global_lr.decision_function(qx)
        v0 = prior.predict(ctx.prompts, ctx.success, qry.prompts).numpy()
        preds["v0"].append(v0)
        preds["knn"].append(knn_predict(cx, ctx.success, qx))
        preds["logreg"].append(context_lr[name].predict_proba(qx)[:, 1])
        preds["global_logreg"].append(expit(query_logit))  # = predict_proba(qx)[:, 1], as sklearn computes it
        preds["context_mean"].append(np.full(len(qx), ctx.success.mean()))
        preds["logreg_passfail"].append(context_lr_passfail[name].predict_proba(qx)[:, 1])
        preds["global_logreg_passfail"].append(global_lr_passfail.predict_proba(qx)[:, 1])
        preds["knn_passfail"].append(knn_predict(cx, passfail[name], qx))
        preds["head_given_global_logit"].append(
            head_given_feature(prior, global_lr.decision_function(cx), ctx.success, query_logit)
        )
        other_name = other_policy(name, names)
        other = context[other_name]
        ablation["true_context"].append(v0)
        ablation["other_policy_context"].append(
            prior.predict(other.prompts, other.success, qry.prompts).numpy()
        )
        shuffled = [
            prior.predict(ctx.prompts, rng.permutation(ctx.success), qry.prompts).numpy() for _ in range(5)
        ]
        ablation["shuffled_context"].append(np.mean(shuffled, axis=0))
        baselines_other["logreg"].append(context_lr[other_name].predict_proba(qx)[:, 1])
        baselines_other["knn"].append(knn_predict(context_x[other_name], other.success, qx))
        success.append(qry.success)
        groups += [name] * len(qry.success)
        prompts += [same_text_key(t) for t in qry.prompts]
    y, g = np.concatenate(success), np.array(groups)
    boot = {"n_resamples": 500, "seed": seed, "clusters": prompts}  # resample prompts, not items

    def gauc_fn(p: np.ndarray, s: np.ndarray, gr: np.ndarray) -> float:
        return grouped_auc(p, s, list(gr))

    def auc_fn(p: np.ndarray, s: np.ndarray, gr: np.ndarray) -> float:
        return auc(p, s)

    def brier_fn(p: np.ndarray, s: np.ndarray, gr: np.ndarray) -> float:
        return brier(p, s)

    scores = {}
    for method, parts in preds.items():
        p = np.concatenate(parts)
        scores[method] = score_predictions(p, y, list(g))
        scores[method]["gauc_ci95"] = bootstrap_ci(gauc_fn, p, y, g, **boot)
        if method != "v0":
            diff = paired_bootstrap_diff(gauc_fn, np.concatenate(preds["v0"]), p, y, g, **boot)
            scores[method]["v0_minus_this_gauc"] = {"diff": diff[0], "ci95": [diff[1], diff[2]]}
    scores["num_queries"] = len(y)
    ablation_scores = {}
    for variant, parts in ablation.items():
        p = np.concatenate(parts)
        ablation_scores[variant] = score_predictions(p, y, list(g))
        if variant == "true_context":
            continue
        true_p = np.concatenate(ablation["true_context"])
        for name, fn in (("gauc", gauc_fn), ("auc", auc_fn), ("brier", brier_fn)):
            diff = paired_bootstrap_diff(fn, true_p, p, y, g, **boot)
            ablation_scores[variant][f"true_minus_this_{name}"] = {
                "diff": diff[0],
                "ci95": [diff[1], diff[2]],
            }
    # The same swap for the context-reading baselines: is there policy-specific ranking to read at all?
    ablation_scores["baselines_other_policy_context"] = {}
    for method, parts in baselines_other.items():
        true_p, other_p = np.concatenate(preds[method]), np.concatenate(parts)
        diff = paired_bootstrap_diff(gauc_fn, true_p, other_p, y, g, **boot)
        ablation_scores["baselines_other_policy_context"][method] = {
            "gauc_true_context": scores[method]["gauc"],
            "gauc_other_policy_context": gauc_fn(other_p, y, g),
            "true_minus_this_gauc": {"diff": diff[0], "ci95": [diff[1], diff[2]]},
        }
    ablation_scores["across_pools"] = rank_pools_per_prompt(
        {
            "v0_true_context": np.concatenate(ablation["true_context"]),
            "v0_other_policy_context": np.concatenate(ablation["other_policy_context"]),
            "v0_shuffled_context": np.concatenate(ablation["shuffled_context"]),
            **{
                method: np.concatenate(preds[method])
                for method in ("context_mean", "logreg", "knn", "global_logreg")
            },
        },
        y,
        prompts,
        boot,
    )
    return scores, ablation_scores


def rank_pools_per_prompt(
    preds: dict[str, np.ndarray], success: np.ndarray, prompts: list[str], boot: dict
) -> dict:
    """The context ablation's direct test: on one prompt queried in several pools, does the method rank
    the pools that solve it above those that do not? That is gAUC with the prompt, not the pool, as the
    group (prompts with one label across their pools are skipped). Only a context reader can score
    above 0.5 here: a context-free score such as `global_logreg` ties every pool of a prompt."""
    groups = np.array(prompts)

    def across_pools(p: np.ndarray, s: np.ndarray, gr: np.ndarray) -> float:
        return grouped_auc(p, s, list(gr))

    labels = success >= 0.5
    informative = [key for key in set(prompts) if len(set(labels[groups == key])) == 2]
    out: dict = {"num_prompts": len(informative), "num_items": int(np.isin(groups, informative).sum())}
    for method, p in preds.items():
        out[method] = {
            "gauc": across_pools(p, success, groups),
            "ci95": bootstrap_ci(across_pools, p, success, groups, **boot),
        }
    for method in ("v0_other_policy_context", "v0_shuffled_context", "context_mean"):
        diff = paired_bootstrap_diff(
            across_pools, preds["v0_true_context"], preds[method], success, groups, **boot
        )
        out[method]["v0_true_context_minus_this"] = {"diff": diff[0], "ci95": [diff[1], diff[2]]}
    return out


def load_split(prior: ValuePrior) -> PromptSplit:
    """The prompt-level split the prior was trained with (recorded in its artifact)."""
    info, default = prior.info.get("data", {}), PromptSplit()
    return PromptSplit(
        info.get("val_fraction", default.val_fraction),
        info.get("test_fraction", default.test_fraction),
        info.get("split_salt", default.salt),
    )


def evaluate_harvested(path: Path, seed: int) -> tuple[dict, dict]:
    """Every method on the test split of the harvested pairs the prior at `path` was fitted on."""
    from data_pipelines.pairs import load_valid_pairs

    prior = ValuePrior.load(path, cache_dir=str(CACHE_DIR))
    pairs = Path(prior.info["data"]["pairs"])
    pools = pools_from_pairs(load_valid_pairs(str(pairs if pairs.is_absolute() else REPO / pairs)))
    split = load_split(prior)
    embed = pooled_embeddings(prior, sorted({p for pool in pools.values() for p in pool.prompts}))
    scores, ablation = evaluate_split(
        prior, split_pools(pools, split, ("train", "val")), split_pools(pools, split, ("test",)), embed, seed
    )
    scores["prior"] = str(path)
    return scores, ablation


def measure_latency(prior: ValuePrior, prompts: list[str], success: np.ndarray, repeats: int = 20) -> dict:
    """Median predict time with 256 context pairs + 256 queries."""
    context, queries = prompts[:256], prompts[256:512]
    ctx_success = success[:256]
    prior.predict(context, ctx_success, queries)  # warm: hidden states + features cached
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        prior.predict(context, ctx_success, queries)
        times.append(time.perf_counter() - start)
    cold = []
    for _ in range(3):
        prior._features.clear()  # adapter runs again; backbone states stay cached
        start = time.perf_counter()
        prior.predict(context, ctx_success, queries)
        cold.append(time.perf_counter() - start)
    return {
        "context": 256,
        "queries": 256,
        "median_ms_features_cached": 1000 * float(np.median(times)),
        "p90_ms_features_cached": 1000 * float(np.percentile(times, 90)),
        "median_ms_backbone_cached_only": 1000 * float(np.median(cold)),
        "load_average_1min": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
    }


def head_on_synthetic(heads: dict[str, InContextHead], tasks: int, seed: int) -> dict:
    """Heads on held-out synthetic capability tasks (8 features, 256 support, 64 queries): each head's
    AUC, a logistic regression's on the same support rows, and the Bayes-optimal AUC given the
    features (plus the latent oracle, an upper bound)."""
    from value_prior.head import CapabilityPrior, evaluate_head_on_tasks

    features = 8
    generated = CapabilityPrior().sample(
        tasks, 256 + 64, features, 256, torch.Generator().manual_seed(seed), bayes_samples=256
    )
    scores = {name: evaluate_head_on_tasks(head, generated) for name, head in heads.items()}
    references = {k: v for k, v in next(iter(scores.values())).items() if k != "head"}  # head-independent
    rows = {
        name: {
            "auc": s["head"],
            "input_transform": heads[name].input_transform,
            "minus_logreg": s["head"] - s["logreg"],
            "gap_to_bayes": s["bayes"] - s["head"],
        }
        for name, s in scores.items()
    }
    return references | {"features": features, "support": 256, "queries": 64, "heads": rows}


def synthetic_heads(prior: ValuePrior) -> dict[str, InContextHead]:
    """The prior's head, then every head shipped in `value_prior/heads/` that is not the one the prior
    was fitted with (the head is frozen, so that one would be scored twice)."""
    source = Path(prior.info.get("head_source", "")).resolve()
    shipped = {path.name: path for path in sorted(SHIPPED_HEADS.glob("*.ckpt")) if path.resolve() != source}
    return {"prior": prior.head} | {name: load_head(path) for name, path in shipped.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default=str(DEFAULT_PRIOR), help="exported V0 prior folder")
    parser.add_argument("--release", default=str(RELEASE), help="V0 release data folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic_tasks", type=int, default=256)
    parser.add_argument(
        "--harvested_prior",
        default=str(HARVESTED_PRIOR),
        help="a prior fitted on harvested pairs; its test split is scored too when the folder exists",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")

    prior_path = Path(args.prior)
    fit_seconds = None
    if not (prior_path / "config.json").exists():
        print(f"{prior_path} missing: training it with {DEFAULT_CONFIG.name}", flush=True)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "value_prior.cli", "fit", "--config", str(DEFAULT_CONFIG)],
            check=True,
            cwd=REPO,
        )
        fit_seconds = time.perf_counter() - start
    prior = ValuePrior.load(prior_path, cache_dir=str(CACHE_DIR))
    split = load_split(prior)

    texts = read_prompts(args.release)  # one read for both files
    pools = pools_from_pairs(read_v0_release(args.release, "context", texts))
    train_queries = pools_from_pairs(read_v0_release(args.release, "train", texts))
    # The release's train.jsonl holds a few problems that its context pools also hold, in another
    # spelling (`same_text_key`): not unseen prompts, so they are left out of `train_queries`.
    in_context = {same_text_key(p) for pool in pools.values() for p in pool.prompts}
    seen = {
        name: np.array([same_text_key(p) in in_context for p in q.prompts])
        for name, q in train_queries.items()
    }
    train_queries = {name: q.subset(~seen[name]) for name, q in train_queries.items()}
    dropped_train_queries = int(sum(mask.sum() for mask in seen.values()))
    all_prompts = sorted({p for pool in [*pools.values(), *train_queries.values()] for p in pool.prompts})
    embed = pooled_embeddings(prior, all_prompts)

    results: dict = {}
    ablations: dict = {}
    results["context_holdout"], ablations["context_holdout"] = evaluate_split(
        prior,
        split_pools(pools, split, ("train", "val")),
        split_pools(pools, split, ("test",)),
        embed,
        args.seed,
    )
    results["train_queries"], ablations["train_queries"] = evaluate_split(
        prior, pools, train_queries, embed, args.seed
    )
    if (Path(args.harvested_prior) / "config.json").exists():
        results["harvested_pairs"], ablations["harvested_pairs"] = evaluate_harvested(
            Path(args.harvested_prior), args.seed
        )
    first = pools[sorted(pools)[0]]
    payload = {
        **results,
        "context_ablation": ablations,
        "train_queries_dropped_as_seen_in_context": dropped_train_queries,
        "latency": measure_latency(prior, first.prompts, first.success),
        "head_synthetic": head_on_synthetic(synthetic_heads(prior), args.synthetic_tasks, args.seed + 123),
        "prior": {
            "path": str(prior_path),
            "backbone": prior.backbone_name,
            "num_features": prior.num_features,
            "info": prior.info,
            "fit_seconds_this_run": fit_seconds,
        },
    }
    path = write_results("value_prior_quality", payload)
    for split_name in results:
        print(f"\n{split_name} ({results[split_name]['num_queries']} queries)")
        for method in METHODS:
            m = results[split_name][method]
            lo, hi = m["gauc_ci95"]
            print(
                f"  {method:24s} gAUC {m['gauc']:.3f} [{lo:.3f}, {hi:.3f}]  AUC {m['auc']:.3f}  Brier {m['brier']:.4f}  ECE {m['ece']:.4f}"
            )
        for method, m in ablations[split_name]["baselines_other_policy_context"].items():
            d = m["true_minus_this_gauc"]
            print(
                f"  ablation {method} with another policy's context: gAUC {m['gauc_other_policy_context']:.3f} "
                f"(true - this {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}])"
            )
        across = ablations[split_name]["across_pools"]
        print(
            f"  ranking the pools of one prompt ({across['num_prompts']} prompts with both labels across pools):"
        )
        for method, m in across.items():
            if isinstance(m, dict):
                d = m.get("v0_true_context_minus_this")
                vs = (
                    f"  (v0 true - this {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}])"
                    if d
                    else ""
                )
                print(f"      {method:24s} gAUC {m['gauc']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]{vs}")
        for variant, m in ablations[split_name].items():
            if variant in ("baselines_other_policy_context", "across_pools"):
                continue
            print(
                f"  ablation {variant:22s} gAUC {m['gauc']:.3f}  AUC {m['auc']:.3f}  Brier {m['brier']:.4f}  ECE {m['ece']:.4f}"
            )
            for name in ("gauc", "auc", "brier"):
                if f"true_minus_this_{name}" in m:
                    d = m[f"true_minus_this_{name}"]
                    print(
                        f"      true - this {name}: {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                    )
    print("\nlatency", payload["latency"])
    synthetic = payload["head_synthetic"]
    print(
        f"heads on synthetic tasks (logistic regression {synthetic['logreg']:.3f}, Bayes {synthetic['bayes']:.3f}):"
    )
    for name, row in synthetic["heads"].items():
        print(f"  {name:42s} AUC {row['auc']:.3f} ({row['minus_logreg']:+.3f} vs logistic regression)")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
