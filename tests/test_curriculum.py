"""LVFace curriculum: phases by epoch, each phase's loss against a dense NumPy/torch reference, EPL updates."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from lafs_jax.config import ConfigError
from lafs_jax.losses import curriculum as cur
from lafs_jax.losses import partial_fc as pfc
from lafs_jax.sharding import make_mesh

C, D, B = 61, 8, 16  # 61 classes -> 64 rows, R = 8 per device


def make_labels(seed, c=C, b=B):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, c, b).astype(np.int32)
    label2 = rng.integers(0, c, b).astype(np.int32)
    lam = rng.uniform(0.3, 1.0, b).astype(np.float32)
    label2[:4], lam[4:6] = label[:4], 1.0
    return {"label": label, "label2": label2, "lam": lam}


def sampled_ids(key, labels, rows, rate, c=C, shards=8):
    s = pfc.num_sampled(rows, rate)
    idx, _ = jax.jit(jax.vmap(lambda k: pfc.sample_rows(key, k, jnp.asarray(labels["label"]),
                                                        jnp.asarray(labels["label2"]), rows_per_shard=rows,
                                                        num_classes=c, num_sample=s)))(jnp.arange(shards))
    g = (np.asarray(idx) + rows * np.arange(shards)[:, None]).ravel()
    return {int(k) for k in g if k < c}


def np_unit(a):
    a = np.asarray(a, np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-30)


def np_phase_loss(x, w, e, labels, sampled, p):
    """Dense NumPy loss of a phase: CE over (sampled ∪ own targets) for W and/or the prototypes."""
    xn, wn, en = np_unit(x), np_unit(w), np_unit(e)

    def f(c):
        th = np.arccos(np.clip(c, -1, 1))
        val = np.cos(p["m1"] * th + p["m2"])
        if p["fallback"] == "th_mm":
            val = np.where(c > np.cos(np.pi - p["m2"]), val, c - p["m2"] * np.sin(p["m2"]))
        return val - p["m3"]

    def g(v):
        return (f(v) if p["prototype_margin"] else v) - p["prototype_k"] * v

    def ce(mat, target_fn):
        out = []
        for b in range(len(xn)):
            cls = np.array(sorted(sampled | {int(labels["label"][b]), int(labels["label2"][b])}))
            cos = mat[cls] @ xn[b]
            t = np.zeros(len(cls))
            t[np.searchsorted(cls, labels["label"][b])] += labels["lam"][b]
            t[np.searchsorted(cls, labels["label2"][b])] += 1 - labels["lam"][b]
            z = p["s"] * (cos + t * (target_fn(cos) - cos))
            out.append(np.log(np.exp(z - z.max()).sum()) + z.max() - (t * z).sum())
        return np.mean(out)

    parts = []
    if p["prototypes"] != "replace":
        parts.append(ce(wn, f))
    if p["prototypes"] != "none":
        parts.append(ce(en, g))
    return float(np.mean(parts))


PHASES = {
    "ncs": cur.phase(sample_rate=0.3),  # LVFace stage 1: ArcFace + Partial FC
    "epl_add": cur.phase(sample_rate=1.0, prototypes="add"),  # stage 2: sampling off + prototypes
    "epl_add_sampled": cur.phase(sample_rate=0.5, prototypes="add", m2=0.0, m3=0.4, fallback="none"),
    "replace_margin": cur.phase(sample_rate=1.0, prototypes="replace", prototype_margin=True, s=32.0),
}


@pytest.mark.parametrize("name", sorted(PHASES))
def test_phase_loss_matches_dense_numpy(name):
    p = PHASES[name]
    cur.validate_phases([p])
    mesh = make_mesh()
    w = pfc.init_centers(jax.random.key(0), C, D, mesh, std=1.0)
    e = cur.init_prototypes(jax.random.key(1), C, D, mesh)
    x = jax.random.normal(jax.random.key(2), (B, D))
    labels = make_labels(3)
    key = jax.random.key(4)
    value, metrics = jax.jit(lambda x, w, e: cur.phase_loss(x, labels, w, e, key, mesh=mesh, num_classes=C,
                                                            phase=p))(x, w, e)
    sampled = sampled_ids(key, labels, 8, p["sample_rate"])
    want = np_phase_loss(np.asarray(x), np.asarray(w)[:C], np.asarray(e)[:C], labels, sampled, p)
    np.testing.assert_allclose(value, want, rtol=2e-5)
    if p["prototypes"] == "add":
        assert set(metrics) >= {"loss_centers", "loss_prototypes"}
        np.testing.assert_allclose((metrics["loss_centers"] + metrics["loss_prototypes"]) / 2, value, rtol=1e-6)


def test_prototype_phase_gradients_match_torch():
    """Phase 'add' gradients: E is a constant, the similarity margin k·v_y is detached."""
    p = PHASES["epl_add"]
    mesh = make_mesh()
    w = pfc.init_centers(jax.random.key(5), C, D, mesh, std=1.0)
    e = cur.init_prototypes(jax.random.key(6), C, D, mesh)
    x = jax.random.normal(jax.random.key(7), (B, D))
    labels = make_labels(8)
    gx, gw = jax.jit(jax.grad(lambda x, w: cur.phase_loss(x, labels, w, e, jax.random.key(0), mesh=mesh,
                                                          num_classes=C, phase=p)[0], argnums=(0, 1)))(x, w)

    xt = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(np.asarray(w)[:C], dtype=torch.float64, requires_grad=True)
    et = torch.tensor(np.asarray(e)[:C], dtype=torch.float64)
    lam = torch.tensor(labels["lam"], dtype=torch.float64)[:, None]
    eye = torch.eye(C, dtype=torch.float64)
    t = lam * eye[labels["label"]] + (1 - lam) * eye[labels["label2"]]
    xn = torch.nn.functional.normalize(xt)
    cos = xn @ torch.nn.functional.normalize(wt).T
    th = torch.arccos(cos.clamp(-1, 1))
    f = torch.where(cos > np.cos(np.pi - 0.5), torch.cos(th + 0.5), cos - 0.5 * np.sin(0.5))
    z_w = 64 * (cos + t * (f - cos))
    v = xn @ torch.nn.functional.normalize(et).T
    z_e = 64 * (v - t * 0.7 * v.detach())
    loss = (-(t * torch.log_softmax(z_w, 1)).sum(1).mean() - (t * torch.log_softmax(z_e, 1)).sum(1).mean()) / 2
    loss.backward()
    np.testing.assert_allclose(gx, xt.grad.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(gw)[:C], wt.grad.numpy(), atol=2e-5)


def test_phase_for_epoch_and_presets():
    phases = cur.lvface_v1_phases(2, 3)
    cur.validate_phases(phases)
    got = [cur.phase_for_epoch(phases, ep)[0] for ep in range(7)]
    assert got == [0, 0, 1, 1, 1, 1, 1]  # past the end: the last phase
    assert phases[0].sample_rate == 0.3 and phases[1].sample_rate == 1.0 and phases[1].prototypes == "add"
    pco = cur.pco_phases(1, 1, 1)
    cur.validate_phases(pco)
    assert [cur.phase_for_epoch(pco, ep)[1].sample_rate for ep in range(3)] == [0.3, 0.3, 1.0]
    assert [p.prototypes for p in pco] == ["none", "add", "none"]
    with pytest.raises(ValueError, match="epoch=-1"):
        cur.phase_for_epoch(phases, -1)


def test_validate_phases_names_the_key():
    with pytest.raises(ConfigError, match=r"config\.loss\.phases\[1\]\.sample_rate=1\.5"):
        cur.validate_phases([cur.phase(), cur.phase(sample_rate=1.5)])
    with pytest.raises(ConfigError, match=r"phases\[0\]\.prototypes='both'"):
        cur.validate_phases([cur.phase(prototypes="both")])
    with pytest.raises(ConfigError, match=r"phases\[0\]\.epochs"):
        cur.validate_phases([cur.phase(epochs=0)])
    with pytest.raises(ConfigError, match=r"phases\[0\]: margin m2"):
        cur.validate_phases([cur.phase(m2=4.0)])
    with pytest.raises(ConfigError, match="no field 'rate'"):
        cur.phase(rate=0.1)
    with pytest.raises(ConfigError, match="empty"):
        cur.validate_phases([])


def np_epl_update(e, x, labels):
    """EPL's rule with segment means (NumPy, float64)."""
    e = np.array(e, np.float64)
    xn = np_unit(x)
    sums, weights = {}, {}
    for b in range(len(xn)):
        for cls, wgt in ((labels["label"][b], labels["lam"][b]), (labels["label2"][b], 1 - labels["lam"][b])):
            if wgt > 0:
                sums[cls] = sums.get(cls, 0) + wgt * xn[b]
                weights[cls] = weights.get(cls, 0) + wgt
    for cls, total in sums.items():
        mean = np_unit(total)
        c = float(e[cls] @ mean)
        alpha = c / (1 + abs(c))
        e[cls] = np_unit(alpha * e[cls] + (1 - alpha) * mean)
    return e


