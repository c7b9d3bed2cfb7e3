"""FRA against its PyTorch mirror (tests/fra_torch_mirror.py, the official FRAB from issue 34's
description): the ResNet (train and eval mode, running statistics), every loss term and a few gradient
norms on a tiny model, the encoder in eval mode (the `proto` buffer instead of the batch mean), the cluster loss on sharp logits, and BatchNorm on 1 vs 8 devices."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

torch.set_num_threads(1)  # small tensors: threads only contend with the other tests

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import fra_torch_mirror as M  # noqa: E402
from lafs_jax.convert import fra as conv  # noqa: E402
from lafs_jax.losses import clustering  # noqa: E402
from lafs_jax.methods import fra  # noqa: E402
from lafs_jax.methods.fra import objective as fra_objective  # noqa: E402
from lafs_jax.models import presets  # noqa: E402
from lafs_jax.models.resnet import BatchNorm  # noqa: E402


def _nhwc(x):
    return jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))


def _close(a, b, rel, what, scale=None):
    """|a - b| <= rel x scale (default: max |b|, at least 1e-3)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = scale or max(float(np.max(np.abs(b))), 1e-3)
    assert np.max(np.abs(a - b)) <= rel * scale, f"{what}: max diff {np.max(np.abs(a - b)):.3g} at scale {scale:.3g}"


