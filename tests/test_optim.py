"""Optimizers and schedules against hand formulas, NumPy, and torch.optim.AdamW with param groups."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from lafs_jax.config import ConfigError
from lafs_jax.methods.lafs import finetune as lafs_finetune
from lafs_jax.sharding import path_str
from lafs_jax.train import optim

# The rules Part fViT's landmark CNN adds in fine-tuning (lafs_jax.methods.lafs.finetune): layer id 0, weight
# decay 0.05 except its output layer; LAFS_LAYER0 for the layer-id helpers.
LAFS_LAYER0 = (lafs_finetune.LANDMARK_REGEX,)


def lafs_rules(cfg, frozen=False):
    return lafs_finetune.optimizer_rules(lafs_finetune.optimizer_config(), cfg.weight_decay, freeze=frozen)


def hand_warmup_cosine(step, peak, total, warmup, floor):
    if step < warmup:
        return peak * step / warmup
    step = min(step, total)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def dino_cosine_table(start, end, total):
    """DINO utils.cosine_scheduler without warmup, as a NumPy table."""
    iters = np.arange(total)
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * iters / len(iters)))


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------

def test_warmup_cosine_values_python_and_jit():
    peak, total, warmup, floor = 1e-3, 100, 10, 1e-6
    sched = optim.warmup_cosine(peak, total, warmup, floor)
    jitted = jax.jit(sched)
    for s in (0, 1, 5, 9, 10, 11, 37, 55, 99, 100, 150):
        want = hand_warmup_cosine(s, peak, total, warmup, floor)
        assert float(sched(s)) == pytest.approx(want, rel=1e-5, abs=1e-12), s
        assert float(jitted(jnp.int32(s))) == pytest.approx(want, rel=1e-5, abs=1e-12), s
    assert float(sched(55)) == pytest.approx(floor + (peak - floor) / 2, rel=1e-5)


def test_warmup_cosine_matches_torch_cosine_annealing():
    """After warmup, the official CosineAnnealingLR(T_max = total - warmup, eta_min = floor)."""
    peak, total, warmup, floor = 2e-3, 40, 8, 1e-5
    sched = optim.warmup_cosine(peak, total, warmup, floor)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=floor)
    for s in range(warmup, total + 1):
        assert float(sched(s)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-5), s
        opt.step()
        cos.step()


def test_warmup_cosine_rejects_bad_lengths():
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.warmup_cosine(1.0, 10, 10, 0.0)


@pytest.mark.parametrize("start,end", [(0.04, 0.4), (0.996, 1.0), (0.0, 1.0), (0.1, 0.1)])
def test_cosine_schedule_equals_dino_table(start, end):
    total = 37
    sched = optim.cosine_schedule(start, end, total)
    table = dino_cosine_table(start, end, total)
    got = np.array([float(sched(s)) for s in range(total)])
    np.testing.assert_allclose(got, table, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(total))), table, rtol=1e-6, atol=1e-7)
    assert float(sched(total + 5)) == pytest.approx(end)


def test_schedules_count_optimizer_updates_with_accumulation():
    cfg = optim.optim_config("finetune")
    cfg.epochs, cfg.warmup_epochs, cfg.accum_steps, cfg.lr, cfg.min_lr = 4, 1.0, 3, 1e-3, 1e-6
    s = optim.schedules(cfg, steps_per_epoch=30)  # 10 optimizer updates per epoch
    for step in (0, 5, 10, 25, 40):
        assert float(s["learning_rate"](step)) == pytest.approx(hand_warmup_cosine(step, 1e-3, 40, 10, 1e-6), rel=1e-5)
    assert float(s["weight_decay"](17)) == pytest.approx(0.1)


def test_peak_lr_scaling():
    cfg = optim.optim_config("pretrain")  # 5e-4 x batch / 256, as the official pretraining
    assert optim.peak_lr(cfg, 164) == pytest.approx(3.203125e-4)
    cfg.lr_scaling = "sqrt"
    assert optim.peak_lr(cfg, 1024) == pytest.approx(1e-3)
    cfg.lr_scaling = "linear"
    with pytest.raises(ValueError, match="lr_scaling"):
        optim.peak_lr(cfg, None)


# ---------------------------------------------------------------------------------------------
# parameter groups
# ---------------------------------------------------------------------------------------------

def part_fvit_like_params(depth=2, dim=8, key=0):
    """A params tree with the names of lafs_jax.models (Part fViT + classifier centres), tiny shapes."""
    rng = np.random.default_rng(key)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    vit = {"patch_embedding": {"kernel": r(6, dim), "bias": r(dim)}, "cls_token": r(1, 1, dim),
           "pos_embedding": r(1, 4, dim), "head_norm": {"scale": r(dim), "bias": r(dim)},
           "encoder": {f"block_{i}": {"attention_norm": {"scale": r(dim), "bias": r(dim)},
                                      "attention": {"qkv": {"kernel": r(dim, 3 * dim)},
                                                    "out": {"kernel": r(dim, dim), "bias": r(dim)}},
                                      "mlp": {"fc1": {"kernel": r(dim, 2 * dim), "bias": r(2 * dim)}}}
                       for i in range(depth)}}
    landmark = {"stem_conv": {"kernel": r(3, 3, 3, 4)}, "stem_bn": {"scale": r(4), "bias": r(4)},
                "bottleneck_1": {"expand_conv": {"kernel": r(1, 1, 4, 4)}},
                "landmark_head": {"kernel": r(4, 6), "bias": r(6)}}
    return {"backbone": {"landmark_cnn": landmark, "vit": vit}, "centers": r(10, dim)}


@pytest.mark.parametrize("path,expected", [
    ("backbone/vit/patch_embedding/kernel", 0),
    ("backbone/vit/cls_token", 0),
    ("backbone/vit/pos_embedding", 0),
    ("backbone/vit/encoder/block_0/attention/qkv/kernel", 1),
    ("backbone/vit/encoder/block_11/mlp/fc2/bias", 12),
    ("vit/encoder/layers_4/mlp/kernel", 5),
    ("backbone/vit/head_norm/scale", 13),
    ("head/dense_0/kernel", 13),
    ("backbone/landmark_cnn/stem_conv/kernel", 0),
    ("backbone/landmark_cnn/block_3/kernel", 0),  # landmark CNN wins over the block pattern
    ("backbone/landmark_cnn/landmark_head/kernel", 0),
])
def test_layer_id_base_depth(path, expected):
    assert optim.layer_id(path, 12, layer0_regexes=LAFS_LAYER0) == expected


def test_layer_id_custom_block_regex_and_range_error():
    assert optim.layer_id("Transformer/encoderblock_2/x", 4, block_regex=r"encoderblock_(\d+)") == 3
    assert optim.layer_id("t/stage3/x", 4, block_regex=r"stage(\d+)") == 4
    with pytest.raises(ValueError, match="block_12"):
        optim.layer_id("vit/block_12/kernel", 12)


def test_layer_decay_lr_mults_base_depth_12():
    params = part_fvit_like_params(depth=12, dim=4)["backbone"]
    assert optim.model_depth(params) == 12 == optim.model_depth(params, layer0_regexes=LAFS_LAYER0)
    flat = optim.match_mults(params, optim.layer_decay_mults(params, 0.58, layer0_regexes=LAFS_LAYER0), 1.0)
    assert flat["vit/cls_token"] == pytest.approx(0.58 ** 13)  # 8.41e-4 as the reference notes
    assert flat["vit/cls_token"] == pytest.approx(8.41e-4, rel=1e-3)
    assert flat["landmark_cnn/stem_conv/kernel"] == pytest.approx(0.58 ** 13)
    for i in range(12):
        assert flat[f"vit/encoder/block_{i}/attention/qkv/kernel"] == pytest.approx(0.58 ** (12 - i))
    assert flat["vit/encoder/block_0/attention/qkv/kernel"] == pytest.approx(1.45e-3, rel=2e-3)
    assert flat["vit/head_norm/scale"] == 1.0
    assert optim.layer_decay_mults(params, 1.0) == []


def test_weight_decay_mults_of_finetuning():
    """wd factors x the schedule: 1 on ndim >= 2 non-bias tensors, landmark_optim.weight_decay / weight_decay
    on the landmark CNN except its output layer, 0 on biases and ndim < 2 tensors."""
    params = part_fvit_like_params()
    cfg = optim.optim_config("finetune")
    _, wd_mults = optim.finetune_mults(params, cfg, **lafs_rules(cfg))
    flat = optim.match_mults(params, wd_mults, 0.0)
    assert flat["backbone/vit/cls_token"] == 1.0 and flat["backbone/vit/pos_embedding"] == 1.0
    assert flat["backbone/vit/encoder/block_1/attention/qkv/kernel"] == 1.0
    assert flat["backbone/vit/encoder/block_1/attention/out/bias"] == 0.0
    assert flat["backbone/vit/head_norm/scale"] == 0.0 and flat["backbone/landmark_cnn/stem_bn/scale"] == 0.0
    # landmark_optim.weight_decay 0.05 = 0.5 x weight_decay 0.1
    assert flat["backbone/landmark_cnn/stem_conv/kernel"] == 0.5
    assert flat["backbone/landmark_cnn/bottleneck_1/expand_conv/kernel"] == 0.5
    assert flat["backbone/landmark_cnn/landmark_head/kernel"] == 1.0  # the output layer keeps the main decay
    assert flat["backbone/landmark_cnn/landmark_head/bias"] == 0.0


def test_clip_per_tensor_matches_numpy():
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(5, 3)) * 10, "b": rng.normal(size=(4,)) * 0.01, "c": rng.normal(size=(2, 2, 2))}
    grads = {k: v.astype(np.float32) for k, v in grads.items()}
    tx = optim.clip_per_tensor(3.0)
    got, _ = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), tx.init(grads))
    for k, g in grads.items():
        norm = np.sqrt((g.astype(np.float64) ** 2).sum())
        coef = 3.0 / (norm + 1e-6)
        want = g * coef if coef < 1 else g
        np.testing.assert_allclose(np.asarray(got[k]), want, rtol=1e-6)
    assert np.linalg.norm(np.asarray(got["a"])) == pytest.approx(3.0, rel=1e-5)
    np.testing.assert_array_equal(np.asarray(got["b"]), grads["b"])


# ---------------------------------------------------------------------------------------------
# fine-tuning optimizer vs torch AdamW param groups
# ---------------------------------------------------------------------------------------------

def torch_finetune_groups(params_np, cfg, depth):
    """BEiT/MAE-style param_groups_lrd with lr_scale *applied*; the official wd groups."""
    groups, tensors = [], {}
    for path, value in params_np.items():
        t = torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))
        tensors[path] = t
        if path.startswith("centers"):
            continue  # updated by the caller's transform (plain SGD in the test)
        if value.ndim < 2 or path.endswith("/bias"):
            wd = 0.0
        elif path.startswith("backbone/landmark_cnn/") and "landmark_head" not in path:
            wd = lafs_finetune.optimizer_config().weight_decay
        else:
            wd = cfg.weight_decay
        scale = cfg.layer_decay ** (depth + 1 - optim.layer_id(path, depth, layer0_regexes=LAFS_LAYER0))
        groups.append({"params": [t], "weight_decay": wd, "lr_scale": scale, "name": path})
    return groups, tensors


@pytest.mark.parametrize("layer_decay", [0.58, 1.0])
def test_finetune_optimizer_equals_torch_adamw_groups(layer_decay):
    depth, steps_per_epoch, n_steps = 2, 2, 5
    cfg = optim.optim_config("finetune")
    cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.min_lr, cfg.layer_decay = 4, 1.0, 1e-2, 1e-4, layer_decay
    params = part_fvit_like_params(depth=depth)
    centers_lr = 0.5
    tx = optim.finetune_optimizer(params, cfg, steps_per_epoch, centers_tx=optax.sgd(centers_lr), **lafs_rules(cfg))
    state = tx.init(params)
    update = jax.jit(tx.update)

    params_np = {path_str(kp): np.asarray(v, np.float64) for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    groups, tensors = torch_finetune_groups(params_np, cfg, depth)
    topt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    rng = np.random.default_rng(1)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    for k in range(n_steps):
        grads_np = {p: rng.normal(size=v.shape) for p, v in params_np.items()}
        grads = jax.tree_util.tree_unflatten(jax.tree.structure(params),
                                             [jnp.asarray(grads_np[path_str(kp)], jnp.float32)
                                              for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]])
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        lr_k = hand_warmup_cosine(k, cfg.lr, total, warmup, cfg.min_lr)
        assert float(optim.current_hyperparams(state)["learning_rate"]) == pytest.approx(lr_k, rel=1e-5)
        for g in topt.param_groups:
            g["lr"] = lr_k * g["lr_scale"]
        for path, t in tensors.items():
            t.grad = torch.tensor(grads_np[path], dtype=torch.float64)
        topt.step()
        with torch.no_grad():
            tensors["centers"] -= centers_lr * tensors["centers"].grad
    got = {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, t in tensors.items():
        np.testing.assert_allclose(got[path], t.detach().numpy(), rtol=2e-5, atol=2e-6, err_msg=path)
    # the groups really differ: an early block moved far less than the head under decay 0.58
    moved = {p: np.abs(got[p] - params_np[p]).mean() for p in got}
    ratio = moved["backbone/vit/encoder/block_0/attention/qkv/kernel"] / moved["backbone/vit/head_norm/bias"]
    if layer_decay == 1.0:
        assert 0.3 < ratio < 3
    else:
        assert ratio < 0.58 ** 2 * 3


# Layer ids of part_fvit_like_params(depth=2), written out by hand (prefix -> id; depth + 1 = 3 for the head).
HAND_LAYER_IDS = {"backbone/landmark_cnn/": 0, "backbone/vit/patch_embedding/": 0, "backbone/vit/cls_token": 0,
                  "backbone/vit/pos_embedding": 0, "backbone/vit/encoder/block_0/": 1,
                  "backbone/vit/encoder/block_1/": 2, "backbone/vit/head_norm/": 3}


def hand_weight_decay(path, value):
    """The official fine-tuning groups: no decay on biases / ndim < 2, 0.05 on the landmark CNN (not its
    output layer), 0.1 elsewhere."""
    if value.ndim < 2 or path.endswith("/bias"):
        return 0.0
    if path.startswith("backbone/landmark_cnn/") and "/landmark_head/" not in path:
        return 0.05
    return 0.1


@pytest.mark.parametrize("frozen", [False, True])
def test_finetune_optimizer_equals_numpy_float32_adamw_with_per_tensor_factors(frozen):
    """Each tensor: update = -lr(t) x 0.58^(3 - layer id) x (adam(g) + wd x p) in float32 NumPy, wd from the
    official groups, the landmark CNN zero when frozen; centres by SGD. Equal to float32 rounding: at most
    1e-6 of the tensor's largest update (measured: 3.4e-7, i.e. a few ulps where XLA's fused kernels round
    differently from NumPy); the frozen tensors bit-exactly zero."""
    cfg = optim.optim_config("finetune")
    cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.min_lr, cfg.layer_decay = 4, 1.0, 1e-2, 1e-4, 0.58
    params = part_fvit_like_params(depth=2)
    tx = optim.finetune_optimizer(params, cfg, 2, centers_tx=optax.sgd(0.5), **lafs_rules(cfg, frozen))
    state, update = tx.init(params), jax.jit(tx.update)
    treedef = jax.tree.structure(params)
    paths = [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    ref = {p: np.asarray(v) for p, v in zip(paths, jax.tree.leaves(params))}
    mu = {p: np.zeros_like(v) for p, v in ref.items()}
    nu = {p: np.zeros_like(v) for p, v in ref.items()}
    f32, rng = np.float32, np.random.default_rng(0)
    for t in range(1, 6):
        grads = {p: rng.normal(size=v.shape).astype(f32) for p, v in ref.items()}
        updates, state = update(jax.tree_util.tree_unflatten(treedef, [jnp.asarray(grads[p]) for p in paths]),
                                state, params)
        params = optax.apply_updates(params, updates)
        got = dict(zip(paths, map(np.asarray, jax.tree.leaves(updates))))
        lr = f32(hand_warmup_cosine(t - 1, 1e-2, 8, 2, 1e-4))
        for p, g in grads.items():
            if p == "centers":
                want = -f32(0.5) * g
            elif frozen and p.startswith("backbone/landmark_cnn/"):
                np.testing.assert_array_equal(got[p], np.zeros_like(g), err_msg=p)
                continue
            else:
                mu[p] = f32(0.1) * g + f32(0.9) * mu[p]
                nu[p] = f32(0.001) * g * g + f32(0.999) * nu[p]
                adam = (mu[p] / (1 - f32(0.9) ** t)) / (np.sqrt(nu[p] / (1 - f32(0.999) ** t)) + f32(1e-8))
                scale = f32(0.58 ** (3 - next(v for k, v in HAND_LAYER_IDS.items() if p.startswith(k))))
                want = -(lr * scale) * (adam + f32(hand_weight_decay(p, g)) * ref[p])
            ref[p] = ref[p] + want
            assert np.abs(got[p] - want).max() <= 1e-6 * np.abs(want).max(), (t, p)
    if frozen:  # no Adam moments are kept for the frozen tensors
        kept = {path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
        assert not any("landmark_cnn" in k for k in kept)


def test_adamw_groups_rules_first_match_and_frozen():
    """param_groups: first matching rule wins, unmatched lr -> 1 and wd -> 0, None freezes, own
    subtrees ignore the rules; one label per distinct (lr, wd, frozen_until)."""
    params = {"a": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "b": {"kernel": jnp.ones((2, 2))},
              "c": {"kernel": jnp.ones((2, 2))}, "w": jnp.ones((3, 2))}
    labels, groups = optim.param_groups(
        params, lr_mults=[("^a/bias$", None), ("^a/", 0.5), ("^b/", 0.5)], wd_mults=[("bias", 0.0), ("kernel", 1.0)],
        frozen_until=[("^c/", 4)], own={"centers": "^w$"})
    assert labels["a"]["bias"] == optim.FROZEN and labels["w"] == "centers"
    assert labels["a"]["kernel"] == labels["b"]["kernel"] != labels["c"]["kernel"]
    assert groups[labels["a"]["kernel"]] == optim.Group(0.5, 1.0, 0)
    assert groups[labels["c"]["kernel"]] == optim.Group(1.0, 1.0, 4)
    assert groups["centers"] is None and len(groups) == 4
    _, groups = optim.param_groups(params, lr_mults=[], wd_mults=[])
    assert list(groups.values()) == [optim.Group(1.0, 0.0, 0)]
    with pytest.raises(ValueError, match=r"lr_mults\[0\]"):
        optim.param_groups(params, lr_mults=[("(", 1.0)])
    with pytest.raises(ValueError, match=r"wd_mults\[1\]"):
        optim.param_groups(params, wd_mults=[("a", 1.0), ("b", None)])
    with pytest.raises(ValueError, match="own transform 'x'"):
        optim.param_groups(params, own={"x": "^nothing$"})
    tx = optim.adamw(params, learning_rate=0.1, lr_mults=[("^a/", 0.5)])
    with pytest.raises(ValueError, match="structure"):
        tx.init({"a": params["a"]})


def test_config_lr_mults_and_wd_mults_overrides():
    """config.optim.lr_mults / wd_mults come before the derived rules; bad entries name their key."""
    params = part_fvit_like_params()
    cfg = optim.optim_config("finetune")
    cfg.epochs, cfg.warmup_epochs, cfg.lr = 4, 0.0, 1e-2
    cfg.lr_mults = (("head_norm/", None), ("block_1/", 2.0))
    cfg.wd_mults = (("(?:^|/)bias$", 1.0),)
    lr_mults, wd_mults = optim.finetune_mults(params, cfg)
    lr, wd = optim.match_mults(params, lr_mults, 1.0), optim.match_mults(params, wd_mults, 0.0)
    assert lr["backbone/vit/head_norm/scale"] is None and lr["backbone/vit/encoder/block_1/mlp/fc1/kernel"] == 2.0
    assert lr["backbone/vit/encoder/block_0/mlp/fc1/kernel"] == pytest.approx(0.58 ** 2)
    assert wd["backbone/vit/encoder/block_0/mlp/fc1/bias"] == 1.0 and wd["backbone/vit/head_norm/scale"] == 0.0
    labels, _ = optim.param_groups(params, lr_mults=lr_mults, wd_mults=wd_mults)
    assert labels["backbone"]["vit"]["head_norm"]["scale"] == optim.FROZEN
    cases = [("lr_mults", (("(", 1.0),), r"optim\.lr_mults\[0\].*regex"),
             ("lr_mults", (("cls", 0.0),), r"optim\.lr_mults\[0\].*None to freeze"),
             ("lr_mults", ("cls",), r"optim\.lr_mults\[0\]"),
             ("wd_mults", (("cls", None),), r"optim\.wd_mults\[0\]"),
             ("wd_mults", (("cls", 1.0), ("no_such_tensor", 1.0)), r"optim\.wd_mults\[1\].*matches no parameter")]
    for key, value, message in cases:
        bad = optim.optim_config("finetune")
        bad[key] = value
        with pytest.raises(ConfigError, match=message):
            optim.finetune_optimizer(params, bad, 10, centers_tx=optax.sgd(1.0))
    bad = optim.optim_config("finetune")
    bad.weight_decay = 0.0
    with pytest.raises(ConfigError, match=r"landmark_optim\.weight_decay=0\.05 needs config\.optim\.weight_decay > 0"):
        optim.finetune_optimizer(params, bad, 10, centers_tx=optax.sgd(1.0), **lafs_rules(bad))


def test_finetune_optimizer_frozen_regex_keeps_those_params_exactly():
    """Frozen params get no Adam step and no weight decay, even with gradients; the others still move."""
    cfg = optim.optim_config("finetune")
    cfg.epochs, cfg.warmup_epochs, cfg.lr = 4, 0.0, 1e-2
    params = part_fvit_like_params()
    tx = optim.finetune_optimizer(params, cfg, 2, centers_tx=optax.sgd(0.5), frozen_regex=lafs_finetune.LANDMARK_REGEX)
    state, new = tx.init(params), params
    for _ in range(3):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, new), state, new)
        new = optax.apply_updates(new, updates)
    jax.tree.map(np.testing.assert_array_equal, new["backbone"]["landmark_cnn"], params["backbone"]["landmark_cnn"])
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new["backbone"]["vit"], params["backbone"]["vit"])
    assert min(jax.tree.leaves(moved)) > 0
    with pytest.raises(ValueError, match="frozen_regex"):
        optim.finetune_optimizer(params, cfg, 2, centers_tx=optax.sgd(0.5), frozen_regex="^nothing_like_this$")


def test_finetune_optimizer_requires_centers_tx_and_valid_config():
    params = part_fvit_like_params()
    cfg = optim.optim_config()
    with pytest.raises(ValueError, match="centers"):
        optim.finetune_optimizer(params, cfg, 10)
    with pytest.raises(ValueError, match="centers"):
        optim.finetune_optimizer(params["backbone"], cfg, 10, centers_tx=optax.sgd(1.0))
    cfg.clip_mode = "tensor"
    with pytest.raises(ConfigError, match=r"optim\.clip_mode"):
        optim.finetune_optimizer(params, cfg, 10, centers_tx=optax.sgd(1.0))
    cfg = optim.optim_config()
    cfg.block_regex = r"nothing_(\d+)"
    with pytest.raises(ValueError, match="block regex"):
        optim.finetune_optimizer(params, cfg, 10, centers_tx=optax.sgd(1.0))
    cfg = optim.optim_config()
    cfg.warmup_epochs = 40.0
    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs"):
        optim.finetune_optimizer(params, cfg, 10, centers_tx=optax.sgd(1.0))


def test_gradient_accumulation_equals_big_batch_step():
    """3 micro-batches with MultiSteps == one update with the mean gradient (the big batch)."""
    cfg = optim.optim_config()
    cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.clip_mode = 3, 1.0, 1e-2, "global_norm"
    cfg.clip_norm = 0.5  # active: the mean gradient's norm is above it
    rng = np.random.default_rng(0)
    params = part_fvit_like_params(depth=2)["backbone"]
    x = jnp.asarray(rng.normal(size=(12, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(12, 8)), jnp.float32)

    def loss(p, xb, yb):
        h = xb @ p["vit"]["patch_embedding"]["kernel"] + p["vit"]["patch_embedding"]["bias"]
        h = h @ p["vit"]["encoder"]["block_1"]["attention"]["out"]["kernel"] * p["vit"]["head_norm"]["scale"]
        return jnp.mean((h - yb) ** 2) + 1e-3 * sum(jnp.sum(v ** 2) for v in jax.tree.leaves(p))

    grad = jax.jit(jax.grad(loss))
    big = optim.finetune_optimizer(params, cfg, steps_per_epoch=4)
    cfg_acc = optim.optim_config()
    cfg_acc.update(cfg.to_dict())
    cfg_acc.accum_steps = 3
    small = optim.finetune_optimizer(params, cfg_acc, steps_per_epoch=12)  # same 4 updates per epoch
    p_big, s_big = params, big.init(params)
    p_small, s_small = params, small.init(params)
    big_update, small_update = jax.jit(big.update), jax.jit(small.update)
    for update_index in range(3):
        g = grad(p_big, x, y)  # the big batch: all 12 examples; below the same 12 in 3 micro-batches of 4
        u, s_big = big_update(g, s_big, p_big)
        p_big = jax.tree.map(jnp.add, p_big, u)
        for m in range(3):
            before = p_small
            g = grad(p_small, x[4 * m:4 * m + 4], y[4 * m:4 * m + 4])
            u, s_small = small_update(g, s_small, p_small)
            p_small = jax.tree.map(jnp.add, p_small, u)
            if m < 2:  # no parameter change before the 3rd micro-batch
                jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), before, p_small)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
                     p_big, p_small)
    assert update_index == 2 and float(optim.current_hyperparams(s_small)["learning_rate"]) > 0


def test_finetune_optimizer_on_sharded_params():
    """jit with params sharded over 8 devices: the optimizer state follows the parameter shardings."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lafs_jax import sharding as mesh_lib

    mesh = mesh_lib.make_mesh(None)
    params = part_fvit_like_params()
    params = jax.device_put(params, jax.tree.map(lambda _: NamedSharding(mesh, P()), params))
    params["centers"] = jax.device_put(jnp.zeros((16, 8)), NamedSharding(mesh, P(("data", "model"))))
    tx = optim.finetune_optimizer(params, optim.optim_config(), 4, centers_tx=optax.adam(1e-3))
    state = jax.jit(tx.init)(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    assert updates["centers"].sharding.is_equivalent_to(params["centers"].sharding, 2)
    assert not updates["centers"].sharding.is_fully_replicated
    assert np.isfinite(np.asarray(updates["centers"])).all()


# ---------------------------------------------------------------------------------------------
# pretraining optimizer vs DINO's torch loop (clip_gradients, cancel_gradients_last_layer, AdamW)
# ---------------------------------------------------------------------------------------------

def student_like_params(key=0):
    rng = np.random.default_rng(key)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {"backbone": {"patch_embedding": {"kernel": r(6, 8), "bias": r(8)}, "cls_token": r(1, 1, 8),
                         "encoder": {"block_0": {"mlp": {"fc1": {"kernel": r(8, 8), "bias": r(8)}}}},
                         "head_norm": {"scale": r(8), "bias": r(8)}},
            "head": {"dense_0": {"kernel": r(8, 8), "bias": r(8)}, "last_layer": {"kernel": r(8, 12)}}}


@pytest.mark.parametrize("clip_mode", ["per_tensor", "global_norm"])
def test_pretrain_optimizer_equals_dino_torch_loop(clip_mode):
    steps_per_epoch, n_steps = 3, 8
    cfg = optim.optim_config("pretrain")
    cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.clip_mode, cfg.clip_norm = 4, 1.0, 5e-2, clip_mode, 3.0
    params = student_like_params()
    tx = optim.pretrain_optimizer(params, cfg, steps_per_epoch, global_batch_size=512)  # peak 1e-1
    state = tx.init(params)
    update = jax.jit(tx.update)

    total, warmup, peak = cfg.epochs * steps_per_epoch, steps_per_epoch, 0.1
    wd_table = dino_cosine_table(cfg.weight_decay, cfg.weight_decay_end, total)
    flat0 = {path_str(kp): np.asarray(v, np.float64) for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    tensors = {p: torch.nn.Parameter(torch.tensor(v)) for p, v in flat0.items()}
    regularized = [t for p, t in tensors.items() if not p.endswith("bias") and t.ndim > 1]
    not_regularized = [t for p, t in tensors.items() if p.endswith("bias") or t.ndim <= 1]
    topt = torch.optim.AdamW([{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}],
                             betas=(0.9, 0.999), eps=1e-8)
    rng = np.random.default_rng(2)
    history = []
    for it in range(n_steps):
        grads_np = {p: rng.normal(size=v.shape) * 3 for p, v in flat0.items()}
        grads = jax.tree_util.tree_unflatten(jax.tree.structure(params), [
            jnp.asarray(grads_np[path_str(kp)], jnp.float32) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]])
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(np.asarray(params["head"]["last_layer"]["kernel"]))
        hp = optim.current_hyperparams(state)
        assert float(hp["weight_decay"]) == pytest.approx(wd_table[it], rel=1e-5)
        # the DINO loop, in torch
        for i, g in enumerate(topt.param_groups):
            g["lr"] = hand_warmup_cosine(it, peak, total, warmup, cfg.min_lr)
            if i == 0:
                g["weight_decay"] = wd_table[it]
        for p, t in tensors.items():
            t.grad = torch.tensor(grads_np[p])
        if clip_mode == "per_tensor":  # utils.clip_gradients
            for t in tensors.values():
                coef = 3.0 / (t.grad.norm(2) + 1e-6)
                if coef < 1:
                    t.grad.mul_(coef)
        else:
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), 3.0)
        if it < steps_per_epoch:  # cancel_gradients_last_layer in epoch 0
            tensors["head/last_layer/kernel"].grad = None
        topt.step()
    got = {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for p, t in tensors.items():
        # float32 (optax) vs float64 (torch) over 8 steps of size ~lr = 0.1
        np.testing.assert_allclose(got[p], t.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=p)
    # frozen during epoch 0 (bit-identical), moving afterwards
    for it in range(steps_per_epoch):
        np.testing.assert_array_equal(history[it], np.asarray(flat0["head/last_layer/kernel"], np.float32))
    assert np.abs(history[steps_per_epoch] - history[steps_per_epoch - 1]).max() > 1e-3


def test_pretrain_optimizer_errors_name_config_keys():
    params = student_like_params()
    cfg = optim.optim_config("pretrain")
    cfg.last_layer_regex = "no_such_layer"
    with pytest.raises(ConfigError, match=r"optim\.last_layer_regex"):
        optim.pretrain_optimizer(params, cfg, 3, global_batch_size=64)
    cfg = optim.optim_config("pretrain")
    cfg.layer_decay = 0.5
    with pytest.raises(ConfigError, match=r"optim\.layer_decay"):
        optim.pretrain_optimizer(params, cfg, 3, global_batch_size=64)
    cfg = optim.optim_config("pretrain")
    with pytest.raises(ValueError, match="global batch"):
        optim.pretrain_optimizer(params, cfg, 3)


def test_optim_config_presets_have_same_fields_and_validate():
    a, b = optim.optim_config("finetune"), optim.optim_config("pretrain")
    assert set(a.keys()) == set(b.keys())
    optim.validate_optim_config(a)
    optim.validate_optim_config(b)
    assert (a.layer_decay, a.weight_decay, a.min_lr) == (0.58, 0.1, 1e-6)
    assert lafs_finetune.optimizer_config().weight_decay == 0.05  # the landmark CNN's, fine-tuning's method rule
    assert (b.weight_decay, b.weight_decay_end, b.clip_mode, b.clip_norm, b.freeze_last_layer_epochs) == (
        0.04, 0.4, "per_tensor", 3.0, 1)
    with pytest.raises(ValueError, match="preset"):
        optim.optim_config("other")


# ---------------------------------------------------------------------------------------------
# optimizers by name (sgd, lars, lamb) and the step schedule
# ---------------------------------------------------------------------------------------------

def small_params(key=0):
    """Kernels, biases, a norm scale, and an all-zero kernel (its ||p|| = 0 hits the trust ratio's 1)."""
    rng = np.random.default_rng(key)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {"conv": {"kernel": r(3, 3, 2, 4), "bias": r(4)}, "bn": {"scale": 1 + r(4), "bias": r(4)},
            "dense": {"kernel": r(4, 5), "bias": r(5)}, "zero": {"kernel": jnp.zeros((5, 3), jnp.float32)},
            "head": {"kernel": r(5, 3)}}


def flat_np(tree, dtype=np.float64):
    return {path_str(kp): np.asarray(v, dtype) for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_from(flat, like):
    return jax.tree_util.tree_unflatten(jax.tree.structure(like), [
        jnp.asarray(flat[path_str(kp)], jnp.float32) for kp, _ in jax.tree_util.tree_flatten_with_path(like)[0]])


def assert_moves_close(got, want, start, rtol, err_msg=""):
    """got - start == want - start to rtol, with an absolute slack of a few float32 ulps of the parameter
    (the float32 parameters carry the movement) and 1e-6 of the largest movement."""
    move = want - start
    atol = max(8 * np.finfo(np.float32).eps * np.abs(start).max(), 1e-6 * np.abs(move).max(), 1e-12)
    np.testing.assert_allclose(got - start, move, rtol=rtol, atol=atol, err_msg=err_msg)


def named_cfg(name, **fields):
    cfg = optim.optim_config("finetune")
    cfg.name = name
    cfg.update(fields)
    return cfg


def excluded(path, value):
    """BYOL / LEWEL's exclude_bias_and_bn: biases and 1-D tensors get neither weight decay nor trust ratio."""
    return path.endswith("bias") or np.ndim(value) < 2


@pytest.mark.parametrize("momentum,nesterov", [(0.9, False), (0.9, True), (0.0, False)])
def test_sgd_equals_torch_sgd_param_groups(momentum, nesterov):
    """name='sgd': per tensor torch.optim.SGD with lr = lr(t) x lr factor and weight_decay = wd(t) x wd factor;
    a tensor with lr factor None gets no gradient in torch (no step, no decay)."""
    params = small_params()
    lr_mults = [("^dense/", 0.5), ("^bn/bias$", None)]
    wd_mults = [*optim.no_decay_mults(params), ("^head/", 2.0), ("", 1.0)]
    lr_s, wd_s = optax.linear_schedule(0.1, 0.02, 5), optax.linear_schedule(0.05, 0.01, 5)
    tx = optim.make(params, named_cfg("sgd", momentum=momentum, nesterov=nesterov), learning_rate=lr_s,
                    weight_decay=wd_s, lr_mults=lr_mults, wd_mults=wd_mults)
    state, update = tx.init(params), jax.jit(tx.update)

    p0 = flat_np(params)
    lr_f, wd_f = optim.match_mults(params, lr_mults, 1.0), optim.match_mults(params, wd_mults, 0.0)
    tensors = {p: torch.nn.Parameter(torch.tensor(v)) for p, v in p0.items()}
    groups = [{"params": [t], "name": p} for p, t in tensors.items() if lr_f[p] is not None]
    topt = torch.optim.SGD(groups, lr=0.1, momentum=momentum, nesterov=nesterov)
    rng = np.random.default_rng(3)
    for t in range(5):
        grads = {p: rng.normal(size=v.shape) for p, v in p0.items()}
        updates, state = update(tree_from(grads, params), state, params)
        params = optax.apply_updates(params, updates)
        for g in topt.param_groups:
            g["lr"] = float(lr_s(t)) * lr_f[g["name"]]
            g["weight_decay"] = float(wd_s(t)) * wd_f[g["name"]]
        for p, tt in tensors.items():
            tt.grad = torch.tensor(grads[p]) if lr_f[p] is not None else None
        topt.step()
    got = flat_np(params)
    for p, tt in tensors.items():
        assert_moves_close(got[p], tt.detach().numpy(), p0[p], rtol=1e-5, err_msg=p)
    np.testing.assert_array_equal(got["bn/bias"], p0["bn/bias"].astype(np.float32))
    assert np.abs(got["dense/kernel"] - p0["dense/kernel"]).max() > 1e-2


def numpy_byol_lars(p, g, mu, *, lr, wd, trust_coefficient, momentum, skip_adaptation):
    """One step of BYOL's LARS on one tensor (float64): weight decay and trust ratio unless skipped,
    momentum on the lr-free update, then the lr."""
    u = g
    if not skip_adaptation:
        u = g + wd * p
        p_norm, u_norm = np.linalg.norm(p), np.linalg.norm(u)
        u = u * (trust_coefficient * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0)
    mu = momentum * mu + u
    return p - lr * mu, mu


def test_pretrain_optimizer_lars_equals_numpy_byol_lars():
    """cfg.name='lars' through pretrain_optimizer: warmup + cosine lr, cosine weight decay, biases / 1-D tensors
    excluded from decay and trust ratio, lr factor 0.5 on one layer, one tensor frozen by lr_mults (never
    moves) and the last layer frozen in epoch 0 (no move, momentum not advanced). The all-zero kernel
    gets zero gradients in the first step (0 / 0 norms: ratio 1, no NaN) and then moves with ratio 1."""
    steps_per_epoch, n_steps = 3, 8
    cfg = optim.optim_config("pretrain")
    cfg.name, cfg.clip_mode, cfg.epochs, cfg.warmup_epochs, cfg.lr = "lars", "none", 4, 1.0, 2.0
    cfg.lr_mults = (("^head/dense_0/", 0.5), ("^backbone/head_norm/bias$", None))
    params = student_like_params()
    params["head"]["zero_proj"] = {"kernel": jnp.zeros((8, 4), jnp.float32)}
    tx = optim.pretrain_optimizer(params, cfg, steps_per_epoch, global_batch_size=512)  # peak 4.0
    state, update = tx.init(params), jax.jit(tx.update)

    total, warmup, peak = cfg.epochs * steps_per_epoch, steps_per_epoch, 4.0
    wd_table = dino_cosine_table(cfg.weight_decay, cfg.weight_decay_end, total)
    p0 = flat_np(params)
    ref, mu = dict(p0), {p: np.zeros_like(v) for p, v in p0.items()}
    lr_f = {p: 0.5 if p.startswith("head/dense_0/") else 1.0 for p in p0}
    rng = np.random.default_rng(4)
    history = []
    for it in range(n_steps):
        grads = {p: rng.normal(size=v.shape) for p, v in p0.items()}
        if it == 0:
            grads["head/zero_proj/kernel"] = np.zeros_like(grads["head/zero_proj/kernel"])
        updates, state = update(tree_from(grads, params), state, params)
        params = optax.apply_updates(params, updates)
        history.append(np.asarray(params["head"]["last_layer"]["kernel"]))
        assert float(optim.current_hyperparams(state)["weight_decay"]) == pytest.approx(wd_table[it], rel=1e-5)
        lr = hand_warmup_cosine(it, peak, total, warmup, cfg.min_lr)
        for p in p0:
            if p == "backbone/head_norm/bias" or (p == "head/last_layer/kernel" and it < steps_per_epoch):
                continue
            ref[p], mu[p] = numpy_byol_lars(ref[p], grads[p], mu[p], lr=lr * lr_f[p], wd=wd_table[it],
                                            trust_coefficient=0.001, momentum=0.9,
                                            skip_adaptation=excluded(p, p0[p]))
    got = flat_np(params)
    assert all(np.isfinite(v).all() for v in got.values())
    for p in p0:
        assert_moves_close(got[p], ref[p], p0[p], rtol=1e-4, err_msg=p)
    np.testing.assert_array_equal(got["backbone/head_norm/bias"], p0["backbone/head_norm/bias"].astype(np.float32))
    for it in range(steps_per_epoch):
        np.testing.assert_array_equal(history[it], p0["head/last_layer/kernel"].astype(np.float32))
    assert np.abs(history[steps_per_epoch] - history[steps_per_epoch - 1]).max() > 0
    # the trust ratio acts: a kernel moves ~ lr x 1e-3 x ||p|| per step, a bias ~ lr x |g|
    rel = lambda p: np.linalg.norm(got[p] - p0[p]) / np.linalg.norm(p0[p])  # noqa: E731
    assert rel("backbone/encoder/block_0/mlp/fc1/kernel") < 0.1 < rel("backbone/encoder/block_0/mlp/fc1/bias")
    assert np.abs(got["head/zero_proj/kernel"]).max() > 0


def test_lars_equals_optax_lars_with_masks():
    """Constant lr: name='lars' equals optax.lars with the no-decay tensors masked out of both the weight
    decay and the trust ratio (optax.lars traces after the lr, equal for a constant lr)."""
    params = small_params(1)
    wd_mults = [*optim.no_decay_mults(params), ("", 1.0)]
    tx = optim.make(params, named_cfg("lars", trust_coefficient=0.02, momentum=0.8), learning_rate=0.5,
                    weight_decay=0.01, wd_mults=wd_mults)
    mask = jax.tree_util.tree_map_with_path(lambda kp, v: not excluded(path_str(kp), v), params)
    ref_tx = optax.lars(0.5, weight_decay=0.01, weight_decay_mask=mask, trust_coefficient=0.02,
                        trust_ratio_mask=mask, momentum=0.8)
    p, q, s, r = params, params, tx.init(params), ref_tx.init(params)
    rng = np.random.default_rng(5)
    for _ in range(4):
        g = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), params)
        u, s = tx.update(g, s, p)
        v, r = ref_tx.update(g, r, q)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
    got, want, p0 = flat_np(p), flat_np(q), flat_np(params)
    for k in p0:
        assert_moves_close(got[k], want[k], p0[k], rtol=1e-5, err_msg=k)


