"""1:N search: the k most similar gallery embeddings of every probe, on the devices of a mesh.

    python -m lafs_jax.search --gallery EMB.npy|FOLDER --probes EMB.npy|FOLDER [--backbone DIR]
                              --top-k 5 --out MATCHES.csv [--gallery-names G.json] [--batch N]

Contract:
- `search(gallery [G, D], probes [P, D], k, *, mesh, batch_size=256) -> (scores float32 [P, k],
  indices int64 [P, k])`: cosine similarity (both sides L2-normalised by `numerics.l2_normalize`;
  a zero row stays zero and scores 0), best first. Ties are broken by the lower gallery index,
  exactly: equal scores come out in ascending gallery row order.
- The gallery (cast to float32) is split by rows over every device of the mesh, `P(mesh.axis_names,
  None)`: device s (linear index, data-major) owns rows [s·R, (s+1)·R), R = ceil(G / N); rows ≥ G are
  zero padding whose scores are −inf inside the search, so they never win (k ≤ G is required).
  `shard_gallery` builds it once (one host slice per device, normalised on the devices, checked
  finite); `Gallery.search` can then be called for many probe sets.
- Probes go in batches of `batch_size` (the last one padded, one compilation), replicated on every
  device. Inside `jax.shard_map` each device computes its local scores [B, R] and `lax.top_k`
  (min(k, R) candidates, row numbers made global), the candidates of all devices are all-gathered
  ([B, N·min(k, R)], in device order, so in ascending gallery order among equal scores) and a final
  `lax.top_k` (ties to the lower position) picks the global k. Per device at most [B, R] scores
  exist at once: [P, G] is never materialised. Matmuls run at `Precision.HIGHEST` (no TF32 on GPUs).

Inputs of the command line: EMB.npy [N, D] (read memory-mapped; the gallery is copied to the devices
one shard at a time). Names come from the sidecar EMB.json (`{"sources": [...], ...}`, as `python -m
lafs_jax.embed` writes it) when it exists, else row numbers; `--gallery-names` (a JSON
list or `{"sources": [...]}`) overrides the gallery's. A FOLDER of images (with `--backbone DIR`, a
variables directory) is embedded first as `python -m lafs_jax.embed` does with its defaults
(`embed.read_images`: the model's size, centre crop + bicubic otherwise; `embed.embed_images` with
flip), its names being the images' relative paths. The CSV (columns probe, rank, gallery, score;
rank 1..k, one row per (probe, rank)) is written atomically (a temporary file renamed). Bad input (a missing or unreadable file, not [N, D],
embedding sizes that differ, --top-k outside 1..G, non-finite values, a names list of the wrong
length) is one `FATAL ...` line on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import collections
import csv
import functools
import json
import os
import sys
import tempfile
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lafs_jax import embed as embed_cli
from lafs_jax import sharding as mesh_lib
from lafs_jax.eval import embed as embed_lib
from lafs_jax.numerics import l2_normalize

DEFAULT_BATCH = 256
CSV_COLUMNS = ("probe", "rank", "gallery", "score")


class Gallery(NamedTuple):
    """A gallery on the mesh: `rows` float32 [G_pad, D], L2-normalised, split by rows over every device
    (rows ≥ `size` are zero padding); `size` = G."""
    rows: jax.Array
    size: int
    mesh: Mesh

    def search(self, probes: Any, k: int, *, batch_size: int = DEFAULT_BATCH) -> tuple[np.ndarray, np.ndarray]:
        return search_gallery(self, probes, k, batch_size=batch_size)


def _num_devices(mesh: Mesh) -> int:
    return int(mesh.devices.size)


def _check_matrix(x: Any, name: str) -> tuple[int, int]:
    shape = tuple(np.shape(x))
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty [N, D] matrix, got shape {shape}")
    return shape


@functools.lru_cache(maxsize=8)
def _normalizer(mesh: Mesh):
    rows = NamedSharding(mesh, P(tuple(mesh.axis_names), None))

    def f(x):
        return l2_normalize(x), jnp.all(jnp.isfinite(x))

    return jax.jit(f, out_shardings=(rows, mesh_lib.replicated(mesh)), donate_argnums=0)


def shard_gallery(gallery: Any, mesh: Mesh) -> Gallery:
    """`gallery` [G, D] (numpy, a memory map, anything sliceable by rows) -> a `Gallery` on `mesh`.

    Each device's block of rows is read and cast to float32 on its own (the host never holds a
    padded copy of the whole gallery), then normalised on the devices. A ValueError for a non-finite
    value or a shape other than [G, D]."""
    g, d = _check_matrix(gallery, "gallery")
    n = _num_devices(mesh)
    per = -(-g // n)
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names), None))

    def block(index):
        start, stop, _ = index[0].indices(per * n)
        out = np.zeros((stop - start, d), np.float32)
        if start < g:
            out[:min(stop, g) - start] = np.asarray(gallery[start:min(stop, g)], dtype=np.float32)
        return out

    raw = jax.make_array_from_callback((per * n, d), sharding, block)
    rows, finite = _normalizer(mesh)(raw)
    if not bool(finite):
        raise ValueError("gallery has non-finite values (NaN or inf)")
    return Gallery(rows, g, mesh)


@functools.lru_cache(maxsize=32)
def _search_fn(mesh: Mesh, size: int, per: int, k: int):
    """jit(f(rows [N·per, D] sharded, probes [B, D] replicated) -> (scores [B, k], indices [B, k]))."""
    axes = tuple(mesh.axis_names)
    local_k = min(k, per)

    def body(rows, q):
        start = lax.axis_index(axes) * per
        s = jnp.dot(q, rows.T, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        gidx = start + jnp.arange(per, dtype=jnp.int32)
        s = jnp.where(gidx[None, :] < size, s, -jnp.inf)
        v, i = lax.top_k(s, local_k)  # equal values: the lower (local, so global) row first
        i = i.astype(jnp.int32) + start
        v = lax.all_gather(v, axes, axis=1, tiled=True)  # [B, N·local_k], device order = row order
        i = lax.all_gather(i, axes, axis=1, tiled=True)
        best, pos = lax.top_k(v, k)
        return best, jnp.take_along_axis(i, pos, axis=1)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(axes, None), P()), out_specs=(P(), P()), check_vma=False)

    def f(rows, probes):
        return fn(rows, l2_normalize(probes.astype(jnp.float32)))

    replicated = mesh_lib.replicated(mesh)
    return jax.jit(f, out_shardings=(replicated, replicated))


def search_gallery(gallery: Gallery, probes: Any, k: int, *, batch_size: int = DEFAULT_BATCH
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The k best gallery rows of every probe of `probes` [P, D]: (scores float32 [P, k], indices
    int64 [P, k]), best first, equal scores in ascending row order. A ValueError for k outside
    1..G, another embedding size, a batch size below 1 or non-finite probes."""
    num, d = _check_matrix(probes, "probes")
    if d != gallery.rows.shape[1]:
        raise ValueError(f"probes have D = {d} but the gallery has D = {gallery.rows.shape[1]}")
    k = int(k)
    if not 1 <= k <= gallery.size:
        raise ValueError(f"k = {k} must be between 1 and the gallery size {gallery.size}")
    if int(batch_size) < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    b = min(int(batch_size), num)
    mesh = gallery.mesh
    fn = _search_fn(mesh, gallery.size, gallery.rows.shape[0] // _num_devices(mesh), k)
    replicated = mesh_lib.replicated(mesh)
    scores = np.empty((num, k), np.float32)
    indices = np.empty((num, k), np.int64)
    pending = collections.deque()

    def collect():
        start, stop, (v, i) = pending.popleft()
        scores[start:stop] = np.asarray(v)[:stop - start]
        indices[start:stop] = np.asarray(i)[:stop - start]

    for start in range(0, num, b):
        stop = min(start + b, num)
        batch = np.zeros((b, d), np.float32)
        batch[:stop - start] = np.asarray(probes[start:stop], dtype=np.float32)
        if not np.isfinite(batch).all():
            raise ValueError(f"probes have non-finite values (NaN or inf) in rows {start}..{stop - 1}")
        pending.append((start, stop, fn(gallery.rows, jax.device_put(batch, replicated))))
        if len(pending) > 2:  # keep two batches in flight, no more (probes are replicated per device)
            collect()
    while pending:
        collect()
    return scores, indices


def search(gallery: Any, probes: Any, k: int, *, mesh: Mesh, batch_size: int = DEFAULT_BATCH
           ) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 [P, k], indices int64 [P, k]) of the k best cosine matches in `gallery` [G, D]
    of each of `probes` [P, D]; see the module docstring (`shard_gallery` + `search_gallery`)."""
    _, d = _check_matrix(gallery, "gallery")
    _, dp = _check_matrix(probes, "probes")
    if d != dp:
        raise ValueError(f"gallery {tuple(np.shape(gallery))} and probes {tuple(np.shape(probes))} have different "
                         f"embedding sizes")
    if not 1 <= int(k) <= np.shape(gallery)[0]:
        raise ValueError(f"k = {k} must be between 1 and the gallery size {np.shape(gallery)[0]}")
    return search_gallery(shard_gallery(gallery, mesh), probes, k, batch_size=batch_size)


# ----------------------------------------------------------------------------- command line


class InputError(Exception):
    """Bad input of the command line: printed as one FATAL line."""


def sidecar_path(path: str) -> str:
    """EMB.npy -> EMB.json."""
    return (path[:-len(".npy")] if path.endswith(".npy") else path) + ".json"


def read_names(path: str, flag: str) -> list[str]:
    """A names JSON: a list, or an object with a 'sources' list."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{flag} {path}: cannot read names: {e}") from None
    names = data.get("sources") if isinstance(data, dict) else data
    if not isinstance(names, list):
        raise InputError(f"{flag} {path}: expected a JSON list of names or an object with a 'sources' list")
    return [str(n) for n in names]


