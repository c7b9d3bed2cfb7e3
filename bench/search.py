"""1:N search speed: `lafs_jax.search` over a random gallery split by rows over every device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.search
        [--gallery 1000000] [--dim 512] [--probes 1000] [--top-k 5] [--batch 256] [--dry-run]

Builds a random float32 gallery [G, D] on the host (in chunks), places it on the mesh with
`search.shard_gallery` (per-device slices, normalised on the devices: "build_s"), warms the search
up on one batch (compilation, "warmup_s"), then times the search of all probes ("search_s",
"probes_per_s"). The first probes are copies of gallery rows, and each must find its own row at rank
1 ("self_match_ok": a sanity check, not a test). Prints one JSON line. `--dry-run`: tiny sizes.
On a CPU host the fake devices share the host's cores: a 1-device and an 8-device run do the same
arithmetic, so the device count changes the layout, not the FLOPs available.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from lafs_jax import search as search_lib
from lafs_jax import sharding


def random_gallery(rows: int, dim: int, seed: int = 0, chunk: int = 65536) -> np.ndarray:
    """float32 [rows, dim] standard normal, made in chunks (no float64 copy of the whole)."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, chunk):
        out[start:start + chunk] = rng.standard_normal((min(chunk, rows - start), dim), dtype=np.float32)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--probes", type=int, default=1000)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch", type=int, default=search_lib.DEFAULT_BATCH)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (G=1003, D=64, 40 probes, batch 16)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.gallery, args.dim, args.probes, args.batch = 1003, 64, 40, 16

    gallery = random_gallery(args.gallery, args.dim)
    rng = np.random.default_rng(1)
    probes = rng.standard_normal((args.probes, args.dim), dtype=np.float32)
    planted = rng.choice(args.gallery, size=min(10, args.probes), replace=False)
    probes[:len(planted)] = gallery[planted]
    mesh = sharding.make_mesh()

    t0 = time.perf_counter()
    index = search_lib.shard_gallery(gallery, mesh)
    jax.block_until_ready(index.rows)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.search(probes[:args.batch], args.top_k, batch_size=args.batch)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, indices = index.search(probes, args.top_k, batch_size=args.batch)
    search_s = time.perf_counter() - t0

    print(json.dumps({
        "bench": "search", "devices": jax.device_count(), "platform": jax.devices()[0].platform,
        "host_cpus": os.cpu_count(), "machine": platform.machine(), "G": args.gallery, "D": args.dim,
        "P": args.probes, "k": args.top_k, "batch": args.batch, "build_s": round(build_s, 3),
        "warmup_s": round(warmup_s, 3), "search_s": round(search_s, 3),
        "probes_per_s": round(args.probes / search_s, 1),
        "gallery_bytes": int(gallery.nbytes),
        "self_match_ok": bool((indices[:len(planted), 0] == planted).all()),
        "min_top1_score_of_copies": round(float(scores[:len(planted), 0].min()), 6),
    }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
