"""DINO loss, centre EMA and teacher-temperature schedule against an independent torch / NumPy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import NamedSharding, PartitionSpec as P

from lafs_jax import sharding as mesh_lib
from lafs_jax.losses import dino


def _torch_dino_loss(student_cat, teacher_cat, center, ncrops, nglobal, student_temp, teacher_temp):
    """The official DINOLoss.forward, written as its loops over chunks of a [views*B, K] tensor."""
    student_out = (student_cat / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_cat - center) / teacher_temp, dim=-1).detach().chunk(nglobal)
    total, n = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n += 1
    return total / n


@pytest.mark.parametrize("vs,vt,teacher_temp", [(10, 2, 0.04), (4, 2, 0.07), (3, 1, 0.05)])
def test_loss_and_grad_match_torch_loops(vs, vt, teacher_temp):
    rng = np.random.default_rng(0)
    b, k = 5, 33
    s = rng.normal(size=(vs, b, k)).astype(np.float32) * 3
    t = rng.normal(size=(vt, b, k)).astype(np.float32) * 3
    c = rng.normal(size=(k,)).astype(np.float32)

    def f(s_):
        return dino.dino_loss(s_, jnp.asarray(t), jnp.asarray(c), student_temp=0.1, teacher_temp=teacher_temp)[0]

    loss, grad = jax.value_and_grad(f)(jnp.asarray(s))

    ts = torch.tensor(s.reshape(vs * b, k), requires_grad=True)
    ref = _torch_dino_loss(ts, torch.tensor(t.reshape(vt * b, k)), torch.tensor(c)[None], vs, vt, 0.1, teacher_temp)
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad).reshape(vs * b, k), ts.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_teacher_gets_no_gradient_and_bf16_inputs_are_computed_in_fp32():
    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.normal(size=(4, 3, 8)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    c = jnp.zeros(8)
    g = jax.grad(lambda t_: dino.dino_loss(s, t_, c, teacher_temp=0.04)[0])(t)
    assert float(jnp.abs(g).max()) == 0.0
    l32, _ = dino.dino_loss(s, t, c, teacher_temp=0.04)
    l16, _ = dino.dino_loss(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), c, teacher_temp=0.04)
    assert l16.dtype == jnp.float32
    np.testing.assert_allclose(float(l16), float(l32), rtol=2e-2)


def test_entropy_metrics_hand_computed():
    # uniform teacher targets -> entropy log K; student logits equal -> entropy log K
    k = 16
    s = jnp.zeros((3, 2, k))
    t = jnp.zeros((2, 2, k))
    loss, m = dino.dino_loss(s, t, jnp.zeros(k), teacher_temp=0.04)
    np.testing.assert_allclose(float(m["teacher_entropy"]), np.log(k), rtol=1e-6)
    np.testing.assert_allclose(float(m["student_entropy"]), np.log(k), rtol=1e-6)
    np.testing.assert_allclose(float(loss), np.log(k), rtol=1e-6)  # H(uniform, uniform) = log K
    np.testing.assert_allclose(float(m["teacher_batch_entropy"]), np.log(k), rtol=1e-6)


def test_batch_entropy_tells_one_prototype_from_an_even_spread():
    """Sharp targets: per-sample entropy ~0 either way; the batch-mean target's entropy is 0 when every
    sample picks prototype 0 and log 4 when the 4 samples pick 4 different prototypes."""
    k, b = 8, 4
    s = jnp.zeros((2, b, k))
    same = jnp.zeros((2, b, k)).at[:, :, 0].set(10.0)
    spread = jnp.zeros((2, b, k)).at[:, jnp.arange(b), jnp.arange(b)].set(10.0)
    _, m_same = dino.dino_loss(s, same, jnp.zeros(k), teacher_temp=0.04)
    _, m_spread = dino.dino_loss(s, spread, jnp.zeros(k), teacher_temp=0.04)
    assert float(m_same["teacher_entropy"]) < 1e-3 and float(m_spread["teacher_entropy"]) < 1e-3
    np.testing.assert_allclose(float(m_same["teacher_batch_entropy"]), 0.0, atol=1e-3)
    np.testing.assert_allclose(float(m_spread["teacher_batch_entropy"]), np.log(b), rtol=1e-3)


def test_center_update_is_global_mean_across_devices():
    rng = np.random.default_rng(2)
    t = rng.normal(size=(2, 16, 6)).astype(np.float32)
    c = rng.normal(size=(6,)).astype(np.float32)
    expected = c * 0.9 + t.reshape(-1, 6).mean(0) * 0.1
    mesh = mesh_lib.make_mesh(None)
    sharded = jax.device_put(t, NamedSharding(mesh, P(None, mesh.axis_names)))  # batch axis over 8 devices
    assert len({s.device for s in sharded.addressable_shards}) == 8
    new = jax.jit(dino.update_center, static_argnames="momentum")(jnp.asarray(c), sharded, momentum=0.9)
    np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("warm,final,warmup_epochs,epochs", [(0.07, 0.04, 30, 41), (0.04, 0.07, 30, 100),
                                                             (0.04, 0.04, 0, 5), (0.05, 0.04, 1, 3)])
def test_teacher_temp_schedule_matches_dino_numpy(warm, final, warmup_epochs, epochs):
    spe = 3
    ref = np.concatenate((np.linspace(warm, final, warmup_epochs), np.ones(epochs - warmup_epochs) * final))
    steps = np.arange(epochs * spe)
    got = jax.jit(lambda s: dino.teacher_temp_at(s, steps_per_epoch=spe, warmup_temp=warm, final_temp=final,
                                                 warmup_epochs=warmup_epochs))(steps)
    np.testing.assert_allclose(np.asarray(got), ref[steps // spe], rtol=1e-6)
    assert float(dino.teacher_temp_at(10 ** 6, steps_per_epoch=spe, warmup_temp=warm, final_temp=final,
                                      warmup_epochs=warmup_epochs)) == pytest.approx(final)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="center"):
        dino.dino_loss(jnp.zeros((4, 2, 8)), jnp.zeros((2, 2, 8)), jnp.zeros(7), teacher_temp=0.04)
    with pytest.raises(ValueError, match="teacher views"):
        dino.dino_loss(jnp.zeros((2, 2, 8)), jnp.zeros((3, 2, 8)), jnp.zeros(8), teacher_temp=0.04)
    with pytest.raises(ValueError, match="batch or out_dim"):
        dino.dino_loss(jnp.zeros((4, 2, 8)), jnp.zeros((2, 3, 8)), jnp.zeros(8), teacher_temp=0.04)
    with pytest.raises(ValueError, match="views, batch"):
        dino.update_center(jnp.zeros(8), jnp.zeros((4, 8)))


def _torch_sinkhorn(teacher_cat, teacher_temp, iterations):
    """DINOv2's sinkhorn_knopp_teacher on one process: linear-domain rescaling of a [N, K] tensor."""
    q = torch.exp(teacher_cat / teacher_temp).t()  # [K, N]
    n, k = q.shape[1], q.shape[0]
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_targets_match_the_dinov2_algorithm(iterations):
    rng = np.random.default_rng(3)
    vt, b, k = 2, 6, 20
    t = rng.uniform(-1, 1, size=(vt, b, k)).astype(np.float32)  # cosine logits, as the weight-normed head gives
    got = np.asarray(dino.sinkhorn_targets(jnp.asarray(t), 0.07, iterations))
    ref = _torch_sinkhorn(torch.tensor(t.reshape(vt * b, k), dtype=torch.float64), 0.07, iterations).numpy()
    np.testing.assert_allclose(got.reshape(vt * b, k), ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)  # every row a distribution


