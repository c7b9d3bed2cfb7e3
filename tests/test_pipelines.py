"""Augmentations (against hand-computed references) and the Grain pipelines: shapes, determinism,
process sharding, mixup, resume from iterator state (also through orbax), worker processes, errors."""
import colorsys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lafs_jax.config import ConfigError
from lafs_jax.input import images as image_lib
from lafs_jax.input import pipelines as P
from lafs_jax.input import sources, synthetic, writers
from lafs_jax.input import transforms as T

SIZE = 32


class IndexSource:
    """Item i is a constant image of value i (so batches reveal which items they hold), label i % 5."""

    def __init__(self, n=20, size=SIZE):
        self.n, self.size = n, size
        self.labels = np.arange(n) % 5
        self.num_classes = 5

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((self.size, self.size, 3), i, np.uint8), "label": int(self.labels[i])}


def small_config(**finetune):
    dc = P.data_config()
    dc.workers = 0
    dc.image_size = SIZE
    dc.dino.global_size, dc.dino.local_size, dc.dino.local_crops = SIZE, 16, 3
    dc.lafs.view_size, dc.lafs.local_views = 24, 3
    for k, v in finetune.items():
        dc.finetune[k] = v
    return dc


def no_augment(dc):
    f = dc.finetune
    f.flip = f.random_resized_crop = f.randaugment = False
    f.color_jitter = f.random_erasing_prob = f.mixup_prob = 0.0
    return dc


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------- transforms ----------------

def test_normalize_matches_formulas():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_allclose(T.normalize(x, "[-1,1]"), x / 255.0 * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(T.normalize(x, "[-0.5,0.5]"), x / 255.0 - 0.5, atol=1e-6)
    assert T.normalize(x, "[-1,1]").dtype == np.float32
    with pytest.raises(ValueError, match="normalization='0-1'"):
        T.normalize(x, "0-1")


@pytest.mark.parametrize("normalization", T.NORMALIZATIONS)
def test_normalize_on_the_device_matches_the_host(normalization):
    x = np.arange(256 * 3, dtype=np.int64).reshape(1, 16, 16, 3).astype(np.uint8)
    device = T.normalize(jnp.asarray(x), normalization)
    assert isinstance(device, jax.Array) and device.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(device), T.normalize(x, normalization), rtol=1e-6, atol=1e-6)


def test_random_resized_crop_box_follows_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = T.random_resized_crop_box(rng, 112, 112, (0.4, 1.0))
        assert 0 <= top and top + h <= 112 and 0 <= left and left + w <= 112
        assert 0.4 * 0.97 <= h * w / 112 ** 2 <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # no crop of 90-100 % area with ratio 3 fits: torchvision's centre fallback (largest crop within ratio)
    assert T.random_resized_crop_box(rng, 100, 100, (0.9, 1.0), ratio=(3, 4)) == (33, 0, 33, 100)


def test_resized_crop_equals_crop_then_resize():
    img = synthetic.face_like_image(1, 2, 64)
    got = np.asarray(T.resized_crop(Image.fromarray(img), (10, 5, 40, 30), 32))
    ref = np.asarray(Image.fromarray(img[10:50, 5:35]).resize((32, 32), Image.BILINEAR))
    assert np.abs(got.astype(int) - ref).mean() < 1.5  # the box= resize also filters across the box edge


def test_color_jitter_brightness_is_a_scaling():
    img = synthetic.face_like_image(0, 0, 32)
    out = np.asarray(T.color_jitter(Image.fromarray(img), np.random.default_rng(5), brightness=0.4))
    f = np.random.default_rng(5).uniform(0.6, 1.4)  # the first draw is the brightness factor
    np.testing.assert_allclose(out, np.clip(img * f, 0, 255), atol=1.0)


def test_adjust_hue_rotates_hue_like_colorsys():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = 255  # pure red, hue 0
    out = np.asarray(T.adjust_hue(Image.fromarray(img), 1 / 3))
    ref = np.array(colorsys.hsv_to_rgb(int(255 / 3) / 255, 1.0, 1.0)) * 255  # hue + 84/255 of a turn
    np.testing.assert_allclose(out[0, 0], ref, atol=3)
    np.testing.assert_array_equal(np.asarray(T.adjust_hue(Image.fromarray(img), 0.0)), img)


