"""FaRL pretraining end to end (configs/farl.py:tiny on synthetic captioned images, 8 CPU devices, views
made on the device): the pretrain task runs train/image_text's step with the loop's evaluators, a
SIGTERM-stopped run resumes to the straight run's state bit for bit, the exported directory embeds images
and texts, the data format's bad inputs name the shard / key."""
import contextlib
import io
import os
import tarfile

import jax
import numpy as np
import pytest
from sigterm_at import SigtermAt

from configs import farl as farl_recipe
from lafs_jax import embed as embed_cmd
from lafs_jax import variables as variables_lib
from lafs_jax.config import ConfigError
from lafs_jax.input import captions, images as image_lib, verification_bin
from lafs_jax.input.sources import DataSourceError
from lafs_jax.train import loop_utils, pretrain

STEPS = 6


def _faces(n, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 8, 8, 3)).astype(np.float32)  # 4 "people", smooth 32 px images
    people = rng.integers(0, 4, n)
    imgs = np.repeat(np.repeat(base[people], 4, 1), 4, 2) + rng.normal(0, 8, (n, 32, 32, 3))
    return np.clip(imgs, 0, 255).astype(np.uint8), people


@pytest.fixture(scope="module")
def farl_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("farl_data")
    imgs, people = _faces(32, 0)
    pairs = [(image_lib.encode_image(im, "PNG"), f"a photo of the face of person {p}", int(p), str(i))
             for i, (im, p) in enumerate(zip(imgs, people))]
    captions.write_pairs(pairs, str(tmp / "pairs.arrayrecord"))
    ev, ev_people = _faces(20, 1)
    verification_bin.save_bin(str(tmp / "val.bin"), ev, ev_people[0::2] == ev_people[1::2])
    config = farl_recipe.get_config("tiny")
    config.unlock()
    config.data.path = str(tmp / "pairs.arrayrecord")
    config.batch_size, config.total_steps = 8, STEPS
    config.farl.context_length = 12
    # views made on the device (random resized crop + flip, keyed by the run key and the stream index), so
    # the SIGTERM / resume test covers that path; test_farl_device_views checks its crop against the host's
    config.data.augment_on = "device"
    config.farl.update(crop_scale=(0.5, 1.0), flip=True)
    config.model.clip.text_width = 8  # small checkpoints: the 49,408-row token table is most of the text tower
    config.farl.mim.update(vocab_size=16, kmeans_images=32, kmeans_patches=128, kmeans_iterations=3)
    config.evals.val.update(bins=(str(tmp / "val.bin"),), nfolds=2)
    config.checkpoint.every_steps, config.log_every_steps = 3, 3
    config.lock()
    work = str(tmp / "straight")
    result = pretrain.run(config, work)
    return config, work, result, tmp


def test_run_trains_evaluates_and_exports(farl_setup):
    config, work, result, _ = farl_setup
    assert result["step"] == STEPS and np.isfinite(result["loss"])
    rows = loop_utils.read_metrics(work)
    steps = [r for r in rows if "itc" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for key in ("itc", "mim", "mim_accuracy", "itc_i2t_top1", "itc_t2i_top1", "logit_scale", "truncated_captions"):
        assert all(np.isfinite(r[key]) for r in steps), key
    assert {r["step"] for r in rows if "val/val/accuracy" in r} == {0, STEPS}
    meta = variables_lib.read_metadata(os.path.join(work, "backbone"))
    assert meta["kind"] == "clip_vit" and meta["normalization"] == "clip" and meta["method"] == "farl"
    assert os.path.exists(os.path.join(work, "mim_codebook.npy"))


def test_sigterm_then_resume_equals_the_straight_run(farl_setup, tmp_path, monkeypatch):
    config, work, _, _ = farl_setup
    config = config.copy_and_resolve_references()
    config.unlock()
    config.evals = {}  # evaluation reads the state, never changes it
    config.lock()
    real_guard = loop_utils.preemption_guard

    @contextlib.contextmanager
    def guard_with_kill():
        with real_guard() as g:
            yield SigtermAt(g, at=3)

    resumed = str(tmp_path / "resumed")
    monkeypatch.setattr(loop_utils, "preemption_guard", guard_with_kill)
    assert pretrain.run(config, resumed)["step"] == 3
    monkeypatch.setattr(loop_utils, "preemption_guard", real_guard)
    assert pretrain.run(config, resumed)["step"] == STEPS
    a, _ = variables_lib.load_variables(os.path.join(work, "backbone"))
    b, _ = variables_lib.load_variables(os.path.join(resumed, "backbone"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    loss = {r["step"]: r["loss"] for r in loop_utils.read_metrics(work) if "loss" in r}
    loss_b = {r["step"]: r["loss"] for r in loop_utils.read_metrics(resumed) if "loss" in r}
    assert all(loss[s] == loss_b[s] for s in range(1, STEPS + 1))


def test_trained_directory_embeds_images_and_texts(farl_setup):
    config, work, _, tmp = farl_setup
    np.save(tmp / "few.npy", _faces(3, 2)[0])
    (tmp / "few.txt").write_text("a photo of the face of person 1\nsomeone else\n", encoding="utf-8")
    backbone = os.path.join(work, "backbone")
    assert embed_cmd.main(["--backbone", backbone, "--images", str(tmp / "few.npy"), "--out", str(tmp / "i.npy")]) == 0
    assert embed_cmd.main(["--backbone", backbone, "--texts", str(tmp / "few.txt"), "--out", str(tmp / "t.npy")]) == 0
    e = config.model.clip.embed_dim
    assert np.load(tmp / "i.npy").shape == (3, e) and np.load(tmp / "t.npy").shape == (2, e)


def test_bad_shards_and_config_name_what_is_wrong(farl_setup, tmp_path):
    config, *_ = farl_setup

    def tar(name, files):
        with tarfile.open(tmp_path / name, "w") as t:
            for member, data in files.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return str(tmp_path / name)

    png = image_lib.encode_image(np.zeros((4, 4, 3), np.uint8), "PNG")
    good = tar("good.tar", {"000.jpg": png, "000.txt": b"a face", "000.json": b"{}"})
    assert [k for _, k, _, _ in captions.read_webdataset([good])] == ["000"]
    with pytest.raises(DataSourceError, match=r"half.tar.*'001'.*caption"):
        list(captions.read_webdataset([tar("half.tar", {"000.jpg": png, "000.txt": b"a", "001.jpg": png})]))
    with pytest.raises(DataSourceError, match=r"empty.tar.*000.txt is an empty caption"):
        list(captions.read_webdataset([tar("empty.tar", {"000.jpg": png, "000.txt": b"  "})]))
    with pytest.raises(DataSourceError, match=r"utf.tar.*000.txt is not UTF-8"):
        list(captions.read_webdataset([tar("utf.tar", {"000.jpg": png, "000.txt": b"\xff\xfe"})]))
    bad = config.copy_and_resolve_references()
    bad.unlock()
    bad.farl.mim.num_masked = 99
    with pytest.raises(ConfigError, match="farl.mim.num_masked"):
        pretrain.validate(bad)
