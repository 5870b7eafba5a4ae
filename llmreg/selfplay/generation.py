"""Sampling K responses per prompt (transformers ``generate``, batched, seeded; vLLM when asked for) and scoring
responses' sequence log-probs under a model."""

from llmreg.generation import generate_left_padded, templated_prompt
from llmreg.scoring import span_logps


def sample_completions(model, tokenizer, prompts: list, *, num_samples: int, max_new_tokens: int,
                       temperature: float, top_p: float = 1.0, batch_size: int = 32, seed: int = 0,
                       desc: str = "generating", show_progress: bool = True) -> list[list[dict]]:
    """For each prompt, ``num_samples`` sampled completions as ``{"text": str, "ids": list[int]}``.

    Each batch is seeded from ``seed`` and its first prompt index, so a rerun gives the same samples whatever ran
    before it (the self-play loop relies on this to resume). ``temperature=0`` is greedy decoding. See
    ``llmreg.generation.generate_left_padded``.
    """
    return generate_left_padded(model, tokenizer, prompts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                                temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed,
                                seed_each_batch=True, desc=desc, show_progress=show_progress)


def sample_completions_vllm(model_name_or_path: str, tokenizer, prompts: list, *, num_samples: int,
                            max_new_tokens: int, temperature: float, top_p: float = 1.0,
                            seed: int = 0) -> list[list[dict]]:
    """``sample_completions`` with vLLM (much faster for real models); needs ``pip install vllm``."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as error:
        raise ImportError("use_vllm=True needs vLLM: pip install vllm (on a GPU machine), or set use_vllm=False to "
                          "generate with transformers.") from error
    llm = LLM(model=model_name_or_path, seed=seed)
    params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
    outputs = llm.generate([templated_prompt(tokenizer, p) for p in prompts], params)
    return [[{"text": o.text, "ids": list(o.token_ids)} for o in output.outputs] for output in outputs]


def completion_logps(model, tokenizer, prompts: list, completion_ids: list[list[int]], batch_size: int = 32,
                     desc: str = "scoring", show_progress: bool = True) -> list[float]:
    """ℓ(y | x) = Σ log p(y_k | x, y_<k) of each completion (given as token ids) under ``model``."""
    prompt_ids = [tokenizer(templated_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    sequences = [p + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    return span_logps(model, sequences, [len(p) for p in prompt_ids], tokenizer.pad_token_id, batch_size=batch_size,
                      desc=desc, show_progress=show_progress)
