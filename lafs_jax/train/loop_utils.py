"""Small pieces every training loop uses: metric writing, progress / ETA, divergence and SIGTERM guards.

- `MetricWriter`: TensorBoard event files (tensorboardX `SummaryWriter`) plus a `metrics.jsonl`
  (one JSON object per `write_scalars` call) in the workdir; only process 0 writes. A resumed run
  passes `resume_step`: rows (and TensorBoard events) past it, written by the run that stopped, go.
- `StepTimer` and `Progress`: step time, images/s and ETA from wall-clock windows, logged every K
  steps. JAX dispatches asynchronously, so a window's time is only exact once the loop has pulled a
  value of its last step to the host (e.g. the loss for `check_finite`); over many steps the
  dispatch queue (a few steps deep) makes no difference.
- `check_finite`: raises `NonFiniteError` naming the step and the metric. `DivergenceMonitor` adds
  the "exploding" tests on the loss and the parameter norm (see `divergence_config`) and raises
  `DivergenceError`.
- `preemption_guard`: whether the loop must save a checkpoint and exit cleanly (`should_stop(step)`):
  one process installs a SIGTERM handler; several processes use JAX's preemption sync point
  through orbax, so every process stops and saves at the same step. Batches fetched with
  `next_batch` make a stalled input pipeline interruptible: SIGTERM during a wait gives the
  pipeline `stall_seconds` to deliver, then raises `InputStalledError` in the main thread;
  `exit_on_input_stall` (main.py) then ends the process, whose reader threads are stuck.
Thin glue over tensorboardX (event files without TensorFlow or torch), absl logging and
`signal`. Libraries that do parts of this exist: clu (google/CommonLoopUtils) has `metric_writers`
(TensorBoard through TensorFlow's or torch's summary writer, logging / multi / async writers) and
`periodic_actions.ReportProgress` (steps/s, ETA); multi-host preemption is
`jax.experimental.multihost_utils.reached_preemption_sync_point` and orbax-checkpoint's
`PreemptionCheckpointingPolicy`. clu is not a dependency here because its TensorBoard writers need
TensorFlow or torch, and the single-host SIGTERM flag needs neither.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from lafs_jax.config import check

METRICS_FILE = "metrics.jsonl"


def _scalar(name: str, value: Any) -> float:
    """float(value) for Python / numpy / jax scalars; a ValueError naming `name` otherwise."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric '{name}' is not a scalar: shape {arr.shape}")
    return float(arr.reshape(()))


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch whenever it is
    installed (2-7 s of a training process's start-up), only to accept torch tensors; we write floats.
    A None in sys.modules makes its `import torch` raise the ImportError it handles; torch itself stays
    importable afterwards. Where torch is already imported, nothing changes."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter  # optional heavy dependency: imported where used
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Scalars to TensorBoard event files and `<logdir>/metrics.jsonl`, on process 0 only.

    Each `write_scalars(step, {name: value})` adds one event per scalar and one JSON line
    `{"step": step, name: value, ...}`. Values may be Python, numpy or (replicated) jax scalars.

    resume_step: the step a resumed run restarts from. The rows of metrics.jsonl with a larger
    step (written after that checkpoint by the run that stopped, and about to be written again)
    are dropped, as is a torn last line; TensorBoard is told to purge its events past it
    (`purge_step`). None: append to whatever is there.
    """

    def __init__(self, logdir: str, enabled: bool | None = None, resume_step: int | None = None):
        self.logdir = logdir
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self._tb = None
        self._jsonl = None
        if self.enabled:
            SummaryWriter = _summary_writer_class()  # noqa: N806  (a class; process > 0 never needs it)
            os.makedirs(logdir, exist_ok=True)
            path = os.path.join(logdir, METRICS_FILE)
            if resume_step is not None and os.path.exists(path):
                _drop_rows_after(path, int(resume_step))
            self._tb = SummaryWriter(logdir=logdir, purge_step=None if resume_step is None else int(resume_step) + 1)
            self._jsonl = open(path, "a")

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


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrite the jsonl file `path` without rows whose step is > `step` (and without a torn line)."""
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: nothing to keep
                dropped += 1
                continue
            if int(row.get("step", 0)) > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        logging.info("%s: dropped %d rows past step %d (the run resumes from there)", path, dropped, step)


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
        The rates are {} when no step has been timed since the last `reset` (no NaN rates are logged).

        extra: scalars appended to the line, e.g. {'loss': 1.23}.
        """
        step = int(step)
        if step % self.every and step != self.total_steps:
            return None
        seconds_per_step = self.timer.lap(step)
        parts = [f"{self.name} step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%)"]
        rates: dict = {}
        if math.isfinite(seconds_per_step):
            eta = seconds_per_step * (self.total_steps - step)
            rates = {"step_time_ms": 1e3 * seconds_per_step, "eta_seconds": eta}
            if self.batch_size:
                rates["img_per_sec"] = self.batch_size / seconds_per_step
                parts.append(f"{rates['img_per_sec']:.1f} img/s")
            parts.append(f"{rates['step_time_ms']:.1f} ms/step")
            parts.append(f"ETA {format_eta(eta)}")
        else:  # an empty window (the step of the last reset, e.g. the compiling first step): no rates yet
            parts.append("timing from the next step")
        for k, v in (extra or {}).items():
            parts.append(f"{k} {_scalar(k, v):.4g}")
        self.last_line = " | ".join(parts)
        self._log(self.last_line)
        return rates


class DivergenceError(FloatingPointError):
    """Training diverged: a checked metric is non-finite or exploding; the message names the step."""


class NonFiniteError(DivergenceError):
    """A metric (typically the loss) is NaN or infinite; the message names the step and the metric."""


def check_finite(step: int, metrics: Mapping[str, Any], keys: tuple[str, ...] | None = None) -> None:
    """Raise NonFiniteError if any of `metrics[keys]` (default: all) has a NaN or inf value.

    Pulling the values to the host waits for the step that produced them. The loops call it through
    `DivergenceMonitor.check`, before saving and on the step after every save (to confirm it).
    """
    for name in (keys if keys is not None else metrics.keys()):
        if name not in metrics:
            raise KeyError(f"check_finite: metric '{name}' is not among {sorted(metrics)}")
        arr = np.asarray(metrics[name], dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            bad = "nan" if np.isnan(arr).any() else "inf"
            where = "" if arr.ndim == 0 else f" ({int((~np.isfinite(arr)).sum())} of {arr.size} entries)"
            raise NonFiniteError(f"step {int(step)}: metric '{name}' is {bad}{where}; stopping the run")


def divergence_config() -> ml_collections.ConfigDict:
    """What counts as divergence (recipes embed it as `config.divergence`); see DivergenceMonitor."""
    c = ml_collections.ConfigDict()
    # A checked loss above loss_factor x the median of the last `window` checked losses is
    # "exploding" (0 = only NaN / inf count). Losses that sit near 0 and jump 10x would trip it:
    # raise the factor (or set 0) for such a run.
    c.loss_factor = 10.0
    # Same test on the global L2 norm of the trainable parameters after the update (0 = only NaN /
    # inf): AdamW moves weights by about lr per step, so a 10x jump means a blown-up update.
    c.param_norm_factor = 10.0
    c.window = 20  # checked values the median is taken over
    c.min_history = 3  # checked values needed before the factor tests apply
    return c


def validate_divergence_config(cfg: ml_collections.ConfigDict, prefix: str = "divergence") -> None:
    for key in ("loss_factor", "param_norm_factor"):
        v = cfg[key]
        check(isinstance(v, (int, float)) and (v == 0 or v > 1), f"{prefix}.{key}", v, "0 (off) or a number > 1")
    for key in ("window", "min_history"):
        v = cfg[key]
        check(isinstance(v, int) and v >= 1, f"{prefix}.{key}", v, "an int >= 1")


class DivergenceMonitor:
    """Decides, for each checked step, whether training diverged.

    `check_loss(step, metrics)`: the step's `loss` was computed from the state *before* its update,
    i.e. from the checkpoint of step - 1; it diverges when NaN / inf or more than `loss_factor` x the
    median of the last `window` checked losses (once `min_history` exist). A good loss at step t
    confirms the checkpoint of step t - 1; a bad one condemns it.
    `check_params(step, metrics)`: `param_norm`, the global L2 norm of the trainable parameters
    *after* the update (the state the step hands on), the same tests with `param_norm_factor`; a
    bad one condemns the state of step t (its checkpoint is never written: the loops check before
    they save). The loops check lazily (log, save and eval steps, and the step after every save),
    so the medians are over checked steps.

        monitor = DivergenceMonitor(config.divergence)
        loss = monitor.check_loss(step, metrics)    # raises DivergenceError (NonFiniteError: NaN / inf)
        ... ckpt.confirm(step - 1) if it was saved ...
        monitor.check_params(step, metrics)
    """

    def __init__(self, cfg: ml_collections.ConfigDict | None = None):
        cfg = cfg if cfg is not None else divergence_config()
        validate_divergence_config(cfg)
        self.factors = {"loss": float(cfg.loss_factor), "param_norm": float(cfg.param_norm_factor)}
        self.window, self.min_history = int(cfg.window), int(cfg.min_history)
        self.history: dict[str, list[float]] = {"loss": [], "param_norm": []}

    def _check(self, step: int, metrics: Mapping[str, Any], key: str) -> float:
        check_finite(step, metrics, keys=(key,))
        value = float(np.asarray(metrics[key]))
        past, factor = self.history[key], self.factors[key]
        if factor and len(past) >= self.min_history:
            median = statistics.median(past)
            if median > 0 and value > factor * median:
                raise DivergenceError(
                    f"step {int(step)}: metric '{key}' is {value:.4g}, more than divergence.{key}_factor={factor:g} x "
                    f"the median {median:.4g} of the last {len(past)} checked values; stopping the run")
        past.append(value)
        del past[:-self.window]
        return value

    def check_loss(self, step: int, metrics: Mapping[str, Any]) -> float:
        """The step's loss as a float, or DivergenceError (see the class docstring)."""
        return self._check(step, metrics, "loss")

    def check_params(self, step: int, metrics: Mapping[str, Any]) -> float | None:
        """The step's parameter norm as a float (None if the step reports none), or DivergenceError."""
        return self._check(step, metrics, "param_norm") if "param_norm" in metrics else None

    def check(self, step: int, metrics: Mapping[str, Any]) -> float:
        """check_loss then check_params; the loss."""
        loss = self.check_loss(step, metrics)
        self.check_params(step, metrics)
        return loss


class InputStalledError(RuntimeError):
    """SIGTERM came while the loop waited for a batch, and none came within the guard's stall_seconds."""


class _InputWait:
    """Whether the main thread is inside `next_batch` (since: monotonic seconds) and which wait it is."""

    def __init__(self):
        self.since: float | None = None
        self.count = 0


_INPUT_WAIT = _InputWait()
_ACTIVE_GUARDS: list["PreemptionGuard"] = []


def next_batch(iterator: Iterator[Any]) -> Any:
    """next(iterator), the way the loops fetch batches: interruptible by SIGTERM if the pipeline stalls.

    Under `preemption_guard`, a SIGTERM that arrives while this waits (or before it starts) gives the
    pipeline the guard's `stall_seconds` to deliver; then InputStalledError is raised here, in the
    main thread, naming the wait. Outside a guard it is plain next().
    """
    if threading.current_thread() is not threading.main_thread():
        return next(iterator)
    wait = _INPUT_WAIT
    wait.count += 1
    wait.since = time.monotonic()
    try:
        if _ACTIVE_GUARDS and _ACTIVE_GUARDS[-1].requested:
            _ACTIVE_GUARDS[-1].arm(wait.count, _ACTIVE_GUARDS[-1].stall_seconds)
        return next(iterator)
    finally:
        wait.since = None


class PreemptionGuard:
    """Whether a training loop must save a checkpoint and stop because the job is being preempted.

    One process: a handler of SIGTERM (installed by `preemption_guard`) sets `requested`, which
    `should_stop` returns; a signal that arrives while the loop waits for a batch (`next_batch`) gives
    the pipeline `stall_seconds` to deliver, then raises InputStalledError in the main thread.
    Several processes (jax.distributed): no handler is installed -- JAX's coordination service
    listens for SIGTERM on every process itself, and a Python handler would replace its own -- and
    `should_stop(step)` is orbax's `reached_preemption(step)` (what `CheckpointManager.reached_preemption`
    and orbax's `PreemptionCheckpointingPolicy` use): JAX's preemption sync point, true at one step
    that every process reaches after any of them got the notice, so all processes save that same step.
    """

    def __init__(self, stall_seconds: float = 5.0, multiprocess: bool | None = None):
        self.multiprocess = jax.process_count() > 1 if multiprocess is None else bool(multiprocess)
        self.requested = False
        self.signal_number: int | None = None
        self.stall_seconds = float(stall_seconds)
        self.active = False
        self._timers: list[threading.Timer] = []

    def _handle(self, signum, frame) -> None:
        del frame
        first = not self.requested
        self.requested = True
        self.signal_number = signum
        wait = _INPUT_WAIT
        if wait.since is None:
            if first:
                logging.warning("received signal %d: the loop will save a checkpoint and stop", signum)
            return
        waited = time.monotonic() - wait.since
        if waited >= self.stall_seconds:
            raise InputStalledError(
                f"signal {signum}: the input pipeline has delivered no batch for {waited:.1f} s (more than "
                f"stall_seconds={self.stall_seconds:g}); stopping without saving this step: the run resumes from "
                f"its last confirmed checkpoint")
        if first:
            logging.warning("received signal %d while waiting for a batch: the loop will save a checkpoint and stop "
                            "once it comes, or stop without saving if none comes within %.1f s", signum,
                            self.stall_seconds - waited)
        self.arm(wait.count, self.stall_seconds - waited)

    def arm(self, wait_count: int, delay: float) -> None:
        """In `delay` seconds, if wait number `wait_count` is still going on, deliver the signal again to
        the main thread (whose handler then raises InputStalledError)."""
        main = threading.main_thread().ident

        def fire():
            if self.active and _INPUT_WAIT.since is not None and _INPUT_WAIT.count == wait_count:
                signal.pthread_kill(main, self.signal_number or signal.SIGTERM)

        timer = threading.Timer(max(delay, 0.0) + 0.01, fire)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def should_stop(self, step: int) -> bool:
        """Whether to save `step` and stop. With several processes every process must call it at every
        step, with the same steps (the sync point is agreed on the steps the processes report)."""
        if self.multiprocess:
            return bool(ocp.multihost.reached_preemption(int(step)))
        return self.requested


@contextlib.contextmanager
def preemption_guard(signals: tuple[int, ...] = (signal.SIGTERM,),
                     stall_seconds: float = 5.0) -> Iterator[PreemptionGuard]:
    """A `PreemptionGuard`; one process: a handler for `signals` sets `guard.requested` (the old
    handlers are restored on exit); several processes: JAX handles the signal (see PreemptionGuard).

        with preemption_guard() as guard:
            for step in ...:
                batch = next_batch(it)
                ...
                if guard.should_stop(step):   # every step, on every process
                    ckpt.save(step, state, it, force=True); break

    stall_seconds: how long a batch may still take after the signal (see `next_batch`) before the
    wait is abandoned with InputStalledError. Must be entered from the main thread (Python delivers
    signals there only).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("preemption_guard() must be entered from the main thread (signal handlers can only "
                           "be installed there)")
    guard = PreemptionGuard(stall_seconds)
    previous = {} if guard.multiprocess else {s: signal.signal(s, guard._handle) for s in signals}
    guard.active = True
    _ACTIVE_GUARDS.append(guard)
    try:
        yield guard
    finally:
        guard.active = False
        _ACTIVE_GUARDS.remove(guard)
        for timer in guard._timers:
            timer.cancel()
        for s, handler in previous.items():
            signal.signal(s, handler)


# Exit status after InputStalledError: 128 + SIGTERM, the shell's "terminated by SIGTERM".
EXIT_INPUT_STALLED = 128 + signal.SIGTERM
_T = TypeVar("_T")


def exit_on_input_stall(fn: Callable[[], _T]) -> _T:
    """fn(); on InputStalledError (after fn's own cleanup: checkpoints closed) log it and end the process
    at once with status EXIT_INPUT_STALLED. A normal exit would wait forever for the pipeline's
    reader threads, which are stuck in the read that stalled."""
    try:
        return fn()
    except InputStalledError as e:
        logging.error("%s", e)
        logging.flush()
        sys.stdout.flush()
        sys.stderr.write(f"FATAL {e}\n")
        sys.stderr.flush()
        os._exit(EXIT_INPUT_STALLED)
