"""Pretraining: LAFS landmark views and grid views (lafs_jax.methods.lafs.views), the teacher-student step
(lafs_jax.train.ssl with the DINO-face and LAFS objectives) and pretrain.run()."""
import importlib.util
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lafs_jax import sharding as mesh_lib
from lafs_jax import variables as variables_lib
from lafs_jax.config import ConfigError
from lafs_jax.eval import evaluators as evaluators_lib
from lafs_jax.input.verification_bin import load_bin, save_bin
from lafs_jax.losses import dino as dino_lib
from lafs_jax.methods.lafs import landmark_cnn as landmark_cnn_lib
from lafs_jax.methods.lafs import views
from lafs_jax.models.sampling import sample_patches
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import loop_utils
from lafs_jax.train import optim as optim_lib
from lafs_jax.train import pretrain
from lafs_jax.train import ssl


def test_noise_has_the_configured_sigma_and_no_gradient():
    lm = jnp.full((64, 49, 2), 50.0)
    out = views.perturb_and_select(lm, jax.random.key(0), noise_std=5.0, num_selected=None)
    assert out.shape == lm.shape
    d = np.asarray(out - lm)
    assert abs(d.std() - 5.0) < 0.15 and abs(d.mean()) < 0.15
    g = jax.grad(lambda x: views.perturb_and_select(x, jax.random.key(0), noise_std=5.0,
                                                    num_selected=None).sum())(lm)
    assert float(jnp.abs(g).max()) == 0.0


def test_selection_draws_with_replacement_per_row():
    rng = np.random.default_rng(0)
    lm = jnp.asarray(rng.uniform(0, 111, size=(16, 49, 2)), jnp.float32)
    out = np.asarray(views.perturb_and_select(lm, jax.random.key(3), noise_std=0.0, num_selected=36))
    assert out.shape == (16, 36, 2)
    lm = np.asarray(lm)
    picked = []
    for row in range(16):
        # every selected point is one of the same row's landmarks
        idx = [int(np.flatnonzero((lm[row] == p).all(-1))[0]) for p in out[row]]
        picked.append(idx)
    picked = np.asarray(picked)
    assert any(len(set(r)) < 36 for r in picked), "36 of 49 with replacement should repeat somewhere in 16 rows"
    assert len({tuple(r) for r in picked}) == 16, "rows draw independently"
    again = views.perturb_and_select(jnp.asarray(lm), jax.random.key(3), noise_std=0.0, num_selected=36)
    np.testing.assert_array_equal(np.asarray(again), out)


def _fake_landmark_fn(images):
    """Landmarks that depend on image content, so a wrong input (aug instead of clean) shows."""
    n = images.shape[0]
    base = jnp.linspace(10.0, 40.0, 9)
    grid = jnp.stack(jnp.meshgrid(base, base, indexing="xy"), -1).reshape(1, 81, 2)
    shift = 20.0 * jnp.mean(images, axis=(1, 2, 3))[:, None, None]
    return jnp.broadcast_to(grid, (n, 81, 2)) + shift


def test_landmark_views_use_clean_for_landmarks_and_aug_for_patches():
    rng = np.random.default_rng(1)
    b, v, s = 3, 2, 48
    clean = jnp.asarray(rng.uniform(-1, 1, size=(b, v, s, s, 3)), jnp.float32)
    aug = jnp.asarray(rng.uniform(-1, 1, size=(b, v, s, s, 3)), jnp.float32)
    tokens = views.landmark_views(_fake_landmark_fn, clean, aug, jax.random.key(0), noise_std=0.0,
                                  num_selected=None, patch_size=4)
    assert tokens.shape == (b, v, 81, 4 * 4 * 3)
    flat_clean, flat_aug = clean.reshape(b * v, s, s, 3), aug.reshape(b * v, s, s, 3)
    expected = sample_patches(flat_aug, _fake_landmark_fn(flat_clean), 4).reshape(tokens.shape)
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(expected), atol=1e-6)
    wrong = sample_patches(flat_aug, _fake_landmark_fn(flat_aug), 4).reshape(tokens.shape)
    assert not np.allclose(np.asarray(tokens), np.asarray(wrong), atol=1e-3)
    local = views.landmark_views(_fake_landmark_fn, clean, aug, jax.random.key(0), noise_std=5.0,
                                 num_selected=36, patch_size=4)
    assert local.shape == (b, v, 36, 48)


def test_landmark_views_with_per_sample_keys_follow_each_sample():
    """One key per sample (device augmentation): a sample's noise and subset depend on its key only,
    so permuting the batch (and its keys) permutes the tokens; random landmark views likewise."""
    rng = np.random.default_rng(2)
    b, v, s = 3, 2, 32
    clean = jnp.asarray(rng.uniform(-1, 1, size=(b, v, s, s, 3)), jnp.float32)
    keys = jax.random.split(jax.random.key(4), b)
    perm = np.asarray([2, 0, 1])
    for fn in (lambda c, k: views.landmark_views(_fake_landmark_fn, c, c, k, noise_std=5.0, num_selected=6,
                                                 patch_size=4),
               lambda c, k: views.random_landmark_views(c, k, num_landmarks=6, patch_size=4)):
        a, p = fn(clean, keys), fn(clean[perm], keys[perm])
        assert a.shape == (b, v, 6, 48)
        np.testing.assert_array_equal(np.asarray(a)[perm], np.asarray(p))
    with pytest.raises(ValueError, match="one per sample"):
        views.random_landmark_views(clean, jax.random.split(jax.random.key(0), 2), num_landmarks=6, patch_size=4)


def test_landmark_views_give_no_gradient_to_the_landmark_function():
    rng = np.random.default_rng(2)
    clean = jnp.asarray(rng.uniform(-1, 1, size=(1, 2, 32, 32, 3)), jnp.float32)

    def tokens_sum(scale):
        fn = lambda im: _fake_landmark_fn(im) * scale
        return views.landmark_views(fn, clean, clean, jax.random.key(0), noise_std=5.0, num_selected=8,
                                    patch_size=4).sum()

    assert float(jax.grad(tokens_sum)(1.0)) == 0.0


