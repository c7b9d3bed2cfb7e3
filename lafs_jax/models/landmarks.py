"""Landmark CNN of Part fViT: a MobileNetV3-large trunk that predicts R landmark centres in pixels.

The official `MobileNetV3_backbone(mode='large')` (the official `face_pre_pro/mobilenet.py`): a 3x3/2 stem, then a table
of inverted-bottleneck blocks, no MobileNetV3 tail; average pool, dropout 0.5, Linear(C -> 2R), then a
per-sample min-max rescale of all 2R numbers jointly to [0, H - 1] (no sigmoid, no clamp, no detach:
gradients reach the trunk through the sampling positions). Index 2n is x_n (column), 2n + 1 is y_n.

Numerics kept from the official code:
  - inside a block: 1x1 expand (present even when expansion == input channels), BN, nonlinearity,
    depthwise kxk, BN, squeeze-excite *before* the nonlinearity, nonlinearity, 1x1 project, BN;
    residual when stride 1 and input channels == output channels;
  - symmetric explicit padding (k-1)//2: Flax 'SAME' pads stride-2 convolutions of even sizes
    asymmetrically, which would move every landmark;
  - BatchNorm eps 1e-5 and momentum 0.9 (PyTorch's momentum 0.1 counted the other way);
  - squeeze-excite = mean pool, Linear(c -> c/4, no bias), ReLU, Linear(c/4 -> c, no bias), hard sigmoid;
  - init: convolutions He-normal on fan-out, Linear N(0, 0.01), zero biases.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# (kernel, expansion channels, output channels, squeeze-excite, nonlinearity 'RE'|'HS', stride)
BlockSpec = tuple[int, int, int, bool, str, int]

MOBILENET_V3_LARGE: tuple[BlockSpec, ...] = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)

NONLINEARITIES = {"RE": nn.relu, "HS": jax.nn.hard_swish}

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torch kaiming_normal_(mode='fan_out')
linear_init = nn.initializers.normal(0.01)


def check_blocks(blocks: Sequence[Sequence[Any]], where: str = "blocks") -> None:
    """Raise ValueError naming `where[i]` for a malformed block table entry."""
    if len(blocks) == 0:
        raise ValueError(f"{where}: the landmark CNN needs at least one block")
    for i, spec in enumerate(blocks):
        ok = (len(spec) == 6 and int(spec[0]) % 2 == 1 and int(spec[1]) >= 1 and int(spec[2]) >= 1
              and isinstance(spec[3], bool) and spec[4] in NONLINEARITIES and int(spec[5]) in (1, 2))
        if not ok:
            raise ValueError(f"{where}[{i}]={tuple(spec)!r} is not valid: expected (odd kernel, expansion >= 1, "
                             f"output channels >= 1, squeeze-excite bool, 'RE' or 'HS', stride 1 or 2)")


def _padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    p = (kernel - 1) // 2
    return ((p, p), (p, p))


class SqueezeExcite(nn.Module):
    """Channel gating: x * hard_sigmoid(W2 relu(W1 mean_hw(x))). x: [B, H, W, C] -> same shape."""

    reduction: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        s = jnp.mean(x, axis=(1, 2))
        s = nn.Dense(channels // self.reduction, use_bias=False, kernel_init=linear_init, dtype=self.dtype,
                     name="reduce")(s)
        s = nn.relu(s)
        s = nn.Dense(channels, use_bias=False, kernel_init=linear_init, dtype=self.dtype, name="expand")(s)
        return x * jax.nn.hard_sigmoid(s)[:, None, None, :]


class Bottleneck(nn.Module):
    """MobileNetV3 inverted bottleneck. x: [B, H, W, Cin] -> [B, H/stride, W/stride, features]."""

    kernel: int
    expansion: int
    features: int
    squeeze_excite: bool
    nonlinearity: str
    stride: int
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    dtype: Any = jnp.float32
    depthwise_implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act = NONLINEARITIES[self.nonlinearity]

        def bn(name):
            return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
                                dtype=self.dtype, name=name)

        y = nn.Conv(self.expansion, (1, 1), use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                    name="expand_conv")(x)
        y = act(bn("expand_bn")(y))
        y = DepthwiseConv(self.kernel, self.stride, self.depthwise_implementation, self.dtype,
                          name="depthwise_conv")(y)
        y = bn("depthwise_bn")(y)
        if self.squeeze_excite:
            y = SqueezeExcite(dtype=self.dtype, name="se")(y)
        y = act(y)
        y = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                    name="project_conv")(y)
        y = bn("project_bn")(y)
        if self.stride == 1 and x.shape[-1] == self.features:
            y = x + y
        return y


def depthwise_conv_taps(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise convolution as k*k shifted multiply-adds. x [B,H,W,C], kernel [k,k,1,C] -> [B,H',W',C].

    Same result as lax.conv_general_dilated(..., feature_group_count=C); on XLA:CPU it is about 10x
    faster forward and 3-10x faster backward, because grouped convolutions there have no fast kernel.
    """
    k = kernel.shape[0]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h = (x.shape[1] + 2 * padding - k) // stride + 1
    out_w = (x.shape[2] + 2 * padding - k) // stride + 1
    kernel = kernel.astype(x.dtype)
    out = None
    for a in range(k):
        for b in range(k):
            tap = jax.lax.slice(xp, (0, a, b, 0), (xp.shape[0], a + (out_h - 1) * stride + 1,
                                                   b + (out_w - 1) * stride + 1, xp.shape[3]),
                                (1, stride, stride, 1))
            out = tap * kernel[a, b, 0] if out is None else out + tap * kernel[a, b, 0]
    return out


