"""LVFace (ICCV 2025): its fine-tuning curriculum of phases (Partial FC sampling, margins, EPL class
prototypes) as recognition fine-tuning hooks (`finetune`); the loss math is lafs_jax.losses.curriculum."""
