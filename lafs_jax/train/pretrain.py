"""task 'pretrain': self-supervised pretraining of a backbone against an EMA teacher, any method.

`config.method` names the method; `lafs_jax.methods.pretraining(config.method)` gives its objective (its
views, loss, extra state, config section and validator, evaluation model and export) and
`lafs_jax.train.ssl` runs it: one jitted teacher-student step (EMA teacher, optimizer
`optim.pretrain_optimizer`), built by `ssl.build` for both `run` and `build_train_step`, so the step
the benchmarks and the ahead-of-time compiles measure is the step `run` trains. The recipes are
configs/*_pretrain.py.

`run(config, workdir)`: data (`config.data`, Grain; with `augment_on = 'device'` the pipeline hands
decoded uint8 images + stream indices and the step makes the views, keyed by the run key and each
sample's stream index), the state (fresh from `config.seed`, or resumed from the newest confirmed
checkpoint with the iterator's position), then `lafs_jax.train.loop` (checkpoints, confirmation,
SIGTERM, divergence checks, metrics). rng of step s = fold_in(state['rng'], s - 1), so a resumed run
draws the same numbers as an uninterrupted one. bf16 compute on GPU/TPU with fp32 parameters
(`config.precision`).

Evaluators (`config.evals`, lafs_jax.eval.evaluators; empty by default) embed with the teacher: the
method's evaluation model over its teacher (`objective.eval_model`, `eval_variables`), the recipe's
normalisation, colour order 'rgb'; rows `<name>/<set>/accuracy` in metrics.jsonl, and a ranking
evaluator keeps the best checkpoint.

Outputs in the workdir: checkpoints/, TensorBoard events + metrics.jsonl, and at the end
`teacher_backbone/` (`objective.export_variables` with the method's metadata + the model config,
normalisation, colour order, image size: what fine-tuning initialises from); with a ranking evaluator
also `teacher_backbone_best/` (the best evaluated step's teacher).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from lafs_jax import config as config_lib
from lafs_jax import methods
from lafs_jax import sharding as mesh_lib
from lafs_jax import variables as variables_lib
from lafs_jax.config import ConfigError, check, check_choice
from lafs_jax.eval import embed as embed_lib
from lafs_jax.eval import evaluators as evaluators_lib
from lafs_jax.input import pipelines
from lafs_jax.models import presets
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import image_text
from lafs_jax.train import loop, loop_utils
from lafs_jax.train import optim as optim_lib
from lafs_jax.train import prefetch as prefetch_lib
from lafs_jax.train import ssl

TEACHER_BACKBONE_DIR = "teacher_backbone"
BEST_TEACHER_BACKBONE_DIR = "teacher_backbone_best"
EVAL_COLOR_ORDER = "rgb"  # the colour order the evaluators feed the teacher


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first bad `config.*` field of a pretraining recipe (the method's own
    fields by its validator)."""
    config_lib.check_finite_numbers(config)
    check_choice(config, "method", tuple(methods.PRETRAINING))
    presets.validate_model_config(config.model)
    loop_utils.validate_divergence_config(config.divergence)
    pipelines.validate_data_config(config.data)
    optim_lib.validate_optim_config(config.optim)
    methods.pretraining(config.method).validate(config)
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
    check(config.checkpoint.keep >= 1, "checkpoint.keep", config.checkpoint.keep, ">= 1")
    check(config.checkpoint.every_steps >= 1, "checkpoint.every_steps", config.checkpoint.every_steps, ">= 1")
    check(isinstance(config.checkpoint.async_save, bool), "checkpoint.async_save", config.checkpoint.async_save,
          "True or False")
    evaluators_lib.validate_evals(config.evals)


