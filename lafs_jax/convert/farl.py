"""FaRL / OpenAI CLIP checkpoints -> a 'clip_vit' variables directory (`python -m lafs_jax.convert --kind farl`).

Source: a `torch.save` dict holding `state_dict` (FaRL's release, e.g. FaRL-Base-Patch16-LAIONFace20M-ep16.pth),
or a plain CLIP state dict; a leading 'module.' is stripped. CLIP names -> `models.clip` names:

    visual.conv1.weight [W, 3, P, P]            -> params/conv1/kernel [P, P, 3, W]
    visual.class_embedding, visual.positional_embedding, visual.proj, visual.ln_pre / ln_post
    visual.transformer.resblocks.N.ln_1 / ln_2  -> params/transformer/block_N/ln_1 / ln_2 (weight -> scale)
      .attn.in_proj_weight [3W, W] / _bias [3W] -> .../attn/{query, key, value}/kernel [W, W] (transposed), bias
      .attn.out_proj, .mlp.c_fc, .mlp.c_proj    -> .../attn/out, mlp_c_fc, mlp_c_proj (kernels transposed)
    token_embedding.weight, positional_embedding, transformer.resblocks.N..., ln_final, text_projection
                                                -> text/params/... (the same block mapping)
    logit_scale                                 -> logit_scale (a scalar)
    visual.mask_token, lm_transformer.resblocks.N... (FaRL's MIM, when present)
                                                -> mim/mask_token, mim/lm_transformer/block_N/...
The architecture is read from the shapes: width, patch and grid from conv1 / positional_embedding, blocks
by counting, the joint size from visual.proj, the text width / context / vocabulary from its embeddings;
heads = width / 64 (CLIP's rule) unless the (width, layers) are a preset's with other heads (FaRL's H/14:
1280 wide, 16 heads of 80). `image_size` other than the checkpoint's resamples the position embeddings
bicubically (`models.clip.resample_positions`, class row untouched).

Other MIM keys (names starting 'lm_' or 'mim_' that are not the above) are listed in the report and
left out; any other unknown key, a missing key or a shape that does not fit the inferred architecture
is a ConversionError naming the key. Metadata: kind 'clip_vit', the model config, normalisation
'clip' (CLIP mean / std on [0, 1]), colour order 'rgb', `text` (context length).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from lafs_jax.convert.mapping import ConversionError, ConversionReport
from lafs_jax.models import clip, presets
from lafs_jax.sharding import path_str
from lafs_jax.variables import to_json_dict

KIND = "farl"
_BLOCK = re.compile(r"^(visual\.transformer|transformer|lm_transformer)\.resblocks\.(\d+)\.(.+)$")
_NORM = {"weight": "scale", "bias": "bias"}
MIM_PREFIXES = ("lm_", "mim_")


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The CLIP state dict inside a checkpoint (its 'state_dict', else the checkpoint), 'module.' stripped."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ConversionError("the checkpoint holds no state dict (a dict of tensors, or one under 'state_dict')")
    return {(k[len("module."):] if k.startswith("module.") else k): np.asarray(v) for k, v in state.items()
            if not isinstance(v, (dict, list, str))}


def _count(state: Mapping[str, Any], tower: str) -> int:
    blocks = {int(m.group(2)) for k in state if (m := _BLOCK.match(k)) and m.group(1) == tower}
    return max(blocks) + 1 if blocks else 0


def _need(state: Mapping[str, Any], key: str) -> np.ndarray:
    if key not in state:
        raise ConversionError(f"missing key {key!r}: not a CLIP / FaRL state dict")
    return state[key]


def infer_model_config(state: Mapping[str, Any], image_size: int | None = None):
    """A 'clip_vit' model config from the shapes of a CLIP state dict (see the module docstring)."""
    conv = _need(state, "visual.conv1.weight")
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = int(round(np.sqrt(_need(state, "visual.positional_embedding").shape[0] - 1)))
    layers = _count(state, "visual.transformer")
    cfg = presets.model_config("clip_b16")
    preset = next((p for p, s in clip.SIZES.items() if s[0] == width and s[1] == layers), None)
    heads = clip.SIZES[preset][2] if preset else width // 64
    tokens = _need(state, "token_embedding.weight")
    text_width = int(tokens.shape[1])
    cfg.preset = preset or "clip_b16"
    cfg.image_size = int(image_size or grid * patch)
    cfg.patch_size = patch
    cfg.num_landmarks = (cfg.image_size // patch) ** 2
    cfg.dim, cfg.depth, cfg.heads, cfg.head_dim, cfg.mlp_dim = width, layers, heads, width // heads, 4 * width
    c = cfg.clip
    c.embed_dim = int(_need(state, "visual.proj").shape[1])
    c.vocab_size = int(tokens.shape[0])
    c.context_length = int(_need(state, "positional_embedding").shape[0])
    c.text_width = text_width
    c.text_heads = text_width // 64
    c.text_layers = _count(state, "transformer")
    c.feature_blocks = clip.SIZES[preset][8] if preset else tuple(range(max(0, layers - 4), layers))
    presets.validate_model_config(cfg)
    return cfg


def _block_params(rest: str, value: np.ndarray) -> dict[tuple[str, ...], np.ndarray]:
    """One resblock entry -> {(path within the block): array}; KeyError for an unknown one."""
    module, _, field = rest.rpartition(".")
    if module in ("ln_1", "ln_2"):
        return {(module, _NORM[field]): value}
    if module == "attn" and field in ("in_proj_weight", "in_proj_bias"):
        parts = np.split(value, 3, axis=0)
        name = "kernel" if field == "in_proj_weight" else "bias"
        return {("attn", n, name): (p.T if name == "kernel" else p) for n, p in zip(("query", "key", "value"), parts)}
    target = {"attn.out_proj": ("attn", "out"), "mlp.c_fc": ("mlp_c_fc",), "mlp.c_proj": ("mlp_c_proj",)}.get(module)
    if target is None or field not in ("weight", "bias"):
        raise KeyError(rest)
    return {(*target, "kernel" if field == "weight" else "bias"): value.T if field == "weight" else value}


def _direct(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray] | None:
    """Entries outside the blocks -> (path in the variables tree, array)."""
    norms = {"visual.ln_pre": ("params", "ln_pre"), "visual.ln_post": ("params", "ln_post"),
             "ln_final": ("text", "params", "ln_final")}
    module, _, field = key.rpartition(".")
    if module in norms and field in _NORM:
        return (*norms[module], _NORM[field]), value
    table = {"visual.class_embedding": ("params", "class_embedding"), "visual.proj": ("params", "proj"),
             "visual.positional_embedding": ("params", "positional_embedding"),
             "token_embedding.weight": ("text", "params", "token_embedding", "embedding"),
             "positional_embedding": ("text", "params", "positional_embedding"),
             "text_projection": ("text", "params", "text_projection"), "logit_scale": ("logit_scale",),
             "visual.mask_token": ("mim", "mask_token")}
    if key == "visual.conv1.weight":
        return ("params", "conv1", "kernel"), value.transpose(2, 3, 1, 0)
    if key in table:
        v = value.reshape(-1) if key == "visual.mask_token" else value
        return table[key], (v.reshape(()) if key == "logit_scale" else v)
    return None


def convert_state_dict(state: Mapping[str, np.ndarray], image_size: int | None = None
                       ) -> tuple[dict, Any, ConversionReport]:
    """(variables {'params': visual, 'text': {'params'}, 'logit_scale', ['mim']}, model config, report)."""
    cfg = infer_model_config(state, image_size)
    report = ConversionReport()
    flat: dict[tuple[str, ...], np.ndarray] = {}
    roots = {"visual.transformer": ("params", "transformer"), "transformer": ("text", "params", "transformer"),
             "lm_transformer": ("mim", "lm_transformer")}
    unknown = []
    for key, value in state.items():
        value = np.asarray(value, np.float32) if np.issubdtype(np.asarray(value).dtype, np.floating) else value
        m = _BLOCK.match(key)
        try:
            if m:
                for path, v in _block_params(m.group(3), value).items():
                    flat[(*roots[m.group(1)], f"block_{m.group(2)}", *path)] = v
                continue
            hit = _direct(key, value)
        except KeyError:
            hit = None
        if hit is None:
            if key.startswith(MIM_PREFIXES):
                report.dropped.append((key, "MIM module not converted (reported, left out)"))
                continue
            unknown.append(key)
            continue
        flat[hit[0]] = hit[1]
    if unknown:
        raise ConversionError(f"unknown keys (not CLIP / FaRL names): {sorted(unknown)[:20]}")
    grid = cfg.image_size // cfg.patch_size
    pos = ("params", "positional_embedding")
    flat[pos] = clip.resample_positions(flat[pos], grid)
    _check_shapes(flat, cfg)
    variables: dict = {}
    for path, v in flat.items():
        node = variables
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    report.converted = sorted("/".join(p) for p in flat)
    return variables, cfg, report


def _check_shapes(flat: dict, cfg) -> None:
    """Every tower variable present with the shape the inferred config builds (ConversionError naming it)."""
    want = {("params", *path_str(k).split("/")): v.shape
            for k, v in jax.tree_util.tree_flatten_with_path(presets.abstract_variables(cfg)["params"])[0]}
    text = jax.eval_shape(lambda k: clip.init_text(cfg, k), jax.random.key(0))["params"]
    want.update({("text", "params", *path_str(k).split("/")): v.shape
                 for k, v in jax.tree_util.tree_flatten_with_path(text)[0]})
    want[("logit_scale",)] = ()
    missing = sorted("/".join(p) for p in want if p not in flat)
    if missing:
        raise ConversionError(f"missing variables (their CLIP keys are absent): {missing[:20]}")
    for path, shape in want.items():
        if tuple(flat[path].shape) != tuple(shape):
            raise ConversionError(f"{'/'.join(path)}: shape {tuple(flat[path].shape)} does not fit the architecture "
                                  f"read from the checkpoint, which needs {tuple(shape)}")


def metadata(cfg, source: str, report: ConversionReport) -> dict:
    """The variables directory's metadata (what embed / evaluate / fine-tuning read)."""
    return {"kind": clip.KIND, "model": to_json_dict(cfg), "method": "farl", "patch_order": None,
            "normalization": "clip", "color_order": "rgb", "image_size": int(cfg.image_size),
            "official_input": "CLIP preprocessing: RGB in [0, 1], minus mean (0.48145466, 0.4578275, 0.40821073), "
                              "over std (0.26862954, 0.26130258, 0.27577711)",
            "text": {"context_length": int(cfg.clip.context_length)}, "source": source,
            "conversion": {"converted": len(report.converted), "dropped": [k for k, _ in report.dropped]}}
