"""Recipe loading, command-line overrides and validation errors of main.py and lafs_jax.config."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from cpu_env import cpu_env

import main
from lafs_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, workdir):
    env = cpu_env(8)
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args, f"--workdir={workdir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_info_task_reports_mesh_with_overrides(tmp_path):
    r = _main("--config=configs/demo.py", "--config.task=info", "--config.mesh.model=2", workdir=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.load(open(tmp_path / "info.json"))
    assert info["global_devices"] == 8
    assert info["mesh"] == {"data": 4, "model": 2}


def test_recipe_argument_after_colon_selects_the_variant(tmp_path):
    r = _main("--config=configs/finetune.py:tiny", "--config.task=info", "--config.batch_size=16", workdir=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.load(open(tmp_path / "info.json"))["config"]
    assert (config["model"]["dim"], config["batch_size"], config["loss"]["s"]) == (96, 16, 32.0)
    r = _main("--config=configs/finetune.py:ms1mv3,10pct", "--config.task=info", workdir=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.load(open(tmp_path / "info.json"))["config"]
    assert (config["model"]["dim"], config["data"]["subset"]["partition"]) == (768, 0.1)
    r = _main("--config=configs/finetune.py:bogus", workdir=tmp_path)
    assert r.returncode != 0 and "bogus" in r.stderr


def test_unknown_key_names_the_key(tmp_path):
    r = _main("--config", "configs/demo.py", "--config.nonexistent=1", workdir=tmp_path)
    assert r.returncode != 0
    assert "nonexistent" in r.stderr and "valid fields" in r.stderr


def test_unknown_nested_key_lists_valid_fields(tmp_path):
    r = _main("--config=configs/demo.py", "--config.mesh.dtaa=2", workdir=tmp_path)
    assert r.returncode != 0
    assert "mesh.dtaa" in r.stderr and "'data'" in r.stderr


def test_wrongly_typed_value_names_the_key(tmp_path):
    r = _main("--config=configs/demo.py", "--config.seed=abc", workdir=tmp_path)
    assert r.returncode != 0
    assert "config.seed" in r.stderr


def test_unknown_task_lists_choices(tmp_path):
    r = _main("--config=configs/demo.py", "--config.task=fly", workdir=tmp_path)
    assert r.returncode != 0
    assert "'fly'" in r.stderr and "finetune" in r.stderr and "pretrain" in r.stderr


def test_locked_recipe_rejects_new_fields_in_python():
    c = config_lib.base_config()
    c.lock()
    with pytest.raises(AttributeError):
        c.not_a_field = 1


def test_validate_common_rejects_bad_mesh():
    c = config_lib.base_config()
    c.mesh.data = 0
    with pytest.raises(config_lib.ConfigError, match="mesh.data"):
        config_lib.validate_common(c)


def test_get_path_names_missing_part():
    c = config_lib.base_config()
    with pytest.raises(config_lib.ConfigError, match="mesh.nothing"):
        config_lib.get_path(c, "mesh.nothing.deeper")


@pytest.mark.parametrize("recipe,key", [("finetune.py:tiny", "optim.lr"), ("lafs_pretrain.py:tiny", "dino.teacher_temp"),
                                        ("dino_pretrain.py:tiny", "data.dino.local_scale"),
                                        ("demo.py", "stage1.loss.centers_momentum")])  # nested recipe
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_numbers_are_rejected_in_every_field(recipe, key, bad):
    import re

    path, _, arg = recipe.partition(":")
    spec = importlib.util.spec_from_file_location("recipe", os.path.join(ROOT, "configs", path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg or None)
    node, leaf = c, key.split(".")[-1]
    for part in key.split(".")[:-1]:
        node = node[part]
    old = node[leaf]
    node[leaf] = (old[0], bad) if isinstance(old, tuple) else bad  # a tuple's entry counts too
    where = f"{key}[1]" if isinstance(old, tuple) else key
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"config.{where}={bad!r} is not valid")):
        config_lib.validate_common(c)


def test_infinite_learning_rate_stops_main_at_start_up(tmp_path):
    r = _main("--config=configs/finetune.py:tiny", "--config.optim.lr=inf", workdir=tmp_path)
    assert r.returncode != 0 and "config.optim.lr=inf is not valid: a finite number" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "checkpoints")


def _training_recipes():
    """{name: config} of every training task's recipe, the demo's stages included (no jax work)."""
    from configs import demo, dino_pretrain, finetune, lafs_pretrain

    out = {"finetune": finetune.get_config(), "finetune:tiny": finetune.get_config("tiny"),
           "dino_pretrain": dino_pretrain.get_config(), "lafs_pretrain": lafs_pretrain.get_config()}
    d = demo.get_config()
    out.update({f"demo.{k}": d[k] for k in ("stage1", "pretrain_lafs", "pretrain_dino", "finetune")})
    return out


def test_training_recipes_share_the_run_fields():
    """One name per concept in every training task: log_every_steps, precision, checkpoint.async_save."""
    for name, c in _training_recipes().items():
        assert c.log_every_steps >= 1 and "log_every" not in c, name
        assert c.precision == "auto", name
        assert c.checkpoint.async_save is True, name


def test_precision_auto_is_float32_on_cpu():
    from lafs_jax.models import presets

    model = _training_recipes()["finetune:tiny"].model
    assert presets.with_precision(model, "auto").dtype == "float32"  # the tests run on CPU
    assert presets.with_precision(model, "bfloat16").dtype == "bfloat16" and model.dtype == "float32"
    with pytest.raises(config_lib.ConfigError, match="config.precision='half'"):
        presets.with_precision(model, "half")


def test_log_setup_hides_library_info_and_keeps_ours():
    """main.py's logs.configure: below WARNING only lafs_jax's (and main.py's) records pass absl's
    handler; orbax's INFO (it logs through absl) is dropped; --verbosity 1 lets it through again."""
    import logging

    from absl import logging as absl_logging

    from lafs_jax import logs

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    handler = absl_logging.get_absl_handler()
    orbax_file = os.path.join(os.path.dirname(logging.__file__), "site-packages", "orbax", "checkpoint", "x.py")
    ours = os.path.join(logs.PACKAGE_DIR, "train", "loop_utils.py")
    main_py = os.path.join(ROOT, "main.py")
    try:
        logs.configure(0, own_paths=(main_py,))
        logs.configure(0, own_paths=(main_py,))  # idempotent: one filter
        assert sum(isinstance(f, logs.OwnRecordsBelowWarning) for f in handler.filters) == 1
        assert handler.filter(record(ours, logging.INFO)) and handler.filter(record(main_py, logging.INFO))
        assert not handler.filter(record(orbax_file, logging.INFO))
        assert not handler.filter(record(logs.PACKAGE_DIR + "_other/x.py", logging.INFO))  # a prefix is not a folder
        assert handler.filter(record(orbax_file, logging.WARNING))
        assert logging.getLogger("orbax").level == logging.getLogger("jax").level == logging.WARNING
        logs.configure(1)
        assert handler.filter(record(orbax_file, logging.INFO))
        assert logging.getLogger("orbax").level == logging.NOTSET
    finally:
        logs.configure(1)


def test_every_recipe_names_a_task_main_runs():
    """main.TASK_RUNNERS is the one task list: every recipe's config.task is in it, a base config's too,
    and an unknown task is a ConfigError naming config.task."""
    assert all(callable(run) for run in main.TASK_RUNNERS.values())
    tasks = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        spec = importlib.util.spec_from_file_location("recipe_task", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "get_config"):
            tasks.add(module.get_config().task)
    assert tasks | {config_lib.base_config().task} <= set(main.TASK_RUNNERS)
    bad = config_lib.base_config()
    bad.task = "nope"
    with pytest.raises(config_lib.ConfigError, match=r"config\.task='nope'"):
        config_lib.validate_common(bad, tasks=tuple(main.TASK_RUNNERS))
