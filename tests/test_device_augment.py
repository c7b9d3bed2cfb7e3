"""Device-side augmentation (lafs_jax.input.device_augment) against the host path (Pillow, numpy).

Per op, for fixed parameters, the max / mean absolute difference in grey levels between the jitted
device op and Pillow, on 4 generated faces + 1 uniform-noise image (112 px), measured 2026-12-03 on
the 8-CPU-device test setup: resized crop (bicubic and bilinear, 112 and 48 px) max 1 (Pillow's
coefficients are reproduced exactly, the last bit of the float accumulation is not), every other op
(flip, brightness, contrast, saturation, hue, grayscale, Gaussian blur, solarisation) max 0.
Random parameters: each draw function against the host's over 10k draws (means and variances within
5 standard errors).
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from cpu_env import USERS_OPTIMIZATION
from lafs_jax import sharding as mesh_lib
from lafs_jax.input import device_augment as D
from lafs_jax.input import pipelines as P
from lafs_jax.input import synthetic
from lafs_jax.input import transforms as T

N_DRAWS = 10_000


@pytest.fixture(scope="module")
def images():
    faces = [synthetic.face_like_image(c, i) for c, i in ((0, 0), (1, 3), (2, 5), (3, 1))]
    noise = np.random.default_rng(0).integers(0, 256, (112, 112, 3)).astype(np.uint8)
    return np.stack(faces + [noise])


def _diff(device, host) -> tuple[float, float]:
    d = np.abs(np.asarray(device, np.float32) - np.stack(host).astype(np.float32))
    return float(d.max()), float(d.mean())


BOXES = [(10, 5, 80, 90), (0, 0, 112, 112), (30, 40, 20, 25), (3, 7, 100, 60), (50, 50, 40, 40)]


@pytest.mark.parametrize("method,size", [("bicubic", 112), ("bicubic", 48), ("bilinear", 112), ("bilinear", 48)])
def test_resized_crop_matches_pillow_within_1_level(images, method, size):
    fn = jax.jit(lambda x, b: D.resized_crop(x, b, size, method))
    dev = fn(jnp.asarray(images, jnp.float32), jnp.asarray(BOXES)[:, None])[:, 0]
    resample = T.BICUBIC if method == "bicubic" else T.BILINEAR
    host = [np.asarray(T.resized_crop(Image.fromarray(im), box, size, resample)) for im, box in zip(images, BOXES)]
    worst, mean = _diff(dev, host)
    assert worst <= 1 and mean < 0.05, (method, size, worst, mean)  # measured: max 1, mean 0.0001-0.03


FACTORS = np.asarray([0.6, 1.4, 0.8, 1.2, 1.0], np.float32)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue", "grayscale", "solarize", "flip"])
def test_colour_ops_match_pillow_exactly(images, name):
    x = jnp.asarray(images, jnp.float32)
    on = jnp.ones(len(images), bool)
    pil = [Image.fromarray(im) for im in images]
    if name == "hue":
        f = np.asarray([-0.1, 0.1, 0.05, -0.03, 0.5], np.float32)
        dev = jax.jit(D.adjust_hue)(x, f)
        host = [np.asarray(T.adjust_hue(p, float(a))) for p, a in zip(pil, f)]
    elif name in ("brightness", "contrast", "saturation"):
        fn = {"brightness": D.adjust_brightness, "contrast": D.adjust_contrast, "saturation": D.adjust_saturation}[name]
        enh = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
               "saturation": ImageEnhance.Color}[name]
        dev = jax.jit(fn)(x, FACTORS)
        host = [np.asarray(enh(p).enhance(float(a))) for p, a in zip(pil, FACTORS)]
    elif name == "grayscale":
        dev = jax.jit(D.grayscale)(x, on)
        host = [np.asarray(T.grayscale(p)) for p in pil]
    elif name == "solarize":
        dev = jax.jit(D.solarize)(x, on)
        host = [np.asarray(T.solarize(p)) for p in pil]
    else:
        dev = jax.jit(D.hflip)(x, on)
        host = [np.asarray(T.hflip(p)) for p in pil]
    assert _diff(dev, host) == (0.0, 0.0)


def test_rgb_hsv_round_trip_is_pillows_on_random_colours():
    """Pillow's uint8 HSV conversions, bit-exact, on 64k random colours (+ greys and ties)."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (256, 256, 3)).astype(np.uint8)
    rgb[0, :, :] = np.arange(256)[:, None]  # greys
    rgb[1, :, 1] = rgb[1, :, 0]  # r = g ties
    rgb[2, :, 2] = rgb[2, :, 1]  # g = b ties
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    np.testing.assert_array_equal(np.asarray(jax.jit(D.rgb_to_hsv)(jnp.asarray(rgb))), hsv)
    back = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(jax.jit(D.hsv_to_rgb)(jnp.asarray(hsv, jnp.float32))), back)