def test_lamb_equals_optax_lamb_and_adam():
    """name='lamb': decayed tensors equal optax.lamb (Adam moments, + wd p, ||p|| / ||u||); the no-decay
    tensors (biases, norm scale) get neither decay nor trust ratio, i.e. plain Adam (optax.adam)."""
    params = small_params(2)
    wd_mults = [*optim.no_decay_mults(params), ("", 1.0)]
    b1, b2, eps, lr, wd = 0.8, 0.99, 1e-6, 0.01, 0.05
    tx = optim.make(params, named_cfg("lamb", b1=b1, b2=b2, eps=eps), learning_rate=lr, weight_decay=wd,
                    wd_mults=wd_mults)
    mask = jax.tree_util.tree_map_with_path(lambda kp, v: not excluded(path_str(kp), v), params)
    refs = {"lamb": optax.lamb(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask),
            "adam": optax.adam(lr, b1=b1, b2=b2, eps=eps)}
    p, s = params, tx.init(params)
    q = {k: params for k in refs}
    r = {k: t.init(params) for k, t in refs.items()}
    rng = np.random.default_rng(6)
    for _ in range(4):
        g = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), params)
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        for k, t in refs.items():
            v, r[k] = t.update(g, r[k], q[k])
            q[k] = optax.apply_updates(q[k], v)
    got, p0 = flat_np(p), flat_np(params)
    want = {k: flat_np(v) for k, v in q.items()}
    for k in p0:
        assert_moves_close(got[k], want["adam" if excluded(k, p0[k]) else "lamb"][k], p0[k], rtol=1e-5, err_msg=k)
    # the trust ratio acts on the decayed kernels: one lamb step moves ||p|| x lr, an Adam step ~ lr per entry
    k = "dense/kernel"
    assert not np.allclose(want["lamb"][k], want["adam"][k], rtol=1e-3)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_name_applies_lr_factors_and_freezing(name):
    """For each update rule: lr factor 0.5 halves the first update exactly; lr factor None never moves;
    frozen_until N gives zero updates for N updates and then the first update of an unfrozen optimizer
    (state not advanced while frozen)."""
    params = small_params(3)
    cfg = named_cfg(name)
    wd_mults = [*optim.no_decay_mults(params), ("", 1.0)]
    common = dict(learning_rate=0.05, weight_decay=0.1, wd_mults=wd_mults, frozen_until=[("^head/", 2)])
    tx_half = optim.make(params, cfg, lr_mults=[("^dense/", 0.5), ("^bn/bias$", None)], **common)
    tx_one = optim.make(params, cfg, lr_mults=[("^bn/bias$", None)], **common)
    fresh = optim.make(params, cfg, learning_rate=0.05, weight_decay=0.1, wd_mults=wd_mults)
    rng = np.random.default_rng(7)
    grads = [jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), params) for _ in range(3)]
    u_half, _ = tx_half.update(grads[0], tx_half.init(params), params)
    u_one, _ = tx_one.update(grads[0], tx_one.init(params), params)
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(np.asarray(u_half["dense"][k]), 0.5 * np.asarray(u_one["dense"][k]), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(u_half["conv"][k]), np.asarray(u_one["conv"][k]))
    p, s = params, tx_half.init(params)
    for t, g in enumerate(grads):
        u, s = tx_half.update(g, s, p)
        p = optax.apply_updates(p, u)
        np.testing.assert_array_equal(np.asarray(p["bn"]["bias"]), np.asarray(params["bn"]["bias"]))
        if t < 2:
            np.testing.assert_array_equal(np.asarray(p["head"]["kernel"]), np.asarray(params["head"]["kernel"]))
    u_fresh, _ = fresh.update(grads[2], fresh.init(params), params)
    np.testing.assert_allclose(np.asarray(u["head"]["kernel"]), np.asarray(u_fresh["head"]["kernel"]), rtol=1e-6)
    assert np.abs(np.asarray(u["head"]["kernel"])).max() > 0


