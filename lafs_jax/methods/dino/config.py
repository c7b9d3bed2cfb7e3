"""DINO's config section `config.dino` (the loss, the teacher and its momentum) and the DINO-face recipe's
validator.

`config()` builds the section with every field commented (LAFS pretraining embeds the same section);
`head_config(preset)` builds the DINO head's section, which the pretraining recipes put at
`config.model.dino_head`; `validate_section(config)` checks both, `validate(config)` checks a DINO-face
recipe (the sections, the fViT backbone and the multi-crop sizes); errors are ConfigErrors naming
`config.dino.<key>` or the field.
"""
from __future__ import annotations

import ml_collections

from lafs_jax.config import ConfigError, check
from lafs_jax.losses import dino as dino_lib
from lafs_jax.models import presets

MODEL_KIND = "fvit"  # DINO-face pretrains a plain fViT (grid patches)


def config(*, warmup_teacher_temp_epochs: int = 30) -> ml_collections.ConfigDict:
    """The `config.dino` section at the official values (lafs_train.py's argparse defaults, LAFS §2.5)."""
    c = ml_collections.ConfigDict()
    c.student_temp = 0.1  # student softmax temperature
    c.warmup_teacher_temp = 0.07  # teacher temperature at epoch 0 (lafs_train.py default; DINO 0.04)
    c.teacher_temp = 0.04  # teacher temperature after the warmup (lafs_train.py default; DINO boost 0.07)
    c.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs  # epochs of linear temperature warmup
    c.center_momentum = 0.9  # EMA momentum of the centre (teacher output mean, global batch)
    # Teacher centring: 'center' (official: minus the running centre) | 'sinkhorn' (DINOv2's Sinkhorn-Knopp
    # equipartition over the global batch; the centre is then unused)
    c.centering = "center"
    c.sinkhorn_iterations = 3  # Sinkhorn-Knopp iterations of 'sinkhorn' (DINOv2: 3)
    # KoLeo regulariser weight (DINOv2 0.1) on the student's global-view embeddings: spreads features that
    # converge to one point (the ORL demo's collapse, README "The demo"); 0 = off, as the official LAFS
    c.koleo_weight = 0.0
    c.teacher_momentum = 0.996  # teacher EMA momentum at step 0, cosine to teacher_momentum_end
    c.teacher_momentum_end = 1.0  # teacher EMA momentum at the last step
    # teacher applies dropout / drop-path (lafs_train.py never calls teacher.eval(); False = DINO's own)
    c.teacher_train_mode = True
    return c


def head_config(preset: str = "base") -> ml_collections.ConfigDict:
    """The DINO projection head's section `config.model.dino_head` at the model preset's defaults (LAFS:
    768 -> 2048 -> 2048 -> 256 -> 100000, last layer weight-normalised with g = 1; the tiny preset's
    96 -> 256 -> 256 -> 64 -> 1024); its values are checked with the model config."""
    return presets.dino_head_config(preset)


def validate_section(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first bad `config.dino.<key>`, or a missing `config.model.dino_head`."""
    if "dino_head" not in config.model:
        raise ConfigError("config.model.dino_head is missing: the DINO objective's projection head; add it in "
                          "the recipe with config.model.dino_head = "
                          "lafs_jax.methods.dino.config.head_config(config.model.preset)")
    d = config.dino
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        check(d[key] > 0, f"dino.{key}", d[key], "> 0")
    check(isinstance(d.warmup_teacher_temp_epochs, int) and 0 <= d.warmup_teacher_temp_epochs,
          "dino.warmup_teacher_temp_epochs", d.warmup_teacher_temp_epochs, "an int >= 0")
    check(0 <= d.center_momentum <= 1, "dino.center_momentum", d.center_momentum, "in [0, 1] (1: centre held at 0)")
    check(d.centering in dino_lib.CENTERINGS, "dino.centering", d.centering, f"one of {dino_lib.CENTERINGS}")
    check(isinstance(d.sinkhorn_iterations, int) and d.sinkhorn_iterations >= 1, "dino.sinkhorn_iterations",
          d.sinkhorn_iterations, "an int >= 1")
    check(d.koleo_weight >= 0, "dino.koleo_weight", d.koleo_weight, ">= 0 (0 = off)")
    for key in ("teacher_momentum", "teacher_momentum_end"):
        check(0 <= d[key] <= 1, f"dino.{key}", d[key], "in [0, 1]")
    check(isinstance(d.teacher_train_mode, bool), "dino.teacher_train_mode", d.teacher_train_mode, "True or False")


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first bad field of a DINO-face recipe (the task's common fields are the
    task's to check)."""
    check(config.model.kind == MODEL_KIND, "model.kind", config.model.kind,
          f"method 'dino' pretrains a {MODEL_KIND!r} backbone")
    validate_section(config)
    dc = config.data.dino
    check(dc.global_size == config.model.image_size, "data.dino.global_size", dc.global_size,
          f"must equal model.image_size={config.model.image_size}")
    for key in ("global_size", "local_size"):
        size = dc[key]
        check(size % config.model.patch_size == 0 and (size // config.model.patch_size) ** 2 <=
              presets.grid_tokens(config.model), f"data.dino.{key}", size,
              f"a multiple of model.patch_size={config.model.patch_size} and at most model.image_size")
    check(dc.local_crops >= 1 or dc.global_crops >= 2, "data.dino.local_crops", dc.local_crops,
          "the loss needs at least two views")
