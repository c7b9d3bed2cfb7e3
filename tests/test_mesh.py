"""Mesh construction, rule-based parameter shardings and global batches on 8 CPU devices."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from lafs_jax import sharding as mesh_lib


@pytest.mark.parametrize("data,model,expected", [(-1, 1, (8, 1)), (-1, 2, (4, 2)), (2, -1, (2, 4)), (8, 1, (8, 1))])
def test_mesh_shapes(data, model, expected):
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": data, "model": model}))
    assert mesh.axis_names == ("data", "model")
    assert tuple(mesh.shape.values()) == expected
    assert all(t == AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("data,model", [(3, -1), (-1, -1), (2, 2)])
def test_bad_mesh_raises(data, model):
    with pytest.raises(ValueError, match="config.mesh"):
        mesh_lib.make_mesh(ml_collections.ConfigDict({"data": data, "model": model}))


def test_rules_first_match_wins_default_replicated():
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
    params = {"vit": {"block_0": {"mlp": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)}},
                      "pos": jnp.zeros((1, 5, 8))}}
    rules = [(r"mlp/kernel$", (None, "model")), (r"mlp/.*", ("model",)), (r"^vit/", ())]
    sh = mesh_lib.param_shardings(params, rules, mesh)
    assert sh["vit"]["block_0"]["mlp"]["kernel"].spec == P(None, "model")
    assert sh["vit"]["block_0"]["mlp"]["bias"].spec == P("model")
    assert sh["vit"]["pos"].spec == P()
    placed = jax.device_put(params, sh)
    assert placed["vit"]["block_0"]["mlp"]["kernel"].addressable_shards[0].data.shape == (8, 8)


def test_rule_errors_name_parameter_path():
    mesh = mesh_lib.make_mesh(None)
    with pytest.raises(ValueError, match="a/b"):
        mesh_lib.param_shardings({"a": {"b": jnp.zeros(3)}}, [("b", (None, "data"))], mesh)
    with pytest.raises(ValueError, match="'tensor'"):
        mesh_lib.param_shardings({"a": {"b": jnp.zeros(3)}}, [("b", ("tensor",))], mesh)


def test_path_str_handles_lists_and_dicts():
    tree = {"a": [jnp.zeros(1), {"b": jnp.zeros(1)}]}
    paths = [mesh_lib.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a/0", "a/1/b"]


def test_global_batch_shards_leading_axis_over_all_devices():
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
    local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "label": np.arange(16)}
    g = mesh_lib.global_batch(local, mesh)
    assert g["image"].shape == (16, 3)
    assert len({s.data.shape for s in g["image"].addressable_shards}) == 1
    assert g["image"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(g["label"]), np.arange(16))
    assert mesh_lib.local_batch_size(16, mesh) == 16
    with pytest.raises(ValueError, match="divide"):
        mesh_lib.local_batch_size(12, mesh)


def test_state_shardings_follow_the_parameters_through_optax_wrappers():
    """Every copy of a parameter in a train state (itself, Adam moments under partition / masked /
    inject_hyperparams / MultiSteps, a teacher) takes its sharding; counts, keys, look-alikes of another
    path and statistics are replicated."""
    import optax

    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
    params = {"backbone": {"mlp": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}, "other": jnp.zeros((4, 8))},
              "centers": jnp.zeros((16, 4))}
    rows = jax.sharding.NamedSharding(mesh, P(mesh.axis_names, None))
    p_shard = {"backbone": mesh_lib.param_shardings(params["backbone"], [(r"mlp/kernel$", (None, "model"))], mesh),
               "centers": rows}
    labels = lambda p: {"backbone": jax.tree.map(lambda _: "backbone", p["backbone"]), "centers": "centers"}
    no_bias = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    tx = optax.MultiSteps(optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.partition({"backbone": optax.inject_hyperparams(optax.adamw)(1e-3, mask=no_bias),
                         "centers": optax.chain(optax.masked(optax.trace(0.9), no_bias), optax.sgd(0.1))}, labels)),
        every_k_schedule=2)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.eval_shape(tx.init, params),
             "teacher": params, "rng": jax.random.key(0), "stats": {"mlp": {"kernel": jnp.zeros((4, 8))}}}
    sh = mesh_lib.state_shardings(state, params, p_shard, mesh)
    by_path = {mesh_lib.path_str(kp): s.spec for kp, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
    moments = [p for p in by_path if p.startswith("opt_state/") and p.endswith("mlp/kernel")]
    assert len(moments) == 3  # Adam mu and nu, MultiSteps' accumulated gradient
    assert all(by_path[p] == P(None, "model") for p in moments)
    assert {by_path[p] for p in by_path if p.endswith("centers")} == {P(mesh.axis_names, None)}
    assert len([p for p in by_path if p.endswith("centers")]) == 4  # param, teacher, accumulated gradient, trace
    assert by_path["params/backbone/mlp/kernel"] == by_path["teacher/backbone/mlp/kernel"] == P(None, "model")
    assert by_path["params/backbone/other"] == P()  # same shape as the kernel, another path
    assert by_path["stats/mlp/kernel"] == P()  # ends with 'mlp/kernel', not with the full 'backbone/mlp/kernel'
    for p, spec in by_path.items():
        if p in ("step", "rng") or "count" in p or "hyperparams" in p or "mini_step" in p:
            assert spec == P(), p
    placed = jax.jit(tx.init, out_shardings=sh["opt_state"])(jax.device_put(params, p_shard))
    shards = {mesh_lib.path_str(kp): x.addressable_shards[0].data.shape
              for kp, x in jax.tree_util.tree_flatten_with_path(placed)[0]}
    assert shards["acc_grads/backbone/mlp/kernel"] == (4, 4) and shards["acc_grads/centers"] == (2, 4)


def test_rule_splitting_an_indivisible_dimension_names_the_parameter():
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
    params = {"vit": {"fc": {"kernel": jnp.zeros((8, 5)), "bias": jnp.zeros(12)}}}
    with pytest.raises(ValueError, match=r"'vit/fc/kernel' splits dimension 1 of shape \(8, 5\) \(5\) over "
                                         r"\('model',\) = 2 devices"):
        mesh_lib.param_shardings(params, [("kernel", (None, "model"))], mesh)
    with pytest.raises(ValueError, match=r"'vit/fc/bias' splits dimension 0 .* over \('data', 'model'\) = 8"):
        mesh_lib.param_shardings(params, [("bias", (("data", "model"),))], mesh)
    with pytest.raises(ValueError, match="a spec is a sequence"):
        mesh_lib.param_shardings(params, [("bias", "model")], mesh)  # ('model',) was meant


def test_topology_errors_name_the_setting():
    mesh = mesh_lib.make_mesh(None)
    with pytest.raises(ValueError, match=r"config.batch_size=12 does not divide by the 8 devices .* multiple of 8"):
        mesh_lib.local_batch_size(12, mesh, "config.batch_size")
    with pytest.raises(ValueError, match=r"data=3 x model=2 = 6 devices, but 8 are available .*config.mesh.data=-1"):
        mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 3, "model": 2}))


def test_fsdp_spec_splits_the_largest_divisible_dimension_over_data():
    mesh = mesh_lib.make_mesh(None)  # data 8
    assert mesh_lib.fsdp_spec((32, 64), mesh) == P(None, "data")  # 64 > 32, both divisible
    assert mesh_lib.fsdp_spec((80, 24), mesh) == P("data")
    assert mesh_lib.fsdp_spec((1, 17, 64), mesh) == P(None, None, "data")
    assert mesh_lib.fsdp_spec((30, 50), mesh) == P()  # nothing divides
    assert mesh_lib.fsdp_spec((512,), mesh) == P()  # below FSDP_MIN_SIZE: replicated
    assert mesh_lib.fsdp_spec((2048,), mesh) == P("data")
    mesh42 = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
    assert mesh_lib.fsdp_spec((36, 50), mesh42) == P("data")
    assert mesh_lib.fsdp_spec((64, 64), mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "model": 8}))) == P()
    params = {"mlp": {"fc1": {"kernel": jnp.zeros((64, 256)), "bias": jnp.zeros(256)}}, "pos": jnp.zeros((1, 17, 64))}
    rules = ((r"fc1/kernel$", (None, "model")),) + mesh_lib.FSDP_RULES  # model-axis rules first, then FSDP
    sh = mesh_lib.param_shardings(params, rules, mesh42)
    assert sh["mlp"]["fc1"]["kernel"].spec == P(None, "model")
    assert sh["mlp"]["fc1"]["bias"].spec == P() and sh["pos"].spec == P(None, None, "data")
