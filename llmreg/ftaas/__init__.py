"""Fine-tuning as a service: align (SFT, Booster, Vaccine) → a customer fine-tune with harmful samples → measure the
harm."""

from llmreg.ftaas.judges import TextClassificationJudge, make_harmful_judge
from llmreg.ftaas.pipeline import FTaaSArguments, FTaaSPipeline, results_plot, results_table


__all__ = ["FTaaSArguments", "FTaaSPipeline", "TextClassificationJudge", "make_harmful_judge", "results_plot",
           "results_table"]
