"""Helpers the step benchmarks share: recipes with overrides, the device's assumed peak, its peak
memory, step timing, and a summary of a jax.profiler trace's dominant kernels."""
from __future__ import annotations

import ast
import collections
import gc
import glob
import gzip
import importlib.util
import json
import os
import re
import statistics
import time
from typing import Any, Callable

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense bf16 peak per device (TFLOP/s, no sparsity), by a substring of jax's device_kind.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0,
                   "A10": 125.0}


def load_recipe(spec: str):
    """configs/X.py[:arg] -> its locked ConfigDict (get_config(arg))."""
    path, _, arg = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(ROOT, path)
    if not os.path.isfile(path):
        raise SystemExit(f"no recipe file at {spec.partition(':')[0]!r}")
    module_spec = importlib.util.spec_from_file_location(f"recipe_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config, overrides: list[str]) -> None:
    """--set a.b=value: value parsed as a Python literal (else kept as a string); the locked recipe
    refuses a value of another type, and an unknown key is named."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. model.attention_implementation=cudnn")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            if part not in node:
                raise SystemExit(f"--set {item!r}: config.{key} does not exist")
            node = node[part]
        if parts[-1] not in node:
            raise SystemExit(f"--set {item!r}: config.{key} does not exist")
        try:
            node[parts[-1]] = value
        except TypeError as e:
            raise SystemExit(f"--set {item!r}: {e}") from None


def schedule_steps_per_epoch(config, given: int | None = None) -> int:
    """Steps per epoch for a recipe's schedules without its data (a real run counts the data set):
    the recipe's own (pretraining), `given`, total_steps / epochs when the recipe fixes total_steps,
    else 1000. Memory and FLOPs of the step do not depend on it."""
    if config.task == "pretrain" and config.steps_per_epoch > 0:
        return config.steps_per_epoch
    if given is not None:
        return given
    if config.total_steps > 0:
        return max(1, config.total_steps // max(1, round(config.optim.epochs)))
    return 1000


def assumed_peak_tflops(device) -> tuple[float, str]:
    """(peak TFLOP/s per device, how it was derived): a GPU's dense bf16 peak; for a CPU host
    cores x clock x 32 FP32 FLOP/cycle (two 256-bit FMA pipes)."""
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
            return tflops, f"{device.device_kind} dense bf16 {tflops:g} TFLOP/s"
    raise SystemExit(f"no known peak for {device.device_kind!r}: pass --peak-tflops")


def peak_from_flag(value: str, device) -> tuple[float, str]:
    if value == "auto":
        return assumed_peak_tflops(device)
    return float(value), f"{value} TFLOP/s per device (given)"


def device_peak_bytes(device) -> int | None:
    """The allocator's peak bytes in use on `device` (one of this process's: GPU/TPU), None where it
    keeps no statistics (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def flops_of(compiled) -> float:
    """FLOPs of the compiled per-device program (XLA's cost analysis), NaN if it gives none."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else float("nan")


def compiled_peak_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries - aliased bytes of the compiled per-device program."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def first_batch_that_fits(batches: list[int], measure: Callable[[int], dict]) -> dict:
    """measure(b) for the first b of `batches` that does not run out of device memory; the line
    records the batches that did ('oom_batches'). The last one's error is raised."""
    failed = []
    for i, b in enumerate(batches):
        try:
            line = measure(b)
        except Exception as e:  # noqa: BLE001  (only out-of-memory errors are retried, the rest re-raised)
            if not is_out_of_memory(e) or i == len(batches) - 1:
                raise
            failed.append(b)
            jax.clear_caches()
            gc.collect()
            continue
        line["oom_batches"] = failed
        return line
    raise ValueError("no batch sizes given")


def parse_batches(text: str) -> list[int]:
    """'256' or '256/128' (fallbacks on out-of-memory) -> [256, 128]."""
    values = [int(v) for v in str(text).split("/") if v]
    if not values or min(values) < 1:
        raise SystemExit(f"batch {text!r}: expected sizes >= 1 separated by '/', e.g. 256/128")
    return values


def time_calls(call: Callable[[int], Any], steps: int) -> tuple[float, float]:
    """(median, mean) seconds per call of call(i) for i in 1..steps, each waited for
    (block_until_ready on what it returns)."""
    times = []
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(call(i))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(times) / len(times)


def trace_summary(log_dir: str, top: int = 8) -> dict:
    """The dominant ops of the latest jax.profiler trace under `log_dir`: the device's kernels (GPU
    stream events) when the trace has a device, else the host's XLA ops (CPU), Python frames left out.
    {'source', 'total_ms', 'kernels': [{'name', 'ms', 'share', 'count'}]}, or {'error'}."""
    runs = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*")), key=os.path.getmtime)
    files = glob.glob(os.path.join(runs[-1], "*.trace.json.gz")) if runs else []
    if not files:
        return {"error": f"no *.trace.json.gz under {log_dir}/plugins/profile"}
    with gzip.open(files[0], "rb") as f:
        events = json.load(f).get("traceEvents", [])
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in names.items() if name.startswith("/device:")}
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or not e.get("dur"):
            continue
        on_device = e["pid"] in device_pids
        if device_pids and not on_device:
            continue
        name = e.get("name", "")
        if not device_pids and (name.startswith("$") or "::" in name or name.startswith("Pjit")):
            continue  # host trace: Python frames and runtime bookkeeping are not kernels
        total[name] += e["dur"]
        count[name] += 1
    all_us = sum(total.values())
    kernels = [{"name": n[:120], "ms": round(us / 1e3, 3), "share": round(us / all_us, 3) if all_us else 0.0,
                "count": count[n]} for n, us in total.most_common(top)]
    return {"source": "device" if device_pids else "host", "total_ms": round(all_us / 1e3, 3), "kernels": kernels}
