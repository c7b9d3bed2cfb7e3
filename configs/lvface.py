"""LVFace: an InsightFace ViT trained with ArcFace, Partial FC and EPL class prototypes in phases.

`configs/lvface.py[:SIZE][,DATA][,VERSION]`: SIZE t | s | b (default) | l; DATA webface42m (default) |
glint360k | tiny; VERSION v1 (default) | v3. `:tiny` alone is the CPU demo (a tiny ViT on the ORL faces).
Sources: LVFace (ByteDance, arXiv 2501.13420 v1; ICCV 2025 "Progressive Cluster Optimization") and its
inference repository, InsightFace's `arcface_torch` configs and Partial FC, EPL
(WakingHours-GitHub/EPL); the facts are collected in ../shared/reference/other_seeds.md §3 (cited as §).

Model (§3.2; `lafs_jax.models.presets`): SIZE picks LVFace's config name -- t: vit_t (D 256, depth 12),
s: vit_s (512, 12), b: vit_b_dp005_mask_005 (512, 24; the README evaluates LVFace-B with it), l:
vit_l_dp005_mask_005 (768, 24) -- 8 heads, patch 9 on 112 x 112 (144 tokens), ReLU6, no qkv bias,
attention softmax in fp32, linear drop path (0.1, or 0.05 in the dp005 names), training-only token
masking (0.1, 0.05 in *_mask_005), feature head flatten -> Linear -> BN -> Linear -> BN, 512-d.
B and L train with gradient checkpointing (§3.2): `model.remat=True` here. L also shards its
parameters and AdamW moments over the data axis (`sharding_rules = FSDP_RULES`, ZeRO-3 style;
bench/lvface_memory.py measures the per-device bytes).

Input (§3.2): 112 x 112 RGB, (x/255 - 0.5)/0.5 (`'[-1,1]'`), random horizontal flip only (InsightFace's
training transform: no crop, RandAugment, erasing or mixup).

Curriculum (`config.curriculum`, lafs_jax.methods.lvface; phase lengths in epochs):
  v1 (§3.1, §3.3; LVFace arXiv v1): 40 epochs ArcFace (s 64, m 0.5, InsightFace's th / mm guard) with
     Partial FC r = 0.3, then 60 epochs without sampling (r = 1) with EPL prototypes: a second set of
     logits against E (the target's cosine minus k * sg(v_y), k = 0.7) averaged with W's loss, as EPL
     stacks the two sets on the batch axis. E is updated by EPL's softsign rule in every phase (EPL
     updates from the start and uses the prototype logits only from `start_vp_epoch`), so the
     prototypes are warm when phase 2 uses them.
  v3 (§3.1; ICCV "Progressive Cluster Optimization"): negative-class sampling (r 0.3), then the
     feature-expectation penalty (EPL prototypes, r 0.3), then full softmax without sampling and no
     prototypes. The v3 method section could not be read (§3.1 [verify]): its phase lengths and exact
     penalty form are unknown; 40 / 30 / 30 epochs (the 100 epochs of v1) are this file's choice.
  A phase's sample rate and margin replace config.loss's; W (N(0, 0.01^2), InsightFace Partial FC's
  init; `:tiny` keeps the fine-tuning default xavier-uniform), its AdamW state and E carry over every
  phase change.

Optimisation (§3.3, InsightFace's ViT WebFace42M configs as the prior LVFace's paper points to):
AdamW lr 1e-3, weight decay 0.1, 4 warmup epochs then cosine (InsightFace: polynomial decay), batch 384
per GPU -- 3,072 on one 8-GPU host here (the GPU count of LVFace's runs is not published) -- bf16 on
accelerators (InsightFace: fp16). Class centres: the same AdamW (InsightFace Partial FC v2 optimises
W with the backbone's optimizer), lazy rows (unsampled rows keep their value and moments; the
reference still applies momentum and weight decay to them, §3.3 "fidelity detail").

Data (§3.3): WebFace42M, 2,059,906 identities, 42,474,557 images (InsightFace `wf42m_*` configs);
Glint360K, 360,232 identities, 17,091,657 images (InsightFace `glint360k_*` configs), the set the
released checkpoints were trained on. Both as InsightFace RecordIO (`train.rec` / `train.idx`).

    python main.py --config configs/lvface.py:b,glint360k --workdir runs/lvface_b \
        --config.data.path=/data/glint360k/train \
        --config.eval.bins="('/data/glint360k/lfw.bin','/data/glint360k/cfp_fp.bin','/data/glint360k/agedb_30.bin')"
    python main.py --config configs/evaluate.py:full --workdir runs/lvface_b --config.evaluate.ijbc_root=...

Expected (LVFace README, Glint360K models, IJB-C TAR@FAR 1e-6 / 1e-5 / 1e-4, IJB-B 1e-4; §3.4; not
reproduced here): T 88.53 / 95.63 / 96.67, 95.41; S 90.06 / 96.52 / 97.31, 96.14; B 90.06 / 97.00 /
97.70, 96.51; L 89.51 / 97.02 / 97.66, 96.51. The released weights convert with
`python -m lafs_jax.convert --kind lvface --src LVFace-B_Glint360K.pt --out runs/lvface_b_released`.

Tiny CPU demo (`python -m data.prepare orl --out runs/demo/data` first): a 2-block D 64 InsightFace
ViT (patch 9, 144 tokens, masking 0.1) on the 25 ORL training people, every phase of the chosen
version for 2 epochs (14 steps of 32 images), ArcFace with s 32 / m 0.3 (a smaller scale and margin
for 25 classes, as configs/finetune.py:tiny uses s 32; not tuned), verification on the 450 validation
pairs at the start, every phase change and the end:

With 25 classes and 32 images a step, r = 0.3 (8 sampled classes on one device) cannot hold every
class of the batch: several positives a step fall outside the sampled set (metric `positives_dropped`;
each sample still keeps its own target in its softmax, lafs_jax/losses/partial_fc.py). InsightFace's
Partial FC keeps every positive however many (a dynamic shape); at WebFace42M / Glint360K scale a
batch's positives are a small fraction of r x C and the two agree.

    python main.py --config configs/lvface.py:tiny --workdir runs/lvface_tiny          # v1: 2 phases
    python main.py --config configs/lvface.py:tiny,v3 --workdir runs/lvface_tiny_v3   # 3 phases
"""
import ml_collections

