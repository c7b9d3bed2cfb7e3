"""The parameter initialisers the official PyTorch models use, as Flax initialisers."""
from __future__ import annotations

import flax.linen as nn

# torch.nn.Linear's default weight init: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# A truncated normal of standard deviation 0.02 (class token, position embedding, DINO head layers;
# the official models use trunc_normal_(std=0.02)).
trunc_normal_002 = nn.initializers.truncated_normal(0.02)
