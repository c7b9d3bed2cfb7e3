"""A PyTorch mirror of the official Part fViT / fViT and the LAFS DINO head, for parity tests and benchmarks.

Written from a description of the official `ViT_face.py` and `vision_transformer.py` (shapes, key names, numerics), not from their code: the
module tree reproduces the official state-dict keys and shapes of §1.7 exactly (stn.features.*,
output_layer.1, cls_token, pos_embedding, patch_to_embedding, transformer.layers.{l}.{0,1}.fn.*,
mlp_head.0, loss.weight; head.mlp.{0,2,4}, head.last_layer.weight_g / weight_v), and its forward pass
follows the official numerics: symmetric padding, SE before the nonlinearity, min-max landmarks,
one grid_sample per landmark assembled into a mosaic and re-cut with the einops layout
'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', attention scale dim**-0.5, exact GELU, constant drop path.
Test-only: the package never imports torch except in the converter's command line.
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MOBILENET_V3_LARGE = (
    (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
)


class HardSwish(nn.Module):
    def forward(self, x):
        return x * F.relu6(x + 3.0) / 6.0


class HardSigmoid(nn.Module):
    def forward(self, x):
        return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // 4, bias=False), nn.ReLU(),
                                nn.Linear(channels // 4, channels, bias=False), HardSigmoid())

    def forward(self, x):
        gate = self.fc(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, kernel, stride, exp, se, nl):
        super().__init__()
        act = nn.ReLU if nl == "RE" else HardSwish
        pad = (kernel - 1) // 2
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, exp, 1, 1, 0, bias=False), nn.BatchNorm2d(exp), act(),
            nn.Conv2d(exp, exp, kernel, stride, pad, groups=exp, bias=False), nn.BatchNorm2d(exp),
            SqueezeExcite(exp) if se else nn.Identity(), act(),
            nn.Conv2d(exp, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y


class LandmarkTrunk(nn.Module):
    """stn: features.0 = stem (conv, BN, h-swish), features.1.. = bottlenecks."""

    def __init__(self, blocks=MOBILENET_V3_LARGE, stem=16):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), HardSwish())]
        cin = stem
        for k, exp, out, se, nl, s in blocks:
            layers.append(Bottleneck(cin, out, k, s, exp, se, nl))
            cin = out
        self.features = nn.Sequential(*layers)
        self.out_channels = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)

    def forward(self, x):
        return self.features(x)


class DropPath(nn.Module):
    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        keep = 1 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x / keep * mask


class ResidualDropPath(nn.Module):
    def __init__(self, fn, rate=0.1):
        super().__init__()
        self.fn = fn
        self.drop_path = DropPath(rate)

    def forward(self, x):
        return x + self.drop_path(self.fn(x))


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class Attention(nn.Module):
    def __init__(self, dim, heads, dim_head, dropout):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp_dim, dropout, drop_path=0.1):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([ResidualDropPath(PreNorm(dim, Attention(dim, heads, dim_head, dropout)), drop_path),
                           ResidualDropPath(PreNorm(dim, FeedForward(dim, mlp_dim, dropout)), drop_path)])
            for _ in range(depth)])

    def forward(self, x):
        for attn, ff in self.layers:
            x = ff(attn(x))
        return x


def patches_at_landmarks(images: torch.Tensor, landmarks: torch.Tensor, patch: int) -> torch.Tensor:
    """images [B, C, H, W], landmarks [B, N, 2] (x, y) pixels -> tokens [B, N, P*P*C] the official way.

    One grid_sample per landmark on a P x P grid whose first axis is the x offset; the per-landmark
    patches are tiled into a sqrt(N) x sqrt(N) mosaic and cut back into row-major tokens.
    """
    b, c, h, _ = images.shape
    n = landmarks.shape[1]
    off = torch.arange(-patch / 2, patch / 2, dtype=images.dtype, device=images.device)
    gx, gy = torch.meshgrid(off, off, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)  # [P, P, 2]: entry (i, j) = (x offset i, y offset j)
    per_landmark = []
    for i in range(n):
        g = (grid[None] + landmarks[:, i, None, None, :]) / (h * 0.5) - 1
        per_landmark.append(F.grid_sample(images, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stack = torch.stack(per_landmark, dim=2)  # [B, C, N, P, P]
    rows = math.isqrt(n)
    if rows * rows != n:
        raise ValueError(f"the official mosaic needs a square landmark count, got {n}")
    mosaic = stack.reshape(b, c, rows, rows, patch, patch).permute(0, 1, 2, 4, 3, 5)
    mosaic = mosaic.reshape(b, c, rows * patch, rows * patch)
    return grid_tokens(mosaic, patch)


def grid_tokens(images: torch.Tensor, patch: int) -> torch.Tensor:
    """einops 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'."""
    b, c, hh, ww = images.shape
    x = images.reshape(b, c, hh // patch, patch, ww // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (hh // patch) * (ww // patch), patch * patch * c)


class PartFViT(nn.Module):
    """Official module tree of ViT_face_landmark_patch8. forward(x NCHW, mode) -> (embedding, landmarks|None).

    mode 'landmarks': stn landmarks + sampling (with_land=True); 'grid': plain fViT patchify (no
    internal /255 normalisation here); 'tokens': x is already [B, N, P*P*C].
    """

    def __init__(self, num_patches=196, dim=768, depth=12, heads=11, dim_head=64, mlp_dim=2048, patch=8,
                 dropout=0.1, emb_dropout=0.1, with_land=True, blocks=MOBILENET_V3_LARGE, stem=16,
                 num_class: int | None = None):
        super().__init__()
        self.patch = patch
        self.with_land = with_land
        if with_land:
            self.stn = LandmarkTrunk(blocks, stem)
            self.output_layer = nn.Sequential(nn.Dropout(0.5), nn.Linear(self.stn.out_channels, 2 * num_patches))
            nn.init.normal_(self.output_layer[1].weight, 0, 0.01)
            nn.init.zeros_(self.output_layer[1].bias)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.patch_to_embedding = nn.Linear(3 * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim))
        if num_class:
            self.loss = nn.Module()
            self.loss.weight = nn.Parameter(torch.empty(num_class, dim))
            nn.init.xavier_uniform_(self.loss.weight)

    def landmarks(self, x):
        theta = self.output_layer(self.stn(x).mean(dim=(2, 3)))
        t_min = theta.min(dim=1, keepdim=True)[0]
        t_max = theta.max(dim=1, keepdim=True)[0]
        theta = (theta - t_min) / (t_max - t_min) * (x.shape[2] - 1)
        return theta.reshape(theta.shape[0], -1, 2)

    def embed(self, tokens):
        x = self.patch_to_embedding(tokens)
        b, n, _ = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embedding[:, : n + 1]
        x = self.transformer(self.dropout(x))
        return self.mlp_head(x[:, 0])

    def forward(self, x, mode="landmarks"):
        if mode == "landmarks":
            lm = self.landmarks(x)
            return self.embed(patches_at_landmarks(x, lm, self.patch)), lm
        if mode == "grid":
            return self.embed(grid_tokens(x, self.patch)), None
        if mode == "tokens":
            return self.embed(x), None
        raise ValueError(mode)


