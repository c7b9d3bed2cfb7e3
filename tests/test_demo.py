"""The demo chain: every artefact is written, the tables are well formed, a second call skips every
finished stage and evaluation, and the stage configs wire the few-shot experiment. The training stages
are stand-ins here that write a freshly initialised backbone where the real stage writes its trained one
(the real `finetune.run` / `pretrain.run` are tested in test_finetune.py / test_pretrain.py, on the same
tiny recipes); everything of the demo's own (data set, skip logic, evaluation, tables, plots) runs for
real, and so do the user commands of the README's Quick start (embed, compare, search, ONNX export) on a
backbone the chain wrote."""
import functools
import json
import os

import csv

import jax
import ml_collections
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from configs import demo as demo_config
from lafs_jax import compare as compare_cli
from lafs_jax import demo, variables
from lafs_jax import embed as embed_cli
from lafs_jax import search as search_cli
from lafs_jax.eval import export as export_cli
from lafs_jax.models import presets
from lafs_jax.train import finetune, pretrain
from test_onnx_export import _onnx_input


@functools.cache
def _untrained_variables(model_json: str, seed: int) -> dict:
    cfg = ml_collections.ConfigDict(json.loads(model_json))
    return jax.device_get(jax.jit(lambda k: presets.init_variables(cfg, k))(jax.random.key(seed)))


def _fake_finetune(config, workdir):
    """Writes WORKDIR/backbone as finetune.run does (its metadata), with untrained variables."""
    v = _untrained_variables(config.model.to_json(), config.seed)
    variables.save_variables(os.path.join(workdir, "backbone"), v,
                             finetune.backbone_metadata(config, step=0, init="stand-in", num_classes=25))
    return {"step": 0}


def _fake_pretrain(config, workdir):
    """Writes WORKDIR/teacher_backbone as pretrain.run does, with an untrained teacher ViT."""
    student = pretrain.objective(config).init_student(jax.random.key(config.seed))["params"]
    pretrain.save_teacher_backbone(os.path.join(workdir, pretrain.TEACHER_BACKBONE_DIR),
                                   {"params": student["backbone"]["vit"]}, config, 0)
    return {"step": 0}


PAIRS = 120  # of each verification set the evaluation reads here (the first ones; both kinds, shuffled)


@pytest.fixture
def stand_in_stages(monkeypatch):
    """Stand-in training stages (each call recorded), and the demo's evaluation on the first PAIRS pairs
    of each set (its cost is in the forward passes of 9 models over 2,700 pairs)."""
    load_bin = demo.load_bin
    monkeypatch.setattr(demo, "load_bin", lambda path, size: tuple(a[:n] for a, n in zip(load_bin(path, size),
                                                                                         (2 * PAIRS, PAIRS))))
    calls = []
    monkeypatch.setattr(demo.finetune, "run", lambda c, w: calls.append(("finetune", w)) or _fake_finetune(c, w))
    monkeypatch.setattr(demo.pretrain, "run", lambda c, w: calls.append(("pretrain", w)) or _fake_pretrain(c, w))
    return calls


def _small_demo_config(arg=None):
    """The demo recipe with one-block ViTs and two-block landmark CNNs: the chain and evaluation are the
    same, the programs smaller (most of this test's time is tracing and compiling them)."""
    c = demo_config.get_config(arg)
    with c.unlocked():
        for stage in (c.stage1, c.pretrain_lafs, c.pretrain_dino, c.finetune):
            stage.model.depth = 1
            stage.model.landmark.blocks = stage.model.landmark.blocks[:2]
    return c


