"""Pure loss functions of arrays: margin softmax, Partial FC, DINO."""
