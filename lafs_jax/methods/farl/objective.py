"""FaRL's pretraining objective: the hooks of the single-network image-text step (`train/image_text.py`).

One network (no teacher): `model.FarlModel` over the CLIP towers of `config.model` (kind 'clip_vit').
Batches: `input.image_text.image_text_batches` (CLIP preprocessing or a random resized crop of
`farl.crop_scale`, optional flip, BPE ids of `farl.context_length`, BEiT blockwise masks of
`farl.mim.num_masked` patches); with `data.augment_on='device'` the crop / resize / flip / normalisation
run inside the step (`augment`). Loss = itc_weight x ITC (`losses.contrastive`,
global batch, `farl.itc`) + mim.weight x MIM (`losses.mim.masked_token_loss` of the masked copy's
logits against the visual tokens of the clean image). Visual tokens: the nearest row of a frozen k-means
codebook of raw normalised patch vectors (extra state 'codebook' [vocab_size, P*P*3], fitted once at
start-up on `mim.kmeans_images` training images, or read from `mim.codebook_path`; saved in the
checkpoint, so a resumed run keeps it); or, with `mim.tokenizer='dalle'`, the argmax codes of DALL-E's
frozen dVAE encoder (`models.dvae`, BEiT's tokenizer; extra state 'dvae': its params, read at start-up
from the converted directory `mim.dalle_path`, `python -m lafs_jax.convert --kind dalle`) over the
clean image mapped back to [0, 1] and resized to grid x 8 px (`dvae_pixels`).

Metrics: 'itc', 'mim', 'mim_accuracy', 'itc_i2t_top1' / 'itc_t2i_top1' (in-batch retrieval over the
global batch), 'logit_scale', 'truncated_captions' (captions of the batch cut to the context).
Evaluation: the image tower (`ClipVisual`) with the trained 'visual' params; export {'params': visual,
'text': {'params': text}, 'logit_scale': s} with kind 'clip_vit' (the layout `lafs_jax.convert --kind
farl` writes, so `lafs_jax.embed` reads both for images and texts).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from lafs_jax import variables as variables_lib
from lafs_jax.input import image_text
from lafs_jax.input import pipelines
from lafs_jax.input import transforms
from lafs_jax.losses import contrastive
from lafs_jax.losses import mim as mim_lib
from lafs_jax.methods.farl import config as farl_config
from lafs_jax.methods.farl import model as model_lib
from lafs_jax.models import clip, dvae, presets
from lafs_jax.models import vit as vit_lib

CODEBOOK_FILE = "mim_codebook.npy"  # in the workdir: the fitted codebook (also in every checkpoint)


def dalle_config(path: str, vocab_size: int) -> dict:
    """The dVAE architecture {'n_hid', 'n_blk_per_group', 'vocab_size'} of the converted directory `path`
    (config.farl.mim.dalle_path), checked against config.farl.mim.vocab_size."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"config.farl.mim.dalle_path={path!r}: no such directory; convert DALL-E's dVAE "
                                "encoder once with `python -m lafs_jax.convert --kind dalle` (lafs_jax.convert.dalle)")
    meta = variables_lib.read_metadata(path)
    if meta.get("kind") != dvae.METADATA_KIND:
        raise ValueError(f"config.farl.mim.dalle_path={path!r}: metadata kind {meta.get('kind')!r}, not a "
                         f"converted dVAE ({dvae.METADATA_KIND!r})")
    cfg = {k: int(v) for k, v in meta["dvae"].items()}
    if cfg["vocab_size"] != vocab_size:
        raise ValueError(f"config.farl.mim.vocab_size={vocab_size}, the dVAE at config.farl.mim.dalle_path={path!r} "
                         f"has {cfg['vocab_size']} codes")
    return cfg


def dvae_pixels(images: jax.Array, normalization: str, grid: int) -> jax.Array:
    """The dVAE's input [B, 8 grid, 8 grid, 3] on [0, 1] from normalised images [B, S, S, 3]: the
    normalisation undone, then (S != 8 grid) a Lanczos-3 antialiased resize (`jax.image.resize`), clipped
    to [0, 1]. BEiT resizes the same crop to 112 px with Pillow's Lanczos from the source image; here the
    model's view is resized (the same crop, one resampling more)."""
    x = images.astype(jnp.float32)
    if normalization == "[-1,1]":
        x = (x + 1.0) * 0.5
    elif normalization == "[-0.5,0.5]":
        x = x + 0.5
    else:
        mean, std = transforms.MEAN_STD[normalization]
        x = x * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
    size = dvae.dvae_size(grid)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "lanczos3", antialias=True)
    return jnp.clip(x, 0.0, 1.0)


