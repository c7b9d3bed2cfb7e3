"""task 'finetune': supervised fine-tuning of Part fViT / fViT with a sharded margin-softmax head.

One linear function, `run(config, workdir)`, in big_vision's style (the official `train_largescale.py`):

  data        Grain fine-tuning batches (flip, crop, RandAugment, jitter, erasing, batch mixup ->
              `label`, `label2`, `lam`), sharded by process, resumable, copied to the devices ahead
              of the step (`prefetch.device_prefetch`); with `config.data.augment_on = 'device'` the
              host only decodes, flips and runs RandAugment, and the step crops, jitters, erases and
              mixes (lafs_jax.input.device_augment.finetune_images; mixup over the global batch).
  model       the backbone of `config.model` initialised from scratch, from a LAFS / DINO pretraining
              teacher (a TokenViT variables directory, loaded into params['vit']), or from a full
              backbone variables directory (lafs_jax.convert's output of an official checkpoint, or
              an earlier fine-tuning); optionally the landmark CNN alone from another directory (the
              official code takes it from the stage-1 supervised Part fViT). Compute dtype by
              `config.precision` ('auto': bf16 on GPU/TPU, fp32 on CPU), parameters fp32.
  head        Partial FC: W[C_pad, D] sharded by rows over every device, margin softmax (CosFace
              s=64, m=0.4 by default) with soft mixup targets, its own optimizer.
  curriculum  optional (LVFace, `config.curriculum`, lafs_jax.losses.curriculum): a list of phases by
              epoch, each with its own sample rate, margin and use of EPL class prototypes E[C_pad, D]
              (a buffer in the train state, sharded by rows like W and updated inside the step's
              shard_map). A phase change keeps W, every optimizer state and E; each phase has its own
              jitted step (the sample rate changes shapes), compiled when the phase first runs.
  regulariser (Part fViT) w · mean((landmarks − landmarks*)² / (H−1)²), landmarks* from a frozen copy
              of the initial landmark CNN in eval mode (running BN statistics, no dropout, no
              noise); w from the official epoch schedule (1000, 100, 1, 0.11, 0 after epochs 7, 13,
              20, 27) or a constant β.
  optimizer   lafs_jax.train.optim.finetune_optimizer: AdamW, layer-wise lr decay, warmup + cosine,
              gradient accumulation.
  loop        one jitted step with explicit shardings (batch over all devices, backbone by
              config.sharding_rules, W by rows); 10-fold verification on the configured `.bin`
              sets every `eval.every_steps`; TensorBoard + metrics.jsonl; progress with ETA; NaN
              guard; SIGTERM saves and exits; checkpoints (state + Grain iterator) resume exactly.
  average     optional exponential moving average of the backbone's parameters (`ema_decay`), kept
              in the train state; verification and the output use it when it is on.
  output      `workdir/backbone`: the backbone's variables with metadata (model config,
              normalisation, colour order, image size), what evaluation and export read; with
              verification sets also `workdir/backbone_best`, the evaluated step with the best mean
              accuracy (its checkpoint is kept beside the latest ones).

Randomness: every step's dropout and sampling keys are `fold_in(key(seed), step)`, so a resumed run
draws the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from lafs_jax import config as config_lib
from lafs_jax import sharding as mesh_lib
from lafs_jax import variables as variables_lib
from lafs_jax.config import ConfigError, check, check_choice
from lafs_jax.eval import embed as embed_lib
from lafs_jax.eval import evaluators as evaluators_lib
from lafs_jax.input import device_augment
from lafs_jax.input import pipelines
from lafs_jax.input.images import COLOR_ORDERS
from lafs_jax.input.transforms import NORMALIZATIONS
from lafs_jax.input import transforms
from lafs_jax.losses import curriculum as curriculum_lib
from lafs_jax.losses import margin, partial_fc
from lafs_jax.methods.lafs import landmark_cnn as landmark_cnn_lib
from lafs_jax.models import presets
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import loop, loop_utils
from lafs_jax.train import optim
from lafs_jax.train import prefetch as prefetch_lib

INIT_KINDS = ("auto", "backbone", "token_vit")
REG_MODES = ("none", "schedule", "constant")
CENTERS_OPTIMIZERS = ("adamw", "sgd")
BEST_BACKBONE_DIR = "backbone_best"  # the checkpoint with the best mean verification accuracy
# config.loss.centers_init -> partial_fc.init_centers arguments
CENTERS_INITS = {"xavier_uniform": {"init": "xavier_uniform"}, "normal_0.01": {"init": "normal", "std": 0.01}}


# ----------------------------------------------------------------------------------------------------
# Config checks


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the key for every bad or inconsistent fine-tuning field."""
    config_lib.validate_common(config)
    presets.validate_model_config(config.model)
    check_choice(config, "precision", presets.PRECISIONS)
    check(isinstance(config.checkpoint.async_save, bool), "checkpoint.async_save", config.checkpoint.async_save,
          "True or False")
    optim.validate_optim_config(config.optim)
    loop_utils.validate_divergence_config(config.divergence)
    check(isinstance(config.eval.at_start, bool), "eval.at_start", config.eval.at_start, "True or False")
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
    check(isinstance(config.freeze_landmark_cnn, bool), "freeze_landmark_cnn", config.freeze_landmark_cnn,
          "True or False")
    if config.freeze_landmark_cnn:
        check(config.model.kind == "part_fvit", "freeze_landmark_cnn", True,
              f"a landmark CNN to freeze: model.kind='part_fvit' (got {config.model.kind!r})")
        check(config.landmark_reg.mode == "none", "landmark_reg.mode", config.landmark_reg.mode,
              "'none' when freeze_landmark_cnn is on (frozen landmarks need no regulariser)")
    check_choice(config, "init.kind", INIT_KINDS)
    check(bool(config.init.backbone) or config.optim.layer_decay == 1.0 or config.optim.allow_layer_decay_from_scratch,
          "optim.layer_decay", config.optim.layer_decay,
          "1.0 when training from scratch (init.backbone=''): layer-wise lr decay is for a pretrained backbone "
          f"(at depth {config.model.depth} the landmark CNN and patch embedding would train at "
          f"{config.optim.layer_decay ** (config.model.depth + 1):.2g} x the lr). Set init.backbone, or "
          "optim.layer_decay=1.0, or optim.allow_layer_decay_from_scratch=True")
    for key in ("init.backbone", "init.landmark_cnn", "landmark_reg.teacher"):
        path = config_lib.get_path(config, key)
        check(path == "" or os.path.isdir(path), key, path, "'' or an existing variables directory")
    for key in ("loss.m1", "loss.s"):
        check(config_lib.get_path(config, key) > 0, key, config_lib.get_path(config, key), "> 0")
    check(0.0 < config.loss.sample_rate <= 1.0, "loss.sample_rate", config.loss.sample_rate, "in (0, 1]")
    check_choice(config, "loss.centers_optimizer", CENTERS_OPTIMIZERS)
    check_choice(config, "loss.centers_init", tuple(CENTERS_INITS))
    check_choice(config, "loss.arcface_fallback", margin.FALLBACKS)
    check(config.loss.arcface_fallback != "th_mm" or config.loss.m1 == 1.0, "loss.arcface_fallback", "th_mm",
          f"'th_mm' is ArcFace's fallback and needs loss.m1 = 1 (got {config.loss.m1}); use 'none' or 'easy'")
    check(config.loss.centers_lr >= 0, "loss.centers_lr", config.loss.centers_lr, ">= 0 (0 = the backbone's schedule)")
    check(config.loss.centers_weight_decay >= 0, "loss.centers_weight_decay", config.loss.centers_weight_decay, ">= 0")
    reg = config.landmark_reg
    check_choice(config, "landmark_reg.mode", REG_MODES)
    if reg.mode != "none":
        check(config.model.kind == "part_fvit", "landmark_reg.mode", reg.mode,
              f"the landmark regulariser needs model.kind='part_fvit' (got {config.model.kind!r})")
    check(reg.beta >= 0, "landmark_reg.beta", reg.beta, ">= 0")
    bounds, weights = tuple(reg.boundaries), tuple(reg.weights)
    check(len(weights) == len(bounds) + 1, "landmark_reg.weights", weights,
          f"one value per interval: len(boundaries) + 1 = {len(bounds) + 1}")
    check(all(b2 > b1 for b1, b2 in zip(bounds, bounds[1:])), "landmark_reg.boundaries", bounds, "strictly increasing")
    check(all(w >= 0 for w in weights), "landmark_reg.weights", weights, "all >= 0")
    for i, path in enumerate(config.eval.bins):
        check(os.path.isfile(path), f"eval.bins[{i}]", path,
              f"an existing .bin file ({pipelines.missing_data_hint(config.data)})")
    for key, choices in (("eval.normalization", ("",) + NORMALIZATIONS), ("eval.color_order", COLOR_ORDERS)):
        check_choice(config, key, choices)
    if config.curriculum:
        curriculum_lib.validate_phases(config.curriculum, key="curriculum")
        epochs = sum(p["epochs"] for p in config.curriculum)
        check(config.optim.epochs == epochs, "optim.epochs", config.optim.epochs,
              f"the curriculum's length: its phases last {epochs} epochs (the lr schedule spans them)")


