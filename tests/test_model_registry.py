"""Backbone families by name (`lafs_jax.models.registry`) and the one return convention of every
backbone: (embedding [B, D] float32, aux dict with the family's `aux_keys`)."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lafs_jax.config import ConfigError, check
from lafs_jax.eval import embed
from lafs_jax.models import presets, registry

# family -> (preset it is built from, embedding size, {aux key: shape without the batch axis}) for the
# preset's 112 x 112 images: tiny has 49 landmarks, D 96, patch 8 (14 x 14 = 196 grid patches)
FAMILIES = {
    "part_fvit": ("tiny", 96, {"landmarks": (49, 2)}),
    "fvit": ("tiny", 96, {}),
    "part_fvit_grid": ("tiny", 96, {"centers": (196, 2)}),
    "insightface_vit": ("insightface_t", 512, {}),
    "resnet": ("resnet_tiny", 64, {"feature_map": (2, 2, 64)}),  # 64 px images, stem width 8
    # clip_tiny: 32 px, patch 8 (4 x 4 patches), width 64, joint size 32, features of blocks 0 and 1
    "clip_vit": ("clip_tiny", 32, {"tokens": (17, 64), "feature_maps": (2, 4, 4, 64), "class_tokens": (2, 64)}),
}
PATCH_ORDERS = {"part_fvit": "landmarks", "fvit": "grid", "part_fvit_grid": "grid", "insightface_vit": None,
                "resnet": None, "clip_vit": None}


def family_config(name):
    cfg = presets.model_config(FAMILIES[name][0])
    cfg.kind = name
    return cfg


def test_the_registered_families_are_the_documented_ones():
    assert registry.names() == tuple(FAMILIES)
    for name in FAMILIES:
        family = registry.get(name)
        assert family.patch_order == PATCH_ORDERS[name] == presets.patch_order(family_config(name))
        assert family.aux_keys == tuple(FAMILIES[name][2])
        assert family.landmark_cnn == (name == "part_fvit")
    assert dict(presets.KIND_PATCH_ORDER) == {k: v for k, v in PATCH_ORDERS.items() if v is not None}
    assert presets.KIND_PATCH_ORDER.get("insightface_vit") is None and presets.KIND_PATCH_ORDER.get("x") is None


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("train", [False, True])
def test_every_family_returns_embedding_and_aux(name, train):
    """Shapes only (jax.eval_shape): eval mode, and train mode with dropout rng and batch statistics."""
    cfg = family_config(name)
    _, dim, aux_shapes = FAMILIES[name]
    model = presets.build_model(cfg)
    variables = presets.abstract_variables(cfg)
    images = jax.ShapeDtypeStruct((3, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    if train:
        (emb, aux), _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)},
                                                               mutable=["batch_stats"]), variables, images)
    else:
        emb, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    assert (emb.shape, emb.dtype) == ((3, dim), jnp.float32)
    assert isinstance(aux, dict) and set(aux) == set(aux_shapes)
    for key, shape in aux_shapes.items():
        assert aux[key].shape == (3, *shape)


def test_unknown_kind_names_the_key_and_the_families():
    with pytest.raises(ConfigError, match=r"config\.model\.kind='convnext'.*part_fvit.*insightface_vit"):
        registry.get("convnext")
    cfg = presets.model_config("tiny")
    cfg.kind = "convnext"
    for call in (presets.build_model, presets.validate_model_config, presets.patch_order):
        with pytest.raises(ConfigError, match=r"config\.model\.kind='convnext'.*part_fvit"):
            call(cfg)


def test_a_name_registers_once():
    before = registry.get("fvit")
    with pytest.raises(ValueError, match="'fvit' is already registered"):
        registry.register("fvit", registry.Family(build=lambda cfg: None))
    assert registry.get("fvit") is before
    with pytest.raises(TypeError, match="expected a Family"):
        registry.register("other", lambda cfg: None)
    assert "other" not in registry.names()


def test_split_output_refuses_a_bare_embedding():
    emb = jnp.zeros((2, 4))
    assert registry.split_output((emb, {}))[0] is emb
    with pytest.raises(TypeError, match=r"\(embedding, aux dict\)"):
        registry.split_output(emb)


class _PooledDense(nn.Module):
    """A new family for the test: mean colour -> Dense(dim); aux {'pooled': [B, C]}."""

    dim: int

    @nn.compact
    def __call__(self, images, train):
        pooled = images.mean(axis=(1, 2))
        return nn.Dense(self.dim)(pooled).astype(jnp.float32), {"pooled": pooled}


def _check_three_channels(cfg, prefix):
    check(cfg.channels == 3, f"{prefix}.channels", cfg.channels, "pooled_dense needs RGB")


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is, in a copy that the test may add to; the real one is back afterwards."""
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))


