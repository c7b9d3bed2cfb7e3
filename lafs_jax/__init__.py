"""lafs_jax: LAFS / Part fViT / DINO-face / Partial FC face-representation learning in JAX."""

__version__ = "0.1.0"
