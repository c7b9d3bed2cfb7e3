"""LVFace in the fine-tuning task: curriculum phases (state kept across a change, the loss continues), the
EPL prototype update inside the step against NumPy, the recipe's variants, and the tiny recipe end to end
(every phase, verification on held-out ORL pairs, a run stopped in the middle of phase 2 resumes exactly)."""
import contextlib

import jax
import numpy as np
import pytest
from sigterm_at import SigtermAt

from configs import lvface as lvface_recipe
from lafs_jax import sharding as mesh_lib
from lafs_jax import variables as variables_lib
from lafs_jax.config import ConfigError
from lafs_jax.input.orl import build_orl
from lafs_jax.input.verification_bin import load_bin, save_bin
from lafs_jax.losses import curriculum, partial_fc
from lafs_jax.models import presets
from lafs_jax.train import finetune, loop_utils

C, B, SIZE = 24, 16, 36  # classes, global batch, image side (patch 9 -> 16 tokens)


def _small(config, *, deterministic=False):
    """The tiny recipe on 36 px images with a 1-block D 32 ViT: compiles and steps in a second."""
    m = config.model
    m.image_size, m.dim, m.depth, m.heads, m.head_dim, m.mlp_dim = SIZE, 32, 1, 2, 16, 64
    m.insightface.embedding_size = 32
    config.data.image_size = SIZE
    config.batch_size = B
    if deterministic:  # no masking, no drop path: the train-mode forward is a function of the inputs
        m.insightface.mask_ratio = m.drop_path_rate = 0.0
    return config


def _batches(n, seed=0):
    """Class-mean images plus noise: a learnable problem of C classes."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(-1, 1, (C, SIZE, SIZE, 3)).astype(np.float32)
    out = []
    for _ in range(n):
        label = rng.integers(0, C, B).astype(np.int32)
        label[:4] = label[4:8]  # duplicate classes in every batch (EPL's segment mean)
        image = means[label] + 0.3 * rng.normal(size=(B, SIZE, SIZE, 3)).astype(np.float32)
        out.append({"image": image, "label": label, "label2": label, "lam": np.ones(B, np.float32)})
    return out


def _steps(config, mesh, spe=4):
    steps = [finetune.build_train_step(config, mesh, C, steps_per_epoch=spe, total_steps=spe * 2, phase=i)
             for i in range(len(config.curriculum))]
    return [s[0] for s in steps], steps[0][2], steps[0][3]


def _count(opt_state):
    return sorted({int(x) for x in jax.tree.leaves(opt_state) if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.integer)})


def test_phase_change_keeps_w_optimizer_and_prototypes_and_the_loss_continues():
    config = _small(lvface_recipe.get_config("tiny"))
    config.curriculum[0].epochs = config.curriculum[1].epochs = 1
    config.optim.epochs, config.optim.warmup_epochs = 2, 0.0
    mesh = mesh_lib.make_mesh()
    (step0, step1), shardings, init = _steps(config, mesh)
    batches = _batches(5)
    fresh = init(jax.random.key(config.seed))
    state = init(jax.random.key(config.seed))
    losses = []
    for batch in batches[:4]:
        state, m = step0(state, {}, mesh_lib.global_batch(batch, mesh), {})
        losses.append(float(m["loss"]))
    before = jax.device_get(state)
    # the prototype buffer moved in phase 0 (EPL updates from the start), W trained
    assert not np.allclose(before["prototypes"], np.asarray(fresh["prototypes"]))
    assert losses[-1] < losses[0]
    # phase 1 takes phase 0's state as it is: same structure, shapes and shardings (no re-initialisation)
    assert jax.tree.structure(state) == jax.tree.structure(shardings)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    state, m1 = step1(state, {}, mesh_lib.global_batch(batches[4], mesh), {})
    after = jax.device_get(state)
    assert float(m1["phase"]) == 1.0 and float(m["phase"]) == 0.0
    assert _count(after["opt_state"]) == [5]  # the optimizer counts on: 4 updates of phase 0, 1 of phase 1
    assert float(m1["learning_rate"]) < float(m["learning_rate"])  # the cosine continues, no new warmup
    # the loss continues: W's loss just after the change (now over every class) stays near the last
    # phase-0 loss, far below what the same phase-1 step reports from a fresh W, optimizer and E
    _, m_fresh = step1(init(jax.random.key(config.seed)), {}, mesh_lib.global_batch(batches[4], mesh), {})
    jump = float(m1["loss_centers"]) - losses[-1]
    assert abs(jump) < 0.25 * (float(m_fresh["loss_centers"]) - losses[-1]), (losses, m1, m_fresh)
    assert float(m1["loss_prototypes"]) < float(m_fresh["loss_prototypes"])  # E was warm
    assert not np.array_equal(after["params"]["centers"], before["params"]["centers"])


def _np_unit(a):
    a = np.asarray(a, np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-30)


def np_epl(e, x, labels, rule):
    """EPL's update in NumPy: 'segment_mean' (ours: the normalised mean feature of each class in the
    batch, one update per class) or 'last_write' (EPL's code: each sample in batch order, a class's
    later samples overwrite the update of its earlier ones, all computed from the old E)."""
    e, xn = np.array(e, np.float64), _np_unit(x)
    new = e.copy()
    if rule == "last_write":
        for b, y in enumerate(labels):
            c = e[y] @ xn[b]
            a = c / (1 + abs(c))
            new[y] = _np_unit(a * e[y] + (1 - a) * xn[b])
        return new
    for y in np.unique(labels):
        mean = _np_unit(xn[labels == y].sum(0))
        c = e[y] @ mean
        a = c / (1 + abs(c))
        new[y] = _np_unit(a * e[y] + (1 - a) * mean)
    return new


def test_prototype_update_in_the_step_is_the_segment_mean_epl_rule():
    """E after one phase-0 step = the NumPy segment-mean rule on that step's forward embeddings (before
    the parameter update, detached; the same dropout / masking key as the step); with duplicate labels
    it differs from EPL's last-write-wins."""
    config = _small(lvface_recipe.get_config("tiny"))
    config.curriculum[0].epochs = config.curriculum[1].epochs = 1
    config.optim.epochs, config.optim.warmup_epochs = 2, 0.0  # the programs of the test above (compile cache)
    mesh = mesh_lib.make_mesh()
    (step0, _), _, init = _steps(config, mesh)
    state = init(jax.random.key(3))
    host = jax.device_get(state)
    batch = _batches(1, seed=4)[0]
    model = presets.build_model(config.model)
    k_drop, _ = jax.random.split(jax.random.fold_in(jax.random.key(config.seed + 1), 0))  # as make_train_step
    (emb, _), _ = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": k_drop},
                                                   mutable=["batch_stats"]))(
        {"params": host["params"]["backbone"], "batch_stats": host["batch_stats"]}, batch["image"])
    state, _ = step0(state, {}, mesh_lib.global_batch(batch, mesh), {})
    got = np.asarray(state["prototypes"])
    want = np_epl(host["prototypes"], np.asarray(emb), batch["label"], "segment_mean")
    np.testing.assert_allclose(got[:C], want[:C], atol=2e-5)
    assert np.all(got[C:] == 0)  # padding rows stay zero
    last = np_epl(host["prototypes"], np.asarray(emb), batch["label"], "last_write")
    dup = int(batch["label"][0])
    assert np.abs(last[dup] - want[dup]).max() > 1e-3  # the documented difference for a duplicated class
    untouched = sorted(set(range(C)) - set(batch["label"].tolist()))
    np.testing.assert_array_equal(got[untouched], host["prototypes"][untouched])


