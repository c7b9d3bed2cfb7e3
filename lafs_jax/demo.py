"""task 'demo': the whole method on real faces (ORL / AT&T Laboratories Cambridge), on a CPU.

Chain, each stage skipped when its output is already in the workdir (and resumed from its last
checkpoint when it was interrupted):

1. `data/`: the ORL demo set (`lafs_jax.input.orl.build_orl`): 30 training people (.rec/.idx), a
   verification .bin of the 10 other people.
2. `stage1/`: a tiny supervised Part fViT (Partial FC, all 30 identities). Its landmark CNN is the
   one LAFS needs, as in the paper (LAFS's landmark CNN comes from a supervised Part fViT).
3. `pretrain/`: LAFS pretraining of a tiny Part fViT's ViT on the training images, no labels,
   landmark views from stage 1's frozen landmark CNN.
4. `finetune_scratch/` and `finetune_lafs/`: fine-tuning with the sharded margin head (sample rate
   < 1, all local devices), same budget and the same stage-1 landmark CNN, the ViT from random
   init (layer_decay 1.0) or from the LAFS teacher (layer_decay `finetune_lafs_layer_decay`, 0.58).
5. Verification on the 10 held-out people for raw pixels (cosine of the normalised images) and
   both fine-tuned models: `results.md`, `results.json`, `roc.png`, `landmarks.png`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from lafs_jax.eval import embed as embed_lib
from lafs_jax.eval import roc, verification
from lafs_jax.input.orl import build_orl
from lafs_jax.input.verification_bin import load_bin
from lafs_jax.numerics import l2_normalize
from lafs_jax.train import finetune, pretrain
from lafs_jax.variables import METADATA_FILE

FARS = (1e-2, 1e-1)
METHODS = ("raw pixels", "fine-tuned from scratch", "fine-tuned from LAFS")


def _done(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, METADATA_FILE))


def _stage(name: str, output: str, fn, *args) -> float:
    """Run `fn(*args)` unless `output` exists; returns the seconds it took (0 when skipped)."""
    if _done(output):
        logging.info("demo: %s already done (%s), skipped", name, output)
        print(f"[demo] {name}: done before, skipped", flush=True)
        return 0.0
    print(f"[demo] {name} ...", flush=True)
    t0 = time.time()
    fn(*args)
    took = time.time() - t0
    print(f"[demo] {name}: {took:.0f} s", flush=True)
    return took


def stage_configs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, ml_collections.ConfigDict]:
    """The four sub-run configs with the demo's paths filled in (copies; `config` is unchanged)."""
    data_dir = config.data_dir or os.path.join(workdir, "data")
    train, vbin = os.path.join(data_dir, "train"), os.path.join(data_dir, "verification.bin")
    stage1_backbone = os.path.join(workdir, "stage1", "backbone")
    out = {}
    for name in ("stage1", "pretrain", "finetune_scratch", "finetune_lafs"):
        src = config.pretrain if name == "pretrain" else (config.stage1 if name == "stage1" else config.finetune)
        c = ml_collections.ConfigDict(src.to_dict())
        c.seed, c.mesh = config.seed, ml_collections.ConfigDict(config.mesh.to_dict())
        c.data.path = train
        if name == "pretrain":
            c.lafs.landmark_path = stage1_backbone
        else:
            c.eval.bins = (vbin,)
        if name.startswith("finetune_"):
            c.init.landmark_cnn = stage1_backbone
            c.init.backbone = os.path.join(workdir, "pretrain", "teacher_backbone") if name == "finetune_lafs" else ""
        if name == "finetune_lafs":
            c.optim.layer_decay = config.finetune_lafs_layer_decay
        c.lock()
        out[name] = c
    return out


def raw_pixel_embeddings(images: np.ndarray) -> np.ndarray:
    """[N, H*W*3] float32: each image scaled to [-1, 1] and flattened (the no-learning baseline)."""
    return (images.reshape(len(images), -1).astype(np.float32) / 127.5) - 1.0


def _pair_scores(embeddings: np.ndarray) -> np.ndarray:
    e = l2_normalize(np.asarray(embeddings, np.float64), axis=1)
    return np.sum(e[0::2] * e[1::2], axis=1)


