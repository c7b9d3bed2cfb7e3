"""The `## GPU` section of bench/RESULTS.md from one bench/gpu.sh run's JSON lines and step status.

    python bench/gpu_report.py --lines runs/gpu_bench/lines.jsonl --status runs/gpu_bench/status.txt \
        --results bench/RESULTS.md [--seconds N] [--dry-run]

Tables: each training step (img/s/device, step ms, TFLOP/s, MFU against the device's dense bf16 peak,
peak memory), JAX against the PyTorch mirror per mode (the mirror's MFU counts the same XLA FLOPs per
image), the goals of issue 20 (fine-tuning >= 45 % MFU, JAX >= 3x PyTorch, LAFS >= 35 % MFU) and of issue 34
(FRA ResNet-50 step >= 40 % MFU: the recipe's ~1.1e19 FLOP in under a day on one H100) as met or not, the dominant kernels of the profiled steps, and each step's exit status. Exit status 1 when no
line came back at all.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, however it is run
import results_md  # noqa: E402

SECTION = "## GPU"
GOALS = (("fine-tuning step MFU", 0.45), ("JAX / PyTorch img/s (forward+backward)", 3.0), ("LAFS step MFU", 0.35),
         ("FRA step MFU", 0.40))


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2 ** 30:.1f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def step_rows(lines: list[dict]) -> list[str]:
    rows = ["| step | precision | attention | batch/device | step ms | img/s/device | TFLOP/s | MFU | peak GiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in lines:
        if "step_ms" not in r or "img_per_sec_per_device" not in r:
            continue
        name = r["name"] + (f" (C={r['num_classes']:,}, r={r['sample_rate']})" if "num_classes" in r else "")
        attention = r.get("attention") or next((o.split("=", 1)[1] for o in r.get("overrides", [])
                                                if o.startswith("model.attention_implementation=")), "xla")
        rows.append(f"| {name} | {r['precision']} | {attention} | {r['per_device_batch']} | {r['step_ms']} | "
                    f"{r['img_per_sec_per_device']} | {r['tflops_per_sec_per_device']} | {_pct(r.get('mfu'))} | "
                    f"{_gib(r.get('device_peak_bytes') or r.get('peak_bytes') or r.get('compiled_bytes'))} |")
    return rows


def model_pairs(lines: list[dict]) -> list[dict]:
    """JAX and PyTorch lines of bench/model.py matched by (model, mode, batch)."""
    torch = {(r["model"], r["mode"], r["batch"]): r for r in lines if r.get("framework") == "torch"}
    pairs = []
    for j in (r for r in lines if r.get("framework") == "jax"):
        t = torch.get((j["model"], j["mode"], j["batch"]))
        pairs.append({"jax": j, "torch": t})
    return pairs


def model_rows(pairs: list[dict]) -> list[str]:
    rows = ["| model | mode | batch/device | JAX img/s | PyTorch img/s | JAX / PyTorch | JAX MFU | PyTorch MFU | "
            "JAX peak GiB | PyTorch peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        j, t = p["jax"], p["torch"]
        ratio = j["img_per_s"] / t["img_per_s"] if t else None
        torch_mfu = j["mfu"] * t["img_per_s"] / j["img_per_s"] if t else None  # same FLOPs per image
        rows.append(f"| {j['model']} | {j['mode']} | {j['batch']} | {j['img_per_s']} | "
                    f"{t['img_per_s'] if t else '-'} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                    f"{_pct(j['mfu'])} | {_pct(torch_mfu)} | {_gib(j.get('device_peak_bytes'))} | "
                    f"{_gib(t.get('device_peak_bytes')) if t else '-'} |")
    return rows


def goal_lines(lines: list[dict], pairs: list[dict]) -> list[str]:
    ft = next((r for r in lines if r.get("name", "").startswith("finetune_")), None)
    lafs = next((r for r in lines if r.get("name", "").startswith("pretrain_lafs")), None)
    fra = next((r for r in lines if r.get("name", "").startswith("pretrain_fra")), None)
    fb = next((p for p in pairs if p["jax"]["mode"] == "forward_backward" and p["torch"]), None)
    values = (ft and ft.get("mfu"), fb and fb["jax"]["img_per_s"] / fb["torch"]["img_per_s"], lafs and lafs.get("mfu"),
              fra and fra.get("mfu"))
    out = []
    for (what, target), value in zip(GOALS, values):
        if value is None:
            out.append(f"- {what} >= {f'{target:g}x' if target > 1 else _pct(target)}: not measured")
        else:
            shown, wanted = (f"{value:.2f}x", f"{target:g}x") if target > 1 else (_pct(value), _pct(target))
            out.append(f"- {what} >= {wanted}: {shown}, {'met' if value >= target else 'NOT met'}")
    return out


def kernel_lines(lines: list[dict]) -> list[str]:
    out = []
    for r in lines:
        prof = r.get("profile")
        if not prof:
            continue
        if "error" in prof:
            out.append(f"- {r['name']}: {prof['error']}")
            continue
        top = ", ".join(f"`{k['name']}` {100 * k['share']:.0f}%" for k in prof["kernels"][:6])
        out.append(f"- {r['name']} ({prof['source']} time {prof['total_ms']} ms over 2 steps): {top}")
    return out


def render(lines: list[dict], status: list[str], seconds: int | None, dry_run: bool) -> str:
    device = next((r["device"] for r in lines if "device" in r), None) or next(
        (r.get("torch_device_name") or r.get("jax_device") for r in lines if "model" in r), "unknown device")
    pairs = model_pairs(lines)
    head = (f"Date: {datetime.date.today().isoformat()}. Device: {device}; jax {jax.__version__}. One unattended "
            f"`bench/gpu.sh`{' --dry-run' if dry_run else ''} run"
            + (f", {seconds} s in all" if seconds is not None else "") + ".")
    if dry_run:
        head += (" DRY RUN: tiny models on the CPU, to check the script end to end; these numbers say nothing "
                 "about a GPU.")
    parts = [SECTION, "", head, "", "```", "bench/gpu.sh" + (" --dry-run" if dry_run else ""), "```", ""]
    parts += step_rows(lines) + [""]
    if pairs:
        parts += ["Part fViT forward / forward+backward, JAX against the PyTorch mirror of the official model "
                  "(separate processes, bf16; PyTorch under autocast with the official explicit attention):", ""]
        parts += model_rows(pairs) + [""]
    parts += ["Goals:", ""] + goal_lines(lines, pairs) + [""]
    kernels = kernel_lines(lines)
    if kernels:
        parts += ["Dominant kernels (jax.profiler trace of two steps, share of the device's kernel time):", ""]
        parts += kernels + [""]
    parts += ["Steps (exit status, seconds):", "", "```"] + status + ["```", ""]
    parts += ["JSON lines:", "", "```"] + [json.dumps(r) for r in lines] + ["```"]
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", required=True)
    p.add_argument("--status", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--seconds", type=int, default=None)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    with open(args.lines) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    with open(args.status) as f:
        status = [l.rstrip("\n") for l in f if l.strip()]
    results_md.write_section(render(lines, status, args.seconds, args.dry_run), args.results)
    print(f"wrote the {SECTION} section of {args.results} ({len(lines)} JSON lines)")
    return 0 if lines else 1


if __name__ == "__main__":
    sys.exit(main())
