"""`python -m lafs_jax.embed`: embeddings of your own face images with a trained or converted backbone.

    python -m lafs_jax.embed --backbone DIR --images PATH --out EMB.npy [--no-flip] [--batch N]
                             [--landmarks FILE] [--skip-bad]
    python -m lafs_jax.embed --backbone CLIP_DIR --texts CAPTIONS.txt --out EMB.npy
    python -m lafs_jax.embed --backbone CLIP_DIR --images PATH --texts PROMPTS.txt --out SCORES.npy

`--texts` (a CLIP / FaRL directory, kind 'clip_vit'): text features, one row per line of the UTF-8 file
(`eval.text_embed`; an empty or undecodable line is an error naming it; captions longer than the
context are truncated as CLIP does, counted in the log and the JSON). Images of such a directory give
its projected CLIP image features (unnormalised; with the flip sum unless --no-flip). Both `--images`
and `--texts`: zero-shot attribute scores, float32 [N images, P prompts] cosines of the two features
(`eval.text_embed.zero_shot_scores`; the JSON adds the prompts and the directory's scale exp(logit_scale),
with which `text_embed.zero_shot_probabilities` gives CLIP's softmax over prompts).

Contract:
- DIR is a variables directory (`DIR/metadata.json` with the model config + `DIR/variables/`), as
  fine-tuning's `workdir/backbone` or `python -m lafs_jax.convert` write it (`eval.embed.load_backbone`).
- PATH is a folder of images (extensions IMAGE_EXTENSIONS, searched recursively, in the order of their
  relative paths, sorted as strings with '/' separators), a `.npy` of uint8 [N, H, W, 3] RGB, an
  InsightFace RecordIO set (`X.rec`, `X.idx` or the prefix `X`; every image record, in item order) or
  an ArrayRecord file (`python -m data.prepare to-arrayrecord`). Sources are the relative paths
  (folder) or the item indices (the others).
- Image size (RESIZE_RULE): aligned S x S face crops (S = the model's image size, 112 for every preset)
  are the norm and are used as they are. Any other image is centre-cropped to a square of its shorter
  side (the middle of the longer side is kept) and then resized to S x S with Pillow's bicubic filter.
- `--landmarks FILE`: a CSV with one row per image: the image's source (relative path; or its index,
  for any PATH kind) then 10 numbers x1,y1,...,x5,y5 (left eye, right eye, nose tip, left and right
  mouth corner, pixels of the image as stored, x = column). Each image is warped (bilinear, black
  outside) by the least-squares similarity (Umeyama, `eval.ijb.similarity_transform`) that maps its
  points onto the ArcFace 112 x 112 template (ARCFACE_TEMPLATE, scaled to S) instead of being resized.
  Rows starting with '#' and a first row without numbers (a header) are ignored. A row naming no image,
  a repeated image, a row without 10 numbers, or an image without a row is an error naming the line.
- Output: float32 [N, D] embeddings in input order (unnormalised; with flip, the default, the sum of
  the image's and its mirror's, as the verification protocol does), and next to it `EMB.json`: sources,
  backbone, flip, normalization, color_order, image_size, resize rule, landmarks file, skipped items.
  Both are written to temporary names and renamed, so an error leaves no output behind.
- An undecodable image is an error naming it (exit 1, nothing written); with `--skip-bad` it is left
  out and listed under `skipped` in the JSON. Every user error is one line `FATAL ...` on stderr, exit 1.

Library functions (used by `lafs_jax.compare` and the tests): `read_images`, `fit_size`, `align`,
`read_landmarks`, `check_backbone_dir`, `embed_images`, `write_outputs`.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from lafs_jax import variables as variables_lib
from lafs_jax.eval import embed as embed_lib
from lafs_jax.eval import ijb
from lafs_jax.eval import text_embed
from lafs_jax.input import images as image_lib
from lafs_jax.input import recordio
from lafs_jax.input import sources as sources_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".bmp")
ARCFACE_TEMPLATE = ijb.ARCFACE_TEMPLATE  # [5, 2] (x, y) for 112 x 112: (38.2946, 51.6963), ...
RESIZE_RULE = ("images of the model's size are used as they are; others are centre-cropped to a square of "
               "their shorter side, then resized with Pillow bicubic")


class UserError(Exception):
    """Bad input from the command line (a path, a file's content); printed as one `FATAL` line."""


# ----------------------------------------------------------------------------------------------------
# Reading images


def fit_size(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size, size, 3] of uint8 [h, w, 3]: as it is when already that size, else the centred square
    of side min(h, w) (offset (long - short) // 2 on the longer axis), resized with Pillow bicubic."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(image[top:top + side, left:left + side])
    if side == size:
        return square
    return np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC))


