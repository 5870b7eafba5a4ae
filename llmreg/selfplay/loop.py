"""The self-play iteration loop: for t = 1..T, generate with π_t → judge → build pairs → train → save π_{t+1}.

``run_selfplay`` drives ``RSPOTrainer`` (SPPO/RSPO) or ``SPINTrainer`` (SPIN/α-SPIN/fictitious play). All artifacts of
iteration t live in ``<output_dir>/iter_<t>/`` and each is written atomically (to a temporary name, then renamed):

    generations.jsonl   K samples per prompt from π_t (token ids and text)
    dataset/            the training pairs (``save_to_disk``); TRL's and llmreg's log-prob caches sit next to them
    train/              the trainer's checkpoints (``save_steps``), so a crash mid-training resumes from the last one
    model/              π_{t+1} (a LoRA adapter is merged into its base first)
    eval.json           win rate against the base model, mean response length, KL to the base, mean judge score

A rerun of the same command skips every artifact that exists, so the loop resumes where it stopped. Generation is
seeded per iteration and per batch, so a rerun writes the same samples. The base model is evaluated once
(``<output_dir>/base/``); its samples on the training prompts are kept for RSPO's ``forward_kl_samples``.

Under several processes each rank generates its share of the prompts with a full copy of π_t (outside ZeRO-3), the
main process judges and writes, and training runs on all ranks with the launch's accelerate configuration.
"""

import gc
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset, concatenate_datasets, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmreg.rspo import RSPOConfig, RSPOTrainer
from llmreg.selfplay.generation import completion_logps, sample_completions, sample_completions_vllm
from llmreg.selfplay.judges import make_judge, pair_from_preferences
from llmreg.spin import SPINConfig, SPINTrainer
from llmreg.trainer_utils import (
    check_dataset_columns,
    replace_directory,
    save_whole_model,
    without_zero3,
    write_atomically,
)


logger = logging.getLogger(__name__)

# The settings that shape a run's artifacts; a rerun into the same output directory must keep them (see
# ``SelfPlayLoop._check_settings``). ``iterations`` may grow, so that a finished run can be extended.
TRAINING_SETTINGS = {
    "rspo": ("beta", "sppo_variant", "regularizers", "is_clip"),
    "spin": ("beta", "loss_type", "alpha", "opponent_mixture"),
}
SHARED_TRAINING_SETTINGS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                            "gradient_accumulation_steps", "max_length", "seed")


@dataclass
class SelfPlayArguments:
    """The iteration loop's settings (the trainer's own settings live in RSPOConfig / SPINConfig)."""

    iterations: int = field(default=3, metadata={"help": "Number of self-play iterations T (papers: 3)."})
    prompts_per_iteration: int | None = field(
        default=None,
        metadata={"help": "Prompts per iteration, taken as consecutive slices of the prompt set, cycling (SPPO uses "
                          "a new third of UltraFeedback each iteration). None: all prompts every iteration."},
    )
    num_samples: int = field(
        default=5, metadata={"help": "Responses K per prompt (SPPO: 5). SPIN always uses 1 generated response."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length limit (SPIN: 256; SPPO: 2048)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (SPPO: 0.7; 0 = greedy)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling (SPPO: 0.9)."})
    generation_batch_size: int = field(default=32, metadata={"help": "Prompts per generate call."})
    use_vllm: bool = field(
        default=False, metadata={"help": "Generate with vLLM (must be installed) on the main process."}
    )
    judge: str = field(
        default="reward_func:llmreg.lab.arithmetic_reward",
        metadata={"help": "KIND:TARGET with KIND reward_func (a TRL-style reward function), reward_model (a "
                          "sequence-classification checkpoint) or pairwise (f(prompt, a, b) -> P(a > b))."},
    )
    judge_temperature: float = field(default=1.0, metadata={"help": "τ of Bradley–Terry: P_ij = σ((s_i − s_j)/τ)."})
    real_column: str = field(
        default="completion", metadata={"help": "SPIN: the column with the real (SFT) response to each prompt."}
    )
    history: int = field(
        default=1,
        metadata={"help": "SPIN fictitious play: the opponent covers the last h iterates (1 = SPIN). With "
                          "opponent_mixture='data' the pairs of the last h iterations are trained on together."},
    )
    num_eval_prompts: int = field(
        default=200, metadata={"help": "Held-out prompts for the per-iteration evaluation (at least 1)."}
    )
    eval_temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature of the evaluation responses. At 1 the mean log-ratio of the responses "
                          "estimates KL(π‖μ); at any other temperature it is only a log-ratio, not that KL."},
    )
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Length limit of the evaluation responses (None: max_new_tokens)."}
    )

    def __post_init__(self):
        if self.iterations < 1 or self.num_samples < 1 or self.history < 1:
            raise ValueError("iterations, num_samples and history must be >= 1.")
        if self.num_eval_prompts < 1 or self.eval_temperature <= 0:
            raise ValueError("num_eval_prompts must be >= 1 (the loop's results are its evaluations) and "
                             "eval_temperature > 0 (the KL estimate needs samples).")


