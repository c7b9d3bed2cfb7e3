"""Why the demo's SSL teacher collapses: LAFS (or DINO-face) pretraining on the ORL training people, one
change at a time against the demo's settings, run long enough to collapse.

    python -m bench.ssl_collapse --demo-workdir runs/demo --epochs 30 [--method lafs] [--variants a,b] \\
        [--out runs/ssl_collapse] [--write-results]

Reads the demo's data (`WORKDIR/data`) and, for LAFS, its stage-1 landmark CNN
(`WORKDIR/seed0/stage1/backbone`): run the demo first. For each variant it pretrains from scratch
(`pretrain.run`, the demo's `pretrain_<method>` config with the variant's overrides and `--epochs`), then
prints one JSON line: the final DINO loss and ln K (a loss at ln K with the teacher's per-sample entropy
at ln K is the collapse to uniform targets), the first step after its lowest point at which the loss is
back within 5 % of ln K, the
teacher's per-sample and batch entropies at the end, and the teacher's own verification accuracy on the
validation people (no fine-tuning; `lafs_jax.demo.teacher_embedder`). `--write-results` writes the
`## SSL collapse on ORL` section of bench/RESULTS.md and `ssl_collapse.png` (loss / ln K per variant)
beside it in `--out`. `--eval-every N` also evaluates the teacher on the validation people every N steps
during pretraining (the task's `config.evals`; the rows `val/validation/accuracy` of each variant's
metrics.jsonl, `accuracy_curve` in its JSON line).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from bench.results_md import write_section
from configs import demo as demo_config
from lafs_jax import demo
from lafs_jax.eval import evaluators
from lafs_jax.input.verification_bin import load_bin
from lafs_jax.train import pretrain

# name -> (what changes, {config path: value}); every other setting is the demo's
VARIANTS = {
    "demo": ("the demo's settings (K = 1024 prototypes)", {}),
    "K=64": ("64 prototypes instead of 1024", {"model.dino_head.out_dim": 64}),
    "K=256": ("256 prototypes", {"model.dino_head.out_dim": 256}),
    "temp_warmup": ("teacher temperature 0.07 -> 0.04 over half the run instead of 2 epochs",
                    {"dino.warmup_teacher_temp_epochs": "half"}),
    "center_m=0.99": ("centre momentum 0.99 instead of 0.9", {"dino.center_momentum": 0.99}),
    "views": ("8 local views instead of 4", {"data.lafs.local_views": 8}),
    "lr_x10": ("peak lr 1e-2 x 24/256 = 9.4e-4 instead of 1e-3 x 24/256 = 9.4e-5 (DINO's linear scaling rule)",
               {"optim.lr": 1e-2}),
    "lr_x20": ("peak lr 2e-2 x 24/256 = 1.9e-3 (about the fine-tuning's 2e-3)", {"optim.lr": 2e-2}),
    # batch size alone: an 'epoch' stays 10 steps (the schedules, the 300 steps) and the peak lr stays 9.4e-5,
    # against the linear scaling rule, so only the images per step (and per centre update) change
    "batch=50": ("50 images per step instead of 24; the same steps and peak lr",
                 {"batch_size": 50, "steps_per_epoch": 10, "optim.lr": 1e-3 * 24 / 50}),
    "batch=125": ("125 images per step (half the training set); the same steps and peak lr",
                  {"batch_size": 125, "steps_per_epoch": 10, "optim.lr": 1e-3 * 24 / 125}),
    "head_lr=0.1": ("the DINO head at 0.1 x the lr", {"optim.lr_mults": (("^head/", 0.1),)}),
    "sinkhorn": ("Sinkhorn-Knopp centring (DINOv2) instead of the running centre", {"dino.centering": "sinkhorn"}),
    "teacher_m=0.999": ("teacher EMA momentum 0.999 instead of 0.996", {"dino.teacher_momentum": 0.999}),
    "teacher_m=0.99": ("teacher EMA momentum 0.99 instead of 0.996 (cosine to 1 at the end, as always)",
                       {"dino.teacher_momentum": 0.99}),
    "teacher_m=0.9": ("teacher EMA momentum 0.9 instead of 0.996", {"dino.teacher_momentum": 0.9}),
    "teacher_temp=0.02": ("teacher temperature 0.07 -> 0.02 instead of 0.07 -> 0.04 (sharper targets)",
                          {"dino.teacher_temp": 0.02}),
    "teacher_temp=0.01": ("teacher temperature 0.07 -> 0.01", {"dino.teacher_temp": 0.01}),
    "koleo=0.1": ("KoLeo regulariser, weight 0.1 (DINOv2)", {"dino.koleo_weight": 0.1}),
    "koleo=0.5": ("KoLeo regulariser, weight 0.5", {"dino.koleo_weight": 0.5}),
    # a diagnostic, not SSL: the positives carry identity (the labels pick them), every loss setting the demo's
    "identity_pairs": ("diagnostic, reads the labels: global view 2 and half the local views from another image "
                       "of the same person", {"data.ssl_positives": "identity"}),
}
UNTRAINED = "untrained"  # reference row: the randomly initialised ViT, no pretraining
EVAL_KEY = "val/validation/accuracy"  # the teacher's accuracy rows of --eval-every (metrics.jsonl)
DINO_VIEW_KEY = {"data.lafs.local_views": "data.dino.local_crops"}  # the DINO-face name of a LAFS setting


def variant_overrides(name: str) -> dict:
    """{config path: value} of a variant, or of 'a+b' (the changes of a and b together)."""
    out = {}
    for part in name.split("+"):
        out.update(VARIANTS[part][1])
    return out


def variant_change(name: str) -> str:
    return "; ".join(VARIANTS[part][0] for part in name.split("+"))


def variant_config(method: str, name: str, demo_workdir: str, epochs: int, seed: int,
                   eval_every: int = 0) -> ml_collections.ConfigDict:
    """The demo's pretraining config of `method` with the variant's overrides and `epochs`; with
    `eval_every` > 0 the teacher is verified on the demo's validation people every that many steps."""
    c = demo.stage_configs(demo_config.get_config(), demo_workdir, seed)[f"pretrain_{method}"]
    c = ml_collections.ConfigDict(c.to_dict())
    c.optim.epochs = epochs
    if eval_every > 0:
        c.evals = ml_collections.ConfigDict({"val": evaluators.evaluator_config(
            "verification", bins=(os.path.join(demo_workdir, "data", "validation.bin"),), every_steps=eval_every)})
    for path, value in variant_overrides(name).items():
        if method == "dino":
            path = DINO_VIEW_KEY.get(path, path)
        if value == "half":
            value = epochs // 2
        target = c
        parts = path.split(".")
        for part in parts[:-1]:
            target = target[part]
        target[parts[-1]] = value
    c.checkpoint.every_steps = 10 ** 6  # only at the end
    c.lock()
    return c


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def teacher_report(method: str, teacher_dir: str, model: ml_collections.ConfigDict, args) -> dict:
    """The teacher as fine-tuning would start from it (the demo's k = all run of `method` with this
    `init.backbone`; '' = random init): its validation accuracy, and the mean cosine similarity of the
    embeddings of different validation images (near 1: every face maps to about the same feature)."""
    ft = ml_collections.ConfigDict(demo.stage_configs(demo_config.get_config(), args.demo_workdir,
                                                      args.seed)[demo.run_name(method, 0)].to_dict())
    ft.init.backbone = teacher_dir
    if method == "dino":
        ft.model = ml_collections.ConfigDict(model.to_dict())
    images, issame = load_bin(os.path.join(args.demo_workdir, "data", "validation.bin"), 112)
    embedder = demo.teacher_embedder(ft)
    emb = embedder.embed(images, flip=True)
    acc = demo.verify(lambda _: emb, {"validation": (images, issame)})["validation"]["accuracy"]
    e = emb[::2][:400] / np.linalg.norm(emb[::2][:400], axis=1, keepdims=True)
    cos = e @ e.T
    return {"teacher_validation_accuracy": acc,
            "feature_cosine": float((cos.sum() - np.trace(cos)) / (len(e) * (len(e) - 1)))}