def test_gaussian_blur_matches_pillow_exactly(images):
    sigma = np.asarray([0.1, 0.5, 1.0, 1.7, 2.0], np.float32)
    dev = jax.jit(lambda x, s: D.gaussian_blur(x, s, jnp.ones(len(s), bool), 2.0))(jnp.asarray(images, jnp.float32),
                                                                                  sigma)
    host = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(float(s)))) for im, s in zip(images, sigma)]
    assert _diff(dev, host) == (0.0, 0.0)


def _host_jitter(image: Image.Image, factors, order) -> Image.Image:
    for op in order:
        f = float(factors[op])
        if op == 0:
            image = ImageEnhance.Brightness(image).enhance(f)
        elif op == 1:
            image = ImageEnhance.Contrast(image).enhance(f)
        elif op == 2:
            image = ImageEnhance.Color(image).enhance(f)
        else:
            image = T.adjust_hue(image, f)
    return image


def _small_config(**overrides) -> ml_collections.ConfigDict:
    dc = P.data_config()
    for key, value in overrides.items():
        node = dc
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return dc


def test_views_match_host_ops_for_the_drawn_parameters(images):
    """Whole LAFS views (crop, flip, jitter in its order, grayscale, blur, solarise) for the device's
    drawn parameters, replayed with the host's Pillow ops: clean views within 1 grey level (the
    crop's), augmented views within 2 (a contrast factor up to 1.4 scales the crop's 1-level
    differences; measured max 2, mean < 0.01)."""
    color = D.SSLColor(jitter_prob=0.8, grayscale_prob=0.3)
    keys = D.sample_keys(jax.random.key(3), jnp.arange(len(images)))
    views = 4
    blur = np.asarray([1.0, 0.5, 0.5, 0.5], np.float32)
    sol = np.asarray([0.0, 0.5, 0.5, 0.5], np.float32)
    fn = jax.jit(lambda x, k: D.ssl_views(x, k, count=views, size=64, scale=(0.3, 1.0), color=color,
                                          blur_probs=blur, solarize_probs=sol), compiler_options=USERS_OPTIMIZATION)
    clean, aug = fn(jnp.asarray(images), keys)
    draw = jax.vmap(jax.vmap(lambda k, pb, ps: D.view_params(k, 112, 112, (0.3, 1.0), color, pb, ps),
                             in_axes=(0, 0, 0)), in_axes=(0, None, None))
    params = jax.device_get(draw(jax.vmap(lambda k: jax.random.split(k, views))(keys), blur, sol))
    worst_clean = worst_aug = mean_aug = 0.0
    applied = {"jitter": 0, "gray": 0, "blur": 0, "solarize": 0, "flip": 0}
    for b, im in enumerate(images):
        for v in range(views):
            p = {k: a[b, v] for k, a in params.items()}
            view = T.resized_crop(Image.fromarray(im), tuple(int(t) for t in p["box"]), 64, T.BICUBIC)
            if p["flip"]:
                view = T.hflip(view)
            host_clean = np.asarray(view)
            if p["jitter"]:
                view = _host_jitter(view, p["factors"], p["order"])
            if p["gray"]:
                view = T.grayscale(view)
            if p["blur"]:
                view = view.filter(ImageFilter.GaussianBlur(float(p["sigma"])))
            if p["solarize"]:
                view = T.solarize(view)
            for key in applied:
                applied[key] += int(p[key])
            worst_clean = max(worst_clean, _diff(clean[b, v][None], [host_clean])[0])
            d_max, d_mean = _diff(aug[b, v][None], [np.asarray(view)])
            worst_aug, mean_aug = max(worst_aug, d_max), max(mean_aug, d_mean)
    assert all(applied.values()), applied  # every op ran on some view
    assert worst_clean <= 1 and worst_aug <= 2 and mean_aug < 0.05, (worst_clean, worst_aug, mean_aug)


