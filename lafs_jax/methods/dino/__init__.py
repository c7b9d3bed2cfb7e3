"""DINO-face (the LAFS paper's fViT multi-crop baseline): the pretraining objective (`objective`) and its
config section `config.dino` with the recipe's validator (`config`). LAFS reuses both."""
