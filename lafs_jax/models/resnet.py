"""ResNet with torchvision's layout (He et al. 2016; torchvision.models.resnet), NHWC.

`ResNet(block, layers, width, bn_eps)` is called as `model.apply(variables, images [B, H, W, 3],
train=bool)` and returns `(embedding [B, C] float32, {'feature_map': [B, H/32, W/32, C]})`: the
global-average-pooled final map and the map itself (C = 8 width x expansion; 2048 for ResNet-50).

Layout as torchvision's: 7x7/2 stem conv, BN, ReLU, 3x3/2 max pool (padding 1), four stages of
BasicBlock (two 3x3 convs, expansion 1) or Bottleneck (1x1, 3x3, 1x1, expansion 4, the stride on the
3x3 conv, torchvision's "ResNet v1.5"), a 1x1 conv + BN shortcut where the shape changes, no bias in
any conv. Submodule names map 1:1 to torchvision's state-dict names with '.<digit>' joined by '_':
`layer1.0.downsample.1.running_mean` <-> batch_stats `layer1_0/downsample_1/mean` (`torch_path`);
conv weights [O, I, kh, kw] <-> kernels [kh, kw, I, O].

`BatchNorm` follows torch.nn.BatchNorm: normalise with the biased batch variance over every axis
but the last, update the running statistics with momentum 0.1 and the *unbiased* variance, epsilon
1e-5. Under jit with the batch sharded over the mesh the batch moments are global (GSPMD inserts the
reductions), i.e. SyncBatchNorm on any device count.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lafs_jax.config import check

BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}
# torchvision's depths: preset -> (block, layers per stage)
DEPTHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
          "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}


def torch_path(key: str) -> tuple[str, ...]:
    """A torch module path 'layer1.0.downsample.1' -> the Flax path ('layer1_0', 'downsample_1'):
    every numeric component is joined to the one before it with '_'."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm{1,2}d on the last axis: params scale / bias, batch_stats mean / var.

    train=True: normalise by the batch mean and biased variance over all leading axes (global under
    a sharded batch); running stats <- (1 - momentum) running + momentum batch (unbiased variance),
    written only when the 'batch_stats' collection is mutable. train=False: the running stats."""

    momentum: float = 0.1
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
                n = xf.size // c
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x.dtype)


def _conv(features: int, kernel: int, stride: int, name: str, dtype) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                   name=name)


class Block(nn.Module):
    """BasicBlock ('basic') or Bottleneck ('bottleneck') of torchvision; `planes` before expansion."""

    kind: str
    planes: int
    stride: int
    downsample: bool
    bn_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: BatchNorm(eps=self.bn_eps, name=name)  # noqa: E731
        if self.kind == "basic":
            y = nn.relu(bn("bn1")(_conv(self.planes, 3, self.stride, "conv1", self.dtype)(x), train))
            y = bn("bn2")(_conv(self.planes, 3, 1, "conv2", self.dtype)(y), train)
            out = self.planes
        else:
            y = nn.relu(bn("bn1")(_conv(self.planes, 1, 1, "conv1", self.dtype)(x), train))
            y = nn.relu(bn("bn2")(_conv(self.planes, 3, self.stride, "conv2", self.dtype)(y), train))
            out = self.planes * EXPANSION["bottleneck"]
            y = bn("bn3")(_conv(out, 1, 1, "conv3", self.dtype)(y), train)
        if self.downsample:
            x = bn("downsample_1")(_conv(out, 1, self.stride, "downsample_0", self.dtype)(x), train)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """torchvision ResNet without avgpool / fc (see the module docstring); `width` = stem channels (64)."""

    block: str = "bottleneck"
    layers: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    bn_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @property
    def features(self) -> int:
        """C, the channels of the final map (= the embedding size)."""
        return self.width * 8 * EXPANSION[self.block]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        """[B, H, W, 3] -> (pooled [B, C] float32, {'feature_map': [B, ceil(H/32), ceil(W/32), C]})."""
        x = _conv(self.width, 7, 2, "conv1", self.dtype)(x.astype(self.dtype))
        x = nn.relu(BatchNorm(eps=self.bn_eps, name="bn1")(x, train))
        # torchvision's MaxPool2d(3, 2, padding=1): pad with -inf, then a VALID window (the same numbers as
        # explicit padding, in the one form ONNX converters map to MaxPool)
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
        x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")
        inplanes = self.width
        for stage, blocks in enumerate(self.layers):
            planes = self.width * 2 ** stage
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                out = planes * EXPANSION[self.block]
                x = Block(self.block, planes, stride, downsample=i == 0 and (stride != 1 or inplanes != out),
                          bn_eps=self.bn_eps, dtype=self.dtype, name=f"layer{stage + 1}_{i}")(x, train)
                inplanes = out
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)), {"feature_map": x}


# -- the 'resnet' backbone family (registered by lafs_jax.models.presets) ------------------------------

PRESETS = ("resnet_tiny", *DEPTHS)  # model presets of this family
TINY = ("basic", (1, 1, 1, 1), 8)  # resnet_tiny: BasicBlocks, one per stage, stem width 8 (C = 64)


def section(preset: str = "resnet50") -> ml_collections.ConfigDict:
    """`config.model.resnet`: block type, blocks per stage, stem width, BatchNorm epsilon of `preset`
    (torchvision's depths; resnet_tiny for CPU tests; any other preset gets ResNet-50's)."""
    block, layers, width = TINY if preset == "resnet_tiny" else (*DEPTHS.get(preset, DEPTHS["resnet50"]), 64)
    c = ml_collections.ConfigDict()
    c.block = block  # 'basic' (BasicBlock, ResNet-18/34) | 'bottleneck' (Bottleneck, ResNet-50/101)
    c.layers = layers  # blocks in each of the four stages
    c.width = width  # stem channels; stage s has width * 2^s planes (x4 for bottleneck at the output)
    c.bn_eps = 1e-5  # BatchNorm epsilon (torch default)
    return c


def apply_preset(cfg: ml_collections.ConfigDict, preset: str) -> None:
    """Set the shared model fields of a ResNet preset in place: image_size 224 (64 for resnet_tiny), dim =
    the embedding size C (the ViT fields are unused by this family)."""
    s = section(preset)
    cfg.image_size = 64 if preset == "resnet_tiny" else 224
    cfg.dim = s.width * 8 * EXPANSION[s.block]


def validate(cfg, prefix: str = "model") -> None:
    """ConfigError naming `config.<prefix>.resnet.<key>` for a bad section, or dim != the ResNet's C."""
    s = cfg.resnet
    key = f"{prefix}.resnet"
    check(s.block in BLOCKS, f"{key}.block", s.block, f"one of {list(BLOCKS)}")
    check(isinstance(s.layers, (tuple, list)) and len(s.layers) == 4 and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in s.layers), f"{key}.layers", s.layers,
          "four ints >= 1")
    check(isinstance(s.width, int) and s.width >= 1, f"{key}.width", s.width, "an int >= 1")
    check(isinstance(s.bn_eps, float) and s.bn_eps > 0, f"{key}.bn_eps", s.bn_eps, "a positive float")
    c = s.width * 8 * EXPANSION[s.block]
    check(cfg.dim == c, f"{prefix}.dim", cfg.dim, f"the ResNet's embedding size {c} (8 x width x expansion)")


def build(cfg) -> ResNet:
    """The ResNet of a (validated) model config with kind 'resnet'."""
    s = cfg.resnet
    return ResNet(block=s.block, layers=tuple(s.layers), width=s.width, bn_eps=s.bn_eps, dtype=jnp.dtype(cfg.dtype))
