"""OpenAI CLIP's image and text towers (FaRL loads into CLIP's `model.py`), as Linen modules.

Numerics follow CLIP's released `model.py` (the FaRL checkpoints load into it unchanged):
  - pre-LN residual blocks `x + attn(ln_1(x))`, `x + mlp(ln_2(x))`, MLP c_fc (4 x width) -> QuickGELU
    (x * sigmoid(1.702 x), `mlp_activation='quick_gelu'`) -> c_proj; attention scale head_dim**-0.5, biases
    on q, k, v and the output;
  - every LayerNorm computed in float32 (eps `layer_norm_eps`, 1e-5) and cast back to the compute dtype;
  - image tower (`ClipVisual`): conv1 (patch x patch, stride patch, no bias) -> prepend class_embedding ->
    + positional_embedding -> ln_pre -> blocks -> ln_post on the class token -> @ proj (width -> embed_dim);
  - text tower (`ClipText`): token_embedding + positional_embedding -> blocks under a causal mask ->
    ln_final -> the row of the end-of-text token (the argmax of the ids: EOT is the largest id, 49407)
    -> @ text_projection (text_width -> embed_dim).
Initialisation follows CLIP's `initialize_parameters` (normal, std width**-0.5 for attention inputs and
projections, (2 width)**-0.5 for c_fc, width**-0.5 (2 layers)**-0.5 for the residual outputs; token
embedding 0.02, text positions 0.01; class embedding and image positions width**-0.5 x N(0, 1)).

`ClipVisual` is the backbone of model kind 'clip_vit' (`registry`): `(images [B, H, W, 3] normalised,
train) -> (embedding [B, embed_dim] float32 (projected, not normalised), aux)` with aux
`{'feature_maps': [B, K, H/P, W/P, width], 'class_tokens': [B, K, width]}`: the raw output of each of
the K blocks `clip.feature_blocks` (0-based; after the block, no LayerNorm), FaRL's `FaRLVisualFeatures`,
and `'tokens'`: the last block's output [B, 1 + N, width] (before ln_post; masked image modelling reads
it). With `mask` [B, N] bool the patch embeddings of masked positions are replaced by the learned
`mask_token` (created the first time a mask is given) before the class token and positions are added.

`resample_positions` resizes a position table bicubically (torch's a = -0.75, align_corners False,
borders clamped; the class row untouched), e.g. 14 x 14 -> 28 x 28 for 448 px inputs.

Parameter names (the converter maps CLIP's state dict onto them): visual `conv1`, `class_embedding`
[W], `positional_embedding` [1 + N, W], `ln_pre`, `transformer/block_{i}/{ln_1, attn/{query, key, value,
out}, ln_2, mlp_c_fc, mlp_c_proj}`, `ln_post`, `proj` [W, E], `mask_token` [W]; text `token_embedding/embedding`
[V, Wt], `positional_embedding` [C, Wt], `transformer/block_{i}/...`, `ln_final`, `text_projection` [Wt, E].
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lafs_jax.config import check
from lafs_jax.models import registry

KIND = "clip_vit"
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial log temperature
LOGIT_SCALE_MAX = 100.0  # exp(logit_scale) is clamped at 100 (CLIP)
# presets: (image width, layers, heads, patch, embed_dim, text width, text heads, text layers, feature blocks)
SIZES = {
    "clip_b16": (768, 12, 12, 16, 512, 512, 8, 12, (3, 5, 7, 11)),  # FaRL-Base-Patch16 (released)
    "clip_l14": (1024, 24, 16, 14, 768, 768, 12, 12, (7, 11, 15, 23)),  # CLIP ViT-L/14
    "clip_h14": (1280, 32, 16, 14, 1024, 1024, 16, 24, (8, 14, 20, 31)),  # FaRL's huge: 16 heads of 80
    "clip_tiny": (64, 2, 2, 8, 32, 32, 2, 2, (0, 1)),  # tests and configs/farl.py:tiny
}
PRESETS = tuple(SIZES)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, result cast back (CLIP's LayerNorm)."""

    @nn.compact
    def __call__(self, x, *args, **kwargs):
        return super().__call__(x.astype(jnp.float32), *args, **kwargs).astype(x.dtype)


