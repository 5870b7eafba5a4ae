"""Fine-tuning as a service: align (SFT or Booster) → a customer fine-tune with harmful samples → measure the harm."""

from llmreg.ftaas.pipeline import FTaaSArguments, FTaaSPipeline, results_table


__all__ = ["FTaaSArguments", "FTaaSPipeline", "results_table"]
