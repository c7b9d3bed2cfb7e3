"""One process of tests/test_topology.py: runs "legs" (fine-tuning, LAFS pretraining, evaluation) in
a process whose device count (XLA_FLAGS) and process count (jax.distributed) the test chose.

    python tests/topology_worker.py SPEC.json

SPEC: {"root": repo root, "out": result file prefix, "distributed": [address, num, pid] or null,
       "legs": [{"kind": "finetune" | "pretrain" | "evaluate", "workdir": ..., ...}, ...]}
Legs run in order in this process (one device count per process); each leg's result (its
workdir's metrics.jsonl losses, and per-process batch fingerprints for fine-tuning) goes to
OUT.<process index>.json. The configs are the recipes of configs/ (finetune.py:tiny,
lafs_pretrain.py:tiny, evaluate.py) shrunk by `finetune_config` / `pretrain_config` to a 32 px,
one-block Part fViT without dropout, so a leg costs seconds.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time


import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import evaluate as evaluate_recipe  # noqa: E402
from configs import finetune as finetune_recipe  # noqa: E402
from configs import lafs_pretrain as pretrain_recipe  # noqa: E402
from lafs_jax.eval import evaluate  # noqa: E402
from lafs_jax.losses import partial_fc  # noqa: E402
from lafs_jax.train import finetune, loop_utils, pretrain  # noqa: E402

MICRO_BLOCKS = ((3, 16, 16, False, "RE", 2),)
# The ViT's MLP and attention split over 'model' (Megatron-style column / row splits).
MODEL_RULES = ((r"mlp/fc1/kernel$", (None, "model")), (r"mlp/fc1/bias$", ("model",)),
               (r"mlp/fc2/kernel$", ("model", None)), (r"attention/qkv/kernel$", (None, "model")),
               (r"attention/out/kernel$", ("model", None)))
BATCH = 16  # divisible by 8, 4, 2 and 1 devices, 8 per process with 2 processes


def _rules(rules) -> tuple:
    """Rules as tuples (they may come from JSON as lists)."""
    return tuple((pattern, spec if isinstance(spec, str) else tuple(spec)) for pattern, spec in rules)


def micro_model(m) -> None:
    """A 32 px Part fViT: 16 landmarks, a 1-block landmark trunk, ViT 32 wide, 1 block; no dropout; a
    2-layer DINO head to 64 prototypes where the config has one (pretraining)."""
    m.image_size, m.patch_size, m.num_landmarks = 32, 8, 16
    m.dim, m.depth, m.heads, m.head_dim, m.mlp_dim = 32, 1, 2, 16, 64
    m.dropout = m.emb_dropout = m.drop_path_rate = 0.0
    m.landmark.dropout = 0.0
    m.landmark.blocks, m.landmark.stem_features = MICRO_BLOCKS, 8
    if "dino_head" in m:  # the pretraining recipes' DINO head
        m.dino_head.out_dim, m.dino_head.hidden_dim, m.dino_head.bottleneck_dim = 64, 32, 16
        m.dino_head.num_layers = 2


def finetune_config(data_dir: str, *, total_steps: int = 5, sample_rate: float = 0.5, mesh=(-1, 1), rules=(),
                    bins=(), checkpoint_every: int = 1000, seed: int = 0, lr: float | None = None):
    """configs/finetune.py:tiny on the ORL data, shrunk: Partial FC with sample_rate < 1, no mixup."""
    c = finetune_recipe.get_config("tiny")
    micro_model(c.model)
    c.seed = seed
    c.data.path = os.path.join(data_dir, "train")
    c.data.image_size = 32
    c.data.finetune.randaugment = False
    c.data.finetune.mixup_prob = 0.0  # mixup pairs rows of one process's batch: off, so 1 and 2 processes agree
    c.data.prefetch = 0  # the matrix records the batches each leg reads; prefetch would read ahead of the step
    c.freeze_landmark_cnn = True  # as the demo; the landmark CNN's backward would double the step's compile time
    c.batch_size = BATCH
    c.total_steps = total_steps
    c.optim.warmup_epochs = 0.1
    if lr is not None:  # peak and floor: lr 0 trains nothing, so every evaluation scores the same
        c.optim.lr = c.optim.min_lr = lr
    c.loss.sample_rate = sample_rate
    c.log_every_steps = 1
    c.eval.bins = tuple(bins)
    c.eval.at_start = False
    c.eval.every_steps = 2
    c.eval.batch_size = 16
    c.eval.nfolds = 2
    c.checkpoint.every_steps = checkpoint_every  # and at preemption and at the end
    c.checkpoint.keep = total_steps
    c.mesh.data, c.mesh.model = mesh
    c.sharding_rules = _rules(rules)
    return c


def pretrain_config(data_dir: str, *, total_steps: int = 5, stop_at_step: int = -1, mesh=(-1, 1), rules=(),
                    checkpoint_every: int = 1000):
    """configs/lafs_pretrain.py:tiny on the ORL data, shrunk (2 global 32 px landmark views)."""
    c = pretrain_recipe.get_config("tiny")
    micro_model(c.model)
    c.data.path = os.path.join(data_dir, "train")
    c.data.lafs.view_size = 32
    c.data.lafs.local_views = 0  # the 2 global views only: one view group, half the step's compile time
    c.data.augment_on = "host"  # as the matrix was timed; device views are topology-checked in test_device_augment
    c.data.prefetch = 0  # the matrix records the batches each leg reads; prefetch would read ahead of the step
    c.lafs.num_local_landmarks = 4
    c.lafs.noise_std = 1.0
    c.batch_size = BATCH
    c.total_steps, c.stop_at_step = total_steps, stop_at_step
    c.optim.warmup_epochs = 0.1
    c.log_every_steps = 1
    c.checkpoint.every_steps = checkpoint_every
    c.checkpoint.keep = total_steps
    c.mesh.data, c.mesh.model = mesh
    c.sharding_rules = _rules(rules)
    return c


class _StopAt:
    """Stands in for loop_utils.preemption_guard's guard: reports a stop request (as SIGTERM would)
    from the `at`-th poll on, so fine-tuning saves a checkpoint at that step and returns."""

    def __init__(self, at: int):
        self.at, self.polls = at, 0

    def should_stop(self, step: int) -> bool:
        del step
        self.polls += 1
        return self.polls >= self.at


@contextlib.contextmanager
def _stop_after(steps: int | None):
    if steps is None:
        yield
        return
    real = loop_utils.preemption_guard

    @contextlib.contextmanager
    def guard():
        with real():
            yield _StopAt(steps)

    loop_utils.preemption_guard = guard
    try:
        yield
    finally:
        loop_utils.preemption_guard = real


@contextlib.contextmanager
def _record_batches(out: list):
    """Fingerprints (labels, sha1 of the images) of this process's rows of every batch fine-tuning checks."""
    real = finetune._check_batch_labels

    def check(batch, num_classes):
        out.append({"label": finetune._local_rows(batch["label"]).tolist(),
                    "image_sha1": hashlib.sha1(np.ascontiguousarray(finetune._local_rows(batch["image"])).tobytes()).hexdigest()})
        return real(batch, num_classes)

    finetune._check_batch_labels = check
    try:
        yield
    finally:
        finetune._check_batch_labels = real


