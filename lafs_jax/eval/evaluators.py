"""Evaluators by name: what a training loop runs every N steps, configured as `config.evals`.

`config.evals` is a ConfigDict {name: ConfigDict(type=..., every_steps=int, at_start=bool, <the type's
fields>)}; `evaluator_config(type, **overrides)` gives a type's every field with its default.
`build_evaluators(evals, embedder_factory=..., image_size=...)` validates the section and loads and
checks every input at start-up (ConfigError naming `config.evals.<name>.<key>`), so a bad input fails
before training. Each `Evaluator` has `run(variables) -> results`, `scalars(results)` (flat metrics,
keys without the evaluator's name), `score(results)` (ranks checkpoints, higher is better; None = does
not rank), `checkpoint_metrics(results)` and `report(results)` (Markdown). Types are registered by name
(`register`); 'verification' (`.bin` pair sets) and 'ijb' (IJB-B / IJB-C 1:1, optionally 1:N) are here.
"""
from __future__ import annotations

import abc

import os
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from lafs_jax.config import ConfigError, check
from lafs_jax.eval import ijb, roc, verification
from lafs_jax.input.verification_bin import VerificationBinError, load_bin

_REGISTRY: dict[str, type] = {}


class EvaluationError(RuntimeError):
    """An evaluation during training failed; its step's checkpoint was saved (and confirmed) first."""


def register(type_name: str) -> Callable[[type], type]:
    """Class decorator: make an Evaluator subclass buildable as `type=type_name`; a name registered
    twice is a ValueError."""

    def add(cls: type) -> type:
        if type_name in _REGISTRY:
            raise ValueError(f"evaluator type {type_name!r} is already registered (by {_REGISTRY[type_name].__name__})")
        if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
            raise ValueError(f"register({type_name!r}): {cls!r} is not an Evaluator subclass")
        _REGISTRY[type_name] = cls
        return cls

    return add


def names() -> tuple[str, ...]:
    """The registered evaluator types, sorted."""
    return tuple(sorted(_REGISTRY))


class Evaluator(abc.ABC):
    """One configured evaluation. Subclasses set their fields in `default_config`, check them in
    `validate` (config only, nothing read) and load and check their inputs in `__init__`. `ranks`:
    whether its `score` can pick the best checkpoint."""

    ranks = False

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """Every field of the type with its default (`type` is added by `evaluator_config`)."""
        c = ml_collections.ConfigDict()
        c.every_steps = 5000  # evaluate every this many training steps
        c.at_start = False  # also evaluate the initial model (step 0)
        return c

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict, key: str) -> None:
        """ConfigError naming `config.<key>.<field>` for a bad type field (`key` = 'evals.<name>')."""

    def __init__(self, name: str, config: ml_collections.ConfigDict, *, embedder_factory: Callable[[int], Any],
                 image_size: int, key: str):
        self.name, self.config, self.key = name, config, key
        self.every_steps, self.at_start = int(config.every_steps), bool(config.at_start)

    @abc.abstractmethod
    def run(self, variables: Any) -> dict:
        """Full results of the evaluation of `variables` (host values)."""

    @abc.abstractmethod
    def scalars(self, results: dict) -> dict[str, float]:
        """Flat metrics to log, keys without the evaluator's name."""

    def score(self, results: dict) -> float | None:
        """What ranks checkpoints (higher is better); None: this evaluator does not rank."""
        return None

    def checkpoint_metrics(self, results: dict) -> dict[str, float]:
        """Metrics stored with a checkpoint; default the scalars."""
        return self.scalars(results)

    def report(self, results: dict) -> str:
        """Markdown for the log; default a table of the scalars."""
        rows = ["| metric | value |", "|---|---|"]
        rows += [f"| {k} | {v:.6g} |" for k, v in self.scalars(results).items()]
        return "\n".join(rows)


def evaluator_config(type_name: str, **overrides) -> ml_collections.ConfigDict:
    """ConfigDict of every field of `type_name` with its default, `type` set and `overrides` applied
    (an override of a field the type does not have is a ValueError listing the fields)."""
    if type_name not in _REGISTRY:
        raise ValueError(f"evaluator type {type_name!r} is not registered; choose one of {list(names())}")
    c = ml_collections.ConfigDict()
    c.type = type_name  # evaluator type, one of evaluators.names()
    c.update(_REGISTRY[type_name].default_config())
    for k, v in overrides.items():
        if k not in c or k == "type":
            raise ValueError(f"evaluator type {type_name!r} has no field {k!r}; its fields: {sorted(c.keys())}")
        c[k] = v
    return c


