"""The demo chain: every artefact is written, the table is well formed, a second call skips every finished
stage, and the stage configs wire the chain. The training stages are stand-ins here that write a freshly
initialised backbone where the real stage writes its trained one (the real `finetune.run` / `pretrain.run`
are tested in test_finetune.py / test_pretrain.py, on the same tiny recipes); everything of the demo's own
(data set, skip logic, evaluation, table, plots) runs for real."""
import functools
import json
import os

import jax
import ml_collections
import pytest

from configs import demo as demo_config
from lafs_jax import demo, variables
from lafs_jax.models import presets
from lafs_jax.train import finetune, pretrain


@functools.cache
def _untrained_variables(model_json: str, seed: int) -> dict:
    cfg = ml_collections.ConfigDict(json.loads(model_json))
    return jax.device_get(jax.jit(lambda k: presets.init_variables(cfg, k))(jax.random.key(seed)))


def _fake_finetune(config, workdir):
    """Writes WORKDIR/backbone as finetune.run does (its metadata), with untrained variables."""
    v = _untrained_variables(config.model.to_json(), config.seed)
    variables.save_variables(os.path.join(workdir, "backbone"), v,
                             finetune.backbone_metadata(config, step=0, init="stand-in", num_classes=30))
    return {"step": 0}


def _fake_pretrain(config, workdir):
    """Writes WORKDIR/teacher_backbone as pretrain.run does, with an untrained teacher ViT."""
    student = pretrain.init_student(pretrain.build_networks(config), config, jax.random.key(config.seed))
    pretrain.save_teacher_backbone(os.path.join(workdir, pretrain.TEACHER_BACKBONE_DIR),
                                   student["backbone"]["vit"], config, 0)
    return {"step": 0}


@pytest.fixture
def stand_in_stages(monkeypatch):
    calls = []
    monkeypatch.setattr(demo.finetune, "run", lambda c, w: calls.append(("finetune", w)) or _fake_finetune(c, w))
    monkeypatch.setattr(demo.pretrain, "run", lambda c, w: calls.append(("pretrain", w)) or _fake_pretrain(c, w))
    return calls


def test_demo_chain_writes_every_artefact_and_skips_finished_stages(tmp_path, capsys, stand_in_stages):
    config = demo_config.get_config()
    out = demo.run(config, str(tmp_path))
    assert [(task, os.path.basename(w)) for task, w in stand_in_stages] == [
        ("finetune", "stage1"), ("pretrain", "pretrain"), ("finetune", "finetune_scratch"),
        ("finetune", "finetune_lafs")]
    for name in ("results.md", "results.json", "roc.png", "landmarks.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert os.path.exists(tmp_path / "data" / "verification.bin")

    results = json.load(open(tmp_path / "results.json"))["results"]
    assert list(results) == list(demo.METHODS)
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["num_pairs"] == r["num_genuine"] + r["num_impostor"] == 900
    table = open(tmp_path / "results.md").read().strip().splitlines()
    rows = [line for line in table if line.startswith("| ")]
    assert len(rows) == 1 + len(demo.METHODS)  # header + one row per method
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    assert out["results"]["raw pixels"]["accuracy"] == results["raw pixels"]["accuracy"]

    capsys.readouterr()
    again = demo.run(config, str(tmp_path))
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == 6  # data + 4 training stages + the evaluation
    assert "| fine-tuned from LAFS |" in printed  # the table, from results.md
    assert len(stand_in_stages) == 4  # nothing trained again
    assert again["results"]["fine-tuned from LAFS"]["accuracy"] == results["fine-tuned from LAFS"]["accuracy"]


def test_stage_configs_wire_the_chain(tmp_path):
    configs = demo.stage_configs(demo_config.get_config(), str(tmp_path))
    stage1_backbone = str(tmp_path / "stage1" / "backbone")
    assert configs["pretrain"].lafs.landmark_path == stage1_backbone
    assert configs["finetune_lafs"].init.backbone == str(tmp_path / "pretrain" / "teacher_backbone")
    assert configs["finetune_scratch"].init.backbone == ""
    assert configs["finetune_scratch"].init.landmark_cnn == configs["finetune_lafs"].init.landmark_cnn == stage1_backbone
    assert configs["finetune_lafs"].loss.sample_rate < 1.0
    assert all(c.data.path == str(tmp_path / "data" / "train") for c in configs.values())


def test_stage_configs_are_valid_and_decay_layers_only_from_lafs(tmp_path):
    """Stage 1 and the scratch run train a random ViT (layer_decay 1.0), the LAFS run fine-tunes the
    teacher with the paper's 0.58; each stage config passes fine-tuning's validation."""
    configs = demo.stage_configs(demo_config.get_config(), str(tmp_path))
    for d in ("stage1/backbone", "pretrain/teacher_backbone", "data"):
        os.makedirs(tmp_path / d)
    open(tmp_path / "data" / "verification.bin", "wb").close()
    assert [configs[n].optim.layer_decay for n in ("stage1", "finetune_scratch", "finetune_lafs")] == [1.0, 1.0, 0.58]
    for name in ("stage1", "finetune_scratch", "finetune_lafs"):
        finetune.validate(configs[name])
