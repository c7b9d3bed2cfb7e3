"""Grain input pipelines: the data config, `make_source`, and one builder per pipeline.

Training pipelines (`finetune_batches`, `dino_batches`, `lafs_batches`):

    MapDataset.source(src).seed(seed).shuffle().repeat(num_epochs)   # global order, reshuffled per epoch
      .random_map(augment)                  # per-record RNG from (seed, position in the global stream)
      [process_index::process_count]        # this JAX process's share
      .to_iter_dataset(ReadOptions)         # reader threads; drops records a source skipped (None)
      .batch(batch_size, drop_remainder=True, batch_fn=collate)   # stack + normalise (+ mixup)
      .mp_prefetch(MultiprocessingOptions(workers))               # workers=0: in-process

so batches are deterministic per seed (for a given worker count: each worker batches its own slice
of the records), and the iterator's `get_state()` / `set_state()` (or orbax through
`grain.checkpoint.CheckpointSave/CheckpointRestore`) resume the exact stream.

The evaluation pipeline (`eval_batches`) pads the data set to whole global batches: global batch g
holds items g*G .. g*G+G-1 (G = batch_size * process_count), process p gets rows p*B .. p*B+B-1 of it,
so concatenating the processes' batches in process order restores the data set order; `valid` is
False on padding (and on records skipped as undecodable).

Batches are host-local numpy: images float32 NHWC (already normalised), labels int32.

With `config.data.augment_on = 'device'` the training pipelines only decode (fine-tuning also flips
and runs RandAugment, which have no device version) and hand over
`{'image': uint8 [B, H, W, 3], 'index': int32 [B], 'label': int32 [B]}`: `index` is each record's
position in the global stream (before the per-process split; modulo 2^31), from which the train
step's `lafs_jax.input.device_augment` draws the sample's views and normalises them on device.
"""
from __future__ import annotations

import glob
import logging
import math
import os

import grain
import ml_collections
import numpy as np

from lafs_jax.config import ConfigError
from lafs_jax.input import augment as A
from lafs_jax.input import captions
from lafs_jax.input import sources as S
from lafs_jax.input import subsets
from lafs_jax.input import transforms as T

log = logging.getLogger(__name__)

FORMATS = ("rec", "arrayrecord", "folder", "tfds", "image_text")  # image_text: input.captions
AUGMENT_ON = ("host", "device")
SSL_POSITIVES = ("views", "identity")


VIEW_SECTIONS = ("finetune", "dino", "lafs", "ssl_color")  # settings of one task's training views each


