"""Time an llmreg trainer's optimizer step against its stock base trainer, side by side in one process.

``compare(make_candidate, make_baseline, ...)`` builds both trainers, then runs them in interleaved rounds (candidate
then baseline, baseline then candidate, ...) so that whatever else the machine is doing slows both alike, and returns
per-trainer step times and peak memory with candidate/baseline ratios. The ratios are the result; absolute times
depend on the machine and its load.

How rounds work: each round is one ordinary ``trainer.train()`` call that a callback stops after the round's steps
(``control.should_training_stop``). Calling ``train()`` again is supported by transformers (``auto_find_batch_size``
relies on it): the model and the optimizer (with its state) are kept, while the dataloader, the LR scheduler and the
step counter start over, so every round trains on the same first batches. That restart work happens outside the
timed span, which runs from ``on_step_begin`` (after the batch is fetched) to ``on_step_end`` (after the optimizer
step), so a step time is forward + backward + clipping + optimizer step: setup, data loading and logging excluded.

Peak memory is the most a trainer's steps add on top of what is already held when its round starts: activations,
gradients and anything else a step allocates and frees. Both trainers live in one process, so absolute figures would
count the other trainer's weights too; for the same reason memory held across steps (weights, a reference model,
optimizer state) is not in it. On CUDA it is ``max_memory_allocated()`` over the round minus ``memory_allocated()`` at
its start. On CPU there is no allocator counter, so a background thread samples the process RSS (``/proc/self/statm``,
Linux) every millisecond, after first handing the memory that the C allocator keeps from freed tensors back to the OS
(``malloc_trim``, glibc); without that, how much of a step's memory shows up as new RSS would depend on what ran
before. It is still coarse: page granularity, 1 ms sampling, and allocator behaviour, not just tensors.
"""

import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback


MIB = 2**20


def _synchronize() -> None:
    # CUDA kernels run asynchronously: without a sync the clock would stop before the step's work is done.
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    """Collect garbage and, under glibc, give the allocator's free memory back to the OS, so RSS counts live memory."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS keeps the allocator's free memory, coarser still
        pass


class _CudaPeak:
    """Peak CUDA memory allocated on top of what was allocated at ``start()``."""

    def start(self) -> None:
        gc.collect()
        self._start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def stop(self) -> int:
        return torch.cuda.max_memory_allocated() - self._start


class _RssPeak:
    """Peak process RSS above the RSS at ``start()``, sampled by a background thread every ``interval`` seconds.

    The thread takes the GIL at every sample, which slows CPU steps a little (about 10% for the lab model), both
    trainers' alike.
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self._thread = None

    def start(self) -> None:
        _release_free_memory()
        self._start = self._peak = _rss_bytes()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stopping.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def stop(self) -> int:
        if self._thread is None:
            return 0
        self._stopping.set()
        self._thread.join()
        self._thread = None
        return max(self._peak, _rss_bytes()) - self._start


class _StepMeter(TrainerCallback):
    """Times each optimizer step of a round, tracks the round's peak memory, and stops ``train()`` after the round."""

    def __init__(self):
        self.step_seconds: list[float] = []
        self.peak_bytes = 0
        # Input tokens and seconds of the measured steps that follow another step of the same round: the tokens of
        # a step are the growth of the Trainer's count (``include_num_input_tokens_seen``) from one step end to the
        # next, whenever within the step the Trainer counts them.
        self.counted_tokens, self.counted_seconds = 0, 0.0
        self._memory = _CudaPeak() if torch.cuda.is_available() else _RssPeak()

    def start_round(self, steps: int, skip: int) -> None:
        """Measure the next ``steps`` optimizer steps after ``skip`` unmeasured warm-up steps, then stop training."""
        self._steps, self._skip, self._done = steps, skip, 0
        self._tokens_at_last_end = None
        self.round_complete = False

    def on_step_begin(self, args, state, control, **kwargs):
        _synchronize()
        if self._done == self._skip:
            self._memory.start()
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        seconds = time.perf_counter() - self._started
        self._done += 1
        if self._done > self._skip:
            self.step_seconds.append(seconds)
            if self._tokens_at_last_end is not None:
                self.counted_tokens += state.num_input_tokens_seen - self._tokens_at_last_end
                self.counted_seconds += seconds
        self._tokens_at_last_end = state.num_input_tokens_seen
        if self._done == self._skip + self._steps:
            self.peak_bytes = max(self.peak_bytes, self._memory.stop())
            self.round_complete = True
            control.should_training_stop = True

    def abort(self) -> None:
        """Stop a memory sampler left running by a round that ended early."""
        if isinstance(self._memory, _RssPeak):
            self._memory.stop()