def _state(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def test_resnet_matches_torchvision_layout_in_train_and_eval_mode():
    torch.manual_seed(0)
    net = M.ResNet(M.Bottleneck, (1, 1, 1, 1), width=8)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    variables, cfg = conv.convert_resnet(_state(net))
    assert cfg.resnet.block == "bottleneck" and tuple(cfg.resnet.layers) == (1, 1, 1, 1) and cfg.dim == 256
    model = presets.build_model(cfg)
    x = torch.randn(4, 3, 64, 64)
    net.train()
    ref_train = net(x).mean((2, 3)).detach().numpy()
    (emb, aux), mut = model.apply(variables, _nhwc(x), train=True, mutable=["batch_stats"])
    _close(emb, ref_train, 1e-4, "pooled, train mode")
    assert aux["feature_map"].shape == (4, 2, 2, 256)
    after = conv.convert_resnet(_state(net))[0]["batch_stats"]  # torch's running stats after that forward
    for path in (("bn1", "var"), ("layer4_0", "downsample_1", "mean"), ("layer2_0", "bn3", "var")):
        a, b = mut["batch_stats"], after
        for p in path:
            a, b = a[p], b[p]
        _close(a, b, 1e-4, f"running stat {'/'.join(path)}")
    net.eval()
    ref_eval = net(x).mean((2, 3)).detach().numpy()
    emb_eval, _ = model.apply({"params": variables["params"], "batch_stats": mut["batch_stats"]}, _nhwc(x),
                              train=False)
    _close(emb_eval, ref_eval, 1e-4, "pooled, eval mode")


def test_batchnorm_statistics_are_global_on_1_and_8_devices():
    """The ResNet's BatchNorm under jit with the batch sharded over 'data': the same outputs and running
    statistics on 1 device and on 8 (SyncBatchNorm semantics, from GSPMD)."""
    bn = BatchNorm()
    x = jax.random.normal(jax.random.key(1), (8, 4, 4, 3)) * jnp.arange(1, 9)[:, None, None, None] + 2.0
    variables = bn.init(jax.random.key(0), x, train=False)

    def run(devices):
        mesh = Mesh(np.asarray(devices), ("data",))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        y, mut = jax.jit(lambda v, im: bn.apply(v, im, train=True, mutable=["batch_stats"]))(variables, xs)
        return np.asarray(y), np.asarray(mut["batch_stats"]["mean"]), np.asarray(mut["batch_stats"]["var"])

    one, eight = run(jax.devices()[:1]), run(jax.devices()[:8])
    for a, b in zip(one, eight):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    flat = np.asarray(x).reshape(-1, 3)  # torch's update: momentum 0.1, unbiased variance
    np.testing.assert_allclose(one[1], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(one[2], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)


def test_cluster_loss_matches_the_official_sinkhorn_ce_and_me_max():
    torch.manual_seed(1)
    dots_o, dots_t = torch.randn(3, 5, 7) * 0.5, torch.randn(3, 5, 7) * 0.5  # [B, Q, P]
    ref = M.FRAB(M.ResNet(M.BasicBlock, (1, 1, 1, 1), width=8), queries=5)
    ce, memax = ref.cluster(dots_o, dots_t)
    rows = lambda d: jnp.asarray(d.numpy().transpose(0, 2, 1).reshape(-1, 5))  # noqa: E731
    out = clustering.cluster_loss(rows(dots_o), rows(dots_t), student_temp=0.1, teacher_temp=0.04)
    assert float(ce) > 1.0 and float(memax) > 0.005  # sharp enough to test something
    _close(out["ce"], float(ce), 1e-5, "cluster CE")
    _close(out["me_max"], float(memax), 1e-4, "ME-MAX")
    a = clustering.sinkhorn_knopp(jax.nn.softmax(rows(dots_t) / 0.04), 3)
    np.testing.assert_allclose(np.asarray(a.sum(1)), 1.0, rtol=1e-5)


GRAD_PARAMS = {  # torch name -> path in the JAX gradient tree
    "online_net.backbone.conv1.weight": ("online", "backbone", "conv1", "kernel"),
    "online_net.backbone.layer3.0.bn2.weight": ("online", "backbone", "layer3_0", "bn2", "scale"),
    "online_net.neck.proj_attn.query_embed.weight": ("online", "neck", "proj_attn", "query_embed", "embedding"),
    "online_net.neck.proj_attn.transformer.decoder.layers.1.multihead_attn.in_proj_weight":
        ("online", "neck", "proj_attn", "transformer", "decoder", "layers_1", "multihead_attn", "in_proj_weight"),
    "online_net.neck.proj_pixel.mlp.0.weight": ("online", "neck", "proj_pixel", "mlp_0", "kernel"),
    "online_net.neck.proj_obj.mlp.3.weight": ("online", "neck", "proj_obj", "mlp_3", "kernel"),
    "predictor_obj.mlp.0.weight": ("predictor_obj", "mlp_0", "kernel"),
}


def _mirror_and_variables(seed=0):
    torch.manual_seed(seed)
    net = M.FRAB(M.ResNet(M.BasicBlock, (1, 1, 1, 1), width=8), hidden=64, out=32, queries=4, dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        net.target_net.load_state_dict(net.online_net.state_dict())
        for p in net.target_net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {"module." + k: v for k, v in _state(net).items()}
    variables, cfg = conv.convert_training(conv.unwrap({"epoch": 1, "state_dict": state}))
    cfg.fra.dropout = 0.0
    return net, variables, cfg


def test_loss_terms_and_gradients_match_the_mirror():
    net, variables, cfg = _mirror_and_variables()
    x1, x2 = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    net.train()
    ref = net(x1, x2)
    ref["loss"].backward()
    v1, v2 = _nhwc(x1), _nhwc(x2)
    p, s = variables["params"], variables["batch_stats"]

    def terms_and_grads(student):  # loss_terms and the gradient of its loss (the target's is stopped)
        terms = lambda q: fra.loss_terms({"params": {**p, **q}, "batch_stats": s}, v1, v2, cfg)  # noqa: E731
        (_, out), grads = jax.value_and_grad(lambda q: (lambda t: (t["loss"], t))(terms(q)), has_aux=True)(student)
        target = fra_objective.target_outputs(cfg, p["target"], s["target"], (v1, v2), jax.random.key(0))
        return out, grads, target["batch_stats"]

    terms, grads, target_stats = jax.jit(terms_and_grads)({k: p[k] for k in ("online", "predictor", "predictor_obj")})
    for key, value in ref.items():  # ME-MAX = sum pbar log pbar + log Q: its scale is log Q (cancellation)
        _close(terms[key], float(value.detach()), 1e-4, key, scale=np.log(4) if key.startswith("memax") else None)
    with torch.no_grad():
        pooled = torch.stack([net.online_net.backbone(x).mean((2, 3)) for x in (x1, x2)]).numpy()
    _close(terms["pooled"], pooled, 1e-4, "pooled features")

    # the target's own forwards (v1 then v2) moved its proto and BatchNorm statistics as torch's
    _close(target_stats["neck"]["proto"], net.target_net.neck.proto.numpy(), 1e-4, "target proto")
    _close(target_stats["backbone"]["layer2_0"]["bn2"]["var"], net.target_net.backbone.layer2[0].bn2.running_var.numpy(),
           1e-4, "target running var")
    _close(target_stats["neck"]["proj_pixel"]["mlp_1"]["mean"],
           net.target_net.neck.proj_pixel.mlp[1].running_mean.numpy(), 1e-4, "target neck running mean")
    # eval mode from the mirror's state after that forward: `proto` (not the batch mean) and running statistics
    now, _ = conv.convert_training(conv.unwrap({"epoch": 1, "state_dict": {"module." + k: v
                                                                           for k, v in _state(net).items()}}))
    encoder = fra_objective.build_networks(cfg)[0]
    out = jax.jit(lambda v, x: encoder.apply(v, x, train=False))(
        {"params": now["params"]["online"], "batch_stats": now["batch_stats"]["online"]}, v1)
    net.eval()
    with torch.no_grad():
        z_g, z_r, dots = net.online_net(x1, train=False)
    _close(out["dots"], dots.numpy(), 1e-4, "eval-mode heatmap cosines (proto)")
    _close(out["z_r"], z_r.transpose(1, 2).numpy(), 1e-4, "eval-mode region projections")
    _close(out["z_g"], z_g[..., 0].numpy(), 1e-4, "eval-mode global projection")
    torch_params = dict(net.named_parameters())
    for name, path in GRAD_PARAMS.items():
        g = grads
        for k in path:
            g = g[k]
        want = float(torch_params[name].grad.norm())
        assert want > 0, name
        assert abs(float(jnp.linalg.norm(g)) - want) <= 1e-3 * want, (name, float(jnp.linalg.norm(g)), want)
