"""Official-checkpoint conversion: a randomly initialised PyTorch mirror of the official model (exact state-dict
keys and shapes, random BatchNorm statistics) is saved the way the official checkpoints are, converted by the
CLI's code path, and the Flax model must reproduce its landmarks and embeddings in eval mode."""
import builtins
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_mirror
from lafs_jax.convert import mapping
from lafs_jax.convert.__main__ import load_torch_checkpoint, main
from lafs_jax.models import presets
from lafs_jax.variables import load_variables

TOL = 1e-4


def mirror_for(cfg, seed=0, with_land=True, num_class=None, num_patches=None) -> torch_mirror.PartFViT:
    torch.manual_seed(seed)
    model = torch_mirror.PartFViT(num_patches=num_patches or cfg.num_landmarks, dim=cfg.dim, depth=cfg.depth,
                                  heads=cfg.heads, dim_head=cfg.head_dim, mlp_dim=cfg.mlp_dim, patch=cfg.patch_size,
                                  with_land=with_land, blocks=cfg.landmark.blocks, stem=cfg.landmark.stem_features,
                                  num_class=num_class)
    gen = torch.Generator().manual_seed(seed + 1)
    torch_mirror.randomize_batchnorm(model, gen)
    torch_mirror.randomize_layernorm(model, gen)
    return model.eval()


def numpy_state(state: dict) -> dict:
    return {k: v.numpy() for k, v in state.items()}


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def tiny():
    """Tiny config, its Part fViT mirror with a 7-class classifier, images, mirror outputs, jitted Flax apply."""
    cfg = presets.model_config("tiny")
    mirror = mirror_for(cfg, num_class=7)
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        emb, landmarks = mirror(images)
    model = presets.build_model(cfg)

    def embedding_and_landmarks(v, x):
        emb, aux = model.apply(v, x, train=False)
        return emb, aux["landmarks"]

    apply = jax.jit(embedding_and_landmarks)
    return cfg, mirror, images, emb.numpy(), landmarks.numpy(), apply


def backbone_variables(variables):
    return {c: variables[c] for c in ("params", "batch_stats") if c in variables}


