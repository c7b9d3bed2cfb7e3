"""task 'finetune': supervised fine-tuning for face recognition with a sharded margin-softmax head.

`run(config, workdir)`, in big_vision's style (the official `train_largescale.py`):

  data        Grain fine-tuning batches (flip, crop, RandAugment, jitter, erasing, batch mixup ->
              `label`, `label2`, `lam`), sharded by process, resumable, copied to the devices ahead
              of the step (`prefetch.device_prefetch`); with `config.data.augment_on = 'device'` the
              host only decodes, flips and runs RandAugment, and the step crops, jitters, erases and
              mixes (lafs_jax.input.device_augment.finetune_images; mixup over the global batch).
  model       the backbone of `config.model` from scratch, from a pretraining teacher or a whole
              backbone variables directory (`config.init`, lafs_jax.train.initialize). Compute dtype
              by `config.precision` ('auto': bf16 on GPU/TPU, fp32 on CPU), parameters fp32.
  step        lafs_jax.train.recognition: Partial FC's margin softmax over W[C_pad, D] sharded by rows
              over every device (CosFace s=64, m=0.4 by default, soft mixup targets, W's own optimizer),
              the optimizer of lafs_jax.train.optim.finetune_optimizer (AdamW, layer-wise lr decay,
              warmup + cosine, gradient accumulation), an optional moving average of the backbone
              (`ema_decay`; evaluation and the output use it).
  methods     the hooks `lafs_jax.methods.finetune_hooks(config)` turns on (their loading, loss terms,
              optimizer rules, extra state, phases: each phase its own jitted step, compiled when it
              first runs; a phase change keeps W, every optimizer state and the extra state).
  loop        lafs_jax.train.loop: resume, checkpoints (state + Grain iterator), confirmation, SIGTERM,
              10-fold verification on the `.bin` sets of `config.eval` every `eval.every_steps`, metrics.
  output      `workdir/backbone`: the backbone's variables with metadata (model config,
              normalisation, colour order, image size), what evaluation and export read; with
              verification sets also `workdir/backbone_best`, the evaluated step with the best mean
              accuracy (its checkpoint is kept beside the latest ones).

Randomness: every step's dropout and sampling keys are `fold_in(key(seed + 1), step)`, so a resumed run
draws the same numbers as an uninterrupted one. `build_train_step` gives the step `run` trains (the
same `recognition.Program`) with abstract arguments, for benchmarks and ahead-of-time compilation.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from lafs_jax import config as config_lib
from lafs_jax import methods
from lafs_jax import sharding as mesh_lib
from lafs_jax import variables as variables_lib
from lafs_jax.config import check, check_choice
from lafs_jax.eval import embed as embed_lib
from lafs_jax.eval import evaluators as evaluators_lib
from lafs_jax.input import pipelines
from lafs_jax.input.images import COLOR_ORDERS
from lafs_jax.input.transforms import NORMALIZATIONS
from lafs_jax.losses import margin, partial_fc
from lafs_jax.models import presets
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import initialize, loop, loop_utils, optim, recognition
from lafs_jax.train import prefetch as prefetch_lib
# the task's callers (the demo, tests, benchmarks) reach these through this module
from lafs_jax.train.initialize import initial_variables  # noqa: F401
from lafs_jax.train.recognition import make_loss_fn, make_optimizer, make_train_step, state_shardings  # noqa: F401

BEST_BACKBONE_DIR = "backbone_best"  # the checkpoint with the best mean verification accuracy
EvaluationError = evaluators_lib.EvaluationError


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the key for every bad or inconsistent fine-tuning field (the methods' own
    fields by their validators, lafs_jax.methods.validate_finetune)."""
    config_lib.validate_common(config)
    presets.validate_model_config(config.model)
    check_choice(config, "precision", presets.PRECISIONS)
    check(isinstance(config.checkpoint.async_save, bool), "checkpoint.async_save", config.checkpoint.async_save,
          "True or False")
    optim.validate_optim_config(config.optim)
    loop_utils.validate_divergence_config(config.divergence)
    check(isinstance(config.eval.at_start, bool), "eval.at_start", config.eval.at_start, "True or False")
    evaluators_lib.validate_evals(config.evals)
    check(not (config.eval.bins and "val" in config.evals), "evals.val", "an evaluator",
          "another name: 'val' is the verification of config.eval.bins")
    check(isinstance(config.eval.flip, bool), "eval.flip", config.eval.flip, "True or False")
    for key in ("batch_size", "log_every_steps", "checkpoint.every_steps", "checkpoint.keep", "eval.batch_size",
                "eval.every_steps"):
        v = config_lib.get_path(config, key)
        check(isinstance(v, int) and v >= 1, key, v, "an int >= 1")
    check(isinstance(config.eval.nfolds, int) and config.eval.nfolds >= 2, "eval.nfolds", config.eval.nfolds,
          "an int >= 2 (folds of the verification protocol)")
    check(isinstance(config.ema_decay, float) and 0.0 <= config.ema_decay < 1.0, "ema_decay", config.ema_decay,
          "a float in [0, 1) (0 = no parameter average)")
    check(isinstance(config.total_steps, int) and (config.total_steps == -1 or config.total_steps >= 1),
          "total_steps", config.total_steps, "-1 (optim.epochs x steps per epoch) or an int >= 1")
    check_choice(config, "init.kind", initialize.INIT_KINDS)
    check(bool(config.init.backbone) or config.optim.layer_decay == 1.0 or config.optim.allow_layer_decay_from_scratch,
          "optim.layer_decay", config.optim.layer_decay,
          "1.0 when training from scratch (init.backbone=''): layer-wise lr decay is for a pretrained backbone "
          f"(at depth {config.model.depth} the first layers would train at "
          f"{config.optim.layer_decay ** (config.model.depth + 1):.2g} x the lr). Set init.backbone, or "
          "optim.layer_decay=1.0, or optim.allow_layer_decay_from_scratch=True")
    check(config.init.backbone == "" or os.path.isdir(config.init.backbone), "init.backbone", config.init.backbone,
          "'' or an existing variables directory")
    for key in ("loss.m1", "loss.s"):
        check(config_lib.get_path(config, key) > 0, key, config_lib.get_path(config, key), "> 0")
    check(0.0 < config.loss.sample_rate <= 1.0, "loss.sample_rate", config.loss.sample_rate, "in (0, 1]")
    check_choice(config, "loss.centers_optimizer", recognition.CENTERS_OPTIMIZERS)
    check_choice(config, "loss.centers_init", tuple(recognition.CENTERS_INITS))
    check_choice(config, "loss.arcface_fallback", margin.FALLBACKS)
    check(config.loss.arcface_fallback != "th_mm" or config.loss.m1 == 1.0, "loss.arcface_fallback", "th_mm",
          f"'th_mm' is ArcFace's fallback and needs loss.m1 = 1 (got {config.loss.m1}); use 'none' or 'easy'")
    check(config.loss.centers_lr >= 0, "loss.centers_lr", config.loss.centers_lr, ">= 0 (0 = the backbone's schedule)")
    check(config.loss.centers_weight_decay >= 0, "loss.centers_weight_decay", config.loss.centers_weight_decay, ">= 0")
    for i, path in enumerate(config.eval.bins):
        check(os.path.isfile(path), f"eval.bins[{i}]", path,
              f"an existing .bin file ({pipelines.missing_data_hint(config.data)})")
    for key, choices in (("eval.normalization", ("",) + NORMALIZATIONS), ("eval.color_order", COLOR_ORDERS)):
        check_choice(config, key, choices)
    methods.validate_finetune(config)
    methods.finetune_hooks(config)  # the active methods combine (at most one with phases)


