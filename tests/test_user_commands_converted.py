"""The four user commands (`embed`, `compare`, `search`, `export --format onnx`) on converted official
checkpoints: a tiny Part fViT PyTorch mirror saved as the official supervised checkpoint and converted by
`python -m lafs_jax.convert`'s main, and a 2-block LVFace ViT mirror converted by the same mapping code
(`lafs_jax.convert.mapping`: no released preset has 2 blocks). Each command must reproduce the mirror's
embeddings of the same images, preprocessed as the directory's metadata says (colour order, normalisation):
the Part fViT directory records the official '[-0.5,0.5]' and a 'bgr' colour order (--color-order), LVFace's
'[-1,1]' RGB."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from cpu_env import cpu_env
import torch_mirror
import torch_mirror_lvface
from lafs_jax import compare as compare_cli
from lafs_jax import embed as embed_cli
from lafs_jax import search as search_cli
from lafs_jax.convert import mapping
from lafs_jax.convert.__main__ import main as convert_main
from lafs_jax.eval import export as export_cli
from lafs_jax.input.synthetic import face_like_image
from lafs_jax.models import presets
from lafs_jax.variables import read_metadata, save_variables

TOL = 1e-4  # relative to the embeddings' largest magnitude
N_IMAGES = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("part_fvit", "lvface")


def _part_fvit(tmp):
    cfg = presets.model_config("tiny")
    torch.manual_seed(0)
    model = torch_mirror.PartFViT(num_patches=cfg.num_landmarks, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                                  dim_head=cfg.head_dim, mlp_dim=cfg.mlp_dim, patch=cfg.patch_size, with_land=True,
                                  blocks=cfg.landmark.blocks, stem=cfg.landmark.stem_features, num_class=5)
    gen = torch.Generator().manual_seed(1)
    torch_mirror.randomize_batchnorm(model, gen)
    torch_mirror.randomize_layernorm(model, gen)
    model.eval()
    src = tmp / "Backbone_VIT_land_8_Epoch_34.pth"
    torch.save(torch_mirror.supervised_checkpoint(model), src)
    out = tmp / "part_fvit"
    assert convert_main(["--kind", "part_fvit", "--src", str(src), "--out", str(out), "--preset", "tiny",
                         "--drop-head", "--color-order", "bgr"]) == 0  # a swap the commands must apply
    return model, str(out), lambda x: model(x)[0]


def _lvface(tmp):
    dim, depth, heads, size, features = 48, 2, 4, 40, 24
    torch.manual_seed(2)
    model = torch_mirror_lvface.VisionTransformer(img_size=size, patch_size=9, embed_dim=dim, depth=depth,
                                                  num_heads=heads, num_features=features)
    torch_mirror_lvface.randomize(model, torch.Generator().manual_seed(3))
    model.eval()
    src = tmp / "LVFace-mini.pt"
    torch.save(model.state_dict(), src)
    cfg = presets.model_config("insightface_t")
    cfg.dim, cfg.depth, cfg.heads, cfg.head_dim, cfg.mlp_dim = dim, depth, heads, dim // heads, 4 * dim
    cfg.image_size, cfg.insightface.embedding_size = size, features
    # the converter's path (convert_file) with this model config in place of a released preset
    state, extras = mapping.select_state_dict({k: v.numpy() for k, v in torch.load(src).items()}, "lvface")
    variables, report = mapping.convert_state_dict(state, "lvface", cfg, extras=extras)
    out = tmp / "lvface"
    save_variables(str(out), variables, mapping.metadata("lvface", cfg, os.path.abspath(src), report=report))
    return model, str(out), model


def _preprocess(images, meta):
    """uint8 [N, H, W, 3] RGB -> the mirror's float NCHW input, per the directory's metadata."""
    x = images[..., ::-1] if meta["color_order"] == "bgr" else images
    x = x.astype(np.float32) / np.float32(255.0)
    x = {"[-1,1]": x * 2 - 1, "[-0.5,0.5]": x - 0.5}[meta["normalization"]]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module", params=KINDS)
def case(request, tmp_path_factory):
    """(variables dir, image folder, sorted image names, images, mirror embeddings without / with flip, mirror
    embedding of an NCHW input, metadata)."""
    tmp = tmp_path_factory.mktemp(request.param)
    model, directory, forward = (_part_fvit if request.param == "part_fvit" else _lvface)(tmp)
    meta = read_metadata(directory)
    size = int(meta["model"]["image_size"])
    folder = tmp / "faces"
    folder.mkdir()
    names = [f"id{i}.png" for i in range(N_IMAGES)]
    images = np.stack([face_like_image(i, 0, size=size, seed=7) for i in range(N_IMAGES)])
    for name, image in zip(names, images):
        Image.fromarray(image).save(folder / name)
    x = _preprocess(images, meta)
    with torch.no_grad():
        plain = forward(x).numpy()
        flipped = plain + forward(torch.flip(x, dims=[3])).numpy()
    return dict(dir=directory, folder=str(folder), names=names, images=images, plain=plain, flipped=flipped,
                forward=forward, meta=meta, tmp=tmp)


def _close(got, want):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL * np.abs(want).max(), rtol=0)


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_embed_matches_the_mirror(case):
    for flip, want in ((True, case["flipped"]), (False, case["plain"])):
        out = str(case["tmp"] / f"emb_{flip}.npy")
        argv = ["--backbone", case["dir"], "--images", case["folder"], "--out", out, "--batch", str(N_IMAGES)]
        assert embed_cli.main(argv + ([] if flip else ["--no-flip"])) == 0
        _close(np.load(out), want)
        info = json.load(open(embed_cli.json_path(out)))
        assert info["sources"] == case["names"] and info["flip"] is flip
        assert (info["normalization"], info["color_order"]) == (case["meta"]["normalization"],
                                                               case["meta"]["color_order"])


def test_compare_is_the_cosine_of_the_mirror_embeddings(case):
    a, b = (os.path.join(case["folder"], n) for n in case["names"][:2])
    want = _cos(case["flipped"][0], case["flipped"][1])
    r = compare_cli.compare(a, b, case["dir"], threshold=want - 0.01, batch=2)
    assert abs(r["similarity"] - want) < 1e-4 and r["verdict"] == "same" and r["threshold_source"] == "given"
    r = compare_cli.compare(a, a, case["dir"], threshold=0.999, batch=2, flip=False)
    assert abs(r["similarity"] - 1.0) < 1e-5 and r["verdict"] == "same"
    if case["meta"]["kind"] == "part_fvit":  # the one command line run as a user runs it (2 CPU devices)
        proc = subprocess.run([sys.executable, "-m", "lafs_jax.compare", a, b, "--backbone", case["dir"],
                               "--threshold", str(want + 0.01), "--batch", "2", "--json"], cwd=ROOT,
                              env=cpu_env(2), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert abs(r["similarity"] - want) < 1e-4 and r["verdict"] == "different"


def test_search_finds_each_image_at_rank_1(case):
    out = str(case["tmp"] / "matches.csv")
    assert search_cli.main(["--gallery", case["folder"], "--probes", case["folder"], "--backbone", case["dir"],
                            "--top-k", "2", "--out", out]) == 0
    rows = list(csv.DictReader(open(out)))
    first = {r["probe"]: r for r in rows if r["rank"] == "1"}
    assert sorted(first) == case["names"]
    for name, row in first.items():
        assert row["gallery"] == name and abs(float(row["score"]) - 1.0) < 1e-4
    second = {r["probe"]: r for r in rows if r["rank"] == "2"}
    emb = case["flipped"]
    for i, name in enumerate(case["names"]):
        j = case["names"].index(second[name]["gallery"])
        assert abs(float(second[name]["score"]) - _cos(emb[i], emb[j])) < 1e-4


def test_onnx_export_matches_the_mirror(case):
    path = str(case["tmp"] / "model.onnx")
    export_cli.main(["--backbone", case["dir"], "--format", "onnx", "--out", path])
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    data = ((case["images"].astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)  # RGB [-1, 1] NCHW
    (got,) = sess.run(None, {"data": data})
    _close(got, case["plain"])
