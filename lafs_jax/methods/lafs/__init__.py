"""LAFS (CVPR 2024) and Part fViT: the landmark CNN's loading (`landmark_cnn`), the pretraining objective
(`objective`: landmark views `views`, config section `config.lafs` in `config`) and the landmark
regulariser of fine-tuning."""
