"""LVFace's released `.pt` -> variables directory: a PyTorch mirror of the InsightFace ViT (released key
names, non-trivial LayerNorm / BatchNorm parameters and running statistics) saved as a plain state dict,
converted, and the Flax InsightFaceViT must give the same un-normalised embeddings in eval mode."""
import jax
import numpy as np
import pytest
import torch

import torch_mirror_lvface as mirror_lib
from configs import lvface as lvface_recipe
from lafs_jax.convert import mapping
from lafs_jax.convert.__main__ import main
from lafs_jax.models import presets
from lafs_jax.train import finetune
from lafs_jax.variables import load_variables, save_variables

TOL = 1e-5  # embeddings, relative to their largest magnitude


def _mirror(dim, depth, heads, image_size=112, features=512, seed=0):
    torch.manual_seed(seed)
    model = mirror_lib.VisionTransformer(img_size=image_size, patch_size=9, embed_dim=dim, depth=depth,
                                         num_heads=heads, num_features=features)
    mirror_lib.randomize(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def _images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _flax_embeddings(cfg, variables, images_uint8):
    model = presets.build_model(cfg)
    x = images_uint8.astype(np.float32) / 255.0 * 2.0 - 1.0  # '[-1,1]' = (x/255 - 0.5)/0.5
    v = {c: variables[c] for c in ("params", "batch_stats")}
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(v, x))


def _assert_parity(got, want):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL * np.abs(want).max(), rtol=0)


def _state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _custom_config(dim, depth, heads, image_size, features):
    cfg = presets.model_config("insightface_t")
    cfg.dim, cfg.depth, cfg.heads, cfg.head_dim, cfg.mlp_dim = dim, depth, heads, dim // heads, 4 * dim
    cfg.image_size, cfg.insightface.embedding_size = image_size, features
    return cfg


@pytest.mark.parametrize("shape", [
    dict(dim=256, depth=2, heads=8, image_size=112, features=512),  # LVFace-T's block, patch 9, 144 tokens, 2 blocks
    dict(dim=48, depth=3, heads=4, image_size=40, features=24),  # a small custom shape (16 tokens, 4 px unseen)
])
def test_mapping_parity_with_the_torch_mirror(shape):
    model = _mirror(shape["dim"], shape["depth"], shape["heads"], shape["image_size"], shape["features"])
    images = _images(3, shape["image_size"], 1)
    with torch.no_grad():
        want = model(mirror_lib.normalize(images)).numpy()
    cfg = _custom_config(**shape)
    variables, report = mapping.convert_state_dict(_state(model), "lvface", cfg)
    assert not report.unexpected and not report.missing
    assert sorted(k for k, _ in report.dropped) == ["feature.1.num_batches_tracked", "feature.3.num_batches_tracked"]
    assert float(np.abs(want).max()) > 1.0  # BN statistics and affine parameters make it non-trivial
    _assert_parity(_flax_embeddings(cfg, variables, images), want)


def test_cli_converts_a_released_t_checkpoint(tmp_path):
    """The full LVFace-T (D 256, depth 12) saved as a plain state dict: the size is read from it, the
    metadata records the input, and the arrays are the pure mapping's (whose parity is tested above)."""
    model = _mirror(256, 12, 8, seed=4)
    src = tmp_path / "LVFace-T_Glint360K.pt"
    torch.save(model.state_dict(), src)
    main(["--kind", "lvface", "--src", str(src), "--out", str(tmp_path / "out")])
    variables, meta = load_variables(str(tmp_path / "out"))
    cfg = presets.model_config_from_dict(meta["model"])
    assert (cfg.preset, cfg.kind, cfg.dim, cfg.depth, cfg.patch_size) == ("vit_t", "insightface_vit", 256, 12, 9)
    assert meta["normalization"] == "[-1,1]" and meta["color_order"] == "rgb" and meta["patch_order"] is None
    assert presets.count_params(variables["params"]) == 19_137_792
    want, _ = mapping.convert_state_dict(_state(model), "lvface", "vit_t")
    jax.tree.map(np.testing.assert_array_equal, {c: variables[c] for c in want}, want)


