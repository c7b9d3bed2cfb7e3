"""Part fViT: landmark CNN -> patches sampled at the landmarks -> ViT (the official `ViT_face.py`).

The landmark positions are not detached: the ViT's loss trains the landmark CNN through the
bilinear weights of the sampler. LAFS pretraining instead runs a frozen landmark CNN on its own and
feeds TokenViT tokens directly; fine-tuning can also pass landmarks computed elsewhere through the
`landmarks=` argument (then `landmark_cnn` is not called).

Both backbones here return (embedding, aux dict), the convention of `registry`: PartFViT's aux is
{'landmarks'}, StandardGridFViT's {'centers'} (the points its patches were sampled at).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from lafs_jax.models.landmarks import LandmarkCNN
from lafs_jax.models.sampling import grid_layout, sample_patches, standard_grid_centers
from lafs_jax.models.vit import TokenViT


class PartFViT(nn.Module):
    """images [B, H, W, C] (normalised) -> (embedding [B, dim] float32, {'landmarks': [B, R, 2] pixels (x, y)}).

    Submodules `landmark_cnn` (LandmarkCNN) and `vit` (TokenViT over P*P*C-long tokens); so
    variables['params']['vit'] has the same tree as a LAFS teacher backbone.
    """

    landmark_cnn: LandmarkCNN
    vit: TokenViT
    patch_size: int = 8

    def __call__(self, images: jax.Array, train: bool, landmarks: jax.Array | None = None):
        if images.ndim != 4:
            raise ValueError(f"PartFViT: images must be [B,H,W,C], got shape {images.shape}")
        if landmarks is None:
            landmarks = self.landmark_cnn(images, train)
        tokens = sample_patches(images, landmarks, self.patch_size)
        return self.vit(tokens, train), {"landmarks": landmarks}


class StandardGridFViT(nn.Module):
    """Part fViT's sampler at fixed standard-grid centres (the official `use_standcoord`, an ablation):
    images [B, H, W, C] -> (embedding [B, dim] float32, {'centers': [B, N, 2] pixels (x, y)}).

    No landmark CNN. Centres `standard_grid_centers(H, P)`; in training, N(0, noise_std²) px noise on
    every coordinate (official `Random_prob`: 3 px) and, with `shuffle`, the N centres resampled with
    replacement per image (official `shuffle`), both from the 'dropout' rng. The official model applies
    them in evaluation too (they are constructor flags); here evaluation uses the plain grid. Tokens
    are bilinear patches (grid_sample's half-pixel shift) in the plain-fViT layout (`grid_layout`).
    """

    vit: TokenViT
    patch_size: int = 8
    noise_std: float = 3.0
    shuffle: bool = False

    def __call__(self, images: jax.Array, train: bool, landmarks: jax.Array | None = None):
        if images.ndim != 4:
            raise ValueError(f"StandardGridFViT: images must be [B,H,W,C], got shape {images.shape}")
        b = images.shape[0]
        if landmarks is None:
            grid = standard_grid_centers(images.shape[1], self.patch_size)
            landmarks = jnp.broadcast_to(grid, (b, *grid.shape))
            if train and self.noise_std:
                landmarks = landmarks + self.noise_std * jax.random.normal(self.make_rng("dropout"), landmarks.shape)
            if train and self.shuffle:
                idx = jax.random.randint(self.make_rng("dropout"), (b, grid.shape[0]), 0, grid.shape[0])
                landmarks = jnp.take_along_axis(landmarks, idx[..., None], axis=1)
        tokens = grid_layout(sample_patches(images, landmarks, self.patch_size), self.patch_size)
        return self.vit(tokens, train), {"centers": landmarks}
