"""Official PyTorch state dicts (numpy arrays) -> Flax variables of lafs_jax models. Pure: no torch, no files.

Key names and shapes of the official checkpoints: the released checkpoints' state dicts. Rules:
  - Linear weight (out, in) -> kernel (in, out); Conv OIHW -> HWIO (a depthwise (C, 1, k, k) becomes
    (k, k, 1, C), the layout of a grouped Flax convolution); LayerNorm/BatchNorm weight -> scale;
    BatchNorm running_mean / running_var -> 'batch_stats' mean / var; num_batches_tracked is dropped;
  - the packed to_qkv stays packed: our `qkv` splits q|k|v and heads the same way;
  - patch_to_embedding rows need no permutation: `sample_patches` produces the official
    (x-offset, y-offset, channel) token layout and `patchify` the plain fViT (row, col, channel) one;
  - the DINO head's weight-normalised layer: weight_v (out, bottleneck) -> kernel (bottleneck, out);
    weight_g (out, 1) -> scale (out,), or, with norm_last_layer (g frozen at 1), checked to be 1 and dropped;
  - the supervised classifier `loss.weight` (num_class, D) becomes variables['classifier']['centers'] (the
    row layout of the Partial FC class-centre matrix), or is dropped with drop_head; the SSL backbones' loss.weight was
    never trained and is always dropped.

Output trees (see lafs_jax/INTERFACES.md, models):
  part_fvit: {'params': {'landmark_cnn', 'vit'}, 'batch_stats': {'landmark_cnn'}, ['classifier': {'centers'}]}
  fvit:      {'params': {'vit'}, ['classifier': {'centers'}]}
  lafs_ssl:  {'params': <TokenViT params>, ['dino_head': <DINOHead params>], ['dino_loss': {'center' [1, K]}]}
  lvface:    {'params': <InsightFaceViT params>, 'batch_stats': {'feature_head': {'bn1', 'bn2'}}} from LVFace's
             released `.pt` (a plain state dict: patch_embed.proj, pos_embed, blocks.N.{norm1, attn.qkv,
             attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, feature.0-3, mask_token); every key must map and
             every target be filled (unknown / missing keys are errors naming them).
             Every entry is a dict, so the whole tree can be passed to `model.apply` (Flax ignores the
             collections the model does not use).
             'params' is the TokenViT tree at its root, the layout of the teacher backbone that pretraining
             saves, so fine-tuning loads either into PartFViT's `vit`; the head is its own entry (apply it
             with {'params': variables['dino_head']}).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np

from lafs_jax.models import presets

KINDS = ("part_fvit", "fvit", "lafs_ssl", "lvface")
WHICH = ("teacher", "student")
METHODS = ("supervised", "lafs", "dino")  # how the source network was trained
DEFAULT_METHOD = {"part_fvit": "supervised", "fvit": "supervised", "lafs_ssl": "lafs", "lvface": "supervised"}

# What the official code fed each released checkpoint kind (the official `image_iter.py` / the official evaluation scripts), recorded in
# the metadata unless the command line says otherwise. Normalisation: the official *evaluation*
# (IJB_evaluation.py and the in-training verification feed x/255 - 0.5 to the supervised Part fViT,
# though it trained on [-1, 1]; its partial last verification batch went un-normalised, a bug not
# copied); the plain fViT divides by 255 inside its forward (x/255*2 - 1); SSL backbones have no
# official evaluation and saw [-1, 1] (LAFS) or ImageNet mean/std (DataAugmentationDINO, the only
# DINO-face evidence). Colour order, relative to true RGB: the supervised models saw true RGB (the
# fine-tuning loader swaps a LAFS-packed WebFace4M .rec back); the LAFS SSL loader never swaps, so
# the released (1-shot WebFace4M) SSL checkpoints saw channel-swapped content: 'bgr'.
OFFICIAL_INPUT = {
    ("part_fvit", "supervised"): ("[-0.5,0.5]", "rgb", "official IJB_evaluation.py / perform_val: x/255 - 0.5"),
    ("fvit", "supervised"): ("[-1,1]", "rgb", "official fViT normalises inside its forward: x/255*2 - 1"),
    ("lafs_ssl", "lafs"): ("[-1,1]", "bgr", "LAFS SSL views: Normalize(0.5, 0.5); WebFace4M .rec never swapped"),
    ("lafs_ssl", "dino"): ("imagenet", "bgr", "DataAugmentationDINO: ImageNet mean/std; colours assumed as the "
                                               "LAFS SSL loader (the DINO-face script is unreleased)"),
    ("lvface", "supervised"): ("[-1,1]", "rgb", "LVFace inference / eval_ijbc.py: (x/255 - 0.5)/0.5 on RGB 112x112"),
}


class ConversionError(ValueError):
    """A checkpoint does not fit the target model: the message names the key(s) and shapes."""


@dataclasses.dataclass
class ConversionReport:
    """What happened to every source key."""

    converted: list[str] = dataclasses.field(default_factory=list)
    dropped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (key, reason)
    unexpected: list[str] = dataclasses.field(default_factory=list)  # source keys with no target
    missing: list[str] = dataclasses.field(default_factory=list)  # target paths no source key filled

    def summary(self) -> str:
        lines = [f"converted {len(self.converted)} tensors; dropped {len(self.dropped)}; "
                 f"unexpected {len(self.unexpected)}; missing {len(self.missing)}"]
        reasons: dict[str, int] = {}
        for _, why in self.dropped:
            reasons[why] = reasons.get(why, 0) + 1
        lines += [f"  dropped ({n}): {why}" for why, n in sorted(reasons.items())]
        lines += [f"  unexpected: {k}" for k in self.unexpected]
        lines += [f"  missing: {k}" for k in self.missing]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- transforms
def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> Flax Dense kernel (in, out)."""
    return np.ascontiguousarray(w.T)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d OIHW (depthwise: C,1,k,k) -> Flax HWIO (depthwise: k,k,1,C)."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def identity(w: np.ndarray) -> np.ndarray:
    return w


