"""Ahead-of-time compilation of a recipe's train step for a TPU topology, on a machine without a TPU.

    python -m bench.aot --config configs/RECIPE.py[:ARG] --topology v5e:4x4[,v5p:4x4x4]
                        [--num-classes N] [--per-chip-batch 32,64,128] [--precision auto]
                        [--config.a.b=value ...] [--write-results] [--note TEXT]

Does a recipe compile for a pod, and does it fit a chip's memory at its batch? With libtpu installed
(`pip install --target .tpu-aot -r requirements-tpu-aot.txt`, a folder of its own: never in the
environment the tests and the demo use), `jax.experimental.topologies.get_topology_desc` gives the
pod's devices without owning them. This script builds the task's *own* step
(`finetune.build_train_step` / `pretrain.build_train_step`: the loss, optimizer, shardings and
donation that `run` uses; the state is abstract, from `jax.eval_shape`, nothing is materialised) on a
('data', 'model') mesh over those devices, lowers it with ShapeDtypeStructs carrying NamedShardings
and compiles it with XLA's TPU compiler. Per (recipe, topology, batch) it prints one JSON line:

  recipe, overrides, task, topology, chips, device_kind, precision, global_batch, per_chip_batch,
  num_classes (fine-tuning), per_chip_bytes = arguments + outputs + temporaries - aliased (donated)
  bytes of the per-chip program (XLA's memory_analysis(); the arguments include the donated state
  once), hbm_bytes (the chip's capacity: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB), fits,
  flops_per_chip_step (cost_analysis() of the per-chip program), param_bytes_per_chip (trainable
  parameters), state_bytes_per_chip, largest_unsplit (the largest inputs held whole on every chip, so
  a sharding rule that silently replicates a big array shows), centers (fine-tuning: W and every
  state array of W's shape, total and per-chip bytes, and whether each is split over every chip),
  lower_s and compile_s (seconds on this machine).

When the step does not fit (per_chip_bytes > hbm_bytes, or the TPU compiler refuses it with
RESOURCE_EXHAUSTED, whose byte counts are parsed from its message) the line still prints, with
`fits: false`, and the exit status is 1 with a message naming the topology and the bytes. With a list
of --per-chip-batch values (a small search) every value gets a line and a `{"kind": "aot_search"}`
line gives the largest that fits; the status is 1 when any of them does not fit. Status 2: a config error;
status 3: no libtpu (the message says how to install it).

The process re-runs itself in a subprocess whose environment has TPU_LIBRARY_PATH (what
jax._src.xla_bridge.get_tpu_library_path reads first; the `libtpu` package on PYTHONPATH is its
fallback, set too) pointing into .tpu-aot/ (or --libtpu / $TPU_LIBRARY_PATH) and JAX_PLATFORMS=cpu,
so the caller's environment keeps its backend. Compute precision: --precision auto (default) is what
the recipe's precision 'auto' means on a TPU, bfloat16 (the process's own backend is the CPU, so the
target platform is passed explicitly); it sets config.precision where the recipe has one and
config.model.dtype. The class count comes from --num-classes, else from the recipe's data when it
exists. Evaluation sets and init directories are not read (they do not change the step).

--write-results merges the lines into the `## TPU ahead-of-time` section of bench/RESULTS.md (lines of
earlier runs with another recipe / topology / batch are kept).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import flags
from jax.experimental import topologies
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, however it is run
sys.path.insert(0, ROOT)
import common  # noqa: E402
import main as main_lib  # noqa: E402  (main.py's config-override check)
import results_md  # noqa: E402
from lafs_jax.config import ConfigError  # noqa: E402
from lafs_jax.input import pipelines  # noqa: E402
from lafs_jax.train import finetune, pretrain  # noqa: E402
from lafs_jax import sharding as mesh_lib  # noqa: E402

SECTION = "## TPU ahead-of-time"
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
TARGET_DIR = os.path.join(ROOT, ".tpu-aot")  # pip install --target .tpu-aot -r requirements-tpu-aot.txt
CHILD_ENV = "LAFS_AOT_CHILD"
EXIT_NO_FIT, EXIT_CONFIG, EXIT_NO_LIBTPU = 1, 2, 3
GIB = 2 ** 30
# HBM per chip (bytes), by the generation prefix of the topology name.
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5litepod": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# Generations whose chips have two TensorCores that JAX drives as one device ("megacore").
MEGACORE = ("v4", "v5p")
TASKS = ("finetune", "pretrain")
_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


class AotError(Exception):
    """A usage or config problem; the message names the flag or config key."""


class NoLibtpu(Exception):
    """libtpu could not be loaded in this process."""


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(--config / --config.x=y arguments, the rest)."""
    config_args, rest = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            config_args += [f"--config={argv[i + 1]}"]
            i += 2
            continue
        (config_args if a.startswith("--config=") or a.startswith("--config.") else rest).append(a)
        i += 1
    return config_args, rest


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.splitlines()[0])
    p.add_argument("--topology", required=True, help="TPU topology name(s), e.g. v5e:2x2 or v5e:4x4,v5p:4x4x4")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the fine-tuning head (default: data)")
    p.add_argument("--per-chip-batch", default="", help="images per chip, or a comma list to search "
                                                        "(default: the recipe's batch_size over the chips)")
    p.add_argument("--precision", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="compute dtype; auto = bfloat16, as the recipe's 'auto' on a TPU")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="steps per epoch of the schedules where the recipe leaves it to the data (default: "
                        "total_steps / epochs when the recipe fixes total_steps, else 1000; no effect on "
                        "memory or FLOPs)")
    p.add_argument("--libtpu", default="", help="path of libtpu.so (default: $TPU_LIBRARY_PATH, then .tpu-aot/)")
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--note", default="", help="a sentence for RESULTS.md")
    config_args, rest = split_argv(argv)
    args = p.parse_args(rest)
    if not any(a.startswith("--config=") for a in config_args):
        p.error("--config is required (e.g. --config configs/finetune.py:tiny)")
    args.config_args = config_args
    args.recipe = next(a.split("=", 1)[1] for a in config_args if a.startswith("--config="))
    args.overrides = [a for a in config_args if a.startswith("--config.")]
    return args


