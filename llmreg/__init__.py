"""llmreg: regularized fine-tuning and alignment of LLMs on the Hugging Face stack."""

__version__ = "0.1.0.dev0"

import logging as _logging
import warnings as _warnings


# PEFT imports bitsandbytes whenever it is installed, and bitsandbytes then warns, on every CPU machine with AVX-512
# BF16, that an optional hub kernel for 4-bit matrix products is missing ("pip install kernels"), even for runs that
# quantize nothing. Only that logger is quieted, to errors; a level set before llmreg is imported is kept.
_bnb_cpu_logger = _logging.getLogger("bitsandbytes.backends.cpu.ops")
if _bnb_cpu_logger.level == _logging.NOTSET:
    _bnb_cpu_logger.setLevel(_logging.ERROR)

# TRL 1.16 reads `model.is_gradient_checkpointing`, which transformers 5 deprecated (FutureWarning) in favour of
# `is_activation_checkpointing`: a warning about TRL's code that no llmreg user can act on; only it is hidden.
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
