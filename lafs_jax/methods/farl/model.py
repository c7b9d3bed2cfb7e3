"""FaRL's pretraining network: CLIP image and text towers, the temperature, and the MIM branch.

`FarlModel(visual, text, mim_layers, vocab_size, sigmoid)(images [B, S, S, 3], ids [B, T], mask [B, N] |
None) -> dict`:
  - with a mask, the clean and the masked copy go through the image tower in one pass (2B images, each
    image's two copies adjacent; the
    masked copy's patch embeddings replaced by `visual/mask_token`); the clean half's projected class
    token is the ITC image feature, the masked half's last-block tokens [B, 1 + N, W] go through
    `lm_transformer` (CLIP blocks), `lm_norm` (float32 LayerNorm) and `lm_head` (Linear W -> vocab_size);
    the class row is dropped: 'mim_logits' [B, N, vocab_size];
  - without a mask (MIM weight 0) only the clean images are run;
  - 'image' [B, E], 'text' [B, E] (projected, not normalised), 'logit_scale' (and 'logit_bias' with
    `sigmoid`) scalars.
Parameters {'visual', 'text', 'logit_scale', ['logit_bias'], ['lm_transformer', 'lm_norm', 'lm_head']}:
the towers' names are `models.clip`'s, so 'visual' / 'text' are what a converted CLIP checkpoint holds.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lafs_jax.models import clip


class FarlModel(nn.Module):
    """See the module docstring."""

    visual: clip.ClipVisual
    text: clip.ClipText
    mim_layers: int = 1
    vocab_size: int = 8192
    sigmoid: bool = False
    logit_scale_init: float = clip.LOGIT_SCALE_INIT
    logit_bias_init: float = -10.0

    @nn.compact
    def __call__(self, images: jax.Array, ids: jax.Array, mask: jax.Array | None = None) -> dict:
        b = images.shape[0]
        out = {}
        if mask is not None:
            # clean and masked copy of each image side by side ([B, 2, ...] -> [2B, ...]): a device's rows
            # stay on it under a batch-sharded layout (no concatenation or slicing across the sharded axis)
            both = jnp.stack([images, images], axis=1).reshape(2 * b, *images.shape[1:])
            both_mask = jnp.stack([jnp.zeros_like(mask), mask], axis=1).reshape(2 * b, *mask.shape[1:])
            emb, aux = self.visual(both, mask=both_mask)
            out["image"] = emb.reshape(b, 2, -1)[:, 0]
            tokens = aux["tokens"].reshape(b, 2, *aux["tokens"].shape[1:])[:, 1]
            v = self.visual
            x, _ = clip.ClipTransformer(v.heads, self.mim_layers, v.mlp_dim, v.eps, v.activation, v.dtype,
                                        v.implementation, v.remat, name="lm_transformer")(tokens, False)
            x = clip.LayerNorm32(epsilon=v.eps, use_fast_variance=False, dtype=jnp.float32, name="lm_norm")(x)
            logits = nn.Dense(self.vocab_size, kernel_init=nn.initializers.normal(0.02), dtype=v.dtype,
                              name="lm_head")(x[:, 1:])
            out["mim_logits"] = logits.astype(jnp.float32)
        else:
            out["image"], _ = self.visual(images)
        out["text"] = self.text(ids)
        out["logit_scale"] = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())
        if self.sigmoid:
            out["logit_bias"] = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), ())
        return out
