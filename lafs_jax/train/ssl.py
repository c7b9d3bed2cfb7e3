"""The teacher-student step of self-supervised pretraining, one for every method with an EMA teacher.

    task = ssl.build(objective, config, mesh, steps_per_epoch=..., total_steps=...)
    state = task.init(key, objective.load_resources(workdir));  state, metrics = task.step(state, batch, rng)

`objective` is a method's hooks (`lafs_jax.methods.pretraining(config.method)`, see `Objective`); this module
owns what every method shares. One step, jitted once with explicit shardings (`jit_step`):

    k_views, k_student, k_teacher = split(rng, 3)
    batch   = objective.augment(fold_in(state['rng'], AUGMENT_STREAM), batch)   (config.data.augment_on='device')
    views   = objective.views(state, batch, k_views)
    t_out   = stop_gradient(objective.teacher_outputs(state['teacher'], views, state, k_teacher))
    (loss, aux), g = value_and_grad(objective.loss)(state['student'], views, t_out, state, k_student)
    student = optimizer update of g (optim.pretrain_optimizer: config.optim, per-tensor clip, `last_layer`
              frozen for optim.freeze_last_layer_epochs)
    m       = cosine momentum objective.momentum[0] -> [1] over total_steps, at state['step']
    teacher = m teacher + (1 - m) objective.teacher_params(student)
    [student_stats = aux.pop('batch_stats');  teacher_stats = m teacher_stats + (1 - m) student_stats]
    state  |= objective.update_state(state, t_out)     (the method's extra state [+ 'teacher_stats'])
    metrics = {'loss', **aux, 'momentum', 'param_norm', 'learning_rate', 'weight_decay'}

State, one pytree (checkpointed with the Grain iterator): {'student': trained params, 'teacher': their EMA,
'opt_state', 'step': i32, 'rng': the run's root key, ['student_stats', 'teacher_stats': BatchNorm
statistics and their EMA, when `init_student` returns 'batch_stats'], **objective.init_extra_state(...)}.
The student's parameters are sharded by `config.sharding_rules`, their optimizer moments and the teacher
like them, everything else replicated (`state_shardings`).

A new method fits without changing this module when it is a student trained against an EMA of itself.
FRA (region-aware BYOL on a ResNet-50 with BatchNorm, lafs_jax.methods.fra) is one: `init_student`
returns {'params': {'online', 'predictor', 'predictor_obj'}, 'batch_stats': the same tree}; `teacher_params`
keeps params['online'] (the target has no predictors); `augment` / `views` make its two views;
`teacher_outputs` runs the target on both views in train mode from state['teacher_stats'] and returns
its new statistics; `loss` returns the online network's new statistics as aux['batch_stats'];
`update_state` may return 'teacher_stats' too, replacing this step's EMA of the student's statistics
(FRA's target keeps its own statistics and region buffer, moved by its own forwards);
`config.optim.name = 'lars'` picks BYOL's optimizer.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lafs_jax import sharding as mesh_lib
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import optim as optim_lib

AUGMENT_STREAM = 0x5EED  # fold_in constant of the device augmentation's key (state['rng'] folded with it)
BATCH_STATS = "batch_stats"  # the aux key a loss returns its new BatchNorm statistics under (popped)
RESERVED = ("student", "teacher", "opt_state", "step", "rng", "student_stats", "teacher_stats")


class Objective(Protocol):
    """What a method supplies (it implements these; it never imports train/). Built as
    `cls(config, *, steps_per_epoch, total_steps)`; `cls.validate(config)` checks its part of a recipe."""

    name: str  # config.method
    momentum: tuple[float, float]  # teacher EMA momentum at step 0 and at the last step (cosine between)

    def batches(self, source, *, batch_size: int, seed: int) -> Any:
        """The host pipeline (Grain iterator of per-process batches)."""

    def view_batch_shapes(self, batch_size: int) -> dict:
        """ShapeDtypeStructs of the host pipeline's batch without 'label' (augment_on='host')."""

    def augment(self, key: jax.Array, batch: dict) -> dict:
        """Decoded {'image': uint8, 'index', 'label'} -> the host pipeline's batch, on the device."""

    def init_student(self, key: jax.Array) -> dict:
        """{'params': trained parameters, ['batch_stats': BatchNorm statistics]} (float32)."""

    def teacher_params(self, student: Any) -> Any:
        """The part of the student parameters the teacher averages (the whole tree, or a subtree)."""

    def load_resources(self, workdir: str) -> Any:
        """Host arrays the extra state starts from (read once at start-up; None when there are none)."""

    def init_extra_state(self, key: jax.Array, resources: Any = None) -> dict:
        """The method's state entries (names outside RESERVED); resources None = fresh ones from `key`."""

    def views(self, state: dict, batch: dict, key: jax.Array) -> Any:
        """The model inputs of this step."""

    def teacher_outputs(self, teacher: Any, views: Any, state: dict, key: jax.Array) -> Any:
        """The teacher's targets (the step stops their gradient)."""

    def loss(self, student: Any, views: Any, teacher_out: Any, state: dict, key: jax.Array) -> tuple[Any, dict]:
        """(scalar loss, metrics [+ 'batch_stats': the student's new statistics])."""

    def update_state(self, state: dict, teacher_out: Any) -> dict:
        """New values of (some of) the extra state entries, and optionally 'teacher_stats' (applied after
        the EMA of the student's statistics, so it replaces it)."""

    def eval_model(self) -> Any:
        """The backbone module the evaluators embed with (`model.apply(v, images, train=False)`)."""

    def eval_variables(self, state: dict) -> Any:
        """Its variables for the teacher of `state`."""

    def export_variables(self, state: dict) -> dict:
        """The variables directory written at the end (the teacher backbone)."""

    def export_metadata(self) -> dict:
        """Its metadata ('kind', 'patch_order', ...)."""