class DepthwiseConv(nn.Module):
    """Depthwise kxk convolution, no bias, symmetric padding (k-1)//2. [B,H,W,C] -> [B,H/s,W/s,C].

    Parameter `kernel` [k, k, 1, C] (the layout of nn.Conv with feature_group_count=C).
    implementation: 'taps' (shifted multiply-adds), 'xla' (grouped lax convolution; cuDNN on GPU) or
    'auto' ('taps' when the program is lowered for a CPU, else 'xla').
    """

    kernel_size: int
    stride: int = 1
    implementation: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param("kernel", conv_init, (self.kernel_size, self.kernel_size, 1, channels))
        x = x.astype(self.dtype)
        pad = (self.kernel_size - 1) // 2
        impl = self.implementation

        def taps(x, kernel):
            return depthwise_conv_taps(x, kernel, self.stride, pad)

        def grouped(x, kernel):
            return jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), (self.stride, self.stride),
                                                ((pad, pad), (pad, pad)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                feature_group_count=channels)

        if impl == "auto":
            # chosen by the platform the program is lowered for, not by this process's default
            # backend: an ahead-of-time compile for a TPU from a CPU host gets the TPU's choice
            return jax.lax.platform_dependent(x, kernel, cpu=taps, default=grouped)
        if impl == "taps":
            return taps(x, kernel)
        if impl == "xla":
            return grouped(x, kernel)
        raise ValueError(f"DepthwiseConv: implementation={impl!r} is not valid; choose 'auto', 'taps' or 'xla'")


def minmax_to_pixels(theta: jax.Array, image_size: int) -> jax.Array:
    """Per-sample min-max rescale of all numbers jointly to [0, image_size - 1].

    theta: [B, 2R] -> [B, R, 2] (x, y). No epsilon, as the official code: a constant row gives NaN.
    """
    t_min = jnp.min(theta, axis=1, keepdims=True)
    t_max = jnp.max(theta, axis=1, keepdims=True)
    scaled = (theta - t_min) / (t_max - t_min) * (image_size - 1)
    return scaled.reshape(theta.shape[0], -1, 2)


HEAD_INITS = ("default", "grid")


def grid_bias_init(key, shape, dtype=jnp.float32):
    """Bias [2R] of a landmark head that outputs a regular sqrt(R) x sqrt(R) grid, row-major, (x, y).

    After the min-max rescale the grid spans [0, H - 1] evenly: with a zero kernel, landmark
    n = r * g + c starts at (c, r) * (H - 1) / (g - 1), the patch layout of a grid-patch fViT.
    """
    del key
    (n,) = shape
    g = int(round((n // 2) ** 0.5))
    if n % 2 or g * g != n // 2 or g < 2:
        raise ValueError(f"LandmarkCNN: head_init='grid' needs a square number >= 4 of landmarks, got {n // 2}")
    rows, cols = np.divmod(np.arange(g * g), g)
    return jnp.asarray(np.stack([cols, rows], axis=1).reshape(-1), dtype)


class LandmarkCNN(nn.Module):
    """images [B, H, W, 3] (normalised) -> landmarks [B, R, 2] pixel (x, y) in [0, H - 1], float32.

    `blocks` is the bottleneck table (see MOBILENET_V3_LARGE for the format); the official model uses
    MOBILENET_V3_LARGE, small presets a shorter table. Submodules: `stem_conv`, `stem_bn`,
    `bottleneck_{1..len(blocks)}` (numbered like the official `features.{b}`), `landmark_head`.
    Dropout (rate `dropout`) draws from the 'dropout' rng stream when train=True; BatchNorm uses batch
    statistics and updates 'batch_stats' when train=True.
    """

    num_landmarks: int = 196
    blocks: Sequence[BlockSpec] = MOBILENET_V3_LARGE
    stem_features: int = 16
    dropout: float = 0.5
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    dtype: Any = jnp.float32
    depthwise_implementation: str = "auto"
    # 'default': the official init (kernel N(0, 0.01), zero bias; landmarks start scattered). 'grid': zero
    # kernel and a grid bias, so the model starts as a grid-patch fViT and learns to move the patches
    # (trains far faster from scratch on small data; see grid_bias_init).
    head_init: str = "default"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        if images.ndim != 4:
            raise ValueError(f"LandmarkCNN: images must be [B,H,W,C], got shape {images.shape}")
        check_blocks(self.blocks, "LandmarkCNN.blocks")
        x = nn.Conv(self.stem_features, (3, 3), strides=2, padding=_padding(3), use_bias=False,
                    kernel_init=conv_init, dtype=self.dtype, name="stem_conv")(images)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
                         dtype=self.dtype, name="stem_bn")(x)
        x = jax.nn.hard_swish(x)
        for b, (kernel, expansion, out, se, nl, stride) in enumerate(self.blocks, start=1):
            x = Bottleneck(int(kernel), int(expansion), int(out), bool(se), nl, int(stride), self.bn_momentum,
                           self.bn_eps, self.dtype, self.depthwise_implementation, name=f"bottleneck_{b}")(x, train)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"LandmarkCNN: head_init={self.head_init!r} is not valid; choose one of {HEAD_INITS}")
        grid = self.head_init == "grid"
        theta = nn.Dense(2 * self.num_landmarks, name="landmark_head",
                         kernel_init=nn.initializers.zeros if grid else linear_init,
                         bias_init=grid_bias_init if grid else nn.initializers.zeros)(pooled)
        return minmax_to_pixels(theta, images.shape[1])
