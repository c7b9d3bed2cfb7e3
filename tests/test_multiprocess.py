"""Two real local processes joined by jax.distributed (2 CPU devices each): a global array and its sum;
a SIGTERM on one process stops both at the same step, and both save that step."""
import json
import os
import socket
import subprocess
import sys
from cpu_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(*args: str) -> list[dict]:
    address = f"127.0.0.1:{_free_port()}"
    env = cpu_env(2)
    worker = os.path.join(ROOT, "tests", "multiprocess_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, address, "2", str(i), ROOT, *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_build_one_global_array_and_agree_on_sum():
    for r in _run_workers("sum"):
        assert r["devices"] == 4  # 2 processes x 2 local devices
        assert r["global_shape"] == [8]
        assert r["sum"] == sum(range(1, 9))
        assert r["gathered"] == list(range(1, 9))


def test_sigterm_on_one_process_stops_and_saves_every_process_at_the_same_step(tmp_path):
    """JAX's preemption sync point through orbax: process 1 alone gets SIGTERM at step 5; both stop at
    one later step, orbax's preemption policy saves exactly that step, and no Python handler replaced
    JAX's own (with one, the notice never reaches the coordination service and nothing stops)."""
    r0, r1 = _run_workers("preemption", str(tmp_path / "ckpt"))
    assert not r0["python_handler"] and not r1["python_handler"]
    assert r0["stop"] == r1["stop"] and r0["stop"] is not None and r0["stop"] > 5
    assert r0["saved"] == r1["saved"] == [r0["stop"]]
    assert r0["policy_saved"] and r1["policy_saved"]
