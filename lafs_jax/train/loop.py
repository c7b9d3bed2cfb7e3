"""The training loop every task runs once its state exists: resume, step, check, evaluate, save, export.

    start, state = loop.resume(ckpt, abstract_state, data_iterator, padded_rows=..., init=...)
    result = loop.train(state, program, LoopSettings(...), ckpt=ckpt, batches=it, ...)

What a task gets from it, whatever its method:
- **Resume**: the newest confirmed checkpoint that restores, onto this run's mesh (W and other row-padded
  arrays re-padded by `padded_rows`), with the Grain iterator's position.
- **Crash safety**: a checkpoint counts once the next step's loss passed the divergence checks
  (`TrainCheckpointer.confirm`; the last one and a SIGTERM one are confirmed by one extra step whose
  result is dropped); on `DivergenceError` the unconfirmed checkpoints are deleted and the error names
  the confirmed one. SIGTERM (or JAX's preemption sync point with several processes) saves and returns.
- **Metrics**: TensorBoard + metrics.jsonl, a progress line with img/s and ETA; the policy of which
  steps are written is the task's (`LoopSettings.metrics_every_step`, `metric_prefix`).
- **Evaluators** (`lafs_jax.eval.evaluators`) every `every_steps` and at the last step (and before the
  first step with `at_start`); an evaluated step is checkpointed with its ranking evaluator's metrics,
  and the best one is kept beside the latest; an evaluation error is raised only once its step's
  checkpoint is confirmed.
- **Export** at the end: `export(variables, step, kind)` with kind 'final' and, when an evaluator
  ranks checkpoints, 'best' (restored onto this mesh from whatever device count wrote it).

The step is the task's: `program.step(state, batch, step) -> (state, metrics)`, metrics with 'loss'
(and 'param_norm' for the parameter check); `step` is the 1-based number of the step it computes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from absl import logging

from lafs_jax.eval import evaluators as evaluators_lib
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import loop_utils

SCORE_KEY = "score"  # the ranking evaluator's score in a checkpoint's saved metrics


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How one run loops. `total_steps`: the schedule's length (the progress line and the export
    count against it); `stop_step`: where this call stops (<= total_steps; export only at
    total_steps). `metrics_every_step`: write every step's metrics (device values gathered lazily, at
    the log, save and confirmation steps) instead of the logged steps' only."""
    name: str
    total_steps: int
    stop_step: int
    log_every_steps: int
    batch_size: int
    divergence: Any  # config.divergence (loop_utils.divergence_config)
    metrics_every_step: bool = False
    metric_prefix: str = "train/"
    perf_prefix: str = "perf/"


@dataclasses.dataclass
class LoopResult:
    step: int
    preempted: bool
    final_metrics: dict  # host floats of the last step run
    last_loss: float
    evaluations: dict  # {evaluator name: results} of the last evaluation
    initial_evaluations: dict  # {evaluator name: results} before the first step (at_start)


def best_score(metrics: dict) -> float:
    """What ranks checkpoints: the score the ranking evaluator saved with them (older checkpoints of
    fine-tuning saved the mean verification accuracy as 'accuracy')."""
    return float(metrics[SCORE_KEY] if SCORE_KEY in metrics else metrics["accuracy"])


def ranking_evaluator(evaluators: Sequence[evaluators_lib.Evaluator]) -> evaluators_lib.Evaluator | None:
    """The evaluator whose score picks the best checkpoint: the first one that scores."""
    return next((ev for ev in evaluators if ev.ranks), None)


def resume(ckpt: ckpt_lib.TrainCheckpointer, abstract_state: Any, data_iterator: Any,
           padded_rows: dict | None = None) -> tuple[int | None, Any]:
    """(step, state) of the newest confirmed checkpoint that restores onto `abstract_state`'s
    shardings, the data iterator set to its position; (None, None) for a fresh run. Closes the
    checkpointer when restoring fails."""
    try:
        step, state = ckpt.resume(abstract_state, data_iterator=data_iterator, padded_rows=padded_rows)
    except BaseException:
        ckpt.close()
        raise
    if step is not None:
        logging.info("resumed from step %d (%s)", int(step), ckpt.directory)
    return step, state


