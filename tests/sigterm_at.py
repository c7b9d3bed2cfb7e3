"""A preemption guard for in-process resume tests: SIGTERM at a chosen poll."""
import os
import signal


class SigtermAt:
    """Wraps the real preemption guard; sends SIGTERM to this process when polled for the n-th time."""

    def __init__(self, guard, at):
        self.guard, self.at, self.polls = guard, at, 0

    def should_stop(self, step):
        self.polls += 1
        if self.polls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.guard.should_stop(step)