def list_folder(root: str) -> list[str]:
    """Relative paths ('/'-separated) of the image files under `root`, recursive, sorted."""
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(found)


def _decoded(path: str) -> tuple[list, Iterator[tuple[Any, str, Callable[[], np.ndarray]]]]:
    """(sources, iterator of (source, description, loader)) of PATH; `loader()` returns uint8 [H, W, 3]
    RGB or raises UndecodableImageError / RecordIOError naming the item."""
    if os.path.isdir(path):
        files = list_folder(path)
        if not files:
            raise UserError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder or below")

        def load_file(rel):
            full = os.path.join(path, rel)
            with open(full, "rb") as f:
                return image_lib.decode_image(f.read(), full)

        return files, ((rel, os.path.join(path, rel), lambda rel=rel: load_file(rel)) for rel in files)
    if path.endswith(".npy"):
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file")
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: not a readable .npy file: {e}") from None
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise UserError(f"{path}: expected uint8 [N, H, W, 3] RGB, got {array.dtype} {list(array.shape)}")
        index = list(range(len(array)))
        return index, ((i, f"{path}: image {i}", lambda i=i: np.asarray(array[i])) for i in index)
    rec_path, idx_path = sources_lib.resolve_rec_prefix(path)
    if path.endswith((".rec", ".idx")) or (not os.path.exists(path) and os.path.isfile(rec_path)):
        if not os.path.isfile(rec_path):
            raise UserError(f"{rec_path}: no such RecordIO file")
        src = sources_lib.FaceRecordSource(path)
        index = list(range(len(src)))

        def load_record(i):
            return image_lib.decode_image(src.record(i)[1], src.describe(i))

        return index, ((i, src.describe(i), lambda i=i: load_record(i)) for i in index)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such folder or file (expected an image folder, a .npy, a .rec or an "
                        f"ArrayRecord file)")
    try:
        src = sources_lib.ArrayRecordFaceSource(path)
    except Exception as e:  # array_record raises plain RuntimeErrors for a file of another format
        raise UserError(f"{path}: not an image folder, .npy, .rec or ArrayRecord file ({e})") from None
    index = list(range(len(src)))

    def load_array_record(i):
        return image_lib.decode_image(recordio.unpack(src.reader[i], src.describe(i))[1], src.describe(i))

    return index, ((i, src.describe(i), lambda i=i: load_array_record(i)) for i in index)


def read_images(path: str, image_size: int = 112, *, landmarks: np.ndarray | None = None, skip_bad: bool = False,
                progress: bool = False) -> tuple[np.ndarray, list, list[dict]]:
    """(uint8 [N, S, S, 3] RGB, sources [N], skipped) of PATH (see the module docstring).

    Every image goes through `fit_size` to S = image_size, or, with `landmarks` (float [M, 5, 2], one per
    item of PATH in its order, as `read_landmarks` returns them), through `align`. An undecodable image
    raises UserError naming it, or with `skip_bad` is left out and listed in `skipped` as
    {'source', 'error'}.
    """
    all_sources, items = _decoded(path)
    if landmarks is not None and len(landmarks) != len(all_sources):
        raise UserError(f"{len(landmarks)} landmark rows for {len(all_sources)} images of {path}")
    out, kept, skipped = [], [], []
    bar = tqdm(total=len(all_sources), desc="decode", unit="img", file=sys.stderr, disable=None if progress else True,
               leave=False)
    for k, (source, where, load) in enumerate(items):
        try:
            image = load()
        except (image_lib.UndecodableImageError, recordio.RecordIOError) as e:
            if not skip_bad:
                raise UserError(f"{e} (pass --skip-bad to leave undecodable images out)") from None
            skipped.append({"source": source, "error": str(e)})
            bar.update(1)
            continue
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        out.append(align([image], landmarks[k:k + 1], image_size)[0] if landmarks is not None
                   else fit_size(image, image_size))
        kept.append(source)
        bar.update(1)
    bar.close()
    if not out:
        raise UserError(f"{path}: no decodable image ({len(skipped)} skipped)")
    return np.stack(out), kept, skipped


