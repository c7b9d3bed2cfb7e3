"""FaRL's DALL-E dVAE visual tokenizer: `python -m lafs_jax.convert --kind dalle` on a state dict of the
PyTorch mirror (tests/torch_mirror_dalle.py: small widths, random weights) gives logits equal to 1e-4 of
their scale and the same token ids; bad state dicts name the key; the FaRL objective with
`farl.mim.tokenizer='dalle'` reads the directory named by `farl.mim.dalle_path` (checked at start-up,
naming the key) and takes its MIM targets from it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import farl as farl_recipe
from lafs_jax.config import ConfigError
from lafs_jax.convert import __main__ as convert_cmd
from lafs_jax.input import transforms
from lafs_jax.methods.farl import config as farl_config
from lafs_jax.methods.farl import objective as farl_objective
from lafs_jax.models import dvae
from lafs_jax import variables as variables_lib
from torch_mirror_dalle import Encoder

N_HID, BLOCKS, VOCAB = 8, 2, 32


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model = Encoder(N_HID, BLOCKS, VOCAB, seed=0).eval()
    tmp = tmp_path_factory.mktemp("dalle")
    src, out = tmp / "dalle_encoder_state.pt", tmp / "dalle_dir"
    torch.save(model.state_dict(), src)
    assert convert_cmd.main(["--kind", "dalle", "--src", str(src), "--out", str(out)]) == 0
    return model, src, out, tmp


def _mirror_logits(model, x01):
    with torch.no_grad():
        return model(torch.from_numpy(x01).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


def test_logits_and_tokens_match_the_torch_mirror(converted):
    model, _, out, _ = converted
    variables, meta = variables_lib.load_variables(str(out))
    assert meta["kind"] == dvae.METADATA_KIND
    assert meta["dvae"] == {"n_hid": N_HID, "n_blk_per_group": BLOCKS, "vocab_size": VOCAB}
    x = np.random.default_rng(0).uniform(0, 1, (3, 24, 24, 3)).astype(np.float32)
    ref = _mirror_logits(model, x)
    got = np.asarray(dvae.DalleEncoder(N_HID, BLOCKS, VOCAB).apply(variables, jnp.asarray(x)))
    assert got.shape == ref.shape == (3, 3, 3, VOCAB)
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))
    np.testing.assert_array_equal(np.asarray(dvae.tokens(jnp.asarray(got))), ref.argmax(-1))


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.update({"blocks.group_1.block_1.res_path.conv_5.w": torch.zeros(1)}),
     "blocks.group_1.block_1.res_path.conv_5.w"),
    (lambda s: s.pop("blocks.group_2.block_1.id_path.b"), "blocks.group_2.block_1.id_path.b"),
    (lambda s: s.update({"blocks.group_3.block_2.res_path.conv_2.w": torch.zeros(8, 8, 1, 1)}),
     "blocks.group_3.block_2.res_path.conv_2.w"),
])
def test_bad_state_dicts_name_the_key(converted, edit, named):
    model, _, _, tmp = converted
    state = dict(model.state_dict())
    edit(state)
    src = tmp / "bad.pt"
    torch.save(state, src)
    with pytest.raises(SystemExit, match=named.replace(".", r"\.")):
        convert_cmd.main(["--kind", "dalle", "--src", str(src), "--out", str(tmp / "bad_dir")])


def _config(path):
    config = farl_recipe.get_config("tiny")
    config.unlock()
    config.farl.mim.update(tokenizer="dalle", dalle_path=str(path), vocab_size=VOCAB)
    config.model.clip.text_width = 8
    config.farl.context_length = 8
    return config


def test_the_objective_takes_its_mim_targets_from_the_dvae(converted):
    model, _, out, _ = converted
    config = _config(out)
    farl_config.validate(config)
    obj = farl_objective.Objective(config)
    state = obj.init_extra_state(jax.random.key(0), obj.load_resources("unused"))
    s = config.model.image_size  # 32 px, patch 8: a 4 x 4 grid, the dVAE's input is 32 px too
    raw = np.random.default_rng(1).integers(0, 256, (2, s, s, 3), np.uint8)
    images = transforms.normalize(raw, config.data.normalization)
    want = _mirror_logits(model, raw.astype(np.float32) / 255.0).argmax(-1).reshape(2, -1)
    np.testing.assert_array_equal(np.asarray(jax.jit(obj.visual_tokens)(jnp.asarray(images), state)), want)
    # a larger view is resized to 8 x grid px first (BEiT: 224 -> 112)
    big = jnp.asarray(np.repeat(np.repeat(images, 2, 1), 2, 2))
    assert farl_objective.dvae_pixels(big, config.data.normalization, 4).shape == (2, 32, 32, 3)


def test_a_missing_or_wrong_dvae_names_the_key(converted, tmp_path):
    _, _, out, _ = converted
    with pytest.raises(ConfigError, match="farl.mim.dalle_path"):
        farl_config.validate(_config(""))
    with pytest.raises(FileNotFoundError, match="config.farl.mim.dalle_path"):
        farl_objective.Objective(_config(tmp_path / "nowhere"))
    config = _config(out)
    config.farl.mim.vocab_size = 64
    with pytest.raises(ValueError, match="config.farl.mim.vocab_size"):
        farl_objective.Objective(config)
