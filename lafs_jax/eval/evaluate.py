"""task 'evaluate': verification (.bin), IJB-B/C TAR@FAR and export of one trained backbone.

`run(config, workdir)` reads the backbone variables directory `config.evaluate.checkpoint` (default
`workdir/backbone`, what fine-tuning writes; or lafs_jax.convert's output of an official checkpoint),
rebuilds the model from its metadata and, as configured:
  - evaluates every `.bin` pair set (10-fold accuracy, TAR@FAR) -> workdir/verification.{md,json};
  - runs the IJB-B and/or IJB-C 1:1 protocol -> workdir/ijb_roc.png, ijb_results.{md,json};
  - exports the embedding function with jax.export -> workdir/embedding.jaxexport (+ .json), reloads
    it and checks it reproduces the embeddings of a few evaluation images.
Input normalisation and colour order come from the checkpoint's metadata unless overridden
(`evaluate.normalization='[-0.5,0.5]'` reproduces the official LAFS evaluation scripts).
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from absl import logging

from lafs_jax import config as config_lib
from lafs_jax import sharding as mesh_lib
from lafs_jax.config import check, check_choice
from lafs_jax.eval import embed, export, ijb, roc, verification
from lafs_jax.input.images import COLOR_ORDERS
from lafs_jax.input.transforms import NORMALIZATIONS
from lafs_jax.input.verification_bin import load_bin


def validate(config: ml_collections.ConfigDict, workdir: str) -> str:
    """ConfigError naming the key for a bad field; returns the checkpoint directory to evaluate."""
    config_lib.validate_common(config)
    e = config_lib.get_path(config, "evaluate")
    checkpoint = e.checkpoint or os.path.join(workdir, "backbone")
    check(os.path.isdir(checkpoint), "evaluate.checkpoint", e.checkpoint,
          f"a backbone variables directory (looked for {checkpoint!r}; '' means WORKDIR/backbone)")
    for i, path in enumerate(e.bins):
        check(os.path.isfile(path), f"evaluate.bins[{i}]", path, "an existing .bin file")
    for key in ("ijbb_root", "ijbc_root"):
        path = e[key]
        check(path == "" or os.path.isdir(os.path.join(path, "meta")), f"evaluate.{key}", path,
              "'' or an IJB folder holding meta/ and loose_crop/")
    check(bool(e.bins) or bool(e.ijbb_root) or bool(e.ijbc_root) or e.export, "evaluate.bins", tuple(e.bins),
          "nothing to do: give .bin files, an IJB root, or set evaluate.export=True")
    for key in ("batch_size", "nfolds"):
        check(isinstance(e[key], int) and e[key] >= 1, f"evaluate.{key}", e[key], "an int >= 1")
    check(isinstance(e.ijb_workers, int) and e.ijb_workers >= 0, "evaluate.ijb_workers", e.ijb_workers, "an int >= 0")
    check(isinstance(e.ijb_identification, bool), "evaluate.ijb_identification", e.ijb_identification, "True or False")
    check_choice(config, "evaluate.normalization", ("",) + NORMALIZATIONS)
    check_choice(config, "evaluate.color_order", ("",) + COLOR_ORDERS)
    for key in ("flip", "export", "use_flip_test", "use_norm_score", "use_detector_score"):
        check(isinstance(e[key], bool), f"evaluate.{key}", e[key], "True or False")
    return checkpoint


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluate and export; returns {'verification': {...}, 'ijb': {...}, 'export': {...}}."""
    checkpoint = validate(config, workdir)
    e = config.evaluate
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(config.mesh)
    embedder = embed.Embedder.from_variables_dir(checkpoint, mesh=mesh, normalization=e.normalization or None,
                                                 color_order=e.color_order or None, batch_size=e.batch_size)
    logging.info("evaluating %s (normalization %s, colour order %s)", checkpoint, embedder.normalization,
                 embedder.color_order)
    out: dict = {"checkpoint": checkpoint, "normalization": embedder.normalization,
                 "color_order": embedder.color_order}

    if e.bins:
        results = verification.evaluate_bins(embedder, e.bins, flip=e.flip, nfolds=e.nfolds)
        with open(os.path.join(workdir, "verification.md"), "w") as f:
            table = roc.markdown_table(results, verification.DEFAULT_FARS)
            f.write(f"Verification of {checkpoint} (flip={e.flip})\n\n{table}\n")
        summary = {name: {k: (v if k != "tar_at_far" else {f"{far:g}": t for far, t in v.items()})
                          for k, v in r.items()} for name, r in results.items()}
        with open(os.path.join(workdir, "verification.json"), "w") as f:
            json.dump(summary, f, indent=1)
        out["verification"] = summary

    ijb_results = {}
    for target, root in (("IJBB", e.ijbb_root), ("IJBC", e.ijbc_root)):
        if root:
            ijb_results[target] = ijb.evaluate_target(
                embedder.embed_batch, root, target, batch_size=embedder.batch_size,
                use_flip_test=e.use_flip_test, use_norm_score=e.use_norm_score,
                use_detector_score=e.use_detector_score, workers=e.ijb_workers,
                identification=e.ijb_identification)
            logging.info("%s TAR@FAR=1e-4: %.2f%%", target, 100 * ijb_results[target]["tar_at_far"][1e-4])
            if e.ijb_identification:
                logging.info("%s 1:N identification (%%):\n%s", target,
                             ijb.identification_table(ijb_results[target]["identification"]))
    if ijb_results:
        paths = ijb.write_report(ijb_results, workdir)
        print(roc.markdown_table(ijb_results, ijb.FARS), flush=True)
        out["ijb"] = {t: {f"{far:g}": v for far, v in r["tar_at_far"].items()} for t, r in ijb_results.items()}
        out["ijb_files"] = paths

    if e.export:
        path = os.path.join(workdir, "embedding.jaxexport")
        path, sidecar = export.export_backbone(checkpoint, path, flip=e.flip, normalization=embedder.normalization,
                                               color_order=embedder.color_order)
        exported, _ = export.load_exported(path)
        probe = _probe_images(e.bins, embedder.image_size)
        max_diff = float(np.max(np.abs(np.asarray(exported.call(probe)) - embedder.embed(probe, flip=e.flip))))
        logging.info("exported %s; reloaded, max |difference| to the embedder %.3g", path, max_diff)
        out["export"] = {"path": path, "sidecar": sidecar, "max_abs_diff": max_diff}
    with open(os.path.join(workdir, "evaluate.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def _probe_images(bins, image_size: int) -> np.ndarray:
    """A few uint8 images to compare the exported function with: the first pairs of the first .bin,
    else a seeded random batch."""
    if bins:
        images, _ = load_bin(bins[0], image_size)
        return images[:4]
    return np.random.default_rng(0).integers(0, 256, (4, image_size, image_size, 3)).astype(np.uint8)

