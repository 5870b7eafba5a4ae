"""RSPO: SPPO with reference regularizers (Tang et al. 2025), on TRL's DPOTrainer."""

from llmreg.rspo.rspo_config import RSPOConfig
from llmreg.rspo.rspo_trainer import RSPOTrainer


__all__ = ["RSPOConfig", "RSPOTrainer"]
