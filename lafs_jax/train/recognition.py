"""The margin-softmax recognition step and its train state: one program for every recognition method.

    program = Program(config, mesh, num_classes, steps_per_epoch=..., total_steps=...)
    state = program.initial_state(variables, centers_key)          # or program.fresh_state(key), traceable
    new_state, metrics = program.step(phase)(state, constants, batch, inputs)

The step: (device augmentation of a decoded batch) -> the backbone's forward pass (train mode, dropout
key fold_in(key(seed + 1), step)) -> the classification loss, Partial FC's margin softmax over W[C_pad, D]
sharded by rows over every device (config.loss, or a method's phase loss) -> the methods' extra loss
terms -> one optimizer update of {'backbone', 'centers'} (gradient accumulation inside the optimizer)
-> the methods' extra state -> the exponential moving average of the backbone (`config.ema_decay`).
The methods are `lafs_jax.methods.recognition.Hooks` (`methods.finetune_hooks(config)`); their
`constants` and per-step `inputs` are dicts keyed by the method's name.

State: {'step', 'params': {'backbone', 'centers'}, 'batch_stats', 'opt_state', 'ema'? (ema_decay > 0),
<the methods' extra entries>}; shardings: backbone by config.sharding_rules, W and the rows of the
methods' row-sharded entries by rows, optimizer state like its params, the average like the backbone.
`Program.step(phase)` is the one jitted step (explicit shardings, state donated) that both the task
and `lafs_jax.train.finetune.build_train_step` (benchmarks, ahead-of-time compilation) use.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lafs_jax import methods
from lafs_jax import sharding as mesh_lib
from lafs_jax.input import device_augment
from lafs_jax.losses import partial_fc
from lafs_jax.models import presets
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import optim

# config.loss.centers_init -> partial_fc.init_centers arguments
CENTERS_INITS = {"xavier_uniform": {"init": "xavier_uniform"}, "normal_0.01": {"init": "normal", "std": 0.01}}
CENTERS_OPTIMIZERS = ("adamw", "sgd")  # values of config.loss.centers_optimizer
AUGMENT_STREAM = 0x5EED  # fold_in constant of the device augmentation's key (base key folded with it)
CORE_KEYS = ("step", "params", "batch_stats", "opt_state", "ema")  # state entries that are not a method's


def make_centers(config: ml_collections.ConfigDict, key: jax.Array, num_classes: int, dim: int, mesh: Any) -> jax.Array:
    """The class-centre matrix W[C_pad, dim] initialised per config.loss.centers_init, sharded by rows."""
    return partial_fc.init_centers(key, num_classes, dim, mesh, **CENTERS_INITS[config.loss.centers_init])


def embedding_dim(model: Any, variables: Any, model_config: ml_collections.ConfigDict) -> int:
    """D of the backbone's embedding (shape inference only, nothing computed)."""
    out = jax.eval_shape(lambda v: model.apply(v, presets.dummy_images(model_config, 1), train=False), variables)
    return int(out[0].shape[-1])  # (embedding, aux)


def _centers_tx(config, schedules_: dict) -> optax.GradientTransformation:
    lr = config.loss.centers_lr or schedules_["learning_rate"]
    return partial_fc.centers_optimizer(lr, kind=config.loss.centers_optimizer, momentum=config.loss.centers_momentum,
                                        weight_decay=config.loss.centers_weight_decay, b1=config.optim.b1,
                                        b2=config.optim.b2, lazy=config.loss.centers_lazy)


def make_optimizer(config: ml_collections.ConfigDict, params: Any, steps_per_epoch: int, total_steps: int,
                   hooks=None) -> optax.GradientTransformation:
    """The backbone's optimizer (config.optim: layer decay, schedules, the methods' rules; `hooks`
    default `methods.finetune_hooks(config)`) with W's optimizer inside. `steps_per_epoch` and
    `total_steps` count micro-batches; lr scaling sees the images of one update (batch x accum_steps)."""
    rules: dict = {}
    for hook in methods.finetune_hooks(config) if hooks is None else hooks:
        for key, value in hook.optimizer_rules().items():
            rules[key] = [*rules.get(key, ()), *value]
    update_batch = config.batch_size * config.optim.accum_steps
    scheds = optim.schedules(config.optim, steps_per_epoch, total_steps=total_steps, global_batch_size=update_batch)
    return optim.finetune_optimizer(params, config.optim, steps_per_epoch, centers_tx=_centers_tx(config, scheds),
                                    total_steps=total_steps, global_batch_size=update_batch, **rules)


