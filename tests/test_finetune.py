"""Fine-tuning: mixup targets and the landmark regulariser in the loss, initialisation, config errors,
and a micro end-to-end run on the ORL demo data at 32 px (accuracy rises; an interrupted run resumes
exactly)."""
import os
import re
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import flax.linen as nn
import optax
import pytest
from sigterm_at import SigtermAt

from configs import finetune as finetune_recipe
from configs import lvface as lvface_recipe
from lafs_jax import methods
from lafs_jax import sharding as mesh_lib
from lafs_jax import variables as variables_lib
from lafs_jax.config import ConfigError
from lafs_jax.eval import evaluators as evaluators_lib
from lafs_jax.input import device_augment, pipelines
from lafs_jax.input.orl import build_orl
from lafs_jax.input.synthetic import write_synthetic_rec
from lafs_jax.losses import partial_fc
from lafs_jax.methods.lafs import finetune as lafs_finetune
from lafs_jax.models import presets
from lafs_jax.train import checkpoint, finetune, loop_utils, optim, recognition


MICRO_SIZE = 32  # image side (px) of the micro model


def _micro_tiny(config):
    """configs/finetune.py:tiny's Part fViT shrunk to 32 px: 16 landmarks, a one-block landmark CNN
    (BatchNorm included), a ViT 32 wide and 1 block deep; no dropout anywhere, so a forward pass in train
    mode is a pure function of the inputs. Its programs compile in seconds."""
    m = config.model
    m.image_size, m.patch_size, m.num_landmarks = MICRO_SIZE, 8, 16
    m.dim, m.depth, m.heads, m.head_dim, m.mlp_dim = 32, 1, 2, 16, 64
    m.landmark.blocks, m.landmark.stem_features = ((3, 16, 16, False, "RE", 2),), 8
    m.dropout = m.emb_dropout = m.drop_path_rate = 0.0
    m.landmark.dropout = 0.0
    config.data.image_size = MICRO_SIZE
    return config


@pytest.fixture(scope="module")
def synthetic_rec(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("rec") / "train")
    write_synthetic_rec(prefix, num_classes=6, per_class=4, size=MICRO_SIZE)
    return prefix


def _loss_fn(model, config, mesh, num_classes, hooks=None):
    """recognition.make_loss_fn as (params, batch_stats, teacher, batch, key, weight) -> (loss, (metrics,
    batch_stats)): the landmark regulariser's teacher and weight are the LAFS hooks' constants and inputs."""
    raw = recognition.make_loss_fn(model, hooks, config, mesh, num_classes)

    def loss_fn(params, batch_stats, teacher, batch, key, weight):
        loss, (metrics, stats, _) = raw(params, batch_stats, {}, {"lafs": teacher}, batch, key, {"lafs": weight})
        return loss, (metrics, stats)

    return loss_fn


@pytest.fixture(scope="module")
def setup(synthetic_rec):
    """Micro deterministic Part fViT, one mixed batch, centres, the frozen landmark teacher, the loss
    and its gradient (jitted once for the module)."""
    config = _micro_tiny(finetune_recipe.get_config("tiny"))
    config.data.path = synthetic_rec
    config.data.finetune.mixup_prob = 1.0  # every batch mixed
    config.landmark_reg.mode = "constant"
    mesh = mesh_lib.make_mesh()
    model = presets.build_model(config.model)
    lcnn = presets.build_landmark_cnn(config.model)
    variables = jax.jit(lambda k: presets.init_variables(config.model, k))(jax.random.key(0))
    source = pipelines.make_source(config.data)
    batch = next(pipelines.finetune_batches(source, config.data, batch_size=8, seed=3))
    centers = partial_fc.init_centers(jax.random.key(1), source.num_classes, config.model.dim, mesh)
    params = {"backbone": variables["params"], "centers": centers}
    teacher = lafs_finetune.LafsHooks(config).constants(jax.tree.map(np.asarray, variables))
    loss_fn = _loss_fn(model, config, mesh, source.num_classes)
    loss_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # one program for every test's loss
    forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    landmarks_eval = jax.jit(lambda v, x: lcnn.apply(v, x, train=False))
    return dict(config=config, model=model, lcnn=lcnn, variables=variables, batch=batch, params=params,
                teacher=teacher, loss_and_grad=loss_and_grad, loss=lambda *args: loss_and_grad(*args)[0],
                forward=forward, landmarks_eval=landmarks_eval, num_classes=source.num_classes)


