"""task 'finetune': supervised fine-tuning of Part fViT / fViT with a sharded margin-softmax head.

One linear function, `run(config, workdir)`, in big_vision's style (reference/lafs.md §3):

  data        Grain fine-tuning batches (flip, crop, RandAugment, jitter, erasing, batch mixup ->
              `label`, `label2`, `lam`), sharded by process, resumable.
  model       the backbone of `config.model` initialised from scratch, from a LAFS / DINO pretraining
              teacher (a TokenViT variables directory, loaded into params['vit']), or from a full
              backbone variables directory (lafs_jax.convert's output of an official checkpoint, or
              an earlier fine-tuning); optionally the landmark CNN alone from another directory (the
              official code takes it from the stage-1 supervised Part fViT).
  head        Partial FC: W[C_pad, D] sharded by rows over every device, margin softmax (CosFace
              s=64, m=0.4 by default) with soft mixup targets, its own optimizer.
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
              normalisation, colour order, image size), what evaluation and export read.

Randomness: every step's dropout and sampling keys are `fold_in(key(seed), step)`, so a resumed run
draws the same numbers as an uninterrupted one.
"""
from __future__ import annotations

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
from lafs_jax.eval import verification
from lafs_jax.input import pipelines
from lafs_jax.input.verification_bin import load_bin
from lafs_jax.losses import partial_fc
from lafs_jax.models import presets
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import loop_utils
from lafs_jax.train import optim

INIT_KINDS = ("auto", "backbone", "token_vit")
REG_MODES = ("none", "schedule", "constant")
CENTERS_OPTIMIZERS = ("adamw", "sgd")