def test_grid_tokens_match_numpy_patchify_in_x_y_c_order():
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, size=(2, 3, 48, 48, 3)).astype(np.float32)
    tokens = np.asarray(views.grid_tokens(jnp.asarray(images), grid_size=48, patch_size=8))
    assert tokens.shape == (2, 3, 36, 192)
    ref = np.empty_like(tokens)
    for gy in range(6):
        for gx in range(6):
            for i in range(8):  # x offset
                for j in range(8):  # y offset
                    ref[:, :, gy * 6 + gx, (i * 8 + j) * 3:(i * 8 + j) * 3 + 3] = images[:, :, gy * 8 + j, gx * 8 + i]
    np.testing.assert_array_equal(tokens, ref)
    # the same tokens as the landmark sampler at grid centres (+0.5 cancels grid_sample's half-pixel shift)
    c = np.arange(6) * 8 + 4.5
    centers = np.stack(np.meshgrid(c, c, indexing="xy"), -1).reshape(1, 36, 2).repeat(6, 0)
    sampled = sample_patches(jnp.asarray(images.reshape(6, 48, 48, 3)), jnp.asarray(centers, jnp.float32), 8)
    np.testing.assert_allclose(np.asarray(sampled).reshape(tokens.shape), tokens, atol=2e-5)


