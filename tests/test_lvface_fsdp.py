"""Large LVFace models: ViT-L's parameters and AdamW moments sharded over the data axis by FSDP_RULES
(per-device bytes fall by about the device count; measured on the abstract state, nothing
materialised, and on a compiled shape-faithful step), and `model.remat` changes no number."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import lvface as lvface_recipe
from cpu_env import USERS_OPTIMIZATION
from lafs_jax import sharding as mesh_lib
from lafs_jax.losses import partial_fc
from lafs_jax.models import presets
from lafs_jax.train import finetune


def _backbone_state_bytes(args, classes, mesh):
    """Per-device bytes of the backbone's params + optimizer state in build_train_step's abstract state
    (every leaf but W's, its moments' and the prototype buffer's)."""
    rows = partial_fc.padded_rows(classes, mesh)
    state = args[0]
    leaves = jax.tree.leaves({"params": state["params"]["backbone"], "opt_state": state["opt_state"]})
    return mesh_lib.per_device_bytes([x for x in leaves if not (x.ndim == 2 and x.shape[0] == rows)])


def _build(config, classes, fsdp):
    config.sharding_rules = mesh_lib.FSDP_RULES if fsdp else ()
    mesh = mesh_lib.make_mesh()
    step, args, _, _ = finetune.build_train_step(config, mesh, classes, steps_per_epoch=100, total_steps=1000)
    return step, args, mesh


def test_vit_l_fsdp_holds_an_eighth_of_params_and_adam_moments_per_device():
    """The full ViT-L of configs/lvface.py:l (255.7 M parameters), abstract: replicated vs FSDP."""
    config = lvface_recipe.get_config("l")
    assert config.sharding_rules == mesh_lib.FSDP_RULES and config.model.remat
    sizes = {}
    for fsdp in (False, True):
        _, args, mesh = _build(config, 1000, fsdp)
        sizes[fsdp] = _backbone_state_bytes(args, 1000, mesh)
    params = presets.count_params(args[0]["params"]["backbone"])
    assert params == 255_684_352
    assert 0 <= sizes[False] - 3 * 4 * params < 100  # params + Adam mu, nu (fp32), and a few step counters
    assert sizes[False] / sizes[True] > 7.9  # the goal is >= 6 on 8 devices


def test_compiled_step_arguments_fall_by_the_device_count_with_fsdp():
    """A shape-faithful ViT-L slice (D 768, 8 heads, MLP 3072, one block, 36 px: 16 tokens) compiled on
    the 8 CPU devices: XLA's per-device argument bytes follow the shardings."""
    config = lvface_recipe.get_config("l")
    config.model.depth, config.model.image_size = 1, 36
    config.batch_size, config.eval.bins = 8, ()
    mem, state = {}, {}
    for fsdp in (False, True):
        step, args, mesh = _build(config, 64, fsdp)
        mem[fsdp] = mesh_lib.compiled_memory(step.lower(*args).compile())
        state[fsdp] = _backbone_state_bytes(args, 64, mesh)
    other = mem[False]["argument"] - state[False]  # batch, W / 8 and its moments, E / 8: the same in both
    assert other < state[False] / 50
    assert mem[True]["argument"] - other == state[True]
    assert state[False] / state[True] > 7.5
    print(f"per-device arguments: replicated {mem[False]['argument']:,} B, FSDP {mem[True]['argument']:,} B")


def test_remat_changes_no_number():
    cfg = presets.model_config("vit_t")
    cfg.image_size, cfg.dim, cfg.depth, cfg.heads, cfg.head_dim, cfg.mlp_dim = 36, 32, 2, 2, 16, 64
    v = presets.init_variables(cfg, jax.random.key(0), batch=2)
    x = jax.random.normal(jax.random.key(1), (2, 36, 36, 3))

    def loss(params, remat):
        c = presets.model_config_from_dict(cfg.to_dict())
        c.remat = remat
        (out, _), _ = presets.build_model(c).apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                                   train=True, rngs={"dropout": jax.random.key(2)},
                                                   mutable=["batch_stats"])
        return jnp.sum(out ** 2)

    # compiled as users compile (the suite's fast-compile flags round the two programs ~4e-6 apart)
    plain = jax.jit(jax.value_and_grad(lambda p: loss(p, False)), compiler_options=USERS_OPTIMIZATION)(v["params"])
    remat = jax.jit(jax.value_and_grad(lambda p: loss(p, True)), compiler_options=USERS_OPTIMIZATION)(v["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), plain, remat)
