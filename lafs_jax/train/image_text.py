"""The single-network step of image-text pretraining (no teacher): contrastive + masked objectives.

    task = image_text.build(objective, config, mesh, steps_per_epoch=..., total_steps=...)
    state = task.init(key, objective.load_resources(workdir));  state, metrics = task.step(state, batch, rng)

The pretrain task (`train/pretrain.py`) builds this step instead of `ssl`'s for an objective with
`single_network = True`, and runs it with the same loop (resume, SIGTERM, divergence checks,
evaluators, best checkpoint, export). One step, jitted once with explicit shardings:

    batch   = objective.augment(fold_in(state['rng'], ssl.AUGMENT_STREAM), batch)  (data.augment_on='device')
    (loss, aux), g = value_and_grad(objective.loss)(state['params'], batch, state, rng, mesh=mesh)
    params  = optimizer update of g (optim.pretrain_optimizer: config.optim; the recipes clip the global
              norm at 1.0 and use AdamW)
    metrics = {'loss', **aux, 'param_norm', 'learning_rate', 'weight_decay'}

State {'params', 'opt_state', 'step', 'rng', **objective.init_extra_state(...)}: the parameters sharded by
`config.sharding_rules` (e.g. `sharding.FSDP_RULES`), their AdamW moments like them, the rest replicated.
The objective's hooks: `init_params(key) -> {'params'}`, `loss(params, batch, state, key, *, mesh) ->
(loss, aux)`, `view_batch_shapes(B)`, `load_resources`, `init_extra_state`, and the evaluation /
export hooks of `ssl.Objective`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lafs_jax import sharding as mesh_lib
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import optim as optim_lib
from lafs_jax.train import ssl

RESERVED = ("params", "opt_state", "step", "rng")


def init_state(objective: Any, tx: optax.GradientTransformation, key: jax.Array, resources: Any = None) -> dict:
    """A fresh train state (see the module docstring)."""
    k_model, k_rng = jax.random.split(key)
    params = objective.init_params(k_model)["params"]
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": k_rng}
    extra = objective.init_extra_state(key, resources)
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ValueError(f"{objective.name}: init_extra_state returned reserved state entries {clash}")
    return {**state, **extra}


def state_shardings(abstract_state: Any, config: ml_collections.ConfigDict, mesh) -> Any:
    """The parameters by config.sharding_rules, their optimizer moments like them, the rest replicated."""
    params = abstract_state["params"]
    return mesh_lib.state_shardings(abstract_state, params,
                                    mesh_lib.param_shardings(params, tuple(config.sharding_rules), mesh), mesh)


def make_train_step(objective: Any, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                    mesh) -> Callable:
    """The pure step `step(state, batch, rng) -> (state, metrics)` of the module docstring."""

    def step(state, batch, rng):
        batch = ssl.device_views(objective, config, state["rng"], batch)

        def loss_fn(params):
            return objective.loss(params, batch, state, rng, mesh=mesh)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        hp = optim_lib.current_hyperparams(opt_state)
        metrics = {"loss": loss, **aux, "param_norm": optax.tree.norm(params),
                   "learning_rate": hp["learning_rate"], "weight_decay": hp["weight_decay"]}
        return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics

    return step


def build(objective: Any, config: ml_collections.ConfigDict, mesh, *, steps_per_epoch: int,
          total_steps: int) -> ssl.Task:
    """The optimizer over the parameters' shapes, the state's shardings, the jitted step and init."""
    abstract_params = jax.eval_shape(lambda k: objective.init_params(k)["params"], jax.random.key(0))
    tx = optim_lib.pretrain_optimizer(abstract_params, config.optim, steps_per_epoch, total_steps=total_steps,
                                      global_batch_size=config.batch_size)
    abstract = jax.eval_shape(lambda k: init_state(objective, tx, k), jax.random.key(0))
    shardings = state_shardings(abstract, config, mesh)
    step = ssl.jit_step(make_train_step(objective, config, tx, mesh), shardings, mesh)
    init = jax.jit(lambda key, resources=None: init_state(objective, tx, key, resources), out_shardings=shardings)
    return ssl.Task(step, init, shardings, abstract, tx)


def build_train_step(objective: Any, config: ml_collections.ConfigDict, mesh, *, steps_per_epoch: int,
                     total_steps: int) -> tuple[Callable, tuple, Any, Callable]:
    """(step, args, shardings, init) as `ssl.build_train_step`: abstract (state, batch, rng) with their
    NamedShardings for `step.lower(*args)` (the batch: `objective.view_batch_shapes` + 'label'; with
    data.augment_on='device' its 'image' uint8 [B, S, S, 3] of S = data.image_size and an 'index')."""
    task = build(objective, config, mesh, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    batch = dict(objective.view_batch_shapes(config.batch_size))
    if config.data.augment_on == "device":  # the view batch with decoded images + stream indices
        s = config.data.image_size
        batch.update(image=jax.ShapeDtypeStruct((config.batch_size, s, s, 3), jnp.uint8),
                     index=jax.ShapeDtypeStruct((config.batch_size,), jnp.int32))
    batch["label"] = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    args = (ckpt_lib.abstract_like(task.abstract_state, task.shardings),
            ckpt_lib.abstract_like(batch, mesh_lib.batch_sharding(mesh)),
            jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=mesh_lib.replicated(mesh)))
    return task.step, args, task.shardings, task.init
