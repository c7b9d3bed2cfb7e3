"""Face embeddings from a trained backbone: preprocessing, optional flip-sum, batched and sharded.

`embedding_function` builds the pure function `f(variables, images uint8 [B, H, W, 3] RGB) ->
float32 [B, D]` that every evaluation uses (and `export` serialises): colour order and input
normalisation as the checkpoint's metadata records them, the model in eval mode (BatchNorm running
statistics, no dropout), and with `flip` the sum of the embeddings of the image and its horizontal
mirror (the "Accuracy-Flip" of the verification protocol and LAFS's IJB flip test), unnormalised.

`load_backbone` rebuilds a backbone (model, variables, metadata) from a variables directory.
`Embedder` runs the function over many images: batches padded to a fixed size (one compilation),
the batch axis split over every device of the mesh, variables as they are sharded (replicated when
they come from the host); every process passes the same images and gets all embeddings back.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lafs_jax import sharding as mesh_lib
from lafs_jax import variables as variables_lib
from lafs_jax.input.images import COLOR_ORDERS
from lafs_jax.input.transforms import NORMALIZATIONS, normalize
from lafs_jax.models import presets, registry


def preprocess(images: jax.Array, normalization: str = "[-1,1]", color_order: str = "rgb") -> jax.Array:
    """uint8 RGB [B, H, W, 3] -> float32 in the model's colour order and range
    (`input.transforms.normalize`: '[-1,1]', '[-0.5,0.5]' or 'imagenet')."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r} is not valid; choose one of {list(NORMALIZATIONS)}")
    if color_order not in COLOR_ORDERS:
        raise ValueError(f"color_order {color_order!r} is not valid; choose one of {list(COLOR_ORDERS)}")
    x = jnp.asarray(images)
    return normalize(x[..., ::-1] if color_order == "bgr" else x, normalization)


def model_embedding(model: Any, variables: Any, x: jax.Array) -> jax.Array:
    """Embedding [B, D] of a backbone in eval mode: the first of its (embedding, aux) output."""
    emb, _ = registry.split_output(model.apply(variables, x, train=False))
    return emb


def embedding_function(model: Any, *, normalization: str = "[-1,1]", color_order: str = "rgb",
                       flip: bool = True) -> Callable[[Any, jax.Array], jax.Array]:
    """f(variables, images uint8 [B, H, W, 3] RGB) -> float32 [B, D] (flip-summed when `flip`)."""
    preprocess(jnp.zeros((1, 1, 1, 3), jnp.uint8), normalization, color_order)  # validate early

    def f(variables, images):
        x = preprocess(images, normalization, color_order)
        emb = model_embedding(model, variables, x).astype(jnp.float32)
        if flip:
            emb = emb + model_embedding(model, variables, x[:, :, ::-1, :]).astype(jnp.float32)
        return emb

    return f


def compiled_embedding(model: Any, normalization: str, color_order: str, flip: bool, mesh: Any):
    """jax.jit of `embedding_function(...)` with outputs replicated on `mesh`. Equal models share one
    jitted function (and so its compilations: one per variables layout and batch shape), so evaluating
    many checkpoints of one architecture in a process compiles once. No in_shardings: the variables
    keep theirs, the batch comes sharded by global_batch."""
    try:
        return _compiled_embedding(model, normalization, color_order, flip, mesh)
    except TypeError:  # a model with an unhashable field: compiled for this Embedder only
        return _compiled_embedding.__wrapped__(model, normalization, color_order, flip, mesh)


@functools.lru_cache(maxsize=16)
def _compiled_embedding(model, normalization, color_order, flip, mesh):
    fn = embedding_function(model, normalization=normalization, color_order=color_order, flip=flip)
    return jax.jit(fn, out_shardings=mesh_lib.replicated(mesh))


BACKBONE_META_KEYS = ("model", "normalization", "color_order", "image_size")


def load_backbone(directory: str, *, mesh: Any = None, rules: Any = (), host: bool = False) -> tuple[Any, Any, dict]:
    """(Linen model, variables, metadata) of a variables directory holding a backbone.

    The metadata must give the model config (`model`, a dict of `presets.model_config` fields); it
    may give `normalization` and `color_order` (default '[-1,1]', 'rgb') and `image_size` (default
    the model config's). The returned metadata always has all four keys.
    The variables are restored against the model's own abstract variables (shapes from the model
    config, so a directory with other shapes fails naming the entry), whatever device count wrote
    them: placed on `mesh` (default: every device) by `rules` (`config.sharding_rules` style;
    default replicated), or as host numpy arrays with `host=True` (export, inspection).
    """
    meta = variables_lib.read_metadata(directory)
    model_dict = meta.get("model", meta.get("model_config"))
    if not isinstance(model_dict, dict):
        raise ValueError(f"{os.path.join(directory, variables_lib.METADATA_FILE)}: no 'model' entry (the model "
                         f"config dict); cannot rebuild the backbone")
    model_config = ml_collections.ConfigDict(model_dict)
    model = presets.build_model(model_config)
    abstract = presets.abstract_variables(model_config)
    sharding = None if host else mesh_lib.param_shardings(abstract, tuple(rules), _mesh_or_default(mesh))
    variables, meta = variables_lib.load_variables(directory, abstract, sharding)
    meta = dict(meta)
    meta["model"] = model_dict
    meta.setdefault("normalization", "[-1,1]")
    meta.setdefault("color_order", "rgb")
    meta.setdefault("image_size", int(model_dict.get("image_size", 112)))
    return model, variables, meta


