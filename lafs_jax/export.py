"""`python -m lafs_jax.export --backbone DIR --format {jax,onnx} --out PATH`: the user command of
lafs_jax.eval.export (a `jax.export` artefact, or an ONNX graph with InsightFace's input convention;
`pip install -r requirements-onnx.txt` for ONNX)."""
from lafs_jax.eval.export import main

if __name__ == "__main__":
    main()