def phase_at(config: ml_collections.ConfigDict, step: int, steps_per_epoch: int) -> int | None:
    """Index of the curriculum phase that 1-based `step` trains in (its epoch is (step - 1) //
    steps_per_epoch; past the last phase, the last), or None without a curriculum."""
    if not config.curriculum:
        return None
    return curriculum_lib.phase_for_epoch(config.curriculum, (step - 1) // steps_per_epoch)[0]


def padded_rows(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, int]:
    """`TrainCheckpointer.restore(padded_rows=)` of the fine-tuning state: W and its optimizer moments,
    and the curriculum's prototype buffer, re-padded to this device count (real rows identical)."""
    rule = partial_fc.padded_rows_rule(num_classes)
    if config.curriculum:
        rule[r"(^|/)prototypes$"] = int(num_classes)
    return rule


def landmark_weight(reg: ml_collections.ConfigDict, epoch: int) -> float:
    """Weight of the landmark regulariser in (0-based) epoch `epoch`.

    'schedule': weights[i] where i = the number of boundaries strictly below `epoch` (official:
    epochs 0-7 -> 1000, 8-13 -> 100, 14-20 -> 1, 21-27 -> 0.11, later -> 0); 'constant': beta;
    'none': 0.
    """
    if reg.mode == "none":
        return 0.0
    if reg.mode == "constant":
        return float(reg.beta)
    return float(reg.weights[int(np.searchsorted(np.asarray(reg.boundaries), epoch, side="left"))])


# ----------------------------------------------------------------------------------------------------
# Initialisation from variables directories


def _flatten(tree: Any) -> dict[str, Any]:
    return {mesh_lib.path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge_variables(target: Any, source: Any, where: str, *, allow_missing: bool = False) -> Any:
    """`target` with each leaf replaced by the leaf of `source` at the same path.

    Raises ValueError naming `where` and the parameter path on a shape mismatch, on a source leaf
    the target does not have, and (unless allow_missing) on a target leaf the source lacks.
    """
    src = _flatten(source)
    tgt = _flatten(target)
    unexpected = sorted(set(src) - set(tgt))
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} entries the model does not have, e.g. '{unexpected[0]}' "
                         f"(model entries look like '{next(iter(tgt), '')}')")
    missing = sorted(set(tgt) - set(src))
    if missing and not allow_missing:
        raise ValueError(f"{where}: {len(missing)} model entries missing, e.g. '{missing[0]}'")
    for path, value in src.items():
        if tuple(np.shape(value)) != tuple(np.shape(tgt[path])):
            raise ValueError(f"{where}: '{path}' has shape {tuple(np.shape(value))}, the model needs "
                             f"{tuple(np.shape(tgt[path]))}")

    def pick(kp, leaf):
        path = mesh_lib.path_str(kp)
        return np.asarray(src[path], dtype=np.asarray(leaf).dtype) if path in src else leaf

    return jax.tree_util.tree_map_with_path(pick, target)