def _norm(eps: float, name: str) -> LayerNorm32:
    return LayerNorm32(epsilon=eps, use_fast_variance=False, dtype=jnp.float32, name=name)


class ClipAttention(nn.Module):
    """Multi-head attention with q, k, v, out projections (torch's packed in_proj split). [B, T, W] -> [B, T, W]."""

    heads: int
    in_std: float
    out_std: float
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        b, t, w = x.shape
        hd = w // self.heads

        def proj(name, std):
            return nn.Dense(w, kernel_init=nn.initializers.normal(std), dtype=self.dtype, name=name)

        q, k, v = (proj(n, self.in_std)(x).reshape(b, t, self.heads, hd) for n in ("query", "key", "value"))
        y = jax.nn.dot_product_attention(q, k, v, scale=hd ** -0.5, is_causal=causal,
                                         implementation=self.implementation)
        return proj("out", self.out_std)(y.reshape(b, t, w))


class ClipBlock(nn.Module):
    """CLIP's ResidualAttentionBlock. [B, T, W] -> [B, T, W]."""

    heads: int
    mlp_dim: int
    layers: int  # of the tower (sets the residual outputs' init std)
    eps: float = 1e-5
    activation: str = "quick_gelu"
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        w = x.shape[-1]
        attn_std, proj_std, fc_std = w ** -0.5, w ** -0.5 * (2 * self.layers) ** -0.5, (2 * w) ** -0.5
        x = x + ClipAttention(self.heads, attn_std, proj_std, self.dtype, self.implementation, name="attn")(
            _norm(self.eps, "ln_1")(x), causal)
        y = _norm(self.eps, "ln_2")(x)
        y = nn.Dense(self.mlp_dim, kernel_init=nn.initializers.normal(fc_std), dtype=self.dtype,
                     name="mlp_c_fc")(y)
        y = quick_gelu(y) if self.activation == "quick_gelu" else nn.gelu(y, approximate=False)
        y = nn.Dense(w, kernel_init=nn.initializers.normal(proj_std), dtype=self.dtype, name="mlp_c_proj")(y)
        return x + y


class ClipTransformer(nn.Module):
    """`layers` blocks `block_{i}`; returns (output [B, T, W], [the outputs of blocks `collect`]).
    `remat`: nn.remat per block (same parameters and numbers, activations recomputed in the backward pass)."""

    heads: int
    layers: int
    mlp_dim: int
    eps: float = 1e-5
    activation: str = "quick_gelu"
    dtype: Any = jnp.float32
    implementation: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool, collect: Sequence[int] = ()) -> tuple[jax.Array, list]:
        block = nn.remat(ClipBlock, static_argnums=(2,)) if self.remat else ClipBlock
        out = []
        for i in range(self.layers):
            x = block(self.heads, self.mlp_dim, self.layers, self.eps, self.activation, self.dtype,
                      self.implementation, name=f"block_{i}")(x, causal)
            if i in collect:
                out.append(x)
        return x, out


