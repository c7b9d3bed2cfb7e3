"""A PyTorch mirror of FRA (the official `FRAB`, models/fra.py) written from issue 34's description, in
plain torch (torchvision's CUDA wheel does not import beside the CPU torch here), with the official
state-dict names: `online_net.backbone.*` (torchvision ResNet names), `online_net.neck.{proj, proj_pixel,
proj_obj, proj_attn, proto}`, `target_net.*`, `predictor.mlp.*`, `predictor_obj.mlp.*`.

Test-only: the parity tests compare lafs_jax.methods.fra against it, and the conversion tests save its
state dict in the official training-checkpoint layout.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet without avgpool / fc; forward gives the final map [B, C, h, w]."""

    def __init__(self, block, layers, width=64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, n in enumerate(layers):
            setattr(self, f"layer{i + 1}", self._make_layer(block, width * 2 ** i, n, 1 if i == 0 else 2))
        self.out_channels = width * 8 * block.expansion

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class MLP1D(nn.Module):
    """conv1x1 (no bias) -> BatchNorm1d -> ReLU -> conv1x1 (no bias) on [B, C, L]."""

    def __init__(self, cin, hidden, cout):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv1d(cin, hidden, 1, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Conv1d(hidden, cout, 1, bias=False))

    def forward(self, x):
        return self.mlp(x)


def sine_position(b, h, w, num_feats, temperature=10000.0):
    """DETR's normalised 2-D sine encoding [B, 2 num_feats, h, w] (y features then x features)."""
    scale, eps = 2 * math.pi, 1e-6
    ones = torch.ones(b, h, w)
    y = ones.cumsum(1)
    x = ones.cumsum(2)
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class DecoderLayer(nn.Module):
    """DETR post-norm decoder layer (self-attention, cross-attention, ReLU FFN)."""

    def __init__(self, d, heads, ffn, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d, heads, dropout=dropout)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt, memory, pos, query_pos):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt)[0]))
        t2 = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory)[0]
        tgt = self.norm2(tgt + self.dropout2(t2))
        t2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(t2))


class Decoder(nn.Module):
    def __init__(self, d, heads, ffn, dropout, layers):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(d, heads, ffn, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)

    def forward(self, tgt, memory, pos, query_pos):
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
        return self.norm(tgt)


class Transformer(nn.Module):
    def __init__(self, d, heads, ffn, dropout, layers):
        super().__init__()
        self.decoder = Decoder(d, heads, ffn, dropout, layers)


class MaskMLP(nn.Module):
    def __init__(self, d, out, num_layers=3):
        super().__init__()
        dims = [d] * num_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class TransformerPredictor(nn.Module):
    """input_proj (1x1 conv with bias) + sine position, Q learned queries, decoder, 3-layer mask MLP."""

    def __init__(self, cin, d, queries, heads=8, ffn=None, dropout=0.1, layers=2):
        super().__init__()
        self.d = d
        self.transformer = Transformer(d, heads, ffn or d, dropout, layers)
        self.query_embed = nn.Embedding(queries, d)
        self.input_proj = nn.Conv2d(cin, d, 1)
        self.mask_embed = MaskMLP(d, d)

    def forward(self, x):
        b, _, h, w = x.shape
        pos = sine_position(b, h, w, self.d // 2).flatten(2).permute(2, 0, 1)
        src = self.input_proj(x).flatten(2).permute(2, 0, 1)
        query = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)
        hs = self.transformer.decoder(torch.zeros_like(query), src, pos, query)
        return self.mask_embed(hs.transpose(0, 1))  # [B, Q, d]


class Neck(nn.Module):
    def __init__(self, cin, hidden, out, queries, dropout=0.1, layers=2, heads=8):
        super().__init__()
        self.proj = MLP1D(cin, hidden, out)
        self.proj_pixel = MLP1D(cin, hidden, out)
        self.proj_obj = MLP1D(cin, hidden, out)
        self.proj_attn = TransformerPredictor(cin, out, queries, heads, out, dropout, layers)
        self.register_buffer("proto", torch.randn(queries, out))

    def forward(self, x, train=True):
        b, c, h, w = x.shape
        z_g = self.proj(F.adaptive_avg_pool2d(x, 1).flatten(2))
        u = self.proj_pixel(x.flatten(2))  # [B, d, P]
        e = self.proj_attn(x)  # [B, Q, d]
        if train:
            ebar = e.mean(0, keepdim=True).expand(b, -1, -1)
            dots = torch.einsum("bqc,bcp->bqp", F.normalize(ebar, dim=2), F.normalize(u, dim=1))
            with torch.no_grad():
                self.proto = self.proto * 0.9 + e.mean(0) * 0.1
        else:
            dots = torch.einsum("qc,bcp->bqp", F.normalize(self.proto, dim=1), F.normalize(u, dim=1))
        m = dots.softmax(1) + 1e-7
        slots = torch.einsum("bcp,bqp->bqc", x.flatten(2), m / m.sum(2, keepdim=True))
        z_r = self.proj_obj(slots.transpose(1, 2))  # [B, d, Q]
        return z_g, z_r, dots


