"""FRA checkpoints (official training checkpoints and torchvision ResNet state dicts) -> Flax variables.

Official training checkpoint (main.py's `save_checkpoint`): a dict with 'epoch', 'arch', 'state_dict',
'optimizer', ...; state_dict keys under 'module.': `online_net.backbone.*` (torchvision ResNet names),
`online_net.neck.{proj, proj_pixel, proj_obj, proj_attn}.*` + `online_net.neck.proto`, `target_net.*`
(the same), `predictor.mlp.*`, `predictor_obj.mlp.*`, `encoder_q.*` (a second name of the online
backbone: must equal it) and `center` (a zero buffer of the cluster loss, unused). A plain torchvision
ResNet state dict (what FRA's FER script loads; `fc.*` dropped) converts to the backbone alone.

Names: the Flax path is the torch module path with '.<digit>' joined by '_' (`resnet.torch_path`). Leaves:
4-D conv weight [O, I, kh, kw] -> kernel [kh, kw, I, O] (input_proj, a 1x1 conv with bias -> a Dense
kernel [I, O]); 3-D conv1d weight [O, I, 1] -> Dense kernel [I, O]; Linear weight [O, I] -> kernel [I, O];
BatchNorm / LayerNorm weight -> scale, bias -> bias, running_mean / running_var -> batch_stats mean / var
(num_batches_tracked dropped); MultiheadAttention's in_proj_weight / in_proj_bias as they are;
query_embed.weight -> query_embed/embedding; proto -> batch_stats proto.

The model config (ResNet depth and width, neck widths, regions, decoder layers) is read from the shapes;
the decoder's head count is not in the weights (config.fra.heads, official 8). Every variable must be
filled and every key used: a missing or unknown key, or a shape that differs from the model the shapes
describe, is a ConversionError naming the key (and both shapes).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from lafs_jax.methods.fra import config as fra_config
from lafs_jax.methods.fra import objective as fra_objective
from lafs_jax.models import presets
from lafs_jax.models.resnet import DEPTHS, torch_path

WHICH = ("online", "target")
NETWORKS = {"online_net.": "online", "target_net.": "target", "predictor_obj.": "predictor_obj",
            "predictor.": "predictor"}
NORMALIZATION = "vggface2"  # FRA's input: (x/255 - VGGFace2 mean) / std, RGB


class ConversionError(ValueError):
    """A checkpoint that does not fit (names the key)."""


def _leaf(module: tuple[str, ...], name: str, w: np.ndarray) -> tuple[str, tuple[str, ...], np.ndarray]:
    """(collection, Flax path, array) of one torch tensor `module.name`."""
    if name == "num_batches_tracked":
        return "", (), w
    if name in ("running_mean", "running_var"):
        return "batch_stats", module + ({"running_mean": "mean", "running_var": "var"}[name],), w
    if name == "proto":
        return "batch_stats", module + ("proto",), w
    if name in ("in_proj_weight", "in_proj_bias"):
        return "params", module + (name,), w
    if name == "bias":
        return "params", module + ("bias",), w
    if name != "weight":
        raise ConversionError(f"{'.'.join(module + (name,))}: unknown tensor name {name!r}")
    if module and module[-1] == "query_embed":
        return "params", module + ("embedding",), w
    if w.ndim == 1:
        return "params", module + ("scale",), w
    if w.ndim == 2:
        return "params", module + ("kernel",), w.T
    if w.ndim == 3:
        return "params", module + ("kernel",), w[:, :, 0].T
    if module and module[-1] == "input_proj":
        return "params", module + ("kernel",), w[:, :, 0, 0].T
    return "params", module + ("kernel",), np.transpose(w, (2, 3, 1, 0))


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    return {tuple(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nest(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def unwrap(checkpoint: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The state dict of a training checkpoint ('state_dict', 'module.' stripped) or a plain state dict."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ConversionError("not a state dict (no tensors, and no 'state_dict' entry)")
    return {(k[len("module."):] if k.startswith("module.") else k): np.asarray(v) for k, v in state.items()}


def is_training_checkpoint(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("online_net.") for k in state)


def backbone_config(state: Mapping[str, np.ndarray], prefix: str = "") -> ml_collections.ConfigDict:
    """The 'resnet' model config the backbone tensors under `prefix` describe (block, depths, width)."""
    if f"{prefix}conv1.weight" not in state:
        raise ConversionError(f"{prefix}conv1.weight is missing: not a torchvision ResNet")
    width = int(state[f"{prefix}conv1.weight"].shape[0])
    layers = []
    for s in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}layer{s}\.(\d+)\.", k))}
        if not ids:
            raise ConversionError(f"{prefix}layer{s}.0.* is missing: not a torchvision ResNet")
        layers.append(max(ids) + 1)
    block = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in state else "basic"
    named = [n for n, (b, l) in DEPTHS.items() if b == block and tuple(l) == tuple(layers)]
    cfg = presets.model_config(named[0] if named and width == 64 else "resnet50")
    cfg.resnet.block, cfg.resnet.layers, cfg.resnet.width = block, tuple(layers), width
    cfg.dim = width * 8 * (4 if block == "bottleneck" else 1)
    return cfg


def fra_config_of(state: Mapping[str, np.ndarray], heads: int = 8) -> ml_collections.ConfigDict:
    """A recipe-like config {'model', 'fra'} for the whole FRA model the training state dict describes."""
    def shape(key):
        if key not in state:
            raise ConversionError(f"{key} is missing: not an FRA (FRAB, mask_type 'attn') checkpoint")
        return state[key].shape

    c = ml_collections.ConfigDict()
    c.model = backbone_config(state, "online_net.backbone.")
    c.fra = fra_config.config()
    c.fra.hidden_dim, c.fra.out_dim = (int(x) for x in shape("online_net.neck.proj.mlp.0.weight")[:1] +
                                       shape("online_net.neck.proj.mlp.3.weight")[:1])
    c.fra.num_proto = int(shape("online_net.neck.proj_attn.query_embed.weight")[0])
    c.fra.decoder_layers = len({k.split(".")[6] for k in state
                                if k.startswith("online_net.neck.proj_attn.transformer.decoder.layers.")})
    c.fra.heads = heads
    c.fra.view_size = c.model.image_size
    return c


def _check_and_fill(flat: dict, expected: dict, what: str) -> dict:
    missing = sorted("/".join(p) for p in expected if p not in flat)
    if missing:
        raise ConversionError(f"{what}: {len(missing)} variables not in the checkpoint, first {missing[:3]}")
    for p, v in flat.items():
        if p not in expected:
            raise ConversionError(f"{what}: unknown key {'/'.join(p)} (from {v[1]})")
        if tuple(v[0].shape) != tuple(expected[p].shape):
            raise ConversionError(f"{v[1]}: shape {tuple(v[0].shape)} in the checkpoint, {tuple(expected[p].shape)} "
                                  f"expected ({what})")
    return {p: np.asarray(v[0], np.float32) for p, v in flat.items()}


def convert_training(state: Mapping[str, np.ndarray], heads: int = 8) -> tuple[dict, ml_collections.ConfigDict]:
    """(whole-model variables {'params', 'batch_stats'} each {'online', 'target', 'predictor',
    'predictor_obj'}, config) of an official FRAB state dict ('module.' stripped)."""
    cfg = fra_config_of(state, heads)
    flat: dict[tuple[str, ...], tuple[np.ndarray, str]] = {}
    for key, w in state.items():
        if key == "center":
            continue
        if key.startswith("encoder_q."):
            twin = "online_net.backbone." + key[len("encoder_q."):]
            if twin not in state or not np.array_equal(state[twin], w):
                raise ConversionError(f"{key}: encoder_q must be the online backbone, and {twin} differs or is missing")
            continue
        net = next((n for p, n in NETWORKS.items() if key.startswith(p)), None)
        if net is None:
            raise ConversionError(f"{key}: unknown key (FRAB holds online_net, target_net, predictor, "
                                  f"predictor_obj, encoder_q, center)")
        *module, name = key[key.index(".") + 1:].split(".")
        collection, path, value = _leaf(torch_path(".".join(module)), name, w)
        if collection:
            flat[(collection, net) + path] = (value, key)
    abstract = jax.eval_shape(lambda k: fra_objective.init_variables(cfg, k), jax.random.key(0))
    expected = _flat({c: {**abstract[c], "target": abstract[c]["online"]} for c in ("params", "batch_stats")})
    return _nest(_check_and_fill(flat, expected, "FRA checkpoint")), cfg


def convert_resnet(state: Mapping[str, np.ndarray], prefix: str = "") -> tuple[dict, ml_collections.ConfigDict]:
    """({'params', 'batch_stats'} of the ResNet, model config) of torchvision ResNet tensors under
    `prefix` (fc.* of a classifier dropped; any other key outside the prefix is an error)."""
    cfg = backbone_config(state, prefix)
    flat = {}
    for key, w in state.items():
        if not key.startswith(prefix):
            raise ConversionError(f"{key}: not under {prefix!r}")
        sub = key[len(prefix):]
        if sub.split(".")[0] == "fc":
            continue
        *module, name = sub.split(".")
        collection, path, value = _leaf(torch_path(".".join(module)), name, w)
        if collection:
            flat[(collection,) + path] = (value, key)
    abstract = presets.abstract_variables(cfg)
    return _nest(_check_and_fill(flat, _flat(abstract), "ResNet state dict")), cfg


def backbone_of(model: dict, which: str) -> dict:
    """{'params', 'batch_stats'} of the `which` ('online' | 'target') backbone of whole-model variables."""
    if which not in WHICH:
        raise ConversionError(f"--which {which!r}: choose one of {WHICH}")
    return {c: model[c][which]["backbone"] for c in ("params", "batch_stats")}


def check_preset(backbone: dict, preset: str) -> None:
    """ConversionError naming the first variable whose shape differs from model preset `preset`'s."""
    want = _flat(presets.abstract_variables(presets.model_config(preset)))
    have = _flat(backbone)
    for path, v in sorted(want.items(), key=lambda kv: kv[0][0] != "params"):  # parameters first
        if path not in have:
            raise ConversionError(f"--preset {preset}: {'/'.join(path)} is not in the checkpoint")
        if tuple(have[path].shape) != tuple(v.shape):
            raise ConversionError(f"--preset {preset}: {'/'.join(path)} has shape {tuple(have[path].shape)} in the "
                                  f"checkpoint, {tuple(v.shape)} in {preset}")
    extra = sorted("/".join(p) for p in have if p not in want)
    if extra:
        raise ConversionError(f"--preset {preset}: the checkpoint has {extra[0]}, which {preset} does not")