def _resolved(evals: ml_collections.ConfigDict, name: str, prefix: str) -> ml_collections.ConfigDict:
    """The entry `name` over its type's defaults (fields left out take them); ConfigError naming the
    key for a non-dict entry, an unknown type, an unknown field, or a bad every_steps / at_start."""
    key = f"{prefix}.{name}"
    entry = evals[name]
    check(isinstance(entry, (ml_collections.ConfigDict, Mapping)), key, entry,
          "a ConfigDict(type=..., every_steps=..., ...) (evaluators.evaluator_config)")
    type_name = entry.get("type", None)
    check(isinstance(type_name, str) and type_name in _REGISTRY, f"{key}.type", type_name,
          f"choose one of the registered types {list(names())}")
    fields = evaluator_config(type_name).to_dict()
    for k in entry.keys():
        check(k in fields, f"{key}.{k}", entry[k], f"a field of type {type_name!r}; its fields: {sorted(fields)}")
    # built from plain values, so a value of another type reaches the checks below (not ConfigDict's TypeError)
    config = ml_collections.ConfigDict({**fields, **{k: entry[k] for k in entry.keys()}})
    check(_is_int(config.every_steps, 1), f"{key}.every_steps", config.every_steps, "an int >= 1")
    check(isinstance(config.at_start, bool), f"{key}.at_start", config.at_start, "True or False")
    _REGISTRY[type_name].validate(config, key)
    return config


def validate_evals(evals: ml_collections.ConfigDict, prefix: str = "evals") -> None:
    """ConfigError naming `config.<prefix>.<name>.<key>` for the first bad entry of `evals`: an unknown
    type (the message lists the registered ones), every_steps not an int >= 1, a bad type field.
    Checks the config and that named files exist; the inputs are read by `build_evaluators`."""
    check(isinstance(evals, (ml_collections.ConfigDict, Mapping)), prefix, evals, "a ConfigDict {name: evaluator config}")
    for name in evals.keys():
        _resolved(evals, name, prefix)


def build_evaluators(evals: ml_collections.ConfigDict, *, embedder_factory: Callable[[int], Any],
                     image_size: int = 0, prefix: str = "evals") -> list[Evaluator]:
    """The evaluators of `evals`, in its order, every input loaded and checked now.

    `embedder_factory(batch_size)` returns an object with `.embed(images uint8 [N, H, W, 3] RGB, flip=bool,
    variables=...) -> [N, D]` (an `embed.Embedder` built without variables); `image_size` is the side the
    model takes (0: the embedder's `image_size` attribute). Raises ConfigError naming the key.
    """
    check(isinstance(evals, (ml_collections.ConfigDict, Mapping)), prefix, evals, "a ConfigDict {name: evaluator config}")
    resolved = {name: _resolved(evals, name, prefix) for name in evals.keys()}
    return [_REGISTRY[c.type](name, c, embedder_factory=embedder_factory, image_size=int(image_size),
                              key=f"{prefix}.{name}") for name, c in resolved.items()]


