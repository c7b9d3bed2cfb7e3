"""Part fViT: landmark CNN -> patches sampled at the landmarks -> ViT (reference/lafs.md §1.1).

The landmark positions are not detached: the ViT's loss trains the landmark CNN through the
bilinear weights of the sampler. LAFS pretraining instead runs a frozen landmark CNN on its own and
feeds TokenViT tokens directly; fine-tuning can also pass landmarks computed elsewhere through the
`landmarks=` argument (then `landmark_cnn` is not called).
"""
from __future__ import annotations

import jax
import flax.linen as nn

from lafs_jax.models.landmarks import LandmarkCNN
from lafs_jax.models.sampling import sample_patches
from lafs_jax.models.vit import TokenViT


class PartFViT(nn.Module):
    """images [B, H, W, C] (normalised) -> (embedding [B, dim] float32, landmarks [B, R, 2] pixels (x, y)).

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
        return self.vit(tokens, train), landmarks
