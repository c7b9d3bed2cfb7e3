"""FRA: region-aware BYOL pretraining of a ResNet on faces (Gao & Patras, CVPR 2024; official code
github zaczgao/Facial_Region_Awareness at 791434b, built on LEWEL).

    python main.py --config configs/fra.py:vggface2 --workdir runs/fra --config.data.path=/data/vggface2/train \\
        --config.data.format=folder
    python -m data.prepare orl --out runs/demo/data && python main.py --config configs/fra.py:tiny --workdir runs/fra_tiny

`vggface2` (the default) is the official recipe, every number from the README's pretraining command
unless named otherwise:
- data: VGGFace2 face crops (3.31 M images, image-folder layout id/*.jpg, or .rec / ArrayRecord), no labels;
  normalised with the VGGFace2 mean (0.5231, 0.4044, 0.3489) / std (0.2536, 0.2194, 0.2070) (README,
  data/transforms.py): `data.normalization = 'vggface2'`.
- views: BYOL's asymmetric pair made on the device: RandomResizedCrop 224 (area 0.2-1), flip, colour
  jitter 0.4/0.4/0.2/0.1 with p 0.8, grey p 0.2, blur p 1.0 / 0.1 (radius 0.1-2 px, Pillow's blur as the
  other SSL recipes here; BYOL/torchvision use a 23-px Gaussian kernel with sigma 0.1-2), solarise p 0 / 0.2.
- model: ResNet-50 (torchvision layout, SyncBN = global batch statistics) + the FRA neck (`config.fra`:
  hidden 4096, projection 256, Q = 8 regions, 2-layer DETR decoder, teacher / student temperature
  0.04 / 0.1, cluster weight 0.1, --lewel-loss-weight 0.5). The README's command omits `--lewel-l2-norm`,
  without which the code asserts; L2-normalised heatmaps are what runs.
- optimisation: LARS (trust coefficient 0.001, momentum 0.9), lr 0.9 at batch 512 NOT scaled by the
  batch (main.py's `args.lr = args.batch_size * args.world_size / 1024 * args.lr` is commented out:
  `optim.lr_scaling = 'none'`), weight decay 1e-6 constant, 10 linear warmup epochs then cosine to 0,
  50 epochs, no clipping; target momentum 0.996 -> 1 (cosine over all steps, --enc-m). Weight decay and
  the LARS adaptation are skipped, as main.py's `collect_params`, for parameters whose torch name holds
  'bn', 'downsample.1' or 'bias' (here the paths holding 'bn', 'downsample_1', 'bias'), so the neck's
  BatchNorm scales (`mlp_1`), the decoder's LayerNorms and the query embeddings are decayed and adapted
  (official quirk). Differences of the update rule: the official LARS puts the lr inside the momentum
  buffer and divides by ||g|| + wd ||p||; `optim` traces before the lr and divides by ||g + wd p||.
- monitoring: the official code prints LFW-pairs accuracy of the global projection every few epochs
  (`fra.eval_features = 'projection'` makes the evaluators embed z_g; default 'pooled', the exported feature);
  here `config.evals` (verification on .bin sets, pooled backbone features of the target) is empty in
  the recipe (it runs on any data): add e.g. --config.evals="{'lfw': {'type': 'verification', 'every_steps':
  5000, 'bins': ('lfw.bin',)}}". Heatmap entropy (nats, log Q = uniform) and cluster usage (exp H(mean
  student assignment) / Q; 1 = every region used) are logged every step, so a collapse shows.
- AMP (official --amp): `precision = 'auto'` (bf16 compute on GPU / TPU, fp32 parameters).

`tiny`: a quarter-width ResNet-18 (BasicBlocks 2-2-2-2, stem width 16, 128-d features) with a small neck
(hidden 256, projection 64, Q 8) on the ORL demo's 25 training people (250 images, labels unused) at
64 px, batch 32, 40 epochs = 280 steps, LARS lr 0.3; the target is evaluated on the 5 validation
people (`validation.bin`, 450 pairs, 10 folds) before the first step and at the end.
"""
import ml_collections

from lafs_jax.config import base_config
from lafs_jax.eval.evaluators import evaluator_config
from lafs_jax.input.pipelines import data_config
from lafs_jax.methods.fra import config as fra_config
from lafs_jax.models.presets import model_config
from lafs_jax.train.loop_utils import divergence_config
from lafs_jax.train.optim import optim_config

VARIANTS = ("vggface2", "tiny")
# main.py collect_params: torch names holding these skip weight decay and the LARS trust ratio
LARS_EXCLUDED = (("bn", 0.0), ("downsample_1", 0.0), ("bias", 0.0), ("", 1.0))
TINY_DATA = "runs/demo/data"


def get_config(arg=None):
    variant = arg or "vggface2"
    if variant not in VARIANTS:
        raise ValueError(f"configs/fra.py:{variant}: choose one of {list(VARIANTS)}")
    tiny = variant == "tiny"
    c = base_config()
    c.task = "pretrain"
    c.method = "fra"

    c.model = model_config("resnet18" if tiny else "resnet50")
    if tiny:
        c.model.resnet.width = 16
        c.model.dim = 16 * 8
        c.model.image_size = 64

    c.fra = fra_config.config()
    c.fra.view_size = c.model.image_size
    if tiny:
        c.fra.hidden_dim, c.fra.out_dim = 256, 64

    c.data = data_config("ssl_color")
    c.data.normalization = "vggface2"
    c.data.augment_on = "device"
    c.data.format = "rec" if tiny else "folder"
    c.data.path = f"{TINY_DATA}/train" if tiny else ""
    c.data.prepare_command = f"python -m data.prepare orl --out {TINY_DATA}" if tiny else ""
    c.data.image_size = 112
    if tiny:
        c.data.workers = 0
        c.data.read_threads = 1

    c.optim = optim_config("pretrain")
    c.optim.name = "lars"
    c.optim.epochs = 40 if tiny else 50
    c.optim.lr = 0.3 if tiny else 0.9
    c.optim.lr_scaling = "none"
    c.optim.warmup_epochs = 4.0 if tiny else 10.0
    c.optim.min_lr = 0.0
    c.optim.weight_decay = 1e-6
    c.optim.weight_decay_schedule = "constant"
    c.optim.weight_decay_end = 1e-6
    c.optim.momentum = 0.9
    c.optim.trust_coefficient = 0.001
    c.optim.clip_mode = "none"
    c.optim.freeze_last_layer_epochs = 0
    c.optim.wd_mults = LARS_EXCLUDED

    c.batch_size = 32 if tiny else 512
    c.steps_per_epoch = -1
    c.total_steps = -1
    c.stop_at_step = -1
    c.precision = "auto"

    c.evals = ml_collections.ConfigDict()
    if tiny:
        c.evals.val = evaluator_config("verification", every_steps=10_000, at_start=True,
                                       bins=(f"{TINY_DATA}/validation.bin",))

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3
    c.checkpoint.every_steps = 100 if tiny else 2000
    c.checkpoint.async_save = True
    c.divergence = divergence_config()
    c.log_every_steps = 20 if tiny else 100
    c.lock()
    return c