def test_adamw_wrapper_is_make_with_name_adamw():
    """`adamw(...)` and `make(params, cfg)` with the default name give bit-identical updates."""
    params = small_params(4)
    rules = dict(lr_mults=[("^dense/", 0.5)], wd_mults=[*optim.no_decay_mults(params), ("", 1.0)],
                 frozen_until=[("^head/", 1)])
    cfg = optim.optim_config()
    assert cfg.name == "adamw"
    cfg.b1, cfg.b2, cfg.eps = 0.8, 0.95, 1e-7
    a = optim.adamw(params, learning_rate=0.01, weight_decay=0.1, b1=0.8, b2=0.95, eps=1e-7, **rules)
    b = optim.make(params, cfg, learning_rate=0.01, weight_decay=0.1, **rules)
    pa, pb, sa, sb = params, params, a.init(params), b.init(params)
    rng = np.random.default_rng(8)
    for _ in range(3):
        g = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), params)
        ua, sa = a.update(g, sa, pa)
        ub, sb = b.update(g, sb, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), pa, pb)


def test_finetune_optimizer_uses_cfg_name_sgd():
    """finetune_optimizer with name='sgd' (no momentum, no warmup): first update of a tensor with layer id i
    is -lr x 0.58^(3 - i) x (g + wd x p), of a bias -lr x 0.58^(3 - i) x g."""
    cfg = optim.optim_config("finetune")
    cfg.name, cfg.momentum, cfg.epochs, cfg.warmup_epochs, cfg.lr = "sgd", 0.0, 4, 0.0, 1e-2
    params = part_fvit_like_params(depth=2)
    tx = optim.finetune_optimizer(params, cfg, 2, centers_tx=optax.sgd(0.5))
    grads = jax.tree.map(lambda v: jnp.full_like(v, 0.5), params)
    u, _ = tx.update(grads, tx.init(params), params)
    kernel = params["backbone"]["vit"]["encoder"]["block_0"]["attention"]["qkv"]["kernel"]
    want = -1e-2 * 0.58 ** 2 * (0.5 + 0.1 * np.asarray(kernel))
    np.testing.assert_allclose(np.asarray(u["backbone"]["vit"]["encoder"]["block_0"]["attention"]["qkv"]["kernel"]),
                               want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["backbone"]["vit"]["encoder"]["block_1"]["mlp"]["fc1"]["bias"]),
                               -1e-2 * 0.58 * 0.5, rtol=1e-6)