# ----------------------------------------------------------------------------------------------------
# Config checks


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the key for every bad or inconsistent fine-tuning field."""
    config_lib.validate_common(config)
    presets.validate_model_config(config.model)
    optim.validate_optim_config(config.optim)
    check(isinstance(config.eval.at_start, bool), "eval.at_start", config.eval.at_start, "True or False")
    check(isinstance(config.eval.flip, bool), "eval.flip", config.eval.flip, "True or False")
    for key in ("batch_size", "log_every_steps", "checkpoint.every_steps", "checkpoint.keep", "eval.batch_size",
                "eval.every_steps", "eval.nfolds"):
        v = config_lib.get_path(config, key)
        check(isinstance(v, int) and v >= 1, key, v, "an int >= 1")
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
    for key in ("init.backbone", "init.landmark_cnn", "landmark_reg.teacher"):
        path = config_lib.get_path(config, key)
        check(path == "" or os.path.isdir(path), key, path, "'' or an existing variables directory")
    for key in ("loss.m1", "loss.s"):
        check(config_lib.get_path(config, key) > 0, key, config_lib.get_path(config, key), "> 0")
    check(0.0 < config.loss.sample_rate <= 1.0, "loss.sample_rate", config.loss.sample_rate, "in (0, 1]")
    check_choice(config, "loss.centers_optimizer", CENTERS_OPTIMIZERS)
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
        check(os.path.isfile(path), f"eval.bins[{i}]", path, "an existing .bin file")
    for key, choices in (("eval.normalization", ("", "[-1,1]", "[-0.5,0.5]")), ("eval.color_order", ("rgb", "bgr"))):
        check_choice(config, key, choices)


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


def _subtrees(stored: Any, *paths: tuple[str, ...]) -> dict:
    """The parts of a stored tree (e.g. `variables_lib.stored_structure`) at `paths` that exist, nested
    as stored: the target of a partial load that reads nothing else."""
    out: dict = {}
    for path in paths:
        node = stored
        for key in path:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            parent = out
            for key in path[:-1]:
                parent = parent.setdefault(key, {})
            parent[path[-1]] = node
    return out


def load_landmark_cnn(directory: str) -> dict:
    """{'params', 'batch_stats'} of the landmark CNN in a variables directory (a Part fViT's
    'landmark_cnn' subtree, or a landmark CNN alone), as host arrays, written by any device count.
    Only the landmark CNN's arrays are read (not a Part fViT's ViT or classifier)."""
    stored = variables_lib.stored_structure(directory)
    nested = isinstance(stored.get("params"), dict) and "landmark_cnn" in stored["params"]
    if nested:
        loaded, _ = variables_lib.load_variables(directory, _subtrees(stored, ("params", "landmark_cnn"),
                                                                      ("batch_stats", "landmark_cnn")))
        return {col: loaded[col]["landmark_cnn"] for col in loaded}
    loaded, _ = variables_lib.load_variables(directory, _subtrees(stored, ("params",), ("batch_stats",)) or stored)
    return {"params": loaded.get("params", loaded), "batch_stats": loaded.get("batch_stats", {})}


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
        loaded, _ = variables_lib.load_variables(config.init.backbone,
                                                 _subtrees(stored, ("params",), ("batch_stats",)) or stored)
        src_params = loaded.get("params", loaded)
        kind = config.init.kind
        if kind == "auto":
            kind = "token_vit" if ("vit" in params and "vit" not in src_params) else "backbone"
        where = f"config.init.backbone={config.init.backbone!r} (init.kind={kind!r})"
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
        loaded = load_landmark_cnn(config.init.landmark_cnn)
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
        loaded = load_landmark_cnn(config.landmark_reg.teacher)
        where = f"config.landmark_reg.teacher={config.landmark_reg.teacher!r}"
        out = {}
        for col in ("params", "batch_stats"):
            out[col] = merge_variables(variables[col]["landmark_cnn"], loaded.get(col, {}), where + f" {col}")
        return out
    return {col: jax.tree.map(np.copy, variables[col]["landmark_cnn"]) for col in ("params", "batch_stats")}


# ----------------------------------------------------------------------------------------------------
# Loss and step


def make_loss_fn(model: Any, landmark_cnn: Any, config: ml_collections.ConfigDict, mesh: Any, num_classes: int):
    """loss_fn(params, batch_stats, teacher_vars, batch, key, reg_weight) -> (loss, (metrics, batch_stats)).

    params = {'backbone': ..., 'centers': W}; batch = {'image', 'label', 'label2', 'lam'}.
    """
    loss_cfg = config.loss
    use_reg = config.landmark_reg.mode != "none"
    frozen = config.freeze_landmark_cnn
    scale = float(config.model.image_size - 1)

    def loss_fn(params, batch_stats, teacher_vars, batch, key, reg_weight):
        k_drop, k_sample = jax.random.split(key)
        variables = {"params": params["backbone"]}
        mutable = []
        if batch_stats:
            variables["batch_stats"] = batch_stats
            mutable = ["batch_stats"]
        given = {}  # only Part fViT takes landmarks= (fViT and InsightFace ViT have no landmark CNN)
        if frozen:
            lm_vars = {k: v["landmark_cnn"] for k, v in variables.items() if "landmark_cnn" in v}
            given["landmarks"] = jax.lax.stop_gradient(landmark_cnn.apply(lm_vars, batch["image"], train=False))
        out, new_state = model.apply(variables, batch["image"], train=True, rngs={"dropout": k_drop},
                                     mutable=mutable, **given)
        emb, landmarks = out if isinstance(out, tuple) else (out, None)
        labels = {k: batch[k] for k in ("label", "label2", "lam")}
        cls_loss, metrics = partial_fc.partial_fc_loss(
            emb, labels, params["centers"], k_sample, mesh=mesh, num_classes=num_classes,
            sample_rate=loss_cfg.sample_rate, m1=loss_cfg.m1, m2=loss_cfg.m2, m3=loss_cfg.m3, s=loss_cfg.s)
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
        return loss, (metrics, {**batch_stats, **new_state.get("batch_stats", {})} if batch_stats else batch_stats)

    return loss_fn


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """Decay of the parameter average at update `step` (1-based): min(decay, (1 + step) / (10 + step)),
    so the first updates are not dominated by the random or pretrained initial weights."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def make_train_step(loss_fn, tx: optax.GradientTransformation, base_key: jax.Array, ema_decay: float = 0.0):
    """step(state, batch, reg_weight) -> (state, metrics); state = {'step', 'params', 'batch_stats', 'opt_state'}
    and, when ema_decay > 0, 'ema' (the moving average of params['backbone'])."""

    def step(state, teacher_vars, batch, reg_weight):
        key = jax.random.fold_in(base_key, state["step"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (metrics, batch_stats)), grads = grad_fn(state["params"], state["batch_stats"], teacher_vars, batch, key,
                                                     reg_weight)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        hyper = optim.current_hyperparams(opt_state)
        if "learning_rate" in hyper:
            metrics["learning_rate"] = hyper["learning_rate"]
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats, "opt_state": opt_state}
        if ema_decay > 0:
            decay = ema_decay_at(ema_decay, state["step"] + 1)
            new_state["ema"] = optax.incremental_update(params["backbone"], state["ema"], 1.0 - decay)
            metrics["ema_decay"] = decay
        return new_state, metrics

    return step


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


