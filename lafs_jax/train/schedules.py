"""Schedules of optimizer updates on optax: warmup + cosine, warmup + steps, and a plain cosine.

Each returns a function of the update count `s` (a Python int or a traced jnp array). `from_config`
builds the lr and weight-decay schedules of a validated `config.optim` (`lafs_jax.train.optim.schedules`
validates first and is what the recipes call); `peak_lr` scales `cfg.lr` by the global batch.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import optax

Schedule = Callable[[Any], jax.Array]


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int, floor: float) -> Schedule:
    """Linear 0 -> peak over warmup_steps, then cosine peak -> floor until total_steps, then floor.

    value(s) = peak * s / warmup_steps                                    for s < warmup_steps
             = floor + (peak - floor) * (1 + cos(pi * (s - w) / (T - w))) / 2   for w <= s <= T
    This is the official fine-tuning's GradualWarmupScheduler + CosineAnnealingLR. The official
    pretraining's numpy table (`utils.cosine_scheduler`) has the same cosine part; its warmup is
    linspace(0, peak, w), which reaches the peak one step earlier (peak * s / (w - 1)).
    """
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(f"warmup_cosine: need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
                                              decay_steps=total_steps, end_value=floor)


def warmup_step(peak: float, warmup_steps: int, boundaries: Sequence[int], factor: float) -> Schedule:
    """Linear 0 -> peak over warmup_steps, then peak x factor^(number of boundaries b with s >= b).

    value(s) = peak * s / warmup_steps                          for s < warmup_steps
             = peak * factor^#{b in boundaries: b <= s}         for s >= warmup_steps
    Boundaries are optimizer updates, non-decreasing and >= warmup_steps (a repeated boundary counts
    twice). After warmup this is torch's MultiStepLR(milestones=boundaries, gamma=factor).
    """
    warmup_steps, boundaries = int(warmup_steps), [int(b) for b in boundaries]
    if warmup_steps < 0 or boundaries != sorted(boundaries) or any(b < warmup_steps for b in boundaries):
        raise ValueError(f"warmup_step: need 0 <= warmup_steps ({warmup_steps}) <= boundaries ({boundaries}), "
                         f"non-decreasing")
    scales: dict[int, float] = {}  # relative to the end of warmup, as join_schedules counts
    for b in boundaries:
        scales[b - warmup_steps] = scales.get(b - warmup_steps, 1.0) * factor
    warm = (optax.linear_schedule(0.0, peak, warmup_steps) if warmup_steps > 0 else optax.constant_schedule(0.0))
    return optax.join_schedules([warm, optax.piecewise_constant_schedule(peak, scales)], [warmup_steps])


def cosine_schedule(start: float, end: float, total_steps: int) -> Schedule:
    """The official pretraining's `utils.cosine_scheduler` without warmup: end + (start - end) *
    (1 + cos(pi * s / T)) / 2.

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


def peak_lr(cfg: Any, global_batch_size: int | None = None) -> float:
    """cfg.lr scaled by the global batch (per optimizer update, so micro-batch x accum_steps)."""
    if cfg.lr_scaling == "none":
        return float(cfg.lr)
    if not global_batch_size:
        raise ValueError(f"config.optim.lr_scaling={cfg.lr_scaling!r} needs the global batch size; pass "
                         f"global_batch_size= to the optimizer builder")
    ratio = global_batch_size / cfg.lr_base_batch_size
    return float(cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio)))


def epoch_steps(epochs: float, steps_per_epoch: int, accum_steps: int) -> int:
    """Optimizer updates in `epochs` epochs of `steps_per_epoch` loop steps."""
    return int(round(epochs * steps_per_epoch)) // accum_steps


def from_config(cfg: Any, steps_per_epoch: int, *, total_steps: int | None = None,
                global_batch_size: int | None = None) -> dict[str, Schedule]:
    """{'learning_rate', 'weight_decay'} schedules in optimizer updates of a validated `config.optim`.

    learning_rate: cfg.schedule, 'warmup_cosine' (`warmup_cosine` to cfg.min_lr) or 'warmup_step'
    (`warmup_step` with cfg.step_boundaries converted from epochs to optimizer updates like the warmup).
    total_steps (loop steps, i.e. tx.update calls) overrides cfg.epochs x steps_per_epoch.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    k = cfg.accum_steps
    total = (int(total_steps) // k) if total_steps is not None else epoch_steps(cfg.epochs, steps_per_epoch, k)
    warmup = epoch_steps(cfg.warmup_epochs, steps_per_epoch, k)
    if total <= warmup:
        raise ValueError(f"the schedule has {total} optimizer updates, not more than the {warmup} warmup updates "
                         f"(config.optim.warmup_epochs={cfg.warmup_epochs}, steps_per_epoch={steps_per_epoch}, "
                         f"accum_steps={k})")
    if cfg.schedule == "warmup_step":
        lr = warmup_step(peak_lr(cfg, global_batch_size), warmup,
                         [epoch_steps(b, steps_per_epoch, k) for b in cfg.step_boundaries], cfg.step_factor)
    else:
        lr = warmup_cosine(peak_lr(cfg, global_batch_size), total, warmup, cfg.min_lr)
    if cfg.weight_decay_schedule == "cosine":
        wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total)
    else:
        wd = optax.constant_schedule(cfg.weight_decay)
    return {"learning_rate": lr, "weight_decay": wd}