# Hand table of warmup_step: epochs 10, warmup 2 epochs, boundaries at epochs 5 and 8, factor 0.1, peak 1e-3,
# 4 optimizer updates per epoch -> warmup 8 updates, boundaries at updates 20 and 32.
WARMUP_STEP_TABLE = {0: 0.0, 2: 2.5e-4, 4: 5e-4, 7: 8.75e-4, 8: 1e-3, 19: 1e-3, 20: 1e-4, 31: 1e-4, 32: 1e-5,
                     40: 1e-5, 1000: 1e-5}


@pytest.mark.parametrize("steps_per_epoch,accum_steps", [(4, 1), (8, 2)])
def test_warmup_step_schedule_table(steps_per_epoch, accum_steps):
    cfg = optim.optim_config("finetune")
    cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.accum_steps = 10, 2.0, 1e-3, accum_steps
    cfg.schedule, cfg.step_boundaries, cfg.step_factor = "warmup_step", (5, 8), 0.1
    s = optim.schedules(cfg, steps_per_epoch)
    jitted = jax.jit(s["learning_rate"])
    for step, want in WARMUP_STEP_TABLE.items():
        assert float(s["learning_rate"](step)) == pytest.approx(want, rel=1e-6, abs=1e-12), step
        assert float(jitted(jnp.int32(step))) == pytest.approx(want, rel=1e-6, abs=1e-12), step
    assert float(s["weight_decay"](25)) == pytest.approx(0.1)
    cfg.step_boundaries = ()
    assert float(optim.schedules(cfg, steps_per_epoch)["learning_rate"](500)) == pytest.approx(1e-3)


