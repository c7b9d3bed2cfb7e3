"""One run per workdir: two real processes race for the lock, main.py refuses a held workdir naming the
holder, and takes over the lock file of a process killed with SIGKILL."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from cpu_env import cpu_env
from lafs_jax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = """
import sys, time
from lafs_jax import workdir_lock
try:
    lock = workdir_lock.acquire(sys.argv[1])
except workdir_lock.WorkdirLockedError as e:
    print("REFUSED", e, flush=True)
    sys.exit(1)
print("LOCKED", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(workdir, seconds):
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), str(seconds)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _main(*args, workdir):
    env = cpu_env(8)
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args, f"--workdir={workdir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_racing_for_one_workdir_one_wins_the_other_names_it(tmp_path):
    procs = [_holder(tmp_path / "w", 3) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    winners = [p for p, out in zip(procs, outs) if out.startswith("LOCKED")]
    losers = [(p, out) for p, out in zip(procs, outs) if out.startswith("REFUSED")]
    assert len(winners) == 1 and len(losers) == 1, outs
    loser, message = losers[0]
    assert loser.returncode == 1 and winners[0].returncode == 0
    assert f"workdir {tmp_path / 'w'} is in use by pid {winners[0].pid} on host {socket.gethostname()}" in message


def test_main_refuses_a_locked_workdir_and_takes_over_a_dead_holders_lock(tmp_path):
    holder = _holder(tmp_path, 120)
    try:
        assert holder.stdout.readline().startswith("LOCKED")
        started = time.monotonic()
        r = _main("--config=configs/demo.py", "--config.task=info", workdir=tmp_path)
        assert r.returncode == 1, r.stderr[-2000:]
        assert f"FATAL workdir {tmp_path} is in use by pid {holder.pid} on host {socket.gethostname()}" in r.stderr
        assert time.monotonic() - started < 60 and not os.path.exists(tmp_path / "info.json")
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the flock, the file stays
        holder.wait()
    assert json.load(open(tmp_path / workdir_lock.LOCK_FILE))["pid"] == holder.pid
    r = _main("--config=configs/demo.py", "--config.task=info", workdir=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"taking over the stale lock {tmp_path / workdir_lock.LOCK_FILE} of pid {holder.pid}" in r.stderr
    assert "no longer running" in r.stderr and os.path.exists(tmp_path / "info.json")
    assert open(tmp_path / workdir_lock.LOCK_FILE).read() == ""  # released at exit


def test_every_process_of_a_second_multi_process_job_stops(tmp_path):
    """Only process 0 takes the lock; it shares the outcome, so process 1 stops too instead of hanging."""
    holder = _holder(tmp_path, 120)
    try:
        assert holder.stdout.readline().startswith("LOCKED")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{s.getsockname()[1]}"
        env = cpu_env(2)
        procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/demo.py",
                                   "--config.task=info", f"--workdir={tmp_path}", f"--coordinator_address={address}",
                                   "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        holder.kill()
        holder.wait()
    assert [p.returncode for p in procs] == [1, 1], [e[-1500:] for e in errs]
    assert f"FATAL workdir {tmp_path} is in use by pid {holder.pid}" in errs[0]
    assert f"FATAL process 0 could not lock the workdir {tmp_path}" in errs[1]
    assert not os.path.exists(tmp_path / "info.json")
