"""FSDP as a rule set (lafs_jax.sharding.FSDP_RULES): the compiled fine-tuning step holds 1/8 of the
backbone's parameters and Adam moments per device on 8 CPU devices, and trains as the replicated run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune as finetune_recipe
from lafs_jax import sharding as mesh_lib
from lafs_jax.losses import partial_fc
from lafs_jax.models import presets
from lafs_jax.train import finetune

STEPS = 3


def _config():
    c = finetune_recipe.get_config("tiny")
    m = c.model
    m.kind, m.image_size, m.patch_size = "fvit", 32, 8  # 16 grid tokens, no landmark CNN: a quick compile
    m.dim, m.depth, m.heads, m.head_dim, m.mlp_dim = 64, 1, 2, 32, 256
    m.dropout = m.emb_dropout = m.drop_path_rate = 0.0
    c.loss.sample_rate = 1.0
    c.optim.warmup_epochs = 0.0
    return c


def _train(rules, config, variables, batches, mesh, num_classes=40):
    """Compiled step's per-device argument bytes, the losses and the final backbone params."""
    model = presets.build_model(config.model)
    params = {"backbone": variables["params"],
              "centers": partial_fc.init_centers(jax.random.key(1), num_classes, config.model.dim, mesh)}
    tx = finetune.make_optimizer(config, params, steps_per_epoch=10, total_steps=20)
    shardings = finetune.state_shardings(tx, params, {}, mesh, rules)
    rep, batch_sharding = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
    params = jax.device_put(params, shardings["params"])
    state = {"step": jax.device_put(jnp.int32(0), rep), "params": params, "batch_stats": {},
             "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)}
    loss_fn = finetune.make_loss_fn(model, None, config, mesh, num_classes)
    step = jax.jit(finetune.make_train_step(loss_fn, tx, jax.random.key(2)), donate_argnums=(0,),
                   in_shardings=(shardings, rep, batch_sharding, rep), out_shardings=(shardings, rep))
    global_batches = [mesh_lib.global_batch(b, mesh) for b in batches]
    compiled = step.lower(state, {}, global_batches[0], np.float32(0)).compile()
    losses = []
    for batch in global_batches:
        state, metrics = compiled(state, {}, batch, np.float32(0))
        losses.append(float(metrics["loss"]))
    return compiled.memory_analysis().argument_size_in_bytes, losses, state, shardings


def test_fsdp_rules_cut_per_device_state_by_the_device_count_and_train_like_replicated():
    config = _config()
    mesh = mesh_lib.make_mesh(None)
    variables = jax.tree.map(np.asarray, presets.init_variables(config.model, jax.random.key(0)))
    rng = np.random.default_rng(0)
    label = rng.integers(0, 40, 16).astype(np.int32)
    batch = {"image": rng.uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32), "label": label, "label2": label,
             "lam": np.ones(16, np.float32)}
    batches = [batch] * STEPS  # one batch: the loss must fall

    rep_bytes, rep_losses, rep_state, _ = _train((), config, variables, batches, mesh)
    fsdp_bytes, fsdp_losses, fsdp_state, shardings = _train(mesh_lib.FSDP_RULES, config, variables, batches, mesh)

    backbone = variables["params"]
    state_bytes = 3 * sum(x.nbytes for x in jax.tree.leaves(backbone))  # params + Adam mu and nu
    split = 3 * sum(x.nbytes for x, s in zip(jax.tree.leaves(backbone), jax.tree.leaves(shardings["params"]["backbone"]))
                    if "data" in s.spec)
    print(f"per-device argument bytes: replicated {rep_bytes}, FSDP {fsdp_bytes} (backbone state {state_bytes})")
    assert split > 0.97 * state_bytes  # all but the class token, norms and biases
    other = rep_bytes - state_bytes  # batch, W / 8 and its moments, counters: the same in both programs
    assert other < state_bytes / 10
    assert rep_bytes - fsdp_bytes == pytest.approx(split * 7 / 8, rel=0.02)
    assert (rep_bytes - other) / (fsdp_bytes - other) > 7.0  # the backbone's state: about 1/8 per device
    # the optimizer moments follow their parameters
    kernel = shardings["params"]["backbone"]["vit"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.spec == _data_spec(1)
    moments = [s for s in jax.tree.leaves(shardings["opt_state"]) if getattr(s, "spec", None) == _data_spec(1)]
    assert len(moments) >= 2 * sum(s.spec == _data_spec(1) for s in jax.tree.leaves(shardings["params"]["backbone"]))
    # and the training is the replicated run's, to fp32 reduction order
    np.testing.assert_allclose(fsdp_losses, rep_losses, rtol=1e-5)
    assert rep_losses[-1] < rep_losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 fsdp_state["params"]["backbone"], rep_state["params"]["backbone"])


def _data_spec(dim: int):
    """PartitionSpec splitting dimension `dim` over 'data'."""
    return jax.sharding.PartitionSpec(*([None] * dim + ["data"]))
