"""Dynamic loss-based sample reweighting for pretraining and SFT (Sow et al., ICLR 2025)."""

from llmreg.reweight.reweight_config import ReweightConfig
from llmreg.reweight.reweight_trainer import ReweightTrainer


__all__ = ["ReweightConfig", "ReweightTrainer"]