def _is_int(x: Any, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _model_image_size(embedder: Any, image_size: int) -> int:
    """The side the model takes: `image_size` when given, else the embedder's (0 when it has none)."""
    return int(image_size) if image_size else int(getattr(embedder, "image_size", 0) or 0)


def set_name(path: str) -> str:
    """The name of a `.bin` pair set: its file name without the extension."""
    return os.path.splitext(os.path.basename(path))[0]


# ----------------------------------------------------------------------------------------------------
# .bin verification


@register("verification")
class VerificationEvaluator(Evaluator):
    """10-fold accuracy and TAR@FAR on `.bin` pair sets (`verification.evaluate_pairs_embeddings`);
    results {set name: evaluate dict}; ranks checkpoints by the mean accuracy over the sets."""

    ranks = True

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.bins = ()  # .bin pair set files (LFW, CFP-FP, AgeDB-30); a set is named by its file name
        c.batch_size = 64  # images per device call (the Embedder rounds it up to the device count)
        c.flip = True  # embedding of image + mirrored image ("Accuracy-Flip")
        c.nfolds = 10  # folds of the accuracy protocol; every set needs at least this many pairs
        c.image_size = 0  # side the .bin images are decoded at; 0 = the model's
        return c

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict, key: str) -> None:
        bins = config.bins
        check(isinstance(bins, (tuple, list)) and len(bins) >= 1, f"{key}.bins", bins,
              "a non-empty tuple of .bin files")
        seen: dict[str, int] = {}
        for i, path in enumerate(bins):
            check(isinstance(path, str) and os.path.isfile(path), f"{key}.bins[{i}]", path, "an existing .bin file")
            j = seen.setdefault(set_name(path), i)
            check(j == i, f"{key}.bins[{i}]", path,
                  f"a set name of its own; {key}.bins[{j}] is also named {set_name(path)!r}")
        check(_is_int(config.nfolds, 2), f"{key}.nfolds", config.nfolds, "an int >= 2")
        check(_is_int(config.batch_size, 1), f"{key}.batch_size", config.batch_size, "an int >= 1")
        check(isinstance(config.flip, bool), f"{key}.flip", config.flip, "True or False")
        check(_is_int(config.image_size, 0), f"{key}.image_size", config.image_size, "an int >= 0 (0 = the model's)")

    def __init__(self, name, config, *, embedder_factory, image_size, key):
        super().__init__(name, config, embedder_factory=embedder_factory, image_size=image_size, key=key)
        self.embedder = embedder_factory(config.batch_size)
        model_size = _model_image_size(self.embedder, image_size)
        size = config.image_size or model_size
        check(size >= 1, f"{key}.image_size", config.image_size,
              "the side to decode the .bin images at (0 needs build_evaluators(image_size=...) or an embedder "
              "with an image_size)")
        check(not model_size or size == model_size, f"{key}.image_size", config.image_size,
              f"0 or the model's image size {model_size}")
        self.image_size = size
        self.sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i, path in enumerate(config.bins):
            try:
                images, issame = load_bin(path, size)
            except (VerificationBinError, OSError) as e:
                raise ConfigError(f"config.{key}.bins[{i}]={path!r} is not valid: {e}") from e
            check(len(issame) >= config.nfolds, f"{key}.bins[{i}]", path,
                  f"a .bin with at least config.{key}.nfolds={config.nfolds} pairs for the {config.nfolds}-fold "
                  f"protocol; it holds {len(issame)}")
            self.sets[set_name(path)] = (images, issame)

    def run(self, variables: Any) -> dict[str, dict]:
        out = {}
        for name, (images, issame) in self.sets.items():
            emb = self.embedder.embed(images, flip=self.config.flip, variables=variables)
            out[name] = verification.evaluate_pairs_embeddings(emb, issame, nfolds=self.config.nfolds)
        return out

    def scalars(self, results: dict[str, dict]) -> dict[str, float]:
        return {f"{name}/{k}": float(r[k]) for name, r in results.items()
                for k in ("accuracy", "accuracy_std", "best_threshold")}

    def checkpoint_metrics(self, results: dict[str, dict]) -> dict[str, float]:
        """{'accuracy': mean over the sets, '<set>/accuracy': ..., '<set>/best_threshold': the squared-L2
        distance threshold of the best accuracy (what `python -m lafs_jax.compare` reads)}."""
        accuracies = {f"{name}/accuracy": float(r["accuracy"]) for name, r in results.items()}
        thresholds = {f"{name}/best_threshold": float(r["best_threshold"]) for name, r in results.items()}
        return {"accuracy": float(np.mean(list(accuracies.values()))), **accuracies, **thresholds}

    def score(self, results: dict[str, dict]) -> float:
        """The mean 10-fold accuracy over the sets."""
        return self.checkpoint_metrics(results)["accuracy"]

    def report(self, results: dict[str, dict]) -> str:
        return roc.markdown_table(results, verification.DEFAULT_FARS)


# ----------------------------------------------------------------------------------------------------
# IJB-B / IJB-C


def ijb_target_root(root: str, target: str) -> str:
    """The folder holding `target`'s meta/ and loose_crop/: ROOT/<TARGET> when it has a meta/ folder
    (ROOT = InsightFace's IJB_release), else ROOT itself."""
    nested = os.path.join(root, target.upper())
    return nested if os.path.isdir(os.path.join(nested, "meta")) else root