def data_config(*sections: str) -> ml_collections.ConfigDict:
    """The data fields with their defaults; recipes embed it as `config.data`.

    `sections`: which training-view sections of VIEW_SECTIONS to include -- a recipe names those its
    views read ('finetune'; 'dino', 'ssl_color'; 'lafs', 'ssl_color'); none = all of them (tools and
    tests that build every pipeline). The builders refuse a config without their sections.
    """
    unknown = [s for s in sections if s not in VIEW_SECTIONS]
    if unknown:
        raise ValueError(f"data_config: unknown sections {unknown}; choose from {VIEW_SECTIONS}")
    sections = sections or VIEW_SECTIONS
    c = ml_collections.ConfigDict()
    # where the data is: .rec prefix ('dir/train' for dir/train.rec + dir/train.idx, or 'dir'),
    # ArrayRecord file(s) (comma-separated or a glob), image-folder root, or a TFDS data set name
    c.path = ""
    # The command that makes the files of `path` (and of the recipe's .bin sets), named in the error
    # when they are missing; '' = see data/README.md.
    c.prepare_command = ""
    c.format = "rec"  # one of rec | arrayrecord | folder | tfds | image_text (image-caption pairs, input.captions)
    c.tfds_split = "train"  # TFDS split (format tfds)
    c.tfds_data_dir = ""  # TFDS data_dir; '' = TFDS's default
    c.tfds_image_key = "image"  # TFDS feature holding the image (uint8 array or encoded bytes)
    c.tfds_label_key = "label"  # TFDS feature holding the integer identity
    # channel order of the decoded images: 'rgb' (InsightFace .rec/.bin hold true-RGB JPEGs), or 'bgr'
    # (packed from channel-swapped arrays, e.g. LAFS img2rec's WebFace4M .rec: channels are swapped back)
    c.color_order = "rgb"
    # '[-1,1]' (x/255*2-1, training), '[-0.5,0.5]' (x/255-0.5, LAFS eval scripts) or 'imagenet' (DINO's mean/std)
    c.normalization = "[-1,1]"
    c.image_size = 112  # side of fine-tuning / evaluation images (px)
    c.workers = 4  # Grain worker processes; 0 = in-process (tests, demo)
    c.worker_buffer_size = 2  # batches each worker process prepares ahead
    c.read_threads = 2  # threads per process reading + augmenting records (to_iter_dataset)
    c.read_buffer_size = 32  # records the reader threads prepare ahead
    c.skip_undecodable = False  # True: drop undecodable images (logged, with a running count) instead of failing
    # with skip_undecodable: stop with an error naming the file once more than this fraction of the last
    # 1000 records read by one process (sources.SKIP_WINDOW; each worker counts its own) were undecodable
    c.max_skip_fraction = 0.01

    # Subset of the training set, steps applied in this order (lafs_jax.input.subsets); data set order kept
    c.subset = ml_collections.ConfigDict()
    c.subset.k = 0  # k-shot: k images of every identity with >= k (paper: 1, 2, 4, 10); 0 = all images
    c.subset.k_draw = "first"  # which k: 'first' (each identity's first k, data set order) | 'random' (seeded)
    # then the first fraction of the images in data set order (official FaceDataset partition; 0.01 = "1%")
    c.subset.partition = 1.0
    c.subset.identity_fraction = 1.0  # then a seeded random fraction of the identities (not in the official code)
    c.subset.seed = 0  # seed of the random draws (independent of the run seed)

    if "finetune" in sections:
        c.finetune = ml_collections.ConfigDict()  # the official `image_iter.py`
        c.finetune.flip = True  # random horizontal flip, p=0.5
        c.finetune.random_resized_crop = True  # RandomResizedCrop to image_size (else resize)
        c.finetune.crop_scale = (0.9, 1.0)  # area fraction range of the crop
        c.finetune.randaugment = True  # timm RandAugment with the face op list
        c.finetune.randaugment_magnitude = 1.0  # M: 1 for WebFace4M, 2 for MS1MV3 (LAFS README)
        c.finetune.randaugment_num_ops = 2  # ops drawn per image
        c.finetune.randaugment_prob = 0.5  # probability each drawn op is applied
        c.finetune.randaugment_magnitude_std = 0.5  # std of the per-op magnitude noise (timm 'mstd')
        c.finetune.randaugment_fill = 128  # grey level of pixels uncovered by rotate/shear/translate
        c.finetune.color_jitter = 0.1  # brightness = contrast = saturation = hue jitter strength; 0 = off
        c.finetune.random_erasing_prob = 0.5  # probability of erasing one rectangle (value 0); 0 = off
        c.finetune.random_erasing_scale = (0.02, 0.1)  # erased area fraction range
        c.finetune.mixup_prob = 0.1  # probability a batch is mixed (0.1 WebFace4M, 0.2 MS1MV3); 0 = off
        c.finetune.mixup_alpha = 0.2  # Beta(alpha, alpha) of the batch's mixing weight lam

    if "dino" in sections:
        c.dino = ml_collections.ConfigDict()  # DINO-face multi-crop
        c.dino.global_size = 112  # global crop side (px)
        c.dino.global_crops = 2  # number of global crops
        c.dino.global_scale = (0.4, 1.0)  # area fraction range of global crops
        c.dino.local_size = 48  # local crop side (px)
        c.dino.local_crops = 8  # number of local crops
        c.dino.local_scale = (0.05, 0.4)  # area fraction range of local crops (lafs_train.py --local_crops_scale)

    if "lafs" in sections:
        c.lafs = ml_collections.ConfigDict()  # LAFS views, `DataAugmentation_LAFS` in the official `lafs_train.py`
        c.lafs.view_size = 112  # side of every view, global and local (px)
        c.lafs.global_views = 2  # (clean, augmented) global pairs
        c.lafs.local_views = 8  # (clean, augmented) local pairs; fewer for tiny demos
        c.lafs.global_scale = (0.4, 1.0)  # area fraction range of global views
        c.lafs.local_scale = (0.4, 1.0)  # of local views: the official code uses the global range [!]

    if "ssl_color" in sections:
        c.ssl_color = ml_collections.ConfigDict()  # colour block shared by DINO crops and LAFS augmented views
        c.ssl_color.jitter = (0.4, 0.4, 0.2, 0.1)  # ColorJitter brightness, contrast, saturation, hue
        c.ssl_color.jitter_prob = 0.8  # probability of the jitter
        c.ssl_color.grayscale_prob = 0.2  # probability of grey conversion
        c.ssl_color.blur_radius = (0.1, 2.0)  # Gaussian blur radius range (px)
        c.ssl_color.global_blur_probs = (1.0, 0.1)  # blur probability of global view 1, 2 (further views: the last)
        c.ssl_color.global_solarize_probs = (0.0, 0.2)  # solarisation probability of global view 1, 2 (further: 0)
        c.ssl_color.local_blur_prob = 0.5  # blur probability of every local view

    # where the training views are made: 'host' (Grain workers, Pillow: float32 views cross to the device)
    # or 'device' (Grain only decodes, uint8 images + stream positions cross; the jitted step crops,
    # colours, blurs and normalises: lafs_jax.input.device_augment). Pretraining recipes use 'device'.
    c.augment_on = "host"
    # what the SSL loss pairs: 'views' (self-supervised: every view of a sample is a crop of one image) or
    # 'identity' (a diagnostic that reads the labels: the last half of the global and local views come
    # from another image of the same identity; host augmentation only; bench/ssl_collapse.py)
    c.ssl_positives = "views"
    c.prefetch = 2  # batches the training loops copy to the devices ahead of the step (background thread; 0 = none)

    c.eval = ml_collections.ConfigDict()
    c.eval.flip = False  # also give 'image_flip' (mirrored) for flip-sum embeddings
    return c


