"""accelerate launch configs, installed as ``llmreg.accelerate_configs``: ``llmreg run <method> --accelerate_config
zero3`` names ``deepspeed_zero3.yaml`` here (a file's name, without ``deepspeed_`` and ``.yaml``)."""