def test_update_prototypes_follows_epl_rule():
    mesh = make_mesh()
    e = cur.init_prototypes(jax.random.key(0), C, D, mesh)
    a = np.asarray(e)
    np.testing.assert_allclose(np.linalg.norm(a[:C], axis=1), 1.0, rtol=1e-6)
    assert np.all(a[C:] == 0) and e.sharding.is_equivalent_to(pfc.centers_sharding(mesh), 2)
    x = np.asarray(jax.random.normal(jax.random.key(1), (B, D))) * 5.0
    # Hand example, one sample per class, no mixup: E_y <- normalize(α E_y + (1 − α) x̂), α = softsign(cos).
    uniq = {"label": np.arange(B, dtype=np.int32) * 3, "label2": np.arange(B, dtype=np.int32) * 3,
            "lam": np.ones(B, np.float32)}
    new = np.asarray(jax.jit(lambda e, x: cur.update_prototypes(e, x, uniq, mesh=mesh, num_classes=C))(e, x))
    y = 6
    xh = x[2] / np.linalg.norm(x[2])
    cos = a[y] @ xh
    alpha = cos / (1 + abs(cos))
    hand = alpha * a[y] + (1 - alpha) * xh
    np.testing.assert_allclose(new[y], hand / np.linalg.norm(hand), atol=1e-6)
    untouched = sorted(set(range(64)) - set(uniq["label"].tolist()))
    np.testing.assert_array_equal(new[untouched], a[untouched])
    # Duplicate classes and mixup weights: the segment-mean rule.
    labels = make_labels(2, c=12)
    new = jax.jit(lambda e, x: cur.update_prototypes(e, x, labels, mesh=mesh, num_classes=C))(e, x)
    assert new.sharding.is_equivalent_to(pfc.centers_sharding(mesh), 2)
    np.testing.assert_allclose(np.asarray(new)[:C], np_epl_update(a[:C], x, labels), atol=1e-6)