def test_demo_chain_writes_every_artefact_and_skips_finished_stages(tmp_path, capsys, stand_in_stages):
    config = _small_demo_config()
    out = demo.run(config, str(tmp_path))
    runs = [f"{m}_k{k}" for m in ("scratch", "dino", "lafs") for k in ("1", "all")]
    assert [(task, os.path.relpath(w, tmp_path)) for task, w in stand_in_stages] == (
        [("finetune", "seed0/stage1"), ("pretrain", "seed0/pretrain_dino"), ("pretrain", "seed0/pretrain_lafs")]
        + [("finetune", f"seed0/{r}") for r in runs])
    for name in ("results.md", "results.json", "fewshot.png", "roc.png", "landmarks.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    for name in ("validation.bin", "test.bin", "train.rec", "manifest.json"):
        assert os.path.exists(tmp_path / "data" / name), name

    results = json.load(open(tmp_path / "results.json"))
    assert results["seeds"] == [0] and results["shots"] == [1, 0] and len(results["commit"]) >= 7
    rows = ["raw", "dino_teacher", "lafs_teacher"] + runs
    assert sorted(results["test"]) == sorted(rows) and sorted(results["validation"]) == sorted(rows)
    for split in ("test", "validation"):
        for row in rows:
            t = results[split][row]
            assert 0.0 <= t["accuracy"] <= 1.0 and t["sd_over"] == "folds" and t["seeds"] == [0]
            assert results["runs"][row]["0"][split]["num_pairs"] == PAIRS
    table = open(tmp_path / "results.md").read()
    test_rows = [line for line in table.split("validation people")[0].splitlines() if line.startswith("| ")]
    assert len(test_rows) == 1 + 6  # header + raw + 2 teachers + 3 fine-tuned methods
    assert all(row.count("|") == 4 for row in test_rows)  # method, k = 1, k = all
    assert out["test"]["lafs_k1"]["accuracy"] == results["test"]["lafs_k1"]["accuracy"]

    capsys.readouterr()
    again = demo.run(config, str(tmp_path))
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == 1 + 9  # data + stage 1, 2 pretrainings, 6 fine-tunings
    assert len(stand_in_stages) == 9  # nothing trained again
    accuracies = lambda r: {row: t["accuracy"] for row, t in r["test"].items()}
    assert accuracies(again) == accuracies(out)  # evaluations read back from each run's verification.json

    _user_commands_run_on(str(tmp_path / "seed0" / "lafs_k1" / "backbone"), tmp_path / "data", tmp_path / "user")


def _user_commands_run_on(backbone, data, out):
    """The README's next steps after the demo, on a backbone the demo wrote and the demo's own data: embed its
    training images (.rec), compare two of them with a threshold calibrated on its validation pairs, search
    the embeddings against themselves, export to ONNX and run the graph in onnxruntime."""
    out.mkdir()
    emb = str(out / "train.npy")
    assert embed_cli.main(["--backbone", backbone, "--images", str(data / "train.rec"), "--out", emb,
                           "--no-flip", "--batch", "32"]) == 0
    embeddings, sources = np.load(emb), json.load(open(out / "train.json"))["sources"]
    images, read_sources, _ = embed_cli.read_images(str(data / "train.rec"))
    assert embeddings.shape[0] == len(sources) == len(images) and sources == read_sources
    Image.fromarray(images[0]).save(out / "a.png")
    Image.fromarray(images[1]).save(out / "b.png")

    result = compare_cli.compare(str(out / "a.png"), str(out / "b.png"), backbone,
                                 calibrate=str(data / "validation.bin"), far=0.01, flip=False, batch=32)
    unit = embeddings[:2] / np.linalg.norm(embeddings[:2], axis=1, keepdims=True)
    assert result["similarity"] == pytest.approx(float(unit[0] @ unit[1]), abs=1e-4)
    assert result["threshold_source"].startswith("calibrated on") and result["far"] <= 0.01
    assert result["verdict"] == ("same" if result["similarity"] >= result["threshold"] else "different")

    matches = str(out / "matches.csv")
    assert search_cli.main(["--gallery", emb, "--probes", emb, "--top-k", "3", "--out", matches]) == 0
    rows = list(csv.DictReader(open(matches)))
    assert len(rows) == 3 * len(sources)
    first = [r for r in rows if r["rank"] == "1"]
    assert [r["probe"] for r in first] == [r["gallery"] for r in first] == [str(s) for s in sources]  # itself first

    onnx_path = str(out / "model.onnx")
    export_cli.main(["--backbone", backbone, "--format", "onnx", "--out", onnx_path])
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"data": _onnx_input(images[:4])})
    np.testing.assert_allclose(got, embeddings[:4], atol=1e-4 * np.abs(embeddings[:4]).max())


