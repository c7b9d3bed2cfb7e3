"""BEiT's blockwise masking of image patches (FaRL's masked image modelling), drawn on the host.

`BlockMasking(grid, num_masked, min_block=16, min_aspect=0.3)(rng) -> bool [grid, grid]`: rectangles
are added until `num_masked` patches are covered. Each rectangle: area uniform in [min_block,
remaining], log-uniform aspect ratio in [min_aspect, 1 / min_aspect], position uniform; it is kept when
it adds between 1 and `remaining` new patches (10 tries per rectangle); the mask stops when a
rectangle cannot be placed, so the count is `num_masked` or a little under it (BEiT's algorithm;
FaRL: 75 of 196 patches, about 40 %). Draws come from a numpy Generator (Grain's per-record rng), so
a resumed run masks each record as an uninterrupted one does.
"""
from __future__ import annotations

import math

import numpy as np


class BlockMasking:
    """Blockwise mask generator (see the module docstring)."""

    def __init__(self, grid: int, num_masked: int, min_block: int = 16, min_aspect: float = 0.3, tries: int = 10):
        if not 1 <= num_masked <= grid * grid:
            raise ValueError(f"BlockMasking: num_masked={num_masked} must be in [1, {grid * grid}] for a "
                             f"{grid}x{grid} grid")
        if not 1 <= min_block <= num_masked:
            raise ValueError(f"BlockMasking: min_block={min_block} must be in [1, num_masked={num_masked}]")
        self.grid, self.num_masked, self.min_block = int(grid), int(num_masked), int(min_block)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.tries = int(tries)
        self.max_block = self.min_block  # a mask stops short of num_masked by less than about this

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Mask one more rectangle (at most `budget` new patches); returns how many patches it added."""
        for _ in range(self.tries):
            lo, hi = sorted((self.min_block, budget))  # uniform between them, as Python's random.uniform
            area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.grid and 0 < w < self.grid:
                top = int(rng.integers(0, self.grid - h + 1))
                left = int(rng.integers(0, self.grid - w + 1))
                window = mask[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window[...] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.grid, self.grid), bool)
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, self.num_masked - count, rng)
            if added == 0:
                break
            count += added
        return mask