class Task(NamedTuple):
    """A built pretraining task: the jitted step and what it needs."""
    step: Callable  # jit_step(make_train_step(...)): (state, batch, rng) -> (state, metrics), state donated
    init: Callable  # jitted (key, resources=None) -> a fresh state with `shardings`
    shardings: Any  # of the state
    abstract_state: Any  # ShapeDtypeStructs of the state (without shardings)
    tx: optax.GradientTransformation


def init_state(objective: Objective, tx: optax.GradientTransformation, key: jax.Array, resources: Any = None) -> dict:
    """A fresh train state (see the module docstring); the teacher starts as a copy of the student."""
    k_model, k_rng = jax.random.split(key)
    student = objective.init_student(k_model)
    params = student["params"]
    state = {"student": params, "teacher": jax.tree.map(jnp.copy, objective.teacher_params(params)),
             "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": k_rng}
    if BATCH_STATS in student:
        state["student_stats"] = student[BATCH_STATS]
        state["teacher_stats"] = jax.tree.map(jnp.copy, student[BATCH_STATS])
    extra = objective.init_extra_state(key, resources)
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ValueError(f"{objective.name}: init_extra_state returned reserved state entries {clash}")
    return {**state, **extra}


def state_shardings(abstract_state: Any, config: ml_collections.ConfigDict, mesh) -> Any:
    """The student's parameters by config.sharding_rules; their optimizer moments and the teacher like
    them (`sharding.state_shardings`); everything else replicated."""
    student = abstract_state["student"]
    return mesh_lib.state_shardings(abstract_state, student,
                                    mesh_lib.param_shardings(student, tuple(config.sharding_rules), mesh), mesh)


def jit_step(step: Callable, shardings: Any, mesh) -> Callable:
    """jax.jit of `step` with explicit shardings: batch over all devices, state by `shardings` (donated)."""
    return jax.jit(step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))


def device_views(objective: Objective, config: ml_collections.ConfigDict, root_key: jax.Array, batch: dict) -> dict:
    """With config.data.augment_on='device': the decoded batch -> the host pipeline's batch
    (`objective.augment`), from the run's key folded with AUGMENT_STREAM and each sample's stream index
    (the same views on any device count and after a resume); otherwise the batch as it is."""
    if config.data.augment_on != "device":
        return batch
    return objective.augment(jax.random.fold_in(root_key, AUGMENT_STREAM), batch)