def state_shardings(tx, params: Any, batch_stats: Any, mesh: Any, rules, ema: bool = False,
                    extra: dict | None = None) -> dict:
    """Shardings of the train state (`sharding.state_shardings`): backbone by rules, W by rows, the
    optimizer state like its params, the parameter average like the backbone, `extra` (the methods'
    entries: {key: sharding}) as given, the rest replicated."""
    p_shard = {"backbone": mesh_lib.param_shardings(params["backbone"], rules, mesh),
               "centers": partial_fc.centers_sharding(mesh)}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "batch_stats": batch_stats,
                "opt_state": jax.eval_shape(tx.init, params)}
    out = mesh_lib.state_shardings(abstract, params, p_shard, mesh)
    if ema:  # stored as 'ema/<backbone path>', which is no suffix of 'params/backbone/<path>'
        out["ema"] = p_shard["backbone"]
    out.update(extra or {})
    return out


def assemble_state(params: dict, batch_stats: Any, tx: Any, *, use_ema: bool) -> dict:
    """The core train state around `params` ({'backbone', 'centers'}): {'step': 0, 'params', 'batch_stats',
    'opt_state': tx.init(params)} and, with `use_ema`, 'ema' (a copy of the backbone). Pure."""
    state = {"step": jnp.zeros([], jnp.int32), "params": params, "batch_stats": batch_stats,
             "opt_state": tx.init(params)}
    if use_ema:
        state["ema"] = jax.tree.map(jnp.copy, params["backbone"])
    return state


def make_loss_fn(model: Any, hooks, config: ml_collections.ConfigDict, mesh: Any, num_classes: int,
                 phase: int | None = None):
    """loss_fn(params, batch_stats, extra, constants, batch, key, inputs) -> (loss, (metrics, batch_stats,
    embeddings [B, D])).

    params = {'backbone': ..., 'centers': W}; batch = {'image', 'label', 'label2', 'lam'}; extra = the
    state's method entries; constants / inputs = {method name: tree}. `hooks` None = the config's
    (`methods.finetune_hooks`). Classification: config.loss's margin softmax, or with `phase` the
    phased method's `phase_loss`; plus each method's `extra_loss`.
    """
    hooks = methods.finetune_hooks(config) if hooks is None else tuple(hooks)
    phaser = next((h for h in hooks if h.phased), None)
    if phase is not None and phaser is None:
        raise ValueError(f"make_loss_fn: phase={phase} but no method of the config has phases")
    loss_cfg = config.loss

    def loss_fn(params, batch_stats, extra, constants, batch, key, inputs):
        k_drop, k_sample = jax.random.split(key)
        variables = {"params": params["backbone"]}
        mutable = []
        if batch_stats:
            variables["batch_stats"] = batch_stats
            mutable = ["batch_stats"]
        given = {}  # keyword arguments the methods compute outside the model
        for hook in hooks:
            given.update(hook.forward_kwargs(variables, batch))
        out, new_state = model.apply(variables, batch["image"], train=True, rngs={"dropout": k_drop},
                                     mutable=mutable, **given)
        emb, aux = out  # every backbone returns (embedding, aux dict)
        labels = {k: batch[k] for k in ("label", "label2", "lam")}
        if phase is None:
            cls_loss, metrics = partial_fc.partial_fc_loss(
                emb, labels, params["centers"], k_sample, mesh=mesh, num_classes=num_classes,
                sample_rate=loss_cfg.sample_rate, m1=loss_cfg.m1, m2=loss_cfg.m2, m3=loss_cfg.m3, s=loss_cfg.s,
                fallback=loss_cfg.arcface_fallback)
        else:
            cls_loss, metrics = phaser.phase_loss(phase, emb, labels, params["centers"], extra, k_sample,
                                                  mesh=mesh, num_classes=num_classes)
        metrics = {"cls_loss": cls_loss, **{k: v for k, v in metrics.items() if k != "loss"}}
        loss = cls_loss
        for hook in hooks:
            term, more = hook.extra_loss(aux, batch, constants.get(hook.name, {}), inputs.get(hook.name, {}))
            if term is not None:
                loss = loss + term
            metrics.update(more)
        metrics["loss"] = loss
        # a module run outside the model (e.g. in eval mode) has no statistics in new_state: keep its own
        new_stats = {**batch_stats, **new_state.get("batch_stats", {})} if batch_stats else batch_stats
        return loss, (metrics, new_stats, emb)

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