def _summary(trainer: Trainer, meter: _StepMeter) -> dict:
    step_ms = [seconds * 1000 for seconds in meter.step_seconds]
    return {
        "trainer": type(trainer).__name__,
        "step_ms": step_ms,
        "median_ms": statistics.median(step_ms),
        "peak_mib": meter.peak_bytes / MIB,
        # 0 when the trainer's batches carry no input_ids to count (GRPO's prompt/completion ids, for one).
        "tokens_per_s": meter.counted_tokens / meter.counted_seconds if meter.counted_seconds else 0.0,
    }


def _ratio(candidate: float, baseline: float) -> float:
    return candidate / baseline if baseline > 0 else float("nan")


def compare(
    make_candidate: Callable[[], Trainer],
    make_baseline: Callable[[], Trainer],
    *,
    rounds: int = 5,
    steps_per_round: int = 10,
    warmup_steps: int = 5,
) -> dict:
    """Run both trainers in interleaved rounds and compare their optimizer steps.

    Each ``make_*`` returns a fresh, ready-to-train Trainer whose ``args.max_steps`` is at least
    ``warmup_steps + steps_per_round`` (each round is one ``train()`` call). Every round runs ``steps_per_round``
    optimizer steps of each trainer, the two in alternating order; the first round first runs ``warmup_steps``
    unmeasured steps of each.

    Returns ``{"candidate": ..., "baseline": ..., "time_ratio": ..., "mem_ratio": ..., "steps": ...}``: per trainer
    its class name, ``step_ms`` (every measured step), ``median_ms`` and ``peak_mib``; the ratios are
    candidate / baseline of ``median_ms`` and of ``peak_mib`` (NaN when the baseline's peak is 0).
    """
    if rounds < 1 or steps_per_round < 1 or warmup_steps < 0:
        raise ValueError("rounds and steps_per_round must be at least 1, warmup_steps at least 0.")
    runs = []
    for make in (make_candidate, make_baseline):
        trainer = make()
        if trainer.args.max_steps < warmup_steps + steps_per_round:
            raise ValueError(
                f"{type(trainer).__name__} has max_steps={trainer.args.max_steps}; each round is one train() call, "
                f"so it needs max_steps >= warmup_steps + steps_per_round = {warmup_steps + steps_per_round}."
            )
        # The harness reports; per-round train() summaries printed by the trainer would only interleave with it.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        meter = _StepMeter()
        trainer.add_callback(meter)
        runs.append((trainer, meter))

    for round_index in range(rounds):
        # Alternate which trainer goes first, so a drift in machine speed within a round cancels out over rounds.
        for trainer, meter in runs if round_index % 2 == 0 else runs[::-1]:
            meter.start_round(steps_per_round, skip=warmup_steps if round_index == 0 else 0)
            try:
                trainer.train()
            finally:
                meter.abort()
            if not meter.round_complete:
                raise RuntimeError(f"{type(trainer).__name__} stopped before the end of round {round_index + 1}.")

    candidate, baseline = (_summary(trainer, meter) for trainer, meter in runs)
    return {
        "candidate": candidate,
        "baseline": baseline,
        "steps": len(candidate["step_ms"]),
        "time_ratio": _ratio(candidate["median_ms"], baseline["median_ms"]),
        "mem_ratio": _ratio(candidate["peak_mib"], baseline["peak_mib"]),
    }
