"""task 'pretrain': self-supervised pretraining, DINO-face (fViT) and LAFS (Part fViT landmark views).

One linear function, `run(config, workdir)`, in big_vision's style; `config.method` picks the views:

  'dino'  DINO-face: standard multi-crop (2 x 112 px global + 8 x 48 px local crops) on a plain fViT
          (grid patches; a 48 px crop gives 36 tokens, which use the first 37 position rows).
  'lafs'  LAFS (the official `lafs_train.py`): a frozen landmark CNN (eval mode, restored from a supervised
          Part fViT / landmark-CNN variables directory, `config.lafs.landmark_path`) predicts R
          landmarks on each clean view; σ = 5 px Gaussian noise on every coordinate; global views
          take all R patches, local views `lafs.num_local_landmarks` (36) landmarks drawn with
          replacement; the patches come from the colour-augmented twin of each view. Student and
          teacher are TokenViT + DINOHead over these tokens.
          `lafs.local_views = 'grid'` is the "mixed views" option: global views as above, local
          views DINO-style, i.e. the augmented local crop resized to `lafs.grid_size` (48) px and cut
          into a regular grid of patches (36 tokens; see lafs_jax.train.views.grid_tokens). With
          `config.data.lafs.local_scale = (0.05, 0.4)` the crops are DINO's local scale range too.
          Official ablations: `lafs.random_landmarks` (uniformly random landmark positions, no CNN,
          no noise: `random_coor`) and `lafs.global_resample` (global views take R landmarks drawn
          with replacement, after the noise, instead of all R in order).

Both: student and EMA teacher (momentum cosine 0.996 -> 1 over all steps; the teacher starts as a
copy of the student), the DINO loss (student temperature 0.1, centred teacher with a warmup
temperature schedule, centre EMA 0.9 over the global batch; lafs_jax.losses.dino), AdamW with
linear warmup then cosine (peak lr x global batch / 256), cosine weight decay 0.04 -> 0.4 on
ndim >= 2 non-bias tensors, per-tensor gradient clipping 3.0, the head's `last_layer` frozen in the
first epoch (lafs_jax.train.optim.pretrain_optimizer). Official quirk kept as a field: the LAFS
teacher runs with dropout / drop-path active (`dino.teacher_train_mode`).

State (one pytree, checkpointed with the Grain iterator by TrainCheckpointer):
  {'student': {'backbone': {'vit': TokenViT params}, 'head': DINOHead params}, 'teacher': same tree,
   'opt_state', 'center': f32[K], 'step': i32, 'rng': root key, ['landmark_cnn': frozen variables]}
The frozen landmark CNN rides along in the state (so a resumed run uses exactly the same one) but is
outside the optimizer and only ever applied in eval mode under stop_gradient.

Input: with `config.data.augment_on = 'device'` (the recipes' default) the pipeline hands decoded uint8
images + stream indices and the step makes the views first (`device_views`: lafs_jax.input.device_augment,
keyed by the run key and each sample's stream index); with 'host' the pipeline hands the views.
Batches reach the step through `prefetch.device_prefetch` (the next ones copied while a step runs).

One jitted step `step(state, batch, rng) -> (state, metrics)`: batch sharded over all devices,
parameters replicated or by `config.sharding_rules`; rng = fold_in(state['rng'], step), so a resumed
run draws the same numbers as an uninterrupted one. bf16 compute on GPU/TPU with fp32 parameters
(`config.precision`).

Outputs in the workdir: checkpoints/ (last `checkpoint.keep`), TensorBoard events + metrics.jsonl,
and at the end `teacher_backbone/`: the teacher's TokenViT variables with metadata (model config,
normalisation, colour order, `method` and `patch_order`: 'landmarks' (x, y, channel) patch vectors
for LAFS, 'grid' (row, col, channel) for DINO-face), which fine-tuning loads into Part fViT's /
fViT's `vit` (refusing a patch order the model does not feed unless told).
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

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
from lafs_jax.input import device_augment
from lafs_jax.input import pipelines
from lafs_jax.losses import dino as dino_lib
from lafs_jax.models import presets
from lafs_jax.models import vit as vit_lib
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import loop, loop_utils
from lafs_jax.train import optim as optim_lib
from lafs_jax.train import prefetch as prefetch_lib
from lafs_jax.train import views as views_lib

METHODS = ("dino", "lafs")
LOCAL_VIEW_KINDS = ("landmarks", "grid")
TEACHER_BACKBONE_DIR = "teacher_backbone"
LANDMARK_INIT_DIR = "landmark_cnn_init"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first bad `config.*` field of a pretraining recipe."""
    config_lib.check_finite_numbers(config)
    check_choice(config, "method", METHODS)
    presets.validate_model_config(config.model)
    loop_utils.validate_divergence_config(config.divergence)
    pipelines.validate_data_config(config.data)
    optim_lib.validate_optim_config(config.optim)
    want_kind = "fvit" if config.method == "dino" else "part_fvit"
    check(config.model.kind == want_kind, "model.kind", config.model.kind,
          f"method {config.method!r} pretrains a {want_kind!r} backbone")
    check(config.optim.accum_steps == 1, "optim.accum_steps", config.optim.accum_steps,
          "pretraining updates the teacher after every optimizer step; gradient accumulation is not supported")
    check(config.optim.layer_decay == 1.0, "optim.layer_decay", config.optim.layer_decay,
          "pretraining applies no layer-wise decay (1.0)")
    check_choice(config, "precision", presets.PRECISIONS)
    check(isinstance(config.batch_size, int) and config.batch_size >= 1, "batch_size", config.batch_size,
          "an int >= 1 (global batch)")
    for key in ("steps_per_epoch", "total_steps", "stop_at_step"):
        v = config[key]
        check(isinstance(v, int) and (v == -1 or v >= 1), key, v, "an int >= 1, or -1")
    check(isinstance(config.log_every_steps, int) and config.log_every_steps >= 1, "log_every_steps",
          config.log_every_steps, "an int >= 1")
    d = config.dino
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        check(d[key] > 0, f"dino.{key}", d[key], "> 0")
    check(isinstance(d.warmup_teacher_temp_epochs, int) and 0 <= d.warmup_teacher_temp_epochs,
          "dino.warmup_teacher_temp_epochs", d.warmup_teacher_temp_epochs, "an int >= 0")
    check(0 <= d.center_momentum <= 1, "dino.center_momentum", d.center_momentum, "in [0, 1] (1: centre held at 0)")
    check(d.centering in dino_lib.CENTERINGS, "dino.centering", d.centering, f"one of {dino_lib.CENTERINGS}")
    check(isinstance(d.sinkhorn_iterations, int) and d.sinkhorn_iterations >= 1, "dino.sinkhorn_iterations",
          d.sinkhorn_iterations, "an int >= 1")
    check(d.koleo_weight >= 0, "dino.koleo_weight", d.koleo_weight, ">= 0 (0 = off)")
    for key in ("teacher_momentum", "teacher_momentum_end"):
        check(0 <= d[key] <= 1, f"dino.{key}", d[key], "in [0, 1]")
    check(config.checkpoint.keep >= 1, "checkpoint.keep", config.checkpoint.keep, ">= 1")
    check(config.checkpoint.every_steps >= 1, "checkpoint.every_steps", config.checkpoint.every_steps, ">= 1")
    check(isinstance(config.checkpoint.async_save, bool), "checkpoint.async_save", config.checkpoint.async_save,
          "True or False")
    if config.method == "dino":
        check(config.data.dino.global_size == config.model.image_size, "data.dino.global_size",
              config.data.dino.global_size, f"must equal model.image_size={config.model.image_size}")
        for key in ("global_size", "local_size"):
            size = config.data.dino[key]
            check(size % config.model.patch_size == 0 and (size // config.model.patch_size) ** 2 <=
                  presets.grid_tokens(config.model), f"data.dino.{key}", size,
                  f"a multiple of model.patch_size={config.model.patch_size} and at most model.image_size")
        check(config.data.dino.local_crops >= 1 or config.data.dino.global_crops >= 2, "data.dino.local_crops",
              config.data.dino.local_crops, "the loss needs at least two views")
        return
    lafs = config.lafs
    check(lafs.noise_std >= 0, "lafs.noise_std", lafs.noise_std, ">= 0 (pixels)")
    check(isinstance(lafs.num_local_landmarks, int) and 1 <= lafs.num_local_landmarks <= config.model.num_landmarks,
          "lafs.num_local_landmarks", lafs.num_local_landmarks,
          f"an int in [1, model.num_landmarks={config.model.num_landmarks}]")
    check_choice(config, "lafs.local_views", LOCAL_VIEW_KINDS)
    for key in ("random_landmarks", "global_resample"):
        check(isinstance(lafs[key], bool), f"lafs.{key}", lafs[key], "True or False")
    check(not (lafs.random_landmarks and lafs.global_resample), "lafs.global_resample", True,
          "resamples the landmark CNN's landmarks; with lafs.random_landmarks there are none")
    if lafs.local_views == "grid":
        g = lafs.grid_size
        check(g % config.model.patch_size == 0 and (g // config.model.patch_size) ** 2 <= config.model.num_landmarks,
              "lafs.grid_size", g, f"a multiple of model.patch_size={config.model.patch_size} with at most "
                                   f"model.num_landmarks={config.model.num_landmarks} patches")
    check(config.data.lafs.local_views >= 1 or config.data.lafs.global_views >= 2, "data.lafs.local_views",
          config.data.lafs.local_views, "the loss needs at least two views")


# ----------------------------------------------------------------------------------------------
# Networks and views
# ----------------------------------------------------------------------------------------------

class Networks(NamedTuple):
    """The Linen modules of a pretraining run (pure: parameters live in the state)."""
    method: str
    vit: Any  # TokenViT (the backbone; DINO patchifies on a grid first, as FViT does)
    head: Any  # DINOHead
    landmark_cnn: Any  # LandmarkCNN in float32 (LAFS), else None
    patch_size: int
    grid_patchify: Callable[[jax.Array], jax.Array] | None  # DINO: images -> grid tokens (FViT's layout)


def build_networks(config: ml_collections.ConfigDict) -> Networks:
    """TokenViT + DINOHead (compute dtype per config.precision), and the fp32 landmark CNN for LAFS."""
    model = presets.with_precision(config.model, config.precision)
    vit = presets.build_token_vit(model)
    head = presets.build_dino_head(model)
    landmark_cnn, patchify = None, None
    if config.method == "lafs":
        lm_model = ml_collections.ConfigDict(model.to_dict())
        lm_model.dtype = "float32"  # the official landmark CNN runs in fp32, outside autocast
        landmark_cnn = presets.build_landmark_cnn(lm_model)
    else:
        # FViT = grid patchify + TokenViT; the two are kept apart so every view goes through one
        # TokenViT call per token count, and the parameters are FViT's own tree ({'vit': ...}).
        patchify = lambda images: vit_lib.patchify(images, model.patch_size)
    return Networks(config.method, vit, head, landmark_cnn, model.patch_size, patchify)


def make_views(networks: Networks, config: ml_collections.ConfigDict, batch: dict, landmark_variables: Any,
               key: jax.Array) -> dict:
    """Model inputs of every view, batch-major: {'global': [B, G, ...], 'local': [B, L, ...]}.

    DINO: the crops' grid tokens. LAFS: landmark tokens (global: all R, local: num_local_landmarks
    resampled) or, with lafs.local_views = 'grid', grid tokens of the local augmented crops.
    """
    if networks.method == "dino":
        return {"global": _grid_views(networks, batch["global"]), "local": _grid_views(networks, batch["local"])}

    def landmark_fn(images):
        return networks.landmark_cnn.apply(landmark_variables, images, train=False)

    k_global, k_local = jax.random.split(key)
    if "index" in batch:  # device augmentation: per-sample landmark draws, from the step key and the stream index
        k_global = device_augment.sample_keys(k_global, batch["index"])
        k_local = device_augment.sample_keys(k_local, batch["index"])
    lafs = config.lafs
    num_landmarks = config.model.num_landmarks
    if lafs.random_landmarks:
        out = {"global": views_lib.random_landmark_views(batch["global_aug"], k_global, num_landmarks=num_landmarks,
                                                         patch_size=networks.patch_size)}
    else:
        out = {"global": views_lib.landmark_views(landmark_fn, batch["global_clean"], batch["global_aug"], k_global,
                                                  noise_std=lafs.noise_std,
                                                  num_selected=num_landmarks if lafs.global_resample else None,
                                                  patch_size=networks.patch_size)}
    if batch["local_aug"].shape[1] == 0:
        return out
    if lafs.random_landmarks and lafs.local_views == "landmarks":
        out["local"] = views_lib.random_landmark_views(batch["local_aug"], k_local,
                                                       num_landmarks=lafs.num_local_landmarks,
                                                       patch_size=networks.patch_size)
    elif lafs.local_views == "grid":
        out["local"] = views_lib.grid_tokens(batch["local_aug"], grid_size=lafs.grid_size,
                                             patch_size=networks.patch_size)
    else:
        out["local"] = views_lib.landmark_views(landmark_fn, batch["local_clean"], batch["local_aug"], k_local,
                                                noise_std=lafs.noise_std, num_selected=lafs.num_local_landmarks,
                                                patch_size=networks.patch_size)
    return out


def _grid_views(networks: Networks, images: jax.Array) -> jax.Array:
    b, v = images.shape[:2]
    if v == 0:
        return images.reshape(b, 0, 0, 0)
    tokens = networks.grid_patchify(images.reshape(b * v, *images.shape[2:]))
    return tokens.reshape(b, v, *tokens.shape[1:])


def head_logits(networks: Networks, params: dict, views: dict, key: jax.Array, train: bool,
                names: tuple[str, ...] = ("global", "local"), with_embeddings: bool = False):
    """logits [B, V, K] of the views `names` (in that order), multi-crop style; with `with_embeddings`,
    (logits, backbone embeddings [B, V, D]).

    The backbone runs once per view group (groups differ in token count); the head runs once on the
    concatenated embeddings, as DINO's MultiCropWrapper.
    """
    embeddings = []
    for i, name in enumerate(n for n in names if n in views and views[n].shape[1] > 0):
        tokens = views[name]
        b, v = tokens.shape[:2]
        emb = networks.vit.apply({"params": params["backbone"]["vit"]}, tokens.reshape(b * v, *tokens.shape[2:]),
                                 train=train, rngs={"dropout": jax.random.fold_in(key, i)} if train else None)
        embeddings.append(emb.reshape(b, v, -1))
    emb = jnp.concatenate(embeddings, axis=1)
    b, v, d = emb.shape
    logits = networks.head.apply({"params": params["head"]}, emb.reshape(b * v, d)).reshape(b, v, -1)
    return (logits, emb) if with_embeddings else logits


# ----------------------------------------------------------------------------------------------
# State and step
# ----------------------------------------------------------------------------------------------

def token_dim(config: ml_collections.ConfigDict) -> int:
    return config.model.patch_size ** 2 * config.model.channels


def init_student(networks: Networks, config: ml_collections.ConfigDict, key: jax.Array) -> dict:
    """{'backbone': {'vit': TokenViT params}, 'head': DINOHead params}, float32."""
    k_vit, k_head = jax.random.split(key)
    n = config.model.num_landmarks if config.method == "lafs" else presets.grid_tokens(config.model)
    tokens = jnp.zeros((1, n, token_dim(config)), jnp.float32)
    vit = networks.vit.init({"params": k_vit}, tokens, train=False)["params"]
    head = networks.head.init({"params": k_head}, jnp.zeros((1, config.model.dim), jnp.float32))["params"]
    return {"backbone": {"vit": vit}, "head": head}


def init_state(networks: Networks, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               key: jax.Array, landmark_variables: Any = None) -> dict:
    """A fresh train state (see the module docstring); teacher = copy of the student."""
    k_model, k_rng = jax.random.split(key)
    student = init_student(networks, config, k_model)
    state = {"student": student, "teacher": jax.tree.map(jnp.copy, student), "opt_state": tx.init(student),
             "center": jnp.zeros((config.model.dino_head.out_dim,), jnp.float32),
             "step": jnp.zeros((), jnp.int32), "rng": k_rng}
    if networks.method == "lafs":
        state["landmark_cnn"] = landmark_variables
    return state


AUGMENT_STREAM = 0x5EED  # fold_in constant of the device augmentation's key (state['rng'] folded with it)


def device_views(config: ml_collections.ConfigDict, root_key: jax.Array, batch: dict) -> dict:
    """With config.data.augment_on='device': the decoded batch {'image': uint8, 'index', 'label'} ->
    the host pipeline's view batch (lafs_jax.input.device_augment), from the run's key folded with
    AUGMENT_STREAM and each sample's stream index (the same views on any device count and after a
    resume); otherwise the batch as it is."""
    if config.data.augment_on != "device":
        return batch
    recipe = device_augment.dino_views if config.method == "dino" else device_augment.lafs_views
    return recipe(config.data, jax.random.fold_in(root_key, AUGMENT_STREAM), batch)


def step_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(views, student dropout, teacher dropout) keys of one step."""
    k_views, k_student, k_teacher = jax.random.split(rng, 3)
    return k_views, k_student, k_teacher


def make_train_step(networks: Networks, config: ml_collections.ConfigDict, tx: optax.GradientTransformation, *,
                    steps_per_epoch: int, total_steps: int) -> Callable:
    """The pure step `step(state, batch, rng) -> (state, metrics)` (jit it with shardings).

    Order as the official loop: teacher forward on the global views with the current teacher;
    student forward and DINO loss; AdamW update; teacher <- m * teacher + (1 - m) * new student;
    centre EMA of this step's teacher outputs.
    """
    d = config.dino
    momentum_at = optim_lib.cosine_schedule(d.teacher_momentum, d.teacher_momentum_end, total_steps)

    def temp_at(step):
        return dino_lib.teacher_temp_at(step, steps_per_epoch=steps_per_epoch, warmup_temp=d.warmup_teacher_temp,
                                        final_temp=d.teacher_temp, warmup_epochs=d.warmup_teacher_temp_epochs)

    def step(state, batch, rng):
        k_views, k_student, k_teacher = step_keys(rng)
        batch = device_views(config, state["rng"], batch)
        views = make_views(networks, config, batch, state.get("landmark_cnn"), k_views)
        teacher_out = head_logits(networks, state["teacher"], views, k_teacher, train=d.teacher_train_mode,
                                  names=("global",))
        teacher_out = jax.lax.stop_gradient(jnp.swapaxes(teacher_out, 0, 1))  # [G, B, K]
        temp = temp_at(state["step"])

        def loss_fn(params):
            student_out, emb = head_logits(networks, params, views, k_student, train=True, with_embeddings=True)
            loss, aux = dino_lib.dino_loss(jnp.swapaxes(student_out, 0, 1), teacher_out, state["center"],
                                           student_temp=d.student_temp, teacher_temp=temp, centering=d.centering,
                                           sinkhorn_iterations=d.sinkhorn_iterations)
            if d.koleo_weight > 0:  # on the student's backbone embeddings of each global view, over the batch
                koleo = jnp.mean(jnp.stack([dino_lib.koleo_loss(emb[:, g]) for g in range(teacher_out.shape[0])]))
                aux = dict(aux, dino_loss=loss, koleo=koleo)
                loss = loss + d.koleo_weight * koleo
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["student"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["student"])
        student = optax.apply_updates(state["student"], updates)
        m = momentum_at(state["step"])
        teacher = optax.incremental_update(student, state["teacher"], 1.0 - m)  # m * teacher + (1 - m) * student
        center = dino_lib.update_center(state["center"], teacher_out, d.center_momentum)
        hp = optim_lib.current_hyperparams(opt_state)
        metrics = {"loss": loss, **aux, "teacher_temp": temp, "momentum": m,
                   "param_norm": optax.tree.norm(student),  # of the state this step hands on (divergence check)
                   "learning_rate": hp["learning_rate"], "weight_decay": hp["weight_decay"]}
        new_state = dict(state, student=student, teacher=teacher, opt_state=opt_state, center=center,
                         step=state["step"] + 1)
        return new_state, metrics

    return step


def state_shardings(abstract_state: Any, config: ml_collections.ConfigDict, mesh) -> Any:
    """The student's parameters by config.sharding_rules; their optimizer moments and the teacher like
    them (`sharding.state_shardings`); everything else (centre, step, key, landmark CNN) replicated."""
    student = abstract_state["student"]
    return mesh_lib.state_shardings(abstract_state, student,
                                    mesh_lib.param_shardings(student, tuple(config.sharding_rules), mesh), mesh)


def jit_step(step: Callable, shardings: Any, mesh) -> Callable:
    """jax.jit of `step` with explicit shardings: batch over all devices, state by `shardings`."""
    return jax.jit(step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))


def build_train_step(config: ml_collections.ConfigDict, mesh, *, steps_per_epoch: int,
                     total_steps: int) -> tuple[Callable, tuple, Any, Callable]:
    """(step, args, shardings, init): `run`'s jitted step (same networks, optimizer, shardings,
    donation) with abstract arguments for `step.lower(*args)`, built without data and without
    materialising anything; `init(key)` (jitted) makes a fresh state as `run` does with an empty
    lafs.landmark_path (the untrained landmark CNN from the same key; key = jax.random.key(config.seed)
    gives run's).

    args = (state, batch, rng) as ShapeDtypeStructs carrying their NamedShardings; the batch is the
    pipeline's for B = config.batch_size images (DINO: 'global' f32 [B, G, S, S, 3], 'local'
    [B, L, s, s, 3]; LAFS: 'global_clean' / 'global_aug' [B, G, V, V, 3], 'local_clean' /
    'local_aug' [B, L, V, V, 3]; 'label' i32 [B]), split over every device. Used for ahead-of-time
    compilation on devices this process may not own (bench/aot.py) and by the step benchmarks.
    """
    networks = build_networks(config)
    abstract_student = jax.eval_shape(lambda k: init_student(networks, config, k), jax.random.key(0))
    tx = optim_lib.pretrain_optimizer(abstract_student, config.optim, steps_per_epoch, total_steps=total_steps,
                                      global_batch_size=config.batch_size)
    size = config.model.image_size

    def fresh_state(key):
        landmarks = None
        if config.method == "lafs":
            landmarks = networks.landmark_cnn.init({"params": key}, jnp.zeros((1, size, size, 3)), train=False)
        return init_state(networks, config, tx, key, landmarks)

    abstract = jax.eval_shape(fresh_state, jax.random.key(0))
    shardings = state_shardings(abstract, config, mesh)
    b = config.batch_size

    def views(n, side):
        return jax.ShapeDtypeStruct((b, n, side, side, 3), jnp.float32)

    if config.data.augment_on == "device":  # decoded images of config.data.image_size px
        s = config.data.image_size
        batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8), "index": jax.ShapeDtypeStruct((b,), jnp.int32)}
    elif config.method == "dino":
        d = config.data.dino
        batch = {"global": views(d.global_crops, d.global_size), "local": views(d.local_crops, d.local_size)}
    else:
        v = config.data.lafs
        batch = {f"{kind}_{twin}": views(n, v.view_size) for kind, n in (("global", v.global_views),
                                                                          ("local", v.local_views))
                 for twin in ("clean", "aug")}
    batch["label"] = jax.ShapeDtypeStruct((b,), jnp.int32)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    args = (ckpt_lib.abstract_like(abstract, shardings), ckpt_lib.abstract_like(batch, mesh_lib.batch_sharding(mesh)),
            jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=mesh_lib.replicated(mesh)))
    step = jit_step(make_train_step(networks, config, tx, steps_per_epoch=steps_per_epoch, total_steps=total_steps),
                    shardings, mesh)
    return step, args, shardings, jax.jit(fresh_state, out_shardings=shardings)


# ----------------------------------------------------------------------------------------------
# The frozen landmark CNN
# ----------------------------------------------------------------------------------------------

def landmark_variables(config: ml_collections.ConfigDict, networks: Networks, workdir: str) -> dict:
    """The frozen landmark CNN's variables {'params', 'batch_stats'} as numpy arrays.

    From `config.lafs.landmark_path` (a variables directory of a Part fViT, whose 'landmark_cnn'
    subtree is taken, or of a landmark CNN alone). An empty path initialises one from
    `config.seed` and saves it to workdir/landmark_cnn_init (untrained landmarks: for tests and the
    CPU demo only), and later runs in the same workdir reuse it.
    """
    size = config.model.image_size
    abstract = landmark_abstract(networks, config)
    path = config.lafs.landmark_path
    where = f"config.lafs.landmark_path={path!r}"
    if not path:
        path = os.path.join(workdir, LANDMARK_INIT_DIR)
        where = f"the initialised landmark CNN at {path}"
        if not os.path.isdir(os.path.join(path, variables_lib.VARIABLES_ITEM)):
            logging.warning("config.lafs.landmark_path is empty: using an UNTRAINED landmark CNN initialised "
                            "from seed %d (saved to %s); set it to a supervised Part fViT for real runs",
                            config.seed, path)
            init = jax.jit(lambda k: networks.landmark_cnn.init({"params": k}, jnp.zeros((1, size, size, 3)),
                                                                train=False))(jax.random.key(config.seed))
            variables_lib.save_variables(path, init,
                                         {"kind": "landmark_cnn", "model": variables_lib.to_json_dict(config.model),
                                          "source": f"initialised from seed {config.seed} (untrained)"})
    # Only the landmark CNN's arrays are read, as host arrays, whatever device count wrote them.
    stored = variables_lib.stored_structure(path)
    out = {}
    for collection in ("params", "batch_stats"):
        if collection not in abstract:
            continue
        if collection not in stored:
            raise ConfigError(f"{where}: the variables have no '{collection}' collection")
        nested = isinstance(stored[collection], dict) and "landmark_cnn" in stored[collection]
        part = stored[collection]["landmark_cnn"] if nested else stored[collection]
        loaded, _ = variables_lib.load_variables(path, {collection: {"landmark_cnn": part} if nested else part})
        src = loaded[collection]["landmark_cnn"] if nested else loaded[collection]
        out[collection] = _match_tree(abstract[collection], src, f"{where} {collection}")
    return out


def landmark_abstract(networks: Networks, config: ml_collections.ConfigDict) -> dict:
    """Shapes of the landmark CNN's variables {'params', 'batch_stats'} (nothing computed)."""
    size = config.model.image_size
    return jax.eval_shape(lambda k: networks.landmark_cnn.init({"params": k}, jnp.zeros((1, size, size, 3)),
                                                               train=False), jax.random.key(0))


def _match_tree(abstract: Any, loaded: Any, where: str) -> Any:
    """`loaded` as numpy float32 arrays with `abstract`'s structure; errors name the parameter path."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    for kp, leaf in flat:
        path = mesh_lib.path_str(kp)
        node = loaded
        for part in path.split("/"):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{where}: parameter '{path}' is missing")
            node = node[part]
        arr = np.asarray(node)
        if arr.shape != tuple(leaf.shape):
            raise ConfigError(f"{where}: parameter '{path}' has shape {arr.shape}, the model "
                              f"(config.model num_landmarks / landmark blocks) needs {tuple(leaf.shape)}")
        out.append(arr.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------

def _batches(config, source, batch_size: int, seed: int):
    build = pipelines.dino_batches if config.method == "dino" else pipelines.lafs_batches
    return build(source, config.data, batch_size=batch_size, seed=seed)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain per `config`; returns {'step', 'loss'} of the last step run by this call."""
    validate(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    os.makedirs(workdir, exist_ok=True)

    # -- data -------------------------------------------------------------------------------------
    source = pipelines.make_source(config.data)
    global_batch = config.batch_size
    local_batch = mesh_lib.local_batch_size(global_batch, mesh, "config.batch_size")
    steps_per_epoch = config.steps_per_epoch if config.steps_per_epoch > 0 else len(source) // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"config.batch_size={global_batch} is larger than the data set ({len(source)} images)")
    total_steps = config.total_steps if config.total_steps > 0 else int(config.optim.epochs * steps_per_epoch)
    # global batches on the mesh, the next ones copied while a step runs; checkpointed with the state
    data_iter = prefetch_lib.device_prefetch(_batches(config, source, local_batch, config.seed), mesh,
                                             config.data.prefetch)

    # -- model, optimizer, state ------------------------------------------------------------------
    networks = build_networks(config)
    lafs = config.method == "lafs"
    abstract_student = jax.eval_shape(lambda k: init_student(networks, config, k), jax.random.key(0))
    tx = optim_lib.pretrain_optimizer(abstract_student, config.optim, steps_per_epoch, total_steps=total_steps,
                                      global_batch_size=global_batch)
    init_fn = lambda key, lm: init_state(networks, config, tx, key, lm)
    abstract = jax.eval_shape(init_fn, jax.random.key(0), landmark_abstract(networks, config) if lafs else None)
    shardings = state_shardings(abstract, config, mesh)  # a bad rule fails here, before any work
    landmarks = landmark_variables(config, networks, workdir) if lafs else None
    step_fn = jit_step(make_train_step(networks, config, tx, steps_per_epoch=steps_per_epoch,
                                       total_steps=total_steps), shardings, mesh)

    model_meta = variables_lib.to_json_dict(config.model)
    meta = {"config": variables_lib.to_json_dict(config), "method": config.method, "model": model_meta,
            "normalization": config.data.normalization, "color_order": config.data.color_order}
    ckpt = ckpt_lib.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                      save_every=config.checkpoint.every_steps,
                                      async_save=config.checkpoint.async_save, metadata=meta)
    resumed, restored = loop.resume(ckpt, ckpt_lib.abstract_like(abstract, shardings), data_iter)
    if resumed is not None:
        state = restored
    else:
        state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed), landmarks)
    start = int(state["step"])
    stop = min(total_steps, config.stop_at_step) if config.stop_at_step > 0 else total_steps
    logging.info("pretrain %s: %d steps (%d per epoch), global batch %d, %d devices, from step %d",
                 config.method, total_steps, steps_per_epoch, global_batch, mesh.devices.size, start)

    def train_step(state, batch, step: int):
        """Step `step` from `state` (whose step counter is `step` - 1)."""
        return step_fn(state, batch, jax.random.fold_in(state["rng"], step - 1))

    def export(teacher, step: int, kind: str) -> None:
        save_teacher_backbone(os.path.join(workdir, TEACHER_BACKBONE_DIR), teacher, config, step)

    settings = loop.LoopSettings(name=f"pretrain[{config.method}]", total_steps=total_steps, stop_step=stop,
                                 log_every_steps=config.log_every_steps, batch_size=global_batch,
                                 divergence=config.divergence, metrics_every_step=True, metric_prefix="",
                                 perf_prefix="")
    out = loop.train(state, train_step, settings, ckpt=ckpt, batches=data_iter, start=start, workdir=workdir,
                     export_variables=lambda state: state["teacher"]["backbone"]["vit"], export=export)
    return {"step": out.step, "loss": out.last_loss}


def save_teacher_backbone(directory: str, teacher_vit: Any, config: ml_collections.ConfigDict, step: int) -> None:
    """The teacher's TokenViT params (state['teacher']['backbone']['vit']) with metadata: what
    fine-tuning initialises its `vit` from."""
    variables = {"params": teacher_vit}  # gathered to host arrays by save_variables
    variables_lib.save_variables(directory, variables, {
        "kind": "token_vit", "source": f"pretrain[{config.method}] teacher at step {step}",
        "method": config.method, "patch_order": presets.patch_order(config.model),
        "model": variables_lib.to_json_dict(config.model),
        "normalization": config.data.normalization, "color_order": config.data.color_order,
        "image_size": config.model.image_size,
    })
    logging.info("saved the teacher backbone to %s", directory)
