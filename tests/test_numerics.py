"""numerics.l2_normalize: one function for NumPy (float64 kept) and jax (finite gradient at a zero row)."""
import jax
import jax.numpy as jnp
import numpy as np

from lafs_jax.numerics import l2_normalize


def test_numpy_rows_are_unit_and_stay_float64():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]])
    y = l2_normalize(x, axis=1)
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0], [1e-18, 0.0]])  # below eps: divided by eps


def test_jax_matches_numpy_and_has_a_finite_gradient_at_zero():
    x = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(jax.jit(l2_normalize)(jnp.asarray(x)), l2_normalize(x.astype(np.float64)), rtol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(l2_normalize(v) * jnp.arange(3.0)))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(grad[1], np.arange(3.0) * 1e12, rtol=1e-6)  # zero row: the gradient of x / eps
