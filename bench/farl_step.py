"""FaRL's pretraining step: JAX (the pretrain task's own step, ITC + MIM) against the PyTorch mirror of CLIP.

    python -m bench.farl_step --size b16 --batch 4 --iters 3 --threads 1      # CPU, one thread each
    python -m bench.farl_step --size b16 --batch 128 --iters 10 --precision bfloat16   # a GPU

JAX: `pretrain.build_train_step` of configs/farl.py:SIZE (the step `run` trains: the clean and masked
copies in one pass (2B images), the text tower, global-batch ITC, lm_transformer + head, AdamW, global-norm
clip), random parameters, a synthetic batch (random images, captions of the full context, BEiT-sized
masks). PyTorch: tests/torch_mirror_clip.py at the same widths, forward + backward of CLIP's ITC (no MIM
branch: the mirror is CLIP's model.py) on the same batch size, plus an AdamW step. One JSON line per
framework: images/s (pairs), ms per step, and for JAX the FLOPs per step from XLA's cost analysis, the
achieved TFLOP/s and the MFU against the device's dense peak (bench/common.py). Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench import threads as threads_lib  # noqa: F401  (first: applies --threads before jax / torch start)

if threads_lib.THREADS is not None:
    threads_lib.single_thread_xla()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from lafs_jax import sharding as mesh_lib  # noqa: E402
from lafs_jax.train import pretrain  # noqa: E402

sys.path.insert(0, os.path.join(common.ROOT, "tests"))


def jax_step(size: str, batch: int, iters: int, precision: str, itc_only: bool = False) -> dict:
    config = common.load_recipe(f"configs/farl.py:{size}")
    config.unlock()
    if itc_only:
        config.farl.mim.weight = 0.0  # the clean images only, as the PyTorch mirror's step
    config.data.path = "unused"
    config.batch_size, config.precision = batch * jax.device_count(), precision
    mesh = mesh_lib.make_mesh()
    step, args, _, init = pretrain.build_train_step(config, mesh, steps_per_epoch=1000, total_steps=10_000)
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    state = init(jax.random.key(0))
    rng = np.random.default_rng(0)
    b, s, n = config.batch_size, config.model.image_size, (config.model.image_size // config.model.patch_size) ** 2
    mask = np.zeros((b, n), bool)
    mask[:, :config.farl.mim.num_masked] = True
    host = {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32),
            "text": rng.integers(1, 49406, (b, config.farl.context_length)).astype(np.int32),
            "mask": mask, "truncated": np.zeros(b, bool), "label": np.zeros(b, np.int32)}
    data = jax.device_put(host, mesh_lib.batch_sharding(mesh))
    holder = {"state": state}

    def call(i):
        holder["state"], metrics = compiled(holder["state"], data, jax.random.key(i))
        return metrics["loss"]

    call(0)
    median, _ = common.time_calls(call, iters)
    flops = common.flops_of(compiled)
    peak, peak_source = common.assumed_peak_tflops(jax.devices()[0])
    achieved = flops / median / 1e12 if flops else None
    return {"framework": "jax", "size": size, "objective": "itc" if itc_only else "itc+mim",
            "batch_per_device": batch, "precision": precision,
            "img_per_sec": b / median, "step_ms": 1e3 * median, "compile_s": compile_s,
            "tflops_per_step": flops / 1e12 if flops else None, "achieved_tflops": achieved,
            "mfu": achieved / peak if achieved and peak else None, "peak_source": peak_source,
            "device": jax.devices()[0].device_kind}


def torch_step(size: str, batch: int, iters: int) -> dict:
    import torch  # pylint: disable=import-outside-toplevel  (optional, this benchmark only)
    from torch_mirror_clip import CLIP  # pylint: disable=import-outside-toplevel

    if threads_lib.THREADS is not None:
        torch.set_num_threads(threads_lib.THREADS)
    config = common.load_recipe(f"configs/farl.py:{size}")
    m, c = config.model, config.model.clip
    model = CLIP(c.embed_dim, m.image_size, m.depth, m.dim, m.patch_size, c.context_length, c.vocab_size,
                 c.text_width, c.text_heads, c.text_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, m.image_size, m.image_size)
    ids = torch.randint(1, 49406, (batch, config.farl.context_length))

    def run():
        u = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        v = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
        logits = model.logit_scale.exp() * u @ v.T
        target = torch.arange(batch)
        loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    run()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    return {"framework": "torch", "size": size, "batch": batch, "img_per_sec": batch / median, "step_ms": 1e3 * median,
            "note": "ITC only (CLIP's model.py has no MIM branch)"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.farl_step", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="b16", help="configs/farl.py argument: b16 | l14 | h14 | tiny")
    p.add_argument("--batch", type=int, default=4, help="image-caption pairs per device")
    p.add_argument("--iters", type=int, default=3, help="timed steps")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both frameworks (default: theirs)")
    p.add_argument("--no-torch", action="store_true", help="JAX only")
    p.add_argument("--itc-only", action="store_true", help="JAX without the MIM branch (what the mirror computes)")
    args = p.parse_args(argv)
    line = jax_step(args.size, args.batch, args.iters, args.precision, args.itc_only)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in line.items()}), flush=True)
    if not args.no_torch:
        other = torch_step(args.size, args.batch, args.iters)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in other.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