from configs import finetune
from lafs_jax.losses import curriculum
from lafs_jax.models.presets import model_config
from lafs_jax.sharding import FSDP_RULES

SIZES = {"t": "vit_t", "s": "vit_s", "b": "vit_b_dp005_mask_005", "l": "vit_l_dp005_mask_005"}
DATASETS = {  # (identities, images): InsightFace's wf42m_* and glint360k_* configs (§3.3)
    "webface42m": (2_059_906, 42_474_557),
    "glint360k": (360_232, 17_091_657),
}
VERSIONS = ("v1", "v3")


def phases(version: str, tiny: bool) -> tuple:
    """The curriculum of `version` (see the module docstring); tiny: 2 epochs a phase, s 32 / m 0.3."""
    margin = dict(s=32.0, m2=0.3) if tiny else {}
    if version == "v1":
        ncs, epl = (2, 2) if tiny else (40, 60)
        return (curriculum.phase(epochs=ncs, sample_rate=0.3, **margin),
                curriculum.phase(epochs=epl, sample_rate=1.0, prototypes="add", prototype_k=0.7, **margin))
    ncs, penalty, full = (2, 2, 2) if tiny else (40, 30, 30)
    return (curriculum.phase(epochs=ncs, sample_rate=0.3, **margin),
            curriculum.phase(epochs=penalty, sample_rate=0.3, prototypes="add", prototype_k=0.7, **margin),
            curriculum.phase(epochs=full, sample_rate=1.0, update_prototypes=False, **margin))