def test_warmup_step_without_warmup_and_repeated_boundaries():
    sched = optim.warmup_step(1.0, 0, [0, 3, 3], 0.5)  # a boundary at the end of warmup applies there
    assert [float(sched(s)) for s in (0, 2, 3, 10)] == pytest.approx([0.5, 0.5, 0.125, 0.125])
    with pytest.raises(ValueError, match="warmup_step"):
        optim.warmup_step(1.0, 5, [3], 0.1)


def test_optimizer_and_schedule_fields_defaults_and_errors():
    for preset in ("finetune", "pretrain"):
        c = optim.optim_config(preset)
        assert (c.name, c.momentum, c.nesterov, c.trust_coefficient) == ("adamw", 0.9, False, 0.001)
        assert (c.schedule, tuple(c.step_boundaries), c.step_factor) == ("warmup_cosine", (), 0.1)
    cases = [({"name": "adam"}, r"optim\.name"),
             ({"schedule": "step"}, r"optim\.schedule"),
             ({"schedule": "warmup_step", "step_boundaries": (20, 10)}, r"optim\.step_boundaries"),
             ({"schedule": "warmup_step", "step_boundaries": (10, 10)}, r"optim\.step_boundaries"),
             ({"schedule": "warmup_step", "step_boundaries": (-1,)}, r"optim\.step_boundaries"),
             ({"schedule": "warmup_step", "step_boundaries": (3,)}, r"optim\.step_boundaries"),  # < warmup 5
             ({"schedule": "warmup_step", "step_boundaries": (34,)}, r"optim\.step_boundaries"),  # >= epochs
             ({"schedule": "warmup_step", "step_boundaries": ("20",)}, r"optim\.step_boundaries"),
             ({"step_boundaries": (20,)}, r"optim\.step_boundaries.*warmup_step"),
             ({"step_factor": 0.0}, r"optim\.step_factor"),
             ({"momentum": 1.0}, r"optim\.momentum"),
             ({"momentum": -0.1}, r"optim\.momentum"),
             ({"nesterov": True}, r"optim\.nesterov"),  # with adamw
             ({"trust_coefficient": 0.0}, r"optim\.trust_coefficient")]
    params = part_fvit_like_params()
    for fields, message in cases:
        cfg = optim.optim_config("finetune")
        cfg.update(fields)
        with pytest.raises(ConfigError, match=message):
            optim.validate_optim_config(cfg)
        with pytest.raises(ConfigError, match=message):
            optim.finetune_optimizer(params, cfg, 10, centers_tx=optax.sgd(1.0))
    ok = optim.optim_config("finetune")
    ok.update({"name": "sgd", "nesterov": True, "momentum": 0.0, "schedule": "warmup_step",
               "step_boundaries": (5, 30.5)})
    optim.validate_optim_config(ok)
    with pytest.raises(ConfigError, match=r"optim\.name"):
        optim.make(params, named_cfg("rmsprop"), learning_rate=0.1)
