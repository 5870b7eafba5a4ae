"""The self-play iteration loop: for t = 1..T, generate with π_t → judge → build pairs → train → save π_{t+1}.

``run_selfplay`` drives ``RSPOTrainer`` (SPPO/RSPO) or ``SPINTrainer`` (SPIN/α-SPIN/fictitious play). Each iteration
is one resumable stage (``llmreg.stages``), ``<output_dir>/iter_<t>/``, built under ``iter_<t>.partial/`` and renamed
when complete:

    generations.jsonl   K samples per prompt from π_t (token ids and text)
    pairs.json          how many prompts gave a pair, and how many were dropped because their responses tie
    dataset/            the training pairs (``save_to_disk``); TRL's and llmreg's log-prob caches sit next to them
    train/              the trainer's checkpoints (``save_steps``) and its final ``trainer_state.json``
    model/              π_{t+1} (a LoRA adapter is merged into its base first)
    eval.json           win rate against the base model, mean response length, KL to the base, mean judge score

The base model's evaluation is the stage ``base/`` (with its evaluation samples, which every iterate is judged
against), and the base model's samples of the training prompts, for RSPO's ``forward_kl_samples``, the stage
``base_samples/``. Every stage records the run's settings (the method, the base model, the loop's and the trainer's
settings; not ``iterations``, so that a finished run can be extended). A rerun of the same command skips the finished
stages and continues an interrupted iteration where it stopped (each of its files is written atomically, and training
resumes from the last complete checkpoint in ``train/``); a rerun with other settings is refused, naming them, before
any model loads (``overwrite`` recomputes instead). Generation is seeded per iteration and per batch, so a rerun writes
the same samples.

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
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmreg.rspo import RSPOConfig, RSPOTrainer
from llmreg.selfplay.generation import completion_logps, sample_completions, sample_completions_vllm
from llmreg.selfplay.judges import make_judge, pair_from_preferences
from llmreg.spin import SPINConfig, SPINTrainer
from llmreg.stages import (
    PARTIAL_SUFFIX,
    Stage,
    dataset_digest,
    json_ready,
    last_complete_checkpoint,
    training_settings,
)
from llmreg.trainer_utils import (
    check_dataset_columns,
    replace_directory,
    save_whole_model,
    without_zero3,
    write_atomically,
)


logger = logging.getLogger(__name__)

# Loop arguments that do not change what a stage holds: ``iterations`` may grow, so that a finished run can be
# extended. Trainer fields the loop sets per iteration are not settings either.
NOT_RUN_SETTINGS = ("iterations", "overwrite")
PER_ITERATION_FIELDS = ("base_model_name_or_path", "history_models")


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
    overwrite: bool = field(
        default=False,
        metadata={"help": "Delete and recompute the stages in output_dir that were made with other settings (a rerun "
                          "otherwise skips the stages made with the same settings and refuses the others)."},
    )

    def __post_init__(self):
        if self.iterations < 1 or self.num_samples < 1 or self.history < 1:
            raise ValueError("iterations, num_samples and history must be >= 1.")
        if self.num_eval_prompts < 1 or self.eval_temperature <= 0:
            raise ValueError("num_eval_prompts must be >= 1 (the loop's results are its evaluations) and "
                             "eval_temperature > 0 (the KL estimate needs samples).")


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
        self.settings = self._run_settings()
        # Refuse a rerun with other settings now, before any model loads: every stage on disk is checked.
        for t in range(1, max(loop_args.iterations, self._last_iteration_on_disk()) + 1):
            self._stage(f"iter_{t}").is_finished()
        self._stage("base").is_finished()
        self._stage("base_samples").is_finished()

    def _run_settings(self) -> dict:
        """What every stage of the run records: a rerun must have the same (``iterations`` aside)."""
        training = training_settings(self.training_args)
        for key in PER_ITERATION_FIELDS:
            training.pop(key, None)
        loop = {key: value for key, value in vars(self.args).items() if key not in NOT_RUN_SETTINGS}
        return json_ready({
            "method": self.method, "base_model": self.base, "loop": loop, "training": training,
            "peft": None if self.peft_config is None else self.peft_config.to_dict(),
            "num_processes": self.state.num_processes,
            "data": {"prompts": dataset_digest(self.prompts), "eval_prompts": dataset_digest(self.eval_prompts)},
        })

    def _stage(self, name: str) -> Stage:
        return Stage(self.output_dir / name, {"stage": name, **self.settings}, overwrite=self.args.overwrite)

    def _last_iteration_on_disk(self) -> int:
        found = [int(path.name.removeprefix("iter_").removesuffix(PARTIAL_SUFFIX))
                 for path in self.output_dir.glob("iter_*") if path.is_dir()]
        return max(found, default=0)

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
            # One bar for the phase (this rank's batches; the main process's is shown).
            for start in tqdm(starts, desc=desc, unit="batch", disable=not self.state.is_main_process):
                group = sample_completions(model, self.tokenizer, prompts[start:start + batch],
                                           num_samples=num_samples, max_new_tokens=max_new_tokens,
                                           temperature=temperature, top_p=top_p, batch_size=batch,
                                           seed=seed + start, desc=desc, show_progress=False)
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

    def _base_samples(self) -> list[list[dict]]:
        """The base model's sample of every training prompt (the stage ``base_samples``): μ is fixed, so its samples
        are drawn once and reused by every iteration."""
        stage = self._stage("base_samples")
        if not stage.is_finished():
            with stage.build() as work:
                self._samples(work / "samples.jsonl", self.base, list(self.prompts["prompt"]), 1,
                              self.args.temperature, self.training_args.seed + 1, "base model: sampling")
        return [json.loads(line) for line in (stage.path / "samples.jsonl").read_text().splitlines()]

    def _build_dataset(self, t: int, directory: Path) -> Path:
        """Pairs of iteration t, written to ``dataset`` in the iteration's working ``directory``."""
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
            all_base = self._base_samples()
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

    def _training_dataset(self, t: int, directory: Path) -> Dataset:
        datasets = [load_from_disk(self._build_dataset(t, directory))]
        if self.method == "spin" and self.training_args.opponent_mixture == "data":
            # Fictitious play in the data: negatives of the last h generators, scored against π_t.
            datasets += [load_from_disk(self.iteration_dir(s) / "dataset")
                         for s in range(max(1, t - self.args.history + 1), t)]
        return concatenate_datasets(datasets) if len(datasets) > 1 else datasets[0]

    def _train(self, t: int, directory: Path) -> None:
        if (directory / "model").exists():
            return
        dataset = self._training_dataset(t, directory)
        args = self.training_args
        args.output_dir = str(directory / "train")
        args.base_model_name_or_path = None if t == 1 else self.base  # at t = 1, π_t is the base
        trainer_class = RSPOTrainer if self.method == "rspo" else SPINTrainer
        if self.method == "spin" and args.opponent_mixture != "data":
            args.history_models = [self.model_path(s) for s in range(t - 1, max(0, t - self.args.history), -1)]
        trainer = trainer_class(self.model_path(t), args=args, train_dataset=dataset,
                                processing_class=self.tokenizer, peft_config=self.peft_config)
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(directory / "train"))
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
        # Against the base model's samples, from the finished stage base/ (the base's own are its samples).
        base_samples = samples if name == "base" else [
            json.loads(line) for line in (self.output_dir / "base" / "eval_samples.jsonl").read_text().splitlines()]
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
        base = self._stage("base")
        if not base.is_finished():
            with base.build() as work:
                self._evaluate("base", self.base, work)
        results = [json.loads((base.path / "eval.json").read_text())]
        for t in range(self.args.iterations + 1):
            if t > 0:
                stage = self._stage(f"iter_{t}")
                if not stage.is_finished():
                    with stage.build() as work:
                        self._build_dataset(t, work)
                        self._train(t, work)
                        self._evaluate(f"iter_{t}", str(work / "model"), work)
                results.append({**json.loads((stage.path / "eval.json").read_text()),
                                **json.loads((stage.path / "pairs.json").read_text())})
            logger.info(format_row(results[-1]))
            if report is not None and self.state.is_main_process:
                report(results[-1])
        if self.state.is_main_process:
            write_atomically(self.output_dir / "summary.json", json.dumps(results, indent=1))
            write_atomically(self.output_dir / "summary.md", summary_table(results))
            # What the run was made with, for readers (llmreg report); every stage's record holds it too.
            write_atomically(self.output_dir / "selfplay_settings.json", json.dumps(self.settings, indent=1))
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
