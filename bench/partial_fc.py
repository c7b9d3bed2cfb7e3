"""Partial FC scaling: step time and per-device memory of a full fine-tuning step against C and r.

    python -m bench.partial_fc [--classes 10000,100000,1000000] [--rates 0.1,0.3,1.0] [--dim 128]
                               [--batch 64] [--steps 3] [--devices 8]
                               [--analyze 10000000x512] [--write-results]

The step is the one the fine-tuning loop runs, minus the real backbone: a linear "backbone"
(features [B, 64] @ K[64, D]) -> `partial_fc_loss` (CosFace, m3 = 0.4) -> gradients -> optax
(`optax.partition`: AdamW for the backbone, AdamW through `centers_optimizer(lazy=True)` for W, so
W carries two moments) -> new params. Everything is jitted once with donated params and optimiser
state; W and its moments stay sharded by rows over every device.

Per (C, r) it prints one JSON line: step ms (median of --steps timed steps after one warm-up),
and the compiled program's per-device memory from `memory_analysis()` (arguments, outputs,
temporaries, aliased donations; peak = arguments + outputs + temporaries − aliased). `--analyze
CxD` only compiles (abstract inputs, nothing allocated) and checks the layout at that size: W plus
optimiser state per device must be C_pad·D·3·4/N bytes, every input and output of C_pad rows must
be split N ways, and the compiled HLO must hold no array with C_pad rows (nothing of size C·D is
replicated or gathered). With --write-results the lines and the command go into the
`## Partial FC` section of bench/RESULTS.md.

On a CPU host, `--devices N` fakes N devices (XLA_FLAGS) before JAX starts; timings then share the
host's cores between the fake devices and are only comparable with each other.

Multi-host: one process per host with main.py's flags (--coordinator_address, --num_processes,
--process_id) or the JAX_* variables (bench/multihost.py); the step runs on every device of every
process, W split over all of them; only process 0 prints and writes.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, however it is run
import multihost  # noqa: E402  (imports jax, which reads XLA_FLAGS only when its backend starts)


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", default="10000,100000,1000000")
    p.add_argument("--rates", default="0.1,0.3,1.0")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--features", type=int, default=64, help="input width of the linear backbone")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (CPU hosts only)")
    p.add_argument("--analyze", default="", help="CxD[,CxD...]: compile-only layout and memory check")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--note", default="")
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                   help="the RESULTS.md to write (--write-results)")
    multihost.add_flags(p)
    return p.parse_args(argv)


ARGS = _parse_args(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={ARGS.devices}").strip()

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from lafs_jax.losses import partial_fc as pfc  # noqa: E402
from lafs_jax.sharding import batch_sharding, compiled_memory, make_mesh, replicated  # noqa: E402

import results_md  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SECTION = "## Partial FC"


def build_step(mesh, num_classes: int, rate: float):
    """(step, tx): the jitted full step and its optimiser."""
    tx = optax.partition({"backbone": optax.adamw(1e-3, weight_decay=0.05),
                          "centers": pfc.centers_optimizer(1e-3, kind="adamw", weight_decay=0.05, lazy=True)},
                         {"backbone": "backbone", "centers": "centers"})

    def step(params, opt_state, feats, labels, key):
        def loss_fn(p):
            return pfc.partial_fc_loss(feats @ p["backbone"]["kernel"], labels, p["centers"], key, mesh=mesh,
                                       num_classes=num_classes, sample_rate=rate, m3=0.4)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step, tx


def abstract_inputs(mesh, num_classes, dim, batch, features, tx):
    rows = pfc.padded_rows(num_classes, mesh)
    params = {"backbone": {"kernel": jax.ShapeDtypeStruct((features, dim), jnp.float32, sharding=replicated(mesh))},
              "centers": pfc.centers_abstract(rows, dim, mesh)}
    centers_sharding = pfc.centers_sharding(mesh)

    def state_sharding(leaf):
        return centers_sharding if leaf.shape[:1] == (rows,) else replicated(mesh)

    opt_shape = jax.eval_shape(tx.init, params)
    opt_state = jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, l.dtype, sharding=state_sharding(l)), opt_shape)
    bs = batch_sharding(mesh)
    feats = jax.ShapeDtypeStruct((batch, features), jnp.float32, sharding=bs)
    labels = {"label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bs),
              "label2": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bs),
              "lam": jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=bs)}
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))
    return params, opt_state, feats, labels, key, rows


def compile_step(mesh, num_classes, rate, dim, batch, features):
    step, tx = build_step(mesh, num_classes, rate)
    params, opt_state, feats, labels, key, rows = abstract_inputs(mesh, num_classes, dim, batch, features, tx)
    shardings = jax.tree.map(lambda a: a.sharding, (params, opt_state))
    jitted = jax.jit(step, donate_argnums=(0, 1), out_shardings=(*shardings, replicated(mesh)))
    compiled = jitted.lower(params, opt_state, feats, labels, key).compile()
    return compiled, tx, rows, shardings


def timed_run(mesh, num_classes, rate, dim, batch, features, steps) -> dict:
    compiled, tx, rows, (_, opt_shardings) = compile_step(mesh, num_classes, rate, dim, batch, features)
    # every process draws the same host arrays (same seeds) and places the shards of its own devices
    kernel = np.random.default_rng(0).normal(size=(features, dim)).astype(np.float32) * 0.1
    params = {"backbone": {"kernel": multihost.global_array(kernel, replicated(mesh))},
              "centers": pfc.init_centers(jax.random.key(0), num_classes, dim, mesh)}
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    rng = np.random.default_rng(1)
    bs = batch_sharding(mesh)
    feats = multihost.global_array(rng.normal(size=(batch, features)).astype(np.float32), bs)
    lab = rng.integers(0, num_classes, batch).astype(np.int32)
    labels = multihost.global_tree({"label": lab, "label2": lab, "lam": np.ones(batch, np.float32)}, bs)
    times, losses = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state, feats, labels, jax.random.key(i))
        loss = float(metrics["loss"])
        times.append(time.perf_counter() - t0)
        losses.append(round(loss, 4))
    return {"step_ms": round(1000 * float(np.median(times[1:])), 1), "first_step_ms": round(1000 * times[0], 1),
            "losses": losses, **{f"{k}_bytes": v for k, v in compiled_memory(compiled).items()}}


def write_results(lines: list[dict], command: str, note: str, path: str = RESULTS) -> None:
    """Replace (or add) the `## Partial FC` section of bench/RESULTS.md; other sections stay."""
    timed = [r for r in lines if r["kind"] == "step"]
    analyzed = [r for r in lines if r["kind"] == "analyze"]
    mib = lambda b: f"{b / 2 ** 20:,.1f}"  # noqa: E731
    parts = [SECTION, "",
             f"Date: {datetime.date.today().isoformat()}. Device: {lines[0]['device']}; host {platform.machine()}, "
             f"{os.cpu_count()} CPU cores shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end). "
             "Full step = linear backbone + Partial FC (CosFace) + grads + AdamW on both parts "
             "(W with two moments, lazy rows), jitted once with donation.", "",
             "```", command, "```", ""]
    if timed:
        parts += ["| C | D | r | global batch | step ms | peak MiB/device | args MiB | temp MiB | losses |",
                  "|---|---|---|---|---|---|---|---|---|"]
        parts += [f"| {r['num_classes']:,} | {r['dim']} | {r['sample_rate']} | {r['batch']} | {r['step_ms']} | "
                  f"{mib(r['peak_bytes'])} | {mib(r['argument_bytes'])} | {mib(r['temp_bytes'])} | "
                  f"{r['losses'][0]} → {r['losses'][-1]} |" for r in timed]
        parts.append("")
    for r in analyzed:
        parts += [f"Compile-only check at C = {r['num_classes']:,}, D = {r['dim']}, r = {r['sample_rate']}, "
                  f"{r['devices']} devices, global batch {r['batch']}: W + 2 Adam moments per device "
                  f"{mib(r['w_and_state_bytes_per_device'])} MiB (expected C_pad·D·3·4/N = "
                  f"{mib(r['expected_bytes'])} MiB); compiled per-device arguments {mib(r['argument_bytes'])} MiB, "
                  f"temporaries {mib(r['temp_bytes'])} MiB, peak {mib(r['peak_bytes'])} MiB; a replicated W alone "
                  f"would be {mib(r['replicated_w_bytes'])} MiB. Inputs of C_pad rows: {r['w_like_inputs']}, all split "
                  f"{r['devices']} ways: {not r['unsplit_inputs']}; arrays with C_pad rows in the partitioned "
                  f"HLO: {r['full_size_arrays_in_hlo']} (arrays of C_pad/N rows: {r['local_size_arrays_in_hlo']}).", ""]
    parts += ["JSON lines:", "", "```"] + [json.dumps(r) for r in lines] + ["```"]
    if note:
        parts += ["", note]
    section = "\n".join(parts)
    results_md.write_section(section, path)


def main(args) -> list[dict]:
    multihost.initialize(args)
    mesh = make_mesh()
    n = mesh.devices.size
    device = f"{n} x {jax.devices()[0].device_kind}"
    where = {"processes": jax.process_count()}
    lines = []
    if not args.skip_timing:
        for c in [int(float(v)) for v in args.classes.split(",") if v]:
            for rate in [float(v) for v in args.rates.split(",") if v]:
                r = {"kind": "step", "device": device, **where, "num_classes": c, "dim": args.dim, "sample_rate": rate,
                     "batch": args.batch, **timed_run(mesh, c, rate, args.dim, args.batch, args.features, args.steps)}
                multihost.emit(r)
                lines.append(r)
    for spec in [s for s in args.analyze.split(",") if s]:
        c, d = (int(float(v)) for v in spec.lower().split("x"))
        for rate in [float(v) for v in args.rates.split(",") if v]:
            compiled, _, rows, _ = compile_step(mesh, c, rate, d, args.batch, args.features)
            mem = compiled_memory(compiled)
            r = {"kind": "analyze", "device": device, **where, "devices": n, "num_classes": c, "dim": d,
                 "sample_rate": rate, "batch": args.batch, **{f"{k}_bytes": v for k, v in mem.items()},
                 "expected_bytes": rows * d * 3 * 4 // n, "replicated_w_bytes": rows * d * 4,
                 **pfc.centers_layout(compiled, rows, n)}
            multihost.emit(r)
            lines.append(r)
    if args.write_results and lines and multihost.is_main():
        argv = list(sys.argv[1:])
        for flag in ("--note", "--results"):  # prose and destination, not part of the measurement
            if flag in argv:
                i = argv.index(flag)
                del argv[i:i + 2]
        write_results(lines, "python -m bench.partial_fc " + shlex.join(argv), args.note, args.results)
    return lines


if __name__ == "__main__":
    main(ARGS)
