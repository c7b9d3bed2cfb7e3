"""Serialise the embedding function with `jax.export` for deployment.

`export_function` exports any jittable function of one array with a symbolic batch dimension
(`jax.export.symbolic_shape`), so one artefact serves every batch size. `export_backbone` exports a
backbone's full embedding path -- uint8 RGB [b, H, W, 3] in, float32 [b, D] out, with the colour
order, normalisation and optional flip-sum of its metadata, and the weights baked in as constants --
to a `.jaxexport` file (StableHLO bytes from `Exported.serialize()`) plus a `.json` sidecar
describing the input and the preprocessing. `load_exported` reads it back in any process with JAX
installed (no lafs_jax, no Flax needed) and `Exported.call` runs it.

ONNX (`export_onnx`, `--format onnx`) goes through the maintained converter jax2onnx
(requirements-onnx.txt: jax2onnx 0.13.0, the newest release whose requirements leave the project's
pinned orbax-checkpoint 0.12.8 alone -- 0.13.1 and later, 0.17.1 included, require orbax-checkpoint
< 0.11.37 -- with onnx and onnxruntime 1.32.0). The graph follows InsightFace's convention:
  - input `data`: float32 NCHW [batch, 3, H, W], batch symbolic, RGB, in [-1, 1] as InsightFace's
    tools feed it: (pixel / 255 - 0.5) / 0.5 computed outside the graph;
  - inside the graph: NCHW -> NHWC, the backbone's own colour order and normalisation re-expressed
    from that range ('[-1,1]': as is; '[-0.5,0.5]': x / 2; 'imagenet': ((x + 1) / 2 - mean) / std),
    the model in eval mode (BatchNorm running statistics, no dropout), no flip (sum the embeddings
    of the image and its mirror outside for the flip test);
  - output `embedding`: float32 [batch, D], not L2-normalised.
The sidecar PATH + '.json' (model.onnx.json) records the input name / layout / range, colour order,
normalisation, embedding size and source directory. Two export-only rewrites, neither touching
training numerics: the landmark CNN's depthwise convolution is fixed to its 'taps' implementation
(its 'auto' choice is `lax.platform_dependent`, which has no ONNX form; 'taps' is what 'auto' runs
on CPU; the grouped 'xla' form converts to a graph onnxruntime rejects), and the patch sampler's
gathers get their indices clamped explicitly (`_clamp_gather_indices`): XLA clamps out-of-range
gather starts itself (the sampler masks those taps to 0), ONNX Gather/GatherND reject them.

Command lines:
    python -m lafs_jax.eval.export --backbone WORKDIR/backbone --out model.jaxexport [--no-flip]
    python -m lafs_jax.eval.export --backbone WORKDIR/backbone --format onnx --out model.onnx
(`--variables` is the same option as `--backbone`.) A directory that is not a variables directory
prints one FATAL line and exits 1 without writing anything.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from lafs_jax.eval import embed
from lafs_jax.input.transforms import MEAN_STD

try:  # optional: only --format onnx needs them (pip install -r requirements-onnx.txt)
    import jax2onnx
    import onnx
except ImportError:  # pragma: no cover - exercised only without the ONNX requirements
    jax2onnx = onnx = None

FORMATS = ("jax", "onnx")
ONNX_INPUT, ONNX_OUTPUT = "data", "embedding"


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


def _clamp_gather_indices(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """fn with every gather's start indices clamped to [0, operand size - slice size] explicitly.

    That is XLA's own gather semantics (out-of-range starts are clamped), so the values are unchanged;
    ONNX Gather / GatherND instead reject out-of-range indices, and the bilinear sampler
    (`map_coordinates`) reads clamped neighbours that it then masks to 0 outside the image. The
    function is traced to a jaxpr and re-evaluated with the clamp inserted before each gather (call
    primitives such as pjit are inlined)."""

    def evaluate(jaxpr, consts, *args):
        env = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            sub = next((eqn.params[k] for k in ("jaxpr", "call_jaxpr")
                        if isinstance(eqn.params.get(k), jcore.ClosedJaxpr)), None)
            if eqn.primitive.name == "gather":
                operand, indices = invals
                dims, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
                hi = jnp.asarray([operand.shape[d] - sizes[d] for d in dims.start_index_map], indices.dtype)
                outs = [eqn.primitive.bind(operand, jnp.clip(indices, 0, hi), **eqn.params)]
            elif sub is not None:
                outs = evaluate(sub.jaxpr, sub.consts, *invals)
            else:
                bind = eqn.primitive.get_bind_params(eqn.params)
                subfuns, params = bind if isinstance(bind, tuple) else ([], bind)
                outs = eqn.primitive.bind(*subfuns, *invals, **params)
                outs = outs if eqn.primitive.multiple_results else [outs]
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    def clamped(x):
        closed = jax.make_jaxpr(fn)(x)
        return evaluate(closed.jaxpr, closed.consts, x)[0]

    return clamped


def _for_export(model: Any) -> Any:
    """The model with its landmark CNN's depthwise convolution fixed to 'taps' (see the module doc);
    other models unchanged. Same parameters, same numbers as 'auto' on CPU."""
    cnn = getattr(model, "landmark_cnn", None)
    if cnn is not None and getattr(cnn, "depthwise_implementation", None) == "auto":
        return model.clone(landmark_cnn=cnn.clone(depthwise_implementation="taps"))
    return model


def onnx_input_to_model(x: jax.Array, normalization: str, color_order: str) -> jax.Array:
    """ONNX input (NCHW RGB in [-1, 1] = (pixel / 255 - 0.5) / 0.5) -> the backbone's NHWC input."""
    x = jnp.transpose(x.astype(jnp.float32), (0, 2, 3, 1))
    if color_order == "bgr":
        x = x[..., ::-1]
    if normalization == "[-1,1]":
        return x
    if normalization == "[-0.5,0.5]":
        return x * jnp.float32(0.5)
    if normalization in MEAN_STD:
        mean, std = MEAN_STD[normalization]
        return (x * jnp.float32(0.5) + jnp.float32(0.5) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
            std, jnp.float32)
    raise ValueError(f"normalization {normalization!r} is not valid")


