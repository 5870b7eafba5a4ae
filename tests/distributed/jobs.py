"""The launch matrix's jobs: every recipe, a few steps each on the lab model, and the step scripts whose updates
2 processes must share with 1 process (``tests/scripts/*_step.py``), for one accelerate config.

Each config's jobs run in one launch (``run_jobs.py``); ``jobs(config, root)`` lists them, each writing to
``root/<name>``. The equivalence jobs run with a per-device batch of 2b on one process and b on two.
"""

import os
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
RECIPES, SCRIPTS, CONFIGS = REPO / "recipes", REPO / "tests" / "scripts", REPO / "recipes" / "configs"

SINGLE = "single_process.yaml"
CONFIGS_TWO_PROCESSES = ["multi_process.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
                         "deepspeed_zero3_offload.yaml", "fsdp2.yaml"]
ALL_CONFIGS = [SINGLE, *CONFIGS_TWO_PROCESSES]

# The LoRA recipes on a bitsandbytes 4-bit base (QLoRA) and with bitsandbytes' 8-bit AdamW. Not under ZeRO-3 with
# CPU offload, where accelerate replaces any optimizer with DeepSpeed's CPU Adam (docs/distributed.md). The unlearning
# recipe, whose scoring costs seconds per run, in one process and under DDP only.
QUANTIZED_CONFIGS = {"lora_dropout": [config for config in ALL_CONFIGS if "offload" not in config],
                     "unlearn": [SINGLE, "multi_process.yaml"]}

LORA = ["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--lora_target_modules",
        "q_proj", "v_proj"]
QLORA = ["--load_in_4bit", "--bnb_4bit_quant_type", "nf4"]
OPTIMIZER_8BIT = ["--optim", "adamw_bnb_8bit"]

# Every recipe, on its lab default shrunk to a few steps, saving checkpoints.
SFT = [str(RECIPES / "sft.py"), "--config", str(CONFIGS / "sft.yaml"), "--max_steps", "3", "--logging_steps", "1",
       "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2"]
