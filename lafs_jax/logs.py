"""Log levels of a run: our own progress, metric and stage lines at INFO, the libraries' INFO chatter hidden.

orbax, grain and tensorflow_datasets log through absl.logging, i.e. into the same 'absl' Python
logger as our own modules, so their records are told apart by the file that logged them: a filter
on absl's handler lets records below WARNING through only from lafs_jax's own files (and any
`own_paths`, e.g. main.py); WARNING and above always pass. The standard-library loggers of the
libraries (`LIBRARY_LOGGERS`) are set to WARNING as well. `configure(verbosity)` takes main.py's absl
`--verbosity` (`-v`): 0 (the default) as above; 1 or more lets every library's INFO (and DEBUG)
lines through again.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from absl import logging as absl_logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LIBRARY_LOGGERS = ("jax", "orbax", "grain", "etils", "tensorflow", "tensorflow_datasets", "tensorboardX",
                   "matplotlib", "PIL", "urllib3")


class OwnRecordsBelowWarning(logging.Filter):
    """Passes WARNING and above from anywhere, lower levels only from files under `own_paths`."""

    def __init__(self, own_paths: Sequence[str]):
        super().__init__()
        self.own_paths = tuple(os.path.abspath(p) for p in own_paths)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        path = os.path.abspath(record.pathname)
        return any(path == own or path.startswith(own + os.sep) for own in self.own_paths)


def configure(verbosity: int = 0, own_paths: Sequence[str] = ()) -> None:
    """Set the levels of a run (idempotent): see the module docstring. `own_paths`: files or folders
    whose INFO lines count as ours besides lafs_jax's (main.py passes itself)."""
    handler = absl_logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, OwnRecordsBelowWarning)]:
        handler.removeFilter(f)
    quiet = verbosity <= 0
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
    if quiet:
        handler.addFilter(OwnRecordsBelowWarning((PACKAGE_DIR, *own_paths)))