def export_onnx(variables_dir: str, out_path: str, *, normalization: str | None = None,
                color_order: str | None = None) -> tuple[str, str]:
    """ONNX graph of a backbone variables directory (InsightFace's convention, see the module doc):
    writes OUT_PATH and OUT_PATH + '.json'; returns both paths."""
    if jax2onnx is None or onnx is None:
        raise ImportError("ONNX export needs jax2onnx, onnx and onnxruntime: pip install -r requirements-onnx.txt")
    model, variables, meta = embed.load_backbone(variables_dir, host=True)
    normalization = normalization or meta["normalization"]
    color_order = color_order or meta["color_order"]
    embed.preprocess(jnp.zeros((1, 1, 1, 3), jnp.uint8), normalization, color_order)  # validate
    model = _for_export(model)
    size = int(meta["image_size"])

    def graph(x):
        return embed.model_embedding(model, variables, onnx_input_to_model(x, normalization, color_order)).astype(
            jnp.float32)

    proto = jax2onnx.to_onnx(_clamp_gather_indices(graph), [("batch", 3, size, size)], model_name="lafs_jax_backbone",
                             input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT])
    # the converter stamps some intermediate value_info with NHWC shapes on NCHW values (onnxruntime then
    # warns "Error merging shape info"); intermediate shapes are optional in ONNX, runtimes infer them
    del proto.graph.value_info[:]
    dim = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    onnx.save(proto, out_path)
    sidecar = out_path + ".json"
    with open(sidecar, "w") as f:
        json.dump({
            "format": "onnx", "opset": int(proto.opset_import[0].version), "converter": f"jax2onnx {importlib.metadata.version('jax2onnx')}",
            "input": {"name": ONNX_INPUT, "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, size, size],
                      "color_order": "rgb", "range": "[-1,1]", "preprocess": "(pixel / 255 - 0.5) / 0.5, outside the graph"},
            "output": {"name": ONNX_OUTPUT, "dtype": "float32", "shape": ["batch", int(dim)],
                       "note": "not L2-normalised; no flip inside the graph"},
            "embedding_size": int(dim), "image_size": size, "flip": False,
            "normalization": {"backbone": normalization, "backbone_color_order": color_order,
                              "in_graph": "the backbone's colour order and normalisation applied inside the graph "
                                          "from the [-1,1] RGB input"},
            "model": meta["model"], "source": os.path.abspath(variables_dir), "eval_mode": True,
        }, f, indent=1, sort_keys=True)
    return out_path, sidecar


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", "--variables", dest="variables", required=True,
                        help="backbone variables directory (e.g. WORKDIR/backbone)")
    parser.add_argument("--format", choices=FORMATS, default="jax",
                        help="jax: jax.export artefact (uint8 NHWC in); onnx: InsightFace-style ONNX graph")
    parser.add_argument("--out", required=True, help="output file, e.g. model.jaxexport (+ model.json sidecar)")
    parser.add_argument("--no-flip", action="store_true", help="export the plain embedding, no flip-sum (jax format; "
                        "the ONNX graph never flips)")
    parser.add_argument("--normalization", default=None, help="override the checkpoint's input normalisation")
    parser.add_argument("--color-order", default=None, help="override the checkpoint's colour order")
    parser.add_argument("--platforms", default=None, help="comma-separated, e.g. cpu,cuda (default: this backend)")
    args = parser.parse_args(argv)
    try:
        if args.format == "onnx":
            path, sidecar = export_onnx(args.variables, args.out, normalization=args.normalization,
                                        color_order=args.color_order)
        else:
            path, sidecar = export_backbone(args.variables, args.out, flip=not args.no_flip,
                                            normalization=args.normalization, color_order=args.color_order,
                                            platforms=args.platforms.split(",") if args.platforms else None)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, ImportError) as e:
        print(f"FATAL: cannot export {args.variables!r} as {args.format}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {path} and {sidecar}")


if __name__ == "__main__":
    main()