# ---- validation ----

def _err(key: str, value, requirement: str) -> ConfigError:
    return ConfigError(f"config.data.{key}={value!r} is not valid: {requirement}")


def _check_prob(dc, key: str) -> None:
    value = _get(dc, key)
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise _err(key, value, "a probability in [0, 1]")


def _check_range(dc, key: str, low: float, high: float | None) -> None:
    value = _get(dc, key)
    ok = (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
          and low <= value[0] <= value[1] and (high is None or value[1] <= high))
    if not ok:
        raise _err(key, value, f"a pair (lo, hi) with {low} <= lo <= hi" + (f" <= {high}" if high is not None else ""))


def _check_int(dc, key: str, minimum: int) -> None:
    value = _get(dc, key)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise _err(key, value, f"an int >= {minimum}")


def _present(dc, key: str) -> bool:
    """Whether the section of a dotted key is in this config (a recipe carries only its views' sections)."""
    return "." not in key or key.split(".")[0] not in VIEW_SECTIONS or key.split(".")[0] in dc


def require_sections(dc, *sections: str, views: str) -> None:
    """ConfigError naming the config.data section the `views` builder needs and how to add it."""
    for name in sections:
        if name not in dc:
            raise ConfigError(f"config.data.{name} is missing: {views} need it; build config.data with "
                              f"pipelines.data_config({', '.join(repr(s) for s in sections)})")


def _get(dc, key: str):
    node = dc
    for part in key.split("."):
        if part not in node:
            raise ConfigError(f"config.data.{key} is missing")
        node = node[part]
    return node


