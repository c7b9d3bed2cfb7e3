"""Part fViT / LAFS in recognition fine-tuning: the landmark CNN's loading, freezing, optimizer rules and
the landmark pseudo-label regulariser, as `lafs_jax.methods.recognition.Hooks`.

Active for every model family with a landmark CNN (`models.registry.Family.landmark_cnn`). Config:
  `init.landmark_cnn`       a variables directory whose landmark CNN replaces the model's (official: the
                            stage-1 supervised Part fViT's), read by `landmark_cnn.read`;
  `freeze_landmark_cnn`     landmarks from the landmark CNN in eval mode, outside the model (no gradient
                            through the sampler's positions), its parameters frozen;
  `landmark_reg.*`          (`regularizer_config`) w · mean((lm − lm*)² / (H − 1)²), lm* from a frozen
                            teacher landmark CNN in eval mode (`landmark_reg.teacher`, else a copy of the
                            initial one), w by epoch (`landmark_weight`);
  `landmark_optim.*`        (`optimizer_config`) the landmark CNN's weight decay (official 0.05 on `stn.*`,
                            its output layer `landmark_head` keeps the main decay) and layer id 0 in
                            layer-wise lr decay.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lafs_jax.config import ConfigError, check, check_choice
from lafs_jax.methods import recognition
from lafs_jax.methods.lafs import landmark_cnn as landmark_cnn_lib
from lafs_jax.models import presets
from lafs_jax.models import registry

NAME = "lafs"
SUBTREE = landmark_cnn_lib.SUBTREE  # 'landmark_cnn': the landmark CNN's key in params and batch_stats
REG_MODES = ("none", "schedule", "constant")
# The landmark CNN with its output layer: layer id 0 in layer-wise decay; what freeze_landmark_cnn freezes.
LANDMARK_REGEX = r"(?:^|/)landmark_cnn(?:/|$)"
# The tensors of landmark_optim.weight_decay: the landmark CNN except its output layer `landmark_head`
# (official: `stn.*` gets 0.05, the output layer `output_layer.*` the main 0.1).
LANDMARK_WD_REGEX = r"(?:^|/)landmark_cnn/(?!landmark_head(?:/|$))"


def regularizer_config() -> ml_collections.ConfigDict:
    """`config.landmark_reg`: w * mean(((lm - lm*) / (H - 1))^2), for models with a landmark CNN."""
    c = ml_collections.ConfigDict()
    c.mode = "none"  # 'none' (released command) | 'schedule' (official epochs) | 'constant' (beta)
    c.beta = 0.1  # constant weight of mode 'constant' (the paper's beta)
    c.boundaries = (7, 13, 20, 27)  # mode 'schedule': last epoch (0-based) of each interval
    c.weights = (1000.0, 100.0, 1.0, 0.11, 0.0)  # mode 'schedule': weight per interval
    c.teacher = ""  # variables directory of the landmark CNN giving lm* ('' = frozen copy of the initial one)
    return c


def optimizer_config() -> ml_collections.ConfigDict:
    """`config.landmark_optim`: how the fine-tuning optimizer treats the landmark CNN."""
    c = ml_collections.ConfigDict()
    # Weight decay of the landmark CNN's ndim >= 2 tensors matching weight_decay_regex (official 0.05 on
    # `stn.*`; its output layer keeps optim.weight_decay). A multiple of the weight-decay schedule:
    # needs optim.weight_decay > 0.
    c.weight_decay = 0.05
    c.weight_decay_regex = LANDMARK_WD_REGEX
    # The landmark CNN's parameters ('a/b/c' paths): layer id 0 in layer-wise lr decay, and what
    # freeze_landmark_cnn freezes.
    c.regex = LANDMARK_REGEX
    return c


def has_landmark_cnn(config: ml_collections.ConfigDict) -> bool:
    return registry.get(config.model.kind).landmark_cnn


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the key for a bad value of this method's fields (checked for every config)."""
    kind = config.model.kind
    lcnn = has_landmark_cnn(config)
    check(isinstance(config.freeze_landmark_cnn, bool), "freeze_landmark_cnn", config.freeze_landmark_cnn,
          "True or False")
    if config.freeze_landmark_cnn:
        check(lcnn, "freeze_landmark_cnn", True, f"a landmark CNN to freeze: model.kind='part_fvit' (got {kind!r})")
        check(config.landmark_reg.mode == "none", "landmark_reg.mode", config.landmark_reg.mode,
              "'none' when freeze_landmark_cnn is on (frozen landmarks need no regulariser)")
    for key, path in (("init.landmark_cnn", config.init.landmark_cnn), ("landmark_reg.teacher", config.landmark_reg.teacher)):
        check(path == "" or os.path.isdir(path), key, path, "'' or an existing variables directory")
    check(not config.init.landmark_cnn or lcnn, "init.landmark_cnn", config.init.landmark_cnn,
          f"'' for model.kind={kind!r}, which has no landmark CNN")
    reg = config.landmark_reg
    check_choice(config, "landmark_reg.mode", REG_MODES)
    if reg.mode != "none":
        check(lcnn, "landmark_reg.mode", reg.mode, f"the landmark regulariser needs model.kind='part_fvit' (got {kind!r})")
    check(reg.beta >= 0, "landmark_reg.beta", reg.beta, ">= 0")
    bounds, weights = tuple(reg.boundaries), tuple(reg.weights)
    check(len(weights) == len(bounds) + 1, "landmark_reg.weights", weights,
          f"one value per interval: len(boundaries) + 1 = {len(bounds) + 1}")
    check(all(b2 > b1 for b1, b2 in zip(bounds, bounds[1:])), "landmark_reg.boundaries", bounds, "strictly increasing")
    check(all(w >= 0 for w in weights), "landmark_reg.weights", weights, "all >= 0")
    opt = config.landmark_optim
    check(opt.weight_decay >= 0, "landmark_optim.weight_decay", opt.weight_decay, ">= 0")
    for key in ("weight_decay_regex", "regex"):
        try:
            re.compile(opt[key])
        except re.error as e:
            raise ConfigError(f"config.landmark_optim.{key}={opt[key]!r} is not a valid regex: {e}") from None
    if lcnn:
        optimizer_rules(opt, config.optim.weight_decay)


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


