"""Resumable stages: what a multi-stage run (the self-play loop, the FTaaS pipeline, the unlearning protocol, the
recipes' arms, an ablation) writes, so that a rerun continues it and never mixes results of other settings.

A stage is a directory. It is built under a temporary name (``<name>.partial``) holding a record of the settings that
produce it (``llmreg_stage.json``), then its files are flushed to disk (fsync) and the directory is renamed to its
final name in one step: a stage directory exists complete or not at all. A rerun of the same command

- skips a finished stage whose recorded settings equal the new ones;
- refuses one whose settings differ, naming each difference and the fix (a new ``--output_dir``, or ``--overwrite`` to
  delete the old stage and recompute it);
- continues an unfinished stage: its ``.partial`` directory is kept after a crash or Ctrl-C, and a training stage
  resumes from the last complete checkpoint in it (``last_complete_checkpoint``).

Settings are JSON-able values. They must not contain paths derived from the output directory (a stage is renamed when
it finishes): name another stage by its settings, not by its path.

A Trainer's own checkpoints are handled here too: ``resolve_resume_from_checkpoint`` gives ``--resume_from_checkpoint``
its values ``true | false | PATH`` and, by default, continues a killed run from the last complete checkpoint of its
output directory; ``checkpoint_problem`` finds a checkpoint cut short (a file truncated or missing) by name.
"""

import hashlib
import json
import logging
import os
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from llmreg.errors import InputError


logger = logging.getLogger(__name__)

RECORD = "llmreg_stage.json"
PARTIAL_SUFFIX = ".partial"


class StageSettingsError(InputError):
    """A stage on disk was produced with other settings than the run asking for it."""


def json_ready(value):
    """``value`` as JSON would read it back (tuples become lists, keys strings, sets sorted lists, anything else its
    text), so that records compare equal from run to run."""
    def default(item):
        return sorted(item, key=str) if isinstance(item, (set, frozenset)) else str(item)

    return json.loads(json.dumps(value, sort_keys=True, default=default))


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def settings_changes(recorded: dict, current: dict) -> list[str]:
    """Human-readable differences between two settings records, one ``key: recorded → now`` line each."""
    old, new = _flatten(json_ready(recorded)), _flatten(json_ready(current))
    missing = object()
    return [f"{key}: {old.get(key, 'unset')!r} recorded, {new.get(key, 'unset')!r} now"
            for key in sorted(old.keys() | new.keys()) if old.get(key, missing) != new.get(key, missing)]


def dataset_digest(dataset) -> str:
    """A content hash of a ``datasets.Dataset`` (its rows in order), to record which data a stage was built from."""
    digest = hashlib.sha256()
    for batch in dataset.iter(batch_size=1000):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return f"{len(dataset)} rows, sha256 {digest.hexdigest()[:16]}"


# TrainingArguments fields that do not change what training produces: left out of a stage's settings.
_NOT_SETTINGS = {"output_dir", "logging_dir", "run_name", "report_to", "disable_tqdm", "resume_from_checkpoint",
                 "dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_persistent_workers",
                 "dataloader_pin_memory", "project", "trackio_space_id", "overwrite_output_dir", "local_rank",
                 "ddp_timeout", "include_num_input_tokens_seen", "deepspeed", "accelerator_config"}
_NOT_SETTINGS_PREFIXES = ("logging_", "log_", "save_", "hub_", "push_to_hub", "eval_", "per_device_eval",
                          "metric_for_best", "load_best", "greater_is_better")


def training_settings(args) -> dict:
    """The settings of a ``TrainingArguments`` (or TRL config) that shape the trained model: everything but output,
    logging, saving, evaluation and hub options."""
    return json_ready({key: value for key, value in args.to_dict().items()
                        if key not in _NOT_SETTINGS and not key.startswith(_NOT_SETTINGS_PREFIXES)})