class Objective:
    """FaRL (see the module docstring). Built from a recipe; the step is `train/image_text.py`'s."""

    name = "farl"
    single_network = True  # the pretrain task builds train/image_text's step (no teacher) for it
    export_dir = "backbone"  # WORKDIR/backbone (and backbone_best) at the end
    validate = staticmethod(farl_config.validate)

    def __init__(self, config: ml_collections.ConfigDict, *, steps_per_epoch: int = 1, total_steps: int = 1):
        del steps_per_epoch, total_steps
        self.config = config
        f = config.farl
        self.model_config = presets.with_precision(config.model, config.precision)
        self.visual = clip.build_visual(self.model_config)
        self.model = model_lib.FarlModel(self.visual, clip.build_text(self.model_config), f.mim.layers,
                                         f.mim.vocab_size, f.itc == "sigmoid", float(f.logit_scale_init),
                                         float(f.logit_bias_init))
        self.mim = f.mim.weight > 0
        m = config.model
        self.grid = m.image_size // m.patch_size
        self.patch_dim = m.patch_size ** 2 * m.channels
        self.dvae = self.dvae_path = None
        if f.mim.tokenizer == "dalle":
            self.dvae_path = f.mim.dalle_path
            self.dvae = dvae.DalleEncoder(**dalle_config(self.dvae_path, f.mim.vocab_size),
                                          dtype=self.visual.dtype)

    # -- data -------------------------------------------------------------------------------------

    def batches(self, source, *, batch_size: int, seed: int):
        f = self.config.farl
        return image_text.image_text_batches(source, self.config.data, batch_size=batch_size, seed=seed,
                                             grid=self.grid, num_masked=f.mim.num_masked,
                                             min_block=f.mim.min_block, context_length=f.context_length, flip=f.flip,
                                             crop_scale=tuple(f.crop_scale) or None)

    def view_batch_shapes(self, batch_size: int) -> dict:
        s, n = self.config.model.image_size, self.grid ** 2
        return {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
                "text": jax.ShapeDtypeStruct((batch_size, self.config.farl.context_length), jnp.int32),
                "mask": jax.ShapeDtypeStruct((batch_size, n), jnp.bool_),
                "truncated": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

    def augment(self, key: jax.Array, batch: dict) -> dict:
        """augment_on='device': the decoded batch -> the view batch (`input.image_text.device_views`)."""
        f = self.config.farl
        return image_text.device_views(self.config.data, key, batch, size=self.config.model.image_size,
                                       crop_scale=tuple(f.crop_scale) or None, flip=f.flip)

    # -- state ------------------------------------------------------------------------------------

    def init_params(self, key: jax.Array) -> dict:
        """{'params': FarlModel params} (float32)."""
        s, n = self.config.model.image_size, self.grid ** 2
        images = jnp.zeros((1, s, s, 3), jnp.float32)
        ids = jnp.zeros((1, self.config.farl.context_length), jnp.int32)
        mask = jnp.zeros((1, n), bool) if self.mim else None
        return {"params": self.model.init({"params": key}, images, ids, mask)["params"]}

    def load_resources(self, workdir: str) -> Any:
        """'dalle': the dVAE encoder's params (numpy) from `mim.dalle_path`. 'kmeans': the codebook
        [vocab_size, P*P*3] float32 from `mim.codebook_path`, else the workdir's, else fitted now on the
        training data (and written to WORKDIR/mim_codebook.npy)."""
        m = self.config.farl.mim
        if self.dvae is not None:
            return variables_lib.load_variables(self.dvae_path)[0]["params"]
        path = m.codebook_path or os.path.join(workdir, CODEBOOK_FILE)
        shape = (m.vocab_size, self.patch_dim)
        if os.path.exists(path):
            codebook = np.load(path, allow_pickle=False)
            if codebook.shape != shape:
                raise ValueError(f"{path}: codebook of shape {codebook.shape}, config.farl.mim needs {shape}")
            return codebook.astype(np.float32)
        if m.codebook_path:
            raise FileNotFoundError(f"config.farl.mim.codebook_path={m.codebook_path!r} does not exist")
        codebook = self.fit_codebook(pipelines.make_source(self.config.data))
        os.makedirs(workdir, exist_ok=True)
        np.save(path, codebook)
        return codebook

    def fit_codebook(self, source) -> np.ndarray:
        """k-means over raw normalised patch vectors of `mim.kmeans_images` training images spread evenly
        over `source` (deterministic: seed `config.seed`)."""
        m, s = self.config.farl.mim, self.config.model.image_size
        picks = np.unique(np.linspace(0, len(source) - 1, min(m.kmeans_images, len(source))).astype(int))
        images = [image_text.center_square(item["image"], s) for i in picks if (item := source[int(i)]) is not None]
        x = transforms.normalize(np.stack(images), self.config.data.normalization)
        patches = np.asarray(vit_lib.patchify(x, self.config.model.patch_size)).reshape(-1, self.patch_dim)
        rng = np.random.default_rng(self.config.seed)
        patches = patches[rng.choice(len(patches), min(m.kmeans_patches, len(patches)), replace=False)]
        logging.info("farl: fitting a %d-code k-means visual tokenizer on %d patches of %d images",
                     m.vocab_size, len(patches), len(images))
        return mim_lib.kmeans(patches, m.vocab_size, m.kmeans_iterations, self.config.seed)

    def init_extra_state(self, key: jax.Array, resources: Any = None) -> dict:
        """{'codebook'} or {'dvae'}: the frozen visual tokenizer; resources None = a random one from `key`."""
        m = self.config.farl.mim
        if self.dvae is not None:
            if resources is None:
                s = dvae.dvae_size(self.grid)
                resources = self.dvae.init(key, jnp.zeros((1, s, s, 3), jnp.float32))["params"]
            return {"dvae": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), resources)}
        if resources is None:
            return {"codebook": jax.random.normal(key, (m.vocab_size, self.patch_dim), jnp.float32)}
        return {"codebook": jnp.asarray(resources, jnp.float32)}

    # -- the step ---------------------------------------------------------------------------------

    def loss(self, params: Any, batch: dict, state: dict, key: jax.Array, *, mesh) -> tuple[jax.Array, dict]:
        """(itc_weight ITC + mim.weight MIM, metrics); see the module docstring."""
        del key
        f = self.config.farl
        out = self.model.apply({"params": params}, batch["image"], batch["text"],
                               batch["mask"] if self.mim else None)
        itc, metrics = contrastive.itc_loss(out["image"], out["text"], out["logit_scale"], mesh=mesh, kind=f.itc,
                                            logit_bias=out.get("logit_bias"))
        loss = f.itc_weight * itc
        metrics = {"itc": itc, **metrics, "truncated_captions": jnp.sum(batch["truncated"]).astype(jnp.float32)}
        if self.mim:
            targets = jax.lax.stop_gradient(self.visual_tokens(batch["image"], state))
            mim, acc = mim_lib.masked_token_loss(out["mim_logits"], targets, batch["mask"])
            loss = loss + f.mim.weight * mim
            metrics.update(mim=mim, mim_accuracy=acc)
        return loss, metrics

    def visual_tokens(self, images: jax.Array, state: dict) -> jax.Array:
        """MIM targets int32 [B, grid * grid] (row-major patches) of normalised images [B, S, S, 3]."""
        if self.dvae is None:
            return mim_lib.nearest_code(vit_lib.patchify(images, self.config.model.patch_size), state["codebook"])
        x = dvae_pixels(images, self.config.data.normalization, self.grid)
        return dvae.tokens(self.dvae.apply({"params": state["dvae"]}, x)).reshape(images.shape[0], -1)

    # -- evaluation and export --------------------------------------------------------------------

    def eval_model(self) -> Any:
        return self.visual

    def eval_variables(self, state: dict) -> Any:
        visual = {k: v for k, v in state["params"]["visual"].items() if k != "mask_token"}
        return {"params": visual}

    def export_variables(self, state: dict) -> dict:
        p = state["params"]
        return {**self.eval_variables(state), "text": {"params": p["text"]}, "logit_scale": p["logit_scale"]}

    def export_metadata(self) -> dict:
        return {"kind": clip.KIND, "patch_order": None, "text": {"context_length": self.config.farl.context_length}}
