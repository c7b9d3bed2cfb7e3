"""Config plumbing shared by every recipe in configs/: base fields, task registry, validation.

A recipe is a Python file with `get_config(arg=None) -> ml_collections.ConfigDict`. It starts from
`base_config()` so that the fields every task reads (task, seed, mesh, sharding rules) exist with a
default, and it returns the dict locked: an override of a key that does not exist, or with a value
of the wrong type, fails when the flags are parsed, naming the key.
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections



class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
    """Fields every task reads. Recipes add their own sections and then call `.lock()`."""
    c = ml_collections.ConfigDict()
    c.task = "info"  # the task main.py runs: one of main.TASK_RUNNERS
    c.seed = 0  # root of every jax.random key and Grain seed of the run
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the 'data' axis; -1 = all devices not used by other axes
    c.mesh.model = 1  # devices on the 'model' axis (tensor parallelism); 1 = pure data parallel
    # Parameter sharding rules: (regex on 'a/b/c' parameter path, PartitionSpec entries); first match
    # wins, unmatched parameters are replicated. The class-centre matrix is sharded by its own code.
    c.sharding_rules = ()
    return c


def _choices_error(key: str, value: Any, choices) -> ConfigError:
    return ConfigError(f"config.{key}={value!r} is not valid; choose one of {sorted(choices)}")


def check_choice(config: ml_collections.ConfigDict, key: str, choices) -> None:
    """Raise ConfigError naming `key` unless config[key] is one of `choices`."""
    value = get_path(config, key)
    if value not in choices:
        raise _choices_error(key, value, choices)


def check(condition: bool, key: str, value: Any, requirement: str) -> None:
    """Raise ConfigError naming `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"config.{key}={value!r} is not valid: {requirement}")


def get_path(config: ml_collections.ConfigDict, key: str) -> Any:
    """config['a.b.c'] with a ConfigError naming the missing part."""
    node = config
    for i, part in enumerate(key.split(".")):
        if part not in node:
            raise ConfigError(f"config.{'.'.join(key.split('.')[:i + 1])} is missing")
        node = node[part]
    return node


def check_finite_numbers(config: Any, prefix: str = "config") -> None:
    """Raise ConfigError naming the first float field (also inside tuples / lists) that is NaN or ±inf.

    No field of any recipe means anything with a non-finite value (`optim.lr=inf` would pass a
    `>= 0` range check), so this runs over every field, before the per-field checks.
    """
    if hasattr(config, "items"):
        for key, value in config.items():
            check_finite_numbers(value, f"{prefix}.{key}")
    elif isinstance(config, (tuple, list)):
        for i, value in enumerate(config):
            check_finite_numbers(value, f"{prefix}[{i}]")
    elif isinstance(config, float) and not math.isfinite(config):
        raise ConfigError(f"{prefix}={config!r} is not valid: a finite number (not NaN or inf)")


def validate_common(config: ml_collections.ConfigDict, tasks=None) -> None:
    """Checks of the base fields (and that no float field is NaN / inf), `config.task` among `tasks`
    when given (main.py passes its task list); tasks check their own sections in their run()."""
    check_finite_numbers(config)
    if tasks is not None:
        check_choice(config, "task", tasks)
    for axis in ("data", "model"):
        v = get_path(config, f"mesh.{axis}")
        check(isinstance(v, int) and (v == -1 or v >= 1), f"mesh.{axis}", v, "an int >= 1, or -1")
    for i, rule in enumerate(config.sharding_rules):
        check(isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str),
              f"sharding_rules[{i}]", rule, "a (regex, partition spec) pair")

