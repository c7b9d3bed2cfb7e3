"""DINO-face: DINO self-supervised pretraining of a plain fViT with standard multi-crop on faces.

The LAFS paper's DINO-face baseline. Its official script is unreleased; the
only official evidence is `DataAugmentationDINO` and the argparse defaults of LAFS's lafs_train.py,
which this recipe follows field by field: 2 global 112 px crops (scale 0.4-1) and 8 local 48 px crops
at scale (0.05, 0.4) (`data.dino.local_scale`), bicubic, flip, DINO's colour augmentations, and
torchvision's ImageNet mean/std normalisation (`data.normalization='imagenet'`); teacher temperature
0.07 -> 0.04 over the first 30 epochs (`dino.warmup_teacher_temp`, `dino.teacher_temp`,
`dino.warmup_teacher_temp_epochs`, the argparse defaults; DINO's own boost recipe is 0.04 -> 0.07);
the teacher left in train mode (`dino.teacher_train_mode`: lafs_train.py never calls teacher.eval(),
so dropout / drop-path stay on); LAFS's optimisation recipe (§2.5). The backbone is an fViT (grid
patches: 196 tokens per global crop, 36 per local crop, which use the first 37 position rows).

Launch:

    python main.py --config configs/dino_pretrain.py --workdir runs/dino_face \\
        --config.data.path=/data/ms1mv3/train

Tiny CPU demo on the ORL faces (`python -m data.prepare orl --out runs/demo/data`):

    python main.py --config configs/dino_pretrain.py:tiny --workdir runs/demo/dino_pretrain

The teacher is evaluated during pretraining by `config.evals` (empty in the recipe, so that it runs on
any data); on the demo's validation people every 35 of its 140 steps:

    python main.py --config configs/dino_pretrain.py:tiny --workdir runs/demo/dino_pretrain \\
        --config.evals="{'val': {'type': 'verification', 'every_steps': 35, 'nfolds': 10,
                                 'bins': ('runs/demo/data/validation.bin',)}}"

(rows `val/validation/accuracy` in WORKDIR/metrics.jsonl; the best evaluated teacher is kept as
`WORKDIR/teacher_backbone_best`).

The teacher backbone lands in `WORKDIR/teacher_backbone` (fine-tune with model.kind='fvit'; its
metadata records the grid patch order and the ImageNet normalisation).

Expected numbers: none published for the released code; the official README lists only a DINO-face
1-shot checkpoint (not in the official repository). LAFS's own numbers are in configs/lafs_pretrain.py.
"""
import ml_collections

from lafs_jax.config import base_config
from lafs_jax.input.pipelines import data_config
from lafs_jax.methods.dino import config as dino_config
from lafs_jax.models.presets import model_config
from lafs_jax.train.loop_utils import divergence_config
from lafs_jax.train.optim import optim_config

VARIANTS = ("base", "tiny")


def get_config(arg=None):
    variant = arg or "base"
    if variant not in VARIANTS:
        raise ValueError(f"configs/dino_pretrain.py:{variant}: choose one of {list(VARIANTS)}")
    tiny = variant == "tiny"
    c = base_config()
    c.task = "pretrain"
    c.method = "dino"  # 'dino' (multi-crop on fViT) | 'lafs' (landmark views, see configs/lafs_pretrain.py)

    # fViT with Part fViT's ViT (dim 768, depth 12, 11 x 64, MLP 2048) on grid patches; DINO head to 100000.
    c.model = model_config("tiny" if tiny else "base")
    c.model.kind = "fvit"
    c.model.dino_head = dino_config.head_config(c.model.preset)  # the DINO objective's projection head

    # DINO multi-crop as DataAugmentationDINO: 2 x 112 px global (0.4-1) + 8 x 48 px local (0.05-0.4)
    c.data = data_config("dino", "ssl_color")
    c.data.dino.local_scale = (0.05, 0.4)  # lafs_train.py --local_crops_scale (DINO: 0.05-0.4)
    c.data.normalization = "imagenet"  # DataAugmentationDINO: Normalize(ImageNet mean, std); LAFS views: [-1,1]
    # the views are made in the jitted step from uint8 decoded images (lafs_jax.input.device_augment,
    # Pillow-exact up to 1-2 grey levels); 'host' makes them in the Grain workers with Pillow
    c.data.augment_on = "device"
    c.data.path = "runs/demo/data/train" if tiny else ""  # .rec prefix (DIR/train for DIR/train.rec + .idx)
    c.data.prepare_command = "python -m data.prepare orl --out runs/demo/data" if tiny else ""
    if tiny:
        c.data.dino.local_crops = 4  # fewer local crops keep the CPU demo fast
        c.data.workers = 0  # in-process input for the demo and tests
        c.data.read_threads = 1

    # AdamW as LAFS (§2.5): peak lr 5e-4 x batch / 256 after 10 warmup epochs, cosine to 1e-6; weight
    # decay cosine 0.04 -> 0.4; per-tensor clip 3.0; last layer frozen in epoch 0; 41 epochs.
    c.optim = optim_config("pretrain")
    if tiny:
        c.optim.epochs = 20  # ORL: 250 training images / batch 32 = 7 steps per epoch -> 140 steps
        c.optim.warmup_epochs = 2.0
        c.optim.lr = 1e-3  # x 32 / 256

    c.batch_size = 32 if tiny else 164  # global batch
    c.steps_per_epoch = -1  # -1: data set size // batch_size (drop_last)
    c.total_steps = -1  # -1: optim.epochs x steps_per_epoch; the schedules span this many steps
    c.stop_at_step = -1  # stop (saving a checkpoint) at this step though the schedules go on; -1: never
    c.precision = "auto"  # compute dtype: 'auto' (bf16 on GPU/TPU, fp32 on CPU) | 'float32' | 'bfloat16'

    # DINO loss and teacher: lafs_train.py's argparse defaults (student temperature 0.1, teacher 0.07 -> 0.04
    # over 30 epochs, centre EMA 0.9, teacher EMA 0.996 -> 1, the teacher in train mode)
    c.dino = dino_config.config(warmup_teacher_temp_epochs=2 if tiny else 30)

    # Evaluators of the teacher (an fViT over the teacher's ViT) every N steps: {name:
    # lafs_jax.eval.evaluators.evaluator_config(type, ...)}; none by default (see the docstring).
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
