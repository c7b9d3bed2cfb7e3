"""FRA's config section `config.fra` (neck, loss, target momentum, views) and the recipe's validator.

Defaults are the official README command (`--arch FRAB --mask_type attn --num_proto 8 --teacher_temp 0.04
--loss_w_cluster 0.1 --lewel-loss-weight 0.5 --enc-m 0.996 --proj-dim 256`, hidden 4096) and the
constants of models/fra.py (decoder 2 layers, 8 heads, FFN 256, dropout 0.1; student temperature 0.1;
decorrelation weight 0.02; proto momentum 0.9; heatmap scale 1.0; 3 Sinkhorn iterations). main.py's
argparse defaults differ (64 regions, teacher temperature 0.07, cluster weight 0.5); the README's
command is what trained the released model, so it is followed here.
"""
from __future__ import annotations

import ml_collections

from lafs_jax.config import ConfigError, check

MODEL_KIND = "resnet"
EVAL_FEATURES = ("pooled", "projection")


def config() -> ml_collections.ConfigDict:
    """`config.fra` at the official values (see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.hidden_dim = 4096  # H: hidden width of every conv1x1 MLP (proj, proj_pixel, proj_obj, predictors)
    c.out_dim = 256  # d: projection size = decoder width = mask-embedding size (--proj-dim)
    c.num_proto = 8  # Q: learned queries = facial regions = clusters (README --num_proto 8; main.py 64)
    c.decoder_layers = 2  # DETR decoder layers of proj_attn
    c.heads = 8  # attention heads of the decoder
    c.dropout = 0.1  # decoder dropout (both networks train with it; 0 in the parity tests)
    c.scale = 1.0  # heatmap temperature: softmax_q(cos / scale)
    c.proto_momentum = 0.9  # proto <- m proto + (1 - m) mean_b E on every training forward
    c.loss_weight = 0.5  # base = w global + (1 - w) (region + decorrelation_weight x decorrelation)
    c.decorrelation_weight = 0.02  # official loss_w_obj (UniGrad-style off-diagonal term)
    c.cluster_weight = 0.1  # L = base12 + base21 + cluster_weight x mean over views of (CE + ME-MAX)
    c.teacher_temp = 0.04  # teacher softmax temperature of the cluster loss (README; main.py 0.07)
    c.student_temp = 0.1  # student softmax temperature of the cluster loss
    c.sinkhorn_iterations = 3  # Sinkhorn-Knopp iterations on the teacher probabilities
    c.me_max = True  # ME-MAX regulariser on the mean student probability
    c.momentum = 0.996  # target EMA momentum at step 0 (--enc-m), cosine to momentum_end
    c.momentum_end = 1.0
    # BYOL's asymmetric views (the official data/transforms.py for --dataset vggface2): RandomResizedCrop
    # to view_size with area fraction crop_scale, flip, colour (config.data.ssl_color: jitter 0.4/0.4/0.2/0.1
    # p 0.8, grey 0.2, blur p (1.0, 0.1), solarise p (0.0, 0.2))
    c.view_size = 224
    c.crop_scale = (0.2, 1.0)
    # what config.evals embed with: 'pooled' (the target backbone's average-pooled feature, what is exported
    # and what FRA's FER fine-tuning starts from) | 'projection' (z_g = proj(pooled), the official LFW monitor)
    c.eval_features = "pooled"
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first bad field of an FRA recipe (the task's common fields are the task's)."""
    check(config.model.kind == MODEL_KIND, "model.kind", config.model.kind,
          f"method 'fra' pretrains a {MODEL_KIND!r} backbone")
    if "fra" not in config:
        raise ConfigError("config.fra is missing: add it with config.fra = lafs_jax.methods.fra.config.config()")
    f = config.fra
    for key in ("hidden_dim", "out_dim", "decoder_layers", "heads", "sinkhorn_iterations", "view_size"):
        v = f[key]
        check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"fra.{key}", v, "an int >= 1")
    check(isinstance(f.num_proto, int) and f.num_proto >= 2, "fra.num_proto", f.num_proto, "an int >= 2 (regions)")
    check(f.out_dim % f.heads == 0 and f.out_dim % 2 == 0, "fra.out_dim", f.out_dim,
          f"even and a multiple of fra.heads={f.heads}")
    for key in ("teacher_temp", "student_temp", "scale"):
        check(isinstance(f[key], (int, float)) and 0 < f[key] <= 10, f"fra.{key}", f[key], "in (0, 10]")
    for key in ("dropout",):
        check(0 <= f[key] < 1, f"fra.{key}", f[key], "in [0, 1)")
    for key in ("proto_momentum", "loss_weight", "momentum", "momentum_end"):
        check(0 <= f[key] <= 1, f"fra.{key}", f[key], "in [0, 1]")
    for key in ("decorrelation_weight", "cluster_weight"):
        check(f[key] >= 0, f"fra.{key}", f[key], ">= 0")
    check(isinstance(f.me_max, bool), "fra.me_max", f.me_max, "True or False")
    check(f.eval_features in EVAL_FEATURES, "fra.eval_features", f.eval_features, f"one of {list(EVAL_FEATURES)}")
    lo, hi = f.crop_scale
    check(0 < lo <= hi <= 1, "fra.crop_scale", f.crop_scale, "0 < low <= high <= 1")
    check(f.view_size == config.model.image_size, "fra.view_size", f.view_size,
          f"must equal model.image_size={config.model.image_size}")
    check(config.data.augment_on == "device", "data.augment_on", config.data.augment_on,
          "'device' (FRA's views are made in the step)")
    if "ssl_color" not in config.data:
        raise ConfigError("config.data.ssl_color is missing: FRA's views read it; build config.data with "
                          "lafs_jax.input.pipelines.data_config('ssl_color')")
