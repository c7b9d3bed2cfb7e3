"""Serialise the embedding function with `jax.export` for deployment.

`export_function` exports any jittable function of one array with a symbolic batch dimension
(`jax.export.symbolic_shape`), so one artefact serves every batch size. `export_backbone` exports a
backbone's full embedding path -- uint8 RGB [b, H, W, 3] in, float32 [b, D] out, with the colour
order, normalisation and optional flip-sum of its metadata, and the weights baked in as constants --
to a `.jaxexport` file (StableHLO bytes from `Exported.serialize()`) plus a `.json` sidecar
describing the input and the preprocessing. `load_exported` reads it back in any process with JAX
installed (no lafs_jax, no Flax needed) and `Exported.call` runs it.

ONNX is not produced: the maintained converter (jax2onnx 0.17.1) pins orbax-checkpoint < 0.11.37
and would downgrade the project's orbax-checkpoint 0.12.8, so it does not install cleanly here.

Command line:
    python -m lafs_jax.eval.export --variables WORKDIR/backbone --out model.jaxexport [--no-flip]
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from lafs_jax.eval import embed


def export_function(fn: Callable[[jax.Array], jax.Array], item_shape: Sequence[int], dtype: Any = jnp.float32, *,
                    batch_symbol: str = "b", platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """jax.export of `fn(x[b, *item_shape]) -> y` with the batch size b symbolic.

    `platforms` (e.g. ('cpu', 'cuda')) lowers for several backends in one artefact; default: the
    current backend.
    """
    (b,) = jax.export.symbolic_shape(batch_symbol)
    spec = jax.ShapeDtypeStruct((b, *item_shape), dtype)
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms) if platforms else None)(spec)


def save_exported(exported: jax.export.Exported, path: str, metadata: dict | None = None) -> tuple[str, str]:
    """Write PATH (serialised StableHLO) and PATH minus extension + '.json'; returns both paths."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    meta = dict(metadata or {})
    meta.update({
        "input_shape": [str(d) for d in exported.in_avals[0].shape],
        "input_dtype": str(exported.in_avals[0].dtype),
        "output_shape": [str(d) for d in exported.out_avals[0].shape],
        "output_dtype": str(exported.out_avals[0].dtype),
        "platforms": list(exported.platforms),
    })
    sidecar = os.path.splitext(path)[0] + ".json"
    with open(sidecar, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return path, sidecar


def load_exported(path: str) -> tuple[jax.export.Exported, dict]:
    """(Exported, sidecar metadata) of a file written by `save_exported`; call it as `exp.call(x)`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported function at {path}")
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    sidecar = os.path.splitext(path)[0] + ".json"
    meta = json.load(open(sidecar)) if os.path.exists(sidecar) else {}
    return exported, meta


def export_backbone(variables_dir: str, out_path: str, *, flip: bool = True, normalization: str | None = None,
                    color_order: str | None = None, platforms: Sequence[str] | None = None) -> tuple[str, str]:
    """Export the embedding function of a backbone variables directory (written by any device count;
    read as host arrays, so the artefact holds no sharding); returns (file, sidecar)."""
    model, variables, meta = embed.load_backbone(variables_dir, host=True)  # numpy: baked in as constants
    normalization = normalization or meta["normalization"]
    color_order = color_order or meta["color_order"]
    fn = embed.embedding_function(model, normalization=normalization, color_order=color_order, flip=flip)
    size = int(meta["image_size"])
    exported = export_function(lambda images: fn(variables, images), (size, size, 3), jnp.uint8,
                               platforms=platforms)
    return save_exported(exported, out_path, {
        "source": os.path.abspath(variables_dir), "input": "uint8 RGB images [b, H, W, 3]",
        "output": "float32 embeddings [b, D], not L2-normalised" + (", sum of image and mirror" if flip else ""),
        "normalization": normalization, "color_order": color_order, "flip": flip, "model": meta["model"],
    })


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variables", required=True, help="backbone variables directory (e.g. WORKDIR/backbone)")
    parser.add_argument("--out", required=True, help="output file, e.g. model.jaxexport (+ model.json sidecar)")
    parser.add_argument("--no-flip", action="store_true", help="export the plain embedding, no flip-sum")
    parser.add_argument("--normalization", default=None, help="override the checkpoint's input normalisation")
    parser.add_argument("--color-order", default=None, help="override the checkpoint's colour order")
    parser.add_argument("--platforms", default=None, help="comma-separated, e.g. cpu,cuda (default: this backend)")
    args = parser.parse_args(argv)
    path, sidecar = export_backbone(args.variables, args.out, flip=not args.no_flip, normalization=args.normalization,
                                    color_order=args.color_order,
                                    platforms=args.platforms.split(",") if args.platforms else None)
    print(f"wrote {path} and {sidecar}")


if __name__ == "__main__":
    main()