@register("ijb")
class IJBEvaluator(Evaluator):
    """IJB 1:1 template verification (`ijb.evaluate_target`, the official N1D1 protocol) of each
    target, and with `identification` the 1:N search; results {target: evaluate_target dict}; ranks
    checkpoints by the mean over the targets of the TAR at `score_far` (1e-4: the IJB-B/C headline that
    ArcFace, Partial FC, LAFS and LVFace report; at 1e-6 the threshold rests on the top 8 of IJB-B's 8.0 M
    impostor pairs, 16 of IJB-C's 15.6 M: too few to rank checkpoints by)."""

    ranks = True

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()
        c.every_steps = 20000  # evaluate every this many training steps (IJB-C embeds 469k images)
        c.root = ""  # folder with meta/ and loose_crop/, or IJB_release holding IJBB/ and IJBC/ such folders
        c.targets = ("IJBC",)  # 'IJBB' and / or 'IJBC'
        c.batch_size = 64  # aligned crops per embedding call
        c.flip = True  # sum of the image's and its mirror's features (the official flip test, F1)
        c.identification = False  # also the 1:N search (needs meta/{t}_1N_*.csv)
        c.workers = 0  # Grain worker processes decoding and aligning the images (0 = in this process)
        c.score_far = 1e-4  # the FAR whose TAR (mean over the targets) ranks checkpoints; one of ijb.FARS
        return c

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict, key: str) -> None:
        check(isinstance(config.root, str) and config.root != "" and os.path.isdir(config.root), f"{key}.root",
              config.root, "an existing IJB folder (meta/ and loose_crop/, or IJBB/ and IJBC/ holding them)")
        targets = config.targets
        check(isinstance(targets, (tuple, list)) and len(targets) >= 1, f"{key}.targets", targets,
              f"a non-empty tuple of {sorted(ijb.TARGETS)}")
        for i, t in enumerate(targets):
            check(isinstance(t, str) and t.upper() in ijb.TARGETS, f"{key}.targets[{i}]", t,
                  f"one of {sorted(ijb.TARGETS)}")
        check(len({t.upper() for t in targets}) == len(targets), f"{key}.targets", targets, "no target twice")
        check(_is_int(config.batch_size, 1), f"{key}.batch_size", config.batch_size, "an int >= 1")
        check(_is_int(config.workers, 0), f"{key}.workers", config.workers, "an int >= 0")
        for k in ("flip", "identification"):
            check(isinstance(config[k], bool), f"{key}.{k}", config[k], "True or False")
        check(isinstance(config.score_far, float) and config.score_far in ijb.FARS, f"{key}.score_far",
              config.score_far, f"one of {ijb.FARS}")

    def __init__(self, name, config, *, embedder_factory, image_size, key):
        super().__init__(name, config, embedder_factory=embedder_factory, image_size=image_size, key=key)
        self.targets = tuple(t.upper() for t in config.targets)
        self.roots = {}
        for t in self.targets:
            root = ijb_target_root(config.root, t)
            files = dict(ijb.meta_paths(root, t))
            if config.identification:
                files.update({f"1:N {k}": p for k, p in ijb.identification_paths(root, t).items()})
            images = files.pop("images")
            missing = [p for p in files.values() if not os.path.isfile(p)]
            if not os.path.isdir(images):
                missing.append(images + "/")
            check(not missing, f"{key}.root", config.root, f"a folder with {t}'s protocol files; missing: {missing}")
            self.roots[t] = root
        self.embedder = embedder_factory(config.batch_size)
        model_size = _model_image_size(self.embedder, image_size)
        check(model_size in (0, ijb.ALIGNED_SIZE), f"{key}.type", config.type,
              f"a model fed {ijb.ALIGNED_SIZE}x{ijb.ALIGNED_SIZE} images (the IJB crops are aligned at that "
              f"size); this one takes {model_size}x{model_size}")

    def run(self, variables: Any) -> dict[str, dict]:
        def embed_batch(images, flip):
            return self.embedder.embed(images, flip=flip, variables=variables)

        return {t: ijb.evaluate_target(embed_batch, self.roots[t], t, batch_size=self.config.batch_size,
                                       use_flip_test=self.config.flip, workers=self.config.workers,
                                       identification=self.config.identification)
                for t in self.targets}

    def scalars(self, results: dict[str, dict]) -> dict[str, float]:
        out = {}
        for t, r in results.items():
            out.update({f"{t}/tar@far={far:g}": float(v) for far, v in r["tar_at_far"].items() if v is not None})
            if "identification" in r:
                mean = r["identification"]["mean"]
                out.update({f"{t}/rank-{k}": float(v) for k, v in mean["rank"].items() if v is not None})
                out.update({f"{t}/tpir@fpir={f:g}": float(v) for f, v in mean["tpir_at_fpir"].items() if v is not None})
        return out

    def score(self, results: dict[str, dict]) -> float | None:
        """Mean over the targets of the TAR at config.score_far; None when a target has no value there."""
        tars = [r["tar_at_far"].get(self.config.score_far) for r in results.values()]
        if not tars or any(t is None for t in tars):
            return None
        return float(np.mean(tars))

    def report(self, results: dict[str, dict]) -> str:
        text = roc.markdown_table(results, ijb.FARS, name="target")
        for t, r in results.items():
            if "identification" in r:
                text += f"\n\n{t} 1:N identification (%)\n\n" + ijb.identification_table(r["identification"])
        return text