def make_train_step(loss_fn, tx: optax.GradientTransformation, base_key: jax.Array, ema_decay: float = 0.0,
                    data_config: ml_collections.ConfigDict | None = None,
                    state_update: Callable[[dict, Any, dict], dict] | None = None, phase: int | None = None):
    """step(state, constants, batch, inputs) -> (state, metrics) around `make_loss_fn`'s loss_fn.

    state = {'step', 'params', 'batch_stats', 'opt_state'}, with ema_decay > 0 'ema' (the moving average
    of params['backbone'], moved once per parameter update: under gradient accumulation
    (optax.MultiSteps) only on the micro-batches where the inner optimizer stepped, with the decay of
    that update's count), and the methods' entries, which `state_update(entries, embeddings, batch)`
    moves after the gradient (kept as they are without it). With data_config.augment_on='device' the
    batch is the decoded one ({'image': uint8, 'index', 'label'}) and the step first makes the training
    images (`device_augment.finetune_images`, key = base_key folded with AUGMENT_STREAM, then each
    sample's stream index). Metrics: the loss's, 'param_norm', 'learning_rate', 'phase' (with a
    phase), 'ema_decay' (with the average)."""
    device = data_config is not None and data_config.augment_on == "device"
    augment_key = jax.random.fold_in(base_key, AUGMENT_STREAM)

    def step(state, constants, batch, inputs):
        if device:
            batch = device_augment.finetune_images(data_config, augment_key, batch)
        key = jax.random.fold_in(base_key, state["step"])
        extra = {k: v for k, v in state.items() if k not in CORE_KEYS}
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (metrics, batch_stats, emb)), grads = grad_fn(state["params"], state["batch_stats"], extra, constants,
                                                          batch, key, inputs)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["param_norm"] = optax.tree.norm(params)  # of the state this step hands on (divergence check)
        hyper = optim.current_hyperparams(opt_state)
        if "learning_rate" in hyper:
            metrics["learning_rate"] = hyper["learning_rate"]
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats, "opt_state": opt_state}
        new_state.update(state_update(extra, emb, batch) if state_update is not None else extra)
        if phase is not None:
            metrics["phase"] = jnp.float32(phase)
        if ema_decay > 0:
            updates_done = parameter_updates(opt_state, state["step"] + 1)
            stepped = updates_done != parameter_updates(state["opt_state"], state["step"])
            decay = ema_decay_at(ema_decay, updates_done)
            moved = optax.incremental_update(params["backbone"], state["ema"], 1.0 - decay)
            new_state["ema"] = jax.tree.map(lambda new, old: jnp.where(stepped, new, old), moved, state["ema"])
            metrics["ema_decay"] = decay
        return new_state, metrics

    return step


def jitted_step(program: "Program", phase: int | None):
    """The jitted step of `program` in `phase` (None: config.loss): explicit shardings, state donated.
    Every phase's step folds the step number into the same key."""
    config, mesh, hooks = program.config, program.mesh, program.hooks
    loss_fn = make_loss_fn(program.model, hooks, config, mesh, program.num_classes, phase=phase)
    update = None
    if program.stateful:
        def update(extra, emb, batch):
            for hook in hooks:
                extra = hook.update_state(extra, emb, batch, phase, mesh=mesh, num_classes=program.num_classes)
            return extra
    replicated = mesh_lib.replicated(mesh)
    return jax.jit(make_train_step(loss_fn, program.tx, jax.random.key(config.seed + 1), config.ema_decay,
                                   config.data, state_update=update, phase=phase),
                   in_shardings=(program.shardings, replicated, mesh_lib.batch_sharding(mesh), replicated),
                   out_shardings=(program.shardings, replicated), donate_argnums=(0,))