def flatten(w: np.ndarray) -> np.ndarray:
    return w.reshape(-1)


Target = tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]

_NORM = {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
         "running_var": ("batch_stats", "var")}
_BOTTLENECK_CONV = {"0": "expand_conv", "3": "depthwise_conv", "7": "project_conv"}
_BOTTLENECK_BN = {"1": "expand_bn", "4": "depthwise_bn", "8": "project_bn"}


def _norm(root: tuple[str, ...], module: str, field: str) -> Target:
    collection, leaf = _NORM[field]
    return (collection, *root, module, leaf), identity


def _dense(root: tuple[str, ...], module: str, field: str) -> Target:
    return (("params", *root, module, "kernel"), linear_kernel) if field == "weight" else \
        (("params", *root, module, "bias"), identity)


def landmark_target(key: str, root=("landmark_cnn",)) -> Target | None:
    """Target of an official `stn.*` / `output_layer.*` key (prefixes already stripped), or None."""
    if m := re.fullmatch(r"stn\.features\.0\.0\.weight", key):
        return ("params", *root, "stem_conv", "kernel"), conv_kernel
    if m := re.fullmatch(r"stn\.features\.0\.1\.(weight|bias|running_mean|running_var)", key):
        return _norm(root, "stem_bn", m[1])
    if m := re.fullmatch(r"stn\.features\.(\d+)\.conv\.([037])\.weight", key):
        return ("params", *root, f"bottleneck_{m[1]}", _BOTTLENECK_CONV[m[2]], "kernel"), conv_kernel
    if m := re.fullmatch(r"stn\.features\.(\d+)\.conv\.([148])\.(weight|bias|running_mean|running_var)", key):
        return _norm((*root, f"bottleneck_{m[1]}"), _BOTTLENECK_BN[m[2]], m[3])
    if m := re.fullmatch(r"stn\.features\.(\d+)\.conv\.5\.fc\.([02])\.weight", key):
        return ("params", *root, f"bottleneck_{m[1]}", "se", "reduce" if m[2] == "0" else "expand",
                "kernel"), linear_kernel
    if m := re.fullmatch(r"output_layer\.1\.(weight|bias)", key):
        return _dense(root, "landmark_head", m[1])
    return None


