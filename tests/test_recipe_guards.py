"""Recipe guards that decide or refuse before any training: reweight's --from_scratch default (the lab model only),
LoRA Dropout without a LoRA adapter, and --assistant_only_loss with a chat template TRL cannot mask."""

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import qwen2_5_chat_template

from llmreg.recipe_utils import parse_recipe_args
from llmreg.trainer_utils import check_assistant_only_loss


sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
import ftaas
import lora_dropout
import reweight
import sft
import unlearn


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ChatML as most chat models ship it: no {% generation %} markers, and not a template TRL has a training version of.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def copy_of_lab_model(lab_model_dir: Path, destination: Path, chat_template: str | None = None) -> Path:
    """The lab model's weights and tokenizer as a user's own model would be: no lab_info.json; ``chat_template``
    replaces its template."""
    shutil.copytree(lab_model_dir, destination, ignore=shutil.ignore_patterns("lab_info.json"))
    if chat_template is not None:
        tokenizer = AutoTokenizer.from_pretrained(destination)
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(destination)
    return destination


@pytest.fixture
def lab_tokenizer(lab_model_dir):
    return AutoTokenizer.from_pretrained(lab_model_dir)


@pytest.fixture
def sft_args(tmp_path):
    return SFTConfig(str(tmp_path / "out"), assistant_only_loss=True, use_cpu=True, bf16=False, report_to="none")


# ------------------------------------------------------------------------------------------------------------------
# recipes/reweight.py: --from_scratch

def test_reweight_from_scratch_is_unset_unless_given():
    parsed = reweight.make_parser().parse_args_and_config([])
    assert parsed[0].from_scratch is None
    assert reweight.make_parser().parse_args_and_config(["--from_scratch", "false"])[0].from_scratch is False


def test_unset_from_scratch_is_true_for_the_lab_model_only(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=reweight.__name__)
    tiny, smollm2, own = tmp_path / "tiny", tmp_path / "smollm2", tmp_path / "own"
    for path, info in ((tiny, {"model_id": "llmreg/tiny"}), (smollm2, {"model_id": "llmreg/smollm2-135m"}),
                       (own, None)):
        path.mkdir()
        if info is not None:
            (path / "lab_info.json").write_text(json.dumps(info))

    assert reweight.resolve_from_scratch(None, str(tiny)) is True
    assert "trains from a seeded random initialization" in caplog.text
    caplog.clear()
    assert reweight.resolve_from_scratch(None, str(own)) is False
    assert "its weights are loaded" in caplog.text
    # Another lab model (a SmolLM2 conversion) has a lab_info.json too, and real weights.
    assert reweight.resolve_from_scratch(None, str(smollm2)) is False
    assert reweight.resolve_from_scratch(None, "openai-community/gpt2") is False
    # Given, it is forced either way; discarding a real model's weights is a warning.
    caplog.clear()
    assert reweight.resolve_from_scratch(True, str(own)) is True
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "not loaded" in caplog.text
    assert reweight.resolve_from_scratch(False, str(tiny)) is False


def first_heldout_loss(model: Path, output_dir: Path, *extra: str) -> float:
    # One strategy other than uniform: the results table then needs no uniform baseline.
    rows = reweight.main(*parse_recipe_args(reweight.make_parser(), [
        "--model_name_or_path", str(model), "--output_dir", str(output_dir), "--strategies", "linupper",
        "--max_steps", "1", "--eval_steps", "1", "--num_train_samples", "16", "--num_eval_samples", "16",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16", "--use_cpu", "--bf16", "false",
        "--disable_tqdm", "true", *extra]))
    return rows[0]["curve"][0][1]  # the held-out loss at step 0: the initialization's


def test_reweight_keeps_a_models_weights_and_pretrains_only_the_lab_model(lab_model_dir, tmp_path):
    own = copy_of_lab_model(lab_model_dir, tmp_path / "own")
    lab = first_heldout_loss(lab_model_dir, tmp_path / "lab")
    kept = first_heldout_loss(own, tmp_path / "kept")
    forced = first_heldout_loss(own, tmp_path / "forced", "--from_scratch", "true")
    # A random initialization predicts about uniformly over the 1024 tokens; the trained weights do far better.
    assert lab == pytest.approx(math.log(1024), abs=0.3)
    assert kept < lab - 3
    # --from_scratch true: the same seeded initialization as the lab default, the weights discarded.
    assert forced == pytest.approx(lab, rel=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# recipes/lora_dropout.py: a LoRA adapter is required

def test_lora_dropout_without_lora_is_refused_before_training(lab_model_dir, tmp_path, monkeypatch):
    def no_trainer(*args, **kwargs):
        raise AssertionError("a trainer was built before the refusal")

    monkeypatch.setattr(lora_dropout, "with_lora_dropout", no_trainer)
    parsed = parse_recipe_args(lora_dropout.make_parser(), [
        "--model_name_or_path", str(lab_model_dir), "--output_dir", str(tmp_path), "--use_peft", "false"])
    with pytest.raises(ValueError, match="Remove --use_peft false") as refusal:
        lora_dropout.main(*parsed)
    assert "masks the input and output dimensions" in str(refusal.value)
    # The recipe's own default (LoRA on) passes the check.
    lora_dropout.check_arguments(parse_recipe_args(lora_dropout.make_parser(), [])[-1])


# ------------------------------------------------------------------------------------------------------------------
# llmreg.trainer_utils.check_assistant_only_loss

def test_a_template_with_generation_markers_passes(lab_tokenizer, sft_args):
    assert "{% generation %}" in lab_tokenizer.chat_template
    check_assistant_only_loss(lab_tokenizer, sft_args)
    lab_tokenizer.chat_template = lab_tokenizer.chat_template.replace("{% generation %}", "{%- generation %}")
    check_assistant_only_loss(lab_tokenizer, sft_args)


def test_a_template_without_markers_is_refused_with_the_fixes(lab_tokenizer, sft_args):
    lab_tokenizer.chat_template = CHATML
    with pytest.raises(ValueError, match=r"has no \{% generation %\}") as refusal:
        check_assistant_only_loss(lab_tokenizer, sft_args)
    message = str(refusal.value)
    assert lab_tokenizer.name_or_path in message
    fixes = ("prompt-completion dataset", "completion_only_loss", "--chat_template_path", "drop --assistant_only_loss")
    assert all(fix in message for fix in fixes), message
    # Without --assistant_only_loss the template does not matter.
    sft_args.assistant_only_loss = False
    check_assistant_only_loss(lab_tokenizer, sft_args)


def test_a_missing_template_is_refused(lab_tokenizer, sft_args):
    lab_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="is missing"):
        check_assistant_only_loss(lab_tokenizer, sft_args)


