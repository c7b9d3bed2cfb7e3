"""A PyTorch mirror of LVFace's InsightFace ViT (`backbones/vit.py`), for the converter's parity tests.

Written from the description in ../shared/reference/other_seeds.md §3.2 (not from LVFace's code): the
module tree reproduces the released state-dict keys (patch_embed.proj, pos_embed, blocks.N.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, feature.0-3, mask_token) and the numerics: a conv
patch embedding with kernel = stride = patch (112 / 9 -> 12 x 12 = 144 tokens, the last 4 pixel rows
and columns unseen), learned positions, no class token, pre-LN blocks without qkv bias, attention in
float32 with scale head_dim**-0.5, ReLU6 MLP (ratio 4), linear stochastic depth; in training a random
mask_ratio of the tokens dropped before the blocks and `mask_token` put back after the final LayerNorm
(eps 1e-5, torch's default); the head flatten -> Linear(N*D -> D, no bias) -> BatchNorm1d(eps 2e-5) ->
Linear(D -> 512, no bias) -> BatchNorm1d(eps 2e-5), output not normalised.
Test-only: the package never imports torch except in the converter's command line.
"""
from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.rate
        return x * keep / (1.0 - self.rate)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = False):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).float()
        q, k, v = qkv[0], qkv[1], qkv[2]  # fp32 core, as LVFace's autocast(False) block
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(y.to(x.dtype))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int, channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, (H/P)*(W/P), D], row-major tokens


class VisionTransformer(nn.Module):
    """LVFace's ViT: images [B, 3, H, W] (already (x/255 - 0.5)/0.5) -> [B, num_features]."""

    def __init__(self, img_size=112, patch_size=9, embed_dim=512, depth=12, num_heads=8, drop_path_rate=0.1,
                 mask_ratio=0.1, num_features=512):
        super().__init__()
        grid = img_size // patch_size
        self.num_patches = grid * grid
        self.mask_ratio = mask_ratio
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=2e-5))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def random_masking(self, x):
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        return kept, ids_restore

    def forward(self, x):
        b = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, ids_restore = self.random_masking(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x.float())
        if masking:
            fill = self.mask_token.repeat(b, ids_restore.shape[1] - x.shape[1], 1)
            x = torch.cat([x, fill], dim=1)
            x = torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
        return self.feature(x.reshape(b, -1))


def randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial LayerNorm / BatchNorm affine parameters and BatchNorm running statistics, so parity
    checks cover every mapped tensor (a fresh module has scale 1, bias 0, mean 0, var 1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.05 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
                m.num_batches_tracked.fill_(1234)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(0.02 * torch.randn(m.bias.shape, generator=generator))
        model.mask_token.copy_(torch.randn(model.mask_token.shape, generator=generator))


def normalize(images_uint8_nhwc) -> torch.Tensor:
    """uint8 [B, H, W, 3] RGB -> float [B, 3, H, W], (x/255 - 0.5)/0.5 as LVFace's inference."""
    x = torch.as_tensor(images_uint8_nhwc).float().permute(0, 3, 1, 2)
    return (x / 255.0 - 0.5) / 0.5

