"""SPIN with a KL to the base model (α-SPIN) and fictitious play, on TRL's DPOTrainer."""

from llmreg.spin.spin_config import SPINConfig
from llmreg.spin.spin_trainer import SPINTrainer


__all__ = ["SPINConfig", "SPINTrainer"]