def test_prototypes_converge_to_class_means():
    mesh = make_mesh()
    c = 16
    rng = np.random.default_rng(0)
    means = np_unit(rng.normal(size=(c, D)))
    e = cur.init_prototypes(jax.random.key(3), c, D, mesh)
    update = jax.jit(lambda e, x, lab: cur.update_prototypes(e, x, {"label": lab, "label2": lab,
                                                                    "lam": jnp.ones_like(lab, jnp.float32)},
                                                             mesh=mesh, num_classes=c))
    for _ in range(30):
        lab = rng.integers(0, c, 32).astype(np.int32)
        x = means[lab] + 0.05 * rng.normal(size=(32, D))
        e = update(e, x.astype(np.float32), lab)
    cos = np.sum(np.asarray(e)[:c] * means, axis=1)
    assert np.all(cos > 0.99), cos


def test_switching_phase_keeps_state_and_keeps_training():
    """Phase A (r=0.3) then phase B (r=1 + prototypes) in one jitted step, same W and optimiser state."""
    mesh = make_mesh()
    phases = cur.lvface_v1_phases(1, 1)
    params = {"backbone": {"kernel": jax.random.normal(jax.random.key(0), (12, D)) * 0.3},
              "centers": pfc.init_centers(jax.random.key(1), C, D, mesh)}
    protos = cur.init_prototypes(jax.random.key(2), C, D, mesh)
    tx = optax.partition({"backbone": optax.adam(3e-2), "centers": pfc.centers_optimizer(0.5, kind="sgd")},
                         {"backbone": "backbone", "centers": "centers"})
    opt_state = tx.init(params)
    feats = jax.random.normal(jax.random.key(3), (B, 12))
    labels = {"label": np.arange(B, dtype=np.int32) % 8, "label2": np.arange(B, dtype=np.int32) % 8,
              "lam": np.ones(B, np.float32)}

    def step(params, opt_state, protos, key, phase):
        def loss_fn(p):
            emb = feats @ p["backbone"]["kernel"]
            return cur.phase_loss(emb, labels, p["centers"], protos, key, mesh=mesh, num_classes=C, phase=phase)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if phase["update_prototypes"]:
            protos = cur.update_prototypes(protos, feats @ params["backbone"]["kernel"], labels, mesh=mesh,
                                           num_classes=C)
        return params, opt_state, protos, loss

    steps = {i: jax.jit(lambda a, b, c, k, p=p: step(a, b, c, k, p)) for i, p in enumerate(phases)}
    losses = []
    for epoch in range(2):
        i, _ = cur.phase_for_epoch(phases, epoch)
        for t in range(4):
            params, opt_state, protos, loss = steps[i](params, opt_state, protos, jax.random.key(10 * epoch + t))
            losses.append(float(loss))
    assert all(np.isfinite(losses))
    assert losses[3] < losses[0] and losses[7] < losses[4], losses
    assert params["centers"].sharding.is_equivalent_to(pfc.centers_sharding(mesh), 2)