RECIPE_ARGS = {
    "sft": SFT,
    "sft_lora": [*SFT, *LORA],
    "booster": [str(RECIPES / "booster.py"), "--max_steps", "2", "--logging_steps", "1",
                "--per_device_train_batch_size", "4", "--harmful_batch_size", "2", "--vaccine_rho", "2",
                "--save_strategy", "steps", "--save_steps", "1"],
    "ftaas": [str(RECIPES / "ftaas.py"), "--max_steps", "2", "--logging_steps", "1", "--num_finetune_samples", "16",
              "--finetune_epochs",
              "1", "--harmful_ratios", "0.2", "--num_eval_samples", "4", "--max_new_tokens", "4", *LORA,
              "--finetune_learning_rate", "1e-3", "--methods", "booster", "--save_strategy", "steps", "--save_steps",
              "1"],
    "lora_dropout": [str(RECIPES / "lora_dropout.py"), "--num_train_samples", "8", "--num_eval_samples", "8",
                     "--max_steps", "2", "--per_device_train_batch_size", "4", "--lora_dropout_eval_samples", "2",
                     "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2"],
    "reweight": [str(RECIPES / "reweight.py"), "--strategies", "linupper", "--max_steps", "2", "--eval_steps", "2",
                 "--num_train_samples", "32", "--num_eval_samples", "16", "--per_device_train_batch_size", "4",
                 "--per_device_eval_batch_size", "8", "--logging_steps", "1", "--save_strategy", "steps",
                 "--save_steps", "2"],
    "rpg": [str(RECIPES / "rpg.py"), "--config", str(CONFIGS / "rpg_lab.yaml"), "--max_steps", "4",
            "--logging_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4",
            "--rpg_beta", "0.05", "--steps_per_generation", "2", "--save_strategy", "steps", "--save_steps", "2"],
    # 64 prompts x 4 samples: about a third give pairs (the rest tie and are dropped), two or more steps' worth with a
    # margin (which prompts tie depends on the samples, and so on the CPU's arithmetic: 32 prompts gave 10 pairs on one
    # machine and a single step on another). A single step of pairs crashes DeepSpeed ZeRO-3's parameter trace
    # (docs/rspo.md, Limits).
    "rspo": [str(RECIPES / "rspo.py"), "--iterations", "1", "--prompts_per_iteration", "64", "--num_samples", "4",
             "--num_eval_prompts", "8", "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
             "--generation_batch_size", "8", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2"],
    "spin": [str(RECIPES / "spin.py"), "--iterations", "1", "--prompts_per_iteration", "16", "--num_eval_prompts",
             "8", "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--generation_batch_size", "8",
             "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2"],
    "unlearn": [str(RECIPES / "unlearn.py"), "--finetune_epochs", "0", "--world_dataset_name", "none",
                "--objective", "npo", "--max_steps", "2",
                "--per_device_train_batch_size", "4", "--logging_steps", "1", "--lora_target_modules", "q_proj",
                "v_proj", "--save_strategy", "steps", "--save_steps", "2"],
}

# The same update on 1 process with 2b rows and on 2 processes with b rows each (tests/scripts/*_step.py).
STEP_ARGS = {
    "sft": [str(RECIPES / "sft.py"), "--config", str(CONFIGS / "sft.yaml"), "--max_steps", "3", "--logging_steps",
            "1"],
    "booster": [str(SCRIPTS / "booster_step.py"), "--vaccine_rho", "2"],
    "booster_lora": [str(SCRIPTS / "booster_step.py"), "--vaccine_rho", "2", *LORA],
    "lora_l1": [str(SCRIPTS / "lora_regularizers_step.py"), "--l1_lambda", "0.05"],
    "reweight": [str(SCRIPTS / "reweight_step.py")],
    # One softmax over both micro-batches of the step, on both processes.
    "reweight_step_scope": [str(SCRIPTS / "reweight_step.py"), "--reweight_scope", "step",
                            "--gradient_accumulation_steps", "2"],
    "unlearn_scrub": [str(SCRIPTS / "unlearn_step.py"), "--objective", "scrub", "--l1_lambda", "0.01"],
    "unlearn_dpo": [str(SCRIPTS / "unlearn_step.py"), "--objective", "dpo", "--l1_lambda", "0.01"],
    # The step's gradient at w over both micro-batches and both processes, the weights moved and restored (ZeRO-3:
    # gathered; DeepSpeed: its optimizer steps from its own copy of w); gradient_norm's hooks scale and add.
    "sam": [str(SCRIPTS / "perturbation_step.py"), "--weight_perturbation", "sam", "--perturbation_rho", "0.5",
            "--gradient_accumulation_steps", "2"],
    "gradient_norm_lora": [str(SCRIPTS / "perturbation_step.py"), "--weight_perturbation", "gradient_norm",
                           "--gradient_norm_gamma", "0.05", "--gradient_norm_epsilon", "0.2", *LORA],
    "awp": [str(SCRIPTS / "perturbation_step.py"), "--weight_perturbation", "awp", "--awp_gamma", "0.05"],
    "asam_lora": [str(SCRIPTS / "perturbation_step.py"), "--weight_perturbation", "asam", "--perturbation_rho", "1",
                  *LORA],
    # The anchor's gradient once per step (2 micro-batches); EWC's Fisher estimated over both processes' rows.
    "anchor_l2sp": [str(SCRIPTS / "forgetting_step.py"), "--anchor", "l2sp", "--anchor_lambda", "20",
                    "--gradient_accumulation_steps", "2"],
    "anchor_ewc_lora": [str(SCRIPTS / "forgetting_step.py"), "--anchor", "ewc", "--anchor_lambda", "1000", *LORA],
    # The decoupled anchor's proximal step after each optimizer step, once a step, on weights equal on both processes.
    "anchor_decoupled_ewc": [str(SCRIPTS / "forgetting_step.py"), "--anchor", "ewc", "--anchor_lambda", "300",
                             "--anchor_decoupled", "--gradient_accumulation_steps", "2"],
    "anchor_decoupled_l2sp_lora": [str(SCRIPTS / "forgetting_step.py"), "--anchor", "l2sp", "--anchor_lambda", "20",
                                   "--anchor_decoupled", *LORA],
    # SAM around the anchor: the anchor's gradient is of w, read from the weights SAM saved (whole, under ZeRO-3).
    "sam_anchor_lora": [str(SCRIPTS / "forgetting_step.py"), "--weight_perturbation", "sam", "--perturbation_rho",
                        "0.5", "--anchor", "l2sp", "--anchor_lambda", "20", *LORA,
                        "--gradient_accumulation_steps", "2"],
    # The KL's token mean over the step's tokens on both processes; the base is the adapter disabled.
    "kl_to_base_lora": [str(SCRIPTS / "forgetting_step.py"), "--kl_to_base_beta", "1", *LORA,
                        "--gradient_accumulation_steps", "2"],
    # Full fine-tuning against the base's top-k, precomputed over both processes' rows and gathered: no copy.
    "kl_to_base_top_k": [str(SCRIPTS / "forgetting_step.py"), "--kl_to_base_beta", "1", "--kl_to_base_top_k", "8",
                         "--gradient_accumulation_steps", "2"],
    "rpg": [str(SCRIPTS / "rpg_step.py")],
    "rspo": [str(SCRIPTS / "rspo_step.py")],
    "spin": [str(SCRIPTS / "spin_step.py")],
}
STEP_BATCH = {"sft": 2, "rpg": 8}  # b; the others take 4 (and Booster's harmful batch is half of it)

# What llmreg refuses, per config: the job must fail with this in its message.
# (The FTaaS pipeline aligns with BoosterTrainer, λ = 0 for its SFT baseline.)
REFUSED = {"fsdp2.yaml": {"recipe_booster": "does not support FSDP", "recipe_ftaas": "does not support FSDP",
                          "step_booster": "does not support FSDP", "step_booster_lora": "does not support FSDP",
                          **{f"step_{name}": "FSDP2 keeps them as sharded DTensors"
                             for name in ("sam", "gradient_norm_lora", "awp", "asam_lora")},
                          "step_anchor_l2sp": "FSDP2 keeps parameters as sharded DTensors",
                          "step_anchor_ewc_lora": "FSDP2 keeps parameters as sharded DTensors",
                          "step_sam_anchor_lora": "FSDP2 keeps parameters as sharded DTensors",
                          "step_anchor_decoupled_ewc": "FSDP2 keeps parameters as sharded DTensors",
                          "step_anchor_decoupled_l2sp_lora": "FSDP2 keeps parameters as sharded DTensors",
                          "step_kl_to_base_lora": "resharded it into DTensors",
                          "step_kl_to_base_top_k": "resharded it into DTensors"},
           # The anchor of full fine-tuning keeps θ₀ whole; EWC's Fisher needs whole weights (estimate it first).
           **{config: {"step_anchor_l2sp": "which ZeRO-3 shards", "step_anchor_ewc_lora": "ZeRO-3 shards",
                       "step_kl_to_base_top_k": "ZeRO-3 has sharded it"}
              for config in ("deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml")}}
# DeepSpeed steps its own copy of the weights inside the backward pass, out of reach of the decoupled anchor.
for config in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml"):
    REFUSED.setdefault(config, {}).update({f"step_anchor_decoupled_{name}": "DeepSpeed steps its own copy"
                                           for name in ("ewc", "l2sp_lora")})


# Under ZeRO-3 the unlearning recipe runs its whole protocol (full fine-tunes of the original and gold models, then
# unlearning with LoRA and the scoring on the main process), and the test checks what the table says.
UNLEARN_PROTOCOL = [str(RECIPES / "unlearn.py"), "--world_dataset_name", "none", "--finetune_epochs", "6",
                    "--objective", "ga", "--num_train_epochs",
                    "2", "--learning_rate", "3e-3", "--l1_lambda", "0.001", "--lora_target_modules", "q_proj",
                    "v_proj", "up_proj", "down_proj", "--save_strategy", "steps", "--save_steps", "5"]


def jobs(config: str, root: Path) -> list[dict]:
    """The config's jobs; with $LLMREG_MATRIX_ONLY (comma-separated parts of job names), only the jobs it names."""
    listed = []

    def add(name, script, *args):
        listed.append({"name": name, "script": script, "args": [*args, "--output_dir", str(root / name)]})

    if config.startswith("deepspeed"):
        # First, before anything has initialized deepspeed.comm: the script loads its policy before parsing, and
        # TRL's reference model under ZeRO-3 needs llmreg's early initialization in the parser.
        add("dpo_reference", str(SCRIPTS / "dpo_with_reference_model.py"), "--max_steps", "2", "--logging_steps",
            "1", "--per_device_train_batch_size", "4", "--activation_checkpointing", "false", "--report_to", "none",
            "--save_strategy", "no")
    for name, (script, *args) in RECIPE_ARGS.items():
        if name == "unlearn" and config == "deepspeed_zero3.yaml":
            script, *args = UNLEARN_PROTOCOL
        add(f"recipe_{name}", script, *args)
        if name in ("sft", "sft_lora"):  # resumed from the checkpoint at step 2: must end where the run did
            add(f"recipe_{name}_resumed", script, *args, "--resume_from_checkpoint",
                str(root / f"recipe_{name}" / "checkpoint-2"))
        if config in QUANTIZED_CONFIGS.get(name, ()):
            add(f"recipe_{name}_qlora", script, *args, *QLORA)
            add(f"recipe_{name}_optim8bit", script, *args, *OPTIMIZER_8BIT)
    processes = 1 if config == SINGLE else 2
    for name, (script, *args) in STEP_ARGS.items():
        batch = STEP_BATCH.get(name, 4) * 2 // processes
        extra = ["--harmful_batch_size", str(batch // 2)] if name.startswith("booster") else []
        add(f"step_{name}", script, *args, "--per_device_train_batch_size", str(batch), *extra)
    if processes == 2:
        # LoRA Dropout draws its masks on each process: with p = 0.5 a row of B stays zero only where both dropped it.
        add("lora_dropout_masks", str(SCRIPTS / "lora_regularizers_step.py"), "--per_device_train_batch_size", "4",
            "--lora_dropout_p", "0.5", "--lora_dropout_train_samples", "2", "--l1_lambda", "0.01", "--max_steps", "1")
    only = [part for part in os.environ.get("LLMREG_MATRIX_ONLY", "").split(",") if part]
    return [job for job in listed if not only or any(part in job["name"] for part in only)]