def test_unknown_and_missing_keys_are_errors_naming_them():
    model = _mirror(48, 2, 4, image_size=40, features=24)
    cfg = _custom_config(48, 2, 4, 40, 24)
    state = _state(model)
    with pytest.raises(mapping.ConversionError, match=r"no place in the InsightFace ViT.*'head\.weight'"):
        mapping.convert_state_dict({**state, "head.weight": np.zeros((3, 3), np.float32)}, "lvface", cfg)
    with pytest.raises(mapping.ConversionError, match=r"no source key.*encoder/block_1/mlp/fc2/kernel"):
        mapping.convert_state_dict({k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.weight"}, "lvface", cfg)
    with pytest.raises(mapping.ConversionError, match=r"blocks\.0\.attn\.proj\.bias: source shape \(48,\).*of shape \(96,\)"):
        mapping.convert_state_dict(state, "lvface", _custom_config(96, 2, 4, 40, 24))
    with pytest.raises(mapping.ConversionError, match=r"dim 48 \(pos_embed\) and 2 blocks matches no preset"):
        mapping.lvface_preset(state)
    assert mapping.lvface_preset({"pos_embed": np.zeros((1, 144, 512)),
                                  **{f"blocks.{i}.norm1.weight": 0 for i in range(24)}}) == "vit_b_dp005_mask_005"


def test_released_names_set_drop_path_and_mask_ratio():
    want = {"vit_t": (256, 12, 0.1, 0.1), "vit_t_dp005_mask0": (256, 12, 0.05, 0.0), "vit_s": (512, 12, 0.1, 0.1),
            "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0), "vit_b": (512, 24, 0.1, 0.1),
            "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05), "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05)}
    for name, (dim, depth, dp, mask) in want.items():
        c = presets.model_config(name)
        presets.validate_model_config(c)
        assert (c.dim, c.depth, c.heads, c.patch_size, c.mlp_dim) == (dim, depth, 8, 9, 4 * dim), name
        assert (c.drop_path_rate, c.insightface.mask_ratio, c.mlp_activation, c.qkv_bias) == (dp, mask, "relu6", False)
        assert c.drop_path_schedule == "linear" and c.kind == "insightface_vit"


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_attention_softmax_runs_in_float32_under_bfloat16():
    """model.dtype bfloat16 (the compute dtype on accelerators): the blocks' matmuls are bf16, every
    attention softmax exponentiates float32 logits, as LVFace's autocast(False) attention core."""
    cfg = _custom_config(32, 2, 4, 36, 16)
    cfg.dtype = "bfloat16"
    model = presets.build_model(cfg)
    v = jax.eval_shape(lambda: presets.init_variables(cfg, jax.random.key(0), batch=2))
    x = jax.ShapeDtypeStruct((2, 36, 36, 3), np.float32)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(v, x).jaxpr
    eqns = list(_equations(jaxpr))
    exps = [e for e in eqns if e.primitive.name == "exp"]
    assert len(exps) == cfg.depth and all(e.outvars[0].aval.dtype == np.float32 for e in exps)
    assert any(e.primitive.name == "dot_general" and e.outvars[0].aval.dtype == jax.numpy.bfloat16 for e in eqns)


def test_fine_tuning_starts_from_converted_weights(tmp_path):
    """A converted LVFace directory is a backbone fine-tuning loads whole (params and BN statistics)."""
    cfg = _custom_config(48, 2, 4, 36, 24)
    model = _mirror(48, 2, 4, image_size=36, features=24)
    variables, report = mapping.convert_state_dict(_state(model), "lvface", cfg)
    save_variables(str(tmp_path / "lvface"), variables, mapping.metadata("lvface", cfg, "mirror.pt", report=report))
    config = lvface_recipe.get_config("tiny")
    config.model = cfg
    config.init.backbone = str(tmp_path / "lvface")
    fresh = jax.tree.map(np.asarray, presets.init_variables(cfg, jax.random.key(0)))
    loaded, origin = finetune.initial_variables(config, fresh)
    assert origin.startswith("backbone from")
    jax.tree.map(np.testing.assert_array_equal, loaded, {c: variables[c] for c in ("params", "batch_stats")})
