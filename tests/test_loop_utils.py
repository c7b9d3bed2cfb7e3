"""Metric writer (TensorBoard events + jsonl), progress / ETA, step timer, NaN guard, SIGTERM guard."""
import glob
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
from cpu_env import cpu_env
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from lafs_jax.config import ConfigError
from lafs_jax.train import loop_utils as lu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_progress_logs_no_rates_for_an_empty_window():
    clock, lines = FakeClock(), []
    progress = lu.Progress(total_steps=10, every=1, batch_size=8, clock=clock, log_fn=lines.append)
    clock.t += 30.0  # step 1 compiles
    progress.reset(1)
    assert progress.update(1, {"loss": 2.0}) == {}
    assert lines[-1] == "train step 1/10 (10.0%) | timing from the next step | loss 2"
    clock.t += 0.5
    assert progress.update(2)["step_time_ms"] == pytest.approx(500.0)


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


def read_session_starts(logdir):
    """Steps of the SessionLog START events (TensorBoard purges the events at and after each)."""
    starts = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data, pos = open(path, "rb").read(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                starts.append(event.step)
    return starts


def test_metric_writer_resume_drops_rows_past_the_restored_step(tmp_path):
    logdir = str(tmp_path / "w")
    with lu.MetricWriter(logdir) as w:
        for s in range(1, 6):
            w.write_scalars(s, {"loss": float(s)})
    with open(os.path.join(logdir, lu.METRICS_FILE), "a") as f:
        f.write('{"step": 6, "lo')  # the line a kill -9 cut short
    with lu.MetricWriter(logdir, resume_step=3) as w:  # the relaunch restored the checkpoint of step 3
        w.write_scalars(4, {"loss": 40.0})
    rows = lu.read_metrics(logdir)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert read_session_starts(logdir) == [4]  # TensorBoard hides the first run's events from step 4 on


def test_divergence_monitor_non_finite_exploding_and_history():
    monitor = lu.DivergenceMonitor()  # loss_factor 10, param_norm_factor 10, window 20, min_history 3
    with pytest.raises(lu.NonFiniteError, match=r"step 5: metric 'loss' is nan"):
        monitor.check_loss(5, {"loss": np.float32(np.nan)})
    with pytest.raises(lu.NonFiniteError, match=r"step 5: metric 'param_norm' is inf"):
        monitor.check_params(5, {"loss": 1.0, "param_norm": np.float32(np.inf)})
    assert monitor.check(1, {"loss": 30.0, "param_norm": 40.0}) == 30.0  # too little history for the factors
    for s, loss in ((2, 2.0), (3, 2.2), (4, 1.8)):
        monitor.check(s, {"loss": loss, "param_norm": 41.0})
    assert monitor.check_params(5, {"param_norm": 300.0}) == 300.0  # 7.3x the median 41: fine
    with pytest.raises(lu.DivergenceError, match=r"step 6: metric 'loss' is 25\.1, more than divergence\.loss_factor"
                                                 r"=10 x the median 2\.1 of the last 4 checked values"):
        monitor.check_loss(6, {"loss": 25.1})
    with pytest.raises(lu.DivergenceError, match=r"metric 'param_norm' is 1e\+20"):
        monitor.check_params(6, {"param_norm": 1e20})
    off = lu.divergence_config()
    off.loss_factor = 0.0
    relaxed = lu.DivergenceMonitor(off)
    for s in range(1, 5):
        relaxed.check_loss(s, {"loss": 1.0})
    assert relaxed.check_loss(5, {"loss": 1e6}) == 1e6  # factor test off: only NaN / inf stop the run
    bad = lu.divergence_config()
    bad.loss_factor = 0.5
    with pytest.raises(ConfigError, match=r"config\.divergence\.loss_factor=0\.5"):
        lu.DivergenceMonitor(bad)
    assert issubclass(lu.NonFiniteError, lu.DivergenceError)


class _SlowSource:
    """A healthy but slow source: every read takes `seconds`."""
    num_classes = 2

    def __init__(self, seconds, n=8):
        self.seconds, self.labels = seconds, np.zeros(n, np.int32)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return {"image": np.full((8, 8, 3), i, np.uint8), "label": 0}


def test_sigterm_while_a_slow_pipeline_delivers_only_sets_the_flag():
    from lafs_jax.input import pipelines

    dc = pipelines.data_config()
    dc.workers, dc.read_threads, dc.read_buffer_size, dc.image_size = 0, 1, 1, 8
    it = pipelines.finetune_batches(_SlowSource(0.3), dc, batch_size=2, seed=0, num_epochs=1, process_index=0,
                                    process_count=1)
    with lu.preemption_guard(stall_seconds=30.0) as guard:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        batch = lu.next_batch(it)  # the signal comes during the wait; the batch still arrives
        assert batch["image"].shape == (2, 8, 8, 3) and guard.requested


STALLED_SCRIPT = """
import threading
import numpy as np
from lafs_jax.input import pipelines
from lafs_jax.train import loop_utils

class HungSource:  # a read that never returns, as on a hung network filesystem
    num_classes = 2
    labels = np.zeros(16, np.int32)
    def __len__(self):
        return 16
    def __getitem__(self, i):
        threading.Event().wait()

dc = pipelines.data_config()
dc.workers, dc.image_size = 0, 16
it = pipelines.finetune_batches(HungSource(), dc, batch_size=2, seed=0, process_index=0, process_count=1)

def loop():
    with loop_utils.preemption_guard(stall_seconds=1.0):
        print("waiting for the first batch", flush=True)
        loop_utils.next_batch(it)

loop_utils.exit_on_input_stall(loop)  # as main.py runs a task
"""


def test_sigterm_stops_a_process_stuck_in_the_input_pipeline_promptly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", STALLED_SCRIPT], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("waiting"), proc.stderr.read()[-2000:]
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == lu.EXIT_INPUT_STALLED == 143, err[-2000:]
    assert "the input pipeline has delivered no batch for" in err and "stall_seconds=1" in err
    assert elapsed < 10, elapsed  # stall_seconds (1 s) after the signal, plus the exit


def test_metric_writer_leaves_torch_unimported_and_importable(tmp_path):
    """In a fresh process (the test workers have torch imported already): writing events imports no
    torch, and torch imports normally afterwards."""
    code = ("import sys; from lafs_jax.train import loop_utils as lu\n"
            f"w = lu.MetricWriter({str(tmp_path)!r}); w.write_scalars(1, {{'loss': 1.0}}); w.close()\n"
            "assert 'torch' not in sys.modules, 'tensorboardX imported torch'\n"
            "import torch; assert torch.zeros(1).shape == (1,)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cpu_env(1, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
