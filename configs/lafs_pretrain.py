"""LAFS self-supervised pretraining of Part fViT's ViT on landmark views (CVPR 2024; the official `lafs_train.py`).

Launch (WebFace4M .rec, 2 GPUs' worth of global batch as the official run):

    python main.py --config configs/lafs_pretrain.py --workdir runs/lafs_webface4m \\
        --config.data.path=/data/webface4m/train --config.data.color_order=rgb \\
        --config.lafs.landmark_path=runs/convert/part_fvit_webface4m

`lafs.landmark_path` is a variables directory of a supervised Part fViT (`python -m lafs_jax.convert
--kind part_fvit ...` of the released checkpoint, or `workdir/backbone` of our fine-tuning); its
landmark CNN is used frozen. Colour order (§4.2): the official SSL loader never swaps channels, so
on a WebFace4M .rec packed by LAFS's img2rec.py (JPEGs of channel-swapped arrays) the official run
pretrained on swapped colours, while its fine-tuning loader swaps them back. `color_order=rgb` (no
swap, the default) reproduces that run; `color_order=bgr` feeds true RGB, the colours fine-tuning
sees (`configs/finetune.py:webface4m` uses 'bgr' for that file). A true-RGB .rec (MS1MV3, any
InsightFace-packed set) is `rgb` in both stages. The "mixed views" ablation:
`--config.lafs.local_views=grid --config.data.lafs.local_scale='(0.05,0.4)'`. The official code's other
ablation switches: `--config.lafs.random_landmarks=True` (uniformly random landmarks, `random_coor`),
`--config.lafs.global_resample=True` (global views resampled at all R landmarks with replacement), and
fine-tuning on a standard grid with N(0, 3^2) px coordinate noise (`use_standcoord`):
`configs/finetune.py` with `--config.model.kind=part_fvit_grid` (`model.grid_shuffle` for its
`shuffle`; from a LAFS teacher that is Table 7 row (4): `--config.init.allow_patch_order_change=True`).

Tiny CPU demo (ORL faces from `python -m data.prepare orl --out runs/demo/data`, an untrained tiny
landmark CNN, a few hundred steps):

    python main.py --config configs/lafs_pretrain.py:tiny --workdir runs/demo/lafs_pretrain

The teacher is evaluated during pretraining by `config.evals` (empty in the recipe, so that it runs on
any data); on the demo's validation people every 35 of its 140 steps:

    python main.py --config configs/lafs_pretrain.py:tiny --workdir runs/demo/lafs_pretrain \\
        --config.evals="{'val': {'type': 'verification', 'every_steps': 35, 'nfolds': 10,
                                 'bins': ('runs/demo/data/validation.bin',)}}"

(rows `val/validation/accuracy` in WORKDIR/metrics.jsonl; the best evaluated teacher is kept as
`WORKDIR/teacher_backbone_best`).

The teacher backbone lands in `WORKDIR/teacher_backbone` (fine-tuning: `configs/finetune.py` with
`--config.init.backbone=WORKDIR/teacher_backbone`).

Expected downstream numbers (after fine-tuning; TAR@FAR=1e-4), from the official README
(the official `IJB_evaluation.py`), not re-measured here: LAFS-pretrained + fine-tuned on WebFace4M gives
IJB-B 96.28, IJB-C 97.58 (supervised Part fViT alone: IJB-B 96.05, IJB-C 97.40). The paper's
few-shot tables (supplement Tables 6-7) are not reproduced in this repository's references.
Official compute: about 2-3 days on 2 x A100-40GB for 41 epochs.
"""
import ml_collections

from lafs_jax.config import base_config
from lafs_jax.input.pipelines import data_config
from lafs_jax.methods.dino import config as dino_config
from lafs_jax.methods.lafs import config as lafs_config
from lafs_jax.models.presets import model_config
from lafs_jax.train.loop_utils import divergence_config
from lafs_jax.train.optim import optim_config

VARIANTS = ("base", "tiny")


