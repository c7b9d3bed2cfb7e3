"""LAFS (CVPR 2024) and Part fViT: the landmark CNN's loading, landmark views for pretraining, and the
landmark regulariser of fine-tuning."""
