"""Partial FC on 8 CPU devices against dense single-device / torch / NumPy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import PartitionSpec as P

from lafs_jax.losses import partial_fc as pfc
from lafs_jax.losses.margin import margin_logits, target_cosine
from lafs_jax.sharding import batch_sharding, compiled_memory, make_mesh, replicated
from lafs_jax.variables import load_variables, save_variables

C, D, B = 37, 8, 16  # 37 classes: not a multiple of 8, so 3 padding rows
LABELS = {"backbone": "backbone", "centers": "centers"}  # optax.partition labels (a prefix of the params)


class MeshCfg:
    def __init__(self, data, model):
        self.data, self.model = data, model


def mesh_of(data=-1, model=1, devices=None):
    return make_mesh(MeshCfg(data, model), devices)


def make_labels(seed=0, b=B, c=C, mixup=True):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, c, b).astype(np.int32)
    label2 = rng.integers(0, c, b).astype(np.int32) if mixup else label.copy()
    lam = rng.uniform(0.2, 1.0, b).astype(np.float32) if mixup else np.ones(b, np.float32)
    if mixup:
        label2[:3] = label[:3]  # some samples without a second class
        lam[3:5] = 1.0
    return {"label": label, "label2": label2, "lam": lam}


def setup(mesh, seed=0, c=C, b=B, d=D, std=1.0):
    w = pfc.init_centers(jax.random.key(seed), c, d, mesh, std=std)
    x = jax.random.normal(jax.random.key(seed + 1), (b, d))
    return x, w


def torch_dense_loss(x, w, labels, c, m1, m2, m3, s):
    """Dense soft-target margin CE in float64 torch: loss and gradients w.r.t. x and W (padding rows 0)."""
    xt = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(np.asarray(w), dtype=torch.float64, requires_grad=True)
    cos = torch.nn.functional.normalize(xt) @ torch.nn.functional.normalize(wt[:c]).T
    f = torch.cos(m1 * torch.arccos(cos.clamp(-1, 1)) + m2) - m3
    lam = torch.tensor(labels["lam"], dtype=torch.float64)[:, None]
    t = lam * torch.eye(c, dtype=torch.float64)[labels["label"]] + (1 - lam) * torch.eye(c, dtype=torch.float64)[
        labels["label2"]]
    z = s * (cos + t * (f - cos))
    loss = -(t * torch.log_softmax(z, dim=1)).sum(1).mean()
    loss.backward()
    return loss.item(), xt.grad.numpy(), wt.grad.numpy()


def jax_dense_loss(x, w, labels, c, m1, m2, m3, s):
    """The same on one device in fp32 JAX (margin_logits + optax soft-target CE)."""
    xn = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    wn = w[:c] / jnp.linalg.norm(w[:c], axis=1, keepdims=True)
    t = pfc.mixup_targets(labels, c)
    return optax.softmax_cross_entropy(margin_logits(xn @ wn.T, t, m1, m2, m3, s), t).mean()


MARGINS = {"cosface": (1.0, 0.0, 0.4, 64.0), "arcface": (1.0, 0.5, 0.0, 64.0), "combined": (1.2, 0.3, 0.1, 32.0)}


@pytest.mark.parametrize("mesh_shape,margin", [((8, 1), "cosface"), ((4, 2), "arcface"), ((2, 4), "combined")])
def test_rate_one_equals_dense(mesh_shape, margin):
    mesh = mesh_of(*mesh_shape)
    m1, m2, m3, s = MARGINS[margin]
    x, w = setup(mesh)
    labels = make_labels()
    assert w.shape == (40, D) and w.sharding.spec == P(("data", "model"), None)

    def loss(x, w):
        return pfc.partial_fc_loss(x, labels, w, jax.random.key(9), mesh=mesh, num_classes=C, sample_rate=1.0,
                                   m1=m1, m2=m2, m3=m3, s=s)

    (value, metrics), (gx, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    cpu0 = jax.devices()[0]
    xd, wd = jax.device_put(np.asarray(x), cpu0), jax.device_put(np.asarray(w), cpu0)
    dense, (dgx, dgw) = jax.value_and_grad(jax_dense_loss, argnums=(0, 1))(xd, wd, labels, C, m1, m2, m3, s)
    np.testing.assert_allclose(value, dense, atol=1e-5)
    np.testing.assert_allclose(gx, dgx, atol=1e-5)
    np.testing.assert_allclose(gw, dgw, atol=1e-5)
    t_loss, t_gx, t_gw = torch_dense_loss(x, w, labels, C, m1, m2, m3, s)
    np.testing.assert_allclose(value, t_loss, rtol=1e-5)
    np.testing.assert_allclose(gx, t_gx, atol=1e-5)
    np.testing.assert_allclose(gw, t_gw, atol=1e-5)
    assert np.all(np.asarray(gw)[C:] == 0)  # padding rows
    assert metrics["sampled_classes"] == 40 and metrics["positives_dropped"] == 0
    # Accuracy: top-1 of the plain cosines among all classes, against `label`.
    cos = np.asarray(xd / jnp.linalg.norm(xd, axis=1, keepdims=True) @ (wd[:C] / jnp.linalg.norm(wd[:C], axis=1,
                                                                                                    keepdims=True)).T)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(cos.argmax(1) == labels["label"]))
    np.testing.assert_allclose(metrics["target_cos"], cos[np.arange(B), labels["label"]].mean(), atol=1e-6)


def test_sharded_embeddings_and_grad_sharding():
    """Embeddings arriving batch-sharded (as from the backbone) give the same loss; dW stays row-sharded."""
    mesh = mesh_of()
    x, w = setup(mesh)
    labels = make_labels()
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(("data", "model"), None)))
    fn = jax.jit(jax.value_and_grad(lambda x, w: pfc.partial_fc_loss(x, labels, w, jax.random.key(0), mesh=mesh,
                                                                     num_classes=C, m3=0.4)[0], argnums=(0, 1)))
    (v1, (_, g1)), (v2, (_, g2)) = fn(x, w), fn(xs, w)
    np.testing.assert_allclose(v1, v2, atol=1e-6)
    assert g2.sharding.spec == P(("data", "model"), None)
    np.testing.assert_allclose(g1, g2, atol=1e-7)


def sampled_global(key, labels, *, rows, shards, c, rate):
    """Global class ids each shard samples, from the public sampler (vmapped over shard index)."""
    s = pfc.num_sampled(rows, rate)
    idx, dropped = jax.jit(jax.vmap(lambda k: pfc.sample_rows(key, k, jnp.asarray(labels["label"]),
                                                              jnp.asarray(labels["label2"]), rows_per_shard=rows,
                                                              num_classes=c, num_sample=s)))(jnp.arange(shards))
    return np.asarray(idx) + rows * np.arange(shards)[:, None], np.asarray(dropped)


def numpy_sampled_loss(x, w, labels, sampled, c, m1, m2, m3, s):
    """Per-sample CE over (sampled real classes ∪ own targets), soft targets with weighted margins."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    wn = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-30)
    base = {int(k) for k in sampled.ravel() if k < c}
    losses = []
    for b in range(len(x)):
        classes = np.array(sorted(base | {int(labels["label"][b]), int(labels["label2"][b])}))
        cos = wn[classes] @ xn[b]
        t = np.zeros(len(classes))
        lam = float(labels["lam"][b])
        t[np.searchsorted(classes, labels["label"][b])] += lam
        t[np.searchsorted(classes, labels["label2"][b])] += 1 - lam
        f = np.cos(m1 * np.arccos(np.clip(cos, -1, 1)) + m2) - m3
        z = s * (cos + t * (f - cos))
        zmax = z.max()
        losses.append(zmax + np.log(np.exp(z - zmax).sum()) - (t * z).sum())
    return float(np.mean(losses))