def embed_folder(path: str, flag: str, backbone: str, embedders: dict) -> tuple[np.ndarray, list[str]]:
    """(float32 [N, D], relative paths) of the images of a folder, embedded as `python -m lafs_jax.embed`
    does; `embedders` caches the one Embedder of the backbone."""
    try:
        if backbone not in embedders:
            size = embed_cli.image_size_of(embed_cli.check_backbone_dir(backbone))
            embedders[backbone] = (embed_lib.Embedder.from_variables_dir(backbone), size)
        embedder, size = embedders[backbone]
        images, sources, _ = embed_cli.read_images(path, size)
        return embed_cli.embed_images(embedder, images), [str(s) for s in sources]
    except embed_cli.USER_ERRORS as e:
        raise InputError(f"{flag} {path}: {' '.join(str(e).split())}") from None


def load_embeddings(path: str, flag: str, backbone: str | None = None, embedders: dict | None = None
                    ) -> tuple[np.ndarray, list[str] | None]:
    """(embeddings [N, D] memory-mapped, names from the sidecar or None), or a folder's embeddings and
    image paths with `backbone`."""
    if os.path.isdir(path):
        if backbone is None:
            raise InputError(f"{flag} {path} is a folder: pass --backbone DIR to embed its images, or give "
                             f"embeddings (.npy [N, D])")
        return embed_folder(path, flag, backbone, {} if embedders is None else embedders)
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{flag} {path}: cannot read a .npy array: {e}") from None
    if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
        raise InputError(f"{flag} {path}: expected embeddings [N, D], got shape {emb.shape}")
    if not (np.issubdtype(emb.dtype, np.floating) or np.issubdtype(emb.dtype, np.integer)):
        raise InputError(f"{flag} {path}: expected float embeddings, got dtype {emb.dtype}")
    side = sidecar_path(path)
    names = read_names(side, f"{flag} sidecar") if os.path.isfile(side) else None
    if names is not None and len(names) != emb.shape[0]:
        raise InputError(f"{flag} sidecar {side} lists {len(names)} sources for {emb.shape[0]} rows of {path}")
    return emb, names