def load_config(config_args: list[str]):
    """The recipe with its --config.x=y overrides, through main.py's machinery (ml_collections
    config_flags, locked; an unknown key is named by main._unknown_override)."""
    message = main_lib._unknown_override(config_args)
    if message:
        raise AotError(message)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "recipe", flag_values=values, lock_config=True)
    try:
        values(["bench.aot", *config_args])
    except flags.Error as e:
        raise AotError(f"--config: {e}") from None
    return values.config


# ----------------------------------------------------------------------------------------------
# Launch: re-run in an environment with libtpu
# ----------------------------------------------------------------------------------------------

def find_libtpu(explicit: str = "") -> str | None:
    """libtpu.so: --libtpu, $TPU_LIBRARY_PATH, .tpu-aot/libtpu/libtpu.so, or the `libtpu` package of
    this environment (found without importing it); None if none exists."""
    for path in (explicit, os.environ.get("TPU_LIBRARY_PATH", ""), os.path.join(TARGET_DIR, "libtpu", "libtpu.so")):
        if path and os.path.isfile(path):
            return os.path.abspath(path)
    if explicit:
        return None
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "libtpu.so")
        if os.path.isfile(path):
            return path
    return None


def no_libtpu_message(explicit: str = "") -> str:
    where = f"--libtpu={explicit!r} is not a file" if explicit else (
        "no libtpu.so in $TPU_LIBRARY_PATH, .tpu-aot/ or this environment")
    return (f"bench.aot: libtpu not found ({where}). Install it into its own folder (not into this environment):"
            f"\n    pip install --target {os.path.relpath(TARGET_DIR)} -r requirements-tpu-aot.txt")


def child_env(libtpu: str) -> dict:
    env = dict(os.environ, TPU_LIBRARY_PATH=libtpu, JAX_PLATFORMS="cpu", **{CHILD_ENV: "1"})
    package_dir = os.path.dirname(os.path.dirname(libtpu))  # .../site or .tpu-aot, holding libtpu/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, package_dir, os.environ.get("PYTHONPATH", "")) if p)
    # libtpu takes a machine-wide lock file unless told that several processes may load it (they only compile)
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # no TPU VM here: do not query the GCE metadata server, and name this host as the only worker
    # (otherwise libtpu logs errors about both, harmless for compiling)
    env.setdefault("TPU_SKIP_MDS_QUERY", "1")
    env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    return env