def metadata(cfg: ml_collections.ConfigDict, source: str, which: str | None) -> dict:
    """metadata.json of a converted FRA backbone directory (FRA's input: VGGFace2 mean/std, RGB)."""
    meta = {"kind": "fra", "model": cfg.model.to_dict(), "method": "fra", "patch_order": None,
            "normalization": NORMALIZATION, "color_order": "rgb",
            "official_input": {"normalization": NORMALIZATION, "color_order": "rgb",
                               "note": "FRA data/transforms.py: Normalize(VGGFace2 mean, std) on RGB"},
            "source": source, "converter": "lafs_jax.convert --kind fra"}
    if which is not None:
        meta["which"] = which
        meta["fra"] = cfg.fra.to_dict()
    return meta


def convert(checkpoint: Mapping[str, Any], which: str = "online", preset: str | None = None
            ) -> tuple[dict, dict | None, ml_collections.ConfigDict]:
    """(backbone variables of `which`, whole-model variables or None for a plain ResNet, config)."""
    state = unwrap(checkpoint)
    if is_training_checkpoint(state):
        model, cfg = convert_training(state)
        backbone = backbone_of(model, which)
    else:
        backbone, model_cfg = convert_resnet(state)
        model, cfg = None, ml_collections.ConfigDict({"model": model_cfg.to_dict()})
    if preset is not None:
        check_preset(backbone, preset)
    return backbone, model, cfg