def _losses(workdir: str) -> dict:
    path = os.path.join(workdir, loop_utils.METRICS_FILE)
    if jax.process_index() != 0 or not os.path.exists(path):
        return {}
    return {str(r["step"]): r["train/loss" if "train/loss" in r else "loss"]
            for r in loop_utils.read_metrics(workdir) if "train/loss" in r or "loss" in r}


def run_leg(leg: dict) -> dict:
    kind, workdir = leg["kind"], leg["workdir"]
    data = leg.get("data", "")
    if kind == "finetune":
        config = finetune_config(data, total_steps=leg.get("total_steps", 5), sample_rate=leg.get("sample_rate", 0.5),
                                 mesh=tuple(leg.get("mesh", (-1, 1))), rules=leg.get("rules", ()),
                                 bins=leg.get("bins", ()), checkpoint_every=leg.get("checkpoint_every", 1000),
                                 lr=leg.get("lr"))
        batches: list = []
        with _stop_after(leg.get("stop_after")), _record_batches(batches):
            out = finetune.run(config, workdir)
        start = len(batches)
        best = os.path.join(workdir, finetune.BEST_BACKBONE_DIR, "metadata.json")
        best_step = json.load(open(best))["step"] if os.path.isfile(best) else None
        return {"kind": kind, "step": out["step"], "preempted": out["preempted"], "losses": _losses(workdir),
                "best_step": best_step,
                "verification": out.get("verification", {}), "batches": batches, "num_batches": start}
    if kind == "pretrain":
        config = pretrain_config(data, total_steps=leg.get("total_steps", 5), stop_at_step=leg.get("stop_at_step", -1),
                                 mesh=tuple(leg.get("mesh", (-1, 1))), rules=leg.get("rules", ()),
                                 checkpoint_every=leg.get("checkpoint_every", 1000))
        out = pretrain.run(config, workdir)
        return {"kind": kind, "step": out["step"], "losses": _losses(workdir)}
    if kind == "evaluate":
        config = evaluate_recipe.get_config("tiny")
        config.evaluate.checkpoint = leg["checkpoint"]
        config.evaluate.bins = tuple(leg["bins"])
        config.evaluate.batch_size = 16
        config.evaluate.nfolds = 2
        out = evaluate.run(config, workdir)
        return {"kind": kind, "verification": out["verification"], "export": out["export"]}
    raise ValueError(f"unknown leg kind {kind!r}")


def main(spec_path: str) -> None:
    if os.environ.get("TOPOLOGY_VERBOSE"):
        from absl import logging as absl_logging
        absl_logging.set_verbosity("info")
        absl_logging.use_absl_handler()
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("distributed"):
        address, num, pid = spec["distributed"]
        jax.distributed.initialize(address, int(num), int(pid))
    results, seconds = [], [time.process_time()]
    for leg in spec["legs"]:
        results.append(run_leg(leg))
        seconds.append(time.process_time())
    with open(f"{spec['out']}.{jax.process_index()}.json", "w") as f:
        json.dump({"devices": jax.device_count(), "local_devices": jax.local_device_count(),
                   "processes": jax.process_count(), "legs": results,
                   "cpu_seconds": {"start": seconds[0], "legs": [b - a for a, b in zip(seconds, seconds[1:])]}}, f)
    if spec.get("distributed"):
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
