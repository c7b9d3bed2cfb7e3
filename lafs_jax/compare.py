"""`python -m lafs_jax.compare`: are two face images the same person, by a backbone's cosine similarity.

    python -m lafs_jax.compare A.jpg B.jpg --backbone DIR [--threshold T | --calibrate PAIRS.bin --far F]
                               [--no-flip] [--json]

Contract:
- Each image is read and sized as `lafs_jax.embed` does (`embed.fit_size`: the model's size as it is,
  else centre-cropped to a square and resized with Pillow bicubic); its embedding is flip-summed (unless
  `--no-flip`) and L2-normalised; the similarity is the cosine (dot product) of the two, in [-1, 1].
- Verdict: 'same' when similarity >= threshold, else 'different'. The threshold, first that applies:
  `--threshold T` (given); `--calibrate PAIRS.bin --far F` (default F = 1e-3): the lowest threshold whose
  false-accept rate on that `.bin`'s impostor pairs is <= F (so the highest TAR with FAR <= F, the
  'at_most' operating point of `eval.roc.tar_at_far`, whose TAR is reported with it); a `.bin` with fewer
  than 1/F impostor pairs cannot measure F and is an error naming the file and F; else the threshold
  recorded in the backbone metadata's `verification` results (METADATA_KEYS: a cosine threshold as is, or
  the protocol's squared-L2 `best_threshold` d converted to cosine 1 - d/2, mean over the sets); else an
  error saying to pass --threshold or --calibrate.
- Output: three lines (similarity, threshold and its origin, verdict), or with `--json` one JSON object
  {similarity, threshold, threshold_source, verdict, a, b, backbone, flip (+ far, tar, impostor_pairs,
  genuine_pairs when calibrated)}. User errors are one line `FATAL ...` on stderr, exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from lafs_jax import embed as embed_cli
from lafs_jax.eval import embed as embed_lib
from lafs_jax.eval import roc
from lafs_jax.input import images as image_lib
from lafs_jax.input.verification_bin import VerificationBinError, load_bin
from lafs_jax.numerics import l2_normalize

# keys of metadata['verification'] read as a threshold: cosine thresholds as they are, squared-L2 ones
# (InsightFace protocol, eval.verification) converted with cos = 1 - d / 2; '<set>/<key>' is also read.
COSINE_KEYS = ("cosine_threshold",)
DISTANCE_KEYS = ("best_threshold",)
METADATA_KEYS = COSINE_KEYS + DISTANCE_KEYS


def read_image(path: str, size: int) -> np.ndarray:
    """uint8 [size, size, 3] RGB of an image file (embed.fit_size); UserError naming the file."""
    if not os.path.isfile(path):
        raise embed_cli.UserError(f"{path}: no such image file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        image = image_lib.decode_image(data, path)
    except image_lib.UndecodableImageError as e:
        raise embed_cli.UserError(str(e)) from None
    return embed_cli.fit_size(image, size)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of a [N, D] and b [N, D] (each L2-normalised, then dotted)."""
    a, b = l2_normalize(np.asarray(a, np.float64)), l2_normalize(np.asarray(b, np.float64))
    return np.sum(a * b, axis=-1)


