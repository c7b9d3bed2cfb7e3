"""The one device mesh of a run, parameter shardings from regex rules, and global batches.

Shared infrastructure below models/, losses/, input/ and the tasks (train/, eval/, convert/): it
imports nothing of lafs_jax.

Axes are ('data', 'model') with Auto axis types (GSPMD-style propagation; explicit collectives only
inside `jax.shard_map`, e.g. the Partial FC loss). The batch's leading axis is split over *all*
devices (both axes), so a pure data-parallel run and a run with a 'model' axis feed the same batch.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")


def _topology() -> str:
    return f"{jax.process_count()} process(es) x {jax.local_device_count()} local {jax.default_backend()} device(s)"


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
    """Resolve -1 entries: (data, model) whose product is `num_devices`, or a ValueError naming the axis."""
    shape = [data, model]
    if shape.count(-1) > 1:
        raise ValueError("config.mesh: at most one of data/model may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"config.mesh: the {num_devices} available devices ({_topology()}) do not divide by "
                             f"the fixed axis size {known} (config.mesh.data={data}, config.mesh.model={model})")
        shape[shape.index(-1)] = num_devices // known
    if shape[0] * shape[1] != num_devices:
        raise ValueError(f"config.mesh: data={shape[0]} x model={shape[1]} = {shape[0] * shape[1]} devices, but "
                         f"{num_devices} are available ({_topology()}); set config.mesh.data=-1 to use them all")
    return shape[0], shape[1]


def make_mesh(mesh_config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh ('data', 'model') over `devices` (default: all) from `config.mesh` (fields data, model)."""
    devices = list(devices if devices is not None else jax.devices())
    data = getattr(mesh_config, "data", -1) if mesh_config is not None else -1
    model = getattr(mesh_config, "model", 1) if mesh_config is not None else 1
    shape = mesh_shape(int(data), int(model), len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def path_str(keypath) -> str:
    """'a/b/c' for a jax tree key path (dict keys, attributes, sequence indices)."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


FSDP = "fsdp"
"""Spec value of a rule that splits the parameter ZeRO-3 style (see `fsdp_spec`): `(regex, FSDP)`."""
FSDP_MIN_SIZE = 2 ** 10
"""Parameters with fewer elements stay replicated under FSDP (biases, norms: gathering costs more)."""
FSDP_RULES = ((r".*", FSDP),)
"""`config.sharding_rules` preset: fully sharded data parallel (ZeRO-3). Every parameter of at least
FSDP_MIN_SIZE elements with a dimension divisible by the 'data' axis is split over 'data' along
its largest such dimension; the optimizer moments follow their parameters (same shape, same
spec), so parameters, gradients and Adam moments take 1/data of the memory each. GSPMD gathers a
parameter where a step needs it whole. Put model-axis rules before it (first match wins):
`sharding_rules = (('mlp/fc1/kernel$', (None, 'model')),) + FSDP_RULES`; on the command line
`--config.sharding_rules="(('.*', 'fsdp'),)"`."""


def fsdp_spec(shape: Sequence[int], mesh: Mesh, axis: str = "data", min_size: int = FSDP_MIN_SIZE) -> P:
    """PartitionSpec splitting the largest dimension of `shape` divisible by the size of `axis` (the
    first of equal ones) over `axis`; P() for small or indivisible shapes, or a 1-wide axis."""
    n = int(mesh.shape[axis]) if axis in mesh.axis_names else 1
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % n == 0]
    if not candidates:
        return P()
    best = max(candidates, key=lambda i: (shape[i], -i))
    return P(*([None] * best + [axis]))


def match_rule(path: str, rules: Sequence[tuple[str, Any]]) -> Any:
    """The spec of the first rule whose regex matches `path` (re.search): a PartitionSpec, or FSDP;
    P() if none matches. A spec that is neither a sequence of entries nor FSDP raises a ValueError."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            if isinstance(spec, str):
                if spec != FSDP:
                    raise ValueError(f"sharding rule ({pattern!r}, {spec!r}): a spec is a sequence of mesh axis "
                                     f"names / None per dimension, e.g. (None, 'model'), or {FSDP!r}")
                return FSDP
            return P(*spec)
    return P()


def _axis_names(entry) -> tuple:
    return tuple(n for n in (entry if isinstance(entry, tuple) else (entry,)) if n is not None)


def param_shardings(params: Any, rules: Sequence[tuple[str, Any]], mesh: Mesh) -> Any:
    """A pytree of NamedSharding matching `params` (arrays or ShapeDtypeStructs).

    Rules are (regex on the 'a/b/c' path, spec), first match wins, unmatched leaves replicated; a
    spec of FSDP resolves per leaf with `fsdp_spec`. A ValueError naming the parameter path is
    raised when a spec has more entries than the parameter has dimensions, names an axis the mesh
    does not have, or splits a dimension that the axis size does not divide.
    """
    axis_sizes = dict(mesh.shape)

    def one(keypath, leaf):
        path = path_str(keypath)
        shape = tuple(np.shape(leaf))
        spec = match_rule(path, rules)
        if isinstance(spec, str):  # FSDP
            spec = fsdp_spec(shape, mesh)
        if len(spec) > len(shape):
            raise ValueError(f"sharding rule {spec} for parameter '{path}' has more entries than its "
                             f"shape {shape}")
        for dim, entry in enumerate(spec):
            names = _axis_names(entry)
            for name in names:
                if name not in mesh.axis_names:
                    raise ValueError(f"sharding rule {spec} for parameter '{path}' names axis {name!r}; "
                                     f"the mesh has {mesh.axis_names}")
            ways = int(np.prod([axis_sizes[n] for n in names], dtype=np.int64))
            if shape[dim] % ways:
                raise ValueError(f"sharding rule {spec} for parameter '{path}' splits dimension {dim} of shape "
                                 f"{shape} ({shape[dim]}) over {names} = {ways} devices, which does not divide it "
                                 f"(mesh {axis_sizes})")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, params)