def validate_data_config(dc: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first invalid `config.data.*` field."""
    for key, choices in (("format", FORMATS), ("augment_on", AUGMENT_ON), ("color_order", S.image_lib.COLOR_ORDERS),
                         ("normalization", T.NORMALIZATIONS), ("subset.k_draw", subsets.K_DRAWS),
                         ("ssl_positives", SSL_POSITIVES)):
        if _get(dc, key) not in choices:
            raise _err(key, _get(dc, key), f"choose one of {list(choices)}")
    for key, minimum in (("image_size", 1), ("workers", 0), ("prefetch", 0), ("worker_buffer_size", 1), ("read_threads", 0),
                         ("read_buffer_size", 1), ("subset.k", 0), ("subset.seed", 0),
                         ("finetune.randaugment_num_ops", 0),
                         ("dino.global_size", 1), ("dino.global_crops", 1), ("dino.local_size", 1),
                         ("dino.local_crops", 0), ("lafs.view_size", 1), ("lafs.global_views", 1),
                         ("lafs.local_views", 0)):
        if _present(dc, key):
            _check_int(dc, key, minimum)
    if dc.ssl_positives != "views" and dc.augment_on == "device":
        raise ConfigError(f"config.data.ssl_positives={dc.ssl_positives!r} needs config.data.augment_on='host' "
                          f"(its views are made on the host)")
    skip = _get(dc, "max_skip_fraction")
    if not (isinstance(skip, (int, float)) and 0.0 <= skip <= 1.0):
        raise _err("max_skip_fraction", skip, "a fraction in [0, 1]")
    for key in ("subset.partition", "subset.identity_fraction"):
        fraction = _get(dc, key)
        if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0.0 < fraction <= 1.0):
            raise _err(key, fraction, "a fraction in (0, 1] (1 = keep all)")
    for key in ("finetune.randaugment_prob", "finetune.random_erasing_prob", "finetune.mixup_prob",
                "ssl_color.jitter_prob", "ssl_color.grayscale_prob", "ssl_color.local_blur_prob"):
        if _present(dc, key):
            _check_prob(dc, key)
    for key in ("finetune.crop_scale", "dino.global_scale", "dino.local_scale", "lafs.global_scale",
                "lafs.local_scale", "finetune.random_erasing_scale"):
        if _present(dc, key):
            _check_range(dc, key, 1e-6, 1.0)
    if _present(dc, "ssl_color.blur_radius"):
        _check_range(dc, "ssl_color.blur_radius", 0.0, None)
    for key in ("finetune.randaugment_magnitude", "finetune.randaugment_magnitude_std", "finetune.color_jitter",
                "finetune.mixup_alpha"):
        if not _present(dc, key):
            continue
        value = _get(dc, key)
        if not (isinstance(value, (int, float)) and value >= 0):
            raise _err(key, value, "a number >= 0")
    if "ssl_color" not in dc:
        return
    jitter = _get(dc, "ssl_color.jitter")
    if not (isinstance(jitter, (tuple, list)) and len(jitter) == 4 and all(v >= 0 for v in jitter) and jitter[3] <= 0.5):
        raise _err("ssl_color.jitter", jitter, "(brightness, contrast, saturation, hue) >= 0 with hue <= 0.5")
    for key in ("ssl_color.global_blur_probs", "ssl_color.global_solarize_probs"):
        value = _get(dc, key)
        if not (isinstance(value, (tuple, list)) and len(value) >= 1 and all(0 <= v <= 1 for v in value)):
            raise _err(key, value, "a non-empty tuple of probabilities")


# ---- sources ----

def _arrayrecord_paths(path: str) -> list[str]:
    paths = []
    for part in (p.strip() for p in path.split(",") if p.strip()):
        matches = sorted(glob.glob(part)) if any(ch in part for ch in "*?[") else [part]
        if not matches:
            raise FileNotFoundError(f"config.data.path: no ArrayRecord file matches {part!r}")
        paths += matches
    return paths


def missing_data_hint(dc: ml_collections.ConfigDict) -> str:
    """How to make a recipe's missing data: its `data.prepare_command`, else where the formats are described."""
    if dc.prepare_command:
        return f"make it with `{dc.prepare_command}`"
    return "point config.data.path at your data set (formats and converters: data/README.md)"


def make_source(dc: ml_collections.ConfigDict):
    """The source `config.data` describes (format, path, colour order, skip policy), then its subset."""
    validate_data_config(dc)
    if not dc.path:
        raise ConfigError("config.data.path is empty: set it to the data set (see data/README.md)")
    if dc.format in ("rec", "folder") and not (os.path.isdir(dc.path) or os.path.exists(dc.path + ".rec")):
        wanted = f"{dc.path}.rec" if dc.format == "rec" else "the folder"
        raise ConfigError(f"config.data.path={dc.path!r}: {wanted} does not exist; {missing_data_hint(dc)}")
    common = {"color_order": dc.color_order, "skip_undecodable": dc.skip_undecodable,
              "max_skip_fraction": float(dc.max_skip_fraction)}
    if dc.format == "rec":
        source = S.FaceRecordSource(dc.path, **common)
    elif dc.format == "arrayrecord":
        source = S.ArrayRecordFaceSource(_arrayrecord_paths(dc.path), **common)
    elif dc.format == "folder":
        source = S.ImageFolderSource(dc.path, **common)
    elif dc.format == "image_text":
        source = captions.ImageCaptionSource(_arrayrecord_paths(dc.path), **common)
    else:
        source = S.TfdsSource(dc.path, dc.tfds_split, dc.tfds_data_dir or None, dc.tfds_image_key,
                              dc.tfds_label_key, **common)
    log.info("data source: %r", source)
    sub = dc.subset
    return subsets.make_subset(source, k=sub.k, k_draw=sub.k_draw, partition=sub.partition,
                               identity_fraction=sub.identity_fraction, seed=sub.seed)


# ---- batch collation (runs in the worker processes) ----

class FinetuneCollate:
    """Records -> {'image': f32 [B,S,S,3], 'label', 'label2': i32 [B], 'lam': f32 [B]} with batch mixup.

    With probability `mixup_prob` (the batch's first record's `mix_u` decides) the batch is mixed
    with its reverse: x = lam*x + (1-lam)*x[::-1], label2 = label[::-1] (timm 'batch' mode).
    """

    def __init__(self, normalization: str, mixup_prob: float):
        self.normalization, self.mixup_prob = normalization, float(mixup_prob)

    def __call__(self, records) -> dict:
        x = T.normalize(np.stack([r["image"] for r in records]), self.normalization)
        label = np.asarray([r["label"] for r in records], np.int32)
        if self.mixup_prob > 0 and records[0]["mix_u"] < self.mixup_prob:
            lam = np.float32(records[0]["mix_lam"])
            x = lam * x + (np.float32(1) - lam) * x[::-1]
            return {"image": x, "label": label, "label2": label[::-1].copy(),
                    "lam": np.full(len(records), lam, np.float32)}
        return {"image": x, "label": label, "label2": label.copy(), "lam": np.ones(len(records), np.float32)}


class ViewsCollate:
    """Records of stacked views -> {key: f32 [B, V, S, S, 3]} for `view_keys`, plus 'label' i32 [B]."""

    def __init__(self, normalization: str, view_keys: tuple[str, ...]):
        self.normalization, self.view_keys = normalization, tuple(view_keys)

    def __call__(self, records) -> dict:
        out = {k: T.normalize(np.stack([r[k] for r in records]), self.normalization) for k in self.view_keys}
        out["label"] = np.asarray([r["label"] for r in records], np.int32)
        return out


class DecodedCollate:
    """Records -> {'image': uint8 [B, H, W, 3], 'index': int32 [B], 'label': int32 [B]} (augment_on='device').

    The images of a batch must share one size (aligned faces do); the device makes every view from
    them. `index` is the record's global stream position modulo 2^31."""

    def __call__(self, records) -> dict:
        shapes = {r["image"].shape for r in records}
        if len(shapes) > 1:
            raise ValueError(f"config.data.augment_on='device' needs images of one size per batch, got {sorted(shapes)}; "
                             "use augment_on='host' for data sets of mixed sizes")
        return {"image": np.stack([r["image"] for r in records]),
                "index": np.asarray([r["index"] % (1 << 31) for r in records], np.int32),
                "label": np.asarray([r["label"] for r in records], np.int32)}


def _with_source_index(index: int, element: dict) -> dict:
    """The record with its index in the source (map_with_index before shuffling)."""
    return {**element, "source_index": int(index)}


def _with_index(index: int, element: dict) -> dict:
    """The record with its global stream position (map_with_index before the process split)."""
    return {"image": element["image"], "label": element["label"], "index": int(index)}


class EvalCollate:
    """Records -> {'image' (and 'image_flip'): f32 [B,S,S,3], 'label', 'index': i32 [B], 'valid': bool [B]}."""

    def __init__(self, normalization: str):
        self.normalization = normalization

    def __call__(self, records) -> dict:
        out = {"image": T.normalize(np.stack([r["image"] for r in records]), self.normalization)}
        if "image_flip" in records[0]:
            out["image_flip"] = T.normalize(np.stack([r["image_flip"] for r in records]), self.normalization)
        for key, dtype in (("label", np.int32), ("index", np.int32), ("valid", bool)):
            out[key] = np.asarray([r[key] for r in records], dtype)
        return out


# ---- builders ----

def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel  (workers never need jax)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return int(process_index), int(process_count)


def _check_batch(batch_size: int, source) -> None:
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1 (per process), got {batch_size!r}")
    if len(source) == 0:
        raise ValueError(f"the data source {source!r} is empty")


def _iterator(ds: grain.IterDataset, dc) -> grain.DatasetIterator:
    if dc.workers > 0:
        from absl import flags  # pylint: disable=import-outside-toplevel

        if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=dc.workers,
                                                     per_worker_buffer_size=dc.worker_buffer_size))
    return iter(ds)