class WeightNormLinear(nn.Module):
    """Linear without bias, weight = weight_g * weight_v / ||weight_v|| per output row (torch weight_norm keys)."""

    def __init__(self, cin, cout):
        super().__init__()
        v = torch.empty(cout, cin)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(cout, 1))

    def forward(self, x):
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return x @ w.t()


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, hidden=2048, bottleneck=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class BackboneWithHead(nn.Module):
    """LAFS MultiCropWrapper naming: backbone (token Part fViT, with_land=False) and head (DINOHead)."""

    def __init__(self, backbone: PartFViT, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, tokens):
        emb, _ = self.backbone(tokens, mode="tokens")
        return self.head(emb)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Random affine parameters and running statistics for every BatchNorm (so eval mode is exercised)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=generator))
                m.bias.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                m.num_batches_tracked.fill_(1234)


def randomize_layernorm(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))


def supervised_checkpoint(model: PartFViT) -> dict:
    """The state dict as the official supervised checkpoints store it: from a DDP model, 'module.' prefix."""
    return {"module." + k: v.detach().clone() for k, v in model.state_dict().items()}


def lafs_ssl_checkpoint(student: BackboneWithHead, teacher: BackboneWithHead, center: torch.Tensor,
                        epoch: int = 41) -> dict:
    """The LAFS SSL container: student (DDP, 'module.'), teacher (plain), optimizer, epoch, args (an
    argparse.Namespace), dino_loss (its center), fp16_scaler."""
    return {
        "student": {"module." + k: v.detach().clone() for k, v in student.state_dict().items()},
        "teacher": {k: v.detach().clone() for k, v in teacher.state_dict().items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 3.2e-4, "weight_decay": 0.04, "params": [0, 1]}]},
        "epoch": epoch,
        "args": argparse.Namespace(arch="vit", out_dim=center.shape[1], lr=0.0005, epochs=41),
        "dino_loss": {"center": center.detach().clone()},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                        "_growth_tracker": 10},
    }


def count_params(model: nn.Module, prefix_filter: Sequence[str] = ()) -> int:
    return sum(p.numel() for name, p in model.named_parameters()
               if not prefix_filter or any(name.startswith(f) for f in prefix_filter))
