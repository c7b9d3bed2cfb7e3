"""FaRL: CLIP image and text towers pretrained on captioned faces by ITC + MIM (CVPR 2022).

Launch (arguments `SIZE,DATA`, SIZE b16 (default) | l14 | h14, DATA laion_face (default) | tiny):

    python -m data.prepare captions --tars '/data/laion_face/*.tar' --out /data/laion_face/pairs.arrayrecord
    python main.py --config configs/farl.py:b16,laion_face --workdir runs/farl_b16 \\
        --config.data.path=/data/laion_face/pairs.arrayrecord

Tiny CPU run on the ORL training people (captions name the person), reporting in-batch retrieval
(`itc_i2t_top1` / `itc_t2i_top1` in metrics.jsonl, the first step against the last) and verification of
the held-out validation people before the first step and at the end:

    python -m data.prepare orl --out runs/demo/data
    python -m data.prepare captions --rec runs/demo/data/train --out runs/demo/data/train_captions.arrayrecord
    python main.py --config configs/farl.py:tiny --workdir runs/farl_tiny

Sources of the numbers (../shared/reference/other_seeds.md section 1):
  - CLIP ViT-B/16 towers, 224 px, QuickGELU, fp32 LayerNorm, text context 77 / vocabulary 49,408, joint
    dimension 512 [FaRL README: "load with CLIP ViT-B/16 structure"; CLIP's model.py];
  - LAION-Face 20 M pairs, 16 epochs (the paper's main checkpoint; 64 for -ep64) [FaRL README];
  - ITC over the global batch, L = ITC + MIM with equal weights, mixed precision, gradient clipping at
    norm 1.0 [paper / supplement as summarised in the reference; the clip value is the issue's];
  - MIM as BEiT: 75 of 196 patches blockwise, 8,192 visual tokens [inferred from the code's module names
    and BEiT's defaults; FaRL's MIM.LAYERS unpublished, 1 assumed];
  - NOT published in any stored source: batch size, learning rate, warmup, weight decay, betas. The values
    below are CLIP's ViT-B/16 recipe (batch 32,768 -> here 5,120, FaRL's reported per-run batch is
    unconfirmed; lr 5e-4, warmup 2,000 steps ~ 0.5 epoch, weight decay 0.2, betas (0.9, 0.98), eps 1e-6):
    treat them as a starting point, not as FaRL's.
Expected results (FaRL README, -ep16 B/16 downstream): LaPa parsing F1 93.88, CelebAMask-HQ 89.56 (with
the face-analysis heads, not part of this recipe).
"""
import ml_collections

from lafs_jax.config import base_config
from lafs_jax.eval.evaluators import evaluator_config
from lafs_jax.input.pipelines import data_config
from lafs_jax.methods.farl import config as farl_config
from lafs_jax.models.presets import model_config
from lafs_jax.sharding import FSDP_RULES
from lafs_jax.train.loop_utils import divergence_config
from lafs_jax.train.optim import optim_config

SIZES = {"b16": "clip_b16", "l14": "clip_l14", "h14": "clip_h14"}
DATA = ("laion_face", "tiny")


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    size = next((p for p in parts if p in SIZES), "b16")
    data = next((p for p in parts if p in DATA), "laion_face")
    unknown = [p for p in parts if p not in SIZES and p not in DATA]
    if unknown:
        raise ValueError(f"configs/farl.py:{arg}: unknown {unknown}; sizes {list(SIZES)}, data {list(DATA)}")
    tiny = data == "tiny"
    c = base_config()
    c.task = "pretrain"
    c.method = "farl"

    c.model = model_config("clip_tiny" if tiny else SIZES[size])
    c.farl = farl_config.config(tiny=tiny)

    c.data = data_config()
    c.data.format = "image_text"  # image-caption ArrayRecord (python -m data.prepare captions)
    c.data.normalization = "clip"  # CLIP mean / std on [0, 1] RGB
    c.data.image_size = c.model.image_size
    c.data.augment_on = "host"
    c.data.path = "runs/demo/data/train_captions.arrayrecord" if tiny else ""
    c.data.prepare_command = ("python -m data.prepare orl --out runs/demo/data && python -m data.prepare captions "
                              "--rec runs/demo/data/train --out runs/demo/data/train_captions.arrayrecord"
                              if tiny else "python -m data.prepare captions --tars 'DIR/*.tar' (or --parquet "
                              "'DIR/*.parquet' --images DIR) --out FILE")
    if tiny:
        c.data.workers = 0
        c.data.read_threads = 1

    c.optim = optim_config("pretrain")
    c.optim.name = "adamw"
    c.optim.clip_mode = "global_norm"  # FaRL: gradient clipping at global norm 1.0
    c.optim.clip_norm = 1.0
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6  # CLIP's (FaRL's unpublished)
    c.optim.weight_decay = c.optim.weight_decay_end = 0.2 if not tiny else 0.05  # CLIP's (FaRL's unpublished)
    c.optim.freeze_last_layer_epochs = 0
    if tiny:
        c.optim.epochs = 12  # 250 ORL pairs / batch 40 = 6 steps per epoch -> 72 steps
        c.optim.warmup_epochs = 1.0
        c.optim.lr = 1e-3
    else:
        c.optim.epochs = 16  # FaRL-Base-Patch16-LAIONFace20M-ep16
        c.optim.warmup_epochs = 0.5  # CLIP: 2,000 warmup steps (unpublished for FaRL)
        c.optim.lr = 5e-4  # CLIP ViT-B/16 (unpublished for FaRL)
    c.optim.min_lr = 0.0
    c.optim.lr_scaling = "none"  # lr is the peak for the recipe's batch (CLIP's is given at its batch)

    c.batch_size = 40 if tiny else 5120  # global batch (FaRL's unconfirmed)
    c.steps_per_epoch = -1
    c.total_steps = -1
    c.stop_at_step = -1
    c.precision = "auto"  # bf16 compute on GPU / TPU, fp32 parameters and losses
    c.sharding_rules = () if tiny else FSDP_RULES  # parameters and AdamW moments split over 'data' (ZeRO)

    c.evals = ml_collections.ConfigDict()
    if tiny:
        # verification of the 5 held-out validation people before the first step and at the last
        c.evals.val = evaluator_config("verification", every_steps=1000, at_start=True, nfolds=10,
                                       bins=("runs/demo/data/validation.bin",))
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3
    c.checkpoint.every_steps = 20 if tiny else 2000
    c.checkpoint.async_save = True
    c.divergence = divergence_config()
    c.log_every_steps = 10 if tiny else 100
    c.lock()
    return c
