"""LVFace's loss curriculum: a list of phases by epoch over Partial FC and EPL class prototypes.

LVFace (arXiv 2501.13420, its losses and curriculum) trains in phases: first negative-class sub-sampling (Partial
FC, r < 1) for fast alignment from random initialisation, then empirical class prototypes (EPL:
each class's running mean feature, used with a similarity-proportional margin) and no sampling;
the later version adds a last full-softmax phase. Both are configurations of this module:

    phases = (phase(epochs=40, sample_rate=0.3),
              phase(epochs=60, sample_rate=1.0, prototypes='add'))       # LVFace v1
    i, p = phase_for_epoch(phases, epoch)
    loss, metrics = phase_loss(emb, labels, centers, protos, key, mesh=mesh, num_classes=C, phase=p)
    if p.update_prototypes: protos = update_prototypes(protos, emb, labels, mesh=mesh, num_classes=C)

Phase fields (all have defaults in `phase()`): epochs (length of the phase), sample_rate, the margin
(m1, m2, m3, s, fallback; ArcFace by default as LVFace), prototypes ('none' | 'add' | 'replace':
prototype logits averaged with the W logits, or used instead of W), prototype_k (EPL's k = 0.7),
prototype_margin (also apply the combined margin to the prototype logits, as ArcFace-EPL does),
update_prototypes (run the EPL update in this phase, so prototypes are warm when a later phase uses
them). Epochs past the last phase stay in the last phase.

Prototype state E has W's layout (`init_prototypes`: random unit rows, sharded by rows over every
device). `update_prototypes` is EPL's rule, per class y of the batch:
    x̄_y = normalize(weighted mean of the normalized features labelled y)
    α = softsign(cos(E_y, x̄_y)) = c / (1 + |c|)
    E_y ← normalize(α·E_y + (1 − α)·x̄_y)
With one sample per class this is EPL's per-sample update exactly. With several samples of a class
in a batch EPL's code computes every sample's update from the old E and writes them all to E[y]: the
last write wins, so only the class's last sample in batch order moves its prototype and the others
are discarded. Here the class's (normalised) features are averaged first and E_y moves once towards
their mean: every sample counts, the result does not depend on the batch order, and it is the same
on any device count (a scatter with duplicate indices has no defined order in XLA). The two agree
when a class appears once in the batch (tests/test_lvface.py checks both against NumPy).
Mixup weights each sample by lam for `label` and 1 − lam for `label2`. The update runs inside a
shard_map: every device gathers the global batch's features and labels and updates its own rows.

Fine-tuning runs a curriculum as `config.curriculum` (a tuple of `phase()`s; configs/lvface.py) through
the hooks of `lafs_jax.methods.lvface.finetune`. `phase()` also takes the LVFace issue's spelling and
stores these fields: prototypes off | epl -> 'none' | 'add' (EPL's stacked logits = the mean of the two
cross-entropies), epl_k -> prototype_k, margin 'arcface' | 'cosface' | (m1, m2, m3) -> m1, m2, m3.

Written by hand: no library implements EPL or LVFace's curriculum.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from lafs_jax.config import ConfigError
from lafs_jax.losses import partial_fc
from lafs_jax.losses.margin import FALLBACKS, check_margin
from lafs_jax.numerics import l2_normalize

PHASE_FIELDS = ("epochs", "sample_rate", "m1", "m2", "m3", "s", "fallback", "prototypes", "prototype_k",
                "prototype_margin", "update_prototypes")
# The LVFace issue's spelling, accepted by `phase()`: prototypes 'off' | 'epl', epl_k, margin.
PROTOTYPE_ALIASES = {"off": "none", "epl": "add"}
MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4)}  # (m1, m2, m3) of a named margin


def phase(**overrides: Any) -> ml_collections.ConfigDict:
    """One curriculum phase with LVFace's defaults (ArcFace s=64 m=0.5, Partial FC r=0.3), overridden.

    Also takes the LVFace issue's spelling: prototypes='off' | 'epl' (= 'none' | 'add'), epl_k=
    (= prototype_k), margin='arcface' | 'cosface' | (m1, m2, m3) (sets m1, m2, m3; CosFace also
    fallback 'none')."""
    overrides = dict(overrides)
    if "epl_k" in overrides:
        if "prototype_k" in overrides:
            raise ConfigError("curriculum phase: give epl_k or prototype_k, not both")
        overrides["prototype_k"] = overrides.pop("epl_k")
    if overrides.get("prototypes") in PROTOTYPE_ALIASES:
        overrides["prototypes"] = PROTOTYPE_ALIASES[overrides["prototypes"]]
    if "margin" in overrides:
        margin = overrides.pop("margin")
        if isinstance(margin, str):
            if margin not in MARGINS:
                raise ConfigError(f"curriculum phase: margin={margin!r} is not one of {sorted(MARGINS)} or an "
                                  f"(m1, m2, m3) triple")
            if margin == "cosface":
                overrides.setdefault("fallback", "none")
            margin = MARGINS[margin]
        if len(tuple(margin)) != 3:
            raise ConfigError(f"curriculum phase: margin={margin!r} must be a name or an (m1, m2, m3) triple")
        for name, value in zip(("m1", "m2", "m3"), margin):
            if name in overrides:
                raise ConfigError(f"curriculum phase: give margin or {name}, not both")
            overrides[name] = float(value)
    c = ml_collections.ConfigDict()
    c.epochs = 1  # length of this phase in epochs
    c.sample_rate = 0.3  # Partial FC negative sampling; 1.0 = every class (sampling off)
    c.m1 = 1.0  # combined margin cos(m1·θ + m2) − m3
    c.m2 = 0.5
    c.m3 = 0.0
    c.s = 64.0  # logit scale
    c.fallback = "th_mm"  # ArcFace's easy_margin=False guard ('none' | 'th_mm' | 'easy')
    c.prototypes = "none"  # EPL prototypes: 'none' | 'add' (averaged with W's loss) | 'replace' (instead of W)
    c.prototype_k = 0.7  # similarity-proportional margin: target cosine v -> v − k·stop_grad(v)
    c.prototype_margin = False  # also apply the combined margin to prototype logits (ArcFace-EPL)
    c.update_prototypes = True  # run the EPL update in this phase
    for k, v in overrides.items():
        if k not in c:
            raise ConfigError(f"curriculum phase has no field {k!r}; fields are {PHASE_FIELDS}")
        c[k] = v
    return c


def lvface_v1_phases(stage1_epochs: int = 40, stage2_epochs: int = 60) -> tuple:
    """LVFace v1: ArcFace + Partial FC r=0.3, then sampling off with EPL prototypes added."""
    return (phase(epochs=stage1_epochs, sample_rate=0.3),
            phase(epochs=stage2_epochs, sample_rate=1.0, prototypes="add"))


def pco_phases(ncs_epochs: int, prototype_epochs: int, full_epochs: int) -> tuple:
    """LVFace's Progressive Cluster Optimization: NCS, then prototypes, then full softmax without NCS."""
    return (phase(epochs=ncs_epochs, sample_rate=0.3),
            phase(epochs=prototype_epochs, sample_rate=0.3, prototypes="add"),
            phase(epochs=full_epochs, sample_rate=1.0, update_prototypes=False))


