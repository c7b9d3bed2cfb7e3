"""jax.export round trips: a symbolic batch dimension, reloaded in a fresh process with equal outputs."""
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lafs_jax import sharding as mesh_lib
from lafs_jax.eval import embed, export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RELOAD = textwrap.dedent("""
    import sys, numpy as np, jax
    from jax import export as jexport
    with open(sys.argv[1], "rb") as f:
        exp = jexport.deserialize(bytearray(f.read()))
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], np.asarray(exp.call(x)))
""")


def _in_fresh_process(path, x, tmp_path):
    """Run the exported file in a new Python that imports only jax and numpy."""
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", _RELOAD, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(tmp_path / "y.npy")


class _SmallNet(nn.Module):
    """A stand-in backbone: images -> (embedding [B, 5], {})."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), strides=2)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.gelu(x)
        return nn.Dense(5)(x.mean(axis=(1, 2))), {}


def test_arbitrary_function_round_trip_in_fresh_process(tmp_path):
    model = _SmallNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 3)))
    fn = lambda x: model.apply(variables, x)[0]  # noqa: E731
    exp = export.export_function(fn, (12, 12, 3))
    assert str(exp.in_avals[0].shape[0]) == "b"
    path, sidecar = export.save_exported(exp, str(tmp_path / "net.jaxexport"), {"note": "test"})
    for b in (3, 5):  # the batch dimension is symbolic: one artefact, any batch size
        x = np.random.default_rng(b).normal(size=(b, 12, 12, 3)).astype(np.float32)
        np.testing.assert_allclose(_in_fresh_process(path, x, tmp_path), np.asarray(jax.jit(fn)(x)), rtol=1e-5, atol=1e-6)
    loaded, meta = export.load_exported(path)
    assert meta["note"] == "test" and meta["input_shape"] == ["b", "12", "12", "3"]
    x = np.ones((2, 12, 12, 3), np.float32)
    np.testing.assert_allclose(np.asarray(loaded.call(x)), np.asarray(fn(x)), rtol=1e-5, atol=1e-6)


def test_embedding_function_preprocessing_and_flip(tmp_path):
    model = _SmallNet()
    variables = model.init(jax.random.key(1), jnp.zeros((1, 12, 12, 3)))
    images = np.random.default_rng(0).integers(0, 256, (4, 12, 12, 3)).astype(np.uint8)
    f = embed.embedding_function(model, normalization="[-0.5,0.5]", color_order="bgr", flip=True)
    x = images[..., ::-1].astype(np.float32) / 255.0 - 0.5
    want = model.apply(variables, x)[0] + model.apply(variables, x[:, :, ::-1])[0]
    np.testing.assert_allclose(np.asarray(f(variables, images)), np.asarray(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="normalization"):
        embed.embedding_function(model, normalization="[0,1]")
    exp = export.export_function(lambda im: f(variables, im), (12, 12, 3), jnp.uint8)
    path, _ = export.save_exported(exp, str(tmp_path / "emb.jaxexport"))
    np.testing.assert_allclose(_in_fresh_process(path, images, tmp_path), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_embedder_shards_pads_and_matches_unsharded():
    model = _SmallNet()
    variables = model.init(jax.random.key(2), jnp.zeros((1, 12, 12, 3)))
    images = np.random.default_rng(1).integers(0, 256, (13, 12, 12, 3)).astype(np.uint8)
    e = embed.Embedder(model, variables, image_size=12, batch_size=6)
    assert e.batch_size == 8  # rounded up to the 8 devices
    got = e.embed(images, flip=True)
    want = embed.embedding_function(model, flip=True)(variables, images)
    assert got.shape == (13, 5)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        e.embed_batch(np.zeros((2, 10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        e.embed_batch(np.zeros((2, 12, 12, 3), np.float32))


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jaxexport"):
        export.load_exported(str(tmp_path / "nothing.jaxexport"))


def test_embedder_takes_variables_as_they_are_sharded():
    """Verification during training under any config.sharding_rules: the embedder runs on the live,
    rule-sharded parameters (a kernel split over 'model', another over 'data' as FSDP does) without
    resharding them, and gives the replicated embeddings; numpy variables are placed replicated."""
    model = _SmallNet()
    variables = model.init(jax.random.key(3), jnp.zeros((1, 12, 12, 3)))
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
    rules = ((r"Conv_0/kernel$", (None, None, None, "model")), (r"Dense_0/kernel$", ("data", None)))
    sharded = jax.device_put(variables, mesh_lib.param_shardings(variables, rules, mesh))
    assert sharded["params"]["Conv_0"]["kernel"].sharding.spec == P(None, None, None, "model")
    images = np.random.default_rng(2).integers(0, 256, (10, 12, 12, 3)).astype(np.uint8)
    e = embed.Embedder(model, None, image_size=12, mesh=mesh, batch_size=8)
    got = e.embed(images, flip=True, variables=sharded)
    want = embed.embedding_function(model, flip=True)(variables, images)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(e.embed(images, variables=jax.tree.map(np.asarray, variables)), got, rtol=1e-5, atol=1e-5)
    kept = e.on_mesh(sharded)
    assert kept["params"]["Conv_0"]["kernel"] is sharded["params"]["Conv_0"]["kernel"]
    assert e.on_mesh({"x": np.ones(3)})["x"].sharding == NamedSharding(mesh, P())