# ----------------------------------------------------------------------------------------------------
# Alignment


def align(images: Sequence[np.ndarray], landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """uint8 [N, size, size, 3]: image i warped by the similarity mapping landmarks[i] ([5, 2] (x, y)
    pixels) onto ARCFACE_TEMPLATE * size / 112 (least squares, bilinear, black outside)."""
    landmarks = np.asarray(landmarks, np.float64).reshape(len(images), 5, 2)
    template = ARCFACE_TEMPLATE * (size / ijb.ALIGNED_SIZE)
    return np.stack([ijb.warp_affine(np.asarray(im), ijb.similarity_transform(lm, template), size)
                     for im, lm in zip(images, landmarks)]).astype(np.uint8)


def read_landmarks(path: str, sources: Sequence) -> np.ndarray:
    """float64 [N, 5, 2] landmarks of `sources` (in their order) from a CSV (see the module docstring);
    UserError naming the file and line for a row that does not match the images."""
    if not os.path.isfile(path):
        raise UserError(f"--landmarks {path}: no such file")
    position = {str(s): i for i, s in enumerate(sources)}
    by_index = {str(i): i for i in range(len(sources))}
    out = np.full((len(sources), 5, 2), np.nan)
    line_of: dict[int, int] = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            try:
                values = [float(c) for c in row[1:]]
            except ValueError:
                if not line_of and line == 1:
                    continue  # header
                raise UserError(f"{path}: line {line}: the 10 coordinates are not all numbers: {row[1:]}") from None
            if len(values) != 10:
                raise UserError(f"{path}: line {line}: {len(values)} numbers after the image, expected 10 "
                                f"(x1,y1,...,x5,y5)")
            key = row[0].replace(os.sep, "/")
            i = position.get(key, by_index.get(key))
            if i is None:
                raise UserError(f"{path}: line {line}: {row[0]!r} is none of the {len(sources)} images "
                                f"(a relative path or an index 0..{len(sources) - 1})")
            if i in line_of:
                raise UserError(f"{path}: line {line}: image {sources[i]!r} already has landmarks (line {line_of[i]})")
            line_of[i] = line
            out[i] = np.asarray(values).reshape(5, 2)
    missing = [s for i, s in enumerate(sources) if i not in line_of]
    if missing:
        raise UserError(f"{path}: no landmark row for {len(missing)} of the {len(sources)} images, first "
                        f"{missing[0]!r}")
    return out


# ----------------------------------------------------------------------------------------------------
# Backbone and embedding


def check_backbone_dir(directory: str) -> dict:
    """The metadata of a variables directory; UserError naming what is missing when it is not one."""
    if not os.path.isdir(directory):
        raise UserError(f"--backbone {directory}: no such directory")
    meta_path = os.path.join(directory, variables_lib.METADATA_FILE)
    missing = [name for name, ok in ((variables_lib.METADATA_FILE, os.path.isfile(meta_path)),
                                     (variables_lib.VARIABLES_ITEM + "/",
                                      os.path.isdir(os.path.join(directory, variables_lib.VARIABLES_ITEM)))) if not ok]
    if missing:
        raise UserError(f"--backbone {directory}: not a variables directory, it has no {' and no '.join(missing)} "
                        f"(expected fine-tuning's workdir/backbone or the output of python -m lafs_jax.convert)")
    try:
        meta = variables_lib.read_metadata(directory)
    except ValueError as e:
        raise UserError(f"{meta_path}: not valid JSON: {e}") from None
    if not isinstance(meta.get("model", meta.get("model_config")), dict):
        raise UserError(f"{meta_path}: no 'model' entry (the model config), so the backbone cannot be rebuilt")
    return meta


def image_size_of(meta: dict) -> int:
    """The square input side a backbone's metadata records (as `eval.embed.load_backbone` reads it)."""
    model = meta.get("model", meta.get("model_config"))
    return int(meta.get("image_size", model.get("image_size", 112)))


def embed_images(embedder: embed_lib.Embedder, images: np.ndarray, *, flip: bool = True,
                 progress: bool = False) -> np.ndarray:
    """float32 [N, D] of uint8 [N, S, S, 3] images, batch by batch with a tqdm bar (images/s) on stderr."""
    out = []
    with tqdm(total=len(images), desc="embed", unit="img", file=sys.stderr, disable=None if progress else True,
              leave=False) as bar:
        for s in range(0, len(images), embedder.batch_size):
            out.append(embedder.embed_batch(images[s:s + embedder.batch_size], flip))
            bar.update(len(out[-1]))
    return np.concatenate(out, 0).astype(np.float32)


def json_path(out: str) -> str:
    """EMB.json next to EMB.npy."""
    return os.path.splitext(out)[0] + ".json"


def write_outputs(out: str, embeddings: np.ndarray, info: dict) -> tuple[str, str]:
    """Write EMB.npy and EMB.json atomically (temporary names in the same folder, then renamed);
    returns their paths."""
    jpath = json_path(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    tmp_npy, tmp_json = f"{out}.tmp-{os.getpid()}", f"{jpath}.tmp-{os.getpid()}"
    try:
        with open(tmp_npy, "wb") as f:
            np.save(f, np.asarray(embeddings, np.float32))
        with open(tmp_json, "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp_npy, out)
        os.replace(tmp_json, jpath)
    finally:
        for tmp in (tmp_npy, tmp_json):
            if os.path.exists(tmp):
                os.remove(tmp)
    return out, jpath


def run(backbone: str, images_path: str, out: str, *, flip: bool = True, batch: int = 64,
        landmarks: str | None = None, skip_bad: bool = False, progress: bool = False) -> dict:
    """The command: check the inputs, read (and align) the images, embed them, write EMB.npy + EMB.json.
    Returns the JSON info (plus 'seconds')."""
    meta = check_backbone_dir(backbone)
    size = image_size_of(meta)
    if not out.endswith(".npy"):
        raise UserError(f"--out {out}: the embeddings file must end in .npy")
    lm = None
    if landmarks is not None:
        lm = read_landmarks(landmarks, _decoded(images_path)[0])
    images, sources, skipped = read_images(images_path, size, landmarks=lm, skip_bad=skip_bad, progress=progress)
    start = time.time()
    embedder = embed_lib.Embedder.from_variables_dir(backbone, batch_size=batch)
    embeddings = embed_images(embedder, images, flip=flip, progress=progress)
    info = {"embeddings": os.path.basename(out), "count": int(embeddings.shape[0]), "dim": int(embeddings.shape[1]),
            "sources": sources, "source": os.path.abspath(images_path), "backbone": os.path.abspath(backbone),
            "flip": bool(flip), "normalization": embedder.normalization, "color_order": embedder.color_order,
            "image_size": size, "resize": RESIZE_RULE if lm is None else "aligned to the ArcFace 5-point template",
            "landmarks": None if landmarks is None else os.path.abspath(landmarks), "skipped": skipped}
    write_outputs(out, embeddings, info)
    return dict(info, seconds=time.time() - start)


def run_texts(backbone: str, texts_path: str, out: str, *, batch: int = 64) -> dict:
    """`--texts`: text features of a CLIP / FaRL directory, one row per caption line; EMB.npy + EMB.json."""
    check_backbone_dir(backbone)
    if not out.endswith(".npy"):
        raise UserError(f"--out {out}: the embeddings file must end in .npy")
    if not os.path.isfile(texts_path):
        raise UserError(f"--texts {texts_path}: no such file")
    start = time.time()
    texts = text_embed.read_captions(texts_path)
    features, truncated = text_embed.embed_texts(backbone, texts, batch)
    info = {"embeddings": os.path.basename(out), "count": int(features.shape[0]), "dim": int(features.shape[1]),
            "texts": os.path.abspath(texts_path), "backbone": os.path.abspath(backbone),
            "truncated_lines": [int(i) + 1 for i in np.flatnonzero(truncated)], "skipped": []}
    write_outputs(out, features, info)
    return dict(info, seconds=time.time() - start)


def run_scores(backbone: str, images_path: str, texts_path: str, out: str, *, flip: bool = True,
               batch: int = 64, skip_bad: bool = False) -> dict:
    """`--images` + `--texts`: zero-shot scores [N, P] (module docstring); SCORES.npy + SCORES.json."""
    if not out.endswith(".npy"):
        raise UserError(f"--out {out}: the scores file must end in .npy")
    base = os.path.splitext(out)[0]
    image_out, text_out = f"{base}.images-{os.getpid()}.npy", f"{base}.texts-{os.getpid()}.npy"
    try:
        image_info = run(backbone, images_path, image_out, flip=flip, batch=batch, skip_bad=skip_bad)
        text_info = run_texts(backbone, texts_path, text_out, batch=batch)
        scores = text_embed.zero_shot_scores(np.load(image_out), np.load(text_out))
    finally:
        for path in (image_out, text_out):
            for p in (path, json_path(path)):
                if os.path.exists(p):
                    os.remove(p)
    prompts = text_embed.read_captions(texts_path)
    info = {**{k: image_info[k] for k in ("sources", "source", "backbone", "flip", "normalization", "image_size",
                                          "skipped")},
            "embeddings": os.path.basename(out), "count": int(scores.shape[0]), "dim": int(scores.shape[1]),
            "scores": "cosine of image row and prompt column", "prompts": prompts,
            "texts": os.path.abspath(texts_path), "truncated_lines": text_info["truncated_lines"],
            "scale": text_embed.logit_scale_of(backbone)}
    write_outputs(out, scores, info)
    return dict(info, seconds=image_info["seconds"] + text_info["seconds"])


def fatal(message: Any) -> None:
    """One line 'FATAL message' on stderr, then exit status 1."""
    print("FATAL " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(1)


USER_ERRORS = (UserError, FileNotFoundError, sources_lib.DataSourceError, recordio.RecordIOError)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lafs_jax.embed", description=(
        "Embed face images with a backbone (variables directory). Aligned 112x112 crops are the norm; "
        + RESIZE_RULE + ". Writes float32 [N, D] to --out and a .json of the sources next to it."))
    p.add_argument("--backbone", required=True, help="variables directory (metadata.json + variables/)")
    p.add_argument("--texts", help="CLIP / FaRL directories: a UTF-8 file of captions, one per line (text features; "
                   "with --images: zero-shot scores [images, prompts])")
    p.add_argument("--images", help="image folder (jpg/jpeg/png/pgm/bmp, recursive, sorted by "
                   "relative path), .npy uint8 [N,H,W,3], .rec (prefix or file) or ArrayRecord file")
    p.add_argument("--out", required=True, help="EMB.npy (EMB.json is written next to it)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not add the mirrored image's embedding")
    p.add_argument("--batch", type=int, default=64, help="images per compiled call (rounded up to the device count)")
    p.add_argument("--landmarks", help="CSV: source (relative path or index), x1,y1,...,x5,y5; aligns each image "
                   "to the ArcFace 112x112 5-point template with a similarity transform instead of resizing")
    p.add_argument("--skip-bad", action="store_true", help="leave undecodable images out (listed in the .json)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.batch < 1:
        fatal(f"--batch {args.batch}: must be >= 1")
    if args.images is None and args.texts is None:
        fatal("give --images, --texts, or both (zero-shot scores)")
    try:
        if args.texts is not None and args.images is not None:
            info = run_scores(args.backbone, args.images, args.texts, args.out, flip=args.flip, batch=args.batch,
                              skip_bad=args.skip_bad)
        elif args.texts is not None:
            info = run_texts(args.backbone, args.texts, args.out, batch=args.batch)
        else:
            info = run(args.backbone, args.images, args.out, flip=args.flip, batch=args.batch,
                       landmarks=args.landmarks, skip_bad=args.skip_bad, progress=True)
    except USER_ERRORS as e:
        fatal(e)
    except ValueError as e:  # metadata / variables that do not fit the model, a bad normalisation name
        fatal(e)
    what = "rows of zero-shot scores over prompts" if "prompts" in info else "embeddings of dimension"
    print(f"wrote {info['count']} {what} {info['dim']} to {args.out} ({json_path(args.out)}); "
          f"{len(info['skipped'])} skipped; {info['seconds']:.1f} s with loading and compiling the model (the bar's "
          f"images/s is the embedding alone; bench/embed_speed.py measures throughput)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
