"""A plain-PyTorch mirror of DALL-E's dVAE encoder, written from the description in `lafs_jax.models.dvae`
(its parameter names are the released state dict's: `blocks.input.w`, `blocks.group_G.block_K.res_path.conv_N.b`,
`blocks.output.conv.w`, ...), for the parity test of `lafs_jax.convert.dalle` + `models.dvae`. NCHW, float32."""
import torch
import torch.nn.functional as F
from torch import nn


class Conv(nn.Module):
    def __init__(self, n_in, n_out, k, generator):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, k, k, generator=generator) / (n_in * k * k) ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(n_out, generator=generator))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class Block(nn.Module):
    def __init__(self, n_in, n_out, n_layers, generator):
        super().__init__()
        hid = n_out // 4
        if n_in != n_out:
            self.id_path = Conv(n_in, n_out, 1, generator)
        self.res_path = nn.ModuleDict({
            "conv_1": Conv(n_in, hid, 3, generator), "conv_2": Conv(hid, hid, 3, generator),
            "conv_3": Conv(hid, hid, 3, generator), "conv_4": Conv(hid, n_out, 1, generator)})
        self.gain = 1.0 / n_layers ** 2

    def forward(self, x):
        r = x
        for name in ("conv_1", "conv_2", "conv_3", "conv_4"):
            r = self.res_path[name](torch.relu(r))
        identity = self.id_path(x) if hasattr(self, "id_path") else x
        return identity + self.gain * r


class Encoder(nn.Module):
    """images [B, 3, H, W] on [0, 1] -> logits [B, vocab, H/8, W/8]."""

    def __init__(self, n_hid, n_blk_per_group, vocab_size, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n_layers = 4 * n_blk_per_group
        blocks = {"input": Conv(3, n_hid, 7, g)}
        width = n_hid
        for group in range(4):
            out = 2 ** group * n_hid
            members = {}
            for k in range(n_blk_per_group):
                members[f"block_{k + 1}"] = Block(width, out, n_layers, g)
                width = out
            blocks[f"group_{group + 1}"] = nn.ModuleDict(members)
        blocks["output"] = nn.ModuleDict({"conv": Conv(width, vocab_size, 1, g)})
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, images):
        x = self.blocks["input"](0.8 * images + 0.1)
        for group in range(4):
            for block in self.blocks[f"group_{group + 1}"].values():
                x = block(x)
            if group < 3:
                x = F.max_pool2d(x, 2)
        return self.blocks["output"]["conv"](torch.relu(x))
