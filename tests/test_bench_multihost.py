"""bench/partial_fc.py, bench/pretrain.py and bench/model.py as two processes joined by jax.distributed
(2 CPU devices each, main.py's flags or the JAX_* variables): the step runs on all 4 devices and only
process 0 prints and writes."""
import json
import math
import os
import socket
import subprocess
import sys
from cpu_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRUNK = "((3,16,16,False,'RE',2),)"  # one landmark-CNN block keeps the compile cheap


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv_of, use_env: bool = False):
    """Two processes of one benchmark; argv_of(pid) gives each its arguments."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in range(2):
        env = cpu_env(2)
        argv = argv_of(pid)
        if use_env:
            env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        else:
            argv += ["--coordinator_address", address, "--num_processes", "2", "--process_id", str(pid)]
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _collect(procs):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append([json.loads(l) for l in out.splitlines() if l.startswith("{")])
    return outs


def test_benchmarks_run_on_every_device_of_two_processes_and_only_process_0_reports(tmp_path):
    results = [str(tmp_path / f"results_{pid}.md") for pid in range(2)]
    runs = {
        "partial_fc": _launch(lambda pid: ["-m", "bench.partial_fc", "--classes", "1000", "--rates", "0.5", "--dim", "16",
                                           "--features", "8", "--batch", "8", "--steps", "2", "--devices", "2",
                                           "--write-results", "--results", results[pid]]),
        "pretrain": _launch(lambda pid: ["-m", "bench.pretrain", "--presets", "tiny", "--methods", "dino", "--batch",
                                         "tiny=1", "--steps", "1", "--set", "model.depth=1", "--set",
                                         "data.dino.local_crops=1"]),
        "model": _launch(lambda pid: ["bench/model.py", "--frameworks", "jax", "--presets", "tiny", "--batch-tiny", "2",
                                      "--iters", "1", "--modes", "forward", "--set", "depth=1", "--set",
                                      f"landmark.blocks={TINY_TRUNK}"], use_env=True),
    }
    out = {name: _collect(procs) for name, procs in runs.items()}
    for name, (first, second) in out.items():
        assert len(first) == 1, (name, first)
        assert second == [], (name, second)  # process 1 prints nothing

    pfc = out["partial_fc"][0][0]
    assert pfc["device"] == "4 x cpu" and pfc["processes"] == 2 and pfc["batch"] == 8
    assert len(pfc["losses"]) == 3 and all(math.isfinite(v) for v in pfc["losses"])
    assert os.path.exists(results[0]) and not os.path.exists(results[1])
    assert "## Partial FC" in open(results[0]).read()

    pre = out["pretrain"][0][0]
    assert (pre["processes"], pre["devices"], pre["local_devices"]) == (2, 4, 2)
    assert pre["device"] == "4 x cpu" and pre["per_device_batch"] == 1 and pre["views_per_image"] == 3
    assert math.isfinite(pre["loss"]) and pre["flops_per_step_per_device"] > 0
    assert pre["img_per_sec"] == round(4 * pre["img_per_sec_per_device"], 2) or \
        abs(pre["img_per_sec"] - 4 * pre["img_per_sec_per_device"]) < 0.05

    model = out["model"][0][0]
    assert (model["framework"], model["processes"], model["devices"], model["batch"]) == ("jax", 2, 4, 2)
    assert model["gflops_per_img"] > 0 and model["img_per_s"] > 0
