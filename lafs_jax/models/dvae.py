"""DALL-E's discrete VAE encoder (the visual tokenizer BEiT uses, and so FaRL's MIM by its code's structure).

Architecture, as OpenAI's `dall_e` package (github openai/DALL-E @5be4b23, `dall_e/encoder.py`,
`dall_e/utils.py`) defines it; read for the facts, written here in Flax, NHWC:

    x [B, H, W, 3] on [0, 1] RGB -> map_pixels: (1 - 2 * 0.1) * x + 0.1     (logit-Laplace eps 0.1)
    input    conv 7x7, 3 -> n_hid                                           ('same' padding, bias)
    group_1  n_blk_per_group blocks, width 1 * n_hid, then max-pool 2x2 / 2
    group_2  ... width 2 * n_hid, then max-pool
    group_3  ... width 4 * n_hid, then max-pool
    group_4  ... width 8 * n_hid (no pool)
    output   ReLU, conv 1x1, 8 * n_hid -> vocab_size                         logits [B, H/8, W/8, vocab]
    block(n_in -> n_out): id_path (conv 1x1 when n_in != n_out, else identity)
                          + post_gain * res_path, post_gain = 1 / n_layers^2, n_layers = 4 * n_blk_per_group;
                          res_path: ReLU, conv 3x3 n_in -> n_out/4, ReLU, conv 3x3, ReLU, conv 3x3,
                          ReLU, conv 1x1 n_out/4 -> n_out
The first block of a group takes the previous group's width. Released encoder: n_hid 256,
n_blk_per_group 2, vocab 8192 (about 54 M parameters); token ids = argmax of the logits over the codes.
The official code runs every conv but the output one in float16 on CUDA; here `dtype` is the compute dtype
of all but the output conv, which is float32 (as the official).

BEiT's use (microsoft/unilm beit/datasets.py, run_beit_pretraining.py): the same random crop as the ViT's
224 px input, resized to 112 px (Lanczos) for the dVAE, so a 14 x 14 token grid matches the 14 x 14 patch
grid of ViT-B/16; `dvae_size(grid)` = grid * 8.

Parameters (`lafs_jax.convert.dalle` maps the official state dict `blocks.<name>.w / .b` onto them):
{'input': {'kernel' [7, 7, 3, n_hid], 'bias'}, 'group_G_block_K': {['id_path'], 'res_path': {'conv_1' ..
'conv_4'}}, 'output': {'kernel' [1, 1, 8 n_hid, vocab], 'bias'}} (G 1..4, K 1..n_blk_per_group).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGIT_LAPLACE_EPS = 0.1  # dall_e/utils.py
GROUPS = 4  # the encoder's fixed group count (widths 1, 2, 4, 8 x n_hid; three 2x2 max-pools)
DOWNSAMPLE = 2 ** (GROUPS - 1)  # input pixels per token along a side
METADATA_KIND = "dalle_dvae"  # metadata 'kind' of a converted encoder's variables directory


def map_pixels(x: jax.Array) -> jax.Array:
    """[0, 1] pixels -> the encoder's input range [0.1, 0.9] (DALL-E's `map_pixels`)."""
    return (1.0 - 2.0 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def dvae_size(grid: int) -> int:
    """Input side (px) giving a `grid` x `grid` token map (BEiT: 112 px for 14 x 14)."""
    return grid * DOWNSAMPLE


def _conv(features: int, k: int, dtype, name: str) -> nn.Conv:
    return nn.Conv(features, (k, k), padding=[((k - 1) // 2, (k - 1) // 2)] * 2, dtype=dtype,
                   precision=jax.lax.Precision.HIGHEST, name=name)


class ResPath(nn.Module):
    """ReLU, conv 3x3 -> hid, ReLU, conv 3x3, ReLU, conv 3x3, ReLU, conv 1x1 -> n_out."""

    hid: int
    n_out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (features, k) in enumerate(((self.hid, 3), (self.hid, 3), (self.hid, 3), (self.n_out, 1))):
            x = _conv(features, k, self.dtype, f"conv_{i + 1}")(nn.relu(x))
        return x


class EncoderBlock(nn.Module):
    """One residual block (module docstring); x [B, H, W, n_in] -> [B, H, W, n_out]."""

    n_out: int
    n_layers: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if x.shape[-1] == self.n_out else _conv(self.n_out, 1, self.dtype, "id_path")(x)
        r = ResPath(self.n_out // 4, self.n_out, self.dtype, name="res_path")(x)
        return identity + (1.0 / self.n_layers ** 2) * r


class DalleEncoder(nn.Module):
    """`(images [B, H, W, 3] on [0, 1] RGB) -> logits [B, H/8, W/8, vocab_size]` float32 (module docstring;
    H, W multiples of 8). `tokens` gives the ids."""

    n_hid: int = 256
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"DalleEncoder: images [B, H, W, 3] expected, got shape {images.shape}")
        n_layers = GROUPS * self.n_blk_per_group
        x = _conv(self.n_hid, 7, self.dtype, "input")(map_pixels(images.astype(jnp.float32)))
        for g in range(GROUPS):
            width = 2 ** g * self.n_hid
            for k in range(self.n_blk_per_group):
                x = EncoderBlock(width, n_layers, self.dtype, name=f"group_{g + 1}_block_{k + 1}")(x)
            if g < GROUPS - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(x.astype(jnp.float32))
        return nn.Conv(self.vocab_size, (1, 1), dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
                       name="output")(x)


def tokens(logits: jax.Array) -> jax.Array:
    """Token ids int32 [B, h, w] of the encoder's logits [B, h, w, vocab] (the argmax over the codes)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
