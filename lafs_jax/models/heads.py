"""Heads: the DINO projection head (LAFS / DINO-face pretraining) and the InsightFace embedding head.

DINOHead (the official `lafs_train.py` / `vision_transformer.py`, DINO's head as LAFS uses it): Linear(D -> hidden), GELU,
[Linear(hidden -> hidden), GELU] x (num_layers - 2), Linear(-> bottleneck); L2 normalisation; a
weight-normalised Linear(bottleneck -> out_dim, no bias), W = g * v / ||v|| per output unit. With
`norm_last_layer` (the LAFS setting) g is fixed to 1 and is not a parameter. MLP layers are
initialised truncated-normal 0.02 with zero bias; v keeps torch's default nn.Linear init
(uniform +-1/sqrt(bottleneck)), because DINO creates the last layer after its re-initialisation pass.

The weight-normalised layer is written out (three lines) rather than wrapped with `nn.WeightNorm`:
that wrapper names its scale parameter with '/' inside one key ('layer_instance/kernel/scale'),
which breaks the 'a/b/c' parameter-path rules used for sharding, freezing and checkpoint mapping.

Parameter names: dense_{0..num_layers-1} (+ bn_{i} with use_bn), last_layer/{kernel [bottleneck, out],
scale [out] only without norm_last_layer}.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lafs_jax.models.initializers import torch_linear_init, trunc_normal_002
from lafs_jax.numerics import l2_normalize


class WeightNormDense(nn.Module):
    """y = x @ (g * v / ||v||_columns), no bias. x: [B, K] -> [B, features] float32.

    kernel v: [K, features] (column j = output unit j, the torch row weight_v[j]); scale g: [features],
    present only when `learn_scale` (otherwise g = 1).
    """

    features: int
    learn_scale: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.param("kernel", torch_linear_init, (x.shape[-1], self.features))
        w = v / jnp.sqrt(jnp.sum(jnp.square(v), axis=0, keepdims=True))
        if self.learn_scale:
            w = w * self.param("scale", nn.initializers.ones, (self.features,))
        y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32)
        return y.astype(jnp.float32)


class DINOHead(nn.Module):
    """x [B, D] -> logits [B, out_dim] float32 (before the temperature)."""

    out_dim: int = 100000
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    use_bn: bool = False
    norm_last_layer: bool = True
    gelu_approximate: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.num_layers < 1:
            raise ValueError(f"DINOHead: num_layers={self.num_layers} must be >= 1")
        widths = [self.hidden_dim] * (self.num_layers - 1) + [self.bottleneck_dim]
        for i, width in enumerate(widths):
            x = nn.Dense(width, kernel_init=trunc_normal_002, dtype=self.dtype, name=f"dense_{i}")(x)
            if i < len(widths) - 1:
                if self.use_bn:
                    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                                     name=f"bn_{i}")(x)
                x = nn.gelu(x, approximate=self.gelu_approximate)
        x = l2_normalize(x.astype(jnp.float32))
        return WeightNormDense(self.out_dim, learn_scale=not self.norm_last_layer, dtype=self.dtype,
                               name="last_layer")(x)


class EmbeddingHead(nn.Module):
    """InsightFace feature head: tokens [B, N, D] -> embedding [B, features] float32, not normalised.

    flatten -> Linear(N*D -> hidden, no bias) `fc1` -> BatchNorm `bn1` -> Linear(hidden -> features,
    no bias) `fc2` -> BatchNorm `bn2` (eps 2e-5 as InsightFace). hidden defaults to D.
    """

    features: int = 512
    hidden: int | None = None
    bn_eps: float = 2e-5
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:
        b = tokens.shape[0]
        hidden = self.hidden or tokens.shape[-1]
        x = tokens.reshape(b, -1)
        x = nn.Dense(hidden, use_bias=False, kernel_init=trunc_normal_002, dtype=self.dtype, name="fc1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
                         dtype=self.dtype, name="bn1")(x)
        x = nn.Dense(self.features, use_bias=False, kernel_init=trunc_normal_002, dtype=self.dtype, name="fc2")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
                         dtype=self.dtype, name="bn2")(x)
        return x.astype(jnp.float32)