def vit_target(key: str, root=("vit",)) -> Target | None:
    """Target of an official ViT key (cls_token, pos_embedding, patch_to_embedding, transformer, mlp_head)."""
    if key in ("cls_token", "pos_embedding"):
        return ("params", *root, key), identity
    if m := re.fullmatch(r"patch_to_embedding\.(weight|bias)", key):
        return _dense(root, "patch_embedding", m[1])
    if m := re.fullmatch(r"mlp_head\.0\.(weight|bias)", key):
        return _norm(root, "head_norm", m[1])
    m = re.fullmatch(r"transformer\.layers\.(\d+)\.([01])\.fn\.(.+)", key)
    if not m:
        return None
    block = (*root, "encoder", f"block_{m[1]}")
    branch, rest = m[2], m[3]
    if n := re.fullmatch(r"norm\.(weight|bias)", rest):
        return _norm(block, "attention_norm" if branch == "0" else "mlp_norm", n[1])
    if branch == "0" and rest == "fn.to_qkv.weight":
        return ("params", *block, "attention", "qkv", "kernel"), linear_kernel
    if branch == "0" and (n := re.fullmatch(r"fn\.to_out\.0\.(weight|bias)", rest)):
        return _dense((*block, "attention"), "out", n[1])
    if branch == "1" and (n := re.fullmatch(r"fn\.net\.([03])\.(weight|bias)", rest)):
        return _dense((*block, "mlp"), "fc1" if n[1] == "0" else "fc2", n[2])
    return None


_LVFACE_BLOCK = {"norm1": ("attention_norm",), "norm2": ("mlp_norm",), "attn.qkv": ("attention", "qkv"),
                 "attn.proj": ("attention", "out"), "mlp.fc1": ("mlp", "fc1"), "mlp.fc2": ("mlp", "fc2")}
_LVFACE_FEATURE = {"0": "fc1", "1": "bn1", "2": "fc2", "3": "bn2"}


def lvface_target(key: str) -> Target | None:
    """Target of a key of LVFace's InsightFace ViT state dict (`backbones/vit.py`), or None.

    patch_embed.proj (Conv2d D x C x 9 x 9) -> patch_embedding (HWIO); pos_embed [1, 144, D] ->
    pos_embedding; blocks.N.* -> encoder/block_N/*; norm -> final_norm; feature.0 / .2 (Linear, no
    bias) -> feature_head/fc1 / fc2; feature.1 / .3 (BatchNorm1d) -> feature_head/bn1 / bn2 (running
    statistics into 'batch_stats'); mask_token [1, 1, D].
    """
    if key in ("pos_embed", "mask_token"):
        return ("params", {"pos_embed": "pos_embedding", "mask_token": "mask_token"}[key]), identity
    if m := re.fullmatch(r"patch_embed\.proj\.(weight|bias)", key):
        if m[1] == "weight":
            return ("params", "patch_embedding", "kernel"), conv_kernel
        return ("params", "patch_embedding", "bias"), identity
    if m := re.fullmatch(r"norm\.(weight|bias)", key):
        return _norm((), "final_norm", m[1])
    if m := re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", key):
        *parents, module = ("encoder", f"block_{m[1]}", *_LVFACE_BLOCK[m[2]])
        return (_norm(tuple(parents), module, m[3]) if m[2].startswith("norm") else
                _dense(tuple(parents), module, m[3]))
    if m := re.fullmatch(r"feature\.([02])\.weight", key):
        return ("params", "feature_head", _LVFACE_FEATURE[m[1]], "kernel"), linear_kernel
    if m := re.fullmatch(r"feature\.([13])\.(weight|bias|running_mean|running_var)", key):
        return _norm(("feature_head",), _LVFACE_FEATURE[m[1]], m[2])
    return None


# The released config name assumed for each size (drop path / mask ratio only matter for training
# from the converted weights): the LVFace README evaluates LVFace-B as vit_b_dp005_mask_005 and L
# exists only as vit_l_dp005_mask_005; which names the T / S Glint360K models used is not published
# (other_seeds.md §3.2 [verify]), the default names are taken.
LVFACE_RELEASED_NAME = {"insightface_t": "vit_t", "insightface_s": "vit_s", "insightface_b": "vit_b_dp005_mask_005",
                        "insightface_l": "vit_l_dp005_mask_005"}


