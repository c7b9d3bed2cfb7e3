"""Pretraining: LAFS landmark views and grid views (lafs_jax.train.views), the pretraining step and run()."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lafs_jax.models.sampling import sample_patches
from lafs_jax.train import views


def test_noise_has_the_configured_sigma_and_no_gradient():
    lm = jnp.full((64, 49, 2), 50.0)
    out = views.perturb_and_select(lm, jax.random.key(0), noise_std=5.0, num_selected=None)
    assert out.shape == lm.shape
    d = np.asarray(out - lm)
    assert abs(d.std() - 5.0) < 0.15 and abs(d.mean()) < 0.15
    g = jax.grad(lambda x: views.perturb_and_select(x, jax.random.key(0), noise_std=5.0,
                                                    num_selected=None).sum())(lm)
    assert float(jnp.abs(g).max()) == 0.0


def test_selection_draws_with_replacement_per_row():
    rng = np.random.default_rng(0)
    lm = jnp.asarray(rng.uniform(0, 111, size=(16, 49, 2)), jnp.float32)
    out = np.asarray(views.perturb_and_select(lm, jax.random.key(3), noise_std=0.0, num_selected=36))
    assert out.shape == (16, 36, 2)
    lm = np.asarray(lm)
    picked = []
    for row in range(16):
        # every selected point is one of the same row's landmarks
        idx = [int(np.flatnonzero((lm[row] == p).all(-1))[0]) for p in out[row]]
        picked.append(idx)
    picked = np.asarray(picked)
    assert any(len(set(r)) < 36 for r in picked), "36 of 49 with replacement should repeat somewhere in 16 rows"
    assert len({tuple(r) for r in picked}) == 16, "rows draw independently"
    again = views.perturb_and_select(jnp.asarray(lm), jax.random.key(3), noise_std=0.0, num_selected=36)
    np.testing.assert_array_equal(np.asarray(again), out)


def _fake_landmark_fn(images):
    """Landmarks that depend on image content, so a wrong input (aug instead of clean) shows."""
    n = images.shape[0]
    base = jnp.linspace(10.0, 40.0, 9)
    grid = jnp.stack(jnp.meshgrid(base, base, indexing="xy"), -1).reshape(1, 81, 2)
    shift = 20.0 * jnp.mean(images, axis=(1, 2, 3))[:, None, None]
    return jnp.broadcast_to(grid, (n, 81, 2)) + shift


def test_landmark_views_use_clean_for_landmarks_and_aug_for_patches():
    rng = np.random.default_rng(1)
    v, b, s = 2, 3, 48
    clean = jnp.asarray(rng.uniform(-1, 1, size=(v, b, s, s, 3)), jnp.float32)
    aug = jnp.asarray(rng.uniform(-1, 1, size=(v, b, s, s, 3)), jnp.float32)
    tokens = views.landmark_views(_fake_landmark_fn, clean, aug, jax.random.key(0), noise_std=0.0,
                                  num_selected=None, patch_size=4)
    assert tokens.shape == (v, b, 81, 4 * 4 * 3)
    flat_clean, flat_aug = clean.reshape(v * b, s, s, 3), aug.reshape(v * b, s, s, 3)
    expected = sample_patches(flat_aug, _fake_landmark_fn(flat_clean), 4).reshape(tokens.shape)
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(expected), atol=1e-6)
    wrong = sample_patches(flat_aug, _fake_landmark_fn(flat_aug), 4).reshape(tokens.shape)
    assert not np.allclose(np.asarray(tokens), np.asarray(wrong), atol=1e-3)
    local = views.landmark_views(_fake_landmark_fn, clean, aug, jax.random.key(0), noise_std=5.0,
                                 num_selected=36, patch_size=4)
    assert local.shape == (v, b, 36, 48)


def test_landmark_views_give_no_gradient_to_the_landmark_function():
    rng = np.random.default_rng(2)
    clean = jnp.asarray(rng.uniform(-1, 1, size=(1, 2, 32, 32, 3)), jnp.float32)

    def tokens_sum(scale):
        fn = lambda im: _fake_landmark_fn(im) * scale
        return views.landmark_views(fn, clean, clean, jax.random.key(0), noise_std=5.0, num_selected=8,
                                    patch_size=4).sum()

    assert float(jax.grad(tokens_sum)(1.0)) == 0.0


def test_grid_tokens_match_numpy_patchify_in_x_y_c_order():
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, size=(2, 3, 48, 48, 3)).astype(np.float32)
    tokens = np.asarray(views.grid_tokens(jnp.asarray(images), grid_size=48, patch_size=8))
    assert tokens.shape == (2, 3, 36, 192)
    ref = np.empty_like(tokens)
    for gy in range(6):
        for gx in range(6):
            for i in range(8):  # x offset
                for j in range(8):  # y offset
                    ref[:, :, gy * 6 + gx, (i * 8 + j) * 3:(i * 8 + j) * 3 + 3] = images[:, :, gy * 8 + j, gx * 8 + i]
    np.testing.assert_array_equal(tokens, ref)
    # the same tokens as the landmark sampler at grid centres (+0.5 cancels grid_sample's half-pixel shift)
    c = np.arange(6) * 8 + 4.5
    centers = np.stack(np.meshgrid(c, c, indexing="xy"), -1).reshape(1, 36, 2).repeat(6, 0)
    sampled = sample_patches(jnp.asarray(images.reshape(6, 48, 48, 3)), jnp.asarray(centers, jnp.float32), 8)
    np.testing.assert_allclose(np.asarray(sampled).reshape(tokens.shape), tokens, atol=2e-5)


def test_grid_tokens_resize_and_errors():
    images = jnp.ones((4, 112, 112, 3))
    tokens = views.grid_tokens(images, grid_size=48, patch_size=8)
    assert tokens.shape == (4, 36, 192)
    np.testing.assert_allclose(np.asarray(tokens), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        views.grid_tokens(images, grid_size=50, patch_size=8)
    with pytest.raises(ValueError, match="clean"):
        views.landmark_views(_fake_landmark_fn, jnp.ones((1, 2, 8, 8, 3)), jnp.ones((1, 2, 8, 9, 3)),
                             jax.random.key(0), noise_std=0.0, num_selected=None, patch_size=4)