# ----------------------------------------------------------------------------------------------
# Topology, config, step
# ----------------------------------------------------------------------------------------------

def generation(topology: str) -> str:
    gen = topology.split(":", 1)[0].lower()
    if gen not in HBM_BYTES:
        raise AotError(f"--topology {topology!r}: unknown TPU generation {gen!r}; known: {sorted(HBM_BYTES)} "
                       "(names like v5e:4x4, v5p:4x4x4, v4:2x2x2, v6e:2x2)")
    return gen


def topology_devices(topology: str) -> list:
    """The abstract devices of `topology` (one per chip) from libtpu's topology description."""
    gen = generation(topology)
    kwargs = {"chip_config_name": "megacore"} if gen in MEGACORE else {}
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise NoLibtpu(str(e)) from None
        raise AotError(f"--topology {topology!r}: libtpu does not know it ({e})") from None
    return list(desc.devices)


def task_name(config) -> str:
    task = config.get("task", "")
    if task not in TASKS:
        raise AotError(f"config.task={task!r}: bench.aot compiles the train step of {list(TASKS)}")
    return task


def prepared_config(config, *, precision: str, global_batch: int | None):
    """A copy with the target's precision and batch; evaluation sets and init directories cleared
    (they are files the step never reads)."""
    c = ml_collections.ConfigDict(config.to_dict())
    dtype = "bfloat16" if precision == "auto" else precision
    if "precision" in c:
        c.precision = dtype
    c.model.dtype = dtype
    if global_batch is not None:
        c.batch_size = global_batch
    if c.task == "finetune":
        c.eval.bins = ()
        if c.init.backbone:  # the recipe fine-tunes a pretrained backbone: its layer decay stays valid
            c.optim.allow_layer_decay_from_scratch = True
        for key in ("backbone", "landmark_cnn"):
            c.init[key] = ""
        c.landmark_reg.teacher = ""
    return c, dtype


def num_classes_of(config, given: int | None) -> int:
    if given is not None:
        if given < 1:
            raise AotError(f"--num-classes={given}: must be >= 1")
        return given
    path = config.data.path
    if not path:
        raise AotError("fine-tuning needs the class count: pass --num-classes N (config.data.path is empty)")
    try:
        return int(pipelines.make_source(config.data).num_classes)
    except (OSError, ValueError) as e:
        raise AotError(f"config.data.path={path!r} gives no class count ({e}); pass --num-classes N") from None


def build_step(config, mesh, num_classes: int | None, given_steps_per_epoch: int | None):
    """(step, args, shardings, init) of the recipe's task on `mesh` (the tasks' build_train_step)."""
    steps_per_epoch = common.schedule_steps_per_epoch(config, given_steps_per_epoch)
    if config.task == "finetune":
        finetune.validate(config)
        total = config.total_steps if config.total_steps > 0 else int(round(config.optim.epochs * steps_per_epoch))
        return finetune.build_train_step(config, mesh, num_classes, steps_per_epoch=steps_per_epoch,
                                            total_steps=total)
    pretrain.validate(config)
    total = config.total_steps if config.total_steps > 0 else int(config.optim.epochs * steps_per_epoch)
    return pretrain.build_train_step(config, mesh, steps_per_epoch=steps_per_epoch, total_steps=total)


# ----------------------------------------------------------------------------------------------
# Analysis of the compiled program
# ----------------------------------------------------------------------------------------------

def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def leaf_table(args) -> list[dict]:
    """One row per input array: path, shape, dtype, total and per-chip bytes, split or not."""
    rows = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(args)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            continue  # a PRNG key: a few bytes
        shape = tuple(leaf.shape)
        local = tuple(leaf.sharding.shard_shape(shape))
        rows.append({"path": mesh_lib.path_str(kp), "shape": list(shape), "dtype": str(leaf.dtype),
                     "bytes": _nbytes(shape, leaf.dtype), "bytes_per_chip": _nbytes(local, leaf.dtype),
                     "split": local != shape})
    return rows