def _mesh_or_default(mesh):
    return mesh if mesh is not None else mesh_lib.make_mesh()


class Embedder:
    """Batched, sharded embedding extraction for one backbone.

    Args:
      model: a Linen module called as `model.apply(variables, images, train=False) -> (embedding, aux)`.
      variables: its variables (params and, for the landmark CNN, batch_stats); None if every call
        passes its own (a training loop evaluating its current state).
      image_size: the square input side the model expects (pixels).
      normalization, color_order: as recorded in the checkpoint metadata.
      mesh: the device mesh (default: all devices, pure data parallel).
      batch_size: images per compiled call, rounded up to a multiple of the device count.

    Variables are used as they are sharded: jax.Arrays already on this mesh's devices keep their
    sharding (a training state split by `config.sharding_rules`, or FSDP); anything else (numpy,
    arrays on other devices) is placed replicated on the mesh, once for the Embedder's own
    variables and per call for passed ones. The compiled function follows the variables'
    shardings (one compilation per layout); the batch is split over every device.
    """

    def __init__(self, model: Any, variables: Any, *, image_size: int, normalization: str = "[-1,1]",
                 color_order: str = "rgb", mesh: Any = None, batch_size: int = 64):
        self.model, self.image_size = model, int(image_size)
        self.normalization, self.color_order = normalization, color_order
        self.mesh = _mesh_or_default(mesh)
        n = self.mesh.devices.size
        self.batch_size = -(-int(batch_size) // n) * n
        self.variables = None if variables is None else self.on_mesh(variables)
        self._fns = {flip: compiled_embedding(model, normalization, color_order, flip, self.mesh)
                     for flip in (False, True)}

    def on_mesh(self, variables: Any) -> Any:
        """`variables` with every leaf on this mesh: jax.Arrays on its devices as they are, the rest
        put there replicated."""
        devices = set(self.mesh.devices.flat)
        replicated = mesh_lib.replicated(self.mesh)

        def one(x):
            if isinstance(x, jax.Array) and x.sharding.device_set == devices:
                return x
            return jax.device_put(x, replicated)

        return jax.tree.map(one, variables)

    @classmethod
    def from_variables_dir(cls, directory: str, *, mesh: Any = None, normalization: str | None = None,
                           color_order: str | None = None, batch_size: int = 64, rules: Any = ()) -> "Embedder":
        """An Embedder for a variables directory (fine-tuning's `workdir/backbone` or lafs_jax.convert's
        output), written by any device count; model config, normalisation and colour order come from
        its metadata unless given. The variables are loaded onto `mesh` by `rules` (default replicated)."""
        mesh = _mesh_or_default(mesh)
        model, variables, meta = load_backbone(directory, mesh=mesh, rules=rules)
        return cls(model, variables, image_size=meta["image_size"],
                   normalization=normalization or meta["normalization"],
                   color_order=color_order or meta["color_order"], mesh=mesh, batch_size=batch_size)

    def embed_batch(self, images: np.ndarray, flip: bool = True, variables: Any = None) -> np.ndarray:
        """float32 [b, D] for uint8 [b, H, W, 3] RGB images, b <= batch_size (with `variables`, or the
        Embedder's own when None)."""
        variables = self.variables if variables is None else self.on_mesh(variables)
        if variables is None:
            raise ValueError("Embedder: no variables (pass variables= or build the Embedder with them)")
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"Embedder: images of shape {images.shape}, expected [b, {self.image_size}, "
                             f"{self.image_size}, 3]")
        if images.dtype != np.uint8:
            raise ValueError(f"Embedder: images must be uint8 RGB, got {images.dtype}")
        b = images.shape[0]
        if b > self.batch_size:
            raise ValueError(f"Embedder: batch of {b} images exceeds batch_size {self.batch_size}")
        padded = np.zeros((self.batch_size,) + images.shape[1:], np.uint8)
        padded[:b] = images
        per_process = self.batch_size // jax.process_count()
        local = padded[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
        out = self._fns[bool(flip)](variables, mesh_lib.global_batch(local, self.mesh))
        return np.asarray(out.addressable_shards[0].data)[:b]

    def embed(self, images: np.ndarray, flip: bool = True, variables: Any = None) -> np.ndarray:
        """float32 [N, D] for uint8 [N, H, W, 3] RGB images, in batches of `batch_size`."""
        variables = None if variables is None else self.on_mesh(variables)
        out = [self.embed_batch(images[s:s + self.batch_size], flip, variables)
               for s in range(0, len(images), self.batch_size)]
        return np.concatenate(out, 0)
