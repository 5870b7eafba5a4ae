"""recipes/unlearn.py on resumable stages: a rerun reuses the fine-tunes, the unlearning and the evaluations; a rerun
with other settings is refused naming them, before anything trains; --overwrite recomputes what changed only."""

import json
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
import unlearn as recipe

from llmreg.recipe_utils import parse_recipe_args
from llmreg.stages import RECORD, StageSettingsError
from llmreg.unlearn import protocol


pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["--finetune_epochs", "1", "--num_train_epochs", "1", "--world_dataset_name", "none",
         "--num_eval_questions", "4", "--logging_steps", "1"]


def run(output_dir, *args):
    return recipe.main(*parse_recipe_args(recipe.make_parser(), [*SMALL, "--output_dir", str(output_dir), *args]))


def stamps(output_dir) -> dict:
    return {path.parent.relative_to(output_dir).as_posix(): path.stat().st_mtime_ns
            for path in output_dir.rglob(RECORD)}


def test_a_rerun_reuses_every_stage_and_other_settings_are_refused(lab_model_dir, tmp_path, monkeypatch):
    rows = run(tmp_path)
    finished = stamps(tmp_path)
    assert set(finished) == {"original", "gold", "unlearned", "original/eval", "gold/eval", "unlearned/eval"}
    assert not list(tmp_path.glob("**/*.partial"))

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(protocol, "SFTTrainer", refuse)  # the stages live in llmreg.unlearn.protocol
    monkeypatch.setattr(protocol, "UnlearnTrainer", refuse)
    monkeypatch.setattr(protocol, "score", refuse)
    assert run(tmp_path) == rows and stamps(tmp_path) == finished

    with pytest.raises(StageSettingsError, match=r"training.learning_rate: 0.001 recorded, 0.002 now"):
        run(tmp_path, "--finetune_learning_rate", "2e-3")  # the original model's stage
    with pytest.raises(StageSettingsError, match=r"training.objective: 'npo' recorded, 'ga' now"):
        run(tmp_path, "--objective", "ga")  # the fine-tunes are reused; the unlearning stage refuses
    assert stamps(tmp_path) == finished  # nothing deleted

    # --overwrite: only the unlearning and its evaluation are redone.
    monkeypatch.undo()
    monkeypatch.setattr(protocol, "SFTTrainer", refuse)
    rows = run(tmp_path, "--objective", "ga", "--overwrite", "true")
    now = stamps(tmp_path)
    assert {name for name in finished if now[name] != finished[name]} == {"unlearned", "unlearned/eval"}
    assert rows[-1]["objective"] == "ga"
    assert json.loads((tmp_path / "unlearn_results.json").read_text())["settings"]["objective"] == "ga"
