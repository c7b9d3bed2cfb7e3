"""Pretraining step speed: images/s per device and MFU of the DINO-face / LAFS step, tiny and base.

    python -m bench.pretrain [--presets tiny,base] [--methods lafs,dino,fra] [--batch tiny=16,base=2]
                             [--augment-on host[,device]] [--steps 3] [--peak-tflops auto] [--set model.x=y ...]
                             [--torch-mirror] [--threads N] [--write-results]
                             [--coordinator_address H:P --num_processes N --process_id I]

The step is exactly the one `lafs_jax.train.pretrain.run` trains (`build_train_step`: `ssl.build`, the
function run builds its step with: the method's objective, optimizer, shardings, donated state; a
fresh state from `init`; tests/test_pretrain.py checks that the two lower to the same HLO): LAFS =
frozen landmark CNN on every clean view + patch sampling + student on all views + teacher on the
global views + DINO loss + AdamW + EMA + centre; DINO-face = the same on grid patches of 2 x 112 px
+ L x 48 px crops; FRA (configs/fra.py, ResNet-50 at 224 px for base, the :tiny recipe's ResNet for
tiny; `--augment-on device` only, its recipe makes its views on the device) = online network and
predictors on both views + target on both views + BYOL / region / decorrelation / cluster losses +
LARS + EMA. Views per image as the recipe (2 global + 8 local for base; the :tiny recipe's
counts for tiny); `--set` overrides a recipe field (e.g. `model.attention_implementation=cudnn`).
Inputs are random normalised images (the input pipeline has its own benchmark, bench/input.py), so
this measures the accelerator side only.

`--augment-on host,device` measures each (preset, method) both ways in the same run: 'host' is the
base step fed ready views (float32, as the host pipeline makes them); 'device' is the same step fed
decoded uint8 images of `data.image_size` px + stream indices, which it first turns into the views
(lafs_jax.input.device_augment, `pretrain.device_views`). The 'device' line adds the step-time
ratio to the 'host' line (`augment_overhead`), the augmentation alone (jitted on the same batch:
`augment_ms`, XLA cost-analysis `augment_flops_per_step_per_device`), and the bytes per image
crossing to the device either way (`bytes_per_image`).

Multi-host: one process per host, with main.py's flags or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID (bench/multihost.py); the step runs on every device of every
process (each feeds its own rows of the global batch, as the loop does) and only process 0 prints
and writes.

`--profile DIR` records a jax.profiler trace of two more steps per (preset, method) and adds the
dominant kernels to the line.

Per (preset, method) one JSON line: step ms (median of --steps timed steps after a compiling one),
images/s (global and per device: an image = all its views), the XLA cost-analysis FLOPs of the
compiled step (per device program), achieved TFLOP/s and MFU = FLOPs / step time / assumed peak,
the compiled program's peak bytes and (GPU/TPU) the allocator's peak bytes in use.
The assumed peak (`--peak-tflops`) defaults to the device's dense peak: for a CPU host
cores x clock x 32 FP32 FLOP/cycle (two 256-bit FMA pipes; AVX-512 units on Zen 4 are double-pumped
256-bit, so 32 is the honest figure there too); H100 / H200 SXM bf16 989 TFLOP/s, A100 bf16 312.
Compute dtype follows the recipe's `precision = 'auto'` (fp32 on CPU, bf16 on GPU/TPU).

`--torch-mirror` (FRA only) also times the PyTorch mirror of the official FRAB (tests/fra_torch_mirror.py,
imported the way bench/model.py imports tests/torch_mirror.py, only when asked) on the same per-device
batch on the CPU, float32: forward of both networks on both views, the loss, backward, an SGD-momentum
update with weight decay (LARS's per-layer trust ratio is a few elementwise ops per tensor, not in the
mirror) and the EMA of the target; one line `pretrain_fra_{preset}_torch` (its FLOPs and MFU are the
JAX step's XLA count, the same model), and the JAX line gains `jax_over_torch` (the ratio of
images/s per device). The mirror is fed ready normalised views (no augmentation), so the JAX line's
step, which augments on the device, is the more loaded of the two. `--threads N` runs both frameworks
on N threads (bench/threads.py; 1 = XLA:CPU single-threaded too), the fair comparison on a shared CPU.

With --write-results the lines and the command replace the `## Pretraining` section of
bench/RESULTS.md (or --results PATH; re-read just before writing; other sections stay).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, however it is run
from threads import THREADS, single_thread_xla  # noqa: E402  (before jax and torch)

if THREADS == 1:
    single_thread_xla()

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the PyTorch mirror (--torch-mirror)
import common  # noqa: E402
import multihost  # noqa: E402
import results_md  # noqa: E402
from lafs_jax import sharding as mesh_lib  # noqa: E402
from lafs_jax.models import presets  # noqa: E402
from lafs_jax.train import pretrain  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
SECTION = "## Pretraining"


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,base")
    p.add_argument("--methods", default="lafs,dino")
    p.add_argument("--batch", default="tiny=16,base=2",
                   help="images per device per preset, e.g. tiny=16,base=2; base=128/64 falls back on out-of-memory")
    p.add_argument("--augment-on", default="host",
                   help="comma list: host (step fed ready views), device (views made in the step)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the compiling one")
    p.add_argument("--peak-tflops", default="auto", help="assumed peak per device (TFLOP/s), or 'auto'")
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--note", default="", help="a sentence for RESULTS.md (machine load, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. model.attention_implementation=cudnn (repeatable)")
    p.add_argument("--results", default=RESULTS, help="the RESULTS.md to write (--write-results)")
    p.add_argument("--torch-mirror", action="store_true",
                   help="FRA: also time the PyTorch mirror's step on the same batch (CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both frameworks (default: theirs)")
    p.add_argument("--profile", default="", help="write a jax.profiler trace of 2 more steps here and summarise it")
    multihost.add_flags(p)
    return p.parse_args(argv)


def recipe(method: str, preset: str):
    path = "configs/fra.py" if method == "fra" else f"configs/{method}_pretrain.py"  # fra: --augment-on device
    return common.load_recipe(path + (":tiny" if preset == "tiny" else ""))


def random_batch(config, batch: int, rng):
    if config.data.augment_on == "device":  # decoded images + stream indices
        s = config.data.image_size
        return {"image": rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8),
                "index": rng.integers(0, 1 << 30, batch).astype(np.int32),
                "label": rng.integers(0, 1000, batch).astype(np.int32)}

    def images(n, size):
        return rng.uniform(-1, 1, (batch, n, size, size, 3)).astype(np.float32)

    label = rng.integers(0, 1000, batch).astype(np.int32)  # the pipeline's identity labels (unused by the step)
    if config.method == "dino":
        d = config.data.dino
        return {"global": images(d.global_crops, d.global_size), "local": images(d.local_crops, d.local_size),
                "label": label}
    v = config.data.lafs
    g, l = images(v.global_views, v.view_size), images(v.local_views, v.view_size)
    return {"global_clean": g, "global_aug": g.copy(), "local_clean": l, "local_aug": l.copy(), "label": label}


def views_per_image(config) -> int:
    if config.method == "fra":
        return 2
    if config.method == "dino":
        return config.data.dino.global_crops + config.data.dino.local_crops
    return config.data.lafs.global_views + config.data.lafs.local_views


def _timed(fn, steps: int) -> float:
    """Median seconds of `steps` calls of fn() (blocked), after one untimed call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def augment_cost(config, mesh, batch, steps: int) -> dict:
    """The device augmentation alone on the step's decoded batch: median ms and XLA FLOPs (per device)."""
    fn = jax.jit(lambda b: pretrain.device_views(config, jax.random.key(0), b),
                 in_shardings=(mesh_lib.batch_sharding(mesh),), out_shardings=mesh_lib.batch_sharding(mesh))
    compiled = fn.lower(batch).compile()
    return {"augment_ms": round(1e3 * _timed(lambda: compiled(batch), steps), 1),
            "augment_flops_per_step_per_device": common.flops_of(compiled)}


