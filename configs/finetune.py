"""Supervised fine-tuning of Part fViT (or fViT) with a Partial FC CosFace head (LAFS stage 2, the official `train_largescale.py`).

Variants (the `:arg` after the file name): `webface4m` (default), `ms1mv3`, `official` (WebFace4M as
the official script runs it, see "Layer-wise lr decay" below), `tiny`. The large ones take subset
suffixes, composed in this order (`config.data.subset`, lafs_jax/input/subsets.py):
`,1shot` `,2shot` `,4shot` `,10shot` (k-shot: each identity's first k images in data set order),
then `,1pct` `,10pct` (partition: the first 1 % / 10 % of the remaining images in data set order, the
official `FaceDataset(partition=...)`), e.g. `configs/finetune.py:webface4m,1shot,1pct`. The official
README's "1% with 1-shot" is its released 1-shot .rec (filtered by the authors in a way they did not
publish) read with partition 0.01: with that .rec as data.path use `,1pct` alone; the k-shot suffixes
make a deterministic k-shot set from the full data. The suffix `,random` switches to seeded random
draws instead: k random images per identity and a random 1 % / 10 % of the *identities*
(`subset.k_draw='random'`, `subset.identity_fraction`). Without suffixes the whole set is used.
Classifier: one row per identity left in the subset (labels remapped); the official code kept
NUM_CLASS = 205,990 rows whatever the subset (rows of absent identities only ever act as negatives).

LAFS on WebFace4M (the teacher of `configs/lafs_pretrain.py`, the landmark CNN of a supervised Part
fViT converted with `python -m lafs_jax.convert`), on one host with 8 GPUs:

    python main.py --config configs/finetune.py:webface4m --workdir runs/ft_wf4m \
        --config.data.path=/data/webface4m/train \
        --config.init.backbone=runs/lafs_webface4m/teacher_backbone \
        --config.init.landmark_cnn=runs/convert/part_fvit_webface4m \
        --config.eval.bins="('/data/ms1m-retinaface-t1/lfw.bin','/data/ms1m-retinaface-t1/cfp_fp.bin','/data/ms1m-retinaface-t1/agedb_30.bin')"
    python main.py --config configs/evaluate.py:full --workdir runs/ft_wf4m --config.evaluate.ijbc_root=...

Expected numbers (TAR@FAR=1e-4, %, from the official LAFS README, the official `IJB_evaluation.py`; not
reproduced here): LAFS-pretrained + fine-tuned on WebFace4M: IJB-B 96.28, IJB-C 97.58; Part fViT
trained on WebFace4M: IJB-B 96.05, IJB-C 97.40; on MS1MV3: IJB-C 97.29.

Tiny CPU demo on the ORL faces (`python -m data.prepare orl --out runs/demo/data` first), from scratch
or from the tiny pretraining run's teacher (`--config.init.backbone=runs/demo/lafs_pretrain/teacher_backbone`):

    python main.py --config configs/finetune.py:tiny --workdir runs/finetune_tiny
    python main.py --config configs/evaluate.py --workdir runs/finetune_tiny

It trains a 231k-parameter Part fViT for 90 steps (about 11 epochs of the 250 ORL training images) and logs 10-fold
verification accuracy on the 900 held-out ORL pairs before and after training; expect the accuracy
to rise above the untrained model's (measured values: bench/RESULTS.md, "Fine-tuning").

Layer-wise lr decay: `webface4m` / `ms1mv3` fine-tune a *pretrained* backbone (init.backbone set)
with layer_decay 0.58 *applied*, the paper's setting. `official` reproduces the official script,
which computes 0.58's lr scales but never applies them (layer_decay 1.0). Training from scratch
(init.backbone = '': the stage-1 supervised Part fViT, the from-scratch baselines, `tiny`) must use
1.0: a layer_decay < 1 without a pretrained backbone is a config error (the landmark CNN and the
patch embedding would train at 0.58^13 = 8.4e-4 x the lr) unless
`optim.allow_layer_decay_from_scratch=True`; add `--config.optim.layer_decay=1.0` to the large
variants for a from-scratch run, `--config.optim.layer_decay=0.58` to `tiny` when it starts from a
pretraining teacher.

Official settings kept here: CosFace s=64, m=0.4 over all classes (sample_rate 1.0: the official
head is a full softmax), class centres xavier-uniform; AdamW (wd 0.1, landmark CNN 0.05), 34 epochs,
5 warmup epochs, cosine to 1e-6, batch 400 x 3 accumulation = 1200 images per update, peak lr
2.29e-3; RandAugment M1 / mixup p=0.1 for WebFace4M, M2 / p=0.2 for MS1MV3. The landmark regulariser is off
as in the released command (`landmark_reg.mode='schedule'` is the official 1000/100/1/0.11/0 epoch
schedule, `'constant'` with beta=0.1 is the paper's description).
Not known: the LAFS supplement's epoch counts for the 1%/10%/k-shot subsets were not available when
this file was written; the subset variants keep 34 epochs -- set `--config.optim.epochs` yourself.
"""
import ml_collections

