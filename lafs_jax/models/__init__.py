"""Pure Linen modules: patch sampler, landmark CNN, ViT / fViT / Part fViT, heads; backbone families by name (`registry`)."""
