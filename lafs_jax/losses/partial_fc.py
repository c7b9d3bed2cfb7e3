"""Partial FC: a margin-softmax classifier whose class-centre matrix is sharded over every device.

Written by hand: no JAX library shards a softmax classifier with sampled negatives. The design is
InsightFace's `partial_fc_v2.py`, in JAX terms:

- W[C_pad, D] (fp32) is split by rows over *all* devices of the mesh, `P(mesh.axis_names, None)`:
  shard k (the linear index over the mesh axes, data-major) owns rows [k·R, (k+1)·R), R = C_pad / N.
  C_pad is C rounded up to a multiple of N; rows ≥ C are padding, never sampled ahead of a real
  class, and their logits are −inf. A checkpoint restores onto another device count with its rows
  re-padded (`padded_rows_rule`); the real rows are identical.
- The loss runs inside `jax.shard_map` (and therefore inside any jitted step). Each shard
  all-gathers the embeddings and labels of the global batch [B, D], samples its rows, computes its
  local cosines [B, S] and takes part in one softmax cross-entropy across shards: the row maximum
  by `pmax`, the sum of exponentials by `psum`, all in fp32. Gradients come from autodiff through
  the collectives (the all-gather's transpose is a reduce-scatter of the embedding gradient).
- Sampling (sample_rate r < 1): each shard keeps every positive class of the global batch it owns
  (`label` and `label2`, both count) and fills up to S = ceil(r·R) rows with negatives drawn by
  `top_k` over uniform scores (positives score 2 + u, so they come first; padding scores −1), with
  the key folded with the shard index: the sample is a pure function of (key, labels). r = 1 takes
  every row and is exactly the dense softmax.
- If a shard owns more distinct positives than S (tiny r with a large batch), S of them are kept
  (a seeded random subset) and the rest are *not* negatives for the other samples of that step.
  Every sample's own target(s) always stay in its softmax: each target logit is computed directly
  from its W row (one extra gathered row per label), and a target missing from the sample is added
  to that sample's denominator. The count of such classes is reported as `positives_dropped`.

Targets follow INTERFACES.md: `lam·onehot(label) + (1 − lam)·onehot(label2)`. Margins are applied
like the official soft-label CosFace head: the target logit of `label` moves by lam·(f(c) − c) and
that of `label2` by (1 − lam)·(f(c) − c) (both when label == label2), f being
`margin.target_cosine`.

Optimiser: `centers_optimizer` builds the optimiser of W, wrapped by default in `lazy_rows`: a row
whose gradient is exactly zero this step (it was not sampled) is not moved at all: neither momentum
nor weight decay touch it, and its optimiser state is kept as it was. With r = 1 every row is
sampled; a sampled row whose gradient underflowed to exactly zero is also left alone that step.
`lazy_rows=False` gives InsightFace's behaviour (momentum and decay move every row every step).
`train.optim.finetune_optimizer(..., centers_tx=)` combines it with the backbone's optimiser for a
params tree `{'backbone': ..., 'centers': W}`; alone, `optax.partition({'backbone': tx, 'centers':
centers_optimizer(...)}, {'backbone': 'backbone', 'centers': 'centers'})` does.

Optional EPL class prototypes (LVFace's second phase; see `curriculum.py`): a non-trainable E with
W's shape and sharding. Prototype logits use the same sampled rows, cosines against stop_grad(E),
and a similarity-proportional margin: the target's cosine v becomes v − k·stop_grad(v) (then, with
`prototype_margin=True`, the combined margin f as well). `prototype_mode='add'` averages the two
cross-entropies (EPL stacks the two logit sets along the batch), `'replace'` uses only E.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lafs_jax.losses.margin import check_margin, target_cosine
from lafs_jax.numerics import l2_normalize

PROTOTYPE_MODES = ("none", "add", "replace")
CENTERS_INITS = ("normal", "xavier_uniform")
LABEL_KEYS = ("label", "label2", "lam")
_NORM_EPS = 1e-12


# ----------------------------------------------------------------------------- layout


def num_shards(mesh: Mesh) -> int:
    """Devices W is split over: all of them."""
    return int(mesh.devices.size)


def padded_rows(num_classes: int, mesh: Mesh) -> int:
    """C rounded up to a multiple of the device count."""
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    n = num_shards(mesh)
    return -(-num_classes // n) * n


def centers_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over every mesh axis (data-major), columns whole."""
    return NamedSharding(mesh, P(mesh.axis_names, None))