def source_patch_order(metadata: dict) -> tuple[str, str | None]:
    """(pretraining method or kind, patch order) a variables directory's metadata records or implies.

    Directories written before `patch_order` was recorded: a pretraining teacher by its method ('lafs'
    -> 'landmarks', 'dino' -> 'grid'), a converted or fine-tuned backbone by its model kind; None
    when nothing says.
    """
    method = metadata.get("method") or metadata.get("kind") or "unknown"
    order = metadata.get("patch_order")
    if order is None:
        if metadata.get("kind") == "token_vit":
            order = {"lafs": "landmarks", "dino": "grid"}.get(metadata.get("method"))
        elif metadata.get("kind") == "lafs_ssl":
            order = "landmarks"
        elif isinstance(metadata.get("model"), dict):
            order = presets.KIND_PATCH_ORDER.get(metadata["model"].get("kind"))
    return str(method), order


def check_patch_order(config: ml_collections.ConfigDict, metadata: dict, where: str) -> None:
    """ConfigError when the loaded backbone's patch embedding was trained on another patch layout
    than config.model feeds, unless config.init.allow_patch_order_change."""
    method, order = source_patch_order(metadata)
    want = presets.patch_order(config.model)
    if order is None or want is None or order == want or config.init.allow_patch_order_change:
        return
    layout = {"landmarks": "(x, y, channel) landmark patches", "grid": "(row, col, channel) grid patches"}
    raise ConfigError(
        f"{where}: pretrained by {method!r} on {order!r} patches ({layout[order]}), but model.kind="
        f"{config.model.kind!r} feeds {want!r} patches ({layout[want]}): its patch embedding and positions "
        f"would see a layout they never saw. Set config.init.allow_patch_order_change=True to transfer anyway "
        f"(the LAFS paper's Table 7 row (4), 'landmark to standard grid').")


