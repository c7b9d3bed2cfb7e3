"""LAFS pretraining's config section `config.lafs` (landmark views) and the LAFS recipe's validator.

`config()` builds the section with every field commented; `validate(config)` checks a LAFS pretraining
recipe: the Part fViT backbone, the DINO section it shares with DINO-face (`config.dino`), the `lafs`
section and the view counts; errors are ConfigErrors naming `config.<key>`.
"""
from __future__ import annotations

import ml_collections

from lafs_jax.config import check, check_choice
from lafs_jax.methods.dino import config as dino_config

MODEL_KIND = "part_fvit"  # LAFS pretrains Part fViT's ViT
LOCAL_VIEW_KINDS = ("landmarks", "grid")


def config() -> ml_collections.ConfigDict:
    """The `config.lafs` section at the official values (lafs_train.py, §2.3)."""
    c = ml_collections.ConfigDict()
    # Variables directory of a supervised Part fViT (or a landmark CNN alone); '' = initialise an
    # untrained one from `seed` (demo and tests only; saved in WORKDIR/landmark_cnn_init).
    c.landmark_path = ""
    c.noise_std = 5.0  # σ of the Gaussian noise on every landmark coordinate (pixels)
    c.num_local_landmarks = 36  # landmarks drawn with replacement per local view (6x6 mosaic)
    # 'landmarks' (official) | 'grid': mixed views, DINO-style local views = the augmented local crop
    # resized to grid_size px and cut into a regular patch grid ((grid_size / patch_size)**2 tokens)
    c.local_views = "landmarks"
    c.grid_size = 48  # side of the resized local crop of 'grid' local views (px)
    # Official ablations (off in the released run). random_landmarks: every view's landmarks uniform in
    # [0, S-1), no landmark CNN, no noise (official random_coor; its local views take 25 landmarks: set
    # num_local_landmarks=25 to match). global_resample: global views take R landmarks drawn with
    # replacement after the noise (the official landmark function without return_prob).
    c.random_landmarks = False
    c.global_resample = False
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first bad field of a LAFS pretraining recipe (the task's common fields are
    the task's to check)."""
    check(config.model.kind == MODEL_KIND, "model.kind", config.model.kind,
          f"method 'lafs' pretrains a {MODEL_KIND!r} backbone")
    dino_config.validate_section(config)
    lafs = config.lafs
    check(isinstance(lafs.landmark_path, str), "lafs.landmark_path", lafs.landmark_path,
          "a variables directory, or '' (an untrained landmark CNN)")
    check(lafs.noise_std >= 0, "lafs.noise_std", lafs.noise_std, ">= 0 (pixels)")
    check(isinstance(lafs.num_local_landmarks, int) and 1 <= lafs.num_local_landmarks <= config.model.num_landmarks,
          "lafs.num_local_landmarks", lafs.num_local_landmarks,
          f"an int in [1, model.num_landmarks={config.model.num_landmarks}]")
    check_choice(config, "lafs.local_views", LOCAL_VIEW_KINDS)
    for key in ("random_landmarks", "global_resample"):
        check(isinstance(lafs[key], bool), f"lafs.{key}", lafs[key], "True or False")
    check(not (lafs.random_landmarks and lafs.global_resample), "lafs.global_resample", True,
          "resamples the landmark CNN's landmarks; with lafs.random_landmarks there are none")
    if lafs.local_views == "grid":
        g = lafs.grid_size
        check(g % config.model.patch_size == 0 and (g // config.model.patch_size) ** 2 <= config.model.num_landmarks,
              "lafs.grid_size", g, f"a multiple of model.patch_size={config.model.patch_size} with at most "
                                   f"model.num_landmarks={config.model.num_landmarks} patches")
    check(config.data.lafs.local_views >= 1 or config.data.lafs.global_views >= 2, "data.lafs.local_views",
          config.data.lafs.local_views, "the loss needs at least two views")
