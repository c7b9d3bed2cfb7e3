"""Models: TokenViT / DINO head against NumPy references, landmark CNN behaviour, presets and config errors.

Output parity with the official PyTorch model (a mirror of its module tree) is in test_convert.py.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import erf

import torch_mirror
from lafs_jax.config import ConfigError
from lafs_jax.models import presets
from lafs_jax.models.heads import DINOHead, EmbeddingHead
from lafs_jax.models.landmarks import DepthwiseConv, LandmarkCNN, depthwise_conv_taps
from lafs_jax.models.part_fvit import PartFViT
from lafs_jax.models.vit import (InsightFaceViT, TokenViT, drop_path, drop_path_rates, patchify,
                                 random_token_mask)


def tree_np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def random_variables(module, *args, seed=0, scale=0.2, **kwargs):
    """Variables of `module` with random values drawn in NumPy (shapes from jax.eval_shape).

    Compiling Flax initialisers costs ~0.1 s of CPU per tensor here; the tests that do not check the
    initial distribution use this instead. Norm scales are near 1, BatchNorm variances positive.
    """
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        if name in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        std = 1.0 if name in ("cls_token", "pos_embedding") else scale
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def tiny():
    """(model config, PartFViT, variables initialised by Flax) of the tiny preset, shared by the tests."""
    cfg = presets.model_config("tiny")
    return cfg, presets.build_model(cfg), jax.jit(lambda k: presets.init_variables(cfg, k))(jax.random.key(1))


# ------------------------------------------------------------------------------------------ NumPy references
def np_layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_dense(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


NP_ACT = {
    "gelu": lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    "relu6": lambda x: np.clip(x, 0, 6),
}


def np_token_vit(params, tokens, *, heads, head_dim, scale, act, eps, pool):
    x = np_dense(tokens, params["patch_embedding"])
    b, n, d = x.shape
    x = np.concatenate([np.broadcast_to(params["cls_token"], (b, 1, d)), x], 1) + params["pos_embedding"][:, :n + 1]
    for i in range(len(params["encoder"])):
        blk = params["encoder"][f"block_{i}"]
        y = np_layer_norm(x, blk["attention_norm"], eps)
        qkv = np_dense(y, blk["attention"]["qkv"]).reshape(b, n + 1, 3, heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = np.einsum("bthd,bshd->bhts", q, k) * scale
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        y = np.einsum("bhts,bshd->bthd", probs, v).reshape(b, n + 1, heads * head_dim)
        x = x + np_dense(y, blk["attention"]["out"])
        y = np_layer_norm(x, blk["mlp_norm"], eps)
        x = x + np_dense(NP_ACT[act](np_dense(y, blk["mlp"]["fc1"])), blk["mlp"]["fc2"])
    x = x[:, 0] if pool == "cls" else x.mean(1)
    return np_layer_norm(x, params["head_norm"], eps)


@pytest.mark.parametrize("variant", [
    dict(),  # official numerics: dim**-0.5, exact GELU, cls pooling, heads*head_dim != dim
    dict(attention_scale="head_dim", mlp_activation="gelu_tanh", pool="mean", qkv_bias=True, layer_norm_eps=1e-6),
    dict(mlp_activation="relu6"),
])
def test_token_vit_matches_numpy_reference(variant):
    dim, heads, head_dim = 40, 3, 16
    vit = TokenViT(num_positions=10, dim=dim, depth=2, heads=heads, head_dim=head_dim, mlp_dim=56, **variant)
    tokens = jax.random.normal(jax.random.key(0), (2, 7, 12))
    params = random_variables(vit, tokens, train=False)["params"]  # random norms and biases too
    out = jax.jit(lambda p: vit.apply({"params": p}, tokens, train=False))(params)
    scale = (head_dim if variant.get("attention_scale") == "head_dim" else dim) ** -0.5
    ref = np_token_vit(tree_np(params), np.asarray(tokens, np.float64), heads=heads, head_dim=head_dim, scale=scale,
                       act=variant.get("mlp_activation", "gelu"), eps=variant.get("layer_norm_eps", 1e-5),
                       pool=variant.get("pool", "cls"))
    assert out.shape == (2, dim) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)


def test_compiled_init_is_one_program_per_architecture(tiny):
    """presets.compiled_init: the variables init_variables gives, from one jitted function shared by
    every config that builds the same model; another architecture gets its own."""
    cfg, _, _ = tiny
    init = presets.compiled_init(cfg)
    assert presets.compiled_init(presets.model_config("tiny")) is init
    got = init(jax.random.key(3))
    want = jax.jit(lambda k: presets.init_variables(cfg, k))(jax.random.key(3))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    other = presets.model_config("tiny")
    other.mlp_dim = 128
    assert presets.compiled_init(other) is not init


def test_token_vit_uses_the_first_n_plus_1_positions():
    vit = TokenViT(num_positions=49, dim=32, depth=1, heads=2, head_dim=16, mlp_dim=32, pool="mean")
    tokens = jax.random.normal(jax.random.key(0), (2, 36, 12))
    params = random_variables(vit, tokens, train=False)["params"]
    apply = jax.jit(lambda p: vit.apply({"params": p}, tokens, train=False))
    out = apply(params)
    pos = params["pos_embedding"]
    beyond = {**params, "pos_embedding": pos.at[:, 37:].set(100.0)}
    np.testing.assert_array_equal(np.asarray(apply(beyond)), np.asarray(out))
    inside = {**params, "pos_embedding": pos.at[:, 36].add(jax.random.normal(jax.random.key(5), (32,)))}
    assert not np.allclose(np.asarray(apply(inside)), np.asarray(out))
    with pytest.raises(ValueError, match="50 tokens but only num_positions=49"):
        vit.apply({"params": params}, jnp.zeros((1, 50, 12)), train=False)


@pytest.mark.parametrize("std", [1.0, 0.02])
def test_class_token_and_positions_are_initialised_normal_with_token_init_std(std):
    vit = TokenViT(num_positions=196, dim=768, depth=1, heads=2, head_dim=8, mlp_dim=8, token_init_std=std)
    shapes = jax.eval_shape(lambda: vit.init(jax.random.key(0), jnp.zeros((1, 4, 12)), train=False))
    assert shapes["params"]["pos_embedding"].shape == (1, 197, 768)
    params = jax.jit(lambda k: vit.init(k, jnp.zeros((1, 4, 12)), train=False))(jax.random.key(0))["params"]
    assert np.std(np.asarray(params["pos_embedding"])) == pytest.approx(std, rel=0.01)
    assert np.std(np.asarray(params["cls_token"])) == pytest.approx(std, rel=0.1)
    assert presets.model_config("base").token_init_std == 1.0  # torch.randn, as the official fViT


def test_drop_path_drops_whole_samples():
    x = jnp.ones((64, 5, 3))
    y = np.asarray(drop_path(0.5, "dp").apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    per_sample = y.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))  # all-or-nothing per sample
    assert 10 < (per_sample[:, 0] == 0).sum() < 54
    assert drop_path_rates(0.1, 3, "constant") == (0.1, 0.1, 0.1)
    np.testing.assert_allclose(drop_path_rates(0.1, 3, "linear"), [0.0, 0.05, 0.1])
    with pytest.raises(ValueError, match="drop_path_schedule"):
        drop_path_rates(0.1, 3, "cosine")


def test_train_mode_is_stochastic_and_eval_is_not():
    cfg = presets.model_config("tiny")
    vit = presets.build_token_vit(cfg)
    tokens = jax.random.normal(jax.random.key(0), (3, 49, 192))
    params = random_variables(vit, tokens, train=False)["params"]
    train = jax.jit(lambda k: vit.apply({"params": params}, tokens, train=True, rngs={"dropout": k}))
    a, b, c = train(jax.random.key(2)), train(jax.random.key(2)), train(jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    e1 = jax.jit(lambda p: vit.apply({"params": p}, tokens, train=False))(params)
    assert not np.allclose(np.asarray(a), np.asarray(e1))


def test_bfloat16_compute_keeps_float32_params_and_output():
    cfg = presets.model_config("tiny")
    tokens = jax.random.normal(jax.random.key(0), (2, 49, 192))
    vit32 = presets.build_token_vit(cfg)
    cfg.dtype = "bfloat16"
    vit16 = presets.build_token_vit(cfg)
    params = random_variables(vit16, tokens, train=False)["params"]
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
    out16 = jax.jit(lambda p: vit16.apply({"params": p}, tokens, train=False))(params)
    out32 = jax.jit(lambda p: vit32.apply({"params": p}, tokens, train=False))(params)
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out16), np.asarray(out32), atol=0.15)


# ------------------------------------------------------------------------------------------ landmark CNN
@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 9), (3, 2, 10), (5, 2, 7), (5, 1, 8)])
def test_depthwise_conv_matches_torch_symmetric_padding(kernel, stride, size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, size, size, 6)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 1, 6)).astype(np.float32)
    ref = F.conv2d(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(w).permute(3, 2, 0, 1), stride=stride,
                   padding=(kernel - 1) // 2, groups=6).permute(0, 2, 3, 1).numpy()
    for impl in ("taps", "xla"):
        out = DepthwiseConv(kernel, stride, impl).apply({"params": {"kernel": w}}, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, err_msg=impl)
    np.testing.assert_allclose(np.asarray(depthwise_conv_taps(jnp.asarray(x), jnp.asarray(w), stride,
                                                              (kernel - 1) // 2)), ref, atol=1e-5)
    out = DepthwiseConv(kernel, stride, "auto").apply({"params": {"kernel": w}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, err_msg="auto")


def test_depthwise_conv_auto_follows_the_lowering_platform_not_the_process_backend():
    """'auto' is the shifted multiply-adds in a program lowered for the CPU and the grouped
    convolution in one lowered for an accelerator, though this process's backend is the CPU (what an
    ahead-of-time compile for a TPU pod from a CPU host, bench/aot.py, or a multi-platform export needs)."""
    conv = DepthwiseConv(3, 2, "auto")
    x = jnp.zeros((1, 8, 8, 4))
    variables = conv.init(jax.random.key(0), x)
    fn = jax.jit(lambda v, x: conv.apply(v, x))
    text = {p: jax.export.export(fn, platforms=[p])(variables, x).mlir_module() for p in ("cpu", "tpu", "cuda")}
    assert "stablehlo.convolution" not in text["cpu"]
    for platform in ("tpu", "cuda"):
        assert "stablehlo.convolution" in text[platform] and "feature_group_count = 4" in text[platform], platform


def test_landmark_cnn_outputs_min_max_pixels_and_updates_batch_stats(tiny):
    cfg, _, model_variables = tiny
    lm = presets.build_landmark_cnn(cfg)
    images = jax.random.normal(jax.random.key(0), (3, 112, 112, 3))
    variables = {c: model_variables[c]["landmark_cnn"] for c in ("params", "batch_stats")}
    out = jax.jit(lambda v: lm.apply(v, images, train=False))(variables)
    assert out.shape == (3, 49, 2) and out.dtype == jnp.float32
    flat = np.asarray(out).reshape(3, -1)
    np.testing.assert_allclose(flat.min(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(flat.max(1), 111.0, atol=1e-4)
    _, updates = jax.jit(lambda v: lm.apply(v, images, train=True, rngs={"dropout": jax.random.key(2)},
                                            mutable=["batch_stats"]))(variables)
    before = np.asarray(variables["batch_stats"]["stem_bn"]["mean"])
    after = np.asarray(updates["batch_stats"]["stem_bn"]["mean"])
    assert not np.allclose(before, after)
    with pytest.raises(ValueError, match=r"LandmarkCNN.blocks\[0\]"):
        jax.eval_shape(lambda: LandmarkCNN(num_landmarks=4, blocks=((4, 16, 16, False, "RE", 1),)).init(
            jax.random.key(0), images, train=False))


def test_part_fvit_trains_the_landmark_cnn_through_the_sampler_and_accepts_landmarks(tiny):
    cfg, model, variables = tiny
    images = jax.random.normal(jax.random.key(0), (4, 112, 112, 3))

    def loss(params):
        (emb, _), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                                   rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
        return jnp.sum(emb ** 2)  # no landmark term: the landmark CNN learns only through the sampled patches

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["landmark_cnn"]["landmark_head"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["landmark_cnn"]["stem_conv"]["kernel"]).max()) > 0

    landmarks = jnp.full((4, 49, 2), 55.5)
    emb, aux = jax.jit(lambda p, x, l: model.apply({"params": p}, x, train=False, landmarks=l))(
        {"vit": variables["params"]["vit"]}, images, landmarks)
    np.testing.assert_array_equal(np.asarray(aux["landmarks"]), np.asarray(landmarks))
    assert emb.shape == (4, 96)
    assert isinstance(model, PartFViT)


def test_grid_head_init_starts_every_image_on_the_same_grid_and_still_learns():
    cfg = presets.model_config("tiny")  # 49 landmarks: a 7 x 7 grid
    cfg.landmark.head_init = "grid"
    lm = presets.build_landmark_cnn(cfg)
    images = jax.random.normal(jax.random.key(0), (3, 64, 64, 3))  # any size: the grid spans [0, H - 1]
    variables = jax.jit(lambda k: lm.init(k, images, train=False))(jax.random.key(1))
    out = np.asarray(jax.jit(lambda v: lm.apply(v, images, train=False))(variables))
    step = 63.0 / 6
    rows, cols = np.divmod(np.arange(49), 7)
    expected = np.stack([cols * step, rows * step], axis=1)  # landmark r*7+c at (x=c, y=r) grid units
    for b in range(3):
        np.testing.assert_allclose(out[b], expected, atol=1e-4)

    def loss(params):  # any loss of the landmark positions: the zero kernel must still get a gradient
        pts = lm.apply({**variables, "params": params}, images, train=False)
        return jnp.sum(pts[:, :, 0] * jnp.arange(49.0))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert float(jnp.abs(grads["landmark_head"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["landmark_head"]["bias"]).max()) > 0

    cfg.num_landmarks = 50
    with pytest.raises(ConfigError, match="config.model.num_landmarks=50"):
        presets.build_model(cfg)
    cfg.num_landmarks, cfg.landmark.head_init = 49, "uniform"
    with pytest.raises(ConfigError, match="config.model.landmark.head_init='uniform'"):
        presets.build_model(cfg)


# ------------------------------------------------------------------------------------------ fViT, InsightFace ViT
def test_patchify_is_the_official_einops_layout():
    images = np.random.default_rng(0).standard_normal((2, 16, 24, 3)).astype(np.float32)
    ours = np.asarray(patchify(jnp.asarray(images), 8))
    ref = torch_mirror.grid_tokens(torch.tensor(images).permute(0, 3, 1, 2), 8).numpy()
    np.testing.assert_array_equal(ours, ref)
    # token 1 is the second patch of the first row; its vector starts with row 0, col 0, channels
    np.testing.assert_array_equal(ours[0, 1, :3], images[0, 0, 8, :])
    np.testing.assert_array_equal(ours[0, 1, 3:6], images[0, 0, 9, :])
    with pytest.raises(ValueError, match="not a multiple of patch_size=5"):
        patchify(jnp.zeros((1, 16, 16, 3)), 5)


def test_random_token_mask_restores_order():
    keep, restore = random_token_mask(jax.random.key(0), 3, 10, 7)
    x = jnp.arange(30.0).reshape(3, 10, 1)
    kept = jnp.take_along_axis(x, keep[..., None], axis=1)
    filled = jnp.concatenate([kept, -jnp.ones((3, 3, 1))], axis=1)
    back = np.asarray(jnp.take_along_axis(filled, restore[..., None], axis=1))[..., 0]
    for b in range(3):
        kept_positions = set(np.asarray(keep[b]).tolist())
        for t in range(10):
            assert back[b, t] == (x[b, t, 0] if t in kept_positions else -1)


def test_insightface_vit_shapes_masking_and_parameter_count():
    model = InsightFaceViT(image_size=36, patch_size=9, dim=32, depth=2, heads=2, mlp_dim=128, mask_ratio=0.25,
                           embedding_size=24)
    images = jax.random.normal(jax.random.key(0), (3, 36, 36, 3))
    variables = random_variables(model, images, train=False)
    n_tokens, d = 16, 32
    expected = (9 * 9 * 3 * d + d) + n_tokens * d + d + 2 * (4 * d + 3 * d * d + d * d + d + d * 128 + 128
                                                              + 128 * d + d) + 2 * d \
        + n_tokens * d * d + 2 * d + d * 24 + 2 * 24
    assert presets.count_params(variables["params"]) == expected
    out, aux = jax.jit(lambda v: model.apply(v, images, train=False))(variables)
    assert out.shape == (3, 24) and out.dtype == jnp.float32 and aux == {}
    run = jax.jit(lambda k: model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(k)},
                                        mutable=["batch_stats"])[0][0])
    assert not np.allclose(np.asarray(run(0)), np.asarray(run(1)))
    np.testing.assert_array_equal(np.asarray(run(0)), np.asarray(run(0)))
    with pytest.raises(ValueError, match=r"images must be \[B,36,36,C\]"):
        jax.eval_shape(lambda: model.apply(variables, jnp.zeros((1, 32, 32, 3)), train=False))


# ------------------------------------------------------------------------------------------ heads
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_matches_numpy(norm_last_layer):
    head = DINOHead(out_dim=50, hidden_dim=24, bottleneck_dim=8, norm_last_layer=norm_last_layer)
    x = jax.random.normal(jax.random.key(0), (4, 16))
    params = head.init(jax.random.key(1), x)["params"]
    assert ("scale" in params["last_layer"]) is (not norm_last_layer)
    if not norm_last_layer:
        params = {**params, "last_layer": {**params["last_layer"], "scale": jnp.linspace(0.5, 2.0, 50)}}
    out = np.asarray(head.apply({"params": params}, x))
    p = tree_np(params)
    h = NP_ACT["gelu"](np_dense(np.asarray(x, np.float64), p["dense_0"]))
    h = np_dense(NP_ACT["gelu"](np_dense(h, p["dense_1"])), p["dense_2"])
    h = h / np.linalg.norm(h, axis=1, keepdims=True)
    v = p["last_layer"]["kernel"]
    w = v / np.linalg.norm(v, axis=0, keepdims=True) * p["last_layer"].get("scale", 1.0)
    np.testing.assert_allclose(out, h @ w, atol=1e-5)
    if norm_last_layer:
        assert np.abs(out).max() <= 1.0 + 1e-5  # cosine similarities with g = 1


def test_embedding_head_shapes_and_batch_stats():
    head = EmbeddingHead(features=12)
    tokens = jax.random.normal(jax.random.key(0), (5, 4, 8))
    variables = head.init(jax.random.key(1), tokens, train=False)
    assert variables["params"]["fc1"]["kernel"].shape == (32, 8)
    assert variables["batch_stats"]["bn2"]["mean"].shape == (12,)
    out, upd = head.apply(variables, tokens, train=True, mutable=["batch_stats"])
    assert out.shape == (5, 12)
    np.testing.assert_allclose(np.asarray(out).mean(0), 0.0, atol=1e-4)  # batch-normalised in training


# ------------------------------------------------------------------------------------------ presets
def test_base_preset_has_the_reference_parameter_count():
    variables = presets.abstract_variables(presets.model_config("base"))
    params = variables["params"]
    assert presets.count_params(params) == 66_955_616
    assert presets.count_params(params["vit"]) == 64_082_688
    trunk = {k: v for k, v in params["landmark_cnn"].items() if k != "landmark_head"}
    assert presets.count_params(trunk) == 2_809_816
    assert len(jax.tree_util.tree_leaves(variables["batch_stats"])) == 2 * 46
    mirror = torch_mirror.PartFViT()
    assert torch_mirror.count_params(mirror) == 66_955_616


def test_every_preset_builds(tiny):
    expected = {"tiny": 231_226, "insightface_t": 19_137_792}  # insightface_t: LVFace-T's ~19M
    for name in presets.PRESETS:
        cfg = presets.model_config(name)
        presets.validate_model_config(cfg)
        presets.build_model(cfg)
        if name in expected:
            assert presets.count_params(presets.abstract_variables(cfg)["params"]) == expected[name]
    assert presets.count_params(tiny[2]["params"]) == 231_226


@pytest.mark.parametrize("key,value,message", [
    ("kind", "convnext", "config.model.kind='convnext'"),
    ("heads", 0, "config.model.heads=0"),
    ("dropout", 1.5, "config.model.dropout=1.5"),
    ("attention_scale", "sqrt", "config.model.attention_scale"),
    ("dtype", "float8", "config.model.dtype"),
    ("landmark.blocks", ((3, 16, 16, False, "RE", 1), (3, 16, 16, False, "XX", 1)),
     r"config.model.landmark.blocks\[1\]"),
    ("token_init_std", 0.0, "config.model.token_init_std=0.0"),
])
def test_bad_model_config_names_the_key(key, value, message):
    cfg = presets.model_config("tiny")
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        presets.build_model(cfg)


def test_fvit_and_insightface_configs_are_checked():
    cfg = presets.model_config("tiny")
    cfg.kind, cfg.patch_size = "fvit", 9
    with pytest.raises(ConfigError, match="config.model.patch_size"):
        presets.validate_model_config(cfg)
    cfg = presets.model_config("tiny")
    cfg.kind, cfg.head_dim = "insightface_vit", 16
    presets.add_family_sections(cfg)
    with pytest.raises(ConfigError, match="config.model.head_dim"):
        presets.validate_model_config(cfg)
    with pytest.raises(ConfigError, match="preset 'huge'"):
        presets.model_config("huge")
    del cfg.landmark["dropout"]
    with pytest.raises(ConfigError, match="config.model.landmark.dropout is missing"):
        presets.validate_model_config(cfg)


def test_model_config_round_trips_through_json_metadata():
    cfg = presets.model_config("tiny")
    cfg.dim, cfg.landmark.dropout = 64, 0.3
    restored = presets.model_config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored.dim == 64 and restored.landmark.dropout == 0.3 and restored.preset == "tiny"
    assert restored.landmark.blocks == presets.TINY_LANDMARK_BLOCKS
    assert isinstance(presets.build_landmark_cnn(restored), nn.Module)
    with pytest.raises(ConfigError, match="config.model.landmark.width is not a model config key"):
        presets.model_config_from_dict({"preset": "tiny", "landmark": {"width": 3}})
