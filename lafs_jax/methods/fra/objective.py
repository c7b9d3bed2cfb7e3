"""FRA's pretraining objective (the official `FRAB`, models/fra.py): the hooks `lafs_jax.train.ssl` calls,
and `loss_terms` for checks on any converted checkpoint.

Networks (`neck`): online = ResNet backbone + object neck, target = its EMA (same modules), predictors
`predictor` (on z_g) and `predictor_obj` (on z_r). Student params {'online': {'backbone', 'neck'},
'predictor', 'predictor_obj'} with the same tree in 'batch_stats' (BatchNorm running statistics, and
the neck's `proto` buffer); the teacher averages params['online'].

Per step, views v1, v2 (BYOL's asymmetric pair), both networks in train mode (batch statistics, global
over the mesh; dropout on), each view its own forward (own BatchNorm moments, own Ebar):
  direction 1->2: Lg = byol(predictor(z_g^o1), z_g^t2); p = predictor_obj(z_r^o1), t = z_r^t2;
    Lr = byol(p, t); Ldec = decorrelation(p, t); base12 = w Lg + (1 - w)(Lr + 0.02 Ldec)   (w = 0.5)
  direction 2->1 likewise; per view v: (CE_v, MEMAX_v) = cluster_loss(rows of dots^ov, rows of dots^tv)
  L = base12 + base21 + cluster_weight x 0.5 sum_v (CE_v + MEMAX_v).
The target's BatchNorm statistics and proto move through its own forwards (`update_state` returns its
new 'teacher_stats'); only its parameters follow the online network (momentum 0.996 -> 1, cosine).

Faithful to the official code: the loss and every constant; the README's hyper-parameters over main.py's
defaults (config.fra docstring); the `center` buffer of the cluster teacher stays zero (its update is
commented out officially, so it is not kept); the visibility masks the official loss computes are
unused there and not computed here. Differs: Ebar and the cluster statistics are global-batch means
with their gradient over the whole batch (officially the all_reduce passes no gradient, so each GPU's
gradient sees only its local part of Ebar; identical on one device); the target's proto and
BatchNorm statistics start as copies of the online network's (officially its own random proto);
the BatchNorm running statistics of the predictors' teacher copy exist in the state but are unused.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lafs_jax.input import device_augment
from lafs_jax.input import pipelines
from lafs_jax.input import transforms as T
from lafs_jax.losses import byol as byol_lib
from lafs_jax.losses import clustering
from lafs_jax.methods.fra import config as fra_config
from lafs_jax.methods.fra.neck import MLP1D, Encoder, Neck, ProjectedBackbone
from lafs_jax.models import presets

HEADS = ("predictor", "predictor_obj")


def _two(probs) -> np.ndarray:
    """Per-view probabilities of views 1 and 2 from a tuple of one or more (the last one repeats)."""
    return np.asarray([float(probs[min(i, len(probs) - 1)]) for i in range(2)], np.float32)


def build_networks(config: ml_collections.ConfigDict) -> tuple[Encoder, MLP1D, MLP1D]:
    """(encoder, predictor, predictor_obj) of a recipe (config.model: a 'resnet'; config.fra: the neck)."""
    f = config.fra
    neck = Neck(hidden=f.hidden_dim, out=f.out_dim, queries=f.num_proto, heads=f.heads,
                decoder_layers=f.decoder_layers, dropout=f.dropout, scale=f.scale, proto_momentum=f.proto_momentum)
    return (Encoder(backbone=presets.build_model(config.model), neck=neck), MLP1D(f.hidden_dim, f.out_dim),
            MLP1D(f.hidden_dim, f.out_dim))


def init_variables(config: ml_collections.ConfigDict, key: jax.Array) -> dict:
    """{'params', 'batch_stats'} each {'online', 'predictor', 'predictor_obj'}, float32 (batch of 2 views)."""
    encoder, pred, pred_obj = build_networks(config)
    k_enc, k_pred, k_obj = jax.random.split(key, 3)
    s = config.model.image_size
    enc = encoder.init({"params": k_enc}, jnp.zeros((2, s, s, 3), jnp.float32), train=False)
    d = config.fra.out_dim
    heads = {"predictor": pred.init({"params": k_pred}, jnp.zeros((2, 1, d)), train=False),
             "predictor_obj": pred_obj.init({"params": k_obj}, jnp.zeros((2, 1, d)), train=False)}
    return {c: {"online": enc[c], **{h: v[c] for h, v in heads.items()}} for c in ("params", "batch_stats")}


def _encode(encoder: Encoder, params, stats, views: tuple, key: jax.Array) -> tuple[dict, Any]:
    """Train-mode forwards of `encoder` on each view in turn (statistics threaded through); outputs
    stacked over views [V, ...]."""
    outs = []
    for i, v in enumerate(views):
        out, mut = encoder.apply({"params": params, "batch_stats": stats}, v, train=True,
                                 rngs={"dropout": jax.random.fold_in(key, i)}, mutable=["batch_stats"])
        stats = mut["batch_stats"]
        outs.append(out)
    return jax.tree.map(lambda *x: jnp.stack(x), *outs), stats


def target_outputs(config, target_params, target_stats, views: tuple, key: jax.Array) -> dict:
    """The target on both views: {'z_g': [2, B, d], 'z_r': [2, B, Q, d], 'dots': [2, B, Q, P],
    'batch_stats': its new statistics (and proto)}."""
    encoder, _, _ = build_networks(config)
    out, stats = _encode(encoder, target_params, target_stats, views, key)
    return {"z_g": out["z_g"], "z_r": out["z_r"], "dots": out["dots"], "batch_stats": stats}


def online_terms(config, params, stats, views: tuple, target: dict, key: jax.Array) -> tuple[dict, Any]:
    """(terms, new statistics of the online network and predictors) against `target_outputs`. Terms:
    loss, global/region/decorrelation/base _12 and _21, cluster_ce_v, memax_v (v = 1, 2), pooled [2, B, C],
    heatmap_entropy (nats, mean over pixels of view 1), cluster_usage (mean over views)."""
    f = config.fra
    encoder, pred, pred_obj = build_networks(config)
    out, online_stats = _encode(encoder, params["online"], stats["online"], views, key)
    new_stats = {"online": online_stats, **{h: stats[h] for h in HEADS}}
    t = jax.lax.stop_gradient({k: target[k] for k in ("z_g", "z_r", "dots")})
    terms: dict = {}
    for name, (o, tv) in {"12": (0, 1), "21": (1, 0)}.items():
        z, mut = pred.apply({"params": params["predictor"], "batch_stats": new_stats["predictor"]},
                            out["z_g"][o][:, None], train=True, mutable=["batch_stats"])
        new_stats["predictor"] = mut["batch_stats"]
        p, mut = pred_obj.apply({"params": params["predictor_obj"], "batch_stats": new_stats["predictor_obj"]},
                                out["z_r"][o], train=True, mutable=["batch_stats"])
        new_stats["predictor_obj"] = mut["batch_stats"]
        g = byol_lib.byol_loss(z[:, 0], t["z_g"][tv])
        r = byol_lib.byol_loss(p, t["z_r"][tv])
        dec = byol_lib.decorrelation(p, t["z_r"][tv])
        terms.update({f"global_{name}": g, f"region_{name}": r, f"decorrelation_{name}": dec,
                      f"base_{name}": f.loss_weight * g + (1 - f.loss_weight) * (r + f.decorrelation_weight * dec)})
    usage = []
    for v in range(2):
        rows = lambda d: jnp.swapaxes(d, 1, 2).reshape(-1, d.shape[1])  # noqa: E731  [B, Q, P] -> [B P, Q]
        c = clustering.cluster_loss(rows(out["dots"][v]), rows(t["dots"][v]), student_temp=f.student_temp,
                                    teacher_temp=f.teacher_temp, sinkhorn_iterations=f.sinkhorn_iterations,
                                    me_max=f.me_max)
        terms.update({f"cluster_ce_{v + 1}": c["ce"], f"memax_{v + 1}": c["me_max"]})
        usage.append(c["usage"])
    cluster = 0.5 * sum(terms[f"cluster_ce_{v}"] + terms[f"memax_{v}"] for v in (1, 2))
    terms["loss"] = terms["base_12"] + terms["base_21"] + f.cluster_weight * cluster
    heat = jax.lax.stop_gradient(out["heatmap"][0])
    terms["heatmap_entropy"] = jnp.mean(-jnp.sum(heat * jnp.log(heat), axis=1))
    terms["cluster_usage"] = jax.lax.stop_gradient(jnp.mean(jnp.stack(usage)))
    terms["pooled"] = out["pooled"]
    return terms, new_stats


def loss_terms(variables: dict, view1: jax.Array, view2: jax.Array, config: ml_collections.ConfigDict,
               key: jax.Array | None = None) -> dict:
    """Every term of the official FRAB loss for one pair of views (float32 NHWC, normalised), the whole
    model in `variables` = {'params': {'online', 'target', 'predictor', 'predictor_obj'}, 'batch_stats':
    the same} (what `lafs_jax.convert --kind fra` reads from an official checkpoint). Keys: see
    `online_terms`; dropout from `key` (default key 0) when config.fra.dropout > 0."""
    key = jax.random.key(0) if key is None else key
    p, s = variables["params"], variables["batch_stats"]
    k_t, k_o = jax.random.split(key)
    target = target_outputs(config, p["target"], s["target"], (view1, view2), k_t)
    terms, _ = online_terms(config, p, s, (view1, view2), target, k_o)
    return terms


class Objective:
    """FRA for `lafs_jax.train.ssl` (see the module docstring); views made on the device."""

    name = "fra"
    validate = staticmethod(fra_config.validate)

    def __init__(self, config: ml_collections.ConfigDict, *, steps_per_epoch: int = 1, total_steps: int = 1):
        del steps_per_epoch, total_steps  # the step owns the schedules
        self.config = ml_collections.ConfigDict(config.to_dict())
        self.config.model = presets.with_precision(config.model, config.precision)
        self.momentum = (float(config.fra.momentum), float(config.fra.momentum_end))

    # -- data -------------------------------------------------------------------------------------

    def batches(self, source, *, batch_size: int, seed: int):
        """Decoded uint8 images + stream indices (the views are made in the step)."""
        return pipelines.decoded_batches(source, self.config.data, batch_size=batch_size, seed=seed)

    def view_batch_shapes(self, batch_size: int) -> dict:
        s = self.config.fra.view_size
        return {k: jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32) for k in ("view1", "view2")}

    def augment(self, key: jax.Array, batch: dict) -> dict:
        """BYOL's asymmetric pair from uint8 images: {'view1', 'view2': f32 [B, S, S, 3] normalised}."""
        dc, f = self.config.data, self.config.fra
        c = dc.ssl_color
        keys = device_augment.sample_keys(key, batch["index"])
        _, views = device_augment.ssl_views(
            batch["image"], keys, count=2, size=f.view_size, scale=tuple(f.crop_scale),
            color=device_augment.SSLColor.from_config(dc),
            blur_probs=_two(c.global_blur_probs), solarize_probs=_two(c.global_solarize_probs))
        views = T.normalize(views, dc.normalization)
        return {"view1": views[:, 0], "view2": views[:, 1], "label": batch["label"], "index": batch["index"]}

    # -- state ------------------------------------------------------------------------------------

    def init_student(self, key: jax.Array) -> dict:
        return init_variables(self.config, key)

    def teacher_params(self, student: Any) -> Any:
        """The target averages the online network (not the predictors)."""
        return student["online"]

    def load_resources(self, workdir: str) -> Any:
        del workdir
        return None

    def init_extra_state(self, key: jax.Array, resources: Any = None) -> dict:
        """None: proto lives in the BatchNorm statistics."""
        del key, resources
        return {}

    # -- the step ---------------------------------------------------------------------------------

    def views(self, state: dict, batch: dict, key: jax.Array) -> tuple:
        del state, key
        return batch["view1"], batch["view2"]

    def teacher_outputs(self, teacher: Any, views: tuple, state: dict, key: jax.Array) -> dict:
        return target_outputs(self.config, teacher, state["teacher_stats"]["online"], views, key)

    def loss(self, student: Any, views: tuple, teacher_out: dict, state: dict, key: jax.Array):
        terms, stats = online_terms(self.config, student, state["student_stats"], views, teacher_out, key)
        terms.pop("pooled")
        return terms.pop("loss"), {**terms, "batch_stats": stats}

    def update_state(self, state: dict, teacher_out: dict) -> dict:
        """The target's own statistics and proto (replacing the step's EMA of the online ones)."""
        return {"teacher_stats": {**state["teacher_stats"], "online": teacher_out["batch_stats"]}}

    # -- evaluation and export --------------------------------------------------------------------

    def eval_model(self) -> Any:
        """The target's ResNet (pooled features), or with fra.eval_features='projection' the ResNet + proj."""
        backbone = presets.build_model(self.config.model)
        if self.config.fra.eval_features == "pooled":
            return backbone
        return ProjectedBackbone(backbone=backbone, proj=MLP1D(self.config.fra.hidden_dim, self.config.fra.out_dim))

    def eval_variables(self, state: dict) -> dict:
        t, s = state["teacher"], state["teacher_stats"]["online"]
        if self.config.fra.eval_features == "pooled":
            return {"params": t["backbone"], "batch_stats": s["backbone"]}
        return {c: {"backbone": v["backbone"], "proj": v["neck"]["proj"]} for c, v in (("params", t), ("batch_stats", s))}

    def export_variables(self, state: dict) -> dict:
        """The target backbone's variables directory {'params', 'batch_stats'} (pooled features)."""
        return {"params": state["teacher"]["backbone"], "batch_stats": state["teacher_stats"]["online"]["backbone"]}

    def export_metadata(self) -> dict:
        return {"kind": "resnet", "patch_order": None}
