"""sample_patches against torch.nn.functional.grid_sample (values and gradients), map_coordinates, and
hand-computed taps."""
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.scipy.ndimage import map_coordinates

from lafs_jax.models.sampling import patch_offsets, sample_patches


def torch_patches(images: np.ndarray, centers: np.ndarray, patch: int):
    """The official construction: one grid_sample per landmark, grid entry (i, j) = (x offset i, y offset j),
    normalised by H for both axes; tokens flattened (i, j, c). Returns (tokens, images tensor, centers tensor)."""
    x = torch.tensor(images, requires_grad=True)
    c = torch.tensor(centers, requires_grad=True)
    nchw = x.permute(0, 3, 1, 2)
    h = nchw.shape[2]
    off = torch.arange(-patch / 2, patch / 2, dtype=x.dtype)
    gx, gy = torch.meshgrid(off, off, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)
    tokens = []
    for n in range(c.shape[1]):
        g = (grid[None] + c[:, n, None, None, :]) / (h * 0.5) - 1
        s = F.grid_sample(nchw, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # [B, C, P, P]
        tokens.append(s.permute(0, 2, 3, 1).reshape(x.shape[0], -1))
    return torch.stack(tokens, dim=1), x, c


def random_case(seed, b=2, h=20, w=20, c=3, n=9, dtype=np.float64):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((b, h, w, c)).astype(dtype)
    centers = rng.uniform(-3, max(h, w) + 3, (b, n, 2))
    # near and past every border, and far outside
    centers[0, :6] = [[0.3, 0.7], [-4.2, 5.1], [w - 0.6, h - 1.3], [w + 2.9, 3.3], [7.4, -2.6], [-9.5, h + 8.5]]
    return images, centers.astype(dtype)


@pytest.mark.parametrize("shape", [(20, 20), (20, 28), (28, 20)])
def test_values_and_gradients_match_grid_sample_float64(shape):
    h, w = shape
    images, centers = random_case(0, h=h, w=w)
    ref, x_t, c_t = torch_patches(images, centers, 8)
    cot = np.random.default_rng(1).standard_normal(ref.shape)
    ref.backward(torch.tensor(cot))
    with jax.enable_x64(True):
        out, vjp = jax.vjp(lambda im, ce: sample_patches(im, ce, 8), jnp.asarray(images), jnp.asarray(centers))
        g_images, g_centers = vjp(jnp.asarray(cot))
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), atol=1e-10)
        np.testing.assert_allclose(np.asarray(g_images), x_t.grad.numpy(), atol=1e-10)
        np.testing.assert_allclose(np.asarray(g_centers), c_t.grad.numpy(), atol=1e-9)
    assert np.abs(c_t.grad.numpy()).max() > 0.1  # the comparison is not vacuous


def test_float32_matches_grid_sample_within_1e5():
    images, centers = random_case(3, b=3, h=24, w=24, n=7, dtype=np.float32)
    ref, x_t, c_t = torch_patches(images, centers, 8)
    cot = np.random.default_rng(4).standard_normal(ref.shape).astype(np.float32)
    ref.backward(torch.tensor(cot))
    out, vjp = jax.vjp(lambda im, ce: sample_patches(im, ce, 8), jnp.asarray(images), jnp.asarray(centers))
    g_images, g_centers = vjp(jnp.asarray(cot))
    assert out.dtype == jnp.float32 and out.shape == (3, 7, 192)
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_images), x_t.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_centers), c_t.grad.numpy(), atol=1e-5, rtol=0)


def test_token_layout_and_half_pixel_shift_by_hand():
    """On f(x, y, c) = x + 100 y + 10000 c bilinear sampling is exact, so every tap is known in closed form."""
    h = w = 32
    p = 4
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([xs + 100 * ys + 10000 * c for c in range(3)], axis=-1).astype(np.float64)[None]
    center = np.array([[[13.0, 17.0]]])
    with jax.enable_x64(True):
        tokens = np.asarray(sample_patches(jnp.asarray(image), jnp.asarray(center), p))
    off = np.asarray(patch_offsets(p))
    np.testing.assert_array_equal(off, [-2, -1, 0, 1])
    for i in range(p):
        for j in range(p):
            for c in range(3):
                x = 13.0 + off[i] - 0.5  # first patch axis is x; grid_sample(align_corners=False) shifts by -0.5
                y = 17.0 + off[j] - 0.5
                assert tokens[0, 0, (i * p + j) * 3 + c] == pytest.approx(x + 100 * y + 10000 * c)


