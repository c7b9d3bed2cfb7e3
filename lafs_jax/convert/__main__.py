"""Command line: official PyTorch checkpoint (.pth) -> lafs_jax variables directory.

    python -m lafs_jax.convert --kind part_fvit --src Backbone_VIT_land_8_....pth --out runs/pfvit_ms1mv3
    python -m lafs_jax.convert --kind lafs_ssl --src checkpoint0040.pth --out runs/lafs_teacher [--which student]
    python -m lafs_jax.convert --kind fvit --src fvit.pth --out runs/fvit --drop-head
    python -m lafs_jax.convert --kind lvface --src LVFace-B_Glint360K.pt --out runs/lvface_b
    python -m lafs_jax.convert --kind fra --src flr_r50_vgg_face.pth --out runs/fra_r50 [--which target]

FRA (`--kind fra`, `convert.fra`): an official training checkpoint (FRAB: online and target networks,
predictors, proto) or a plain torchvision ResNet state dict. DIR exposes the `--which` backbone
(online by default, what FRA's FER script loads; target) with FRA's input (VGGFace2 mean/std, RGB);
a training checkpoint's whole model is also written to DIR/fra_model (`lafs_jax.methods.fra.loss_terms`
reads it). --preset (e.g. resnet50) checks the shapes against a preset.

    python -m lafs_jax.convert --kind farl --src FaRL-Base-Patch16-LAIONFace20M-ep16.pth --out runs/farl_b16 \
        [--image-size 448]

FaRL / CLIP (`--kind farl`, lafs_jax.convert.farl): the CLIP state dict (under 'state_dict' in FaRL's
release); the architecture is read from the shapes; --image-size resamples the position embeddings.

    python -m lafs_jax.convert --kind dalle --src dalle_encoder_state.pt --out runs/dalle_dvae

DALL-E dVAE encoder (`--kind dalle`, lafs_jax.convert.dalle): FaRL's MIM visual tokenizer. --src is a plain
state dict saved once from the released pickled module on a trusted machine (the recipe is in that
module's docstring); the pickled `encoder.pkl` itself is never opened here.

LVFace (`--kind lvface`): the released `.pt` is a plain state dict of the InsightFace ViT; the size is
read from it (pos_embed's width, the number of blocks) unless --preset names one (an LVFace config
name such as vit_b_dp005_mask_005, or insightface_t/s/b/l); every key must map and every variable be
filled. The metadata records the input LVFace feeds: (x/255 - 0.5)/0.5 ('[-1,1]'), RGB.

Options: --preset (model size, default base), --drop-head (drop the classifier / the DINO head),
--method (how the source was trained: supervised for part_fvit / fvit, lafs or dino for an SSL
container; recorded with the patch layout its patch embedding learnt, which fine-tuning checks),
--normalization and --color-order (recorded in metadata.json for evaluation to use; by default what
the official code used for the kind, `mapping.OFFICIAL_INPUT`: the supervised Part fViT was
evaluated on x/255 - 0.5 and true RGB, the LAFS SSL checkpoints saw [-1, 1] and the channel-swapped
WebFace4M .rec, 'bgr'; see the official `image_iter.py` / the official evaluation scripts), --strict (unexpected keys are errors),
--unsafe-load (torch.load with weights_only=False, only for checkpoints you trust).

torch is needed only here, imported when the command runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from lafs_jax.convert import dalle, farl, mapping
from lafs_jax.convert import fra as fra_convert
from lafs_jax.input.images import COLOR_ORDERS
from lafs_jax.input.transforms import NORMALIZATIONS
from lafs_jax.models.presets import PRESETS
from lafs_jax.variables import save_variables


def load_torch_checkpoint(path: str, unsafe: bool = False) -> Any:
    """torch.load on CPU, tensors converted to numpy (nested dicts/lists kept).

    The LAFS SSL container holds an argparse.Namespace; it is allowed explicitly so the safe
    weights_only loader works. `unsafe` uses weights_only=False (arbitrary pickle: trusted files only).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--src {path}: no such file")
    try:
        import torch  # optional heavy dependency, needed only to read .pth files
    except ImportError as e:
        raise SystemExit("reading .pth checkpoints needs PyTorch (CPU is enough): pip install torch "
                         f"(see requirements-test.txt); import failed with: {e}") from None
    try:
        if unsafe:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad or foreign pickle
        hint = "" if unsafe else " (if you trust the file, retry with --unsafe-load)"
        raise SystemExit(f"--src {path}: torch.load failed{hint}: {type(e).__name__}: {e}") from None

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
        if isinstance(x, dict):
            return {k: to_numpy(v) for k, v in x.items()}
        return x

    return to_numpy(obj)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lafs_jax.convert", description=__doc__.split("\n")[0])
    p.add_argument("--kind", required=True, choices=(*mapping.KINDS, "fra", farl.KIND, dalle.KIND),
                   help="checkpoint family")
    p.add_argument("--src", required=True, help="official .pth file")
    p.add_argument("--out", required=True, help="variables directory to write")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="model preset of lafs_jax.models.presets giving the target shapes (default: base; for "
                        "--kind lvface the size read from the state dict)")
    p.add_argument("--drop-head", action="store_true", help="drop the classifier (loss.weight) / DINO head")
    p.add_argument("--which", default=None, choices=(*mapping.WHICH, *fra_convert.WHICH),
                   help="lafs_ssl: network to take (teacher | student, default teacher); fra: the backbone the "
                        "directory exposes (online | target, default online)")
    p.add_argument("--method", default=None, choices=mapping.METHODS,
                   help="how the source was trained (default: supervised; lafs for --kind lafs_ssl)")
    p.add_argument("--normalization", default=None, choices=NORMALIZATIONS,
                   help="input normalisation recorded in the metadata (default: the official evaluation's)")
    p.add_argument("--color-order", default=None, choices=COLOR_ORDERS,
                   help="colour order recorded in the metadata (default: what the official code fed the kind)")
    p.add_argument("--image-size", type=int, default=None,
                   help="farl: input side (px) to resample the position embeddings for (default: the checkpoint's)")
    p.add_argument("--strict", action="store_true", help="fail on source keys the target does not use")
    p.add_argument("--unsafe-load", action="store_true", help="torch.load(weights_only=False): trusted files only")
    return p.parse_args(argv)


