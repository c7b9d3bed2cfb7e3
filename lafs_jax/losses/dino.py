"""DINO self-distillation loss: sharpened student vs centred, sharpened teacher, over view pairs.

Shapes use a views-major layout: `student_logits[Vs, B, K]`, `teacher_logits[Vt, B, K]`, where the
teacher's views are the first `Vt` of the student's (the global views, in the same order), K is the
head's output dimension. For every teacher view `t` and student view `s != t` the loss term is the
cross-entropy H(softmax((teacher_t - center) / tau_t), softmax(student_s / tau_s)) averaged over the
batch; the loss is the mean of the `Vt * Vs - Vt` terms (LAFS and DINO: 2 x 10 - 2 = 18 terms).

The centre is an exponential moving average (momentum 0.9) of the teacher's mean output over all its
views and the *global* batch. Inside a jitted step whose batch is sharded over devices, `jnp.mean`
over the batch axis is that global mean (XLA inserts the cross-device reduction), so no explicit
collective is written here.

Everything is computed in float32 whatever the logits' dtype. Written by hand: no library ships the
DINO loss; the temperature schedule follows DINO's per-epoch `np.linspace` warmup.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_views(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array) -> None:
    if student_logits.ndim != 3 or teacher_logits.ndim != 3:
        raise ValueError(f"dino_loss: student_logits {student_logits.shape} and teacher_logits "
                         f"{teacher_logits.shape} must both be [views, batch, out_dim]")
    vs, b, k = student_logits.shape
    vt, bt, kt = teacher_logits.shape
    if (bt, kt) != (b, k):
        raise ValueError(f"dino_loss: teacher_logits {teacher_logits.shape} and student_logits "
                         f"{student_logits.shape} differ in batch or out_dim")
    if vt > vs:
        raise ValueError(f"dino_loss: {vt} teacher views but only {vs} student views; the teacher's views "
                         f"must be the first views of the student's")
    if vs < 2:
        raise ValueError(f"dino_loss: needs at least 2 student views, got {vs} (same-view pairs are skipped)")
    if center.shape != (k,):
        raise ValueError(f"dino_loss: center has shape {center.shape}, expected ({k},)")


CENTERINGS = ("center", "sinkhorn")


def teacher_targets(teacher_logits: jax.Array, center: jax.Array, teacher_temp) -> jax.Array:
    """softmax((teacher_logits - center) / teacher_temp) over the last axis, float32, no gradient."""
    t = (teacher_logits.astype(jnp.float32) - center.astype(jnp.float32)) / teacher_temp
    return jax.lax.stop_gradient(jax.nn.softmax(t, axis=-1))


def sinkhorn_targets(teacher_logits: jax.Array, teacher_temp, iterations: int = 3) -> jax.Array:
    """Sinkhorn-Knopp teacher targets (DINOv2's centring): [Vt, B, K] logits -> [Vt, B, K] targets.

    Alternately rescales Q = exp(teacher_logits / teacher_temp), over all Vt * B rows of the global
    batch, so that every prototype gets the same total mass (1/K) and every row the same (1/N); the
    returned rows sum to 1. Equipartition over the batch replaces the running centre: a teacher that
    maps every image to the same output cannot satisfy it, so neither collapse (one dimension, or
    uniform after centring) can take hold, which matters with small batches and few images.

    Computed in the log domain (a logsumexp per rescaling), so sharp temperatures cannot underflow a
    whole prototype to zero. Inside jit with the batch axis sharded, the sums over rows are global.
    """
    if iterations < 1:
        raise ValueError(f"sinkhorn_targets: iterations={iterations} must be >= 1")
    vt, b, k = teacher_logits.shape
    n = vt * b
    log_q = teacher_logits.astype(jnp.float32).reshape(n, k) / teacher_temp
    for _ in range(iterations):
        log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) - jnp.log(k)  # prototypes: 1/K each
        log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - jnp.log(n)  # rows: 1/N each
    return jax.lax.stop_gradient(jnp.exp(log_q + jnp.log(n)).reshape(vt, b, k))


def dino_loss(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array, *,
              student_temp: float = 0.1, teacher_temp, centering: str = "center",
              sinkhorn_iterations: int = 3) -> tuple[jax.Array, dict]:
    """(loss, metrics) of DINO's multi-crop cross-entropy.

    Args:
      student_logits: [Vs, B, K] head outputs of the student for every view (globals first).
      teacher_logits: [Vt, B, K] head outputs of the teacher for the global views (Vt <= Vs).
      center: [K] running centre of the teacher outputs.
      student_temp: student softmax temperature (0.1 in DINO and LAFS).
      teacher_temp: teacher softmax temperature; a float or a traced scalar (see `teacher_temp_at`).
      centering: 'center' (DINO / LAFS: subtract the running `center`, softmax) or 'sinkhorn'
        (DINOv2: `sinkhorn_targets` over the batch; `center` is then not used).
      sinkhorn_iterations: Sinkhorn-Knopp iterations of 'sinkhorn' (DINOv2: 3).

    Returns:
      loss: scalar float32, mean over the (teacher view, student view) pairs with different views of
        the batch-mean cross-entropy in nats.
      metrics: `teacher_entropy` (mean entropy of the teacher targets, nats; a collapse to one
        dimension drives it to 0, a collapse to uniform to log K), `teacher_batch_entropy` (entropy of
        the batch-mean target: how many prototypes the batch uses; log K when spread evenly, 0 when
        every sample picks the same one; high with a low `teacher_entropy` is the healthy state) and
        `student_entropy`.
    """
    _check_views(student_logits, teacher_logits, center)
    vs, vt = student_logits.shape[0], teacher_logits.shape[0]
    if centering == "center":
        targets = teacher_targets(teacher_logits, center, teacher_temp)  # [Vt, B, K]
    elif centering == "sinkhorn":
        targets = sinkhorn_targets(teacher_logits, teacher_temp, sinkhorn_iterations)
    else:
        raise ValueError(f"dino_loss: centering={centering!r} is not one of {CENTERINGS}")
    log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)  # [Vs, B, K]
    # cross[t, s] = batch mean of -sum_k q_t log p_s
    cross = -jnp.einsum("tbk,sbk->ts", targets, log_probs) / student_logits.shape[1]
    different_view = jnp.arange(vt)[:, None] != jnp.arange(vs)[None, :]
    loss = jnp.sum(jnp.where(different_view, cross, 0.0)) / (vt * vs - vt)
    teacher_entropy = -jnp.mean(jnp.sum(targets * jnp.log(jnp.clip(targets, 1e-30)), axis=-1))
    mean_target = jnp.mean(targets, axis=(0, 1))  # [K], over views and the (global) batch
    teacher_batch_entropy = -jnp.sum(mean_target * jnp.log(jnp.clip(mean_target, 1e-30)))
    student_entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))
    return loss, {"teacher_entropy": teacher_entropy, "teacher_batch_entropy": teacher_batch_entropy,
                  "student_entropy": student_entropy}


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum: float = 0.9) -> jax.Array:
    """center * momentum + (1 - momentum) * mean of `teacher_logits[Vt, B, K]` over views and batch.

    Under jit with the batch axis sharded, the mean covers the global batch (a cross-device mean).
    """
    if teacher_logits.ndim != 3 or teacher_logits.shape[-1] != center.shape[-1]:
        raise ValueError(f"update_center: teacher_logits {teacher_logits.shape} must be [views, batch, "
                         f"{center.shape[-1]}] to match center {center.shape}")
    batch_center = jnp.mean(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=(0, 1))
    return center * momentum + batch_center * (1.0 - momentum)


def teacher_temp_at(step, *, steps_per_epoch: int, warmup_temp: float, final_temp: float,
                    warmup_epochs: int):
    """Teacher temperature at `step` (int or traced): DINO's per-epoch schedule.

    Epoch e = step // steps_per_epoch takes value e of np.linspace(warmup_temp, final_temp,
    warmup_epochs) while e < warmup_epochs, then final_temp. LAFS uses 0.07 -> 0.04 over 30 epochs;
    DINO's defaults are 0.04 -> 0.04 (no warmup), its "boost" recipe 0.04 -> 0.07 over 30 epochs.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"teacher_temp_at: steps_per_epoch={steps_per_epoch} must be >= 1")
    if warmup_epochs < 0:
        raise ValueError(f"teacher_temp_at: warmup_epochs={warmup_epochs} must be >= 0")
    epoch = jnp.asarray(step) // steps_per_epoch
    if warmup_epochs == 0:
        return jnp.full(jnp.shape(epoch), final_temp, jnp.float32)
    frac = epoch.astype(jnp.float32) / max(warmup_epochs - 1, 1)
    warm = warmup_temp + (final_temp - warmup_temp) * frac
    return jnp.where(epoch < warmup_epochs, warm, final_temp).astype(jnp.float32)


def koleo_loss(features: jax.Array, eps: float = 1e-8) -> jax.Array:
    """KoLeo regulariser (DINOv2; Sablayrolles et al. 2019): -mean_i log(min_{j != i} ||x_i - x_j||) of the
    L2-normalised rows of `features` [B, D] (float32 scalar). It grows as samples crowd together, so adding
    it pushes each one away from its nearest neighbour: it spreads a batch whose features all converge to
    one point. Inside jit with the batch axis sharded the minimum is over the global batch.
    """
    x = features.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    d2 = jnp.sum(x ** 2, -1)[:, None] + jnp.sum(x ** 2, -1)[None, :] - 2.0 * x @ x.T
    d2 = jnp.where(jnp.eye(x.shape[0], dtype=bool), jnp.inf, d2)
    nearest = jnp.sqrt(jnp.maximum(jnp.min(d2, axis=1), 0.0))
    return -jnp.mean(jnp.log(nearest + eps))

