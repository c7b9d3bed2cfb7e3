"""Model sizes as ml_collections presets, and the builders that turn a model config into Linen modules.

Recipes embed `model_config(preset)` as `config.model` and may override any field; the builders read
only these fields. `validate_model_config` raises lafs_jax.config.ConfigError naming `config.model.<key>`.
`config.model.kind` names a backbone family of `registry`; this module registers the five below
(part_fvit, fvit, part_fvit_grid, insightface_vit, resnet) and `clip_vit` (models/clip.py, presets clip_b16 |
clip_l14 | clip_h14 | clip_tiny) and `build_model` builds whichever kind is registered.
Every backbone returns `(embedding, aux dict)` (see `registry`).

A model config holds the shared fields plus the sections of its owners only: a family's sections come
with its registration (`registry.Family.sections`: part_fvit -> `landmark` (the landmark CNN),
insightface_vit -> `insightface`; fvit and part_fvit_grid read none), so `model_config(preset)` carries
the preset's family's; `dino_head` (the DINO projection head) belongs to the DINO objective, whose
pretraining recipes add `dino_head_config(preset)` (via `lafs_jax.methods.dino.config.head_config`).
A section present but unused (e.g. `landmark` after `--config.model.kind=fvit`) is allowed; a missing
one the family reads is a ConfigError (`add_family_sections` adds it in a recipe).

Presets:
  tiny          CPU tests and the demo on 112x112 faces: 49 landmarks, 4-block landmark trunk,
                ViT dim 96 / depth 2 / 3 heads x 32 (231,226 parameters).
  small         ViT-S-like Part fViT: full MobileNetV3 trunk, 196 landmarks, dim 384, depth 12, 6 x 64.
  base          the official Part fViT: 196 landmarks, dim 768, depth 12, 11 heads x 64, MLP 2048,
                patch 8; 66,955,616 parameters without a classifier (ViT 64,082,688, trunk 2,809,816).
  insightface_t / insightface_s / insightface_b / insightface_l
                InsightFace ViT-T/S/B/L as LVFace uses them (D 256/512/512/768, depth 12/12/24/24, 8 heads,
                patch 9 -> 144 tokens, no class token, ReLU6, linear drop path 0.1, mask 0.1).
  LVFace's released config names (`LVFACE_NAMES`; ../shared/reference/other_seeds.md §3.2, LVFace
  `backbones/__init__.py get_model`): vit_t, vit_t_dp005_mask0, vit_s, vit_s_dp005_mask_0, vit_b,
  vit_b_dp005_mask_005 (the README's LVFace-B), vit_l_dp005_mask_005: the size's preset with that
  name's drop_path_rate / insightface.mask_ratio.
  resnet18 / resnet34 / resnet50 / resnet101 / resnet_tiny
                torchvision ResNets (`models/resnet.py`, section `resnet`; 224 px, dim = the pooled feature
                size 512 / 512 / 2048 / 2048); resnet_tiny: one BasicBlock per stage, stem 8, 64 px, dim 64.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lafs_jax.config import ConfigError, check
from lafs_jax.models import clip, registry
from lafs_jax.models import resnet as resnet_lib
from lafs_jax.models.heads import DINOHead
from lafs_jax.models.landmarks import HEAD_INITS, MOBILENET_V3_LARGE, LandmarkCNN, check_blocks
from lafs_jax.models.part_fvit import PartFViT, StandardGridFViT
from lafs_jax.models.vit import (ACTIVATIONS, ATTENTION_SCALES, DROP_PATH_SCHEDULES, FViT, InsightFaceViT,
                                 TokenViT)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PRECISIONS = ("auto", "float32", "bfloat16")  # config.precision of the training tasks (`with_precision`)
# InsightFace ViT sizes: (dim, depth); 8 heads, MLP 4 x dim (other_seeds.md §3.2 table)
INSIGHTFACE_SIZES = {"insightface_t": (256, 12), "insightface_s": (512, 12), "insightface_b": (512, 24),
                     "insightface_l": (768, 24)}
# LVFace's released config names -> (size preset, drop_path_rate, mask_ratio) (other_seeds.md §3.2:
# mask 0.1 in vit_t/s/b, 0.05 in the *_mask_005 names, 0 in *_mask0 / *_mask_0; drop path 0.1 by
# default, 0.05 in the dp005 names)
LVFACE_NAMES = {
    "vit_t": ("insightface_t", 0.1, 0.1),
    "vit_t_dp005_mask0": ("insightface_t", 0.05, 0.0),
    "vit_s": ("insightface_s", 0.1, 0.1),
    "vit_s_dp005_mask_0": ("insightface_s", 0.05, 0.0),
    "vit_b": ("insightface_b", 0.1, 0.1),
    "vit_b_dp005_mask_005": ("insightface_b", 0.05, 0.05),
    "vit_l_dp005_mask_005": ("insightface_l", 0.05, 0.05),
}
PRESETS = ("tiny", "small", "base", *INSIGHTFACE_SIZES, *LVFACE_NAMES, *resnet_lib.PRESETS, *clip.PRESETS)

# A 4-block trunk for 112x112 inputs: 56 -> 28 -> 14 -> 7 -> 4, like the large trunk's resolution path.
TINY_LANDMARK_BLOCKS = (
    (3, 16, 16, False, "RE", 2),
    (3, 48, 24, False, "RE", 2),
    (5, 72, 40, True, "HS", 2),
    (5, 96, 48, True, "HS", 2),
)


def _base() -> ml_collections.ConfigDict:
    """The fields every model config shares (no sections), at the base preset's values."""
    c = ml_collections.ConfigDict()
    c.preset = "base"  # the preset these values started from (informational)
    # a family of `registry.names()`: 'part_fvit' (landmark patches) | 'fvit' (grid patches) |
    # 'insightface_vit' (LVFace) | 'part_fvit_grid' (the official use_standcoord ablation: Part fViT's
    # bilinear sampler at a fixed standard grid, no landmark CNN, grid_noise_std / grid_shuffle in
    # training, plain-fViT token layout)
    c.kind = "part_fvit"
    c.image_size = 112  # input side in pixels (square images)
    c.channels = 3  # input channels
    c.patch_size = 8  # P: patch side in pixels; tokens are P*P*channels long
    c.num_landmarks = 196  # R: landmarks = tokens of Part fViT (fViT uses (image_size // patch_size)**2)
    c.dim = 768  # transformer width D (= the embedding size of Part fViT / fViT)
    c.depth = 12  # transformer blocks
    c.heads = 11  # attention heads
    c.head_dim = 64  # width per head; heads * head_dim may differ from dim (official 704 vs 768)
    c.mlp_dim = 2048  # hidden width of the transformer MLP
    c.attention_scale = "dim"  # 'dim': dim**-0.5 (official fViT) | 'head_dim': head_dim**-0.5
    c.mlp_activation = "gelu"  # 'gelu' exact erf (official) | 'gelu_tanh' | 'relu6' (InsightFace)
    c.layer_norm_eps = 1e-5  # LayerNorm epsilon (torch default)
    c.drop_path_rate = 0.1  # stochastic depth rate per residual branch
    c.drop_path_schedule = "constant"  # 'constant' (official: every block the same) | 'linear' (0 -> rate)
    c.dropout = 0.1  # dropout after attention output and in the MLP
    c.emb_dropout = 0.1  # dropout after adding the position embeddings
    c.qkv_bias = False  # bias in the packed q|k|v projection
    c.pool = "cls"  # 'cls' class token (official) | 'mean' over all tokens
    # std of the normal init of cls_token and pos_embedding: 1.0 = torch.randn (official fViT); 0.02
    # (DeiT / timm) lets a small model trained from scratch on little data learn much faster
    c.token_init_std = 1.0
    c.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' | 'float16'; parameters stay float32
    c.attention_implementation = ""  # '' or 'xla' (portable) | 'cudnn' (GPU fused attention)
    # nn.remat per transformer block: activations inside a block are recomputed in the backward pass
    # instead of stored (LVFace trains B and L with gradient checkpointing); same numbers, less memory
    c.remat = False
    c.grid_noise_std = 3.0  # part_fvit_grid: N(0, s^2) px noise on the grid centres in training (official 3)
    c.grid_shuffle = False  # part_fvit_grid: resample the centres with replacement in training (official shuffle)
    return c


