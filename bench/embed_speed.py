"""Embedding speed: JAX vs onnxruntime vs the PyTorch mirror, same random weights, same run.

    nice python -m bench.embed_speed --threads 1
    python -m bench.embed_speed --dry-run        # a 2-block tiny model, batch 2, 2 iterations
    nice python -m bench.embed_speed --threads 2 --presets base --batch-base 64 --batch-iters 1

For each model (Part fViT 'tiny' and 'base', the InsightFace ViT-T 'insightface_t') and each framework it
prints one JSON line per mode: `batch1` (median ms of --iters single-image calls after warm-up) and
`batchN` (images/s of a batch of --batch images; --batch-base for base, default 8 on a small CPU). The
'tiny' preset has 2 transformer blocks already, so --dry-run times the tiny model itself at batch 2.
  - jax: jitted `lafs_jax.eval.embed.embedding_function(flip=False)` on the default devices (uint8 NHWC in,
    its preprocessing inside the jitted function);
  - onnxruntime: the graph of `lafs_jax.eval.export.export_onnx` (a temporary directory), CPU provider,
    float32 NCHW in [-1, 1];
  - torch: the PyTorch mirror (tests/torch_mirror.py, tests/torch_mirror_lvface.py) in eval mode under
    torch.inference_mode(), float32 NCHW in.
The weights are the mirror's (random, non-trivial BatchNorm / LayerNorm statistics) converted with
lafs_jax.convert, so the three compute the same function. --threads N pins the process to N cores
(os.sched_setaffinity, before jax is imported) and sets XLA's single-thread flag when N = 1 (as bench/model.py),
torch.set_num_threads(N) and onnxruntime's intra/inter-op threads to N. Each line carries over_torch = its
speed / PyTorch's (batch-1: torch ms / its ms). Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, however it is run
from threads import THREADS, single_thread_xla  # noqa: E402  (before jax and torch)

PINNED = None
if THREADS:
    if hasattr(os, "sched_setaffinity"):
        PINNED = sorted(os.sched_getaffinity(0))[:THREADS]
        os.sched_setaffinity(0, PINNED)
    if THREADS == 1:
        single_thread_xla()

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from lafs_jax.convert import mapping  # noqa: E402
from lafs_jax.eval import embed, export  # noqa: E402
from lafs_jax.models import presets  # noqa: E402
from lafs_jax import variables as variables_lib  # noqa: E402

MODELS = {"tiny": "part_fvit_tiny", "base": "part_fvit_base", "insightface_t": "insightface_vit_t"}


def import_torch():
    import torch  # noqa: PLC0415
    if THREADS:
        torch.set_num_threads(THREADS)
        try:
            torch.set_num_interop_threads(THREADS)
        except RuntimeError:  # already set in this process: the first setting stays
            pass
    return torch


def mirror_and_variables(cfg, seed: int = 0):
    """(PyTorch mirror in eval mode, the same weights as JAX variables)."""
    torch = import_torch()
    torch.manual_seed(seed)
    if cfg.kind == "insightface_vit":
        import torch_mirror_lvface as lv  # noqa: PLC0415
        mirror = lv.VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.dim,
                                      depth=cfg.depth, num_heads=cfg.heads,
                                      num_features=cfg.insightface.embedding_size)
        lv.randomize(mirror, torch.Generator().manual_seed(seed + 1))
        kind = "lvface"
    else:
        import torch_mirror  # noqa: PLC0415
        mirror = torch_mirror.PartFViT(num_patches=cfg.num_landmarks, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                                       dim_head=cfg.head_dim, mlp_dim=cfg.mlp_dim, patch=cfg.patch_size,
                                       blocks=cfg.landmark.blocks, stem=cfg.landmark.stem_features)
        torch_mirror.randomize_batchnorm(mirror, torch.Generator().manual_seed(seed))
        kind = "part_fvit"
    state = {k: v.numpy() for k, v in mirror.state_dict().items()}
    variables, _ = mapping.convert_state_dict(state, kind, cfg)
    return mirror.eval(), {c: variables[c] for c in ("params", "batch_stats") if c in variables}


def median_ms(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def throughput(fn, batch: int, iters: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return batch * iters / (time.perf_counter() - t0)


def runners(cfg, mirror, variables, onnx_path):
    """{framework: make(batch) -> a call running one embedding of that batch to completion}."""
    size = cfg.image_size
    torch = import_torch()
    model = presets.build_model(cfg)
    fn = jax.jit(embed.embedding_function(model, normalization="[-1,1]", color_order="rgb", flip=False))
    v = jax.device_put(variables)

    def jax_make(b):
        x = jax.device_put(np.random.default_rng(0).integers(0, 256, (b, size, size, 3), dtype=np.uint8))
        return lambda: jax.block_until_ready(fn(v, x))

    import onnxruntime as ort  # noqa: PLC0415
    so = ort.SessionOptions()
    if THREADS:
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = THREADS
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])

    def ort_make(b):
        x = np.random.default_rng(0).uniform(-1, 1, (b, 3, size, size)).astype(np.float32)
        return lambda: sess.run([export.ONNX_OUTPUT], {export.ONNX_INPUT: x})

    def torch_make(b):
        x = torch.empty(b, 3, size, size).uniform_(-1, 1)

        def run():
            with torch.inference_mode():
                mirror(x)
        return run

    return {"jax": jax_make, "onnxruntime": ort_make, "torch": torch_make}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,insightface_t,base")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batch-base", type=int, default=8)
    p.add_argument("--iters", type=int, default=20, help="batch-1 calls timed (median)")
    p.add_argument("--batch-iters", type=int, default=3, help="batch calls timed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dry-run", action="store_true", help="a 2-block tiny model, batch 2, 2 iterations")
    args = p.parse_args(argv)
    names = args.presets.split(",")
    if args.dry_run:
        names, args.batch, args.iters, args.batch_iters = ["tiny"], 2, 2, 2
    torch = import_torch()
    import onnxruntime as ort  # noqa: PLC0415
    fields = {"threads": THREADS or "default", "pinned_cpus": PINNED, "cpu_count": os.cpu_count(),
              "jax_device": jax.devices()[0].device_kind, "torch_threads": torch.get_num_threads(),
              "onnxruntime": ort.__version__, "dry_run": args.dry_run}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg = presets.model_config(name)
            if args.dry_run:
                cfg.depth = 2
            mirror, variables = mirror_and_variables(cfg)
            d = os.path.join(tmp, name)
            variables_lib.save_variables(d, variables, {"model": cfg.to_dict(), "normalization": "[-1,1]",
                                                        "color_order": "rgb", "image_size": cfg.image_size})
            t0 = time.perf_counter()
            onnx_path, _ = export.export_onnx(d, os.path.join(tmp, f"{name}.onnx"))
            export_s = time.perf_counter() - t0
            batch = args.batch_base if name == "base" and not args.dry_run else args.batch
            make = runners(cfg, mirror, variables, onnx_path)
            res = {}
            for fw in ("torch", "jax", "onnxruntime"):
                ms = median_ms(make[fw](1), args.iters)
                ips = throughput(make[fw](batch), batch, args.batch_iters)
                res[fw] = (ms, ips)
            for fw, (ms, ips) in res.items():
                tms, tips = res["torch"]
                base = {"model": MODELS.get(name, name), "depth": cfg.depth, "framework": fw, **fields}
                extra = {"onnx_export_s": round(export_s, 2)} if fw == "onnxruntime" else {}
                print(json.dumps({**base, "mode": "batch1", "batch": 1, "median_ms": round(ms, 3),
                                  "img_per_s": round(1e3 / ms, 3), "over_torch": round(tms / ms, 3),
                                  "iters": args.iters, **extra}), flush=True)
                print(json.dumps({**base, "mode": f"batch{batch}", "batch": batch, "img_per_s": round(ips, 3),
                                  "over_torch": round(ips / tips, 3), "iters": args.batch_iters}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