def test_zero_padding_outside_the_image():
    image = np.ones((1, 10, 10, 1))
    # centre x = -4 + 0.5: tap i=0 at continuous -4, fully outside; the tap x = 0 - 0.5 blends pixel 0 with the
    # zero outside: 0.5.
    center = np.array([[[4.0, 5.0], [-20.0, 5.0]]])
    with jax.enable_x64(True):
        tokens = np.asarray(sample_patches(jnp.asarray(image), jnp.asarray(center), 8)).reshape(2, 8, 8)
    assert tokens[0, 0, 2] == pytest.approx(0.5)  # x tap: 4 - 4 - 0.5 = -0.5
    assert tokens[0, 1, 2] == pytest.approx(1.0)  # x tap: 0.5, inside
    assert np.all(tokens[1] == 0.0)  # entirely outside


def count_primitive(jaxpr, name: str) -> int:
    """Occurrences of a primitive in a jaxpr, including nested sub-jaxprs (pjit, custom_jvp, ...)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += count_primitive(sub, name)
    return total


def test_four_gathers_for_any_number_of_landmarks():
    """No per-landmark loop (the official code runs one grid_sample per landmark): one gather per
    bilinear corner, whatever the number of landmarks, batch and channels."""
    for n, b, c in ((1, 2, 3), (49, 3, 1)):
        jaxpr = jax.make_jaxpr(lambda im, ce: sample_patches(im, ce, 8))(jnp.zeros((b, 16, 16, c)),
                                                                          jnp.zeros((b, n, 2)))
        assert count_primitive(jaxpr.jaxpr, "gather") == 4


def test_float32_matches_map_coordinates_on_hand_derived_positions():
    """Oracle: jax.scipy.ndimage.map_coordinates(order=1, mode='constant') per (image, landmark, tap,
    channel) at the positions derived by hand: grid_sample(align_corners=False) with both axes
    normalised by H samples x at (cx + o_i) * W / H - 0.5 and y at cy + o_j - 0.5 (pixel-centre units)."""
    h, w, p = 20, 28, 4
    images, centers = random_case(7, b=2, h=h, w=w, n=6, dtype=np.float32)
    tokens = np.asarray(sample_patches(jnp.asarray(images), jnp.asarray(centers), p)).reshape(2, 6, p, p, 3)
    off = np.arange(p) - p / 2
    want = np.zeros_like(tokens)
    for b in range(2):
        x = (centers[b, :, 0, None] + off) * w / h - 0.5  # [N, P] along the first patch axis i
        y = centers[b, :, 1, None] + off - 0.5  # [N, P] along the second patch axis j
        xs, ys = np.broadcast_to(x[:, :, None], (6, p, p)), np.broadcast_to(y[:, None, :], (6, p, p))
        for c in range(3):
            want[b, ..., c] = map_coordinates(jnp.asarray(images[b, :, :, c]), [jnp.asarray(ys), jnp.asarray(xs)],
                                              order=1, mode="constant", cval=0.0)
    np.testing.assert_allclose(tokens, want, atol=1e-5, rtol=0)
    assert np.abs(want).max() > 0.5 and (want == 0).any()  # real values, and taps entirely off the image


def test_bfloat16_images_keep_their_dtype_and_sub_pixel_positions():
    images, centers = random_case(5, h=112, w=112, n=8, dtype=np.float32)
    ref = np.asarray(sample_patches(jnp.asarray(images), jnp.asarray(centers)))
    out = sample_patches(jnp.asarray(images, jnp.bfloat16), jnp.asarray(centers))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05)


@pytest.mark.parametrize("images_shape,centers_shape,match", [
    ((2, 16, 16), (2, 4, 2), "images must be"),
    ((2, 16, 16, 3), (2, 4, 3), "centers must be"),
    ((2, 16, 16, 3), (3, 4, 2), "batch of centers"),
])
def test_bad_shapes_are_named(images_shape, centers_shape, match):
    with pytest.raises(ValueError, match=match):
        sample_patches(jnp.zeros(images_shape), jnp.zeros(centers_shape))