def test_a_new_family_is_one_registration(scratch_registry):
    registry.register("pooled_dense", registry.Family(build=lambda cfg: _PooledDense(dim=cfg.dim), patch_order="grid",
                                                      aux_keys=("pooled",), validate=_check_three_channels))
    cfg = presets.model_config("tiny")
    cfg.kind = "pooled_dense"
    presets.validate_model_config(cfg)
    model = presets.build_model(cfg)
    assert isinstance(model, _PooledDense)
    assert presets.patch_order(cfg) == "grid" and presets.KIND_PATCH_ORDER["pooled_dense"] == "grid"
    variables = presets.init_variables(cfg, jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3)).astype(np.uint8)
    emb, aux = model.apply(variables, images.astype(np.float32) / 255.0, train=False)
    assert emb.shape == (2, cfg.dim)
    np.testing.assert_allclose(np.asarray(aux["pooled"]), images.mean(axis=(1, 2)) / 255.0, rtol=1e-5)
    got = embed.embedding_function(model, normalization="[-1,1]", flip=False)(variables, images)
    assert got.shape == (2, cfg.dim)
    cfg.channels = 1
    with pytest.raises(ConfigError, match=r"config\.model\.channels=1 .*pooled_dense needs RGB"):
        presets.build_model(cfg)


# ---------------------------------------------------------------------------------------------- config sections
SECTIONS = {"part_fvit": {"landmark"}, "fvit": set(), "part_fvit_grid": set(), "insightface_vit": {"insightface"},
            "resnet": {"resnet"}, "clip_vit": {"clip"}}
ALL_SECTIONS = {"landmark", "insightface", "dino_head", "resnet", "clip"}


def test_each_family_owns_its_config_sections():
    for name in FAMILIES:
        assert set(registry.get(name).sections) == SECTIONS[name]
        assert set(presets.family_sections(name, "tiny")) == SECTIONS[name]
    assert set(presets.known_sections()) == ALL_SECTIONS


@pytest.mark.parametrize("preset", presets.PRESETS)
def test_each_preset_carries_exactly_its_family_sections(preset):
    cfg = presets.model_config(preset)
    assert {k for k in cfg if isinstance(cfg[k], ml_collections.ConfigDict)} == SECTIONS[cfg.kind]
    presets.validate_model_config(cfg)


def test_a_missing_family_section_is_one_error_naming_it():
    cfg = presets.model_config("tiny")
    cfg.kind = "insightface_vit"  # what --config.model.kind=insightface_vit does to a tiny recipe
    with pytest.raises(ConfigError, match=r"config\.model\.insightface is missing: .*insightface_t.*"
                                          r"add_family_sections"):
        presets.validate_model_config(cfg)
    assert set(presets.add_family_sections(cfg)) >= {"insightface", "landmark"}
    presets.validate_model_config(cfg)
    assert cfg.insightface.to_dict() == presets.model_config("insightface_t").insightface.to_dict()
    cfg = presets.model_config("vit_t")
    del cfg["insightface"]
    with pytest.raises(ConfigError, match=r"config\.model\.insightface is missing"):
        presets.build_model(cfg)
    cfg = presets.model_config("tiny")
    del cfg["landmark"]
    with pytest.raises(ConfigError, match=r"config\.model\.landmark is missing: model\.kind='part_fvit'.*tiny"):
        presets.validate_model_config(cfg)