def like_params_shardings(tree: Any, params: Any, param_shardings: Any, default: Any) -> Any:
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path and has
    that parameter's shape (Adam moments, momenta) takes the parameter's sharding; the rest (step
    counts, injected hyperparameters) get `default`."""
    flat_params = {mesh_lib.path_str(kp): (tuple(np.shape(x)), sh) for (kp, x), sh in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(param_shardings))}

    def one(kp, leaf):
        path, shape = mesh_lib.path_str(kp), tuple(np.shape(leaf))
        best = None
        for ppath, (pshape, sh) in flat_params.items():
            if pshape == shape and (path == ppath or path.endswith("/" + ppath)):
                if best is None or len(ppath) > best[0]:
                    best = (len(ppath), sh)
        return best[1] if best else default

    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(tx, params: Any, batch_stats: Any, mesh: Any, rules, ema: bool = False) -> dict:
    """Shardings of the train state: backbone (and its average) by rules, W by rows, optimizer state
    like its params."""
    replicated = mesh_lib.replicated(mesh)
    p_shard = {"backbone": mesh_lib.param_shardings(params["backbone"], rules, mesh),
               "centers": partial_fc.centers_sharding(mesh)}
    abstract_opt = jax.eval_shape(tx.init, params)
    out = {"step": replicated, "params": p_shard, "batch_stats": jax.tree.map(lambda _: replicated, batch_stats),
           "opt_state": like_params_shardings(abstract_opt, params, p_shard, replicated)}
    if ema:
        out["ema"] = p_shard["backbone"]
    return out


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
        "source": "lafs_jax.train.finetune",
        **extra,
    }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tune; returns {'step', 'final_metrics', 'verification': {set: accuracy}}."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(config.mesh)
    global_bs = config.batch_size
    local_bs = mesh_lib.local_batch_size(global_bs, mesh, "config.batch_size")
    # Topology errors before any work: the rules against the backbone's shapes (nothing computed).
    mesh_lib.param_shardings(presets.abstract_variables(config.model)["params"], config.sharding_rules, mesh)

    # ------------------------------------------------------------------ data
    source = pipelines.make_source(config.data)
    num_classes = int(source.num_classes)
    steps_per_epoch = len(source) // global_bs
    check(steps_per_epoch >= 1, "batch_size", global_bs, f"at most the {len(source)} training images of {config.data.path}")
    total_steps = config.total_steps if config.total_steps > 0 else int(round(config.optim.epochs * steps_per_epoch))
    train_iter = pipelines.finetune_batches(source, config.data, batch_size=local_bs, seed=config.seed)
    logging.info("fine-tuning: %d images, %d classes, %d steps/epoch, %d steps, global batch %d",
                 len(source), num_classes, steps_per_epoch, total_steps, global_bs)

    # ------------------------------------------------------------------ model, head, optimizer
    model = presets.build_model(config.model)
    landmark_cnn = presets.build_landmark_cnn(config.model) if config.model.kind == "part_fvit" else None
    init_key, centers_key = jax.random.split(jax.random.key(config.seed))
    init_fn = jax.jit(lambda k: presets.init_variables(config.model, k), out_shardings=mesh_lib.replicated(mesh))
    variables, origin = initial_variables(config, init_fn(init_key))
    logging.info("backbone initialised from %s", origin)
    teacher_np = landmark_teacher_variables(config, variables) if config.landmark_reg.mode != "none" else {}
    emb_dim = embedding_dim(model, variables, config.model)
    params = {"backbone": variables["params"], "centers": partial_fc.init_centers(centers_key, num_classes, emb_dim, mesh)}
    batch_stats = variables.get("batch_stats", {})
    tx = make_optimizer(config, params, steps_per_epoch, total_steps)

    use_ema = config.ema_decay > 0
    shardings = state_shardings(tx, params, batch_stats, mesh, config.sharding_rules, ema=use_ema)
    replicated = mesh_lib.replicated(mesh)
    params = jax.device_put(params, shardings["params"])
    state = {"step": jax.device_put(jnp.zeros([], jnp.int32), replicated), "params": params,
             "batch_stats": jax.device_put(batch_stats, shardings["batch_stats"]),
             "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)}
    if use_ema:
        state["ema"] = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings["ema"])(params["backbone"])
    teacher_vars = jax.device_put(teacher_np, replicated)

    # ------------------------------------------------------------------ step
    loss_fn = make_loss_fn(model, landmark_cnn, config, mesh, num_classes)
    batch_shard = mesh_lib.batch_sharding(mesh)
    step_fn = jax.jit(make_train_step(loss_fn, tx, jax.random.key(config.seed + 1), config.ema_decay),
                      in_shardings=(shardings, replicated, batch_shard, replicated),
                      out_shardings=(shardings, replicated), donate_argnums=(0,))

    # ------------------------------------------------------------------ checkpoint / resume
    ckpt = ckpt_lib.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                      save_every=config.checkpoint.every_steps,
                                      metadata={"config": config, **backbone_metadata(config)})
    start = 0
    if ckpt.latest_step() is not None:
        try:  # any mesh: W and its optimizer moments are re-padded for this device count
            state = ckpt.restore(None, ckpt_lib.abstract_like(state, shardings), data_iterator=train_iter,
                                 padded_rows=partial_fc.padded_rows_rule(num_classes))
        except Exception:
            ckpt.close()  # release orbax's threads, so the error is all that is printed
            raise
        start = int(state["step"])
        logging.info("resumed from step %d", start)

    # ------------------------------------------------------------------ evaluation
    eval_sets = {os.path.splitext(os.path.basename(p))[0]: load_bin(p, config.model.image_size)
                 for p in config.eval.bins}
    embedder = embed_lib.Embedder(model, None, image_size=config.model.image_size,
        normalization=config.eval.normalization or config.data.normalization,
        color_order=config.eval.color_order, mesh=mesh,
        batch_size=config.eval.batch_size) if eval_sets else None

    def backbone_variables(state) -> dict:
        """What evaluation and the output use: the parameter average when it is on, else the params."""
        variables = {"params": state["ema"] if use_ema else state["params"]["backbone"]}
        if batch_stats:
            variables["batch_stats"] = state["batch_stats"]
        return variables

    def evaluate(state) -> dict:
        variables = backbone_variables(state)
        out = {}
        for name, (images, issame) in eval_sets.items():
            emb = embedder.embed(images, flip=config.eval.flip, variables=variables)
            r = verification.evaluate_pairs_embeddings(emb, issame, nfolds=config.eval.nfolds)
            out[name] = r
        return out

    # ------------------------------------------------------------------ loop
    writer = loop_utils.MetricWriter(workdir)
    progress = loop_utils.Progress(total_steps, every=config.log_every_steps, batch_size=global_bs, start_step=start,
                                   name="finetune")
    metrics: dict = {}
    results: dict = {}
    initial: dict = {}
    if eval_sets and config.eval.at_start and start == 0:
        initial = evaluate(state)
        writer.write_scalars(0, {f"val/{n}/accuracy": r["accuracy"] for n, r in initial.items()})
        logging.info("verification before training:\n%s", verification.format_table(initial))
    single = jax.process_count() == 1
    with loop_utils.preemption_guard() as guard:
        for step in range(start + 1, total_steps + 1):
            batch = next(train_iter)
            partial_fc.check_labels(batch, num_classes)
            reg_weight = np.float32(landmark_weight(config.landmark_reg, (step - 1) // steps_per_epoch))
            state, metrics = step_fn(state, teacher_vars, mesh_lib.global_batch(batch, mesh), reg_weight)
            if step == start + 1:
                progress.reset(step)
            logged = step % config.log_every_steps == 0 or step == total_steps
            saving = ckpt.should_save(step) or step == total_steps
            if logged or saving:
                loop_utils.check_finite(step, metrics, keys=("loss",))
            if logged:
                scalars = {f"train/{k}": v for k, v in metrics.items()}
                rates = progress.update(step, {"loss": metrics["loss"]})
                scalars.update({f"perf/{k}": v for k, v in (rates or {}).items()})
                writer.write_scalars(step, scalars)
            if eval_sets and (step % config.eval.every_steps == 0 or step == total_steps):
                results = evaluate(state)
                writer.write_scalars(step, {f"val/{n}/{k}": r[k] for n, r in results.items()
                                            for k in ("accuracy", "accuracy_std", "best_threshold")})
                logging.info("step %d verification:\n%s", step, verification.format_table(results))
            if saving:
                ckpt.save(step, state, data_iterator=train_iter, force=step == total_steps)
            if guard.requested if single else (logged and guard.sync_requested()):
                ckpt.save(step, state, data_iterator=train_iter, force=True)
                ckpt.wait()
                logging.warning("stopping at step %d on request (SIGTERM); the run resumes from here", step)
                ckpt.close()
                writer.close()
                return {"step": step, "preempted": True, "final_metrics": _host(metrics)}
    ckpt.close()
    writer.close()

    # ------------------------------------------------------------------ output
    variables_lib.save_variables(os.path.join(workdir, "backbone"), backbone_variables(state),
                                 backbone_metadata(config, step=int(state["step"]), init=origin,
                                                   num_classes=num_classes, ema_decay=float(config.ema_decay)))
    logging.info("saved the backbone to %s", os.path.join(workdir, "backbone"))
    return {"step": int(state["step"]), "preempted": False, "final_metrics": _host(metrics),
            "verification": {n: r["accuracy"] for n, r in results.items()},
            "initial_verification": {n: r["accuracy"] for n, r in initial.items()}}


def embedding_dim(model: Any, variables: Any, model_config: ml_collections.ConfigDict) -> int:
    """D of the backbone's embedding (shape inference only, nothing computed)."""
    out = jax.eval_shape(lambda v: model.apply(v, presets.dummy_images(model_config, 1), train=False), variables)
    return int((out[0] if isinstance(out, tuple) else out).shape[-1])


def _host(metrics: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
