"""value_prior: the generalist value model V0 (design.md §3) and its pretraining.

`from value_prior import ValuePrior`; `ValuePrior.load(path).predict(context_prompts, context_success,
query_prompts)`. Pretraining: `value-prior fit --config configs/value_prior/v0_release_minilm.yaml`, or
from Python `V0Module` + `PairsDataModule` with the `ExportPrior` callback.
"""

from value_prior.data import PairsDataModule
from value_prior.model import V0Module
from value_prior.prior import ExportPrior, SingleClassContextWarning, ValuePrior

__all__ = ["ExportPrior", "PairsDataModule", "SingleClassContextWarning", "V0Module", "ValuePrior"]