def test_recipe_variants_and_curriculum_errors():
    v1 = lvface_recipe.get_config("b,webface42m")
    assert [p.epochs for p in v1.curriculum] == [40, 60] and v1.optim.epochs == 100
    assert [p.sample_rate for p in v1.curriculum] == [0.3, 1.0]
    assert [p.prototypes for p in v1.curriculum] == ["none", "add"] and v1.curriculum[1].prototype_k == 0.7
    assert (v1.curriculum[0].m2, v1.curriculum[0].s, v1.curriculum[0].fallback) == (0.5, 64.0, "th_mm")
    assert v1.model.preset == "vit_b_dp005_mask_005" and v1.model.remat and v1.sharding_rules == ()
    v3 = lvface_recipe.get_config("s,glint360k,v3")
    assert [(p.sample_rate, p.prototypes, p.update_prototypes) for p in v3.curriculum] == [
        (0.3, "none", True), (0.3, "add", True), (1.0, "none", False)]
    assert v3.model.dim == 512 and v3.model.depth == 12 and not v3.model.remat
    large = lvface_recipe.get_config("l")
    assert large.model.dim == 768 and large.sharding_rules == mesh_lib.FSDP_RULES and large.model.remat
    assert lvface_recipe.get_config("tiny").batch_size == 32
    assert lvface_recipe.DATASETS == {"webface42m": (2_059_906, 42_474_557), "glint360k": (360_232, 17_091_657)}
    with pytest.raises(ValueError, match="unknown part 'x'"):
        lvface_recipe.get_config("b,x")
    config = lvface_recipe.get_config("tiny")
    config.eval.bins = ()
    config.optim.epochs = 5
    with pytest.raises(ConfigError, match=r"config\.optim\.epochs=5.*phases last 4 epochs"):
        finetune.validate(config)
    config = lvface_recipe.get_config("tiny")
    config.eval.bins = ()
    config.curriculum[1].sample_rate = 0.0
    with pytest.raises(ConfigError, match=r"config\.curriculum\[1\]\.sample_rate=0\.0"):
        finetune.validate(config)


