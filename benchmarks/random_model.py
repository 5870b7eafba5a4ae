"""A randomly initialized model with the lab tokenizer, built from a config: no download, for GPU-sized benchmarks.

    python benchmarks/random_model.py --size 0.5b --output-dir outputs/gpu_check/model

Sizes (Qwen2 architecture, the lab tokenizer's 1,024-token vocabulary, so nearly every parameter is in the layers):
``0.5b`` is 16 layers of width 1536 (MLP 6144, 12 heads, 2 key-value heads): 0.54B parameters; ``tiny`` is the lab
model's shape (1M), to check a script on a CPU.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from llmreg.lab import ensure_lab_model


SIZES = {
    "0.5b": dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=2),
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
}


def build(size: str, output_dir: Path, seed: int = 0, **overrides) -> int:
    """Save the model (``SIZES[size]``, with ``overrides`` of its config fields) and the lab tokenizer to
    ``output_dir``; returns the parameter count."""
    lab = ensure_lab_model()
    tokenizer = AutoTokenizer.from_pretrained(lab)
    lab_config = Qwen2Config.from_pretrained(lab)
    config = Qwen2Config(**{**SIZES[size], **overrides}, vocab_size=lab_config.vocab_size, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=lab_config.eos_token_id,
                         pad_token_id=lab_config.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = lab_config.pad_token_id
    model.generation_config.eos_token_id = lab_config.eos_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args()
    count = build(args.size, args.output_dir)
    print(f"{args.output_dir}: {count / 1e6:.0f}M parameters")
