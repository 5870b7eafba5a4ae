"""2 processes with a per-device batch of b make the same update as 1 process with 2b, for every method.

The step scripts (``tests/scripts/*_step.py``) train 2–4 steps with plain SGD on fixed data; accelerate hands the two
processes consecutive batches of the same sampler, so both runs see the same rows per step. Each method's extra state
is what must survive the split: Booster's harmful direction and Vaccine's perturbation (normalized over both ranks),
ℓ1's sign term, the reweighting's global weights, the unlearning terms' step-wide counts, RPG's group advantages and
reference, RSPO's and SPIN's precomputed log-probs. RPG's completions come from a scripted rollout, a function of the
prompt alone (sampling draws from each process's own stream).

Tolerances: parameters within 1e-5 absolutely (float32 sums in another order over 2 ranks), and every logged metric
within a relative 1e-4 (plus 1e-6 absolute near 0), so a metric of rank 0 alone would fail.

Under ZeRO-3 with CPU offload, accelerate replaces the optimizer with DeepSpeed's CPU Adam (any torch optimizer: the
step scripts' SGD too), so there the update is compared for SFT, which trains with AdamW, and for the others the
first step's loss and metrics, which come before any update.
"""

import json

import pytest
import torch
from jobs import CONFIGS_TWO_PROCESSES, REFUSED, SINGLE, STEP_ARGS
from safetensors.torch import load_file


pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# Timings, and what is the same by construction (the schedule, the step counter).
NOT_COMPARED = {"learning_rate", "epoch", "step", "step_time", "train_runtime", "train_samples_per_second",
                "train_steps_per_second"}


def trained_weights(directory):
    adapter = directory / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else directory / "model.safetensors")


def step_logs(directory):
    return [entry for entry in json.loads((directory / "trainer_state.json").read_text())["log_history"]
            if "loss" in entry]


def cases():
    for config in CONFIGS_TWO_PROCESSES:
        for step in STEP_ARGS:
            if f"step_{step}" not in REFUSED.get(config, {}):
                yield pytest.param(config, step, id=f"{config.removesuffix('.yaml')}-{step}")


@pytest.mark.parametrize(("config", "step"), list(cases()))
def test_two_processes_equal_one_process_on_the_same_global_batch(matrix, lab_model_dir, config, step):
    one, two = matrix(SINGLE).output(f"step_{step}"), matrix(config).output(f"step_{step}")
    logs_one, logs_two = step_logs(one), step_logs(two)
    assert len(logs_one) >= 2 and len(logs_two) == len(logs_one)
    if config == "deepspeed_zero3_offload.yaml" and step != "sft":  # another optimizer (see above)
        logs_one, logs_two = logs_one[:1], logs_two[:1]
    else:
        expected, got = trained_weights(one), trained_weights(two)
        before = load_file(lab_model_dir / "model.safetensors")
        assert any(name not in before or not value.equal(before[name]) for name, value in expected.items())
        assert set(expected) <= set(got)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for mine, single in zip(logs_two, logs_one, strict=True):
        compared = {key: value for key, value in single.items() if key not in NOT_COMPARED}
        assert set(compared) <= set(mine), f"metrics missing on 2 processes: {set(compared) - set(mine)}"
        for key, value in compared.items():
            assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), f"{key} at step {single['step']}"
