"""value_prior: the generalist value model V0 (design.md §3) and its pretraining.

`from value_prior import ValuePrior`; `ValuePrior.load(path).predict(context_prompts, context_success,
query_prompts)`. Pretraining: `value-prior fit --config configs/value_prior/v0_release_minilm.yaml`.
"""

from value_prior.prior import SingleClassContextWarning, ValuePrior

__all__ = ["SingleClassContextWarning", "ValuePrior"]