def test_pure_mapping_without_files(tiny):
    cfg, mirror, images, emb, landmarks, apply = tiny
    state, extras = mapping.select_state_dict(numpy_state(torch_mirror.supervised_checkpoint(mirror)), "part_fvit")
    assert not any(k.startswith("module.") for k in state) and extras == {}
    variables, report = mapping.convert_state_dict(state, "part_fvit", "tiny")
    assert report.missing == [] and report.unexpected == []
    assert {k for k, _ in report.dropped} == {k for k in state if k.endswith("num_batches_tracked")}
    p, sd = variables["params"], mirror.state_dict()
    np.testing.assert_array_equal(p["landmark_cnn"]["bottleneck_3"]["depthwise_conv"]["kernel"],
                                  sd["stn.features.3.conv.3.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["vit"]["encoder"]["block_1"]["attention"]["qkv"]["kernel"],
                                  sd["transformer.layers.1.0.fn.fn.to_qkv.weight"].numpy().T)
    np.testing.assert_array_equal(variables["batch_stats"]["landmark_cnn"]["bottleneck_4"]["project_bn"]["var"],
                                  sd["stn.features.4.conv.8.running_var"].numpy())
    np.testing.assert_array_equal(p["landmark_cnn"]["bottleneck_4"]["se"]["reduce"]["kernel"],
                                  sd["stn.features.4.conv.5.fc.0.weight"].numpy().T)
    np.testing.assert_array_equal(variables["classifier"]["centers"], sd["loss.weight"].numpy())
    out_emb, out_lm = apply(backbone_variables(variables), nhwc(images))
    np.testing.assert_allclose(np.asarray(out_lm), landmarks, atol=TOL)
    np.testing.assert_allclose(np.asarray(out_emb), emb, atol=TOL)


def test_cli_part_fvit_tiny_with_and_without_head(tiny, tmp_path):
    cfg, mirror, images, emb, landmarks, apply = tiny
    src = tmp_path / "Backbone_VIT_land_8_Epoch_34.pth"
    torch.save(torch_mirror.supervised_checkpoint(mirror), src)
    assert main(["--kind", "part_fvit", "--src", str(src), "--out", str(tmp_path / "out"), "--preset", "tiny",
                 "--color-order", "bgr"]) == 0
    variables, meta = load_variables(str(tmp_path / "out"))
    assert meta["kind"] == "part_fvit" and meta["color_order"] == "bgr"  # given on the command line
    # by default the official evaluation's x/255 - 0.5 (IJB_evaluation.py), supervised, landmark patches
    assert meta["normalization"] == "[-0.5,0.5]" and meta["official_input"]["normalization"] == "[-0.5,0.5]"
    assert (meta["method"], meta["patch_order"]) == ("supervised", "landmarks")
    assert meta["source"] == os.path.abspath(src) and meta["model"]["preset"] == "tiny"
    assert presets.model_config_from_dict(meta["model"]).num_landmarks == 49
    np.testing.assert_array_equal(variables["classifier"]["centers"], mirror.state_dict()["loss.weight"].numpy())
    out_emb, out_lm = apply(variables, nhwc(images))  # the whole tree: Flax ignores the 'classifier' entry
    np.testing.assert_allclose(np.asarray(out_lm), landmarks, atol=TOL)
    np.testing.assert_allclose(np.asarray(out_emb), emb, atol=TOL)

    main(["--kind", "part_fvit", "--src", str(src), "--out", str(tmp_path / "nohead"), "--preset", "tiny",
          "--drop-head"])
    variables, meta = load_variables(str(tmp_path / "nohead"))
    assert "classifier" not in variables and "loss.weight" in meta["conversion"]["dropped"]


def test_cli_part_fvit_base_parity(tmp_path):
    cfg = presets.model_config("base")
    mirror = mirror_for(cfg, seed=3, num_class=11)
    assert torch_mirror.count_params(mirror) - 11 * 768 == 66_955_616
    images = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        emb, landmarks = mirror(images)
    src = tmp_path / "base.pth"
    torch.save(torch_mirror.supervised_checkpoint(mirror), src)
    del mirror
    main(["--kind", "part_fvit", "--src", str(src), "--out", str(tmp_path / "out"), "--drop-head"])
    variables, meta = load_variables(str(tmp_path / "out"))
    assert presets.count_params(variables["params"]) == 66_955_616
    model = presets.build_model(presets.model_config_from_dict(meta["model"]))
    out_emb, out_aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(backbone_variables(variables),
                                                                           nhwc(images))
    np.testing.assert_allclose(np.asarray(out_aux["landmarks"]), landmarks.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(out_emb), emb.numpy(), atol=TOL)


def test_cli_plain_fvit(tmp_path):
    cfg = presets.model_config("tiny")
    cfg.kind = "fvit"
    mirror = mirror_for(cfg, seed=7, with_land=False, num_class=5, num_patches=presets.grid_tokens(cfg))
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        emb, _ = mirror(images, mode="grid")
    torch.save(torch_mirror.supervised_checkpoint(mirror), tmp_path / "fvit.pth")
    main(["--kind", "fvit", "--src", str(tmp_path / "fvit.pth"), "--out", str(tmp_path / "out"), "--preset", "tiny",
          "--drop-head", "--strict"])
    variables, meta = load_variables(str(tmp_path / "out"))
    assert meta["model"]["kind"] == "fvit" and set(variables) == {"params"}
    assert (meta["patch_order"], meta["normalization"], meta["color_order"]) == ("grid", "[-1,1]", "rgb")
    model = presets.build_model(presets.model_config_from_dict(meta["model"]))
    out, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nhwc(images))
    np.testing.assert_allclose(np.asarray(out), emb.numpy(), atol=TOL)
    assert aux == {}


def ssl_networks(cfg, seed):
    torch.manual_seed(seed)
    h = cfg.dino_head
    nets = []
    for s in (seed, seed + 1):  # different student and teacher weights
        backbone = mirror_for(cfg, seed=s, with_land=False, num_class=30)
        head = torch_mirror.DINOHead(cfg.dim, h.out_dim, h.hidden_dim, h.bottleneck_dim)
        nets.append(torch_mirror.BackboneWithHead(backbone, head).eval())
    return nets