def test_sinkhorn_spreads_a_teacher_that_prefers_one_prototype_and_survives_sharp_temperatures():
    rng = np.random.default_rng(4)
    vt, b, k = 2, 32, 16
    # every sample prefers prototype 0 (a teacher drifting to one dimension), with per-sample variation
    t = np.linspace(1.0, -1.0, k).astype(np.float32) + 0.3 * rng.normal(size=(vt, b, k)).astype(np.float32)
    plain = np.asarray(dino.teacher_targets(jnp.asarray(t), jnp.zeros(k), 0.1))
    assert plain.reshape(-1, k)[:, 0].sum() > 4 * vt * b / k  # uncentred: prototype 0 takes > 4x its share
    sk = np.asarray(dino.sinkhorn_targets(jnp.asarray(t), 0.1, 50))
    # equipartition: every prototype gets N / K of the mass, every row is still a distribution
    np.testing.assert_allclose(sk.reshape(-1, k).sum(0), vt * b / k, rtol=1e-3)
    np.testing.assert_allclose(sk.sum(-1), 1.0, rtol=1e-5)
    # temperature 0.01 on cosines 2 apart: exp underflows in fp32, the log-domain version does not
    sharp = np.asarray(dino.sinkhorn_targets(jnp.asarray(t), 0.01, 3))
    assert np.all(np.isfinite(sharp)) and np.allclose(sharp.sum(-1), 1.0, rtol=1e-5)


def test_sinkhorn_over_a_batch_sharded_on_eight_devices_equals_one_device():
    rng = np.random.default_rng(5)
    t = rng.uniform(-1, 1, size=(2, 16, 12)).astype(np.float32)
    s = rng.normal(size=(4, 16, 12)).astype(np.float32)
    mesh = mesh_lib.make_mesh(None)
    spec = NamedSharding(mesh, P(None, mesh.axis_names))
    f = jax.jit(lambda s_, t_: dino.dino_loss(s_, t_, jnp.zeros(12), teacher_temp=0.05, centering="sinkhorn")[0])
    sharded = f(jax.device_put(s, spec), jax.device_put(t, spec))
    single = dino.dino_loss(jnp.asarray(s), jnp.asarray(t), jnp.zeros(12), teacher_temp=0.05, centering="sinkhorn")[0]
    np.testing.assert_allclose(float(sharded), float(single), rtol=1e-5)


def test_unknown_centering_is_named():
    with pytest.raises(ValueError, match="centering='mean'"):
        dino.dino_loss(jnp.zeros((3, 2, 4)), jnp.zeros((2, 2, 4)), jnp.zeros(4), teacher_temp=0.04, centering="mean")


def test_koleo_is_minus_mean_log_nearest_neighbour_distance():
    x = jnp.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.6, 0.8]])  # normalised: 0, 90, 180, 53 degrees
    u = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    d = np.linalg.norm(u[:, None] - u[None], axis=-1) + np.diag([np.inf] * 4)
    np.testing.assert_allclose(float(dino.koleo_loss(x)), -np.mean(np.log(d.min(axis=1))), rtol=1e-5)


def test_koleo_gradient_spreads_a_crowded_batch():
    """Features that all point the same way (the collapse) get apart under gradient descent on KoLeo."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.ones((8, 4)) + 0.01 * rng.normal(size=(8, 4)), jnp.float32)
    before = float(dino.koleo_loss(x))
    for _ in range(20):
        x = x - 0.05 * jax.grad(dino.koleo_loss)(x)
    u = np.asarray(x) / np.linalg.norm(np.asarray(x), axis=1, keepdims=True)
    assert float(dino.koleo_loss(x)) < before - 1.0
    assert (u @ u.T)[~np.eye(8, dtype=bool)].mean() < 0.99  # the mean cosine fell from about 1