def plot_landmarks(backbone_dir: str, images: np.ndarray, path: str) -> None:
    """Landmarks the fine-tuned Part fViT predicts on a few held-out faces, drawn over them."""
    model, variables, meta = embed_lib.load_backbone(backbone_dir, host=True)
    x = embed_lib.preprocess(images, meta["normalization"], meta["color_order"])
    _, landmarks = jax.jit(lambda v, images: model.apply(v, images, train=False))(variables, x)
    landmarks = np.asarray(landmarks)
    fig = Figure(figsize=(2.2 * len(images), 2.4))
    axes = fig.subplots(1, len(images))
    for ax, img, lm in zip(np.atleast_1d(axes), images, landmarks):
        ax.imshow(img)
        ax.scatter(lm[:, 0], lm[:, 1], s=6, c=np.arange(len(lm)), cmap="viridis")
        ax.set_axis_off()
    fig.suptitle("patch centres predicted by the model's landmark CNN", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run the chain; returns {'results': {method: verification dict}, 'seconds': {stage: s}}. When no
    training stage ran (all done before) and results.json exists, the evaluation is not redone either:
    its table is printed and results.json returned."""
    t_start = time.time()
    workdir = os.path.abspath(workdir)
    data_dir = config.data_dir or os.path.join(workdir, "data")
    seconds = {}
    if os.path.exists(os.path.join(data_dir, "manifest.json")):
        print("[demo] ORL demo set: done before, skipped", flush=True)
    else:
        print("[demo] building the ORL demo set ...", flush=True)
        build_orl(data_dir, seed=config.seed)
    configs = stage_configs(config, workdir)
    path = {name: os.path.join(workdir, name) for name in configs}
    seconds["stage1"] = _stage("stage 1: supervised tiny Part fViT (landmark CNN for LAFS)",
                               os.path.join(path["stage1"], "backbone"), finetune.run, configs["stage1"], path["stage1"])
    seconds["pretrain"] = _stage("LAFS pretraining (no labels)", os.path.join(path["pretrain"], "teacher_backbone"),
                                 pretrain.run, configs["pretrain"], path["pretrain"])
    for name in ("finetune_scratch", "finetune_lafs"):
        seconds[name] = _stage(f"fine-tuning ({name.split('_')[1]})", os.path.join(path[name], "backbone"),
                               finetune.run, configs[name], path[name])

    results_json = os.path.join(workdir, "results.json")
    if not any(seconds.values()) and os.path.exists(results_json):  # nothing retrained: the evaluation stands
        print("[demo] evaluation: done before, skipped", flush=True)
        with open(os.path.join(workdir, "results.md")) as f:
            print("\n" + f.read().split("\n\n", 1)[-1].strip() + "\n", flush=True)
        with open(results_json) as f:
            return json.load(f)

    images, issame = load_bin(os.path.join(data_dir, "verification.bin"), 112)
    embeddings = {"raw pixels": raw_pixel_embeddings(images)}
    for method, name in zip(METHODS[1:], ("finetune_scratch", "finetune_lafs")):
        embedder = embed_lib.Embedder.from_variables_dir(os.path.join(path[name], "backbone"))
        embeddings[method] = embedder.embed(images, flip=True)
    results = {m: verification.evaluate(embeddings[m][0::2], embeddings[m][1::2], issame, fars=FARS)
               for m in METHODS}

    table = roc.markdown_table(results, FARS, name="method")
    seconds["total"] = time.time() - t_start
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("# lafs_jax demo: verification on 10 held-out ORL people "
                f"({int(issame.sum())} genuine + {int((~issame).sum())} impostor pairs)\n\n{table}\n")
    with open(results_json, "w") as f:
        json.dump({"results": {m: {k: v for k, v in r.items()} for m, r in results.items()},
                   "seconds": seconds}, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    roc.plot_roc({m: roc.roc_points(_pair_scores(embeddings[m]), issame) for m in METHODS},
                 os.path.join(workdir, "roc.png"), title="ORL held-out identities (10 people)", far_min=1e-3)
    plot_landmarks(os.path.join(path["finetune_lafs"], "backbone"), images[0:12:2][:6],
                   os.path.join(workdir, "landmarks.png"))
    print("\n" + table + "\n", flush=True)
    print(f"[demo] wrote results.md, results.json, roc.png, landmarks.png in {workdir} "
          f"(TensorBoard logs in its stage folders); {seconds['total']:.0f} s", flush=True)
    return {"results": results, "seconds": seconds}