def test_grid_tokens_resize_and_errors():
    images = jnp.ones((4, 112, 112, 3))
    tokens = views.grid_tokens(images, grid_size=48, patch_size=8)
    assert tokens.shape == (4, 36, 192)
    np.testing.assert_allclose(np.asarray(tokens), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        views.grid_tokens(images, grid_size=50, patch_size=8)
    with pytest.raises(ValueError, match="clean"):
        views.landmark_views(_fake_landmark_fn, jnp.ones((1, 2, 8, 8, 3)), jnp.ones((1, 2, 8, 9, 3)),
                             jax.random.key(0), noise_std=0.0, num_selected=None, patch_size=4)


# ------------------------------------------------------------------------------------------------
# The pretraining step and run(): a very small model (32 px views, depth 1) on 8 CPU devices.
# ------------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32  # view side in the tests (px)


def _recipe(method: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"recipe_{method}", os.path.join(ROOT, "configs", f"{method}_pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny")


def _small_config(method: str, data_path: str = "") -> ml_collections.ConfigDict:
    """The :tiny recipe shrunk further: 32 px views, depth-1 ViT, 64 prototypes, batch 8."""
    c = _recipe(method)
    c.unlock()
    m = c.model
    m.image_size, m.num_landmarks, m.dim, m.depth, m.heads, m.head_dim, m.mlp_dim = SIZE, 16, 48, 1, 2, 24, 96
    m.dino_head.out_dim, m.dino_head.hidden_dim, m.dino_head.bottleneck_dim = 64, 64, 32
    c.data.path = data_path
    c.data.augment_on = "host"  # the step tests feed view batches; 'device' is covered below and in test_device_augment.py
    if method == "lafs":  # each recipe carries its own views' section
        c.data.lafs.view_size, c.data.lafs.local_views = SIZE, 2
    else:
        c.data.dino.global_size, c.data.dino.local_size, c.data.dino.local_crops = SIZE, 16, 2
    m.landmark.blocks = m.landmark.blocks[:2]  # 32 -> 16 -> 8 -> 4 px
    c.batch_size = 8
    c.optim.epochs, c.optim.warmup_epochs = 4, 1.0
    c.dino.warmup_teacher_temp_epochs = 2
    if method == "lafs":
        c.lafs.num_local_landmarks = 4
    c.log_every_steps = 1
    c.checkpoint.every_steps = 2
    c.lock()
    return c


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    from lafs_jax.input.synthetic import write_synthetic_rec

    prefix = str(tmp_path_factory.mktemp("pretrain_data") / "train")
    write_synthetic_rec(prefix, num_classes=4, per_class=8, size=48)  # 32 images -> 4 steps per epoch at batch 8
    return prefix


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b = config.batch_size
    if config.method == "dino":
        d = config.data.dino
        return {"global": rng.uniform(-1, 1, (b, d.global_crops, d.global_size, d.global_size, 3)).astype(np.float32),
                "local": rng.uniform(-1, 1, (b, d.local_crops, d.local_size, d.local_size, 3)).astype(np.float32)}
    v = config.data.lafs
    out = {}
    for kind, n in (("global", v.global_views), ("local", v.local_views)):
        clean = rng.uniform(-1, 1, (b, n, v.view_size, v.view_size, 3)).astype(np.float32)
        out[f"{kind}_clean"] = clean
        out[f"{kind}_aug"] = np.clip(clean + rng.normal(0, 0.2, clean.shape), -1, 1).astype(np.float32)
    return out


def _init_landmarks(objective, seed):
    return jax.jit(lambda k: objective.landmark_cnn.init({"params": k}, jnp.zeros((1, SIZE, SIZE, 3)),
                                                        train=False))(jax.random.key(seed))


def _views(objective, batch, landmarks, key):
    """The objective's views of a view batch (LAFS reads the frozen landmark CNN from the state)."""
    return objective.views({"landmark_cnn": landmarks}, batch, key)


class Trainer:
    """Objective, optimizer, initial state and jitted step of a config on a mesh (ssl.build, as run builds
    them; for step-level tests)."""

    def __init__(self, config, mesh, steps_per_epoch=4, total_steps=16):
        self.config, self.mesh = config, mesh
        self.objective = pretrain.objective(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        task = ssl.build(self.objective, config, mesh, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        self.tx, self.shardings, self.step = task.tx, task.shardings, task.step
        lm = None
        if config.method == "lafs":
            lm = jax.device_get(_init_landmarks(self.objective, 7))
        self.init = lambda: task.init(jax.random.key(0), lm)

    def run(self, state, batch, rng):
        return self.step(state, mesh_lib.global_batch(batch, self.mesh), rng)


def _host(tree):
    """numpy copies (typed PRNG keys as their key data)."""
    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(jax.device_get(x))
    return jax.tree.map(one, tree)


def _no_dropout(c):
    """Dropout and drop-path off: a smaller program to compile (the resume test keeps them on)."""
    c.model.dropout = c.model.emb_dropout = c.model.drop_path_rate = 0.0


def _global_views_only(c):
    """No local views: the two global views still make a loss; the step is a smaller program to compile
    (for tests that read no local view)."""
    if c.method == "lafs":
        c.data.lafs.local_views = 0
    else:
        c.data.dino.local_crops = 0


def _fixed_batch_config(method):
    """No warmup, no frozen last layer, a constant teacher temperature, deterministic teacher."""
    c = _small_config(method)
    c.unlock()
    c.optim.warmup_epochs, c.optim.freeze_last_layer_epochs, c.optim.lr = 0.0, 0, 2e-3
    c.dino.teacher_train_mode = False
    c.dino.warmup_teacher_temp = c.dino.teacher_temp = 0.04
    _no_dropout(c)
    c.lock()
    return c


# The step tests run on a ('data' 4, 'model' 2) mesh with the MLP kernels split over 'model' by
# config.sharding_rules (the batch is still split over all 8 devices); the 1-device test compares.
MLP_RULES = ((r"mlp/fc1/kernel$", (None, "model")), (r"mlp/fc2/kernel$", ("model", None)))


@pytest.fixture(scope="module")
def lafs_trainer():
    c = _fixed_batch_config("lafs")
    c.unlock()
    c.mesh.data, c.mesh.model, c.sharding_rules = 4, 2, MLP_RULES
    _global_views_only(c)  # the teacher and centre read only these; the runs below make local views
    c.lock()
    return Trainer(c, mesh_lib.make_mesh(c.mesh))


def test_loss_decreases_on_a_fixed_batch(lafs_trainer):
    """Fixed batch and step key, and teacher and centre put back to their initial values before every
    step: the targets are fixed, so the student's cross-entropy to them must fall."""
    t = lafs_trainer
    batch = _batch(t.config)
    state = t.init()
    teacher0, center0 = _host(state["teacher"]), _host(state["center"])
    losses = []
    for _ in range(6):
        state = dict(state, teacher=jax.device_put(teacher0, t.shardings["teacher"]),
                     center=jax.device_put(center0, t.shardings["center"]))
        state, metrics = t.run(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05 and min(losses) == losses[-1], losses


def test_teacher_is_the_ema_of_the_student_and_center_is_updated(lafs_trainer):
    t = lafs_trainer
    batch = _batch(t.config, seed=1)
    state = t.init()
    state, _ = t.run(state, batch, jax.random.key(0))  # a first step so the centre is not zero
    before = _host(state)
    rng = jax.random.key(5)
    after, metrics = t.run(state, batch, rng)
    after = _host(after)
    m = np.float32(optim_lib.cosine_schedule(0.996, 1.0, 16)(1))
    np.testing.assert_allclose(float(metrics["momentum"]), m, rtol=1e-7)
    expected = jax.tree.map(lambda te, st: te * m + (np.float32(1) - m) * st, before["teacher"], after["student"])
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(after["teacher"])[0], jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-7 * max(1.0, float(np.abs(want).max())),
                                   err_msg=mesh_lib.path_str(path))
    assert not np.array_equal(after["student"]["head"]["dense_0"]["kernel"], before["student"]["head"]["dense_0"]["kernel"])
    # centre: 0.9 * old + 0.1 * mean of this step's teacher logits (deterministic teacher in this config)
    @jax.jit
    def teacher_logits(batch_, landmarks, teacher):
        k_views, _, k_teacher = jax.random.split(rng, 3)  # the step's keys
        views = _views(t.objective, batch_, landmarks, k_views)
        return t.objective.logits(teacher, views, k_teacher, train=False, names=("global",))

    logits = np.asarray(teacher_logits(batch, before["landmark_cnn"], before["teacher"]))
    want_center = before["center"] * np.float32(0.9) + logits.reshape(-1, logits.shape[-1]).mean(0) * np.float32(0.1)
    np.testing.assert_allclose(after["center"], want_center, rtol=1e-5, atol=1e-6)
    # the frozen landmark CNN rides through the step unchanged, bit for bit
    for a, b in zip(jax.tree.leaves(after["landmark_cnn"]), jax.tree.leaves(before["landmark_cnn"])):
        np.testing.assert_array_equal(a, b)


def test_koleo_term_is_added_on_the_student_global_embeddings():
    """dino.koleo_weight > 0: loss = DINO loss + w x KoLeo of the student's backbone embeddings of each
    global view over the batch (recomputed here from the state before the step, same keys)."""
    c = _fixed_batch_config("dino")
    c.unlock()
    c.dino.koleo_weight = 0.5
    _global_views_only(c)  # the KoLeo term reads the global views only
    c.lock()
    t = Trainer(c, mesh_lib.make_mesh(c.mesh))
    batch = _batch(c)
    state = t.init()
    student = _host(state["student"])
    rng = jax.random.key(3)
    _, metrics = t.run(state, batch, rng)

    @jax.jit
    def koleo(student_, batch_):
        k_views, k_student, _ = jax.random.split(rng, 3)  # the step's keys
        views = _views(t.objective, batch_, None, k_views)
        _, emb = t.objective.logits(student_, views, k_student, train=True, with_embeddings=True)
        return jnp.mean(jnp.stack([dino_lib.koleo_loss(emb[:, g]) for g in range(c.data.dino.global_crops)]))

    np.testing.assert_allclose(float(metrics["koleo"]), float(koleo(student, jax.tree.map(jnp.asarray, batch))),
                               rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics["dino_loss"]) + 0.5 * float(metrics["koleo"]),
                               rtol=1e-6)


def test_view_token_counts():
    for local_views, n in (("landmarks", 4), ("grid", 16)):
        c = _small_config("lafs")
        c.unlock()
        c.lafs.local_views, c.lafs.grid_size = local_views, SIZE
        c.lock()
        obj = pretrain.objective(c)
        lm = _init_landmarks(obj, 0)
        v = _views(obj, jax.tree.map(jnp.asarray, _batch(c)), lm, jax.random.key(0))
        assert v["global"].shape == (8, 2, 16, 192)
        assert v["local"].shape == (8, 2, n, 192)
    c = _small_config("dino")
    v = _views(pretrain.objective(c), jax.tree.map(jnp.asarray, _batch(c)), None, jax.random.key(0))
    assert v["global"].shape == (8, 2, 16, 192) and v["local"].shape == (8, 2, 4, 192)


def _ramp_batch(config, seed=0):
    """A LAFS batch whose augmented views encode position: channel 0 = x, channel 1 = y (pixels), so a
    patch's centre tap reads back where it was sampled."""
    batch = jax.tree.map(jnp.asarray, _batch(config, seed))
    s = config.data.lafs.view_size
    ramp = np.stack([*np.meshgrid(np.arange(s), np.arange(s), indexing="xy"), np.zeros((s, s))], -1)
    for kind in ("global", "local"):
        batch[f"{kind}_aug"] = jnp.broadcast_to(jnp.asarray(ramp, jnp.float32), batch[f"{kind}_aug"].shape)
    return batch


def _centre_taps(tokens, patch_size):
    """(x, y) at offset (0, 0) of each token (the tap at index P/2), plus grid_sample's half pixel."""
    tap = (patch_size // 2 * patch_size + patch_size // 2) * 3
    return np.asarray(tokens[..., tap:tap + 2]) + 0.5


def test_random_landmarks_feed_uniform_positions_without_the_landmark_cnn():
    """lafs.random_landmarks (official random_coor): uniform positions over the view, a fresh draw per view,
    not the landmark CNN's; local views take num_local_landmarks of them."""
    c = _small_config("lafs")
    c.unlock()
    c.lafs.random_landmarks = True
    c.lock()
    obj = pretrain.objective(c)
    lm = _init_landmarks(obj, 0)
    batch = _ramp_batch(c)
    v = _views(obj, batch, lm, jax.random.key(0))
    assert v["global"].shape == (8, 2, 16, 192) and v["local"].shape == (8, 2, 4, 192)
    xy = _centre_taps(v["global"], 8)
    inside = xy[(xy > 1).all(-1) & (xy < SIZE - 1).all(-1)]
    assert len(inside) > 0.8 * xy.reshape(-1, 2).shape[0]
    assert abs(inside.mean() - (SIZE - 1) / 2) < 1.5 and abs(inside.std() - (SIZE - 1) / np.sqrt(12)) < 1.0
    assert not np.allclose(xy[:, 0], xy[:, 1])  # the two global views draw their own positions
    cnn = np.asarray(obj.landmark_cnn.apply(lm, batch["global_clean"].reshape(16, SIZE, SIZE, 3), train=False))
    assert np.abs(xy.reshape(16, 16, 2) - cnn).mean() > 3.0


def test_global_resample_draws_the_cnn_landmarks_with_replacement():
    """lafs.global_resample: each global token is one of its view's landmark-CNN patches, drawn with
    replacement; off (official LAFS), all R in order."""
    c = _small_config("lafs")
    c.unlock()
    c.lafs.noise_std = 0.0
    c.lock()
    obj = pretrain.objective(c)
    lm = _init_landmarks(obj, 0)
    batch = jax.tree.map(jnp.asarray, _batch(c))
    plain = np.asarray(_views(obj, batch, lm, jax.random.key(0))["global"])
    expected = sample_patches(batch["global_aug"].reshape(16, SIZE, SIZE, 3),
                              obj.landmark_cnn.apply(lm, batch["global_clean"].reshape(16, SIZE, SIZE, 3), train=False),
                              8)
    np.testing.assert_allclose(plain.reshape(16, 16, -1), np.asarray(expected), atol=1e-5)
    c.unlock()
    c.lafs.global_resample = True
    c.lock()
    resampled = np.asarray(_views(pretrain.objective(c), batch, lm, jax.random.key(0))["global"]).reshape(16, 16, -1)
    plain = plain.reshape(16, 16, -1)
    picked = np.array([[np.flatnonzero(np.abs(plain[r] - t).max(-1) < 1e-6)[0] for t in resampled[r]]
                       for r in range(16)])  # raises IndexError if a token is not one of the view's patches
    assert any(len(set(row)) < 16 for row in picked) and not all((row == np.arange(16)).all() for row in picked)
    c.unlock()
    c.lafs.random_landmarks = True
    with pytest.raises(ConfigError, match="lafs.global_resample"):
        pretrain.validate(c)


def test_one_device_and_eight_devices_agree(lafs_trainer):
    """8 devices (batch split 8 ways, MLP kernels and their Adam moments split over 'model') vs 1."""
    from jax.sharding import PartitionSpec as P

    fc1 = ("encoder", "block_0", "mlp", "fc1", "kernel")
    sh = lafs_trainer.shardings
    for tree in (sh["student"]["backbone"]["vit"], sh["teacher"]["backbone"]["vit"]):
        node = tree
        for k in fc1:
            node = node[k]
        assert node.spec == P(None, "model")
    split = [mesh_lib.path_str(kp) for kp, s_ in jax.tree_util.tree_flatten_with_path(sh["opt_state"])[0]
             if s_.spec == P(None, "model")]
    assert split and all(p.endswith("mlp/fc1/kernel") for p in split)
    batch = _batch(lafs_trainer.config, seed=2)
    results = []
    for trainer in (lafs_trainer, Trainer(lafs_trainer.config, mesh_lib.make_mesh(None, devices=jax.devices()[:1]))):
        state = trainer.init()
        for i in range(2):
            state, metrics = trainer.run(state, batch, jax.random.key(10 + i))
        results.append((float(metrics["loss"]), _host(state["student"]), _host(state["center"])))
    (l8, s8, c8), (l1, s1, c1) = results
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    np.testing.assert_allclose(c8, c1, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s8), jax.tree.leaves(s1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dino_face_recipe_follows_the_official_data_augmentation_dino():
    """configs/dino_pretrain.py against DataAugmentationDINO and lafs_train.py's argparse defaults: local
    crops at scale (0.05, 0.4), ImageNet mean/std, teacher temperature 0.07 -> 0.04 over 30 epochs, the
    teacher in train mode; the ImageNet normalisation is what the batches and the embedder feed."""
    from lafs_jax.eval import embed
    from lafs_jax.input import transforms

    spec = importlib.util.spec_from_file_location("recipe_dino_base", os.path.join(ROOT, "configs", "dino_pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert tuple(c.data.dino.local_scale) == (0.05, 0.4) and tuple(c.data.dino.global_scale) == (0.4, 1.0)
    assert (c.data.dino.global_size, c.data.dino.local_size, c.data.dino.local_crops) == (112, 48, 8)
    assert c.data.normalization == "imagenet"
    assert (c.dino.warmup_teacher_temp, c.dino.teacher_temp, c.dino.warmup_teacher_temp_epochs) == (0.07, 0.04, 30)
    assert c.dino.teacher_train_mode is True
    pretrain.validate(c)
    image = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    want = (image / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(transforms.normalize(image, "imagenet"), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(embed.preprocess(jnp.asarray(image), "imagenet")), want, rtol=1e-5, atol=1e-6)


def test_bad_config_values_name_the_key():
    c = _small_config("lafs")
    c.unlock()
    c.lafs.num_local_landmarks = 99
    with pytest.raises(ConfigError, match="lafs.num_local_landmarks"):
        pretrain.validate(c)
    c = _small_config("dino")
    c.unlock()
    c.model.kind = "part_fvit"
    with pytest.raises(ConfigError, match="model.kind"):
        pretrain.validate(c)
    c = _small_config("lafs")
    c.unlock()
    c.method = "mae"
    with pytest.raises(ConfigError, match="method"):
        pretrain.validate(c)
    c = _small_config("lafs")
    c.unlock()
    c.dino.centering = "mean"
    with pytest.raises(ConfigError, match="dino.centering"):
        pretrain.validate(c)


def test_landmark_checkpoint_with_wrong_shapes_names_the_parameter(tmp_path):
    c = _small_config("lafs")
    other = ml_collections.ConfigDict(c.model.to_dict())
    other.num_landmarks = 9
    from lafs_jax.models import presets

    wrong = jax.jit(lambda k: presets.build_landmark_cnn(other).init({"params": k}, jnp.zeros((1, SIZE, SIZE, 3)),
                                                                     train=False))(jax.random.key(0))
    variables_lib.save_variables(str(tmp_path / "lm"), jax.device_get(wrong))
    c.unlock()
    c.lafs.landmark_path = str(tmp_path / "lm")
    with pytest.raises(ConfigError, match=r"parameter 'landmark_head/(bias|kernel)' has shape \(.*18,\)"):
        pretrain.objective(c).load_resources(str(tmp_path))


# ---- run(): resume, SIGTERM, NaN guard, outputs ----

def _main_env(cache_options):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA_FLAGS (8 CPU devices) as set by conftest
    env.update({name.upper(): str(value) for name, value in cache_options.items()})
    return env


def _restore_state(workdir, step):
    with ckpt_lib.TrainCheckpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        assert ckpt.latest_step() == step, ckpt.all_steps()
        return ckpt.restore(step)


def test_sigterm_then_resume_in_a_new_process_equals_a_straight_run(tmp_path, data_prefix, compile_cache):
    """A subprocess (main.py) is stopped by SIGTERM at some step k: it saves and exits 0. This process
    resumes from that checkpoint to step k + 3; a straight run to k + 3 gives the same losses and state."""
    total = 400  # schedules span 400 steps; both runs stop early at the same step
    work_b = str(tmp_path / "b")
    cfg_path = str(tmp_path / "small_lafs.py")
    with open(cfg_path, "w") as f:  # the test's small config as a recipe file main.py can load
        f.write("import sys\nsys.path.insert(0, %r)\nfrom test_pretrain import _small_config\n"
                "def get_config(arg=None):\n    return _small_config('lafs', %r)\n" % (os.path.join(ROOT, "tests"),
                                                                                   data_prefix))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), f"--config={cfg_path}",
                             f"--config.total_steps={total}", f"--workdir={work_b}"], cwd=ROOT, env=_main_env(compile_cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_file = os.path.join(work_b, loop_utils.METRICS_FILE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics_file) and len(open(metrics_file).read().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted" in out
    k = loop_utils.read_metrics(work_b)[-1]["step"]
    assert 2 <= k < total
    with ckpt_lib.TrainCheckpointer(os.path.join(work_b, "checkpoints")) as ckpt:
        assert ckpt.latest_step() == k

    end = k + 3
    config = _small_config("lafs", data_prefix)
    config.unlock()
    config.total_steps, config.stop_at_step = total, end
    config.lock()
    pretrain.run(config, work_b)  # resumes from step k (the landmark CNN comes from work_b's init dir)
    work_a = str(tmp_path / "a")
    pretrain.run(config, work_a)

    losses_a = {r["step"]: r["loss"] for r in loop_utils.read_metrics(work_a)}
    losses_b = {r["step"]: r["loss"] for r in loop_utils.read_metrics(work_b)}
    assert sorted(losses_a) == list(range(1, end + 1)) and sorted(losses_b) == list(range(1, end + 1))
    for s in range(1, end + 1):
        assert losses_a[s] == losses_b[s], (s, losses_a[s], losses_b[s])
    state_a, state_b = _restore_state(work_a, end), _restore_state(work_b, end)
    for name in ("student", "teacher", "center", "opt_state", "landmark_cnn"):
        for x, y in zip(jax.tree.leaves(state_a[name]), jax.tree.leaves(state_b[name])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    # the landmark CNN in the state is bit-identical to the one the run started from
    init_lm, _ = variables_lib.load_variables(os.path.join(work_a, landmark_cnn_lib.INIT_DIR))
    for x, y in zip(jax.tree.leaves(state_a["landmark_cnn"]), jax.tree.leaves(init_lm)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not os.path.exists(os.path.join(work_a, pretrain.TEACHER_BACKBONE_DIR))  # stopped early: no final export


def test_full_run_writes_teacher_backbone_and_scalars(device_runs):
    """A DINO run to its last step (the device-augmentation run below): the metrics of every step, the
    TensorBoard events, and WORKDIR/teacher_backbone equal to the last checkpoint's teacher ViT."""
    config, work, result = device_runs("dino")
    assert result["step"] == 4 and np.isfinite(result["loss"])
    rows = loop_utils.read_metrics(work)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "learning_rate", "weight_decay", "momentum", "teacher_temp"):
        assert key in rows[-1]
    assert "img_per_sec" in rows[-1] and "step_time_ms" in rows[-1]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(work))
    variables, meta = variables_lib.load_variables(os.path.join(work, pretrain.TEACHER_BACKBONE_DIR))
    assert meta["kind"] == "token_vit" and meta["normalization"] == "imagenet" and meta["color_order"] == "rgb"
    assert meta["model"]["kind"] == "fvit" and meta["model"]["dim"] == 48
    assert (meta["method"], meta["patch_order"]) == ("dino", "grid")
    state = _restore_state(work, 4)
    for x, y in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(state["teacher"]["backbone"]["vit"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_divergence_stops_naming_step_and_metric_and_keeps_only_the_confirmed_checkpoint(tmp_path, data_prefix):
    """lr 1e36 after one warmup epoch: update 1 (lr 0) gives checkpoint 1, which step 2's finite loss
    confirms; update 2 blows the weights up, so that state is never saved. (Before checkpoints were
    confirmed, step 2's finite loss let its 1e35-sized weights be saved as the "last good" checkpoint.)"""
    config = _small_config("lafs", data_prefix)
    config.unlock()
    config.total_steps, config.checkpoint.every_steps = 6, 1
    config.optim.freeze_last_layer_epochs, config.optim.lr = 0, 1e36
    config.optim.lr_scaling = "none"
    _global_views_only(config)
    _no_dropout(config)
    config.lock()
    work = str(tmp_path / "nan")
    with pytest.raises(loop_utils.NonFiniteError, match=r"step 2: metric 'param_norm' is inf") as info:
        pretrain.run(config, work)
    assert f"the last confirmed checkpoint is {os.path.join(work, 'checkpoints', '1')}" in str(info.value)
    with ckpt_lib.TrainCheckpointer(os.path.join(work, "checkpoints")) as ckpt:
        assert ckpt.all_steps() == ckpt.confirmed_steps() == [1]
        kept = ckpt.restore(1)
    assert max(float(np.max(np.abs(x))) for x in jax.tree.leaves(kept["student"])) < 100


# ------------------------------------------------------------------------------------------------
# config.data.augment_on = 'device': decoded uint8 batches, views made in the step
# ------------------------------------------------------------------------------------------------

def _device(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.unlock()
    c.data.augment_on, c.data.image_size = "device", 48  # the synthetic data set's 48 px images
    c.lock()
    return c


def _decoded_batch(config):
    from lafs_jax.input.synthetic import face_like_image

    b = config.batch_size
    return {"image": np.stack([face_like_image(i % 4, i, size=48) for i in range(b)]),
            "index": np.arange(b, dtype=np.int32) + 1000, "label": np.zeros(b, np.int32)}


@pytest.mark.parametrize("method", ["lafs", "dino"])
def test_device_augmentation_trains_on_a_fixed_decoded_batch(method):
    """The step makes the views from uint8 images (same index: same views every step); with the
    teacher and centre held, the student's loss falls. The batch crossing is uint8."""
    c = _fixed_batch_config(method)
    c.unlock()
    _global_views_only(c)  # device-made local views: test_device_augmentation_run_resumes_exactly
    c.lock()
    t = Trainer(_device(c), mesh_lib.make_mesh())
    batch = _decoded_batch(t.config)
    assert batch["image"].dtype == np.uint8
    state = t.init()
    teacher0, center0 = _host(state["teacher"]), _host(state["center"])
    losses = []
    for _ in range(5):
        state = dict(state, teacher=jax.device_put(teacher0, t.shardings["teacher"]),
                     center=jax.device_put(center0, t.shardings["center"]))
        state, metrics = t.run(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.02 and min(losses) == losses[-1], losses


@pytest.fixture(scope="module")
def device_runs(tmp_path_factory, data_prefix):
    """device_runs(method) -> (config, workdir, result) of pretrain.run with augment_on='device' to its
    end (step 4, a checkpoint every 2 steps), run once per method for the module."""
    runs = {}

    def get(method):
        if method not in runs:
            config = _device(_small_config(method, data_prefix))
            config.unlock()
            config.total_steps, config.optim.warmup_epochs = 4, 0.25  # lr 0 for update 1 only
            config.checkpoint.every_steps, config.checkpoint.keep = 2, 3
            _no_dropout(config)
            config.lock()
            work = str(tmp_path_factory.mktemp(f"device_{method}"))
            runs[method] = config, work, pretrain.run(config, work)
        return runs[method]

    return get


@pytest.mark.parametrize("method", ["lafs", "dino"])
def test_device_augmentation_run_resumes_exactly(tmp_path, device_runs, method):
    """pretrain.run with augment_on='device' to step 4; a second workdir holding only its checkpoint of
    step 2 (and the landmark CNN) resumes to step 4 with the same losses and state, bit for bit (views
    from the run key and each sample's stream index; the device-prefetched iterator checkpoints the
    batches consumed, not the ones in flight)."""
    import shutil

    config, work_a, _ = device_runs(method)
    work_b = str(tmp_path / "b")
    shutil.copytree(os.path.join(work_a, "checkpoints", "2"), os.path.join(work_b, "checkpoints", "2"))
    if method == "lafs":
        shutil.copytree(os.path.join(work_a, landmark_cnn_lib.INIT_DIR), os.path.join(work_b, landmark_cnn_lib.INIT_DIR))
    pretrain.run(config, work_b)
    losses_a = {r["step"]: r["loss"] for r in loop_utils.read_metrics(work_a)}
    losses_b = {r["step"]: r["loss"] for r in loop_utils.read_metrics(work_b)}
    assert sorted(losses_a) == [1, 2, 3, 4] and sorted(losses_b) == [3, 4]
    assert {s: losses_a[s] for s in (3, 4)} == losses_b
    state_a, state_b = _restore_state(work_a, 4), _restore_state(work_b, 4)
    for x, y in zip(jax.tree.leaves(state_a["student"]), jax.tree.leaves(state_b["student"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------------
# One code path: the step bench/ and bench/aot.py lower is the step run trains
# ------------------------------------------------------------------------------------------------

class _Captured(Exception):
    """Raised by the recording step instead of running it."""


@pytest.mark.parametrize("method", ["lafs", "dino"])
def test_run_trains_the_program_build_train_step_lowers(tmp_path, data_prefix, monkeypatch, method):
    """run's jitted step on run's first arguments (the resources loaded, the batch from the pipeline) and
    build_train_step's step on its abstract arguments lower to the same HLO text."""
    config = _device(_small_config(method, data_prefix))
    config.unlock()
    config.steps_per_epoch, config.total_steps = 4, 16
    config.lock()
    real_jit_step, recorded = ssl.jit_step, []

    class Recording:
        def __init__(self, jitted):
            self.jitted, self.args = jitted, None

        def __call__(self, *args):
            self.args = args
            raise _Captured

        def lower(self, *args):
            return self.jitted.lower(*args)

    def recording_jit_step(step, shardings, mesh):
        recorded.append(Recording(real_jit_step(step, shardings, mesh)))
        return recorded[-1]

    monkeypatch.setattr(ssl, "jit_step", recording_jit_step)
    with pytest.raises(_Captured):
        pretrain.run(config, str(tmp_path))
    [trained] = recorded
    step, args, _, _ = pretrain.build_train_step(config, mesh_lib.make_mesh(config.mesh), steps_per_epoch=4,
                                                 total_steps=16)
    assert recorded[1] is step
    run_hlo = trained.lower(*trained.args).as_text()
    assert "dot_general" in run_hlo or "dot(" in run_hlo or "convolution" in run_hlo
    assert step.lower(*args).as_text() == run_hlo


# ------------------------------------------------------------------------------------------------
# config.evals: pretraining evaluates the teacher
# ------------------------------------------------------------------------------------------------

class _EmbeddingsProbe(evaluators_lib.Evaluator):
    """The embeddings of a .bin's images, as the loop's evaluators see the teacher (test only)."""

    @classmethod
    def default_config(cls):
        c = super().default_config()
        c.bin = ""  # a .bin file
        return c

    def __init__(self, name, config, *, embedder_factory, image_size, key):
        super().__init__(name, config, embedder_factory=embedder_factory, image_size=image_size, key=key)
        self.embedder = embedder_factory(16)
        self.images, _ = load_bin(config.bin, image_size)

    def run(self, variables):
        return {"embeddings": self.embedder.embed(self.images, flip=False, variables=variables)}

    def scalars(self, results):
        return {"sum": float(np.sum(results["embeddings"]))}


def _write_val_bin(path, pairs=10):
    """A .bin of synthetic faces at the test size: genuine pairs two images of one identity."""
    from lafs_jax.input.synthetic import face_like_image

    issame = np.arange(pairs) % 2 == 0
    images = []
    for p, same in enumerate(issame):
        images += [face_like_image(p, 0, size=SIZE), face_like_image(p if same else p + 100, 1, size=SIZE)]
    save_bin(str(path), np.stack(images), issame)
    return str(path)


@pytest.mark.parametrize("method", ["lafs", "dino"])
def test_pretraining_evaluates_the_teacher(tmp_path, data_prefix, method, monkeypatch):
    """config.evals during pretraining: `val/<set>/accuracy` rows at the evaluated steps, computed from the
    teacher as the method embeds it (LAFS: a Part fViT of the frozen landmark CNN and the teacher's ViT;
    DINO-face: an fViT); the last ones equal an evaluation of the exported teacher_backbone, and the
    embeddings equal an independent forward pass of the exported variables."""
    monkeypatch.setattr(evaluators_lib, "_REGISTRY", dict(evaluators_lib._REGISTRY))  # the probe stays here
    evaluators_lib.register("pretrain_test_embeddings")(_EmbeddingsProbe)
    from lafs_jax.eval import embed, verification
    from lafs_jax.models import presets

    bin_path = _write_val_bin(tmp_path / "val.bin")
    config = _small_config(method, data_prefix)
    config.unlock()
    config.total_steps, config.optim.warmup_epochs = 2, 0.25
    _global_views_only(config)
    _no_dropout(config)
    config.evals = ml_collections.ConfigDict({
        "val": evaluators_lib.evaluator_config("verification", bins=(bin_path,), every_steps=2, at_start=True,
                                               nfolds=2, batch_size=16),
        "probe": evaluators_lib.evaluator_config("pretrain_test_embeddings", bin=bin_path, every_steps=2)})
    config.lock()
    work = str(tmp_path / "run")
    result = pretrain.run(config, work)
    rows = {r["step"]: r for r in loop_utils.read_metrics(work) if "val/val/accuracy" in r}
    assert sorted(rows) == [0, 2]
    assert {"val/val/accuracy_std", "val/val/best_threshold"} <= set(rows[2])

    # the exported teacher, evaluated on its own: the same accuracy, the same embeddings
    exported, meta = variables_lib.load_variables(os.path.join(work, pretrain.TEACHER_BACKBONE_DIR))
    model = presets.build_model(config.model)
    variables = {"params": {"vit": exported["params"]}}
    if method == "lafs":
        lm = landmark_cnn_lib.read(os.path.join(work, landmark_cnn_lib.INIT_DIR))
        variables = {"params": {"landmark_cnn": lm["params"], "vit": exported["params"]},
                     "batch_stats": {"landmark_cnn": lm["batch_stats"]}}
    embedder = embed.Embedder(model, variables, image_size=SIZE, normalization=meta["normalization"],
                              color_order="rgb", batch_size=16)
    images, issame = load_bin(bin_path, SIZE)
    want = verification.evaluate_pairs_embeddings(embedder.embed(images, flip=True), issame, nfolds=2)
    assert rows[2]["val/val/accuracy"] == want["accuracy"]
    assert rows[2]["val/val/best_threshold"] == want["best_threshold"]
    direct, _ = model.apply(variables, embed.preprocess(images, meta["normalization"]), train=False)
    np.testing.assert_allclose(result["evaluations"]["probe"]["embeddings"], np.asarray(direct), rtol=1e-5, atol=1e-6)
    # the ranking evaluator kept the best evaluated step's teacher beside the final one
    _, best_meta = variables_lib.load_variables(os.path.join(work, pretrain.BEST_TEACHER_BACKBONE_DIR))
    assert best_meta["step"] == 2 and best_meta["evaluation"]["val/accuracy"] == rows[2]["val/val/accuracy"]


# ------------------------------------------------------------------------------------------------
# ssl's step with a BYOL-shaped objective: a subtree EMA'd, BatchNorm-style statistics EMA'd too
# ------------------------------------------------------------------------------------------------

class _ByolLike:
    """A toy objective shaped like FRA's BYOL: online {'backbone', 'predictor'} + running statistics; the
    target averages the backbone only; a symmetric loss over two views; a buffer of target outputs."""

    name = "byol_like"
    momentum = (0.9, 1.0)

    def init_student(self, key):
        k1, k2 = jax.random.split(key)
        params = {"backbone": {"w": jax.random.normal(k1, (4, 3))}, "predictor": {"w": jax.random.normal(k2, (3, 3))}}
        return {"params": params, "batch_stats": {"mean": jnp.zeros((3,))}}

    def teacher_params(self, student):
        return {"backbone": student["backbone"]}

    def load_resources(self, workdir):
        return None

    def init_extra_state(self, key, resources=None):
        return {"buffer": jnp.zeros((3,))}

    def view_batch_shapes(self, batch_size):
        return {"x": jax.ShapeDtypeStruct((batch_size, 4), jnp.float32)}

    def views(self, state, batch, key):
        return {"a": batch["x"], "b": batch["x"] + 0.1 * jax.random.normal(key, batch["x"].shape)}

    def teacher_outputs(self, teacher, views, state, key):
        return {v: views[v] @ teacher["backbone"]["w"] for v in ("a", "b")}

    def loss(self, student, views, teacher_out, state, key):
        online = {v: views[v] @ student["backbone"]["w"] for v in ("a", "b")}
        pred = {v: online[v] @ student["predictor"]["w"] for v in ("a", "b")}
        loss = jnp.mean((pred["a"] - teacher_out["b"]) ** 2) + jnp.mean((pred["b"] - teacher_out["a"]) ** 2)
        stats = {"mean": 0.5 * state["student_stats"]["mean"] + 0.5 * jnp.mean(online["a"], axis=0)}
        return loss, {"mse": loss, ssl.BATCH_STATS: stats}

    def update_state(self, state, teacher_out):
        return {"buffer": jnp.mean(teacher_out["a"], axis=0)}


def test_ssl_step_averages_a_subtree_and_the_batch_statistics():
    """How FRA fits ssl.py unchanged: the teacher averages only the student's backbone (no predictor), the
    statistics a loss returns as aux['batch_stats'] become 'student_stats' and their EMA 'teacher_stats',
    the extra state moves by update_state, the rest of aux is metrics."""
    c = ml_collections.ConfigDict({"batch_size": 8, "sharding_rules": (), "data": {"augment_on": "host"}})
    c.optim = optim_lib.optim_config("pretrain")
    c.optim.warmup_epochs, c.optim.freeze_last_layer_epochs = 0.0, 0
    objective, mesh = _ByolLike(), mesh_lib.make_mesh()
    task = ssl.build(objective, c, mesh, steps_per_epoch=4, total_steps=16)
    state = task.init(jax.random.key(0))
    assert set(state) == {"student", "teacher", "opt_state", "step", "rng", "student_stats", "teacher_stats", "buffer"}
    assert set(state["teacher"]) == {"backbone"}
    before = _host(state)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    after, metrics = task.step(state, mesh_lib.global_batch({"x": x}, mesh), jax.random.key(1))
    after = _host(after)
    assert "mse" in metrics and ssl.BATCH_STATS not in metrics and float(metrics["loss"]) == float(metrics["mse"])
    m = np.float32(metrics["momentum"])
    np.testing.assert_allclose(m, 0.9, rtol=1e-6)
    assert not np.allclose(after["student"]["predictor"]["w"], before["student"]["predictor"]["w"])
    np.testing.assert_allclose(after["teacher"]["backbone"]["w"],
                               m * before["teacher"]["backbone"]["w"] + (1 - m) * after["student"]["backbone"]["w"],
                               rtol=1e-5, atol=1e-6)
    stats = 0.5 * before["student_stats"]["mean"] + 0.5 * (x @ before["student"]["backbone"]["w"]).mean(0)
    np.testing.assert_allclose(after["student_stats"]["mean"], stats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["teacher_stats"]["mean"], m * before["teacher_stats"]["mean"] + (1 - m) * stats,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["buffer"], (x @ before["teacher"]["backbone"]["w"]).mean(0), rtol=1e-5, atol=1e-6)
    step, args, _, _ = ssl.build_train_step(objective, c, mesh, steps_per_epoch=4, total_steps=16)
    assert set(args[1]) == {"x", "label"} and args[1]["x"].shape == (8, 4)