def measure(method: str, preset: str, per_device_batch: int, steps: int, peak_tflops: float,
            overrides: list[str] = (), profile: str = "", augment_on: str = "host") -> dict:
    """Time `pretrain.build_train_step`'s step (run's step) on every device of every process."""
    config = recipe(method, preset)
    common.apply_overrides(config, list(overrides))
    config.data.augment_on = augment_on
    mesh = mesh_lib.make_mesh(config.mesh)
    n_dev = mesh.devices.size
    config.batch_size = per_device_batch * n_dev
    steps_per_epoch, total_steps = 100, 100 * config.optim.epochs
    step, args, _, init = pretrain.build_train_step(config, mesh, steps_per_epoch=steps_per_epoch,
                                                    total_steps=total_steps)
    state = init(jax.random.key(0))
    local = mesh_lib.local_batch_size(config.batch_size, mesh)
    rng = np.random.default_rng(jax.process_index())  # each process feeds its own rows, as the loop does
    host_batch = random_batch(config, local, rng)
    bytes_per_image = sum(a.nbytes for a in host_batch.values()) / local
    batch = mesh_lib.global_batch(host_batch, mesh)

    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    flops = common.flops_of(compiled)

    state, metrics = compiled(state, batch, jax.random.key(0))  # warm-up (first execution)
    jax.block_until_ready(metrics["loss"])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, jax.random.key(i + 1))
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    summary = None
    if profile:  # two more steps under jax.profiler, summarised by kernel
        with jax.profiler.trace(profile):
            for i in range(2):
                state, metrics = compiled(state, batch, jax.random.key(steps + 1 + i))
            jax.block_until_ready((state, metrics))
        summary = common.trace_summary(profile)
    device = jax.devices()[0]
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(args[0]["student"]))
    augment = augment_cost(config, mesh, batch, steps) if augment_on == "device" else {}
    return {
        "name": f"pretrain_{method}_{preset}", "augment_on": augment_on, "device": f"{n_dev} x {device.device_kind}",
        **multihost.topology(), "overrides": list(overrides),
        "precision": presets.with_precision(config.model, config.precision).dtype, "per_device_batch": per_device_batch,
        "views_per_image": views_per_image(config), "student_params": params,
        "step_ms": round(1e3 * step_s, 1), "img_per_sec": round(config.batch_size / step_s, 2),
        "img_per_sec_per_device": round(per_device_batch / step_s, 2),
        "flops_per_step_per_device": flops, "tflops_per_sec_per_device": round(flops / step_s / 1e12, 4),
        "assumed_peak_tflops": round(peak_tflops, 3), "mfu": round(flops / step_s / (peak_tflops * 1e12), 4),
        "compile_s": round(compile_s, 1), "peak_bytes": common.compiled_peak_bytes(compiled),
        "device_peak_bytes": common.device_peak_bytes(jax.local_devices()[0]),
        "loss": round(float(metrics["loss"]), 4), "bytes_per_image": int(bytes_per_image), **augment,
        **({"profile": summary} if summary else {}),
    }