def test_grayscale_is_itu_601_luma():
    img = synthetic.face_like_image(3, 1, 16).astype(int)
    luma = (img[..., 0] * 299 + img[..., 1] * 587 + img[..., 2] * 114) / 1000
    out = np.asarray(T.grayscale(Image.fromarray(img.astype(np.uint8))))
    assert np.all(out[..., 0] == out[..., 2])
    np.testing.assert_allclose(out[..., 0], luma, atol=1.0)


def test_random_erasing_sets_one_rectangle_to_zero():
    img = np.full((40, 40, 3), 200, np.uint8)
    rng = np.random.default_rng(1)
    for _ in range(50):
        out = T.random_erasing(img, rng, (0.02, 0.1))
        zero = np.all(out == 0, axis=-1)
        rows, cols = np.nonzero(zero.any(1))[0], np.nonzero(zero.any(0))[0]
        h, w = len(rows), len(cols)
        assert zero.sum() == h * w and np.all(out[~zero] == 200)  # exactly one full rectangle
        assert 0.02 * 0.8 <= h * w / 1600 <= 0.1 * 1.2 and 0.3 * 0.7 <= h / w <= 3.3 * 1.4
    assert np.all(img == 200)  # input untouched


def test_randaugment_ops_against_references():
    img = (synthetic.face_like_image(2, 0, 32) // 2 + 50).astype(np.uint8)  # values in [50, 177]
    pil = Image.fromarray(img)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(np.asarray(T.apply_randaugment_op("Invert", pil, 5, rng)), 255 - img)
    ac = np.asarray(T.apply_randaugment_op("AutoContrast", pil, 5, rng))
    assert ac.min() == 0 and ac.max() == 255
    # posterize 'increasing': 4 - int(level / 10 * 4) bits kept
    np.testing.assert_array_equal(np.asarray(T.apply_randaugment_op("PosterizeIncreasing", pil, 1, rng)), img & 0xF0)
    np.testing.assert_array_equal(np.asarray(T.apply_randaugment_op("PosterizeIncreasing", pil, 5, rng)), img & 0xC0)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):  # level 0: identity
        np.testing.assert_array_equal(np.asarray(T.apply_randaugment_op(name, pil, 0.0, rng)), img)
    out = np.asarray(T.apply_randaugment_op("TranslateXRel", pil, 10, rng))  # 0.45 * 32 = 14.4 px, filled grey
    shifted_cols = np.all(out == 128, axis=(0, 2))
    assert shifted_cols.sum() in (14, 15) and (shifted_cols[:14].all() or shifted_cols[-14:].all())
    enhanced = np.asarray(T.apply_randaugment_op("BrightnessIncreasing", pil, 10, np.random.default_rng(3)))
    factor = 1.0 + (-0.9 if np.random.default_rng(3).random() > 0.5 else 0.9)
    np.testing.assert_allclose(enhanced, np.clip(img * factor, 0, 255), atol=1.0)
    with pytest.raises(ValueError, match="Solarize"):
        T.RandAugment(1, ops=("Solarize",))


def test_randaugment_probability_and_determinism():
    img = Image.fromarray(synthetic.face_like_image(0, 0, 32))
    ident = T.RandAugment(9, prob=0.0)
    np.testing.assert_array_equal(np.asarray(ident(img, np.random.default_rng(0))), np.asarray(img))
    ra = T.RandAugment(9, prob=1.0)
    a = np.asarray(ra(img, np.random.default_rng(7)))
    np.testing.assert_array_equal(a, np.asarray(ra(img, np.random.default_rng(7))))
    changed = sum(not np.array_equal(np.asarray(ra(img, np.random.default_rng(s))), np.asarray(img)) for s in range(20))
    assert changed >= 18


# ---------------- fine-tuning pipeline ----------------

