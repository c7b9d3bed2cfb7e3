"""LVFace ViT-L per-device memory: replicated vs FSDP (`sharding_rules = FSDP_RULES`), with and without
`model.remat`, from the ahead-of-time compiled fine-tuning step on N fake CPU devices.

    python -m bench.lvface_memory [--size l] [--depth 24] [--devices 8] [--batch 64] [--classes 100000]
                                  [--precision float32] [--write-results]

The step is `lafs_jax.train.finetune.build_train_step` of `configs/lvface.py:SIZE` (curriculum phase 0:
ArcFace + Partial FC r = 0.3, AdamW on the backbone and on W), lowered with abstract arguments and
compiled; nothing is allocated. Per variant it reports the bytes one device holds of the backbone's
parameters + AdamW moments (`sharding.per_device_bytes` of the state's shardings: params/backbone and
every optimizer leaf that is not W's), W + its moments + the prototype buffer (split by rows in every
variant), XLA's `memory_analysis()` of the compiled step (arguments, temporaries, peak), and the
activations the backward pass keeps per device (the backbone's saved residuals at the per-device
batch, `jax.ad_checkpoint` residuals; traced, not compiled), which is what `model.remat` cuts: XLA's
CPU scheduler is not memory-aware, so the CPU compile's temporaries do not show remat's saving (the
recomputation can be scheduled early), while GPU / TPU schedulers keep it. `--reuse LOG` takes the
compiled numbers of matching JSON lines of an earlier run's output instead of compiling again. With
--write-results the table and the command go into the `## LVFace ViT-L memory` section of
bench/RESULTS.md. The goal (issue 22): FSDP on 8 devices keeps parameters + optimizer bytes per device
at most 1/6 of the replicated size.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, however it is run
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="l", choices=["t", "s", "b", "l"])
    p.add_argument("--depth", type=int, default=0, help="blocks (0 = the size's own)")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (CPU hosts only)")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reuse", default="", help="output of an earlier run: its JSON lines' compiled numbers")
    p.add_argument("--write-results", action="store_true")
    return p.parse_args(argv)


ARGS = _parse_args(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={ARGS.devices}").strip()

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402  (jax 0.10 exports only print_saved_residuals)

from configs import lvface  # noqa: E402
from lafs_jax import sharding as mesh_lib  # noqa: E402
from lafs_jax.losses import partial_fc  # noqa: E402
from lafs_jax.models import presets  # noqa: E402
from lafs_jax.train import finetune  # noqa: E402

import results_md  # noqa: E402

SECTION = "## LVFace ViT-L memory"
MIB = 2 ** 20


def activation_bytes(model_cfg, batch: int) -> int:
    """Bytes of the residuals the backbone's backward pass keeps for `batch` images (train mode)."""
    model = presets.build_model(model_cfg)
    v = presets.abstract_variables(model_cfg)
    x = jax.ShapeDtypeStruct((batch, model_cfg.image_size, model_cfg.image_size, 3), jnp.float32)

    def loss(params, images, stats):
        (emb, _), _ = model.apply({"params": params, "batch_stats": stats}, images, train=True,
                                  rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
        return jnp.sum(emb ** 2)

    res = saved_residuals(loss, v["params"], x, v["batch_stats"])
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, src in res
               if "argument" not in str(src) and jnp.issubdtype(a.dtype, jnp.number))


