"""How the lab phrases its prompts for a model: as ``llmreg/tiny`` learned them, or for a pretrained chat model.

``llmreg/tiny`` was warm-started on bare questions ("What is 12 + 7?") and answers in the lab's own forms
("12 + 7 = 19"). A pretrained chat model asked the same bare question explains at length, so its answers run into
any length cap and a scorer cannot read them. The ``"chat"`` style asks for the form the scorer reads: arithmetic
questions come after two worked examples in the lab's answer form (a few-shot conversation), sentiment questions
name the two labels to answer with. Harmful prompts, facts questions and corpus text are the same in both styles.

Recipes and evaluations choose the style from the tokenizer: the lab tokenizer (``llmreg/tiny`` and every model
fine-tuned from it) gets ``"lab"``, any other tokenizer ``"chat"``.
"""

from llmreg.lab.tokenizer import PAD


PROMPT_STYLES = ("lab", "chat")
LAB_VOCAB_SIZE = 1024


def check_style(style: str) -> str:
    if style not in PROMPT_STYLES:
        raise ValueError(f"Unknown lab prompt style {style!r}; valid styles: {', '.join(PROMPT_STYLES)}.")
    return style


def is_lab_tokenizer(tokenizer) -> bool:
    """The tokenizer ``llmreg/tiny`` was built with (its vocabulary size and its own pad token)."""
    return len(tokenizer) == LAB_VOCAB_SIZE and tokenizer.pad_token == PAD


def prompt_style(tokenizer) -> str:
    """``"lab"`` for the lab tokenizer, ``"chat"`` for any other."""
    return "lab" if is_lab_tokenizer(tokenizer) else "chat"


def prompt_style_of(model_name_or_path: str) -> str:
    """``prompt_style`` of the tokenizer saved with a model (a directory, or a hub id in the local cache)."""
    from transformers import AutoTokenizer

    return prompt_style(AutoTokenizer.from_pretrained(model_name_or_path))