def _host(metrics: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def train(state: Any, step_fn: Callable[[Any, Any, int], tuple[Any, dict]], settings: LoopSettings, *,
          ckpt: ckpt_lib.TrainCheckpointer, batches: Iterator, start: int, workdir: str,
          evaluators: Sequence[evaluators_lib.Evaluator] = (),
          eval_variables: Callable[[Any], Any] | None = None,
          export_variables: Callable[[Any], Any] | None = None,
          export: Callable[[Any, int, str], None] | None = None,
          abstract_state: Any = None, padded_rows: dict | None = None) -> LoopResult:
    """Train from `state` (at step `start`) to `settings.stop_step`; see the module docstring.

    eval_variables(state) -> what the evaluators embed with; export_variables(state) -> what `export`
    writes (both on the mesh; gathered to the host for export). `abstract_state` / `padded_rows`
    restore the best checkpoint for its export. Closes `ckpt` and the metric writer."""
    s = settings
    writer = loop_utils.MetricWriter(workdir, resume_step=start)
    progress = loop_utils.Progress(s.total_steps, every=s.log_every_steps, batch_size=s.batch_size,
                                   start_step=start, name=s.name)
    monitor = loop_utils.DivergenceMonitor(s.divergence)
    ranker = ranking_evaluator(evaluators)
    pending: list[tuple[int, dict]] = []  # device metrics not yet checked / written (metrics_every_step)
    unconfirmed: int | None = None  # the newest checkpoint's step, until step + 1's loss confirms it
    eval_error: evaluators_lib.EvaluationError | None = None  # raised once its step's checkpoint is confirmed
    results: dict = {}
    initial: dict = {}
    metrics: dict = {}
    last_loss = float("nan")

    def check(step: int, host: dict) -> float:
        """Divergence checks of one step; its good loss confirms the checkpoint of step - 1."""
        nonlocal unconfirmed
        loss = monitor.check_loss(step, host)
        if unconfirmed is not None and step == unconfirmed + 1:
            ckpt.confirm(unconfirmed, checked_at_step=step, loss=loss)
            unconfirmed = None
        monitor.check_params(step, host)
        return loss

    def flush(rates: dict | None = None) -> None:
        """Check and write every pending step's metrics (metrics_every_step)."""
        nonlocal last_loss
        for i, (step, m) in enumerate(pending):
            host = _host(m)
            check(step, host)
            extra = rates if (rates and i == len(pending) - 1) else {}
            writer.write_scalars(step, {**{s.metric_prefix + k: v for k, v in host.items()}, **extra})
            last_loss = host["loss"]
        pending.clear()

    def run_step(state, step: int):
        return step_fn(state, loop_utils.next_batch(batches), step)

    def due(ev, step: int) -> bool:
        return ev.at_start if step == 0 else (step % ev.every_steps == 0 or step == s.total_steps)

    def evaluate(state, step: int) -> dict:
        variables = eval_variables(state)
        out = {}
        for ev in evaluators:
            if due(ev, step):
                out[ev.name] = r = ev.run(variables)
                writer.write_scalars(step, {f"{ev.name}/{k}": v for k, v in ev.scalars(r).items()})
                logging.info("step %d, %s:\n%s", step, ev.name, ev.report(r))
        return out

    def confirm_by_one_more_step(state, step: int) -> None:
        """Run step `step` + 1 (result dropped, the state donated) to check the loss that confirms
        checkpoint `step`: how the last checkpoint and a SIGTERM one get confirmed."""
        _, extra = run_step(state, step + 1)
        ckpt.confirm(step, checked_at_step=step + 1, loss=monitor.check_loss(step + 1, _host({"loss": extra["loss"]})))

    output = None
    step = start
    try:
        if start == 0 and any(ev.at_start for ev in evaluators):
            initial = evaluate(state, 0)
        with loop_utils.preemption_guard() as guard:
            while step < s.stop_step:
                state, metrics = run_step(state, step + 1)
                step += 1
                if s.metrics_every_step:
                    pending.append((step, metrics))
                if step == start + 1:
                    if s.metrics_every_step:
                        flush()  # its time includes compilation: excluded from the rates
                    progress.reset(step)
                rates = progress.update(step, {"loss": metrics["loss"]})
                logged = rates is not None
                evaluating = any(due(ev, step) for ev in evaluators)
                preempted = guard.should_stop(step)
                saving = ckpt.should_save(step) or step == s.stop_step or evaluating or preempted
                if logged or saving or unconfirmed is not None:
                    if s.metrics_every_step:
                        flush({s.perf_prefix + k: v for k, v in (rates or {}).items()})
                    else:
                        host = _host(metrics)
                        last_loss = check(step, host)
                        if logged:
                            writer.write_scalars(step, {**{s.metric_prefix + k: v for k, v in host.items()},
                                                        **{s.perf_prefix + k: v for k, v in rates.items()}})
                if eval_error is not None:
                    raise eval_error
                step_results = None
                if evaluating:
                    try:
                        step_results = evaluate(state, step)
                    except Exception as e:  # pylint: disable=broad-except  (re-raised after the confirmation)
                        eval_error = evaluators_lib.EvaluationError(
                            f"evaluation at step {step} failed ({type(e).__name__}: {e}); the step's checkpoint "
                            f"{ckpt.directory / str(step)} is kept: fix the cause and relaunch to resume from it")
                        eval_error.__cause__ = e
                        logging.error("%s", eval_error)
                    else:
                        results = {**results, **step_results}
                # saved after the evaluation so it carries its metrics (the best checkpoint is kept)
                saved_metrics = None
                if ranker is not None and step_results and ranker.name in step_results:
                    r = step_results[ranker.name]
                    score = ranker.score(r)
                    if score is not None:
                        saved_metrics = {**ranker.checkpoint_metrics(r), SCORE_KEY: float(score)}
                if saving and ckpt.save(step, state, data_iterator=batches, force=True, metrics=saved_metrics):
                    unconfirmed = step
                if preempted:
                    if s.metrics_every_step and pending:
                        flush()
                    final = _host(metrics)
                    if unconfirmed is not None:
                        confirm_by_one_more_step(state, step)
                    if eval_error is not None:
                        raise eval_error
                    logging.warning("preempted (SIGTERM) at step %d: saved to %s; the run resumes from here",
                                    step, ckpt.directory)
                    ckpt.wait()
                    return LoopResult(step, True, final, last_loss, results, initial)
            if pending:
                flush()
            final = _host(metrics) if metrics else {}
            if step >= s.total_steps and export is not None:
                output = jax.device_get(export_variables(state))
            if unconfirmed is not None:  # the last checkpoint: confirmed before anything is written from it
                confirm_by_one_more_step(state, unconfirmed)
        if eval_error is not None:
            raise eval_error
        ckpt.wait()
        if output is not None:
            best = ckpt.best_step()
            if best is not None:
                best_output = output if best == step else jax.device_get(
                    export_variables(ckpt.restore(best, abstract_state, padded_rows=padded_rows)))
                export(best_output, best, "best")
            export(output, step, "final")
    except loop_utils.DivergenceError as e:
        raise ckpt.after_divergence(e) from None
    finally:
        ckpt.close()
        writer.close()
    return LoopResult(step, False, final, last_loss, results, initial)
