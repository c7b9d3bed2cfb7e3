"""Optimizers and schedules of pretraining and fine-tuning, built from optax.

Everything here is composed from optax transforms (`scale_by_adam`, `add_decayed_weights`,
`masked`, `scale`, `partition`, `inject_hyperparams`, `MultiSteps`, `clip_by_global_norm`) and optax
schedules. Written by hand, because optax has no equivalent:
- `clip_per_tensor`: DINO's `utils.clip_gradients` (each gradient tensor rescaled to its own norm
  bound), which is not `optax.clip_by_global_norm`;
- `freeze_until`: hold a transform at its initial state and emit zero updates for the first N steps,
  which reproduces DINO's "last layer frozen in epoch 0" (PyTorch drops those gradients, so AdamW
  neither moves nor decays the tensor, and its Adam step count starts at 1 when the freeze ends);
- the layer ids of layer-wise lr decay for (Part) fViT parameter paths.

Units: every schedule counts *optimizer updates*. With gradient accumulation (`accum_steps = k`)
the loop calls `tx.update` once per micro-batch, and the wrapped optimizer moves the parameters once
per k calls; `steps_per_epoch` passed to the builders is the number of `tx.update` calls (loop
steps) per epoch, so an epoch is `steps_per_epoch // k` optimizer updates.

Official behaviour (reference/lafs.md §2.5, §3.4) and the one deliberate difference: the official
fine-tuning code computes lr_scale = decay^(num_layers + 1 - layer_id) but never applies it; here
`layer_decay` is applied, and `layer_decay = 1.0` reproduces the official code.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lafs_jax.config import ConfigError, check
from lafs_jax.train.mesh import path_str

# Parameter-path patterns ('a/b/c' paths, re.search). The ViT block index is group 1 of BLOCK_REGEX.
BLOCK_REGEX = r"(?:^|/)(?:block|blocks|layers|encoderblock)_(\d+)(?:/|$)"
# Patch embedding, class token, positional embedding: layer id 0.
EMBED_REGEX = (r"(?:^|/)(?:cls|cls_token|pos_embed|pos_embedding|embedding|patch_embed|patch_embedding|"
               r"patch_to_embedding|global_token)(?:/|$)")
# The landmark CNN of Part fViT (with its output layer): layer id 0.
LANDMARK_REGEX = r"(?:^|/)landmark_cnn(?:/|$)"
# Tensors that get landmark_weight_decay: the landmark CNN except its output layer `landmark_head`
# (official: `stn.*` gets 0.05, the output layer `output_layer.*` the main 0.1).
LANDMARK_WD_REGEX = r"(?:^|/)landmark_cnn/(?!landmark_head(?:/|$))"
# DINO head's weight-normalised last layer, frozen during the first epoch(s) of pretraining.
LAST_LAYER_REGEX = r"(?:^|/)last_layer(?:/|$)"
# Top-level key of the class-centre matrix in fine-tuning params ({'backbone': ..., 'centers': W}).
CENTERS_KEY = "centers"

Schedule = Callable[[Any], jax.Array]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

def optim_config(preset: str = "finetune") -> ml_collections.ConfigDict:
    """Every optimizer field with its default; recipes embed it as `config.optim`.

    preset 'finetune' follows the official fine-tuning (reference/lafs.md §3.4), 'pretrain' the
    official LAFS / DINO pretraining (§2.5). Both presets have the same fields.
    """
    if preset not in ("finetune", "pretrain"):
        raise ValueError(f"optim_config(preset={preset!r}): choose 'finetune' or 'pretrain'")
    pre = preset == "pretrain"
    c = ml_collections.ConfigDict()
    # Length of the schedules in epochs (the training loop trains this many epochs unless it passes
    # total_steps to the builder). Official: 41 pretraining, 34 fine-tuning.
    c.epochs = 41 if pre else 34
    # Peak learning rate, reached at the end of warmup. With lr_scaling != 'none' this is the value
    # for a global batch of lr_base_batch_size. Official pretraining: 5e-4 x batch/256; official
    # fine-tuning: 2.29e-3 (its formula acc/480*1e-3*sqrt(world*B/336)*336 at 2 GPUs x 200 x acc 3).
    c.lr = 5e-4 if pre else 2.29e-3
    c.lr_scaling = "linear" if pre else "none"  # 'none' | 'linear' (x B/base) | 'sqrt' (x sqrt(B/base))
    c.lr_base_batch_size = 256  # the reference batch of lr_scaling
    c.warmup_epochs = 10.0 if pre else 5.0  # linear warmup from 0 to the peak, per optimizer update
    c.min_lr = 1e-6  # floor reached by the cosine decay at the end of the schedule
    # AdamW weight decay (decoupled, multiplied by the lr as torch.optim.AdamW). Not applied to biases
    # or tensors with ndim < 2 (norm scales); applied to cls token / positional embedding.
    c.weight_decay = 0.04 if pre else 0.1
    c.weight_decay_schedule = "cosine" if pre else "constant"  # 'constant' | 'cosine' (to weight_decay_end)
    c.weight_decay_end = 0.4 if pre else 0.1  # end value of the cosine weight-decay schedule
    # Fine-tuning: weight decay of the landmark CNN's ndim >= 2 tensors matching landmark_wd_regex
    # (official 0.05 on `stn.*`; its output layer keeps weight_decay).
    c.landmark_weight_decay = 0.05
    # Fine-tuning: layer-wise lr decay, lr_scale = layer_decay^(depth + 1 - layer_id). 0.58 is the
    # paper's value and is applied; 1.0 reproduces the official code, which never applies it.
    c.layer_decay = 1.0 if pre else 0.58
    # Fine-tuning: layer_decay < 1 with a randomly initialised backbone (config.init.backbone = '') is
    # a config error (the landmark CNN and patch embedding would train at 0.58^13 = 8.4e-4 x the lr)
    # unless this is True.
    c.allow_layer_decay_from_scratch = False
    c.b1 = 0.9  # Adam beta1
    c.b2 = 0.999  # Adam beta2
    c.eps = 1e-8  # Adam epsilon
    # Gradient clipping: 'none' | 'per_tensor' (DINO's clip_gradients: each tensor to norm <= clip_norm)
    # | 'global_norm' (optax.clip_by_global_norm). Official: per_tensor 3.0 pretraining, none fine-tuning.
    c.clip_mode = "per_tensor" if pre else "none"
    c.clip_norm = 3.0
    # Gradient accumulation: micro-batches per optimizer update (optax.MultiSteps, mean of the
    # micro-batch gradients). Official fine-tuning: 3 (at 200 images per GPU).
    c.accum_steps = 1
    # Pretraining: epochs during which the params matching last_layer_regex are frozen (official 1).
    c.freeze_last_layer_epochs = 1 if pre else 0
    c.last_layer_regex = LAST_LAYER_REGEX
    # Layer ids for layer-wise decay (regexes on 'a/b/c' parameter paths): landmark CNN -> 0,
    # blocks -> index + 1 (group 1 of block_regex), embeddings -> 0; everything else -> depth + 1.
    c.block_regex = BLOCK_REGEX
    c.embed_regex = EMBED_REGEX
    c.landmark_regex = LANDMARK_REGEX
    c.landmark_wd_regex = LANDMARK_WD_REGEX  # which tensors get landmark_weight_decay
    return c


def validate_optim_config(cfg: ml_collections.ConfigDict, prefix: str = "optim") -> None:
    """Raise ConfigError naming `prefix.key` for a missing field or a bad value."""
    missing = [k for k in optim_config().keys() if k not in cfg]
    if missing:
        raise ConfigError(f"config.{prefix}.{missing[0]} is missing (start from lafs_jax.train.optim.optim_config())")

    def key(k):
        return f"{prefix}.{k}"

    check(cfg.epochs > 0, key("epochs"), cfg.epochs, "> 0")
    check(cfg.lr >= 0, key("lr"), cfg.lr, ">= 0")
    if cfg.lr_scaling not in ("none", "linear", "sqrt"):
        raise ConfigError(f"config.{key('lr_scaling')}={cfg.lr_scaling!r} is not valid; choose one of "
                          f"['linear', 'none', 'sqrt']")
    check(cfg.lr_base_batch_size > 0, key("lr_base_batch_size"), cfg.lr_base_batch_size, "> 0")
    check(0 <= cfg.warmup_epochs < cfg.epochs, key("warmup_epochs"), cfg.warmup_epochs,
          f">= 0 and < epochs ({cfg.epochs})")
    check(cfg.min_lr >= 0, key("min_lr"), cfg.min_lr, ">= 0")
    for k in ("weight_decay", "weight_decay_end", "landmark_weight_decay"):
        check(cfg[k] >= 0, key(k), cfg[k], ">= 0")
    if cfg.weight_decay_schedule not in ("constant", "cosine"):
        raise ConfigError(f"config.{key('weight_decay_schedule')}={cfg.weight_decay_schedule!r} is not valid; "
                          f"choose one of ['constant', 'cosine']")
    check(0 < cfg.layer_decay <= 1, key("layer_decay"), cfg.layer_decay, "in (0, 1]")
    check(isinstance(cfg.allow_layer_decay_from_scratch, bool), key("allow_layer_decay_from_scratch"),
          cfg.allow_layer_decay_from_scratch, "True or False")
    for k in ("b1", "b2"):
        check(0 <= cfg[k] < 1, key(k), cfg[k], "in [0, 1)")
    check(cfg.eps > 0, key("eps"), cfg.eps, "> 0")
    if cfg.clip_mode not in ("none", "per_tensor", "global_norm"):
        raise ConfigError(f"config.{key('clip_mode')}={cfg.clip_mode!r} is not valid; choose one of "
                          f"['global_norm', 'none', 'per_tensor']")
    check(cfg.clip_norm > 0, key("clip_norm"), cfg.clip_norm, "> 0")
    check(isinstance(cfg.accum_steps, int) and cfg.accum_steps >= 1, key("accum_steps"), cfg.accum_steps,
          "an int >= 1")
    check(cfg.freeze_last_layer_epochs >= 0, key("freeze_last_layer_epochs"), cfg.freeze_last_layer_epochs, ">= 0")
    for k in ("last_layer_regex", "block_regex", "embed_regex", "landmark_regex", "landmark_wd_regex"):
        try:
            re.compile(cfg[k])
        except re.error as e:
            raise ConfigError(f"config.{key(k)}={cfg[k]!r} is not a valid regex: {e}") from None
    check(re.compile(cfg.block_regex).groups >= 1, key("block_regex"), cfg.block_regex,
          "a regex whose first group captures the block index")


def peak_lr(cfg: ml_collections.ConfigDict, global_batch_size: int | None = None) -> float:
    """cfg.lr scaled by the global batch (per optimizer update, so micro-batch x accum_steps)."""
    if cfg.lr_scaling == "none":
        return float(cfg.lr)
    if not global_batch_size:
        raise ValueError(f"config.optim.lr_scaling={cfg.lr_scaling!r} needs the global batch size; pass "
                         f"global_batch_size= to the optimizer builder")
    ratio = global_batch_size / cfg.lr_base_batch_size
    return float(cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio)))


# ----------------------------------------------------------------------------------------------
# Schedules (callable with Python ints and traceable with jnp arrays)
# ----------------------------------------------------------------------------------------------

def warmup_cosine(peak: float, total_steps: int, warmup_steps: int, floor: float) -> Schedule:
    """Linear 0 -> peak over warmup_steps, then cosine peak -> floor until total_steps, then floor.

    value(s) = peak * s / warmup_steps                                    for s < warmup_steps
             = floor + (peak - floor) * (1 + cos(pi * (s - w) / (T - w))) / 2   for w <= s <= T
    This is the official fine-tuning's GradualWarmupScheduler + CosineAnnealingLR. DINO's numpy
    table (`cosine_scheduler`) has the same cosine part; its warmup is linspace(0, peak, w), which
    reaches the peak one step earlier (peak * s / (w - 1)).
    """
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(f"warmup_cosine: need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
                                              decay_steps=total_steps, end_value=floor)


def cosine_schedule(start: float, end: float, total_steps: int) -> Schedule:
    """DINO's `cosine_scheduler` without warmup: end + (start - end) * (1 + cos(pi * s / T)) / 2.

    Used for the weight decay (0.04 -> 0.4) and the teacher momentum (0.996 -> 1); held at `end`
    after total_steps. Works for start < end and start == 0 (unlike optax's alpha form).
    """
    total_steps = int(total_steps)
    if total_steps <= 0:
        raise ValueError(f"cosine_schedule: total_steps must be > 0, got {total_steps}")
    unit = optax.cosine_decay_schedule(init_value=1.0, decay_steps=total_steps)  # 1 -> 0

    def schedule(step):
        return end + (start - end) * unit(step)

    return schedule


def _epoch_steps(epochs: float, steps_per_epoch: int, accum_steps: int) -> int:
    """Optimizer updates in `epochs` epochs of `steps_per_epoch` loop steps."""
    return int(round(epochs * steps_per_epoch)) // accum_steps


def schedules(cfg: ml_collections.ConfigDict, steps_per_epoch: int, *, total_steps: int | None = None,
              global_batch_size: int | None = None) -> dict[str, Schedule]:
    """{'learning_rate', 'weight_decay'} schedules in optimizer updates, as the builders use them.

    total_steps (loop steps, i.e. tx.update calls) overrides cfg.epochs x steps_per_epoch.
    """
    validate_optim_config(cfg)
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    k = cfg.accum_steps
    total = (int(total_steps) // k) if total_steps is not None else _epoch_steps(cfg.epochs, steps_per_epoch, k)
    warmup = _epoch_steps(cfg.warmup_epochs, steps_per_epoch, k)
    if total <= warmup:
        raise ValueError(f"the schedule has {total} optimizer updates, not more than the {warmup} warmup updates "
                         f"(config.optim.warmup_epochs={cfg.warmup_epochs}, steps_per_epoch={steps_per_epoch}, "
                         f"accum_steps={k})")
    lr = warmup_cosine(peak_lr(cfg, global_batch_size), total, warmup, cfg.min_lr)
    if cfg.weight_decay_schedule == "cosine":
        wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total)
    else:
        wd = optax.constant_schedule(cfg.weight_decay)
    return {"learning_rate": lr, "weight_decay": wd}


# ----------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------

def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _leaf_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def layer_id(path: str, depth: int, *, block_regex: str = BLOCK_REGEX, embed_regex: str = EMBED_REGEX,
             landmark_regex: str = LANDMARK_REGEX) -> int:
    """Layer id of one parameter for layer-wise lr decay (official `param_groups_lrd` numbering).

    landmark CNN -> 0; ViT block i -> i + 1; patch embedding / class token / positions -> 0;
    everything else (final norm, heads, ...) -> depth + 1. Checked in that order, so a block inside
    the landmark CNN stays 0.
    """
    if re.search(landmark_regex, path):
        return 0
    m = re.search(block_regex, path)
    if m:
        i = int(m.group(1))
        if not 0 <= i < depth:
            raise ValueError(f"parameter '{path}': block index {i} is outside 0..{depth - 1} (depth {depth})")
        return i + 1
    if re.search(embed_regex, path):
        return 0
    return depth + 1


def model_depth(params: Any, block_regex: str = BLOCK_REGEX, landmark_regex: str = LANDMARK_REGEX) -> int:
    """1 + the largest block index among parameter paths outside the landmark CNN (0 if none)."""
    indices = []
    for keypath, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(keypath)
        if re.search(landmark_regex, path):
            continue
        m = re.search(block_regex, path)
        if m:
            indices.append(int(m.group(1)))
    return max(indices) + 1 if indices else 0


def lr_multipliers(params: Any, layer_decay: float, depth: int | None = None, *, block_regex: str = BLOCK_REGEX,
                   embed_regex: str = EMBED_REGEX, landmark_regex: str = LANDMARK_REGEX) -> Any:
    """Pytree of layer_decay^(depth + 1 - layer_id) floats matching `params` (depth inferred if None)."""
    if depth is None:
        depth = model_depth(params, block_regex, landmark_regex)
    if depth == 0 and layer_decay != 1.0:
        raise ValueError(f"layer-wise lr decay {layer_decay}: no parameter path matches the block regex "
                         f"{block_regex!r} (set config.optim.block_regex to the model's block names)")
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: float(layer_decay ** (depth + 1 - layer_id(
            path_str(kp), depth, block_regex=block_regex, embed_regex=embed_regex, landmark_regex=landmark_regex))),
        params)


def decay_mask(params: Any, exclude_regex: str | None = None, only_regex: str | None = None) -> Any:
    """True for tensors that get weight decay: ndim >= 2 and not named 'bias' (official group 0).

    exclude_regex drops matching paths; only_regex keeps only matching paths.
    """

    def one(kp, x):
        path = path_str(kp)
        if len(_shape(x)) < 2 or _leaf_name(path) == "bias":
            return False
        if exclude_regex and re.search(exclude_regex, path):
            return False
        if only_regex and not re.search(only_regex, path):
            return False
        return True

    return jax.tree_util.tree_map_with_path(one, params)


def regex_mask(params: Any, regex: str) -> Any:
    """True for parameters whose 'a/b/c' path matches `regex` (re.search)."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: bool(re.search(regex, path_str(kp))), params)


# ----------------------------------------------------------------------------------------------
# Transforms that optax does not have
# ----------------------------------------------------------------------------------------------

def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """Each gradient tensor g scaled by max_norm / (||g||_2 + 1e-6) when that factor is below 1.

    DINO's `utils.clip_gradients` (per parameter tensor, not the global norm).
    """

    def update_fn(updates, state, params=None):
        del params

        def one(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            coef = max_norm / (norm + 1e-6)
            return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

        return jax.tree.map(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class FreezeUntilState(NamedTuple):
    count: jax.Array  # updates seen so far (int32)
    inner_state: Any


def freeze_until(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """Zero updates for the first `steps` updates, during which `inner` is neither run nor advanced.

    Afterwards `inner` runs as if it started then (its own step count starts at 0), as PyTorch's
    AdamW treats a tensor whose gradients were dropped.
    """
    steps = int(steps)

    def init_fn(params):
        return FreezeUntilState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update_fn(updates, state, params=None):
        def frozen(_):
            return jax.tree.map(jnp.zeros_like, updates), state.inner_state

        def active(_):
            return inner.update(updates, state.inner_state, params)

        new_updates, new_inner = jax.lax.cond(state.count < steps, frozen, active, None)
        return new_updates, FreezeUntilState(count=optax.safe_increment(state.count), inner_state=new_inner)

    return optax.GradientTransformation(init_fn, update_fn)


def _clip(cfg) -> list[optax.GradientTransformation]:
    if cfg.clip_mode == "per_tensor":
        return [clip_per_tensor(cfg.clip_norm)]
    if cfg.clip_mode == "global_norm":
        return [optax.clip_by_global_norm(cfg.clip_norm)]
    return []


def _accumulate(tx: optax.GradientTransformation, accum_steps: int) -> optax.GradientTransformation:
    if accum_steps == 1:
        return tx
    return optax.MultiSteps(tx, every_k_schedule=accum_steps, use_grad_mean=True).gradient_transformation()


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------

def finetune_optimizer(params: Any, cfg: ml_collections.ConfigDict, steps_per_epoch: int, *,
                       centers_tx: optax.GradientTransformation | None = None, total_steps: int | None = None,
                       global_batch_size: int | None = None, frozen_regex: str = "") -> optax.GradientTransformation:
    """AdamW with layer-wise lr decay, weight-decay groups and warmup + cosine, for fine-tuning.

    params: the trainable tree (arrays or ShapeDtypeStructs), e.g. {'backbone': ..., 'centers': W}.
    The top-level 'centers' subtree is updated by `centers_tx` (required when present; e.g. the
    Partial FC helper's optimizer, built with `schedules(...)['learning_rate']` if it should follow
    the same lr). Everything else: scale_by_adam(b1, b2, eps) -> + weight_decay * p on ndim >= 2
    non-bias tensors, except those matching landmark_wd_regex, which get landmark_weight_decay * p
    -> x layer_decay^(depth + 1 - layer_id) -> x -lr(step). Clipping (cfg.clip_mode)
    acts on the whole gradient tree first; `accum_steps > 1` wraps all of it in optax.MultiSteps.
    Backbone params matching `frozen_regex` (e.g. LANDMARK_REGEX) are never changed: no step, no decay.
    The current lr and weight decay are readable with `current_hyperparams(opt_state)`.
    """
    validate_optim_config(cfg)
    scheds = schedules(cfg, steps_per_epoch, total_steps=total_steps, global_batch_size=global_batch_size)
    has_centers = isinstance(params, dict) and CENTERS_KEY in params
    if has_centers and centers_tx is None:
        raise ValueError(f"params['{CENTERS_KEY}'] (the class-centre matrix) needs its own transform: pass "
                         f"centers_tx= to finetune_optimizer")
    if centers_tx is not None and not has_centers:
        raise ValueError(f"centers_tx was given but params has no top-level '{CENTERS_KEY}' entry "
                         f"(keys: {sorted(params) if isinstance(params, dict) else type(params).__name__})")
    backbone = ({k: v for k, v in params.items() if k != CENTERS_KEY} if has_centers else params)
    if frozen_regex and not any(jax.tree.leaves(regex_mask(backbone, frozen_regex))):
        raise ValueError(f"finetune_optimizer: frozen_regex={frozen_regex!r} matches no backbone parameter")

    regexes = dict(block_regex=cfg.block_regex, embed_regex=cfg.embed_regex, landmark_regex=cfg.landmark_regex)
    groups: list[tuple[float, Callable]] = []  # (lr multiplier, mask fn) for multipliers != 1
    if cfg.layer_decay != 1.0:
        depth = model_depth(backbone, cfg.block_regex, cfg.landmark_regex)
        multipliers = lr_multipliers(backbone, cfg.layer_decay, depth, **regexes)
        for value in sorted({m for m in jax.tree.leaves(multipliers) if m != 1.0}):
            groups.append((value, _multiplier_mask(value, cfg.layer_decay, depth, regexes)))

    def main_mask(p):
        return decay_mask(p, exclude_regex=cfg.landmark_wd_regex)

    def landmark_mask(p):
        return decay_mask(p, only_regex=cfg.landmark_wd_regex)

    def backbone_chain(learning_rate, weight_decay, landmark_weight_decay):
        return optax.chain(
            optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.add_decayed_weights(weight_decay, mask=main_mask),
            optax.add_decayed_weights(landmark_weight_decay, mask=landmark_mask),
            *[optax.masked(optax.scale(value), mask) for value, mask in groups],
            optax.scale_by_learning_rate(learning_rate),
            *([optax.masked(optax.set_to_zero(), lambda p: regex_mask(p, frozen_regex))] if frozen_regex else []),
        )

    backbone_tx = optax.inject_hyperparams(backbone_chain)(
        learning_rate=scheds["learning_rate"], weight_decay=scheds["weight_decay"],
        landmark_weight_decay=cfg.landmark_weight_decay)
    if has_centers:
        labels = lambda p: {k: jax.tree.map(lambda _: CENTERS_KEY if k == CENTERS_KEY else "backbone", v)
                            for k, v in p.items()}
        core = optax.partition({"backbone": backbone_tx, CENTERS_KEY: centers_tx}, labels)
    else:
        core = backbone_tx
    return _accumulate(optax.chain(*_clip(cfg), core), cfg.accum_steps)


def _multiplier_mask(value: float, layer_decay: float, depth: int, regexes: dict) -> Callable:
    def mask(p):
        return jax.tree_util.tree_map_with_path(
            lambda kp, _: layer_decay ** (depth + 1 - layer_id(path_str(kp), depth, **regexes)) == value, p)

    return mask


def pretrain_optimizer(params: Any, cfg: ml_collections.ConfigDict, steps_per_epoch: int, *,
                       total_steps: int | None = None, global_batch_size: int | None = None
                       ) -> optax.GradientTransformation:
    """AdamW for DINO / LAFS pretraining (reference/lafs.md §2.5).

    clip (per-tensor 3.0 officially) -> scale_by_adam -> + wd(step) * p on ndim >= 2 non-bias
    tensors, wd(step) cosine weight_decay -> weight_decay_end -> x -lr(step) with linear warmup then
    cosine to min_lr. Params matching cfg.last_layer_regex are frozen for the first
    freeze_last_layer_epochs epochs (no update, no decay, Adam state not advanced). No layer-wise
    decay (cfg.layer_decay must be 1.0 here).
    """
    validate_optim_config(cfg)
    if cfg.layer_decay != 1.0:
        raise ConfigError(f"config.optim.layer_decay={cfg.layer_decay!r}: pretraining applies no layer-wise "
                          f"decay; set it to 1.0")
    scheds = schedules(cfg, steps_per_epoch, total_steps=total_steps, global_batch_size=global_batch_size)
    freeze_steps = _epoch_steps(cfg.freeze_last_layer_epochs, steps_per_epoch, cfg.accum_steps)
    if freeze_steps > 0 and not any(jax.tree.leaves(regex_mask(params, cfg.last_layer_regex))):
        raise ConfigError(f"config.optim.last_layer_regex={cfg.last_layer_regex!r} matches no parameter, so "
                          f"freeze_last_layer_epochs={cfg.freeze_last_layer_epochs} would freeze nothing")

    def frozen_labels(p):
        return jax.tree.map(lambda m: "frozen" if m else "trained", regex_mask(p, cfg.last_layer_regex))

    def chain(learning_rate, weight_decay):
        adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        if freeze_steps == 0:
            return optax.chain(adam, optax.add_decayed_weights(weight_decay, mask=decay_mask),
                               optax.scale_by_learning_rate(learning_rate))
        return optax.chain(
            optax.partition({"trained": adam, "frozen": freeze_until(adam, freeze_steps)}, frozen_labels),
            optax.add_decayed_weights(weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(learning_rate),
            # zero the frozen tensors' weight decay too
            optax.masked(freeze_until(optax.identity(), freeze_steps),
                         lambda p: regex_mask(p, cfg.last_layer_regex)),
        )

    core = optax.inject_hyperparams(chain)(learning_rate=scheds["learning_rate"],
                                           weight_decay=scheds["weight_decay"])
    return _accumulate(optax.chain(*_clip(cfg), core), cfg.accum_steps)


def current_hyperparams(opt_state: Any) -> dict[str, jax.Array]:
    """The injected hyperparameters of an optimizer state, e.g. {'learning_rate', 'weight_decay'}.

    These are the values used by the *last* update (optax.inject_hyperparams semantics). The
    learning rate is the one of multiplier 1 (head group); layer group i trains at lr x multiplier.
    A name held by several injectors (e.g. a centres optimizer built with inject_hyperparams too)
    is prefixed with the nearest dict key above it: 'centers/learning_rate'.
    """
    found = []

    def is_injected(x):
        return isinstance(x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))

    for kp, leaf in jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_injected)[0]:
        if is_injected(leaf):
            label = next((str(k.key) for k in reversed(kp) if isinstance(k, jax.tree_util.DictKey)), "")
            found.append((label, leaf.hyperparams))
    counts: dict[str, int] = {}
    for _, hp in found:
        for name in hp:
            counts[name] = counts.get(name, 0) + 1
    out = {}
    for label, hp in found:
        for name, value in hp.items():
            out[name if counts[name] == 1 or label in ("", "backbone") else f"{label}/{name}"] = value
    return out