def _fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory``, and the directories themselves, to disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(Path(root) / name, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(root))


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Stage:
    """One resumable stage: a directory ``path`` produced by ``settings``.

        stage = Stage(output_dir / "align" / "sft", settings, overwrite=args.overwrite)
        if not stage.is_finished():
            with stage.build() as work:        # work = <path>.partial, kept if the block fails
                ...write files (checkpoints too) under work...
        use(stage.path)

    Every process of a distributed run calls the same methods in the same order; the main process writes the
    records and renames, the others wait for it. (The process state is looked up at each call, not kept: a pipeline
    may reset accelerate's state between two trainings.)
    """

    def __init__(self, path: Path | str, settings: dict, *, overwrite: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.settings = json_ready(settings)
        self.overwrite = overwrite

    def _recorded(self, directory: Path) -> dict | None:
        try:
            return json.loads((directory / RECORD).read_text())["settings"]
        except (OSError, ValueError, KeyError):
            return None

    def _check(self, directory: Path) -> None:
        """Main process only: refuse ``directory`` (the stage, finished or not) if it was made with other settings;
        delete it instead under ``overwrite``."""
        recorded = self._recorded(directory)
        if recorded == self.settings:
            return
        # An attempt killed between creating its directory and writing its record holds nothing: start it again.
        if self.overwrite or (recorded is None and directory == self.partial):
            if recorded is not None:
                logger.warning("--overwrite: deleting %s (made with other settings) to recompute it.", directory)
            shutil.rmtree(directory)
            return
        if recorded is None:
            problem = f"{directory} exists but holds no record of the settings that made it ({RECORD}). "
        else:
            changes = "\n  ".join(settings_changes(recorded, self.settings))
            problem = f"{directory} was made with other settings:\n  {changes}\n"
        raise StageSettingsError(
            f"{problem}A rerun reuses finished stages, so their results would be reported under the new settings. "
            "Pass a new --output_dir, or --overwrite to delete the old stage and recompute it (or rerun with the "
            f"recorded settings, in {directory / RECORD})."
        )

    def is_finished(self) -> bool:
        """True when the stage exists with these settings. Raises ``StageSettingsError`` when it, or an unfinished
        attempt at it, exists with other settings (unless ``overwrite``: then that is deleted).

        The main process looks, after every process got here, and tells the others: processes that each looked at
        the directory themselves could see it at different moments of its making and part ways."""
        state = PartialState()
        state.wait_for_everyone()
        outcome = [None]
        if state.is_main_process:
            try:
                for directory in (self.path, self.partial):
                    if directory.exists():
                        self._check(directory)
                outcome = [("finished", self.path.exists())]
            except StageSettingsError as error:
                outcome = [("refused", str(error))]
        kind, value = broadcast_object_list(outcome, from_process=0)[0]
        if kind == "refused":
            raise StageSettingsError(value)
        return value

    @contextmanager
    def build(self):
        """Yield the working directory (``<path>.partial``, reused from an interrupted attempt with the same settings);
        when the block ends without an exception, record the stage as finished and move it into place."""
        if self.is_finished():
            raise RuntimeError(f"Stage {self.path} is already finished; check is_finished() before build().")
        state = PartialState()
        if state.is_main_process:
            if self.partial.exists():
                logger.warning("Continuing the unfinished stage %s (interrupted earlier, same settings).",
                               self.partial)
            else:
                self.partial.mkdir(parents=True)
                (self.partial / RECORD).write_text(json.dumps({"settings": self.settings, "finished": False},
                                                              indent=1))
        state.wait_for_everyone()
        yield self.partial
        state.wait_for_everyone()
        if state.is_main_process:
            record = self.partial / RECORD
            temporary = record.with_name(RECORD + ".tmp")
            temporary.write_text(json.dumps({"settings": self.settings, "finished": True}, indent=1))
            os.replace(temporary, record)
            _fsync_tree(self.partial)
            os.replace(self.partial, self.path)
            _fsync_directory(self.path.parent)
        state.wait_for_everyone()


def checkpoint_problem(checkpoint: Path | str) -> str | None:
    """What is wrong with a Trainer checkpoint directory, or None if it is complete: ``trainer_state.json`` (written
    last) must parse, every safetensors file must hold the bytes its header declares, and every torch file (a zip
    archive: optimizer, scheduler, RNG states, DeepSpeed shards) must end with its central directory."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return f"{checkpoint} is not a directory"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError) as error:
        return f"{checkpoint / 'trainer_state.json'} is missing or cut short ({error.__class__.__name__})"
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            size = path.stat().st_size
            try:
                with open(path, "rb") as handle:
                    header_size = int.from_bytes(handle.read(8), "little")
                    header = json.loads(handle.read(header_size))
                data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                               default=0)
            except (ValueError, KeyError, TypeError, MemoryError):
                return f"{path} is cut short or corrupt (its header does not parse)"
            if size < 8 + header_size + data_end:
                return f"{path} is cut short ({size} bytes of {8 + header_size + data_end})"
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{path} is cut short or corrupt (not a complete torch archive)"
    return None


def _checkpoints(directory: Path) -> list[Path]:
    """``checkpoint-N`` directories under ``directory``, newest first."""
    found = [p for p in directory.glob("checkpoint-*") if p.is_dir() and p.name.rpartition("-")[2].isdigit()]
    return sorted(found, key=lambda p: int(p.name.rpartition("-")[2]), reverse=True)


def last_complete_checkpoint(directory: Path | str) -> str | None:
    """The newest ``checkpoint-N`` in ``directory`` that is complete (``checkpoint_problem``), or None. A newer one
    that is not is named in a warning and skipped: a process killed while saving leaves one cut short."""
    directory = Path(directory)
    for checkpoint in _checkpoints(directory) if directory.is_dir() else []:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        logger.warning("Skipping the incomplete checkpoint %s: %s.", checkpoint, problem)
    return None


def resolve_resume_from_checkpoint(value: str | bool | None, output_dir: str | Path) -> str | None:
    """The checkpoint a Trainer should resume from, for ``--resume_from_checkpoint``:

    - unset (None): the last complete checkpoint in ``output_dir`` if there is one (a rerun after a kill continues,
      and says so), else a fresh start;
    - ``true``: the same, but an error if ``output_dir`` holds no complete checkpoint;
    - ``false``: a fresh start, whatever ``output_dir`` holds (its checkpoints are overwritten as training saves);
    - a path: that checkpoint, which must be complete (the error names the broken file and the newest complete one).
    """
    text = str(value).strip().lower() if value is not None else None
    if text in ("false", "no", "0"):
        return None
    if text in (None, "true", "yes", "1", "auto"):
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            if text not in (None, "auto"):
                raise InputError(f"--resume_from_checkpoint true, but {output_dir} holds no complete checkpoint-N "
                                 "directory. Drop the option to start from scratch, or pass a checkpoint's path.")
            return None
        if PartialState().is_main_process:
            logger.warning("Resuming from %s, the last complete checkpoint in %s (--resume_from_checkpoint false "
                           "starts over).", checkpoint, output_dir)
        return checkpoint
    problem = checkpoint_problem(value)
    if problem is not None:
        fallback = last_complete_checkpoint(Path(value).parent)
        offer = (f" The newest complete checkpoint next to it is {fallback}: pass it instead."
                 if fallback else " No complete checkpoint sits next to it.")
        raise InputError(f"Cannot resume from {value}: {problem}.{offer}")
    return str(value)