def test_finetune_without_augmentation_is_normalised_source():
    src = IndexSource(12)
    dc = no_augment(small_config())
    batches = take(P.finetune_batches(src, dc, batch_size=4, seed=0, num_epochs=1, process_index=0, process_count=1), 3)
    seen = []
    for b in batches:
        assert b["image"].dtype == np.float32 and b["image"].shape == (4, SIZE, SIZE, 3)
        assert b["label"].dtype == np.int32 and b["label2"].dtype == np.int32 and b["lam"].dtype == np.float32
        idx = np.round((b["image"][:, 0, 0, 0] + 1) * 127.5).astype(int)
        np.testing.assert_allclose(b["image"], np.broadcast_to((idx / 255 * 2 - 1)[:, None, None, None], b["image"].shape),
                                   atol=1e-6)
        np.testing.assert_array_equal(b["label"], idx % 5)
        np.testing.assert_array_equal(b["label2"], b["label"])
        np.testing.assert_array_equal(b["lam"], 1.0)
        seen += list(idx)
    assert sorted(seen) == list(range(12)) and seen != list(range(12))  # one shuffled epoch


def test_finetune_augmented_shapes_and_determinism(tmp_path):
    prefix = str(tmp_path / "train")
    synthetic.write_synthetic_rec(prefix, 4, 3, size=40)
    src = sources.FaceRecordSource(prefix)
    dc = small_config(mixup_prob=0.5, randaugment_magnitude=5.0)

    def run(seed):
        return take(P.finetune_batches(src, dc, batch_size=4, seed=seed, process_index=0, process_count=1), 4)

    a, b = run(1), run(1)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["image"], run(2)[0]["image"])
    for batch in a:
        assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_mixup_mixes_batch_with_its_reverse():
    src = IndexSource(16)
    dc = small_config(mixup_prob=1.0, mixup_alpha=0.2)
    plain = small_config(mixup_prob=0.0, mixup_alpha=0.2)  # same per-record draws, no mixing
    kw = dict(batch_size=4, seed=3, process_index=0, process_count=1)
    mixed, unmixed = take(P.finetune_batches(src, dc, **kw), 3), take(P.finetune_batches(src, plain, **kw), 3)
    for m, u in zip(mixed, unmixed):
        lam = m["lam"][0]
        assert np.all(m["lam"] == lam) and 0.0 <= lam <= 1.0
        np.testing.assert_allclose(m["image"], lam * u["image"] + (1 - lam) * u["image"][::-1], atol=1e-6)
        np.testing.assert_array_equal(m["label"], u["label"])
        np.testing.assert_array_equal(m["label2"], u["label"][::-1])
    lams = [b["lam"][0] for b in take(P.finetune_batches(src, dc, **kw), 40)]
    assert 0.3 < np.mean(np.minimum(lams, 1 - np.asarray(lams)) < 0.1) < 0.95  # Beta(0.2, 0.2) is U-shaped


def test_processes_get_disjoint_shares_of_the_stream():
    src = IndexSource(16)
    dc = no_augment(small_config())
    shares = []
    for p in range(2):
        it = P.finetune_batches(src, dc, batch_size=4, seed=0, num_epochs=1, process_index=p, process_count=2)
        shares.append([int(v) for b in take(it, 2) for v in np.round((b["image"][:, 0, 0, 0] + 1) * 127.5)])
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(16))


def test_state_restore_gives_the_same_next_batches():
    src = IndexSource(20)
    dc = small_config(mixup_prob=0.5)
    kw = dict(batch_size=4, seed=0, process_index=0, process_count=1)
    it = P.finetune_batches(src, dc, **kw)
    take(it, 3)  # crosses an epoch boundary at 5 batches later; 3 + 4 = 7
    state = it.get_state()
    expected = take(it, 4)
    fresh = P.finetune_batches(src, dc, **kw)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 4), expected)


def test_state_restore_through_orbax(tmp_path):
    import orbax.checkpoint as ocp

    src = IndexSource(20)
    dc = small_config()
    kw = dict(batch_size=2, seed=4, process_index=0, process_count=1)
    it = P.dino_batches(src, dc, **kw)
    take(it, 2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 2)
    fresh = P.dino_batches(src, dc, **kw)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_batches_equal(take(fresh, 2), expected)