def _train_iterator(source, dc, augment: grain.transforms.RandomMap | None, collate, *, batch_size: int, seed: int,
                    num_epochs: int | None, process_index: int | None, process_count: int | None):
    """augment None: decode only; with dc.augment_on='device' the records carry their stream index."""
    validate_data_config(dc)
    _check_batch(batch_size, source)
    pi, pc = _process(process_index, process_count)
    ds = grain.MapDataset.source(source)
    if isinstance(augment, A.SameIdentityViews):
        ds = ds.map_with_index(_with_source_index)
    ds = ds.seed(int(seed)).shuffle().repeat(num_epochs)
    if dc.augment_on == "device":
        ds = ds.map_with_index(_with_index)
    if augment is not None:
        ds = ds.random_map(augment)
    ds = ds[pi::pc]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=dc.read_threads, prefetch_buffer_size=dc.read_buffer_size))
    it = it.batch(int(batch_size), drop_remainder=True, batch_fn=collate)
    return _iterator(it, dc)


def finetune_augment(dc) -> A.FinetuneAugment:
    f = dc.finetune
    randaugment = (T.RandAugment(f.randaugment_magnitude, f.randaugment_num_ops, f.randaugment_prob,
                                 f.randaugment_magnitude_std, f.randaugment_fill) if f.randaugment else None)
    return A.FinetuneAugment(dc.image_size, flip=f.flip, crop_scale=tuple(f.crop_scale) if f.random_resized_crop else None,
                             randaugment=randaugment, jitter=f.color_jitter, erasing_prob=f.random_erasing_prob,
                             erasing_scale=tuple(f.random_erasing_scale), mixup_alpha=f.mixup_alpha)


