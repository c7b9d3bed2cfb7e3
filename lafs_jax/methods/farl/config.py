"""FaRL's config section `config.farl` (ITC, MIM, visual tokenizer) and its recipe validator.

What FaRL's paper and released code state and what is inferred (the pretraining code is unreleased,
FaRL issue #22):
  - stated (paper, supplement): CLIP ViT-B/16 towers, ITC over the global batch + MIM, equal weights
    (L = L_ITC + L_MIM), LAION-Face pairs, mixed precision;
  - from the released downstream code's module names (`visual.mask_token`, `lm_transformer`): BEiT-style
    MIM with a learned mask token through the same ViT, a small transformer, LayerNorm and a linear head;
  - inferred (BEiT's defaults, not confirmed for FaRL): blockwise masking of 75 of 196 patches (min
    block 16, aspect 0.3 - 3.3), DALL-E's 8,192-code dVAE as the visual tokenizer, one lm_transformer
    block fed the last block's raw tokens (class token included), the LayerNorm / head on its output.
"""
from __future__ import annotations

import math

import ml_collections

from lafs_jax.config import check
from lafs_jax.input import tokenizer
from lafs_jax.losses import contrastive
from lafs_jax.models import clip

MODEL_KIND = clip.KIND
TOKENIZERS = ("kmeans", "dalle")


def config(*, tiny: bool = False) -> ml_collections.ConfigDict:
    """The `config.farl` section (B/16 values; `tiny` for the CPU recipe)."""
    c = ml_collections.ConfigDict()
    c.itc = "softmax"  # 'softmax' (CLIP / FaRL) | 'sigmoid' (SigLIP; not in FaRL)
    c.itc_weight = 1.0  # weight of the ITC term (FaRL: 1)
    c.logit_scale_init = math.log(1 / 0.07)  # CLIP's initial log temperature (SigLIP: ln 10)
    c.logit_bias_init = -10.0  # SigLIP's initial logit bias ('sigmoid' only)
    c.context_length = 16 if tiny else 77  # text positions read (CLIP: 77; longer captions are truncated)
    c.flip = False  # random horizontal flip of the images (CLIP and FaRL's known settings: none)
    # () = the centred square (CLIP's preprocessing); (lo, hi) = RandomResizedCrop area fraction (open_clip
    # trains CLIP with (0.9, 1.0); CLIP's paper: a random square crop only; FaRL's: unpublished)
    c.crop_scale = ()
    c.mim = ml_collections.ConfigDict()
    c.mim.weight = 1.0  # weight of the MIM term (FaRL: 1); 0 = ITC only (no masked copy is run)
    c.mim.num_masked = 6 if tiny else 75  # patches masked per image (BEiT: 75 of 196, about 40 %)
    c.mim.min_block = 2 if tiny else 16  # smallest masked rectangle in patches (BEiT: 16)
    c.mim.layers = 1  # lm_transformer blocks (FaRL's MIM.LAYERS; value unpublished, 1 inferred)
    # visual tokenizer: 'kmeans' (a frozen k-means codebook of raw normalised patch vectors, fitted at
    # start-up on training images; offline) | 'dalle' (DALL-E's dVAE encoder, BEiT's: `dalle_path`)
    c.mim.tokenizer = "kmeans"
    c.mim.dalle_path = ""  # 'dalle': the directory `python -m lafs_jax.convert --kind dalle` wrote
    c.mim.vocab_size = 64 if tiny else 8192  # visual token ids predicted (BEiT / DALL-E: 8192)
    c.mim.codebook_path = ""  # .npy [vocab_size, patch*patch*3] codebook; '' = fit on the training data
    c.mim.kmeans_images = 250 if tiny else 2000  # training images the codebook is fitted on
    c.mim.kmeans_patches = 4000 if tiny else 100_000  # patch vectors sampled from them
    c.mim.kmeans_iterations = 10 if tiny else 20  # Lloyd iterations
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first bad field of a FaRL recipe (the task's own fields are the task's)."""
    check(config.model.kind == MODEL_KIND, "model.kind", config.model.kind,
          f"method 'farl' trains the CLIP towers ({MODEL_KIND!r}; presets {list(clip.PRESETS)})")
    check(config.model.clip.vocab_size == tokenizer.VOCAB_SIZE, "model.clip.vocab_size", config.model.clip.vocab_size,
          f"the CLIP tokenizer's ids need {tokenizer.VOCAB_SIZE} rows")
    f = config.farl
    check(f.itc in contrastive.KINDS, "farl.itc", f.itc, f"one of {contrastive.KINDS}")
    for key, v in (("itc_weight", f.itc_weight), ("mim.weight", f.mim.weight)):
        check(isinstance(v, (int, float)) and v >= 0, f"farl.{key}", v, "a number >= 0")
    check(isinstance(f.context_length, int) and 2 <= f.context_length <= config.model.clip.context_length,
          "farl.context_length", f.context_length, f"an int in [2, model.clip.context_length="
          f"{config.model.clip.context_length}]")
    check(isinstance(f.flip, bool), "farl.flip", f.flip, "True or False")
    m = f.mim
    grid = config.model.image_size // config.model.patch_size
    check(isinstance(m.num_masked, int) and 1 <= m.num_masked < grid * grid, "farl.mim.num_masked", m.num_masked,
          f"an int in [1, {grid * grid}) ({grid}x{grid} patches)")
    check(isinstance(m.min_block, int) and 1 <= m.min_block <= m.num_masked, "farl.mim.min_block", m.min_block,
          "an int in [1, farl.mim.num_masked]")
    for key in ("layers", "vocab_size", "kmeans_images", "kmeans_patches", "kmeans_iterations"):
        check(isinstance(m[key], int) and m[key] >= 1, f"farl.mim.{key}", m[key], "an int >= 1")
    check(m.tokenizer in TOKENIZERS, "farl.mim.tokenizer", m.tokenizer, f"one of {TOKENIZERS}")
    check(m.tokenizer != "dalle" or bool(m.dalle_path), "farl.mim.dalle_path", m.dalle_path,
          "the converted dVAE directory (python -m lafs_jax.convert --kind dalle) with farl.mim.tokenizer='dalle'")
    check(m.kmeans_patches >= m.vocab_size, "farl.mim.kmeans_patches", m.kmeans_patches,
          f">= farl.mim.vocab_size={m.vocab_size}")
    check(config.data.augment_on == "device" or config.data.image_size == config.model.image_size, "data.image_size",
          config.data.image_size, f"model.image_size={config.model.image_size} (the host makes the model's views; "
          "with data.augment_on='device' it is the decoded images' side)")
    cs = tuple(f.crop_scale)
    check(cs == () or (len(cs) == 2 and all(isinstance(v, (int, float)) for v in cs) and 0 < cs[0] <= cs[1] <= 1),
          "farl.crop_scale", f.crop_scale, "() (centred square) or (lo, hi) with 0 < lo <= hi <= 1")
    check(config.data.format == "image_text", "data.format", config.data.format,
          "method 'farl' reads image-caption pairs ('image_text', made by `python -m data.prepare captions`)")
