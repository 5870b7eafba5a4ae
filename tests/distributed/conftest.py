import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EXIT_ABORT  # the rare abort at exit under DeepSpeed over gloo: not a failure once all ran
from jobs import REPO, jobs


class Launch:
    """One ``accelerate launch`` of a config's jobs: where they wrote, and how the launch ended."""

    def __init__(self, config: str, root: Path, result: subprocess.CompletedProcess):
        self.config, self.root, self.result = config, root, result
        self.processes = 1 if config == "single_process.yaml" else 2
        finished = all((root / f"finished.rank{rank}").is_file() for rank in range(self.processes))
        self.ok = result.returncode == 0 or (finished and EXIT_ABORT in result.stderr)

    def error(self, name: str) -> str | None:
        """The job's traceback (any rank), or the launch's output when the launch itself failed."""
        errors = [path.read_text() for path in sorted(self.root.glob(f"{name}.rank*.error"))]
        if errors:
            return "\n".join(errors)
        if not self.ok:
            return f"launch failed (rc {self.result.returncode}):\n{self.result.stdout[-3000:]}\n" \
                   f"{self.result.stderr[-6000:]}"
        return None

    def output(self, name: str) -> Path:
        error = self.error(name)
        assert error is None, f"{self.config} {name}:\n{error}"
        return self.root / name


@pytest.fixture(scope="session")
def matrix(lab_model_dir, tmp_path_factory):
    """``matrix(config)``: the Launch of that config's jobs, launched on first use (one launch per config)."""
    launched = {}

    def launch(config: str) -> Launch:
        if config not in launched:
            root = tmp_path_factory.mktemp(config.removesuffix(".yaml"))
            (root / "jobs.json").write_text(json.dumps(jobs(config, root), indent=1))
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(REPO / "accelerate_configs" / config), str(REPO / "tests" / "distributed" / "run_jobs.py"),
                       str(root / "jobs.json")]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
            result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                                    check=False)
            launched[config] = Launch(config, root, result)
        return launched[config]

    return launch