def finetune_batches(source, dc, *, batch_size: int, seed: int, num_epochs: int | None = None,
                     process_index: int | None = None, process_count: int | None = None) -> grain.DatasetIterator:
    """Fine-tuning batches {'image': f32 [B,S,S,3], 'label', 'label2': i32 [B], 'lam': f32 [B]}
    (augment_on='device': {'image': uint8 [B,H,W,3] flipped / RandAugment'ed, 'index', 'label'}).

    `batch_size` is per process; `num_epochs` None repeats forever.
    """
    validate_data_config(dc)
    require_sections(dc, "finetune", views="fine-tuning batches")
    if dc.augment_on == "device":
        augment, collate = finetune_host_augment(dc), DecodedCollate()
    else:
        augment, collate = finetune_augment(dc), FinetuneCollate(dc.normalization, dc.finetune.mixup_prob)
    return _train_iterator(source, dc, augment, collate, batch_size=batch_size, seed=seed,
                           num_epochs=num_epochs, process_index=process_index, process_count=process_count)


def finetune_host_augment(dc) -> A.FinetuneHostAugment:
    """The host part of fine-tuning with augment_on='device': flip and RandAugment (the official order's
    first two steps; crop, jitter, erasing and mixup follow on device)."""
    f = dc.finetune
    randaugment = (T.RandAugment(f.randaugment_magnitude, f.randaugment_num_ops, f.randaugment_prob,
                                 f.randaugment_magnitude_std, f.randaugment_fill) if f.randaugment else None)
    return A.FinetuneHostAugment(flip=f.flip, randaugment=randaugment)


