"""A fine-tuning model's starting variables from variables directories (`config.init`).

`initial_variables(config, variables)` starts from freshly initialised host arrays and loads
`config.init.backbone` into them: a pretraining teacher (kind 'token_vit': a TokenViT at the root,
loaded into params['vit']) or a whole backbone (kind 'backbone': lafs_jax.convert's output, a previous
fine-tuning's WORKDIR/backbone), then applies the active methods' own loading
(`lafs_jax.methods.recognition.Hooks.initialize`). Directories are read as host arrays against their
stored shapes, whatever device count wrote them, then every shape is checked against the model (errors
name the entry). The patch layout a directory's patch embedding learnt is read from its metadata here,
including the fallbacks for directories written before `patch_order` was recorded (`source_patch_order`).
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from lafs_jax import methods
from lafs_jax import sharding as mesh_lib
from lafs_jax import variables as variables_lib
from lafs_jax.config import ConfigError
from lafs_jax.models import presets

INIT_KINDS = ("auto", "backbone", "token_vit")  # values of config.init.kind


def _flatten(tree: Any) -> dict[str, Any]:
    return {mesh_lib.path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge_variables(target: Any, source: Any, where: str, *, allow_missing: bool = False) -> Any:
    """`target` with each leaf replaced by the leaf of `source` at the same path.

    Raises ValueError naming `where` and the parameter path on a shape mismatch, on a source leaf
    the target does not have, and (unless allow_missing) on a target leaf the source lacks.
    """
    src = _flatten(source)
    tgt = _flatten(target)
    unexpected = sorted(set(src) - set(tgt))
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} entries the model does not have, e.g. '{unexpected[0]}' "
                         f"(model entries look like '{next(iter(tgt), '')}')")
    missing = sorted(set(tgt) - set(src))
    if missing and not allow_missing:
        raise ValueError(f"{where}: {len(missing)} model entries missing, e.g. '{missing[0]}'")
    for path, value in src.items():
        if tuple(np.shape(value)) != tuple(np.shape(tgt[path])):
            raise ValueError(f"{where}: '{path}' has shape {tuple(np.shape(value))}, the model needs "
                             f"{tuple(np.shape(tgt[path]))}")

    def pick(kp, leaf):
        path = mesh_lib.path_str(kp)
        return np.asarray(src[path], dtype=np.asarray(leaf).dtype) if path in src else leaf

    return jax.tree_util.tree_map_with_path(pick, target)


# Directories written before `patch_order` was recorded: (metadata kind, method) -> the model family it
# trained, whose patch order it learnt (a pretraining teacher by its method, a converted SSL checkpoint).
LEGACY_FAMILIES = {("token_vit", "lafs"): "part_fvit", ("token_vit", "dino"): "fvit", ("lafs_ssl", None): "part_fvit"}


def source_patch_order(metadata: dict) -> tuple[str, str | None]:
    """(pretraining method or kind, patch order) a variables directory's metadata records or implies.

    Directories written before `patch_order` was recorded: by LEGACY_FAMILIES, or a converted or
    fine-tuned backbone by its model config's kind; None when nothing says.
    """
    method = metadata.get("method") or metadata.get("kind") or "unknown"
    order = metadata.get("patch_order")
    if order is None:
        kind = metadata.get("kind")
        family = LEGACY_FAMILIES.get((kind, metadata.get("method") if kind == "token_vit" else None))
        if kind not in ("token_vit", "lafs_ssl") and isinstance(metadata.get("model"), dict):
            family = metadata["model"].get("kind")
        order = presets.KIND_PATCH_ORDER.get(family)
    return str(method), order


def check_patch_order(config: ml_collections.ConfigDict, metadata: dict, where: str) -> None:
    """ConfigError when the loaded backbone's patch embedding was trained on another patch layout
    than config.model feeds, unless config.init.allow_patch_order_change."""
    method, order = source_patch_order(metadata)
    want = presets.patch_order(config.model)
    if order is None or want is None or order == want or config.init.allow_patch_order_change:
        return
    raise ConfigError(
        f"{where}: pretrained by {method!r} on {order!r} patches (the layout its patch embedding learnt), but "
        f"model.kind={config.model.kind!r} feeds {want!r} patches (presets.PATCH_ORDERS): its patch embedding and "
        f"positions would see a layout they never saw. Set config.init.allow_patch_order_change=True to transfer anyway (the LAFS paper's "
        f"Table 7 row (4)).")


def initial_variables(config: ml_collections.ConfigDict, variables: dict, hooks=None) -> tuple[dict, str]:
    """The model's starting variables per `config.init` and the active methods (`hooks`, default
    `methods.finetune_hooks(config)`), and a one-line description of the source."""
    variables = jax.tree.map(np.asarray, variables)
    params = dict(variables["params"])
    stats = dict(variables.get("batch_stats", {}))
    origin = "scratch"
    if config.init.backbone:
        stored = variables_lib.stored_structure(config.init.backbone)
        # the model's collections only (a converted checkpoint may also hold a classifier or another head)
        loaded, meta = variables_lib.load_variables(config.init.backbone,
                                                    variables_lib.subtrees(stored, ("params",), ("batch_stats",)) or stored)
        src_params = loaded.get("params", loaded)
        kind = config.init.kind
        if kind == "auto":
            kind = "token_vit" if ("vit" in params and "vit" not in src_params) else "backbone"
        where = f"config.init.backbone={config.init.backbone!r} (init.kind={kind!r})"
        check_patch_order(config, meta or {}, where)
        if kind == "token_vit":
            if "vit" not in params:
                raise ConfigError(f"{where}: model.kind={config.model.kind!r} has no 'vit' submodule to load a "
                                  f"TokenViT into")
            params["vit"] = merge_variables(params["vit"], src_params, where)
        else:
            params = merge_variables(params, src_params, where)
            if stats and "batch_stats" in loaded:
                stats = merge_variables(stats, loaded["batch_stats"], where + " batch_stats")
        origin = f"{kind} from {config.init.backbone}"
    out = {"params": params}
    if stats:
        out["batch_stats"] = stats
    for hook in methods.finetune_hooks(config) if hooks is None else hooks:
        out, note = hook.initialize(out)
        if note:
            origin += f"; {note}"
    return out, origin
