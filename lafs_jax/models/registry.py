"""Backbone families by name: `config.model.kind` -> how that backbone is built and checked.

Every backbone is a Linen module called as `model.apply(variables, images [B, H, W, C] normalised,
train=bool)` that returns `(embedding [B, D] float32, aux)`, where aux is a dict of the family's
extra outputs, keyed as its `Family.aux_keys` say (e.g. Part fViT's {'landmarks': [B, R, 2]}; {} for
a family without any). `split_output` checks that form.

A family is added by one `register(name, Family(...))` call; `presets` registers the ones it builds
and dispatches every "which family" question (building, validation, patch order, config sections)
through `get`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from lafs_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    """What the code needs to know about one backbone family.

    build: model config -> Linen module following the (embedding, aux) convention; the config has
      passed `presets.validate_model_config` already.
    patch_order: layout of the patch vectors its patch embedding reads ('landmarks' | 'grid'), or None
      for a backbone with its own image stem (recorded in variables metadata, compared on transfer).
    aux_keys: the keys of its aux dict.
    landmark_cnn: its variables hold a `landmark_cnn` submodule (a LandmarkCNN of the config's
      `landmark` section) that can be frozen, loaded on its own or regularised.
    validate: (model config, key prefix such as 'model') -> None, the family's own checks on top of
      the shared ones; raises ConfigError naming `config.<prefix>.<key>`.
    sections: {name: preset name -> ConfigDict of that section's defaults} of the config sections the
      family reads (`config.model.<name>`, e.g. part_fvit's 'landmark'): `presets.model_config` gives a
      preset only its family's sections, and `presets.validate_model_config` requires them.
    """

    build: Callable[[Any], Any]
    patch_order: str | None = None
    aux_keys: tuple[str, ...] = ()
    landmark_cnn: bool = False
    validate: Callable[[Any, str], None] | None = None
    sections: Mapping[str, Callable[[str], Any]] = dataclasses.field(default_factory=dict)


_FAMILIES: dict[str, Family] = {}


def register(name: str, family: Family) -> Family:
    """Add `family` under `name` (the value of config.model.kind); a name already taken is a ValueError."""
    if not isinstance(family, Family):
        raise TypeError(f"register({name!r}, ...): expected a Family, got {type(family).__name__}")
    if name in _FAMILIES:
        raise ValueError(f"model family {name!r} is already registered")
    _FAMILIES[name] = family
    return family


def get(name: str) -> Family:
    """The family registered as `name`; ConfigError naming config.model.kind and the registered names."""
    try:
        return _FAMILIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"config.model.kind={name!r} is not valid: choose one of the registered model "
                          f"families {list(names())}") from None


def names() -> tuple[str, ...]:
    """Registered family names, in registration order."""
    return tuple(_FAMILIES)


def split_output(out: Any) -> tuple[Any, dict]:
    """(embedding, aux) of a backbone's output; TypeError for anything that is not such a pair."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
        raise TypeError(f"a backbone must return (embedding, aux dict), got {type(out).__name__}")
    return out[0], out[1]
