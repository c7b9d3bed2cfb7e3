"""Small pieces every training loop uses: metric writing, progress / ETA, NaN guard, SIGTERM guard.

- `MetricWriter`: TensorBoard event files (tensorboardX `SummaryWriter`) plus a `metrics.jsonl`
  (one JSON object per `write_scalars` call) in the workdir; only process 0 writes.
- `StepTimer` and `Progress`: step time, images/s and ETA from wall-clock windows, logged every K
  steps. JAX dispatches asynchronously, so a window's time is only exact once the loop has pulled a
  value of its last step to the host (e.g. the loss for `check_finite`); over many steps the
  dispatch queue (a few steps deep) makes no difference.
- `check_finite`: raises `NonFiniteError` naming the step and the metric.
- `preemption_guard`: whether the loop must save a checkpoint and exit cleanly (`should_stop(step)`):
  one process installs a SIGTERM handler; several processes use JAX's preemption sync point
  through orbax, so every process stops and saves at the same step.
Written by hand (thin glue over absl logging, tensorboardX, `signal`); no kept library does these.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import signal
import threading
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

METRICS_FILE = "metrics.jsonl"


def _scalar(name: str, value: Any) -> float:
    """float(value) for Python / numpy / jax scalars; a ValueError naming `name` otherwise."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric '{name}' is not a scalar: shape {arr.shape}")
    return float(arr.reshape(()))


