"""Pre-norm transformer encoders: the official Part fViT / fViT ViT, and the InsightFace ViT (LVFace).

Every numeric choice of the originals is a field (the official `ViT_face.py`):
  - `attention_scale`: 'dim' -> dim**-0.5 (official fViT/Part fViT: 768**-0.5 with 11 heads x 64),
    'head_dim' -> head_dim**-0.5 (usual ViT, InsightFace);
  - `mlp_activation`: 'gelu' (exact erf GELU, torch nn.GELU), 'gelu_tanh', 'relu6' (InsightFace);
  - `layer_norm_eps` 1e-5 (torch default; Flax's default is 1e-6);
  - drop path per residual branch: `drop_path_schedule` 'constant' (official: every branch 0.1) or
    'linear' (0 -> rate over the depth, InsightFace / timm);
  - dropout after the attention output projection and inside the MLP, embedding dropout;
  - class token and learned positions initialised N(0, 1) as the official `torch.randn`; a sequence of
    n tokens uses the first n + 1 position rows (how LAFS feeds 36-token local views);
  - `dtype` is the compute dtype (bf16 on accelerators), parameters stay float32; attention softmax
    runs in float32 inside `jax.nn.dot_product_attention`.
Linear layers of the official ViT keep torch's default init (uniform +-1/sqrt(fan_in)); the
InsightFace ViT uses truncated normal 0.02, as its code does.

FViT and InsightFaceViT are backbones and return (embedding, {}) (the convention of `registry`);
TokenViT, which pretraining feeds tokens directly, returns the embedding alone.

Parameter names (the converter and the layer-wise lr decay rules rely on them):
  TokenViT: patch_embedding, cls_token, pos_embedding, encoder/block_{i}/{attention_norm,
  attention/{qkv,out}, mlp_norm, mlp/{fc1,fc2}}, head_norm.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lafs_jax.models.heads import EmbeddingHead
from lafs_jax.models.initializers import torch_linear_init, trunc_normal_002

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu6": jax.nn.relu6,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP
}
ATTENTION_SCALES = ("dim", "head_dim")
DROP_PATH_SCHEDULES = ("constant", "linear")


def attention_scale(kind: str, dim: int, head_dim: int) -> float:
    """Softmax temperature of q.k: dim**-0.5 ('dim', official fViT) or head_dim**-0.5 ('head_dim')."""
    if kind == "dim":
        return dim ** -0.5
    if kind == "head_dim":
        return head_dim ** -0.5
    raise ValueError(f"attention_scale={kind!r} is not valid; choose one of {ATTENTION_SCALES}")


def drop_path_rates(rate: float, depth: int, schedule: str) -> tuple[float, ...]:
    """Per-block drop-path rates: all `rate` ('constant') or linspace(0, rate, depth) ('linear')."""
    if schedule == "constant":
        return (float(rate),) * depth
    if schedule == "linear":
        return tuple(float(r) for r in np.linspace(0.0, rate, depth))
    raise ValueError(f"drop_path_schedule={schedule!r} is not valid; choose one of {DROP_PATH_SCHEDULES}")


class Attention(nn.Module):
    """Multi-head self-attention with packed q|k|v. x: [B, T, D] -> [B, T, D].

    `qkv` has 3 * heads * head_dim outputs split q|k|v, each heads-major (heads, head_dim), as the
    official `to_qkv`; `out` maps heads * head_dim back to D (the official `to_out.0`).
    """

    heads: int
    head_dim: int
    scale: float
    qkv_bias: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32
    kernel_init: Callable = torch_linear_init
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        b, t, d = x.shape
        inner = self.heads * self.head_dim
        qkv = nn.Dense(3 * inner, use_bias=self.qkv_bias, kernel_init=self.kernel_init, dtype=self.dtype,
                       name="qkv")(x)
        qkv = qkv.reshape(b, t, 3, self.heads, self.head_dim)
        y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=self.scale,
                                         implementation=self.implementation)
        y = nn.Dense(d, kernel_init=self.kernel_init, dtype=self.dtype, name="out")(y.reshape(b, t, inner))
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class MlpBlock(nn.Module):
    """Linear(D -> mlp_dim), activation, dropout, Linear(mlp_dim -> D), dropout. [B, T, D] -> [B, T, D]."""

    mlp_dim: int
    activation: str = "gelu"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    kernel_init: Callable = torch_linear_init

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        d = x.shape[-1]
        y = nn.Dense(self.mlp_dim, kernel_init=self.kernel_init, dtype=self.dtype, name="fc1")(x)
        y = ACTIVATIONS[self.activation](y)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.Dense(d, kernel_init=self.kernel_init, dtype=self.dtype, name="fc2")(y)
        return nn.Dropout(self.dropout, deterministic=not train)(y)


def drop_path(rate: float, name: str) -> nn.Dropout:
    """Stochastic depth on a residual branch [B, T, D]: one keep/drop draw per sample, kept ones / (1-rate)."""
    return nn.Dropout(rate, broadcast_dims=(1, 2), name=name)


class EncoderBlock(nn.Module):
    """x + DropPath(Attention(LN(x))), then x + DropPath(MLP(LN(x))). [B, T, D] -> [B, T, D]."""

    heads: int
    head_dim: int
    mlp_dim: int
    scale: float
    mlp_activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    qkv_bias: bool = False
    dtype: Any = jnp.float32
    kernel_init: Callable = torch_linear_init
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def norm(name):
            return nn.LayerNorm(epsilon=self.layer_norm_eps, use_fast_variance=False, dtype=self.dtype, name=name)

        y = Attention(self.heads, self.head_dim, self.scale, self.qkv_bias, self.dropout, self.dtype,
                      self.kernel_init, self.attention_implementation, name="attention")(norm("attention_norm")(x),
                                                                                           train)
        x = x + drop_path(self.drop_path_rate, "attention_drop_path")(y, deterministic=not train)
        y = MlpBlock(self.mlp_dim, self.mlp_activation, self.dropout, self.dtype, self.kernel_init,
                     name="mlp")(norm("mlp_norm")(x), train)
        return x + drop_path(self.drop_path_rate, "mlp_drop_path")(y, deterministic=not train)


class Encoder(nn.Module):
    """`len(drop_path_rates)` pre-norm blocks named block_0 ... block_{depth-1}, no final norm.

    With `remat` each block is wrapped in `nn.remat` (same parameter names and numbers; the backward
    pass recomputes the block's activations instead of keeping them)."""

    heads: int
    head_dim: int
    mlp_dim: int
    scale: float
    drop_path_rates: Sequence[float]
    mlp_activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    qkv_bias: bool = False
    dtype: Any = jnp.float32
    kernel_init: Callable = torch_linear_init
    attention_implementation: str | None = None
    remat: bool = False  # nn.remat per block: recompute its activations in the backward pass

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # `train` (argument 2 counting the module) is a Python bool: static under remat
        block = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
        for i, rate in enumerate(self.drop_path_rates):
            x = block(self.heads, self.head_dim, self.mlp_dim, self.scale, self.mlp_activation,
                             self.layer_norm_eps, rate, self.dropout, self.qkv_bias, self.dtype, self.kernel_init,
                             self.attention_implementation, name=f"block_{i}")(x, train)
        return x


class TokenViT(nn.Module):
    """The official fViT transformer on given tokens: tokens [B, N, T] -> embedding [B, dim] float32.

    patch_embedding Linear(T -> dim); prepend the class token; add pos_embedding[:, :N+1]; embedding
    dropout; `depth` pre-norm blocks; take the class token ('cls') or the mean over all N + 1 tokens
    ('mean', the official pool option); LayerNorm (`head_norm`, the official mlp_head) = the embedding.
    N may be anything up to `num_positions`.
    """

    num_positions: int = 196
    dim: int = 768
    depth: int = 12
    heads: int = 11
    head_dim: int = 64
    mlp_dim: int = 2048
    attention_scale: str = "dim"
    mlp_activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    drop_path_rate: float = 0.1
    drop_path_schedule: str = "constant"
    dropout: float = 0.1
    emb_dropout: float = 0.1
    qkv_bias: bool = False
    pool: str = "cls"
    token_init_std: float = 1.0
    dtype: Any = jnp.float32
    attention_implementation: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:
        if tokens.ndim != 3:
            raise ValueError(f"TokenViT: tokens must be [B,N,T], got shape {tokens.shape}")
        b, n, _ = tokens.shape
        if n > self.num_positions:
            raise ValueError(f"TokenViT: {n} tokens but only num_positions={self.num_positions} position rows")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"TokenViT: pool={self.pool!r} is not valid; choose 'cls' or 'mean'")
        x = nn.Dense(self.dim, kernel_init=torch_linear_init, dtype=self.dtype, name="patch_embedding")(tokens)
        init = nn.initializers.normal(self.token_init_std)
        cls = self.param("cls_token", init, (1, 1, self.dim))
        pos = self.param("pos_embedding", init, (1, self.num_positions + 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.dim)), x], axis=1)
        x = x + pos[:, : n + 1].astype(x.dtype)
        x = nn.Dropout(self.emb_dropout, deterministic=not train)(x)
        x = Encoder(self.heads, self.head_dim, self.mlp_dim, attention_scale(self.attention_scale, self.dim,
                                                                             self.head_dim),
                    drop_path_rates(self.drop_path_rate, self.depth, self.drop_path_schedule), self.mlp_activation,
                    self.layer_norm_eps, self.dropout, self.qkv_bias, self.dtype, torch_linear_init,
                    self.attention_implementation, self.remat, name="encoder")(x, train)
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, use_fast_variance=False, dtype=self.dtype,
                         name="head_norm")(x)
        return x.astype(jnp.float32)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """Grid patches: [B, H, W, C] -> [B, (H/P)*(W/P), P*P*C].

    Tokens row-major over (y-block, x-block); each vector in (row, col, channel) order, the einops
    'b c (h p1) (w p2) -> b (h w) (p1 p2 c)' layout of the official plain fViT.
    """
    b, h, w, c = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patchify: image size {h}x{w} is not a multiple of patch_size={patch_size}")
    x = images.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)


