"""basis: RLVR policy training with a pretrained value prior (V0.5 baselines, OSLA budgets).

Pure RL math lives in `basis.advantages`, `basis.losses` and `basis.metrics`; the LightningModule that
orchestrates rollouts, rewards and updates lives in `basis.trainer`.
"""

__version__ = "0.1.0"