def test_jitter_with_order_and_disabled_ops(images):
    x = jnp.asarray(images[:2], jnp.float32)
    factors = np.asarray([[1.3, 0.7, 1.2, 0.08], [0.8, 1.1, 0.5, -0.05]], np.float32)
    order = np.asarray([[3, 0, 2, 1], [1, 2, 0, 3]], np.int32)
    dev = jax.jit(D.color_jitter)(x, factors, order, jnp.ones(2, bool))
    host = [np.asarray(_host_jitter(Image.fromarray(im), f, o)) for im, f, o in zip(images[:2], factors, order)]
    assert _diff(dev, host)[0] <= 0
    skipped = jax.jit(lambda *a: D.color_jitter(*a, enabled=(True, True, True, False)))(x, factors, order,
                                                                                      jnp.ones(2, bool))
    host = [np.asarray(_host_jitter(Image.fromarray(im), f, [i for i in o if i != 3]))
            for im, f, o in zip(images[:2], factors, order)]
    assert _diff(skipped, host)[0] <= 0
    untouched = jax.jit(D.color_jitter)(x, factors, order, jnp.zeros(2, bool))
    np.testing.assert_array_equal(np.asarray(untouched), images[:2])


# ---- parameter distributions (10k draws each side) ----

def _keys(seed: int, n: int = N_DRAWS) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


def _close(device: np.ndarray, host: np.ndarray, what: str) -> None:
    """Means within 5 standard errors; variances within 10 % (+ a small absolute slack)."""
    device, host = np.asarray(device, np.float64), np.asarray(host, np.float64)
    se = math.sqrt(device.var() / len(device) + host.var() / len(host)) + 1e-12
    assert abs(device.mean() - host.mean()) < 5 * se, (what, device.mean(), host.mean(), se)
    assert abs(device.var() - host.var()) <= 0.1 * host.var() + 1e-6, (what, device.var(), host.var())


@pytest.mark.parametrize("scale,height,width", [((0.4, 1.0), 112, 112), ((0.05, 0.4), 112, 112), ((0.9, 1.0), 120, 96)])
def test_crop_box_distribution_matches_host(scale, height, width):
    dev = np.asarray(jax.jit(jax.vmap(lambda k: D.crop_box(k, height, width, scale)))(_keys(1)))
    rng = np.random.default_rng(1)
    host = np.asarray([T.random_resized_crop_box(rng, height, width, scale) for _ in range(N_DRAWS)])
    for i, name in enumerate(("top", "left", "h", "w")):
        _close(dev[:, i], host[:, i], name)
    _close(dev[:, 2] * dev[:, 3] / (height * width), host[:, 2] * host[:, 3] / (height * width), "area fraction")
    _close(np.log(dev[:, 3] / dev[:, 2]), np.log(host[:, 3] / host[:, 2]), "log ratio")
    assert (dev[:, 0] + dev[:, 2] <= height).all() and (dev[:, 1] + dev[:, 3] <= width).all()


