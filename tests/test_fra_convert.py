"""`python -m lafs_jax.convert --kind fra` on official-layout files saved from the torch mirror (a training
checkpoint with module.online_net / target_net / predictors / encoder_q / center, and a torchvision
ResNet state dict), then `python -m lafs_jax.embed` on the converted directory; bad checkpoints fail
naming the key."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # small tensors: threads only contend with the other tests

import fra_torch_mirror as M  # noqa: E402
from lafs_jax import embed as embed_cli  # noqa: E402
from lafs_jax import variables as variables_lib  # noqa: E402
from lafs_jax.convert.__main__ import main as convert_main  # noqa: E402
from lafs_jax.input.transforms import VGGFACE2_MEAN, VGGFACE2_STD  # noqa: E402

SIZE = 64  # the images given to embed are resized to the model's 224 px (embed.RESIZE_RULE)


def _mirror():
    torch.manual_seed(0)
    net = M.FRAB(M.ResNet(M.BasicBlock, (1, 1, 1, 1), width=8), hidden=32, out=16, queries=4, dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        for m in net.modules():  # non-trivial running statistics, so eval mode is tested
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        for p in net.target_net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fra_convert")
    net = _mirror()
    state = {"module." + k: v for k, v in net.state_dict().items()}
    assert any(k.startswith("module.encoder_q.") for k in state) and "module.center" in state
    src = tmp / "checkpoint_0049.pth.tar"
    torch.save({"epoch": 50, "arch": "FRAB", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}},
               src)
    return net, str(src), tmp


def _embed_reference(backbone, images):
    """The mirror backbone's pooled features of uint8 images resized as embed does (224 px, bicubic)."""
    resized = np.stack([embed_cli.fit_size(im, 224) for im in images]).astype(np.float32) / 255.0
    x = (resized - np.asarray(VGGFACE2_MEAN, np.float32)) / np.asarray(VGGFACE2_STD, np.float32)
    with torch.no_grad():
        return backbone(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).mean((2, 3)).numpy()


def test_training_checkpoint_converts_and_embeds_like_the_mirror(official):
    net, src, tmp = official
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    np.save(tmp / "faces.npy", images)
    for which, backbone in (("online", net.online_net.backbone), ("target", net.target_net.backbone)):
        out = tmp / f"conv_{which}"
        assert convert_main(["--kind", "fra", "--src", src, "--out", str(out), "--which", which]) == 0
        meta = variables_lib.read_metadata(str(out))
        assert meta["normalization"] == "vggface2" and meta["which"] == which and meta["kind"] == "fra"
        emb_path = tmp / f"emb_{which}.npy"
        assert embed_cli.main(["--backbone", str(out), "--images", str(tmp / "faces.npy"), "--no-flip",
                               "--out", str(emb_path)]) == 0
        got, want = np.load(emb_path), _embed_reference(backbone, images)
        assert got.shape == (3, 64)
        assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want)), which
        assert json.load(open(str(emb_path)[:-4] + ".json"))["normalization"] == "vggface2"
    model, _ = variables_lib.load_variables(str(tmp / "conv_online" / "fra_model"))
    np.testing.assert_allclose(model["batch_stats"]["target"]["neck"]["proto"],
                               net.target_net.neck.proto.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(model["params"]["predictor_obj"]["mlp_3"]["kernel"],
                               net.predictor_obj.mlp[3].weight.detach().numpy()[:, :, 0].T, rtol=0, atol=0)


def test_plain_torchvision_resnet_state_dict_converts(official, tmp_path):
    net, _, _ = official
    backbone = net.online_net.backbone
    state = dict(backbone.state_dict(), **{"fc.weight": torch.zeros(7, 64), "fc.bias": torch.zeros(7)})
    src = tmp_path / "resnet.pth"
    torch.save(state, src)
    assert convert_main(["--kind", "fra", "--src", str(src), "--out", str(tmp_path / "r")]) == 0
    assert not os.path.exists(tmp_path / "r" / "fra_model")
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    embed_cli.main(["--backbone", str(tmp_path / "r"), "--images", str(tmp_path / "x.npy"), "--no-flip",
                    "--out", str(tmp_path / "y.npy")])
    want = _embed_reference(backbone, images)
    assert np.max(np.abs(np.load(tmp_path / "y.npy") - want)) <= 1e-4 * np.max(np.abs(want))


def test_bad_checkpoints_fail_naming_the_key(official, tmp_path):
    net, src, _ = official
    state = {"module." + k: v for k, v in net.state_dict().items()}

    def convert(obj, *extra):
        path = tmp_path / "bad.pth"
        torch.save(obj, path)
        with pytest.raises(SystemExit) as e:
            convert_main(["--kind", "fra", "--src", str(path), "--out", str(tmp_path / "o"), *extra])
        return str(e.value)

    assert "module.extra.weight" not in state
    assert "extra.weight: unknown key" in convert({"state_dict": {**state, "module.extra.weight": torch.zeros(1)}})
    missing = {k: v for k, v in state.items() if k != "module.target_net.neck.proto"}
    assert "target/neck/proto" in convert({"state_dict": missing})
    wrong = dict(state, **{"module.encoder_q.conv1.weight": torch.zeros(8, 3, 7, 7)})
    assert "encoder_q.conv1.weight" in convert({"state_dict": wrong})
    msg = convert({"state_dict": state}, "--preset", "resnet50")
    assert "params/bn1/bias has shape (8,) in the checkpoint, (64,) in resnet50" in msg
    assert "conv1.weight is missing" in convert({"pos_embed": torch.zeros(1, 4, 8)})
    with pytest.raises(SystemExit, match="--which 'student' does not go with --kind fra"):
        convert_main(["--kind", "fra", "--src", src, "--out", str(tmp_path / "o"), "--which", "student"])
    assert not os.path.exists(tmp_path / "o")