def last_complete_checkpoint(directory: Path) -> str | None:
    """The newest ``checkpoint-N`` the Trainer finished writing, or None.

    The Trainer writes a checkpoint's files one after the other and ``trainer_state.json`` last; a process killed
    in between leaves a checkpoint without it (or with it cut short), which ``get_last_checkpoint`` would pick.
    """
    steps = []
    for checkpoint in directory.glob("checkpoint-*") if directory.is_dir() else []:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        steps.append((int(checkpoint.name.rpartition("-")[2]), checkpoint))
    return str(max(steps)[1]) if steps else None


def _assistant(prompt, text: str):
    """A completion in the prompt's format: a message list for conversational prompts, else the text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


class SelfPlayLoop:
    """See the module docstring. ``method`` is ``"rspo"`` or ``"spin"``; ``training_args`` its config."""

    def __init__(self, method: str, loop_args: SelfPlayArguments, training_args: RSPOConfig | SPINConfig,
                 model_name_or_path: str, prompts: Dataset, eval_prompts: Dataset, peft_config=None):
        if method not in ("rspo", "spin"):
            raise ValueError(f"Unknown self-play method {method!r}; valid methods: rspo, spin.")
        expected = RSPOConfig if method == "rspo" else SPINConfig
        if not isinstance(training_args, expected):
            raise TypeError(f"Self-play method {method!r} needs a {expected.__name__}, got "
                            f"{type(training_args).__name__}.")
        required = ("prompt", loop_args.real_column) if method == "spin" else ("prompt",)
        check_dataset_columns(prompts, {"prompts": required}, f"self-play ({method}) prompts")
        check_dataset_columns(eval_prompts, {"prompts": ("prompt",)}, f"self-play ({method}) evaluation prompts")
        if method == "spin" and loop_args.history > 1 and training_args.opponent_mixture != "data" and (
                training_args.history_models):
            raise ValueError("The loop fills history_models from the last iterates; leave it empty in the config.")
        self.method = method
        self.args = loop_args
        self.training_args = training_args
        self.base = model_name_or_path
        self.prompts = prompts
        self.eval_prompts = eval_prompts.select(range(min(loop_args.num_eval_prompts, len(eval_prompts))))
        self.peft_config = peft_config
        self.output_dir = Path(training_args.output_dir)
        self.state = PartialState()
        self.judge = make_judge(loop_args.judge, loop_args.judge_temperature) if self.state.is_main_process else None
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self._check_settings()

    def _check_settings(self) -> None:
        """Record the run's settings; refuse a rerun into the same directory with other settings.

        A rerun skips every artifact that exists, so new settings would silently apply to some iterations only.
        """
        loop = {key: value for key, value in vars(self.args).items() if key != "iterations"}
        training = {key: getattr(self.training_args, key)
                    for key in (*TRAINING_SETTINGS[self.method], *SHARED_TRAINING_SETTINGS)}
        settings = json.loads(json.dumps({"method": self.method, "base_model": self.base, **loop, **training},
                                         default=str))
        path = self.output_dir / "selfplay_settings.json"
        if path.exists():
            recorded = json.loads(path.read_text())
            changed = {key: (recorded.get(key), value) for key, value in settings.items()
                       if recorded.get(key) != value}
            if changed:
                details = ", ".join(f"{key}: {old!r} → {new!r}" for key, (old, new) in changed.items())
                raise ValueError(
                    f"{self.output_dir} holds a self-play run with other settings ({details}). A rerun resumes that "
                    "run and would mix its artifacts with the new settings: pass a new --output_dir, delete this one "
                    "to start over, or rerun with the recorded settings (see selfplay_settings.json). To continue "
                    "from one of its iterates with new settings, start a new run from it (--model_name_or_path "
                    f"{self.output_dir}/iter_<t>/model)."
                )
        elif self.state.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(settings, indent=1))
        self.state.wait_for_everyone()

    # --- paths -------------------------------------------------------------------------------------------------------
    def iteration_dir(self, t: int) -> Path:
        return self.output_dir / f"iter_{t}"

    def model_path(self, t: int) -> str:
        """π_t: the base model for t = 1, else the model trained in iteration t − 1."""
        return self.base if t == 1 else str(self.iteration_dir(t - 1) / "model")

    # --- stages ------------------------------------------------------------------------------------------------------
    def _generate(self, model_path: str, prompts: list, num_samples: int, temperature: float, seed: int,
                  desc: str, max_new_tokens: int, top_p: float) -> list[list[dict]]:
        """Samples of every prompt, the work split over the ranks; every rank gets the whole result."""
        args = self.args
        if args.use_vllm:
            samples = None
            if self.state.is_main_process:
                samples = sample_completions_vllm(model_path, self.tokenizer, prompts, num_samples=num_samples,
                                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                                  top_p=top_p, seed=seed)
            return gather_object([samples])[0]
        # Each rank takes whole batches, so the seeds (per batch start) do not depend on the number of ranks.
        batch = args.generation_batch_size
        starts = list(range(0, len(prompts), batch))[self.state.process_index::self.state.num_processes]
        with without_zero3():
            dtype = (self.training_args.model_init_kwargs or {}).get("dtype", "auto")
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.state.device)
            local = []
            for start in starts:
                group = sample_completions(model, self.tokenizer, prompts[start:start + batch],
                                           num_samples=num_samples, max_new_tokens=max_new_tokens,
                                           temperature=temperature, top_p=top_p, batch_size=batch,
                                           seed=seed + start, desc=f"{desc} (batch {start // batch + 1})",
                                           show_progress=self.state.is_main_process)
                local.append((start, group))
            del model
        gathered = sorted(gather_object(local), key=lambda item: item[0])
        return [group for _, group in gathered for group in group]

    def _samples(self, path: Path, model_path: str, prompts: list, num_samples: int, temperature: float, seed: int,
                 desc: str, max_new_tokens: int | None = None, top_p: float | None = None) -> list[list[dict]]:
        """Samples read from ``path``, or generated and written there (atomically) first; ``max_new_tokens`` and
        ``top_p`` default to the loop's sampling settings."""
        if not path.exists():
            samples = self._generate(model_path, prompts, num_samples, temperature, seed, desc,
                                     max_new_tokens or self.args.max_new_tokens,
                                     self.args.top_p if top_p is None else top_p)
            if self.state.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(path, "".join(json.dumps(group) + "\n" for group in samples))
            self.state.wait_for_everyone()
        return [json.loads(line) for line in path.read_text().splitlines()]

    def _iteration_prompts(self, t: int) -> Dataset:
        size = self.args.prompts_per_iteration
        if size is None or size >= len(self.prompts):
            return self.prompts
        start = ((t - 1) * size) % len(self.prompts)
        indices = [(start + i) % len(self.prompts) for i in range(size)]
        return self.prompts.select(indices)

    def _build_dataset(self, t: int) -> Path:
        """Pairs of iteration t, written to ``iter_t/dataset``."""
        directory = self.iteration_dir(t)
        dataset_dir = directory / "dataset"
        if dataset_dir.exists():
            return dataset_dir
        rows = self._iteration_prompts(t)
        prompts = list(rows["prompt"])
        num_samples = self.args.num_samples if self.method == "rspo" else 1
        samples = self._samples(directory / "generations.jsonl", self.model_path(t), prompts, num_samples,
                                self.args.temperature, self.training_args.seed + 7919 * t, f"iteration {t}: sampling")
        base_samples = None
        if self.method == "rspo" and "forward_kl_samples" in self.training_args.regularizers:
            # μ is fixed, so its samples of each prompt are drawn once and reused by every iteration.
            all_base = self._samples(self.output_dir / "base" / "samples.jsonl", self.base,
                                     list(self.prompts["prompt"]), 1, self.args.temperature,
                                     self.training_args.seed + 1, "base model: sampling")
            index_of = {json.dumps(p): i for i, p in enumerate(self.prompts["prompt"])}
            base_samples = [all_base[index_of[json.dumps(p)]][0]["text"] for p in prompts]
        if self.state.is_main_process:
            columns = {key: list(rows[key]) for key in rows.column_names}
            texts = [[sample["text"] for sample in group] for group in samples]
            if self.method == "rspo":
                preferences = self.judge.preferences(prompts, texts, columns)
                pairs = pair_from_preferences(preferences)
                data = {"prompt": prompts,
                        "chosen": [_assistant(p, g[w]) for p, g, w in zip(prompts, texts, pairs["winner"])],
                        "rejected": [_assistant(p, g[lo]) for p, g, lo in zip(prompts, texts, pairs["loser"])],
                        **{key: pairs[key] for key in ("chosen_probs_win", "chosen_probs_lose", "chosen_probs")}}
                if base_samples is not None:
                    data["base_completion"] = [_assistant(p, text) for p, text in zip(prompts, base_samples)]
                tied = [tie or g[w] == g[lo] for tie, g, w, lo in zip(pairs["tied"], texts, pairs["winner"],
                                                                        pairs["loser"])]
            else:
                data = {"prompt": prompts, "chosen": columns[self.args.real_column],
                        "rejected": [_assistant(p, group[0]) for p, group in zip(prompts, texts)]}
                tied = [chosen == rejected for chosen, rejected in zip(data["chosen"], data["rejected"])]
            counts = {"pairs_kept": tied.count(False), "pairs_tied": tied.count(True)}
            logger.info("Iteration %d: %d pairs kept, %d prompts dropped because chosen and rejected tie (the judge "
                        "could not tell the responses apart, or they are the same text).", t, *counts.values())
            if counts["pairs_kept"] == 0:
                raise RuntimeError(
                    f"Iteration {t}: all {len(tied)} prompts give tied pairs (every response of a prompt judged "
                    "equal, or the rejected response identical to the chosen one), so there is nothing to train on. "
                    "Likely causes: the judge cannot read the responses (check it on a few of "
                    f"{directory / 'generations.jsonl'}), responses hit max_new_tokens before answering, the "
                    "temperature is too low for samples to differ, or num_samples is too small."
                )
            data = {key: [value for value, drop in zip(values, tied) if not drop] for key, values in data.items()}
            write_atomically(directory / "pairs.json", json.dumps(counts))
            temporary = directory / "dataset.tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            Dataset.from_dict(data).save_to_disk(temporary)
            replace_directory(temporary, dataset_dir)
        self.state.wait_for_everyone()
        return dataset_dir

    def _training_dataset(self, t: int) -> Dataset:
        datasets = [load_from_disk(self._build_dataset(t))]
        if self.method == "spin" and self.training_args.opponent_mixture == "data":
            # Fictitious play in the data: negatives of the last h generators, scored against π_t.
            datasets += [load_from_disk(self.iteration_dir(s) / "dataset")
                         for s in range(max(1, t - self.args.history + 1), t)]
        return concatenate_datasets(datasets) if len(datasets) > 1 else datasets[0]

    def _train(self, t: int) -> None:
        directory = self.iteration_dir(t)
        if (directory / "model").exists():
            return
        dataset = self._training_dataset(t)
        args = self.training_args
        args.output_dir = str(directory / "train")
        args.base_model_name_or_path = None if t == 1 else self.base  # at t = 1, π_t is the base
        trainer_class = RSPOTrainer if self.method == "rspo" else SPINTrainer
        if self.method == "spin" and args.opponent_mixture != "data":
            args.history_models = [self.model_path(s) for s in range(t - 1, max(0, t - self.args.history), -1)]
        trainer = trainer_class(self.model_path(t), args=args, train_dataset=dataset,
                                processing_class=self.tokenizer, peft_config=self.peft_config)
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(Path(args.output_dir)))
        trainer.save_state()  # iter_<t>/train/trainer_state.json: the curves llmreg report and llmreg ablate read
        # π_{t+1} is a whole model (a LoRA adapter merged into π_t), so the next iteration starts from it.
        save_whole_model(trainer, directory / "model", merge_adapter=self.peft_config is not None)
        del trainer
        gc.collect()

    def _evaluate(self, name: str, model_path: str, directory: Path) -> dict:
        """Win rate vs the base, mean length (tokens), KL(π‖μ) and judge score on held-out prompts (main process).

        One response per prompt at ``eval_temperature`` and without nucleus truncation (top_p = 1), so that at the
        default temperature 1 the responses are samples of π itself and the mean of ℓ_π(y) − ℓ_μ(y) estimates
        KL(π‖μ); at another temperature it is only the responses' mean log-ratio.
        """
        path = directory / "eval.json"
        if path.exists():
            return json.loads(path.read_text())
        args = self.args
        prompts = list(self.eval_prompts["prompt"])
        seed = self.training_args.seed + 104729  # the same seed for every model: paired comparisons
        samples = self._samples(directory / "eval_samples.jsonl", model_path, prompts, 1, args.eval_temperature, seed,
                                f"{name}: evaluation samples", args.eval_max_new_tokens, top_p=1.0)
        base_samples = self._samples(self.output_dir / "base" / "eval_samples.jsonl", self.base, prompts, 1,
                                     args.eval_temperature, seed, "base model: evaluation samples",
                                     args.eval_max_new_tokens, top_p=1.0)
        result = None
        if self.state.is_main_process:
            columns = {key: list(self.eval_prompts[key]) for key in self.eval_prompts.column_names}
            texts = [group[0]["text"] for group in samples]
            ids = [group[0]["ids"] for group in samples]
            versus = self.judge.preferences(prompts, [[a, b[0]["text"]] for a, b in zip(texts, base_samples)],
                                            columns)
            with without_zero3():
                model = AutoModelForCausalLM.from_pretrained(model_path).to(self.state.device)
                policy = completion_logps(model, self.tokenizer, prompts, ids, desc=f"{name}: log-probs")
                del model
                base = AutoModelForCausalLM.from_pretrained(self.base).to(self.state.device)
                reference = completion_logps(base, self.tokenizer, prompts, ids, desc=f"{name}: base log-probs")
                del base
            result = {"model": name, "win_rate_vs_base": 100.0 * versus[:, 0, 1].mean().item(),
                      "mean_length": sum(map(len, ids)) / len(ids), "eval_temperature": args.eval_temperature,
                      "kl_to_base": sum(p - r for p, r in zip(policy, reference)) / len(ids)}
            if self.judge.scores is not None:
                scores = self.judge.scores(prompts, [[text] for text in texts], columns)
                result["score"] = scores.mean().item()
            write_atomically(path, json.dumps(result, indent=1))
        return gather_object([result])[0]  # the main process's

    def run(self, report=None) -> list[dict]:
        """All iterations; returns (and writes to ``summary.json`` / ``summary.md``) one evaluation row per model.

        ``report``, if given, is called on the main process with each row as soon as it exists.
        """
        results = [self._evaluate("base", self.base, self.output_dir / "base")]
        for t in range(self.args.iterations + 1):
            if t > 0:
                self._train(t)
                pairs = self.iteration_dir(t) / "pairs.json"  # absent in runs of llmreg versions before it
                results.append({**self._evaluate(f"iter_{t}", str(self.iteration_dir(t) / "model"),
                                                 self.iteration_dir(t)),
                                **(json.loads(pairs.read_text()) if pairs.exists() else {})})
            logger.info(format_row(results[-1]))
            if report is not None and self.state.is_main_process:
                report(results[-1])
        if self.state.is_main_process:
            write_atomically(self.output_dir / "summary.json", json.dumps(results, indent=1))
            write_atomically(self.output_dir / "summary.md", summary_table(results))
        self.state.wait_for_everyone()
        return results

