"""value_prior: the generalist value model V0 (design.md §3) and its pretraining."""