def initial_variables(config: ml_collections.ConfigDict, variables: dict) -> tuple[dict, str]:
    """The model's starting variables per `config.init`, and a one-line description of the source.

    Variables directories are read as host arrays against their stored shapes (never the sharding
    that wrote them), so a directory written on any device count loads here; every shape is then
    checked against the model (errors name the entry)."""
    variables = jax.tree.map(np.asarray, variables)
    params = dict(variables["params"])
    stats = dict(variables.get("batch_stats", {}))
    origin = "scratch"
    if config.init.backbone:
        stored = variables_lib.stored_structure(config.init.backbone)
        # the model's collections only (a converted checkpoint may also hold a classifier or DINO head)
        loaded, meta = variables_lib.load_variables(config.init.backbone,
                                                 variables_lib.subtrees(stored, ("params",), ("batch_stats",)) or stored)
        src_params = loaded.get("params", loaded)
        kind = config.init.kind
        if kind == "auto":
            kind = "token_vit" if ("vit" in params and "vit" not in src_params) else "backbone"
        where = f"config.init.backbone={config.init.backbone!r} (init.kind={kind!r})"
        check_patch_order(config, meta or {}, where)
        if kind == "token_vit":
            if "vit" not in params:
                raise ConfigError(f"{where}: model.kind={config.model.kind!r} has no 'vit' submodule to load a "
                                  f"TokenViT into")
            params["vit"] = merge_variables(params["vit"], src_params, where)
        else:
            params = merge_variables(params, src_params, where)
            if stats and "batch_stats" in loaded:
                stats = merge_variables(stats, loaded["batch_stats"], where + " batch_stats")
        origin = f"{kind} from {config.init.backbone}"
    if config.init.landmark_cnn:
        if "landmark_cnn" not in params:
            raise ConfigError(f"config.init.landmark_cnn is set but model.kind={config.model.kind!r} has no landmark CNN")
        loaded = landmark_cnn_lib.read(config.init.landmark_cnn)
        where = f"config.init.landmark_cnn={config.init.landmark_cnn!r}"
        params["landmark_cnn"] = merge_variables(params["landmark_cnn"], loaded.get("params", {}), where)
        if "landmark_cnn" in stats:
            stats["landmark_cnn"] = merge_variables(stats["landmark_cnn"], loaded.get("batch_stats", {}),
                                                    where + " batch_stats")
        origin += f"; landmark CNN from {config.init.landmark_cnn}"
    out = {"params": params}
    if stats:
        out["batch_stats"] = stats
    return out, origin


def landmark_teacher_variables(config: ml_collections.ConfigDict, variables: dict) -> dict:
    """Frozen landmark-CNN variables for the regulariser: `landmark_reg.teacher`, else the initial ones."""
    if config.landmark_reg.teacher:
        loaded = landmark_cnn_lib.read(config.landmark_reg.teacher)
        where = f"config.landmark_reg.teacher={config.landmark_reg.teacher!r}"
        out = {}
        for col in ("params", "batch_stats"):
            out[col] = merge_variables(variables[col]["landmark_cnn"], loaded.get(col, {}), where + f" {col}")
        return out
    return {col: jax.tree.map(np.copy, variables[col]["landmark_cnn"]) for col in ("params", "batch_stats")}


# ----------------------------------------------------------------------------------------------------
# Loss and step