def import_torch():
    """torch and the FRA mirror, imported only when the PyTorch side runs (a JAX-only process never loads
    torch), on --threads threads."""
    import torch  # noqa: PLC0415  (optional heavy dependency, see the docstring)
    import fra_torch_mirror  # noqa: PLC0415

    if THREADS:
        torch.set_num_threads(THREADS)
        torch.set_num_interop_threads(THREADS)
    return torch, fra_torch_mirror


def measure_torch_fra(preset: str, per_device_batch: int, steps: int, jax_line: dict,
                      overrides: list[str] = ()) -> dict:
    """The PyTorch mirror's FRA step (FRAB forward, loss, backward, SGD momentum + weight decay, target EMA)
    on `per_device_batch` pairs of normalised views [B, 3, S, S], float32 on the CPU; median of `steps`
    timed steps after one untimed."""
    torch, mirror = import_torch()
    config = recipe("fra", preset)
    common.apply_overrides(config, list(overrides))
    r, f = config.model.resnet, config.fra
    block = mirror.Bottleneck if r.block == "bottleneck" else mirror.BasicBlock
    torch.manual_seed(0)
    net = mirror.FRAB(mirror.ResNet(block, tuple(r.layers), width=r.width), hidden=f.hidden_dim, out=f.out_dim,
                      queries=f.num_proto, dropout=f.dropout, layers=f.decoder_layers, heads=f.heads,
                      teacher_temp=f.teacher_temp, student_temp=f.student_temp, w_cluster=f.cluster_weight,
                      w_dec=f.decorrelation_weight, loss_weight=f.loss_weight)
    net.train()
    online = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(online, lr=0.01, momentum=0.9, weight_decay=config.optim.weight_decay)
    pairs = list(zip(net.online_net.parameters(), net.target_net.parameters()))
    g = torch.Generator().manual_seed(0)
    v1, v2 = (torch.randn(per_device_batch, 3, f.view_size, f.view_size, generator=g) for _ in range(2))

    def one_step():
        out = net(v1, v2)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        with torch.no_grad():
            for po, pt in pairs:
                pt.mul_(f.momentum).add_(po.detach(), alpha=1 - f.momentum)
        return out["loss"]

    one_step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = one_step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops, peak = jax_line["flops_per_step_per_device"], jax_line["assumed_peak_tflops"]
    return {
        "name": f"pretrain_fra_{preset}_torch", "augment_on": "none (ready views)", "device": "1 x cpu (torch)",
        "overrides": list(overrides), "precision": "float32", "per_device_batch": per_device_batch,
        "views_per_image": 2, "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "step_ms": round(1e3 * step_s, 1), "img_per_sec_per_device": round(per_device_batch / step_s, 2),
        "flops_per_step_per_device": flops, "tflops_per_sec_per_device": round(flops / step_s / 1e12, 4),
        "assumed_peak_tflops": peak, "mfu": round(flops / step_s / (peak * 1e12), 4), "compile_s": 0.0,
        "loss": round(float(loss.detach()), 4),
    }