def centers_report(rows: list[dict], num_classes: int, chips: int) -> dict:
    """W (params/centers) and every state array of W's shape (optimizer moments, accumulators)."""
    w = next(r for r in rows if r["path"].endswith("params/centers"))
    like = [r for r in rows if r["shape"] == w["shape"]]
    return {"shape": w["shape"], "num_classes": num_classes, "bytes": w["bytes"], "bytes_per_chip": w["bytes_per_chip"],
            "arrays": len(like), "arrays_bytes_per_chip": sum(r["bytes_per_chip"] for r in like),
            "split_over_every_chip": all(r["bytes_per_chip"] * chips == r["bytes"] for r in like)}


def parse_resource_exhausted(message: str) -> dict:
    """Bytes from XLA:TPU's out-of-memory messages: 'Used 17.13G of 15.75G hbm. Exceeded hbm capacity
    by 1.38G' (the whole program), or 'the total memory required for HLO temporaries (445.85G) exceeds
    available HBM (15.75G)' (temporaries alone, found before arguments are counted)."""
    def to_bytes(num, unit):
        return int(float(num) * _UNITS[(unit or "").upper()[:1]])

    size = r"([\d.]+)\s*([KMGT]?)i?B?"
    m = re.search(rf"Used\s+{size}\s+of\s+{size}\s+hbm", message, re.I)
    if m:
        return {"what": "program", "used_bytes": to_bytes(m.group(1), m.group(2)),
                "capacity_bytes": to_bytes(m.group(3), m.group(4))}
    m = re.search(rf"required for ([\w\s]+?)\s*\({size}\)\s*exceeds available HBM\s*\({size}\)", message, re.I)
    if m:
        return {"what": m.group(1).strip(), "used_bytes": to_bytes(m.group(2), m.group(3)),
                "capacity_bytes": to_bytes(m.group(4), m.group(5))}
    return {}


def first_cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return cost or {}