def optimizer_rules(section: ml_collections.ConfigDict, weight_decay: float, *, freeze: bool = False) -> dict:
    """The fine-tuning optimizer's extra rules for the landmark CNN (`optim.finetune_optimizer` keywords):
    layer id 0, weight decay section.weight_decay (as a factor of the main `weight_decay`), frozen with
    `freeze`. ConfigError when the landmark CNN's decay has no main decay to be a multiple of."""
    if section.weight_decay and not weight_decay:
        raise ConfigError(f"config.landmark_optim.weight_decay={section.weight_decay!r} needs "
                          f"config.optim.weight_decay > 0 (it is a multiple of the weight-decay schedule); "
                          f"set landmark_optim.weight_decay=0, or decay the landmark CNN with config.optim.wd_mults")
    factor = section.weight_decay / weight_decay if weight_decay else 0.0
    return {"lr_rules": [(section.regex, None)] if freeze else [],
            "wd_rules": [(section.weight_decay_regex, factor)], "layer0_regexes": [section.regex]}


class LafsHooks(recognition.Hooks):
    """The landmark CNN of a Part fViT in fine-tuning (see the module docstring)."""

    name = NAME

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.reg = config.landmark_reg
        self.use_reg = config.landmark_reg.mode != "none"
        self.frozen = bool(config.freeze_landmark_cnn)
        # the compute dtype of the task's model (config.precision); parameters fp32
        self.landmark_cnn = presets.build_landmark_cnn(presets.with_precision(config.model, config.precision))
        self.scale = float(config.model.image_size - 1)

    def initialize(self, variables):
        directory = self.config.init.landmark_cnn
        if not directory:
            return variables, ""
        params, stats = dict(variables["params"]), dict(variables.get("batch_stats", {}))
        if SUBTREE not in params:
            raise ConfigError(f"config.init.landmark_cnn is set but model.kind={self.config.model.kind!r} has no "
                              f"landmark CNN")
        target = {"params": params[SUBTREE], **({"batch_stats": stats[SUBTREE]} if SUBTREE in stats else {})}
        loaded = landmark_cnn_lib.load(directory, target, f"config.init.landmark_cnn={directory!r}")
        params[SUBTREE] = loaded["params"]
        if "batch_stats" in loaded:
            stats[SUBTREE] = loaded["batch_stats"]
        out = {**variables, "params": params}
        if stats:
            out["batch_stats"] = stats
        return out, f"landmark CNN from {directory}"

    def optimizer_rules(self):
        return optimizer_rules(self.config.landmark_optim, self.config.optim.weight_decay, freeze=self.frozen)

    def constants(self, variables, abstract=False):
        """The regulariser's teacher: {'params', 'batch_stats'} of a landmark CNN ({} without the regulariser)."""
        if not self.use_reg:
            return {}
        own = {col: variables[col][SUBTREE] for col in ("params", "batch_stats")}
        if abstract:
            return own
        if self.reg.teacher:
            return landmark_cnn_lib.load(self.reg.teacher, own, f"config.landmark_reg.teacher={self.reg.teacher!r}")
        return jax.tree.map(np.copy, own)  # host copies: the model's own arrays are donated to the step

    def step_inputs(self, step, steps_per_epoch):
        if not self.use_reg:
            return {}
        return np.float32(landmark_weight(self.reg, (step - 1) // steps_per_epoch))

    def forward_kwargs(self, variables, batch):
        if not self.frozen:
            return {}
        own = {k: v[SUBTREE] for k, v in variables.items() if SUBTREE in v}
        return {"landmarks": jax.lax.stop_gradient(self.landmark_cnn.apply(own, batch["image"], train=False))}

    def extra_loss(self, aux, batch, constants, inputs):
        if not self.use_reg:
            return None, {}
        landmarks = aux["landmarks"]
        target = jax.lax.stop_gradient(self.landmark_cnn.apply(constants, batch["image"], train=False))
        reg = jnp.mean(jnp.square((landmarks.astype(jnp.float32) - target.astype(jnp.float32)) / self.scale))
        return inputs * reg, {"landmark_loss": reg, "landmark_weight": inputs}


def hooks(config: ml_collections.ConfigDict) -> LafsHooks | None:
    """The hooks of a config whose model has a landmark CNN, else None."""
    return LafsHooks(config) if has_landmark_cnn(config) else None