def lvface_preset(state_dict: Mapping[str, Any]) -> str:
    """The LVFace preset (a released config name, `LVFACE_RELEASED_NAME`) whose (dim, depth) an LVFace
    state dict has (pos_embed's width, the number of blocks.N); ConversionError naming both when no
    size has them."""
    if "pos_embed" not in state_dict:
        raise ConversionError(f"not an LVFace state dict: no 'pos_embed' key (keys: {sorted(state_dict)[:8]} ...)")
    dim = int(np.shape(state_dict["pos_embed"])[-1])
    blocks = {int(m[1]) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    for name, size in presets.INSIGHTFACE_SIZES.items():
        if size == (dim, depth):
            return LVFACE_RELEASED_NAME[name]
    raise ConversionError(f"LVFace state dict with dim {dim} (pos_embed) and {depth} blocks matches no preset of "
                          f"{dict(presets.INSIGHTFACE_SIZES)}; pass the model config (--preset) explicitly")


def dino_head_target(key: str, use_bn: bool, norm_last_layer: bool, root=()) -> Target | None:
    """Target of an official DINOHead key (`mlp.{i}.*`, `last_layer.weight_g|weight_v`), or None.

    weight_g with norm_last_layer maps to the pseudo-path ('check_ones',), handled by the caller.
    """
    stride = 3 if use_bn else 2  # mlp = [Linear, (BN), GELU] * (n-1) + [Linear]
    if m := re.fullmatch(r"mlp\.(\d+)\.(weight|bias|running_mean|running_var)", key):
        index = int(m[1])
        if index % stride == 0:
            return _dense(root, f"dense_{index // stride}", m[2]) if m[2] in ("weight", "bias") else None
        if use_bn and index % stride == 1:
            return _norm(root, f"bn_{index // stride}", m[2])
        return None
    if key == "last_layer.weight_v":
        return ("params", *root, "last_layer", "kernel"), linear_kernel
    if key == "last_layer.weight_g":
        return (("check_ones",), flatten) if norm_last_layer else (("params", *root, "last_layer", "scale"), flatten)
    return None


# ---------------------------------------------------------------------------------------------- containers
def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Remove `prefix` from every key that has it (keys without it are kept as they are)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def select_state_dict(checkpoint: Mapping[str, Any], kind: str, which: str = "teacher"):
    """(flat state dict, extras) from a loaded official checkpoint object.

    part_fvit / fvit: a bare state dict (DDP 'module.' prefixes stripped); also accepts {'state_dict': ...}.
    lafs_ssl: checkpoint[which] with 'module.' stripped (student); extras = {'dino_center': center} when the
    container has dino_loss.center.
    """
    if kind not in KINDS:
        raise ConversionError(f"--kind {kind!r} is not valid; choose one of {list(KINDS)}")
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"checkpoint is a {type(checkpoint).__name__}, expected a dict (state dict or "
                              f"LAFS container)")
    extras: dict[str, Any] = {}
    if kind == "lafs_ssl":
        if which not in WHICH:
            raise ConversionError(f"--which {which!r} is not valid; choose one of {list(WHICH)}")
        missing = [k for k in WHICH if k not in checkpoint]
        if missing:
            raise ConversionError(f"not a LAFS SSL checkpoint: keys {missing} are missing (top-level keys: "
                                  f"{sorted(checkpoint)[:10]})")
        state = strip_prefix(checkpoint[which], "module.")
        center = (checkpoint.get("dino_loss") or {}).get("center")
        if center is not None:
            extras["dino_center"] = np.asarray(center, np.float32)
        return state, extras
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        checkpoint = checkpoint["state_dict"]
    if "student" in checkpoint or "teacher" in checkpoint:
        raise ConversionError("this is a LAFS SSL container (student/teacher); use --kind lafs_ssl")
    return strip_prefix(checkpoint, "module."), extras


# ---------------------------------------------------------------------------------------------- conversion
def target_model_config(kind: str, preset_or_cfg: Any = "base"):
    """The model config a conversion targets: a preset name or a config, with `kind` set for the backbone,
    the sections that family reads, and (lafs_ssl) the DINO head's `dino_head` at the preset's defaults
    where the config has none."""
    cfg = presets.model_config(preset_or_cfg) if isinstance(preset_or_cfg, str) else \
        presets.model_config_from_dict(preset_or_cfg.to_dict() if hasattr(preset_or_cfg, "to_dict") else
                                       dict(preset_or_cfg))
    cfg.kind = {"fvit": "fvit", "lvface": "insightface_vit"}.get(kind, "part_fvit")
    presets.add_family_sections(cfg)
    if kind == "lafs_ssl" and "dino_head" not in cfg:
        cfg.dino_head = presets.dino_head_config(cfg.preset)
    presets.validate_model_config(cfg)
    return cfg