def centers_abstract(num_rows: int, dim: int, mesh: Mesh, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    """Abstract W[num_rows, dim] with its sharding on `mesh`: the restore target for orbax.

    A checkpoint written on N devices has num_rows = padded_rows(C, N-device mesh); it restores
    onto any mesh whose device count divides num_rows (e.g. 8 -> 4 -> 2 -> 1).
    """
    if num_rows % num_shards(mesh):
        raise ValueError(f"centers with {num_rows} rows cannot be split over the {num_shards(mesh)} "
                         f"devices of the mesh (rows must divide evenly)")
    return jax.ShapeDtypeStruct((num_rows, dim), dtype, sharding=centers_sharding(mesh))


def padded_rows_rule(num_classes: int) -> dict[str, int]:
    """`TrainCheckpointer.restore(padded_rows=...)` for a train state that keeps W (and, through
    optax.partition, its optimizer moments) under a 'centers' key: those arrays may be stored with
    the row count of another device count; rows [0, num_classes) are restored identical and the
    padding (zero, never sampled, zero gradient) is re-made for this mesh. E.g. the 30 demo classes
    are 32 rows on 8 devices and 30 on 1."""
    return {r"(^|/)centers(/|$)": int(num_classes)}


def init_centers(key: jax.Array, num_classes: int, dim: int, mesh: Mesh, std: float = 0.01,
                 dtype=jnp.float32, init: str = "normal") -> jax.Array:
    """W[C_pad, dim], padding rows zero, created already sharded.

    init 'normal': N(0, std²) (InsightFace Partial FC: std 0.01); 'xavier_uniform': U(−a, a) with
    a = sqrt(6 / (C + dim)), i.e. std sqrt(2 / (C + dim)) over the C real rows (torch's
    xavier_uniform_ on the official CosFace weight [C, dim]; `std` unused).
    """
    if init not in CENTERS_INITS:
        raise ValueError(f"init_centers: init={init!r}; choose one of {CENTERS_INITS}")
    rows = padded_rows(num_classes, mesh)

    def make(k):
        if init == "xavier_uniform":
            w = jax.nn.initializers.glorot_uniform(in_axis=-1, out_axis=-2)(k, (num_classes, dim), dtype)
            return jnp.pad(w, ((0, rows - num_classes), (0, 0)))
        w = std * jax.random.normal(k, (rows, dim), dtype)
        return jnp.where(jnp.arange(rows)[:, None] < num_classes, w, 0).astype(dtype)

    return jax.jit(make, out_shardings=centers_sharding(mesh))(key)


# ----------------------------------------------------------------------------- labels


def check_labels(labels: Mapping[str, Any], num_classes: int) -> None:
    """Host-side check of a batch's label dict; ValueError naming the key and the first bad record.

    Expects `label`, `label2` int [B] in [0, num_classes) and `lam` float [B] in [0, 1].
    """
    missing = [k for k in LABEL_KEYS if k not in labels]
    if missing:
        raise ValueError(f"batch labels lack {missing}; expected keys {LABEL_KEYS}")
    arrays = {k: np.asarray(labels[k]) for k in LABEL_KEYS}
    shape = arrays["label"].shape
    for k, a in arrays.items():
        if a.ndim != 1 or a.shape != shape:
            raise ValueError(f"batch labels['{k}'] has shape {a.shape}; expected [B] = {shape}")
    for k in ("label", "label2"):
        a = arrays[k]
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"batch labels['{k}'] has dtype {a.dtype}; expected an integer type")
        bad = np.flatnonzero((a < 0) | (a >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"batch labels['{k}'][{i}] = {int(a[i])} is outside [0, {num_classes}) "
                             f"({bad.size} record(s) out of range)")
    lam = arrays["lam"]
    bad = np.flatnonzero(~((lam >= 0) & (lam <= 1)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"batch labels['lam'][{i}] = {lam[i]} is outside [0, 1]")


def mixup_targets(batch_labels: Mapping[str, Any], num_classes: int) -> jax.Array:
    """Dense targets [B, C] = lam·onehot(label) + (1 − lam)·onehot(label2) (for dense heads and tests)."""
    lam = jnp.asarray(batch_labels["lam"], jnp.float32)[:, None]
    return (lam * jax.nn.one_hot(batch_labels["label"], num_classes)
            + (1 - lam) * jax.nn.one_hot(batch_labels["label2"], num_classes))


# ----------------------------------------------------------------------------- sampling


def num_sampled(rows_per_shard: int, sample_rate: float) -> int:
    """S = ceil(r·R) rows per shard (static); r = 1 gives R."""
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate={sample_rate} must be in (0, 1]")
    return min(rows_per_shard, max(1, math.ceil(sample_rate * rows_per_shard)))


def sample_rows(key: jax.Array, shard: jax.Array, label: jax.Array, label2: jax.Array, *,
                rows_per_shard: int, num_classes: int, num_sample: int) -> tuple[jax.Array, jax.Array]:
    """Local row indices [S] (sorted) that shard `shard` keeps, and how many positives did not fit.

    label, label2: int [B] global class ids of the whole batch. Positives owned by the shard come
    first (in a seeded random order among themselves), then negatives by uniform score, padding last.
    Pure in (key, shard, labels): the same inputs give the same sample.
    """
    r = rows_per_shard
    start = shard * r
    scores = jax.random.uniform(jax.random.fold_in(key, shard), (r,))
    positive = jnp.zeros((r,), bool)
    for lab in (label, label2):
        local = lab - start
        local = jnp.where((local >= 0) & (local < r), local, r)  # r = out of this shard: dropped
        positive = positive.at[local].set(True, mode="drop")
    scores = jnp.where(positive, 2.0 + scores, scores)
    scores = jnp.where(start + jnp.arange(r) < num_classes, scores, -1.0)
    _, idx = lax.top_k(scores, num_sample)
    dropped = jnp.maximum(jnp.sum(positive) - num_sample, 0)
    return jnp.sort(idx), dropped


# ----------------------------------------------------------------------------- the loss


def _shard_cosines(xn, mat, idx, targets, axes):
    """Cosines of the gathered embeddings xn [B, D] with the sampled rows of `mat` [R, D].

    targets: ((is, inside, loc, own) for label, then for label2): is [B, S] marks the target column,
    inside [B] whether the target is sampled on some shard, loc [B] its local row, own [B] whether
    this shard owns it. Returns (cos [B, S], c1 [B], c2 [B]): the target cosines (replicated), read
    from the cosine matrix where sampled, else from the target's own row (one gather with the rows).
    """
    rows_n = mat.shape[0]
    b = xn.shape[0]
    if idx is None:
        rows = mat.astype(jnp.float32)
    else:
        locs = [jnp.clip(loc, 0, rows_n - 1) for _, _, loc, _ in targets]
        gathered = jnp.take(mat, jnp.concatenate([idx, *locs]), axis=0).astype(jnp.float32)
        rows = gathered[:-2 * b]
        direct_rows = (l2_normalize(gathered[-2 * b:-b]), l2_normalize(gathered[-b:]))
    # Scale the columns by 1/|w| rather than normalising the rows: no normalised copy of W[R, D].
    inv_norm = lax.rsqrt(jnp.maximum(jnp.sum(rows * rows, axis=1), _NORM_EPS))
    cos = (xn @ rows.T) * inv_norm[None, :]
    out = [cos]
    for i, (is_t, inside, _, own) in enumerate(targets):
        from_matrix = lax.psum(jnp.sum(jnp.where(is_t, cos, 0.0), axis=1), axes)
        if idx is None:
            out.append(from_matrix)  # every row is in the sample
        else:
            direct = lax.psum(jnp.where(own, jnp.sum(xn * direct_rows[i], axis=-1), 0.0), axes)
            out.append(jnp.where(inside > 0, from_matrix, direct))
    return tuple(out)


def _sharded_cross_entropy(cos, c1, c2, target_fn: Callable, *, s, lam, same, is1, is2, in1, in2, valid,
                           axes) -> jax.Array:
    """Per-sample softmax CE [B] over the sampled classes of every shard ∪ each sample's targets.

    cos [B, S] local cosines; c1, c2 [B] target cosines (replicated); target_fn maps a target
    cosine to its margin value; is1/is2 [B, S] mark the target columns; in1/in2 [B] whether the
    target is among the sampled columns of some shard; valid [S] real (non-padding) classes.
    """
    d1, d2 = target_fn(c1) - c1, target_fn(c2) - c2
    z = s * (cos + jnp.where(is1, (lam * d1)[:, None], 0.0) + jnp.where(is2, ((1 - lam) * d2)[:, None], 0.0))
    z = jnp.where(valid[None, :], z, -jnp.inf)
    z1 = s * (c1 + lam * d1 + same * (1 - lam) * d2)
    z2 = s * (c2 + (1 - lam) * d2 + same * lam * d1)
    # The shift only stabilises exp; logsumexp does not depend on it, so no gradient flows through it.
    z_max = lax.pmax(jnp.max(lax.stop_gradient(z), axis=1), axes)
    m = jnp.maximum(z_max, lax.stop_gradient(jnp.maximum(z1, z2)))
    sum_exp = lax.psum(jnp.sum(jnp.exp(z - m[:, None]), axis=1), axes)
    sum_exp = sum_exp + (1 - in1) * jnp.exp(z1 - m) + (1 - in2) * (1 - same) * jnp.exp(z2 - m)
    return m + jnp.log(sum_exp) - lam * z1 - (1 - lam) * z2


def _check_shapes(embeddings, batch_labels, centers, prototypes, mesh, num_classes, prototype_mode):
    n = num_shards(mesh)
    if embeddings.ndim != 2:
        raise ValueError(f"partial_fc_loss: embeddings must be [B, D], got shape {embeddings.shape}")
    b, d = embeddings.shape
    if b % n:
        raise ValueError(f"partial_fc_loss: global batch {b} does not divide by the {n} devices of the mesh")
    for k in LABEL_KEYS:
        if k not in batch_labels:
            raise ValueError(f"partial_fc_loss: batch_labels lacks '{k}' (expected keys {LABEL_KEYS})")
        if tuple(batch_labels[k].shape) != (b,):
            raise ValueError(f"partial_fc_loss: batch_labels['{k}'] has shape {batch_labels[k].shape}, "
                             f"expected [{b}]")
    if prototype_mode not in PROTOTYPE_MODES:
        raise ValueError(f"partial_fc_loss: prototype_mode={prototype_mode!r} is not one of {PROTOTYPE_MODES}")
    if prototype_mode != "none" and prototypes is None:
        raise ValueError(f"partial_fc_loss: prototype_mode={prototype_mode!r} needs `prototypes`")
    for name, mat in (("centers", centers), ("prototypes", prototypes)):
        if mat is None:
            continue
        if mat.ndim != 2 or mat.shape[1] != d:
            raise ValueError(f"partial_fc_loss: {name} must be [C_pad, {d}], got shape {mat.shape}")
        if mat.shape[0] % n or mat.shape[0] < num_classes:
            raise ValueError(f"partial_fc_loss: {name} has {mat.shape[0]} rows; need >= num_classes="
                             f"{num_classes} and a multiple of the {n} devices (see padded_rows)")
    if centers is not None and prototypes is not None and centers.shape != prototypes.shape:
        raise ValueError(f"partial_fc_loss: prototypes {prototypes.shape} and centers {centers.shape} differ")


def partial_fc_loss(embeddings: jax.Array, batch_labels: Mapping[str, jax.Array], centers: jax.Array | None,
                    key: jax.Array, *, mesh: Mesh, num_classes: int, sample_rate: float = 1.0,
                    m1: float = 1.0, m2: float = 0.0, m3: float = 0.0, s: float = 64.0, fallback: str = "none",
                    prototypes: jax.Array | None = None, prototype_mode: str = "none",
                    prototype_k: float = 0.7, prototype_margin: bool = False) -> tuple[jax.Array, dict]:
    """Mean margin-softmax cross-entropy of a global batch against sharded class centres.

    embeddings: [B, D] (any float dtype; sharded or not, B divisible by the device count);
    batch_labels: {'label': int [B], 'label2': int [B], 'lam': f32 [B]} (check them with
    `check_labels` on the host first: out-of-range labels are not detected under jit);
    centers: W[C_pad, D] from `init_centers` (None with prototype_mode='replace');
    key: sampling key (unused at sample_rate 1). The margin (m1, m2, m3, s, fallback) is
    `margin.target_cosine`'s. Returns (loss f32 scalar, metrics): `loss`, `accuracy` (top-1 of
    the un-margined cosines among the sampled classes, against `label`), `target_cos` (mean
    cosine to `label`), `sampled_classes` (S·N), `positives_dropped` (see the module docstring);
    with prototype_mode='add' also `loss_centers`, `loss_prototypes`.
    """
    check_margin(m1, m2, m3, s, fallback)
    if prototype_mode == "replace":
        centers = None
    elif centers is None:
        raise ValueError("partial_fc_loss: centers is None; only prototype_mode='replace' runs without W")
    _check_shapes(embeddings, batch_labels, centers, prototypes if prototype_mode != "none" else None,
                  mesh, num_classes, prototype_mode)
    n = num_shards(mesh)
    axes = tuple(mesh.axis_names)
    ref = centers if centers is not None else prototypes
    r = ref.shape[0] // n
    s_rows = num_sampled(r, sample_rate)

    def margin_fn(c):
        return target_cosine(c, m1, m2, m3, fallback)

    def prototype_fn(v):
        base = target_cosine(v, m1, m2, m3, fallback) if prototype_margin else v
        return base - prototype_k * lax.stop_gradient(v)

    def body(x_local, lab_local, lab2_local, lam_local, mats, key):
        shard = lax.axis_index(axes)
        x = lax.all_gather(x_local, axes, tiled=True).astype(jnp.float32)
        label = lax.all_gather(lab_local, axes, tiled=True)
        label2 = lax.all_gather(lab2_local, axes, tiled=True)
        lam = lax.all_gather(lam_local, axes, tiled=True).astype(jnp.float32)
        xn = l2_normalize(x)
        start = shard * r
        loc1, loc2 = label - start, label2 - start
        own1, own2 = (loc1 >= 0) & (loc1 < r), (loc2 >= 0) & (loc2 < r)
        if s_rows < r:
            idx, dropped = sample_rows(key, shard, label, label2, rows_per_shard=r, num_classes=num_classes,
                                       num_sample=s_rows)
            gidx = start + idx
        else:
            idx, dropped = None, jnp.zeros((), jnp.int32)
            gidx = start + jnp.arange(r)
        valid = gidx < num_classes
        is1, is2 = gidx[None, :] == label[:, None], gidx[None, :] == label2[:, None]
        in1 = lax.psum(jnp.any(is1, axis=1).astype(jnp.float32), axes)
        in2 = lax.psum(jnp.any(is2, axis=1).astype(jnp.float32), axes)
        same = (label == label2).astype(jnp.float32)
        ce = dict(s=s, lam=lam, same=same, is1=is1, is2=is2, in1=in1, in2=in2, valid=valid, axes=axes)
        targets = ((is1, in1, loc1, own1), (is2, in2, loc2, own2))
        losses = {}
        if "w" in mats:
            cos, c1, c2 = _shard_cosines(xn, mats["w"], idx, targets, axes)
            losses["loss_centers"] = jnp.mean(_sharded_cross_entropy(cos, c1, c2, margin_fn, **ce))
        if "e" in mats:
            v, v1, v2 = _shard_cosines(xn, lax.stop_gradient(mats["e"]), idx, targets, axes)
            losses["loss_prototypes"] = jnp.mean(_sharded_cross_entropy(v, v1, v2, prototype_fn, **ce))
            if "w" not in mats:
                cos, c1 = v, v1
        loss = sum(losses.values()) / len(losses)
        metrics = dict(losses) if prototype_mode == "add" else {}
        other = lax.pmax(jnp.max(jnp.where(is1 | ~valid[None, :], -jnp.inf, lax.stop_gradient(cos)), axis=1),
                         axes)
        metrics.update(
            loss=loss,
            accuracy=jnp.mean((lax.stop_gradient(c1) > other).astype(jnp.float32)),
            target_cos=jnp.mean(lax.stop_gradient(c1)),
            sampled_classes=jnp.asarray(s_rows * n, jnp.float32),
            positives_dropped=lax.psum(dropped, axes).astype(jnp.float32),
        )
        # Every shard holds the same values; pmean makes their replication known to shard_map (the
        # gathered labels are typed per-shard), and its transpose keeps the gradient exact.
        return jax.tree.map(lambda v: lax.pmean(v, axes), (loss, metrics))

    mats = {}
    if prototype_mode != "replace":
        mats["w"] = centers
    if prototype_mode != "none":
        mats["e"] = prototypes
    rows_spec, batch_spec = P(axes, None), P(axes)
    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(batch_spec, batch_spec, batch_spec, batch_spec,
                                 {k: rows_spec for k in mats}, P()),
                       out_specs=(P(), P()))
    return fn(embeddings, jnp.asarray(batch_labels["label"], jnp.int32),
              jnp.asarray(batch_labels["label2"], jnp.int32), jnp.asarray(batch_labels["lam"], jnp.float32),
              mats, key)


def centers_layout(compiled: Any, num_rows: int, num_devices: int) -> dict:
    """How a compiled step (`jax.jit(...).lower(...).compile()`) lays out W and its optimiser state.

    Inputs with `num_rows` (C_pad) leading rows are W-like (W, its moments): their count, their bytes
    per device, and those not split `num_devices` ways (`unsplit_inputs`, descriptions; [] when all
    are). `full_size_arrays_in_hlo` counts arrays of C_pad rows in the partitioned HLO (0: nothing
    C·D-sized is replicated or gathered on a device); `local_size_arrays_in_hlo` counts those of
    C_pad / N rows, to show the search does find W-shaped arrays.
    """
    bad, w_like, per_device = [], 0, 0
    for info, sharding in zip(jax.tree.leaves(compiled.args_info), jax.tree.leaves(compiled.input_shardings)):
        shape = tuple(info.shape)
        if shape[:1] == (num_rows,):
            w_like += 1
            local = sharding.shard_shape(shape)
            per_device += int(np.prod(local)) * np.dtype(info.dtype).itemsize
            if local[0] != num_rows // num_devices:
                bad.append(f"input {shape} sharded {sharding}")
    hlo = compiled.as_text()
    return {"w_like_inputs": w_like, "w_and_state_bytes_per_device": per_device, "unsplit_inputs": bad,
            "full_size_arrays_in_hlo": len(re.findall(rf"\[{num_rows},\d+\]", hlo)),
            "local_size_arrays_in_hlo": len(re.findall(rf"\[{num_rows // num_devices},\d+\]", hlo))}


# ----------------------------------------------------------------------------- optimiser


def lazy_rows(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Apply `inner` only to the rows (leading index) whose gradient is non-zero this step.

    Other rows get a zero update and keep their optimiser state (momenta, Adam moments) unchanged;
    scalar state (step counts) advances as usual. Leaves with no leading axis are updated always.
    Meant for W, whose unsampled rows have exactly zero gradient.
    """

    def row_mask(g):
        if g.ndim == 0:
            return jnp.ones((), bool)
        touched = jnp.any(g != 0, axis=tuple(range(1, g.ndim)))
        return touched.reshape(touched.shape + (1,) * (g.ndim - 1))

    def update_fn(updates, state, params=None):
        new_updates, new_state = inner.update(updates, state, params)
        masks = jax.tree.map(row_mask, updates)
        new_updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), new_updates, masks)
        # Per-parameter state leaves take the row mask; the rest (counts) the always-true marker.
        state_masks = optax.tree_utils.tree_map_params(
            inner, lambda _, m: m, new_state, masks, transform_non_params=lambda _: jnp.ones((), bool))
        new_state = jax.tree.map(lambda new, old, m: jnp.where(m, new, old), new_state, state, state_masks)
        return new_updates, new_state

    return optax.GradientTransformation(inner.init, update_fn)


def centers_optimizer(learning_rate: float | optax.Schedule, *, kind: str = "sgd", momentum: float = 0.9,
                      weight_decay: float = 5e-4, b1: float = 0.9, b2: float = 0.999,
                      lazy: bool = True) -> optax.GradientTransformation:
    """Optimiser of W: 'sgd' (momentum; L2 decay added to the gradient, as torch.optim.SGD) or 'adamw'.

    lazy=True (default) wraps it in `lazy_rows`: rows not sampled this step do not move.
    """
    if kind == "sgd":
        tx = optax.chain(optax.add_decayed_weights(weight_decay),
                         optax.sgd(learning_rate, momentum=momentum or None))
    elif kind == "adamw":
        tx = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
    else:
        raise ValueError(f"centers_optimizer: kind={kind!r} is not one of ('sgd', 'adamw')")
    return lazy_rows(tx) if lazy else tx
