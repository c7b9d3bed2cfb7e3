"""The first losses of the tiny fine-tuning (with the landmark regulariser), LVFace, LAFS and DINO-face
recipes, pinned bit for bit: a change of the code's layout that moves a loss by one ulp shows here.

Each run is the recipe's own `run` on a micro model (32 px, one block) over synthetic faces, three
steps, the losses read back from metrics.jsonl. The pinned values hold under this suite's XLA flags
(tests/cpu_env.py) on 8 CPU devices; a deliberate change of the numerics updates them in the same
commit, saying why.
"""
import importlib.util
import os

import pytest

from lafs_jax.input.synthetic import write_synthetic_rec
from lafs_jax.losses import curriculum
from lafs_jax.train import finetune, loop_utils, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
STEPS = 3

# loss of steps 1..3 (repr of the float as metrics.jsonl stores it)
PINNED = {
    "finetune": [95.91592407226562, 100.40225982666016, 75.7531509399414],
    "lvface": [9.452513694763184, 8.926384925842285, 2.82222580909729],
    "lafs": [2.97219181060791, 3.180406093597412, 3.1998984813690186],
    "dino": [2.9823946952819824, 3.195885181427002, 3.199491024017334],
}


def _recipe(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(f"pinned_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.unlock()
    return config


def _micro_model(m, *, landmarks: bool):
    m.image_size, m.patch_size, m.num_landmarks = SIZE, 8, 16
    m.dim, m.depth, m.heads, m.head_dim, m.mlp_dim = 32, 1, 2, 16, 64
    if landmarks:
        m.landmark.blocks, m.landmark.stem_features = ((3, 16, 16, False, "RE", 2),), 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("pinned") / "train")
    write_synthetic_rec(prefix, num_classes=4, per_class=8, size=SIZE)
    return prefix


def _finetune_config(data: str, lvface: bool):
    if lvface:
        c = _recipe("lvface", "tiny")
        c.model.dim, c.model.depth, c.model.heads, c.model.head_dim, c.model.mlp_dim = 32, 1, 2, 16, 64
        c.model.image_size = c.data.image_size = 36
        c.model.insightface.embedding_size = 32
        c.curriculum = (curriculum.phase(epochs=1, sample_rate=0.5, margin="arcface", s=16.0),
                        curriculum.phase(epochs=1, sample_rate=1.0, prototypes="epl", margin="arcface", s=16.0))
        c.optim.epochs = 2
        c.total_steps = -1
        c.batch_size = 16  # 32 images: 2 steps per epoch, the phase changes at step 3
    else:
        c = _recipe("finetune", "tiny")
        _micro_model(c.model, landmarks=True)
        c.data.image_size = SIZE
        c.landmark_reg.mode = "schedule"
        c.total_steps = STEPS
        c.batch_size = 8
        c.optim.warmup_epochs = 0.25
    c.data.path = data
    c.eval.bins = ()
    c.eval.at_start = False
    c.log_every_steps = 1
    c.lock()
    return c


def _pretrain_config(data: str, method: str):
    c = _recipe(f"{method}_pretrain", "tiny")
    _micro_model(c.model, landmarks=method == "lafs")
    c.model.dino_head.out_dim, c.model.dino_head.hidden_dim, c.model.dino_head.bottleneck_dim = 64, 64, 32
    c.data.path = data
    c.data.image_size = SIZE
    c.data.augment_on = "device"
    if method == "lafs":  # each recipe carries its own views' section
        c.data.lafs.view_size, c.data.lafs.local_views = SIZE, 2
    else:
        c.data.dino.global_size, c.data.dino.local_size, c.data.dino.local_crops = SIZE, 16, 2
    if method == "lafs":
        c.lafs.num_local_landmarks = 4
    c.batch_size = 8
    c.total_steps = STEPS
    c.optim.warmup_epochs = 0.25
    c.dino.warmup_teacher_temp_epochs = 1
    c.log_every_steps = 1
    c.lock()
    return c


def _losses(workdir: str) -> list[float]:
    rows = loop_utils.read_metrics(workdir)
    return [float(r.get("train/loss", r.get("loss"))) for r in rows if "train/loss" in r or "loss" in r][:STEPS]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_first_losses_are_pinned(name, data, tmp_path):
    if name in ("finetune", "lvface"):
        config = _finetune_config(data, lvface=name == "lvface")
        finetune.run(config, str(tmp_path))
    else:
        config = _pretrain_config(data, name)
        pretrain.run(config, str(tmp_path))
    losses = _losses(str(tmp_path))
    assert len(losses) == STEPS
    assert losses == PINNED[name], f"{name}: first losses {losses!r}"
