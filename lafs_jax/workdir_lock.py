"""One run per workdir: an exclusive lock taken by main.py at start-up.

Two launches on one workdir would write the same checkpoints and metrics (orbax commits of one
clobber the other's, metrics.jsonl interleaves). `acquire(workdir)` takes `fcntl.flock` on
WORKDIR/workdir.lock and keeps the file open for the life of the process, so the kernel releases
the lock when the process ends, however it ends (kill -9 included). The file's content names the
holder (pid, host, start time, command line), for the error a second launch prints; it is only a
report, the flock is the lock. A lock file left by a process that is gone (its flock is free) is
taken over with a warning naming that process.

Multi-host: only process 0 takes the lock (the workdir is shared); main.py broadcasts the outcome,
so every process of a second job stops. Caveat: on a network filesystem without working flock
across hosts (some NFS setups), two jobs on different hosts are not kept apart.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import time

from absl import logging

LOCK_FILE = "workdir.lock"


class WorkdirLockedError(RuntimeError):
    """The workdir is locked by another live run; the message names the workdir and the holder."""


@dataclasses.dataclass
class WorkdirLock:
    """A held lock: the open file descriptor of `path` (closing it releases the lock)."""

    path: str
    fd: int

    def release(self) -> None:
        """Clear the holder's details and release the lock (also done by the kernel at exit)."""
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _read_holder(fd: int) -> dict:
    """The holder's details from the lock file ({} when empty or unreadable)."""
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that left no details"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {when}: "
            f"{holder.get('command', '?')})")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire(workdir: str) -> WorkdirLock:
    """Lock `workdir` (created if missing) for this process, or raise WorkdirLockedError naming the holder."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise WorkdirLockedError(f"workdir {workdir} is in use by {_describe(holder)}; its lock is {path}. "
                                 f"Stop that run or choose another --workdir") from None
    previous = _read_holder(fd)
    host = socket.gethostname()
    if previous:
        same_host = previous.get("host") == host
        state = ("no longer running" if same_host and not _pid_running(int(previous.get("pid", -1)))
                 else "not holding the lock any more" if same_host
                 else "on another host, not holding the lock (if the filesystem shares locks across hosts)")
        logging.warning("taking over the stale lock %s of %s: %s", path, _describe(previous), state)
    details = {"pid": os.getpid(), "host": host, "started": time.time(), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(details) + "\n").encode(), 0)
    os.fsync(fd)
    return WorkdirLock(path, fd)