def _dense_cosface(emb, centers, batch, num_classes, s, m):
    """Official soft-target CosFace: s * (cos - m * target), cross-entropy against the soft target."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = centers[:num_classes] / np.linalg.norm(centers[:num_classes], axis=1, keepdims=True)
    cos = e @ w.T
    lam = batch["lam"][:, None]
    target = lam * np.eye(num_classes)[batch["label"]] + (1 - lam) * np.eye(num_classes)[batch["label2"]]
    logits = s * (cos - m * target)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    return float(np.mean(-(target * logp).sum(1)))


def test_mixup_targets_reach_the_loss(setup):
    S = setup
    batch, config = S["batch"], S["config"]
    assert np.all(batch["lam"] < 1) and np.any(batch["label2"] != batch["label"])  # the pipeline mixed
    _, (metrics, _) = S["loss"](S["params"], S["variables"]["batch_stats"], S["teacher"], batch, jax.random.key(2),
                                np.float32(0))
    emb, _ = S["forward"](S["variables"], batch["image"])
    want = _dense_cosface(np.asarray(emb, np.float64), np.asarray(S["params"]["centers"], np.float64),
                          {k: np.asarray(v) for k, v in batch.items()}, S["num_classes"], config.loss.s,
                          config.loss.m3)
    assert float(metrics["cls_loss"]) == pytest.approx(want, rel=1e-4)
    unmixed = dict(batch, label2=batch["label"], lam=np.ones_like(batch["lam"]))
    _, (metrics_unmixed, _) = S["loss"](S["params"], S["variables"]["batch_stats"], S["teacher"], unmixed,
                                        jax.random.key(2), np.float32(0))
    assert abs(float(metrics_unmixed["cls_loss"]) - float(metrics["cls_loss"])) > 1e-3  # label2 / lam matter


def test_landmark_regulariser_value_and_frozen_teacher(setup):
    S = setup
    batch, variables, params, teacher = S["batch"], S["variables"], S["params"], S["teacher"]
    loss, (metrics, _) = S["loss"](params, variables["batch_stats"], teacher, batch, jax.random.key(2),
                                   np.float32(0.5))
    lms = S["forward"](variables, batch["image"])[1]["landmarks"]
    target = S["landmarks_eval"](teacher, batch["image"])
    want = np.mean(np.square((np.asarray(lms) - np.asarray(target)) / (MICRO_SIZE - 1.0)))  # image side - 1
    assert float(metrics["landmark_loss"]) == pytest.approx(float(want), rel=1e-4)
    assert float(metrics["landmark_loss"]) > 0  # train-mode BN statistics differ from the running ones
    assert float(loss) == pytest.approx(float(metrics["cls_loss"]) + 0.5 * float(want), rel=1e-4)
    # The regulariser's gradient reaches the landmark CNN; the teacher is an input, never a parameter.
    def grad(w):
        return S["loss_and_grad"](params, variables["batch_stats"], teacher, batch, jax.random.key(2), w)[1]

    g, g0 = grad(np.float32(1e3)), grad(np.float32(0))
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g["backbone"]["landmark_cnn"],
                        g0["backbone"]["landmark_cnn"])
    assert max(jax.tree.leaves(diff)) > 0


def test_parameter_average_follows_its_formula_and_leaves_training_alone():
    """ema_{t} = d_t ema_{t-1} + (1 - d_t) params_t with d_t = min(decay, (1+t)/(10+t)), replayed in numpy;
    the trained params are those of a run without the average."""
    params = {"backbone": {"w": jnp.array([1.0, -2.0, 3.0])}, "centers": jnp.ones((2, 3))}
    target = np.array([0.5, 0.5, -1.0], np.float32)

    def loss_fn(p, batch_stats, extra, constants, batch, key, inputs):
        loss = jnp.sum(jnp.square(p["backbone"]["w"] * batch["x"] - target)) + jnp.sum(p["centers"] ** 2)
        return loss, ({"loss": loss}, batch_stats, None)

    tx = optax.sgd(0.1)
    batches = [{"x": np.float32(1.0 + 0.1 * i)} for i in range(30)]

    def train(ema_decay):
        step = jax.jit(recognition.make_train_step(loss_fn, tx, jax.random.key(0), ema_decay))
        state = {"step": jnp.int32(0), "params": params, "batch_stats": {}, "opt_state": tx.init(params)}
        if ema_decay:
            state["ema"] = params["backbone"]
        history = []
        for b in batches:
            state, _ = step(state, {}, b, {})
            history.append(np.asarray(state["params"]["backbone"]["w"]))
        return state, history

    state, history = train(0.9)
    plain, plain_history = train(0.0)
    assert "ema" not in plain
    np.testing.assert_array_equal(np.stack(history), np.stack(plain_history))
    ema = np.array([1.0, -2.0, 3.0])
    for t, w in enumerate(history, start=1):
        d = min(0.9, (1 + t) / (10 + t))
        ema = d * ema + (1 - d) * w
    np.testing.assert_allclose(np.asarray(state["ema"]["w"]), ema, rtol=1e-5)
    assert np.max(np.abs(ema - history[-1])) > 1e-3  # the average lags the params: the check can fail


def test_parameter_average_moves_once_per_update_under_accumulation():
    """accum_steps=2 (optax.MultiSteps): the average moves only when the parameters do, with the decay
    of the update count t = 1, 2, ...; replayed in numpy from the parameter history."""
    params = {"backbone": {"w": jnp.array([1.0, -2.0, 3.0])}, "centers": jnp.ones((2, 3))}
    target = np.array([0.5, 0.5, -1.0], np.float32)

    def loss_fn(p, batch_stats, extra, constants, batch, key, inputs):
        loss = jnp.sum(jnp.square(p["backbone"]["w"] * batch["x"] - target)) + jnp.sum(p["centers"] ** 2)
        return loss, ({"loss": loss}, batch_stats, None)

    tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2, use_grad_mean=True).gradient_transformation()
    step = jax.jit(recognition.make_train_step(loss_fn, tx, jax.random.key(0), 0.9))
    state = {"step": jnp.int32(0), "params": params, "batch_stats": {}, "opt_state": tx.init(params),
             "ema": params["backbone"]}
    ema, t = np.array([1.0, -2.0, 3.0]), 0
    previous = np.asarray(params["backbone"]["w"])
    for i in range(12):
        state, metrics = step(state, {}, {"x": np.float32(1.0 + 0.1 * i)}, {})
        w = np.asarray(state["params"]["backbone"]["w"])
        if i % 2 == 1:  # the inner optimizer stepped on the second micro-batch of each pair
            assert not np.array_equal(w, previous)
            t += 1
            d = min(0.9, (1 + t) / (10 + t))
            ema = d * ema + (1 - d) * w
            assert float(metrics["ema_decay"]) == pytest.approx(d)
        else:
            np.testing.assert_array_equal(w, previous)
        previous = w
        np.testing.assert_allclose(np.asarray(state["ema"]["w"]), ema, rtol=1e-6)
    assert t == 6


def test_lr_scaling_counts_the_images_of_one_update():
    """With accumulation, linear lr scaling uses batch x accum_steps (the images behind one AdamW update)."""
    config = finetune_recipe.get_config("tiny")
    config.batch_size, config.optim.accum_steps = 32, 3
    config.optim.lr, config.optim.lr_scaling, config.optim.lr_base_batch_size = 1e-3, "linear", 256
    config.optim.warmup_epochs = 0.0
    params = {"backbone": {"vit": {"head_norm": {"scale": jnp.ones(4)}}}, "centers": jnp.zeros((8, 4))}
    tx = recognition.make_optimizer(config, params, steps_per_epoch=9, total_steps=90)
    state = jax.jit(tx.init)(params)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    for _ in range(3):  # one optimizer update
        _, state = update(grads, state, params)
    got = float(optim.current_hyperparams(state)["learning_rate"])
    assert got == pytest.approx(1e-3 * 96 / 256, rel=1e-5)


def test_frozen_landmark_cnn_gives_eval_mode_landmarks_and_no_gradient(setup):
    """freeze_landmark_cnn: the patches sit where the landmark CNN in eval mode puts them, its params get
    a zero gradient and its BatchNorm statistics are returned unchanged."""
    S = setup
    config = S["config"].copy_and_resolve_references()
    config.freeze_landmark_cnn, config.landmark_reg.mode = True, "none"
    loss_fn = _loss_fn(S["model"], config, mesh_lib.make_mesh(), S["num_classes"])
    batch, variables, params = S["batch"], S["variables"], S["params"]
    (loss, (metrics, stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, variables["batch_stats"], {}, batch, jax.random.key(2), np.float32(0))
    lm_eval = S["landmarks_eval"]({k: v["landmark_cnn"] for k, v in variables.items()}, batch["image"])
    emb, _ = jax.jit(lambda v, x, lm: S["model"].apply(v, x, train=True, landmarks=lm, mutable=["batch_stats"])[0])(
        variables, batch["image"], lm_eval)
    want = _dense_cosface(np.asarray(emb, np.float64), np.asarray(params["centers"], np.float64),
                          {k: np.asarray(v) for k, v in batch.items()}, S["num_classes"], config.loss.s, config.loss.m3)
    assert float(metrics["cls_loss"]) == pytest.approx(want, rel=1e-4)
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads["backbone"]["landmark_cnn"]))
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["backbone"]["vit"])) > 0
    jax.tree.map(np.testing.assert_array_equal, stats, variables["batch_stats"])
    # unfrozen, the landmarks come from train mode (batch statistics) and do get a gradient
    _, grads_live = S["loss_and_grad"](params, variables["batch_stats"], S["teacher"], batch, jax.random.key(2),
                                       np.float32(0))
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_live["backbone"]["landmark_cnn"])) > 0


class _FlatDense(nn.Module):
    """A stand-in backbone (images -> (Dense embedding, {})) so the loss wiring compiles in a second."""

    @nn.compact
    def __call__(self, images, train, landmarks=None):
        return nn.Dense(16)(images.reshape(images.shape[0], -1)), {}


def test_arcface_fallback_reaches_the_loss():
    """loss.arcface_fallback is what the step's margin uses: with targets at theta = pi (cos -1) ArcFace's
    th/mm fallback changes the loss, and the step's loss equals partial_fc_loss with that fallback."""
    config = finetune_recipe.get_config("tiny")
    config.loss.m2, config.loss.m3 = 0.5, 0.0
    mesh = mesh_lib.make_mesh()
    model, c = _FlatDense(), 6
    images = np.asarray(jax.random.normal(jax.random.key(0), (8, 4, 4, 3)))
    variables = model.init(jax.random.key(1), images, train=False)
    emb = np.asarray(model.apply(variables, images, train=False)[0])
    label = np.arange(8, dtype=np.int32) % c
    centers = np.zeros((8, 16), np.float32)
    centers[:c] = -emb[:c]  # samples 0..c-1 sit at theta = pi from their class centre
    params = {"backbone": variables["params"], "centers": jnp.asarray(centers)}
    batch = {"image": images, "label": label, "label2": label, "lam": np.ones(8, np.float32)}
    labels = {k: batch[k] for k in ("label", "label2", "lam")}
    got = {}
    for fallback in ("th_mm", "none"):
        config.loss.arcface_fallback = fallback
        loss_fn = _loss_fn(model, config, mesh, c, hooks=())
        _, (metrics, _) = jax.jit(loss_fn)(params, {}, {}, batch, jax.random.key(2), np.float32(0))
        direct = jax.jit(lambda e, w: partial_fc.partial_fc_loss(e, labels, w, jax.random.key(0), mesh=mesh,
                                                                 num_classes=c, m2=0.5, s=config.loss.s,
                                                                 fallback=fallback))
        want, _ = direct(jnp.asarray(emb), params["centers"])
        # rel 1e-4: two programs embed the batch, and at theta = pi arccos magnifies their float rounding;
        # the fallbacks differ by far more (below)
        assert float(metrics["cls_loss"]) == pytest.approx(float(want), rel=1e-4)
        got[fallback] = float(metrics["cls_loss"])
    assert abs(got["th_mm"] - got["none"]) > 1e-2
    assert finetune_recipe.get_config().loss.arcface_fallback == "th_mm"  # InsightFace's ArcFace