class ClipVisual(nn.Module):
    """CLIP's VisionTransformer: images [B, H, W, 3] -> (embedding [B, embed_dim] float32, aux); see the
    module docstring for aux and `mask`."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    embed_dim: int = 512
    eps: float = 1e-5
    activation: str = "quick_gelu"
    feature_blocks: tuple[int, ...] = (3, 5, 7, 11)
    dtype: Any = jnp.float32
    implementation: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, dict]:
        del train  # CLIP has no dropout or drop path
        if images.ndim != 4 or images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(f"ClipVisual: images must be [B,{self.image_size},{self.image_size},C], got "
                             f"shape {images.shape}")
        p, w = self.patch_size, self.width
        scale = w ** -0.5
        x = nn.Conv(w, (p, p), strides=p, padding="VALID", use_bias=False, dtype=self.dtype, name="conv1")(
            images.astype(self.dtype))
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, w)
        if mask is not None:
            token = self.param("mask_token", nn.initializers.normal(0.02), (w,))
            x = jnp.where(mask[..., None], token.astype(x.dtype), x)
        cls = self.param("class_embedding", nn.initializers.normal(scale), (w,))
        pos = self.param("positional_embedding", nn.initializers.normal(scale), (gh * gw + 1, w))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, w)), x], axis=1)
        x = _norm(self.eps, "ln_pre")(x + pos.astype(x.dtype))
        x, feats = ClipTransformer(self.heads, self.layers, self.mlp_dim, self.eps, self.activation, self.dtype,
                                   self.implementation, self.remat, name="transformer")(
            x, False, tuple(self.feature_blocks))
        proj = self.param("proj", nn.initializers.normal(scale), (w, self.embed_dim))
        emb = _norm(self.eps, "ln_post")(x[:, 0]) @ proj.astype(x.dtype)
        aux = {"tokens": x}
        if feats:
            f = jnp.stack(feats, axis=1)  # [B, K, 1 + N, W]
            aux["feature_maps"] = f[:, :, 1:].reshape(b, len(feats), gh, gw, w)
            aux["class_tokens"] = f[:, :, 0]
        return emb.astype(jnp.float32), aux


class ClipText(nn.Module):
    """CLIP's text tower: token ids int [B, T] (T <= context_length; 0-padded after EOT) -> [B, embed_dim]
    float32 (projected, not normalised)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    embed_dim: int = 512
    eps: float = 1e-5
    activation: str = "quick_gelu"
    dtype: Any = jnp.float32
    implementation: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        if ids.ndim != 2 or ids.shape[1] > self.context_length:
            raise ValueError(f"ClipText: ids must be [B, T<={self.context_length}], got shape {ids.shape}")
        x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype,
                     name="token_embedding")(ids)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01), (self.context_length, self.width))
        x = x + pos[: ids.shape[1]].astype(x.dtype)
        x, _ = ClipTransformer(self.heads, self.layers, 4 * self.width, self.eps, self.activation, self.dtype,
                               self.implementation, self.remat, name="transformer")(x, True)
        x = _norm(self.eps, "ln_final")(x)
        x = x[jnp.arange(x.shape[0]), jnp.argmax(ids, axis=-1)]
        proj = self.param("text_projection", nn.initializers.normal(self.width ** -0.5), (self.width, self.embed_dim))
        return (x @ proj.astype(x.dtype)).astype(jnp.float32)


# ---- position resampling ----

def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bicubic resize (a = -0.75, align_corners False, clamped taps)."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        f = math.floor(src)
        for k in range(-1, 3):
            m[i, min(max(f + k, 0), n_in - 1)] += _cubic(np.asarray(src - (f + k)))
    return m


def resample_positions(pos: np.ndarray, grid: int) -> np.ndarray:
    """A position table [1 + n*n, W] (class row first) -> [1 + grid*grid, W], bicubic over the n x n grid."""
    pos = np.asarray(pos)
    n = int(round(math.sqrt(pos.shape[0] - 1)))
    if n * n + 1 != pos.shape[0]:
        raise ValueError(f"resample_positions: {pos.shape[0]} rows are not 1 + a square grid")
    if n == grid:
        return pos
    m = bicubic_matrix(n, grid)
    g = pos[1:].reshape(n, n, -1).astype(np.float64)
    out = np.einsum("ij,jkc,lk->ilc", m, g, m).reshape(grid * grid, -1)
    return np.concatenate([pos[:1], out.astype(pos.dtype)], axis=0)


# ---- config, presets, registration ----