def make_loss_fn(model: Any, landmark_cnn: Any, config: ml_collections.ConfigDict, mesh: Any, num_classes: int,
                 phase: Any = None):
    """loss_fn(params, batch_stats, teacher_vars, batch, key, reg_weight) -> (loss, (metrics, batch_stats)).

    params = {'backbone': ..., 'centers': W}; batch = {'image', 'label', 'label2', 'lam'}.
    With a curriculum `phase` (a `curriculum.phase()`; its sample rate and margin replace config.loss's)
    the function takes the prototype buffer E[C_pad, D] as a 7th argument and returns
    (loss, (metrics, batch_stats, embeddings [B, D])), the embeddings for the EPL update.
    """
    loss_cfg = config.loss
    use_reg = config.landmark_reg.mode != "none"
    frozen = config.freeze_landmark_cnn
    scale = float(config.model.image_size - 1)

    def loss_fn(params, batch_stats, teacher_vars, batch, key, reg_weight, prototypes=None):
        k_drop, k_sample = jax.random.split(key)
        variables = {"params": params["backbone"]}
        mutable = []
        if batch_stats:
            variables["batch_stats"] = batch_stats
            mutable = ["batch_stats"]
        given = {}  # only Part fViT takes landmarks computed outside it
        if frozen:
            lm_vars = {k: v["landmark_cnn"] for k, v in variables.items() if "landmark_cnn" in v}
            given["landmarks"] = jax.lax.stop_gradient(landmark_cnn.apply(lm_vars, batch["image"], train=False))
        out, new_state = model.apply(variables, batch["image"], train=True, rngs={"dropout": k_drop},
                                     mutable=mutable, **given)
        emb, aux = out  # every backbone returns (embedding, aux dict)
        landmarks = aux.get("landmarks")  # Part fViT's, for the landmark regulariser
        labels = {k: batch[k] for k in ("label", "label2", "lam")}
        if phase is None:
            cls_loss, metrics = partial_fc.partial_fc_loss(
                emb, labels, params["centers"], k_sample, mesh=mesh, num_classes=num_classes,
                sample_rate=loss_cfg.sample_rate, m1=loss_cfg.m1, m2=loss_cfg.m2, m3=loss_cfg.m3, s=loss_cfg.s,
                fallback=loss_cfg.arcface_fallback)
        else:
            cls_loss, metrics = curriculum_lib.phase_loss(emb, labels, params["centers"], prototypes, k_sample,
                                                          mesh=mesh, num_classes=num_classes, phase=phase)
        metrics = {"cls_loss": cls_loss, **{k: v for k, v in metrics.items() if k != "loss"}}
        loss = cls_loss
        if use_reg:
            target = jax.lax.stop_gradient(landmark_cnn.apply(teacher_vars, batch["image"], train=False))
            reg = jnp.mean(jnp.square((landmarks.astype(jnp.float32) - target.astype(jnp.float32)) / scale))
            loss = loss + reg_weight * reg
            metrics["landmark_loss"] = reg
            metrics["landmark_weight"] = reg_weight
        metrics["loss"] = loss
        # a frozen landmark CNN is not run in train mode, so its statistics are not in new_state
        new_stats = {**batch_stats, **new_state.get("batch_stats", {})} if batch_stats else batch_stats
        if phase is not None:
            return loss, (metrics, new_stats, emb)
        return loss, (metrics, new_stats)

    return loss_fn


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """Decay of the parameter average at update `step` (1-based): min(decay, (1 + step) / (10 + step)),
    so the first updates are not dominated by the random or pretrained initial weights."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def parameter_updates(opt_state: Any, micro_steps: jax.Array) -> jax.Array:
    """Parameter updates made so far: the gradient_step of an optax.MultiSteps state (gradient
    accumulation), else `micro_steps` (every tx.update call updates the parameters)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.MultiStepsState))
             if isinstance(x, optax.MultiStepsState)]
    if len(found) > 1:
        raise ValueError("parameter_updates: the optimizer state holds several optax.MultiSteps states")
    return found[0].gradient_step if found else jnp.asarray(micro_steps)


AUGMENT_STREAM = 0x5EED  # fold_in constant of the device augmentation's key (base key folded with it)