def _ssl_color_kwargs(dc) -> dict:
    c = dc.ssl_color
    return dict(jitter=tuple(c.jitter), jitter_prob=c.jitter_prob, grayscale_prob=c.grayscale_prob,
                blur_radius=tuple(c.blur_radius), global_blur_probs=tuple(c.global_blur_probs),
                global_solarize_probs=tuple(c.global_solarize_probs), local_blur_prob=c.local_blur_prob)


def _ssl_positives(augment: grain.transforms.RandomMap, source, dc) -> grain.transforms.RandomMap:
    """`augment`, or with data.ssl_positives='identity' its SameIdentityViews over `source`."""
    if dc.ssl_positives == "views":
        return augment
    if not hasattr(source, "labels"):
        raise ConfigError(f"config.data.ssl_positives='identity' reads the labels, and the source {source!r} "
                          f"has none")
    return A.SameIdentityViews(augment, source)


def dino_batches(source, dc, *, batch_size: int, seed: int, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None) -> grain.DatasetIterator:
    """DINO multi-crop batches {'global': f32 [B,G,Sg,Sg,3], 'local': f32 [B,L,Sl,Sl,3], 'label': i32 [B]}
    (augment_on='device': decoded {'image': uint8 [B,H,W,3], 'index', 'label'})."""
    validate_data_config(dc)
    require_sections(dc, "dino", "ssl_color", views="DINO multi-crop views")
    if dc.augment_on == "device":
        return _train_iterator(source, dc, None, DecodedCollate(), batch_size=batch_size, seed=seed,
                               num_epochs=num_epochs, process_index=process_index, process_count=process_count)
    d = dc.dino
    augment = _ssl_positives(A.DinoAugment(d.global_size, d.global_crops, tuple(d.global_scale), d.local_size,
                                           d.local_crops, tuple(d.local_scale), **_ssl_color_kwargs(dc)), source, dc)
    return _train_iterator(source, dc, augment, ViewsCollate(dc.normalization, ("global", "local")),
                           batch_size=batch_size, seed=seed, num_epochs=num_epochs, process_index=process_index,
                           process_count=process_count)


