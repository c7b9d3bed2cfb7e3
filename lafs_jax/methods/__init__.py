"""Methods: one folder per paper, each a set of hooks on the shared tasks (lafs_jax/train).

A method supplies what is its own -- its views, its loss terms, its extra state, its config section and
validator, its export -- and gets the loop's resume, topology changes, crash safety, evaluators and
ahead-of-time compilation for free. Methods import models/, losses/, input/ and the floor, never train/
or eval/ (tests/test_layout.py checks it). The two registries below are how the tasks find them:

- `PRETRAINING`: config.method -> the objective class of task 'pretrain' (the hooks of
  lafs_jax.train.ssl's teacher-student step): `cls.validate(config)`, `cls(config, *, steps_per_epoch,
  total_steps)`.
- `FINETUNING`: the modules of task 'finetune' (hooks of lafs_jax.train.recognition's margin-softmax
  step), each with `validate(config)` (run on every fine-tuning config) and `hooks(config) -> Hooks | None`
  (None when the config does not turn the method on).
"""
from lafs_jax.config import ConfigError
from lafs_jax.methods import recognition
from lafs_jax.methods.dino import objective as dino_objective
from lafs_jax.methods.farl import objective as farl_objective
from lafs_jax.methods.fra import objective as fra_objective
from lafs_jax.methods.lafs import finetune as lafs_finetune
from lafs_jax.methods.lafs import objective as lafs_objective
from lafs_jax.methods.lvface import finetune as lvface_finetune

PRETRAINING = {"dino": dino_objective.Objective, "lafs": lafs_objective.Objective, "fra": fra_objective.Objective,
               "farl": farl_objective.Objective}  # farl: single network, train/image_text's step
FINETUNING = (lafs_finetune, lvface_finetune)


def pretraining(method: str) -> type:
    """The objective class of pretraining method `method`; ConfigError naming config.method otherwise."""
    if method not in PRETRAINING:
        raise ConfigError(f"config.method={method!r} is not valid; choose one of {sorted(PRETRAINING)}")
    return PRETRAINING[method]


def validate_finetune(config) -> None:
    """Every fine-tuning method's checks of its own config fields (ConfigError naming the key)."""
    for module in FINETUNING:
        module.validate(config)


def finetune_hooks(config) -> tuple[recognition.Hooks, ...]:
    """The fine-tuning hooks `config` turns on, in FINETUNING's order (at most one with phases)."""
    hooks = tuple(h for module in FINETUNING if (h := module.hooks(config)) is not None)
    phased = [h.name for h in hooks if h.phased]
    if len(phased) > 1:
        raise ConfigError(f"config: the methods {phased} each define training phases; use one of them")
    return hooks