def make_train_step(loss_fn, tx: optax.GradientTransformation, base_key: jax.Array, ema_decay: float = 0.0,
                    data_config: ml_collections.ConfigDict | None = None, prototype_update=None,
                    phase_index: int | None = None):
    """step(state, batch, reg_weight) -> (state, metrics); state = {'step', 'params', 'batch_stats', 'opt_state'}
    and, when ema_decay > 0, 'ema' (the moving average of params['backbone']), which moves once per
    parameter update: under gradient accumulation (optax.MultiSteps) only on the micro-batches where
    the inner optimizer stepped, with the decay of that update's count.

    With data_config.augment_on='device' the batch is the decoded one ({'image': uint8, 'index',
    'label'}) and the step first makes the training images (`device_augment.finetune_images`, key =
    base_key folded with AUGMENT_STREAM, then each sample's stream index).

    Curriculum (a state with 'prototypes' E): loss_fn is a phase's (`make_loss_fn(..., phase=)`, given E,
    returning the embeddings); `prototype_update(E, embeddings, batch) -> E` (the EPL rule, or None in
    a phase that does not update E) runs on this step's forward features, detached; metrics get
    'phase' = phase_index."""
    device = data_config is not None and data_config.augment_on == "device"
    augment_key = jax.random.fold_in(base_key, AUGMENT_STREAM)

    def step(state, teacher_vars, batch, reg_weight):
        if device:
            batch = device_augment.finetune_images(data_config, augment_key, batch)
        key = jax.random.fold_in(base_key, state["step"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        curriculum = "prototypes" in state
        if curriculum:
            (_, (metrics, batch_stats, emb)), grads = grad_fn(state["params"], state["batch_stats"], teacher_vars,
                                                              batch, key, reg_weight, state["prototypes"])
        else:
            (_, (metrics, batch_stats)), grads = grad_fn(state["params"], state["batch_stats"], teacher_vars, batch,
                                                         key, reg_weight)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["param_norm"] = optax.tree.norm(params)  # of the state this step hands on (divergence check)
        hyper = optim.current_hyperparams(opt_state)
        if "learning_rate" in hyper:
            metrics["learning_rate"] = hyper["learning_rate"]
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats, "opt_state": opt_state}
        if curriculum:
            new_state["prototypes"] = (prototype_update(state["prototypes"], emb, batch) if prototype_update
                                       else state["prototypes"])
            metrics["phase"] = jnp.float32(-1 if phase_index is None else phase_index)
        if ema_decay > 0:
            updates_done = parameter_updates(opt_state, state["step"] + 1)
            stepped = updates_done != parameter_updates(state["opt_state"], state["step"])
            decay = ema_decay_at(ema_decay, updates_done)
            moved = optax.incremental_update(params["backbone"], state["ema"], 1.0 - decay)
            new_state["ema"] = jax.tree.map(lambda new, old: jnp.where(stepped, new, old), moved, state["ema"])
            metrics["ema_decay"] = decay
        return new_state, metrics

    return step


def make_centers(config: ml_collections.ConfigDict, key: jax.Array, num_classes: int, dim: int, mesh: Any) -> jax.Array:
    """The class-centre matrix W[C_pad, dim] initialised per config.loss.centers_init, sharded by rows."""
    return partial_fc.init_centers(key, num_classes, dim, mesh, **CENTERS_INITS[config.loss.centers_init])


def _centers_tx(config, schedules_: dict) -> optax.GradientTransformation:
    lr = config.loss.centers_lr or schedules_["learning_rate"]
    return partial_fc.centers_optimizer(lr, kind=config.loss.centers_optimizer, momentum=config.loss.centers_momentum,
                                        weight_decay=config.loss.centers_weight_decay, b1=config.optim.b1,
                                        b2=config.optim.b2, lazy=config.loss.centers_lazy)


def make_optimizer(config: ml_collections.ConfigDict, params: Any, steps_per_epoch: int,
                   total_steps: int) -> optax.GradientTransformation:
    """The backbone's AdamW (layer decay, schedules) with W's optimizer inside. `steps_per_epoch` and
    `total_steps` count micro-batches; lr scaling sees the images of one update (batch x accum_steps)."""
    update_batch = config.batch_size * config.optim.accum_steps
    scheds = optim.schedules(config.optim, steps_per_epoch, total_steps=total_steps, global_batch_size=update_batch)
    return optim.finetune_optimizer(params, config.optim, steps_per_epoch, centers_tx=_centers_tx(config, scheds),
                                    total_steps=total_steps, global_batch_size=update_batch,
                                    frozen_regex=config.optim.landmark_regex if config.freeze_landmark_cnn else "")


def state_shardings(tx, params: Any, batch_stats: Any, mesh: Any, rules, ema: bool = False,
                    prototypes: bool = False) -> dict:
    """Shardings of the train state (`sharding.state_shardings`): backbone by rules, W by rows, the
    optimizer state like its params, the parameter average like the backbone, the curriculum's
    prototype buffer by rows like W, the rest replicated."""
    p_shard = {"backbone": mesh_lib.param_shardings(params["backbone"], rules, mesh),
               "centers": partial_fc.centers_sharding(mesh)}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "batch_stats": batch_stats,
                "opt_state": jax.eval_shape(tx.init, params)}
    out = mesh_lib.state_shardings(abstract, params, p_shard, mesh)
    if ema:  # stored as 'ema/<backbone path>', which is no suffix of 'params/backbone/<path>'
        out["ema"] = p_shard["backbone"]
    if prototypes:
        out["prototypes"] = partial_fc.centers_sharding(mesh)
    return out


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