def test_centers_init_default_is_the_official_xavier_uniform():
    config = finetune_recipe.get_config("tiny")
    mesh = mesh_lib.make_mesh()
    w = np.asarray(recognition.make_centers(config, jax.random.key(0), 1001, 64, mesh))
    assert config.loss.centers_init == "xavier_uniform"
    assert abs(w[:1001].std() - np.sqrt(2.0 / (1001 + 64))) < 1e-3  # 0.043, not 0.01
    config.loss.centers_init = "normal_0.01"
    w = np.asarray(recognition.make_centers(config, jax.random.key(0), 1001, 64, mesh))
    assert abs(w[:1001].std() - 0.01) < 5e-4


def test_landmark_weight_schedule():
    reg = finetune_recipe.get_config("tiny").landmark_reg
    reg.mode = "schedule"
    got = [lafs_finetune.landmark_weight(reg, e) for e in (0, 7, 8, 13, 14, 20, 21, 27, 28, 40)]
    assert got == [1000.0, 1000.0, 100.0, 100.0, 1.0, 1.0, 0.11, 0.11, 0.0, 0.0]
    reg.mode = "constant"
    assert lafs_finetune.landmark_weight(reg, 3) == 0.1
    reg.mode = "none"
    assert lafs_finetune.landmark_weight(reg, 3) == 0.0