def run_variant(method: str, name: str, args) -> dict:
    if name == UNTRAINED:
        c = variant_config(method, "demo", args.demo_workdir, args.epochs, args.seed)
        report = teacher_report(method, "", c.model, args)
        return {"method": method, "variant": name, "change": "no pretraining (random ViT)", "epochs": 0,
                "steps": 0, "final_loss": float("nan"), "ln_k": math.log(c.model.dino_head.out_dim),
                "min_loss": float("nan"), "first_step_near_ln_k": None, "teacher_entropy": float("nan"),
                "teacher_batch_entropy": float("nan"), **report, "seconds": 0.0, "curve": []}
    c = variant_config(method, name, args.demo_workdir, args.epochs, args.seed, args.eval_every)
    workdir = os.path.join(args.out, f"{method}_{name}")
    t0 = time.time()
    if not os.path.exists(os.path.join(workdir, pretrain.TEACHER_BACKBONE_DIR)):
        pretrain.run(c, workdir)
    seconds = time.time() - t0
    # the DINO loss alone (with KoLeo on, 'loss' also holds the regulariser)
    rows = [dict(r, loss=r.get("dino_loss", r["loss"])) for r in read_metrics(workdir) if "loss" in r]
    accuracy_curve = [(r["step"], r[EVAL_KEY]) for r in read_metrics(workdir) if EVAL_KEY in r]
    log_k = math.log(c.model.dino_head.out_dim)
    lowest = int(np.argmin([r["loss"] for r in rows]))
    near = [r["step"] for r in rows[lowest:] if r["loss"] >= 0.95 * log_k]  # back near ln K after its low
    report = teacher_report(method, os.path.join(workdir, pretrain.TEACHER_BACKBONE_DIR), c.model, args)
    last = rows[-1]
    return {"method": method, "variant": name, "change": variant_change(name), "epochs": args.epochs,
            "steps": last["step"], "final_loss": last["loss"], "ln_k": log_k,
            "min_loss": min(r["loss"] for r in rows), "first_step_near_ln_k": near[0] if near else None,
            "teacher_entropy": last.get("teacher_entropy"), "teacher_batch_entropy": last.get("teacher_batch_entropy"),
            **report, "seconds": round(seconds, 1), "accuracy_curve": accuracy_curve,
            "curve": [(r["step"], r["loss"] / log_k) for r in rows]}


