"""Image-text contrastive losses over the global batch: CLIP's softmax (FaRL's ITC) and SigLIP's sigmoid.

`itc_loss(image_emb [B, E], text_emb [B, E], logit_scale, *, mesh, kind='softmax')` runs inside
`jax.shard_map` over every mesh axis (the batch's layout): each device L2-normalises its b = B / n
rows, all-gathers both modalities to [B, E] and computes only its own rows of the logits, [b, B] per
direction, so the memory per device is O(b x B), never B x B. Gradients flow through the all-gather
(its transpose is a reduce-scatter), so they equal the single-device loss's on any device count.

- 'softmax' (CLIP; FaRL's supplement: ITC over the global batch): logits = s <u_i, v_j> with
  s = exp(min(logit_scale, ln 100)) (CLIP clamps the temperature at 100); loss = (CE over each image's
  row of texts + CE over each text's row of images) / 2, means over the B pairs.
- 'sigmoid' (SigLIP, Zhai et al. 2023; not in FaRL): logits = s <u_i, v_j> + bias, label +1 for the
  matching pair and -1 otherwise, loss = -sum_ij log sigmoid(label_ij logit_ij) / B (their
  normalisation; SigLIP starts logit_scale at ln 10 and the bias at -10).

Metrics: `itc_i2t_top1` / `itc_t2i_top1` (fraction of the global batch whose own caption / image
scores highest: in-batch retrieval), `logit_scale` (s).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from lafs_jax import numerics

KINDS = ("softmax", "sigmoid")
MAX_LOG_SCALE = math.log(100.0)


def _local_terms(img, txt, scale, bias, axes, kind):
    """This device's share of the loss sums and retrieval hits; img / txt are its b normalised rows."""
    b = img.shape[0]
    img_all = lax.all_gather(img, axes, tiled=True)  # [B, E]
    txt_all = lax.all_gather(txt, axes, tiled=True)
    offset = lax.axis_index(axes) * b
    target = offset + jnp.arange(b)
    i2t = scale * (img @ txt_all.T)  # [b, B]: my images against every text
    t2i = scale * (txt @ img_all.T)  # [b, B]: my texts against every image
    hits_i2t = jnp.sum(jnp.argmax(i2t, axis=1) == target).astype(jnp.float32)
    hits_t2i = jnp.sum(jnp.argmax(t2i, axis=1) == target).astype(jnp.float32)
    if kind == "softmax":
        ce_i2t = jax.nn.logsumexp(i2t, axis=1) - i2t[jnp.arange(b), target]
        ce_t2i = jax.nn.logsumexp(t2i, axis=1) - t2i[jnp.arange(b), target]
        total = 0.5 * (jnp.sum(ce_i2t) + jnp.sum(ce_t2i))
    else:
        logits = i2t + bias
        labels = jnp.where(jnp.arange(img_all.shape[0])[None, :] == target[:, None], 1.0, -1.0)
        total = -jnp.sum(jax.nn.log_sigmoid(labels * logits))
    return total, hits_i2t, hits_t2i


def itc_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, *, mesh, kind: str = "softmax",
             logit_bias: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """(loss, metrics) of the module docstring; image_emb / text_emb [B, E] (any float dtype, computed in
    float32) split over every mesh axis, logit_scale (and logit_bias for 'sigmoid') scalars."""
    if kind not in KINDS:
        raise ValueError(f"itc_loss: kind={kind!r} is not valid; choose one of {KINDS}")
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"itc_loss: image and text embeddings must both be [B, E], got {image_emb.shape} and "
                         f"{text_emb.shape}")
    axes = mesh.axis_names
    batch = image_emb.shape[0]
    scale = jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), MAX_LOG_SCALE))
    bias = jnp.zeros((), jnp.float32) if logit_bias is None else jnp.asarray(logit_bias, jnp.float32)

    def body(img, txt, s, bb):
        img = numerics.l2_normalize(img.astype(jnp.float32))
        txt = numerics.l2_normalize(txt.astype(jnp.float32))
        total, h1, h2 = _local_terms(img, txt, s, bb, axes, kind)
        out = lax.psum(jnp.stack([total, h1, h2]), axes) / batch
        return lax.pmean(out, axes)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=P())
    out = fn(image_emb, text_emb, scale, bias)
    return out[0], {"itc_i2t_top1": out[1], "itc_t2i_top1": out[2], "logit_scale": scale}


def reference_loss(image_emb, text_emb, logit_scale, kind: str = "softmax", logit_bias=0.0) -> jax.Array:
    """The same loss on one device with the full B x B logits (what the tests compare against)."""
    img = numerics.l2_normalize(jnp.asarray(image_emb, jnp.float32))
    txt = numerics.l2_normalize(jnp.asarray(text_emb, jnp.float32))
    logits = jnp.exp(jnp.minimum(logit_scale, MAX_LOG_SCALE)) * img @ txt.T
    n = logits.shape[0]
    if kind == "softmax":
        diag = jnp.diagonal(logits)
        return 0.5 * (jnp.mean(jax.nn.logsumexp(logits, 1) - diag) + jnp.mean(jax.nn.logsumexp(logits, 0) - diag))
    labels = 2.0 * jnp.eye(n) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * (logits + logit_bias))) / n