def test_jitter_blur_and_probability_draws_match_host():
    color = (0.4, 0.4, 0.2, 0.1)
    factors, order = jax.jit(jax.vmap(lambda k: D.jitter_params(k, *color)))(_keys(2))
    factors, order = np.asarray(factors), np.asarray(order)
    rng = np.random.default_rng(2)
    host_f = np.asarray([[rng.uniform(1 - x, 1 + x) for x in color[:3]] + [rng.uniform(-color[3], color[3])]
                         for _ in range(N_DRAWS)])
    host_o = np.asarray([rng.permutation(4) for _ in range(N_DRAWS)])
    for i in range(4):
        _close(factors[:, i], host_f[:, i], f"jitter factor {i}")
        _close(order[:, 0] == i, host_o[:, 0] == i, f"op {i} first")
    assert (np.sort(order, axis=1) == np.arange(4)).all()  # permutations
    sigma = np.asarray(jax.jit(jax.vmap(lambda k: D.blur_sigma(k, (0.1, 2.0))))(_keys(3)))
    _close(sigma, rng.uniform(0.1, 2.0, N_DRAWS), "blur sigma")
    for p in (0.8, 0.2, 0.5, 0.1):
        flags = np.asarray(jax.jit(jax.vmap(lambda k: D.bernoulli(k, p)))(_keys(4)))
        _close(flags, rng.random(N_DRAWS) < p, f"bernoulli {p}")
    flips = np.asarray(jax.jit(jax.vmap(D.flip_flag))(_keys(5)))
    _close(flips, rng.random(N_DRAWS) < 0.5, "flip")


def test_erasing_box_distribution_matches_host():
    dev = np.asarray(jax.jit(jax.vmap(lambda k: D.erasing_box(k, 112, 112, (0.02, 0.1))))(_keys(6)))
    rng = np.random.default_rng(6)
    host = np.asarray([T.random_erasing_box(rng, 112, 112, (0.02, 0.1)) for _ in range(N_DRAWS)])
    for i, name in enumerate(("top", "left", "h", "w")):
        _close(dev[:, i], host[:, i], f"erasing {name}")


# ---- keys, recipes, sharding ----

def _uint8_batch(images, index):
    return {"image": jnp.asarray(images), "index": jnp.asarray(index, jnp.int32),
            "label": jnp.arange(len(index), dtype=jnp.int32)}


def test_views_depend_on_the_global_index_not_the_batch_position(images):
    dc = _small_config(**{"lafs.local_views": 2, "lafs.view_size": 48, "lafs.global_views": 2})
    fn = jax.jit(lambda k, b: D.lafs_views(dc, k, b))
    key = jax.random.key(0)
    a = fn(key, _uint8_batch(images[:4], [10, 11, 12, 13]))
    b = fn(key, _uint8_batch(images[[2, 0, 3, 1]], [12, 10, 13, 11]))
    for name in ("global_clean", "global_aug", "local_clean", "local_aug"):
        np.testing.assert_array_equal(np.asarray(a[name])[[2, 0, 3, 1]], np.asarray(b[name]))
        assert a[name].dtype == jnp.float32 and float(jnp.abs(a[name]).max()) <= 1.0 + 1e-6
    c = fn(key, _uint8_batch(images[:4], [20, 21, 22, 23]))
    assert not np.array_equal(np.asarray(a["global_aug"]), np.asarray(c["global_aug"]))


def test_recipes_shapes_and_sharding_independence(images):
    """DINO views on one device and split over 8 devices are identical (keys from the index), compiled as
    users compile them (with the suite's fast-compile flags the two programs round a few pixels apart)."""
    dc = _small_config(**{"dino.local_crops": 2, "dino.global_size": 48, "dino.local_size": 24})
    batch = _uint8_batch(np.concatenate([images, images[:3]]), np.arange(8) + 100)
    fn = jax.jit(lambda k, b: D.dino_views(dc, k, b), compiler_options=USERS_OPTIMIZATION)
    one = jax.device_get(fn(jax.random.key(1), batch))
    mesh = mesh_lib.make_mesh()
    sharded = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
    eight = jax.device_get(fn(jax.random.key(1), sharded))
    assert one["global"].shape == (8, 2, 48, 48, 3) and one["local"].shape == (8, 2, 24, 24, 3)
    for name in ("global", "local"):
        np.testing.assert_array_equal(one[name], eight[name])


def test_finetune_images_layout_and_mixup(images):
    dc = _small_config(**{"finetune.mixup_prob": 1.0, "image_size": 64})
    out = jax.jit(lambda k, b: D.finetune_images(dc, k, b))(jax.random.key(2), _uint8_batch(images[:4], np.arange(4)))
    assert out["image"].shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(np.asarray(out["label2"]), [3, 2, 1, 0])
    lam = np.asarray(out["lam"])
    assert (lam == lam[0]).all() and 0 <= lam[0] <= 1