class FViT(nn.Module):
    """Plain fViT: grid patches of the image into the TokenViT `vit`. images [B,H,W,C] -> ([B, dim], {})."""

    vit: TokenViT
    patch_size: int = 8

    def __call__(self, images: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        if images.ndim != 4:
            raise ValueError(f"FViT: images must be [B,H,W,C], got shape {images.shape}")
        return self.vit(patchify(images, self.patch_size), train), {}


def random_token_mask(key: jax.Array, batch: int, length: int, keep: int):
    """Per-sample random subset of `keep` of `length` tokens (argsort of uniform noise).

    Returns (ids_keep [B, keep], ids_restore [B, length]): gather with ids_keep to drop tokens; after
    appending length - keep filler tokens, gather with ids_restore to put every token back in place.
    """
    noise = jax.random.uniform(key, (batch, length))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    return ids_shuffle[:, :keep], ids_restore


class InsightFaceViT(nn.Module):
    """InsightFace / LVFace ViT: images [B, H, W, C] -> (embedding [B, embedding_size] float32 (not
    normalised), {}).

    Conv patch embedding (kernel = stride = patch_size, bias; VALID, so 112 with patch 9 gives 12 x 12
    tokens), learned positions (truncated normal 0.02), no class token, pre-norm blocks with
    head_dim**-0.5, ReLU6 MLP and a linear drop-path ramp, final LayerNorm; during training a random
    `mask_ratio` of tokens is dropped before the blocks and a learned `mask_token` put back in their
    place after the final norm (rng stream 'dropout'); then the feature head flatten -> Linear(N*D -> D)
    -> BN -> Linear(D -> embedding_size) -> BN.
    """

    image_size: int = 112
    patch_size: int = 9
    dim: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    mlp_activation: str = "relu6"
    attention_scale: str = "head_dim"
    layer_norm_eps: float = 1e-5
    drop_path_rate: float = 0.1
    drop_path_schedule: str = "linear"
    dropout: float = 0.0
    qkv_bias: bool = False
    mask_ratio: float = 0.1
    embedding_size: int = 512
    bn_eps: float = 2e-5
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    attention_implementation: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        if images.ndim != 4 or images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(f"InsightFaceViT: images must be [B,{self.image_size},{self.image_size},C], got "
                             f"shape {images.shape}")
        if self.dim % self.heads:
            raise ValueError(f"InsightFaceViT: dim={self.dim} is not a multiple of heads={self.heads}")
        head_dim = self.dim // self.heads
        x = nn.Conv(self.dim, (self.patch_size, self.patch_size), strides=self.patch_size, padding="VALID",
                    dtype=self.dtype, name="patch_embedding")(images)
        b, gh, gw, d = x.shape
        length = gh * gw
        x = x.reshape(b, length, d)
        pos = self.param("pos_embedding", trunc_normal_002, (1, length, d))
        x = nn.Dropout(self.dropout, deterministic=not train)(x + pos.astype(x.dtype))
        masking = train and self.mask_ratio > 0
        if masking:
            keep = int(length * (1 - self.mask_ratio))
            ids_keep, ids_restore = random_token_mask(self.make_rng("dropout"), b, length, keep)
            x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
        x = Encoder(self.heads, head_dim, self.mlp_dim, attention_scale(self.attention_scale, d, head_dim),
                    drop_path_rates(self.drop_path_rate, self.depth, self.drop_path_schedule), self.mlp_activation,
                    self.layer_norm_eps, self.dropout, self.qkv_bias, self.dtype, trunc_normal_002,
                    self.attention_implementation, self.remat, name="encoder")(x, train)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, use_fast_variance=False, name="final_norm")(
            x.astype(jnp.float32))
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, d))
        if masking:
            filler = jnp.broadcast_to(mask_token, (b, length - x.shape[1], d))
            x = jnp.take_along_axis(jnp.concatenate([x, filler], axis=1), ids_restore[..., None], axis=1)
        return EmbeddingHead(self.embedding_size, bn_eps=self.bn_eps, bn_momentum=self.bn_momentum,
                             dtype=self.dtype, name="feature_head")(x, train), {}