class Program:
    """What a fine-tuning run and `build_train_step` share for one config, mesh and class count: the
    model, the active methods, the optimizer, the state's shardings and the jitted steps (one per
    phase, built on first use by `jitted_step`)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Any, num_classes: int, *, steps_per_epoch: int,
                 total_steps: int, hooks=None):
        self.config, self.mesh, self.num_classes = config, mesh, int(num_classes)
        self.model_config = presets.with_precision(config.model, config.precision)  # compute dtype; params fp32
        self.model = presets.build_model(self.model_config)
        self.hooks = methods.finetune_hooks(config) if hooks is None else tuple(hooks)
        self.phaser = next((h for h in self.hooks if h.phased), None)
        self.abstract_variables = presets.abstract_variables(self.model_config)
        self.emb_dim = embedding_dim(self.model, self.abstract_variables, self.model_config)
        params = {"backbone": self.abstract_variables["params"],
                  "centers": jax.ShapeDtypeStruct((partial_fc.padded_rows(num_classes, mesh), self.emb_dim),
                                                  jnp.float32)}
        self.tx = make_optimizer(config, params, steps_per_epoch, total_steps, self.hooks)
        self.use_ema = config.ema_decay > 0
        extra: dict = {}
        self.padded_rows = partial_fc.padded_rows_rule(num_classes)  # W and its moments re-padded on restore
        for hook in self.hooks:
            extra.update(hook.state_shardings(mesh))
            self.padded_rows.update(hook.padded_rows(num_classes))
        self.stateful = bool(extra)
        self.shardings = state_shardings(self.tx, params, self.abstract_variables.get("batch_stats", {}), mesh,
                                         config.sharding_rules, ema=self.use_ema, extra=extra)
        self._steps: dict = {}

    def step(self, phase: int | None):
        """The jitted step of `phase` (`phase_at`), built once."""
        if phase not in self._steps:
            self._steps[phase] = jitted_step(self, phase)
        return self._steps[phase]

    def phase_at(self, step: int, steps_per_epoch: int) -> int | None:
        return self.phaser.phase_at(step, steps_per_epoch) if self.phaser is not None else None

    def step_inputs(self, step: int, steps_per_epoch: int) -> dict:
        return {hook.name: hook.step_inputs(step, steps_per_epoch) for hook in self.hooks}

    def constants(self, variables: dict | None = None) -> dict:
        """The methods' constants from the initial variables (host arrays); None: their abstract shapes."""
        if variables is None:
            return {hook.name: hook.constants(self.abstract_variables, abstract=True) for hook in self.hooks}
        return {hook.name: hook.constants(variables) for hook in self.hooks}

    def _extra_state(self, centers_key: jax.Array) -> dict:
        key = jax.random.fold_in(centers_key, 1)  # every method's entries start from this key
        extra: dict = {}
        for hook in self.hooks:
            extra.update(hook.init_state(key, self.num_classes, self.emb_dim, self.mesh))
        return extra

    def initial_state(self, variables: dict, centers_key: jax.Array) -> dict:
        """The state on the mesh around the initial model variables (host arrays) and a fresh W."""
        params = {"backbone": variables["params"],
                  "centers": make_centers(self.config, centers_key, self.num_classes, self.emb_dim, self.mesh)}
        core = {k: v for k, v in self.shardings.items() if k in CORE_KEYS}
        state = jax.jit(functools.partial(assemble_state, tx=self.tx, use_ema=self.use_ema),
                        out_shardings=core)(params, variables.get("batch_stats", {}))
        return {**state, **self._extra_state(centers_key)}

    def fresh_state(self, key: jax.Array) -> dict:
        """The state of a run from scratch with key(seed) = `key` (traceable; jit it with `shardings`)."""
        init_key, centers_key = jax.random.split(key)
        v = presets.init_variables(self.model_config, init_key)
        params = {"backbone": v["params"],
                  "centers": make_centers(self.config, centers_key, self.num_classes, self.emb_dim, self.mesh)}
        state = assemble_state(params, v.get("batch_stats", {}), self.tx, use_ema=self.use_ema)
        return {**state, **self._extra_state(centers_key)}

    def abstract_args(self, steps_per_epoch: int) -> tuple:
        """(state, constants, batch, inputs) as ShapeDtypeStructs with their NamedShardings: the batch
        of config.batch_size split over every device (the decoded one with augment_on='device')."""
        config, mesh = self.config, self.mesh
        replicated = mesh_lib.replicated(mesh)
        state = jax.eval_shape(self.fresh_state, jax.random.key(0))
        b, size = config.batch_size, config.model.image_size
        i32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        if config.data.augment_on == "device":  # decoded images of config.data.image_size px
            s = config.data.image_size
            batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8), "index": i32((b,)), "label": i32((b,))}
        else:
            batch = {"image": jax.ShapeDtypeStruct((b, size, size, config.model.channels), jnp.float32),
                     "label": i32((b,)), "label2": i32((b,)), "lam": jax.ShapeDtypeStruct((b,), jnp.float32)}
        return (ckpt_lib.abstract_like(state, self.shardings), ckpt_lib.abstract_like(self.constants(), replicated),
                ckpt_lib.abstract_like(batch, mesh_lib.batch_sharding(mesh)),
                ckpt_lib.abstract_like(self.step_inputs(1, steps_per_epoch), replicated))
