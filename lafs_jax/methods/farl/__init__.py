"""FaRL (CVPR 2022): CLIP towers pretrained by image-text contrast + masked image modelling on faces."""
