"""Booster: alignment with a harmful-perturbation regularizer (Huang et al. 2025), on TRL's SFTTrainer."""

from llmreg.booster.booster_config import BoosterConfig
from llmreg.booster.booster_trainer import BoosterTrainer


__all__ = ["BoosterConfig", "BoosterTrainer"]