def make_phase_step(model: Any, landmark_cnn: Any, config: ml_collections.ConfigDict, mesh: Any, num_classes: int,
                    tx: optax.GradientTransformation, shardings: dict, phase_index: int | None):
    """The jitted step of one curriculum phase (or of config.loss without a curriculum: phase_index None):
    explicit shardings, the state donated. Every phase's step folds the step number into the same key."""
    phase = None if phase_index is None else config.curriculum[phase_index]
    loss_fn = make_loss_fn(model, landmark_cnn, config, mesh, num_classes, phase=phase)
    update = None
    if phase is not None and phase["update_prototypes"]:
        def update(prototypes, emb, batch):
            return curriculum_lib.update_prototypes(prototypes, emb, batch, mesh=mesh, num_classes=num_classes)
    replicated = mesh_lib.replicated(mesh)
    return jax.jit(make_train_step(loss_fn, tx, jax.random.key(config.seed + 1), config.ema_decay,
                                   config.data, prototype_update=update, phase_index=phase_index),
                   in_shardings=(shardings, replicated, mesh_lib.batch_sharding(mesh), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def assemble_state(params: dict, batch_stats: Any, tx: Any, *, use_ema: bool) -> dict:
    """The train state around `params` ({'backbone', 'centers'}): {'step': 0, 'params', 'batch_stats',
    'opt_state': tx.init(params)} and, with `use_ema`, 'ema' (a copy of the backbone). Pure: `run` jits
    it with the state's shardings; `build_train_step`'s fresh init calls it. (The curriculum's prototype
    buffer is added by the callers.)"""
    state = {"step": jnp.zeros([], jnp.int32), "params": params, "batch_stats": batch_stats,
             "opt_state": tx.init(params)}
    if use_ema:
        state["ema"] = jax.tree.map(jnp.copy, params["backbone"])
    return state


def build_train_step(config: ml_collections.ConfigDict, mesh: Any, num_classes: int, *, steps_per_epoch: int,
                     total_steps: int, phase: int = 0) -> tuple[Any, tuple, dict, Any]:
    """(step, args, shardings, init): `run`'s jitted step (same loss, optimizer, shardings, donation)
    with abstract arguments for `step.lower(*args)`, built without data and without materialising
    anything; `init(key)` (jitted) makes a fresh state from scratch as `run` does without init
    directories (key = jax.random.key(config.seed) gives run's).

    args = (state, teacher_vars, batch, reg_weight) as ShapeDtypeStructs carrying their
    NamedShardings: the state (W[padded_rows(C), D] by rows, backbone by config.sharding_rules,
    optimizer state like its params), the batch {'image' f32 [B, H, W, C], 'label', 'label2' i32
    [B], 'lam' f32 [B]} with B = config.batch_size split over every device. Used for ahead-of-time
    compilation on devices this process may not own (bench/aot.py) and by the step benchmarks. With a
    curriculum: the step of phase `phase`, and the state holds the prototype buffer.
    """
    model_cfg = presets.with_precision(config.model, config.precision)  # as run: compute dtype, fp32 params
    model = presets.build_model(model_cfg)
    landmark_cnn = presets.build_landmark_cnn(model_cfg) if config.model.kind == "part_fvit" else None
    variables = presets.abstract_variables(model_cfg)
    emb_dim = embedding_dim(model, variables, model_cfg)
    params = {"backbone": variables["params"],
              "centers": jax.ShapeDtypeStruct((partial_fc.padded_rows(num_classes, mesh), emb_dim), jnp.float32)}
    batch_stats = variables.get("batch_stats", {})
    tx = make_optimizer(config, params, steps_per_epoch, total_steps)
    use_ema = config.ema_decay > 0
    use_protos = bool(config.curriculum)
    shardings = state_shardings(tx, params, batch_stats, mesh, config.sharding_rules, ema=use_ema,
                                prototypes=use_protos)
    replicated = mesh_lib.replicated(mesh)

    def fresh_state(key):
        init_key, centers_key = jax.random.split(key)
        protos_key = jax.random.fold_in(centers_key, 1)
        v = presets.init_variables(model_cfg, init_key)
        p = {"backbone": v["params"], "centers": make_centers(config, centers_key, num_classes, emb_dim, mesh)}
        state = assemble_state(p, v.get("batch_stats", {}), tx, use_ema=use_ema)
        if use_protos:
            state["prototypes"] = curriculum_lib.init_prototypes(protos_key, num_classes, emb_dim, mesh)
        return state

    state = jax.eval_shape(fresh_state, jax.random.key(0))
    teacher = ({col: variables[col]["landmark_cnn"] for col in ("params", "batch_stats")}
               if config.landmark_reg.mode != "none" else {})
    b, size = config.batch_size, config.model.image_size
    if config.data.augment_on == "device":  # decoded images of config.data.image_size px
        s = config.data.image_size
        batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8), "index": jax.ShapeDtypeStruct((b,), jnp.int32),
                 "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    else:
        batch = {"image": jax.ShapeDtypeStruct((b, size, size, config.model.channels), jnp.float32),
                 "label": jax.ShapeDtypeStruct((b,), jnp.int32), "label2": jax.ShapeDtypeStruct((b,), jnp.int32),
                 "lam": jax.ShapeDtypeStruct((b,), jnp.float32)}
    args = (ckpt_lib.abstract_like(state, shardings), ckpt_lib.abstract_like(teacher, replicated),
            ckpt_lib.abstract_like(batch, mesh_lib.batch_sharding(mesh)),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated))
    step = make_phase_step(model, landmark_cnn, config, mesh, num_classes, tx, shardings,
                           phase if use_protos else None)
    return step, args, shardings, jax.jit(fresh_state, out_shardings=shardings)


# ----------------------------------------------------------------------------------------------------
# The task


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


