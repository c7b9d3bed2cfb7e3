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
from lafs_jax.methods.farl.model import FarlModel
from lafs_jax.models import clip, presets


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


def test_one_pass_of_clean_and_masked_copies_equals_separate_passes():
    """FarlModel's 2B pass: the clean half's feature is the plain image tower's, the masked half's MIM
    logits are lm_transformer -> lm_norm -> lm_head of the masked copy's tokens (class row dropped)."""
    cfg = presets.model_config("clip_tiny")
    model = FarlModel(clip.build_visual(cfg), clip.build_text(cfg), mim_layers=1, vocab_size=7)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(3, 32, 32, 3)), jnp.float32)
    ids = jnp.asarray([[49406, 320, 49407, 0]] * 3)
    mask = jnp.asarray(rng.random((3, 16)) < 0.4)
    params = jax.jit(model.init)(jax.random.key(0), images, ids, mask)["params"]
    visual = clip.build_visual(cfg)
    block = clip.ClipTransformer(cfg.heads, 1, cfg.mlp_dim)
    norm = clip.LayerNorm32(epsilon=1e-5, use_fast_variance=False)

    @jax.jit
    def both(params):
        out = model.apply({"params": params}, images, ids, mask)
        clean, _ = visual.apply({"params": params["visual"]}, images)
        _, aux = visual.apply({"params": params["visual"]}, images, mask=mask)
        _, plain = visual.apply({"params": params["visual"]}, images, mask=jnp.zeros_like(mask))
        x, _ = block.apply({"params": params["lm_transformer"]}, aux["tokens"], False)
        x = norm.apply({"params": params["lm_norm"]}, x)
        want = x[:, 1:] @ params["lm_head"]["kernel"] + params["lm_head"]["bias"]
        return out, clean, want, aux["tokens"], plain["tokens"]

    out, clean, want, masked_tokens, plain_tokens = both(params)
    np.testing.assert_allclose(out["image"], clean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["mim_logits"], want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(masked_tokens, plain_tokens)
