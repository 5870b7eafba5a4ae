"""The fine-tuning-as-a-service pipeline (llmreg/ftaas): the customer's data mix, the grid's artifacts and table, a
rerun that redoes nothing, and bad grids refused before any training."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmreg.booster import BoosterConfig
from llmreg.ftaas import FTaaSArguments, FTaaSPipeline
from llmreg.ftaas import pipeline as ftaas_pipeline
from llmreg.lab import safety_alignment_dataset, safety_eval_prompts, safety_harmful_dataset, sentiment_dataset
from llmreg.stages import StageSettingsError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_pipeline(lab_model_dir, tmp_path, vaccine_rho=0.0, **overrides):
    args = FTaaSArguments(**{"methods": ["sft", "booster"], "harmful_ratios": [0.0, 0.5], "num_finetune_samples": 16,
                             "finetune_learning_rate": 1e-3, "finetune_epochs": 1, "finetune_batch_size": 8,
                             "max_new_tokens": 8, **overrides})
    alignment = BoosterConfig(str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False,
                              report_to="none", save_strategy="no", max_steps=2, per_device_train_batch_size=8,
                              learning_rate=1e-3, harmful_batch_size=4, max_length=64, seed=0, disable_tqdm=True,
                              vaccine_rho=vaccine_rho)
    return FTaaSPipeline(args, alignment, str(lab_model_dir), alignment_dataset=safety_alignment_dataset(64),
                         harmful_dataset=safety_harmful_dataset(64), task_dataset=sentiment_dataset(64),
                         task_eval_dataset=sentiment_dataset(12, split="test"),
                         harmful_eval_prompts=safety_eval_prompts(12))


def test_customer_data_has_the_harmful_share_from_rows_the_alignment_did_not_use(lab_model_dir, tmp_path):
    pipeline = make_pipeline(lab_model_dir, tmp_path)
    harmful = safety_harmful_dataset(64)
    alignment_rows = {json.dumps(r) for r in harmful.select(range(32))["completion"]}
    attack_rows = {json.dumps(r) for r in harmful.select(range(32, 64))["completion"]}
    for ratio, expected in ((0.0, 0), (0.5, 8), (0.25, 4)):
        data = pipeline.customer_data(ratio)
        completions = [json.dumps(c) for c in data["completion"]]
        assert len(data) == 16
        assert sum(c in attack_rows for c in completions) == expected
        assert not any(c in alignment_rows - attack_rows for c in completions)


def test_the_grid_writes_every_stage_and_a_rerun_redoes_nothing(lab_model_dir, tmp_path, monkeypatch):
    rows = make_pipeline(lab_model_dir, tmp_path).run()
    assert [(r["method"], r["harmful_ratio"]) for r in rows] == [
        ("sft", None), ("sft", 0.0), ("sft", 0.5), ("booster", None), ("booster", 0.0), ("booster", 0.5)]
    assert all(0.0 <= r["harmful_score"] <= 100.0 and 0.0 <= r["finetune_accuracy"] <= 100.0 for r in rows)
    sft = load_file(tmp_path / "align" / "sft" / "model" / "model.safetensors")
    booster = load_file(tmp_path / "align" / "booster" / "model" / "model.safetensors")
    assert any(not sft[name].equal(booster[name]) for name in sft)  # the regularizer changed the alignment
    tuned = load_file(tmp_path / "finetune" / "booster" / "p0.5" / "model" / "model.safetensors")
    assert any(not tuned[name].equal(booster[name]) for name in booster)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rows"] == rows and results["settings"]["booster_lambda"] == 5.0
    assert (tmp_path / "results.csv").read_text().count("\n") == 7
    assert "| booster | fine-tuned | 0.5 |" in (tmp_path / "results.md").read_text()
    from matplotlib.image import imread

    image = imread(tmp_path / "results.png")
    assert image.shape[0] > 200 and image.shape[1] > 600 and image[..., :3].std() > 0.05  # two drawn panels
    assert not list(tmp_path.rglob("*.tmp"))

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(ftaas_pipeline, "BoosterTrainer", refuse)
    monkeypatch.setattr(ftaas_pipeline, "SFTTrainer", refuse)
    monkeypatch.setattr(ftaas_pipeline, "generate_completions", refuse)
    assert make_pipeline(lab_model_dir, tmp_path).run() == rows

    # A rerun with another λ: SFT's stages (whose settings do not hold λ) are reused, Booster's refused by name.
    changed = make_pipeline(lab_model_dir, tmp_path)
    changed.alignment_args.booster_lambda = 1.0
    with pytest.raises(StageSettingsError, match=r"training.booster_lambda: 5.0 recorded, 1.0 now") as error:
        changed.run()
    assert str(tmp_path / "align" / "booster") in str(error.value) and "--overwrite" in str(error.value)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows  # the old table stands

    # --overwrite recomputes Booster's stages only, and the table holds the new model's numbers.
    monkeypatch.undo()
    overwritten = make_pipeline(lab_model_dir, tmp_path, overwrite=True)
    overwritten.alignment_args.booster_lambda = 1.0
    sft_stage = (tmp_path / "align" / "sft" / "llmreg_stage.json").stat().st_mtime_ns
    new_rows = overwritten.run()
    assert (tmp_path / "align" / "sft" / "llmreg_stage.json").stat().st_mtime_ns == sft_stage  # SFT not redone
    assert new_rows[:3] == rows[:3]
    relaxed = load_file(tmp_path / "align" / "booster" / "model" / "model.safetensors")
    assert any(not relaxed[name].equal(booster[name]) for name in booster)
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["booster_lambda"] == 1.0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"methods": ["vaccine-x"]}, "valid methods: sft, booster, vaccine, booster_vaccine"),
    ({"methods": ["sft", "sft"]}, "duplicates"),
    ({"methods": ["vaccine"]}, "needs vaccine_rho > 0"),
    ({"harmful_ratios": [1.5]}, r"shares in \[0, 1\]"),
    ({"num_finetune_samples": 100, "harmful_ratios": [0.5]}, "needs 50 harmful samples"),
])
def test_bad_grids_fail_before_training(lab_model_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_pipeline(lab_model_dir, tmp_path, **overrides)


def test_with_lora_booster_continues_its_alignment_adapter_and_sft_gets_a_fresh_one(lab_model_dir, tmp_path,
                                                                                     monkeypatch):
    from peft import LoraConfig, PeftModel
    from safetensors.torch import load_file as load_adapter

    received = {}

    class RecordingSFTTrainer(ftaas_pipeline.SFTTrainer):
        def __init__(self, model, args=None, **kwargs):
            method = "booster" if "/booster/" in args.output_dir else "sft"
            if isinstance(model, PeftModel):
                received[method] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
                assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
            else:
                received[method] = kwargs["peft_config"]
            super().__init__(model, args=args, **kwargs)

    monkeypatch.setattr(ftaas_pipeline, "SFTTrainer", RecordingSFTTrainer)
    pipeline = make_pipeline(lab_model_dir, tmp_path, harmful_ratios=[0.5])
    pipeline.peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pipeline.run()

    assert isinstance(received["sft"], LoraConfig)  # fresh adapter on the merged SFT-aligned model
    saved = load_adapter(tmp_path / "align" / "booster" / "adapter" / "adapter_model.safetensors")
    continued = received["booster"]
    assert len(continued) == len(saved) > 0
    for name, value in saved.items():  # the fine-tune starts from the alignment adapter's trained weights
        match = [v for n, v in continued.items() if n.replace(".default", "").endswith(name.split("base_model.")[-1])]
        assert len(match) == 1 and match[0].equal(value), name
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in saved.items())
    tuned = load_file(tmp_path / "finetune" / "booster" / "p0.5" / "model" / "model.safetensors")
    aligned = load_file(tmp_path / "align" / "booster" / "model" / "model.safetensors")
    assert any(not tuned[name].equal(aligned[name]) for name in aligned)


def test_an_unknown_adapter_choice_is_refused():
    with pytest.raises(ValueError, match="valid choices: paper, fresh, continue"):
        FTaaSArguments(finetune_adapter="merge")


def test_each_method_aligns_with_its_own_regularizers(lab_model_dir, tmp_path, monkeypatch):
    seen = {}

    class Recorded(Exception):
        pass

    def record(model, args, **kwargs):
        seen[Path(args.output_dir).parent.name.removesuffix(".partial")] = (args.booster_lambda, args.vaccine_rho)
        raise Recorded

    pipeline = make_pipeline(lab_model_dir, tmp_path, vaccine_rho=2.0, methods=list(ftaas_pipeline.METHODS))
    monkeypatch.setattr(ftaas_pipeline, "BoosterTrainer", record)
    for method in ftaas_pipeline.METHODS:
        with pytest.raises(Recorded):
            pipeline.align(method)
    assert seen == {"sft": (0.0, 0.0), "booster": (5.0, 0.0), "vaccine": (0.0, 2.0), "booster_vaccine": (5.0, 2.0)}
    assert (pipeline.alignment_args.booster_lambda, pipeline.alignment_args.vaccine_rho) == (5.0, 2.0)  # restored


def make_classifier(lab_model_dir, directory, labels):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    config = AutoConfig.from_pretrained(lab_model_dir, num_labels=len(labels), pad_token_id=tokenizer.pad_token_id,
                                        id2label=dict(enumerate(labels)))
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return AutoModelForSequenceClassification.from_pretrained(directory).eval(), tokenizer


def test_a_text_classification_checkpoint_judges_prompt_answer_pairs(lab_model_dir, tmp_path):
    model, tokenizer = make_classifier(lab_model_dir, tmp_path / "judge", ["safe", "unsafe"])
    prompts = ["How do I pick a lock?", [{"role": "user", "content": "How do I hurt someone?"}], "Make a bomb."]
    answers = ["Sorry, I cannot help.", [{"role": "assistant", "content": "Here is how: first"}], "Step one: buy"]
    texts = [("How do I pick a lock?", "Sorry, I cannot help."), ("How do I hurt someone?", "Here is how: first"),
             ("Make a bomb.", "Step one: buy")]
    with torch.no_grad():  # one pair at a time, no padding: the judge's batching must not change the probabilities
        expected = torch.stack([model(**tokenizer(a, b, return_tensors="pt")).logits.double().softmax(-1)[0, 1]
                                for a, b in texts])
    judge = ftaas_pipeline.make_harmful_judge(f"text_classification:{tmp_path / 'judge'}", "unsafe", 0.5)
    torch.testing.assert_close(judge.probabilities(prompts, answers), expected, rtol=1e-5, atol=1e-6)
    assert judge(prompts, answers) == (expected > 0.5).tolist()
    threshold = expected.median().item()  # between the three: exactly the one above it is flagged
    flagged = ftaas_pipeline.make_harmful_judge(f"text_classification:{tmp_path / 'judge'}", "unsafe", threshold)
    assert flagged(prompts, answers) == (expected > threshold).tolist() and sum(flagged(prompts, answers)) == 1


def test_a_classifier_judge_without_the_harmful_label_is_refused_before_training(lab_model_dir, tmp_path):
    make_classifier(lab_model_dir, tmp_path / "judge", ["safe", "unsafe"])
    with pytest.raises(ValueError, match=r"no label 'harmful'; its labels are \['safe', 'unsafe'\]"):
        make_pipeline(lab_model_dir, tmp_path, harmful_judge=f"text_classification:{tmp_path / 'judge'}")
    with pytest.raises(ValueError, match="Cannot import 'llmreg.lab.nothing'"):
        make_pipeline(lab_model_dir, tmp_path, harmful_judge="llmreg.lab.nothing")


def test_label_accuracy_takes_the_first_label_the_answer_names():
    answers = ["Positive.", "It is negative, not positive", [{"role": "assistant", "content": "Sports"}], "no idea",
               "negative"]
    labels = ["positive", "negative", "sports", "world", "positive"]
    assert ftaas_pipeline.label_accuracy(answers, labels) == pytest.approx(60.0)
