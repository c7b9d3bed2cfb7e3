"""DALL-E's dVAE encoder weights -> a `models.dvae.DalleEncoder` variables directory
(`python -m lafs_jax.convert --kind dalle --src dalle_encoder_state.pt --out DIR`).

The released `encoder.pkl` (OpenAI, cdn.openai.com/dall-e/encoder.pkl, loaded by `dall_e.load_model`) is a
pickled whole `torch.nn.Module`: reading it runs arbitrary pickled code, so this project never opens it.
Convert it once, on a machine where you trust the file, to a plain state dict:

    python -c "import torch; enc = torch.load('encoder.pkl', weights_only=False); \
               torch.save(enc.state_dict(), 'dalle_encoder_state.pt')"

then `python -m lafs_jax.convert --kind dalle --src dalle_encoder_state.pt --out runs/dalle_dvae` reads that
with `torch.load(weights_only=True)` (tensors only) and writes the directory FaRL's MIM reads
(`config.farl.mim.tokenizer='dalle'`, `config.farl.mim.dalle_path='runs/dalle_dvae'`).

State-dict names (the `dall_e.Encoder` module tree, each conv a `w` [out, in, k, k] and `b` [out]):

    blocks.input.{w,b}                                  -> input/{kernel [k, k, in, out], bias}
    blocks.group_G.block_K.id_path.{w,b}                -> group_G_block_K/id_path/...   (width changes only)
    blocks.group_G.block_K.res_path.conv_N.{w,b}        -> group_G_block_K/res_path/conv_N/...  (N 1..4)
    blocks.output.conv.{w,b}                            -> output/...
The architecture is read from the shapes: n_hid from `blocks.input.w`, blocks per group by counting
`blocks.group_1.block_K`, the vocabulary from `blocks.output.conv.w`. A missing key, an unknown key or a
shape that does not fit is a ConversionError naming the key. Metadata: kind 'dalle_dvae', `dvae` {n_hid,
n_blk_per_group, vocab_size}, the input ([0, 1] RGB; map_pixels is inside the model) and the source path.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from lafs_jax.convert.mapping import ConversionError
from lafs_jax.models import dvae

KIND = "dalle"
_BLOCK = re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.")


def _conv(w: np.ndarray) -> np.ndarray:
    """torch conv weight [out, in, k, k] -> Flax kernel [k, k, in, out]."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)), np.float32)


def infer_config(state: Mapping[str, Any]) -> dict:
    """{'n_hid', 'n_blk_per_group', 'vocab_size'} from the shapes (module docstring)."""
    for key in ("blocks.input.w", "blocks.output.conv.w"):
        if key not in state:
            raise ConversionError(f"missing key {key!r}: not a DALL-E dVAE encoder state dict "
                                  "(torch.save(encoder.state_dict()))")
    blocks = {int(m.group(2)) for k in state if (m := _BLOCK.match(k)) and m.group(1) == "1"}
    if not blocks:
        raise ConversionError("missing key 'blocks.group_1.block_1.res_path.conv_1.w': no encoder blocks")
    return {"n_hid": int(state["blocks.input.w"].shape[0]), "n_blk_per_group": max(blocks),
            "vocab_size": int(state["blocks.output.conv.w"].shape[0])}


def expected_shapes(cfg: Mapping[str, int]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{state-dict key: (Flax path 'a/b/kernel', torch shape)} of an encoder of `cfg`."""
    n, k_blocks, vocab = cfg["n_hid"], cfg["n_blk_per_group"], cfg["vocab_size"]
    out: dict[str, tuple[str, tuple[int, ...]]] = {}

    def conv(src: str, dst: str, n_in: int, n_out: int, k: int) -> None:
        out[f"{src}.w"] = (f"{dst}/kernel", (n_out, n_in, k, k))
        out[f"{src}.b"] = (f"{dst}/bias", (n_out,))

    conv("blocks.input", "input", 3, n, 7)
    width = n
    for g in range(1, dvae.GROUPS + 1):
        for k in range(1, k_blocks + 1):
            n_in, n_out = width, 2 ** (g - 1) * n
            src, dst = f"blocks.group_{g}.block_{k}", f"group_{g}_block_{k}"
            if n_in != n_out:
                conv(f"{src}.id_path", f"{dst}/id_path", n_in, n_out, 1)
            hid = n_out // 4
            for i, (a, b, ks) in enumerate(((n_in, hid, 3), (hid, hid, 3), (hid, hid, 3), (hid, n_out, 1))):
                conv(f"{src}.res_path.conv_{i + 1}", f"{dst}/res_path/conv_{i + 1}", a, b, ks)
            width = n_out
    conv("blocks.output.conv", "output", 8 * n, vocab, 1)
    return out


def convert_state_dict(state: Mapping[str, Any]) -> tuple[dict, dict]:
    """(params of `DalleEncoder(**cfg)`, cfg) from a dVAE encoder state dict (numpy arrays)."""
    cfg = infer_config(state)
    expected = expected_shapes(cfg)
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ConversionError(f"unknown key {unknown[0]!r} ({len(unknown)} unknown) for a DALL-E encoder of "
                              f"{cfg}")
    params: dict = {}
    for key, (path, shape) in expected.items():
        if key not in state:
            raise ConversionError(f"missing key {key!r} (an encoder of {cfg} needs it)")
        value = np.asarray(state[key], np.float32)
        if value.shape != shape:
            raise ConversionError(f"key {key!r} has shape {value.shape}; an encoder of {cfg} needs {shape}")
        node = params
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _conv(value) if leaf == "kernel" else value
    return params, cfg


def metadata(cfg: Mapping[str, int], source: str) -> dict:
    """The directory's metadata (module docstring)."""
    return {"kind": dvae.METADATA_KIND, "dvae": dict(cfg), "source": source,
            "input": "[0, 1] RGB, NHWC, side a multiple of 8 (map_pixels applied inside the model)"}
