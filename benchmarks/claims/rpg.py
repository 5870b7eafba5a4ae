"""Claim: RPG's KL-regularized surrogates train reasoning to a higher accuracy than GRPO, with the KL to the reference
kept in check (Zhang et al. 2025, arXiv 2505.17508, Table 3: Qwen3-4B on AIME/AMC).

    python benchmarks/claims/rpg.py                  # GRPO, RPG-UFKL, RPG-REINFORCE-URKL, 2 seeds (~33 min, 2 cores)
    python benchmarks/claims/rpg.py --arms grpo urkl/full ufkl/reinforce   # the other two variants
    python benchmarks/claims/rpg.py --scale paper    # more steps and questions, 3 seeds (a GPU)

Full fine-tuning of ``llmreg/smollm2-135m`` (as the paper fine-tunes in full) on the lab arithmetic task ("What is
37 + 48?" after two worked examples; reward 1 for the right number), rewarded by ``llmreg.lab.arithmetic_reward``.
Arms, each from the same weights on the same prompts (``--seed`` orders them and seeds the sampling):

- ``grpo``: TRL's GRPOTrainer with its own defaults for what RPG changes (no KL term, clip (0.2, 0.2), rewards
  scaled by the group's standard deviation);
- ``ufkl/full``, ``urkl/full``: RPG's differentiable surrogates with the unnormalized forward / reverse KL;
- ``ufkl/reinforce``, ``urkl/reinforce``: RPG-REINFORCE (the paper's Table 3 rows) with its clipping.

The CPU scale runs ``grpo``, ``ufkl/full`` and ``urkl/reinforce`` (the paper's two best rows), 16 steps each, about
11 minutes per arm with two arms at a time; the paper scale runs all five.

Every arm shares the batching (8 prompts x 8 samples per generation, 4 optimizer steps of 16 completions, the old
policy as RPG's reference, β = 1e-4 as the paper) and the learning rate. The paper's 1e-6 is for 4B parameters and
400 steps; for 135M parameters and 16 steps it is raised to 2e-6.

Measured along training (every ``eval_every`` steps, and before the first): held-out accuracy (greedy decoding on
questions never trained on) and the KL from the starting model, KL(π_θ ‖ π_0), on held-out prompts: completions
sampled from π_θ at temperature 1, each token's full-vocabulary KL summed over the completion (an unbiased estimate of
the sequence-level KL, with less variance than the log-ratio). Reported over seeds (mean ± standard error): accuracy
at the start and end, its gain over GRPO's of the same seed, the KL to the start, and RPG's own logged KL to its
(old-policy) reference. Each arm runs as its own process into ``--output-dir/<scale>/<arm>/seed<s>``; a rerun reuses
finished arms.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from common import RECIPES, claim_parser, default_jobs, fmt, parse_claim_args, run_arms, write_report


ARMS = ["grpo", "ufkl/full", "urkl/full", "ufkl/reinforce", "urkl/reinforce"]
CPU_ARMS = ["grpo", "ufkl/full", "urkl/reinforce"]  # the paper's two best rows of Table 3; the other two: --arms
SIZES = {
    "cpu": {"max_steps": 16, "eval_every": 8, "num_eval_questions": 64, "num_kl_prompts": 32},
    "paper": {"max_steps": 400, "eval_every": 50, "num_eval_questions": 500, "num_kl_prompts": 256},
}
SETTINGS = {"learning_rate": 2e-6, "per_device_train_batch_size": 16, "num_generations": 8,
            "steps_per_generation": 4, "max_completion_length": 16, "temperature": 1.0, "rpg_beta": 1e-4,
            "warmup_steps": 0, "lr_scheduler_type": "constant", "logging_steps": 4}


def kl_to_start(model, start_model, tokenizer, prompts: list, max_new_tokens: int, seed: int) -> float:
    """Mean over ``prompts`` of Σ_t KL(π_θ(·|y<t) ‖ π_0(·|y<t)) along a completion y ~ π_θ at temperature 1 (stopped at
    its first end-of-sequence token, which counts)."""
    import torch

    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    totals = []
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), 16):
                texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                         for p in prompts[start:start + 16]]
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                                        top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id)
                prompt_length = batch["input_ids"].shape[1]
                completion = output[:, prompt_length:]
                ended = (completion == tokenizer.eos_token_id).long()
                # tokens up to and including the first end-of-sequence token; padding after it does not count
                mask = (ended.cumsum(1) - ended) == 0
                attention = torch.cat([batch["attention_mask"], mask.long()], dim=1)
                logits = [m(input_ids=output, attention_mask=attention).logits[:, prompt_length - 1:-1].float()
                          for m in (model, start_model)]
                policy, start_logps = (torch.log_softmax(x, dim=-1) for x in logits)
                per_token = (policy.exp() * (policy - start_logps)).sum(-1)
                totals.extend((per_token * mask).sum(1).tolist())
    finally:
        tokenizer.padding_side = padding_side
    return statistics.fmean(totals)


def run_arm(arm: str, model_name: str, seed: int, size: dict, output: Path) -> None:
    """Train one arm and write ``output`` (JSON): the evaluation curve and RPG's logged KL to its reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llmreg.lab import arithmetic_accuracy, arithmetic_dataset, arithmetic_reward, resolve_model_name_or_path
    from llmreg.lab.prompts import prompt_style
    from llmreg.rpg import RPGConfig, RPGTrainer

    path = resolve_model_name_or_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    start_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    style = prompt_style(tokenizer)
    kl_prompts = arithmetic_dataset(size["num_kl_prompts"], seed=1, split="test", style=style)["prompt"]
    curve = []

    def evaluate(step: int) -> None:
        accuracy = arithmetic_accuracy(model, tokenizer, size["num_eval_questions"], show_progress=False,
                                       max_new_tokens=SETTINGS["max_completion_length"], batch_size=32)
        kl = kl_to_start(model, start_model, tokenizer, kl_prompts, SETTINGS["max_completion_length"], seed)
        curve.append({"step": step, "accuracy": accuracy, "kl_to_start": kl})
        print(f"[{arm} seed {seed}] step {step}: accuracy {accuracy:.1f} %, KL to start {kl:.4f}", flush=True)
        model.train()

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % size["eval_every"] == 0 or state.global_step == state.max_steps:
                evaluate(state.global_step)

    shared = {key: value for key, value in SETTINGS.items() if key != "rpg_beta"}
    shared.update(output_dir=str(output.parent / "train"), max_steps=size["max_steps"], seed=seed, use_cpu=True,
                  bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
                  disable_tqdm=True)
    dataset = arithmetic_dataset(2000, seed=0, style=style)
    if arm == "grpo":
        trainer = GRPOTrainer(model, arithmetic_reward, args=GRPOConfig(**shared), train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Evaluate()])
        kl_key = None
    else:
        divergence, estimator = arm.split("/")
        args = RPGConfig(**shared, divergence=divergence, estimator=estimator, rpg_beta=SETTINGS["rpg_beta"])
        trainer = RPGTrainer(model, arithmetic_reward, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Evaluate()])
        kl_key = f"rpg/{divergence}"
    evaluate(0)
    started = time.time()
    trainer.train()
    history = trainer.state.log_history
    result = {"arm": arm, "seed": seed, "curve": curve, "train_minutes": (time.time() - started) / 60,
              "reward": [entry["reward"] for entry in history if "reward" in entry],
              "kl_to_reference": [entry[kl_key] for entry in history if kl_key and kl_key in entry]}
    output.write_text(json.dumps(result, indent=1))


