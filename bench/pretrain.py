"""Pretraining step speed: images/s per device and MFU of the DINO-face / LAFS step, tiny and base.

    python -m bench.pretrain [--presets tiny,base] [--methods lafs,dino] [--batch tiny=16,base=2]
                             [--steps 3] [--peak-tflops auto] [--write-results]

The step is exactly `lafs_jax.train.pretrain`'s (make_train_step + jit_step with its shardings,
donated state): LAFS = frozen landmark CNN on every clean view + patch sampling + student on all
views + teacher on the global views + DINO loss + AdamW + EMA + centre; DINO-face = the same on
grid patches of 2 x 112 px + L x 48 px crops. Views per image as the recipe (2 global + 8 local for
base; the :tiny recipe's counts for tiny). Inputs are random normalised images (the input pipeline
has its own benchmark, bench/input.py), so this measures the accelerator side only.

Per (preset, method) one JSON line: step ms (median of --steps timed steps after a compiling one),
images/s (global and per device: an image = all its views), the XLA cost-analysis FLOPs of the
compiled step (per device program), achieved TFLOP/s and MFU = FLOPs / step time / assumed peak.
The assumed peak (`--peak-tflops`) defaults to the device's dense peak: for a CPU host
cores x clock x 32 FP32 FLOP/cycle (two 256-bit FMA pipes; AVX-512 units on Zen 4 are double-pumped
256-bit, so 32 is the honest figure there too); H100 SXM bf16 989 TFLOP/s, A100 bf16 312.
Compute dtype follows the recipe's `precision = 'auto'` (fp32 on CPU, bf16 on GPU/TPU).

With --write-results the lines and the command replace the `## Pretraining` section of
bench/RESULTS.md (re-read just before writing; other sections stay).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, however it is run
import results_md  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
SECTION = "## Pretraining"
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,base")
    p.add_argument("--methods", default="lafs,dino")
    p.add_argument("--batch", default="tiny=16,base=2", help="images per device per preset, e.g. tiny=16,base=2")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the compiling one")
    p.add_argument("--peak-tflops", default="auto", help="assumed peak per device (TFLOP/s), or 'auto'")
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--note", default="", help="a sentence for RESULTS.md (machine load, ...)")
    return p.parse_args(argv)


def assumed_peak_tflops(device) -> tuple[float, str]:
    """(peak TFLOP/s per device, how it was derived)."""
    if device.platform == "cpu":
        cores = os.cpu_count() or 1
        try:
            with open("/proc/cpuinfo") as f:
                ghz = max(float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", f.read())) / 1e3
            source = ""
        except (OSError, ValueError) as e:  # no /proc/cpuinfo or no MHz line: assume 2.5 GHz and say so
            ghz, source = 2.5, f" (clock assumed: /proc/cpuinfo unreadable: {e})"
        return cores * ghz * 32 / 1e3, f"{cores} cores x {ghz:.2f} GHz x 32 FP32 FLOP/cycle{source}"
    for name, tflops in GPU_PEAK_TFLOPS.items():
        if name in device.device_kind:
            return tflops, f"{device.device_kind} dense bf16"
    raise SystemExit(f"no known peak for {device.device_kind!r}: pass --peak-tflops")


def recipe(method: str, preset: str):
    path = os.path.join(ROOT, "configs", f"{method}_pretrain.py")
    spec = importlib.util.spec_from_file_location(f"recipe_{method}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny" if preset == "tiny" else None)


def random_batch(config, batch: int, rng):
    import numpy as np

    def images(n, size):
        return rng.uniform(-1, 1, (batch, n, size, size, 3)).astype(np.float32)

    if config.method == "dino":
        d = config.data.dino
        return {"global": images(d.global_crops, d.global_size), "local": images(d.local_crops, d.local_size)}
    v = config.data.lafs
    g, l = images(v.global_views, v.view_size), images(v.local_views, v.view_size)
    return {"global_clean": g, "global_aug": g.copy(), "local_clean": l, "local_aug": l.copy()}


def views_per_image(config) -> int:
    if config.method == "dino":
        return config.data.dino.global_crops + config.data.dino.local_crops
    return config.data.lafs.global_views + config.data.lafs.local_views


def measure(method: str, preset: str, per_device_batch: int, steps: int, peak_tflops: float) -> dict:
    import jax
    import numpy as np

    from lafs_jax import sharding as mesh_lib
    from lafs_jax.models import presets
    from lafs_jax.train import optim as optim_lib
    from lafs_jax.train import pretrain

    config = recipe(method, preset)
    mesh = mesh_lib.make_mesh(config.mesh)
    n_dev = mesh.devices.size
    config.unlock()
    config.batch_size = per_device_batch * n_dev
    config.lock()
    steps_per_epoch, total_steps = 100, 100 * config.optim.epochs
    networks = pretrain.build_networks(config)
    lm = None
    if method == "lafs":
        size = config.model.image_size
        lm = jax.device_get(jax.jit(lambda k: networks.landmark_cnn.init(
            {"params": k}, jax.numpy.zeros((1, size, size, 3)), train=False))(jax.random.key(1)))
    abstract_student = jax.eval_shape(lambda k: pretrain.init_student(networks, config, k), jax.random.key(0))
    tx = optim_lib.pretrain_optimizer(abstract_student, config.optim, steps_per_epoch, total_steps=total_steps,
                                      global_batch_size=config.batch_size)
    init_fn = lambda key, lm_: pretrain.init_state(networks, config, tx, key, lm_)
    shardings = pretrain.state_shardings(jax.eval_shape(init_fn, jax.random.key(0), lm), config, mesh)
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0), lm)
    step = pretrain.jit_step(pretrain.make_train_step(networks, config, tx, steps_per_epoch=steps_per_epoch,
                                                      total_steps=total_steps), shardings, mesh)
    batch = mesh_lib.global_batch(random_batch(config, config.batch_size, np.random.default_rng(0)), mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    mem = compiled.memory_analysis()

    state, metrics = compiled(state, batch, jax.random.key(0))  # warm-up (first execution)
    jax.block_until_ready(metrics["loss"])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, jax.random.key(i + 1))
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    device = jax.devices()[0]
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_student))
    return {
        "name": f"pretrain_{method}_{preset}", "device": f"{n_dev} x {device.device_kind}",
        "precision": presets.with_precision(config.model, config.precision).dtype, "per_device_batch": per_device_batch,
        "views_per_image": views_per_image(config), "student_params": params,
        "step_ms": round(1e3 * step_s, 1), "img_per_sec": round(config.batch_size / step_s, 2),
        "img_per_sec_per_device": round(per_device_batch / step_s, 2),
        "flops_per_step_per_device": flops, "tflops_per_sec_per_device": round(flops / step_s / 1e12, 4),
        "assumed_peak_tflops": round(peak_tflops, 3), "mfu": round(flops / step_s / (peak_tflops * 1e12), 4),
        "compile_s": round(compile_s, 1), "peak_bytes": int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
        if mem is not None else None, "loss": round(float(metrics["loss"]), 4),
    }


def write_results(lines: list[dict], command: str, peak_note: str, note: str) -> None:
    """Replace (or add) the `## Pretraining` section of bench/RESULTS.md."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    parts = [SECTION, "",
             f"Date: {datetime.date.today().isoformat()}. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"load average {load:.1f} when written. Assumed peak: {peak_note}.", "", "Command:", "", "```",
             command, "```", "",
             "| step | device | precision | batch/device | views/image | step ms | img/s/device | GFLOP/step/device "
             "| TFLOP/s | MFU | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in lines:
        parts.append(f"| {r['name']} | {r['device']} | {r['precision']} | {r['per_device_batch']} | "
                     f"{r['views_per_image']} | {r['step_ms']} | {r['img_per_sec_per_device']} | "
                     f"{r['flops_per_step_per_device'] / 1e9:.1f} | {r['tflops_per_sec_per_device']} | "
                     f"{100 * r['mfu']:.1f}% | {r['compile_s']} |")
    if note:
        parts += ["", note]
    parts += ["", "JSON lines:", "", "```"] + [json.dumps(r) for r in lines] + ["```"]
    section = "\n".join(parts)
    results_md.write_section(section, RESULTS)


def main(argv) -> list[dict]:
    args = _parse_args(argv)
    sys.path.insert(0, ROOT)
    import jax

    batches = dict(item.split("=") for item in args.batch.split(","))
    device = jax.devices()[0]
    if args.peak_tflops == "auto":
        peak, peak_note = assumed_peak_tflops(device)
    else:
        peak, peak_note = float(args.peak_tflops), f"{args.peak_tflops} TFLOP/s per device (given)"
    lines = []
    for preset in args.presets.split(","):
        for method in args.methods.split(","):
            line = measure(method, preset, int(batches[preset]), args.steps, peak)
            print(json.dumps(line), flush=True)
            lines.append(line)
    if args.write_results:
        shown = [a for a in argv if a != "--write-results"]
        if "--note" in shown:
            i = shown.index("--note")
            del shown[i:i + 2]
        write_results(lines, "python -m bench.pretrain " + " ".join(shlex.quote(a) for a in shown), peak_note,
                      args.note)
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