def test_an_unused_section_is_allowed_and_checked():
    cfg = presets.model_config("tiny")
    cfg.kind = "fvit"  # --config.model.kind=fvit on a Part fViT recipe keeps working
    presets.validate_model_config(cfg)
    presets.build_model(cfg)
    cfg.landmark.dropout = 1.5
    with pytest.raises(ConfigError, match=r"config\.model\.landmark\.dropout=1\.5"):
        presets.validate_model_config(cfg)


def test_the_dino_head_section_belongs_to_the_dino_objective():
    from lafs_jax.methods.dino import config as dino_config

    cfg = presets.model_config("tiny")
    with pytest.raises(ConfigError, match=r"config\.model\.dino_head is missing.*head_config"):
        presets.build_dino_head(cfg)
    cfg.dino_head = dino_config.head_config("tiny")
    assert (cfg.dino_head.out_dim, cfg.dino_head.hidden_dim, cfg.dino_head.bottleneck_dim) == (1024, 256, 64)
    presets.build_dino_head(cfg)
    assert presets.dino_head_config("small").out_dim == 65536 and presets.dino_head_config("base").out_dim == 100000
    cfg.dino_head.out_dim = -1
    with pytest.raises(ConfigError, match=r"config\.model\.dino_head\.out_dim=-1"):
        presets.validate_model_config(cfg)


def test_model_config_from_an_old_style_dict_with_every_section():
    """Metadata dicts that carry landmark, dino_head and insightface whatever the kind read back with all
    three (extra sections are kept); a dict without its family's section gets the preset's defaults."""
    for preset, kind in (("tiny", "part_fvit"), ("tiny", "fvit"), ("vit_t", "insightface_vit")):
        values = presets.model_config(preset).to_dict()
        values["kind"] = kind
        values["landmark"] = presets.landmark_config(preset).to_dict()
        values["insightface"] = presets.insightface_config(preset).to_dict()
        values["dino_head"] = presets.dino_head_config(preset).to_dict()
        values["dino_head"]["out_dim"] = 77
        cfg = presets.model_config_from_dict(json.loads(json.dumps(values)))
        assert {"landmark", "insightface", "dino_head"} <= set(cfg) and cfg.kind == kind and cfg.dino_head.out_dim == 77
        assert cfg.to_dict() == presets.model_config_from_dict(cfg.to_dict()).to_dict()
    values = presets.model_config("tiny").to_dict()
    del values["landmark"]
    cfg = presets.model_config_from_dict(values)
    assert cfg.landmark.blocks == presets.TINY_LANDMARK_BLOCKS
    values = presets.model_config("tiny").to_dict()
    values["kind"] = "insightface_vit"
    assert presets.model_config_from_dict(values).insightface.embedding_size == 512


def test_pretraining_recipes_carry_the_dino_head_and_finetuning_recipes_do_not():
    from configs import dino_pretrain, finetune, lafs_pretrain, lvface

    for recipe in (dino_pretrain, lafs_pretrain):
        for variant in recipe.VARIANTS:
            c = recipe.get_config(variant)
            assert c.model.dino_head.to_dict() == presets.dino_head_config(c.model.preset).to_dict()
    for recipe in (finetune, lvface):
        for variant in (None, "tiny"):
            c = recipe.get_config(variant)
            assert "dino_head" not in c.model
            assert {k for k in c.model if isinstance(c.model[k], ml_collections.ConfigDict)} == SECTIONS[c.model.kind]


def test_a_pretraining_config_without_the_dino_head_names_it():
    from configs import lafs_pretrain
    from lafs_jax.methods.dino import config as dino_config

    c = lafs_pretrain.get_config("tiny")
    with c.unlocked():
        del c.model["dino_head"]
    with pytest.raises(ConfigError, match=r"config\.model\.dino_head is missing"):
        dino_config.validate_section(c)