def validate_phases(phases: Sequence[Mapping[str, Any]], key: str = "loss.phases") -> None:
    """ConfigError naming `key[i].field` for the first bad value."""
    if len(phases) == 0:
        raise ConfigError(f"config.{key} is empty; give at least one phase")
    for i, p in enumerate(phases):
        name = f"config.{key}[{i}]"
        unknown = sorted(set(p) - set(PHASE_FIELDS))
        missing = [f for f in PHASE_FIELDS if f not in p]
        if unknown or missing:
            raise ConfigError(f"{name} has unknown fields {unknown} / lacks {missing}; use curriculum.phase()")
        if not (isinstance(p["epochs"], int) and p["epochs"] >= 1):
            raise ConfigError(f"{name}.epochs={p['epochs']!r} must be an int >= 1")
        if not 0.0 < p["sample_rate"] <= 1.0:
            raise ConfigError(f"{name}.sample_rate={p['sample_rate']!r} must be in (0, 1]")
        if p["prototypes"] not in partial_fc.PROTOTYPE_MODES:
            raise ConfigError(f"{name}.prototypes={p['prototypes']!r} is not one of {partial_fc.PROTOTYPE_MODES}")
        if p["fallback"] not in FALLBACKS:
            raise ConfigError(f"{name}.fallback={p['fallback']!r} is not one of {FALLBACKS}")
        if not 0.0 <= p["prototype_k"] < 1.0:
            raise ConfigError(f"{name}.prototype_k={p['prototype_k']!r} must be in [0, 1)")
        try:
            check_margin(p["m1"], p["m2"], p["m3"], p["s"], p["fallback"])
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None


def phase_for_epoch(phases: Sequence[Mapping[str, Any]], epoch: int) -> tuple[int, Mapping[str, Any]]:
    """(index, phase) in force at 0-based `epoch`; epochs past the end stay in the last phase."""
    if epoch < 0:
        raise ValueError(f"phase_for_epoch: epoch={epoch} must be >= 0")
    end = 0
    for i, p in enumerate(phases):
        end += p["epochs"]
        if epoch < end:
            return i, p
    return len(phases) - 1, phases[-1]


