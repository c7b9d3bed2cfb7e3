"""Text features of a CLIP / FaRL variables directory (`python -m lafs_jax.embed --texts FILE`).

A directory of kind 'clip_vit' (`python -m lafs_jax.convert --kind farl`, or FaRL pretraining's
`WORKDIR/backbone`) holds the text tower under `text/params` and `logit_scale`. `read_captions(path)`
reads one caption per line (UTF-8; an empty line or bytes that are not UTF-8 raise ValueError naming the
file and the line); `embed_texts(directory, texts, batch_size) -> (features float32 [N, E] (projected,
not normalised, CLIP's `encode_text`), truncated bool [N])` tokenizes with CLIP's BPE at the directory's
context length (metadata `text.context_length`, else the model's) and runs `models.clip.ClipText`;
captions longer than the context are truncated as CLIP does and counted in the log.

Zero-shot attribute scoring (CLIP's zero-shot rule, what FaRL's text tower makes cheap): `zero_shot_scores(
image_features [N, E], text_features [P, E]) -> float32 [N, P]` cosines of the L2-normalised rows (one
column per prompt, e.g. "a photo of a face with eyeglasses"); `zero_shot_probabilities(scores [N, P],
scale) -> [N, P]` softmax over the prompts of scale x cosine (CLIP: scale = exp(logit_scale), at most
100; `logit_scale_of(directory)`), e.g. with the pair "... with eyeglasses" / "... without eyeglasses" the
first column is the probability of the attribute. `python -m lafs_jax.embed --images X --texts
PROMPTS.txt` writes the scores.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from lafs_jax import variables as variables_lib
from lafs_jax.input import tokenizer as tok_lib
from lafs_jax.models import clip


def read_captions(path: str) -> list[str]:
    """The lines of a caption file (a trailing newline is not a line); ValueError naming file and line."""
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    if raw and raw[-1] == b"":
        raw = raw[:-1]
    if not raw:
        raise ValueError(f"{path}: no captions (the file is empty)")
    out = []
    for i, line in enumerate(raw, 1):
        try:
            text = line.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: line {i} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise ValueError(f"{path}: line {i} is empty (one caption per line)")
        out.append(text)
    return out


@functools.lru_cache(maxsize=4)
def _text_fn(model: clip.ClipText):
    return jax.jit(lambda params, ids: model.apply({"params": params}, ids))


def embed_texts(directory: str, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, E] float32, truncated [N]) of `texts` with the directory's text tower."""
    meta = variables_lib.read_metadata(directory)
    if meta.get("kind") != clip.KIND or "clip" not in meta.get("model", {}):
        raise ValueError(f"{directory}: --texts needs a CLIP / FaRL directory (kind {clip.KIND!r}), this one is "
                         f"kind {meta.get('kind')!r}")
    cfg = ml_collections.ConfigDict(meta["model"])
    context = int(meta.get("text", {}).get("context_length", cfg.clip.context_length))
    abstract = {"text": jax.eval_shape(lambda k: clip.init_text(cfg, k), jax.random.key(0))}
    variables, _ = variables_lib.load_variables(directory, abstract)
    ids, truncated = tok_lib.default_tokenizer().tokenize(texts, context)
    if truncated.any():
        logging.warning("%d of %d captions are longer than %d tokens and were truncated (CLIP's rule)",
                        int(truncated.sum()), len(texts), context)
    fn = _text_fn(clip.build_text(cfg))
    params = jax.tree.map(jnp.asarray, variables["text"]["params"])
    out = [np.asarray(fn(params, jnp.asarray(ids[s:s + batch_size]))) for s in range(0, len(ids), batch_size)]
    return np.concatenate(out, 0).astype(np.float32), truncated


def zero_shot_scores(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """float32 [N, P]: cosine of image i and prompt p (module docstring)."""
    a = np.asarray(image_features, np.float64)
    b = np.asarray(text_features, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"zero_shot_scores: image [N, E] and text [P, E] features needed, got {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a @ b.T).astype(np.float32)


def zero_shot_probabilities(scores: np.ndarray, scale: float) -> np.ndarray:
    """float32 [N, P]: softmax over the prompts of `scale` x cosines [N, P] (CLIP's zero-shot classifier)."""
    z = float(scale) * np.asarray(scores, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def logit_scale_of(directory: str) -> float:
    """exp(logit_scale) of a CLIP / FaRL directory, clamped at CLIP's 100."""
    variables, _ = variables_lib.load_variables(directory, {"logit_scale": jax.ShapeDtypeStruct((), jnp.float32)})
    return float(min(np.exp(float(variables["logit_scale"])), clip.LOGIT_SCALE_MAX))
