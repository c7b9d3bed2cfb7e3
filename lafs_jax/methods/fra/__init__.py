"""FRA (CVPR 2024, region-aware BYOL on a ResNet): the pretraining objective and `loss_terms` (`objective`),
the networks (`neck`), the config section `config.fra` and its validator (`config`)."""
from lafs_jax.methods.fra.objective import loss_terms  # noqa: F401