def test_a_template_trl_has_a_training_version_of_passes(lab_tokenizer, sft_args):
    # Qwen2.5's template has no markers, but SFTTrainer swaps in TRL's training version: no refusal, and the
    # tokenizer's template is left as it was.
    lab_tokenizer.chat_template = qwen2_5_chat_template
    check_assistant_only_loss(lab_tokenizer, sft_args)
    assert lab_tokenizer.chat_template == qwen2_5_chat_template


def test_chat_template_path_is_the_template_checked(lab_tokenizer, lab_model_dir, sft_args, tmp_path):
    lab_tokenizer.chat_template = CHATML
    with_markers, without = tmp_path / "with.jinja", tmp_path / "without.jinja"
    with_markers.write_text(AutoTokenizer.from_pretrained(lab_model_dir).chat_template)
    without.write_text(CHATML)
    sft_args.chat_template_path = str(with_markers)
    check_assistant_only_loss(lab_tokenizer, sft_args)
    sft_args.chat_template_path = str(without)
    with pytest.raises(ValueError, match=str(without)):
        check_assistant_only_loss(lab_tokenizer, sft_args)
    sft_args.chat_template_path = str(lab_model_dir)  # a tokenizer's template, with markers
    check_assistant_only_loss(lab_tokenizer, sft_args)


def test_a_model_path_loads_its_tokenizer(lab_model_dir, sft_args, tmp_path):
    check_assistant_only_loss(str(lab_model_dir), sft_args)
    chatml = copy_of_lab_model(lab_model_dir, tmp_path / "chatml", chat_template=CHATML)
    with pytest.raises(ValueError, match="has no"):
        check_assistant_only_loss(str(chatml), sft_args)


@pytest.mark.parametrize("recipe", [sft, unlearn, reweight, lora_dropout, ftaas], ids=lambda r: r.__name__)
def test_every_sft_recipe_refuses_a_template_without_markers_before_training(recipe, lab_model_dir, tmp_path,
                                                                             monkeypatch):
    # Every trainer of these recipes is an SFTTrainer: building one fails the test, and TRL's own error (a ValueError
    # too) would not match the message.
    def no_trainer(self, *args, **kwargs):
        raise AssertionError("a trainer was built before the refusal")

    monkeypatch.setattr(SFTTrainer, "__init__", no_trainer)
    chatml = copy_of_lab_model(lab_model_dir, tmp_path / "chatml", chat_template=CHATML)
    parsed = parse_recipe_args(recipe.make_parser(), [
        "--model_name_or_path", str(chatml), "--output_dir", str(tmp_path / "out"), "--assistant_only_loss", "true"])
    with pytest.raises(ValueError, match="--assistant_only_loss true needs a chat template"):
        recipe.main(*parsed)


def test_the_sft_recipe_trains_assistant_only_on_the_lab_template(lab_model_dir, tmp_path):
    # No false refusal: the lab model's template has markers, and TRL masks with them.
    sft.main(*parse_recipe_args(sft.make_parser(), [
        "--model_name_or_path", str(lab_model_dir), "--output_dir", str(tmp_path), "--assistant_only_loss", "true",
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--disable_tqdm", "true"]))
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 1


def test_reweight_table_when_uniform_never_improves_on_its_start():
    from llmreg.recipes.reweight import results_table

    rows = [{"strategy": "uniform", "final_heldout_loss": 2.0, "uniform_steps": 0, "steps_to_uniform_final": 0},
            {"strategy": "linupper", "final_heldout_loss": 1.9, "uniform_steps": 0, "steps_to_uniform_final": 0}]
    table = results_table(rows)
    assert "| uniform | 2.0000 | 0 | — |" in table and "| linupper | 1.9000 | 0 | — |" in table
