"""FaRL's views made on the device (`data.augment_on='device'`): the host only decodes, tokenises and
masks; the step crops, resizes, flips and normalises (`input.image_text.device_views`). The centred crop
equals the host's Pillow path inside the border; both pipelines hand over their layouts. Training and
the SIGTERM / resume test run on device views in tests/test_farl_pretrain.py."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import farl as farl_recipe
from lafs_jax.input import captions, image_text, images as image_lib, transforms


def test_device_centre_crop_equals_the_host_path():
    dc = farl_recipe.get_config("tiny").data
    raw = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), np.uint8)
    host = transforms.normalize(np.stack([image_text.center_square(im, dc.image_size) for im in raw]),
                                dc.normalization)
    batch = {"image": jnp.asarray(raw), "index": jnp.arange(3, dtype=jnp.int32), "label": jnp.zeros(3, jnp.int32)}
    views = jax.jit(lambda b: image_text.device_views(dc, jax.random.key(0), b, size=dc.image_size))
    dev = np.asarray(views(batch)["image"])
    step = 1.0 / 255.0 / min(transforms.CLIP_STD)  # one grey level, normalised
    diff = np.abs(dev - host) / step
    assert dev.shape == host.shape == (3, dc.image_size, dc.image_size, 3)
    assert diff[:, 2:-2, 2:-2].max() <= 1.01  # borders: the host resizes the cut-out square, the device the box


def test_host_and_device_pipelines_hand_over_their_layouts(tmp_path):
    config = farl_recipe.get_config("tiny")
    rng = np.random.default_rng(0)
    pairs = [(image_lib.encode_image(rng.integers(0, 256, (36, 40, 3)).astype(np.uint8), "PNG"),
              f"a photo of person {i}", i, str(i)) for i in range(4)]
    captions.write_pairs(pairs, str(tmp_path / "pairs.arrayrecord"))
    source = captions.ImageCaptionSource(str(tmp_path / "pairs.arrayrecord"))
    dc = config.data
    kw = dict(batch_size=4, seed=0, grid=4, num_masked=6, min_block=2, context_length=8, crop_scale=(0.5, 1.0),
              flip=True, process_index=0, process_count=1)
    host = next(image_text.image_text_batches(source, dc, **kw))
    assert host["image"].shape == (4, 32, 32, 3) and host["image"].dtype == np.float32
    dc = dc.copy_and_resolve_references()
    dc.augment_on = "device"
    dev = next(image_text.image_text_batches(source, dc, **kw))
    assert dev["image"].shape == (4, 36, 40, 3) and dev["image"].dtype == np.uint8
    assert sorted(dev["index"]) == [0, 1, 2, 3]
    for key in ("text", "mask", "truncated", "label"):
        assert dev[key].shape == host[key].shape, key