def compile_one(config, topology: str, devices: list, *, num_classes: int | None,
                steps_per_epoch: int | None) -> dict:
    """Compile the step of `config` for `devices`; the JSON line's measurements."""
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    chips = len(devices)
    t0 = time.perf_counter()
    step, args, _, _ = build_step(config, mesh, num_classes, steps_per_epoch)
    lowered = step.lower(*args)
    lower_s = time.perf_counter() - t0
    rows = leaf_table(args)
    state = [r for r in rows if r["path"].startswith("0/")]
    trainable = ("0/params/",) if config.task == "finetune" else ("0/student/",)
    out = {"param_bytes_per_chip": sum(r["bytes_per_chip"] for r in state if r["path"].startswith(trainable)),
           "state_bytes_per_chip": sum(r["bytes_per_chip"] for r in state),
           "unsplit_bytes_per_chip": sum(r["bytes"] for r in rows if not r["split"]),
           "largest_unsplit": [{k: r[k] for k in ("path", "shape", "dtype", "bytes")} for r in
                               sorted((r for r in rows if not r["split"]), key=lambda r: -r["bytes"])[:5]]}
    if config.task == "finetune":
        out["centers"] = centers_report(rows, num_classes, chips)
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        sizes = parse_resource_exhausted(str(e))
        return {**out, "fits": False, "per_chip_bytes": sizes.get("used_bytes"), "resource_exhausted": sizes,
                "error": str(e).strip().splitlines()[0][:400], "lower_s": round(lower_s, 1),
                "compile_s": round(time.perf_counter() - t0, 1)}
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    sizes = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias",
                                                                  "generated_code")}
    per_chip = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    return {**out, "per_chip_bytes": per_chip, **{f"{k}_bytes": v for k, v in sizes.items()},
            "flops_per_chip_step": float(first_cost(compiled).get("flops", float("nan"))),
            "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1)}


def run_child(args) -> int:
    """Compile every (topology, batch); print the JSON lines; the exit status."""
    config = load_config(args.config_args)
    task = task_name(config)
    batches = [int(b) for b in args.per_chip_batch.split(",") if b] or [None]
    if any(b is not None and b < 1 for b in batches):
        raise AotError(f"--per-chip-batch={args.per_chip_batch!r}: every value must be >= 1")
    num_classes = num_classes_of(config, args.num_classes) if task == "finetune" else None
    lines, status = [], 0
    for topology in [t for t in args.topology.split(",") if t]:
        gen = generation(topology)
        devices = topology_devices(topology)
        chips = len(devices)
        hbm = HBM_BYTES[gen]
        fitting = []
        for per_chip in batches:
            global_batch = per_chip * chips if per_chip is not None else config.batch_size
            if global_batch % chips:
                raise AotError(f"config.batch_size={global_batch} does not divide over the {chips} chips of "
                               f"{topology}; pass --per-chip-batch or another --config.batch_size")
            cfg, dtype = prepared_config(config, precision=args.precision, global_batch=global_batch)
            line = {"kind": "aot", "recipe": args.recipe, "overrides": args.overrides, "task": task,
                    "topology": topology, "chips": chips, "device_kind": devices[0].device_kind, "precision": dtype,
                    "global_batch": global_batch, "per_chip_batch": global_batch // chips}
            if num_classes is not None:
                line["num_classes"] = num_classes
            measured = compile_one(cfg, topology, devices, num_classes=num_classes,
                                   steps_per_epoch=args.steps_per_epoch)
            line.update({"hbm_bytes": hbm, "fits": measured.pop("fits", None), **measured,
                         "jax": jax.__version__, "date": datetime.date.today().isoformat()})
            if line["fits"] is None:
                line["fits"] = line["per_chip_bytes"] <= hbm
            # key order of the issue first, details after
            print(json.dumps(line), flush=True)
            lines.append(line)
            if line["fits"]:
                fitting.append(line["per_chip_batch"])
            else:
                used = line["per_chip_bytes"]
                used_text = f"{used:,} bytes ({used / GIB:.2f} GiB)" if used else "an unknown number of bytes"
                why = ""
                if "resource_exhausted" in line:
                    what = line["resource_exhausted"].get("what", "")
                    why = " (XLA:TPU: RESOURCE_EXHAUSTED)"
                    used_text += f" for its {what}" if what and what != "program" else ""
                sys.stderr.write(f"bench.aot: {args.recipe} does not fit {topology}{why}: per-chip batch "
                                 f"{line['per_chip_batch']} needs {used_text} per chip, the chip has "
                                 f"{hbm:,} bytes ({hbm / GIB:.0f} GiB HBM)\n")
        if len(batches) > 1:
            summary = {"kind": "aot_search", "recipe": args.recipe, "overrides": args.overrides, "topology": topology,
                       "per_chip_batches": batches, "largest_fitting_per_chip_batch": max(fitting, default=None)}
            print(json.dumps(summary), flush=True)
        if len(fitting) < len(batches):
            status = EXIT_NO_FIT
    if args.write_results:
        write_results(lines, args.note)
    return status


# ----------------------------------------------------------------------------------------------
# RESULTS.md
# ----------------------------------------------------------------------------------------------

def _setting(line: dict) -> tuple:
    """What a compile measured, but for its batch: recipe, overrides, topology, C, precision."""
    return (line["recipe"], tuple(line["overrides"]), line["topology"], line.get("num_classes"), line["precision"])


def _key(line: dict) -> tuple:
    """One compile: its setting and global batch (a new line with the same key replaces the old one)."""
    return _setting(line) + (line["global_batch"],)


def _gflop_per_image(line: dict) -> float | None:
    """FLOPs per chip and step over the per-chip batch, in GFLOP; rises where XLA rematerialises."""
    flops = line.get("flops_per_chip_step")
    return None if flops is None else flops / line["per_chip_batch"] / 1e9


def existing_lines(path: str = RESULTS) -> list[dict]:
    """The JSON lines of the current `## TPU ahead-of-time` section (empty if none)."""
    if not os.path.exists(path):
        return []
    text = open(path).read()
    m = re.search(rf"^{re.escape(SECTION)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not m:
        return []
    return [json.loads(l) for l in m.group(1).splitlines() if l.startswith('{"kind": "aot"')]


def existing_note(path: str = RESULTS) -> str:
    """The prose between the current section's table and its "JSON lines:" ('' if none): kept when a
    run writes its line without a --note of its own."""
    if not os.path.exists(path):
        return ""
    m = re.search(rf"^{re.escape(SECTION)}\n(.*?)(?=^## |\Z)", open(path).read(), re.S | re.M)
    if not m:
        return ""
    body = m.group(1).split("\nJSON lines:")[0].splitlines()
    last_row = max((i for i, l in enumerate(body) if l.startswith("|")), default=None)
    return "" if last_row is None else "\n".join(body[last_row + 1:]).strip()


def _classes(line: dict) -> str:
    return f"{line['num_classes']:,}" if "num_classes" in line else "-"


def _gib(b) -> str:
    return "?" if b is None else f"{b / GIB:.2f}"


LEAN_FLOPS = 1.02  # a fitting batch whose GFLOP/image is within 2 % of the lowest is taken as not rematerialising


def batch_search(lines: list[dict]) -> list[dict]:
    """Per (recipe, overrides, topology, C, precision), in first-seen order: the per-chip batches compiled,
    the largest that fits, the smallest that does not, the largest that fits without rematerialising
    (GFLOP/image within LEAN_FLOPS of the lowest of the fitting ones: XLA's TPU compiler recomputes rather
    than fail, so near the HBM limit a step keeps 'fitting' at a growing cost), and GFLOP/image at the
    smallest batch and at the largest fitting one."""
    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        groups.setdefault(_setting(line), []).append(line)
    out = []
    for rows in groups.values():
        rows = sorted(rows, key=lambda r: r["per_chip_batch"])
        fit = [r for r in rows if r["fits"]]
        no_fit = [r for r in rows if not r["fits"]]
        per_image = _gflop_per_image
        costs = [per_image(r) for r in fit if per_image(r) is not None]
        # one fitting batch alone cannot show whether it rematerialises
        lean = [r for r in fit if len(costs) > 1 and per_image(r) is not None
                and per_image(r) <= LEAN_FLOPS * min(costs)]
        out.append({"first": rows[0], "batches": [(r["per_chip_batch"], bool(r["fits"])) for r in rows],
                    "largest_lean": lean[-1]["per_chip_batch"] if lean else None,
                    "largest_fitting": fit[-1]["per_chip_batch"] if fit else None,
                    "smallest_not_fitting": no_fit[0]["per_chip_batch"] if no_fit else None,
                    "gflop_per_image_smallest": per_image(rows[0]),
                    "gflop_per_image_largest_fitting": per_image(fit[-1]) if fit else None})
    return out


def _bracket(s: dict) -> str:
    """'48-55' (48 fits, 56 does not), '>= 128' (nothing larger compiled) or '< 32' (nothing fits)."""
    big, small = s["largest_fitting"], s["smallest_not_fitting"]
    if big is None:
        return f"< {small}"
    if small is None:
        return f">= {big}"
    if small < big:  # not monotone (should not happen; shown rather than hidden)
        return f"{big} fits, {small} does not"
    return f"{big}" if small == big + 1 else f"{big}-{small - 1}"


def render_search(lines: list[dict]) -> list[str]:
    """The 'largest per-chip batch' table of the section."""
    parts = ["Largest per-chip batch that fits, from the compiles below ('48-55': 48 fits, 56 does not; '>= 128': "
             "nothing larger compiled). Near a chip's HBM, XLA's TPU compiler rematerialises rather than fail, so a "
             "larger batch may still fit at more FLOPs per image: the largest batch that fits *without* that cost "
             "is the one to launch.", "",
             "| recipe | overrides | topology | C | per-chip batches compiled (fits) | largest per-chip batch | "
             f"largest without rematerialising (GFLOP/image <= {LEAN_FLOPS:g} x the lowest; '-': one batch fits) | "
             "GFLOP/image, smallest -> largest fitting |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.1f}"
    for s in batch_search(lines):
        r = s["first"]
        compiled = ", ".join(f"{b}{'' if ok else ' (no)'}" for b, ok in s["batches"])
        parts.append(f"| {r['recipe']} | {' '.join(o.replace('--config.', '') for o in r['overrides']) or '-'} | "
                     f"{r['topology']} | {_classes(r)} | {compiled} | {_bracket(s)} | {s['largest_lean'] or '-'} | "
                     f"{fmt(s['gflop_per_image_smallest'])} -> {fmt(s['gflop_per_image_largest_fitting'])} |")
    return parts


def render_section(lines: list[dict], note: str = "") -> str:
    parts = [SECTION, "",
             "XLA's TPU compiler (libtpu from requirements-tpu-aot.txt) on this CPU-only machine, for abstract "
             "devices of each topology (`jax.experimental.topologies`); nothing runs on a TPU. Per-chip bytes = "
             "arguments + outputs + temporaries − donated (aliased) bytes of the compiled per-chip program; "
             "FLOPs from its cost analysis. Compile times are on this 2-core machine shared with other jobs.", "",
             "```", "python -m bench.aot --config RECIPE --topology TOPOLOGY [--num-classes N] "
                    "[--per-chip-batch B,...] [--config.x=y] --write-results", "```", "",
             *render_search(lines), "",
             "Every compile:", "",
             "| recipe | overrides | topology | chips | C | global batch | per-chip batch | per-chip GiB | HBM GiB | "
             "fits | TFLOP/chip/step | GFLOP/image | params MiB/chip | W + state MiB/chip (split) | largest unsplit | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in lines:
        c = r.get("centers")
        w = f"{c['arrays_bytes_per_chip'] / 2 ** 20:,.0f} ({c['arrays']}, {'all' if c['split_over_every_chip'] else 'NOT all'})" \
            if c else "-"
        unsplit = r["largest_unsplit"][0] if r["largest_unsplit"] else None
        big = "-"
        if unsplit:  # the parameter path, without the argument index and optimizer wrappers
            short = "/".join(unsplit["path"].split("/")[-4:])
            big = f"`…/{short}` {unsplit['bytes'] / 2 ** 20:,.1f} MiB"
            if "unsplit_bytes_per_chip" in r:
                big += f" (all unsplit: {r['unsplit_bytes_per_chip'] / 2 ** 20:,.0f} MiB)"
        flops, per_image = r.get("flops_per_chip_step"), _gflop_per_image(r)
        parts.append(
            f"| {r['recipe']} | {' '.join(o.replace('--config.', '') for o in r['overrides']) or '-'} | "
            f"{r['topology']} | {r['chips']} | {_classes(r)} | "
            f"{r['global_batch']} | {r['per_chip_batch']} | {_gib(r['per_chip_bytes'])} | {r['hbm_bytes'] / GIB:.0f} | "
            f"{'yes' if r['fits'] else '**no**'} | {'-' if flops is None else f'{flops / 1e12:.2f}'} | "
            f"{'-' if per_image is None else f'{per_image:.1f}'} | "
            f"{r['param_bytes_per_chip'] / 2 ** 20:,.1f} | {w} | {big} | {r['compile_s']} |")
    if note:
        parts += ["", note]
    parts += ["", "JSON lines:", "", "```"] + [json.dumps(r) for r in lines] + ["```"]
    return "\n".join(parts)


def write_results(lines: list[dict], note: str = "", path: str = RESULTS) -> None:
    """Merge `lines` into the section (a line with the same recipe, overrides, topology, batch, C and
    precision is replaced) and write it; without a `note`, the section's present prose stays."""
    merged = {_key(l): l for l in existing_lines(path)}
    merged.update({_key(l): l for l in lines})
    results_md.write_section(render_section(list(merged.values()), note or existing_note(path)), path)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.environ.get(CHILD_ENV) != "1":
        libtpu = find_libtpu(args.libtpu)
        if libtpu is None:
            sys.stderr.write(no_libtpu_message(args.libtpu) + "\n")
            return EXIT_NO_LIBTPU
        return subprocess.call([sys.executable, "-m", "bench.aot", *argv], env=child_env(libtpu))
    try:
        return run_child(args)
    except (AotError, ConfigError) as e:
        sys.stderr.write(f"bench.aot: {e}\n")
        return EXIT_CONFIG
    except NoLibtpu as e:
        sys.stderr.write(f"{no_libtpu_message()}\n({e})\n")
        return EXIT_NO_LIBTPU


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