from lafs_jax.config import base_config
from lafs_jax.input.pipelines import data_config
from lafs_jax.methods.lafs import finetune as lafs_finetune
from lafs_jax.models.presets import model_config
from lafs_jax.train.loop_utils import divergence_config
from lafs_jax.train.optim import optim_config

DEMO_DATA = "runs/demo/data"  # where `python -m data.prepare orl --out runs/demo/data` writes
DATASETS = ("webface4m", "ms1mv3", "official", "tiny")
KSHOT = {"1shot": 1, "2shot": 2, "4shot": 4, "10shot": 10}  # subset suffix -> data.subset.k
PERCENT = {"1pct": 0.01, "10pct": 0.1}  # subset suffix -> data.subset.partition (identity_fraction with 'random')
SUBSETS = (*KSHOT, *PERCENT, "random")


def subset_fields(suffixes: list[str], where: str) -> dict:
    """data.subset fields of the variant's suffixes (k-shot, percentage, 'random'; each at most once)."""
    unknown = [s for s in suffixes if s not in SUBSETS]
    if unknown or len(set(suffixes)) != len(suffixes):
        raise ValueError(f"configs/finetune.py:{where}: unknown subset {unknown[0] if unknown else suffixes!r}; "
                         f"choose from {list(SUBSETS)}, each at most once")
    ks = [KSHOT[s] for s in suffixes if s in KSHOT]
    pct = [PERCENT[s] for s in suffixes if s in PERCENT]
    if len(ks) > 1 or len(pct) > 1:
        raise ValueError(f"configs/finetune.py:{where}: unknown subset {suffixes!r}: one k-shot and one percentage at most")
    random = "random" in suffixes
    fraction = pct[0] if pct else 1.0
    return {"k": ks[0] if ks else 0, "k_draw": "random" if random else "first",
            "partition": 1.0 if random else fraction, "identity_fraction": fraction if random else 1.0}


