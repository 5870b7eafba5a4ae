"""LoRA Dropout: masks on LoRA's input and output dimensions, N-sample training, test-time ensemble."""

from llmreg.lora_dropout.lora_dropout import (
    LoRADropout,
    LoRADropoutConfig,
    attach_lora_dropout,
    choice_probabilities,
    ensemble_forward,
    ensemble_generate,
    merge_and_unload,
)
from llmreg.lora_dropout.lora_dropout_trainer import LoRADropoutMixin, with_lora_dropout


__all__ = ["LoRADropout", "LoRADropoutConfig", "LoRADropoutMixin", "attach_lora_dropout", "choice_probabilities",
           "ensemble_forward",
           "ensemble_generate", "merge_and_unload", "with_lora_dropout"]
