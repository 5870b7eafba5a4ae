from llmreg.rpg.rpg_config import RPGConfig
from llmreg.rpg.rpg_trainer import RPGTrainer


__all__ = ["RPGConfig", "RPGTrainer"]
