"""Additive-angular / cosine margins for face-recognition softmax heads.

The combined margin of InsightFace: the target class's cosine c = cos θ becomes

    f(c) = cos(m1·θ + m2) − m3          (CosFace: m3 = 0.4; ArcFace: m2 = 0.5; SphereFace-like: m1 > 1)

and every logit is scaled by s. Soft targets (mixup, [B, C] weights w) move each logit part of the
way, `s·(c + w·(f(c) − c))`, which is what the official LAFS CosFace head does with a 2-D label
(its margin `s·(c − m·w)` is the m3 case).

Written by hand (no library provides margin softmax). Numerics: θ is never taken through `arccos`;
sin θ = sqrt(1 − c²) uses a square root whose derivative is floored at c = ±1 (exactly, or past
it by rounding), so values are exact and neither value nor gradient is NaN or infinite for any
cosine in [−1, 1] (and a few ulp beyond).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Derivative floor of sqrt(1 − c²): below this argument the derivative is taken at this value. In fp32
# the smallest non-zero 1 − c² is about 1.2e-7, so only c = ±1 exactly (and rounding past it) is affected.
_SIN2_FLOOR = 1e-8

FALLBACKS = ("none", "th_mm", "easy")


@jax.custom_jvp
def _sqrt_nonneg(x: jax.Array) -> jax.Array:
    """sqrt(max(x, 0)) with a finite derivative at 0 (evaluated at _SIN2_FLOOR there)."""
    return jnp.sqrt(jnp.maximum(x, 0.0))


@_sqrt_nonneg.defjvp
def _sqrt_nonneg_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return _sqrt_nonneg(x), dx * 0.5 * jax.lax.rsqrt(jnp.maximum(x, _SIN2_FLOOR))


def check_margin(m1: float, m2: float, m3: float, s: float, fallback: str = "none") -> None:
    """ValueError naming the parameter unless the margin is usable."""
    if not m1 >= 1.0:
        raise ValueError(f"margin m1={m1} must be >= 1 (1 = no multiplicative angular margin)")
    if not 0.0 <= m2 < math.pi:
        raise ValueError(f"margin m2={m2} must be in [0, pi) radians")
    if not m3 >= 0.0:
        raise ValueError(f"margin m3={m3} must be >= 0")
    if not s > 0.0:
        raise ValueError(f"margin scale s={s} must be > 0")
    if fallback not in FALLBACKS:
        raise ValueError(f"margin fallback={fallback!r} is not one of {FALLBACKS}")
    if fallback == "th_mm" and m1 != 1.0:
        raise ValueError(f"margin fallback='th_mm' is ArcFace's and needs m1=1, got m1={m1}")


def target_cosine(cos: jax.Array, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                  fallback: str = "none") -> jax.Array:
    """f(c) = cos(m1·arccos(c) + m2) − m3, elementwise, any shape (fp32 in, fp32 out).

    `fallback` keeps f monotonic where m1·θ + m2 would pass π:
      'none'  : the plain formula;
      'th_mm' : ArcFace with easy_margin=False (reference §1.5): where c <= cos(π − m2) use
                c − m2·sin(m2) instead (the `th`/`mm` constants of the official head), then − m3;
      'easy'  : ArcFace easy_margin=True: where c <= 0 no margin is applied (f(c) = c).
    """
    check_margin(m1, m2, m3, 1.0, fallback)
    cos = cos.astype(jnp.float32)
    if m1 == 1.0 and m2 == 0.0:
        angular = cos
    elif m1 == 1.0:
        sin = _sqrt_nonneg(1.0 - cos * cos)
        angular = cos * math.cos(m2) - sin * math.sin(m2)
    else:
        theta = jnp.arctan2(_sqrt_nonneg(1.0 - cos * cos), cos)
        angular = jnp.cos(m1 * theta + m2)
    if fallback == "th_mm":
        angular = jnp.where(cos > math.cos(math.pi - m2), angular, cos - m2 * math.sin(m2))
    elif fallback == "easy":
        return jnp.where(cos > 0.0, angular - m3, cos)
    return angular - m3


def margin_logits(cos: jax.Array, labels: jax.Array, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                  s: float = 64.0, *, fallback: str = "none") -> jax.Array:
    """Scaled margin logits [B, C] from cosines `cos` [B, C].

    labels: int [B] (hard targets) or float [B, C] (soft targets w, e.g. mixup; the margin moves
    each logit by its weight: s·(c + w·(f(c) − c))). Returns fp32.
    """
    check_margin(m1, m2, m3, s, fallback)
    if cos.ndim != 2:
        raise ValueError(f"margin_logits: cos must be [B, C], got shape {cos.shape}")
    cos = cos.astype(jnp.float32)
    if labels.ndim == 2:
        if labels.shape != cos.shape:
            raise ValueError(f"margin_logits: soft labels {labels.shape} do not match cos {cos.shape}")
        weight = labels.astype(jnp.float32)
        return s * (cos + weight * (target_cosine(cos, m1, m2, m3, fallback) - cos))
    if labels.shape != cos.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"margin_logits: labels must be int [B={cos.shape[0]}] or float [B, C], got "
                         f"{labels.dtype}{list(labels.shape)}")
    # Hard labels: f only at the target entry (one transcendental per row, not per class).
    target = jnp.take_along_axis(cos, labels[:, None], axis=1)
    delta = target_cosine(target, m1, m2, m3, fallback) - target
    onehot = labels[:, None] == jnp.arange(cos.shape[1])[None, :]
    return s * (cos + jnp.where(onehot, delta, 0.0))
