"""recipes/sft.py on two "machines" (the multi-node config on localhost).

Every recipe under every shipped config, and the 2-processes-equal-1-process checks, are the launch matrix in
tests/distributed/.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from safetensors.torch import load_file


def assert_trained(output_dir: Path, lab_model_dir: Path, world_size: int) -> None:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 3 and len(losses) == 3
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    # 3 steps of 4 rows per process over the 2000 lab rows: the epoch fraction shows how many processes trained.
    assert state["log_history"][-1]["epoch"] == pytest.approx(3 * 4 * world_size / 2000, rel=0.02)
    before, after = load_file(lab_model_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert set(before) <= set(after)  # DeepSpeed saves may also write the tied lm_head.weight
    changed = [name for name in before if not before[name].equal(after[name].to(before[name].dtype))]
    assert len(changed) == len(before), f"unchanged tensors: {sorted(set(before) - set(changed))}"


@pytest.mark.slow
@pytest.mark.distributed
def test_sft_two_nodes_on_localhost(lab_model_dir, tmp_path):
    # Two launchers of one process each, as two machines would run them, meeting on 127.0.0.1: the shipped multi-node
    # config works, and both "machines" train (the epoch fraction counts 2 processes).
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    commands = [[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(REPO / "accelerate_configs" / "multi_node.yaml"), "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", port, str(REPO / "recipes" / "sft.py"),
                 "--config", str(REPO / "recipes" / "configs" / "sft.yaml"), "--max_steps", "3", "--logging_steps",
                 "1", "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path)] for rank in (0, 1)]
    machines = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for command in commands]
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    for machine, output in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, output[-4000:]
    assert_trained(tmp_path, lab_model_dir, world_size=2)
