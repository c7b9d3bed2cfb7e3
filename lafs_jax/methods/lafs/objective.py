"""LAFS's pretraining objective (the official `lafs_train.py`): DINO-face's objective on landmark views.

A frozen landmark CNN (eval mode, float32, `config.lafs.landmark_path`) predicts R landmarks on each
clean view; σ = `lafs.noise_std` px Gaussian noise on every coordinate; global views take all R patches,
local views `lafs.num_local_landmarks` landmarks drawn with replacement; the patches come from the
colour-augmented twin of each view (`views.landmark_views`). `lafs.local_views = 'grid'` is the "mixed
views" option (local views cut into a regular grid, `views.grid_tokens`); official ablations
`lafs.random_landmarks` and `lafs.global_resample`. With device augmentation each sample's landmark
draws come from its own key (the step key folded with its stream index).

The loss, the teacher, the centre and the momentum are DINO's (`lafs_jax.methods.dino.objective`). Extra
state beyond the centre: `landmark_cnn` {'params', 'batch_stats'}, the frozen CNN (riding in the state so
a resumed run uses exactly the same one; outside the optimizer, applied in eval mode only). Evaluation:
the teacher as a Part fViT (`{'params': {'landmark_cnn', 'vit'}, 'batch_stats': {'landmark_cnn'}}`);
export: the teacher's TokenViT with patch order 'landmarks'.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from lafs_jax import variables as variables_lib
from lafs_jax.input import device_augment
from lafs_jax.input import pipelines
from lafs_jax.methods.dino import objective as dino_objective
from lafs_jax.methods.lafs import config as lafs_config
from lafs_jax.methods.lafs import landmark_cnn as landmark_cnn_lib
from lafs_jax.methods.lafs import views as views_lib
from lafs_jax.models import presets


class Objective(dino_objective.Objective):
    """LAFS: DINO on landmark views of Part fViT's ViT, with the frozen landmark CNN as extra state."""

    name = "lafs"
    validate = staticmethod(lafs_config.validate)

    def __init__(self, config: ml_collections.ConfigDict, *, steps_per_epoch: int = 1, total_steps: int = 1):
        super().__init__(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        lm_model = ml_collections.ConfigDict(self.model.to_dict())
        lm_model.dtype = "float32"  # the official landmark CNN runs in fp32, outside autocast
        self.landmark_cnn = presets.build_landmark_cnn(lm_model)

    # -- data -------------------------------------------------------------------------------------

    def batches(self, source, *, batch_size: int, seed: int):
        return pipelines.lafs_batches(source, self.config.data, batch_size=batch_size, seed=seed)

    def view_batch_shapes(self, batch_size: int) -> dict:
        v = self.config.data.lafs
        return {f"{kind}_{twin}": jax.ShapeDtypeStruct((batch_size, n, v.view_size, v.view_size, 3), jnp.float32)
                for kind, n in (("global", v.global_views), ("local", v.local_views)) for twin in ("clean", "aug")}

    def augment(self, key: jax.Array, batch: dict) -> dict:
        return device_augment.lafs_views(self.config.data, key, batch)

    # -- state ------------------------------------------------------------------------------------

    def num_tokens(self) -> int:
        return self.config.model.num_landmarks

    def load_resources(self, workdir: str) -> dict:
        """The frozen landmark CNN's variables {'params', 'batch_stats'} as numpy arrays.

        From `config.lafs.landmark_path` (a variables directory of a Part fViT, whose 'landmark_cnn'
        subtree is taken, or of a landmark CNN alone). An empty path initialises one from `config.seed`
        and saves it to WORKDIR/landmark_cnn_init (untrained landmarks: for tests and the CPU demo only),
        and later runs in the same workdir reuse it.
        """
        config = self.config
        size = config.model.image_size
        path = config.lafs.landmark_path
        where = f"config.lafs.landmark_path={path!r}"
        if not path:
            path = os.path.join(workdir, landmark_cnn_lib.INIT_DIR)
            where = f"the initialised landmark CNN at {path}"
            if not os.path.isdir(os.path.join(path, variables_lib.VARIABLES_ITEM)):
                logging.warning("config.lafs.landmark_path is empty: using an UNTRAINED landmark CNN initialised "
                                "from seed %d (saved to %s); set it to a supervised Part fViT for real runs",
                                config.seed, path)
                landmark_cnn_lib.init_and_save(
                    self.landmark_cnn, jax.random.key(config.seed), size, path,
                    {"model": variables_lib.to_json_dict(config.model),
                     "source": f"initialised from seed {config.seed} (untrained)"})
        return landmark_cnn_lib.load(path, landmark_cnn_lib.abstract(self.landmark_cnn, size), where)

    def init_extra_state(self, key: jax.Array, resources: Any = None) -> dict:
        """{'center', 'landmark_cnn'}: the loaded landmark CNN, or with `resources` None an untrained
        one from `key` (what `load_resources` saves with an empty landmark_path and key = the seed's)."""
        out = super().init_extra_state(key, None)
        if resources is None:
            resources = landmark_cnn_lib.init(self.landmark_cnn, key, self.config.model.image_size)
        out["landmark_cnn"] = resources
        return out

    # -- the step ---------------------------------------------------------------------------------

    def views(self, state: dict, batch: dict, key: jax.Array) -> dict:
        """Model inputs of every view, batch-major: {'global': [B, G, R, T], 'local': [B, L, n, T]}:
        landmark tokens (global: all R, local: num_local_landmarks resampled) or, with lafs.local_views =
        'grid', grid tokens of the local augmented crops."""
        landmark_variables = state["landmark_cnn"]

        def landmark_fn(images):
            return self.landmark_cnn.apply(landmark_variables, images, train=False)

        k_global, k_local = jax.random.split(key)
        if "index" in batch:  # device augmentation: per-sample draws, from the step key and the stream index
            k_global = device_augment.sample_keys(k_global, batch["index"])
            k_local = device_augment.sample_keys(k_local, batch["index"])
        lafs = self.config.lafs
        num_landmarks, p = self.config.model.num_landmarks, self.patch_size
        if lafs.random_landmarks:
            out = {"global": views_lib.random_landmark_views(batch["global_aug"], k_global, num_landmarks=num_landmarks,
                                                             patch_size=p)}
        else:
            out = {"global": views_lib.landmark_views(landmark_fn, batch["global_clean"], batch["global_aug"], k_global,
                                                      noise_std=lafs.noise_std,
                                                      num_selected=num_landmarks if lafs.global_resample else None,
                                                      patch_size=p)}
        if batch["local_aug"].shape[1] == 0:
            return out
        if lafs.random_landmarks and lafs.local_views == "landmarks":
            out["local"] = views_lib.random_landmark_views(batch["local_aug"], k_local,
                                                           num_landmarks=lafs.num_local_landmarks, patch_size=p)
        elif lafs.local_views == "grid":
            out["local"] = views_lib.grid_tokens(batch["local_aug"], grid_size=lafs.grid_size, patch_size=p)
        else:
            out["local"] = views_lib.landmark_views(landmark_fn, batch["local_clean"], batch["local_aug"], k_local,
                                                    noise_std=lafs.noise_std, num_selected=lafs.num_local_landmarks,
                                                    patch_size=p)
        return out

    # -- evaluation -------------------------------------------------------------------------------

    def eval_model(self) -> Any:
        """The backbone the teacher is evaluated as: a Part fViT (the frozen landmark CNN + its TokenViT)."""
        return presets.build_model(self.model)

    def eval_variables(self, state: dict) -> dict:
        lm = state["landmark_cnn"]
        return {"params": {"landmark_cnn": lm["params"], "vit": state["teacher"]["backbone"]["vit"]},
                "batch_stats": {"landmark_cnn": lm["batch_stats"]}}