def test_stage_configs_wire_the_few_shot_runs(tmp_path):
    config = demo_config.get_config("fewshot")
    configs = demo.stage_configs(config, str(tmp_path), seed=2)
    root = tmp_path / "seed2"
    stage1_backbone = str(root / "stage1" / "backbone")
    assert configs["pretrain_lafs"].lafs.landmark_path == stage1_backbone
    assert configs["pretrain_dino"].model.kind == "fvit" and configs["pretrain_dino"].method == "dino"
    for k, steps in zip(("1", "2", "4", "all"), config.finetune_steps):
        scratch, dino, lafs = (configs[f"{m}_k{k}"] for m in ("scratch", "dino", "lafs"))
        assert scratch.total_steps == dino.total_steps == lafs.total_steps == steps  # same budget per k
        assert {c.data.subset.k for c in (scratch, dino, lafs)} == {0 if k == "all" else int(k)}
        assert all(c.data.subset.seed == c.seed == 2 and c.data.subset.k_draw == "random" for c in (scratch, lafs))
        assert scratch.init.backbone == "" and scratch.optim.layer_decay == 1.0
        assert lafs.init.backbone == str(root / "pretrain_lafs" / "teacher_backbone")
        assert dino.init.backbone == str(root / "pretrain_dino" / "teacher_backbone")
        assert lafs.optim.layer_decay == dino.optim.layer_decay == config.pretrained_layer_decay
        assert scratch.init.landmark_cnn == lafs.init.landmark_cnn == stage1_backbone
        assert scratch.model.kind == lafs.model.kind == "part_fvit" and dino.model.kind == "fvit"
        images = 25 * (10 if k == "all" else int(k))  # one warmup for every k, in that k's epochs
        assert lafs.optim.warmup_epochs * (images // lafs.batch_size) == pytest.approx(config.finetune_warmup_steps)
    assert all(c.data.path == str(tmp_path / "data" / "train") for c in configs.values())
    assert all(c.eval.bins == (str(tmp_path / "data" / "validation.bin"),)
               for name, c in configs.items() if not name.startswith("pretrain"))


def test_stage_configs_pass_their_tasks_validation(tmp_path):
    configs = demo.stage_configs(demo_config.get_config(), str(tmp_path), seed=0)
    for d in ("seed0/stage1/backbone", "seed0/pretrain_lafs/teacher_backbone", "seed0/pretrain_dino/teacher_backbone",
              "data"):
        os.makedirs(tmp_path / d)
    open(tmp_path / "data" / "validation.bin", "wb").close()
    for name, c in configs.items():
        (pretrain.validate if name.startswith("pretrain") else finetune.validate)(c)


def test_stage_configs_refuse_a_batch_larger_than_the_k_shot_set(tmp_path):
    config = demo_config.get_config()
    with config.unlocked():
        config.finetune.batch_size = 32
    with pytest.raises(ValueError, match="k = 1: 25 training images, fewer than config.finetune.batch_size=32"):
        demo.stage_configs(config, str(tmp_path), seed=0)


def _verification(acc, tar, std=0.01):
    return {"accuracy": acc, "accuracy_std": std, "tar_at_far": {str(demo.FAR): tar}}


def test_summary_is_over_seeds_when_there_are_several():
    runs = {"raw": {0: {"test": _verification(0.8, 0.5)}, 1: {"test": _verification(0.8, 0.5)}},
            "lafs_k1": {0: {"test": _verification(0.70, 0.30)}, 1: {"test": _verification(0.74, 0.34)}},
            "lafs_kall": {0: {"test": _verification(0.90, 0.6)}}}
    table = demo.summarise(runs, "test")
    assert table["lafs_k1"]["accuracy"] == pytest.approx(0.72)
    assert table["lafs_k1"]["accuracy_sd"] == pytest.approx(np.std([0.70, 0.74], ddof=1))
    assert table["lafs_k1"]["tar"] == pytest.approx(0.32) and table["lafs_k1"]["sd_over"] == "seeds"
    assert table["lafs_kall"]["accuracy_sd"] == 0.01 and table["lafs_kall"]["sd_over"] == "folds"  # one seed
    text = demo.markdown_tables(table, (1, 0), "test", 900)
    lines = text.splitlines()
    assert lines[2] == "| method | k = 1 | k = all |"
    assert lines[4] == "| raw pixels (no learning) | 80.00 ± 0.00 (50.0) | same |"
    assert lines[5] == "| Part fViT from LAFS | 72.00 ± 2.83 (32.0) | 90.00 ± 1.00 (60.0) |"


def test_a_workdir_with_the_earlier_split_is_refused(tmp_path):
    os.makedirs(tmp_path / "data")
    json.dump({"seed": 0, "train": {"people": 30}, "verification": {"people": 10}},
              open(tmp_path / "data" / "manifest.json", "w"))
    with pytest.raises(ValueError, match="built by another split.*use a new --workdir"):
        demo.run(demo_config.get_config(), str(tmp_path))

