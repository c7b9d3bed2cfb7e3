"""FRA's networks on top of the ResNet: the object neck (official `ObjectNeck`, mask_type 'attn'), the
encoder (backbone + neck, official `EncoderObj`) and the predictors (`MLP1D`).

Shapes: B images, feature map F [B, h, w, C] (C = 2048 for ResNet-50; P = h w pixels, row-major as
torch's flatten), d = out_dim (256), Q = num_proto (8), H = hidden_dim (4096).

Names map 1:1 to the official state dict (torch path with '.<digit>' joined by '_', `resnet.torch_path`):
`MLP1D` = mlp_0 (conv1x1 = Dense, no bias) -> mlp_1 (BatchNorm over every pixel / region of the batch)
-> ReLU -> mlp_3; `proj_attn` = MaskFormer's TransformerPredictor without classes: input_proj (1x1
conv with bias), query_embed, transformer/decoder/layers_i/{self_attn, multihead_attn (torch
MultiheadAttention: in_proj_weight [3d, d] in torch layout, in_proj_bias, out_proj), linear1, linear2,
norm1..3}, transformer/decoder/norm, mask_embed/layers_{0,1,2}. The `proto` buffer [Q, d] lives in the
'batch_stats' collection (it is a running average updated by every training forward, like BatchNorm's).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lafs_jax.models.resnet import BatchNorm, ResNet
from lafs_jax.numerics import l2_normalize  # F.normalize (norm floor 1e-12), finite gradient at a zero row

EPS = 1e-7  # added to the heatmaps (official self.eps)


def sine_position(h: int, w: int, num_feats: int, temperature: float = 10000.0) -> np.ndarray:
    """DETR's normalised 2-D sine position encoding (MaskFormer PositionEmbeddingSine, normalize=True,
    scale 2 pi) of an h x w map: [h w, 2 num_feats], y features then x features, each sin/cos interleaved."""
    scale, eps = 2 * np.pi, 1e-6
    y = np.broadcast_to(np.arange(1, h + 1, dtype=np.float32)[:, None], (h, w))
    x = np.broadcast_to(np.arange(1, w + 1, dtype=np.float32)[None, :], (h, w))
    y = y / (np.float32(h) + eps) * np.float32(scale)
    x = x / (np.float32(w) + eps) * np.float32(scale)
    dim_t = np.float32(temperature) ** (2 * (np.arange(num_feats, dtype=np.float32) // 2) / np.float32(num_feats))

    def enc(v):
        p = v[..., None] / dim_t
        return np.stack((np.sin(p[..., 0::2]), np.cos(p[..., 1::2])), axis=-1).reshape(h, w, num_feats)

    return np.concatenate([enc(y), enc(x)], axis=-1).reshape(h * w, 2 * num_feats).astype(np.float32)


class MLP1D(nn.Module):
    """conv1x1 (no bias) -> BatchNorm -> ReLU -> conv1x1 (no bias) over the last axis of [B, L, C]."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # official init_weights('kaiming')
        x = nn.Dense(self.hidden, use_bias=False, kernel_init=init, name="mlp_0")(x)
        x = nn.relu(BatchNorm(name="mlp_1")(x, train))
        return nn.Dense(self.out, use_bias=False, kernel_init=init, name="mlp_3")(x)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention on batch-major [B, L, d]: packed in-projection (torch layout), scaled
    dot product per head, dropout on the attention weights, out_proj."""

    dim: int
    heads: int
    dropout: float

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, train: bool) -> jax.Array:
        d, h = self.dim, self.heads
        w = self.param("in_proj_weight", nn.initializers.xavier_uniform(), (3 * d, d), jnp.float32)
        b = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,), jnp.float32)
        split = lambda x: x.reshape(*x.shape[:2], h, d // h)  # noqa: E731
        qh = split(q @ w[:d].T + b[:d]) * (d // h) ** -0.5
        kh = split(k @ w[d:2 * d].T + b[d:2 * d])
        vh = split(v @ w[2 * d:].T + b[2 * d:])
        attn = jax.nn.softmax(jnp.einsum("bqhc,bkhc->bhqk", qh, kh), axis=-1)
        attn = nn.Dropout(self.dropout, deterministic=not train)(attn)
        out = jnp.einsum("bhqk,bkhc->bqhc", attn, vh).reshape(*q.shape[:2], d)
        return nn.Dense(d, name="out_proj")(out)


class DecoderLayer(nn.Module):
    """DETR's post-norm decoder layer: self-attention (queries + query_pos), cross-attention to memory +
    pos, ReLU FFN; dropout after each, LayerNorm after each residual."""

    dim: int
    heads: int
    ffn: int
    dropout: float

    @nn.compact
    def __call__(self, tgt, memory, pos, query_pos, train: bool):
        drop = lambda x: nn.Dropout(self.dropout, deterministic=not train)(x)  # noqa: E731
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, name=name)  # noqa: E731
        q = tgt + query_pos
        tgt = ln("norm1")(tgt + drop(MultiheadAttention(self.dim, self.heads, self.dropout, name="self_attn")(
            q, q, tgt, train)))
        t2 = MultiheadAttention(self.dim, self.heads, self.dropout, name="multihead_attn")(
            tgt + query_pos, memory + pos, memory, train)
        tgt = ln("norm2")(tgt + drop(t2))
        t2 = nn.Dense(self.dim, name="linear2")(drop(nn.relu(nn.Dense(self.ffn, name="linear1")(tgt))))
        return ln("norm3")(tgt + drop(t2))


class Decoder(nn.Module):
    dim: int
    heads: int
    ffn: int
    dropout: float
    layers: int

    @nn.compact
    def __call__(self, tgt, memory, pos, query_pos, train: bool):
        for i in range(self.layers):
            tgt = DecoderLayer(self.dim, self.heads, self.ffn, self.dropout, name=f"layers_{i}")(
                tgt, memory, pos, query_pos, train)
        return nn.LayerNorm(epsilon=1e-5, name="norm")(tgt)


class Transformer(nn.Module):
    """The decoder under MaskFormer's `transformer` name (no encoder layers: memory = the input)."""

    dim: int
    heads: int
    ffn: int
    dropout: float
    layers: int

    @nn.compact
    def __call__(self, tgt, memory, pos, query_pos, train: bool):
        return Decoder(self.dim, self.heads, self.ffn, self.dropout, self.layers, name="decoder")(
            tgt, memory, pos, query_pos, train)


