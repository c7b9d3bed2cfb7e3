"""task 'demo': the LAFS paper's few-shot claim in miniature, on real faces (ORL / AT&T Laboratories
Cambridge), on a CPU.

The paper (supplement, Table 6) pretrains without labels, fine-tunes with k labelled images per
identity, and finds LAFS > DINO-face > training from scratch when labels are few. The demo runs that
experiment on ORL's 40 people: 25 train, 5 validate (every setting of `configs/demo.py` was chosen on
them), 10 test (read only for the final table). Per seed of `config.seeds` (stages skipped when their
output exists, resumed from their checkpoint when interrupted):

1. `data/` (once): `lafs_jax.input.orl.build_orl`: train.rec/.idx, validation.bin, test.bin.
2. `seedS/stage1/`: a tiny supervised Part fViT on the training people. Its landmark CNN stands in
   for the paper's pretrained landmark CNN (trained on a labelled set of its own); every Part fViT
   below uses it frozen, so the methods differ only in how their ViT starts.
3. `seedS/pretrain_dino/` (DINO-face: multi-crop DINO on a plain fViT) and `seedS/pretrain_lafs/`
   (LAFS: landmark views from stage 1's landmark CNN, Part fViT's ViT), on the training images
   without labels.
4. `seedS/<method>_k<k>/` for every method of `config.methods` and every k of `config.shots`:
   fine-tuning with k labelled images of each training person (`data.subset.k`, drawn with the
   seed; 0 = all 10) and the same steps for every method at a given k: 'scratch' (Part fViT, random
   ViT, layer decay 1.0), 'dino' (fViT from the DINO-face teacher), 'lafs' (Part fViT from the LAFS
   teacher); the pretrained ones with layer decay `config.pretrained_layer_decay`.
5. Verification of every model on the validation and the test people (each model's scores cached
   in its folder as `verification.json`), of raw pixels, and of both teachers as they are (no
   labels): `results.md` (the test table; the validation table), `results.json` (every run, the
   seeds, the commit), `fewshot.png` (test accuracy against k), `roc.png` (test ROC at the largest k,
   first seed), `landmarks.png` (stage 1's landmarks on test faces).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from lafs_jax.eval import embed as embed_lib
from lafs_jax.eval import roc, verification
from lafs_jax.input.orl import SPLIT_FILES, build_orl
from lafs_jax.input.verification_bin import load_bin
from lafs_jax.models import presets
from lafs_jax.numerics import l2_normalize
from lafs_jax.train import finetune, pretrain
from lafs_jax.variables import METADATA_FILE

FAR = 1e-2  # the table's TAR@FAR
FARS = (1e-2, 1e-1)
METHODS = ("scratch", "dino", "lafs")  # fine-tuning inits, in table order
TEACHERS = {"dino": "pretrain_dino", "lafs": "pretrain_lafs"}  # method -> its pretraining stage
TITLES = {"raw": "raw pixels (no learning)", "dino_teacher": "DINO-face teacher, no labels",
          "lafs_teacher": "LAFS teacher, no labels", "scratch": "Part fViT from scratch",
          "dino": "fViT from DINO-face", "lafs": "Part fViT from LAFS"}
VERIFICATION_FILE = "verification.json"


def shots_name(k: int) -> str:
    """'all' for k = 0, else str(k)."""
    return "all" if k == 0 else str(k)


def run_name(method: str, k: int) -> str:
    return f"{method}_k{shots_name(k)}"


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


def data_paths(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """{'dir', 'train' (the .rec prefix), 'validation', 'test' (.bin files)}."""
    data_dir = config.data_dir or os.path.join(workdir, "data")
    out = {"dir": data_dir, "train": os.path.join(data_dir, "train")}
    out.update({name: os.path.join(data_dir, file) for name, file in SPLIT_FILES.items()})
    return out


def _copy(src: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(src.to_dict())


def stage_configs(config: ml_collections.ConfigDict, workdir: str, seed: int, *, people: int = 25,
                  images_per_person: int = 10) -> dict[str, ml_collections.ConfigDict]:
    """{stage name: its locked config} for one seed: 'stage1', 'pretrain_dino', 'pretrain_lafs' and a
    `run_name(method, k)` per method and k; each stage's folder is `workdir/seed<seed>/<name>`.
    `people` x `images_per_person` is the training set (the manifest's counts): the k-shot runs' warmup
    of `config.finetune_warmup_steps` is given in their epochs."""
    paths = data_paths(config, workdir)
    root = os.path.join(workdir, f"seed{seed}")
    stage1_backbone = os.path.join(root, "stage1", "backbone")
    out = {}

    def common(c):
        c.seed, c.mesh = seed, _copy(config.mesh)
        c.data.path = paths["train"]

    c = _copy(config.stage1)
    common(c)
    c.eval.bins = (paths["validation"],)
    out["stage1"] = c
    for method, stage in TEACHERS.items():
        c = _copy(config.pretrain_dino if method == "dino" else config.pretrain_lafs)
        common(c)
        if method == "lafs":
            c.lafs.landmark_path = stage1_backbone
        out[stage] = c
    if len(config.finetune_steps) != len(config.shots):
        raise ValueError(f"config.finetune_steps {tuple(config.finetune_steps)} needs one entry per config.shots "
                         f"{tuple(config.shots)}")
    for method in config.methods:
        if method not in METHODS:
            raise ValueError(f"config.methods: {method!r} is not one of {METHODS}")
        for k, steps in zip(config.shots, config.finetune_steps):
            c = _copy(config.finetune)
            common(c)
            c.eval.bins = (paths["validation"],)
            c.data.subset.k, c.data.subset.k_draw, c.data.subset.seed = int(k), "random", seed
            c.total_steps = int(steps)
            steps_per_epoch = (people * (k or images_per_person)) // c.batch_size
            if steps_per_epoch < 1:
                raise ValueError(f"k = {k}: {people * (k or images_per_person)} training images, fewer than "
                                 f"config.finetune.batch_size={c.batch_size}")
            c.optim.epochs = -(-int(steps) // steps_per_epoch)  # what total_steps spans, in whole epochs of this k
            c.optim.warmup_epochs = config.finetune_warmup_steps / steps_per_epoch
            c.eval.every_steps = int(steps)  # validation once, at the end
            if method == "dino":
                c.model.kind = "fvit"  # DINO-face pretrains a plain fViT: fine-tuned as one
                c.freeze_landmark_cnn = False
            else:
                c.init.landmark_cnn = stage1_backbone
            if method in TEACHERS:
                c.init.backbone = os.path.join(root, TEACHERS[method], pretrain.TEACHER_BACKBONE_DIR)
                c.optim.layer_decay = config.pretrained_layer_decay
            out[run_name(method, k)] = c
    for c in out.values():
        c.lock()
    return out


# ---------------------------------------------------------------------------------------------- evaluation

def raw_pixel_embeddings(images: np.ndarray) -> np.ndarray:
    """[N, H*W*3] float32: each image scaled to [-1, 1] and flattened (the no-learning baseline)."""
    return (images.reshape(len(images), -1).astype(np.float32) / 127.5) - 1.0


def pair_scores(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity [P] of the pairs (rows 2p, 2p+1) of `embeddings` [2P, D]."""
    e = l2_normalize(np.asarray(embeddings, np.float64), axis=1)
    return np.sum(e[0::2] * e[1::2], axis=1)


def teacher_embedder(finetune_config: ml_collections.ConfigDict) -> embed_lib.Embedder:
    """The model a fine-tuning config starts from (its `init.backbone` teacher, and the frozen landmark
    CNN of a Part fViT), as an Embedder: the pretrained features before any label is seen."""
    c = finetune_config
    variables, _ = finetune.initial_variables(c, presets.compiled_init(c.model)(jax.random.key(c.seed)))
    return embed_lib.Embedder(presets.build_model(c.model), variables, image_size=c.model.image_size,
                              normalization=c.data.normalization, color_order=c.data.color_order)


def verify(embedder: Any, sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """{set: verification metrics} and {set + '_scores': pair scores} of an embedder (an Embedder, or a
    function images -> embeddings) on {set: (images, issame)}, as JSON reads them back (lists, string
    FAR keys)."""
    out = {}
    for name, (images, issame) in sets.items():
        emb = embedder.embed(images, flip=True) if hasattr(embedder, "embed") else embedder(images)
        out[name] = verification.evaluate(emb[0::2], emb[1::2], issame, fars=FARS)
        out[name + "_scores"] = pair_scores(emb)
    return json.loads(json.dumps(out, default=_jsonable))


def _jsonable(o):
    return o.tolist() if hasattr(o, "tolist") else str(o)


def cached_verification(directory: str, make_embedder, sets) -> dict:
    """`verify(make_embedder(), sets)`, cached in `directory/verification.json` (written once)."""
    path = os.path.join(directory, VERIFICATION_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    out = verify(make_embedder(), sets)
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    return out


def summarise(runs: dict[str, dict[int, dict]], split: str) -> dict[str, dict]:
    """{row: {'accuracy', 'accuracy_sd', 'tar', 'tar_sd', 'seeds', 'sd_over'}} of {row: {seed: verification}}:
    means over seeds; the sd is over seeds when there are several, else the 10-fold sd of one run."""
    table = {}
    for row, by_seed in runs.items():
        acc = np.array([r[split]["accuracy"] for r in by_seed.values()])
        tar = np.array([np.nan if r[split]["tar_at_far"][str(FAR)] is None else r[split]["tar_at_far"][str(FAR)]
                        for r in by_seed.values()])
        several = len(acc) > 1
        table[row] = {"accuracy": float(acc.mean()),
                      "accuracy_sd": float(acc.std(ddof=1)) if several else
                      float(next(iter(by_seed.values()))[split]["accuracy_std"]),
                      "tar": float(tar.mean()), "tar_sd": float(tar.std(ddof=1)) if several else float("nan"),
                      "seeds": sorted(by_seed), "sd_over": "seeds" if several else "folds"}
    return table


def row_label(row: str) -> tuple[str, str]:
    """(method, shots) of a runs key: 'lafs_k1' -> ('lafs', '1'); 'raw' -> ('raw', '')."""
    method, _, k = row.partition("_k")
    return method, k


def markdown_tables(table: dict[str, dict], shots: tuple[int, ...], split: str, pairs: int) -> str:
    """One markdown table: a row per method (raw pixels and teachers first), a column per k."""
    ks = [shots_name(k) for k in shots]
    methods = list(dict.fromkeys(row_label(r)[0] for r in table))
    sd_over = {t["sd_over"] for t in table.values()}
    head = ["method"] + [f"k = {k}" for k in ks]
    lines = [f"{split} people ({pairs} pairs): accuracy (%) ± sd over {' / '.join(sorted(sd_over))}, "
             f"TAR@FAR={FAR:g} (%) in brackets; k = labelled images per training person", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(t):
        return "" if t is None else f"{100 * t['accuracy']:.2f} ± {100 * t['accuracy_sd']:.2f} ({100 * t['tar']:.1f})"

    for method in methods:
        if method in table:  # no labels: one value for every column
            cells = [cell(table[method])] + ["same"] * (len(ks) - 1)
        else:
            cells = [cell(table.get(f"{method}_k{k}")) for k in ks]
        lines.append("| " + " | ".join([TITLES[method]] + cells) + " |")
    return "\n".join(lines)


def plot_fewshot(table: dict[str, dict], shots: tuple[int, ...], path: str, images_per_person: int = 10) -> None:
    """Test accuracy against k, one line per fine-tuned method (error bars: the table's sd); raw pixels
    and the teachers as horizontal lines."""
    from matplotlib.figure import Figure  # optional heavy dependency (0.6 s at import): only plots need it
    fig = Figure(figsize=(6, 4.2), dpi=110)
    ax = fig.subplots()
    xs = [k if k > 0 else images_per_person for k in shots]
    for method in METHODS:
        rows = [table.get(f"{method}_k{shots_name(k)}") for k in shots]
        if all(r is None for r in rows):
            continue
        pts = [(x, r) for x, r in zip(xs, rows) if r is not None]
        ax.errorbar([x for x, _ in pts], [100 * r["accuracy"] for _, r in pts],
                    yerr=[100 * r["accuracy_sd"] for _, r in pts], marker="o", capsize=3, label=TITLES[method])
    for row, style in (("raw", ":"), ("dino_teacher", "--"), ("lafs_teacher", "-.")):
        if row in table:
            ax.axhline(100 * table[row]["accuracy"], ls=style, lw=1, color="grey", label=TITLES[row])
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [shots_name(k) for k in shots])
    ax.set_xlabel("labelled images per training person (k)")
    ax.set_ylabel("test verification accuracy (%)")
    sd_over = next(iter(table.values()))["sd_over"] if table else "seeds"
    ax.set_title(f"few-shot fine-tuning on ORL (error bars: sd over {sd_over})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_landmarks(backbone_dir: str, images: np.ndarray, path: str) -> None:
    """Landmarks a Part fViT's landmark CNN predicts on a few faces, drawn over them."""
    model, variables, meta = embed_lib.load_backbone(backbone_dir, host=True)
    x = embed_lib.preprocess(images, meta["normalization"], meta["color_order"])
    _, aux = jax.jit(lambda v, images: model.apply(v, images, train=False))(variables, x)
    landmarks = np.asarray(aux["landmarks"])
    from matplotlib.figure import Figure  # optional heavy dependency (0.6 s at import): only plots need it
    fig = Figure(figsize=(2.2 * len(images), 2.4))
    axes = fig.subplots(1, len(images))
    for ax, img, lm in zip(np.atleast_1d(axes), images, landmarks):
        ax.imshow(img)
        ax.scatter(lm[:, 0], lm[:, 1], s=6, c=np.arange(len(lm)), cmap="viridis")
        ax.set_axis_off()
    fig.suptitle("patch centres predicted by the stage-1 landmark CNN (used frozen by every Part fViT)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def git_commit(path: str) -> str:
    """The git commit of the checkout holding `path` ('-dirty' appended when tracked files differ from
    it), or 'unknown' (logged) outside one."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=path,
                             capture_output=True, text=True, timeout=10)
    except OSError as e:
        logging.warning("demo: no git commit recorded (%s)", e)
        return "unknown"
    if out.returncode != 0:
        logging.warning("demo: no git commit recorded (%s)", out.stderr.strip())
        return "unknown"
    return out.stdout.strip()


# ---------------------------------------------------------------------------------------------- the chain

def _check_data(manifest_path: str, config: ml_collections.ConfigDict) -> None:
    with open(manifest_path) as f:
        manifest = json.load(f)
    if "validation" not in manifest or manifest.get("seed") != config.seed:
        raise ValueError(f"{manifest_path}: built by another split (seed {manifest.get('seed')}, parts "
                         f"{sorted(k for k in manifest if isinstance(manifest[k], dict))}) than this demo's "
                         f"(seed {config.seed}: train / validation / test); use a new --workdir or config.data_dir")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run the chain for every seed, then the evaluation; returns the content of results.json
    ({'test', 'validation': {row: summary}, 'runs': {row: {seed: metrics}}, 'seconds', ...})."""
    t_start = time.time()
    commit = git_commit(os.path.dirname(os.path.abspath(__file__)))  # the code this process runs
    workdir = os.path.abspath(workdir)
    paths = data_paths(config, workdir)
    manifest = os.path.join(paths["dir"], "manifest.json")
    if os.path.exists(manifest):
        _check_data(manifest, config)
        print("[demo] ORL demo set: done before, skipped", flush=True)
    else:
        print("[demo] building the ORL demo set ...", flush=True)
        build_orl(paths["dir"], seed=config.seed)
    sets = {name: load_bin(paths[name], 112) for name in SPLIT_FILES}

    seconds: dict[str, float] = {}
    runs: dict[str, dict[int, dict]] = {}
    raw = verify(raw_pixel_embeddings, sets)
    runs["raw"] = {seed: raw for seed in config.seeds}
    with open(manifest) as f:
        train = json.load(f)["train"]
    for seed in config.seeds:
        configs = stage_configs(config, workdir, seed, people=train["people"],
                                images_per_person=train["images"] // train["people"])
        root = os.path.join(workdir, f"seed{seed}")
        where = {name: os.path.join(root, name) for name in configs}
        tag = f"seed {seed}: "
        seconds[f"seed{seed}/stage1"] = _stage(tag + "stage 1, supervised tiny Part fViT (the landmark CNN)",
                                               os.path.join(where["stage1"], "backbone"), finetune.run,
                                               configs["stage1"], where["stage1"])
        for method in config.methods:
            if method not in TEACHERS:
                continue
            stage = TEACHERS[method]
            seconds[f"seed{seed}/{stage}"] = _stage(
                tag + f"{'DINO-face' if method == 'dino' else 'LAFS'} pretraining (no labels)",
                os.path.join(where[stage], pretrain.TEACHER_BACKBONE_DIR), pretrain.run, configs[stage], where[stage])
            first = configs[run_name(method, config.shots[0])]
            runs.setdefault(f"{method}_teacher", {})[seed] = cached_verification(
                where[stage], lambda c=first: teacher_embedder(c), sets)
        for method in config.methods:
            for k in config.shots:
                name = run_name(method, k)
                seconds[f"seed{seed}/{name}"] = _stage(
                    tag + f"fine-tuning {method}, k = {shots_name(k)} ({configs[name].total_steps} steps)",
                    os.path.join(where[name], "backbone"), finetune.run, configs[name], where[name])
                runs.setdefault(name, {})[seed] = cached_verification(
                    where[name], lambda d=where[name]: embed_lib.Embedder.from_variables_dir(os.path.join(d, "backbone")),
                    sets)

    shots = tuple(config.shots)
    tables = {split: summarise(runs, split) for split in SPLIT_FILES}
    pairs = {split: len(sets[split][1]) for split in SPLIT_FILES}
    text = "\n\n".join(markdown_tables(tables[split], shots, split, pairs[split]) for split in ("test", "validation"))
    seconds["total"] = time.time() - t_start
    result = {"commit": commit, "seeds": list(config.seeds),
              "shots": list(shots), "methods": list(config.methods),
              "test": tables["test"], "validation": tables["validation"],
              "runs": {row: {str(s): {split: {k: v for k, v in r[split].items() if k != "fold_thresholds"}
                                      for split in SPLIT_FILES} for s, r in by_seed.items()}
                       for row, by_seed in runs.items()},
              "seconds": seconds}
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"# lafs_jax demo: few-shot verification on ORL (seeds {list(config.seeds)}, commit "
                f"{result['commit'][:12]})\n\n{text}\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=_jsonable)
    plot_fewshot(tables["test"], shots, os.path.join(workdir, "fewshot.png"))
    seed0, top_k = config.seeds[0], shots_name(max(shots, key=lambda k: 10 if k == 0 else k))
    curves = {TITLES[row_label(row)[0]] + (f", k = {top_k}" if row_label(row)[1] else ""):
              roc.roc_points(np.asarray(by_seed[seed0]["test_scores"]), sets["test"][1])
              for row, by_seed in runs.items() if row_label(row)[1] in ("", top_k)}
    roc.plot_roc(curves, os.path.join(workdir, "roc.png"), far_min=1e-3,
                 title=f"ORL test people ({pairs['test']} pairs), seed {seed0}")
    plot_landmarks(os.path.join(workdir, f"seed{seed0}", "stage1", "backbone"), sets["test"][0][0:12:2][:6],
                   os.path.join(workdir, "landmarks.png"))
    print("\n" + text + "\n", flush=True)
    print(f"[demo] wrote results.md, results.json, fewshot.png, roc.png, landmarks.png in {workdir} "
          f"(TensorBoard logs in the stage folders); {seconds['total']:.0f} s", flush=True)
    return result