class Encoder(nn.Module):
    def __init__(self, backbone, hidden, out, queries, dropout=0.1, layers=2, heads=8):
        super().__init__()
        self.backbone = backbone
        self.neck = Neck(backbone.out_channels, hidden, out, queries, dropout, layers, heads)

    def forward(self, x, train=True):
        return self.neck(self.backbone(x), train)


def byol(p, t):
    """2 - 2 mean cos over rows of [N, d]."""
    return 2 - 2 * (F.normalize(p, dim=1) * F.normalize(t, dim=1)).sum() / p.shape[0]


def sinkhorn(t, iters=3):
    q = t.T.clone()  # [Q, N]
    k, n = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(1, keepdim=True)
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= n
    return (q * n).T


class FRAB(nn.Module):
    """The official FRAB's forward (loss terms) for one pair of views, both networks in train mode."""

    def __init__(self, backbone, hidden=64, out=32, queries=4, dropout=0.0, layers=2, heads=8, teacher_temp=0.04,
                 student_temp=0.1, w_cluster=0.1, w_dec=0.02, loss_weight=0.5):
        super().__init__()
        self.online_net = Encoder(backbone, hidden, out, queries, dropout, layers, heads)
        self.target_net = copy.deepcopy(self.online_net)
        for p in self.target_net.parameters():
            p.requires_grad = False
        self.predictor = MLP1D(out, hidden, out)
        self.predictor_obj = MLP1D(out, hidden, out)
        self.encoder_q = self.online_net.backbone
        self.register_buffer("center", torch.zeros(1, queries))
        self.tt, self.st, self.wc, self.wd, self.lw = teacher_temp, student_temp, w_cluster, w_dec, loss_weight

    def direction(self, online, target):
        z_o, r_o, _ = online
        z_t, r_t, _ = target
        g = byol(self.predictor(z_o).squeeze(-1), z_t.squeeze(-1))
        p = F.normalize(self.predictor_obj(r_o).transpose(1, 2), dim=-1)  # [B, Q, d]
        t = F.normalize(r_t.transpose(1, 2), dim=-1)
        q = p.shape[1]
        region = byol(p.reshape(-1, p.shape[-1]), t.reshape(-1, t.shape[-1]))
        corr = torch.matmul(p, t.transpose(2, 1)) * (1 - torch.eye(q))
        dec = ((corr ** 2).sum(-1) / q).mean()
        return {"global": g, "region": region, "decorrelation": dec,
                "base": self.lw * g + (1 - self.lw) * (region + self.wd * dec)}

    def cluster(self, dots_o, dots_t):
        rows_o = dots_o.permute(0, 2, 1).flatten(0, 1)  # [B P, Q]
        rows_t = dots_t.permute(0, 2, 1).flatten(0, 1)
        logp = F.log_softmax(rows_o / self.st, dim=-1)
        a = sinkhorn(F.softmax((rows_t - self.center) / self.tt, dim=-1))
        ce = (-a * logp).sum(-1).mean()
        pbar = F.softmax(rows_o / self.st, dim=-1).mean(0)
        memax = (pbar * torch.log(pbar)).sum() + math.log(float(len(pbar)))
        return ce, memax

    def forward(self, v1, v2):
        o1, o2 = self.online_net(v1), self.online_net(v2)
        with torch.no_grad():
            t1, t2 = self.target_net(v1), self.target_net(v2)
        d12, d21 = self.direction(o1, t2), self.direction(o2, t1)
        ce1, mm1 = self.cluster(o1[2], t1[2])
        ce2, mm2 = self.cluster(o2[2], t2[2])
        out = {f"{k}_12": v for k, v in d12.items()}
        out.update({f"{k}_21": v for k, v in d21.items()})
        out.update(cluster_ce_1=ce1, memax_1=mm1, cluster_ce_2=ce2, memax_2=mm2)
        out["loss"] = d12["base"] + d21["base"] + self.wc * 0.5 * (ce1 + mm1 + ce2 + mm2)
        return out
