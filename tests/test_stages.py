"""llmreg.stages: resumable stages (skip, refuse, overwrite, continue) and checkpoint validation."""

import json

import pytest
import torch
from safetensors.torch import save_file

from llmreg.stages import (
    RECORD,
    Stage,
    StageSettingsError,
    checkpoint_problem,
    dataset_digest,
    last_complete_checkpoint,
    resolve_resume_from_checkpoint,
    settings_changes,
)


def build(stage: Stage, content: str) -> None:
    with stage.build() as work:
        (work / "result.txt").write_text(content)


def test_a_finished_stage_is_skipped_with_the_same_settings(tmp_path):
    stage = Stage(tmp_path / "align", {"lr": 1e-3, "method": "sft"})
    assert not stage.is_finished()
    build(stage, "first")
    assert (tmp_path / "align" / "result.txt").read_text() == "first"
    assert not (tmp_path / "align.partial").exists()
    assert json.loads((tmp_path / "align" / RECORD).read_text()) == {"settings": {"lr": 1e-3, "method": "sft"},
                                                                      "finished": True}
    # Same settings (a tuple reads back as the list a record holds): finished, nothing to rebuild.
    again = Stage(tmp_path / "align", {"method": "sft", "lr": 1e-3})
    assert again.is_finished()
    with pytest.raises(RuntimeError, match="already finished"):
        build(again, "second")


def test_other_settings_are_refused_naming_each_difference(tmp_path):
    build(Stage(tmp_path / "align", {"booster": {"lambda": 5.0, "alpha": 0.01}, "seed": 0}), "old")
    changed = Stage(tmp_path / "align", {"booster": {"lambda": 1.0, "alpha": 0.01}, "seed": 0, "extra": True})
    with pytest.raises(StageSettingsError) as error:
        changed.is_finished()
    message = str(error.value)
    assert "booster.lambda: 5.0 recorded, 1.0 now" in message
    assert "extra: 'unset' recorded, True now" in message
    assert "alpha" not in message  # unchanged settings are not listed
    assert "--output_dir" in message and "--overwrite" in message
    assert (tmp_path / "align" / "result.txt").read_text() == "old"  # refused: nothing deleted


def test_overwrite_deletes_a_stage_of_other_settings_and_recomputes(tmp_path):
    build(Stage(tmp_path / "align", {"lambda": 5.0}), "old")
    stage = Stage(tmp_path / "align", {"lambda": 1.0}, overwrite=True)
    assert not stage.is_finished()
    assert not (tmp_path / "align").exists()
    build(stage, "new")
    assert Stage(tmp_path / "align", {"lambda": 1.0}).is_finished()
    assert (tmp_path / "align" / "result.txt").read_text() == "new"


def test_an_interrupted_stage_is_continued_and_an_interrupted_one_of_other_settings_refused(tmp_path):
    stage = Stage(tmp_path / "train", {"steps": 4})
    with pytest.raises(KeyboardInterrupt), stage.build() as work:
        (work / "checkpoint-2").mkdir()
        raise KeyboardInterrupt
    assert not (tmp_path / "train").exists()
    assert (tmp_path / "train.partial" / "checkpoint-2").is_dir()  # kept for the rerun
    with pytest.raises(StageSettingsError, match="steps: 4 recorded, 8 now"):
        Stage(tmp_path / "train", {"steps": 8}).is_finished()
    rerun = Stage(tmp_path / "train", {"steps": 4})
    assert not rerun.is_finished()
    with rerun.build() as work:
        assert (work / "checkpoint-2").is_dir()  # the rerun sees what the interrupted attempt left
        (work / "model").write_text("done")
    assert (tmp_path / "train" / "checkpoint-2").is_dir() and (tmp_path / "train" / "model").is_file()


def test_a_directory_without_a_record_is_refused_and_an_empty_attempt_restarted(tmp_path):
    (tmp_path / "align").mkdir()
    with pytest.raises(StageSettingsError, match="holds no record"):
        Stage(tmp_path / "align", {}).is_finished()
    (tmp_path / "other.partial").mkdir()  # killed before its record was written: nothing worth keeping
    stage = Stage(tmp_path / "other", {"a": 1})
    assert not stage.is_finished()
    build(stage, "x")
    assert stage.is_finished()


def test_settings_changes_flatten_nested_settings():
    assert settings_changes({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": (1, 3)}}) == [
        "a.c: [1, 2] recorded, [1, 3] now"]
    assert settings_changes({"a": 1}, {"a": 1}) == []


def test_dataset_digest_follows_the_rows_in_order():
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["1", "2", "3"]})
    assert dataset_digest(data) == dataset_digest(Dataset.from_dict(data.to_dict()))
    assert dataset_digest(data) != dataset_digest(data.select([0, 2, 1]))
    assert dataset_digest(data).startswith("3 rows")


def make_checkpoint(directory, step: int):
    checkpoint = directory / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    save_file({"weight": torch.arange(64, dtype=torch.float32)}, checkpoint / "model.safetensors")
    torch.save({"state": torch.ones(16)}, checkpoint / "optimizer.pt")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("broken", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_checkpoint_cut_short_is_named_and_the_previous_complete_one_used(tmp_path, broken):
    make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 10)
    assert checkpoint_problem(newest) is None
    assert last_complete_checkpoint(tmp_path) == str(newest)
    truncate(newest / broken)
    assert broken in checkpoint_problem(newest)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert resolve_resume_from_checkpoint(None, tmp_path) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError) as error:
        resolve_resume_from_checkpoint(str(newest), tmp_path)
    assert broken in str(error.value) and str(tmp_path / "checkpoint-2") in str(error.value)


def test_resume_from_checkpoint_values(tmp_path):
    assert resolve_resume_from_checkpoint(None, tmp_path / "missing") is None  # a fresh run
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        resolve_resume_from_checkpoint("true", tmp_path)
    first = make_checkpoint(tmp_path, 3)
    last = make_checkpoint(tmp_path, 12)
    assert resolve_resume_from_checkpoint(None, tmp_path) == str(last)
    assert resolve_resume_from_checkpoint("true", tmp_path) == str(last)
    assert resolve_resume_from_checkpoint(True, tmp_path) == str(last)
    assert resolve_resume_from_checkpoint("false", tmp_path) is None
    assert resolve_resume_from_checkpoint(str(first), tmp_path) == str(first)


def test_settings_with_sets_are_recorded_in_a_stable_order(tmp_path):
    # PEFT's target_modules is a set: its iteration order changes from process to process (string hashing).
    from llmreg.stages import json_ready

    assert json_ready({"target_modules": {"v_proj", "q_proj", "k_proj"}}) == {
        "target_modules": ["k_proj", "q_proj", "v_proj"]}
    build(Stage(tmp_path / "lora", {"modules": {"v_proj", "q_proj"}}), "x")
    assert Stage(tmp_path / "lora", {"modules": {"q_proj", "v_proj"}}).is_finished()