def main(argv=None) -> dict:
    parser = claim_parser(__doc__, default_seeds=[0, 1])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=None,
                        help=f"Default: {' '.join(CPU_ARMS)} (cpu), all of {' '.join(ARMS)} (paper).")
    parser.add_argument("--run-arm", default=None, help=argparse.SUPPRESS)
    args = parse_claim_args(parser, argv)
    args.arms = args.arms or (CPU_ARMS if args.scale == "cpu" else ARMS)
    output_dir = args.output_dir or RECIPES.parent / "outputs" / "claims" / "rpg"
    size = SIZES[args.scale]
    if args.run_arm:  # one arm, in its own process (what the runs below launch)
        seed = args.seeds[0]
        output = output_dir / args.scale / args.run_arm.replace("/", "-") / f"seed{seed}" / "result.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        run_arm(args.run_arm, args.model, seed, size, output)
        return {}

    started = time.time()
    runs = []
    for arm in args.arms:
        for seed in args.seeds:
            run_dir = output_dir / args.scale / arm.replace("/", "-") / f"seed{seed}"
            command = [str(Path(__file__).resolve()), "--run-arm", arm, "--seeds", str(seed), "--scale", args.scale,
                       "--model", args.model, "--output-dir", str(output_dir)]
            runs.append({"name": f"{arm} seed {seed}", "command": command, "log": run_dir.with_suffix(".log"),
                         "done": run_dir / "result.json"})
    run_arms(runs, args.jobs or default_jobs())

    results = {arm: [json.loads(run["done"].read_text()) for run in runs if run["name"].startswith(arm + " ")]
               for arm in args.arms}
    baseline = {row["seed"]: row["curve"][-1]["accuracy"] for row in results.get("grpo", [])}
    intro = (f"Model `{args.model}` (full fine-tuning), {size['max_steps']} steps (8 prompts x 8 samples per "
             f"generation, 4 optimizer steps of 16 completions), lr {SETTINGS['learning_rate']}, β "
             f"{SETTINGS['rpg_beta']} (RPG); accuracy by greedy decoding on {size['num_eval_questions']} held-out "
             f"questions, KL to the start on {size['num_kl_prompts']} held-out prompts; seeds "
             f"{', '.join(map(str, args.seeds))}; mean ± standard error over seeds.\n")
    header = ("| arm | accuracy at start (%) | accuracy at end (%) | end − GRPO's (paired, points) | KL to the start "
              "at end (nats/completion) | logged KL to the reference (mean) |")
    lines = [intro, header, "|---|---|---|---|---|---|"]
    summary = {}
    for arm, rows in results.items():
        starts = [row["curve"][0]["accuracy"] for row in rows]
        ends = [row["curve"][-1]["accuracy"] for row in rows]
        kls = [row["curve"][-1]["kl_to_start"] for row in rows]
        gains = [row["curve"][-1]["accuracy"] - baseline[row["seed"]] for row in rows if row["seed"] in baseline]
        logged = [statistics.fmean(row["kl_to_reference"]) for row in rows if row["kl_to_reference"]]
        summary[arm] = {"start": starts, "end": ends, "kl_to_start": kls, "gain_over_grpo": gains,
                        "kl_to_reference": logged, "curves": [row["curve"] for row in rows]}
        lines.append(f"| {arm} | {fmt(starts, 1)} | {fmt(ends, 1)} | "
                     f"{'—' if arm == 'grpo' or not gains else fmt(gains, 1)} | {fmt(kls, 4)} | "
                     f"{fmt(logged, 6) if logged else '— (no KL term)'} |")
    steps = [point["step"] for point in next(iter(results.values()))[0]["curve"]]
    lines += ["", "Along training (mean over seeds): accuracy (%) / KL to the start, at steps "
              + ", ".join(map(str, steps)) + ".", "",
              "| arm | " + " | ".join(f"step {step}" for step in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for arm, rows in results.items():
        cells = [f"{statistics.fmean(row['curve'][i]['accuracy'] for row in rows):.1f} / "
                 f"{statistics.fmean(row['curve'][i]['kl_to_start'] for row in rows):.3f}" for i in range(len(steps))]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    write_report(output_dir, f"rpg_{args.scale}", table, {"seeds": args.seeds, "size": size, "settings": SETTINGS,
                                                         "arms": summary}, started)
    return summary


if __name__ == "__main__":
    main()