# Config sections of `config.model`: each belongs to its owner. A family's sections are registered with it
# (`registry.Family.sections`: part_fvit -> 'landmark', insightface_vit -> 'insightface'); 'dino_head'
# belongs to the DINO objective (methods/dino adds it to the pretraining recipes, lafs_jax.convert to a
# lafs_ssl conversion). Each builder takes the preset name and returns that section's defaults.
def landmark_config(preset: str = "base") -> ml_collections.ConfigDict:
    """`config.model.landmark`: Part fViT's landmark CNN (MobileNetV3 trunk; the tiny preset's 4 blocks)."""
    c = ml_collections.ConfigDict()
    # bottleneck table: (kernel, expansion, out channels, squeeze-excite, 'RE'|'HS', stride) per block
    c.blocks = TINY_LANDMARK_BLOCKS if preset == "tiny" else MOBILENET_V3_LARGE
    c.stem_features = 16  # channels of the 3x3/2 stem convolution
    c.dropout = 0.5  # dropout before the landmark Linear
    c.bn_momentum = 0.9  # BatchNorm running-average momentum (torch momentum 0.1)
    c.bn_eps = 1e-5  # BatchNorm epsilon
    # init of the landmark Linear: 'default' (official, scattered landmarks) | 'grid' (zero kernel, grid
    # bias: starts as grid patches; for training from scratch on small data)
    c.head_init = "default"
    return c


