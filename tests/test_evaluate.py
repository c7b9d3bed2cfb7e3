"""The 'evaluate' task on a tiny backbone: .bin verification, IJB, export; config errors name the key."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from configs import evaluate as evaluate_recipe
from lafs_jax import sharding as mesh_lib
from lafs_jax import variables as variables_lib
from lafs_jax.config import ConfigError
from lafs_jax.eval import embed, evaluate, export, ijb, verification
from lafs_jax.input.synthetic import face_like_image
from lafs_jax.input.verification_bin import save_bin
from lafs_jax.models import presets


def write_tiny_backbone(directory: str):
    """A randomly initialised tiny Part fViT saved in `directory` as fine-tuning saves its backbone;
    (model config, variables)."""
    cfg = presets.model_config("tiny")
    variables = jax.jit(lambda k: presets.init_variables(cfg, k))(jax.random.key(0))
    variables_lib.save_variables(directory, variables, {"model": variables_lib.to_json_dict(cfg),
                                                        "normalization": "[-1,1]", "color_order": "rgb",
                                                        "image_size": 112})
    return cfg, variables


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("backbone") / "backbone")
    return (d, *write_tiny_backbone(d))


def _write_bin(path, pairs=6):
    images, issame = [], []
    for k in range(pairs):
        same = k % 2 == 0
        images += [face_like_image(k, 0), face_like_image(k if same else k + 50, 1)]
        issame.append(same)
    save_bin(path, np.stack(images), issame)


def _write_ijb(root):
    """4 templates (2 identities x 2), 1-2 images each, all pairs; faces already in template position."""
    os.makedirs(os.path.join(root, "meta"))
    os.makedirs(os.path.join(root, "loose_crop"))
    tm, lm, img = [], [], 0
    for t in range(4):
        for j in range(1 + t % 2):
            img += 1
            Image.fromarray(face_like_image(t // 2, img)).save(os.path.join(root, "loose_crop", f"{img}.png"))
            tm.append(f"{img}.png {t + 1} {10 * (t + 1) + j}")
            lm.append(f"{img}.png " + " ".join(f"{v:.4f}" for v in ijb.ARCFACE_TEMPLATE.reshape(-1)) + " 0.9")
    pairs = [f"{a} {b} {int((a - 1) // 2 == (b - 1) // 2)}" for a in range(1, 5) for b in range(a + 1, 5)]
    for name, rows in (("face_tid_mid", tm), ("name_5pts_score", lm), ("template_pair_label", pairs)):
        open(os.path.join(root, "meta", f"ijbc_{name}.txt"), "w").write("\n".join(rows) + "\n")


def test_evaluate_task_matches_direct_computation(tmp_path, tiny_backbone):
    backbone, cfg, variables = tiny_backbone
    bin_path = str(tmp_path / "pairs.bin")
    _write_bin(bin_path)
    _write_ijb(str(tmp_path / "IJBC"))
    config = evaluate_recipe.get_config("tiny")
    config.evaluate.checkpoint = backbone
    config.evaluate.bins = (bin_path,)
    config.evaluate.ijbc_root = str(tmp_path / "IJBC")
    config.evaluate.batch_size = 8
    config.evaluate.nfolds = 3
    out = evaluate.run(config, str(tmp_path / "work"))

    # Independent computation: the plain (unsharded, unpadded) embedding function on the same images.
    model = presets.build_model(cfg)
    fn = jax.jit(embed.embedding_function(model, flip=True))
    from lafs_jax.input.verification_bin import load_bin

    images, issame = load_bin(bin_path, 112)
    want = verification.evaluate_pairs_embeddings(np.asarray(fn(variables, images)), issame, nfolds=3)
    got = json.load(open(tmp_path / "work" / "verification.json"))["pairs"]
    np.testing.assert_allclose(got["fold_accuracies"], want["fold_accuracies"], atol=1e-12)
    assert "| pairs | 6 |" in open(tmp_path / "work" / "verification.md").read()

    want_ijb = ijb.evaluate_target(lambda b, flip: np.asarray(fn(variables, b)), str(tmp_path / "IJBC"), "IJBC",
                                   batch_size=3)
    for far, tar in want_ijb["tar_at_far"].items():
        assert out["ijb"]["IJBC"][f"{far:g}"] == pytest.approx(tar, abs=1e-12)
    assert os.path.isfile(tmp_path / "work" / "ijb_roc.png")

    assert out["export"]["max_abs_diff"] < 1e-3
    _, meta = export.load_exported(out["export"]["path"])
    assert meta["normalization"] == "[-1,1]" and meta["flip"] is True and meta["input_shape"][0] == "b"


def test_metadata_override_changes_the_input_range(tmp_path, tiny_backbone):
    backbone, cfg, variables = tiny_backbone
    e = embed.Embedder.from_variables_dir(backbone, normalization="[-0.5,0.5]", batch_size=8)
    assert (e.normalization, e.color_order, e.image_size) == ("[-0.5,0.5]", "rgb", 112)
    images = np.stack([face_like_image(1, i) for i in range(2)])
    model = presets.build_model(cfg)
    x = images.astype(np.float32) / 255.0 - 0.5
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    want = apply(variables, x) + apply(variables, x[:, :, ::-1])
    np.testing.assert_allclose(e.embed(images), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_config_errors_name_the_key(tmp_path, tiny_backbone):
    backbone, _, _ = tiny_backbone
    config = evaluate_recipe.get_config("tiny")
    with pytest.raises(ConfigError, match=r"evaluate\.checkpoint"):
        evaluate.validate(config, str(tmp_path / "empty"))
    config.evaluate.checkpoint = backbone
    with pytest.raises(ConfigError, match=r"evaluate\.bins\[0\]"):
        config.evaluate.bins = (str(tmp_path / "missing.bin"),)
        evaluate.validate(config, str(tmp_path))
    config.evaluate.bins = ()
    config.evaluate.normalization = "[0,1]"
    with pytest.raises(ConfigError, match=r"evaluate\.normalization"):
        evaluate.validate(config, str(tmp_path))
    config.evaluate.normalization = ""
    config.evaluate.ijbb_root = str(tmp_path)
    with pytest.raises(ConfigError, match=r"evaluate\.ijbb_root"):
        evaluate.validate(config, str(tmp_path))
    config.evaluate.ijbb_root = ""
    config.evaluate.export = False
    with pytest.raises(ConfigError, match="nothing to do"):
        evaluate.validate(config, str(tmp_path))
    with pytest.raises(ValueError, match="unknown variant"):
        evaluate_recipe.get_config("huge")


def test_backbone_loads_against_its_model_config_onto_the_callers_mesh(tmp_path, tiny_backbone):
    """load_backbone reads only the model's variables (a converted checkpoint's classifier is left on
    disk), as numpy or placed on the caller's mesh by rules; other shapes name the entry."""
    backbone, cfg, variables = tiny_backbone
    extra = str(tmp_path / "with_classifier")
    variables_lib.save_variables(extra, {**variables, "classifier": {"centers": np.ones((7, cfg.dim), np.float32)}},
                                 variables_lib.read_metadata(backbone))
    _, host, meta = embed.load_backbone(extra, host=True)
    assert set(host) == {"params", "batch_stats"} and meta["image_size"] == 112
    assert all(type(x) is np.ndarray for x in jax.tree.leaves(host))
    jax.tree.map(np.testing.assert_array_equal, host, jax.tree.map(np.asarray, variables))
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "model": 2}), jax.devices()[:2])
    _, placed, _ = embed.load_backbone(extra, mesh=mesh, rules=((r"mlp/fc1/kernel$", (None, "model")),))
    fc1 = placed["params"]["vit"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == P(None, "model") and fc1.sharding.device_set == set(jax.devices()[:2])
    assert placed["params"]["vit"]["head_norm"]["scale"].sharding.spec == P()
    meta_other = dict(variables_lib.read_metadata(backbone))
    meta_other["model"] = dict(meta_other["model"], mlp_dim=128)  # the directory holds mlp_dim 256
    other = str(tmp_path / "other")
    variables_lib.save_variables(other, variables, meta_other)
    with pytest.raises(ValueError, match=r"'params/vit/encoder/block_0/mlp/fc1/bias' is stored with shape "
                                         r"\(256,\), the model needs \(128,\)"):
        embed.load_backbone(other, host=True)


def test_embedders_of_one_architecture_share_compilations_not_variables(tiny_backbone):
    """Two Embedders of equal models reuse one compiled program (one compilation for both), yet each
    embeds with its own variables; another input range gets its own program."""
    backbone, cfg, variables = tiny_backbone
    images = np.stack([face_like_image(k, 0) for k in range(5)])
    first = embed.Embedder.from_variables_dir(backbone, batch_size=8)
    doubled = jax.tree.map(lambda x: np.asarray(x) * 2, variables)
    second = embed.Embedder(presets.build_model(presets.model_config("tiny")), doubled, image_size=112, batch_size=8)
    assert first._fns[True] is second._fns[True] and first._fns[False] is not first._fns[True]
    before = first._fns[True]._cache_size()  # other tests in this process may have compiled it already
    got_first, got_second = first.embed(images), second.embed(images)
    assert first._fns[True]._cache_size() - before <= 1  # at most one compilation served both

    fn = jax.jit(embed.embedding_function(presets.build_model(cfg), flip=True))
    np.testing.assert_allclose(got_first, np.asarray(fn(variables, images)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_second, np.asarray(fn(doubled, images)), rtol=1e-5, atol=1e-5)
    assert np.abs(got_first - got_second).max() > 1e-2
    other = embed.Embedder(presets.build_model(cfg), variables, image_size=112, normalization="imagenet", batch_size=8)
    assert other._fns[True] is not first._fns[True]