def test_initialisation_from_variables_directories(tmp_path):
    config = finetune_recipe.get_config("tiny")
    init = jax.jit(lambda k: presets.init_variables(config.model, k))
    variables = jax.tree.map(np.asarray, init(jax.random.key(0)))
    other = jax.tree.map(np.asarray, init(jax.random.key(5)))
    # a pretraining teacher: TokenViT params only
    variables_lib.save_variables(str(tmp_path / "teacher"), {"params": other["params"]["vit"]}, {})
    # a full backbone (e.g. converted official checkpoint) providing the landmark CNN
    variables_lib.save_variables(str(tmp_path / "full"), other, {})
    config.init.backbone = str(tmp_path / "teacher")
    out, origin = finetune.initial_variables(config, variables)
    assert origin.startswith("token_vit")
    jax.tree.map(np.testing.assert_array_equal, out["params"]["vit"], other["params"]["vit"])
    jax.tree.map(np.testing.assert_array_equal, out["params"]["landmark_cnn"], variables["params"]["landmark_cnn"])
    config.init.landmark_cnn = str(tmp_path / "full")
    out, _ = finetune.initial_variables(config, variables)
    jax.tree.map(np.testing.assert_array_equal, out["params"]["landmark_cnn"], other["params"]["landmark_cnn"])
    jax.tree.map(np.testing.assert_array_equal, out["batch_stats"], other["batch_stats"])
    # a mismatching shape names the parameter
    bad = jax.tree.map(np.copy, other["params"]["vit"])
    bad["patch_embedding"]["kernel"] = np.zeros((5, 5), np.float32)
    variables_lib.save_variables(str(tmp_path / "bad"), {"params": bad}, {})
    config.init.landmark_cnn = ""
    config.init.backbone = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="patch_embedding/kernel' has shape"):
        finetune.initial_variables(config, variables)


