"""Metric writer (TensorBoard events + jsonl), progress / ETA, step timer, NaN guard, SIGTERM guard."""
import glob
import math
import os
import signal
import struct
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from lafs_jax.train import loop_utils as lu


def read_event_scalars(logdir):
    """{tag: [(step, value)]} parsed from the TFRecord event files, checking each record's CRCs."""
    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            body = data[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
            pos += 16 + length
            event = event_pb2.Event.FromString(body)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_metric_writer_event_file_and_jsonl(tmp_path):
    logdir = str(tmp_path / "w")
    with lu.MetricWriter(logdir) as w:
        w.write_scalars(10, {"loss": jnp.float32(2.5), "lr": 1e-3, "img_per_sec": np.float64(123.0)})
        w.write_scalars(20, {"loss": np.array([1.25])})
    scalars = read_event_scalars(logdir)
    assert scalars["loss"] == [(10, 2.5), (20, 1.25)]
    assert scalars["lr"][0][0] == 10 and scalars["lr"][0][1] == pytest.approx(1e-3)
    assert lu.read_metrics(logdir) == [{"step": 10, "loss": 2.5, "lr": 1e-3, "img_per_sec": 123.0},
                                       {"step": 20, "loss": 1.25}]
    # appending on restart keeps the earlier lines
    with lu.MetricWriter(logdir) as w:
        w.write_scalars(30, {"loss": float("nan")})
    rows = lu.read_metrics(logdir)
    assert [r["step"] for r in rows] == [10, 20, 30] and math.isnan(rows[-1]["loss"])


def test_metric_writer_disabled_writes_nothing_and_rejects_non_scalars(tmp_path):
    with lu.MetricWriter(str(tmp_path / "off"), enabled=False) as w:
        w.write_scalars(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "off")
    with lu.MetricWriter(str(tmp_path / "on")) as w:
        with pytest.raises(ValueError, match="'emb'"):
            w.write_scalars(1, {"emb": np.zeros(3)})


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_step_timer():
    clock = FakeClock()
    timer = lu.StepTimer(clock)
    assert math.isnan(timer.lap(0))  # not started: starts now
    clock.t += 2.0
    assert timer.lap(4) == pytest.approx(0.5)
    clock.t += 3.0
    assert timer.lap(10) == pytest.approx(0.5)
    assert (timer.total_steps, timer.total_seconds) == (10, pytest.approx(5.0))
    assert math.isnan(timer.lap(10))  # empty window


def test_progress_rates_eta_and_line():
    clock, lines = FakeClock(), []
    progress = lu.Progress(total_steps=1000, every=100, batch_size=256, start_step=0, clock=clock, log_fn=lines.append)
    assert progress.update(50) is None and lines == []
    clock.t += 20.0  # 100 steps in 20 s
    rates = progress.update(100, {"loss": 3.14159})
    assert rates["step_time_ms"] == pytest.approx(200.0)
    assert rates["img_per_sec"] == pytest.approx(256 * 100 / 20.0)
    assert rates["eta_seconds"] == pytest.approx(900 * 0.2)
    assert lines[-1] == "train step 100/1000 (10.0%) | 1280.0 img/s | 200.0 ms/step | ETA 0:03:00 | loss 3.142"


def test_progress_logs_the_final_step_and_reset_drops_compilation():
    clock, lines = FakeClock(), []
    progress = lu.Progress(total_steps=150, every=100, clock=clock, log_fn=lines.append)
    clock.t += 60.0  # step 1 compiles
    progress.reset(1)
    clock.t += 9.9  # 99 steps at 0.1 s
    assert progress.update(100)["step_time_ms"] == pytest.approx(100.0)
    clock.t += 5.0
    rates = progress.update(150)  # not a multiple of `every`, but the last step
    assert rates["step_time_ms"] == pytest.approx(100.0) and rates["eta_seconds"] == 0.0
    assert "img_per_sec" not in rates  # no batch size given
    assert lines[-1] == "train step 150/150 (100.0%) | 100.0 ms/step | ETA 0:00:00"


def test_format_eta():
    assert lu.format_eta(3725.4) == "1:02:05"
    assert lu.format_eta(float("nan")) == "?"


@pytest.mark.parametrize("bad,word", [(float("nan"), "nan"), (float("inf"), "inf"), (-np.inf, "inf")])
def test_check_finite_names_step_and_metric(bad, word):
    with pytest.raises(lu.NonFiniteError, match=rf"step 1234: metric 'loss' is {word}"):
        lu.check_finite(1234, {"loss": jnp.float32(bad), "acc": 0.5})
    assert issubclass(lu.NonFiniteError, FloatingPointError)


def test_check_finite_arrays_keys_and_passing():
    lu.check_finite(3, {"loss": jnp.float32(1.0), "grad_norm": np.ones(4)})
    with pytest.raises(lu.NonFiniteError, match=r"step 3: metric 'per_view' is nan \(1 of 4 entries\)"):
        lu.check_finite(3, {"per_view": np.array([1.0, np.nan, 2.0, 3.0])})
    lu.check_finite(3, {"loss": 1.0, "other": float("nan")}, keys=("loss",))  # only the listed keys
    with pytest.raises(KeyError, match="'loss'"):
        lu.check_finite(3, {"l": 1.0}, keys=("loss",))


def test_preemption_guard_sigterm_to_self_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with lu.preemption_guard() as guard:
        assert not guard.multiprocess and not guard.requested and not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs at the next bytecode boundary of the main thread
            if guard.requested:
                break
        assert guard.requested and guard.signal_number == signal.SIGTERM
        assert guard.should_stop(2)  # single process: the local flag
    assert signal.getsignal(signal.SIGTERM) == before


def test_preemption_guard_needs_main_thread():
    errors = []

    def enter():
        try:
            with lu.preemption_guard():
                pass
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]
