"""A user's script: load the policy, then parse llmreg-style arguments, then DPO with a reference model TRL builds.

Under DeepSpeed ZeRO-3 on CPUs, a model loaded before any TRL config exists leaves ``deepspeed.comm``
uninitialized; the reference model TRL then builds under ``deepspeed.zero.Init`` fails ZeRO-3's batch-size check.
llmreg's parser initializes ``deepspeed.comm`` first. tests/test_recipes.py launches this with
accelerate_configs/deepspeed_zero3.yaml to prove it.
"""

from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer, ModelConfig, ScriptArguments

from llmreg.lab import ensure_lab_model, safety_alignment_dataset, safety_harmful_dataset
from llmreg.recipe_utils import make_recipe_parser, parse_recipe_args


if __name__ == "__main__":
    policy = AutoModelForCausalLM.from_pretrained(ensure_lab_model())
    parser = make_recipe_parser((ScriptArguments, DPOConfig, ModelConfig), dataset_name="llmreg/safety-alignment",
                                output_dir="outputs/dpo-test")
    _, training_args, _ = parse_recipe_args(parser)
    refusals, compliance = safety_alignment_dataset(64), safety_harmful_dataset(64)
    pairs = Dataset.from_dict(
        {"prompt": refusals["prompt"], "chosen": refusals["completion"], "rejected": compliance["completion"]}
    )
    trainer = DPOTrainer(model=policy, args=training_args, train_dataset=pairs)
    trainer.train()
    trainer.save_state()
    # Every rank waits for the others before the process group goes. A rank may still abort at exit now and then
    # ("terminate called without an active exception"); tests/test_recipes.py retries that once.
    trainer.accelerator.wait_for_everyone()
    trainer.end()
