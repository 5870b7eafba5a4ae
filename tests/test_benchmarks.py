"""The benchmark harness (benchmarks/harness.py) measures what it claims: SFTTrainer against itself gives a time
ratio near 1, a candidate that sleeps in every step gives a ratio well above 1, and the CPU memory sampler sees memory.

``benchmarks/`` is a folder of scripts, not a package (``python benchmarks/run.py`` imports ``harness`` as a sibling
module), so the tests put that folder on ``sys.path`` and import the scripts the same way.
"""

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from trl import SFTTrainer


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness
from run import make_sft_case


ROUNDS, STEPS_PER_ROUND, WARMUP = 2, 3, 2
# Longer than an SFT step of the lab model (40 to 60 ms on a 2-core VM), so the ratio stays well above 1.5 even
# when other processes slow the real work down a few times.
SLEEP_SECONDS = 0.1


@pytest.fixture(autouse=True)
def one_torch_thread():
    # With other processes on the CPUs, two torch threads on two cores wait on each other and a step can take 30 times
    # as long; one thread keeps these tests fast and their timings steady. Restored after each test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SlowSFTTrainer(SFTTrainer):
    """SFTTrainer with a fixed extra delay in every optimizer step."""

    def training_step(self, *args, **kwargs):
        time.sleep(SLEEP_SECONDS)
        return super().training_step(*args, **kwargs)


def run_sft_case(trainer_cls=SFTTrainer) -> dict:
    return harness.compare(
        *make_sft_case(trainer_cls), rounds=ROUNDS, steps_per_round=STEPS_PER_ROUND, warmup_steps=WARMUP
    )


@pytest.mark.slow
def test_sft_against_itself_has_time_ratio_near_one():
    result = run_sft_case()

    assert result["steps"] == ROUNDS * STEPS_PER_ROUND
    for side in ("candidate", "baseline"):
        assert result[side]["trainer"] == "SFTTrainer"
        assert len(result[side]["step_ms"]) == ROUNDS * STEPS_PER_ROUND  # warm-up steps dropped
        assert all(ms > 0 for ms in result[side]["step_ms"])
        assert result[side]["peak_mib"] >= 0
    assert 0.5 < result["time_ratio"] < 2.0


@pytest.mark.slow
def test_slower_candidate_is_detected():
    result = run_sft_case(SlowSFTTrainer)

    assert result["candidate"]["trainer"] == "SlowSFTTrainer"
    assert result["baseline"]["trainer"] == "SFTTrainer"
    assert len(result["candidate"]["step_ms"]) == len(result["baseline"]["step_ms"]) == ROUNDS * STEPS_PER_ROUND
    # Every candidate step sleeps, and the sleep is inside the timed span.
    assert min(result["candidate"]["step_ms"]) >= SLEEP_SECONDS * 1000
    assert result["time_ratio"] > 1.5


def test_rss_sampler_sees_a_transient_allocation():
    sampler = harness._RssPeak()
    sampler.start()
    buffer = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
    time.sleep(0.05)
    del buffer
    peak = sampler.stop()
    assert peak >= 48 * 2**20


def test_compare_rejects_a_trainer_whose_max_steps_cannot_hold_a_round():
    def make_short():
        return SimpleNamespace(args=SimpleNamespace(max_steps=4))

    with pytest.raises(ValueError, match="max_steps"):
        harness.compare(make_short, make_short, rounds=1, steps_per_round=3, warmup_steps=2)


def test_run_benchmarks_a_given_model_directory_and_counts_tokens(tmp_path, capsys, monkeypatch, lab_model_dir):
    # What benchmarks/gpu_check.sh does with a random ~0.5B model, at the lab model's size: --model replaces the lab
    # model, and tokens/s comes from the Trainer's count of non-padding input tokens. The random model takes the lab
    # model's tokenizer (hence the fixture).
    import random_model
    import run

    monkeypatch.setattr(run, "MODEL_DIR", None)  # main() sets the module's global; restored after the test
    model_dir = tmp_path / "model"
    assert random_model.build("tiny", model_dir) > 100_000
    run.main(["--model", str(model_dir), "--cases", "sft", "--rounds", "1", "--steps-per-round", "2",
              "--warmup", "1", "--threads", "1"])
    printed = capsys.readouterr().out
    assert f"model: {model_dir}" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| sft "))
    tokens_cand, tokens_base = (float(cell) for cell in row.strip(" |").split("|")[-2:])
    assert tokens_cand > 0 and tokens_base > 0


def test_batch_scale_multiplies_every_batch(monkeypatch, lab_model_dir):
    import run

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setitem(run.SCALE, "batch", 1)  # main() sets it; restored after the test
    monkeypatch.setattr(run, "compare", stop)
    with pytest.raises(Stop):  # stops before training: the configs are what this test reads
        run.main(["--cases", "sft", "--batch-scale", "3"])
    assert run.sft_config().per_device_train_batch_size == 24
    with pytest.raises(SystemExit):
        run.main(["--cases", "sft", "--batch-scale", "0"])


@pytest.mark.slow
def test_cost_growth_grows_the_work_along_each_dimension(tmp_path):
    # One case, one short round per point: the script's plumbing, and that each dimension grows what it says.
    import cost_growth
    import run

    try:
        rows = cost_growth.main(["--cases", "l1", "--rounds", "1", "--steps-per-round", "2", "--warmup", "1",
                                 "--output-dir", str(tmp_path)])
    finally:
        run.MODEL_DIR, run.SCALE["batch"], run.SCALE["filler_words"] = None, 1, 0
    tokens = {(r["dimension"], r["factor"]): r["tokens_per_step"] for r in rows}
    milliseconds = {(r["dimension"], r["factor"]): r["median_ms"] for r in rows}
    base = tokens[("base", 1)]
    assert 1.5 * base < tokens[("sequence", 2)] < tokens[("sequence", 4)]
    assert 1.5 * base < tokens[("batch", 2)] < tokens[("batch", 4)]
    assert tokens[("width", 4)] == pytest.approx(base, rel=0.05)  # the same batches, a wider model
    assert milliseconds[("width", 4)] > milliseconds[("base", 1)]
    assert (tmp_path / "cost_growth.png").read_bytes()[:4] == b"\x89PNG"
    assert "| l1 | width ×4 |" in (tmp_path / "cost_growth.md").read_text()