def build_train_step(config: ml_collections.ConfigDict, mesh: Any, num_classes: int, *, steps_per_epoch: int,
                     total_steps: int, phase: int = 0) -> tuple[Any, tuple, dict, Any]:
    """(step, args, shardings, init): the jitted step `run` trains (the same `recognition.Program`:
    loss, optimizer, shardings, donation) with abstract arguments for `step.lower(*args)`, built without
    data and without materialising anything; `init(key)` (jitted) makes a fresh state from scratch as
    `run` does without init directories (key = jax.random.key(config.seed) gives run's).

    args = (state, constants, batch, inputs) as ShapeDtypeStructs carrying their NamedShardings: the
    state (W[C_pad, D] by rows, backbone by config.sharding_rules, optimizer state like its params, the
    methods' entries), the methods' constants and per-step inputs ({method name: tree}), the batch
    {'image' f32 [B, H, W, C], 'label', 'label2' i32 [B], 'lam' f32 [B]} with B = config.batch_size
    split over every device (the decoded batch with augment_on='device'). With a method that has
    phases: the step of phase `phase`.
    """
    program = recognition.Program(config, mesh, num_classes, steps_per_epoch=steps_per_epoch,
                                  total_steps=total_steps)
    step = program.step(phase if program.phaser is not None else None)
    return (step, program.abstract_args(steps_per_epoch), program.shardings,
            jax.jit(program.fresh_state, out_shardings=program.shardings))