class MetricWriter:
    """Scalars to TensorBoard event files and `<logdir>/metrics.jsonl`, on process 0 only.

    Each `write_scalars(step, {name: value})` adds one event per scalar and one JSON line
    `{"step": step, name: value, ...}`. Values may be Python, numpy or (replicated) jax scalars.
    """

    def __init__(self, logdir: str, enabled: bool | None = None):
        self.logdir = logdir
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # imported here: process > 0 never needs it

            os.makedirs(logdir, exist_ok=True)
            self._tb = SummaryWriter(logdir=logdir)
            self._jsonl = open(os.path.join(logdir, METRICS_FILE), "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled or not scalars:
            return
        values = {str(k): _scalar(str(k), v) for k, v in scalars.items()}
        for name, value in values.items():
            self._tb.add_scalar(name, value, global_step=int(step))
        # NaN / inf are written as JSON's NaN / Infinity tokens (Python's json reads them back).
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.close()
            self._jsonl.close()
            self._tb = self._jsonl = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(logdir: str) -> list[dict]:
    """The JSON lines of `<logdir>/metrics.jsonl`, in order (for tests, plots and resumption checks)."""
    with open(os.path.join(logdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


class StepTimer:
    """Wall-clock seconds per step over windows between `lap` calls.

        timer = StepTimer(); timer.start(first_step)
        ... every K steps: seconds_per_step = timer.lap(step)
    """

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._step: int | None = None
        self._time = 0.0
        self.total_seconds = 0.0  # sum over all laps
        self.total_steps = 0

    def start(self, step: int) -> None:
        """Begin a window at `step` (e.g. after the first, compiling, step)."""
        self._step, self._time = int(step), self._clock()

    def lap(self, step: int) -> float:
        """Seconds per step since the last start/lap; starts the next window. NaN for an empty window."""
        now = self._clock()
        if self._step is None:
            self.start(step)
            return math.nan
        steps = int(step) - self._step
        seconds = now - self._time
        self._step, self._time = int(step), now
        if steps <= 0:
            return math.nan
        self.total_seconds += seconds
        self.total_steps += steps
        return seconds / steps


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


class Progress:
    """A progress line every `every` steps: step/total, images/s, ms/step, ETA.

        progress = Progress(total_steps, every=50, batch_size=global_batch, start_step=step)
        ... after each step: rates = progress.update(step)   # a dict when it logged, else None

    The returned dict {'img_per_sec', 'step_time_ms', 'eta_seconds'} is ready for
    `MetricWriter.write_scalars`. The first window after `start_step` includes compilation; call
    `reset(step)` after the first step to leave it out.
    """

    def __init__(self, total_steps: int, every: int = 100, batch_size: int | None = None, start_step: int = 0,
                 name: str = "train", clock=time.perf_counter, log_fn=logging.info):
        if every < 1:
            raise ValueError(f"Progress(every={every}): must be >= 1")
        self.total_steps = int(total_steps)
        self.every = int(every)
        self.batch_size = batch_size
        self.name = name
        self._log = log_fn
        self.timer = StepTimer(clock)
        self.timer.start(start_step)
        self.last_line = ""

    def reset(self, step: int) -> None:
        self.timer.start(step)

    def update(self, step: int, extra: Mapping[str, Any] | None = None) -> dict | None:
        """Log and return the rates if `step` is a multiple of `every` or the last step; else None.

        extra: scalars appended to the line, e.g. {'loss': 1.23}.
        """
        step = int(step)
        if step % self.every and step != self.total_steps:
            return None
        seconds_per_step = self.timer.lap(step)
        eta = seconds_per_step * (self.total_steps - step)
        rates = {"step_time_ms": 1e3 * seconds_per_step, "eta_seconds": eta}
        parts = [f"{self.name} step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%)"]
        if self.batch_size:
            rates["img_per_sec"] = self.batch_size / seconds_per_step
            parts.append(f"{rates['img_per_sec']:.1f} img/s")
        parts.append(f"{rates['step_time_ms']:.1f} ms/step")
        parts.append(f"ETA {format_eta(eta)}")
        for k, v in (extra or {}).items():
            parts.append(f"{k} {_scalar(k, v):.4g}")
        self.last_line = " | ".join(parts)
        self._log(self.last_line)
        return rates


class NonFiniteError(FloatingPointError):
    """A metric (typically the loss) is NaN or infinite; the message names the step and the metric."""


def check_finite(step: int, metrics: Mapping[str, Any], keys: tuple[str, ...] | None = None) -> None:
    """Raise NonFiniteError if any of `metrics[keys]` (default: all) has a NaN or inf value.

    Pulling the values to the host waits for the step that produced them. The loop should call
    this before saving a checkpoint, so the last checkpoint on disk stays the last good one.
    """
    for name in (keys if keys is not None else metrics.keys()):
        if name not in metrics:
            raise KeyError(f"check_finite: metric '{name}' is not among {sorted(metrics)}")
        arr = np.asarray(metrics[name], dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            bad = "nan" if np.isnan(arr).any() else "inf"
            where = "" if arr.ndim == 0 else f" ({int((~np.isfinite(arr)).sum())} of {arr.size} entries)"
            raise NonFiniteError(f"step {int(step)}: metric '{name}' is {bad}{where}; stopping the run "
                                 f"(the last checkpoint saved before this step is kept)")


class PreemptionGuard:
    """Whether a training loop must save a checkpoint and stop because the job is being preempted.

    One process: a handler of SIGTERM (installed by `preemption_guard`) sets `requested`, which
    `should_stop` returns. Several processes (jax.distributed): no handler is installed -- JAX's
    coordination service listens for SIGTERM on every process itself, and a Python handler would
    replace its own -- and `should_stop(step)` is orbax's `reached_preemption(step)` (what
    `CheckpointManager.reached_preemption` and orbax's `PreemptionCheckpointingPolicy` use): JAX's
    preemption sync point, true at one step that every process reaches after any of them got the
    notice, so all processes save that same step.
    """

    def __init__(self, multiprocess: bool | None = None):
        self.multiprocess = jax.process_count() > 1 if multiprocess is None else bool(multiprocess)
        self.requested = False
        self.signal_number: int | None = None

    def _handle(self, signum, frame) -> None:
        del frame
        self.requested = True
        self.signal_number = signum
        logging.warning("received signal %d: the loop will save a checkpoint and stop", signum)

    def should_stop(self, step: int) -> bool:
        """Whether to save `step` and stop. With several processes every process must call it at every
        step, with the same steps (the sync point is agreed on the steps the processes report)."""
        if self.multiprocess:
            return bool(ocp.multihost.reached_preemption(int(step)))
        return self.requested


@contextlib.contextmanager
def preemption_guard(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[PreemptionGuard]:
    """A `PreemptionGuard`; one process: a handler for `signals` sets `guard.requested` (the old
    handlers are restored on exit); several processes: JAX handles the signal (see PreemptionGuard).

        with preemption_guard() as guard:
            for step in ...:
                ...
                if guard.should_stop(step):   # every step, on every process
                    ckpt.save(step, state, it, force=True); break

    Must be entered from the main thread (Python delivers signals there only).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("preemption_guard() must be entered from the main thread (signal handlers can only "
                           "be installed there)")
    guard = PreemptionGuard()
    previous = {} if guard.multiprocess else {s: signal.signal(s, guard._handle) for s in signals}
    try:
        yield guard
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