def clip_config(preset: str = "clip_b16") -> ml_collections.ConfigDict:
    """`config.model.clip`: the joint space and the text tower of a CLIP model (the image tower uses the
    shared fields dim / depth / heads / patch_size)."""
    size = SIZES.get(preset, SIZES["clip_b16"])
    c = ml_collections.ConfigDict()
    c.embed_dim = size[4]  # joint embedding size E (visual.proj / text_projection outputs)
    c.context_length = 77  # text positions (CLIP)
    c.vocab_size = 49408  # CLIP's byte-level BPE vocabulary
    c.text_width = size[5]  # text transformer width
    c.text_heads = size[6]  # text attention heads
    c.text_layers = size[7]  # text transformer blocks
    c.feature_blocks = size[8]  # 0-based blocks whose raw outputs aux returns (FaRLVisualFeatures)
    return c


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """Set the shared model fields of `c` (presets._base) to CLIP preset `preset`; adds the clip section."""
    w, layers, heads, patch = SIZES[preset][:4]
    c.kind = KIND
    c.image_size = 32 if preset == "clip_tiny" else 224
    c.patch_size = patch
    c.num_landmarks = (c.image_size // patch) ** 2
    c.dim, c.depth, c.heads, c.head_dim, c.mlp_dim = w, layers, heads, w // heads, 4 * w
    c.attention_scale = "head_dim"
    c.mlp_activation = "quick_gelu"
    c.drop_path_rate = c.dropout = c.emb_dropout = 0.0
    c.qkv_bias = True
    c.clip = clip_config(preset)
    return c


def validate(cfg, prefix: str) -> None:
    """The clip_vit family's checks (ConfigError naming `config.<prefix>.<key>`)."""
    check(cfg.dim % cfg.heads == 0 and cfg.head_dim * cfg.heads == cfg.dim, f"{prefix}.head_dim", cfg.head_dim,
          f"clip_vit needs heads * head_dim == dim={cfg.dim}")
    check(cfg.image_size % cfg.patch_size == 0, f"{prefix}.patch_size", cfg.patch_size,
          f"clip_vit needs image_size={cfg.image_size} to be a multiple of patch_size")
    check(cfg.mlp_activation in ("quick_gelu", "gelu"), f"{prefix}.mlp_activation", cfg.mlp_activation,
          "clip_vit: 'quick_gelu' (CLIP) or 'gelu'")
    c = cfg.clip
    for k in ("embed_dim", "context_length", "vocab_size", "text_width", "text_heads", "text_layers"):
        check(isinstance(c[k], int) and c[k] >= 1, f"{prefix}.clip.{k}", c[k], "an int >= 1")
    check(c.text_width % c.text_heads == 0, f"{prefix}.clip.text_heads", c.text_heads, "must divide text_width")
    blocks = tuple(c.feature_blocks)
    check(all(isinstance(i, int) and 0 <= i < cfg.depth for i in blocks), f"{prefix}.clip.feature_blocks", blocks,
          f"0-based block indices below depth={cfg.depth}")


def _implementation(cfg) -> str | None:
    return cfg.attention_implementation or None


def build_visual(cfg) -> ClipVisual:
    """The image tower (the 'clip_vit' backbone) of a model config."""
    return ClipVisual(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.dim, layers=cfg.depth,
                      heads=cfg.heads, mlp_dim=cfg.mlp_dim, embed_dim=cfg.clip.embed_dim, eps=cfg.layer_norm_eps,
                      activation=cfg.mlp_activation, feature_blocks=tuple(cfg.clip.feature_blocks),
                      dtype=jnp.dtype(cfg.dtype), implementation=_implementation(cfg), remat=cfg.remat)


def build_text(cfg) -> ClipText:
    """The text tower of a model config (its clip section)."""
    c = cfg.clip
    return ClipText(vocab_size=c.vocab_size, context_length=c.context_length, width=c.text_width,
                    layers=c.text_layers, heads=c.text_heads, embed_dim=c.embed_dim, eps=cfg.layer_norm_eps,
                    activation=cfg.mlp_activation, dtype=jnp.dtype(cfg.dtype), implementation=_implementation(cfg),
                    remat=cfg.remat)


def init_text(cfg, key: jax.Array, context: int | None = None) -> dict:
    """Text tower variables {'params': ...} of a model config."""
    ids = jnp.zeros((1, context or cfg.clip.context_length), jnp.int32)
    return build_text(cfg).init({"params": key}, ids)


# registered by `presets` (after its own families) as model kind KIND
FAMILY = registry.Family(build=build_visual, aux_keys=("tokens", "feature_maps", "class_tokens"), validate=validate,
                         sections={"clip": clip_config})
