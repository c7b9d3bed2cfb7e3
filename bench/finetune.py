"""Fine-tuning step speed: images/s per device and MFU of the real fine-tuning step (Part fViT + Partial FC).

    python -m bench.finetune [--recipe configs/finetune.py:webface4m] [--num-classes 1000000]
                             [--sample-rate 0.1] [--batch 64] [--steps 6] [--precision auto]
                             [--set model.attention_implementation=cudnn ...] [--peak-tflops auto]
                             [--profile DIR] [--write-results] [--results PATH]
                             [--coordinator_address H:P --num_processes N --process_id I]

The step is `lafs_jax.train.finetune.build_train_step`'s, i.e. run's: backbone forward + backward in
train mode, Partial FC margin softmax with W[C, D] split by rows over every device and `--sample-rate`
of the classes per step, AdamW with layer-wise decay on the backbone, W's own AdamW with lazy rows,
gradient accumulation as the recipe sets it (each call is one micro-batch), donated state. The state is
a fresh one (`init`), the batch random normalised images with random labels (`--batch` per device;
each process feeds its own rows, as the loop does). Compute dtype: --precision auto = bfloat16 on
GPU/TPU, float32 on CPU (config.model.dtype, and config.precision where the recipe has one).

One JSON line: step ms (mean over --steps calls after a compiling one, a multiple of accum_steps so
skipped and applied updates are both in it), images/s per device, XLA cost-analysis FLOPs of the
per-device program, achieved TFLOP/s and MFU against the device's dense peak (bench/common.py), the
compiled program's bytes, the allocator's peak bytes (GPU/TPU) and the losses. `--profile DIR`
records a jax.profiler trace of two more steps and adds the dominant kernels to the line.

Multi-host: one process per host with main.py's flags or the JAX_* variables (bench/multihost.py);
only process 0 prints and writes. --write-results replaces the `## Fine-tuning step` section.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, however it is run
sys.path.insert(0, ROOT)
import common  # noqa: E402
import multihost  # noqa: E402
import results_md  # noqa: E402
from lafs_jax.train import finetune  # noqa: E402
from lafs_jax import sharding as mesh_lib  # noqa: E402

SECTION = "## Fine-tuning step"
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="configs/finetune.py:webface4m")
    p.add_argument("--num-classes", type=int, default=1_000_000)
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--batch", default="64", help="images per device; '256/128': fall back on out-of-memory")
    p.add_argument("--steps", type=int, default=6, help="timed calls (rounded up to a multiple of accum_steps)")
    p.add_argument("--precision", default="auto", choices=("auto", "bfloat16", "float32"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--peak-tflops", default="auto")
    p.add_argument("--profile", default="", help="write a jax.profiler trace of 2 steps here and summarise it")
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--note", default="")
    multihost.add_flags(p)
    return p.parse_args(argv)


def configure(args, platform_name: str):
    config = common.load_recipe(args.recipe)
    common.apply_overrides(config, args.set)
    dtype = args.precision if args.precision != "auto" else ("float32" if platform_name == "cpu" else "bfloat16")
    config.model.dtype = dtype
    if "precision" in config:
        config.precision = dtype
    config.loss.sample_rate = float(args.sample_rate)
    # evaluation sets and init directories are files the step never reads
    config.eval.bins = ()
    config.init.backbone = config.init.landmark_cnn = config.landmark_reg.teacher = ""
    return config, dtype


def random_batch(config, rows: int, num_classes: int, rng) -> dict:
    size = config.model.image_size
    label = rng.integers(0, num_classes, rows).astype(np.int32)
    return {"image": rng.uniform(-1, 1, (rows, size, size, config.model.channels)).astype(np.float32),
            "label": label, "label2": label.copy(), "lam": np.ones(rows, np.float32)}


def measure(args, per_device: int, peak_tflops: float) -> dict:
    device = jax.devices()[0]
    config, dtype = configure(args, device.platform)
    mesh = mesh_lib.make_mesh(config.mesh)
    n_dev = mesh.devices.size
    config.batch_size = per_device * n_dev
    finetune.validate(config)
    accum = config.optim.accum_steps
    steps_per_epoch = common.schedule_steps_per_epoch(config)
    total = config.total_steps if config.total_steps > 0 else int(round(config.optim.epochs * steps_per_epoch))
    step, abstract, _, init = finetune.build_train_step(config, mesh, args.num_classes,
                                                        steps_per_epoch=steps_per_epoch, total_steps=total)
    state = init(jax.random.key(config.seed))
    rng = np.random.default_rng(jax.process_index())
    local = mesh_lib.local_batch_size(config.batch_size, mesh)
    batch = mesh_lib.global_batch(random_batch(config, local, args.num_classes, rng), mesh)
    # the methods' constants and per-step inputs ({method: tree}; e.g. a loss term's teacher and weight), zeros
    constants, inputs = jax.jit(lambda: jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype), (abstract[1], abstract[3])),
                                out_shardings=mesh_lib.replicated(mesh))()

    t0 = time.perf_counter()
    compiled = step.lower(*abstract).compile()
    compile_s = time.perf_counter() - t0
    flops = common.flops_of(compiled)
    losses = []

    def call(_):
        nonlocal state
        state, metrics = compiled(state, constants, batch, inputs)
        return metrics

    losses.append(float(call(0)["loss"]))  # first execution (allocations, autotuning)
    timed = -(-max(1, args.steps) // accum) * accum
    _, mean_s = common.time_calls(call, timed)
    losses.append(float(call(0)["loss"]))
    line = {"name": f"finetune_{config.model.kind}_{config.model.preset}", "recipe": args.recipe,
            "device": f"{n_dev} x {device.device_kind}", **multihost.topology(), "overrides": args.set,
            "precision": dtype, "attention": config.model.attention_implementation or "xla",
            "per_device_batch": per_device, "num_classes": args.num_classes, "sample_rate": args.sample_rate,
            "accum_steps": accum, "step_ms": round(1e3 * mean_s, 2), "img_per_sec_per_device": round(per_device / mean_s, 2),
            "flops_per_step_per_device": flops, "tflops_per_sec_per_device": round(flops / mean_s / 1e12, 4),
            "assumed_peak_tflops": peak_tflops, "mfu": round(flops / mean_s / (peak_tflops * 1e12), 4),
            "compile_s": round(compile_s, 1), "compiled_bytes": common.compiled_peak_bytes(compiled),
            "device_peak_bytes": common.device_peak_bytes(jax.local_devices()[0]),
            "losses": [round(v, 4) for v in losses]}
    if args.profile:
        with jax.profiler.trace(args.profile):
            jax.block_until_ready([call(i) for i in range(2)])
        line["profile"] = common.trace_summary(args.profile)
    return line


def write_results(line: dict, command: str, peak_note: str, note: str, path: str) -> None:
    mib = (line["device_peak_bytes"] or line["compiled_bytes"] or 0) / 2 ** 20
    parts = [SECTION, "",
             f"Date: {datetime.date.today().isoformat()}. Device: {line['device']} ({line['processes']} process(es)); "
             f"host {platform.machine()} with {os.cpu_count()} CPU cores. Peak: {peak_note}.", "",
             "```", command, "```", "",
             "| step | precision | attention | batch/device | C | r | step ms | img/s/device | TFLOP/s | MFU | "
             "peak MiB | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {line['name']} | {line['precision']} | {line['attention']} | {line['per_device_batch']} | "
             f"{line['num_classes']:,} | {line['sample_rate']} | {line['step_ms']} | {line['img_per_sec_per_device']} | "
             f"{line['tflops_per_sec_per_device']} | {100 * line['mfu']:.1f}% | {mib:,.0f} | {line['compile_s']} |"]
    if note:
        parts += ["", note]
    parts += ["", "JSON line:", "", "```", json.dumps(line), "```"]
    results_md.write_section("\n".join(parts), path)


def main(argv) -> dict:
    args = parse_args(argv)
    multihost.initialize(args)
    peak, peak_note = common.peak_from_flag(args.peak_tflops, jax.devices()[0])
    line = common.first_batch_that_fits(common.parse_batches(args.batch), lambda b: measure(args, b, peak))
    multihost.emit(line)
    if args.write_results and multihost.is_main():
        shown = list(argv)
        for flag in ("--note", "--results"):
            if flag in shown:
                i = shown.index(flag)
                del shown[i:i + 2]
        shown = [a for a in shown if a != "--write-results"]
        write_results(line, "python -m bench.finetune " + shlex.join(shown), peak_note, args.note, args.results)
    return line


if __name__ == "__main__":
    main(sys.argv[1:])