def write_matches(path: str, probe_names: Sequence[str], gallery_names: Sequence[str], scores: np.ndarray,
                  indices: np.ndarray) -> None:
    """MATCHES.csv (probe, rank, gallery, score), written to a temporary file and renamed."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for p, name in enumerate(probe_names):
                for r in range(scores.shape[1]):
                    writer.writerow((name, r + 1, gallery_names[indices[p, r]], f"{float(scores[p, r]):.6f}"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lafs_jax.search", description=__doc__.splitlines()[0])
    p.add_argument("--gallery", required=True,
                   help="gallery embeddings EMB.npy [G, D] (+ sidecar EMB.json), or a folder of images (--backbone)")
    p.add_argument("--probes", required=True,
                   help="probe embeddings EMB.npy [P, D] (+ sidecar EMB.json), or a folder of images (--backbone)")
    p.add_argument("--backbone", default=None, help="variables directory that embeds image folders")
    p.add_argument("--top-k", type=int, default=5, help="matches per probe (1..G)")
    p.add_argument("--out", required=True, help="the CSV to write: probe, rank, gallery, score")
    p.add_argument("--gallery-names", default=None, help="JSON list (or {'sources': [...]}) of the gallery's names")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="probes per device call")
    return p.parse_args(argv)


def run(args) -> None:
    embedders = {}
    gallery, gallery_names = load_embeddings(args.gallery, "--gallery", args.backbone, embedders)
    probes, probe_names = load_embeddings(args.probes, "--probes", args.backbone, embedders)
    if args.gallery_names is not None:
        gallery_names = read_names(args.gallery_names, "--gallery-names")
        if len(gallery_names) != gallery.shape[0]:
            raise InputError(f"--gallery-names {args.gallery_names} lists {len(gallery_names)} names for the "
                             f"{gallery.shape[0]} rows of {args.gallery}")
    if gallery.shape[1] != probes.shape[1]:
        raise InputError(f"embedding sizes differ: --gallery {args.gallery} has shape {gallery.shape}, --probes "
                         f"{args.probes} has shape {probes.shape}")
    if not 1 <= args.top_k <= gallery.shape[0]:
        raise InputError(f"--top-k {args.top_k} must be between 1 and the gallery size {gallery.shape[0]} "
                         f"({args.gallery})")
    if args.batch < 1:
        raise InputError(f"--batch {args.batch} must be at least 1")
    mesh = mesh_lib.make_mesh()
    try:
        scores, indices = search(gallery, probes, args.top_k, mesh=mesh, batch_size=args.batch)
    except ValueError as e:  # non-finite values
        raise InputError(str(e)) from None
    gallery_names = gallery_names if gallery_names is not None else [str(i) for i in range(gallery.shape[0])]
    probe_names = probe_names if probe_names is not None else [str(i) for i in range(probes.shape[0])]
    try:
        write_matches(args.out, probe_names, gallery_names, scores, indices)
    except OSError as e:
        raise InputError(f"--out {args.out}: cannot write: {e}") from None


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        run(args)
    except InputError as e:
        print(f"FATAL {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