def expected_shapes(kind: str, cfg, drop_head: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of every leaf the converted variables must contain (computed with jax.eval_shape)."""
    key = jax.random.key(0)
    if kind == "lafs_ssl":
        vit = presets.build_token_vit(cfg)
        tokens = np.zeros((1, cfg.num_landmarks, cfg.patch_size ** 2 * cfg.channels), np.float32)
        tree = {"params": jax.eval_shape(lambda: vit.init(key, tokens, train=False))["params"]}
        if not drop_head:
            head = presets.build_dino_head(cfg)
            tree["dino_head"] = jax.eval_shape(
                lambda: head.init(key, np.zeros((1, cfg.dim), np.float32)))["params"]
    else:
        tree = presets.abstract_variables(cfg)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[tuple(p.key for p in path)] = tuple(leaf.shape)
    return flat


def _route(key: str, kind: str, cfg, drop_head: bool):
    """(target, reason): target (path, transform) for a source key, or None with a drop reason or None."""
    if key.endswith("num_batches_tracked"):
        return None, "BatchNorm step counter (not used by Flax)"
    if kind == "lvface":
        return lvface_target(key), None
    if kind == "lafs_ssl":
        if key.startswith("backbone."):
            sub = key[len("backbone."):]
            if sub == "loss.weight":
                return None, "classifier of the SSL backbone (never trained)"
            return vit_target(sub, root=()), None
        if key.startswith("head."):
            if drop_head:
                return None, "DINO head (--drop-head)"
            target = dino_head_target(key[len("head."):], cfg.dino_head.use_bn, cfg.dino_head.norm_last_layer)
            if target is not None and target[0][0] != "check_ones":  # the head is its own top-level entry
                target = (("dino_head", *target[0][1:]), target[1])
            return target, None
        return None, None
    if key == "loss.weight":
        return (None, "classifier (--drop-head)") if drop_head else ((("classifier", "centers"), identity), None)
    if kind == "part_fvit" and (target := landmark_target(key)) is not None:
        return target, None
    return vit_target(key), None


def _nest(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def convert_state_dict(state_dict: Mapping[str, np.ndarray], kind: str, model_cfg: Any = "base", *,
                       drop_head: bool = False, extras: Mapping[str, np.ndarray] | None = None,
                       strict: bool = False) -> tuple[dict, ConversionReport]:
    """Map an official state dict (prefixes stripped; numpy arrays) to Flax variables.

    Args:
      state_dict: {official key: array}. For lafs_ssl, the teacher/student dict (`backbone.*`, `head.*`).
      kind: 'part_fvit' | 'fvit' | 'lafs_ssl'.
      model_cfg: a preset name or a model config; the target shapes come from it.
      drop_head: drop the classifier (part_fvit/fvit) or the DINO head and centre (lafs_ssl).
      extras: from select_state_dict (the DINO centre).
      strict: raise on unexpected source keys instead of only reporting them.
    Returns:
      (variables, report). Raises ConversionError for a wrong shape (naming the key and both shapes), a
      missing target leaf, a weight_g that is not 1 under norm_last_layer, or (strict) unexpected keys.
    """
    if kind not in KINDS:
        raise ConversionError(f"kind {kind!r} is not valid; choose one of {list(KINDS)}")
    cfg = target_model_config(kind, model_cfg)
    if kind == "lafs_ssl" and not drop_head and cfg.dino_head.use_bn:
        raise ConversionError("a DINO head with BatchNorm (model.dino_head.use_bn=True) is not supported by the "
                              "converter; LAFS uses use_bn=False (or convert with --drop-head)")
    expected = expected_shapes(kind, cfg, drop_head)
    report = ConversionReport()
    flat: dict[tuple[str, ...], np.ndarray] = {}
    sources: dict[tuple[str, ...], str] = {}
    for key in sorted(state_dict):
        value = np.asarray(state_dict[key])
        target, reason = _route(key, kind, cfg, drop_head)
        if target is None:
            if reason is None:
                report.unexpected.append(key)
            else:
                report.dropped.append((key, reason))
            continue
        path, transform = target
        if path == ("check_ones",):
            if not np.allclose(value, 1.0):
                raise ConversionError(f"{key}: weight_g is not 1 (range {value.min():.4g}..{value.max():.4g}) but "
                                      f"model.dino_head.norm_last_layer=True would fix it to 1; convert with "
                                      f"norm_last_layer=False")
            report.dropped.append((key, "weight_g fixed to 1 (norm_last_layer)"))
            continue
        converted = transform(value)
        if path == ("classifier", "centers"):
            if converted.ndim != 2 or converted.shape[1] != cfg.dim:
                raise ConversionError(f"{key}: shape {value.shape} does not fit class centres [num_class, "
                                      f"dim={cfg.dim}]")
            flat[path] = converted.astype(np.float32)
            report.converted.append(key)
            continue
        if path not in expected:
            report.unexpected.append(key)
            continue
        if tuple(converted.shape) != expected[path]:
            raise ConversionError(f"{key}: source shape {tuple(value.shape)} -> {tuple(converted.shape)} does not "
                                  f"match the target {'/'.join(path)} of shape {expected[path]} (model preset "
                                  f"{cfg.preset!r}: check --preset)")
        if path in sources:
            raise ConversionError(f"{key} and {sources[path]} both map to {'/'.join(path)}")
        flat[path] = converted.astype(np.float32)
        sources[path] = key
        report.converted.append(key)
    if kind == "lvface" and report.unexpected:
        raise ConversionError(f"{len(report.unexpected)} keys of the LVFace state dict have no place in the "
                              f"InsightFace ViT (model preset {cfg.preset!r}): {report.unexpected[:10]}")
    report.missing = ['/'.join(p) for p in expected if p not in flat]
    if report.missing:
        raise ConversionError(f"{len(report.missing)} target variables have no source key, e.g. "
                              f"{report.missing[:5]}\n{report.summary()}")
    if strict and report.unexpected:
        raise ConversionError(f"unexpected source keys (strict): {report.unexpected[:10]}")
    if kind == "lafs_ssl" and not drop_head and extras and "dino_center" in extras:
        center = np.asarray(extras["dino_center"], np.float32)
        if center.shape != (1, cfg.dino_head.out_dim):
            raise ConversionError(f"dino_loss.center: shape {center.shape} does not match (1, "
                                  f"model.dino_head.out_dim={cfg.dino_head.out_dim})")
        flat[("dino_loss", "center")] = center
    return _nest(flat), report


def official_input(kind: str, method: str | None = None) -> dict:
    """{'method', 'normalization', 'color_order', 'note'} the official code used for a checkpoint kind."""
    method = method or DEFAULT_METHOD[kind]
    if (kind, method) not in OFFICIAL_INPUT:
        raise ConversionError(f"--method {method!r} does not go with --kind {kind!r}; choose one of "
                              f"{sorted(m for k, m in OFFICIAL_INPUT if k == kind)}")
    normalization, color_order, note = OFFICIAL_INPUT[(kind, method)]
    return {"method": method, "normalization": normalization, "color_order": color_order, "note": note}


def patch_order(kind: str, method: str | None = None) -> str | None:
    """Patch layout the source's patch embedding learnt: 'grid' for fViT / DINO-face, None for LVFace's
    convolution, else 'landmarks'."""
    if kind == "lvface":
        return None  # its own convolutional patch embedding: no patch-vector layout to check
    return "grid" if kind == "fvit" or (method or DEFAULT_METHOD[kind]) == "dino" else "landmarks"


def metadata(kind: str, cfg, source: str, *, normalization: str | None = None, color_order: str | None = None,
             which: str | None = None, report: ConversionReport | None = None, method: str | None = None) -> dict:
    """The metadata.json of a converted variables directory; normalisation, colour order and method
    default to what the official code used for `kind` (`official_input`)."""
    official = official_input(kind, method)
    meta = {"kind": kind, "model": cfg.to_dict(), "method": official["method"],
            "patch_order": patch_order(kind, official["method"]),
            "normalization": normalization or official["normalization"],
            "color_order": color_order or official["color_order"],
            "official_input": official, "source": source, "converter": "lafs_jax.convert"}
    if which is not None:
        meta["which"] = which
    if report is not None:
        meta["conversion"] = {"converted": len(report.converted), "dropped": [k for k, _ in report.dropped],
                              "unexpected": report.unexpected}
    return meta