EvaluationError = evaluators_lib.EvaluationError


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
    evaluators = verification_evaluator(config, embedder_factory)

    # ------------------------------------------------------------------ data
    source = pipelines.make_source(config.data)
    num_classes = int(source.num_classes)
    steps_per_epoch = len(source) // global_bs
    check(steps_per_epoch >= 1, "batch_size", global_bs, f"at most the {len(source)} training images of {config.data.path}")
    total_steps = config.total_steps if config.total_steps > 0 else int(round(config.optim.epochs * steps_per_epoch))
    if config.curriculum:
        logging.info("curriculum: %s", "; ".join(
            f"phase {i}: epochs {p.epochs} (steps {sum(q.epochs for q in config.curriculum[:i]) * steps_per_epoch + 1}"
            f"..), sample rate {p.sample_rate}, prototypes {p.prototypes!r}, margin ({p.m1}, {p.m2}, {p.m3}) s={p.s}"
            for i, p in enumerate(config.curriculum)))
    # global batches on the mesh, the next ones copied while a step runs; checkpointed with the state
    train_iter = prefetch_lib.device_prefetch(
        pipelines.finetune_batches(source, config.data, batch_size=local_bs, seed=config.seed), mesh,
        config.data.prefetch)
    logging.info("fine-tuning: %d images, %d classes, %d steps/epoch, %d steps, global batch %d",
                 len(source), num_classes, steps_per_epoch, total_steps, global_bs)

    # ------------------------------------------------------------------ model, head, optimizer
    landmark_cnn = presets.build_landmark_cnn(model_cfg) if config.model.kind == "part_fvit" else None
    init_key, centers_key = jax.random.split(jax.random.key(config.seed))
    init_fn = presets.compiled_init(model_cfg, mesh_lib.replicated(mesh))  # shared by runs of one architecture
    variables, origin = initial_variables(config, init_fn(init_key))
    logging.info("backbone initialised from %s", origin)
    teacher_np = landmark_teacher_variables(config, variables) if config.landmark_reg.mode != "none" else {}
    emb_dim = embedding_dim(model, variables, model_cfg)
    params = {"backbone": variables["params"], "centers": make_centers(config, centers_key, num_classes, emb_dim, mesh)}
    batch_stats = variables.get("batch_stats", {})
    tx = make_optimizer(config, params, steps_per_epoch, total_steps)

    use_ema = config.ema_decay > 0
    use_protos = bool(config.curriculum)
    shardings = state_shardings(tx, params, batch_stats, mesh, config.sharding_rules, ema=use_ema,
                                prototypes=use_protos)
    replicated = mesh_lib.replicated(mesh)
    state = jax.jit(functools.partial(assemble_state, tx=tx, use_ema=use_ema),
                    out_shardings={k: v for k, v in shardings.items() if k != "prototypes"})(params, batch_stats)
    if use_protos:  # EPL prototype buffer E[C_pad, D]: random unit rows, sharded by rows like W
        state["prototypes"] = curriculum_lib.init_prototypes(jax.random.fold_in(centers_key, 1), num_classes,
                                                             emb_dim, mesh)
    teacher_vars = jax.device_put(teacher_np, replicated)

    # ------------------------------------------------------------------ step
    # one jitted step per curriculum phase (None: config.loss), compiled when first needed
    step_fns: dict = {}

    def train_step(state, batch, step: int):
        _check_batch_labels(batch, num_classes)  # this process's rows, before the step
        phase = phase_at(config, step, steps_per_epoch)
        if phase not in step_fns:
            if phase is not None:
                logging.info("curriculum phase %d from step %d: %s", phase, step, dict(config.curriculum[phase]))
            step_fns[phase] = make_phase_step(model, landmark_cnn, config, mesh, num_classes, tx, shardings, phase)
        reg_weight = np.float32(landmark_weight(config.landmark_reg, (step - 1) // steps_per_epoch))
        return step_fns[phase](state, teacher_vars, batch, reg_weight)

    # ------------------------------------------------------------------ checkpoint / resume
    # with verification sets, every evaluated step is checkpointed with its accuracy, and the best one
    # is kept beside the latest `checkpoint.keep` (WORKDIR/backbone_best at the end)
    ckpt = ckpt_lib.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                      save_every=config.checkpoint.every_steps,
                                      async_save=config.checkpoint.async_save,
                                      metadata={"config": config, **backbone_metadata(config)},
                                      best_fn=loop.best_score if evaluators else None)
    abstract_state = ckpt_lib.abstract_like(state, shardings)  # restore targets (the live state gets donated)
    rows = padded_rows(config, num_classes)  # any mesh: W and its optimizer moments are re-padded
    resumed, restored = loop.resume(ckpt, abstract_state, train_iter, padded_rows=rows)
    start = 0
    if resumed is not None:
        state, start = restored, int(restored["step"])

    def backbone_variables(state) -> dict:
        """What evaluation and the output use: the parameter average when it is on, else the params."""
        variables = {"params": state["ema"] if use_ema else state["params"]["backbone"]}
        if batch_stats:
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


def embedding_dim(model: Any, variables: Any, model_config: ml_collections.ConfigDict) -> int:
    """D of the backbone's embedding (shape inference only, nothing computed)."""
    out = jax.eval_shape(lambda v: model.apply(v, presets.dummy_images(model_config, 1), train=False), variables)
    return int(out[0].shape[-1])  # (embedding, aux)