def backbone_metadata(config: ml_collections.ConfigDict, **extra) -> dict:
    """What evaluation needs to rebuild and feed the backbone (see lafs_jax.eval.embed.load_backbone)."""
    return {
        "kind": "backbone",
        "model": variables_lib.to_json_dict(config.model),
        "normalization": config.eval.normalization or config.data.normalization,
        "color_order": config.eval.color_order,
        "image_size": int(config.model.image_size),
        "method": "supervised",
        "patch_order": presets.patch_order(config.model),
        "source": "lafs_jax.train.finetune",
        **extra,
    }


def verification_evaluator(config: ml_collections.ConfigDict, embedder_factory) -> list:
    """The evaluator of `config.eval` (`.bin` verification named 'val', its errors naming config.eval.*),
    built and checked at start-up; [] without sets."""
    if not config.eval.bins:
        return []
    fields = {k: config.eval[k] for k in ("bins", "every_steps", "at_start", "batch_size", "flip", "nfolds")}
    cfg = evaluators_lib.evaluator_config("verification", **fields)
    return [evaluators_lib.VerificationEvaluator("val", cfg, embedder_factory=embedder_factory,
                                                 image_size=config.model.image_size, key="eval")]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tune; returns {'step', 'preempted', 'final_metrics', 'verification': {set: accuracy},
    'initial_verification'}. Resume, checkpoints, confirmation, SIGTERM, evaluation and the outputs
    (WORKDIR/backbone, WORKDIR/backbone_best) are the loop's (lafs_jax.train.loop)."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(config.mesh)
    global_bs = config.batch_size
    local_bs = mesh_lib.local_batch_size(global_bs, mesh, "config.batch_size")
    # Topology errors before any work: the rules against the backbone's shapes (nothing computed).
    mesh_lib.param_shardings(presets.abstract_variables(config.model)["params"], config.sharding_rules, mesh)
    model_cfg = presets.with_precision(config.model, config.precision)  # compute dtype; parameters stay fp32
    model = presets.build_model(model_cfg)
    embedder_factory = lambda batch_size: embed_lib.Embedder(  # noqa: E731
        model, None, image_size=config.model.image_size,
        normalization=config.eval.normalization or config.data.normalization,
        color_order=config.eval.color_order, mesh=mesh, batch_size=batch_size)
    # every evaluation input is read and checked before anything is built: a bad .bin fails at start-up
    evaluators = verification_evaluator(config, embedder_factory) + evaluators_lib.build_evaluators(
        config.evals, embedder_factory=embedder_factory, image_size=config.model.image_size)

    # ------------------------------------------------------------------ data
    source = pipelines.make_source(config.data)
    num_classes = int(source.num_classes)
    steps_per_epoch = len(source) // global_bs
    check(steps_per_epoch >= 1, "batch_size", global_bs, f"at most the {len(source)} training images of {config.data.path}")
    total_steps = config.total_steps if config.total_steps > 0 else int(round(config.optim.epochs * steps_per_epoch))
    # global batches on the mesh, the next ones copied while a step runs; checkpointed with the state
    train_iter = prefetch_lib.device_prefetch(
        pipelines.finetune_batches(source, config.data, batch_size=local_bs, seed=config.seed), mesh,
        config.data.prefetch)
    logging.info("fine-tuning: %d images, %d classes, %d steps/epoch, %d steps, global batch %d",
                 len(source), num_classes, steps_per_epoch, total_steps, global_bs)

    # ------------------------------------------------------------------ model, head, methods, optimizer
    program = recognition.Program(config, mesh, num_classes, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    for hook in program.hooks:
        if hook.describe(steps_per_epoch):
            logging.info("%s", hook.describe(steps_per_epoch))
    init_key, centers_key = jax.random.split(jax.random.key(config.seed))
    init_fn = presets.compiled_init(model_cfg, mesh_lib.replicated(mesh))  # shared by runs of one architecture
    variables, origin = initialize.initial_variables(config, init_fn(init_key), program.hooks)
    logging.info("backbone initialised from %s", origin)
    constants = jax.device_put(program.constants(variables), mesh_lib.replicated(mesh))
    use_ema, has_stats = program.use_ema, bool(variables.get("batch_stats"))
    state = program.initial_state(variables, centers_key)
    phases_seen: set = set()

    def train_step(state, batch, step: int):
        _check_batch_labels(batch, num_classes)  # this process's rows, before the step
        phase = program.phase_at(step, steps_per_epoch)
        if phase is not None and phase not in phases_seen:
            phases_seen.add(phase)
            logging.info("phase %d from step %d (%s)", phase, step, program.phaser.describe_phase(phase))
        return program.step(phase)(state, constants, batch, program.step_inputs(step, steps_per_epoch))

    # ------------------------------------------------------------------ checkpoint / resume
    # with verification sets, every evaluated step is checkpointed with its accuracy, and the best one
    # is kept beside the latest `checkpoint.keep` (WORKDIR/backbone_best at the end)
    ckpt = ckpt_lib.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                      save_every=config.checkpoint.every_steps,
                                      async_save=config.checkpoint.async_save,
                                      metadata={"config": config, **backbone_metadata(config)},
                                      best_fn=loop.best_score if evaluators else None)
    abstract_state = ckpt_lib.abstract_like(state, program.shardings)  # restore targets (the live state gets donated)
    rows = program.padded_rows  # any mesh: W, its optimizer moments and the methods' row arrays are re-padded
    resumed, restored = loop.resume(ckpt, abstract_state, train_iter, padded_rows=rows)
    start = 0
    if resumed is not None:
        state, start = restored, int(restored["step"])

    def backbone_variables(state) -> dict:
        """What evaluation and the output use: the parameter average when it is on, else the params."""
        variables = {"params": state["ema"] if use_ema else state["params"]["backbone"]}
        if has_stats:
            variables["batch_stats"] = state["batch_stats"]
        return variables

    def export(variables, step: int, kind: str) -> None:
        name = BEST_BACKBONE_DIR if kind == "best" else "backbone"
        extra = {"verification": ckpt.metrics(step)} if kind == "best" else {}
        variables_lib.save_variables(os.path.join(workdir, name), variables,
                                     backbone_metadata(config, step=step, init=origin, num_classes=num_classes,
                                                       ema_decay=float(config.ema_decay), **extra))
        logging.info("saved the %s backbone (step %d) to %s", kind, step, os.path.join(workdir, name))

    settings = loop.LoopSettings(name="finetune", total_steps=total_steps, stop_step=total_steps,
                                 log_every_steps=config.log_every_steps, batch_size=global_bs,
                                 divergence=config.divergence)
    out = loop.train(state, train_step, settings, ckpt=ckpt, batches=train_iter, start=start, workdir=workdir,
                     evaluators=evaluators, eval_variables=backbone_variables, export_variables=backbone_variables,
                     export=export, abstract_state=abstract_state, padded_rows=rows)
    val, initial = out.evaluations.get("val", {}), out.initial_evaluations.get("val", {})
    return {"step": out.step, "preempted": out.preempted, "final_metrics": out.final_metrics,
            "verification": {n: r["accuracy"] for n, r in val.items()},
            "initial_verification": {n: r["accuracy"] for n, r in initial.items()}}