def state_shardings(state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of a train state (a pytree of arrays or ShapeDtypeStructs) that holds `params`, their
    optimizer state and other copies of them (an EMA teacher stored under the same key paths).

    A leaf whose key path ends with a parameter's path and that has the parameter's shape (the
    parameter itself at 'params/a/b', an Adam moment at 'opt_state/.../mu/a/b', a teacher at
    'teacher/a/b') takes that parameter's entry of `param_shardings` (a pytree matching `params`); the
    longest such path wins. Every other leaf (step, counts, injected hyperparameters, RNG keys,
    statistics) is replicated.

    Matching by path, not `optax.tree_utils.tree_map_params`: that one initialises the optimizer on
    a placeholder, which the label and mask functions of optax.partition / optax.masked cannot read.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    shardings = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(flat) != len(shardings):
        raise ValueError(f"state_shardings: {len(flat)} parameters but {len(shardings)} parameter shardings")
    by_path = {path_str(kp): (tuple(np.shape(x)), s) for (kp, x), s in zip(flat, shardings)}
    default = replicated(mesh)

    def one(keypath, leaf):
        parts = path_str(keypath).split("/")
        for i in range(len(parts)):  # longest suffix first
            hit = by_path.get("/".join(parts[i:]))
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(one, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Host-local numpy batch (this process's rows) -> global jax arrays sharded over all devices.

    Each process passes its own slice; the global batch size is local size x process count.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


def compiled_memory(compiled: Any) -> dict:
    """Per-device bytes of a compiled program (`jax.jit(f).lower(...).compile()`), from XLA's
    `memory_analysis()`: 'argument', 'output', 'temp', 'alias' (donated inputs reused as outputs) and
    'peak' = argument + output + temp − alias."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of jax.Arrays / ShapeDtypeStructs with shardings: each leaf's
    shard (`sharding.shard_shape`; the whole array for a leaf without a sharding) x its itemsize,
    summed. Nothing is computed or transferred (abstract trees work)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def local_batch_size(global_size: int, mesh: Mesh, name: str = "global batch size") -> int:
    """Rows this process must load for a global batch of `global_size`; a ValueError naming `name`
    (e.g. 'config.batch_size') when the mesh's devices do not divide it."""
    n = mesh.devices.size
    if global_size % n:
        raise ValueError(f"{name}={global_size} does not divide by the {n} devices of the mesh {dict(mesh.shape)} "
                         f"({jax.process_count()} process(es)); use a multiple of {n}")
    return global_size // jax.process_count()