def test_patch_order_mismatch_is_refused_unless_asked_for(tmp_path):
    """A DINO-face (grid) teacher into Part fViT names both layouts; the explicit Table 7 (4) switch
    allows it; a LAFS teacher, and directories written before patch_order was recorded, are judged by
    their method / model kind."""
    config = finetune_recipe.get_config("tiny")
    init = jax.jit(lambda k: presets.init_variables(config.model, k))
    variables = jax.tree.map(np.asarray, init(jax.random.key(0)))
    vit = {"params": variables["params"]["vit"]}
    variables_lib.save_variables(str(tmp_path / "dino"), vit, {"kind": "token_vit", "method": "dino", "patch_order": "grid"})
    variables_lib.save_variables(str(tmp_path / "old_dino"), vit, {"kind": "token_vit", "method": "dino"})
    variables_lib.save_variables(str(tmp_path / "lafs"), vit, {"kind": "token_vit", "method": "lafs",
                                                            "patch_order": "landmarks"})
    for name in ("dino", "old_dino"):
        config.init.backbone = str(tmp_path / name)
        with pytest.raises(ConfigError, match=r"pretrained by 'dino' on 'grid' patches .* model\.kind='part_fvit' "
                                              r"feeds 'landmarks' patches.*allow_patch_order_change"):
            finetune.initial_variables(config, variables)
    config.init.allow_patch_order_change = True
    out, _ = finetune.initial_variables(config, variables)
    jax.tree.map(np.testing.assert_array_equal, out["params"]["vit"], vit["params"])
    config.init.allow_patch_order_change = False
    config.init.backbone = str(tmp_path / "lafs")
    finetune.initial_variables(config, variables)
    assert finetune.backbone_metadata(config)["patch_order"] == "landmarks"


def test_standard_grid_model_feeds_grid_patches_with_coordinate_noise(tmp_path):
    """model.kind='part_fvit_grid' (official use_standcoord): the tokens are plain-fViT grid patches of the
    half-pixel-shifted image; in training the centres get N(0, 3^2) px noise and, with grid_shuffle, are
    resampled with replacement; evaluation uses the plain grid; a LAFS teacher needs the Table 7 (4) switch."""
    from lafs_jax.models import sampling, vit as vit_lib

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    centers = jnp.broadcast_to(sampling.standard_grid_centers(16, 4), (2, 16, 2))
    assert [tuple(map(float, centers[0, n])) for n in (0, 1, 4)] == [(2.0, 2.0), (2.0, 6.0), (6.0, 2.0)]  # x-major
    tokens = sampling.grid_layout(sampling.sample_patches(jnp.asarray(images), centers, 4), 4)
    padded = np.pad(images, ((0, 0), (1, 0), (1, 0), (0, 0)))
    shifted = 0.25 * (padded[:, :-1, :-1] + padded[:, :-1, 1:] + padded[:, 1:, :-1] + padded[:, 1:, 1:])
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(vit_lib.patchify(jnp.asarray(shifted), 4)), atol=1e-5)

    config = finetune_recipe.get_config("tiny")
    config.model.kind, config.model.image_size = "part_fvit_grid", 32
    model = presets.build_model(config.model)
    x = jnp.asarray(rng.uniform(-1, 1, (32, 32, 32, 3)), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.key(0))
    assert set(variables["params"]) == {"vit"}
    grid = np.asarray(sampling.standard_grid_centers(32, 8))

    def centres(m, train):  # the backbone's centres only (its ViT output is not needed here)
        out = jax.jit(lambda v: m.apply(v, x, train=train, rngs={"dropout": jax.random.key(1)})[1])(variables)
        return np.asarray(out["centers"])

    np.testing.assert_array_equal(centres(model, False), np.broadcast_to(grid, (32, 16, 2)))
    d = centres(model, True) - grid
    assert abs(d.std() - 3.0) < 0.2 and abs(d.mean()) < 0.2
    config.model.grid_noise_std, config.model.grid_shuffle = 0.0, True
    shuffled = centres(presets.build_model(config.model), True)
    index = (shuffled[..., 0] - 4) / 8 * 4 + (shuffled[..., 1] - 4) / 8  # every centre is a grid point
    np.testing.assert_array_equal(index, np.round(index))
    assert any(len(set(row)) < 16 for row in index.tolist())

    config.eval.bins = ()
    finetune.validate(config)
    assert presets.patch_order(config.model) == "grid"
    variables_lib.save_variables(str(tmp_path / "lafs"), {"params": variables["params"]["vit"]},
                              {"kind": "token_vit", "method": "lafs", "patch_order": "landmarks"})
    config.init.backbone = str(tmp_path / "lafs")
    with pytest.raises(ConfigError, match="'landmarks' patches .* feeds 'grid' patches"):
        finetune.initial_variables(config, jax.tree.map(np.asarray, variables))
    config.init.allow_patch_order_change = True
    finetune.initial_variables(config, jax.tree.map(np.asarray, variables))


