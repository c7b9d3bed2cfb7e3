"""Optimizers of pretraining and fine-tuning: one config-driven builder on optax.

`make(params, cfg, learning_rate=, weight_decay=, lr_mults=, wd_mults=, frozen_until=, own=, ...)` is
the one builder (in the manner of big_vision's `optax.make`); `cfg.name` picks the update rule, one
of OPTIMIZERS, and `adamw(...)` is the same builder with name 'adamw'. Every parameter gets an lr
factor and a weight-decay factor from lists of (regex, factor) rules over its 'a/b/c' path
(`lafs_jax.train.param_rules`; first match wins; lr factor None = frozen: no update, no decay, no
optimizer state), the leaves are labelled once from the params tree, and `optax.partition` gives each
distinct (lr factor, wd factor, frozen_until) group one chain inside one `optax.inject_hyperparams`
(so the current lr / weight decay are in the state for logging). With f_l, f_w the group's factors
and wd(t), lr(t) the schedules:
- adamw: scale_by_adam -> + wd(t) f_w p -> x f_l -> x -lr(t)   (decoupled, torch.optim.AdamW);
- sgd:   + wd(t) f_w p -> momentum trace (nesterov option) -> x f_l -> x -lr(t)   (torch.optim.SGD);
- lars:  + wd(t) f_w p -> x trust_coefficient ||p|| / ||u|| -> momentum trace -> x f_l -> x -lr(t)
  (BYOL's LARS);
- lamb:  scale_by_adam -> + wd(t) f_w p -> x ||p|| / ||u|| -> x f_l -> x -lr(t)   (optax.lamb).
The trust ratios are per tensor, 1 where either norm is 0, and not applied in a group with f_w = 0:
the no-decay rules (biases, ndim < 2 tensors such as norm scales) exclude a tensor from both weight
decay and the trust ratio, as LARS' `exclude_bias_and_bn`.
`finetune_optimizer` and `pretrain_optimizer` turn `config.optim` (plus the rules a method adds:
`lr_rules`, `wd_rules`, `layer0_regexes`) into those rules: layer-wise lr decay becomes generated
(path, layer_decay^(depth + 1 - layer_id)) pairs, the weight-decay groups become wd_mults, the
pretraining head's frozen last layer becomes `frozen_until`. `schedules(cfg, ...)` gives the lr
schedule of `cfg.schedule` (one of SCHEDULES, `lafs_jax.train.schedules`) and the weight-decay schedule.

From optax: the update rules' transforms, `partition`, `inject_hyperparams`, `conditionally_mask` (a
group frozen for its first N updates: zero update, inner state not advanced, so Adam's step count
starts at 1 when the freeze ends, as PyTorch's AdamW treats a tensor whose gradients are dropped),
`MultiSteps`, `clip_by_global_norm`, `tree_utils.tree_get_all_with_path`. Written here:
`clip_per_tensor` (see its docstring for why no optax transform fits).

Units: every schedule counts *optimizer updates*. With gradient accumulation (`accum_steps = k`)
the loop calls `tx.update` once per micro-batch, and the wrapped optimizer moves the parameters once
per k calls; `steps_per_epoch` passed to the builders is the number of `tx.update` calls (loop
steps) per epoch, so an epoch is `steps_per_epoch // k` optimizer updates.

The one deliberate difference from the official fine-tuning (`param_groups_lrd`): it computes lr_scale
= decay^(num_layers + 1 - layer_id) but never applies it; here `layer_decay` is applied, and
`layer_decay = 1.0` reproduces the official code.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lafs_jax.config import ConfigError, check
from lafs_jax.sharding import path_str
from lafs_jax.train.param_rules import (BLOCK_REGEX, EMBED_REGEX, Mults, check_mults, compiled, first,  # noqa: F401
                                        layer_decay_mults, layer_id, match_mults, model_depth, no_decay_mults,
                                        paths, unmatched_rules)
from lafs_jax.train import schedules as schedules_lib
from lafs_jax.train.schedules import Schedule, cosine_schedule, peak_lr, warmup_cosine, warmup_step  # noqa: F401

# The pretraining head's weight-normalised last layer, frozen during its first epoch(s).
LAST_LAYER_REGEX = r"(?:^|/)last_layer(?:/|$)"
# Top-level key of the class-centre matrix in fine-tuning params ({'backbone': ..., 'centers': W}).
CENTERS_KEY = "centers"

OPTIMIZERS = ("adamw", "lars", "sgd", "lamb")  # values of config.optim.name
SCHEDULES = ("warmup_cosine", "warmup_step")  # values of config.optim.schedule


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

def optim_config(preset: str = "finetune") -> ml_collections.ConfigDict:
    """Every optimizer field with its default; recipes embed it as `config.optim`.

    preset 'finetune' follows the official fine-tuning (LAFS `finetune` scripts: AdamW, layer-decay
    groups, warmup + cosine), 'pretrain' the official self-distillation pretraining (AdamW, cosine
    weight decay, per-tensor clipping, a frozen last layer in epoch 0). Both presets have the same fields.
    """
    if preset not in ("finetune", "pretrain"):
        raise ValueError(f"optim_config(preset={preset!r}): choose 'finetune' or 'pretrain'")
    pre = preset == "pretrain"
    c = ml_collections.ConfigDict()
    # Length of the schedules in epochs (the training loop trains this many epochs unless it passes
    # total_steps to the builder). Official: 41 pretraining, 34 fine-tuning.
    c.epochs = 41 if pre else 34
    # Update rule, one of OPTIMIZERS: 'adamw' | 'lars' | 'sgd' | 'lamb' (see the module docstring).
    c.name = "adamw"
    # Peak learning rate, reached at the end of warmup. With lr_scaling != 'none' this is the value
    # for a global batch of lr_base_batch_size. Official pretraining: 5e-4 x batch/256; official
    # fine-tuning: 2.29e-3 (its formula acc/480*1e-3*sqrt(world*B/336)*336 at 2 GPUs x 200 x acc 3).
    c.lr = 5e-4 if pre else 2.29e-3
    c.lr_scaling = "linear" if pre else "none"  # 'none' | 'linear' (x B/base) | 'sqrt' (x sqrt(B/base))
    c.lr_base_batch_size = 256  # the reference batch of lr_scaling
    c.warmup_epochs = 10.0 if pre else 5.0  # linear warmup from 0 to the peak, per optimizer update
    c.min_lr = 1e-6  # floor reached by the cosine decay at the end of the schedule
    # lr schedule, one of SCHEDULES: 'warmup_cosine' (warmup, cosine to min_lr) | 'warmup_step' (warmup,
    # then the peak x step_factor^(number of step_boundaries passed); min_lr unused).
    c.schedule = "warmup_cosine"
    c.step_boundaries = ()  # 'warmup_step': increasing epochs in [warmup_epochs, epochs) after which lr x step_factor
    c.step_factor = 0.1  # 'warmup_step': lr multiplier at each boundary
    # Weight decay: adamw / lamb add it to the Adam update (decoupled, multiplied by the lr as
    # torch.optim.AdamW), sgd / lars to the gradient (as torch.optim.SGD). Not applied to biases or
    # tensors with ndim < 2 (norm scales); applied to cls token / positional embedding.
    c.weight_decay = 0.04 if pre else 0.1
    c.weight_decay_schedule = "cosine" if pre else "constant"  # 'constant' | 'cosine' (to weight_decay_end)
    c.weight_decay_end = 0.4 if pre else 0.1  # end value of the cosine weight-decay schedule
    # Fine-tuning: layer-wise lr decay, lr_scale = layer_decay^(depth + 1 - layer_id). 0.58 is the
    # paper's value and is applied; 1.0 reproduces the official code, which never applies it.
    c.layer_decay = 1.0 if pre else 0.58
    # Fine-tuning: layer_decay < 1 with a randomly initialised backbone (config.init.backbone = '') is
    # a config error (the first layers would train at 0.58^13 = 8.4e-4 x the lr at depth 12) unless
    # this is True.
    c.allow_layer_decay_from_scratch = False
    c.b1 = 0.9  # Adam beta1 (adamw, lamb)
    c.b2 = 0.999  # Adam beta2 (adamw, lamb)
    c.eps = 1e-8  # Adam epsilon (adamw, lamb)
    c.momentum = 0.9  # momentum of the trace (sgd, lars)
    c.nesterov = False  # Nesterov momentum (sgd, lars; an error with adamw / lamb)
    c.trust_coefficient = 0.001  # lars: trust ratio = trust_coefficient x ||p|| / ||g + wd p|| (lamb has none)
    # Gradient clipping: 'none' | 'per_tensor' (each tensor to norm <= clip_norm, `clip_per_tensor`)
    # | 'global_norm' (optax.clip_by_global_norm). Official: per_tensor 3.0 pretraining, none fine-tuning.
    c.clip_mode = "per_tensor" if pre else "none"
    c.clip_norm = 3.0
    # Gradient accumulation: micro-batches per optimizer update (optax.MultiSteps, mean of the
    # micro-batch gradients). Official fine-tuning: 3 (at 200 images per GPU).
    c.accum_steps = 1
    # Pretraining: epochs during which the params matching last_layer_regex are frozen (official 1).
    c.freeze_last_layer_epochs = 1 if pre else 0
    c.last_layer_regex = LAST_LAYER_REGEX
    # Layer ids for layer-wise decay (regexes on 'a/b/c' parameter paths): blocks -> index + 1 (group
    # 1 of block_regex), embeddings -> 0; everything else -> depth + 1 (a method may add layer-0 modules).
    c.block_regex = BLOCK_REGEX
    c.embed_regex = EMBED_REGEX
    # Extra (regex, factor) rules on 'a/b/c' parameter paths, checked before the rules the task
    # derives from the fields above (first match wins). lr_mults: factor x the lr of the matched
    # tensors, or None to freeze them (no update, no decay), e.g. (('vit/patch_embedding/', None),).
    # wd_mults: factor x the weight-decay schedule, e.g. (('(?:^|/)bias$', 1.0),) decays biases too.
    # Paths start at the optimised tree: 'backbone/...' (fine-tuning; the class centres 'centers' have
    # their own optimizer, config.loss.centers_*), 'backbone/...' / 'head/...' (pretraining). A rule that
    # matches no parameter is an error (a typo would otherwise change nothing).
    c.lr_mults = ()
    c.wd_mults = ()
    return c


def validate_optim_config(cfg: ml_collections.ConfigDict, prefix: str = "optim") -> None:
    """Raise ConfigError naming `prefix.key` for a missing field or a bad value."""
    missing = [k for k in optim_config().keys() if k not in cfg]
    if missing:
        raise ConfigError(f"config.{prefix}.{missing[0]} is missing (start from lafs_jax.train.optim.optim_config())")

    def key(k):
        return f"{prefix}.{k}"

    check(cfg.epochs > 0, key("epochs"), cfg.epochs, "> 0")
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"config.{key('name')}={cfg.name!r} is not valid; choose one of {sorted(OPTIMIZERS)}")
    check(cfg.lr >= 0, key("lr"), cfg.lr, ">= 0")
    if cfg.lr_scaling not in ("none", "linear", "sqrt"):
        raise ConfigError(f"config.{key('lr_scaling')}={cfg.lr_scaling!r} is not valid; choose one of "
                          f"['linear', 'none', 'sqrt']")
    check(cfg.lr_base_batch_size > 0, key("lr_base_batch_size"), cfg.lr_base_batch_size, "> 0")
    check(0 <= cfg.warmup_epochs < cfg.epochs, key("warmup_epochs"), cfg.warmup_epochs,
          f">= 0 and < epochs ({cfg.epochs})")
    check(cfg.min_lr >= 0, key("min_lr"), cfg.min_lr, ">= 0")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"config.{key('schedule')}={cfg.schedule!r} is not valid; choose one of {sorted(SCHEDULES)}")
    bounds = cfg.step_boundaries
    check(isinstance(bounds, (tuple, list)) and all(_is_number(b) for b in bounds)
          and all(a < b for a, b in zip(bounds, bounds[1:]))
          and all(cfg.warmup_epochs <= b < cfg.epochs for b in bounds),
          key("step_boundaries"), bounds,
          f"strictly increasing epochs in [warmup_epochs, epochs) = [{cfg.warmup_epochs}, {cfg.epochs})")
    check(not bounds or cfg.schedule == "warmup_step", key("step_boundaries"), bounds,
          f"empty unless schedule='warmup_step' (schedule is {cfg.schedule!r})")
    check(_is_number(cfg.step_factor) and cfg.step_factor > 0, key("step_factor"), cfg.step_factor, "> 0")
    for k in ("weight_decay", "weight_decay_end"):
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
    check(_is_number(cfg.momentum) and 0 <= cfg.momentum < 1, key("momentum"), cfg.momentum, "in [0, 1)")
    check(isinstance(cfg.nesterov, bool), key("nesterov"), cfg.nesterov, "True or False")
    check(not cfg.nesterov or cfg.name in ("sgd", "lars"), key("nesterov"), cfg.nesterov,
          f"False with name={cfg.name!r} (Nesterov momentum is for 'sgd' and 'lars')")
    check(_is_number(cfg.trust_coefficient) and cfg.trust_coefficient > 0, key("trust_coefficient"),
          cfg.trust_coefficient, "> 0")
    if cfg.clip_mode not in ("none", "per_tensor", "global_norm"):
        raise ConfigError(f"config.{key('clip_mode')}={cfg.clip_mode!r} is not valid; choose one of "
                          f"['global_norm', 'none', 'per_tensor']")
    check(cfg.clip_norm > 0, key("clip_norm"), cfg.clip_norm, "> 0")
    check(isinstance(cfg.accum_steps, int) and cfg.accum_steps >= 1, key("accum_steps"), cfg.accum_steps,
          "an int >= 1")
    check(cfg.freeze_last_layer_epochs >= 0, key("freeze_last_layer_epochs"), cfg.freeze_last_layer_epochs, ">= 0")
    for k in ("last_layer_regex", "block_regex", "embed_regex"):
        try:
            re.compile(cfg[k])
        except re.error as e:
            raise ConfigError(f"config.{key(k)}={cfg[k]!r} is not a valid regex: {e}") from None
    check(re.compile(cfg.block_regex).groups >= 1, key("block_regex"), cfg.block_regex,
          "a regex whose first group captures the block index")
    check_mults(cfg.lr_mults, f"config.{key('lr_mults')}", allow_none=True, error=ConfigError)
    check_mults(cfg.wd_mults, f"config.{key('wd_mults')}", allow_none=False, error=ConfigError)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def schedules(cfg: ml_collections.ConfigDict, steps_per_epoch: int, *, total_steps: int | None = None,
              global_batch_size: int | None = None) -> dict[str, Schedule]:
    """{'learning_rate', 'weight_decay'} schedules in optimizer updates, as the builders use them
    (`lafs_jax.train.schedules.from_config` of the validated cfg)."""
    validate_optim_config(cfg)
    return schedules_lib.from_config(cfg, steps_per_epoch, total_steps=total_steps,
                                     global_batch_size=global_batch_size)


# ----------------------------------------------------------------------------------------------
# The builder
# ----------------------------------------------------------------------------------------------

FROZEN = "frozen"  # label of the parameters with lr factor None


class Group(NamedTuple):
    """One optimizer group: the tensors sharing these factors get one chain."""
    lr_mult: float | None  # x the lr schedule; None = frozen
    wd_mult: float  # x the weight-decay schedule
    frozen_until: int  # zero update (state not advanced) for the group's first N updates


def param_groups(params: Any, *, lr_mults: Mults = (), wd_mults: Mults = (),
                 frozen_until: Sequence[tuple[str, int]] = (),
                 own: Mapping[str, str] | None = None) -> tuple[Any, dict[str, Group | None]]:
    """(labels, groups): a pytree of group labels like `params`, and label -> Group.

    own: label -> regex for subtrees updated by a caller's transform (label -> None in `groups`);
    they are matched first and ignore the rules. Unmatched lr -> 1.0, unmatched wd -> 0.0 (no decay),
    unmatched frozen_until -> 0. Labels: the `own` names, 'frozen', and 'group_<i>' for the optimizer
    groups in sorted (lr, wd, frozen_until) order, so they depend only on the tree and the rules.
    """
    check_mults(lr_mults, "lr_mults", allow_none=True)
    check_mults(wd_mults, "wd_mults", allow_none=False)
    for i, entry in enumerate(frozen_until):
        if len(entry) != 2 or not isinstance(entry[1], (int, np.integer)) or entry[1] < 0:
            raise ValueError(f"frozen_until[{i}]={entry!r} is not valid: a (regex, int >= 0) pair")
    own_rules = compiled([(regex, name) for name, regex in (own or {}).items()])
    lr_rules, wd_rules, until_rules = compiled(lr_mults), compiled(wd_mults), compiled(frozen_until)

    def key(path):
        name = first(path, own_rules, None)
        if name is not None:
            return name
        lr = first(path, lr_rules, 1.0)
        if lr is None:
            return FROZEN
        return Group(float(lr), float(first(path, wd_rules, 0.0)), int(first(path, until_rules, 0)))

    keys = {path: key(path) for path in paths(params)}
    adam_groups = sorted({k for k in keys.values() if isinstance(k, Group)})
    names = {g: f"group_{i}" for i, g in enumerate(adam_groups)}
    labels = jax.tree_util.tree_map_with_path(lambda kp, _: names.get(keys[path_str(kp)], keys[path_str(kp)]),
                                              params)
    groups: dict[str, Group | None] = {names[g]: g for g in adam_groups}
    present = set(keys.values()) - set(adam_groups)
    if FROZEN in present:
        groups[FROZEN] = Group(None, 0.0, 0)
    for name, regex in (own or {}).items():
        if name not in present:
            raise ValueError(f"own transform {name!r}: its regex {regex!r} matches no parameter")
        groups[name] = None
    return labels, groups


class Hyper(NamedTuple):
    """The static hyperparameters of the update rules (config.optim fields of the same names)."""
    b1: float = 0.9  # adamw, lamb
    b2: float = 0.999  # adamw, lamb
    eps: float = 1e-8  # adamw, lamb
    momentum: float = 0.9  # sgd, lars
    nesterov: bool = False  # sgd, lars
    trust_coefficient: float = 0.001  # lars


def _group_chain(group: Group, name: str, learning_rate, weight_decay, hp: Hyper) -> optax.GradientTransformation:
    if group.lr_mult is None:
        return optax.set_to_zero()
    decay = None
    if group.wd_mult:
        # factor 1 multiplies nothing, so the main group's decay is the schedule's value bit for bit
        decay = optax.add_decayed_weights(weight_decay if group.wd_mult == 1.0 else weight_decay * group.wd_mult)
    # optax.scale_by_trust_ratio(trust_coefficient=c) is c ||p|| / ||u|| per leaf, 1 where either norm is 0
    # (BYOL's LARS adaptation with eta = c). It is left out of no-decay groups, like the decay itself.
    if name == "adamw":
        parts = [optax.scale_by_adam(b1=hp.b1, b2=hp.b2, eps=hp.eps)] + ([decay] if decay is not None else [])
    elif name == "lamb":
        parts = [optax.scale_by_adam(b1=hp.b1, b2=hp.b2, eps=hp.eps)]
        if decay is not None:
            parts += [decay, optax.scale_by_trust_ratio()]
    elif name in ("sgd", "lars"):
        parts = []
        if decay is not None:
            parts.append(decay)
            if name == "lars":
                parts.append(optax.scale_by_trust_ratio(trust_coefficient=hp.trust_coefficient))
        if hp.momentum:
            # before the lr, as torch.optim.SGD and BYOL's LARS (optax.lars traces after the lr,
            # which differs once the lr changes)
            parts.append(optax.trace(decay=hp.momentum, nesterov=hp.nesterov))
    else:
        raise ValueError(f"optimizer name {name!r} is not one of {OPTIMIZERS}")
    if group.lr_mult != 1.0:
        parts.append(optax.scale(group.lr_mult))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    tx = optax.chain(*parts)
    if group.frozen_until:
        tx = optax.conditionally_mask(tx, lambda step, n=group.frozen_until: step >= n)
    return tx


def _build(params: Any, name: str, hp: Hyper, *, learning_rate: Schedule | float, weight_decay: Schedule | float,
           lr_mults: Mults, wd_mults: Mults, frozen_until: Sequence[tuple[str, int]],
           own: Mapping[str, tuple[str, optax.GradientTransformation]] | None,
           clip: optax.GradientTransformation | None, accum_steps: int) -> optax.GradientTransformation:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name {name!r} is not one of {OPTIMIZERS}")
    own = dict(own or {})
    labels, groups = param_groups(params, lr_mults=lr_mults, wd_mults=wd_mults, frozen_until=frozen_until,
                                  own={label: regex for label, (regex, _) in own.items()})
    structure = jax.tree.structure(params)

    def label_fn(tree):
        if jax.tree.structure(tree) != structure:
            raise ValueError(f"the optimizer was built for a params tree of structure {structure}; "
                             f"got {jax.tree.structure(tree)}")
        return labels

    def factory(learning_rate, weight_decay):
        transforms = {label: own[label][1] if group is None else
                      _group_chain(group, name, learning_rate, weight_decay, hp) for label, group in groups.items()}
        return optax.partition(transforms, label_fn)

    core = optax.inject_hyperparams(factory)(learning_rate=learning_rate, weight_decay=weight_decay)
    tx = optax.chain(clip, core) if clip is not None else core
    if accum_steps == 1:
        return tx
    return optax.MultiSteps(tx, every_k_schedule=accum_steps, use_grad_mean=True).gradient_transformation()


def make(params: Any, cfg: ml_collections.ConfigDict, *, learning_rate: Schedule | float,
         weight_decay: Schedule | float = 0.0, lr_mults: Mults = (), wd_mults: Mults = (),
         frozen_until: Sequence[tuple[str, int]] = (),
         own: Mapping[str, tuple[str, optax.GradientTransformation]] | None = None,
         clip: optax.GradientTransformation | None = None, accum_steps: int = 1) -> optax.GradientTransformation:
    """The optimizer `cfg.name` with per-parameter lr / weight-decay factors from path rules.

    cfg: a `config.optim` (validated here); the update rule and its static hyperparameters come from
      cfg.name, b1, b2, eps, momentum, nesterov, trust_coefficient. Schedules, rules, clip and
      accumulation are arguments (the recipes derive them from the other fields).
    params: the tree the optimizer will update (arrays or ShapeDtypeStructs); the labels are computed
      from it once, and `init` / `update` must get a tree of the same structure.
    learning_rate, weight_decay: schedules of the optimizer-update count (or constants); a tensor with
      factors (l, w) follows the group chain of the module docstring with f_l = l, f_w = w.
    lr_mults: (regex, factor | None); unmatched -> 1; None -> frozen (zero update, no state).
    wd_mults: (regex, factor >= 0); unmatched -> 0 (no decay, and no trust ratio under lars / lamb).
    frozen_until: (regex, N): the matched tensors get zero updates for the first N updates, with
      their optimizer state not advanced (optax.conditionally_mask).
    own: label -> (regex, transform) for subtrees with their own optimizer (e.g. Partial FC's class
      centres); it runs inside the same inject_hyperparams, after `clip`.
    clip: applied to the whole gradient tree first; accum_steps > 1 wraps everything in MultiSteps.
    The current lr / weight decay (and the own transforms' injected values) are readable with
    `current_hyperparams(opt_state)`.
    """
    validate_optim_config(cfg)
    hp = Hyper(b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps), momentum=float(cfg.momentum),
               nesterov=bool(cfg.nesterov), trust_coefficient=float(cfg.trust_coefficient))
    return _build(params, cfg.name, hp, learning_rate=learning_rate, weight_decay=weight_decay, lr_mults=lr_mults,
                  wd_mults=wd_mults, frozen_until=frozen_until, own=own, clip=clip, accum_steps=accum_steps)


def adamw(params: Any, *, learning_rate: Schedule | float, weight_decay: Schedule | float = 0.0,
          lr_mults: Mults = (), wd_mults: Mults = (), frozen_until: Sequence[tuple[str, int]] = (),
          own: Mapping[str, tuple[str, optax.GradientTransformation]] | None = None,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          clip: optax.GradientTransformation | None = None, accum_steps: int = 1) -> optax.GradientTransformation:
    """`make` with name 'adamw' and these Adam hyperparameters, without a config.

    A tensor with factors (l, w) is updated by  -lr(t) * l * (adam(g) + wd(t) * w * p)  (decoupled,
    as torch.optim.AdamW with that group's lr and weight_decay); frozen tensors keep no Adam state.
    """
    return _build(params, "adamw", Hyper(b1=b1, b2=b2, eps=eps), learning_rate=learning_rate,
                  weight_decay=weight_decay, lr_mults=lr_mults, wd_mults=wd_mults, frozen_until=frozen_until,
                  own=own, clip=clip, accum_steps=accum_steps)


# ----------------------------------------------------------------------------------------------
# Clipping
# ----------------------------------------------------------------------------------------------

def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """Each gradient tensor g scaled by max_norm / (||g||_2 + 1e-6) when that factor is below 1.

    The official pretraining's `utils.clip_gradients` (per parameter tensor, not the global norm).
    Hand-written because
    no optax 0.2.8 transform bounds each tensor's L2 norm: `clip` is element-wise,
    `clip_by_global_norm` uses one norm for the whole tree, `clip_by_block_rms` bounds each tensor's
    RMS = ||g|| / sqrt(size) with one threshold (a norm bound would need a threshold per tensor
    size), `adaptive_grad_clip` is unit-wise and relative to the parameter norm, `per_example_*`
    need a per-example batch axis. `optax.projections.projection_l2_ball` mapped over the leaves is
    the same clip without the official +1e-6: it differs by up to 3.4e-7 relative (a few fp32 ulps) on
    clipped tensors, so it would not reproduce the official numbers exactly.
    """

    def one(g):
        norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
        coef = max_norm / (norm + 1e-6)
        return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

    return optax.stateless(lambda updates, params: jax.tree.map(one, updates))


def _clip(cfg) -> optax.GradientTransformation | None:
    if cfg.clip_mode == "per_tensor":
        return clip_per_tensor(cfg.clip_norm)
    if cfg.clip_mode == "global_norm":
        return optax.clip_by_global_norm(cfg.clip_norm)
    return None


def _check_overrides(params: Any, cfg: ml_collections.ConfigDict) -> None:
    for key in ("lr_mults", "wd_mults"):
        missing = unmatched_rules(params, cfg[key])
        if missing:
            i = missing[0]
            raise ConfigError(f"config.optim.{key}[{i}]: {cfg[key][i][0]!r} matches no parameter path "
                              f"(paths look like {paths(params)[0]!r})")


# ----------------------------------------------------------------------------------------------
# The two recipes
# ----------------------------------------------------------------------------------------------

def finetune_mults(backbone: Any, cfg: ml_collections.ConfigDict, frozen_regex: str = "", *,
                   lr_rules: Mults = (), wd_rules: Mults = (),
                   layer0_regexes: Sequence[str] = ()) -> tuple[list[tuple[str, Any]], list[tuple[str, float]]]:
    """(lr_mults, wd_mults) of fine-tuning for the backbone tree (paths as `make` sees them).

    lr: cfg.lr_mults, then (frozen_regex, None), then `lr_rules`, then the layer-decay pairs (layer id 0
    for `layer0_regexes`). wd: cfg.wd_mults, then 0 for biases / ndim < 2, then `wd_rules`, then 1 for
    everything else. `lr_rules`, `wd_rules`, `layer0_regexes` are what a method adds for its own
    modules (lafs_jax.methods; e.g. another weight decay, as a factor of cfg.weight_decay).
    """
    lr_mults = [*cfg.lr_mults, *([(frozen_regex, None)] if frozen_regex else []), *lr_rules,
                *layer_decay_mults(backbone, cfg.layer_decay, block_regex=cfg.block_regex,
                                   embed_regex=cfg.embed_regex, layer0_regexes=layer0_regexes)]
    wd_mults = [*cfg.wd_mults, *no_decay_mults(backbone), *wd_rules, ("", 1.0)]
    return lr_mults, wd_mults


def finetune_optimizer(params: Any, cfg: ml_collections.ConfigDict, steps_per_epoch: int, *,
                       centers_tx: optax.GradientTransformation | None = None, total_steps: int | None = None,
                       global_batch_size: int | None = None, frozen_regex: str = "", lr_rules: Mults = (),
                       wd_rules: Mults = (), layer0_regexes: Sequence[str] = ()) -> optax.GradientTransformation:
    """The optimizer cfg.name (AdamW by default) with layer-wise lr decay, weight-decay groups and the
    cfg.schedule lr (warmup + cosine by default), for fine-tuning.

    params: the trainable tree (arrays or ShapeDtypeStructs), e.g. {'backbone': ..., 'centers': W}.
    The top-level 'centers' subtree is updated by `centers_tx` (required when present; e.g. the
    Partial FC helper's optimizer, built with `schedules(...)['learning_rate']` if it should follow
    the same lr). Everything else: `make(params, cfg, ...)` with the rules of `finetune_mults`:
      lr_mults = cfg.lr_mults, (frozen_regex, None), lr_rules, layer-decay pairs
                 layer_decay^(depth + 1 - layer_id) (layer id 0 for layer0_regexes);
      wd_mults = cfg.wd_mults, biases / ndim < 2 -> 0, wd_rules, everything else -> 1 (x the
                 weight-decay schedule, so a wd rule's factor is a ratio to cfg.weight_decay).
    Clipping (cfg.clip_mode) acts on the whole gradient tree first; `accum_steps > 1` wraps all of it
    in optax.MultiSteps. Backbone params matching `frozen_regex` or an lr rule with factor None are
    never changed: no step, no decay, no optimizer state (such a rule matching nothing is a ValueError).
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
    frozen = [(frozen_regex, None)] if frozen_regex else []
    for regex, _ in [*frozen, *((r, f) for r, f in lr_rules if f is None)]:
        if unmatched_rules(backbone, [(regex, None)]):
            raise ValueError(f"finetune_optimizer: the frozen_regex {regex!r} matches no backbone parameter")
    _check_overrides(backbone, cfg)
    lr_mults, wd_mults = finetune_mults(backbone, cfg, frozen_regex, lr_rules=lr_rules, wd_rules=wd_rules,
                                        layer0_regexes=layer0_regexes)
    return make(params, cfg, learning_rate=scheds["learning_rate"], weight_decay=scheds["weight_decay"],
                lr_mults=lr_mults, wd_mults=wd_mults,
                own={CENTERS_KEY: (f"^{CENTERS_KEY}(?:/|$)", centers_tx)} if has_centers else None,
                clip=_clip(cfg), accum_steps=cfg.accum_steps)


def pretrain_optimizer(params: Any, cfg: ml_collections.ConfigDict, steps_per_epoch: int, *,
                       total_steps: int | None = None, global_batch_size: int | None = None
                       ) -> optax.GradientTransformation:
    """The optimizer cfg.name for pretraining: AdamW by default, as the official self-distillation
    pretraining.

    `make(params, cfg, ...)` with clip (per-tensor 3.0 officially), weight decay wd(step) (cosine
    weight_decay -> weight_decay_end) on ndim >= 2 non-bias tensors (the others also get no trust
    ratio under lars / lamb), the cfg.schedule lr (linear warmup then cosine to min_lr by default),
    and the params matching cfg.last_layer_regex frozen for the first freeze_last_layer_epochs epochs
    (no update, no decay, optimizer state not advanced). cfg.lr_mults / wd_mults rules come first. No
    layer-wise decay (cfg.layer_decay must be 1.0 here).
    """
    validate_optim_config(cfg)
    if cfg.layer_decay != 1.0:
        raise ConfigError(f"config.optim.layer_decay={cfg.layer_decay!r}: pretraining applies no layer-wise "
                          f"decay; set it to 1.0")
    scheds = schedules(cfg, steps_per_epoch, total_steps=total_steps, global_batch_size=global_batch_size)
    freeze_steps = schedules_lib.epoch_steps(cfg.freeze_last_layer_epochs, steps_per_epoch, cfg.accum_steps)
    if freeze_steps > 0 and unmatched_rules(params, [(cfg.last_layer_regex, None)]):
        raise ConfigError(f"config.optim.last_layer_regex={cfg.last_layer_regex!r} matches no parameter, so "
                          f"freeze_last_layer_epochs={cfg.freeze_last_layer_epochs} would freeze nothing")
    _check_overrides(params, cfg)
    return make(params, cfg, learning_rate=scheds["learning_rate"], weight_decay=scheds["weight_decay"],
                lr_mults=list(cfg.lr_mults), wd_mults=[*cfg.wd_mults, *no_decay_mults(params), ("", 1.0)],
                frozen_until=[(cfg.last_layer_regex, freeze_steps)] if freeze_steps > 0 else [],
                clip=_clip(cfg), accum_steps=cfg.accum_steps)


def current_hyperparams(opt_state: Any) -> dict[str, jax.Array]:
    """The injected hyperparameters of an optimizer state, e.g. {'learning_rate', 'weight_decay'}.

    These are the values used by the *last* update (optax.inject_hyperparams semantics). The
    learning rate is the one of lr factor 1 (e.g. the head); a group with factor l trains at lr x l.
    A name held by several injectors (e.g. a centres optimizer built with inject_hyperparams too)
    is prefixed with the nearest dict key above it: 'centers/learning_rate'.
    """
    found = []
    for kp, hp in optax.tree_utils.tree_get_all_with_path(opt_state, "hyperparams"):
        label = next((str(k.key) for k in reversed(kp) if isinstance(k, jax.tree_util.DictKey)), "")
        found.append((label, hp))
    counts: dict[str, int] = {}
    for _, hp in found:
        for name in hp:
            counts[name] = counts.get(name, 0) + 1
    out = {}
    for label, hp in found:
        for name, value in hp.items():
            out[name if counts[name] == 1 or not label else f"{label}/{name}"] = value
    return out
