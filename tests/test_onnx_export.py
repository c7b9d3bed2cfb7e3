"""ONNX export (jax2onnx, InsightFace's convention): parity with the JAX embedding in onnxruntime for every
family, the symbolic batch, the sidecar, and the command line."""
import json
import os
import runpy
import sys

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lafs_jax import variables as variables_lib
from lafs_jax.eval import embed, export
from lafs_jax.models import presets

# family -> (model config, normalization, colour order): each input normalisation re-expressed once
FAMILIES = ("part_fvit", "fvit", "insightface_vit", "resnet", "clip_vit")
SETTINGS = {"part_fvit": ("[-1,1]", "rgb"), "fvit": ("imagenet", "bgr"), "insightface_vit": ("[-0.5,0.5]", "rgb"),
            "resnet": ("vggface2", "rgb"), "clip_vit": ("clip", "rgb")}  # FRA's and FaRL's inputs


def _config(family):
    if family == "insightface_vit":  # a 2-block D 32 InsightFace ViT on 36 px images (patch 9)
        cfg = presets.model_config("insightface_t")
        cfg.image_size, cfg.dim, cfg.depth, cfg.heads, cfg.head_dim, cfg.mlp_dim = 36, 32, 2, 2, 16, 64
        cfg.insightface.embedding_size = 32
        return cfg
    if family in ("resnet", "clip_vit"):  # FRA's ResNet (BatchNorm frozen at its statistics), FaRL's image tower
        return presets.model_config("resnet_tiny" if family == "resnet" else "clip_tiny")
    cfg = presets.model_config("tiny")
    cfg.kind = family
    return cfg


def _backbone_dir(tmp, family, seed=0):
    cfg = _config(family)
    variables = jax.tree.map(np.asarray, presets.init_variables(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    if "batch_stats" in variables:  # running statistics away from (0, 1): BatchNorm must use them
        variables["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda p, a: (rng.uniform(0.5, 1.5, a.shape) if "var" in jax.tree_util.keystr(p)
                          else rng.normal(0, 0.1, a.shape)).astype(a.dtype), variables["batch_stats"])
    normalization, color_order = SETTINGS[family]
    d = str(tmp / family)
    variables_lib.save_variables(d, variables, {"model": cfg.to_dict(), "normalization": normalization,
                                                "color_order": color_order, "image_size": cfg.image_size})
    return d


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{family: (variables dir, model.onnx, sidecar)}, each exported once."""
    tmp = tmp_path_factory.mktemp("onnx")
    out = {}
    for family in FAMILIES:
        d = _backbone_dir(tmp, family)
        out[family] = (d, *export.export_onnx(d, str(tmp / f"{family}.onnx")))
    return out


def _onnx_input(images):
    """InsightFace's preprocessing outside the graph: uint8 RGB NHWC -> (x / 255 - 0.5) / 0.5 NCHW."""
    return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_matches_the_jax_embedding(exported, family):
    d, path, _ = exported[family]
    model, variables, meta = embed.load_backbone(d, host=True)
    f = jax.jit(embed.embedding_function(model, normalization=meta["normalization"], color_order=meta["color_order"],
                                         flip=False))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    size = meta["image_size"]
    for b in (1, 3):  # one graph, any batch size
        images = np.random.default_rng(b).integers(0, 256, (b, size, size, 3)).astype(np.uint8)
        want = np.asarray(f(variables, images))
        (got,) = sess.run(None, {"data": _onnx_input(images)})
        rel = np.abs(got - want).max() / np.abs(want).max()
        print(f"{family} batch {b}: max |onnx - jax| / max |jax| = {rel:.2e}")
        assert got.shape == want.shape and rel < 1e-4, (family, b, rel)


def test_graph_interface_and_sidecar(exported):
    for family, (d, path, sidecar) in exported.items():
        m = onnx.load(path)
        (inp,), (out,) = m.graph.input, m.graph.output
        dims = [x.dim_param or x.dim_value for x in inp.type.tensor_type.shape.dim]
        size = _config(family).image_size
        assert inp.name == "data" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert isinstance(dims[0], str) and dims[1:] == [3, size, size], dims
        assert out.name == "embedding"
        assert not any(n.op_type in ("Dropout", "BatchNormalization") and "training_mode" in
                       [a.name for a in n.attribute] for n in m.graph.node)
        meta = json.load(open(sidecar))
        assert sidecar == path + ".json"
        assert meta["input"]["name"] == "data" and meta["input"]["layout"] == "NCHW"
        assert meta["input"]["range"] == "[-1,1]" and meta["input"]["color_order"] == "rgb"
        assert meta["normalization"]["backbone"] == SETTINGS[family][0]
        assert meta["embedding_size"] == out.type.tensor_type.shape.dim[-1].dim_value > 0
        assert meta["source"] == os.path.abspath(d) and meta["flip"] is False


def test_jax_format_still_writes_the_jaxexport_artefact(exported, tmp_path):
    d = exported["insightface_vit"][0]
    path = str(tmp_path / "m.jaxexport")
    export.main(["--backbone", d, "--format", "jax", "--out", path, "--no-flip"])
    exp, meta = export.load_exported(path)
    assert meta["input_shape"] == ["b", "36", "36", "3"] and meta["flip"] is False
    model, variables, m = embed.load_backbone(d, host=True)
    images = np.random.default_rng(0).integers(0, 256, (2, 36, 36, 3)).astype(np.uint8)
    want = embed.embedding_function(model, normalization=m["normalization"], flip=False)(variables, images)
    np.testing.assert_allclose(np.asarray(exp.call(images)), np.asarray(want), rtol=1e-5, atol=1e-5)


def _cli(monkeypatch, *args, module="lafs_jax.export"):
    """`python -m MODULE ARGS` in this process (runpy runs the module as __main__, as python -m does; the
    user command's main is lafs_jax.eval.export's). Returns the exit status."""
    monkeypatch.setattr(sys, "argv", [module, *args])
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    except SystemExit as e:
        return e.code
    return 0


def test_command_line_onnx_and_fatal_on_a_non_variables_directory(exported, tmp_path, monkeypatch, capsys):
    d = exported["insightface_vit"][0]
    assert _cli(monkeypatch, "--backbone", d, "--format", "onnx", "--out", str(tmp_path / "model.onnx")) == 0
    assert os.path.exists(tmp_path / "model.onnx") and os.path.exists(tmp_path / "model.onnx.json")
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "data" and sess.get_outputs()[0].shape[-1] == 32
    bad = tmp_path / "not_variables"
    bad.mkdir()
    (bad / "notes.txt").write_text("no checkpoint here")
    capsys.readouterr()
    status = _cli(monkeypatch, "--backbone", str(bad), "--format", "onnx", "--out", str(tmp_path / "bad.onnx"))
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("FATAL") and err.count("\n") == 1, err[-3000:]
    assert not os.path.exists(tmp_path / "bad.onnx") and not os.path.exists(tmp_path / "bad.onnx.json")
