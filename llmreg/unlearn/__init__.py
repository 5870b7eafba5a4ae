"""Unlearning with CLEAR's objectives and ℓ1 penalty on LoRA (Dontsov et al. 2025): the trainer, its config and the
TOFU-style metrics; the losses are in llmreg/losses/unlearning.py."""

from llmreg.unlearn.unlearn_config import OBJECTIVES, UnlearnConfig
from llmreg.unlearn.unlearn_trainer import UnlearnTrainer


__all__ = ["OBJECTIVES", "UnlearnConfig", "UnlearnTrainer"]