def insightface_config(preset: str = "base") -> ml_collections.ConfigDict:
    """`config.model.insightface`: InsightFace ViT's token mask and feature head (an LVFace name's mask)."""
    c = ml_collections.ConfigDict()
    c.mask_ratio = LVFACE_NAMES[preset][2] if preset in LVFACE_NAMES else 0.1  # tokens dropped in training
    c.embedding_size = 512  # output of the feature head
    c.bn_eps = 2e-5  # BatchNorm epsilon of the feature head
    return c


def dino_head_config(preset: str = "base") -> ml_collections.ConfigDict:
    """`config.model.dino_head`: the DINO projection head of pretraining with the DINO objective
    (`lafs_jax.methods.dino.config.head_config`) and of `lafs_jax.convert --kind lafs_ssl`."""
    c = ml_collections.ConfigDict()
    # prototypes K (LAFS 100000; DINO 65536 (small); 1024 (tiny))
    c.out_dim = {"tiny": 1024, "small": 65536}.get(preset, 100000)
    c.hidden_dim = 256 if preset == "tiny" else 2048  # MLP hidden width
    # width before L2 normalisation and the weight-normalised layer
    c.bottleneck_dim = 64 if preset == "tiny" else 256
    c.num_layers = 3  # Linear layers before normalisation
    c.use_bn = False  # BatchNorm after hidden Linear layers
    c.norm_last_layer = True  # weight-norm scale g fixed to 1 (not trained)
    return c


# Sections a training objective adds to `config.model` (not owned by a family).
OBJECTIVE_SECTIONS: Mapping[str, Callable[[str], ml_collections.ConfigDict]] = {"dino_head": dino_head_config}


def _preset_kind(preset: str) -> str:
    if preset in resnet_lib.PRESETS:
        return "resnet"
    if preset in clip.PRESETS:
        return clip.KIND
    size = LVFACE_NAMES[preset][0] if preset in LVFACE_NAMES else preset
    return "insightface_vit" if size in INSIGHTFACE_SIZES else "part_fvit"


def family_sections(kind: str, preset: str = "base") -> dict[str, ml_collections.ConfigDict]:
    """{name: defaults for `preset`} of the config sections family `kind` reads (`registry.Family.sections`)."""
    return {name: build(preset) for name, build in registry.get(kind).sections.items()}