def test_config_errors_name_the_key(tmp_path):
    def expect(key, **changes):
        config = finetune_recipe.get_config("tiny")
        config.eval.bins = ()
        for path, value in changes.items():
            node = config
            parts = path.split("__")
            for p in parts[:-1]:
                node = node[p]
            node[parts[-1]] = value
        with pytest.raises(ConfigError, match=key):
            finetune.validate(config)

    expect(r"loss\.sample_rate", loss__sample_rate=0.0)
    expect(r"landmark_reg\.mode", landmark_reg__mode="schedule", model__kind="fvit")
    expect(r"landmark_reg\.weights", landmark_reg__weights=(1.0, 2.0))
    expect(r"landmark_reg\.boundaries", landmark_reg__boundaries=(7, 5, 20, 27))
    expect(r"init\.backbone", init__backbone=str(tmp_path / "nope"))
    expect(r"init\.kind", init__kind="weird")
    expect(r"eval\.bins\[0\]", eval__bins=(str(tmp_path / "missing.bin"),))
    expect(r"total_steps", total_steps=0)
    expect(r"loss\.centers_optimizer", loss__centers_optimizer="lamb")
    expect(r"ema_decay", ema_decay=1.0)
    expect(r"loss\.centers_init", loss__centers_init="zeros")
    expect(r"loss\.arcface_fallback", loss__arcface_fallback="hard")
    expect(r"loss\.arcface_fallback.*needs loss\.m1 = 1", loss__m1=2.0)
    expect(r"freeze_landmark_cnn", freeze_landmark_cnn=True, model__kind="fvit")
    expect(r"landmark_reg\.mode", freeze_landmark_cnn=True, landmark_reg__mode="constant")
    expect(r"config\.precision='fp8'", precision="fp8")
    for bad in ("webface4m,3pct", "webface4m,1pct,10pct", "tiny,1shot"):
        with pytest.raises(ValueError, match="unknown subset"):
            finetune_recipe.get_config(bad)
    c = finetune_recipe.get_config("ms1mv3,1pct")
    assert (c.data.subset.partition, c.data.subset.k, c.data.finetune.mixup_prob) == (0.01, 0, 0.2)
    s = finetune_recipe.get_config("webface4m,1shot,1pct").data.subset  # the official "1% with 1-shot"
    assert (s.k, s.k_draw, s.partition, s.identity_fraction) == (1, "first", 0.01, 1.0)
    s = finetune_recipe.get_config("webface4m,10shot,10pct,random").data.subset  # seeded random draws
    assert (s.k, s.k_draw, s.partition, s.identity_fraction) == (10, "random", 1.0, 0.1)


def test_layer_decay_from_scratch_is_a_config_error(tmp_path):
    """Layer-wise lr decay < 1 needs a pretrained backbone (or the explicit allow flag)."""
    config = finetune_recipe.get_config("tiny")
    config.eval.bins = ()
    assert config.optim.layer_decay == 1.0 and config.init.backbone == ""
    finetune.validate(config)
    config.optim.layer_decay = 0.58
    with pytest.raises(ConfigError, match=r"optim\.layer_decay=0\.58 .*from scratch.*allow_layer_decay_from_scratch"):
        finetune.validate(config)
    config.optim.allow_layer_decay_from_scratch = True
    finetune.validate(config)
    config.optim.allow_layer_decay_from_scratch = False
    os.makedirs(tmp_path / "teacher")
    config.init.backbone = str(tmp_path / "teacher")
    finetune.validate(config)
    # the recipes: 0.58 for the pretrained-backbone variants, 1.0 where the official script never applies it
    assert finetune_recipe.get_config("webface4m").optim.layer_decay == 0.58
    assert finetune_recipe.get_config("ms1mv3,1shot").optim.layer_decay == 0.58
    official = finetune_recipe.get_config("official")
    assert official.optim.layer_decay == 1.0 and official.data.color_order == "bgr"


@pytest.fixture(scope="module")
def orl_run(tmp_path_factory):
    """configs/finetune.py:tiny with the micro model on the ORL demo data at 32 px: 24 steps, the
    parameter average on, verification on the 900 held-out test pairs at the start, at step 12 and at
    the last step. Returns the config, the workdir and run's result."""
    data = str(tmp_path_factory.mktemp("orl"))
    build_orl(data, size=MICRO_SIZE)
    config = _micro_tiny(finetune_recipe.get_config("tiny"))
    config.data.path = os.path.join(data, "train")
    config.eval.bins = (os.path.join(data, "test.bin"),)
    config.eval.batch_size = 120
    config.total_steps = 24
    config.eval.every_steps = 12  # at the start, step 12 and the last step
    config.checkpoint.every_steps = 1000
    config.ema_decay = 0.9  # the parameter average is part of the resumed state and is what is saved
    config.evals = ml_collections.ConfigDict({"again": evaluators_lib.evaluator_config(
        "verification", bins=config.eval.bins, every_steps=24, batch_size=120)})  # a second, at the end only
    work = str(tmp_path_factory.mktemp("full"))
    return config, work, finetune.run(config, work)


