"""Rules on parameter paths: (regex, factor) pairs, the layer ids of layer-wise lr decay, the no-decay set.

A rule is `(regex, factor)`; `re.search` on a parameter's 'a/b/c' path (`lafs_jax.sharding.path_str`),
first match wins. `lafs_jax.train.optim` turns lists of them into optimizer groups. Layer ids follow the
official `param_groups_lrd` numbering: parameters matching a `layer0_regexes` entry (a module in front
of the ViT, e.g. a method's own stem) -> 0, ViT block i -> i + 1, patch embedding / class token /
positions -> 0, everything else -> depth + 1.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np

from lafs_jax.sharding import path_str

# The ViT block index is group 1 of BLOCK_REGEX.
BLOCK_REGEX = r"(?:^|/)(?:block|blocks|layers|encoderblock)_(\d+)(?:/|$)"
# Patch embedding, class token, positional embedding: layer id 0.
EMBED_REGEX = (r"(?:^|/)(?:cls|cls_token|pos_embed|pos_embedding|embedding|patch_embed|patch_embedding|"
               r"patch_to_embedding|global_token)(?:/|$)")

Mults = Sequence[tuple[str, Any]]  # ((regex, factor), ...); re.search on the path, first match wins


def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _leaf_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def paths(params: Any) -> list[str]:
    """The 'a/b/c' paths of every leaf of `params`, in tree order."""
    return [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _exact(path: str) -> str:
    """A regex matching exactly this path (how generated per-tensor rules are written)."""
    return "^" + re.escape(path) + "$"


def check_mults(rules: Any, name: str, *, allow_none: bool, error: type = ValueError) -> None:
    """Raise `error` naming `name[i]` unless `rules` is a sequence of (valid regex, factor) pairs.

    Factors: finite numbers > 0 for lr rules (None = frozen when allow_none), >= 0 for wd rules.
    """
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise error(f"{name}={rules!r} is not valid: a sequence of (regex, factor) pairs")
    for i, entry in enumerate(rules):
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2 \
                or not isinstance(entry[0], str):
            raise error(f"{name}[{i}]={entry!r} is not valid: a (regex, factor) pair")
        pattern, factor = entry
        try:
            re.compile(pattern)
        except re.error as e:
            raise error(f"{name}[{i}]: {pattern!r} is not a valid regex: {e}") from None
        if factor is None and allow_none:
            continue
        ok = (isinstance(factor, (int, float, np.floating, np.integer)) and not isinstance(factor, bool)
              and math.isfinite(factor) and (factor > 0 if allow_none else factor >= 0))
        if not ok:
            want = "a finite number > 0, or None to freeze" if allow_none else "a finite number >= 0"
            raise error(f"{name}[{i}]: factor {factor!r} of {pattern!r} is not valid: {want}")


def compiled(rules: Mults) -> list[tuple[re.Pattern, Any]]:
    return [(re.compile(p), f) for p, f in rules]


def first(path: str, rules: list[tuple[re.Pattern, Any]], default: Any) -> Any:
    """The factor of the first compiled rule whose regex matches `path`, else `default`."""
    return next((f for r, f in rules if r.search(path)), default)


def match_mults(params: Any, rules: Mults, default: Any) -> dict[str, Any]:
    """{'a/b/c' path: factor of the first rule whose regex matches it (re.search), or `default`}
    for every leaf of `params`."""
    rules_ = compiled(rules)
    return {path: first(path, rules_, default) for path in paths(params)}


def unmatched_rules(params: Any, rules: Mults) -> list[int]:
    """Indices of the rules whose regex matches no path of `params`."""
    all_paths = paths(params)
    return [i for i, (r, _) in enumerate(compiled(rules)) if not any(r.search(path) for path in all_paths)]


def layer_id(path: str, depth: int, *, block_regex: str = BLOCK_REGEX, embed_regex: str = EMBED_REGEX,
             layer0_regexes: Sequence[str] = ()) -> int:
    """Layer id of one parameter for layer-wise lr decay (official `param_groups_lrd` numbering).

    A match of any `layer0_regexes` -> 0; ViT block i -> i + 1; patch embedding / class token /
    positions -> 0; everything else (final norm, heads, ...) -> depth + 1. Checked in that order, so a
    block inside a layer-0 module stays 0.
    """
    if any(re.search(r, path) for r in layer0_regexes):
        return 0
    m = re.search(block_regex, path)
    if m:
        i = int(m.group(1))
        if not 0 <= i < depth:
            raise ValueError(f"parameter '{path}': block index {i} is outside 0..{depth - 1} (depth {depth})")
        return i + 1
    if re.search(embed_regex, path):
        return 0
    return depth + 1


def model_depth(params: Any, block_regex: str = BLOCK_REGEX, layer0_regexes: Sequence[str] = ()) -> int:
    """1 + the largest block index among parameter paths outside the layer-0 modules (0 if none)."""
    indices = []
    for path in paths(params):
        if any(re.search(r, path) for r in layer0_regexes):
            continue
        m = re.search(block_regex, path)
        if m:
            indices.append(int(m.group(1)))
    return max(indices) + 1 if indices else 0


def layer_decay_mults(params: Any, layer_decay: float, depth: int | None = None, *, block_regex: str = BLOCK_REGEX,
                      embed_regex: str = EMBED_REGEX, layer0_regexes: Sequence[str] = ()) -> list[tuple[str, float]]:
    """lr rules of layer-wise decay: (exact path, layer_decay^(depth + 1 - layer_id)) for every tensor
    whose factor is not 1 (depth inferred from the block indices if None). [] for layer_decay 1."""
    if layer_decay == 1.0:
        return []
    if depth is None:
        depth = model_depth(params, block_regex, layer0_regexes)
    if depth == 0:
        raise ValueError(f"layer-wise lr decay {layer_decay}: no parameter path matches the block regex "
                         f"{block_regex!r} (set config.optim.block_regex to the model's block names)")
    rules = []
    for path in paths(params):
        lid = layer_id(path, depth, block_regex=block_regex, embed_regex=embed_regex, layer0_regexes=layer0_regexes)
        factor = float(layer_decay ** (depth + 1 - lid))
        if factor != 1.0:
            rules.append((_exact(path), factor))
    return rules


def no_decay_mults(params: Any) -> list[tuple[str, float]]:
    """wd rules with factor 0 for the tensors that get no weight decay in both official recipes:
    biases and tensors with ndim < 2 (norm scales). Class token and positions (ndim 3) are decayed."""
    rules = [(r"(?:^|/)bias$", 0.0)]
    for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(kp)
        if len(_shape(x)) < 2 and _leaf_name(path) != "bias":
            rules.append((_exact(path), 0.0))
    return rules