def format_row(row: dict) -> str:
    """One evaluation row as a sentence."""
    score = f", judge score {row['score']:.3f}" if "score" in row else ""
    pairs = ""
    if "pairs_kept" in row:
        pairs = f", trained on {row['pairs_kept']} pairs ({row['pairs_tied']} tied prompts dropped)"
    return (f"{row['model']}: win rate vs base {row['win_rate_vs_base']:.1f}%, mean length {row['mean_length']:.1f} "
            f"tokens, KL to base {row['kl_to_base']:.3f} nats{score}{pairs}")


def summary_table(results: list[dict]) -> str:
    """A markdown table of the per-iteration evaluation rows."""
    has_score = any("score" in row for row in results)
    header = "| model | win rate vs base (%) | mean length (tokens) | KL to base (nats) |" + (
        " score |" if has_score else "")
    lines = [header, "|" + "---|" * (4 + has_score)]
    for row in results:
        line = (f"| {row['model']} | {row['win_rate_vs_base']:.1f} | {row['mean_length']:.1f} | "
                f"{row['kl_to_base']:.3f} |")
        lines.append(line + (f" {row.get('score', float('nan')):.3f} |" if has_score else ""))
    return "\n".join(lines) + "\n"


def run_selfplay(method: str, loop_args: SelfPlayArguments, training_args, model_name_or_path: str,
                 prompts: Dataset, eval_prompts: Dataset, peft_config=None, report=None) -> list[dict]:
    """``SelfPlayLoop(...).run(report)``; see the module docstring."""
    torch.manual_seed(training_args.seed)
    return SelfPlayLoop(method, loop_args, training_args, model_name_or_path, prompts, eval_prompts,
                        peft_config).run(report)
