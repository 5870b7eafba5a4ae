"""llmreg: regularized fine-tuning and alignment of LLMs on the Hugging Face stack."""

__version__ = "0.1.0.dev0"