def add_family_sections(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add to model config `cfg` (in place; returned) the sections of its family `cfg.kind` that it lacks,
    at the defaults of `cfg.preset`: for a recipe that switches `kind` to a family its preset does not
    build (e.g. a tiny config made an insightface_vit)."""
    for name, section in family_sections(cfg.kind, cfg.get("preset", "base")).items():
        if name not in cfg:
            cfg[name] = section
    return cfg


def known_sections() -> dict[str, Callable[[str], ml_collections.ConfigDict]]:
    """{name: defaults builder} of every config section a model config may carry: the registered
    families' and `OBJECTIVE_SECTIONS`."""
    out = {}
    for kind in registry.names():
        out.update(registry.get(kind).sections)
    out.update(OBJECTIVE_SECTIONS)
    return out


def model_config(preset: str = "base") -> ml_collections.ConfigDict:
    """The model ConfigDict of a preset (see the module docstring), unlocked so recipes can override:
    the shared fields and the config sections of the preset's family only (`family_sections`)."""
    if preset not in PRESETS:
        raise ConfigError(f"model preset {preset!r} is not valid; choose one of {list(PRESETS)}")
    c = _base()
    c.preset = preset
    c.kind = _preset_kind(preset)
    size = preset
    if preset in LVFACE_NAMES:
        size, c.drop_path_rate, _ = LVFACE_NAMES[preset]
    if preset in clip.PRESETS:  # CLIP towers (models/clip.py)
        clip.apply_preset(c, preset)
    elif preset == "tiny":
        c.num_landmarks = 49
        c.dim, c.depth, c.heads, c.head_dim, c.mlp_dim = 96, 2, 3, 32, 256
    elif preset == "small":
        c.dim, c.depth, c.heads, c.head_dim, c.mlp_dim = 384, 12, 6, 64, 1536
    elif size in INSIGHTFACE_SIZES:
        c.patch_size = 9
        c.dim, c.depth = INSIGHTFACE_SIZES[size]
        c.heads = 8
        c.head_dim = c.dim // c.heads
        c.mlp_dim = 4 * c.dim
        c.attention_scale = "head_dim"
        c.mlp_activation = "relu6"
        c.drop_path_schedule = "linear"
        c.dropout = 0.0
        c.emb_dropout = 0.0
    elif preset in resnet_lib.PRESETS:
        resnet_lib.apply_preset(c, preset)
    return add_family_sections(c)


def validate_model_config(cfg: Any, prefix: str = "model") -> None:
    """Raise ConfigError naming `config.<prefix>.<key>` for a missing key or a bad value. The sections of
    the family `cfg.kind` (`registry.Family.sections`) must be present; any other known section present
    (e.g. 'landmark' after switching a Part fViT preset to kind 'fvit', or the DINO objective's
    'dino_head') is allowed and checked too."""

    def key(name):
        return f"{prefix}.{name}"

    def get(name):
        node = cfg
        for i, part in enumerate(name.split(".")):
            if part not in node:
                raise ConfigError(f"config.{key('.'.join(name.split('.')[:i + 1]))} is missing")
            node = node[part]
        return node

    def choice(name, choices):
        check(get(name) in choices, key(name), get(name), f"choose one of {sorted(choices)}")

    check(get("kind") in registry.names(), key("kind"), get("kind"),
          f"choose one of the registered model families {list(registry.names())}")
    kind = get("kind")
    for name in registry.get(kind).sections:
        if name not in cfg:
            presets_of_kind = [p for p in PRESETS if _preset_kind(p) == kind]
            where = (f"start from a preset of that family ({', '.join(presets_of_kind)})" if presets_of_kind
                     else "no preset builds that family")
            raise ConfigError(f"config.{key(name)} is missing: {prefix}.kind={kind!r} reads the {name!r} section; "
                              f"{where}, or add its defaults in the recipe with "
                              f"lafs_jax.models.presets.add_family_sections(config.{prefix})")
    present = {name for name in known_sections() if name in cfg}
    ints = ["image_size", "channels", "patch_size", "num_landmarks", "dim", "depth", "heads", "head_dim", "mlp_dim"]
    units = ["drop_path_rate", "dropout", "emb_dropout"]
    positives = ["layer_norm_eps", "token_init_std"]
    bools = ["qkv_bias", "remat"]
    if "landmark" in present:
        ints.append("landmark.stem_features")
        units += ["landmark.dropout", "landmark.bn_momentum"]
        positives.append("landmark.bn_eps")
    if "insightface" in present:
        ints.append("insightface.embedding_size")
        units.append("insightface.mask_ratio")
        positives.append("insightface.bn_eps")
    if "dino_head" in present:
        ints += ["dino_head.out_dim", "dino_head.hidden_dim", "dino_head.bottleneck_dim", "dino_head.num_layers"]
        bools += ["dino_head.use_bn", "dino_head.norm_last_layer"]
    for name in ints:
        v = get(name)
        check(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1, key(name), v, "an int >= 1")
    for name in units:
        v = get(name)
        check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0, key(name), v,
              "a number in [0, 1)")
    for name in positives:
        v = get(name)
        check(isinstance(v, (int, float)) and v > 0, key(name), v, "a positive number")
    for name in bools:
        check(isinstance(get(name), bool), key(name), get(name), "True or False")
    choice("attention_scale", ATTENTION_SCALES)
    choice("mlp_activation", ACTIVATIONS)
    choice("drop_path_schedule", DROP_PATH_SCHEDULES)
    choice("pool", ("cls", "mean"))
    choice("dtype", DTYPES)
    choice("attention_implementation", ("", "xla", "cudnn"))
    if "landmark" in present:
        choice("landmark.head_init", HEAD_INITS)
        if get("landmark.head_init") == "grid":
            r = get("num_landmarks")
            check(int(round(r ** 0.5)) ** 2 == r and r >= 4, key("num_landmarks"), r,
                  "a square number >= 4 with landmark.head_init='grid'")
        try:
            check_blocks(get("landmark.blocks"), f"config.{key('landmark.blocks')}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    check(isinstance(get("grid_noise_std"), (int, float)) and get("grid_noise_std") >= 0, key("grid_noise_std"),
          get("grid_noise_std"), "a number >= 0 (pixels)")
    check(isinstance(get("grid_shuffle"), bool), key("grid_shuffle"), get("grid_shuffle"), "True or False")
    family = registry.get(kind)
    if family.validate is not None:
        family.validate(cfg, prefix)


