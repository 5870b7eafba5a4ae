"""Pure loss math: functions of tensors that return tensors. This package imports torch and nothing else.

- ``aggregation``: masked aggregation of per-token losses (token-mean with a global normalizer, sequence means);
- ``kl``: the KL estimator vocabulary (k1, k2, k3);
- ``rpg``: RPG's KL-regularized policy-gradient surrogates (forward/reverse, normalized/unnormalized KL; full and
  REINFORCE estimators; old-policy or fixed reference);
- ``perturbation``: the weight-perturbation update rules (SAM, ASAM, finite-difference gradient-norm regularization,
  AWP; Booster's step in ``booster``).
"""

from llmreg.losses.aggregation import aggregate
from llmreg.losses.kl import kl_estimate
from llmreg.losses.rpg import rpg_per_token_loss


__all__ = ["aggregate", "kl_estimate", "rpg_per_token_loss"]
