"""LVFace's curriculum in recognition fine-tuning, as `lafs_jax.methods.recognition.Hooks`.

Config: `config.curriculum`, a tuple of `lafs_jax.losses.curriculum.phase(...)` by epoch (() = off);
`optim.epochs` must be their total. Each phase's sample rate and margin replace config.loss's (W's
init and optimizer stay config.loss's), and its own jitted step runs it (the sample rate changes
shapes). The extra train state is the EPL prototype buffer `prototypes` E[C_pad, D]: random unit rows,
sharded by rows like W, re-padded like W on a device-count change, moved by EPL's rule on each step's
(detached) embeddings in the phases that update it. A phase change keeps W, every optimizer state and E.
"""
from __future__ import annotations

import ml_collections

from lafs_jax.config import check
from lafs_jax.losses import curriculum
from lafs_jax.losses import partial_fc
from lafs_jax.methods import recognition

NAME = "lvface"
STATE_KEY = "prototypes"  # E's entry in the train state


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming `config.curriculum[i].<field>`, or optim.epochs when it is not the phases' total."""
    if not config.curriculum:
        return
    curriculum.validate_phases(config.curriculum, key="curriculum")
    epochs = sum(p["epochs"] for p in config.curriculum)
    check(config.optim.epochs == epochs, "optim.epochs", config.optim.epochs,
          f"the curriculum's length: its phases last {epochs} epochs (the lr schedule spans them)")


class CurriculumHooks(recognition.Hooks):
    """Phases by epoch with their own Partial FC loss, and the EPL prototype buffer (module docstring)."""

    name = NAME
    phased = True

    def __init__(self, phases):
        self.phases = tuple(phases)

    def describe(self, steps_per_epoch):
        return "curriculum: " + "; ".join(
            f"phase {i}: epochs {p.epochs} (steps {sum(q.epochs for q in self.phases[:i]) * steps_per_epoch + 1}"
            f"..), sample rate {p.sample_rate}, prototypes {p.prototypes!r}, margin ({p.m1}, {p.m2}, {p.m3}) s={p.s}"
            for i, p in enumerate(self.phases))

    def phase_at(self, step, steps_per_epoch):
        """The phase 1-based `step` trains in (its epoch is (step - 1) // steps_per_epoch; past the end, the last)."""
        return curriculum.phase_for_epoch(self.phases, (step - 1) // steps_per_epoch)[0]

    def describe_phase(self, phase):
        return f"curriculum phase {phase}: {dict(self.phases[phase])}"

    def phase_loss(self, phase, embeddings, labels, centers, state, key, *, mesh, num_classes):
        return curriculum.phase_loss(embeddings, labels, centers, state[STATE_KEY], key, mesh=mesh,
                                     num_classes=num_classes, phase=self.phases[phase])

    def init_state(self, key, num_classes, dim, mesh):
        return {STATE_KEY: curriculum.init_prototypes(key, num_classes, dim, mesh)}

    def state_shardings(self, mesh):
        return {STATE_KEY: partial_fc.centers_sharding(mesh)}

    def padded_rows(self, num_classes):
        return {rf"(^|/){STATE_KEY}$": int(num_classes)}

    def update_state(self, state, embeddings, batch, phase, *, mesh, num_classes):
        if not self.phases[phase]["update_prototypes"]:
            return state
        return {**state, STATE_KEY: curriculum.update_prototypes(state[STATE_KEY], embeddings, batch, mesh=mesh,
                                                                 num_classes=num_classes)}


def hooks(config: ml_collections.ConfigDict) -> CurriculumHooks | None:
    """The curriculum's hooks, or None without one."""
    return CurriculumHooks(config.curriculum) if config.curriculum else None