def lafs_batches(source, dc, *, batch_size: int, seed: int, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None) -> grain.DatasetIterator:
    """LAFS view batches {'global_clean', 'global_aug': f32 [B,G,S,S,3], 'local_clean', 'local_aug':
    f32 [B,L,S,S,3], 'label': i32 [B]}; clean/aug of a view share the geometric crop
    (augment_on='device': decoded {'image': uint8 [B,H,W,3], 'index', 'label'})."""
    validate_data_config(dc)
    require_sections(dc, "lafs", "ssl_color", views="LAFS landmark views")
    if dc.augment_on == "device":
        return _train_iterator(source, dc, None, DecodedCollate(), batch_size=batch_size, seed=seed,
                               num_epochs=num_epochs, process_index=process_index, process_count=process_count)
    v = dc.lafs
    augment = _ssl_positives(A.LafsAugment(v.view_size, v.global_views, v.local_views, tuple(v.global_scale),
                                           tuple(v.local_scale), **_ssl_color_kwargs(dc)), source, dc)
    keys = ("global_clean", "global_aug", "local_clean", "local_aug")
    return _train_iterator(source, dc, augment, ViewsCollate(dc.normalization, keys), batch_size=batch_size,
                           seed=seed, num_epochs=num_epochs, process_index=process_index, process_count=process_count)


def decoded_batches(source, dc, *, batch_size: int, seed: int, num_epochs: int | None = None,
                    process_index: int | None = None, process_count: int | None = None) -> grain.DatasetIterator:
    """Decoded training batches {'image': uint8 [B,H,W,3], 'index', 'label'} for a method whose views are
    made only on the device (augment_on='device'; FRA)."""
    validate_data_config(dc)
    if dc.augment_on != "device":
        raise ConfigError(f"config.data.augment_on={dc.augment_on!r}: these views are made on the device only; "
                          f"set it to 'device'")
    return _train_iterator(source, dc, None, DecodedCollate(), batch_size=batch_size, seed=seed,
                           num_epochs=num_epochs, process_index=process_index, process_count=process_count)


class EvalItems:
    """Source items in evaluation order for one process, padded; every item is a dict (never None).

    `order[i]` is the source index of item i, or -1 for padding. Undecodable images skipped by the
    source and padding come as a zero image with valid=False.
    """

    def __init__(self, source, order: np.ndarray, image_size: int):
        self.source, self.order, self.image_size = source, np.asarray(order, np.int64), int(image_size)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        j = int(self.order[int(i)])
        item = self.source[j] if j >= 0 else None
        if item is None:
            return {"image": np.zeros((self.image_size, self.image_size, 3), np.uint8), "label": 0,
                    "index": j, "valid": False}
        return {"image": item["image"], "label": item["label"], "index": j, "valid": True}


def eval_order(num_items: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Source indices (-1 = padding) of one process's evaluation items, batch after batch."""
    global_batch = batch_size * process_count
    num_batches = max(1, math.ceil(num_items / global_batch))
    rows = np.arange(num_batches)[:, None] * global_batch + process_index * batch_size + np.arange(batch_size)
    rows = rows.reshape(-1)
    return np.where(rows < num_items, rows, -1)


def eval_batches(source, dc, *, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> grain.DatasetIterator:
    """Evaluation batches in data set order, one pass: {'image': f32 [B,S,S,3] (+ 'image_flip' if
    config.data.eval.flip), 'label', 'index': i32 [B] (-1 = padding), 'valid': bool [B]}.

    Every process gets the same number of batches (ceil(N / (B * process_count))).
    """
    validate_data_config(dc)
    _check_batch(batch_size, source)
    pi, pc = _process(process_index, process_count)
    items = EvalItems(source, eval_order(len(source), int(batch_size), pi, pc), dc.image_size)
    ds = grain.MapDataset.source(items).map(A.EvalPrepare(dc.image_size, dc.eval.flip))
    ds = ds.batch(int(batch_size), drop_remainder=True, batch_fn=EvalCollate(dc.normalization))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=dc.read_threads, prefetch_buffer_size=dc.read_buffer_size))
    return _iterator(it, dc)


def num_eval_batches(num_items: int, batch_size: int, process_count: int = 1) -> int:
    """Batches per process of `eval_batches`."""
    return max(1, math.ceil(num_items / (batch_size * process_count)))
