"""task 'info': report devices, processes and the mesh of this launch; trains nothing."""
from __future__ import annotations

import json
import os

import jax

from lafs_jax import sharding as mesh_lib


def describe(config) -> dict:
    """Devices, processes and mesh shape as a JSON-able dict."""
    mesh = mesh_lib.make_mesh(config.mesh)
    return {
        "jax": jax.__version__,
        "platform": jax.devices()[0].platform,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
    }


def run(config, workdir: str) -> dict:
    """Print the launch description; write it with the resolved config to WORKDIR/info.json."""
    info = describe(config)
    print(json.dumps(info, indent=1))
    info["config"] = json.loads(config.to_json_best_effort())
    with open(os.path.join(workdir, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info