def measure(size: str, depth: int, batch: int, classes: int, precision: str, fsdp: bool, remat: bool,
            reuse: dict | None = None) -> dict:
    """Per-device bytes of one variant (see the module docstring)."""
    config = lvface.get_config(size)
    if depth:
        config.model.depth = depth
    config.sharding_rules = mesh_lib.FSDP_RULES if fsdp else ()
    config.model.remat = remat
    config.batch_size, config.precision = batch, precision
    config.eval.bins = ()
    mesh = mesh_lib.make_mesh()
    step, args, _, _ = finetune.build_train_step(config, mesh, classes, steps_per_epoch=1000, total_steps=100_000)
    state = args[0]
    rows = partial_fc.padded_rows(classes, mesh)
    leaves = jax.tree.leaves({"params": state["params"]["backbone"], "opt_state": state["opt_state"]})
    backbone = [x for x in leaves if not (x.ndim == 2 and x.shape[0] == rows)]
    centers = [x for x in jax.tree.leaves(state) if x.ndim == 2 and x.shape[0] == rows]
    key = (config.model.depth, batch, classes, precision, fsdp, remat)
    if reuse and key in reuse:
        mem = {k: reuse[key][f"{k}_bytes"] for k in ("argument", "output", "temp", "alias", "peak")}
    else:
        mem = mesh_lib.compiled_memory(step.lower(*args).compile())
    model_cfg = presets.with_precision(config.model, precision)
    return {"size": size, "depth": config.model.depth, "dim": config.model.dim, "devices": mesh.devices.size,
            "activation_bytes": activation_bytes(model_cfg, batch // mesh.devices.size), "batch": batch, "classes": classes, "precision": precision, "fsdp": fsdp, "remat": remat,
            "backbone_state_bytes": mesh_lib.per_device_bytes(backbone),
            "centers_state_bytes": mesh_lib.per_device_bytes(centers), **{f"{k}_bytes": v for k, v in mem.items()}}


def table(lines: list[dict]) -> str:
    rows = ["| FSDP | remat | params + AdamW / device MiB | W + moments + E / device MiB | saved activations MiB | "
            "args MiB | temp MiB | peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in lines:
        rows.append(f"| {r['fsdp']} | {r['remat']} | {r['backbone_state_bytes'] / MIB:,.1f} | "
                    f"{r['centers_state_bytes'] / MIB:,.1f} | {r['activation_bytes'] / MIB:,.1f} | "
                    f"{r['argument_bytes'] / MIB:,.1f} | "
                    f"{r['temp_bytes'] / MIB:,.1f} | {r['peak_bytes'] / MIB:,.1f} |")
    return "\n".join(rows)


def main(args) -> list[dict]:
    reuse = {}
    if args.reuse:
        for text in open(args.reuse):
            if text.startswith("{"):
                r = json.loads(text)
                reuse[(r["depth"], r["batch"], r["classes"], r["precision"], r["fsdp"], r["remat"])] = r
    lines = []
    for fsdp, remat in ((False, False), (True, False), (False, True), (True, True)):
        line = measure(args.size, args.depth, args.batch, args.classes, args.precision, fsdp, remat, reuse)
        print(json.dumps(line), flush=True)
        lines.append(line)
    rep, fsdp = lines[0]["backbone_state_bytes"], lines[1]["backbone_state_bytes"]
    summary = (f"params + AdamW per device: replicated {rep / MIB:,.1f} MiB, FSDP {fsdp / MIB:,.1f} MiB = 1/{rep / fsdp:.2f}"
               f" (goal: at most 1/6 on 8 devices); remat: saved activations {lines[0]['activation_bytes'] / MIB:,.1f} -> "
               f"{lines[2]['activation_bytes'] / MIB:,.1f} MiB per device, CPU-compiled temporaries "
               f"{lines[0]['temp_bytes'] / MIB:,.1f} -> {lines[2]['temp_bytes'] / MIB:,.1f} MiB (replicated)")
    print(table(lines))
    print(summary)
    if args.write_results:
        l0 = lines[0]
        section = "\n".join([
            SECTION, "",
            f"Date: {datetime.date.today()}. Device: {l0['devices']} x {jax.devices()[0].platform} (fake CPU devices; "
            f"host {platform.machine()}), compile only (abstract arguments, nothing allocated). configs/lvface.py:"
            f"{l0['size']}, depth {l0['depth']}, D {l0['dim']}, {l0['classes']:,} classes, global batch {l0['batch']}, "
            f"{l0['precision']}, curriculum phase 0 (Partial FC r 0.3), AdamW on the backbone and W.", "",
            "```", "python -m bench.lvface_memory " + shlex.join(sys.argv[1:]), "```", "",
            table(lines), "", summary, "", "JSON lines:", "", "```", *[json.dumps(x) for x in lines], "```"])
        results_md.write_section(section)
    return lines


if __name__ == "__main__":
    main(ARGS)