@pytest.fixture(scope="module")
def ssl_case(tmp_path_factory):
    cfg = mapping.target_model_config("lafs_ssl", "tiny")
    student, teacher = ssl_networks(cfg, 11)
    center = torch.randn(1, cfg.dino_head.out_dim)
    path = tmp_path_factory.mktemp("ssl") / "checkpoint0040.pth"
    torch.save(torch_mirror.lafs_ssl_checkpoint(student, teacher, center), path)
    tokens = torch.randn(2, 36, 192, generator=torch.Generator().manual_seed(12))  # a 36-token local view
    vit, head = presets.build_token_vit(cfg), presets.build_dino_head(cfg)

    @jax.jit
    def flax_forward(variables, x):
        e = vit.apply({"params": variables["params"]}, x, train=False)
        return e, head.apply({"params": variables["dino_head"]}, e)

    return cfg, student, teacher, center, path, tokens, flax_forward


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_cli_lafs_ssl_backbone_and_dino_head(ssl_case, tmp_path, which):
    cfg, student, teacher, center, path, tokens, flax_forward = ssl_case
    net = teacher if which == "teacher" else student
    with torch.no_grad():
        emb, _ = net.backbone(tokens, mode="tokens")
        logits = net.head(emb)
    argv = ["--kind", "lafs_ssl", "--src", str(path), "--out", str(tmp_path / "out"), "--preset", "tiny"]
    main(argv + ([] if which == "teacher" else ["--which", "student"]))
    variables, meta = load_variables(str(tmp_path / "out"))
    assert meta["which"] == which and "backbone.loss.weight" in meta["conversion"]["dropped"]
    # the official SSL loader never swaps channels: the released WebFace4M SSL checkpoints saw swapped content
    assert (meta["method"], meta["patch_order"], meta["normalization"], meta["color_order"]) == \
        ("lafs", "landmarks", "[-1,1]", "bgr")
    assert set(variables) == {"params", "dino_head", "dino_loss"}
    assert "encoder" in variables["params"] and "scale" not in variables["dino_head"]["last_layer"]
    np.testing.assert_array_equal(variables["dino_loss"]["center"], center.numpy())
    out_emb, out_logits = flax_forward(variables, jnp.asarray(tokens.numpy()))
    np.testing.assert_allclose(np.asarray(out_emb), emb.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(out_logits), logits.numpy(), atol=TOL)


def test_cli_lafs_ssl_drop_head(ssl_case, tmp_path):
    path = ssl_case[4]
    main(["--kind", "lafs_ssl", "--src", str(path), "--out", str(tmp_path / "out"), "--preset", "tiny", "--drop-head"])
    variables, _ = load_variables(str(tmp_path / "out"))
    assert set(variables) == {"params"} and "cls_token" in variables["params"]
    # a DINO-face container: grid patches and DataAugmentationDINO's ImageNet normalisation
    main(["--kind", "lafs_ssl", "--src", str(path), "--out", str(tmp_path / "dino"), "--preset", "tiny", "--drop-head",
          "--method", "dino", "--color-order", "rgb"])
    _, meta = load_variables(str(tmp_path / "dino"))
    assert (meta["method"], meta["patch_order"], meta["normalization"], meta["color_order"]) == \
        ("dino", "grid", "imagenet", "rgb")
    with pytest.raises(SystemExit, match="--method 'lafs' does not go with --kind 'part_fvit'"):
        main(["--kind", "part_fvit", "--src", str(path), "--out", str(tmp_path / "x"), "--method", "lafs"])


def test_trainable_weight_g_converts_and_fixed_g_must_be_one(ssl_case):
    cfg, _, teacher, _, path, tokens, _ = ssl_case
    with torch.no_grad():
        teacher.head.last_layer.weight_g.uniform_(0.5, 2.0)
        emb, _ = teacher.backbone(tokens, mode="tokens")
        logits = teacher.head(emb)
    state = numpy_state(teacher.state_dict())
    with pytest.raises(mapping.ConversionError, match="head.last_layer.weight_g: weight_g is not 1"):
        mapping.convert_state_dict(state, "lafs_ssl", cfg)
    cfg = mapping.target_model_config("lafs_ssl", "tiny")
    cfg.dino_head.use_bn = True
    with pytest.raises(mapping.ConversionError, match="use_bn=True"):
        mapping.convert_state_dict(state, "lafs_ssl", cfg)
    cfg.dino_head.use_bn, cfg.dino_head.norm_last_layer = False, False
    variables, _ = mapping.convert_state_dict(state, "lafs_ssl", cfg)
    np.testing.assert_array_equal(variables["dino_head"]["last_layer"]["scale"],
                                  state["head.last_layer.weight_g"].reshape(-1))
    head = presets.build_dino_head(cfg)
    out = head.apply({"params": variables["dino_head"]}, jnp.asarray(emb.numpy()))
    np.testing.assert_allclose(np.asarray(out), logits.numpy(), atol=TOL)


