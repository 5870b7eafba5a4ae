"""Sampling K responses per prompt (transformers ``generate``, batched, seeded; vLLM when asked for) and scoring
responses' sequence log-probs under a model."""

import torch
from tqdm.auto import tqdm

from llmreg.losses.selfplay import sequence_logps


def templated_prompt(tokenizer, prompt) -> str:
    """The text a model continues: the chat template with the generation prompt, or a plain-text prompt as is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def _trim(ids: list[int], eos_token_id: int, pad_token_id: int) -> list[int]:
    """Generated ids up to and including the first EOS; padding after it dropped."""
    if eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1]
    while ids and ids[-1] == pad_token_id and pad_token_id != eos_token_id:
        ids = ids[:-1]
    return ids


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list, *, num_samples: int, max_new_tokens: int,
                       temperature: float, top_p: float = 1.0, batch_size: int = 32, seed: int = 0,
                       desc: str = "generating", show_progress: bool = True) -> list[list[dict]]:
    """For each prompt, ``num_samples`` sampled completions as ``{"text": str, "ids": list[int]}``.

    Each batch is seeded from ``seed`` and its first prompt index, so a rerun gives the same samples whatever ran
    before it (the self-play loop relies on this to resume). ``temperature=0`` is greedy decoding.
    """
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts are left-padded
    results = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not show_progress):
            torch.manual_seed(seed * 1_000_003 + start)
            texts = [templated_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            # top_k=0: no top-k cut (transformers' default is 50), so at temperature 1 and top_p 1 the samples come
            # from the policy itself, as the KL estimate and SPPO's win probabilities assume.
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if (
                temperature > 0) else {"do_sample": False}
            output = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                    **sampling)
            new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
            for index in range(len(texts)):
                group = []
                for ids in new_tokens[index * num_samples:(index + 1) * num_samples]:
                    ids = _trim(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
                    group.append({"text": tokenizer.decode(ids, skip_special_tokens=True), "ids": ids})
                results.append(group)
    finally:
        tokenizer.padding_side = padding_side
    return results


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


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: list, completion_ids: list[list[int]], batch_size: int = 32,
                     desc: str = "scoring", show_progress: bool = True) -> list[float]:
    """ℓ(y | x) = Σ log p(y_k | x, y_<k) of each completion (given as token ids) under ``model``."""
    model.eval()
    values = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not show_progress):
        prompt_ids = [tokenizer(templated_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
                      for p in prompts[start:start + batch_size]]
        sequences = [p + c for p, c in zip(prompt_ids, completion_ids[start:start + batch_size])]
        length = max(map(len, sequences))
        input_ids = torch.full((len(sequences), length), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        completion_mask = torch.zeros_like(input_ids)
        for row, (p, s) in enumerate(zip(prompt_ids, sequences)):
            input_ids[row, :len(s)] = torch.tensor(s)
            attention_mask[row, :len(s)] = 1
            completion_mask[row, len(p):len(s)] = 1
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        per_token = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(
            -1, input_ids[:, 1:, None].to(model.device)).squeeze(-1)
        values.extend(sequence_logps(per_token, completion_mask[:, 1:].to(model.device)).tolist())
    return values