def parse(arg: str | None) -> tuple[str, str, str]:
    """(size, data set, version) of the `:arg` (defaults b, webface42m, v1; 'tiny' alone is the demo)."""
    parts = [p for p in (arg or "").split(",") if p]
    size, data, version = "b", "webface42m", "v1"
    for p in parts:
        if p in SIZES:
            size = p
        elif p in DATASETS or p == "tiny":
            data = p
        elif p in VERSIONS:
            version = p
        else:
            raise ValueError(f"configs/lvface.py:{arg}: unknown part {p!r}; choose a size {list(SIZES)}, a data set "
                             f"{list(DATASETS) + ['tiny']} and a version {list(VERSIONS)}")
    return size, data, version


def tiny_model() -> ml_collections.ConfigDict:
    """A 2-block D 64 InsightFace ViT with LVFace's structure (patch 9 on 112 px, 144 tokens, masking)."""
    m = model_config("vit_t")
    m.dim, m.depth, m.heads, m.head_dim, m.mlp_dim = 64, 2, 4, 16, 256
    m.insightface.embedding_size = 128
    return m


def get_config(arg=None):
    size, data, version = parse(arg)
    tiny = data == "tiny"
    c = finetune.get_config("tiny" if tiny else "webface4m")
    c.unlock()
    c.model = tiny_model() if tiny else model_config(SIZES[size])
    c.model.remat = size in ("b", "l") and not tiny  # §3.2: B and L use gradient checkpointing
    if size == "l" and not tiny:
        c.sharding_rules = FSDP_RULES  # parameters + AdamW moments split over 'data' (ZeRO-3)

    c.data.color_order = "rgb"  # InsightFace RecordIO of WebFace42M / Glint360K is true RGB
    c.data.normalization = "[-1,1]"  # (x/255 - 0.5)/0.5 (§3.2)
    ft = c.data.finetune
    ft.random_resized_crop, ft.randaugment, ft.color_jitter = False, False, 0.0  # flip only (InsightFace)
    ft.random_erasing_prob, ft.mixup_prob = 0.0, 0.0
    c.data.workers = 0 if tiny else 16

    c.curriculum = phases(version, tiny)
    c.optim.epochs = sum(p.epochs for p in c.curriculum)
    c.optim.lr = 5e-3 if tiny else 1e-3  # InsightFace ViT configs: AdamW 1e-3 (§3.3)
    c.optim.weight_decay = 0.1  # §3.3
    c.optim.warmup_epochs = 1.0 if tiny else 4.0  # §3.3: 4 warmup epochs
    c.optim.layer_decay = 1.0  # from scratch
    c.optim.accum_steps = 1
    c.batch_size = 32 if tiny else 384 * 8  # §3.3: 384 per GPU, one 8-GPU host
    c.total_steps = -1  # the curriculum's epochs x steps per epoch
    c.log_every_steps = 7 if tiny else 100

    c.loss.m1, c.loss.m2, c.loss.m3, c.loss.s = 1.0, 0.5, 0.0, 64.0  # unused with a curriculum: the phases' margin
    c.loss.sample_rate = 1.0  # unused with a curriculum: the phases' rates
    c.loss.centers_init = "xavier_uniform" if tiny else "normal_0.01"  # InsightFace Partial FC: N(0, 0.01^2)
    c.loss.centers_optimizer = "adamw"
    c.loss.centers_weight_decay = 0.1

    c.eval.every_steps = 14 if tiny else 10_000  # tiny: every phase change (2 epochs of 7 steps) and the end
    c.eval.at_start = tiny
    c.eval.normalization = ""  # = data.normalization, as LVFace's evaluation
    c.checkpoint.every_steps = 7 if tiny else 5_000
    c.lock()
    return c
