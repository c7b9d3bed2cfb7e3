"""`python -m lafs_jax.convert --kind farl` on a CLIP-layout checkpoint of the PyTorch mirror
(tests/torch_mirror_clip.py: small widths, the real 49,408-token vocabulary), then `python -m
lafs_jax.embed` for images and texts: features equal to 1e-4 of their scale, zero-shot scores (both at
once) the mirror's cosines; bad inputs name what is wrong; bicubic position resampling equals torch's."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lafs_jax import embed as embed_cmd
from lafs_jax.convert import __main__ as convert_cmd
from lafs_jax.eval import text_embed
from lafs_jax.input import tokenizer as tok_lib
from lafs_jax.input.transforms import CLIP_MEAN, CLIP_STD
from lafs_jax.models import clip
from torch_mirror_clip import CLIP

CAPTIONS = ["a photo of a face with eyeglasses", "A smiling woman, &amp; her beard?!",
            " ".join(["a very long caption"] * 30)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    model = CLIP(embed_dim=48, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                 transformer_layers=2).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms and biases away from their 1 / 0 init
            p.add_(0.05 * torch.randn_like(p))
    tmp = tmp_path_factory.mktemp("farl")
    src, out = tmp / "farl.pth", tmp / "farl_dir"
    torch.save({"state_dict": model.state_dict()}, src)
    assert convert_cmd.main(["--kind", "farl", "--src", str(src), "--out", str(out)]) == 0
    return model, src, out, tmp


def test_image_and_text_features_match_the_torch_mirror(converted):
    model, _, out, tmp = converted
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
    np.save(tmp / "images.npy", images)
    (tmp / "captions.txt").write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    assert embed_cmd.main(["--backbone", str(out), "--images", str(tmp / "images.npy"), "--no-flip",
                           "--out", str(tmp / "img.npy")]) == 0
    assert embed_cmd.main(["--backbone", str(out), "--texts", str(tmp / "captions.txt"),
                           "--out", str(tmp / "txt.npy")]) == 0
    x = (images / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    ids, truncated = tok_lib.default_tokenizer().tokenize(CAPTIONS)
    assert truncated.tolist() == [False, False, True]
    with torch.no_grad():
        want_img = model.encode_image(torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float32)).numpy()
        want_txt = model.encode_text(torch.tensor(ids, dtype=torch.long)).numpy()
    for got, want in ((np.load(tmp / "img.npy"), want_img), (np.load(tmp / "txt.npy"), want_txt)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    # zero-shot scores: cosines of every image with every prompt, CLIP's softmax over prompts
    assert embed_cmd.main(["--backbone", str(out), "--images", str(tmp / "images.npy"), "--no-flip",
                           "--texts", str(tmp / "captions.txt"), "--out", str(tmp / "scores.npy")]) == 0
    with torch.no_grad():
        i, t = F.normalize(torch.from_numpy(want_img), dim=-1), F.normalize(torch.from_numpy(want_txt), dim=-1)
        cos = (i @ t.T).numpy()
        probs = (model.logit_scale.exp() * i @ t.T).softmax(-1).numpy()
    scores = np.load(tmp / "scores.npy")
    assert scores.shape == (4, len(CAPTIONS))
    np.testing.assert_allclose(scores, cos, atol=1e-4)
    scale = json.loads((tmp / "scores.json").read_text())["scale"]
    np.testing.assert_allclose(text_embed.zero_shot_probabilities(scores, scale), probs, atol=1e-3)


def test_bad_inputs_name_the_key_or_line(converted, capsys):
    model, src, out, tmp = converted
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["visual.ln_post.weight"] = torch.ones(64)  # another width
    torch.save({"state_dict": state}, tmp / "wide.pth")
    with pytest.raises(SystemExit, match="ln_post"):
        convert_cmd.main(["--kind", "farl", "--src", str(tmp / "wide.pth"), "--out", str(tmp / "x")])
    state = dict(model.state_dict(), **{"visual.extra_head.weight": torch.ones(3)})
    torch.save({"state_dict": state}, tmp / "extra.pth")
    with pytest.raises(SystemExit, match="visual.extra_head.weight"):
        convert_cmd.main(["--kind", "farl", "--src", str(tmp / "extra.pth"), "--out", str(tmp / "x")])
    (tmp / "bad.txt").write_bytes(b"a face\n\nanother\n")
    with pytest.raises(SystemExit):
        embed_cmd.main(["--backbone", str(out), "--texts", str(tmp / "bad.txt"), "--out", str(tmp / "b.npy")])
    assert "line 2 is empty" in capsys.readouterr().err
    (tmp / "bad.txt").write_bytes(b"a face\n\xff\xfe\n")
    with pytest.raises(SystemExit):
        embed_cmd.main(["--backbone", str(out), "--texts", str(tmp / "bad.txt"), "--out", str(tmp / "b.npy")])
    assert "line 2 is not UTF-8" in capsys.readouterr().err


def test_position_resampling_is_torch_bicubic():
    pos = np.random.default_rng(1).normal(size=(1 + 14 * 14, 8)).astype(np.float32)
    got = clip.resample_positions(pos, 28)
    grid = torch.tensor(pos[1:]).reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(28, 28), mode="bicubic", align_corners=False)
    np.testing.assert_array_equal(got[0], pos[0])
    np.testing.assert_allclose(got[1:], want.permute(0, 2, 3, 1).reshape(-1, 8).numpy(), atol=1e-5)