def _check_grid_patches(cfg, prefix: str) -> None:
    """fvit / part_fvit_grid: the image splits into whole grid patches."""
    check(cfg.image_size % cfg.patch_size == 0, f"{prefix}.patch_size", cfg.patch_size,
          f"{cfg.kind} needs image_size={cfg.image_size} to be a multiple of patch_size")


def _check_insightface(cfg, prefix: str) -> None:
    check(cfg.heads * cfg.head_dim == cfg.dim, f"{prefix}.head_dim", cfg.head_dim,
          f"insightface_vit needs heads * head_dim == dim={cfg.dim}")
    check(cfg.patch_size <= cfg.image_size, f"{prefix}.patch_size", cfg.patch_size, "must not exceed image_size")


def with_precision(cfg: ml_collections.ConfigDict, precision: str) -> ml_collections.ConfigDict:
    """A copy of model config `cfg` with `dtype` set by a training task's `config.precision`: 'auto' is
    bfloat16 on GPU / TPU and float32 on CPU; 'float32' / 'bfloat16' as named. Parameters stay float32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"config.precision={precision!r} is not valid; choose one of {list(PRECISIONS)}")
    model = ml_collections.ConfigDict(cfg.to_dict())
    if precision == "auto":
        precision = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    model.dtype = precision
    return model


def compute_dtype(cfg) -> Any:
    """The jnp dtype named by cfg.dtype."""
    return DTYPES[cfg.dtype]


def _attention_impl(cfg) -> str | None:
    return cfg.attention_implementation or None


def build_landmark_cnn(cfg) -> LandmarkCNN:
    """LandmarkCNN of a model config (its `landmark` section, num_landmarks, dtype)."""
    validate_model_config(cfg)
    lm = cfg.landmark
    return LandmarkCNN(num_landmarks=cfg.num_landmarks, blocks=tuple(tuple(b) for b in lm.blocks),
                       stem_features=lm.stem_features, dropout=lm.dropout, bn_momentum=lm.bn_momentum,
                       bn_eps=lm.bn_eps, dtype=compute_dtype(cfg), head_init=lm.head_init)


# Layout of the patch vectors a model's patch embedding reads: 'landmarks' = (x-offset, y-offset,
# channel), Part fViT's sampler (`extract_patches_pytorch_gridsample` in the official `ViT_face.py`); 'grid' = (row, col, channel), plain fViT.
PATCH_ORDERS = ("landmarks", "grid")


class _KindPatchOrder(Mapping):
    """{kind: patch order} of the registered families that have one, read from the registry on each access."""

    def _orders(self) -> dict[str, str]:
        return {n: f.patch_order for n in registry.names() if (f := registry.get(n)).patch_order is not None}

    def __getitem__(self, kind: str) -> str:
        return self._orders()[kind]

    def __iter__(self):
        return iter(self._orders())

    def __len__(self) -> int:
        return len(self._orders())


KIND_PATCH_ORDER: Mapping[str, str] = _KindPatchOrder()


def patch_order(cfg) -> str | None:
    """The registered family's patch order: 'landmarks' (part_fvit), 'grid' (fvit, part_fvit_grid), or
    None (insightface_vit: its own patch embedding)."""
    return registry.get(cfg.kind).patch_order


def grid_tokens(cfg) -> int:
    """Number of grid patches of an image_size image: (image_size // patch_size)**2."""
    return (cfg.image_size // cfg.patch_size) ** 2


def build_token_vit(cfg, num_positions: int | None = None) -> TokenViT:
    """TokenViT of a model config. Position rows: num_positions, else the grid patch count for a family
    with 'grid' patches (fvit, part_fvit_grid), num_landmarks otherwise (part_fvit)."""
    validate_model_config(cfg)
    if num_positions is None:
        num_positions = grid_tokens(cfg) if patch_order(cfg) == "grid" else cfg.num_landmarks
    return TokenViT(num_positions=num_positions, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                    head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim, attention_scale=cfg.attention_scale,
                    mlp_activation=cfg.mlp_activation, layer_norm_eps=cfg.layer_norm_eps,
                    drop_path_rate=cfg.drop_path_rate, drop_path_schedule=cfg.drop_path_schedule,
                    dropout=cfg.dropout, emb_dropout=cfg.emb_dropout, qkv_bias=cfg.qkv_bias, pool=cfg.pool,
                    token_init_std=cfg.token_init_std,
                    dtype=compute_dtype(cfg), attention_implementation=_attention_impl(cfg), remat=cfg.remat)


def build_dino_head(cfg) -> DINOHead:
    """DINOHead of a model config (its `dino_head` section, which the DINO objective's recipes add)."""
    if "dino_head" not in cfg:
        raise ConfigError("config.model.dino_head is missing: the DINO head's section belongs to the DINO "
                          "objective; add it with config.model.dino_head = "
                          "lafs_jax.methods.dino.config.head_config(config.model.preset)")
    validate_model_config(cfg)
    h = cfg.dino_head
    return DINOHead(out_dim=h.out_dim, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim,
                    num_layers=h.num_layers, use_bn=h.use_bn, norm_last_layer=h.norm_last_layer,
                    dtype=compute_dtype(cfg))


def build_model(cfg):
    """The backbone of the family registered as `cfg.kind`: called with (images [B, H, W, C] normalised,
    train: bool), it returns (embedding [B, D] float32, aux dict). PartFViT -> {'landmarks': [B, R, 2]},
    StandardGridFViT -> {'centers': [B, N, 2]}, FViT / InsightFaceViT -> {}.
    """
    validate_model_config(cfg)
    return registry.get(cfg.kind).build(cfg)


def _build_part_fvit(cfg) -> PartFViT:
    return PartFViT(landmark_cnn=build_landmark_cnn(cfg), vit=build_token_vit(cfg), patch_size=cfg.patch_size)


def _build_fvit(cfg) -> FViT:
    return FViT(vit=build_token_vit(cfg), patch_size=cfg.patch_size)


def _build_part_fvit_grid(cfg) -> StandardGridFViT:
    return StandardGridFViT(vit=build_token_vit(cfg), patch_size=cfg.patch_size,
                            noise_std=float(cfg.grid_noise_std), shuffle=cfg.grid_shuffle)


def _build_insightface_vit(cfg) -> InsightFaceViT:
    return InsightFaceViT(image_size=cfg.image_size, patch_size=cfg.patch_size, dim=cfg.dim, depth=cfg.depth,
                          heads=cfg.heads, mlp_dim=cfg.mlp_dim, mlp_activation=cfg.mlp_activation,
                          attention_scale=cfg.attention_scale, layer_norm_eps=cfg.layer_norm_eps,
                          drop_path_rate=cfg.drop_path_rate, drop_path_schedule=cfg.drop_path_schedule,
                          dropout=cfg.dropout, qkv_bias=cfg.qkv_bias, mask_ratio=cfg.insightface.mask_ratio,
                          embedding_size=cfg.insightface.embedding_size, bn_eps=cfg.insightface.bn_eps,
                          dtype=compute_dtype(cfg), attention_implementation=_attention_impl(cfg), remat=cfg.remat)


registry.register("part_fvit", registry.Family(build=_build_part_fvit, patch_order="landmarks",
                                               aux_keys=("landmarks",), landmark_cnn=True,
                                               sections={"landmark": landmark_config}))
registry.register("fvit", registry.Family(build=_build_fvit, patch_order="grid", validate=_check_grid_patches))
registry.register("part_fvit_grid", registry.Family(build=_build_part_fvit_grid, patch_order="grid",
                                                    aux_keys=("centers",), validate=_check_grid_patches))
registry.register("insightface_vit", registry.Family(build=_build_insightface_vit, validate=_check_insightface,
                                                     sections={"insightface": insightface_config}))
registry.register("resnet", registry.Family(build=resnet_lib.build, validate=resnet_lib.validate,
                                            aux_keys=("feature_map",), sections={"resnet": resnet_lib.section}))
registry.register(clip.KIND, clip.FAMILY)  # CLIP / FaRL image tower (models/clip.py)


def dummy_images(cfg, batch: int = 1) -> jax.Array:
    """Zeros [batch, image_size, image_size, channels] float32, for init and shape inference."""
    return jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)


def init_variables(cfg, key: jax.Array, batch: int = 1) -> dict:
    """Variables of build_model(cfg) ('params', and 'batch_stats' where BatchNorm is used)."""
    return build_model(cfg).init({"params": key}, dummy_images(cfg, batch), train=False)


def compiled_init(cfg, out_sharding: Any = None) -> Callable[[jax.Array], dict]:
    """`key -> init_variables(cfg, key)` as one jitted program (outputs placed by `out_sharding`, default
    jax's). Configs that build the same model share it, so a process that trains or evaluates several
    runs of one architecture (the demo: nine models of two) compiles the initialisation once."""
    model, shape = build_model(cfg), tuple(dummy_images(cfg).shape)
    try:
        return _compiled_init(model, shape, out_sharding)
    except TypeError:  # a model with an unhashable field: compiled for this call only
        return _compiled_init.__wrapped__(model, shape, out_sharding)


@functools.lru_cache(maxsize=16)
def _compiled_init(model: Any, image_shape: tuple[int, ...], out_sharding: Any) -> Callable[[jax.Array], dict]:
    return jax.jit(lambda key: model.init({"params": key}, jnp.zeros(image_shape, jnp.float32), train=False),
                   out_shardings=out_sharding)


def abstract_variables(cfg) -> dict:
    """Shapes and dtypes of init_variables(cfg, ...) without computing anything (jax.eval_shape)."""
    return jax.eval_shape(lambda k: init_variables(cfg, k), jax.random.key(0))


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def model_config_from_dict(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A validated model config from a plain dict (e.g. checkpoint metadata['model']).

    Starts from the preset named by values['preset'] (default 'base') and overrides every given key.
    Extra sections are kept: a known section (`known_sections()`) in `values` that the preset lacks is
    added at the preset's defaults and overridden (a metadata dict with 'landmark', 'dino_head' and
    'insightface' reads back with all three, whatever its kind). A section the family values['kind']
    reads but `values` lacks gets the preset's defaults. Any other unknown key raises ConfigError naming it.
    """
    preset = values.get("preset", "base")
    cfg = model_config(preset)
    sections = known_sections()
    for name, v in values.items():
        if name in sections and name not in cfg and isinstance(v, Mapping):
            cfg[name] = sections[name](preset)
    kind = values.get("kind", cfg.kind)
    if kind in registry.names():
        for name, build in registry.get(kind).sections.items():
            if name not in cfg:
                cfg[name] = build(preset)

    def update(node, vals, path):
        for k, v in vals.items():
            if k not in node:
                raise ConfigError(f"config.model.{path}{k} is not a model config key")
            if isinstance(node[k], ml_collections.ConfigDict):
                update(node[k], v, f"{path}{k}.")
            elif k == "blocks":
                node[k] = tuple(tuple(b) for b in v)
            else:
                node[k] = v

    update(cfg, dict(values), "")
    validate_model_config(cfg)
    return cfg