def calibrate_threshold(scores: np.ndarray, issame: np.ndarray, far: float, where: str = "pairs") -> dict:
    """{'threshold', 'tar', 'far' (achieved), 'impostor_pairs', 'genuine_pairs'}: the lowest threshold t
    (one of the scores) with mean(impostor scores >= t) <= far, and the TAR mean(genuine scores >= t).
    UserError naming `where` and far when there are fewer than 1/far impostor pairs or no genuine pair."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    issame = np.asarray(issame).astype(bool).reshape(-1)
    impostor, genuine = np.sort(scores[~issame])[::-1], scores[issame]
    if not 0.0 < far < 1.0:
        raise embed_cli.UserError(f"--far {far:g}: must be in (0, 1)")
    if len(impostor) * far < 1.0:
        raise embed_cli.UserError(f"{where}: {len(impostor)} impostor pairs cannot measure FAR {far:g} "
                                  f"(needs at least {int(np.ceil(1.0 / far))})")
    if len(genuine) == 0:
        raise embed_cli.UserError(f"{where}: no genuine pairs, so no TAR to calibrate against")
    allowed = int(np.floor(far * len(impostor) + 1e-9))  # impostors that may score >= t
    if allowed >= len(impostor):
        best = float(scores.min())
    else:  # t must exceed the (allowed+1)-th highest impostor score; the lowest such score keeps the most genuines
        above = scores[scores > impostor[allowed]]
        best = float(above.min()) if len(above) else float(np.nextafter(impostor[allowed], np.inf))
    return {"threshold": float(best), "tar": float(np.mean(genuine >= best)),
            "far": float(np.mean(impostor >= best)), "impostor_pairs": int(len(impostor)),
            "genuine_pairs": int(len(genuine))}


def metadata_threshold(meta: dict) -> tuple[float, str] | None:
    """(cosine threshold, description) from metadata['verification'] (METADATA_KEYS), or None."""
    results = meta.get("verification")
    if not isinstance(results, dict):
        return None
    for keys, convert, kind in ((COSINE_KEYS, lambda v: v, "cosine"),
                                (DISTANCE_KEYS, lambda v: 1.0 - v / 2.0, "squared-L2, as cosine 1 - d/2")):
        found = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))
                 and (k in keys or k.rsplit("/", 1)[-1] in keys)}
        if found:
            return float(np.mean([convert(v) for v in found.values()])), \
                f"backbone metadata verification {', '.join(sorted(found))} ({kind})"
    return None


def compare(a: str, b: str, backbone: str, *, threshold: float | None = None, calibrate: str | None = None,
            far: float = 1e-3, flip: bool = True, batch: int = 64) -> dict:
    """The command's result dict (see the module docstring)."""
    meta = embed_cli.check_backbone_dir(backbone)
    size = embed_cli.image_size_of(meta)
    images = np.stack([read_image(a, size), read_image(b, size)])
    source = "given"
    if threshold is None and calibrate is None:
        found = metadata_threshold(meta)
        if found is None:
            raise embed_cli.UserError(f"{os.path.join(backbone, 'metadata.json')} records no verification threshold; "
                                      f"pass --threshold T or --calibrate PAIRS.bin --far F")
        threshold, source = found
    pairs = None
    if threshold is None:
        if not os.path.isfile(calibrate):
            raise embed_cli.UserError(f"--calibrate {calibrate}: no such file")
        try:
            pairs = load_bin(calibrate, size)
        except VerificationBinError as e:
            raise embed_cli.UserError(str(e)) from None
        if np.sum(~pairs[1]) * far < 1.0:  # before the embedding work
            calibrate_threshold(np.zeros(len(pairs[1])), pairs[1], far, calibrate)
    embedder = embed_lib.Embedder.from_variables_dir(backbone, batch_size=batch)
    emb = embed_cli.embed_images(embedder, images, flip=flip)
    similarity = float(cosine(emb[:1], emb[1:])[0])
    out: dict[str, Any] = {}
    if pairs is not None:
        pair_emb = embed_cli.embed_images(embedder, pairs[0], flip=flip)
        scores = cosine(pair_emb[0::2], pair_emb[1::2])
        cal = calibrate_threshold(scores, pairs[1], far, calibrate)
        cal["tar_at_far"] = roc.tar_at_far(scores, pairs[1], [far], operating_point="at_most")[float(far)]
        threshold = cal["threshold"]
        source = (f"calibrated on {calibrate} at FAR <= {far:g}: TAR {cal['tar']:.4f}, FAR {cal['far']:.4g} over "
                  f"{cal['impostor_pairs']} impostor and {cal['genuine_pairs']} genuine pairs")
        out.update(far_target=float(far), tar=cal["tar"], far=cal["far"], impostor_pairs=cal["impostor_pairs"],
                   genuine_pairs=cal["genuine_pairs"], tar_at_far=cal["tar_at_far"])
    return {"similarity": similarity, "threshold": float(threshold), "threshold_source": source,
            "verdict": "same" if similarity >= threshold else "different", "a": a, "b": b,
            "backbone": os.path.abspath(backbone), "flip": bool(flip), **out}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lafs_jax.compare", description=(
        "Cosine similarity of two face images' (flip-summed, L2-normalised) embeddings and a same/different "
        "verdict. Images of another size than the model's: " + embed_cli.RESIZE_RULE + "."))
    p.add_argument("a", help="first image file")
    p.add_argument("b", help="second image file")
    p.add_argument("--backbone", required=True, help="variables directory (metadata.json + variables/)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, help="cosine threshold: same when similarity >= T")
    group.add_argument("--calibrate", metavar="PAIRS.bin", help="pick the threshold on this .bin's pairs at --far")
    p.add_argument("--far", type=float, default=1e-3, help="false-accept rate for --calibrate (default 1e-3)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not add the mirrored image's embedding")
    p.add_argument("--batch", type=int, default=64, help="images per compiled call for --calibrate")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        r = compare(args.a, args.b, args.backbone, threshold=args.threshold, calibrate=args.calibrate, far=args.far,
                    flip=args.flip, batch=args.batch)
    except embed_cli.USER_ERRORS as e:
        embed_cli.fatal(e)
    except ValueError as e:
        embed_cli.fatal(e)
    if args.json:
        print(json.dumps(r), flush=True)
    else:
        print(f"similarity {r['similarity']:.4f}\nthreshold  {r['threshold']:.4f} ({r['threshold_source']})\n"
              f"verdict    {r['verdict']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