def phase_loss(embeddings: jax.Array, batch_labels: Mapping[str, jax.Array], centers: jax.Array | None,
               prototypes: jax.Array | None, key: jax.Array, *, mesh: Mesh, num_classes: int,
               phase: Mapping[str, Any]) -> tuple[jax.Array, dict]:
    """The loss of one phase: Partial FC with the phase's sampling, margin and prototype use."""
    return partial_fc.partial_fc_loss(
        embeddings, batch_labels, centers, key, mesh=mesh, num_classes=num_classes,
        sample_rate=phase["sample_rate"], m1=phase["m1"], m2=phase["m2"], m3=phase["m3"], s=phase["s"],
        fallback=phase["fallback"], prototypes=prototypes if phase["prototypes"] != "none" else None,
        prototype_mode=phase["prototypes"], prototype_k=phase["prototype_k"],
        prototype_margin=phase["prototype_margin"])


def init_prototypes(key: jax.Array, num_classes: int, dim: int, mesh: Mesh) -> jax.Array:
    """E[C_pad, dim]: random unit rows (padding rows zero), sharded like the class centres."""
    rows = partial_fc.padded_rows(num_classes, mesh)

    def make(k):
        e = jax.random.normal(k, (rows, dim), jnp.float32)
        e = l2_normalize(e)
        return jnp.where(jnp.arange(rows)[:, None] < num_classes, e, 0.0)

    return jax.jit(make, out_shardings=partial_fc.centers_sharding(mesh))(key)


def update_prototypes(prototypes: jax.Array, embeddings: jax.Array, batch_labels: Mapping[str, jax.Array], *,
                      mesh: Mesh, num_classes: int) -> jax.Array:
    """EPL update of E[C_pad, D] from a global batch (embeddings [B, D], labels as partial_fc_loss).

    No gradient flows (features are detached). Rows of classes absent from the batch are unchanged.
    """
    n = partial_fc.num_shards(mesh)
    if prototypes.ndim != 2 or prototypes.shape[0] % n or prototypes.shape[0] < num_classes:
        raise ValueError(f"update_prototypes: prototypes {prototypes.shape} must be [C_pad >= {num_classes}, D] "
                         f"with C_pad a multiple of {n}")
    if embeddings.shape[0] % n or embeddings.shape[1:] != prototypes.shape[1:]:
        raise ValueError(f"update_prototypes: embeddings {embeddings.shape} must be [B, {prototypes.shape[1]}] "
                         f"with B a multiple of {n}")
    axes = tuple(mesh.axis_names)

    def body(e_local, x_local, lab_local, lab2_local, lam_local):
        r = e_local.shape[0]
        start = lax.axis_index(axes) * r
        x = l2_normalize(lax.all_gather(lax.stop_gradient(x_local), axes, tiled=True).astype(jnp.float32))
        labels = jnp.concatenate([lax.all_gather(lab_local, axes, tiled=True),
                                  lax.all_gather(lab2_local, axes, tiled=True)]) - start
        lam = lax.all_gather(lam_local, axes, tiled=True).astype(jnp.float32)
        weight = jnp.concatenate([lam, 1.0 - lam])
        own = (labels >= 0) & (labels < r) & (weight > 0)
        segment = jnp.where(own, labels, r)  # r collects everything this shard does not own
        weight = jnp.where(own, weight, 0.0)
        sums = jax.ops.segment_sum(weight[:, None] * jnp.concatenate([x, x]), segment, num_segments=r + 1)[:r]
        counts = jax.ops.segment_sum(weight, segment, num_segments=r + 1)[:r]
        mean = l2_normalize(sums)
        cos = jnp.sum(e_local * mean, axis=1, keepdims=True)
        alpha = cos / (1.0 + jnp.abs(cos))  # softsign
        new = l2_normalize(alpha * e_local + (1.0 - alpha) * mean)
        return jnp.where(counts[:, None] > 0, new, e_local).astype(prototypes.dtype)

    rows_spec, batch_spec = P(axes, None), P(axes)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(rows_spec, batch_spec, batch_spec, batch_spec, batch_spec),
                       out_specs=rows_spec)
    return fn(prototypes, embeddings, jnp.asarray(batch_labels["label"], jnp.int32),
              jnp.asarray(batch_labels["label2"], jnp.int32), jnp.asarray(batch_labels["lam"], jnp.float32))