def objective(config: ml_collections.ConfigDict, *, steps_per_epoch: int = 1, total_steps: int = 1) -> Any:
    """The objective of `config.method` (lafs_jax.methods.pretraining; the hooks of ssl.Objective)."""
    return methods.pretraining(config.method)(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def trainer(obj: Any) -> Any:
    """The step builder of an objective: `image_text` (one network, no teacher) for one with
    `single_network = True`, else `ssl` (teacher-student)."""
    return image_text if getattr(obj, "single_network", False) else ssl


def build_train_step(config: ml_collections.ConfigDict, mesh, *, steps_per_epoch: int,
                     total_steps: int) -> tuple[Callable, tuple, Any, Callable]:
    """(step, args, shardings, init): `run`'s jitted step (`ssl.build`: the same objective, optimizer,
    shardings, donation) with abstract arguments for `step.lower(*args)`, built without data and without
    materialising anything; `init(key)` (jitted) makes a fresh state with fresh method resources from the
    key (key = jax.random.key(config.seed) gives run's state when run starts from fresh resources too).

    args = (state, batch, rng) as ShapeDtypeStructs carrying their NamedShardings; the batch is the
    pipeline's for B = config.batch_size images (`ssl.abstract_batch`), split over every device. Used for
    ahead-of-time compilation on devices this process may not own (bench/aot.py) and by the step
    benchmarks (bench/pretrain.py).
    """
    obj = objective(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    return trainer(obj).build_train_step(obj, config, mesh, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def device_views(config: ml_collections.ConfigDict, root_key: jax.Array, batch: dict) -> dict:
    """`ssl.device_views` of `config.method`'s objective: with config.data.augment_on='device' the decoded
    batch -> the host pipeline's view batch, from the run key `root_key`; otherwise the batch as it is."""
    return ssl.device_views(objective(config), config, root_key, batch)


def save_teacher_backbone(directory: str, variables: dict, config: ml_collections.ConfigDict, step: int,
                          **extra) -> None:
    """Write `variables` (`objective.export_variables(state)`) with the method's export metadata and what
    evaluation and fine-tuning read: model config, normalisation, colour order, image size."""
    variables_lib.save_variables(directory, variables, {
        **objective(config).export_metadata(),
        "source": f"pretrain[{config.method}] teacher at step {step}", "method": config.method, "step": int(step),
        "model": variables_lib.to_json_dict(config.model),
        "normalization": config.data.normalization, "color_order": config.data.color_order,
        "image_size": config.model.image_size, **extra,
    })
    logging.info("saved the teacher backbone (step %d) to %s", step, directory)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain per `config`; returns {'step', 'loss', 'evaluations'} of the last step run by this call
    (evaluations: {evaluator name: results} of the last evaluation)."""
    validate(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    os.makedirs(workdir, exist_ok=True)

    # -- schedule ---------------------------------------------------------------------------------
    source = pipelines.make_source(config.data)
    global_batch = config.batch_size
    local_batch = mesh_lib.local_batch_size(global_batch, mesh, "config.batch_size")
    steps_per_epoch = config.steps_per_epoch if config.steps_per_epoch > 0 else len(source) // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"config.batch_size={global_batch} is larger than the data set ({len(source)} images)")
    total_steps = config.total_steps if config.total_steps > 0 else int(config.optim.epochs * steps_per_epoch)

    # -- the method, its evaluators (every input read and checked now), the step ------------------
    obj = objective(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    eval_model = obj.eval_model()
    embedder_factory = lambda batch_size: embed_lib.Embedder(  # noqa: E731
        eval_model, None, image_size=config.model.image_size, normalization=config.data.normalization,
        color_order=EVAL_COLOR_ORDER, mesh=mesh, batch_size=batch_size)
    evaluators = evaluators_lib.build_evaluators(config.evals, embedder_factory=embedder_factory,
                                                 image_size=config.model.image_size)
    task = trainer(obj).build(obj, config, mesh, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    resources = obj.load_resources(workdir)
    # global batches on the mesh, the next ones copied while a step runs; checkpointed with the state
    data_iter = prefetch_lib.device_prefetch(obj.batches(source, batch_size=local_batch, seed=config.seed), mesh,
                                             config.data.prefetch)

    meta = {"config": variables_lib.to_json_dict(config), "method": config.method,
            "model": variables_lib.to_json_dict(config.model),
            "normalization": config.data.normalization, "color_order": config.data.color_order}
    ckpt = ckpt_lib.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                      save_every=config.checkpoint.every_steps,
                                      async_save=config.checkpoint.async_save, metadata=meta,
                                      best_fn=loop.best_score if evaluators else None)
    abstract_state = ckpt_lib.abstract_like(task.abstract_state, task.shardings)  # restore targets
    resumed, restored = loop.resume(ckpt, abstract_state, data_iter)
    state = restored if resumed is not None else task.init(jax.random.key(config.seed), resources)
    start = int(state["step"])
    stop = min(total_steps, config.stop_at_step) if config.stop_at_step > 0 else total_steps
    logging.info("pretrain %s: %d steps (%d per epoch), global batch %d, %d devices, from step %d",
                 config.method, total_steps, steps_per_epoch, global_batch, mesh.devices.size, start)

    def train_step(state, batch, step: int):
        """Step `step` from `state` (whose step counter is `step` - 1)."""
        return task.step(state, batch, jax.random.fold_in(state["rng"], step - 1))

    def export(variables, step: int, kind: str) -> None:
        best = kind == "best"
        name = getattr(obj, "export_dir", TEACHER_BACKBONE_DIR)  # the objective's export folder name
        save_teacher_backbone(os.path.join(workdir, name + "_best" if best else name),
                              variables, config, step, **({"evaluation": ckpt.metrics(step)} if best else {}))

    settings = loop.LoopSettings(name=f"pretrain[{config.method}]", total_steps=total_steps, stop_step=stop,
                                 log_every_steps=config.log_every_steps, batch_size=global_batch,
                                 divergence=config.divergence, metrics_every_step=True, metric_prefix="",
                                 perf_prefix="")
    out = loop.train(state, train_step, settings, ckpt=ckpt, batches=data_iter, start=start, workdir=workdir,
                     evaluators=evaluators, eval_variables=obj.eval_variables,
                     export_variables=obj.export_variables, export=export, abstract_state=abstract_state)
    return {"step": out.step, "loss": out.last_loss, "evaluations": out.evaluations}
