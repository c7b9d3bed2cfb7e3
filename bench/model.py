"""Part fViT throughput: JAX (this package) vs the PyTorch mirror of the official model, same weights, same run.

    python bench/model.py --threads 1           # tiny (batch 32) and base (batch 4), one CPU thread each
    python bench/model.py --presets base --batch-base 64 --iters 10    # e.g. on a GPU

For each preset and mode (forward in eval mode; forward+backward in train mode: dropout, drop path,
BatchNorm batch statistics, gradient of a scalar loss w.r.t. every parameter) it prints one JSON line per
framework: images/s, ms per step, and for JAX the FLOPs per image from XLA's cost analysis of the compiled
step and the compile time; the JAX line carries jax_over_torch = JAX img/s / PyTorch img/s. On a CPU shared
with other jobs, run with --threads 1: both frameworks then use one thread, and img_per_cpu_s (images per
second of this process's CPU time) stays meaningful under load; jax_over_torch_cpu compares those. The PyTorch
model is tests/torch_mirror.py (the official module tree), its weights converted with lafs_jax.convert, so
both compute the same function. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _threads_from_argv(argv) -> int | None:
    """--threads must act before jax and torch start their thread pools."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return None


THREADS = _threads_from_argv(sys.argv[1:])
if THREADS == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

if THREADS:
    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(THREADS)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch_mirror  # noqa: E402
from lafs_jax.convert import mapping  # noqa: E402
from lafs_jax.models import presets  # noqa: E402


def mirror_and_variables(cfg, seed: int = 0):
    torch.manual_seed(seed)
    mirror = torch_mirror.PartFViT(num_patches=cfg.num_landmarks, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                                   dim_head=cfg.head_dim, mlp_dim=cfg.mlp_dim, patch=cfg.patch_size,
                                   blocks=cfg.landmark.blocks, stem=cfg.landmark.stem_features)
    torch_mirror.randomize_batchnorm(mirror, torch.Generator().manual_seed(seed))
    state = {k: v.numpy() for k, v in mirror.state_dict().items()}
    variables, _ = mapping.convert_state_dict(state, "part_fvit", cfg)
    return mirror, jax.device_put(variables)


def timed(fn, iters: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call after one warm-up call; fn must block until ready."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


def rates(batch: int, wall: float, cpu: float) -> dict:
    return {"step_ms": 1e3 * wall, "img_per_s": batch / wall, "img_per_cpu_s": batch / cpu}


def flops_of(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def bench_jax(cfg, variables, batch: int, iters: int, mode: str) -> dict:
    model = presets.build_model(cfg)
    images = jax.random.normal(jax.random.key(0), (batch, cfg.image_size, cfg.image_size, cfg.channels))
    if mode == "forward":
        def step(v, x, key):
            return model.apply(v, x, train=False)
    else:
        def step(v, x, key):
            def loss(params):
                (emb, lm), upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                                             rngs={"dropout": key}, mutable=["batch_stats"])
                return jnp.mean(emb ** 2), upd
            return jax.grad(loss, has_aux=True)(v["params"])
    v = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    start = time.perf_counter()
    compiled = jax.jit(step).lower(v, images, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - start
    wall, cpu = timed(lambda: jax.block_until_ready(compiled(v, images, jax.random.key(1))), iters)
    flops = flops_of(compiled)
    return {**rates(batch, wall, cpu), "compile_s": compile_s,
            "gflops_per_img": None if flops is None else flops / batch / 1e9}


def bench_torch(mirror, cfg, batch: int, iters: int, mode: str, device: str) -> dict:
    mirror = mirror.to(device)
    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    if mode == "forward":
        mirror.eval()

        def run():
            with torch.no_grad():
                mirror(images)
            sync()
    else:
        mirror.train()

        def run():
            mirror.zero_grad(set_to_none=True)
            emb, _ = mirror(images)
            (emb ** 2).mean().backward()
            sync()
    return rates(batch, *timed(run, iters))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,base")
    p.add_argument("--batch-tiny", type=int, default=32)
    p.add_argument("--batch-base", type=int, default=4)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--modes", default="forward,forward_backward")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both frameworks (default: theirs)")
    args = p.parse_args(argv)
    jax_device = jax.devices()[0]
    torch_device = "cuda" if torch.cuda.is_available() and jax_device.platform == "gpu" else "cpu"
    common = {"jax_device": jax_device.device_kind, "torch_device": torch_device,
              "torch_threads": torch.get_num_threads(), "jax_threads": THREADS or "default",
              "cpu_count": os.cpu_count()}
    for name in args.presets.split(","):
        cfg = presets.model_config(name)
        batch = args.batch_tiny if name == "tiny" else args.batch_base
        mirror, variables = mirror_and_variables(cfg)
        for mode in args.modes.split(","):
            base = {"model": f"part_fvit_{name}", "mode": mode, "batch": batch, **common}
            t = bench_torch(mirror, cfg, batch, args.iters, mode, torch_device)
            print(json.dumps({**base, "framework": "torch", **{k: round(v, 3) for k, v in t.items()}}), flush=True)
            j = bench_jax(cfg, variables, batch, args.iters, mode)
            j = {k: (None if v is None else round(v, 3)) for k, v in j.items()}
            print(json.dumps({**base, "framework": "jax", **j,
                              "jax_over_torch": round(j["img_per_s"] / t["img_per_s"], 3),
                              "jax_over_torch_cpu": round(j["img_per_cpu_s"] / t["img_per_cpu_s"], 3)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