def make_train_step(objective: Objective, config: ml_collections.ConfigDict, tx: optax.GradientTransformation, *,
                    total_steps: int) -> Callable:
    """The pure step `step(state, batch, rng) -> (state, metrics)` of the module docstring (jit it with
    `jit_step`)."""
    momentum_at = optim_lib.cosine_schedule(objective.momentum[0], objective.momentum[1], total_steps)

    def step(state, batch, rng):
        k_views, k_student, k_teacher = jax.random.split(rng, 3)
        batch = device_views(objective, config, state["rng"], batch)
        views = objective.views(state, batch, k_views)
        teacher_out = jax.lax.stop_gradient(objective.teacher_outputs(state["teacher"], views, state, k_teacher))

        def loss_fn(params):
            return objective.loss(params, views, teacher_out, state, k_student)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["student"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["student"])
        student = optax.apply_updates(state["student"], updates)
        m = momentum_at(state["step"])
        teacher = optax.incremental_update(objective.teacher_params(student), state["teacher"], 1.0 - m)
        new_state = dict(state, student=student, teacher=teacher, opt_state=opt_state, step=state["step"] + 1)
        aux = dict(aux)
        stats = aux.pop(BATCH_STATS, None)
        if stats is not None:
            new_state["student_stats"] = stats
            new_state["teacher_stats"] = optax.incremental_update(stats, state["teacher_stats"], 1.0 - m)
        new_state.update(objective.update_state(state, teacher_out))
        hp = optim_lib.current_hyperparams(opt_state)
        metrics = {"loss": loss, **aux, "momentum": m,
                   "param_norm": optax.tree.norm(student),  # of the state this step hands on (divergence check)
                   "learning_rate": hp["learning_rate"], "weight_decay": hp["weight_decay"]}
        return new_state, metrics

    return step


def build(objective: Objective, config: ml_collections.ConfigDict, mesh, *, steps_per_epoch: int,
          total_steps: int) -> Task:
    """The optimizer (`optim.pretrain_optimizer` over the student's shapes), the state's shardings (a bad
    sharding rule fails here, before any work), the jitted step and the jitted init; nothing computed."""
    abstract_student = jax.eval_shape(lambda k: objective.init_student(k)["params"], jax.random.key(0))
    tx = optim_lib.pretrain_optimizer(abstract_student, config.optim, steps_per_epoch, total_steps=total_steps,
                                      global_batch_size=config.batch_size)
    abstract = jax.eval_shape(lambda k: init_state(objective, tx, k), jax.random.key(0))
    shardings = state_shardings(abstract, config, mesh)
    step = jit_step(make_train_step(objective, config, tx, total_steps=total_steps), shardings, mesh)
    init = jax.jit(lambda key, resources=None: init_state(objective, tx, key, resources), out_shardings=shardings)
    return Task(step, init, shardings, abstract, tx)


def abstract_batch(objective: Objective, config: ml_collections.ConfigDict, mesh) -> dict:
    """ShapeDtypeStructs (with the batch sharding) of a global batch as the pipeline hands it: decoded
    {'image': uint8 [B, S, S, 3] (S = config.data.image_size), 'index'} with augment_on='device', else the
    objective's view batch; 'label' i32 [B] either way."""
    b = config.batch_size
    if config.data.augment_on == "device":
        s = config.data.image_size
        batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8), "index": jax.ShapeDtypeStruct((b,), jnp.int32)}
    else:
        batch = dict(objective.view_batch_shapes(b))
    batch["label"] = jax.ShapeDtypeStruct((b,), jnp.int32)
    return ckpt_lib.abstract_like(batch, mesh_lib.batch_sharding(mesh))


def build_train_step(objective: Objective, config: ml_collections.ConfigDict, mesh, *, steps_per_epoch: int,
                     total_steps: int) -> tuple[Callable, tuple, Any, Callable]:
    """(step, args, shardings, init): `build`'s step with abstract arguments (state, batch, rng) carrying
    their NamedShardings, so `step.lower(*args)` needs no data and materialises nothing; `init(key)` is a
    fresh state with fresh resources from `key`."""
    task = build(objective, config, mesh, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    args = (ckpt_lib.abstract_like(task.abstract_state, task.shardings), abstract_batch(objective, config, mesh),
            jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=mesh_lib.replicated(mesh)))
    return task.step, args, task.shardings, task.init