def test_tiny_recipe_runs_every_phase_verifies_and_resumes_in_phase_2_exactly(tmp_path, monkeypatch):
    """configs/lvface.py:tiny (v1: Partial FC r 0.3, then r 1 with EPL prototypes) on the ORL data at
    36 px: 2 steps per phase (batch 120); stopped by SIGTERM at step 3 (the middle of phase 2),
    relaunched: the same losses and the same backbone, bit for bit, as the uninterrupted run, which
    verifies on held-out ORL pairs. (The 3-phase v3 runs through the same code: the phase test above.)"""
    build_orl(str(tmp_path / "data"))
    images, issame = load_bin(str(tmp_path / "data" / "test.bin"), 112)
    keep = np.sort(np.random.default_rng(0).permutation(len(issame))[:100])
    save_bin(str(tmp_path / "pairs.bin"), images.reshape(-1, 2, 112, 112, 3)[keep].reshape(-1, 112, 112, 3),
             issame[keep])
    config = _small(lvface_recipe.get_config("tiny"))
    for p in config.curriculum:
        p.epochs = 1
    config.optim.epochs, config.optim.warmup_epochs = 2, 0.0
    config.batch_size = 120  # 250 images -> 2 steps per epoch
    config.data.path = str(tmp_path / "data" / "train")
    config.eval.bins, config.eval.every_steps, config.eval.at_start = (str(tmp_path / "pairs.bin"),), 100, False
    config.checkpoint.every_steps = 100
    config.log_every_steps = 1
    full = finetune.run(config, str(tmp_path / "full"))
    assert full["step"] == 4 and 0.5 < full["verification"]["pairs"] <= 1.0
    rows = [r for r in loop_utils.read_metrics(str(tmp_path / "full")) if "train/loss" in r]
    assert [r["train/phase"] for r in rows] == [0, 0, 1, 1]
    assert [r["train/sampled_classes"] for r in rows][::2] == [partial_fc.num_sampled(4, 0.3) * 8, 32]  # r 0.3, then all
    assert all("train/loss_prototypes" in r for r in rows[2:]) and "train/loss_prototypes" not in rows[1]

    real_guard = loop_utils.preemption_guard

    @contextlib.contextmanager
    def guard_with_kill():
        with real_guard() as g:
            yield SigtermAt(g, at=3)

    config.eval.bins = ()
    monkeypatch.setattr(loop_utils, "preemption_guard", guard_with_kill)
    first = finetune.run(config, str(tmp_path / "resumed"))
    assert first["preempted"] and first["step"] == 3
    monkeypatch.setattr(loop_utils, "preemption_guard", real_guard)
    second = finetune.run(config, str(tmp_path / "resumed"))
    assert not second["preempted"] and second["step"] == 4
    resumed_rows = {r["step"]: r["train/loss"] for r in loop_utils.read_metrics(str(tmp_path / "resumed"))
                    if "train/loss" in r}
    assert resumed_rows == {r["step"]: r["train/loss"] for r in rows}  # bit-identical losses, every step
    a, _ = variables_lib.load_variables(str(tmp_path / "full" / "backbone"))
    b, meta = variables_lib.load_variables(str(tmp_path / "resumed" / "backbone"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert meta["model"]["kind"] == "insightface_vit" and meta["normalization"] == "[-1,1]"


def test_phase_accepts_the_issue_spelling():
    p = curriculum.phase(epochs=60, sample_rate=1.0, prototypes="epl", epl_k=0.7, margin="arcface")
    assert (p.prototypes, p.prototype_k, p.m1, p.m2, p.m3, p.fallback) == ("add", 0.7, 1.0, 0.5, 0.0, "th_mm")
    q = curriculum.phase(prototypes="off", margin="cosface")
    assert (q.prototypes, q.m2, q.m3, q.fallback) == ("none", 0.0, 0.4, "none")
    assert curriculum.phase(margin=(1.0, 0.3, 0.1)).m3 == 0.1
    curriculum.validate_phases([p, q])
    with pytest.raises(ConfigError, match="margin='sphere'"):
        curriculum.phase(margin="sphere")
    with pytest.raises(ConfigError, match="epl_k or prototype_k"):
        curriculum.phase(epl_k=0.5, prototype_k=0.6)
