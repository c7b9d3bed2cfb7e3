"""Margins against hand-computed values and a torch mirror of the official ArcFace / CosFace heads."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lafs_jax.losses.margin import margin_logits, target_cosine

EDGE_COS = np.array([1.0, -1.0, 1.0 - 6e-8, -1.0 + 6e-8, np.nextafter(np.float32(1), np.float32(2)),
                     np.nextafter(np.float32(-1), np.float32(-2)), 0.0, 0.3], np.float32)


def torch_arcface(cos, label, s=64.0, m=0.5, easy_margin=False):
    """The official ArcFace head's arithmetic (PFVIT), on given cosines."""
    cos = torch.as_tensor(cos, dtype=torch.float64)
    sine = torch.sqrt((1.0 - cos ** 2).clamp(0, 1))
    phi = cos * math.cos(m) - sine * math.sin(m)
    if easy_margin:
        phi = torch.where(cos > 0, phi, cos)
    else:
        phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
    one_hot = torch.zeros_like(cos).scatter_(1, torch.as_tensor(label).view(-1, 1).long(), 1)
    return (s * (one_hot * phi + (1.0 - one_hot) * cos)).numpy()


def torch_cosface_soft(cos, soft_label, s=64.0, m=0.4):
    """The official LAFS CosFace head with a 2-D (mixup) label: s·(cos − m·label)."""
    return (s * (torch.as_tensor(cos, dtype=torch.float64) - m * torch.as_tensor(soft_label, dtype=torch.float64))).numpy()


def test_cosface_hand_values():
    cos = jnp.array([[0.5, 0.2, -0.1], [0.1, 0.9, 0.0]])
    out = margin_logits(cos, jnp.array([0, 1]), m3=0.4, s=64.0)
    np.testing.assert_allclose(out, 64.0 * np.array([[0.1, 0.2, -0.1], [0.1, 0.5, 0.0]]), atol=1e-5)


def test_arcface_hand_values_including_edges():
    m = 0.5
    got = np.asarray(target_cosine(jnp.asarray(EDGE_COS), m2=m))
    want = [math.cos(math.acos(float(np.clip(c, -1, 1))) + m) for c in EDGE_COS]
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert abs(got[0] - math.cos(0.5)) < 1e-6 and abs(got[1] - math.cos(math.pi + 0.5)) < 1e-6


def test_multiplicative_margin_hand_values():
    # m1 = 2, m2 = 0: cos(2θ) = 2c² − 1, derivative 4c.
    c = jnp.asarray(EDGE_COS)
    np.testing.assert_allclose(target_cosine(c, m1=2.0), 2 * np.clip(EDGE_COS, -1, 1) ** 2 - 1, atol=2e-6)
    inner = jnp.array([0.999, -0.999, 0.3, -0.7])
    np.testing.assert_allclose(jax.vmap(jax.grad(lambda x: target_cosine(x, m1=2.0)))(inner), 4 * inner, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(m2=0.5), dict(m2=0.5, fallback="th_mm"), dict(m1=2.0, m2=0.3, m3=0.1),
                                dict(m2=0.5, fallback="easy"), dict(m3=0.4)])
def test_no_nan_in_value_or_gradient_at_theta_0_and_pi(kw):
    c = jnp.asarray(EDGE_COS)
    value = target_cosine(c, **kw)
    grad = jax.vmap(jax.grad(lambda x: target_cosine(x, **kw)))(c)
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad)), (value, grad)
    # Through the full head too: cosines from unit vectors that coincide or are opposite.
    e = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    w = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])

    def loss(e, w):
        cos = (e / jnp.linalg.norm(e, axis=1, keepdims=True)) @ (w / jnp.linalg.norm(w, axis=1, keepdims=True)).T
        return jnp.sum(jax.nn.log_softmax(margin_logits(cos, jnp.array([0, 2]), **kw)))

    ge, gw = jax.grad(loss, argnums=(0, 1))(e, w)
    assert np.all(np.isfinite(ge)) and np.all(np.isfinite(gw))


def test_arcface_gradient_matches_analytic_inside():
    m = 0.5
    c = jnp.array([0.3, -0.2, 0.95, -0.95])
    want = math.cos(m) + math.sin(m) * c / jnp.sqrt(1 - c ** 2)
    np.testing.assert_allclose(jax.vmap(jax.grad(lambda x: target_cosine(x, m2=m)))(c), want, rtol=1e-5)


@pytest.mark.parametrize("easy", [False, True])
def test_arcface_matches_official_head(easy):
    rng = np.random.default_rng(0)
    cos = np.concatenate([rng.uniform(-1, 1, (6, 9)), EDGE_COS[:6, None].repeat(9, axis=1)]).astype(np.float32)
    label = rng.integers(0, 9, 12)
    label[:3] = [0, 0, 0]
    cos[0, 0], cos[1, 0], cos[2, 0] = -0.95, -0.8, -0.85  # both sides of th = cos(π − 0.5) ≈ −0.8776
    got = margin_logits(jnp.asarray(cos), jnp.asarray(label), m2=0.5, s=64.0, fallback="easy" if easy else "th_mm")
    np.testing.assert_allclose(got, torch_arcface(cos, label, easy_margin=easy), atol=2e-4)
    th_mm_value = -0.95 - 0.5 * math.sin(0.5)  # hand: c − m·sin(m) below th
    if not easy:
        assert abs(float(got[0, 0]) / 64.0 - th_mm_value) < 1e-6


def test_soft_labels_match_official_cosface_and_hard_labels():
    rng = np.random.default_rng(1)
    cos = rng.uniform(-1, 1, (5, 7)).astype(np.float32)
    a, b, lam = rng.integers(0, 7, 5), rng.integers(0, 7, 5), rng.uniform(0, 1, 5)
    soft = (lam[:, None] * np.eye(7)[a] + (1 - lam[:, None]) * np.eye(7)[b]).astype(np.float32)
    np.testing.assert_allclose(margin_logits(jnp.asarray(cos), jnp.asarray(soft), m3=0.4),
                               torch_cosface_soft(cos, soft), atol=1e-4)
    # A one-hot soft label is the hard label, for any margin.
    for kw in (dict(m2=0.5), dict(m1=1.5, m2=0.2, m3=0.1)):
        np.testing.assert_allclose(margin_logits(jnp.asarray(cos), jnp.asarray(np.eye(7, dtype=np.float32)[a]), **kw),
                                   margin_logits(jnp.asarray(cos), jnp.asarray(a), **kw), atol=1e-5)
    # ArcFace with a soft label: each logit moves by its weight towards its margin value.
    arc = margin_logits(jnp.asarray(cos), jnp.asarray(soft), m2=0.5, s=1.0)
    f = np.cos(np.arccos(cos.astype(np.float64)) + 0.5)
    np.testing.assert_allclose(arc, cos + soft * (f - cos), atol=1e-5)


def test_bad_input_is_named():
    cos = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="m1"):
        margin_logits(cos, jnp.array([0, 1]), m1=0.5)
    with pytest.raises(ValueError, match="th_mm"):
        margin_logits(cos, jnp.array([0, 1]), m1=2.0, fallback="th_mm")
    with pytest.raises(ValueError, match="fallback"):
        margin_logits(cos, jnp.array([0, 1]), fallback="hard")
    with pytest.raises(ValueError, match="labels"):
        margin_logits(cos, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="soft labels"):
        margin_logits(cos, jnp.zeros((2, 4)))
