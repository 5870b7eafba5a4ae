"""Batched generation with transformers ``generate``: prompts left-padded, greedy or sampled, seeded.

Pure torch and a model (no Trainer, no accelerate, nothing of the lab): the one loop behind the lab's evaluations
(``generate_completions``, re-exported by ``llmreg.lab``), self-play's samples
(``llmreg.selfplay.generation.sample_completions``), the FTaaS pipeline's and the unlearning evaluation's answers.
"""

import torch
from tqdm.auto import tqdm


def completion_text(completion) -> str:
    """The text of a completion in either TRL format: a string, or a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


def templated_prompt(tokenizer, prompt) -> str:
    """The text a model continues: the chat template with the generation prompt, or a plain-text prompt as is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def trim_completion(ids: list[int], eos_token_id: int, pad_token_id: int) -> list[int]:
    """Generated ids up to and including the first EOS; padding after it dropped."""
    if eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1]
    while ids and ids[-1] == pad_token_id and pad_token_id != eos_token_id:
        ids = ids[:-1]
    return ids


@torch.no_grad()
def generate_left_padded(model, tokenizer, prompts: list, *, max_new_tokens: int, num_samples: int = 1,
                         temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0,
                         seed_each_batch: bool = False, desc: str = "generating",
                         show_progress: bool = True) -> list[list[dict]]:
    """For each prompt (a conversation, rendered with the chat template and its generation prompt, or a plain-text
    prompt), ``num_samples`` completions as ``{"text": str, "ids": list[int]}``: the generated ids up to and including
    the first EOS, and their text without special tokens.

    ``temperature=0`` is greedy decoding (one completion per prompt); above 0, sampling from the model's own
    distribution (no top-k cut, ``top_p`` nucleus). Sampling is seeded by ``seed``, once before the first batch, or
    with ``seed_each_batch`` before every batch from ``seed`` and the batch's first prompt index, so that a rerun of
    any part of the prompts gives the same samples whatever ran before it (the self-play loop resumes on this). The
    caller's (CPU) random state is restored afterwards, as is the tokenizer's padding side.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    # top_k=0: no top-k cut (transformers' default is 50), so at temperature 1 and top_p 1 the samples come from the
    # policy itself, as the KL estimate and SPPO's win probabilities assume.
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if (
        temperature > 0) else {"do_sample": False}
    generator_state = torch.random.get_rng_state()
    if temperature > 0 and not seed_each_batch:
        torch.manual_seed(seed)
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts are left-padded
    results = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not show_progress):
            if temperature > 0 and seed_each_batch:
                torch.manual_seed(seed * 1_000_003 + start)
            texts = [templated_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            output = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                    **sampling)
            new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
            for index in range(len(texts)):
                group = []
                for ids in new_tokens[index * num_samples:(index + 1) * num_samples]:
                    ids = trim_completion(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
                    group.append({"text": tokenizer.decode(ids, skip_special_tokens=True), "ids": ids})
                results.append(group)
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(generator_state)  # generating does not shift the caller's random stream
    return results


def generate_completions(model, tokenizer, prompts: list, max_new_tokens: int = 32, batch_size: int = 64,
                         desc: str = "generating", show_progress: bool = True, temperature: float = 0.0,
                         seed: int = 0) -> list[str]:
    """The text of one completion per prompt (a conversation or a plain-text prompt), decoded without special
    tokens: greedy, or sampled at ``temperature`` > 0 (no top-k/top-p truncation; ``seed`` makes the samples
    repeatable). The caller's random state is unchanged."""
    groups = generate_left_padded(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                  batch_size=batch_size, seed=seed, desc=desc, show_progress=show_progress)
    return [group[0]["text"] for group in groups]