class QueryEmbed(nn.Module):
    num: int
    dim: int

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("embedding", nn.initializers.normal(1.0), (self.num, self.dim), jnp.float32)


class MaskPredictor(nn.Module):
    """Mask embeddings E [B, Q, d] of a feature map [B, h, w, C] (MaskFormer TransformerPredictor,
    mask_classification off): the decoder over memory input_proj(F) + sine position, target zeros, Q
    learned queries, then a 3-layer ReLU MLP."""

    dim: int
    queries: int
    heads: int
    ffn: int
    dropout: float
    layers: int

    @nn.compact
    def __call__(self, fmap: jax.Array, train: bool) -> jax.Array:
        b, h, w, c = fmap.shape
        memory = nn.Dense(self.dim, kernel_init=nn.initializers.xavier_uniform(), name="input_proj")(
            fmap.reshape(b, h * w, c))
        pos = jnp.asarray(sine_position(h, w, self.dim // 2))[None]
        query = jnp.broadcast_to(QueryEmbed(self.queries, self.dim, name="query_embed")()[None],
                                 (b, self.queries, self.dim))
        hs = Transformer(self.dim, self.heads, self.ffn, self.dropout, self.layers, name="transformer")(
            jnp.zeros_like(query), memory, pos, query, train)
        return MaskEmbedMLP(self.dim, name="mask_embed")(hs)


class MaskEmbedMLP(nn.Module):
    """MaskFormer's 3-layer MLP (Linear, ReLU, Linear, ReLU, Linear) of the mask embeddings."""

    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(3):
            x = nn.Dense(self.dim, name=f"layers_{i}")(x)
            x = nn.relu(x) if i < 2 else x
        return x


class Neck(nn.Module):
    """The official ObjectNeck ('attn' masks). Called on F [B, h, w, C] it returns
    {'z_g': [B, d] global projection, 'z_r': [B, Q, d] region projections, 'dots': [B, Q, P] cosines of
    the mask embeddings and the pixel projections, 'heatmap': [B, Q, P] softmax_q(dots / scale) + 1e-7}.

    Training: the mask embeddings of the batch are averaged (the global batch under a sharded jit) and
    the 'proto' buffer moves towards that mean (when 'batch_stats' is mutable); evaluation uses proto.
    Slots are heatmap-weighted means of the raw C-d features."""

    hidden: int
    out: int
    queries: int
    heads: int = 8
    decoder_layers: int = 2
    dropout: float = 0.1
    scale: float = 1.0
    proto_momentum: float = 0.9

    @nn.compact
    def __call__(self, fmap: jax.Array, train: bool) -> dict:
        b, h, w, c = fmap.shape
        x = fmap.astype(jnp.float32).reshape(b, h * w, c)
        z_g = MLP1D(self.hidden, self.out, name="proj")(jnp.mean(x, axis=1, keepdims=True), train)[:, 0]
        u = MLP1D(self.hidden, self.out, name="proj_pixel")(x, train)  # [B, P, d]
        e = MaskPredictor(self.out, self.queries, self.heads, self.out, self.dropout, self.decoder_layers,
                          name="proj_attn")(fmap, train)  # [B, Q, d]
        proto = self.variable("batch_stats", "proto",
                              lambda: jax.random.normal(self.make_rng("params"), (self.queries, self.out)))
        if train:
            ebar = jnp.mean(e, axis=0)
            if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
                m = self.proto_momentum
                proto.value = proto.value * m + jax.lax.stop_gradient(ebar) * (1 - m)
        else:
            ebar = proto.value
        dots = jnp.einsum("qc,bpc->bqp", l2_normalize(ebar), l2_normalize(u))
        heat = jax.nn.softmax(dots / self.scale, axis=1) + EPS
        slots = jnp.einsum("bpc,bqp->bqc", x, heat / jnp.sum(heat, axis=2, keepdims=True))
        z_r = MLP1D(self.hidden, self.out, name="proj_obj")(slots, train)
        return {"z_g": z_g, "z_r": z_r, "dots": dots, "heatmap": heat}


class Encoder(nn.Module):
    """The official EncoderObj: `backbone` (a ResNet) then `neck`; returns the neck's dict plus
    'pooled' [B, C] (the backbone's embedding)."""

    backbone: ResNet
    neck: Neck

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> dict:
        pooled, aux = self.backbone(images, train=train)
        return {"pooled": pooled, **self.neck(aux["feature_map"], train)}


class ProjectedBackbone(nn.Module):
    """The backbone followed by the global projection `proj` (eval mode: running statistics): what the
    official pretraining monitors (LFW pairs on z_g). Returns (z_g [B, d] float32, {'pooled': [B, C]})."""

    backbone: ResNet
    proj: MLP1D

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        pooled, _ = self.backbone(images, train=train)
        return self.proj(pooled[:, None], train)[:, 0].astype(jnp.float32), {"pooled": pooled}