def test_sampler_keeps_positives_static_size_and_is_seeded():
    mesh = mesh_of()
    c = 800  # R = 100 rows per shard, S = 30
    labels = make_labels(3, b=B, c=c)
    pos = set(labels["label"].tolist()) | set(labels["label2"].tolist())
    runs = {}
    for seed in (0, 1):
        g, dropped = sampled_global(jax.random.key(seed), labels, rows=100, shards=8, c=c, rate=0.3)
        assert g.shape == (8, 30) and np.all(dropped == 0)
        for k in range(8):
            assert len(set(g[k])) == 30 and np.all(np.diff(g[k]) > 0) and np.all(g[k] // 100 == k)
            owned = {p for p in pos if p // 100 == k}
            assert owned <= set(g[k].tolist()), (k, owned - set(g[k].tolist()))
        runs[seed] = g
    again, _ = sampled_global(jax.random.key(0), labels, rows=100, shards=8, c=c, rate=0.3)
    np.testing.assert_array_equal(again, runs[0])
    negatives = [set(runs[s].ravel().tolist()) - pos for s in (0, 1)]
    assert negatives[0] != negatives[1]
    # Padding rows come after every real class.
    g, _ = sampled_global(jax.random.key(0), {"label": np.array([0]), "label2": np.array([0])}, rows=5, shards=8,
                          c=37, rate=0.6)
    assert np.all(g[7] == [35, 36, 37]) and np.all(g[7][:2] < 37)


@pytest.mark.parametrize("rate,c,margin", [(0.3, 800, "arcface"), (0.25, 203, "cosface"), (0.1, 37, "combined")])
def test_sampled_loss_equals_numpy_reference(rate, c, margin):
    """r < 1: the loss is the CE over the sampled classes of all shards plus each sample's targets.

    (0.1, 37): one row per shard, so positives overflow the sample (positives_dropped > 0).
    """
    mesh = mesh_of(4, 2)
    m1, m2, m3, s = MARGINS[margin]
    x, w = setup(mesh, c=c)
    labels = make_labels(5, c=c)
    key = jax.random.key(11)
    value, metrics = jax.jit(lambda x, w: pfc.partial_fc_loss(x, labels, w, key, mesh=mesh, num_classes=c,
                                                              sample_rate=rate, m1=m1, m2=m2, m3=m3, s=s))(x, w)
    rows = w.shape[0] // 8
    sampled, dropped = sampled_global(key, labels, rows=rows, shards=8, c=c, rate=rate)
    np.testing.assert_allclose(value, numpy_sampled_loss(x, w, labels, sampled, c, m1, m2, m3, s), rtol=2e-5)
    assert metrics["positives_dropped"] == dropped.sum()
    assert metrics["sampled_classes"] == sampled.size
    if c == 37:
        assert dropped.sum() > 0
    # Rows outside the sample and outside the batch's targets get exactly zero gradient; sampled ones do not.
    gw = jax.jit(jax.grad(lambda w: pfc.partial_fc_loss(x, labels, w, key, mesh=mesh, num_classes=c,
                                                         sample_rate=rate, m1=m1, m2=m2, m3=m3, s=s)[0]))(w)
    touched = set(sampled.ravel().tolist()) | set(labels["label"].tolist()) | set(labels["label2"].tolist())
    touched = {k for k in touched if k < c}
    nonzero = set(np.flatnonzero(np.any(np.asarray(gw) != 0, axis=1)).tolist())
    assert nonzero == touched


def test_rate_below_one_equals_dense_when_sample_covers_all_real_classes():
    mesh = mesh_of()
    x, w = setup(mesh, c=36)  # R = 5, r = 0.9 -> S = 5: every row sampled
    labels = make_labels(2, c=36)
    a = jax.jit(lambda x, w: pfc.partial_fc_loss(x, labels, w, jax.random.key(1), mesh=mesh, num_classes=36,
                                                 sample_rate=0.9, m2=0.5)[0])(x, w)
    dense = jax_dense_loss(x, w, labels, 36, 1.0, 0.5, 0.0, 64.0)
    np.testing.assert_allclose(a, dense, atol=1e-5)


def test_no_nan_when_embeddings_coincide_with_centres():
    mesh = mesh_of()
    _, w = setup(mesh)
    labels = make_labels(mixup=False)
    x = w[labels["label"]] * 3.0  # θ = 0 for every target
    x = x.at[0].set(-w[labels["label"][0]])  # θ = π for one
    grads = jax.jit(jax.grad(lambda x, w: pfc.partial_fc_loss(x, labels, w, jax.random.key(0), mesh=mesh,
                                                              num_classes=C, m2=0.5, fallback="th_mm")[0],
                             argnums=(0, 1)))(x, w)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_check_labels_names_the_problem():
    good = make_labels()
    pfc.check_labels(good, C)
    bad = dict(good, label2=good["label2"].copy())
    bad["label2"][6] = C
    with pytest.raises(ValueError, match=r"label2'\]\[6\] = 37 is outside \[0, 37\)"):
        pfc.check_labels(bad, C)
    with pytest.raises(ValueError, match=r"'label'\]\[0\] = -1"):
        pfc.check_labels(dict(good, label=np.r_[-1, good["label"][1:]].astype(np.int32)), C)
    with pytest.raises(ValueError, match="lam"):
        pfc.check_labels(dict(good, lam=good["lam"] + 1.5), C)
    with pytest.raises(ValueError, match="lack"):
        pfc.check_labels({"label": good["label"]}, C)
    with pytest.raises(ValueError, match="dtype"):
        pfc.check_labels(dict(good, label=good["label"].astype(np.float32)), C)


def test_bad_shapes_are_named():
    mesh = mesh_of()
    x, w = setup(mesh)
    labels = make_labels()
    kw = dict(mesh=mesh, num_classes=C)
    with pytest.raises(ValueError, match="global batch 12"):
        pfc.partial_fc_loss(x[:12], {k: v[:12] for k, v in labels.items()}, w, jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="centers"):
        pfc.partial_fc_loss(x, labels, w[:, :4], jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="num_classes=41"):
        pfc.partial_fc_loss(x, labels, w, jax.random.key(0), mesh=mesh, num_classes=41)
    with pytest.raises(ValueError, match="sample_rate"):
        pfc.partial_fc_loss(x, labels, w, jax.random.key(0), sample_rate=0.0, **kw)
    with pytest.raises(ValueError, match="lam"):
        pfc.partial_fc_loss(x, {k: v for k, v in labels.items() if k != "lam"}, w, jax.random.key(0), **kw)


def test_init_centers_layout():
    mesh = mesh_of()
    w = pfc.init_centers(jax.random.key(0), 1001, 64, mesh)
    assert w.shape == (1008, 64) and w.dtype == jnp.float32
    assert w.sharding.spec == P(("data", "model"), None)
    assert {s.data.shape for s in w.addressable_shards} == {(126, 64)}
    a = np.asarray(w)
    assert np.all(a[1001:] == 0)
    assert abs(a[:1001].std() - 0.01) < 5e-4 and abs(a[:1001].mean()) < 5e-4


def run_steps(lazy, kind, steps=2):
    """A jitted train step: linear backbone + Partial FC r=0.25, optax.partition'ed optimiser."""
    mesh = mesh_of(4, 2)
    c, feat = 160, 12  # R = 20, S = 5
    params = {"backbone": {"kernel": jax.random.normal(jax.random.key(5), (feat, D)) * 0.3},
              "centers": pfc.init_centers(jax.random.key(6), c, D, mesh, std=0.5)}
    tx = optax.partition({"backbone": optax.adamw(1e-2),
                          "centers": pfc.centers_optimizer(0.5, kind=kind, weight_decay=0.1, lazy=lazy)}, LABELS)
    opt_state = tx.init(params)
    feats = jax.random.normal(jax.random.key(7), (B, feat))
    labels = make_labels(8, c=c, mixup=False)

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(p):
            return pfc.partial_fc_loss(feats @ p["backbone"]["kernel"], labels, p["centers"], key, mesh=mesh,
                                       num_classes=c, sample_rate=0.25, m3=0.4)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    history = [(params, opt_state)]
    keys = [jax.random.key(100 + i) for i in range(steps)]
    for key in keys:
        params, opt_state, _ = step(params, opt_state, key)
        history.append((params, opt_state))
    touched = []
    for key in keys:
        g, _ = sampled_global(key, labels, rows=20, shards=8, c=c, rate=0.25)
        touched.append(set(g.ravel().tolist()))
    return history, touched


def centers_state_leaves(opt_state):
    """Optimiser-state arrays shaped like W (momenta / moments) inside the partitioned state."""
    return [leaf for leaf in jax.tree.leaves(opt_state) if getattr(leaf, "shape", ()) == (160, D)]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_lazy_rows_freeze_unsampled_rows_and_their_state(kind):
    history, touched = run_steps(lazy=True, kind=kind)
    (p1, s1), (p2, s2) = history[1], history[2]
    w0, w1, w2 = (np.asarray(h[0]["centers"]) for h in history)
    untouched2 = np.array(sorted(set(range(160)) - touched[1]))
    moved2 = np.array(sorted(touched[1]))
    np.testing.assert_array_equal(w2[untouched2], w1[untouched2])
    assert np.all(np.any(w2[moved2] != w1[moved2], axis=1))
    never = np.array(sorted(set(range(160)) - touched[0] - touched[1]))
    np.testing.assert_array_equal(w2[never], w0[never])
    for a, b in zip(centers_state_leaves(s1), centers_state_leaves(s2)):
        np.testing.assert_array_equal(np.asarray(b)[untouched2], np.asarray(a)[untouched2])
    assert len(centers_state_leaves(s2)) == (1 if kind == "sgd" else 2)
    # Shardings survive the jitted update.
    rows = pfc.centers_sharding(p2["centers"].sharding.mesh)
    assert p2["centers"].sharding.is_equivalent_to(rows, 2)
    assert all(l.sharding.is_equivalent_to(rows, 2) for l in centers_state_leaves(s2))
    # The backbone is updated by AdamW every step.
    assert np.any(np.asarray(p2["backbone"]["kernel"]) != np.asarray(p1["backbone"]["kernel"]))


def test_eager_rows_let_decay_and_momentum_move_every_row():
    history, touched = run_steps(lazy=False, kind="sgd")
    w1, w2 = (np.asarray(h[0]["centers"]) for h in history[1:])
    untouched2 = np.array(sorted(set(range(160)) - touched[1]))
    assert np.all(np.any(w2[untouched2] != w1[untouched2], axis=1))


def test_centers_optimizer_errors():
    with pytest.raises(ValueError, match="kind"):
        pfc.centers_optimizer(0.1, kind="lamb")


def test_restore_onto_fewer_devices(tmp_path):
    """Saved sharded from 8 devices, restored onto 4, 2 and 1 with identical values and the same loss."""
    mesh8 = mesh_of()
    c = 1001  # -> 1008 rows
    w = pfc.init_centers(jax.random.key(3), c, 16, mesh8, std=1.0)
    save_variables(str(tmp_path / "centers"), {"centers": w}, {"num_classes": c})
    x = jax.random.normal(jax.random.key(4), (16, 16))
    labels = make_labels(9, c=c)

    def loss(mesh, w):
        return float(jax.jit(lambda x, w: pfc.partial_fc_loss(x, labels, w, jax.random.key(0), mesh=mesh,
                                                              num_classes=c, m2=0.5)[0])(x, w))

    ref = loss(mesh8, w)
    for k in (4, 2, 1):
        mesh = make_mesh(None, jax.devices()[:k])
        abstract = {"centers": pfc.centers_abstract(w.shape[0], 16, mesh)}
        restored, meta = load_variables(str(tmp_path / "centers"), abstract)
        r = restored["centers"]
        assert meta == {"num_classes": c}
        assert r.sharding.mesh.devices.size == k and r.sharding.spec == P(("data", "model"), None)
        assert {s.data.shape for s in r.addressable_shards} == {(1008 // k, 16)}
        np.testing.assert_array_equal(np.asarray(r), np.asarray(w))
        np.testing.assert_allclose(loss(mesh, r), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot be split"):
        pfc.centers_abstract(1004, 16, mesh8)


def test_margin_helpers_agree_with_dense_formula():
    """partial_fc's margin (via target_cosine) is the same f as margin_logits' dense form."""
    c = jnp.linspace(-1, 1, 11)
    f = target_cosine(c, 1.0, 0.5, 0.0)
    np.testing.assert_allclose(f, np.cos(np.arccos(np.asarray(c, np.float64)) + 0.5), atol=2e-6)
    assert math.isclose(pfc.num_sampled(125000, 0.1), 12500) and pfc.num_sampled(5, 0.01) == 1


def test_full_step_keeps_w_and_moments_split_in_the_compiled_program():
    """The jitted step (linear backbone + loss + grads + AdamW on W, compiled from abstract inputs, nothing
    allocated) holds only 1/N of W and its moments per device."""
    mesh = mesh_of()
    c, d, feat, b = 20001, 32, 8, 16  # -> 20008 rows, 2501 per device
    rows = pfc.padded_rows(c, mesh)
    tx = optax.partition({"backbone": optax.adamw(1e-3, weight_decay=0.05),
                          "centers": pfc.centers_optimizer(1e-3, kind="adamw", weight_decay=0.05, lazy=True)}, LABELS)

    def step(params, opt_state, feats, labels, key):
        def loss_fn(p):
            return pfc.partial_fc_loss(feats @ p["backbone"]["kernel"], labels, p["centers"], key, mesh=mesh,
                                       num_classes=c, sample_rate=0.1, m3=0.4)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    rep, batch = replicated(mesh), batch_sharding(mesh)
    params = {"backbone": {"kernel": jax.ShapeDtypeStruct((feat, d), jnp.float32, sharding=rep)},
              "centers": pfc.centers_abstract(rows, d, mesh)}
    opt_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(
        pfc.centers_sharding(mesh) if x.shape[:1] == (rows,) else rep)), jax.eval_shape(tx.init, params))
    feats = jax.ShapeDtypeStruct((b, feat), jnp.float32, sharding=batch)
    labels = {k: jax.ShapeDtypeStruct((b,), jnp.float32 if k == "lam" else jnp.int32, sharding=batch)
              for k in ("label", "label2", "lam")}
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    out_shardings = jax.tree.map(lambda a: a.sharding, (params, opt_state))
    compiled = jax.jit(step, donate_argnums=(0, 1), out_shardings=(*out_shardings, rep)).lower(
        params, opt_state, feats, labels, key).compile()
    layout = pfc.centers_layout(compiled, rows, 8)
    assert rows == 20008 and layout["w_like_inputs"] == 3 and layout["unsplit_inputs"] == []
    assert layout["w_and_state_bytes_per_device"] == rows * d * 3 * 4 // 8
    assert layout["full_size_arrays_in_hlo"] == 0 and layout["local_size_arrays_in_hlo"] > 0
    mem = compiled_memory(compiled)
    assert rows * d * 3 * 4 // 8 <= mem["argument"] < rows * d * 3 * 4 // 8 + 2 ** 16
    assert mem["temp"] < rows * d * 4  # less than one replicated copy of W


def test_init_centers_xavier_uniform_as_the_official_cosface_weight():
    """torch.nn.init.xavier_uniform_ on W[C, D]: U(-a, a), a = sqrt(6 / (C + D)); std sqrt(2 / (C + D))."""
    mesh = mesh_of()
    c, d = 1001, 64
    a = np.asarray(pfc.init_centers(jax.random.key(0), c, d, mesh, init="xavier_uniform"))
    assert a.shape == (1008, d) and np.all(a[c:] == 0)
    limit = np.sqrt(6.0 / (c + d))
    assert np.abs(a[:c]).max() <= limit and np.abs(a[:c]).max() > 0.99 * limit
    assert abs(a[:c].std() - np.sqrt(2.0 / (c + d))) < 1e-3
    assert abs(np.sqrt(2.0 / (205990 + 768)) - 0.0031) < 1e-4  # the official WebFace4M head's std
    with pytest.raises(ValueError, match="init='kaiming'"):
        pfc.init_centers(jax.random.key(0), c, d, mesh, init="kaiming")


def test_train_state_resumes_on_other_device_counts_with_w_and_moments_repadded(tmp_path):
    """W (30 classes) and its Adam moments, saved as 32 rows from 8 devices, restore onto 3 devices
    (30 rows), then 1, then 5 (30) and back onto 8 (32): the real rows are identical at every hop, the
    padding is zero, and with sample_rate 1 the loss and the next update are those of the 8-device run."""
    from lafs_jax.sharding import replicated
    from lafs_jax.train.checkpoint import TrainCheckpointer, abstract_like

    c, d = 30, 8
    x = np.asarray(jax.random.normal(jax.random.key(4), (B * 15, d)))  # 240 rows: divisible by 8, 5, 3 and 1
    labels = make_labels(5, b=B * 15, c=c)
    tx = pfc.centers_optimizer(0.1, kind="adamw", weight_decay=0.1)

    def step(mesh):
        def f(params, opt):
            loss, g = jax.value_and_grad(lambda p: pfc.partial_fc_loss(
                x, labels, p["centers"], jax.random.key(0), mesh=mesh, num_classes=c, m3=0.2, s=16.0)[0])(params)
            u, opt = tx.update(g, opt, params)
            return loss, optax.apply_updates(params, u), opt
        return jax.jit(f)

    def fresh_state(mesh):
        params = {"centers": pfc.init_centers(jax.random.key(1), c, d, mesh, std=1.0)}
        return {"params": params, "opt": jax.jit(tx.init)(params), "step": jax.device_put(jnp.int32(0), replicated(mesh))}

    def shardings(mesh, tree):
        return jax.tree.map(lambda a: pfc.centers_sharding(mesh) if a.ndim == 2 else replicated(mesh), tree)

    def per_class(state):  # W, Adam's mu and nu
        return [state["params"]["centers"], state["opt"][0].mu["centers"], state["opt"][0].nu["centers"]]

    mesh8 = mesh_of()
    s8 = fresh_state(mesh8)
    _, params, opt = step(mesh8)(s8["params"], s8["opt"])  # one update: non-zero moments in the real rows
    state = {"params": params, "opt": opt, "step": s8["step"] + 1}
    ref_loss, ref_params, _ = step(mesh8)(params, opt)
    for k in (3, 1, 5, 8):
        with TrainCheckpointer(str(tmp_path / f"to_{k}"), keep=1) as ck:
            ck.save(1, state)
            ck.wait()
            mesh = make_mesh(None, jax.devices()[:k])
            fresh = fresh_state(mesh)
            restored = ck.restore(1, abstract_like(fresh, shardings(mesh, fresh)), padded_rows=pfc.padded_rows_rule(c))
        rows = pfc.padded_rows(c, mesh)
        assert rows == (32 if k == 8 else 30)
        for new, old in zip(per_class(restored), per_class(state)):
            assert new.shape == (rows, d) and new.sharding.spec == P(("data", "model"), None)
            assert len(new.sharding.device_set) == k
            np.testing.assert_array_equal(np.asarray(new)[:c], np.asarray(old)[:c])
            np.testing.assert_array_equal(np.asarray(new)[c:], 0)
        assert np.abs(np.asarray(per_class(restored)[1])[:c]).max() > 0
        loss, new_params, _ = step(mesh)(restored["params"], restored["opt"])
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(new_params["centers"])[:c], np.asarray(ref_params["centers"])[:c],
                                   rtol=1e-5, atol=1e-6)
        state = restored
    with TrainCheckpointer(str(tmp_path / "bad"), keep=1) as ck:
        ck.save(1, state)
        ck.wait()
        target = abstract_like(state)
        target["params"]["centers"] = jax.ShapeDtypeStruct((24, d), jnp.float32, sharding=pfc.centers_sharding(mesh8))
        with pytest.raises(ValueError, match=r"'params/centers' is stored with shape \(32, 8\), this run needs "
                                             r"\(24, 8\) \(rows are re-padded only down to the 30 real rows\)"):
            ck.restore(1, target, padded_rows=pfc.padded_rows_rule(c))
