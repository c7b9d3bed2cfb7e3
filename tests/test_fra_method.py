"""FRA as a pretraining method: the recipe and its bad values, LARS's exclusions by name, the evaluation
model, and a small `pretrain.run` on 8 devices in which the target keeps its own BatchNorm statistics and
which a SIGTERM-stopped, resumed run reproduces bit for bit."""
import contextlib
import os

import jax
import numpy as np
import pytest

from configs import fra as fra_recipe
from lafs_jax import methods
from lafs_jax.config import ConfigError
from lafs_jax.input.synthetic import write_synthetic_rec
from lafs_jax.methods.fra import objective as fra_objective
from lafs_jax.models import presets
from lafs_jax.train import checkpoint as ckpt_lib
from lafs_jax.train import loop_utils, pretrain
from lafs_jax.train.param_rules import match_mults
from sigterm_at import SigtermAt


def _small(data_prefix=""):
    """configs/fra.py:tiny shrunk for tests: resnet_tiny at 32 px, a small neck, batch 16, 4 steps."""
    c = fra_recipe.get_config("tiny")
    c.unlock()
    c.model.resnet.width, c.model.resnet.layers, c.model.dim, c.model.image_size = 8, (1, 1, 1, 1), 64, 32
    c.fra.view_size, c.fra.hidden_dim, c.fra.out_dim, c.fra.num_proto, c.fra.dropout = 32, 32, 16, 4, 0.1
    c.fra.decoder_layers = 1  # a smaller program to compile (the parity tests use 2)
    c.data.path, c.data.image_size, c.data.prefetch = data_prefix, 48, 0
    c.data.ssl_color.global_blur_probs = (0.0, 0.0)  # no blur in the program: ~2 s less to compile
    c.evals = {}
    c.batch_size, c.total_steps, c.optim.warmup_epochs = 16, 4, 0.5
    c.checkpoint.every_steps, c.checkpoint.keep, c.checkpoint.async_save = 4, 1, False
    c.log_every_steps = 2
    c.lock()
    return c


def test_resnet_presets_have_torchvision_parameter_counts():
    """torchvision's resnet18 / resnet50 parameter counts without the 1000-class fc (11,689,512 - 513,000;
    25,557,032 - 2,049,000)."""
    for preset, count in (("resnet18", 11_176_512), ("resnet50", 23_508_032)):
        assert presets.count_params(presets.abstract_variables(presets.model_config(preset))["params"]) == count


def test_recipes_build_and_bad_values_name_the_key():
    assert methods.pretraining("fra") is fra_objective.Objective
    full = fra_recipe.get_config("vggface2")
    assert (full.batch_size, full.optim.lr, full.optim.lr_scaling, full.optim.epochs) == (512, 0.9, "none", 50)
    assert (full.fra.num_proto, full.fra.teacher_temp, full.fra.cluster_weight, full.model.dim) == (8, 0.04, 0.1, 2048)
    fra_objective.Objective.validate(full)
    for key, value, words in (("fra.num_proto", 1, "fra.num_proto"), ("fra.teacher_temp", 0.0, "fra.teacher_temp"),
                              ("fra.student_temp", -1.0, "fra.student_temp"), ("model.kind", "fvit", "model.kind"),
                              ("fra.view_size", 100, "fra.view_size"), ("fra.eval_features", "z", "fra.eval_features")):
        c = _small()
        c.unlock()
        section, name = key.split(".")
        c[section][name] = value
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            fra_objective.Objective.validate(c)


def test_lars_excludes_parameters_by_the_official_names():
    c = _small()
    params = jax.eval_shape(lambda k: fra_objective.init_variables(c, k), jax.random.key(0))["params"]
    wd = match_mults(params, list(c.optim.wd_mults), None)  # {'a/b/c' path: weight-decay factor}
    expect = {"online/backbone/bn1/scale": 0.0, "online/backbone/layer2_0/downsample_1/scale": 0.0,
              "online/backbone/layer2_0/downsample_0/kernel": 1.0, "online/backbone/conv1/kernel": 1.0,
              "online/neck/proj/mlp_1/scale": 1.0,  # the neck's BatchNorm is decayed (official quirk)
              "online/neck/proj_attn/transformer/decoder/layers_0/norm1/scale": 1.0,
              "online/neck/proj_attn/query_embed/embedding": 1.0,
              "online/neck/proj_attn/transformer/decoder/layers_0/self_attn/in_proj_bias": 0.0,
              "online/neck/proj_attn/input_proj/bias": 0.0, "predictor/mlp_1/bias": 0.0}
    for path, factor in expect.items():
        assert wd[path] == factor, path


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("fra_data") / "train")
    write_synthetic_rec(prefix, num_classes=4, per_class=8, size=48)  # 32 images: 2 steps per epoch at 16
    return prefix