FRA_MODEL_DIR = "fra_model"  # DIR/fra_model: the whole FRA model of a training checkpoint


def convert_fra(args: argparse.Namespace) -> tuple[dict, dict, str]:
    """--kind fra: read --src, convert, write --out (and --out/fra_model); (variables, metadata, summary)."""
    which = args.which or "online"
    if which not in fra_convert.WHICH:
        raise SystemExit(f"--which {which!r} does not go with --kind fra; choose one of {fra_convert.WHICH}")
    checkpoint = load_torch_checkpoint(args.src, args.unsafe_load)
    try:
        backbone, model, cfg = fra_convert.convert(checkpoint, which, args.preset)
    except fra_convert.ConversionError as e:
        raise SystemExit(f"--src {args.src}: {e}") from None
    source = os.path.abspath(args.src)
    meta = fra_convert.metadata(cfg, source, which if model is not None else None)
    save_variables(args.out, backbone, meta)
    if model is not None:
        save_variables(os.path.join(args.out, FRA_MODEL_DIR), model,
                       {**fra_convert.metadata(cfg, source, which), "whole_model": True})
    what = "FRA training checkpoint (online, target, predictors, proto)" if model is not None else "ResNet"
    return backbone, meta, f"converted a {what}; the directory exposes the {which if model else 'ResNet'} backbone"


def convert_dalle(args: argparse.Namespace) -> tuple[dict, dict, str]:
    """--kind dalle: read the --src state dict (weights only), convert, write --out."""
    if args.unsafe_load:
        raise SystemExit("--kind dalle reads a plain state dict only (lafs_jax.convert.dalle); no --unsafe-load")
    state = load_torch_checkpoint(args.src)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise SystemExit(f"--src {args.src}: not a state dict (named tensors); see lafs_jax.convert.dalle")
    try:
        params, cfg = dalle.convert_state_dict(state)
    except mapping.ConversionError as e:
        raise SystemExit(f"--src {args.src}: {e}") from None
    meta = dalle.metadata(cfg, os.path.abspath(args.src))
    variables = {"params": params}
    save_variables(args.out, variables, meta)
    return variables, meta, f"converted a DALL-E dVAE encoder {cfg}"


def convert_file(args: argparse.Namespace) -> tuple[dict, dict, mapping.ConversionReport]:
    """Read --src, convert, write --out; returns (variables, metadata, report)."""
    if args.kind == farl.KIND:
        checkpoint = load_torch_checkpoint(args.src, args.unsafe_load)
        try:
            variables, cfg, report = farl.convert_state_dict(farl.state_dict_of(checkpoint), args.image_size)
        except mapping.ConversionError as e:
            raise SystemExit(f"--src {args.src}: {e}") from None
        meta = farl.metadata(cfg, os.path.abspath(args.src), report)
        save_variables(args.out, variables, meta)
        return variables, meta, report
    args.which = args.which or "teacher"
    if args.which not in mapping.WHICH:
        raise SystemExit(f"--which {args.which!r} does not go with --kind {args.kind}; choose one of {mapping.WHICH}")
    try:
        mapping.official_input(args.kind, args.method)  # a bad --method fails before the (slow) load
    except mapping.ConversionError as e:
        raise SystemExit(f"--src {args.src}: {e}") from None
    checkpoint = load_torch_checkpoint(args.src, args.unsafe_load)
    try:
        state, extras = mapping.select_state_dict(checkpoint, args.kind, args.which)
        preset = args.preset or (mapping.lvface_preset(state) if args.kind == "lvface" else "base")
        cfg = mapping.target_model_config(args.kind, preset)
        variables, report = mapping.convert_state_dict(state, args.kind, cfg, drop_head=args.drop_head,
                                                       extras=extras, strict=args.strict)
    except mapping.ConversionError as e:
        raise SystemExit(f"--src {args.src}: {e}") from None
    meta = mapping.metadata(args.kind, cfg, os.path.abspath(args.src), normalization=args.normalization,
                            color_order=args.color_order, which=args.which if args.kind == "lafs_ssl" else None,
                            report=report, method=args.method)
    save_variables(args.out, variables, meta)
    return variables, meta, report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.kind in ("fra", dalle.KIND):
        print((convert_fra if args.kind == "fra" else convert_dalle)(args)[2])
        print(f"wrote {os.path.abspath(args.out)}")
        return 0
    _, _, report = convert_file(args)
    print(report.summary())
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
