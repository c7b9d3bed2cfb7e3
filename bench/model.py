"""Part fViT throughput: JAX (this package) vs the PyTorch mirror of the official model, same weights, same run.

    python bench/model.py --threads 1           # tiny (batch 32) and base (batch 4), one CPU thread each
    python bench/model.py --presets base --batch-base 256 --iters 10 --precision bfloat16 \
        --attention cudnn                        # e.g. on a GPU

For each preset and mode (forward in eval mode; forward+backward in train mode: dropout, drop path,
BatchNorm batch statistics, gradient of a scalar loss w.r.t. every parameter) it prints one JSON line per
framework: images/s, ms per step, and for JAX the FLOPs per image from XLA's cost analysis of the compiled
step, the compile time, the achieved TFLOP/s and MFU against the device's dense peak (bench/common.py)
and the allocator's peak bytes (GPU/TPU); the JAX line carries jax_over_torch = JAX img/s / PyTorch
img/s. --precision bfloat16 runs JAX with bf16 compute (fp32 parameters) and PyTorch under bf16
autocast; --attention picks JAX's attention implementation (`cudnn`: the fused cuDNN kernel of
jax.nn.dot_product_attention; the mirror keeps the official explicit softmax(QK^T)V). On a CPU shared
with other jobs, run with --threads 1: both frameworks then use one thread, and img_per_cpu_s (images per
second of this process's CPU time) stays meaningful under load; jax_over_torch_cpu compares those. The PyTorch
model is tests/torch_mirror.py (the official module tree), its weights converted with lafs_jax.convert, so
both compute the same function. Not a test: nothing is asserted.

Batches are per device. Multi-host: one process per host with main.py's flags (--coordinator_address,
--num_processes, --process_id) or the JAX_* variables (bench/multihost.py); the JAX step runs data
parallel on every device of every process (parameters replicated, the batch split), each process
times PyTorch on its own host at the per-device batch, and only process 0 prints.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, however it is run
from threads import THREADS, single_thread_xla  # noqa: E402  (before jax and torch)

if THREADS == 1:
    single_thread_xla()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import common  # noqa: E402
import multihost  # noqa: E402
from lafs_jax.convert import mapping  # noqa: E402
from lafs_jax.models import presets  # noqa: E402
from lafs_jax import sharding as mesh_lib  # noqa: E402


def import_torch():
    """torch and the mirror, imported only when the PyTorch side runs: a JAX-only process (bench/gpu.sh
    runs the two frameworks in separate processes) never loads torch's CUDA libraries next to JAX's."""
    import torch  # noqa: PLC0415  (optional heavy dependency, see the docstring)
    import torch_mirror  # noqa: PLC0415

    if THREADS:
        torch.set_num_threads(THREADS)
        torch.set_num_interop_threads(THREADS)
    return torch, torch_mirror


def mirror_and_variables(cfg, seed: int = 0):
    """The PyTorch mirror with random weights (BatchNorm statistics too) and the same weights for JAX."""
    torch, torch_mirror = import_torch()
    torch.manual_seed(seed)
    mirror = torch_mirror.PartFViT(num_patches=cfg.num_landmarks, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                                   dim_head=cfg.head_dim, mlp_dim=cfg.mlp_dim, patch=cfg.patch_size,
                                   blocks=cfg.landmark.blocks, stem=cfg.landmark.stem_features)
    torch_mirror.randomize_batchnorm(mirror, torch.Generator().manual_seed(seed))
    state = {k: v.numpy() for k, v in mirror.state_dict().items()}
    variables, _ = mapping.convert_state_dict(state, "part_fvit", cfg)
    return mirror, variables


def timed(fn, iters: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call after one warm-up call; fn must block until ready."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


def rates(batch: int, wall: float, cpu: float) -> dict:
    return {"step_ms": 1e3 * wall, "img_per_s": batch / wall, "img_per_cpu_s": batch / cpu}


def bench_jax(cfg, variables, batch: int, iters: int, mode: str, peak_tflops: float) -> dict:
    """The JAX step on every device (data parallel: parameters replicated, batch split); `batch` per device."""
    model = presets.build_model(cfg)
    mesh = mesh_lib.make_mesh(None)
    n_dev = mesh.devices.size
    rng = np.random.default_rng(0)  # the same host arrays on every process
    images = rng.standard_normal((batch * n_dev, cfg.image_size, cfg.image_size, cfg.channels), np.float32)
    images = multihost.global_array(images, mesh_lib.batch_sharding(mesh))
    if mode == "forward":
        def step(v, x, key):
            return model.apply(v, x, train=False)
    else:
        def step(v, x, key):
            def loss(params):
                (emb, _), upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                                            rngs={"dropout": key}, mutable=["batch_stats"])
                return jnp.mean(emb ** 2), upd
            return jax.grad(loss, has_aux=True)(v["params"])
    v = multihost.global_tree({"params": variables["params"], "batch_stats": variables["batch_stats"]},
                              mesh_lib.replicated(mesh))
    key = jax.random.key(1)
    start = time.perf_counter()
    compiled = jax.jit(step).lower(v, images, key).compile()
    compile_s = time.perf_counter() - start
    wall, cpu = timed(lambda: jax.block_until_ready(compiled(v, images, key)), iters)
    flops = common.flops_of(compiled)  # of the per-device program
    return {**rates(batch, wall, cpu), "compile_s": compile_s, "gflops_per_img": flops / batch / 1e9,
            "tflops_per_s": flops / wall / 1e12, "mfu": flops / wall / (peak_tflops * 1e12),
            "device_peak_bytes": common.device_peak_bytes(jax.local_devices()[0])}


def bench_torch(mirror, cfg, batch: int, iters: int, mode: str, device: str, bf16: bool = False) -> dict:
    """The mirror on this host's one device; bf16: under torch.autocast (parameters stay fp32)."""
    torch, _ = import_torch()
    mirror = mirror.to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    if mode == "forward":
        mirror.eval()

        def run():
            with torch.no_grad(), autocast:
                mirror(images)
            sync()
    else:
        mirror.train()

        def run():
            mirror.zero_grad(set_to_none=True)
            with autocast:
                emb, _ = mirror(images)
            (emb.float() ** 2).mean().backward()
            sync()
    out = rates(batch, *timed(run, iters))
    if device == "cuda":
        out["device_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        mirror.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()  # give the memory back before JAX runs in this process
    return out


def jax_variables(cfg, seed: int = 0) -> dict:
    """Random JAX variables (host numpy) for a JAX-only run."""
    return jax.device_get(jax.jit(lambda k: presets.init_variables(cfg, k))(jax.random.key(seed)))


def _round(d: dict) -> dict:
    return {k: (v if v is None or isinstance(v, int) else round(v, 4 if k == "mfu" else 3)) for k, v in d.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,base")
    p.add_argument("--batch-tiny", type=int, default=32, help="images per device")
    p.add_argument("--batch-base", type=int, default=4, help="images per device")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--modes", default="forward,forward_backward")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both frameworks (default: theirs)")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="", choices=("", "xla", "cudnn"), help="JAX attention implementation")
    p.add_argument("--frameworks", default="torch,jax",
                   help="'torch,jax' (one process, same weights), or 'jax' / 'torch' alone (random weights each)")
    p.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available and JAX is on a GPU (or JAX does not run), else cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. depth=1 (repeatable)")
    p.add_argument("--peak-tflops", default="auto")
    multihost.add_flags(p)
    args = p.parse_args(argv)
    frameworks = [f for f in args.frameworks.split(",") if f]
    if not frameworks or set(frameworks) - {"torch", "jax"}:
        p.error(f"--frameworks={args.frameworks!r}: choose from torch, jax")
    use_torch, use_jax = "torch" in frameworks, "jax" in frameworks
    multihost.initialize(args)
    jax_device = jax.devices()[0]
    peak, _ = common.peak_from_flag(args.peak_tflops, jax_device) if use_jax else (float("nan"), "")
    fields = {"jax_device": jax_device.device_kind, "jax_threads": THREADS or "default", "cpu_count": os.cpu_count(),
              **multihost.topology(), "precision": args.precision, "attention": args.attention or "xla"}
    if use_torch:
        torch, _ = import_torch()
        cuda = torch.cuda.is_available() and (jax_device.platform == "gpu" or not use_jax)
        torch_device = args.torch_device if args.torch_device != "auto" else ("cuda" if cuda else "cpu")
        fields.update(torch_device=torch_device, torch_threads=torch.get_num_threads())
        if torch_device == "cuda":
            fields["torch_device_name"] = torch.cuda.get_device_name()
    for name in args.presets.split(","):
        cfg = presets.model_config(name)
        common.apply_overrides(cfg, args.set)
        cfg.dtype = args.precision
        cfg.attention_implementation = args.attention
        batch = args.batch_tiny if name == "tiny" else args.batch_base
        mirror, variables = mirror_and_variables(cfg) if use_torch else (None, jax_variables(cfg))
        for mode in args.modes.split(","):
            base = {"model": f"part_fvit_{name}", "mode": mode, "batch": batch, **fields}
            t = None
            if use_torch:
                t = bench_torch(mirror, cfg, batch, args.iters, mode, torch_device, bf16=args.precision == "bfloat16")
                multihost.emit({**base, "framework": "torch", **_round(t)})
            if use_jax:
                j = _round(bench_jax(cfg, variables, batch, args.iters, mode, peak))
                if t is not None:
                    j.update(jax_over_torch=round(j["img_per_s"] / t["img_per_s"], 3),
                             jax_over_torch_cpu=round(j["img_per_cpu_s"] / t["img_per_cpu_s"], 3))
                multihost.emit({**base, "framework": "jax", **j})
    return 0


if __name__ == "__main__":
    sys.exit(main())