def get_config(arg=None):
    variant = arg or "base"
    if variant not in VARIANTS:
        raise ValueError(f"configs/lafs_pretrain.py:{variant}: choose one of {list(VARIANTS)}")
    tiny = variant == "tiny"
    c = base_config()
    c.task = "pretrain"
    c.method = "lafs"  # 'lafs' (landmark views, Part fViT's TokenViT) | 'dino' (multi-crop on fViT)

    # Part fViT (official: 196 landmarks, dim 768, depth 12, 11 heads x 64, MLP 2048, dropout and
    # drop-path 0.1; DINO head 768 -> 2048 -> 2048 -> 256 -> 100000, last layer weight-normalised, g = 1).
    c.model = model_config("tiny" if tiny else "base")
    c.model.dino_head = dino_config.head_config(c.model.preset)  # the DINO objective's projection head

    # Input: LAFS views (§2.2): 2 global + 8 local (clean, colour-augmented) pairs, all 112 px crops
    # with the global scale range (0.4, 1) as the official code; normalised to [-1, 1].
    c.data = data_config("lafs", "ssl_color")
    # the views are made in the jitted step from uint8 decoded images (lafs_jax.input.device_augment,
    # Pillow-exact up to 1-2 grey levels); 'host' makes them in the Grain workers with Pillow
    c.data.augment_on = "device"
    c.data.path = "runs/demo/data/train" if tiny else ""  # .rec prefix (DIR/train for DIR/train.rec + .idx)
    c.data.prepare_command = "python -m data.prepare orl --out runs/demo/data" if tiny else ""
    if tiny:
        c.data.lafs.local_views = 4  # fewer local views keep the CPU demo fast
        c.data.workers = 0  # in-process input for the demo and tests
        c.data.read_threads = 1

    # AdamW (§2.5): peak lr 5e-4 x global batch / 256 after 10 warmup epochs, cosine to 1e-6; weight
    # decay cosine 0.04 -> 0.4 on ndim >= 2 non-bias tensors; per-tensor clip 3.0; last layer frozen
    # in epoch 0; 41 epochs.
    c.optim = optim_config("pretrain")
    if tiny:
        c.optim.epochs = 20  # ORL: 250 training images / batch 32 = 7 steps per epoch -> 140 steps
        c.optim.warmup_epochs = 2.0
        c.optim.lr = 1e-3  # x 32 / 256

    c.batch_size = 32 if tiny else 164  # global batch (official: 82 per GPU x 2 GPUs)
    c.steps_per_epoch = -1  # -1: data set size // batch_size (drop_last)
    c.total_steps = -1  # -1: optim.epochs x steps_per_epoch; the schedules span this many steps
    c.stop_at_step = -1  # stop (saving a checkpoint) at this step though the schedules go on; -1: never
    c.precision = "auto"  # compute dtype: 'auto' (bf16 on GPU/TPU, fp32 on CPU) | 'float32' | 'bfloat16'

    # DINO loss and teacher (§2.5): student temperature 0.1, teacher 0.07 -> 0.04, centre EMA 0.9, teacher
    # EMA 0.996 -> 1, the teacher in train mode (the official code never calls teacher.eval()).
    c.dino = dino_config.config(warmup_teacher_temp_epochs=2 if tiny else 30)

    # Landmark views (§2.3): the frozen landmark CNN, σ = 5 px noise, 36 local landmarks.
    c.lafs = lafs_config.config()

    # Evaluators of the teacher (a Part fViT of the frozen landmark CNN and the teacher's ViT) every N
    # steps: {name: lafs_jax.eval.evaluators.evaluator_config(type, ...)}; none by default (see above).
    c.evals = ml_collections.ConfigDict()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3  # training checkpoints kept (the latest)
    c.checkpoint.every_steps = 50 if tiny else 2000  # save every this many steps (and at the end / SIGTERM)
    c.checkpoint.async_save = True  # write checkpoints in the background
    # What stops the run as diverged (NaN / inf, or a loss or parameter norm 10x the recent median); a
    # checkpoint counts as good only once the next step's loss passed this (lafs_jax.train.loop_utils)
    c.divergence = divergence_config()

    c.log_every_steps = 10 if tiny else 100  # progress line and TensorBoard scalars every this many steps
    c.lock()
    return c
