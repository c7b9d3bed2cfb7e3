"""The hooks a method gives recognition fine-tuning (the margin-softmax step of lafs_jax.train.recognition).

A method's fine-tuning part is a subclass of `Hooks`, built from the config by its module's
`hooks(config) -> Hooks | None` (None: the config does not use it) and found by
`lafs_jax.methods.finetune_hooks(config)`. Every hook has a no-op default; a method overrides what it
needs. `name` keys the method's constants and step inputs in the step's arguments.

On the host, once per run:
  initialize(variables) -> (variables, note)   the method's own loading into the initial model variables
      (host arrays; note: a few words for the run's log and metadata, '' for none)
  optimizer_rules() -> {'lr_rules', 'wd_rules', 'layer0_regexes'}   added to the fine-tuning optimizer's
      rules (lafs_jax.train.optim.finetune_optimizer keywords)
  constants(variables, abstract=False) -> tree   inputs of every step that never change (e.g. a frozen
      teacher), from the initial variables; abstract: `variables` are ShapeDtypeStructs and so is the
      result (no file is read)
  describe(steps_per_epoch) -> str        a line for the log ('' = nothing to say)
On the host, every step (1-based `step`):
  step_inputs(step, steps_per_epoch) -> tree   per-step inputs (e.g. a loss weight by epoch)
  phase_at(step, steps_per_epoch) -> int | None   the phase of a method with phases (`phased`; at most one
      per config); each phase gets its own jitted step, compiled when it first runs
Inside the jitted step (traced):
  forward_kwargs(variables, batch) -> dict      extra keyword arguments of `model.apply`
  phase_loss(phase, embeddings, labels, centers, state, key, *, mesh, num_classes) -> (loss, metrics)
      the classification loss of a phase, replacing config.loss's margin softmax
  extra_loss(aux, batch, constants, inputs) -> (term | None, metrics)   a term added to the loss
  update_state(state, embeddings, batch, phase, *, mesh, num_classes) -> state   after the gradient
Extra train state (top-level entries of the train state next to 'params', checkpointed with it):
  init_state(key, num_classes, dim, mesh) -> {name: array}, state_shardings(mesh) -> {name: sharding},
  padded_rows(num_classes) -> {regex: rows} (arrays re-padded by row on a device-count change).
"""
from __future__ import annotations

from typing import Any


class Hooks:
    """No-op fine-tuning hooks; a method overrides the ones it needs (see the module docstring)."""

    name = ""
    phased = False  # True: phase_at gives the phase and phase_loss its classification loss

    def initialize(self, variables: dict) -> tuple[dict, str]:
        return variables, ""

    def optimizer_rules(self) -> dict:
        return {}

    def constants(self, variables: dict, abstract: bool = False) -> Any:
        return {}

    def describe(self, steps_per_epoch: int) -> str:
        return ""

    def step_inputs(self, step: int, steps_per_epoch: int) -> Any:
        return {}

    def phase_at(self, step: int, steps_per_epoch: int) -> int | None:
        return None

    def describe_phase(self, phase: int) -> str:
        return ""

    def forward_kwargs(self, variables: dict, batch: dict) -> dict:
        return {}

    def phase_loss(self, phase: int, embeddings: Any, labels: dict, centers: Any, state: dict, key: Any, *,
                   mesh: Any, num_classes: int) -> tuple[Any, dict]:
        # the step asks only hooks with `phased = True`, which define this
        raise TypeError(f"method {self.name!r} has no phases: phase_loss is for hooks with phased = True")

    def extra_loss(self, aux: dict, batch: dict, constants: Any, inputs: Any) -> tuple[Any, dict]:
        return None, {}

    def init_state(self, key: Any, num_classes: int, dim: int, mesh: Any) -> dict:
        return {}

    def state_shardings(self, mesh: Any) -> dict:
        return {}

    def padded_rows(self, num_classes: int) -> dict:
        return {}

    def update_state(self, state: dict, embeddings: Any, batch: dict, phase: int | None, *, mesh: Any,
                     num_classes: int) -> dict:
        return state