def _state(workdir, step):
    with ckpt_lib.TrainCheckpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        return ckpt.restore(step)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_prefix):
    """The small recipe run straight through its 4 steps; yields (config, workdir)."""
    config = _small(data_prefix)
    work = str(tmp_path_factory.mktemp("fra_straight"))
    assert pretrain.run(config, work)["step"] == 4
    return config, work


def test_run_trains_logs_exports_and_the_target_keeps_its_own_statistics(straight_run):
    """pretrain.run of the small recipe on 8 devices: metrics of every step, the target's own statistics."""
    _, work = straight_run
    rows = loop_utils.read_metrics(work)
    assert sorted(r["step"] for r in rows) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert {"heatmap_entropy", "cluster_usage", "cluster_ce_1", "memax_2", "decorrelation_12"} <= set(rows[-1])
    a = _state(work, 4)
    # the target's statistics move through its own forwards (4 steps x 2 views, momentum 0.1), like the
    # online network's, not as a 0.996-momentum EMA of them (which would stay near the initial zeros)
    t, s = a["teacher_stats"]["online"]["backbone"]["bn1"]["mean"], a["student_stats"]["online"]["backbone"]["bn1"]["mean"]
    assert np.max(np.abs(s)) > 0.05
    np.testing.assert_allclose(np.asarray(t), np.asarray(s), rtol=0.2, atol=0.02)
    assert not np.array_equal(np.asarray(a["teacher_stats"]["online"]["neck"]["proto"]),
                              np.asarray(a["student_stats"]["online"]["neck"]["proto"]))
    assert os.path.isfile(os.path.join(work, pretrain.TEACHER_BACKBONE_DIR, "metadata.json"))


def test_sigterm_then_resume_equals_the_straight_run(straight_run, tmp_path, monkeypatch):
    """SIGTERM after step 2 saves and returns; the resumed run's losses of steps 1-4 and its final state
    (online, target, both networks' BatchNorm statistics and `proto` buffers, LARS state) equal the
    straight run's bit for bit."""
    config, work = straight_run
    real_guard = loop_utils.preemption_guard

    @contextlib.contextmanager
    def guard_with_kill():
        with real_guard() as g:
            yield SigtermAt(g, at=2)

    resumed = str(tmp_path / "resumed")
    monkeypatch.setattr(loop_utils, "preemption_guard", guard_with_kill)
    assert pretrain.run(config, resumed)["step"] == 2
    assert not os.path.exists(os.path.join(resumed, pretrain.TEACHER_BACKBONE_DIR))  # stopped: no export
    monkeypatch.setattr(loop_utils, "preemption_guard", real_guard)
    assert pretrain.run(config, resumed)["step"] == 4
    loss = {r["step"]: r["loss"] for r in loop_utils.read_metrics(work)}
    loss_b = {r["step"]: r["loss"] for r in loop_utils.read_metrics(resumed)}
    assert sorted(loss_b) == [1, 2, 3, 4] and all(loss[s] == loss_b[s] for s in range(1, 5)), (loss, loss_b)
    a, b = _state(work, 4), _state(resumed, 4)
    assert set(a) == set(b) and {"student", "teacher", "student_stats", "teacher_stats", "opt_state"} <= set(a)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_a_batch_the_devices_do_not_divide_fails_naming_the_key(tmp_path, data_prefix):
    config = _small(data_prefix)
    config.unlock()
    config.batch_size = 12
    with pytest.raises(ValueError, match=r"config\.batch_size=12 does not divide by the 8 devices"):
        pretrain.run(config, str(tmp_path / "w"))


@pytest.mark.parametrize("features,dim", [("pooled", 64), ("projection", 16)])
def test_evaluators_embed_the_target_pooled_or_projected(features, dim):
    c = _small()
    c.unlock()
    c.fra.eval_features = features
    obj = fra_objective.Objective(c)
    variables = jax.eval_shape(lambda k: fra_objective.init_variables(c, k), jax.random.key(0))  # shapes only
    state = {"teacher": variables["params"]["online"], "teacher_stats": variables["batch_stats"]}
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)
    emb, _ = jax.eval_shape(lambda v, x: obj.eval_model().apply(v, x, train=False), obj.eval_variables(state), images)
    assert (emb.shape, emb.dtype) == ((2, dim), np.float32)
    assert set(obj.export_variables(state)["params"]) == set(variables["params"]["online"]["backbone"])
