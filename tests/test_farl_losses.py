"""FaRL's losses: global-batch ITC (softmax and sigmoid) on 1 and 8 devices against the dense B x B
loss, BEiT's blockwise masking, and the masked-token cross-entropy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lafs_jax import sharding as mesh_lib
from lafs_jax.input import masking
from lafs_jax.losses import contrastive, mim


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_itc_loss_and_gradients_equal_on_1_and_8_devices(kind):
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)
    txt = jnp.asarray(img + 0.7 * rng.normal(size=(16, 12)), jnp.float32)
    scale, bias = jnp.float32(np.log(10.0)), jnp.float32(-2.0)

    def ref(i, t, s):
        return contrastive.reference_loss(i, t, s, kind, bias)

    want, want_g = jax.value_and_grad(ref, argnums=(0, 1, 2))(img, txt, scale)
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = mesh_lib.make_mesh(devices=devices)

        def loss(i, t, s):
            return contrastive.itc_loss(i, t, s, mesh=mesh, kind=kind, logit_bias=bias)[0]

        shard = NamedSharding(mesh, P(mesh.axis_names))
        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        got, got_g = f(jax.device_put(img, shard), jax.device_put(txt, shard), scale)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for a, b in zip(got_g, want_g):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_itc_metrics_and_temperature_clamp():
    mesh = mesh_lib.make_mesh()
    e = jnp.eye(8, 8)
    f = jax.jit(lambda a, b, s: contrastive.itc_loss(a, b, s, mesh=mesh))
    loss, m = f(e, e, jnp.float32(10.0))  # exp(10) clamped to 100
    assert float(m["logit_scale"]) == pytest.approx(100.0)
    assert float(m["itc_i2t_top1"]) == 1.0 and float(m["itc_t2i_top1"]) == 1.0
    assert float(loss) < 1e-10
    _, m = f(e, jnp.roll(e, 1, 0), jnp.float32(1.0))
    assert float(m["itc_i2t_top1"]) == 0.0
    with pytest.raises(ValueError, match="kind"):
        contrastive.itc_loss(e, e, 1.0, mesh=mesh, kind="hinge")


def test_blockwise_masking_counts_and_blocks():
    gen = masking.BlockMasking(14, 75)
    rng = np.random.default_rng(0)
    masks = np.stack([gen(rng) for _ in range(50)])
    counts = masks.reshape(50, -1).sum(1)
    assert masks.shape == (50, 14, 14) and masks.dtype == bool
    assert (counts <= 75).all() and (counts >= 75 - gen.max_block).all(), counts
    # blockwise, not scattered: most masked patches have a masked 4-neighbour
    m = masks
    nb = np.zeros_like(m)
    nb[:, 1:] |= m[:, :-1]
    nb[:, :-1] |= m[:, 1:]
    nb[:, :, 1:] |= m[:, :, :-1]
    nb[:, :, :-1] |= m[:, :, 1:]
    assert (m & nb).sum() / m.sum() > 0.9
    again = masking.BlockMasking(14, 75)(np.random.default_rng(0))
    np.testing.assert_array_equal(again, masks[0])
    with pytest.raises(ValueError, match="num_masked"):
        masking.BlockMasking(4, 17)


def test_masked_token_loss_counts_masked_positions_only():
    logits = jnp.zeros((2, 3, 5)).at[0, 0, 1].set(10.0)
    targets = jnp.array([[1, 2, 3], [0, 0, 3]])
    mask = jnp.array([[True, False, False], [False, False, True]])
    loss, acc = mim.masked_token_loss(logits, targets, mask)
    want = (jax.nn.logsumexp(logits[0, 0]) - 10.0 + np.log(5.0)) / 2
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert float(acc) == pytest.approx(0.5)
