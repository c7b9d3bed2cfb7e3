"""Two real local processes joined by jax.distributed agree on a global array and its sum."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_build_one_global_array_and_agree_on_sum():
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    worker = os.path.join(ROOT, "tests", "multiprocess_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, address, "2", str(i), ROOT], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["devices"] == 4  # 2 processes x 2 local devices
        assert r["global_shape"] == [8]
        assert r["sum"] == sum(range(1, 9))
        assert r["gathered"] == list(range(1, 9))