def test_worker_processes_are_deterministic_and_resumable(tmp_path):
    prefix = str(tmp_path / "train")
    synthetic.write_synthetic_rec(prefix, 3, 4, size=SIZE, fmt="PNG")
    src = sources.FaceRecordSource(prefix)
    dc = no_augment(small_config())
    dc.workers = 2
    kw = dict(batch_size=2, seed=0, process_index=0, process_count=1)
    it = P.finetune_batches(src, dc, **kw)
    first = take(it, 2)
    state = it.get_state()
    expected = take(it, 3)
    it.close()
    fresh = P.finetune_batches(src, dc, **kw)
    fresh.set_state(state)
    got = take(fresh, 3)
    fresh.close()
    assert_batches_equal(got, expected)
    for b in first + expected:  # the worker batches hold real, normalised source images
        for img, lab in zip(b["image"], b["label"]):
            ref = [T.normalize(src[i]["image"], "[-1,1]") for i in np.nonzero(src.labels == lab)[0]]
            assert any(np.array_equal(img, r) for r in ref)


def test_skipped_undecodable_records_leave_full_batches(tmp_path):
    prefix = str(tmp_path / "broken")
    good = [image_lib.encode_image(np.full((SIZE, SIZE, 3), v, np.uint8), "PNG") for v in range(6)]
    writers.write_face_rec(prefix, [6], good[:2] + [good[2][:40]] + good[3:])  # record key 3 is broken
    dc = no_augment(small_config())
    strict = sources.FaceRecordSource(prefix)
    it = P.finetune_batches(strict, dc, batch_size=5, seed=0, num_epochs=1, process_index=0, process_count=1)
    with pytest.raises(image_lib.UndecodableImageError, match=r"broken\.rec: record key 3"):
        next(it)
    lenient = sources.FaceRecordSource(prefix, skip_undecodable=True)
    b = next(P.finetune_batches(lenient, dc, batch_size=5, seed=0, num_epochs=1, process_index=0, process_count=1))
    values = sorted(np.round((b["image"][:, 0, 0, 0] + 1) * 127.5).astype(int))
    assert values == [0, 1, 3, 4, 5]


def test_all_records_undecodable_with_skipping_on_raises_fast_naming_the_file(tmp_path):
    """skip_undecodable=True over a .rec whose every image is cut short: an error naming the file and the
    count after about max_skip_fraction x 1000 reads, not an endless skip."""
    prefix = str(tmp_path / "all_bad")
    broken = image_lib.encode_image(np.full((SIZE, SIZE, 3), 9, np.uint8), "JPEG")[:30]
    writers.write_face_rec(prefix, [40], [broken] * 40)
    dc = no_augment(small_config())
    dc.path, dc.skip_undecodable = prefix, True
    src = P.make_source(dc)
    with pytest.raises(sources.DataSourceError, match=r"all_bad\.rec: record key \d+: (1[1-9]|2\d) of the last "
                                                      r"\d+ records read by process \d+ are undecodable, more than "
                                                      r"data\.max_skip_fraction=0\.01 of a 1000-record window"):
        next(P.finetune_batches(src, dc, batch_size=4, seed=0, process_index=0, process_count=1))
    budget = sources.SkipBudget(0.01)  # the window slides: 10 skips per 1000 reads are fine, an 11th is not
    assert all(budget.record(i % 100 == 0) is None for i in range(5000))
    budget = sources.SkipBudget(0.01)
    assert [budget.record(True) for _ in range(11)][-2:] == [None, (11, 11)]
    dc.max_skip_fraction = 1.5
    with pytest.raises(ConfigError, match=r"config\.data\.max_skip_fraction=1\.5"):
        P.validate_data_config(dc)


# ---------------- self-supervised pipelines ----------------

def test_dino_batches_shapes_and_determinism():
    src = IndexSource(8)
    dc = small_config()
    kw = dict(batch_size=2, seed=0, process_index=0, process_count=1)
    a, b = take(P.dino_batches(src, dc, **kw), 2), take(P.dino_batches(src, dc, **kw), 2)
    assert_batches_equal(a, b)
    batch = a[0]
    assert batch["global"].shape == (2, 2, SIZE, SIZE, 3) and batch["global"].dtype == np.float32
    assert batch["local"].shape == (2, 3, 16, 16, 3) and batch["label"].dtype == np.int32
    assert batch["global"].min() >= -1 and batch["global"].max() <= 1


