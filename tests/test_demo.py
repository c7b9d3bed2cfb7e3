"""The demo chain end to end with a handful of steps: every artefact is written, the table is well formed,
and a second call skips every finished stage."""
import json
import os

from configs import demo as demo_config
from lafs_jax import demo


def _few_steps_config():
    c = demo_config.get_config()
    c.unlock()
    for name in ("stage1", "finetune"):
        c[name].total_steps = 3
        c[name].batch_size = 16
        c[name].eval.every_steps = 3
        c[name].checkpoint.every_steps = 3
        c[name].optim.warmup_epochs = 0.05
    c.pretrain.total_steps = 3
    c.pretrain.batch_size = 16
    c.pretrain.data.lafs.local_views = 2
    c.pretrain.checkpoint.every_steps = 3
    c.pretrain.optim.warmup_epochs = 0.05
    c.pretrain.optim.freeze_last_layer_epochs = 0
    c.lock()
    return c


def test_demo_chain_writes_every_artefact_and_skips_finished_stages(tmp_path, capsys):
    config = _few_steps_config()
    out = demo.run(config, str(tmp_path))
    for name in ("results.md", "results.json", "roc.png", "landmarks.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    for stage in ("stage1", "finetune_scratch", "finetune_lafs"):
        assert os.path.exists(tmp_path / stage / "backbone" / "metadata.json")
        assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(tmp_path / stage) for f in fs)
    assert os.path.exists(tmp_path / "pretrain" / "teacher_backbone" / "metadata.json")

    results = json.load(open(tmp_path / "results.json"))["results"]
    assert list(results) == list(demo.METHODS)
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["num_pairs"] == r["num_genuine"] + r["num_impostor"] > 0
    table = open(tmp_path / "results.md").read().strip().splitlines()
    rows = [line for line in table if line.startswith("| ")]
    assert len(rows) == 1 + len(demo.METHODS)  # header + one row per method
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    assert out["results"]["raw pixels"]["accuracy"] == results["raw pixels"]["accuracy"]

    capsys.readouterr()
    again = demo.run(config, str(tmp_path))
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == 5  # data + 4 training stages
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
    from lafs_jax.train import finetune

    configs = demo.stage_configs(demo_config.get_config(), str(tmp_path))
    for d in ("stage1/backbone", "pretrain/teacher_backbone", "data"):
        os.makedirs(tmp_path / d)
    open(tmp_path / "data" / "verification.bin", "wb").close()
    assert [configs[n].optim.layer_decay for n in ("stage1", "finetune_scratch", "finetune_lafs")] == [1.0, 1.0, 0.58]
    for name in ("stage1", "finetune_scratch", "finetune_lafs"):
        finetune.validate(configs[name])