def test_wrong_shape_names_the_key_and_both_shapes(tiny):
    state = numpy_state(tiny[1].state_dict())
    state["transformer.layers.1.1.fn.fn.net.0.weight"] = np.zeros((128, 96), np.float32)
    with pytest.raises(mapping.ConversionError,
                       match=r"transformer\.layers\.1\.1\.fn\.fn\.net\.0\.weight: source shape \(128, 96\) -> "
                             r"\(96, 128\) does not match the target params/vit/encoder/block_1/mlp/fc1/kernel "
                             r"of shape \(96, 256\)"):
        mapping.convert_state_dict(state, "part_fvit", "tiny")


def test_missing_and_unexpected_keys(tiny):
    state = numpy_state(tiny[1].state_dict())
    extra = dict(state, **{"global_token.1.weight": np.zeros((96, 48), np.float32)})
    variables, report = mapping.convert_state_dict(extra, "part_fvit", "tiny", drop_head=True)
    assert report.unexpected == ["global_token.1.weight"] and "unexpected: global_token.1.weight" in report.summary()
    with pytest.raises(mapping.ConversionError, match="unexpected source keys"):
        mapping.convert_state_dict(extra, "part_fvit", "tiny", strict=True)
    del state["stn.features.2.conv.4.running_var"]
    with pytest.raises(mapping.ConversionError,
                       match="batch_stats/landmark_cnn/bottleneck_2/depthwise_bn/var"):
        mapping.convert_state_dict(state, "part_fvit", "tiny")


def test_containers_and_cli_errors(ssl_case, tmp_path, monkeypatch, capsys):
    path = ssl_case[4]
    container = load_torch_checkpoint(str(path))  # safe loader: the argparse.Namespace is allow-listed
    assert isinstance(container["dino_loss"]["center"], np.ndarray)
    with pytest.raises(mapping.ConversionError, match="use --kind lafs_ssl"):
        mapping.select_state_dict(container, "part_fvit")
    with pytest.raises(SystemExit, match="use --kind lafs_ssl"):
        main(["--kind", "part_fvit", "--src", str(path), "--out", str(tmp_path / "x"), "--preset", "tiny"])
    with pytest.raises(mapping.ConversionError, match=r"keys \['teacher'\] are missing"):
        mapping.select_state_dict({"student": {}}, "lafs_ssl")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        main(["--kind", "fvit", "--src", str(tmp_path / "nothere.pth"), "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="check --preset"):  # tiny weights into the base shapes
        main(["--kind", "lafs_ssl", "--src", str(path), "--out", str(tmp_path / "z")])

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(SystemExit, match="reading .pth checkpoints needs PyTorch"):
        load_torch_checkpoint(str(path))


def test_metadata_is_json_and_names_the_model(tiny):
    cfg = mapping.target_model_config("part_fvit", "tiny")
    meta = mapping.metadata("part_fvit", cfg, "/x.pth", color_order="rgb")
    restored = presets.model_config_from_dict(json.loads(json.dumps(meta))["model"])
    assert restored.landmark.blocks == cfg.landmark.blocks and restored.kind == "part_fvit"


class _CreatesFile:
    """Unpickling this calls open(path, 'w')."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_that_would_create_a_file_is_refused(tmp_path):
    """convert's torch.load is weights_only (a restricted unpickler) unless --unsafe-load."""
    target = tmp_path / "created_by_pickle.txt"
    torch.save({"state_dict": {}, "payload": _CreatesFile(str(target))}, tmp_path / "evil.pth")
    with pytest.raises(SystemExit, match=r"evil.pth: torch.load failed \(if you trust the file"):
        load_torch_checkpoint(str(tmp_path / "evil.pth"))
    assert not target.exists()