def get_config(arg=None):
    dataset, *suffixes = (arg or "webface4m").split(",")
    if dataset not in DATASETS:
        raise ValueError(f"configs/finetune.py: unknown data set {dataset!r}; choose one of {DATASETS}")
    if dataset == "tiny" and suffixes:
        raise ValueError(f"configs/finetune.py:{arg}: unknown subset {suffixes[0]!r}: the tiny variant takes none")
    subset = subset_fields(suffixes, arg)
    tiny = dataset == "tiny"
    official = dataset == "official"
    webface = dataset in ("webface4m", "official")

    c = base_config()
    c.task = "finetune"
    c.model = model_config("tiny" if tiny else "base")  # Part fViT; model.kind='fvit' for grid patches

    c.data = data_config("finetune")
    c.data.path = f"{DEMO_DATA}/train" if tiny else ""  # .rec prefix of the training set
    c.data.prepare_command = f"python -m data.prepare orl --out {DEMO_DATA}" if tiny else ""
    # WebFace4M as packed by LAFS's img2rec.py stores swapped channels, which the official loader swaps
    # back ('bgr'); an InsightFace-packed WebFace .rec is true RGB: use 'rgb'. MS1MV3 is true RGB.
    c.data.color_order = "bgr" if webface else "rgb"
    c.data.normalization = "[-1,1]"  # x/255*2-1, the official fine-tuning loop
    c.data.workers = 0 if tiny else 8  # Grain worker processes
    c.data.finetune.randaugment_magnitude = 2.0 if dataset == "ms1mv3" else 1.0  # LAFS README: M2 MS1MV3, M1 WebFace4M
    c.data.finetune.mixup_prob = 0.2 if dataset == "ms1mv3" else 0.1  # LAFS README: 0.2 MS1MV3, 0.1 WebFace4M
    c.data.subset.update(subset)  # '' / ',1shot' / ',1shot,1pct' / ',1pct,random' (see the docstring)

    c.optim = optim_config("finetune")
    c.optim.accum_steps = 1 if tiny else 3  # official: 3 micro-batches per AdamW update
    # 0.58 (paper) for a pretrained backbone; 1.0 from scratch (tiny's default) and for `official`,
    # whose script never applies its lr scales (see the docstring)
    c.optim.layer_decay = 1.0 if (tiny or official) else 0.58
    if tiny:
        c.optim.epochs = 9  # 300 ORL images / 32 = 9 steps per epoch -> 81 steps (total_steps overrides: 90)
        c.optim.warmup_epochs = 1.0
        c.optim.lr = 5e-3

    c.batch_size = 32 if tiny else 400  # global images per step (micro-batch); x accum_steps per update
    c.total_steps = 90 if tiny else -1  # -1 = optim.epochs x (training images // batch_size)
    c.precision = "auto"  # compute dtype: 'auto' (bf16 on GPU/TPU, fp32 on CPU) | 'float32' | 'bfloat16'
    c.log_every_steps = 10 if tiny else 100  # train metrics, progress line with img/s and ETA
    # Exponential moving average of the backbone's parameters (BatchNorm statistics are the live
    # model's). 0 = off, as the official code; otherwise the decay at update t is
    # min(ema_decay, (1 + t) / (10 + t)), and verification and WORKDIR/backbone use the average.
    c.ema_decay = 0.0

    c.init = ml_collections.ConfigDict()
    # Variables directory to start from ('' = random init): a LAFS / DINO pretraining teacher
    # (WORKDIR/teacher_backbone, a TokenViT), lafs_jax.convert's output of an official checkpoint, or
    # a fine-tuning run's WORKDIR/backbone.
    c.init.backbone = ""
    c.init.kind = "auto"  # 'auto' | 'token_vit' (load into the model's 'vit') | 'backbone' (whole model)
    # init.backbone's metadata records the patch layout its patch embedding learnt ('landmarks' (x, y, c)
    # from LAFS / Part fViT, 'grid' (row, col, c) from DINO-face / fViT); a different layout than the
    # model feeds is an error unless True (the paper's Table 7 row (4), "landmark to standard grid").
    c.init.allow_patch_order_change = False
    # Variables directory whose landmark CNN (params + BatchNorm statistics) replaces the model's;
    # official: the stage-1 supervised Part fViT ('' = keep what init.backbone / random init gave).
    c.init.landmark_cnn = ""
    # Keep the landmark CNN as initialised (e.g. stage 1's) and train the rest: landmarks from its
    # eval mode (running BatchNorm statistics, no dropout), no gradient through the sampler's positions,
    # no update. Off in the official recipe (the ViT's loss trains the landmarks); the CPU demo uses
    # it, as a step then costs about half as much there (171 -> 90-96 ms; README, "The demo").
    c.freeze_landmark_cnn = False

    c.loss = ml_collections.ConfigDict()  # Partial FC margin softmax: s*(cos(m1*theta + m2) - m3)
    c.loss.m1 = 1.0  # multiplicative angular margin (SphereFace); 1 = none
    c.loss.m2 = 0.0  # additive angular margin (ArcFace 0.5)
    c.loss.m3 = 0.2 if tiny else 0.4  # additive cosine margin (CosFace, official 0.4; 0.2 trains the tiny demo faster)
    c.loss.s = 32.0 if tiny else 64.0  # logit scale (official 64; 32 for the 25-class tiny demo)
    # Where m1*theta + m2 passes pi the ArcFace logit stops falling: 'th_mm' (InsightFace's ArcFace,
    # easy_margin=False: c - m2*sin(m2) where c <= cos(pi - m2)) | 'easy' (easy_margin=True: no margin
    # where c <= 0, m3 included) | 'none'. 'th_mm' changes nothing when m2 = 0 (CosFace).
    c.loss.arcface_fallback = "th_mm"
    c.loss.sample_rate = 1.0  # fraction of classes per step (Partial FC); 1.0 = full softmax as official
    # Init of W: 'xavier_uniform' (official CosFace weight: U(-a, a), a = sqrt(6 / (C + D)); std 0.0031
    # at 205,990 x 768) | 'normal_0.01' (InsightFace Partial FC: N(0, 0.01^2))
    c.loss.centers_init = "xavier_uniform"
    c.loss.centers_optimizer = "adamw"  # optimizer of W: 'adamw' (official: same AdamW) | 'sgd' (momentum)
    c.loss.centers_lr = 0.0  # peak lr of W; 0 = follow the backbone's warmup + cosine schedule
    c.loss.centers_weight_decay = 0.1  # weight decay of W (official 0.1 for loss.weight)
    c.loss.centers_momentum = 0.9  # momentum of 'sgd'
    c.loss.centers_lazy = True  # rows not sampled this step keep their values and optimizer state

    # LVFace's loss curriculum (lafs_jax.methods.lvface, configs/lvface.py): a tuple of
    # curriculum.phase(epochs=, sample_rate=, prototypes=, prototype_k=, m1/m2/m3/s/fallback=, ...) by
    # epoch; each phase's sample rate and margin replace loss.sample_rate / m1 / m2 / m3 / s /
    # arcface_fallback (W's init and optimizer stay loss.*). () = no curriculum: one phase of loss.*.
    c.curriculum = ()

    # Part fViT's landmark CNN (lafs_jax.methods.lafs.finetune; unused by models without one): the
    # pseudo-label regulariser w * mean(((lm - lm*)/(H-1))^2), off in the released command, and the
    # optimizer's rules (weight decay 0.05 except its output layer, layer id 0 in layer-wise decay).
    c.landmark_reg = lafs_finetune.regularizer_config()
    c.landmark_optim = lafs_finetune.optimizer_config()

    c.eval = ml_collections.ConfigDict()  # verification during training
    c.eval.bins = (f"{DEMO_DATA}/validation.bin",) if tiny else ()  # .bin pair sets (LFW, CFP-FP, AgeDB-30)
    c.eval.every_steps = 30 if tiny else 5000  # and at the last step
    c.eval.at_start = tiny  # also evaluate the initial model (step 0)
    c.eval.batch_size = 64 if tiny else 512  # images per device call
    c.eval.flip = True  # embedding of image + mirrored image
    c.eval.nfolds = 10  # folds of the accuracy protocol
    c.eval.normalization = ""  # '' = data.normalization; '[-0.5,0.5]' as the official perform_val
    # Channel order the backbone is fed relative to true-RGB images (.bin files are true RGB). 'rgb'
    # whenever data.color_order describes the training files correctly. Recorded in the metadata.
    c.eval.color_order = "rgb"
    # More evaluators of the backbone every N steps, e.g. IJB-C during training: {name:
    # lafs_jax.eval.evaluators.evaluator_config(type, ...)} (name 'val' is config.eval's); none by default.
    # The first one that ranks (config.eval's sets when given) picks WORKDIR/backbone_best.
    c.evals = ml_collections.ConfigDict()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 30 if tiny else 2000  # train state + Grain iterator, asynchronous
    c.checkpoint.keep = 3  # latest checkpoints kept
    # What stops the run as diverged (NaN / inf, or a loss or parameter norm 10x the recent median); a
    # checkpoint counts as good only once the next step's loss passed this (lafs_jax.train.loop_utils)
    c.divergence = divergence_config()
    c.checkpoint.async_save = True  # write checkpoints in the background
    c.lock()
    return c