@pytest.mark.parametrize("method", ["dino", "lafs"])
def test_identity_positives_take_the_last_views_from_another_image_of_the_same_identity(method):
    """data.ssl_positives='identity' (diagnostic): of each sample's G global and L local views, the last
    floor(n/2) come from one other image of its identity, the rest from its own image; the default
    'views' makes every view from the sample's own image. Constant images: a view's value names its image."""
    src = IndexSource(20)  # image i has value i, identity i % 5: four images per identity
    dc = small_config()
    c = dc.ssl_color
    c.jitter_prob, c.grayscale_prob, c.global_blur_probs, c.global_solarize_probs, c.local_blur_prob = (
        0.0, 0.0, (0.0,), (0.0,), 0.0)
    build = P.dino_batches if method == "dino" else P.lafs_batches
    keys = ("global", "local") if method == "dino" else ("global_clean", "global_aug", "local_clean", "local_aug")
    kw = dict(batch_size=4, seed=0, process_index=0, process_count=1)

    def image_of_views(batch):  # {key: int [B, V]}: the source image each view was cut from
        return {k: np.rint((batch[k] + 1) * 127.5).reshape(*batch[k].shape[:2], -1).mean(-1).astype(int) for k in keys}

    for batch in take(build(src, dc, **kw), 3):
        views = image_of_views(batch)
        own = views[keys[0]][:, 0]
        for k in keys:
            np.testing.assert_array_equal(views[k], np.repeat(own[:, None], views[k].shape[1], 1), err_msg=k)
    dc.ssl_positives = "identity"
    partners = set()
    for batch in take(build(src, dc, **kw), 5):
        views = image_of_views(batch)
        own = views[keys[0]][:, 0]
        partner = views[keys[0]][:, 1]  # G = 2: view 2 is the partner's
        assert np.all(partner != own) and np.all(partner % 5 == own % 5) and np.all(own % 5 == batch["label"])
        partners.update(zip(own.tolist(), partner.tolist()))
        for k in keys:
            n = views[k].shape[1]  # 2 global, 3 local views: the last 1 is the partner's
            want = np.concatenate([np.repeat(own[:, None], n - n // 2, 1), np.repeat(partner[:, None], n // 2, 1)], 1)
            np.testing.assert_array_equal(views[k], want, err_msg=k)
    assert len({p for _, p in partners}) > 5  # drawn among the identity's images, not one fixed partner
    assert_batches_equal(take(build(src, dc, **kw), 2), take(build(src, dc, **kw), 2))
    dc.augment_on = "device"
    with pytest.raises(ConfigError, match=r"ssl_positives='identity' needs config.data.augment_on='host'"):
        build(src, dc, **kw)
    dc.augment_on, dc.ssl_positives = "host", "labels"
    with pytest.raises(ConfigError, match=r"ssl_positives"):
        build(src, dc, **kw)


def test_lafs_views_share_geometry_and_differ_in_colour():
    img = synthetic.face_like_image(0, 0, 48)

    class One:
        labels, num_classes = np.zeros(4, int), 1

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": img, "label": 0}

    dc = small_config()
    kw = dict(batch_size=2, seed=0, process_index=0, process_count=1)
    b = next(P.lafs_batches(One(), dc, **kw))
    assert b["global_clean"].shape == b["global_aug"].shape == (2, 2, 24, 24, 3)
    assert b["local_clean"].shape == b["local_aug"].shape == (2, 3, 24, 24, 3)
    assert not np.array_equal(b["global_clean"], b["global_aug"])  # blur p=1 on global view 1
    # only a brightness jitter: every augmented view is its clean view times one factor
    c = dc.ssl_color
    c.jitter, c.jitter_prob, c.grayscale_prob = (0.4, 0.0, 0.0, 0.0), 1.0, 0.0
    c.global_blur_probs, c.global_solarize_probs, c.local_blur_prob = (0.0,), (0.0,), 0.0
    b = next(P.lafs_batches(One(), dc, **kw))
    for key in ("global", "local"):
        clean = (b[f"{key}_clean"] + 1) * 127.5
        aug = (b[f"{key}_aug"] + 1) * 127.5
        for v_clean, v_aug in zip(clean.reshape(-1, 24 * 24 * 3), aug.reshape(-1, 24 * 24 * 3)):
            unclipped = (v_clean > 20) & (v_aug < 250)
            f = np.median(v_aug[unclipped] / v_clean[unclipped])
            assert 0.55 < f < 1.45
            np.testing.assert_allclose(v_aug[unclipped], v_clean[unclipped] * f, atol=1.5)  # uint8 rounding
    views = b["global_clean"].reshape(-1, 24, 24, 3)  # different views are different crops
    assert not np.array_equal(views[0], views[1])


# ---------------- evaluation pipeline ----------------

def test_eval_batches_order_padding_and_flip():
    src = IndexSource(10, size=40)  # resized to image_size 32
    dc = small_config()
    dc.eval.flip = True
    batches = list(P.eval_batches(src, dc, batch_size=4, process_index=0, process_count=1))
    assert len(batches) == 3 == P.num_eval_batches(10, 4)
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(index, list(range(10)) + [-1, -1])
    np.testing.assert_array_equal(valid, [True] * 10 + [False] * 2)
    last = batches[-1]
    assert last["image"].shape == (4, SIZE, SIZE, 3) and last["valid"].dtype == bool
    np.testing.assert_allclose(last["image"][:2, 0, 0, 0], np.array([8, 9]) / 255 * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(last["image_flip"], last["image"][:, :, ::-1])
    np.testing.assert_array_equal(last["label"][:2], [3, 4])


def test_eval_batches_split_over_processes_restore_order():
    src = IndexSource(11)
    dc = small_config()
    per_process = [list(P.eval_batches(src, dc, batch_size=2, process_index=p, process_count=3)) for p in range(3)]
    assert {len(b) for b in per_process} == {2}  # ceil(11 / 6) batches everywhere
    global_index = np.concatenate([np.concatenate([per_process[p][g]["index"] for p in range(3)]) for g in range(2)])
    np.testing.assert_array_equal(global_index, list(range(11)) + [-1])


# ---------------- config and sources ----------------

@pytest.mark.parametrize("key,value", [("format", "lmdb"), ("color_order", "brg"), ("normalization", "[0,1]"),
                                       ("subset.k_draw", "half"), ("subset.partition", 0.0), ("finetune.mixup_prob", 1.5),
                                       ("dino.local_scale", (0.5, 0.1)), ("workers", -1)])
def test_bad_config_values_name_the_key(key, value):
    dc = P.data_config()
    section, _, leaf = key.rpartition(".")
    (dc[section] if section else dc)[leaf] = value
    with pytest.raises(ConfigError, match=rf"config\.data\.{key.replace('.', '[.]')}="):
        P.validate_data_config(dc)


def test_make_source_for_each_format(tmp_path):
    prefix = str(tmp_path / "train")
    synthetic.write_synthetic_rec(prefix, 3, 2, size=16, fmt="PNG")
    rec = sources.FaceRecordSource(prefix)
    writers.rec_to_arrayrecord(rec, str(tmp_path / "part-0.array_record"))
    for c in range(3):
        (tmp_path / "folder" / f"id{c}").mkdir(parents=True)
        (tmp_path / "folder" / f"id{c}" / "a.png").write_bytes(image_lib.encode_image(rec[2 * c]["image"], "PNG"))
    dc = P.data_config()
    for fmt, path, n in [("rec", prefix, 6), ("arrayrecord", str(tmp_path / "part-*.array_record"), 6),
                         ("folder", str(tmp_path / "folder"), 3)]:
        dc.format, dc.path = fmt, path
        src = P.make_source(dc)
        assert len(src) == n and src.num_classes == 3
    dc.format, dc.path = "rec", prefix
    dc.subset.k = 1
    sub = P.make_source(dc)
    assert len(sub) == 3 and sub.num_classes == 3
    dc.path = ""
    with pytest.raises(ConfigError, match="config.data.path is empty"):
        P.make_source(dc)


# ---------------- augment_on = 'device' ----------------

@pytest.mark.parametrize("build", [P.dino_batches, P.lafs_batches, P.finetune_batches])
def test_device_mode_yields_uint8_images_and_global_stream_indices(build):
    """Decoded uint8 images (no views), the records' positions in the global stream (process p of 2
    gets positions p, p+2, ...), the image bytes of one view source per sample."""
    dc = small_config()
    dc.augment_on = "device"
    dc.finetune.flip = dc.finetune.randaugment = False
    src = IndexSource(12)
    whole = take(build(src, dc, batch_size=4, seed=3, process_index=0, process_count=1), 3)
    for b in whole:
        assert set(b) == {"image", "index", "label"}
        assert b["image"].dtype == np.uint8 and b["image"].shape == (4, SIZE, SIZE, 3)
        assert b["index"].dtype == np.int32
    index = np.concatenate([b["index"] for b in whole])
    np.testing.assert_array_equal(index, np.arange(12))
    # the image of stream position i is the source item the shuffle put there: a permutation per epoch
    items = np.concatenate([b["image"][:, 0, 0, 0] for b in whole])
    assert sorted(items.tolist()) == list(range(12))
    shares = [take(build(src, dc, batch_size=2, seed=3, process_index=p, process_count=2), 3) for p in (0, 1)]
    for p, share in enumerate(shares):
        np.testing.assert_array_equal(np.concatenate([b["index"] for b in share]), np.arange(p, 12, 2))
        np.testing.assert_array_equal(np.concatenate([b["image"][:, 0, 0, 0] for b in share]), items[p::2])


def test_device_mode_config_is_validated():
    dc = small_config()
    dc.augment_on = "gpu"
    with pytest.raises(ConfigError, match="config.data.augment_on"):
        P.validate_data_config(dc)
    dc.augment_on, dc.prefetch = "device", -1
    with pytest.raises(ConfigError, match="config.data.prefetch"):
        P.validate_data_config(dc)


def test_device_prefetch_checkpoints_the_consumed_batches():
    """device_prefetch: global arrays on the mesh; its state after k batches restores the batches
    k+1, ... even though more were already fetched in the background."""
    import jax

    from lafs_jax import sharding as mesh_lib
    from lafs_jax.train import prefetch

    dc = small_config()
    dc.augment_on = "device"
    mesh = mesh_lib.make_mesh()
    src = IndexSource(40)
    it = prefetch.device_prefetch(P.lafs_batches(src, dc, batch_size=8, seed=1, process_index=0, process_count=1),
                                  mesh, buffer_size=3)
    for _ in range(2):
        next(it)
    state = it.get_state()
    rest = [jax.device_get(next(it)) for _ in range(3)]
    again = prefetch.device_prefetch(P.lafs_batches(src, dc, batch_size=8, seed=1, process_index=0, process_count=1),
                                     mesh, buffer_size=3)
    again.set_state(state)
    assert_batches_equal(rest, [jax.device_get(next(again)) for _ in range(3)])
    batch = next(again)
    assert isinstance(batch["image"], jax.Array) and batch["image"].sharding.num_devices == jax.device_count()
    it.close()
    again.close()


def test_a_recipe_carries_only_its_views_sections(tmp_path):
    """data_config('finetune') has no DINO / LAFS / SSL colour sections, validates, and the SSL builders
    refuse it naming the missing section and how to add it; no sections = all of them."""
    dc = P.data_config("finetune")
    assert "finetune" in dc and not {"dino", "lafs", "ssl_color"} & set(dc.keys())
    P.validate_data_config(dc)
    assert set(P.VIEW_SECTIONS) <= set(P.data_config().keys())
    prefix = str(tmp_path / "train")
    synthetic.write_synthetic_rec(prefix, num_classes=2, per_class=2, size=16)
    dc.path = prefix
    source = P.make_source(dc)
    for build, name in ((P.dino_batches, "dino"), (P.lafs_batches, "lafs")):
        with pytest.raises(ConfigError, match=rf"config\.data\.{name} is missing: .*data_config\('{name}', 'ssl_color'\)"):
            build(source, dc, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match=r"config\.data\.finetune is missing"):
        P.finetune_batches(source, P.data_config("dino", "ssl_color"), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="unknown sections"):
        P.data_config("fra")