def write_results(lines: list[dict], command: str, peak_note: str, note: str, path: str = RESULTS) -> None:
    """Replace (or add) the `## Pretraining` section of bench/RESULTS.md."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    parts = [SECTION, "",
             f"Date: {datetime.date.today().isoformat()}. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"load average {load:.1f} when written. Assumed peak: {peak_note}.", "", "Command:", "", "```",
             command, "```", "",
             "| step | augment_on | device | precision | batch/device | views/image | step ms | img/s/device "
             "| GFLOP/step/device | TFLOP/s | MFU | compile s | bytes/image in | augment: ms alone, GFLOP, step x |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in lines:
        aug = (f"{r['augment_ms']} ms, {r['augment_flops_per_step_per_device'] / 1e9:.2f}, "
               f"x{r.get('augment_overhead', '-')}" if "augment_ms" in r else "")
        parts.append(f"| {r['name']} | {r.get('augment_on', 'host')} | {r['device']} | {r['precision']} | "
                     f"{r['per_device_batch']} | {r['views_per_image']} | {r['step_ms']} | {r['img_per_sec_per_device']} | "
                     f"{r['flops_per_step_per_device'] / 1e9:.1f} | {r['tflops_per_sec_per_device']} | "
                     f"{100 * r['mfu']:.1f}% | {r['compile_s']} | {r.get('bytes_per_image', '')} | {aug} |")
    if note:
        parts += ["", note]
    parts += ["", "JSON lines:", "", "```"] + [json.dumps(r) for r in lines] + ["```"]
    section = "\n".join(parts)
    results_md.write_section(section, path)


def main(argv) -> list[dict]:
    args = _parse_args(argv)
    multihost.initialize(args)
    batches = dict(item.split("=") for item in args.batch.split(","))
    if args.torch_mirror and "fra" not in args.methods.split(","):
        raise SystemExit("--torch-mirror times FRA's mirror: add fra to --methods")
    device = jax.devices()[0]
    peak, peak_note = common.peak_from_flag(args.peak_tflops, device)
    lines = []
    for preset in args.presets.split(","):
        for method in args.methods.split(","):
            host_line = None
            augment_ons = args.augment_on.split(",")
            for augment_on in augment_ons:
                line = common.first_batch_that_fits(
                    common.parse_batches(batches[preset]),
                    lambda b: measure(method, preset, b, args.steps, peak, args.set,
                                      os.path.join(args.profile, f"{method}_{preset}_{augment_on}") if args.profile
                                      else "", augment_on))
                if augment_on == "host":
                    host_line = line
                elif host_line is not None and host_line["per_device_batch"] == line["per_device_batch"]:
                    line["augment_overhead"] = round(line["step_ms"] / host_line["step_ms"], 3)
                ref = None
                if args.torch_mirror and method == "fra" and augment_on == augment_ons[-1]:
                    ref = measure_torch_fra(preset, line["per_device_batch"], args.steps, line, args.set)
                    line["jax_over_torch"] = round(line["img_per_sec_per_device"] / ref["img_per_sec_per_device"], 3)
                for out in (line, ref) if ref else (line,):
                    multihost.emit(out)
                    lines.append(out)
    if args.write_results and multihost.is_main():
        shown = [a for a in argv if a != "--write-results"]
        for flag in ("--note", "--results"):
            if flag in shown:
                i = shown.index(flag)
                del shown[i:i + 2]
        write_results(lines, "python -m bench.pretrain " + " ".join(shlex.quote(a) for a in shown), peak_note,
                      args.note, args.results)
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