def test_tiny_finetune_improves_verification_and_keeps_the_best_checkpoint(orl_run):
    """Held-out verification rises; every evaluated step is checkpointed with its accuracy, the best one
    is WORKDIR/backbone_best; WORKDIR/backbone is the parameter average of the last step."""
    config, work, full = orl_run
    assert full["verification"]["test"] > full["initial_verification"]["test"] + 0.05, full
    accuracy = {r["step"]: r["val/test/accuracy"] for r in loop_utils.read_metrics(work)
                if "val/test/accuracy" in r and r["step"] > 0}
    best_step = max(accuracy, key=accuracy.get)
    best, best_meta = variables_lib.load_variables(os.path.join(work, finetune.BEST_BACKBONE_DIR))
    assert sorted(accuracy) == [12, 24] and best_meta["step"] == best_step
    again = {r["step"]: r["again/test/accuracy"] for r in loop_utils.read_metrics(work) if "again/test/accuracy" in r}
    assert again == {24: accuracy[24]}  # config.evals runs beside config.eval's sets, on the same embeddings
    assert best_meta["verification"]["accuracy"] == pytest.approx(accuracy[best_step])
    with checkpoint.TrainCheckpointer(os.path.join(work, "checkpoints"), best_fn=finetune.verification_score) as ckpt:
        assert ckpt.all_steps() == [12, 24] and ckpt.best_step() == best_step
        jax.tree.map(np.testing.assert_array_equal, best["params"], ckpt.restore(best_step)["ema"])
        last = ckpt.restore(24)
    out, meta = variables_lib.load_variables(os.path.join(work, "backbone"))
    assert meta["normalization"] == "[-1,1]" and meta["color_order"] == "rgb" and meta["model"]["preset"] == "tiny"
    assert meta["ema_decay"] == 0.9
    jax.tree.map(np.testing.assert_array_equal, out["params"], last["ema"])  # the output is the average
    assert not np.array_equal(out["params"]["vit"]["head_norm"]["scale"],
                              last["params"]["backbone"]["vit"]["head_norm"]["scale"])


def test_tiny_finetune_stopped_by_sigterm_resumes_exactly(orl_run, tmp_path, monkeypatch):
    """SIGTERM at step 11 saves and returns; a second run resumes to step 24 and ends with the
    uninterrupted run's loss and backbone (parameter average and BatchNorm statistics), bit for bit."""
    import contextlib

    config, work, full = orl_run
    config = config.copy_and_resolve_references()
    config.eval.bins = ()  # evaluation reads the state, never changes it
    real_guard = loop_utils.preemption_guard

    @contextlib.contextmanager
    def guard_with_kill():
        with real_guard() as g:
            yield SigtermAt(g, at=11)

    monkeypatch.setattr(loop_utils, "preemption_guard", guard_with_kill)
    first = finetune.run(config, str(tmp_path / "resumed"))
    assert first["preempted"] and first["step"] == 11
    monkeypatch.setattr(loop_utils, "preemption_guard", real_guard)
    second = finetune.run(config, str(tmp_path / "resumed"))
    assert not second["preempted"] and second["step"] == 24
    assert second["final_metrics"]["loss"] == full["final_metrics"]["loss"]
    a, _ = variables_lib.load_variables(os.path.join(work, "backbone"))
    b, _ = variables_lib.load_variables(str(tmp_path / "resumed" / "backbone"))
    assert a["batch_stats"]["landmark_cnn"]  # the landmark CNN trains: its statistics are resumed state too
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("kind", ["part_fvit", "fvit"])
def test_build_train_step_traces_the_step_for_both_backbones(kind):
    """build_train_step gives run's step with abstract arguments (nothing materialised): tracing it
    returns a state of the arguments' structure, shapes and shardings, W split over all 8 devices; a
    grid fViT (no landmarks) traces too. init(key) builds a state of that same structure."""
    config = finetune_recipe.get_config("tiny")
    config.model.kind = kind
    mesh = mesh_lib.make_mesh()
    step, args, shardings, init = finetune.build_train_step(config, mesh, 30, steps_per_epoch=10, total_steps=90)
    state, metrics = jax.eval_shape(step, *args)
    assert jax.tree.structure(state) == jax.tree.structure(args[0])
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(args[0])):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
    w = args[0]["params"]["centers"]
    assert w.shape == (32, config.model.dim) and w.sharding.shard_shape(w.shape) == (4, config.model.dim)
    assert args[2]["image"].shape == (config.batch_size, 112, 112, 3)
    assert "loss" in metrics
    abstract_init = jax.eval_shape(init, jax.random.key(0))
    assert jax.tree.structure(abstract_init) == jax.tree.structure(args[0])