def verification_metrics(results: dict) -> dict:
    """Checkpoint metrics of one evaluation: {'accuracy': mean over the sets, '<set>/accuracy': ...}."""
    accuracies = {f"{name}/accuracy": float(r["accuracy"]) for name, r in results.items()}
    return {"accuracy": float(np.mean(list(accuracies.values()))), **accuracies}


def verification_score(metrics: dict) -> float:
    """What picks the best checkpoint: the mean 10-fold accuracy over the verification sets."""
    return metrics["accuracy"]


def _local_rows(array) -> np.ndarray:
    """This process's rows of a batch array (a global jax.Array split over the batch, or numpy)."""
    if not isinstance(array, jax.Array):
        return np.asarray(array)
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data) for shard in shards])


def _check_batch_labels(batch: dict, num_classes: int) -> None:
    """`partial_fc.check_labels` on this process's rows of the (global) batch; a decoded batch of
    augment_on='device' has only 'label' (mixup happens on device)."""
    label = _local_rows(batch["label"])
    if "lam" in batch:
        labels = {"label": label, "label2": _local_rows(batch["label2"]), "lam": _local_rows(batch["lam"])}
    else:
        labels = {"label": label, "label2": label, "lam": np.ones(len(label), np.float32)}
    partial_fc.check_labels(labels, num_classes)
