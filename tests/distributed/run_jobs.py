"""Run several recipes and test scripts one after another in one ``accelerate launch``, for the launch matrix.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml tests/distributed/run_jobs.py JOBS.json

JOBS.json lists ``{"name": ..., "script": ..., "args": [...]}``. Each job runs as its script's ``__main__`` with
``args`` as its command line, as ``accelerate launch SCRIPT ARGS`` would run it. One launch per accelerate config
instead of one per job saves the ~10 s that starting the processes and importing the stack cost each time.

Between jobs accelerate's state is reset, as between the FTaaS pipeline's stages, and the process group stays:
every script ends with ``trainer.end()``, which here finishes the trackers but leaves the group for the next job.
A job that raises is recorded in ``<output_dir>/<name>.error`` (per rank) and the next job starts; the tests read
those files. A job that fails on one rank only leaves the other waiting in a collective: the launch then times out.
"""

import gc
import json
import os
import runpy
import sys
import time
import traceback
from pathlib import Path

from accelerate import Accelerator

from llmreg.trainer_utils import reset_accelerator_state


def finish_trackers_only(self):
    for tracker in self.trackers:
        tracker.finish()


def main() -> None:
    jobs_file = Path(sys.argv[1])
    jobs = json.loads(jobs_file.read_text())
    rank = int(os.environ.get("RANK", "0"))
    end_training = Accelerator.end_training
    Accelerator.end_training = finish_trackers_only
    timings = {}
    for job in jobs:
        reset_accelerator_state()
        gc.collect()
        error_file = jobs_file.parent / f"{job['name']}.rank{rank}.error"
        error_file.unlink(missing_ok=True)
        sys.argv = [job["script"], *job["args"]]
        start = time.perf_counter()
        try:
            runpy.run_path(job["script"], run_name="__main__")
        except (Exception, SystemExit):  # noqa: BLE001 - argparse exits too: recorded, the next job runs
            # (an interrupt still stops the launch)
            error_file.write_text(traceback.format_exc())
        timings[job["name"]] = round(time.perf_counter() - start, 2)
    if rank == 0:
        (jobs_file.parent / "timings.json").write_text(json.dumps(timings, indent=1))
    Accelerator.end_training = end_training
    reset_accelerator_state()
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    (jobs_file.parent / f"finished.rank{rank}").touch()  # every job ran; what follows is the interpreter's exit


if __name__ == "__main__":
    main()