def test_run_trains_the_step_build_train_step_returns(synthetic_rec, tmp_path, monkeypatch):
    """One code path: the step `run` calls, lowered with the arguments it calls it with, and the step
    `build_train_step` returns, lowered with its abstract arguments, are the same HLO text (landmark
    regulariser on, so the methods' constants and per-step inputs are arguments too). Nothing is
    compiled: run stops at its first step."""
    config = _micro_tiny(finetune_recipe.get_config("tiny"))
    config.data.path = synthetic_rec  # 6 classes x 4 images: 3 steps of 8 per epoch
    config.eval.bins = ()
    config.batch_size, config.total_steps = 8, 6
    config.landmark_reg.mode = "schedule"

    class Stop(Exception):
        pass

    lowered = []
    real = recognition.jitted_step

    def spy(program, phase):
        step = real(program, phase)

        def call(*args):
            lowered.append(step.lower(*args).as_text())
            raise Stop

        return call

    monkeypatch.setattr(recognition, "jitted_step", spy)
    with pytest.raises(Stop):
        finetune.run(config, str(tmp_path / "w"))
    monkeypatch.undo()
    step, args, _, _ = finetune.build_train_step(config, mesh_lib.make_mesh(), 6, steps_per_epoch=3, total_steps=6)
    assert set(args[1]) == {"lafs"} and set(args[3]) == {"lafs"}  # the teacher and the regulariser's weight
    assert len(lowered) == 1 and step.lower(*args).as_text() == lowered[0]


def test_the_config_turns_the_methods_on(monkeypatch):
    """The task names no method: `methods.finetune_hooks` picks them from the config (Part fViT's landmark
    CNN for a family that has one, LVFace's curriculum when config.curriculum is set); two methods with
    phases are a ConfigError; the recognition modules of train/ contain no method's name."""
    config = finetune_recipe.get_config("tiny")
    assert [h.name for h in methods.finetune_hooks(config)] == ["lafs"]
    config.model.kind = "fvit"
    assert methods.finetune_hooks(config) == ()
    assert [h.name for h in methods.finetune_hooks(lvface_recipe.get_config("tiny"))] == ["lvface"]
    other = types.SimpleNamespace(validate=lambda c: None, hooks=lambda c: types.SimpleNamespace(name="x", phased=True))
    monkeypatch.setattr(methods, "FINETUNING", (*methods.FINETUNING, other))
    with pytest.raises(ConfigError, match=r"\['lvface', 'x'\] each define training phases"):
        methods.finetune_hooks(lvface_recipe.get_config("tiny"))
    names = re.compile(r"\b(curriculum|landmark|dino|lvface|prototype)", re.IGNORECASE)
    for module in (finetune, recognition, optim):
        with open(module.__file__) as f:
            assert not names.search(f.read()), module.__name__


def test_bad_topologies_fail_before_any_work(tmp_path, monkeypatch):
    """A global batch the devices do not divide, a mesh of the wrong size, a rule naming a missing axis
    or splitting a dimension it does not divide: one error naming the setting, before any data is read."""
    def no_data(*args, **kwargs):
        raise AssertionError("the data source was opened before the topology was checked")

    monkeypatch.setattr(pipelines, "make_source", no_data)

    def expect(match, **changes):
        config = finetune_recipe.get_config("tiny")
        config.eval.bins = ()
        for key, value in changes.items():
            section, _, field = key.rpartition("__")
            (config[section] if section else config)[field] = value
        with pytest.raises(ValueError, match=match):
            finetune.run(config, str(tmp_path / "w"))

    expect(r"config.batch_size=36 does not divide by the 8 devices", batch_size=36)
    expect(r"config.mesh: data=3 x model=2 = 6 devices, but 8 are available", mesh__data=3, mesh__model=2)
    expect(r"'vit/encoder/block_0/mlp/fc1/kernel' names axis 'tensor'",
           sharding_rules=((r"mlp/fc1/kernel$", (None, "tensor")),))
    expect(r"'vit/pos_embedding' splits dimension 1 of shape \(1, 50, 96\) \(50\) over \('data',\) = 8 devices, "
           r"which does not divide it", sharding_rules=((r"pos_embedding$", (None, "data")),))


def test_device_augmentation_feeds_the_step(setup, synthetic_rec):
    """augment_on='device': the pipeline hands decoded uint8 images + stream indices; the step's
    augmentation (crop, jitter, erasing, mixup on device) gives the host layout, and the loss of it is
    finite; run's step traces with the decoded batch."""
    config = ml_collections.ConfigDict(setup["config"].to_dict())
    config.data.augment_on = "device"
    source = pipelines.make_source(config.data)
    batch = next(pipelines.finetune_batches(source, config.data, batch_size=8, seed=3))
    assert batch["image"].dtype == np.uint8 and set(batch) == {"image", "index", "label"}
    aug = jax.jit(lambda b: device_augment.finetune_images(config.data, jax.random.key(5), b))(batch)
    assert aug["image"].shape == setup["batch"]["image"].shape and aug["image"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(aug["label2"]), batch["label"][::-1])  # mixup_prob 1
    loss, _ = setup["loss"](setup["params"], setup["variables"]["batch_stats"], setup["teacher"], aug,
                            jax.random.key(0), np.float32(0.1))
    assert np.isfinite(float(loss))
    mesh = mesh_lib.make_mesh()
    step, args, _, _ = finetune.build_train_step(config, mesh, 30, steps_per_epoch=10, total_steps=90)
    assert args[2]["image"].dtype == jnp.uint8 and set(args[2]) == {"image", "index", "label"}
    state, metrics = jax.eval_shape(step, *args)
    assert "loss" in metrics