def plot(results: list[dict], path: str) -> None:
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    for r in results:
        if not r["curve"]:
            continue
        steps, ratio = zip(*r["curve"])
        ax.plot(steps, ratio, label=f"{r['variant']} ({100 * r['teacher_validation_accuracy']:.1f} %)")
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("DINO loss / ln K (1 = uniform targets)")
    ax.set_title(f"{results[0]['method'].upper()} pretraining on 250 ORL faces; legend: teacher's validation accuracy",
                 fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def markdown(results: list[dict], command: str) -> str:
    lines = [f"`{command}` ({time.strftime('%Y-%m-%d')}, CPU; about 2 min per variant on 2 cores). One change "
             "per row against the demo's pretraining; loss / ln K = 1 means the teacher's targets are uniform "
             "(collapsed); entropies in nats at the last step; feature cosine: mean cosine similarity between the "
             "teacher's embeddings of different validation faces; `ssl_collapse.png`: the loss curves.",
             "", "| variant | change | final loss / ln K | min loss / ln K | back near ln K at step | teacher entropy "
             "| batch entropy / ln K | teacher's validation accuracy (%) | feature cosine |", "|" + "---|" * 9]
    for r in results:
        lines.append(f"| {r['variant']} | {r['change']} | {r['final_loss'] / r['ln_k']:.3f} | "
                     f"{r['min_loss'] / r['ln_k']:.3f} | {'-' if r['steps'] == 0 else r['first_step_near_ln_k'] or 'never'} | "
                     f"{r['teacher_entropy']:.2f} | {r['teacher_batch_entropy'] / r['ln_k']:.2f} | "
                     f"{100 * r['teacher_validation_accuracy']:.2f} | {r['feature_cosine']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ssl_collapse", description=__doc__.split("\n")[0])
    p.add_argument("--demo-workdir", required=True, help="a finished demo run (its data and stage-1 landmark CNN)")
    p.add_argument("--method", default="lafs", choices=("lafs", "dino"))
    p.add_argument("--epochs", type=int, default=30, help="pretraining epochs per variant (10 steps each)")
    p.add_argument("--variants", default=",".join([UNTRAINED, *VARIANTS]),
                   help=f"comma-separated subset of {[UNTRAINED, *VARIANTS]}; 'a+b' combines two")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0,
                   help="verify the teacher on the validation people every this many steps (0 = only at the end)")
    p.add_argument("--out", default="runs/ssl_collapse", help="one pretraining folder per variant")
    p.add_argument("--write-results", action="store_true", help="write bench/RESULTS.md's section and the plot")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v != UNTRAINED and any(part not in VARIANTS for part in v.split("+"))]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    args.demo_workdir = os.path.abspath(args.demo_workdir)
    results = []
    for name in names:
        r = run_variant(args.method, name, args)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
    if args.write_results:
        os.makedirs(args.out, exist_ok=True)
        plot(results, os.path.join(args.out, "ssl_collapse.png"))
        command = "python -m bench.ssl_collapse " + " ".join(argv if argv is not None else sys.argv[1:])
        title = "## SSL collapse on ORL" + ("" if args.method == "lafs" else ", DINO-face")
        write_section(f"{title}\n\n" + markdown(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
